"""``refflow train``: Algorithm 1 (conditional flow matching) from the command line."""
from __future__ import annotations


import numpy as np

from refflow.cli._common import guarded

__all__ = ["register", "cmd_train", "path_from_args", "parse_hidden"]


def parse_hidden(text):
    try:
        widths = tuple(int(w) for w in text.split(",") if w.strip())
    except ValueError:
        raise ValueError(f"--hidden: expected comma-separated ints like 256,256,256, got {text!r}") from None
    if not widths:
        raise ValueError(f"--hidden: expected at least one width, got {text!r}")
    return widths


def path_from_args(args):
    from refflow.paths import make_path

    kwargs = {}
    if args.path == "ot":
        kwargs["sigma_min"] = args.sigma_min
    return make_path(args.path, **kwargs)


@guarded("train")
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
        path = path_from_args(args)
        n_classes = target.n_classes if args.conditional else None
        model = MLP(target.dim, hidden=parse_hidden(args.hidden), activation=args.activation, n_classes=n_classes,
                    fourier_features=args.fourier_features)
        extra = {"target": args.target, "batch_size": args.batch_size, "label_dropout": args.label_dropout}
        state = train(model, target, path, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      rng=args.seed, ema_decay=args.ema, label_dropout=args.label_dropout,
                      progress=not args.quiet)
    save_checkpoint(args.out, state, model, path, extra=extra)
    tail = state.losses[-min(100, len(state.losses)):] if state.losses else [float("nan")]
    print(f"trained {state.step} steps; mean loss of the last {len(tail)}: {np.mean(tail):.5f}; saved {args.out}")
    return 0


def register(sub) -> None:
    """Add ``train`` to the ``refflow`` subparsers."""
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
    p.set_defaults(func=cmd_train)

