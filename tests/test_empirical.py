"""The streamed empirical field (refflow.empirical) against the in-memory Empirical and a long-double reference."""
from __future__ import annotations

import numpy as np
import pytest

from refflow import empirical
from refflow.empirical import (Partial, StreamingEmpirical, evaluate, merge, merge_all, nearest_distances,
                               partial_sums, shard_rows)
from refflow.paths import OTPath, VEPath, VPPath
from refflow.targets import Empirical

EPS = np.finfo(np.float64).eps
NAMES = ("log_prob", "velocity", "score", "divergence")


def _data(rng, N=300, d=5, shift=2.0):
    return rng.standard_normal((N, d)) + shift, rng.standard_normal((40, d))


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _long_double(X, x, t, path):
    """eq 16/19 for point masses by direct differences x - alpha x_1, in long double; the divergence
    from the two-pass posterior variance (no expanded squares anywhere)."""
    a, s2 = float(path.alpha(t)), float(path.sigma(t)) ** 2
    da, sds = float(path.d_alpha(t)), float(path.sigma_d_sigma(t))
    Xl, xl = X.astype(np.longdouble), x.astype(np.longdouble)
    z = xl[:, None, :] - a * Xl[None]
    log_n = -np.sum(z * z, 2) / (2 * s2) - 0.5 * X.shape[1] * np.log(2 * np.pi * s2) - np.log(len(X))
    top = log_n.max(1, keepdims=True)
    r = np.exp(log_n - top)
    log_p = np.log(r.sum(1)) + top[:, 0]
    r /= r.sum(1, keepdims=True)
    x_bar = r @ Xl
    spread = np.einsum("nj,njd->n", r, (Xl[None] - x_bar[:, None, :]) ** 2)
    b = sds / s2
    resid = xl - a * x_bar
    return {"log_prob": log_p, "velocity": da * x_bar + b * resid, "score": -resid / s2,
            "divergence": X.shape[1] * b + (a / s2) * (da - b * a) * spread,
            "_scale": X.shape[1] * abs(b) + (a / s2) * abs(da - b * a) * (r @ np.sum(Xl * Xl, 1) + np.sum(x_bar**2, 1))}


PATHS = [OTPath(0.01), VPPath(), VEPath()]


@pytest.mark.parametrize("path", PATHS, ids=repr)
@pytest.mark.parametrize("t", [0.0, 0.3, 0.7, "vector"])
def test_streamed_equals_in_memory_empirical(path, t):
    rng = np.random.default_rng(1)
    X, x = _data(rng)
    t = rng.uniform(0.0, 0.7, len(x)) if t == "vector" else t
    ref = Empirical(X).marginal(path).evaluate(x, t, NAMES)
    for block in (1, 37, 300, None):  # one row per block, ragged blocks, one block
        got = evaluate(X, x, t, path, block_size=block)
        for k in ("log_prob", "velocity", "score"):
            # both are float64 evaluations of one closed form; 1e-12 is ~5000 eps of slack for
            # the expanded square and the different summation orders
            assert _rel(got[k], ref[k]) <= 1e-12, (k, block)
        # the divergence: d b_t plus a covariance term that nearly cancel in places (VP near
        # t = 0); the in-memory form loses digits there to its own expansion, so both are held to
        # the long-double reference within the rounding bound of the streamed formula
        ref_div, scale = _long_double_div(X, x, t, path)
        assert np.all(np.abs(got["divergence"] - ref_div) <= 64 * EPS * (scale + np.abs(ref_div))), block


def _long_double_div(X, x, t, path):
    t = np.broadcast_to(np.asarray(t, dtype=float), (len(x),))
    out = [_long_double(X, x[i:i + 1], float(t[i]), path) for i in range(len(x))]
    return (np.array([float(o["divergence"][0]) for o in out]), np.array([float(o["_scale"][0]) for o in out]))


@pytest.mark.parametrize("path,t", [(OTPath(0.01), 0.99), (OTPath(0.05), 1.0), (VEPath(), 0.9), (VPPath(), 0.99)],
                         ids=repr)
