r"""kind = "coupling": a minibatch coupling ``(x_0, x_1) -> plan`` or ``-> (x_0', x_1')`` (OT-CFM).

An OT-CFM implementation re-pairs each batch by an optimal transport plan for
the squared Euclidean cost (:mod:`refflow.couplings`).  refflow passes a
source batch :math:`x_0 \sim \mathcal N(0, I)` of ``n`` rows and a target
batch :math:`x_1 \sim q_1` of ``m`` rows (uniform weights), and the function
returns either

* a **plan**: an ``(n, m)`` array :math:`\pi` (rows index :math:`x_0`,
  columns :math:`x_1`; TorchCFM's ``OTPlanSampler.get_map``), or
* a **re-paired batch**: a pair ``(x_0', x_1')`` of arrays whose rows are
  rows of the inputs, either a re-pairing (each row used once: a
  permutation) or draws from the plan with replacement (TorchCFM's
  ``OTPlanSampler.sample_plan``).

``method="exact"`` judges against the exact optimum, ``method="sinkhorn"``
with ``reg=`` :math:`\varepsilon` against the entropic plan (POT's
convention: :math:`\min \langle\pi, C\rangle - \varepsilon H(\pi)`).

Tolerances from the arithmetic.  An implementation that forms the cost in a
dtype of unit roundoff :math:`u` (by default at least float32's, see
``cost_precision``) makes each entry wrong by up to
:math:`\delta = c u \max_{ij}(|x_0^{(i)}| + |x_1^{(j)}|)^2`, so its exact
plan may be optimal for the perturbed cost only: its cost exceeds the optimum
by at most :math:`2\delta` (plus :math:`c u` of the cost, and the marginal
error times :math:`\max C`).  An entropic plan's entries move by a factor
within :math:`e^{\pm 4\delta/\varepsilon}` under such a perturbation; it is
compared, entry by entry, with refflow's Sinkhorn solution *at the
implementation's own marginals*, so a solver stopped at its tolerance is
judged by the ``marginals`` property (``marginal_tol``, default ``1e-6``
relative, POT's ``stopThr`` is 1e-9) and not twice.  Draws with replacement
are judged statistically: every draw on the support of the exact plan; the
counts of each row by a chi-square test; for an entropic plan, the mean
cost of the draws by a z-test against :math:`\langle \pi^\star, C \rangle`.
"""
from __future__ import annotations

import numpy as np
from scipy import stats as _stats

from refflow._validation import as_rng, check_scalar
from refflow.couplings import exact_plan, plan_cost, sinkhorn_plan, squared_distances
from refflow.stats import FAMILY_ALPHA, bonferroni_z
from refflow.validate.calling import Caller, ImplementationError, resolve_impl, to_numpy
from refflow.validate.catalog import get_case
from refflow.validate.causes import match_variants
from refflow.validate.errors import row_scale
from refflow.validate.judge import bound_rows, exact_property, inputs_property
from refflow.validate.precision import SAFETY, f32_exact
from refflow.validate.report import CheckReport, PropertyResult

__all__ = ["check_coupling"]


def _tv_distance(a, b):
    return float(0.5 * np.sum(np.abs(np.asarray(a, float) - np.asarray(b, float))))


def _row_indices(rows, batch, tol):
    """For each row: the index of the equal row of ``batch`` (within ``tol``), or -1."""
    sq = np.sum(rows**2, axis=1)[:, None] + np.sum(batch**2, axis=1)[None, :] - 2.0 * rows @ batch.T
    j = np.argmin(sq, axis=1)
    close = np.max(np.abs(rows - batch[j]), axis=1) <= tol
    return np.where(close, j, -1)


