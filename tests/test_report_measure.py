"""The report's error column says what each error measures (relative error, |z|, a slope miss, a count)."""
import json
import re

from refflow.verify.registry import CheckResult, registered, run_check
from refflow.verify.report import measure_of, write_report


def _result(name, measure):
    return CheckResult(name=name, equations="1", compared="a vs b", error=0.5, tolerance=1.0, why="because",
                       control="planted bug", control_error=2.0, control_caught=True, passed=True, seconds=0.0,
                       seed=0, details={}, measure=measure)


def test_the_report_shows_what_each_error_measures(tmp_path):
    results = [_result("demo.z", "max |z| (Bonferroni threshold)"), _result("demo.silent", "")]
    doc = write_report(results, str(tmp_path))
    html = (tmp_path / "index.html").read_text()
    md = (tmp_path / "report.md").read_text()
    assert "<th>error is</th>" in html
    assert "<td>max |z| (Bonferroni threshold)</td>" in html
    # a check that does not say is pointed to its reasoning, not given a made-up label
    assert "<td>see &#x27;why&#x27;</td>" in html
    # the pipes of |z| must not split the Markdown table's cells
    row = next(line for line in md.splitlines() if line.startswith("| `demo.z`"))
    cells = re.split(r"(?<!\\)\|", row)[1:-1]
    assert len(cells) == 8 and cells[3].strip() == "max \\|z\\| (Bonferroni threshold)"
    assert [c["measure"] for c in doc["checks"]] == ["max |z| (Bonferroni threshold)", ""]
    assert json.loads((tmp_path / "report.json").read_text())["checks"][0]["measure"].startswith("max |z|")


def test_checks_declare_their_measure():
    entries = {e.name: e for e in registered()}
    slope = run_check(entries["solvers.order"], quick=True)
    assert slope.passed and "slope" in measure_of(slope)
    count = run_check(entries["figure2.crossings"], quick=True)
    assert count.passed and measure_of(count) == "count of crossing pairs"
