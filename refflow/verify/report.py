"""Write the verification report: ``index.html`` (self-contained, figures embedded),
``report.md``, ``report.json`` and the figures as PNG files.

Files are written to a temporary name and renamed into place, so a report
folder never holds a partly written file.
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
import platform
import time

import numpy as np

from refflow._io import atomic_write_bytes, atomic_write_text
from refflow.verify.registry import CheckResult

__all__ = ["write_report", "summary_line"]


def _environment() -> dict:
    import numba
    import scipy

    from refflow._provenance import provenance

    return {
        **provenance(),  # refflow's version and git commit
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


def measure_of(r: CheckResult) -> str:
    """What the check's error column measures ("relative error", "max |z|", ...)."""
    return r.measure or "see 'why'"


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return str(v)
    return f"{v:.3g}"


def _markdown(results: list[CheckResult], meta: dict, pngs: dict) -> str:
    lines = [
        "# refflow verification report",
        "",
        f"{summary_line(results)} ({'quick' if meta.get('quick') else 'full'} run, "
        f"{meta['environment']['date']}; refflow {meta['environment']['refflow']}"
        + (f", commit {meta['environment']['commit']}" if meta['environment'].get("commit") else "") + ").",
        "",
        "Each check compares what refflow computes with ground truth, and runs a negative control "
        "(a planted wrong variant) that the same comparison must reject. A check passes when "
        "error <= tolerance and the control's error > tolerance.",
        "",
        "| check | equations | error | error is | tolerance | control error | passed | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| `{r.name}` | {r.equations} | {_fmt(r.error)} | {measure_of(r).replace('|', chr(92) + '|')} | "
            f"{_fmt(r.tolerance)} | "
            f"{_fmt(r.control_error)} | {'yes' if r.passed else '**NO**'} | {r.seconds:.2f} |"
        )
    lines.append("")
    for r in results:
        lines += [
            f"## `{r.name}` (eq {r.equations}): {'passed' if r.passed else 'FAILED'}",
            "",
            f"- compared: {r.compared}",
            f"- error ({measure_of(r)}) {_fmt(r.error)}, tolerance {_fmt(r.tolerance)}: {r.why}",
            f"- negative control: {r.control}; its error {_fmt(r.control_error)} "
            f"({'caught' if r.control_caught else 'NOT caught'})",
            f"- seed {r.seed}, {r.seconds:.2f} s",
        ]
        if r.message:
            lines.append(f"- note: {r.message}")
        if r.name in pngs:
            lines.append(f"\n![{r.name}](figures/{r.name}.png)")
        lines.append("")
    return "\n".join(lines)


