r"""kind = "field": a velocity field ``(t, x) -> u`` or ``(t, x, y) -> u`` against eq 19 (and 38)."""
from __future__ import annotations

import inspect

import numpy as np

from refflow._validation import as_rng, check_scalar
from refflow.targets import GaussianMixture, MixtureMarginal
from refflow.validate.calling import Caller, ImplementationError, batched, resolve_impl
from refflow.validate.catalog import get_case
from refflow.validate.causes import SquaredSigmaPath, SwappedPath, l2_distance, match_variants, no_sigma_min
from refflow.validate.errors import row_scale
from refflow.validate.judge import bound_rows, exact_property, inputs_property
from refflow.validate.precision import (
    SAFETY,
    f32_exact,
    schedule_perturbations,
    special_times,
    spread,
    test_times,
    time_shifts,
)
from refflow.validate.report import CheckReport, PropertyResult

__all__ = ["check_field", "field_bound", "by_label", "accepts_labels"]


def accepts_labels(fn) -> bool:
    """Whether ``fn`` takes a third positional argument (the labels y)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    positional = [p for p in sig.parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind == p.VAR_POSITIONAL for p in sig.parameters.values()):
        return False
    return len(positional) >= 3 and positional[2].default is inspect.Parameter.empty


def by_label(y, fn_of_marginal, case, n_out_shape):
    """Assemble ``fn_of_marginal(marginal, rows)`` over the label groups of ``y``."""
    out = np.empty(n_out_shape)
    for label in np.unique(y):
        rows = np.flatnonzero(y == label)
        out[rows] = fn_of_marginal(case.conditional_marginal(int(label)), rows)
    return out


def _nearest_component_velocity(marginal: MixtureMarginal, x, t):
    """Planted bug: the field of the most responsible component only (no averaging, eq 19)."""
    target = marginal.target
    k = np.argmax(marginal.responsibilities(x, t), axis=1)
    out = np.empty_like(x)
    t_arr = np.broadcast_to(np.asarray(t, dtype=np.float64), (x.shape[0],))
    for comp in np.unique(k):
        rows = np.flatnonzero(k == comp)
        single = GaussianMixture(np.ones(1), target.means[comp:comp + 1],
                                 target.covariances[comp:comp + 1])
        out[rows] = single.marginal(marginal.path).velocity(x[rows], t_arr[rows])
    return out


def field_variants(case, x, t, y, truth):
    path = case.path
    no_min = no_sigma_min(path)

    def under(other_path, time_map=lambda s: s, sign=1.0):
        def compute():
            def one(m, rows):
                mm = m.target.marginal(other_path) if other_path is not path else m
                with np.errstate(all="ignore"):
                    return sign * mm.velocity(x[rows], time_map(t[rows]))
            return by_label(y, one, case, truth.shape)
        return compute

    variants = {
        "time_reversed": under(path, lambda s: 1.0 - s, -1.0),
        "time_argument_reversed": under(path, lambda s: 1.0 - s),
        "sign_flipped": lambda: -truth,
        "nearest_component": lambda: by_label(
            y, lambda m, rows: _nearest_component_velocity(m, x[rows], t[rows]), case, truth.shape),
        "sigma_squared": under(SquaredSigmaPath(path)),
        "x0_x1_swapped": under(SwappedPath(path)),
    }
    if no_min is not None:
        variants["sigma_min_dropped"] = under(no_min)
    return variants




def _perturbed_target(target: GaussianMixture, rel: float, rng) -> GaussianMixture:
    """The target with weights, means and covariances perturbed by relative ``rel`` (as a lower-precision copy holds them)."""
    K, d = target.means.shape
    weights = target.weights * (1.0 + rel * rng.choice([-1.0, 1.0], K))
    means = target.means * (1.0 + rel * rng.choice([-1.0, 1.0], (K, d)))
    D = 1.0 + rel * rng.choice([-1.0, 1.0], (K, d))          # D C D stays positive definite
    cov = D[:, :, None] * target.covariances * D[:, None, :]
    return GaussianMixture(weights / weights.sum(), means, cov, target.labels)


def field_bound(case, x, t, y, truth, unit_roundoff: float, seed=0) -> np.ndarray:
    r"""Elementwise rounding bound of the marginal field at rows ``(t, x, y)``.

    .. math::

        B = c u |u_t(x)| + \max_\pm |u_{t \pm cu}(x) - u_t(x)|
            + \sum_j \max_\pm |u_t(x \pm c u |x_j| e_j) - u_t(x)|
            + \max_{q'} |u_t(x; q') - u_t(x; q)|,

    the last over two copies :math:`q'` of the target with every parameter
    perturbed by relative :math:`cu` (see :mod:`refflow.validate.precision`).
    """
    step = SAFETY * unit_roundoff

    def field(xx, tt, target=None):
        def one(m, rows):
            if target is not None:
                mt = target if int(y[rows][0]) == -1 else target.condition(int(y[rows][0]))
                m = mt.marginal(case.path)
            with np.errstate(all="ignore"):
                return m.velocity(xx[rows], tt[rows])
        return by_label(y, one, case, truth.shape)

    bound = step * np.abs(truth)
    bound += spread(truth, [field(x, s) for s in time_shifts(t, unit_roundoff)])
    for j in range(x.shape[1]):
        shifted = []
        for sign in (1.0, -1.0):
            xs = x.copy()
            xs[:, j] *= 1.0 + sign * step
            shifted.append(field(xs, t))
        bound += spread(truth, shifted)
    for held in schedule_perturbations(case.path, unit_roundoff):
        with np.errstate(all="ignore"):
            bound += spread(truth, [by_label(y, lambda m, rows: m.target.marginal(held).velocity(x[rows], t[rows]),
                                             case, truth.shape)])
    if isinstance(case.target, GaussianMixture):
        rng = np.random.default_rng([int(seed) if isinstance(seed, (int, np.integer)) else 0, 0xB0])
        bound += spread(truth, [field(x, t, _perturbed_target(case.target, step, rng)) for _ in range(2)])
    bound[~np.isfinite(bound)] = np.inf
    return bound


def check_field(impl, case, *, threshold=None, n: int = 4096, seed=0, conditional=None,
                batch_size=None) -> CheckReport:
    r"""Check a velocity field ``impl(t, x) -> u`` (or ``impl(t, x, y) -> u``) against eq 19.

    Properties
    ----------
    ``u``
        Row errors against the closed-form marginal field
        :math:`u_t(x) = \sum_k r_k(x, t) u_k(x, t)` (eq 19; for labels, the
        field of class y, eq 38; y = -1 the unconditional one), each row held
        to the rounding bound of the output dtype there (:func:`field_bound`).
        Reported only when ``threshold`` is given (a trained model).
    ``u_l2``
        :math:`E\|u - u^*\|^2 / E\|u^*\|^2` over :math:`t \sim U(0, 1)`,
        :math:`x \sim p_t`: the flow-matching loss of eq 15 relative to the
        size of the field.  Judged against ``threshold`` when given (the
        setting for a trained model); ``details`` holds its standard error and
        its value in ten bins of t.
    ``inputs``
        The implementation left ``t``, ``x`` (and ``y``) unchanged.

    Parameters
    ----------
    impl : callable or str
        The field, or ``"module:function"``.
    case : str or Case
        A catalog case.
    threshold : float, optional
        Bound on the relative L2 error of a trained (approximate) field.
    n : int
        Number of rows (the special times of
        :func:`refflow.validate.precision.special_times` and 0.5, 0.25, the
        rest with uniform t).
    seed : int or Generator
        Draws of t, x (and y).
    conditional : bool, optional
        Whether to pass labels ``y``; by default, when ``impl`` takes a third
        required positional argument.
    batch_size : int, optional
        Call ``impl`` on at most this many rows at a time.
    """
    fn, impl_name = resolve_impl(impl)
    case = get_case(case)
    n = check_scalar(n, "n", low=64, integer=True)
    if threshold is not None:
        threshold = check_scalar(threshold, "threshold", low=0.0)
    rng = as_rng(seed)
    if conditional is None:
        conditional = accepts_labels(fn)
    if conditional and case.n_classes < 1:
        raise ValueError(f"conditional: case {case.name!r} has no class labels")
    d = case.dim
    special = np.concatenate([special_times(), [0.5, 0.25]])
    t = test_times(n, rng, special)
    if conditional:
        y = rng.integers(-1, case.n_classes, size=n).astype(np.int64)
    else:
        y = np.full(n, -1, dtype=np.int64)
    x = np.empty((n, d))
    for label in np.unique(y):
        rows = np.flatnonzero(y == label)
        x[rows] = case.conditional_marginal(int(label)).sample(rows.size, t[rows], rng)
    x = f32_exact(x)
    truth = by_label(y, lambda m, rows: m.velocity(x[rows], t[rows]), case, (n, d))
    caller = Caller(fn, "field(t, x, y)" if conditional else "field(t, x)", ("t", "x", "y"))

    def one(rows, swapped=False):
        args = (t[rows], x[rows], y[rows]) if conditional else (t[rows], x[rows])
        if swapped:
            args = (args[1], args[0]) + args[2:]
        out = caller(*args)
        return caller.output(out, "the field's output u", (x[rows].shape[0], d))

    try:
        u_got = batched(one, n, batch_size)
    except ImplementationError as first_error:
        # a function written for (x, t): say so when the other order gives the right field
        try:
            swapped = batched(lambda rows: one(rows, swapped=True), n, batch_size)
        except ImplementationError:
            raise first_error from None
        bound = field_bound(case, x, t, y, truth, caller.precision, seed)
        scale = row_scale(truth)
        if np.all(np.abs(swapped - truth).max(axis=1) / scale <= bound_rows(bound, scale)):
            p = PropertyResult("u", f"calling field(t, x) failed: {first_error}", float("inf"), 0.0, False,
                               ["arguments_swapped"])
            return CheckReport("field", case.name, impl_name, [p],
                               {"n": n, "seed": seed, "conditional": bool(conditional)})
        raise first_error from None
    u = caller.precision
    variants = field_variants(case, x, t, y, truth)
    variants["arguments_swapped"] = lambda: batched(lambda rows: one(rows, swapped=True), n, batch_size)
    approximate = threshold is not None
    scale = row_scale(truth)
    bound = bound_rows(field_bound(case, x, t, y, truth, u, seed), scale) if not approximate else np.inf
    what = "labels y (-1 = null) and " if conditional else ""
    p_max = exact_property(
        "u", f"u_t(x) vs the closed-form marginal field (eq 19{', 38' if conditional else ''}); "
             f"{n} rows, {what}t = 0, 1, packed toward both ends, and uniform, x ~ p_t",
        u_got, truth, bound, t, variants, judged=not approximate, scale=scale,
        note="reported only: a threshold judges u_l2" if approximate else "",
        rule="" if approximate else
        (f"per row, {SAFETY:g} u |u_t(x)| + the change of u_t(x) under t +- {SAFETY:g} u, each x_j "
         f"scaled by 1 +- {SAFETY:g} u and the target's parameters perturbed by {SAFETY:g} u; "
         f"u = {u:.3g} (the output dtype's unit roundoff)"))
    p_l2 = _l2_property(u_got, truth, t, y, threshold, variants, n_special=min(special.size, n))
    settings = {"n": n, "seed": seed, "conditional": bool(conditional), "output_dtype": caller.dtype_name,
                "threshold": threshold}
    return CheckReport("field", case.name, impl_name, [p_max, p_l2, inputs_property(caller)], settings)


def _l2_property(u_got, truth, t, y, threshold, variants, n_special):
    # the Monte-Carlo rows only: t ~ U(0, 1), x ~ p_t
    mc = slice(n_special, None)
    g, r, tt = u_got[mc], truth[mc], t[mc]
    num = np.sum((g - r) ** 2, axis=1)
    den = np.sum(r**2, axis=1)
    with np.errstate(invalid="ignore", over="ignore"):
        ratio = float(num.sum() / den.sum())
        # delta-method standard error of a ratio of means
        m = num.size
        a, b = num.mean(), den.mean()
        cov = np.cov(np.stack([num, den])) if m > 1 else np.zeros((2, 2))
        se = float(np.sqrt(max(cov[0, 0] / b**2 - 2 * a * cov[0, 1] / b**3 + a**2 * cov[1, 1] / b**4, 0.0) / m))
    bins = np.minimum((tt * 10).astype(int), 9)
    by_t = {}
    for k in range(10):
        sel = bins == k
        if sel.any():
            by_t[f"[{k / 10:.1f},{(k + 1) / 10:.1f})"] = float(num[sel].sum() / max(den[sel].sum(), np.finfo(float).tiny))
    judged = threshold is not None
    tol = threshold if judged else None
    passed = bool(np.isfinite(ratio) and ratio <= tol) if judged else None
    causes = []
    if judged and not passed:
        if not np.all(np.isfinite(g)):
            causes = ["nonfinite"]
        else:
            sub = {k: (lambda v=v: (v() if callable(v) else v)[mc]) for k, v in variants.items()}
            causes = match_variants(g, r, sub, l2_distance(r))
    from refflow.validate.effects import curve_over_t

    ci = (max(ratio - 1.96 * se, 0.0), ratio + 1.96 * se)
    return PropertyResult(
        "u_l2", f"relative L2 error E||u - u*||^2 / E||u*||^2 (eq 15 normalised), t ~ U(0, 1), x ~ p_t, "
                f"{num.size} rows; 95% interval [{ci[0]:.3g}, {ci[1]:.3g}]",
        ratio, tol, passed, causes, {"stderr": se, "ci95": list(ci), "by_t": by_t,
                                     "by_t_ci": curve_over_t(num, den, tt)},
        "" if judged else "reported only: set a threshold to judge it",
    )
