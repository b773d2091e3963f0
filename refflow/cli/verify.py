"""``refflow verify``: run the registered checks and write the report."""
from __future__ import annotations

import sys

from refflow.cli._common import guarded

__all__ = ["register", "cmd_verify"]


def _progress(stream):
    def show(i, total, entry, result):
        if result is None:
            stream.write(f"[{i + 1}/{total}] {entry.name} (eq {entry.equations}) ... ")
            stream.flush()
            return
        verdict = "ok" if result.passed else "FAILED"
        stream.write(f"{verdict} ({result.seconds:.1f} s)\n")
        if not result.passed and result.message:
            stream.write(f"      {result.message}\n")
        stream.flush()

    return show


@guarded("verify")
def cmd_verify(args) -> int:
    """Handler of ``refflow verify``: 0 when every check passes, 1 when one fails, 2 for bad input."""
    from refflow.verify.registry import registered, run_checks
    from refflow.verify.report import summary_line, write_report

    if not registered(quick=args.quick, only=args.only):
        print(f"refflow verify: --only {args.only!r} matches no check", file=sys.stderr)
        return 2
    results = run_checks(quick=args.quick, only=args.only, progress=_progress(sys.stderr))
    write_report(results, args.out, json_path=args.json, quick=args.quick)
    print(f"{summary_line(results)}; report in {args.out}/report.md")
    return 0 if all(r.passed for r in results) else 1


def register(sub) -> None:
    """Add ``verify`` to the ``refflow`` subparsers."""
    p = sub.add_parser("verify", help="run the verification checks and write the report")
    p.add_argument("--quick", action="store_true", help="run the quick subset (under a minute)")
    p.add_argument("--out", default="refflow-report", help="report folder (default: refflow-report)")
    p.add_argument("--json", default=None, help="also write the JSON report to this path")
    p.add_argument("--only", default=None, help="comma-separated name patterns (glob or substring)")
    p.set_defaults(func=cmd_verify)
