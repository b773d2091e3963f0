"""A one-line progress display with a rate and an ETA, shared by training, sampling,
the likelihood and the verification checks.

On a terminal the line is redrawn in place (about 100 times in all); in a log
(not a terminal) about ten lines are written, so logs stay short.
"""
from __future__ import annotations

import sys
import time

__all__ = ["Progress", "format_seconds", "nested", "nested_active"]

# The line prefix of an enclosing display (a verification check) that long work inside
# it may extend on a terminal, or None; set by :func:`nested`.
_NESTED: list = []


def format_seconds(seconds: float) -> str:
    """``75.2`` -> ``"1:15"``, ``3725`` -> ``"1:02:05"``."""
    if seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """``Progress(total, "sampling", unit="points")``; ``update(done, note="")`` after each piece."""

    def __init__(self, total: int, label: str, *, unit: str = "steps", stream=None, lines: int | None = None):
        self.total, self.label, self.unit = max(int(total), 0), label, unit
        self.prefix = ""
        if stream is None and _NESTED:
            # Inside an enclosing display: redraw its line with this progress after it.
            self.prefix, stream = _NESTED[-1]
        self.stream = sys.stderr if stream is None else stream
        self.start = time.perf_counter()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.lines = lines if lines is not None else (100 if self.tty else 10)
        self._next = 0
        self._open = False

    def update(self, done: int, note: str = "") -> None:
        """Show ``done`` of ``total`` when a new tenth (hundredth on a terminal) is reached."""
        if done < self._next and done < self.total:
            return
        self._next = done + max(1, self.total // self.lines)
        elapsed = time.perf_counter() - self.start
        rate = done / elapsed if elapsed > 0 else float("inf")
        remaining = (self.total - done) / rate if rate > 0 else float("inf")
        pct = 100.0 * done / self.total if self.total else 100.0
        text = (f"{self.label} {done}/{self.total} {self.unit} ({pct:.0f}%)"
                + (f" {note}" if note else "")
                + f", {rate:.3g} {self.unit}/s, elapsed {format_seconds(elapsed)}, ETA {format_seconds(remaining)}")
        if self.tty:
            self.stream.write("\r" + self.prefix + text + "\x1b[K")
            self._open = True
        elif not self.prefix:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the line on a terminal (or give the enclosing display its line back)."""
        if self._open:
            self.stream.write("\r" + self.prefix + "\x1b[K" if self.prefix else "\n")
            self._open = False
        self.stream.flush()


def nested_active() -> bool:
    """Whether an enclosing display (see :func:`nested`) asks long work to show its progress."""
    return bool(_NESTED)


class nested:
    """``with nested(prefix, stream):`` long work inside (a training) shows its progress after
    ``prefix`` on the same terminal line; in a log (not a terminal) it stays silent."""

    def __init__(self, prefix: str, stream=None):
        self.entry = (prefix, sys.stderr if stream is None else stream)

    def __enter__(self):
        _NESTED.append(self.entry)
        return self

    def __exit__(self, *exc):
        _NESTED.remove(self.entry)
        return False