def check_coupling(impl, case, *, method: str = "exact", reg=None, n: int = 64, m=None, seed=0,
                   threshold=None, repeats: int = 100, marginal_tol: float = 1e-6,
                   cost_precision: str = "float32") -> CheckReport:
    r"""Check a minibatch coupling ``impl(x_0, x_1)`` (module docstring).

    Parameters
    ----------
    method : {"exact", "sinkhorn"}
    reg : float
        :math:`\varepsilon` for ``"sinkhorn"``.
    n, m : int
        Rows of :math:`x_0` and :math:`x_1` (``m`` defaults to ``n``).
    repeats : int
        Calls pooled when the implementation draws pairs with replacement.
    marginal_tol : float
        Relative marginal error allowed to an entropic solver (its stopping tolerance).
    threshold : float, optional
        Replaces the bound of the ``cost`` / ``plan`` property (relative).
    cost_precision : {"float32", "output"}
        The unit roundoff of the cost's rounding :math:`\delta`: the larger of
        float32's and the output's (default; a plan returned in float64 is
        often solved on a float32 cost: TorchCFM's ``torch.cdist`` on float32
        batches, then POT), or the output dtype's alone (strict).

    Properties
    ----------
    ``marginals``
        :math:`\pi 1 = 1/n`, :math:`\pi^\top 1 = 1/m` (a plan or a
        re-pairing); a chi-square test of the row counts (draws).
    ``cost`` (exact)
        :math:`\langle \pi, C \rangle` equals the optimum of
        ``linear_sum_assignment`` (replicated to ``lcm(n, m)`` rows for unequal
        sizes) within :math:`2\delta`.
    ``support`` (exact, draws)
        Every drawn pair lies on the support of the optimal plan.
    ``plan`` (sinkhorn)
        :math:`\pi` vs refflow's log-domain Sinkhorn at the same ``reg`` and
        the plan's own marginals, entry by entry.
    ``expected_cost`` (sinkhorn, draws)
        z-test of the mean cost of the draws against :math:`\langle\pi^\star, C\rangle`.
    ``pairs_from_batch`` (re-paired batch), ``inputs``
    """
    fn, impl_name = resolve_impl(impl)
    case = get_case(case)
    if method not in ("exact", "sinkhorn"):
        raise ValueError(f"method: expected 'exact' or 'sinkhorn', got {method!r}")
    if method == "sinkhorn":
        if reg is None:
            raise ValueError("reg: expected the entropic regularisation (a positive float) for method='sinkhorn'")
        reg = check_scalar(reg, "reg", low=0.0, low_open=True)
    elif reg is not None:
        raise ValueError(f"reg: expected None for method='exact', got {reg!r}")
    n = check_scalar(n, "n", low=8, integer=True)
    m = n if m is None else check_scalar(m, "m", low=8, integer=True)
    repeats = check_scalar(repeats, "repeats", low=1, integer=True)
    marginal_tol = check_scalar(marginal_tol, "marginal_tol", low=0.0)
    if threshold is not None:
        threshold = check_scalar(threshold, "threshold", low=0.0)
    if cost_precision not in ("float32", "output"):
        raise ValueError(f"cost_precision: expected 'float32' or 'output', got {cost_precision!r}")
    floor = 2.0**-24 if cost_precision == "float32" else 0.0
    rng = as_rng(seed)
    d = case.dim
    x_0 = f32_exact(rng.standard_normal((n, d)))
    x_1 = f32_exact(case.target.sample(m, rng))
    cost = squared_distances(x_0, x_1)
    if method == "exact":
        reference = exact_plan(cost=cost)
        variants = {"plan_transposed": reference.T if n == m else None,
                    "cost_unsquared": exact_plan(cost=np.sqrt(cost))}
    else:
        reference = sinkhorn_plan(cost=cost, reg=reg)
        variants = {"plan_transposed": reference.T if n == m else None,
                    "cost_unsquared": sinkhorn_plan(cost=np.sqrt(cost), reg=reg),
                    "regularisation_scaled": [sinkhorn_plan(cost=cost, reg=s * reg) for s in (2.0, 0.5)]
                    + [sinkhorn_plan(cost=cost, reg=reg * float(cost.max()))]}
    variants = {k: v for k, v in variants.items() if v is not None}
    caller = Caller(fn, "coupling(x_0, x_1)", ("x_0", "x_1"))
    out = caller(x_0, x_1)
    settings = {"method": method, "reg": reg, "n": n, "m": m, "seed": seed, "threshold": threshold}
    if isinstance(out, (tuple, list)):
        if len(out) != 2:
            raise ImplementationError(f"impl: expected a plan (n, m) or a pair (x_0', x_1'), got a "
                                      f"{type(out).__name__} of length {len(out)}")
        props, form = _judge_pairs(caller, out, x_0, x_1, cost, reference, variants, method, reg, repeats,
                                   marginal_tol, threshold, d, floor)
    else:
        arr, _, _ = to_numpy(out, "the plan")
        if arr.shape == (m, n) and n != m:
            props = [PropertyResult("plan_shape", f"the plan has shape (n, m) = ({n}, {m}): rows index x_0",
                                    1.0, 0.0, False, ["plan_transposed"], {"shape": list(arr.shape)})]
        else:
            plan = caller.output(out, "the plan", (n, m))
            props = _judge_plan(plan, x_0, x_1, cost, reference, variants, method, reg, caller.precision,
                                marginal_tol, threshold, floor)
        form = "plan"
    props.append(inputs_property(caller))
    settings.update(output=form, output_dtype=caller.dtype_name)
    return CheckReport("coupling", case.name, impl_name, props, settings)