def test_near_the_data_against_long_double(path, t):
    # Near t = 1 the in-memory divergence loses digits to its own expansion; hold both the
    # streamed values and it to a long-double two-pass reference, with the bound of the rounding.
    rng = np.random.default_rng(2)
    X, x = _data(rng)
    x = x + 2.0  # queries among the data, where the posterior is spread over several points
    ref = _long_double(X, x, t, path)
    got = evaluate(X, x, t, path, block_size=64)
    for k in ("log_prob", "velocity", "score"):
        assert _rel(got[k], np.asarray(ref[k], dtype=float)) <= 1e-11, k
    # divergence: the posterior variance is taken as E|x_1|^2 - |x_bar|^2, so its rounding is
    # a few eps of (alpha/sigma^2)|alpha' - b alpha| (E|x_1|^2 + |x_bar|^2) per point
    bound = 64 * EPS * (np.asarray(ref["_scale"], dtype=float) + np.abs(np.asarray(ref["divergence"], dtype=float)))
    assert np.all(np.abs(got["divergence"] - np.asarray(ref["divergence"], dtype=float)) <= bound)
    assert all(np.all(np.isfinite(v)) for v in got.values())


def test_finite_at_t_one_with_sigma_min():
    rng = np.random.default_rng(3)
    X, _ = _data(rng)
    x = X[:10] + 1e-3 * rng.standard_normal((10, X.shape[1]))
    got = evaluate(X, x, 1.0, OTPath(1e-3))
    assert all(np.all(np.isfinite(v)) for v in got.values())
    # at t = 1 the field points every query at its nearest data point: u = x_1 - ... -> (x - x_1) sigma'/sigma
    ref = Empirical(X).marginal(OTPath(1e-3)).velocity(x, 1.0)
    assert _rel(got["velocity"], ref) <= 1e-12


def test_sigma_zero_is_refused_like_empirical():
    rng = np.random.default_rng(4)
    X, x = _data(rng)
    with pytest.raises(ValueError, match=r"sigma_t = 0 \(here at t = 1.0\)"):
        evaluate(X, x, 1.0, OTPath(0.0))
    t = np.full(len(x), 0.5)
    t[3] = 1.0
    with pytest.raises(ValueError, match=r"sigma_t > 0"):
        evaluate(X, x, t, OTPath(0.0), ("log_prob",))


def test_weights_and_zero_weights():
    rng = np.random.default_rng(5)
    X, x = _data(rng, N=50)
    w = rng.uniform(0, 1, 50)
    w[[3, 10, 11]] = 0.0
    w /= w.sum()
    ref = Empirical(X, w).marginal(OTPath(0.01)).evaluate(x, 0.6, NAMES)
    got = evaluate(X, x, 0.6, OTPath(0.01), weights=w, block_size=7)
    for k in NAMES:
        assert _rel(got[k], ref[k]) <= 1e-12, k


def test_merge_is_exact_and_order_free_up_to_rounding():
    rng = np.random.default_rng(6)
    X, x = _data(rng, N=200)
    path, c = OTPath(0.01), X[:50].mean(0)
    whole = partial_sums(X, x, 0.8, path, center=c, block_size=200)
    parts = [partial_sums(X, x, 0.8, path, center=c, rows=r, block_size=200) for r in shard_rows(200, 3)]
    for combined in (merge_all(parts), merge(parts[2], merge(parts[0], parts[1]))):
        # same sums after rescaling to the common max: a few eps of reassociation
        for a, b in zip(combined, whole):
            assert _rel(a, b) <= 1e-13
    # an empty part is the identity
    empty = partial_sums(X, x, 0.8, path, center=c, rows=slice(5, 5))
    assert np.all(empty.m == -np.inf) and np.all(empty.s == 0)
    same = merge(whole, empty)
    assert all(np.array_equal(a, b) for a, b in zip(same, whole))


def test_a_merge_that_drops_the_max_is_caught():
    # negative control: adding the sums without rescaling them to a common max
    rng = np.random.default_rng(7)
    X, x = _data(rng)
    ref = Empirical(X).marginal(OTPath(0.01)).velocity(x, 0.9)
    wrong = empirical.finish(partial_sums(X, x, 0.9, OTPath(0.01), block_size=30, _control="merge-drops-max"),
                             x, 0.9, OTPath(0.01), empirical.default_center(X), len(X), ("velocity",))
    assert not _rel(wrong["velocity"], ref) <= 1e-6


