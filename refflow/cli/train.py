"""``refflow train``: Algorithm 1 (conditional flow matching) from the command line.

Every input is checked before the first step: the output path (exit 2,
nothing written), the numbers, and flags that do not apply to the options
chosen (``--sigma-min`` with ``--path vp``, model flags with ``--resume``).
While training:

- ``--checkpoint-every N`` writes the checkpoint to ``--out`` every N steps;
- Ctrl-C finishes the step in progress, saves a resumable checkpoint to
  ``--out`` and exits 130 with the command that resumes the run;
- a NaN, inf or exploding loss stops the run with an error naming the
  learning rate (exit 1); the checkpoint at ``--out``, if any, is left as it
  was (the last good periodic one).
"""
from __future__ import annotations

import shlex
import sys

import numpy as np

from refflow.cli._common import (EXIT_INTERRUPTED, UsageError, check_float, check_input_file, check_int,
                                 check_output_file, guarded, option, refuse_unless, resolve)

__all__ = ["register", "cmd_train", "parse_hidden"]

# Paths whose constructor takes sigma_min (the others have no such parameter).
_SIGMA_MIN_PATHS = ("ot", "ve")
# Flags fixed by the checkpoint: refused with --resume rather than silently ignored.
_FIXED_BY_CHECKPOINT = ("target", "path", "sigma_min", "batch_size", "lr", "hidden", "activation",
                        "fourier_features", "conditional", "label_dropout", "ema", "seed")


def parse_hidden(text):
    """``"256,256"`` -> ``(256, 256)``; refused unless every width is a positive int."""
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        raise UsageError(f"--hidden: expected comma-separated ints like 256,256,256, got {text!r}") from None
    if not widths or any(w < 1 for w in widths):
        raise UsageError(f"--hidden: expected positive widths like 256,256,256, got {text!r}")
    return widths


def _check(args, given):
    check_output_file("--out", args.out)
    check_int("--steps", args.steps, 1)
    check_int("--checkpoint-every", args.checkpoint_every, 1)
    if args.resume is not None:
        check_input_file("--resume", args.resume)
        for dest in _FIXED_BY_CHECKPOINT:
            refuse_unless(given, dest, False, "does not apply with --resume (the checkpoint fixes it)")
        return
    check_int("--batch-size", args.batch_size, 1)
    check_float("--lr", args.lr, 0.0, low_open=True)
    check_float("--label-dropout", args.label_dropout, 0.0, 1.0, high_open=True)
    check_float("--ema", args.ema, 0.0, 1.0, low_open=True, high_open=True)
    check_int("--fourier-features", args.fourier_features, 0)
    check_int("--seed", args.seed, 0)
    parse_hidden(args.hidden)
    refuse_unless(given, "sigma_min", args.path in _SIGMA_MIN_PATHS,
                  f"applies only to --path {' or '.join(_SIGMA_MIN_PATHS)}, not --path {args.path}")
    refuse_unless(given, "label_dropout", args.conditional, "applies only with --conditional")


