r"""``refflow likelihood``: log-likelihood of points under a trained model (eq 14).

::

    refflow likelihood model.npz --points points.npz --out logp.npz \
        [--method DOP853 --rtol 1e-7 --atol 1e-9 --divergence exact|hutchinson] [--plot density.png]

Reads a checkpoint written by :func:`refflow.train.save_checkpoint`, evaluates
:math:`\log p_1(x_1) = \log p_0(x_0) - \int_0^1 \nabla\cdot u_\theta(t, x_t)\,dt`
at the points by :func:`refflow.cnf.log_prob`, and writes ``log_p`` (n,) and
``x_0`` (n, d) (and ``log_p_stderr`` for Hutchinson) to an ``.npz``.  Outputs
are written to a temporary file and renamed, so an interrupted run leaves no
partly written file.  ``--plot`` draws :math:`\log p_1` of the model on a grid
beside the closed-form density of the training target when the checkpoint
names a preset target.
"""
from __future__ import annotations

import os
import sys

import numpy as np

from refflow._io import atomic_savez

__all__ = ["register", "cmd_likelihood"]


class _UsageError(Exception):
    """A problem with the command's inputs, reported in one line with exit status 2."""


def register(sub) -> None:
    """Add the ``likelihood`` subcommand to the ``refflow`` parser's subparsers."""
    from refflow.cnf import PROBES
    from refflow.solvers import METHODS

    p = sub.add_parser(
        "likelihood",
        help="log-likelihood of points under a trained model (CNF, eq 14)",
        description="Evaluate log p_1(x_1) = log p_0(x_0) - int_0^1 div u(t, x_t) dt (eq 14) of a "
        "trained model at the given points.",
    )
    p.add_argument("model", help="checkpoint .npz written by refflow training")
    p.add_argument("--points", required=True, help=".npz holding one (n, d) array of points")
    p.add_argument("--out", required=True, help="output .npz: log_p (n,), x_0 (n, d)")
    p.add_argument("--method", default="DOP853", help=f"ODE method, one of {', '.join(METHODS)} (default DOP853)")
    p.add_argument("--n-steps", type=int, default=100, help="steps of a fixed-step method (default 100)")
    p.add_argument("--rtol", type=float, default=1e-7, help="relative tolerance of an adaptive method")
    p.add_argument("--atol", type=float, default=1e-9, help="absolute tolerance of an adaptive method")
    p.add_argument("--divergence", choices=("exact", "hutchinson"), default="exact",
                   help="exact Jacobian trace (default) or Hutchinson's estimator")
    p.add_argument("--n-probes", type=int, default=None, help="Hutchinson probes per point (default 8)")
    p.add_argument("--probe", choices=PROBES, default="rademacher", help="Hutchinson probe distribution")
    p.add_argument("--seed", type=int, default=0, help="seed of the Hutchinson probes (default 0)")
    p.add_argument("--label", type=int, default=None,
                   help="class label for a class-conditional model (default: the null prompt)")
    p.add_argument("--plot", default=None, help="write a heat map of log p on a 2-D grid to this .png")
    p.add_argument("--grid", type=int, default=64, help="grid points per axis of --plot (default 64)")
    p.set_defaults(func=cmd_likelihood)


def _load_points(file) -> np.ndarray:
    if not os.path.isfile(file):
        raise _UsageError(f"--points: {file!r} does not exist")
    try:
        with np.load(file, allow_pickle=False) as data:
            if isinstance(data, np.ndarray):  # an .npy file
                return data.copy()
            keys = list(data.keys())
            if len(keys) == 1:
                return data[keys[0]]
            for key in ("points", "x", "x_1"):
                if key in keys:
                    return data[key]
    except _UsageError:
        raise
    except Exception as exc:
        raise _UsageError(f"--points: {file!r} is not a readable .npz file ({exc})") from None
    raise _UsageError(
        f"--points: expected an .npz holding one (n, d) array (or one named 'points'), got arrays {keys}"
    )


