"""Tests of the CFM losses, Algorithm 1 (refflow.train), checkpoints and the train/sample CLI."""
import json

import numpy as np
import pytest
from autograd import grad

import refflow as rf
from refflow import cli
from refflow.losses import cfm_loss, fm_loss
from refflow.nn import MLP
from refflow.train import Adam, _loss_and_grad, load_checkpoint, save_checkpoint, train
from refflow.verify.registry import registered, run_check


def small_model(**kw):
    return MLP(2, (16, 16), "silu", **kw)


def test_fast_gradient_equals_autograd_of_cfm_loss():
    model = small_model(n_classes=3)
    path = rf.VPPath()
    rng = np.random.default_rng(0)
    params = model.init_params(rng)
    x_0, x_1 = rng.standard_normal((2, 32, 2))
    t = rng.uniform(0, 0.99, 32)
    y = rng.integers(-1, 3, 32)
    value, g = _loss_and_grad(model, path)(params, x_0, x_1, t, y)
    assert value == pytest.approx(cfm_loss(model, params, path, x_0, x_1, t, y), rel=1e-13)
    g_ref = grad(lambda p: cfm_loss(model, p, path, x_0, x_1, t, y))(params)
    np.testing.assert_allclose(g, g_ref, rtol=1e-11, atol=1e-14)


def test_cfm_loss_by_hand_eq37():
    # eq 37: mean |u_theta(t, (1 - t) x_0 + t x_1) - (x_1 - x_0)|^2 with a model that returns x itself.
    class Identity:
        def apply(self, params, t, x, y=None):
            return x

    rng = np.random.default_rng(1)
    x_0, x_1 = rng.standard_normal((2, 10, 3))
    t = rng.uniform(size=10)
    x_t = (1 - t)[:, None] * x_0 + t[:, None] * x_1
    expected = np.mean(np.sum((x_t - (x_1 - x_0)) ** 2, axis=1))
    assert cfm_loss(Identity(), None, rf.OTPath(), x_0, x_1, t) == pytest.approx(expected, rel=1e-14)
    m = rf.eight_gaussians().marginal(rf.OTPath())
    expected_fm = np.mean(np.sum((x_t[:, :2] - m.velocity(x_t[:, :2], t)) ** 2, axis=1))
    assert fm_loss(Identity(), None, m, x_t[:, :2], t) == pytest.approx(expected_fm, rel=1e-14)


def test_adam_first_step_by_hand():
    opt = Adam(lr=0.1)
    p = opt.update(np.array([1.0, -2.0]), np.array([0.5, -4.0]))
    # after one step, m_hat = g and v_hat = g^2, so the step is lr * sign(g) (up to eps)
    np.testing.assert_allclose(p, [1.0 - 0.1, -2.0 + 0.1], rtol=1e-7)


def test_training_is_deterministic_and_reduces_the_loss():
    target, path = rf.eight_gaussians(), rf.OTPath()
    a = train(small_model(), target, path, steps=60, batch_size=64, lr=3e-3, rng=7)
    b = train(small_model(), target, path, steps=60, batch_size=64, lr=3e-3, rng=7)
    np.testing.assert_array_equal(a.params, b.params)
    assert np.mean(a.losses[-10:]) < 0.9 * np.mean(a.losses[:10])
    c = train(small_model(), target, path, steps=60, batch_size=64, lr=3e-3, rng=8)
    assert not np.array_equal(a.params, c.params)


@pytest.mark.parametrize("conditional", [False, True])
def test_resume_is_bit_exact(tmp_path, conditional):
    target, path = rf.eight_gaussians(), rf.OTPath(0.01)
    kw = dict(batch_size=32, lr=2e-3, ema_decay=0.9, label_dropout=0.3 if conditional else 0.0)
    model = small_model(n_classes=8 if conditional else None)
    whole = train(model, target, path, steps=40, rng=3, **kw)
    first = train(model, target, path, steps=25, rng=3, **kw)
    save_checkpoint(tmp_path / "c.npz", first, model, path, extra={"target": "eight-gaussians"})
    model2, path2, state, extra = load_checkpoint(tmp_path / "c.npz")
    assert extra == {"target": "eight-gaussians"} and path2.config() == path.config()
    rest = train(model2, target, path2, steps=15, resume=state, batch_size=32,
                 label_dropout=kw["label_dropout"])
    np.testing.assert_array_equal(rest.params, whole.params)
    np.testing.assert_array_equal(rest.ema_params, whole.ema_params)
    assert rest.losses == whole.losses


