"""``refflow check``: check another implementation against closed-form ground truth.

``refflow check --kind KIND --impl package.module:function --case NAME``
checks a user's implementation (:mod:`refflow.validate`) and prints the
table; ``refflow check --list`` prints the catalog.  Exit status: 0 when every property passes, 1 when
one fails, 2 for a usage error (bad ``--impl``, unknown case, wrong output
shape from the implementation, an exception raised by it, ...).
"""
from __future__ import annotations

import os
import sys

__all__ = ["register", "cmd_check", "catalog_table"]

_KINDS = ("path", "field", "loglik", "sampler", "guided")


def register(sub) -> None:
    """Add ``check`` to the ``refflow`` subparsers."""
    p = sub.add_parser(
        "check",
        help="check your implementation (path, field, loglik, sampler, guided) against ground truth",
        description="Check an implementation against closed-form ground truth on a catalog case; "
                    "prints one row per property with its error, tolerance, result and likely cause.",
    )
    p.add_argument("--list", action="store_true", help="list the catalog of cases and exit")
    p.add_argument("--kind", choices=_KINDS, help="what the implementation computes")
    p.add_argument("--impl", help="'package.module:function' or 'file.py:function' (cwd is importable)")
    p.add_argument("--case", help="catalog case, e.g. eight-gaussians/ot/sigma_min=0/d=2")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON here")
    p.add_argument("--threshold", type=float, default=None,
                   help="replace the headline tolerance (field: relative L2 error of a trained model; "
                        "sampler: family-wise false-alarm rate)")
    p.add_argument("--seed", type=int, default=0, help="seed of refflow's draws and of the sampler (default 0)")
    p.add_argument("--n", type=int, default=None, help="number of test rows / samples (default per kind)")
    p.add_argument("--batch-size", type=int, default=None, help="call the implementation on at most this many rows")
    p.add_argument("--convention", choices=("auto", "notes", "flow_matching"), default="auto",
                   help="guided: the weighting the implementation claims (default: detect)")
    p.add_argument("--conditional", action="store_true", default=None,
                   help="field: pass labels y as a third argument (default: when the function takes three)")
    p.set_defaults(func=cmd_check)


def catalog_table() -> str:
    """The catalog as a readable table."""
    from refflow.validate import catalog

    header = ("case", "components", "classes", "kinds")
    rows = [(c.name, str(c.target.n_components), str(c.n_classes), ",".join(c.kinds)) for c in catalog()]
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(3)]
    lines = ["  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in [header] + rows]
    return "\n".join(lines)


def _usage_error(message: str) -> int:
    print(f"refflow check: error: {message}", file=sys.stderr)
    return 2


def cmd_check(args) -> int:
    if args.list:
        print(catalog_table())
        return 0
    missing = [f"--{name}" for name in ("kind", "impl", "case") if getattr(args, name) is None]
    if missing:
        return _usage_error(f"{', '.join(missing)} required (or --list)")
    # like `python -m`, make modules in the current folder importable by --impl
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    from refflow.validate import ImplementationError, check

    options = {}
    if args.n is not None:
        options["n"] = args.n
    if args.batch_size is not None and args.kind != "sampler":
        options["batch_size"] = args.batch_size
    if args.kind == "guided":
        options["convention"] = args.convention
    if args.kind == "field" and args.conditional:
        options["conditional"] = True
    try:
        report = check(args.kind, args.impl, args.case, threshold=args.threshold, seed=args.seed, **options)
    except (ValueError, TypeError, ImplementationError) as exc:
        return _usage_error(str(exc))
    print(report.table())
    if args.json:
        report.write_json(args.json)
    return 0 if report.passed else 1