def _solve(field, x, args, rng):
    from refflow import cnf

    return cnf.log_prob(
        field, x, divergence=args.divergence, method=args.method, n_steps=args.n_steps,
        rtol=args.rtol, atol=args.atol,
        n_probes=args.n_probes if args.divergence == "hutchinson" else None,
        probe=args.probe, rng=rng,
    )


def cmd_likelihood(args) -> int:
    """Handler of ``refflow likelihood``; returns the exit status (0 ok, 2 bad input)."""
    try:
        return _run(args)
    except (_UsageError, ValueError, TypeError) as exc:
        print(f"refflow likelihood: error: {exc}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from refflow import cnf
    from refflow.train import load_checkpoint

    if args.n_probes is not None and args.divergence != "hutchinson":
        raise _UsageError("--n-probes: only used with --divergence hutchinson")
    if args.plot is not None and not args.plot.lower().endswith(".png"):
        raise _UsageError(f"--plot: expected a .png file name, got {args.plot!r}")
    if args.grid < 2:
        raise _UsageError(f"--grid: expected at least 2 points per axis, got {args.grid}")
    # Output folders are checked before any work is done.
    for option, file in (("--out", args.out), ("--plot", args.plot)):
        if file is not None and not os.path.isdir(os.path.dirname(os.path.abspath(file))):
            raise _UsageError(f"{option}: folder {os.path.dirname(os.path.abspath(file))!r} does not exist")
    model, path, state, extra = load_checkpoint(args.model)
    points = _load_points(args.points)
    x_1 = _check_points_arg(points, model.dim)
    field = cnf.mlp_field(model, state.final_params, args.label)
    rng = np.random.default_rng(args.seed)
    res = _solve(field, x_1, args, rng)
    out = {"log_p": res.log_p, "x_0": res.x_0}
    if res.log_p_stderr is not None:
        out["log_p_stderr"] = res.log_p_stderr
    # The plot first: a failure there must not leave a half-finished set of outputs.
    if args.plot is not None:
        _plot(args, model, path, field, extra, x_1, rng)
    atomic_savez(args.out, **out)
    print(f"log p of {x_1.shape[0]} points: mean {res.log_p.mean():.6g} ({res.divergence} divergence, "
          f"{res.method}, {res.nfe} evaluations); written to {args.out}")
    return 0


def _check_points_arg(points, d):
    from refflow._validation import check_points

    try:
        return check_points(points, "points", d)
    except (TypeError, ValueError) as exc:
        raise _UsageError(f"--points: {exc}") from None


def _plot(args, model, path, field, extra, x_1, rng):
    if model.dim != 2:
        raise _UsageError(f"--plot: needs a 2-D model, this one has d = {model.dim}")
    from refflow import targets
    from refflow.plotting import plot_log_density_panels, save_figure

    target = None
    name = extra.get("target") if isinstance(extra, dict) else None
    if isinstance(name, str):
        try:
            target = targets.make_target(name)
        except ValueError:
            target = None  # not a preset: plot the model alone
    # The grid covers the points and, when known, the target's components.
    cover = x_1 if target is None else np.concatenate([x_1, target.means])
    lo, hi = cover.min(axis=0), cover.max(axis=0)
    pad = 0.15 * (hi - lo) + 1.0
    gx = np.linspace(lo[0] - pad[0], hi[0] + pad[0], args.grid)
    gy = np.linspace(lo[1] - pad[1], hi[1] + pad[1], args.grid)
    X, Y = np.meshgrid(gx, gy)
    grid = np.stack([X.ravel(), Y.ravel()], axis=1)
    log_p = _solve(field, grid, args, rng).log_p.reshape(X.shape)

    panels = [("model log p_1 (eq 14)", log_p)]
    if target is not None:
        truth = target.marginal(path).log_prob(grid, 1.0).reshape(X.shape)
        panels.append((f"closed form log p_1 ({name})", truth))
    save_figure(plot_log_density_panels(X, Y, panels), args.plot)
