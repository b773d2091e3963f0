"""``refflow empirical``: how far a trained model is from the memorising field of a data set.

Two measures, both against the exact empirical marginal of eq 19 with
:math:`q_1` the data set (:mod:`refflow.empirical`, streamed over the data):

1. the field distance over t: at points :math:`x_t = \\sigma_t x_0 + \\alpha_t x_1`
   (:math:`x_1` drawn from the data), the root-mean-square of
   :math:`u_\\theta - u_t^{emp}` relative to that of :math:`u_t^{emp}`;
2. the memorisation of samples: for samples of the model (Euler from t = 0 to
   1), the distance to the nearest training point :math:`d_1`, the ratio
   :math:`d_1/d_2` to the second nearest (a sample with ratio < 1/3 is counted
   as a copy), beside the nearest-neighbour distances of the data themselves.

The data: ``--data digits`` (scikit-learn's, the ``data`` extra) or a ``.npy``
(memory-mapped) / ``.npz`` file.  ``--dask`` shards the field's sums over a
local Dask cluster (``--scheduler ADDRESS``: a running one).
"""
from __future__ import annotations

import json
import os

import numpy as np

from refflow.cli._common import (UsageError, check_float, check_input_file, check_int, check_output_file, guarded,
                                 option, refuse_unless, resolve)

__all__ = ["register", "cmd_empirical"]

COPY_RATIO = 1.0 / 3.0
"""A sample whose nearest training point is closer than a third of the second nearest counts as a copy."""


def _times(text: str):
    try:
        times = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--times: expected comma-separated numbers in [0, 1], got {text!r}") from None
    if not times:
        raise UsageError(f"--times: expected at least one time, got {text!r}")
    for v in times:
        check_float("--times", v, 0.0, 1.0)
    return times


def _load_data(args):
    from refflow import empirical

    if args.data == "digits":
        try:
            return empirical.digits()
        except ImportError as exc:
            raise UsageError(f"--data: {exc}") from None
    check_input_file("--data", args.data)
    return empirical.load_points(args.data, key=args.key)


def _check(args, given):
    check_input_file("model", args.model)
    check_output_file("--out", args.out, suffix=".json")
    check_int("--n-query", args.n_query, 1)
    check_int("--samples", args.samples, 0)
    check_int("--steps", args.steps, 1)
    check_int("--seed", args.seed, 0)
    check_int("--workers", args.workers, 1)
    if args.block_size is not None:
        check_int("--block-size", args.block_size, 1)
    refuse_unless(given, "key", not str(args.data).lower().endswith(".npy") and args.data != "digits",
                  "applies only to a .npz data file")
    refuse_unless(given, "workers", args.dask and args.scheduler is None,
                  "applies only with --dask and no --scheduler (a local cluster)")
    refuse_unless(given, "scheduler", args.dask, "applies only with --dask")
    if args.dask:
        try:
            import dask.distributed  # noqa: F401
        except ImportError:
            raise UsageError('--dask: needs dask.distributed; install the extra with pip install -e ".[dask]"') from None
    return _times(args.times)


@guarded("empirical")
def cmd_empirical(args) -> int:
    """Handler of ``refflow empirical``: 0 done, 2 bad input (nothing written), 130 interrupted."""
    from refflow import empirical
    from refflow._io import atomic_write_text
    from refflow.solvers import integrate
    from refflow.train import load_checkpoint

    given = resolve(args)
    times = _check(args, given)
    data = _load_data(args)
    model, path, state, _ = load_checkpoint(args.model)
    N, d = data.shape
    if model.dim != d:
        raise ValueError(f"--data: expected points of dimension {model.dim} to match the model, got shape {data.shape}")
    params = state.final_params
    field = model.field(params, -1 if model.n_classes else None)
    dask = {}
    if args.dask:
        dask = {"client": None, "scheduler": args.scheduler or "local", "n_workers": args.workers}
    target = empirical.StreamingEmpirical(data, block_size=args.block_size)
    marginal = target.marginal(path)
    rng = np.random.default_rng(args.seed)

    rows = []
    for t in times:
        x_1 = np.asarray(data[np.sort(rng.integers(0, N, args.n_query))], dtype=np.float64)
        x_0 = rng.standard_normal((args.n_query, d))
        x_t = path.sample(x_0, x_1, t)
        u_emp = marginal.evaluate(x_t, t, ("velocity",), **dask)["velocity"]
        u_model = field(t, x_t)
        rms_emp = float(np.sqrt(np.mean(np.sum(u_emp**2, axis=1))))
        rms_diff = float(np.sqrt(np.mean(np.sum((u_model - u_emp) ** 2, axis=1))))
        rows.append({"t": t, "rms_difference": rms_diff, "rms_memorising": rms_emp,
                     "relative": rms_diff / rms_emp if rms_emp > 0 else float("inf")})

    report = {"model": os.fspath(args.model), "data": os.fspath(args.data), "n_data": N, "dim": d,
              "path": path.config(), "field_distance": rows}
    if args.samples:
        k = 2 if N >= 2 else 1
        x_0 = rng.standard_normal((args.samples, d))
        samples = integrate(field, x_0, 0.0, 1.0, method="euler", n_steps=args.steps).x
        dist, _ = empirical.nearest_distances(data, samples, k=k, block_size=args.block_size)
        ref_rows = np.sort(rng.choice(N, size=min(N, args.samples), replace=False))
        # the data's own nearest neighbours (the first is the point itself, at distance 0)
        own, _ = empirical.nearest_distances(data, np.asarray(data[ref_rows], dtype=np.float64),
                                             k=min(N, 3), block_size=args.block_size)
        report["samples"] = _summary(dist)
        report["data_nearest_neighbour"] = _summary(own[:, 1:]) if N >= 2 else None

    text = _table(report)
    if args.out:
        atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    print(text + (f"\nreport written to {args.out}" if args.out else ""))
    return 0