def _resume_settings(extra, file):
    """The settings a CLI checkpoint stores in ``extra``, each checked."""
    from refflow.targets import TARGETS

    where = f"--resume: {file!r}"
    target = extra.get("target")
    if not isinstance(target, str) or target not in TARGETS:
        raise UsageError(f"{where} names no preset target (extra.target = {target!r}, expected one of "
                         f"{sorted(TARGETS)}); resume it from Python with refflow.train.train(resume=...)")
    batch_size = extra.get("batch_size", 256)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"{where}: extra.batch_size: expected an int >= 1, got {batch_size!r}")
    dropout = extra.get("label_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise UsageError(f"{where}: extra.label_dropout: expected a value in [0.0, 1.0), got {dropout!r}")
    return target, batch_size, float(dropout)


@guarded("train")
def cmd_train(args) -> int:
    """Handler of ``refflow train``: 0 done, 1 diverged, 2 bad input, 130 interrupted (checkpoint saved)."""
    from refflow.nn import MLP
    from refflow.paths import make_path
    from refflow.targets import make_target
    from refflow.train import TrainingDiverged, TrainingInterrupted, load_checkpoint, save_checkpoint, train

    given = resolve(args)
    _check(args, given)
    if args.resume:
        model, path, state, extra = load_checkpoint(args.resume)
        target_name, batch_size, label_dropout = _resume_settings(extra, args.resume)
        target = make_target(target_name)
        kwargs = dict(batch_size=batch_size, label_dropout=label_dropout, resume=state)
    else:
        target_name, batch_size, label_dropout = args.target, args.batch_size, args.label_dropout
        target = make_target(target_name)
        path = make_path(args.path, **({"sigma_min": args.sigma_min} if "sigma_min" in given else {}))
        n_classes = target.n_classes if args.conditional else None
        if args.conditional and not n_classes:
            raise UsageError(f"--conditional: target {target_name!r} has no class labels")
        model = MLP(target.dim, hidden=parse_hidden(args.hidden), activation=args.activation,
                    n_classes=n_classes, fourier_features=args.fourier_features)
        kwargs = dict(batch_size=batch_size, lr=args.lr, rng=args.seed, ema_decay=args.ema,
                      label_dropout=label_dropout)
    extra = {"target": target_name, "batch_size": batch_size, "label_dropout": label_dropout}
    start = kwargs["resume"].step if args.resume else 0
    saved = {"step": None}

    def save(state):
        save_checkpoint(args.out, state, model, path, extra=extra)
        saved["step"] = state.step

    def on_step(state):
        if args.checkpoint_every and (state.step - start) % args.checkpoint_every == 0:
            save(state)

    try:
        state = train(model, target, path, steps=args.steps, progress=not args.quiet, on_step=on_step, **kwargs)
    except TrainingInterrupted as stop:
        state = stop.state
        save(state)
        done = state.step - start
        again = f"refflow train --resume {shlex.quote(args.out)} --steps {args.steps - done} --out {shlex.quote(args.out)}"
        print(f"refflow train: interrupted after step {state.step} ({done} of {args.steps} steps); "
              f"checkpoint saved to {args.out}; resume with: {again}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except TrainingDiverged as exc:
        kept = (f"{args.out} keeps the checkpoint of step {saved['step']}" if saved["step"] is not None
                else "nothing written")
        print(f"refflow train: error: {exc}; {kept}", file=sys.stderr)
        return 1
    save(state)
    tail = state.losses[-min(100, len(state.losses)):]
    print(f"trained {state.step} steps; mean loss of the last {len(tail)}: {np.mean(tail):.5f}; saved {args.out}")
    return 0


def register(sub) -> None:
    """Add ``train`` to the ``refflow`` subparsers."""
    from refflow.nn import ACTIVATIONS
    from refflow.paths import PATHS
    from refflow.targets import TARGETS

    p = sub.add_parser("train", help="train a velocity field by CFM (Algorithm 1)",
                       description="Train an MLP velocity field by conditional flow matching (Algorithm 1, "
                       "eq 36-38). Ctrl-C saves a resumable checkpoint.")
    option(p, "--target", choices=sorted(TARGETS), default="eight-gaussians", help="training distribution q_1")
    option(p, "--path", choices=sorted(PATHS), default="ot", help="conditional probability path")
    option(p, "--sigma-min", type=float, default=None,
           help="sigma_min of the OT or VE path (0.0 for OT, 0.01 for VE when not given)")
    option(p, "--steps", type=int, default=5000, help="training steps to run (also when resuming)")
    option(p, "--batch-size", type=int, default=256, help="points per step")
    option(p, "--lr", type=float, default=1e-3, help="Adam learning rate")
    option(p, "--hidden", default="256,256,256", help="hidden widths, comma-separated")
    option(p, "--activation", choices=ACTIVATIONS, default="silu", help="activation function")
    option(p, "--fourier-features", type=int, default=0, help="Fourier features of t")
    option(p, "--conditional", action="store_true", help="condition on the target's class labels (eq 38)")
    option(p, "--label-dropout", type=float, default=0.0, help="probability of the null prompt (eq 40)")
    option(p, "--ema", type=float, default=None, help="EMA decay of the weights, e.g. 0.999")
    option(p, "--seed", type=int, default=0, help="seed of the initialisation and the batches")
    option(p, "--resume", default=None, help="continue training from this checkpoint")
    option(p, "--checkpoint-every", type=int, default=None, help="also write the checkpoint every N steps")
    p.add_argument("--out", required=True, help="checkpoint file (.npz) (required)")
    option(p, "--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=cmd_train)