def _cost_rounding(x_0, x_1, unit_roundoff):
    r""":math:`\delta = c u \max_{ij} (|x_0^{(i)}| + |x_1^{(j)}|)^2`: the rounding of one cost entry."""
    r0, r1 = np.linalg.norm(x_0, axis=1).max(), np.linalg.norm(x_1, axis=1).max()
    return SAFETY * unit_roundoff * (r0 + r1) ** 2


def _marginals(plan, unit_roundoff, slack, why):
    n, m = plan.shape
    rows, cols = plan.sum(axis=1), plan.sum(axis=0)
    err = max(float(np.max(np.abs(rows * n - 1.0))), float(np.max(np.abs(cols * m - 1.0))),
              float(max(0.0, -plan.min()) * max(n, m)))
    tol = SAFETY * unit_roundoff * max(n, m) + slack
    passed = bool(err <= tol) and bool(np.all(np.isfinite(plan)))
    return PropertyResult(
        "marginals", "row sums 1/n and column sums 1/m of the plan, entries >= 0 (relative error)",
        err if np.isfinite(err) else float("inf"), tol, passed, [] if passed else ["marginals_broken"],
        {"tolerance_rule": why})


def _plan_causes(plan, variants, truth):
    flat = {}
    for key, value in variants.items():
        for k, v in enumerate(value if isinstance(value, list) else [value]):
            flat[f"{key}#{k}"] = v
    found = match_variants(plan, truth, flat, _tv_distance)
    causes = []
    for key in found:
        base = key.split("#")[0]
        if base not in causes:
            causes.append(base)
    return causes


def _judge_plan(plan, x_0, x_1, cost, reference, variants, method, reg, u, marginal_tol, threshold, floor):
    delta = _cost_rounding(x_0, x_1, max(u, floor))
    if method == "exact":
        marg = _marginals(plan, u, 0.0, f"{SAFETY:g} u max(n, m): the rounding of a sum of that many entries")
        optimum = plan_cost(reference, cost)
        got = plan_cost(plan, cost)
        marg_abs = float(np.sum(np.abs(plan.sum(axis=1) - 1.0 / plan.shape[0])))
        allowed = (2.0 * delta + SAFETY * u * abs(got) + marg_abs * float(cost.max())) / optimum
        tol = allowed if threshold is None else threshold
        err = abs(got - optimum) / optimum
        passed = bool(err <= tol)
        causes = [] if passed else _plan_causes(plan, variants, reference)
        cost_prop = PropertyResult(
            "cost", "<pi, C> vs the exact optimum (scipy linear_sum_assignment), relative, squared Euclidean cost",
            err, tol, passed, causes,
            {"cost": got, "optimum": optimum, "tolerance_rule":
             "(2 delta + 16 u <pi, C> + marginal error x max C) / optimum, delta = 16 u' max (|x_0| + |x_1|)^2 "
             "(the rounding of one cost entry, u' = max(u, cost_precision's))" if threshold is None else f"the threshold {threshold!r}"})
        return [marg, cost_prop]
    marg = _marginals(plan, u, marginal_tol, f"marginal_tol = {marginal_tol!r} (the solver's stopping tolerance) "
                                             f"+ {SAFETY:g} u max(n, m)")
    rows, cols = plan.sum(axis=1), plan.sum(axis=0)
    props = [marg]
    if np.all(rows > 0) and np.all(cols > 0) and np.all(np.isfinite(plan)):
        cols = cols * (rows.sum() / cols.sum())
        own = sinkhorn_plan(cost=cost, reg=reg, a=rows, b=cols, tol=1e-13)
        # entries move by a factor within exp(+-4 delta / reg) under a cost rounded by delta
        bound = own * (np.expm1(4.0 * delta / reg) + SAFETY * u)
        scale = row_scale(own)
        rule = (f"per entry, pi_ij (exp(4 delta / reg) - 1 + {SAFETY:g} u), delta = {delta:.3g}: the change "
                "under the rounding of the cost" if threshold is None else f"the threshold {threshold!r}")
        b_rows = bound_rows(bound, scale) if threshold is None else threshold
        prop = exact_property("plan", f"the plan vs refflow's log-domain Sinkhorn at reg = {reg!r} and the plan's "
                                      "own marginals (rows index x_0)", plan, own, b_rows, None, {},
                              scale=scale, rule=rule)
        if prop.passed is False:
            prop.causes = _plan_causes(plan, variants, reference) or prop.causes
        props.append(prop)
    else:
        props.append(PropertyResult("plan", "the plan has an empty row or column, or a non-finite entry", float("inf"),
                                    0.0, False, ["marginals_broken"]))
    return props