def test_checkpoint_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="not a readable refflow checkpoint"):
        load_checkpoint(bad)
    np.savez(tmp_path / "other.npz", config=np.array(json.dumps({"format": "x"})))
    with pytest.raises(ValueError, match="format"):
        load_checkpoint(tmp_path / "other.npz")


def test_bad_training_input():
    with pytest.raises(ValueError, match="label_dropout"):
        train(small_model(), rf.eight_gaussians(), rf.OTPath(), steps=1, rng=0, label_dropout=0.1)
    with pytest.raises(TypeError, match="path"):
        train(small_model(), rf.eight_gaussians(), "ot", steps=1, rng=0)
    with pytest.raises(TypeError, match="target"):
        train(small_model(), 3.0, rf.OTPath(), steps=1, rng=0)
    with pytest.raises(ValueError, match="target sample"):
        train(small_model(), lambda n, rng: np.zeros((n, 3)), rf.OTPath(), steps=1, rng=0)
    with pytest.raises(TypeError, match="rng"):
        train(small_model(), rf.eight_gaussians(), rf.OTPath(), steps=1, rng=None)


def test_cli_train_sample_resume(tmp_path, capsys):
    model = tmp_path / "m.npz"
    assert cli.main(["train", "--steps", "30", "--hidden", "16,16", "--out", str(model), "--quiet",
                     "--batch-size", "32"]) == 0
    more = tmp_path / "m2.npz"
    assert cli.main(["train", "--resume", str(model), "--steps", "10", "--out", str(more), "--quiet"]) == 0
    assert load_checkpoint(more)[2].step == 40
    out, png = tmp_path / "s.npz", tmp_path / "s.png"
    assert cli.main(["sample", str(more), "-n", "200", "--method", "rk4", "--steps", "10",
                     "--out", str(out), "--plot", str(png)]) == 0
    data = np.load(out)
    assert data["x_1"].shape == (200, 2) and int(data["nfe"]) == 40
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_guided_sampling_and_errors(tmp_path, capsys):
    model = tmp_path / "c.npz"
    assert cli.main(["train", "--steps", "5", "--hidden", "8", "--conditional", "--label-dropout", "0.2",
                     "--out", str(model), "--quiet"]) == 0
    out = tmp_path / "g.npz"
    assert cli.main(["sample", str(model), "-n", "50", "--label", "2", "--guidance", "1.5",
                     "--out", str(out)]) == 0
    assert np.load(out)["x_1"].shape == (50, 2)
    # errors: clear message, exit code 2, no output written
    bad = tmp_path / "corrupt.npz"
    bad.write_bytes(b"junk")
    missing_out = tmp_path / "never.npz"
    assert cli.main(["sample", str(bad), "--out", str(missing_out)]) == 2
    assert "not a readable refflow checkpoint" in capsys.readouterr().err
    assert not missing_out.exists()
    assert cli.main(["sample", str(model), "--guidance", "2", "--out", str(missing_out)]) == 2
    assert "--label" in capsys.readouterr().err
    assert not missing_out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npz", "corrupt.npz", "g.npz"]


@pytest.mark.parametrize("name, quick", [("train.learned_field", True), ("train.sample_quality", False)])
def test_registered_training_checks(name, quick):
    (entry,) = [e for e in registered() if e.name == name]
    result = run_check(entry, quick=quick)
    assert result.error <= result.tolerance, result
    assert result.control_error > result.tolerance
    assert result.passed
