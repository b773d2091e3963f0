r"""``refflow likelihood``: log-likelihood of points under a trained model (eq 14).

::

    refflow likelihood model.npz --points points.npz --out logp.npz \
        [--method DOP853 --rtol 1e-7 --atol 1e-9 --divergence exact|hutchinson] [--plot density.png]

Reads a checkpoint written by :func:`refflow.train.save_checkpoint`, evaluates
:math:`\log p_1(x_1) = \log p_0(x_0) - \int_0^1 \nabla\cdot u_\theta(t, x_t)\,dt`
at the points by :func:`refflow.cnf.log_prob`, and writes ``log_p`` (n,) and
``x_0`` (n, d) (and ``log_p_stderr`` for Hutchinson) to an ``.npz``.  The
points are integrated in batches of ``--batch-size``, so the solver's working
memory does not grow with their number (an adaptive method chooses its steps
per batch, each within ``--rtol``/``--atol``; Hutchinson's probes are drawn
batch by batch from ``--seed``).  The outputs are written to temporary files
and renamed together, so an interrupted or failed run leaves none behind.
``--points`` is an ``.npz`` (one array, or one named ``points``, ``x`` or
``x_1``) or an ``.npy``.  ``--plot`` draws :math:`\log p_1` of the model on a grid
beside the closed-form density of the training target when the checkpoint
names a preset target.
"""
from __future__ import annotations

import gc
import io

import numpy as np

from refflow.cli._common import (UsageError, check_float, check_input_file, check_int, check_output_file,
                                 default_batch_size, guarded, option, progress, refuse_unless, resolve)

__all__ = ["register", "cmd_likelihood"]


