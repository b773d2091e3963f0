r"""kind = "guided": a classifier-free-guided field ``(t, x, y, w) -> u`` (eq 40, either weighting)."""
from __future__ import annotations

import numpy as np

from refflow._validation import as_rng, check_scalar
from refflow.validate.calling import Caller, batched, resolve_impl
from refflow.validate.catalog import get_case, require_kind
from refflow.validate.errors import row_error, row_scale
from refflow.validate.field import by_label, field_bound
from refflow.validate.judge import bound_rows, exact_property, inputs_property
from refflow.validate.precision import SAFETY, f32_exact, special_times, test_times
from refflow.validate.report import CheckReport, PropertyResult

__all__ = ["check_guided", "GUIDANCE_WEIGHTS"]

# kind = "guided"
# ---------------------------------------------------------------------------

GUIDANCE_WEIGHTS = (0.0, 1.0, 2.5)
"""Guidance scales at which a guided field is evaluated."""


def _guided_formula(convention, w, u_null, u_cond):
    if convention == "notes":
        return (1.0 - w) * u_null + w * u_cond          # eq 40
    return (1.0 + w) * u_cond - w * u_null              # flow_matching's cfg_scale weighting


def check_guided(impl, case, *, threshold=None, n: int = 1024, seed=0, convention: str = "auto",
                 weights=GUIDANCE_WEIGHTS, batch_size=None) -> CheckReport:
    r"""Check a guided field ``impl(t, x, y, w) -> u`` (classifier-free guidance, eq 40).

    The exact conditional fields :math:`u_y` (class y of the mixture, eq 38)
    and the unconditional :math:`u_\varnothing` give both weightings:

    .. math::

        \text{notes (eq 40):}\quad (1 - w)\, u_\varnothing + w\, u_y, \qquad
        \text{flow\_matching:}\quad (1 + w)\, u_y - w\, u_\varnothing .

    Properties
    ----------
    ``u_guided``
        Largest row error over ``weights`` against the declared
        ``convention``, or, with ``"auto"``, the closer of the two.
    ``convention``
        Reported only: which convention the output follows (``details``).

    Each row is held to the rounding bound of the output dtype: the bounds
    :math:`B_\varnothing, B_y` of the two fields
    (:func:`refflow.validate.field.field_bound`) combined with the weights,
    :math:`|1 - w| B_\varnothing + |w| B_y + c u (|(1 - w) u_\varnothing| + |w u_y|)`
    (notes; the flow_matching weighting likewise).  ``threshold`` replaces it.

    ``w`` is passed as a Python float, ``y`` as int64 labels ``>= 0``.
    """
    fn, impl_name = resolve_impl(impl)
    case = get_case(case)
    require_kind(case, "guided")
    if convention not in ("auto", "notes", "flow_matching"):
        raise ValueError(f"convention: expected 'auto', 'notes' or 'flow_matching', got {convention!r}")
    n = check_scalar(n, "n", low=32, integer=True)
    if threshold is not None:
        threshold = check_scalar(threshold, "threshold", low=0.0)
    weights = [check_scalar(w, "weights") for w in weights]
    rng = as_rng(seed)
    d = case.dim
    t = test_times(n, rng, np.concatenate([special_times(), [0.5]]))
    y = rng.integers(0, case.n_classes, size=n).astype(np.int64)
    x = np.empty((n, d))
    for label in np.unique(y):
        rows = np.flatnonzero(y == label)
        x[rows] = case.conditional_marginal(int(label)).sample(rows.size, t[rows], rng)
    x = f32_exact(x)
    # the references first, on refflow's own arrays
    u_null = case.marginal.velocity(x, t)
    u_cond = by_label(y, lambda m, rows: m.velocity(x[rows], t[rows]), case, (n, d))
    u_class0 = case.conditional_marginal(0).velocity(x, t)
    caller = Caller(fn, "guided(t, x, y, w)", ("t", "x", "y", "w"))

    outputs = []
    for w in weights:
        def one(rows, w=w):
            out = caller(t[rows], x[rows], y[rows], float(w))
            return caller.output(out, f"the guided field's output at w={w}", (x[rows].shape[0], d))
        outputs.append(batched(one, n, batch_size))
    got = np.stack(outputs)                                            # (W, n, d)
    w_arr = np.asarray(weights)[:, None, None]
    expected = {c: _guided_formula(c, w_arr, u_null, u_cond) for c in ("notes", "flow_matching")}
    flat = lambda a: a.reshape(-1, d)                                  # noqa: E731
    t_rows = np.tile(t, len(weights))
    errors = {c: float(np.max(row_error(flat(got), flat(e)))) for c, e in expected.items()}
    chosen = min(errors, key=errors.get) if convention == "auto" else convention
    other = "flow_matching" if chosen == "notes" else "notes"
    truth = flat(expected[chosen])
    scale = row_scale(truth)
    u = caller.precision
    if threshold is None:
        b_null = field_bound(case, x, t, np.full(n, -1), u_null, u, seed)
        b_cond = field_bound(case, x, t, y, u_cond, u, seed)
        if chosen == "notes":
            a_null, a_cond = 1.0 - w_arr, w_arr
        else:
            a_null, a_cond = -w_arr, 1.0 + w_arr
        bound_el = (np.abs(a_null) * b_null + np.abs(a_cond) * b_cond
                    + SAFETY * u * (np.abs(a_null * u_null) + np.abs(a_cond * u_cond)))
        bound = bound_rows(flat(bound_el), scale)
        rule = (f"per row, the rounding bounds of u_null and u_y (as for kind 'field') combined with the "
                f"weights, u = {u:.3g} (the output dtype's unit roundoff)")
    else:
        bound, rule = threshold, f"the threshold {threshold!r} on every row"
    # mistakes made inside either convention; with "auto" the closer version of each counts
    conventions = ("notes", "flow_matching") if convention == "auto" else (chosen,)

    def closest(make):
        versions = [flat(make(c)) for c in conventions]
        return min(versions, key=lambda v: float(np.max(row_error(flat(got), v))))

    variants = {
        "guidance_swapped": lambda: closest(lambda c: _guided_formula(c, w_arr, u_cond, u_null)),
        "null_prompt_as_class": lambda: closest(lambda c: _guided_formula(c, w_arr, u_class0, u_cond)),
        "guidance_ignored": flat(np.broadcast_to(u_cond, got.shape)),
        "label_ignored": flat(np.broadcast_to(u_null, got.shape)),
    }
    if convention != "auto":
        variants["guidance_off_by_one"] = flat(expected[other])
    p = exact_property(
        "u_guided",
        f"guided field vs eq 40 in the {chosen!r} convention"
        f"{' (detected)' if convention == 'auto' else ' (declared)'}, w in {list(weights)}; {n} rows, "
        "y >= 0, x ~ p_t(. | y)",
        flat(got), truth, bound, t_rows, variants, scale=scale, rule=rule)
    p_conv = PropertyResult(
        "convention", "which weighting the output follows: error against each convention",
        min(errors.values()), None, None,
        details={"errors": errors, "follows": min(errors, key=errors.get), "declared": convention},
        note=f"follows {min(errors, key=errors.get)!r}",
    )
    return CheckReport("guided", case.name, impl_name, [p, p_conv, inputs_property(caller)],
                       {"n": n, "seed": seed, "convention": convention, "weights": list(weights),
                        "output_dtype": caller.dtype_name, "threshold": threshold})