def test_an_unshifted_log_sum_exp_is_caught():
    rng = np.random.default_rng(8)
    X, x = _data(rng)
    with np.errstate(over="ignore", invalid="ignore"):
        part = partial_sums(X, x, 0.95, OTPath(0.01), block_size=30, _control="unshifted")
        out = empirical.finish(part, x, 0.95, OTPath(0.01), empirical.default_center(X), len(X), ("log_prob",))
    ref = Empirical(X).marginal(OTPath(0.01)).log_prob(x, 0.95)
    assert not (np.all(np.isfinite(out["log_prob"])) and _rel(out["log_prob"], ref) <= 1e-6)


def test_memory_mapped_file_and_streaming_target(tmp_path):
    rng = np.random.default_rng(9)
    X, x = _data(rng, N=123)
    np.save(tmp_path / "data.npy", X)
    target = StreamingEmpirical(tmp_path / "data.npy", block_size=10)
    assert isinstance(target.data, np.memmap) and target.n_points == 123
    m = target.marginal(VPPath())
    ref = Empirical(X).marginal(VPPath())
    assert _rel(m.velocity(x, 0.4), ref.velocity(x, 0.4)) <= 1e-12
    assert _rel(m.divergence(x, 0.4), ref.divergence(x, 0.4)) <= 1e-12
    assert _rel(m.field()(0.4, x), ref.velocity(x, 0.4)) <= 1e-12


def test_npz_and_bad_files(tmp_path):
    X = np.arange(12.0).reshape(6, 2)
    np.savez(tmp_path / "one.npz", X)
    assert np.array_equal(empirical.load_points(tmp_path / "one.npz"), X)
    np.savez(tmp_path / "two.npz", a=X, b=X)
    with pytest.raises(ValueError, match=r"key: expected one of \['a', 'b'\]"):
        empirical.load_points(tmp_path / "two.npz")
    assert np.array_equal(empirical.load_points(tmp_path / "two.npz", key="b"), X)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        empirical.load_points(tmp_path / "nope.npy")
    (tmp_path / "x.txt").write_text("1 2")
    with pytest.raises(ValueError, match="expected a .npy or .npz"):
        empirical.load_points(tmp_path / "x.txt")
    np.save(tmp_path / "flat.npy", np.arange(3.0))
    with pytest.raises(ValueError, match=r"shape \(N, d\).*got shape \(3,\)"):
        empirical.load_points(tmp_path / "flat.npy")


def test_bad_input_is_refused_with_the_value():
    rng = np.random.default_rng(10)
    X, x = _data(rng, N=20)
    path = OTPath(0.01)
    with pytest.raises(ValueError, match=r"x: expected 5 columns"):
        evaluate(X, x[:, :3], 0.5, path)
    with pytest.raises(ValueError, match=r"t: expected values in \[0, 1\], got 1.0000001"):
        evaluate(X, x, 1.0000001, path)
    with pytest.raises(TypeError, match="path: expected a refflow.paths.AffinePath"):
        evaluate(X, x, 0.5, "ot")
    with pytest.raises(ValueError, match="names: expected a non-empty subset"):
        evaluate(X, x, 0.5, path, ("velocity", "entropy"))
    with pytest.raises(ValueError, match=r"block_size: expected a value in \[1, inf\), got 0"):
        evaluate(X, x, 0.5, path, block_size=0)
    with pytest.raises(ValueError, match=r"weights: expected values summing to 1 .* got sum 2.0"):
        evaluate(X, x, 0.5, path, weights=np.full(20, 0.1))
    with pytest.raises(ValueError, match=r"weights: expected finite non-negative values, got -0.5 at index 0"):
        evaluate(X, x, 0.5, path, weights=np.r_[-0.5, np.full(19, 1.5 / 19)])
    bad = X.copy()
    bad[13, 2] = np.nan
    with pytest.raises(ValueError, match=r"data: expected finite values, got 1 NaN or inf entries in rows 10 to 19"):
        evaluate(bad[:, :], x, 0.5, path, block_size=10, center=np.zeros(5))
    with pytest.raises(ValueError, match="data: expected a 2-D array"):
        evaluate(X[:, 0], x, 0.5, path)
    with pytest.raises(ValueError, match=r"data: expected at least one point"):
        evaluate(X[:0], x, 0.5, path)
    with pytest.raises(TypeError, match="scheduler: expected None, 'local' or a scheduler address, got 3"):
        evaluate(X, x, 0.5, path, scheduler=3)


