"""``refflow train`` and ``refflow sample``: Algorithm 1 and Algorithm 2 from the command line."""
from __future__ import annotations

import sys

import numpy as np

from refflow._io import atomic_savez

__all__ = ["register"]


def _hidden(text):
    try:
        widths = tuple(int(w) for w in text.split(",") if w.strip())
    except ValueError:
        raise ValueError(f"--hidden: expected comma-separated ints like 256,256,256, got {text!r}") from None
    if not widths:
        raise ValueError(f"--hidden: expected at least one width, got {text!r}")
    return widths


def _path_from_args(args):
    from refflow.paths import make_path

    kwargs = {}
    if args.path == "ot":
        kwargs["sigma_min"] = args.sigma_min
    return make_path(args.path, **kwargs)


def cmd_train(args) -> int:
    from refflow.nn import MLP
    from refflow.targets import make_target
    from refflow.train import load_checkpoint, save_checkpoint, train

    if args.resume:
        model, path, state, extra = load_checkpoint(args.resume)
        target = make_target(extra["target"])
        state = train(model, target, path, steps=args.steps, batch_size=extra.get("batch_size", args.batch_size),
                      label_dropout=extra.get("label_dropout", 0.0), resume=state, progress=not args.quiet)
    else:
        target = make_target(args.target)
        path = _path_from_args(args)
        n_classes = target.n_classes if args.conditional else None
        model = MLP(target.dim, hidden=_hidden(args.hidden), activation=args.activation, n_classes=n_classes,
                    fourier_features=args.fourier_features)
        extra = {"target": args.target, "batch_size": args.batch_size, "label_dropout": args.label_dropout}
        state = train(model, target, path, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      rng=args.seed, ema_decay=args.ema, label_dropout=args.label_dropout,
                      progress=not args.quiet)
    save_checkpoint(args.out, state, model, path, extra=extra)
    tail = state.losses[-min(100, len(state.losses)):] if state.losses else [float("nan")]
    print(f"trained {state.step} steps; mean loss of the last {len(tail)}: {np.mean(tail):.5f}; saved {args.out}")
    return 0


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


def _guard(fn):
    def run(args):
        try:
            return fn(args)
        except (ValueError, TypeError, FileNotFoundError) as exc:
            print(f"refflow {args.command}: {exc}", file=sys.stderr)
            return 2

    return run


def register(sub) -> None:
    from refflow.nn import ACTIVATIONS
    from refflow.paths import PATHS
    from refflow.targets import TARGETS

    p = sub.add_parser("train", help="train a velocity field by CFM (Algorithm 1)")
    p.add_argument("--target", choices=sorted(TARGETS), default="eight-gaussians")
    p.add_argument("--path", choices=sorted(PATHS), default="ot")
    p.add_argument("--sigma-min", type=float, default=0.0, help="sigma_min of the OT path")
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--hidden", default="256,256,256", help="hidden widths, e.g. 256,256,256")
    p.add_argument("--activation", choices=ACTIVATIONS, default="silu")
    p.add_argument("--fourier-features", type=int, default=0)
    p.add_argument("--conditional", action="store_true", help="condition on the target's class labels (eq 38)")
    p.add_argument("--label-dropout", type=float, default=0.0, help="probability of the null prompt (eq 40)")
    p.add_argument("--ema", type=float, default=None, help="EMA decay of the weights, e.g. 0.999")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", default=None, help="continue training from this checkpoint")
    p.add_argument("--out", required=True, help="checkpoint file (.npz)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_guard(cmd_train))

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
    p.set_defaults(func=_guard(cmd_sample))
