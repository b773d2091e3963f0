"""The registry of checks behind ``refflow verify``.

A check is a function ``fn(rng, quick) -> Outcome`` registered with
:func:`register`.  It compares something the code computes with ground truth,
and it also runs a *negative control*: a planted wrong variant that the same
comparison must reject.  A check passes only when the real comparison is
within tolerance **and** the control is not; a check whose control slips
through is reported as failed, because a check that cannot fail proves nothing.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import time
import traceback
import zlib
from typing import Callable

import numpy as np

from refflow._io import jsonable

__all__ = ["Outcome", "CheckResult", "register", "registered", "run_check", "run_checks"]


@dataclasses.dataclass
class Outcome:
    """What a check function returns.

    ``error`` and ``control_error`` are measured on the same scale as
    ``tolerance`` (a relative error, a ``|z|`` score, a slope deviation, ...);
    the comparison passes when ``error <= tolerance``.
    """

    compared: str
    error: float
    tolerance: float
    why: str
    control: str
    control_error: float
    details: dict = dataclasses.field(default_factory=dict)
    figure: object = None
    """A matplotlib Figure for the report, or None."""
    measure: str = ""
    """What ``error`` is, in a few words, for the report's error column: "relative
    error", "max |z|", "|fitted slope - p|", "count of crossing pairs", ... ("" when
    the check does not say; the report then points to ``why``)."""


@dataclasses.dataclass
class CheckResult:
    name: str
    equations: str
    compared: str
    error: float
    tolerance: float
    why: str
    control: str
    control_error: float
    control_caught: bool
    passed: bool
    seconds: float
    seed: int
    details: dict
    message: str = ""
    figure: object = None
    measure: str = ""

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "figure"}
        for key in ("error", "tolerance", "control_error"):
            value = out[key]
            out[key] = None if value is None or not np.isfinite(value) else float(value)
        out["details"] = jsonable(out["details"])
        return out


@dataclasses.dataclass
class _Entry:
    name: str
    equations: str
    fn: Callable
    quick: bool


_REGISTRY: dict[str, _Entry] = {}


def register(name: str, equations: str, quick: bool = False):
    """Decorator: add ``fn(rng, quick) -> Outcome`` to the registry.

    Parameters
    ----------
    name : str
        Unique dotted name, e.g. ``"paths.derivatives"``.
    equations : str
        Equation numbers of the notes that the check verifies, e.g. ``"25-31"``.
    quick : bool
        Whether ``refflow verify --quick`` runs it.
    """

    def decorate(fn):
        if name in _REGISTRY and _REGISTRY[name].fn.__qualname__ != fn.__qualname__:
            raise ValueError(f"check name {name!r} registered twice")
        _REGISTRY[name] = _Entry(name, equations, fn, quick)
        return fn

    return decorate


def _load_all():
    # Importing the check modules fills the registry.
    from refflow.verify import checks  # noqa: F401


def registered(quick: bool = False, only: str | None = None) -> list[_Entry]:
    """The registered checks, in registration order, optionally filtered."""
    _load_all()
    entries = list(_REGISTRY.values())
    if quick:
        entries = [e for e in entries if e.quick]
    if only:
        patterns = [p.strip() for p in only.split(",") if p.strip()]
        entries = [
            e for e in entries
            if any(fnmatch.fnmatch(e.name, p) or p in e.name for p in patterns)
        ]
    return entries


def seed_for(name: str) -> int:
    """A stable seed per check name, so a report is reproducible run to run."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def run_check(entry: _Entry, quick: bool = False) -> CheckResult:
    seed = seed_for(entry.name)
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    try:
        out = entry.fn(rng, quick)
    except Exception as exc:  # a crashing check is a failing check, with its reason
        return CheckResult(
            name=entry.name, equations=entry.equations, compared="(check raised)",
            error=float("nan"), tolerance=float("nan"), why="", control="",
            control_error=float("nan"), control_caught=False, passed=False,
            seconds=time.perf_counter() - start, seed=seed, details={},
            message="".join(traceback.format_exception_only(type(exc), exc)).strip(),
        )
    seconds = time.perf_counter() - start
    ok = bool(np.isfinite(out.error) and out.error <= out.tolerance)
    caught = bool(not (out.control_error <= out.tolerance))  # NaN/inf count as caught
    message = ""
    if not ok:
        message = "measured error exceeds the tolerance"
    elif not caught:
        message = "negative control was NOT caught: the check cannot tell right from wrong"
    return CheckResult(
        name=entry.name, equations=entry.equations, compared=out.compared,
        error=float(out.error), tolerance=float(out.tolerance), why=out.why,
        control=out.control, control_error=float(out.control_error),
        control_caught=caught, passed=ok and caught, seconds=seconds, seed=seed,
        details=out.details, message=message, figure=out.figure, measure=out.measure,
    )


def run_checks(quick: bool = False, only: str | None = None, progress=None) -> list[CheckResult]:
    """Run the selected checks; ``progress(i, total, entry, result)`` is called after each."""
    entries = registered(quick=quick, only=only)
    results = []
    for i, entry in enumerate(entries):
        if progress is not None:
            progress(i, len(entries), entry, None)
        result = run_check(entry, quick=quick)
        results.append(result)
        if progress is not None:
            progress(i, len(entries), entry, result)
    return results
