"""The ``refflow`` command.

One module per subcommand (``verify``, ``train``, ``sample``, ``likelihood``,
``check``, ``golden``), each exposing ``register(subparsers)`` and its
handler; :mod:`refflow.cli._common` holds what they share (output-path checks,
one-line errors, progress).
"""
from __future__ import annotations

import argparse
import importlib

__all__ = ["main", "build_parser"]

# The subcommands, in the order ``refflow --help`` lists them.
_SUBCOMMANDS = ("verify", "train", "sample", "likelihood", "check", "golden", "empirical")


def build_parser() -> argparse.ArgumentParser:
    """The ``refflow`` argument parser with every subcommand."""
    from refflow import __version__

    parser = argparse.ArgumentParser(
        prog="refflow",
        description="A float64 reference implementation of flow matching, checked against closed-form ground truth.",
    )
    parser.add_argument("--version", action="version", version=f"refflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _SUBCOMMANDS:
        importlib.import_module(f"refflow.cli.{name}").register(sub)
    return parser


def main(argv=None) -> int:
    """Run ``refflow`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)
