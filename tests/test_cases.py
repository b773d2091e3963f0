"""The case handed over (refflow.validate.cases): binding, user cases, JSON / npz files, the TorchCFM preset."""
import inspect
import json
import subprocess
import sys

import numpy as np
import pytest

from refflow.paths import CustomPath, VPPath
from refflow.targets import Empirical, GaussianMixture
from refflow.validate import check, get_case, load_case_file, make_case
from refflow.validate.cases import bind_case, case_from_dict

OT = "eight-gaussians/ot/sigma_min=0/d=2"


def test_an_implementation_with_a_case_parameter_receives_it():
    seen = []

    def field(t, x, *, case):
        seen.append(case)
        return case.marginal.velocity(x, t)

    assert check("field", field, OT, n=128).passed and seen[0] is get_case(OT)
    # the bound function shows the signature refflow calls (labels are not inferred from `case`)
    assert list(inspect.signature(bind_case(field, get_case(OT))).parameters) == ["t", "x"]
    # negative control: a function that uses the wrong case's field fails
    other = get_case("two-moons/ot/sigma_min=0/d=2")
    assert not check("field", lambda t, x, case: other.marginal.velocity(x, t), OT, n=128).passed
    plain = lambda t, x: x  # noqa: E731
    assert bind_case(plain, get_case(OT)) is plain


def test_json_and_npz_round_trips_are_exact(tmp_path):
    target = GaussianMixture([0.2, 0.8], [[0.1, -1.0 / 3.0], [2.0, 1.0]],
                             [[[1.0, 0.3], [0.3, 0.5]], [[0.2, 0.0], [0.0, 0.7]]], labels=[0, 1])
    case = make_case(target, VPPath(0.1, 20.0), name="mine")
    data = json.loads(json.dumps(case.to_json()))
    assert data["path"]["schedule"]["d_sigma"][-1] is None  # VP's sigma_t' is -inf at t = 1
    again = case_from_dict(data)
    case.save_npz(tmp_path / "c.npz")
    from_npz = load_case_file(tmp_path / "c.npz")
    (tmp_path / "c.json").write_text(json.dumps(data))
    from_json = load_case_file(tmp_path / "c.json")
    for c in (again, from_npz, from_json):
        assert c.name == case.name == "mine/vp/sigma_min=0/d=2"
        np.testing.assert_array_equal(c.target.covariances, target.covariances)
        np.testing.assert_array_equal(c.target.means, target.means)
        assert c.path.config() == case.path.config() and c.kinds == case.kinds
    with np.load(tmp_path / "c.npz") as z:
        np.testing.assert_array_equal(z["weights"], [0.2, 0.8])
        np.testing.assert_allclose(z["sigma_t"][:-1], case.path.sigma(z["t"][:-1]))


def test_bad_case_files_are_refused_with_the_field_named(tmp_path):
    with pytest.raises(ValueError, match="expected an existing .json or .npz file"):
        load_case_file(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text(json.dumps({"format": "other/9"}))
    with pytest.raises(ValueError, match="expected format 'refflow-case/1', got 'other/9'"):
        load_case_file(tmp_path / "bad.json")
    data = get_case(OT).to_json()
    del data["target"]["means"]
    (tmp_path / "nomeans.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="expected a field 'means' in target"):
        load_case_file(tmp_path / "nomeans.json")
    custom = make_case(get_case(OT).target, CustomPath(lambda t: t, lambda t: 1 - t))
    with pytest.raises(ValueError, match="CustomPath"):
        case_from_dict(custom.to_json())


def test_empirical_cases_offer_only_the_kinds_they_can():
    points = np.random.default_rng(0).normal(size=(30, 2))
    assert make_case(Empirical(points), "ot", name="e").kinds == ("path",)
    case = make_case(Empirical(points), "ot", sigma_min=0.1, name="e")
    assert set(case.kinds) == {"path", "field", "loglik", "sampler"}
    assert check("field", lambda t, x, case: case.marginal.velocity(x, t), case, n=256).passed
    with pytest.raises(ValueError, match="does not support kind 'field'"):
        check("field", lambda t, x: x, make_case(Empirical(points), "ot", name="e"))


def test_make_case_refuses_bad_arguments():
    with pytest.raises(TypeError, match="target: expected a GaussianMixture or an Empirical"):
        make_case(np.zeros((3, 2)), "ot")
    with pytest.raises(ValueError, match="name: expected a non-empty label without '/'"):
        make_case(get_case(OT).target, "ot", name="a/b")


def test_the_torchcfm_preset_matches_torchcfms_sampler():
    torch = pytest.importorskip("torch")
    utils = pytest.importorskip("torchcfm.utils")
    case = get_case("torchcfm-eight-gaussians/ot/sigma_min=0/d=2")
    torch.manual_seed(0)
    samples = utils.sample_8gaussians(4000).double().numpy()
    report = check("sampler", lambda n, seed: samples[:n], case, n=4000)
    assert report["mean_log_prob"].passed and report["moments"].passed, report.table()
    # negative control: refflow's own eight Gaussians (radius 4, std 0.4) are another distribution
    assert not check("sampler", lambda n, seed: samples[:n], OT, n=4000).passed


def test_cli_case_file_and_adapter(tmp_path):
    get_case(OT).save_npz(tmp_path / "c.npz")
    (tmp_path / "impl.py").write_text(
        "def path(x_0, x_1, t):\n    t = t[:, None]\n    return (1 - t) * x_0 + t * x_1, x_1 - x_0\n")
    run = subprocess.run([sys.executable, "-m", "refflow.cli", "check", "--kind", "path", "--impl", "impl.py:path",
                          "--case-file", "c.npz", "--timeout", "0"], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0 and "PASSED" in run.stdout, run.stderr
    both = subprocess.run([sys.executable, "-m", "refflow.cli", "check", "--kind", "path", "--impl", "impl.py:path",
                           "--case-file", "c.npz", "--case", OT], cwd=tmp_path, capture_output=True, text=True)
    assert both.returncode == 2 and "give one of them" in both.stderr and not both.stdout
