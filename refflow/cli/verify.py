"""``refflow verify``: run the registered checks and write the report.

``--out`` and ``--json`` are checked before the first check runs.  The
report folder is written under a temporary name and then takes the place of
``--out``, so it appears complete or not at all (and ``--json`` with it).
"""
from __future__ import annotations

import os
import sys
import time

from refflow.cli._common import check_output_file, check_output_folder, guarded, option, resolve

__all__ = ["register", "cmd_verify"]


def _progress(stream):
    """The progress callback of :func:`refflow.verify.registry.run_checks`: one line per check,
    with an ETA; on a terminal a training inside a check shows its own progress on that line."""
    from refflow._progress import format_seconds, nested

    start = time.perf_counter()
    inner = []

    def show(i, total, entry, result):
        if result is None:
            elapsed = time.perf_counter() - start
            eta = f", ETA {format_seconds(elapsed / i * (total - i))}" if i else ""
            line = f"[{i + 1}/{total}{eta}] {entry.name} (eq {entry.equations}) ... "
            stream.write(line)
            stream.flush()
            inner.append(nested(line, stream).__enter__())
            return
        while inner:
            inner.pop().__exit__(None, None, None)
        verdict = "ok" if result.passed else "FAILED"
        stream.write(f"{verdict} ({result.seconds:.1f} s)\n")
        if not result.passed and result.message:
            stream.write(f"      {result.message}\n")
        stream.flush()

    return show


@guarded("verify")
def cmd_verify(args) -> int:
    """Handler of ``refflow verify``: 0 when every check passes, 1 when one fails, 2 for bad input."""
    from refflow._io import atomic_folder, atomic_write_bytes
    from refflow.verify.registry import registered, run_checks
    from refflow.verify.report import summary_line, write_report

    resolve(args)
    check_output_folder("--out", args.out)
    check_output_file("--json", args.json)
    if args.json and os.path.abspath(os.path.dirname(os.path.abspath(args.json))).startswith(
            os.path.abspath(args.out) + os.sep):
        print(f"refflow verify: error: --json: {args.json!r} lies inside --out {args.out!r}, which is replaced "
              "as a whole; the report's own report.json is there already", file=sys.stderr)
        return 2
    if not registered(quick=args.quick, only=args.only):
        print(f"refflow verify: error: --only {args.only!r} matches no check", file=sys.stderr)
        return 2
    results = run_checks(quick=args.quick, only=args.only, progress=None if args.quiet else _progress(sys.stderr))
    with atomic_folder(args.out) as tmp:
        write_report(results, tmp, quick=args.quick)
        if args.json:
            with open(os.path.join(tmp, "report.json"), "rb") as fh:
                atomic_write_bytes(args.json, fh.read())
    print(f"{summary_line(results)}; report in {os.path.join(args.out, 'report.md')}")
    return 0 if all(r.passed for r in results) else 1


def register(sub) -> None:
    """Add ``verify`` to the ``refflow`` subparsers."""
    p = sub.add_parser("verify", help="run the verification checks and write the report")
    option(p, "--quick", action="store_true", help="run the quick subset (under a minute)")
    option(p, "--out", default="refflow-report", help="report folder (replaced as a whole)")
    option(p, "--json", default=None, help="also write the JSON report to this path")
    option(p, "--only", default=None, help="comma-separated name patterns (glob or substring) (none: all)")
    option(p, "--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_verify)
