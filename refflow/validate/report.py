"""The report of a check: one row per property, as a table and as JSON."""
from __future__ import annotations

import dataclasses
import json

import numpy as np

import refflow
from refflow._io import atomic_write_text, json_float, jsonable
from refflow.validate.causes import CAUSES

__all__ = ["PropertyResult", "CheckReport"]


@dataclasses.dataclass
class PropertyResult:
    """One row of a :class:`CheckReport`.

    Attributes
    ----------
    name : str
        Short name, e.g. ``"u_t"``.
    compared : str
        What was compared with what (equation numbers of the notes).
    error : float
        The measured error, on the scale of ``tolerance``.
    tolerance : float or None
        The pass rule is ``error <= tolerance``; None for a reported-only row.
    passed : bool or None
        None for a reported-only row (it neither passes nor fails the check).
    causes : list of str
        Keys of :data:`CAUSES` the output matches, best first (failures only).
    details : dict
        Extra numbers (JSON-able).
    note : str
        A remark shown in the table where no cause is named (e.g. the
        detected guidance convention).
    """

    name: str
    compared: str
    error: float
    tolerance: float | None
    passed: bool | None
    causes: list = dataclasses.field(default_factory=list)
    details: dict = dataclasses.field(default_factory=dict)
    note: str = ""

    @property
    def likely_cause(self) -> str:
        """The named likely causes, in words ("" when none)."""
        return "; or ".join(CAUSES[c] for c in self.causes)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "compared": self.compared,
            "error": json_float(self.error),
            "tolerance": None if self.tolerance is None else json_float(self.tolerance),
            "passed": self.passed,
            "causes": list(self.causes),
            "likely_cause": self.likely_cause,
            "note": self.note,
            "details": jsonable(self.details),
        }


@dataclasses.dataclass
class CheckReport:
    """The outcome of :func:`check`: one :class:`PropertyResult` per property.

    ``passed`` is true when no judged property failed.  ``report["u_t"]``
    returns the property of that name; :meth:`table` renders the readable
    table, :meth:`to_json` the JSON document of ``refflow check --json``.
    """

    kind: str
    case: str
    impl: str
    properties: list
    settings: dict = dataclasses.field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(p.passed is not False for p in self.properties)

    @property
    def failed(self) -> list:
        """The properties that failed."""
        return [p for p in self.properties if p.passed is False]

    def __getitem__(self, name: str) -> PropertyResult:
        for p in self.properties:
            if p.name == name:
                return p
        raise KeyError(f"name: expected one of {[p.name for p in self.properties]}, got {name!r}")

    def to_json(self) -> dict:
        return {
            "refflow_version": refflow.__version__,
            "kind": self.kind,
            "case": self.case,
            "impl": self.impl,
            "passed": self.passed,
            "settings": jsonable(self.settings),
            "properties": [p.to_json() for p in self.properties],
        }

    def write_json(self, path: str) -> None:
        """Write :meth:`to_json` to ``path`` atomically (temporary file, then rename)."""
        atomic_write_text(path, json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n")

    def table(self) -> str:
        """The readable report: a header, one row per property, then what each compared."""
        lines = [f"refflow check  kind={self.kind}  case={self.case}", f"impl: {self.impl}"]
        if self.settings:
            lines.append("settings: " + ", ".join(f"{k}={v}" for k, v in self.settings.items()))
        lines.append("")
        header = ("property", "error", "tolerance", "result", "likely cause / note")
        rows = []
        for p in self.properties:
            result = "-" if p.passed is None else ("pass" if p.passed else "FAIL")
            tol = "-" if p.tolerance is None else f"{p.tolerance:.3g}"
            cause = "; or ".join(c.replace("_", " ") for c in p.causes) or p.note
            rows.append((p.name, _fmt_err(p.error), tol, result, cause))
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
        for r in [header] + rows:
            lines.append("  " + "  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4])
        lines.append("")
        for p in self.properties:
            lines.append(f"  {p.name}: {p.compared}")
            if "stderr" in p.details:
                lines.append(f"      standard error of the estimate: {p.details['stderr']:.2g}")
            if "tolerance_rule" in p.details:
                lines.append(f"      tolerance: {p.details['tolerance_rule']}")
            if p.details.get("nonfinite_rows"):
                lines.append(f"      non-finite rows: {p.details['nonfinite_rows']} "
                             f"(at t = {', '.join(f'{v:.6g}' for v in p.details.get('nonfinite_at_t', []))})")
            if p.details.get("worst_t") is not None and "worst_error" in p.details and p.passed is False:
                lines.append(f"      worst row: t = {p.details['worst_t']:.9g}, error {p.details['worst_error']:.3g} "
                             f"against its bound {p.details['worst_bound']:.3g}")
            if "by_t_ci" in p.details:  # the curve over t with 95% intervals (refflow.validate.effects)
                lines.append("      by t (95% interval): " + ", ".join(
                    f"{k} {v[0]:.2g} [{v[2]:.2g}, {v[3]:.2g}]" for k, v in p.details["by_t_ci"].items()))
            elif "by_t" in p.details:
                lines.append("      by t: " + ", ".join(f"{k} {v:.2g}" for k, v in p.details["by_t"].items()))
            if p.causes:
                for c in p.causes:
                    lines.append(f"      likely cause ({c}): {CAUSES[c]}")
        n_fail = len(self.failed)
        judged = sum(p.passed is not None for p in self.properties)
        lines.append("")
        lines.append("PASSED" if self.passed else f"FAILED: {n_fail} of {judged} properties")
        return "\n".join(lines)


def _fmt_err(v: float) -> str:
    if not np.isfinite(v):
        return str(v)
    return f"{v:.3g}"

