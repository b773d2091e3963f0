"""Figure 2 of the notes: conditional flows are straight and cross; marginal flows are curved and do not.

1-D data (three narrow Gaussians), OT path with sigma_min = 0, drawn in the (t, x) plane:

* conditional flows: x_t = (1 - t) x_0 + t x_1 for independent pairs (eq 26, 35): straight lines;
  two of them cross exactly when the pair is in opposite order at t = 0 and t = 1;
* marginal flows: dx/dt = u_t(x) with the closed-form field of eq 19 (eq 8-10).  Two solutions of
  an ODE with a Lipschitz field never meet (uniqueness), so in 1-D they keep their order: no
  crossings.  Then the flow is the unique order-preserving map carrying p_0 to p_t, the quantile
  map x_t = F_t^{-1}(F_0(x_0)), with F_t the closed-form CDF of p_t (eq 16).

    python verification/figure2.py [--quick] [--out figure2.png]
"""
import sys

import numpy as np

from refflow.figures import (
    chord_deviation,
    count_crossings,
    figure2,
    figure2_data,
    line_crossings,
    marginal_trajectories,
    quantile_transport,
)
from refflow.stats import EXACT_TOL

from common import Table, finish, parse_args, run_registered


def main():
    args = parse_args(__doc__.splitlines()[0])
    data = figure2_data(np.random.default_rng(4), n=40)
    ts, x_0, x_1 = data["ts"], data["x_0"], data["x_1"]
    lines, flow = data["conditional"], data["marginal_flow"]            # shape (times, 40, 1)

    n_lines, _ = count_crossings(lines)
    n_flow, _ = count_crossings(flow)
    exact = quantile_transport(data["target"], data["path"], x_0, ts)
    flow_error = np.abs(flow - exact).max()
    print(f"conditional lines: {n_lines} of 780 pairs cross (opposite order at the ends: "
          f"{line_crossings(x_0, x_1)}); marginal flows: {n_flow} pairs cross")

    core = Table("Core computation: 40 trajectories from the same x_0 ~ N(0, 1), 201 grid times")
    core.compare("marginal flows: crossing pairs", n_flow, 0)
    core.compare("conditional lines: |grid count - pairs in opposite order at the ends|",
                 abs(n_lines - line_crossings(x_0, x_1)), 0)
    # DOP853 at rtol 1e-10 (refflow.figures): local errors ~1e-10, so 1e-6 leaves room for their growth
    # along the flow (the bound refflow.verify.checks.cnf uses for the same solver settings).
    core.compare("marginal flows vs exact quantile flow F_t^-1(F_0(x_0)): max |error|", flow_error, 1e-6)
    core.compare("conditional lines: distance from the chord / max |x|",
                 chord_deviation(lines, ts).max() / np.abs(lines).max(), EXACT_TOL)
    core.control("conditional lines: crossing pairs", n_lines, 0)
    core.control("marginal flows: distance from the chord / max |x|",
                 chord_deviation(flow, ts).max() / np.abs(lines).max(), EXACT_TOL)
    reversed_flow = marginal_trajectories(data["marginal"], x_0, ts,
                                          field=lambda t, x: data["marginal"].velocity(x, 1.0 - t))
    core.control("time-reversed field u_(1-t) vs the exact quantile flow: max |error|",
                 np.abs(reversed_flow - exact).max(), 1e-6)

    if args.out:
        figure2(np.random.default_rng(4)).savefig(args.out, dpi=110)
        print(f"figure written to {args.out}")

    # --quick leaves out figure2.quantile_flow (its comparison is the third row above)
    names = ["figure2.crossings", "figure2.straightness"]
    if not args.quick:
        names.insert(1, "figure2.quantile_flow")
    registered = run_registered(names, args.quick)
    return finish(core, registered)


if __name__ == "__main__":
    sys.exit(main())
