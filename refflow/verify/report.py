"""Write the verification report: ``report.json`` and ``report.md``.

Files are written to a temporary name and renamed into place, so a report
folder never holds a partly written file.
"""
from __future__ import annotations

import json
import os
import platform
import tempfile
import time

import numpy as np

from refflow.verify.registry import CheckResult

__all__ = ["write_report", "atomic_write_text", "summary_line"]


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and an atomic rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _environment() -> dict:
    import numba
    import scipy

    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "numba": numba.__version__,
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def summary_line(results: list[CheckResult]) -> str:
    passed = sum(r.passed for r in results)
    return f"{passed} passed, {len(results) - passed} failed"


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return str(v)
    return f"{v:.3g}"


def _markdown(results: list[CheckResult], meta: dict) -> str:
    lines = [
        "# refflow verification report",
        "",
        f"{summary_line(results)} ({'quick' if meta.get('quick') else 'full'} run, "
        f"{meta['environment']['date']}).",
        "",
        "Each check compares what refflow computes with ground truth, and runs a negative control "
        "(a planted wrong variant) that the same comparison must reject. A check passes when "
        "error <= tolerance and the control's error > tolerance.",
        "",
        "| check | equations | error | tolerance | control error | passed | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| `{r.name}` | {r.equations} | {_fmt(r.error)} | {_fmt(r.tolerance)} | "
            f"{_fmt(r.control_error)} | {'yes' if r.passed else '**NO**'} | {r.seconds:.2f} |"
        )
    lines.append("")
    for r in results:
        lines += [
            f"## `{r.name}` (eq {r.equations}): {'passed' if r.passed else 'FAILED'}",
            "",
            f"- compared: {r.compared}",
            f"- error {_fmt(r.error)}, tolerance {_fmt(r.tolerance)}: {r.why}",
            f"- negative control: {r.control}; its error {_fmt(r.control_error)} "
            f"({'caught' if r.control_caught else 'NOT caught'})",
            f"- seed {r.seed}, {r.seconds:.2f} s",
        ]
        if r.message:
            lines.append(f"- note: {r.message}")
        lines.append("")
    return "\n".join(lines)


def write_report(results: list[CheckResult], out_dir: str, json_path: str | None = None,
                 quick: bool = False) -> dict:
    """Write ``report.json`` and ``report.md`` into ``out_dir``; return the JSON document."""
    meta = {"quick": quick, "environment": _environment()}
    doc = {
        "summary": {"passed": sum(r.passed for r in results), "failed": sum(not r.passed for r in results),
                    "total": len(results)},
        "meta": meta,
        "checks": [r.to_json() for r in results],
    }
    text = json.dumps(doc, indent=2, allow_nan=False)
    atomic_write_text(os.path.join(out_dir, "report.json"), text)
    if json_path:
        atomic_write_text(json_path, text)
    atomic_write_text(os.path.join(out_dir, "report.md"), _markdown(results, meta))
    return doc
