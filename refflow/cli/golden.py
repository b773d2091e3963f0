"""``refflow golden``: write the golden vectors (:mod:`refflow.golden`).

The output folder is checked before any work; the case files and
``manifest.json`` are written into a temporary folder that then takes the
place of ``--out``, so the folder appears complete or not at all.
"""
from __future__ import annotations

import os

from refflow.cli._common import UsageError, check_output_folder, guarded, option, resolve

__all__ = ["register", "cmd_golden"]


def register(sub) -> None:
    """Add ``golden`` to the ``refflow`` subparsers."""
    g = sub.add_parser(
        "golden",
        help="write golden vectors (.npz per case + manifest.json) for implementations in any language",
        description="Write, for each catalog case, an .npz of inputs and closed-form outputs and a "
                    "manifest.json of conventions; the bytes are the same on every run.",
    )
    g.add_argument("--out", required=True, help="output folder (required)")
    option(g, "--case", action="append", default=None,
           help="only this case (repeatable) (none: the whole catalog)")
    g.set_defaults(func=cmd_golden)


@guarded("golden")
def cmd_golden(args) -> int:
    """Handler of ``refflow golden``: 0 written, 2 bad input (nothing written)."""
    from refflow._io import atomic_folder
    from refflow.golden import write_golden
    from refflow.validate import get_case

    resolve(args)
    check_output_folder("--out", args.out)
    if os.path.isdir(args.out) and os.listdir(args.out) and not os.path.isfile(os.path.join(args.out, "manifest.json")):
        raise UsageError(f"--out: folder {args.out!r} holds other files and no manifest.json; "
                         "choose an empty or new folder (it is replaced as a whole)")
    for name in args.case or ():
        get_case(name)  # an unknown case is refused before anything is written
    with atomic_folder(args.out) as tmp:
        doc = write_golden(tmp, args.case)
    for entry in doc["cases"]:
        print(f"{entry['sha256'][:16]}  {os.path.join(args.out, entry['file'])}")
    print(f"{len(doc['cases'])} cases and manifest.json written to {args.out}")
    return 0
