"""Value checks of the conditional path's density (eq 25) and of its refusals where sigma_t = 0.

``paths.derivatives`` and ``paths.conditional_velocity`` pin the schedules and
eq 26-31; these pin what they leave: the conditional log-density
:math:`\\log \\mathcal N(x \\mid \\alpha_t x_1, \\sigma_t^2 I)` against SciPy's
normal log-density (far from the mean too), and the ``ValueError`` every
function that divides by :math:`\\sigma_t` must raise where it is 0.
"""
from __future__ import annotations

import numpy as np
from scipy import stats as sps

from refflow import targets
from refflow.paths import CosinePath, LinearVPPath, OTPath, PolynomialPath, VPPath
from refflow.stats import EXACT_TOL
from refflow.verify.checks.paths import all_paths
from refflow.verify.registry import Outcome, register


def row_rel_err(a, b) -> float:
    """max_i |a_i - b_i| / max(1, |b_i|): per point, so a tiny density far out is held as tightly as the mode."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(1.0, np.abs(b))))


def _scipy_conditional_log_prob(path, x, x_1, t):
    # Independent: SciPy's univariate normal per coordinate, summed.
    alpha = np.asarray(path.alpha(t))[:, None]
    sigma = np.asarray(path.sigma(t))[:, None]
    return np.sum(sps.norm.logpdf(x, loc=alpha * x_1, scale=sigma), axis=1)


@register("paths.conditional_log_prob", equations="25", quick=True)
def check_conditional_log_prob(rng, quick):
    n, d = 64, 3
    errors = {}
    wrong = None
    for path in all_paths():
        t = rng.uniform(0.02, 0.98, n)
        x_1 = 2.0 * rng.standard_normal((n, d))
        # points near the mean and far out (|x| up to 1e3), where the density is tiny
        x = np.asarray(path.sample(rng.standard_normal((n, d)), x_1, t))
        x[: n // 2] *= np.logspace(0, 3, n // 2)[:, None]
        got = path.conditional_log_prob(x, x_1, t)
        ref = _scipy_conditional_log_prob(path, x, x_1, t)
        errors[repr(path)] = row_rel_err(got, ref)
        if isinstance(path, VPPath):
            # Planted bug: the sigma vs sigma^2 mix-up in the normaliser (-d/2 log sigma, not -d log sigma).
            sigma = np.asarray(path.sigma(t))
            wrong = row_rel_err(got + 0.5 * d * np.log(sigma), ref)
    return Outcome(
        compared="path.conditional_log_prob vs scipy.stats.norm.logpdf summed over coordinates, every path, "
                 "t in (0.02, 0.98), points up to |x| = 1e3",
        error=max(errors.values()), tolerance=EXACT_TOL,
        why="two float64 evaluations of the same closed form, compared per point relative to max(1, |log p|): "
            "only rounding separates them",
        control="log-density with -d/2 log sigma_t (sigma for sigma^2) in the normaliser", control_error=wrong,
        details=errors,
    )


class _NoRefusal:
    """Wrap a path so that its sigma_t = 0 guard is skipped (the planted bug)."""

    def __init__(self, path):
        self.path = path
        self.path._require_positive_sigma = lambda t, what: None


def _refusal_calls(path_at_zero):
    """(name, call) pairs that must raise ValueError: each evaluates where sigma_t = 0."""
    path, t = path_at_zero
    x = np.array([[0.3, -0.2], [1.0, 2.0]])
    x_1 = np.array([[1.0, 0.5], [-1.0, 0.0]])
    tt = np.full(2, t)
    return [
        (f"{path!r}.conditional_velocity", lambda: path.conditional_velocity(x, x_1, tt)),
        (f"{path!r}.conditional_log_prob", lambda: path.conditional_log_prob(x, x_1, tt)),
        (f"{path!r} monte_carlo_velocity", lambda: targets.monte_carlo_velocity(path, x_1, x, t)),
        (f"Empirical marginal log_prob on {path!r}",
         lambda: targets.Empirical(x_1).marginal(path).log_prob(x, t)),
    ]


def _count_unrefused(cases):
    missing = []
    for name, call in cases:
        try:
            out = call()
        except ValueError as exc:
            if "t" not in str(exc):
                missing.append(f"{name}: message does not name t")
            continue
        except Exception as exc:  # a crash is not a refusal
            missing.append(f"{name}: raised {type(exc).__name__}")
            continue
        missing.append(f"{name}: returned (finite: {bool(np.all(np.isfinite(out)))})")
    return missing


@register("paths.refusals", equations="25, 31", quick=True)
def check_refusals(rng, quick):
    zero_sigma = [(OTPath(0.0), 1.0), (CosinePath(), 1.0), (PolynomialPath(3.0), 1.0), (LinearVPPath(), 1.0)]
    cases = [c for pz in zero_sigma for c in _refusal_calls(pz)]
    # the VP path's sigma_t' is infinite at t = 1: the pair velocity must refuse it
    x = np.ones((2, 2))
    cases.append(("VPPath.pair_velocity at t = 1", lambda: VPPath().pair_velocity(x, x, 1.0)))
    missing = _count_unrefused(cases)
    # Planted bug: the same path functions with their sigma_t = 0 guard removed.
    unguarded = []
    for path, t in zero_sigma:
        guarded = type(path)(**{k: v for k, v in path.config().items() if k != "name"})
        _NoRefusal(guarded)
        unguarded += _refusal_calls((guarded, t))[:2]
    with np.errstate(all="ignore"):
        control = _count_unrefused(unguarded)
    return Outcome(
        compared=f"{len(cases)} calls where sigma_t = 0 (conditional field, conditional density, Monte-Carlo "
                 "field, empirical marginal density; VP pair velocity at t = 1) raise ValueError naming t",
        error=float(len(missing)), tolerance=0.0,
        why="a count: every such call must refuse (DESIGN.md: never NaN or inf for valid input, a clear error "
            "for a point where the quantity does not exist)",
        control="the conditional field and density with the sigma_t = 0 guard removed",
        control_error=float(len(control)), details={"not_refused": missing, "control": control},
    )
