"""What every subcommand shares: output-path checks, one-line errors, progress.

A usage error (bad flag value, unreadable input, an output path that cannot be
written) is reported on one line of stderr, ``refflow <command>: error: ...``,
with exit status 2, before any work is done and without writing anything.
"""
from __future__ import annotations

import functools
import os
import sys

__all__ = ["UsageError", "guarded", "check_output_file", "check_output_folder", "check_input_file",
           "option", "resolve", "refuse_unless", "one_line", "check_int", "check_float", "progress",
           "default_batch_size", "available_memory", "EXIT_INTERRUPTED"]

# The shell's convention for a run stopped by SIGINT (128 + 2).
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A problem with the command's inputs: one line on stderr, exit status 2."""


def check_output_file(flag: str, path, *, suffix: str | None = None) -> None:
    """Refuse an output file path that cannot be written, before any work.

    The path must not be a folder, and its folder must exist and be writable.
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
    _check_folder_writable(flag, os.path.dirname(os.path.abspath(path)), path)


def check_output_folder(flag: str, path) -> None:
    """Refuse an output folder that cannot be created or written, before any work.

    The folder itself may be new; the folder above it must exist.
    """
    if path is None:
        return
    path = os.fspath(path)
    if not path:
        raise UsageError(f"{flag}: expected a folder name, got {path!r}")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag}: {path!r} is a file, expected a folder")
    _check_folder_writable(flag, os.path.dirname(os.path.abspath(path)), path)
    if os.path.isdir(path) and not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"{flag}: folder {path!r} is not writable")


def _check_folder_writable(flag: str, folder: str, path: str) -> None:
    # The folder that will hold the output must exist (nothing is created on a typo's
    # behalf) and be writable; a file where a folder should be is named.
    probe = folder
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UsageError(f"{flag}: {probe!r} is a file, so {path!r} cannot be written under it")
    if probe != folder:
        raise UsageError(f"{flag}: folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{flag}: folder {folder!r} is not writable")


def check_input_file(flag: str, path) -> None:
    """Refuse an input path that is not an existing, readable file."""
    if path is None:
        return
    if os.path.isdir(path):
        raise UsageError(f"{flag}: {path!r} is a folder, expected a file")
    if not os.path.isfile(path):
        raise UsageError(f"{flag}: {path!r} does not exist")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{flag}: {path!r} is not readable")


def _shown(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "off" if value is False else "on"
    return repr(value) if isinstance(value, float) else str(value)


def option(parser, *flags, default=None, help: str = "", **kwargs):
    """``parser.add_argument`` whose help ends with the default, and whose use is recorded.

    The argument's value stays None when the flag is not given;
    :func:`resolve` then fills in ``default`` and returns the flags that were
    given, so a command can refuse a flag that does not apply to the options
    chosen instead of silently ignoring it.
    """
    defaults = parser.get_default("_defaults")
    if defaults is None:
        defaults = {}
        parser.set_defaults(_defaults=defaults)
    if kwargs.get("action") == "store_true":
        kwargs["default"] = None
        text = f"{help} (default: off)"
    else:
        text = f"{help} (default: {_shown(default)})"
    action = parser.add_argument(*flags, help=text.strip(), **({"default": None} | kwargs))
    defaults[action.dest] = (default if kwargs.get("action") != "store_true" else False,
                             max(action.option_strings, key=len))
    return action


def resolve(args) -> dict:
    """Fill in the defaults of :func:`option` flags not given; returns ``{dest: flag}`` of those given."""
    given = {}
    for dest, (default, flag) in (getattr(args, "_defaults", None) or {}).items():
        if getattr(args, dest) is None:
            setattr(args, dest, default)
        else:
            given[dest] = flag
    return given


def refuse_unless(given: dict, dest: str, condition: bool, why: str) -> None:
    """A flag given where it does not apply is an error: ``--sigma-min: applies only to ...``."""
    if dest in given and not condition:
        raise UsageError(f"{given[dest]}: {why}")


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
            except KeyboardInterrupt:
                # Outputs are written atomically: an interrupted command leaves none behind.
                print(f"refflow {command}: interrupted; nothing written", file=sys.stderr)
                return EXIT_INTERRUPTED

        return run

    return decorate


def one_line(exc: BaseException) -> str:
    """The exception's message on one line."""
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def available_memory() -> int:
    """Bytes of memory available to new allocations (MemAvailable on Linux; 2 GiB if unknown)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 2 << 30


def default_batch_size(bytes_per_point: int, *, budget: int = 256 << 20, low: int = 256, high: int = 65536) -> int:
    """Points per batch so that one batch's working memory stays within ``budget`` bytes
    and within an eighth of the available memory."""
    budget = min(budget, available_memory() // 8)
    return int(min(high, max(low, budget // max(int(bytes_per_point), 1))))


def check_int(flag: str, value, low: int) -> int:
    """An integer flag's value must be at least ``low``."""
    if value is not None and value < low:
        raise UsageError(f"{flag}: expected an integer >= {low}, got {value!r}")
    return value


def check_float(flag: str, value, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False):
    """A float flag's value must be finite and inside the interval; the message shows it exactly."""
    import math

    if value is None:
        return value
    ok = math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "-inf" if low is None else repr(low)
        hi = "inf" if high is None else repr(high)
        interval = ("(" if low_open or low is None else "[") + f"{lo}, {hi}" + (")" if high_open or high is None else "]")
        raise UsageError(f"{flag}: expected a finite value in {interval}, got {value!r}")
    return value


def progress(total: int, label: str, unit: str, quiet: bool):
    """A :class:`refflow._progress.Progress` on stderr, or None when ``quiet``."""
    if quiet:
        return None
    from refflow._progress import Progress

    return Progress(total, label, unit=unit)