def _render_figures(results: list[CheckResult]) -> dict:
    """PNG bytes of each check's figure, by check name; the figures are closed."""
    import matplotlib.pyplot as plt

    pngs = {}
    for r in results:
        if r.figure is None:
            continue
        buf = io.BytesIO()
        try:
            r.figure.savefig(buf, format="png", dpi=100, bbox_inches="tight")
            pngs[r.name] = buf.getvalue()
        finally:
            plt.close(r.figure)
            r.figure = None
    return pngs


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; width: 100%; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.5em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
.pass { color: #146c2e; font-weight: 600; } .fail { color: #b00020; font-weight: 700; }
section.check { border-top: 2px solid #ddd; margin-top: 1.5em; padding-top: 0.5em; }
img { max-width: 100%; border: 1px solid #eee; }
code { background: #f6f6f6; padding: 0 0.2em; }
dt { font-weight: 600; margin-top: 0.4em; } dd { margin-left: 1.2em; }
"""


def _html(results: list[CheckResult], meta: dict, pngs: dict) -> str:
    e = html.escape
    rows = []
    for r in results:
        verdict = '<span class="pass">passed</span>' if r.passed else '<span class="fail">FAILED</span>'
        rows.append(
            f'<tr><td><a href="#{e(r.name)}"><code>{e(r.name)}</code></a></td><td>{e(r.equations)}</td>'
            f"<td>{e(_fmt(r.error))}</td><td>{e(measure_of(r))}</td><td>{e(_fmt(r.tolerance))}</td>"
            f"<td>{e(_fmt(r.control_error))}</td>"
            f"<td>{verdict}</td><td>{r.seconds:.2f}</td></tr>"
        )
    sections = []
    for r in results:
        verdict = '<span class="pass">passed</span>' if r.passed else '<span class="fail">FAILED</span>'
        figure = ""
        if r.name in pngs:
            data = base64.b64encode(pngs[r.name]).decode("ascii")
            figure = f'<figure><img alt="figure of {e(r.name)}" src="data:image/png;base64,{data}"></figure>'
        note = f"<dt>note</dt><dd>{e(r.message)}</dd>" if r.message else ""
        sections.append(
            f'<section class="check" id="{e(r.name)}"><h2><code>{e(r.name)}</code> (eq {e(r.equations)}): '
            f"{verdict}</h2><dl>"
            f"<dt>compared</dt><dd>{e(r.compared)}</dd>"
            f"<dt>error / tolerance</dt><dd>{e(_fmt(r.error))} / {e(_fmt(r.tolerance))} "
            f"(the error is: {e(measure_of(r))})</dd>"
            f"<dt>why this tolerance</dt><dd>{e(r.why)}</dd>"
            f"<dt>negative control</dt><dd>{e(r.control)}: error {e(_fmt(r.control_error))} "
            f"({'caught' if r.control_caught else 'NOT caught'})</dd>"
            f"<dt>seed, time</dt><dd>{r.seed}, {r.seconds:.2f} s</dd>{note}</dl>{figure}</section>"
        )
    env = meta["environment"]
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>refflow verification report</title>"
        f"<style>{_CSS}</style></head><body><h1>refflow verification report</h1>"
        f"<p><strong>{e(summary_line(results))}</strong> ({'quick' if meta.get('quick') else 'full'} run, "
        f"{e(env['date'])}; refflow {e(env['refflow'])}{e(' (commit ' + env['commit'] + ')' if env.get('commit') else '')}, numpy {e(env['numpy'])}, scipy {e(env['scipy'])}, numba {e(env['numba'])}, "
        f"Python {e(env['python'])}).</p>"
        "<p>Each check compares what refflow computes with ground truth and runs a negative control, a planted "
        "wrong variant that the same comparison must reject. A check passes when its error is within the "
        "tolerance and its control's error is not.</p>"
        "<table><tr><th>check</th><th>equations</th><th>error</th><th>error is</th><th>tolerance</th>"
        "<th>control error</th>"
        "<th>result</th><th>seconds</th></tr>" + "".join(rows) + "</table>" + "".join(sections) + "</body></html>"
    )


def write_report(results: list[CheckResult], out_dir: str, json_path: str | None = None,
                 quick: bool = False) -> dict:
    """Write ``index.html``, ``report.md``, ``report.json`` and ``figures/*.png`` into ``out_dir``.

    Returns the JSON document.
    """
    meta = {"quick": quick, "environment": _environment()}
    pngs = _render_figures(results)
    doc = {
        "summary": {"passed": sum(r.passed for r in results), "failed": sum(not r.passed for r in results),
                    "total": len(results)},
        "meta": meta,
        "checks": [
            {**r.to_json(), "figure": f"figures/{r.name}.png" if r.name in pngs else None} for r in results
        ],
    }
    for name, png in pngs.items():
        atomic_write_bytes(os.path.join(out_dir, "figures", f"{name}.png"), png)
    text = json.dumps(doc, indent=2, allow_nan=False)
    atomic_write_text(os.path.join(out_dir, "report.json"), text)
    if json_path:
        atomic_write_text(json_path, text)
    atomic_write_text(os.path.join(out_dir, "report.md"), _markdown(results, meta, pngs))
    atomic_write_text(os.path.join(out_dir, "index.html"), _html(results, meta, pngs))
    return doc
