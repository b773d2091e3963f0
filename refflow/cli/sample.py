"""``refflow sample``: Algorithm 2 (or an adaptive ODE solver) from the command line."""
from __future__ import annotations

import numpy as np

from refflow._io import atomic_savez
from refflow.cli._common import guarded

__all__ = ["register", "cmd_sample"]


@guarded("sample")
def cmd_sample(args) -> int:
    from refflow.solvers import guided_field, sample
    from refflow.targets import make_target
    from refflow.train import load_checkpoint

    model, path, state, extra = load_checkpoint(args.model)
    params = state.final_params
    if (args.label is not None or args.guidance is not None) and not model.n_classes:
        raise ValueError("--label/--guidance: expected a class-conditional model (trained with --conditional)")
    if args.guidance is not None and args.label is None:
        raise ValueError("--guidance: expected --label as well (the prompt to guide towards)")
    if args.guidance is not None:
        field = guided_field(lambda t, x, y: model.apply(params, t, x, y), args.label, args.guidance,
                             convention=args.convention)
    else:
        y = args.label if args.label is not None else (-1 if model.n_classes else None)
        field = model.field(params, y)
    sol = sample(field, args.n, model.dim, args.seed, method=args.method, n_steps=args.steps,
                 rtol=args.rtol, atol=args.atol)
    if args.plot:
        # Draw first, so a plotting failure leaves no samples file either.
        from refflow.plotting import plot_samples, save_figure

        target = None
        if extra.get("target") and model.dim == 2:
            target = make_target(extra["target"])
            if args.label is not None:
                target = target.condition(args.label)
        fig = plot_samples(sol.x, target, title=f"{args.n} samples, {args.method}, nfe {sol.nfe}")
    atomic_savez(args.out, x_1=sol.x, x_0=sol.x0, nfe=np.array(sol.nfe))
    if args.plot:
        save_figure(fig, args.plot)
    print(f"{args.n} samples written to {args.out} ({sol.nfe} field evaluations)")
    return 0


def register(sub) -> None:
    """Add ``sample`` to the ``refflow`` subparsers."""
    p = sub.add_parser("sample", help="sample from a trained model (Algorithm 2 or solve_ivp)")
    p.add_argument("model", help="checkpoint written by refflow train")
    p.add_argument("-n", type=int, default=10000)
    p.add_argument("--method", default="euler", help="euler, midpoint, heun, rk4, RK45, DOP853, ...")
    p.add_argument("--steps", type=int, default=100, help="steps of a fixed-step method")
    p.add_argument("--rtol", type=float, default=1e-7)
    p.add_argument("--atol", type=float, default=1e-9)
    p.add_argument("--label", type=int, default=None, help="class to sample (conditional models)")
    p.add_argument("--guidance", type=float, default=None, help="guidance weight w of eq 40")
    p.add_argument("--convention", choices=["notes", "flow_matching"], default="notes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="samples file (.npz with x_1 and x_0)")
    p.add_argument("--plot", default=None, help="PNG of the samples over the target's density")
    p.set_defaults(func=cmd_sample)
