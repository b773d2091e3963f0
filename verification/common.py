"""Shared by the verification scripts: a table of comparisons, the registered checks, the exit code.

Every script prints two tables:

1. its own core computation, written out in a few lines of NumPy with the
   public API (``import refflow``), each row a comparison with its error,
   its tolerance and PASS/FAIL, followed by a negative control (a planted
   wrong variant that must be CAUGHT, i.e. exceed the same tolerance);
2. the registered checks of the same identity (``refflow verify`` runs them
   too), with their controls.

The script exits with status 1 when any comparison fails or any control is
missed, 0 otherwise.  ``--quick`` (or ``REFFLOW_VERIFY_QUICK=1``) runs the
registered checks in their quick form.
"""
from __future__ import annotations

import argparse
import os
import sys

from refflow.verify.registry import registered, run_check

__all__ = ["Table", "parse_args", "run_registered", "finish"]


class Table:
    """Rows of (what, error, tolerance, verdict); a control row passes when its error EXCEEDS the tolerance."""

    def __init__(self, title):
        self.title = title
        self.rows = []

    def compare(self, what, error, tolerance):
        """A comparison: PASS when ``error <= tolerance``."""
        ok = bool(error <= tolerance)
        self.rows.append((what, float(error), float(tolerance), "PASS" if ok else "FAIL", ok))
        return ok

    def control(self, what, error, tolerance):
        """A negative control: CAUGHT when ``error > tolerance`` (NaN and inf count as caught)."""
        caught = not bool(error <= tolerance)
        self.rows.append(("control: " + what, float(error), float(tolerance),
                          "CAUGHT" if caught else "MISSED", caught))
        return caught

    @property
    def ok(self):
        return all(row[4] for row in self.rows)

    def print(self, stream=None):
        stream = stream or sys.stdout
        width = max([len(r[0]) for r in self.rows] + [len("what")])
        width = min(width, 78)
        print(f"\n{self.title}", file=stream)
        print(f"{'what':<{width}}  {'error':>10}  {'tolerance':>10}  verdict", file=stream)
        print("-" * (width + 34), file=stream)
        for what, error, tol, verdict, _ in self.rows:
            if len(what) > width:
                what = what[:width - 3] + "..."
            print(f"{what:<{width}}  {error:>10.3g}  {tol:>10.3g}  {verdict}", file=stream)


def parse_args(description):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true",
                        help="run the registered checks in their quick form (also REFFLOW_VERIFY_QUICK=1)")
    parser.add_argument("--out", default=None, help="where to write a figure, for the scripts that draw one")
    args = parser.parse_args()
    args.quick = args.quick or os.environ.get("REFFLOW_VERIFY_QUICK", "") not in ("", "0")
    return args


def run_registered(names, quick):
    """Run the registered checks called ``names`` (in that order); returns a :class:`Table`."""
    by_name = {entry.name: entry for entry in registered()}
    missing = [name for name in names if name not in by_name]
    if missing:
        raise SystemExit(f"not registered: {missing}")
    table = Table("Registered checks (refflow verify" + (" --quick)" if quick else ")"))
    for name in names:
        result = run_check(by_name[name], quick=quick)
        label = f"{name} (eq {result.equations})"
        if result.message and not result.tolerance == result.tolerance:  # the check raised
            table.rows.append((label + ": " + result.message, float("nan"), float("nan"), "FAIL", False))
            continue
        table.compare(label, result.error, result.tolerance)
        table.control(f"{name}: {result.control}", result.control_error, result.tolerance)
    return table


def finish(*tables):
    """Print the tables and return the exit status (0 when every row passed)."""
    for table in tables:
        table.print()
    ok = all(table.ok for table in tables)
    print("\nALL PASS" if ok else "\nFAILED", flush=True)
    return 0 if ok else 1
