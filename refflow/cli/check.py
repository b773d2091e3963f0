"""``refflow check``: check another implementation against closed-form ground truth.

``refflow check --kind KIND --impl package.module:function --case NAME``
checks a user's implementation (:mod:`refflow.validate`) and prints the
table; ``refflow check --list`` prints the catalog.  Exit status: 0 when every
property passes, 1 when one fails or the implementation itself fails (it
raised, returned a wrong shape or type, exited, crashed, or ran past
``--timeout``: one line ``FAILED: <why>`` on stdout), 2 for a usage error
(bad ``--impl``, unknown case, bad option value, an unwritable ``--json``
path: one line on stderr).  The command never exits 0 without printing its
verdict.
"""
from __future__ import annotations

import inspect
import os
import sys

from refflow.cli._common import (EXIT_INTERRUPTED, UsageError, check_float, check_int, check_output_file,
                                 one_line, option, refuse_unless, resolve)

__all__ = ["register", "cmd_check", "catalog_table"]

_KINDS = ("path", "field", "loglik", "sampler", "guided", "coupling")


def register(sub) -> None:
    """Add ``check`` to the ``refflow`` subparsers."""
    p = sub.add_parser(
        "check",
        help="check your implementation (path, field, loglik, sampler, guided, coupling) against ground truth",
        description="Check an implementation against closed-form ground truth on a catalog case; "
                    "prints one row per property with its error, tolerance, result and likely cause.",
    )
    option(p, "--list", action="store_true", help="list the catalog of cases and exit")
    option(p, "--kind", choices=_KINDS, help="what the implementation computes (required unless --list)")
    option(p, "--impl", help="'package.module:function' or 'file.py:function' (cwd is importable) "
                             "(required unless --list)")
    option(p, "--case", help="catalog case, e.g. eight-gaussians/ot/sigma_min=0/d=2 (required unless --list)")
    option(p, "--json", default=None, metavar="PATH", help="also write the report as JSON here")
    option(p, "--threshold", type=float, default=None,
           help="replace the headline tolerance (field: relative L2 error of a trained model; "
                "sampler: family-wise false-alarm rate) (none: the kind's own)")
    option(p, "--seed", type=int, default=0, help="seed of refflow's draws and of the sampler")
    option(p, "--n", type=int, default=None, help="number of test rows / samples (none: per kind)")
    option(p, "--batch-size", type=int, default=None,
           help="call the implementation on at most this many rows (none: all at once)")
    option(p, "--convention", choices=("auto", "notes", "flow_matching"), default="auto",
           help="guided: the weighting the implementation claims (auto: detect)")
    option(p, "--conditional", action="store_true",
           help="field: pass labels y as a third argument (when off: when the function takes three)")
    option(p, "--method", choices=("exact", "sinkhorn"), default=None,
           help="coupling: exact OT (default) or entropic OT (sinkhorn, with --reg)")
    option(p, "--reg", type=float, default=None, help="coupling, sinkhorn: the entropic regularisation epsilon")
    option(p, "--case-file", default=None, metavar="PATH",
           help="a case of your own instead of --case: .json or .npz written by Case.to_json / Case.save_npz")
    option(p, "--adapter", choices=("none", "auto", "torch", "jax", "flow_matching", "torchcfm"), default="none",
           help="wrap --impl first (refflow.adapters): a torch nn.Module, a flow_matching AffineProbPath, "
                "a TorchCFM matcher, a JAX function; auto: recognise them (none: call --impl as it is)")
    option(p, "--max-gap", type=float, default=None,
           help="sampler, trained model: largest mean log-likelihood gap in nats (none: exact tests)")
    option(p, "--max-energy", type=float, default=None,
           help="sampler, trained model: largest energy distance (none: exact tests)")
    option(p, "--max-weight-error", type=float, default=None,
           help="sampler, trained model: largest error of a component's weight (none: exact tests)")
    option(p, "--timeout", type=float, default=600.0,
           help="seconds the implementation may run, in a child process (0: no limit, in this process)")
    p.set_defaults(func=cmd_check)


