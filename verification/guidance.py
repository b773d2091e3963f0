"""Classifier-free guidance (eq 40).

    u~(t, x, p) = (1 - w) u(t, x, null) + w u(t, x, p)

w = 1 is the conditional field, w = 0 the unconditional one, w > 1 extrapolates
away from the unconditional field.  Here the "network" is exact: the closed-form
marginal field (eq 19) of the class-conditioned eight-Gaussians mixture for a
label p, and of the whole mixture for the null prompt (label -1).

    python verification/guidance.py [--quick]
"""
import sys

import numpy as np

import refflow as rf
from refflow.solvers import guided_field
from refflow.stats import EXACT_TOL, rel_err

from common import Table, finish, parse_args, run_registered


def class_field(target, path):
    """field(t, x, y): the closed-form marginal field of class y, or of the whole target for y = -1."""
    fields = {-1: target.marginal(path)}
    fields.update({c: target.condition(c).marginal(path) for c in range(target.n_classes)})

    def field(t, x, y):
        out = np.empty_like(x)
        for label in np.unique(y):
            rows = y == label
            out[rows] = fields[int(label)].velocity(x[rows], t)
        return out

    return field


def main():
    args = parse_args(__doc__.splitlines()[0])
    rng = np.random.default_rng(6)
    target, path = rf.eight_gaussians(), rf.OTPath()
    field = class_field(target, path)
    n = 64
    x = 3.0 * rng.standard_normal((n, 2))
    y = rng.integers(0, 8, n)
    null = np.full(n, -1)
    core = Table("Core computation: exact class fields of the eight Gaussians (OT path), 64 points, t = 0.6")
    t = 0.6
    u_null, u_cond = field(t, x, null), field(t, x, y)
    for w in (0.0, 1.0, 2.5, 4.0):
        core.compare(f"w = {w}: guided_field vs (1 - w) u(t, x, null) + w u(t, x, p)",
                     rel_err(guided_field(field, y, w)(t, x), (1 - w) * u_null + w * u_cond), EXACT_TOL)
    core.compare("w = 1 is the conditional field", rel_err(guided_field(field, y, 1.0)(t, x), u_cond), EXACT_TOL)
    core.compare("w = 0 is the unconditional field", rel_err(guided_field(field, y, 0.0)(t, x), u_null), EXACT_TOL)
    core.compare("flow_matching convention with w_fm = w - 1 equals eq 40 with w = 2.5",
                 rel_err(guided_field(field, y, 1.5, "flow_matching")(t, x), guided_field(field, y, 2.5)(t, x)),
                 EXACT_TOL)
    # The null (unconditional) field is eq 19 once more, over the prompts: class fields weighted by P(p | x_t).
    r = np.stack([target.condition(c).marginal(path).log_prob(x, t) + np.log(target.weights[c])
                  for c in range(8)], axis=1)
    r = np.exp(r - r.max(axis=1, keepdims=True))
    r /= r.sum(axis=1, keepdims=True)
    mixed = sum(r[:, [c]] * field(t, x, np.full(n, c)) for c in range(8))
    core.compare("null field = sum_p P(p | x_t) u(t, x, p) (eq 19 over the prompts)", rel_err(mixed, u_null),
                 EXACT_TOL)
    # Planted bug: the flow_matching weighting fed the notes' w unconverted.
    core.control("flow_matching weighting given the notes' w = 2.5 unconverted",
                 rel_err(guided_field(field, y, 2.5, "flow_matching")(t, x), (1 - 2.5) * u_null + 2.5 * u_cond),
                 EXACT_TOL)

    registered = run_registered(["guidance.eq40", "guidance.sampling"], args.quick)
    return finish(core, registered)


if __name__ == "__main__":
    sys.exit(main())