def _summary(dist):
    d1 = dist[:, 0]
    out = {"n": int(d1.size), "nearest_median": float(np.median(d1)),
           "nearest_quantiles": {q: float(np.quantile(d1, float(q))) for q in ("0.01", "0.1", "0.5", "0.9")}}
    if dist.shape[1] >= 2:
        ratio = d1 / np.where(dist[:, 1] > 0, dist[:, 1], np.inf)
        out["copy_fraction"] = float(np.mean(ratio < COPY_RATIO))
    return out


def _table(report) -> str:
    lines = [f"memorising field of {report['n_data']} points in d = {report['dim']} ({report['path']['name']} path)",
             "     t   rms |u_model - u_emp|   rms |u_emp|   relative"]
    for r in report["field_distance"]:
        lines.append(f"{r['t']:6.3f}   {r['rms_difference']:20.6g}   {r['rms_memorising']:11.6g}   {r['relative']:8.4g}")
    if "samples" in report:
        s, own = report["samples"], report["data_nearest_neighbour"]
        lines.append(f"samples: {s['n']}, nearest training point: median {s['nearest_median']:.4g}, "
                     f"10% quantile {s['nearest_quantiles']['0.1']:.4g}"
                     + (f", copies (d1/d2 < 1/3): {100 * s['copy_fraction']:.1f}%" if "copy_fraction" in s else ""))
        if own is not None:
            lines.append(f"data's own nearest neighbour: median {own['nearest_median']:.4g}, "
                         f"10% quantile {own['nearest_quantiles']['0.1']:.4g}")
    return "\n".join(lines)


def register(sub) -> None:
    """Add ``empirical`` to the ``refflow`` subparsers."""
    p = sub.add_parser("empirical", help="a trained model's distance to the memorising field of a data set",
                       description="Compare a model of refflow train with the exact empirical field (eq 19 with "
                       "q_1 the data set), over t, and measure how near its samples come to training points.")
    p.add_argument("model", help="checkpoint written by refflow train (required)")
    p.add_argument("--data", required=True,
                   help="digits (scikit-learn, extra 'data'), or a .npy/.npz file of shape (N, d) (required)")
    option(p, "--key", default=None, help="array of a .npz holding several")
    option(p, "--times", default="0.1,0.3,0.5,0.7,0.9", help="times t, comma-separated")
    option(p, "--n-query", type=int, default=512, help="points x_t per time")
    option(p, "--samples", type=int, default=1000, help="model samples for the nearest-point distances (0: none)")
    option(p, "--steps", type=int, default=100, help="Euler steps of the sampling")
    option(p, "--block-size", type=int, default=None, help="data rows per block (none: about 32 MiB of logits)")
    option(p, "--dask", action="store_true", help="shard the data over Dask workers (extra 'dask')")
    option(p, "--scheduler", default=None, help="address of a running Dask scheduler (none: a local cluster)")
    option(p, "--workers", type=int, default=2, help="workers of the local Dask cluster")
    option(p, "--seed", type=int, default=0, help="seed of the draws")
    option(p, "--out", default=None, help="JSON report")
    option(p, "--quiet", action="store_true", help="accepted for symmetry; nothing is shown but the table")
    p.set_defaults(func=cmd_empirical)
