"""Effect sizes of refflow's own trained models: the numbers behind the thresholds suggested in
docs/testing-your-code.md.

Trains MLPs (refflow.train, CFM with the OT path) on the eight-Gaussians case for a few training
budgets and prints, for each: the field's relative L2 error (with its standard error), and for the
sampler made from it (midpoint, 100 steps) the log-likelihood gap in nats with its 95 % interval,
the energy distance and the largest component-weight error.

    python benchmarks/effect_sizes.py [--steps 500,2000,8000] [--seed 0]
"""
from __future__ import annotations

import argparse

import numpy as np

from refflow.adapters import sampler_from_field
from refflow.nn import MLP
from refflow.train import train
from refflow.validate import check, get_case

CASE = "eight-gaussians/ot/sigma_min=0/d=2"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", default="500,2000,8000")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=2000, help="samples of the sampler check")
    args = ap.parse_args(argv)
    case = get_case(CASE)
    print(f"case {CASE}; MLP 2x128 silu, batch 256, lr 1e-3 (Adam); sampler: midpoint, 100 steps; n = {args.n}")
    print(f"{'steps':>6}  {'u_l2':>9} {'+-se':>8}  {'gap':>7} {'95% CI':>17}  {'energy':>7}  {'max |dw|':>8}")
    for steps in [int(s) for s in args.steps.split(",")]:
        model = MLP(2, hidden=(128, 128))
        state = train(model, case.target, case.path, steps=steps, rng=args.seed, progress=False)
        params = state.final_params

        def field(t, x, params=params):
            return model.apply(params, t, x)

        fr = check("field", field, case, threshold=1.0, seed=args.seed)
        sr = check("sampler", sampler_from_field(field, n_steps=100), case, n=args.n, seed=args.seed,
                   max_gap=10.0)
        g = sr["log_lik_gap"]
        lo, hi = g.details["ci95"]
        print(f"{steps:>6}  {fr['u_l2'].error:9.3g} {fr['u_l2'].details['stderr']:8.2g}  {g.details['gap']:7.3f} "
              f"[{lo:7.3f}, {hi:7.3f}]  {sr['energy_distance'].error:7.4f}  {sr['weights'].error:8.3f}")


if __name__ == "__main__":
    main()