def _judge_pairs(caller, out, x_0, x_1, cost, reference, variants, method, reg, repeats, marginal_tol,
                 threshold, d, floor):
    n, m = cost.shape
    first = _pair_indices(caller, out, x_0, x_1, d)
    found = np.mean((first[0] >= 0) & (first[1] >= 0))
    props = [PropertyResult(
        "pairs_from_batch", "every returned row of x_0' (x_1') is a row of x_0 (x_1), within rounding",
        float(1.0 - found), 0.0, bool(found == 1.0), [] if found == 1.0 else ["pairs_not_from_batch"])]
    if found < 1.0:
        return props, "pairs"
    i, j = first
    if i.size == n == m and np.unique(i).size == n and np.unique(j).size == m:
        plan = np.zeros((n, m))
        plan[i, j] = 1.0 / n
        return props + _judge_plan(plan, x_0, x_1, cost, reference, variants, method, reg, caller.precision,
                                   marginal_tol, threshold, floor), "re-pairing (a permutation)"
    draws_i, draws_j = [i], [j]
    for _ in range(repeats - 1):
        a, b = _pair_indices(caller, caller(x_0, x_1), x_0, x_1, d)
        if np.any(a < 0) or np.any(b < 0):
            props[0] = PropertyResult("pairs_from_batch", props[0].compared, 1.0, 0.0, False, ["pairs_not_from_batch"])
            return props, "pairs drawn from the plan"
        draws_i.append(a)
        draws_j.append(b)
    i, j = np.concatenate(draws_i), np.concatenate(draws_j)
    props.append(_count_test(i, j, n, m))
    if method == "exact":
        off = float(np.mean(reference[i, j] <= 0))
        causes = []
        if off > 0:
            for key, plan in variants.items():
                if np.mean(plan[i, j] > 0) > 0.9:
                    causes.append(key)
        props.append(PropertyResult(
            "support", f"fraction of the {i.size} draws ({repeats} calls) off the support of the exact OT plan",
            off, 0.0, off == 0.0, causes))
    else:
        props.append(_expected_cost(i, j, cost, reference, variants))
    return props, "pairs drawn from the plan"


def _pair_indices(caller, out, x_0, x_1, d):
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise ImplementationError("impl: expected the same kind of output on every call (a pair (x_0', x_1'))")
    a, _, _ = to_numpy(out[0], "x_0' (first output)")
    k = a.shape[0] if a.ndim == 2 else -1
    a = caller.output(out[0], "x_0' (first output)", (k, d))
    b = caller.output(out[1], "x_1' (second output)", (k, d))
    u = caller.precision
    tol0 = SAFETY * u * (1.0 + float(np.max(np.abs(x_0))))
    tol1 = SAFETY * u * (1.0 + float(np.max(np.abs(x_1))))
    return _row_indices(a, x_0, tol0), _row_indices(b, x_1, tol1)


def _count_test(i, j, n, m) -> PropertyResult:
    N = i.size
    z = []
    for idx, k in ((i, n), (j, m)):
        counts = np.bincount(idx, minlength=k)
        chi2 = float(np.sum((counts - N / k) ** 2 / (N / k)))
        z.append(float(_stats.norm.isf(_stats.chi2.sf(chi2, k - 1))))
    tol = max(4.0, float(_stats.norm.isf(FAMILY_ALPHA / 2.0)))
    err = max(z)
    passed = bool(err <= tol)
    return PropertyResult(
        "marginals", f"chi-square tests of the counts of each row of x_0 and of x_1 over {N} draws vs uniform, "
                     "as z-scores (Bonferroni over 2)", err, tol, passed, [] if passed else ["marginals_broken"],
        {"z_x0": z[0], "z_x1": z[1]})


def _expected_cost(i, j, cost, reference, variants) -> PropertyResult:
    drawn = cost[i, j]
    p = reference / reference.sum()
    mean = float(np.sum(p * cost))
    sd = float(np.sqrt(np.sum(p * (cost - mean) ** 2)))
    z = abs(float(drawn.mean()) - mean) / (sd / np.sqrt(drawn.size))
    tol = bonferroni_z(1)
    passed = bool(z <= tol)
    causes = []
    if not passed:
        best = []
        for key, value in variants.items():
            for v in (value if isinstance(value, list) else [value]):
                q = v / v.sum()
                mv = float(np.sum(q * cost))
                sv = float(np.sqrt(np.sum(q * (cost - mv) ** 2)))
                zv = abs(float(drawn.mean()) - mv) / (max(sv, 1e-300) / np.sqrt(drawn.size))
                if zv <= tol and abs(mv - mean) > 0.5 * sd / np.sqrt(drawn.size):
                    best.append((zv, key))
        causes = list(dict.fromkeys(k for _, k in sorted(best)))
    return PropertyResult(
        "expected_cost", f"|z| of the mean cost of {drawn.size} draws vs <pi*, C> of the entropic plan",
        z, tol, passed, causes, {"mean_cost": float(drawn.mean()), "expected": mean, "stderr": sd / np.sqrt(drawn.size)})
