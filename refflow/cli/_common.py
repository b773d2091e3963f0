"""What every subcommand shares: output-path checks, one-line errors, progress.

A usage error (bad flag value, unreadable input, an output path that cannot be
written) is reported on one line of stderr, ``refflow <command>: error: ...``,
with exit status 2, before any work is done and without writing anything.
"""
from __future__ import annotations

import functools
import os
import sys

__all__ = ["UsageError", "guarded", "check_output_file", "check_output_folder"]


class UsageError(Exception):
    """A problem with the command's inputs: one line on stderr, exit status 2."""


def check_output_file(flag: str, path, *, suffix: str | None = None) -> None:
    """Refuse an output file path that cannot be written, before any work.

    The path must not be a folder, its folder must exist (or be creatable:
    no part of it may be an existing file), and it must be writable.
    """
    if path is None:
        return
    path = os.fspath(path)
    if not path:
        raise UsageError(f"{flag}: expected a file name, got {path!r}")
    if suffix is not None and not path.lower().endswith(suffix):
        raise UsageError(f"{flag}: expected a {suffix} file name, got {path!r}")
    if os.path.isdir(path):
        raise UsageError(f"{flag}: {path!r} is a folder, expected a file name")
    _check_folder_writable(flag, os.path.dirname(os.path.abspath(path)))


def check_output_folder(flag: str, path) -> None:
    """Refuse an output folder that cannot be created or written, before any work."""
    if path is None:
        return
    path = os.fspath(path)
    if not path:
        raise UsageError(f"{flag}: expected a folder name, got {path!r}")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag}: {path!r} is a file, expected a folder")
    _check_folder_writable(flag, os.path.abspath(path))


def _check_folder_writable(flag: str, folder: str) -> None:
    # Walk up to the first part that exists: it must be a writable folder.
    probe = folder
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise UsageError(f"{flag}: {probe!r} is a file, so {folder!r} cannot be a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{flag}: folder {probe!r} is not writable")


def guarded(command: str):
    """Decorate a handler ``fn(args) -> int``: usage errors become one line and exit 2."""

    def decorate(fn):
        @functools.wraps(fn)
        def run(args):
            try:
                return fn(args)
            except (UsageError, ValueError, TypeError, FileNotFoundError) as exc:
                print(f"refflow {command}: error: {one_line(exc)}", file=sys.stderr)
                return 2

        return run

    return decorate


def one_line(exc: BaseException) -> str:
    """The exception's message on one line."""
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())