def test_nearest_distances_find_copies_exactly():
    rng = np.random.default_rng(11)
    X = rng.standard_normal((500, 8)) * 10.0
    x = np.vstack([X[[4, 77, 499]], rng.standard_normal((5, 8))])
    dist, idx = nearest_distances(X, x, k=2, block_size=64)
    assert np.array_equal(idx[:3, 0], [4, 77, 499]) and np.all(dist[:3, 0] == 0.0)  # recomputed directly
    brute = np.sqrt(((x[:, None, :] - X[None]) ** 2).sum(2))
    order = np.argsort(brute, axis=1)[:, :2]
    assert np.array_equal(idx, order)
    assert np.allclose(dist, np.take_along_axis(brute, order, 1), rtol=1e-14, atol=0)


def test_digits_when_scikit_learn_is_there():
    pytest.importorskip("sklearn")
    X = empirical.digits()
    assert X.shape == (1797, 64) and X.min() == -1.0 and X.max() == 1.0


# -- Dask ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dask_client():
    distributed = pytest.importorskip("dask.distributed")
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0")
    client = distributed.Client(cluster)
    yield client
    client.close()
    cluster.close()


def test_dask_equals_single_process(dask_client, tmp_path):
    rng = np.random.default_rng(12)
    X, x = _data(rng, N=1000, d=6)
    t = rng.uniform(0.1, 0.9, len(x))
    path = OTPath(0.01)
    c = empirical.default_center(X)
    single = evaluate(X, x, t, path, block_size=128)
    np.save(tmp_path / "d.npy", X)
    for source in (X, str(tmp_path / "d.npy")):
        dist = evaluate(source, x, t, path, block_size=128, client=dask_client, shards=3)
        # the same shards merged here, in the same order: bit for bit
        local = merge_all([partial_sums(X[r], x, t, path, center=c, block_size=128) for r in shard_rows(1000, 3)])
        same = empirical.finish(local, x, t, path, c, 1000)
        for k in NAMES:
            assert np.array_equal(dist[k], same[k]), k
            # unsharded: only the merge's reassociation differs
            assert _rel(dist[k], single[k]) <= 1e-13, k


def test_dask_with_weights(dask_client):
    rng = np.random.default_rng(13)
    X, x = _data(rng, N=90)
    w = rng.uniform(0, 1, 90)
    w[:30] = 0.0  # a whole shard of zero weight
    w /= w.sum()
    ref = Empirical(X, w).marginal(VPPath()).evaluate(x, 0.5, NAMES)
    got = evaluate(X, x, 0.5, VPPath(), weights=w, client=dask_client, shards=3)
    for k in NAMES:
        assert _rel(got[k], ref[k]) <= 1e-12, k


def test_dask_local_cluster_by_default():
    pytest.importorskip("dask.distributed")
    rng = np.random.default_rng(14)
    X, x = _data(rng, N=100)
    got = evaluate(X, x, 0.5, OTPath(0.01), ("log_prob",), scheduler="local", n_workers=2)
    ref = Empirical(X).marginal(OTPath(0.01)).log_prob(x, 0.5)
    assert _rel(got["log_prob"], ref) <= 1e-12


def test_missing_dask_names_the_extra(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_dask(name, *a, **k):
        if name.startswith("dask"):
            raise ImportError("no dask here")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_dask)
    rng = np.random.default_rng(15)
    X, x = _data(rng, N=10)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[dask\]"'):
        evaluate(X, x, 0.5, OTPath(0.01), scheduler="local")


def test_partial_is_a_named_tuple():
    assert Partial._fields == ("m", "s", "s_x", "s_xx")


# -- the check and the command -----------------------------------------------------------------