def catalog_table() -> str:
    """The catalog as a readable table."""
    from refflow.validate import catalog, interpolant_catalog

    header = ("case", "components", "classes", "kinds")
    rows = [(c.name, str(c.target.n_components), str(c.n_classes), ",".join(c.kinds)) for c in catalog() + interpolant_catalog()]
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(3)]
    lines = ["  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in [header] + rows]
    return "\n".join(lines)


def _usage_error(message: str) -> int:
    print(f"refflow check: error: {one_line(message)}", file=sys.stderr)
    return 2


def cmd_check(args) -> int:
    """Handler of ``refflow check``: 0 passed, 1 failed (or the implementation failed), 2 usage error."""
    try:
        return _run(args)
    except UsageError as exc:
        return _usage_error(str(exc))
    except KeyboardInterrupt:
        print("refflow check: interrupted; nothing written", file=sys.stderr)
        return EXIT_INTERRUPTED


def _run(args) -> int:
    given = resolve(args)
    if args.list:
        for dest in given:
            refuse_unless(given, dest, dest == "list", "does not apply with --list")
        print(catalog_table())
        return 0
    missing = [f"--{name}" for name in ("kind", "impl", "case") if getattr(args, name) is None
               and not (name == "case" and args.case_file is not None)]
    if args.case is not None and args.case_file is not None:
        return _usage_error("--case and --case-file: give one of them, not both")
    if missing:
        return _usage_error(f"{', '.join(missing)} required (or --list)")
    check_output_file("--json", args.json)
    check_float("--timeout", args.timeout, 0.0)
    check_int("--n", args.n, 1)
    check_int("--batch-size", args.batch_size, 1)
    check_int("--seed", args.seed, 0)
    refuse_unless(given, "convention", args.kind == "guided", "applies only to --kind guided")
    refuse_unless(given, "conditional", args.kind == "field", "applies only to --kind field")
    refuse_unless(given, "batch_size", args.kind not in ("sampler", "coupling"), f"does not apply to --kind {args.kind}")
    refuse_unless(given, "method", args.kind == "coupling", "applies only to --kind coupling")
    refuse_unless(given, "reg", args.kind == "coupling", "applies only to --kind coupling")
    for dest in ("max_gap", "max_energy", "max_weight_error"):
        refuse_unless(given, dest, args.kind == "sampler", "applies only to --kind sampler")
        if getattr(args, dest) is not None:
            check_float("--" + dest.replace("_", "-"), getattr(args, dest), 0.0)
    # like `python -m`, make modules in the current folder importable by --impl
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    from refflow.validate import ImplementationError, check

    options = {}
    if args.n is not None:
        options["n"] = args.n
    if args.batch_size is not None:
        options["batch_size"] = args.batch_size
    if args.kind == "guided":
        options["convention"] = args.convention
    if args.kind == "field" and args.conditional:
        options["conditional"] = True
    if args.method is not None:
        options["method"] = args.method
    if args.reg is not None:
        options["reg"] = args.reg
    for dest in ("max_gap", "max_energy", "max_weight_error"):
        if getattr(args, dest) is not None:
            options[dest] = getattr(args, dest)
    impl, case = args.impl, args.case
    try:
        if args.case_file is not None:
            from refflow.validate import load_case_file

            case = load_case_file(args.case_file)
        if args.adapter != "none":
            from refflow.adapters import adapt
            from refflow.validate.calling import load_impl

            impl = adapt(load_impl(args.impl, require_callable=False), args.kind, args.adapter)
    except (ValueError, TypeError, ImportError) as exc:
        return _usage_error(str(exc))
    if "timeout" in inspect.signature(check).parameters:
        options["timeout"] = args.timeout if args.timeout > 0 else None
    try:
        report = check(args.kind, impl, case, threshold=args.threshold, seed=args.seed, **options)
    except ImplementationError as exc:
        # The implementation's failure, not the user's usage: a verdict, exit 1.
        print(f"FAILED: {one_line(exc)}")
        return 1
    except SystemExit as exc:  # the implementation called sys.exit in this process (--timeout 0)
        print(f"FAILED: impl: the implementation called sys.exit({exc.code!r})")
        return 1
    except (ValueError, TypeError) as exc:
        return _usage_error(str(exc))
    print(report.table())
    if args.json:
        report.write_json(args.json)
    return 0 if report.passed else 1
