"""``refflow golden``: write the golden vectors (:mod:`refflow.golden`)."""
from __future__ import annotations

import os
import sys

__all__ = ["register", "cmd_golden"]


def register(sub) -> None:
    """Add ``golden`` to the ``refflow`` subparsers."""
    g = sub.add_parser(
        "golden",
        help="write golden vectors (.npz per case + manifest.json) for implementations in any language",
        description="Write, for each catalog case, an .npz of inputs and closed-form outputs and a "
                    "manifest.json of conventions; the bytes are the same on every run.",
    )
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--case", action="append", default=None,
                   help="only this case (repeatable; default: the whole catalog)")
    g.set_defaults(func=cmd_golden)


def cmd_golden(args) -> int:
    from refflow.golden import write_golden

    try:
        doc = write_golden(args.out, args.case)
    except (ValueError, TypeError) as exc:
        print(f"refflow golden: error: {exc}", file=sys.stderr)
        return 2
    for entry in doc["cases"]:
        print(f"{entry['sha256'][:16]}  {os.path.join(args.out, entry['file'])}")
    print(f"{len(doc['cases'])} cases and manifest.json written to {args.out}")
    return 0