def test_verify_check_passes_and_catches_its_control():
    from refflow.verify.registry import registered, run_check

    (entry,) = [e for e in registered() if e.name == "empirical.streamed"]
    result = run_check(entry, quick=True)
    assert result.passed and result.control_caught and result.control_error > 1e3 * result.tolerance


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from refflow import cli
    from refflow.targets import eight_gaussians

    folder = tmp_path_factory.mktemp("emp")
    assert cli.main(["train", "--steps", "20", "--hidden", "8", "--batch-size", "32", "--quiet",
                     "--out", str(folder / "m.npz")]) == 0
    np.save(folder / "d.npy", eight_gaussians().sample(300, 0))
    return folder


def test_cli_reports_field_distance_and_copies(checkpoint, capsys):
    import json

    from refflow import cli

    out = checkpoint / "r.json"
    assert cli.main(["empirical", str(checkpoint / "m.npz"), "--data", str(checkpoint / "d.npy"),
                     "--times", "0.2,0.8", "--n-query", "64", "--samples", "50", "--steps", "10",
                     "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["t"] for r in report["field_distance"]] == [0.2, 0.8]
    assert all(np.isfinite(r["relative"]) and r["relative"] > 0 for r in report["field_distance"])
    assert report["samples"]["n"] == 50 and 0.0 <= report["samples"]["copy_fraction"] <= 1.0
    assert "nearest training point" in capsys.readouterr().out


def test_cli_dask_gives_the_same_numbers(checkpoint):
    pytest.importorskip("dask.distributed")
    import json

    from refflow import cli

    base = ["empirical", str(checkpoint / "m.npz"), "--data", str(checkpoint / "d.npy"), "--times", "0.5",
            "--n-query", "32", "--samples", "0"]
    assert cli.main(base + ["--out", str(checkpoint / "a.json")]) == 0
    assert cli.main(base + ["--dask", "--workers", "2", "--out", str(checkpoint / "b.json")]) == 0
    a, b = (json.loads((checkpoint / f).read_text())["field_distance"][0] for f in ("a.json", "b.json"))
    assert abs(a["rms_memorising"] - b["rms_memorising"]) <= 1e-13 * a["rms_memorising"]


@pytest.mark.parametrize("extra,message", [
    (["--times", "0.5,1.0"], "sigma_t = 0"),
    (["--times", "0.5,1.5"], "--times: expected a finite value in [0.0, 1.0], got 1.5"),
    (["--key", "a"], "--key: applies only to a .npz data file"),
    (["--workers", "3"], "--workers: applies only with --dask"),
    (["--n-query", "0"], "--n-query: expected an integer >= 1, got 0"),
])
def test_cli_bad_input_exits_2_and_writes_nothing(checkpoint, capsys, extra, message):
    from refflow import cli

    out = checkpoint / "bad.json"
    rc = cli.main(["empirical", str(checkpoint / "m.npz"), "--data", str(checkpoint / "d.npy"),
                   "--samples", "0", "--out", str(out)] + extra)
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1 and not out.exists()


def test_cli_refuses_data_of_another_dimension(checkpoint, capsys):
    from refflow import cli

    np.save(checkpoint / "d3.npy", np.zeros((5, 3)))
    assert cli.main(["empirical", str(checkpoint / "m.npz"), "--data", str(checkpoint / "d3.npy")]) == 2
    assert "expected points of dimension 2 to match the model, got shape (5, 3)" in capsys.readouterr().err


def test_cli_without_the_extras_says_which(checkpoint, capsys, monkeypatch):
    import builtins

    from refflow import cli

    real = builtins.__import__

    def hidden(name, *a, **k):
        if name.startswith(("dask", "sklearn")):
            raise ImportError(f"{name} hidden")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", hidden)
    model = str(checkpoint / "m.npz")
    assert cli.main(["empirical", model, "--data", str(checkpoint / "d.npy"), "--dask"]) == 2
    assert '--dask: needs dask.distributed; install the extra with pip install -e ".[dask]"' in capsys.readouterr().err
    assert cli.main(["empirical", model, "--data", "digits"]) == 2
    assert 'pip install -e ".[data]"' in capsys.readouterr().err
