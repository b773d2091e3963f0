"""Trained models judged by effect size: the sampler's gap, energy and weights; the field's curve over t."""
import numpy as np
import pytest

from refflow.validate import check, get_case

OT = "eight-gaussians/ot/sigma_min=0/d=2"
CASE = get_case(OT)


def exact(n, seed):
    return CASE.marginal.sample(n, 1.0, seed)


def blurred(n, seed):
    """Ordinary model error: every mode a little too wide (extra noise of std 0.25)."""
    rng = np.random.default_rng([seed, 1])
    return exact(n, seed) + 0.25 * rng.standard_normal((n, 2))


def one_mode_dropped(n, seed):
    """Mode 0 lost: its mass spread over the other seven."""
    x, _, k = CASE.target.sample_with_labels(2 * n, np.random.default_rng(seed))
    return x[k != 0][:n]


def test_exact_samples_pass_the_effect_bounds_and_the_gap_interval_covers_zero():
    report = check("sampler", exact, OT, max_gap=0.1, max_weight_error=0.03)
    assert report.passed, report.table()
    lo, hi = report["log_lik_gap"].details["ci95"]
    assert lo <= 0.0 <= hi
    assert report["mean_log_prob"].passed is None  # exact tests reported only in the trained setting


def test_a_blurred_sampler_fails_the_gap_and_no_cause_is_named():
    report = check("sampler", blurred, OT, max_gap=0.1)
    gap = report["log_lik_gap"]
    assert gap.passed is False and gap.details["gap"] > 0.1 and gap.causes == [], report.table()
    # the same sampler passes a bound above its measured gap (plus 4 standard errors)
    loose = gap.details["gap"] + 4 * gap.details["stderr"]
    assert check("sampler", blurred, OT, max_gap=loose).passed


def test_a_dropped_mode_shows_in_the_weights():
    report = check("sampler", one_mode_dropped, OT, max_weight_error=0.05)
    w = report["weights"]
    assert w.passed is False and w.details["worst_component"] == 0 and w.details["weights"][0] < 0.01
    assert w.error == pytest.approx(0.125, abs=0.01)


def test_effect_bounds_are_validated():
    with pytest.raises(ValueError, match="max_gap"):
        check("sampler", exact, OT, max_gap=-1.0)


def test_the_field_curve_over_t_has_intervals_and_finds_where_the_error_is():
    def late_error(t, x):
        u = CASE.marginal.velocity(x, t)
        return u * np.where(t >= 0.8, 1.2, 1.0)[:, None]   # 20 % too large for t >= 0.8 only

    report = check("field", late_error, OT, threshold=0.5)
    p = report["u_l2"]
    curve = p.details["by_t_ci"]
    for key, (r, se, lo, hi, rows) in curve.items():
        assert lo <= r <= hi and rows > 0
        if key in ("[0.8,0.9)", "[0.9,1.0)"):
            assert r == pytest.approx(0.04, rel=1e-9)       # |0.2 u|^2 / |u|^2, row by row
        else:
            assert r == 0.0
    lo, hi = p.details["ci95"]
    assert lo <= p.error <= hi and p.passed
    assert not check("field", late_error, OT, threshold=0.001).passed
