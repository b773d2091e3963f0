"""The power of ``refflow check`` (the validator) on prompts: it must see a mistake made only at the null prompt.

Uses the public API only (:func:`refflow.validate.check`, :func:`refflow.validate.get_case`).
A conditional field that is right for every class but wrong for the null
prompt :math:`y = -1` (eq 38, 40: it answers with class 0's field, the
commonest mistake of an embedding table without a null row) is wrong on a
fraction of the validator's rows only; the validator draws its prompts from
:math:`\\{-1, 0, \\dots, C - 1\\}`, so it must flag it, and pass the correct field.
"""
from __future__ import annotations

import numpy as np

from refflow.verify.registry import Outcome, register

CASE = "eight-gaussians/ot/sigma_min=0/d=2"


def _conditional_field(case, null_as):
    def field(t, x, y):
        t, x, y = np.asarray(t, dtype=np.float64), np.asarray(x, dtype=np.float64), np.asarray(y)
        u = np.empty_like(x)
        for label in np.unique(y):
            rows = y == label
            use = null_as if label == -1 else int(label)
            u[rows] = case.conditional_marginal(use).velocity(x[rows], t[rows])
        return u

    return field


@register("validate.null_prompt_power", equations="38, 40", quick=True)
def check_null_prompt_power(rng, quick):
    from refflow.validate import check, get_case

    case = get_case(CASE)
    right = check("field", _conditional_field(case, -1), case, conditional=True, n=512, seed=int(rng.integers(2**31)))
    wrong = check("field", _conditional_field(case, 0), case, conditional=True, n=512, seed=int(rng.integers(2**31)))
    failed = [p.name for p in right.failed] if hasattr(right, "failed") else []
    return Outcome(
        compared=f"refflow check field on {CASE} with prompts: the closed-form conditional fields (y = -1 the "
                 "unconditional one) must pass",
        error=0.0 if right.passed else 1.0, tolerance=0.5,
        why="a verdict (1 = the correct field was rejected); the correct field is exact, so the validator's "
            "false-alarm rate is that of its exact comparisons, ~0",
        control="the same field answering the null prompt with class 0's field (must be rejected)",
        control_error=0.0 if wrong.passed else 1.0,
        details={"failed_for_right_field": failed},
    )