def register(sub) -> None:
    """Add the ``likelihood`` subcommand to the ``refflow`` parser's subparsers."""
    from refflow.cnf import PROBES
    from refflow.solvers import METHODS

    p = sub.add_parser(
        "likelihood",
        help="log-likelihood of points under a trained model (CNF, eq 14)",
        description="Evaluate log p_1(x_1) = log p_0(x_0) - int_0^1 div u(t, x_t) dt (eq 14) of a "
        "trained model at the given points, in batches of bounded memory.",
    )
    p.add_argument("model", help="checkpoint .npz written by refflow training (required)")
    p.add_argument("--points", required=True, help=".npz holding one (n, d) array of points, or an .npy (required)")
    p.add_argument("--out", required=True, help="output .npz: log_p (n,), x_0 (n, d) (required)")
    option(p, "--method", default="DOP853", help=f"ODE method, one of {', '.join(METHODS)}")
    option(p, "--n-steps", type=int, default=100, help="steps of a fixed-step method")
    option(p, "--rtol", type=float, default=1e-7, help="relative tolerance of an adaptive method")
    option(p, "--atol", type=float, default=1e-9, help="absolute tolerance of an adaptive method")
    option(p, "--divergence", choices=("exact", "hutchinson"), default="exact",
           help="exact Jacobian trace or Hutchinson's estimator")
    option(p, "--n-probes", type=int, default=8, help="Hutchinson probes per point")
    option(p, "--probe", choices=PROBES, default="rademacher", help="Hutchinson probe distribution")
    option(p, "--seed", type=int, default=0, help="seed of the Hutchinson probes")
    option(p, "--batch-size", type=int, default=None,
           help="points integrated together (none: sized to the available memory)")
    option(p, "--label", type=int, default=None,
           help="class label for a class-conditional model (none: the null prompt)")
    option(p, "--plot", default=None, help="write a heat map of log p on a 2-D grid to this .png")
    option(p, "--grid", type=int, default=64, help="grid points per axis of --plot")
    option(p, "--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=cmd_likelihood)


def _load_points(file) -> np.ndarray:
    check_input_file("--points", file)
    try:
        data = np.load(file, allow_pickle=False)
    except Exception as exc:
        raise UsageError(f"--points: {file!r} is not a readable .npz or .npy file ({type(exc).__name__}: "
                         f"{exc})") from None
    if isinstance(data, np.ndarray):  # an .npy file
        return data
    with data:
        keys = list(data.keys())
        try:
            if len(keys) == 1:
                return data[keys[0]]
            for key in ("points", "x", "x_1"):
                if key in keys:
                    return data[key]
        except Exception as exc:
            raise UsageError(f"--points: {file!r} holds an unreadable array ({type(exc).__name__}: {exc})") from None
    raise UsageError(
        f"--points: expected an .npz holding one (n, d) array (or one named 'points'), got arrays {keys}"
    )


def bytes_per_point(model, method_fixed: bool) -> int:
    """A generous estimate of one point's working memory in the augmented ODE (eq 13)."""
    per_eval = 8 * (model.dim + 1) * (sum(model.hidden) + model.dim) * 6
    # An adaptive scipy method keeps its stages (13 for DOP853) of the (d + 1)-state and more.
    solver = 0 if method_fixed else 8 * (model.dim + 1) * 64
    return per_eval + solver


def _solve(field, x, args, rng):
    from refflow import cnf

    return cnf.log_prob(
        field, x, divergence=args.divergence, method=args.method, n_steps=args.n_steps,
        rtol=args.rtol, atol=args.atol,
        n_probes=args.n_probes if args.divergence == "hutchinson" else None,
        probe=args.probe, rng=rng,
    )


def _solve_batched(field, x, args, rng, batch, label):
    """``log p`` of ``x`` batch by batch: returns ``(log_p, x_0, stderr or None, nfe, method)``."""
    n = x.shape[0]
    log_p, x_0 = np.empty(n), np.empty_like(x)
    stderr = np.empty(n) if args.divergence == "hutchinson" else None
    nfe, method = 0, args.method
    bar = progress(n, label, "points", args.quiet)
    try:
        for lo in range(0, n, batch):
            hi = min(lo + batch, n)
            res = _solve(field, x[lo:hi], args, rng)
            log_p[lo:hi], x_0[lo:hi] = res.log_p, res.x_0
            if stderr is not None:
                stderr[lo:hi] = res.log_p_stderr
            nfe, method = nfe + res.nfe, res.method
            # The solver's objects form reference cycles that hold the batch's arrays until the
            # cyclic collector runs; collect now so that memory stays that of one batch.
            del res
            gc.collect()
            if bar is not None:
                bar.update(hi)
    finally:
        if bar is not None:
            bar.close()
    return log_p, x_0, stderr, nfe, method


@guarded("likelihood")
def cmd_likelihood(args) -> int:
    """Handler of ``refflow likelihood``; returns the exit status (0 ok, 2 bad input, 130 interrupted)."""
    from refflow import cnf
    from refflow._io import atomic_write_many
    from refflow.cli.sample import fixed_step
    from refflow.train import load_checkpoint

    given = resolve(args)
    check_input_file("model", args.model)
    check_output_file("--out", args.out)
    check_output_file("--plot", args.plot, suffix=".png")
    fixed = fixed_step(args.method)
    refuse_unless(given, "n_probes", args.divergence == "hutchinson", "applies only with --divergence hutchinson")
    refuse_unless(given, "probe", args.divergence == "hutchinson", "applies only with --divergence hutchinson")
    refuse_unless(given, "seed", args.divergence == "hutchinson", "applies only with --divergence hutchinson")
    refuse_unless(given, "n_steps", fixed, f"applies only to a fixed-step method, not --method {args.method}")
    for dest in ("rtol", "atol"):
        refuse_unless(given, dest, not fixed, f"applies only to an adaptive method, not --method {args.method}")
    refuse_unless(given, "grid", args.plot is not None, "applies only with --plot")
    check_int("--n-steps", args.n_steps, 1)
    check_int("--n-probes", args.n_probes, 1)
    check_int("--seed", args.seed, 0)
    check_int("--batch-size", args.batch_size, 1)
    check_int("--grid", args.grid, 2)
    check_float("--rtol", args.rtol, 0.0, low_open=True)
    check_float("--atol", args.atol, 0.0, low_open=True)

    model, path, state, extra = load_checkpoint(args.model)
    points = _load_points(args.points)
    x_1 = _check_points_arg(points, model.dim)
    if args.label is not None and not (model.n_classes and -1 <= args.label < model.n_classes):
        raise UsageError(f"--label: expected a class of a conditional model in [-1, {(model.n_classes or 0) - 1}], "
                         f"got {args.label}")
    field = cnf.mlp_field(model, state.final_params, args.label)
    rng = np.random.default_rng(args.seed)
    batch = args.batch_size or default_batch_size(bytes_per_point(model, fixed))
    log_p, x_0, stderr, nfe, method = _solve_batched(field, x_1, args, rng, batch, "likelihood")
    out = {"log_p": log_p, "x_0": x_0}
    if stderr is not None:
        out["log_p_stderr"] = stderr
    outputs = {args.out: lambda fh: np.savez(fh, **out)}
    if args.plot is not None:
        png = _plot(args, model, path, field, extra, x_1, rng, batch)
        outputs[args.plot] = lambda fh: fh.write(png)
    atomic_write_many(outputs)  # the values and the plot appear together or not at all
    print(f"log p of {x_1.shape[0]} points: mean {log_p.mean():.6g} ({args.divergence} divergence, "
          f"{method}, {nfe} evaluations); written to {args.out}" + (f" and {args.plot}" if args.plot else ""))
    return 0


def _check_points_arg(points, d):
    from refflow._validation import check_points

    try:
        return check_points(points, "points", d)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--points: {exc}") from None


def _plot(args, model, path, field, extra, x_1, rng, batch) -> bytes:
    if model.dim != 2:
        raise UsageError(f"--plot: needs a 2-D model, this one has d = {model.dim}")
    import matplotlib.pyplot as plt

    from refflow import targets
    from refflow.plotting import plot_log_density_panels

    target = None
    name = extra.get("target") if isinstance(extra, dict) else None
    if isinstance(name, str) and name in targets.TARGETS:
        target = targets.make_target(name)
    # The grid covers the points and, when known, the target's components.
    cover = x_1 if target is None else np.concatenate([x_1, target.means])
    lo, hi = cover.min(axis=0), cover.max(axis=0)
    pad = 0.15 * (hi - lo) + 1.0
    gx = np.linspace(lo[0] - pad[0], hi[0] + pad[0], args.grid)
    gy = np.linspace(lo[1] - pad[1], hi[1] + pad[1], args.grid)
    X, Y = np.meshgrid(gx, gy)
    grid = np.stack([X.ravel(), Y.ravel()], axis=1)
    log_p = _solve_batched(field, grid, args, rng, batch, "plot grid")[0].reshape(X.shape)

    panels = [("model log p_1 (eq 14)", log_p)]
    if target is not None:
        truth = target.marginal(path).log_prob(grid, 1.0).reshape(X.shape)
        panels.append((f"closed form log p_1 ({name})", truth))
    fig = plot_log_density_panels(X, Y, panels)
    try:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return buf.getvalue()
