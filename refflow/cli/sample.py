"""``refflow sample``: Algorithm 2 (or an adaptive ODE solver) from the command line.

The source draws :math:`x_0 \\sim \\mathcal N(0, I)` are made at once from
``--seed`` (as :func:`refflow.solvers.sample` makes them), then integrated in
batches of ``--batch-size`` points, so the solver's working memory does not
grow with ``-n``.  A fixed-step method treats every point on its own, so its
samples do not depend on the batch size; an adaptive method chooses its steps
per batch (each batch within ``--rtol``/``--atol``).  The samples and the
``--plot`` appear together or not at all.
"""
from __future__ import annotations

import gc
import io

import numpy as np

from refflow.cli._common import (check_float, check_input_file, check_int, check_output_file,
                                 default_batch_size, guarded, option, progress, refuse_unless, resolve)

__all__ = ["register", "cmd_sample", "fixed_step"]


def fixed_step(method: str) -> bool:
    """Whether ``method`` (any case) is one of refflow's fixed-step methods; unknown names are refused."""
    from refflow.cli._common import UsageError
    from refflow.solvers import FIXED_STEP_METHODS, METHODS

    lookup = {m.lower(): m for m in METHODS}
    if method.lower() not in lookup:
        raise UsageError(f"--method: expected one of {', '.join(METHODS)}, got {method!r}")
    return lookup[method.lower()] in FIXED_STEP_METHODS


def bytes_per_point(model) -> int:
    """A generous estimate of one point's working memory in a solver step of ``model``."""
    widths = sum(model.hidden) + model.dim * 8
    return 8 * 16 * widths


def _check(args, given):
    check_input_file("model", args.model)
    check_output_file("--out", args.out)
    check_output_file("--plot", args.plot, suffix=".png")
    check_int("-n", args.n, 1)
    check_int("--batch-size", args.batch_size, 1)
    check_int("--seed", args.seed, 0)
    fixed = fixed_step(args.method)
    if fixed:
        check_int("--steps", args.steps, 1)
    check_float("--rtol", args.rtol, 0.0, low_open=True)
    check_float("--atol", args.atol, 0.0, low_open=True)
    check_float("--guidance", args.guidance)
    refuse_unless(given, "steps", fixed, f"applies only to a fixed-step method, not --method {args.method}")
    for dest in ("rtol", "atol"):
        refuse_unless(given, dest, not fixed, f"applies only to an adaptive method, not --method {args.method}")
    refuse_unless(given, "convention", args.guidance is not None, "applies only with --guidance")


@guarded("sample")
def cmd_sample(args) -> int:
    """Handler of ``refflow sample``: 0 done, 2 bad input, 130 interrupted (nothing written)."""
    from refflow._io import atomic_write_many
    from refflow.solvers import guided_field, integrate
    from refflow.train import load_checkpoint

    given = resolve(args)
    _check(args, given)
    model, path, state, extra = load_checkpoint(args.model)
    params = state.final_params
    if (args.label is not None or args.guidance is not None) and not model.n_classes:
        raise ValueError("--label/--guidance: expected a class-conditional model (trained with --conditional)")
    if args.label is not None and not -1 <= args.label < model.n_classes:
        raise ValueError(f"--label: expected a class in [-1, {model.n_classes - 1}] (-1 the null prompt), "
                         f"got {args.label}")
    if args.guidance is not None and args.label is None:
        raise ValueError("--guidance: expected --label as well (the prompt to guide towards)")
    if args.guidance is not None:
        field = guided_field(lambda t, x, y: model.apply(params, t, x, y), args.label, args.guidance,
                             convention=args.convention)
    else:
        y = args.label if args.label is not None else (-1 if model.n_classes else None)
        field = model.field(params, y)
    batch = args.batch_size or default_batch_size(bytes_per_point(model))

    x_0 = np.random.default_rng(args.seed).standard_normal((args.n, model.dim))
    x_1 = np.empty_like(x_0)
    nfe = 0
    bar = progress(args.n, "sampling", "points", args.quiet)
    try:
        for lo in range(0, args.n, batch):
            hi = min(lo + batch, args.n)
            sol = integrate(field, x_0[lo:hi], 0.0, 1.0, method=args.method, n_steps=args.steps,
                            rtol=args.rtol, atol=args.atol)
            x_1[lo:hi] = sol.x
            nfe += sol.nfe
            # The solver's objects form reference cycles that hold the batch's arrays until the
            # cyclic collector runs; collect now so that memory stays that of one batch.
            del sol
            gc.collect()
            if bar is not None:
                bar.update(hi)
    finally:
        if bar is not None:
            bar.close()

    outputs = {args.out: lambda fh: np.savez(fh, x_1=x_1, x_0=x_0, nfe=np.array(nfe))}
    if args.plot:
        png = _render_plot(args, model, extra, x_1, nfe)
        outputs[args.plot] = lambda fh: fh.write(png)
    atomic_write_many(outputs)  # the samples and the plot appear together or not at all
    written = args.out + (f" and {args.plot}" if args.plot else "")
    print(f"{args.n} samples written to {written} ({nfe} field evaluations)")
    return 0


def _render_plot(args, model, extra, x_1, nfe) -> bytes:
    from refflow.plotting import plot_samples
    from refflow.targets import TARGETS, make_target

    import matplotlib.pyplot as plt

    target = None
    name = extra.get("target")
    if isinstance(name, str) and name in TARGETS and model.dim == 2:
        target = make_target(name)
        if args.label is not None and args.label >= 0:
            target = target.condition(args.label)
    fig = plot_samples(x_1, target, title=f"{args.n} samples, {args.method}, nfe {nfe}")
    try:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return buf.getvalue()


def register(sub) -> None:
    """Add ``sample`` to the ``refflow`` subparsers."""
    p = sub.add_parser("sample", help="sample from a trained model (Algorithm 2 or solve_ivp)",
                       description="Draw x_0 ~ N(0, I) and integrate the learned field from t = 0 to 1 "
                       "(Algorithm 2; eq 9), in batches of bounded memory.")
    p.add_argument("model", help="checkpoint written by refflow train (required)")
    option(p, "-n", type=int, default=10000, help="number of samples")
    option(p, "--method", default="euler", help="euler, midpoint, heun, rk4, RK45, DOP853, ...")
    option(p, "--steps", type=int, default=100, help="steps of a fixed-step method")
    option(p, "--rtol", type=float, default=1e-7, help="relative tolerance of an adaptive method")
    option(p, "--atol", type=float, default=1e-9, help="absolute tolerance of an adaptive method")
    option(p, "--batch-size", type=int, default=None,
           help="points integrated together (none: sized to the available memory)")
    option(p, "--label", type=int, default=None, help="class to sample (conditional models)")
    option(p, "--guidance", type=float, default=None, help="guidance weight w of eq 40")
    option(p, "--convention", choices=["notes", "flow_matching"], default="notes",
           help="weighting of --guidance")
    option(p, "--seed", type=int, default=0, help="seed of the draws x_0")
    p.add_argument("--out", required=True, help="samples file (.npz with x_1 and x_0) (required)")
    option(p, "--plot", default=None, help="PNG of the samples over the target's density")
    option(p, "--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=cmd_sample)
