"""refflow.testing (assert_*) and the pytest plugin, run as a user's own test suite would run them."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import refflow.validate as validate
from refflow import testing
from refflow.validate import make_case
from refflow.targets import GaussianMixture

pytest_plugins = ["pytester"]

OT = "eight-gaussians/ot/sigma_min=0/d=2"


def ot_path(x_0, x_1, t):
    t = t[:, None]
    return (1 - t) * x_0 + t * x_1, x_1 - x_0


def ot_path_sign_bug(x_0, x_1, t):
    t = t[:, None]
    return (1 - t) * x_0 + t * x_1, x_1 + x_0


def exact_sampler(n, seed, case):
    return case.marginal.sample(n, 1.0, seed)


def test_assert_path_returns_the_report_on_correct_code():
    report = testing.assert_path(ot_path, OT)
    assert report.passed and report.kind == "path"


def test_assert_path_raises_with_the_table_on_a_planted_bug():
    with pytest.raises(AssertionError) as info:
        testing.assert_path(ot_path_sign_bug, OT)
    message = str(info.value)
    assert "refflow check  kind=path" in message and "FAIL" in message and "u_t" in message
    assert info.value.report["u_t"].passed is False


def test_assert_sampler_receives_the_case_and_catches_a_wrong_target():
    testing.assert_sampler(exact_sampler, OT, n=1000)
    # samples of another case's target: the wrong distribution
    other = validate.get_case("torchcfm-eight-gaussians/ot/sigma_min=0/d=2")
    with pytest.raises(AssertionError, match="mean_log_prob"):
        testing.assert_sampler(lambda n, seed: other.marginal.sample(n, 1.0, seed), OT, n=1000)


def test_assert_field_on_a_user_case():
    case = make_case(GaussianMixture([0.25, 0.75], [[-2.0, 0.0], [2.0, 1.0]], [0.3, 0.6]), "vp", name="mine")
    testing.assert_field(lambda t, x, case: case.marginal.velocity(x, t), case, n=256)
    with pytest.raises(AssertionError):
        testing.assert_field(lambda t, x, case: case.marginal.velocity(x, 1.0 - t), case, n=256)


def test_one_assertion_per_kind():
    for kind in validate.KINDS:
        assert callable(getattr(testing, "assert_" + kind.replace("-", "_")))


def test_importing_the_plugin_imports_no_numerics():
    code = ("import sys, refflow.pytest_plugin; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'numba', 'autograd', 'jax') "
            "or m in ('refflow.paths', 'refflow.validate')]; print(bad); assert not bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_entry_point_is_declared():
    from importlib.metadata import entry_points

    found = [e.value for e in entry_points(group="pytest11") if e.name == "refflow"]
    if not found:
        pytest.skip("refflow installed without its metadata (pip install -e . registers the entry point)")
    assert found == ["refflow.pytest_plugin"]


USER_TESTS = '''
import pytest
from refflow.testing import assert_path

def my_path(x_0, x_1, t):
    t = t[:, None]
    return (1 - t) * x_0 + t * x_1, {u_t}

@pytest.mark.refflow_cases("eight-gaussians/ot/sigma_min=0/*", "two-moons/ot/*", kind="path")
def test_my_path(refflow_case, refflow_seed):
    report = assert_path(my_path, refflow_case)
    assert report.settings["seed"] == refflow_seed
'''


def _run(pytester, monkeypatch, u_t, *args):
    # the plugin by name, whether or not its entry point is installed
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    pytester.makepyfile(test_user=USER_TESTS.format(u_t=u_t))
    return pytester.runpytest("-p", "refflow.pytest_plugin", "-p", "no:cacheprovider", *args)


def test_plugin_user_suite_passes_on_correct_code(pytester, monkeypatch):
    result = _run(pytester, monkeypatch, "x_1 - x_0", "-v", "--refflow-seed", "7")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*test_my_path?eight-gaussians/ot/sigma_min=0/d=2? PASSED*",
                                 "*test_my_path?two-moons/ot/sigma_min=0/d=2? PASSED*"])


def test_plugin_user_suite_fails_on_a_planted_bug_with_the_table(pytester, monkeypatch):
    result = _run(pytester, monkeypatch, "x_1 + x_0")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*refflow check  kind=path  case=eight-gaussians/ot/sigma_min=0/d=2*",
                                 "*u_t *FAIL*", "*FAILED: 2 of 5 properties*"])


def test_plugin_refuses_a_pattern_that_matches_nothing(pytester, monkeypatch):
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    pytester.makepyfile(test_user=textwrap.dedent('''
        import pytest
        @pytest.mark.refflow_cases("no-such-target/*")
        def test_x(refflow_case):
            pass
    '''))
    result = pytester.runpytest("-p", "refflow.pytest_plugin", "-p", "no:cacheprovider")
    assert result.ret != 0
    assert "matches no refflow case" in "\n".join(result.stdout.lines + result.stderr.lines)


def test_plugin_without_marker_runs_every_case_of_the_kind(pytester, monkeypatch):
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    pytester.makepyfile(test_user=textwrap.dedent('''
        import pytest
        @pytest.mark.refflow_cases(kind="sampler")
        def test_x(refflow_case):
            assert "sampler" in refflow_case.kinds
    '''))
    result = pytester.runpytest("-p", "refflow.pytest_plugin", "-p", "no:cacheprovider")
    expected = sum("sampler" in c.kinds for c in validate.catalog())
    result.assert_outcomes(passed=expected)
    assert np.isfinite(expected) and expected >= 3
