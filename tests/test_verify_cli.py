"""Tests of the verify registry, the report and the `refflow verify` command."""
import json
import subprocess
import sys

import pytest

from refflow import cli
from refflow.verify import registry
from refflow.verify.registry import Outcome


@pytest.fixture
def planted(monkeypatch):
    """Add two planted checks: one whose control slips through, one that raises."""
    entries = dict(registry._REGISTRY)

    def blind(rng, quick):
        return Outcome("x", error=0.0, tolerance=1.0, why="", control="same as x", control_error=0.5)

    def broken(rng, quick):
        raise RuntimeError("boom")

    entries["zz.blind"] = registry._Entry("zz.blind", "0", blind, True)
    entries["zz.broken"] = registry._Entry("zz.broken", "0", broken, True)
    registry._load_all()
    monkeypatch.setattr(registry, "_REGISTRY", {**registry._REGISTRY, **entries})


def test_a_check_that_cannot_fail_is_reported_failed(planted):
    (entry,) = registry.registered(only="zz.blind")
    result = registry.run_check(entry)
    assert result.error <= result.tolerance
    assert not result.control_caught
    assert not result.passed
    assert "NOT caught" in result.message


def test_a_check_that_raises_is_reported_failed(planted):
    (entry,) = registry.registered(only="zz.broken")
    result = registry.run_check(entry)
    assert not result.passed and "boom" in result.message


def test_verify_exits_nonzero_on_failure(planted, tmp_path, capsys):
    code = cli.main(["verify", "--only", "zz.*", "--out", str(tmp_path / "r")])
    assert code == 1
    doc = json.loads((tmp_path / "r" / "report.json").read_text())
    assert [c["passed"] for c in doc["checks"]] == [False, False]


def test_verify_writes_report_schema(tmp_path):
    out = tmp_path / "report"
    extra = tmp_path / "copy.json"
    code = cli.main(["verify", "--only", "paths.*", "--out", str(out), "--json", str(extra)])
    assert code == 0
    doc = json.loads((out / "report.json").read_text())
    assert json.loads(extra.read_text()) == doc
    assert len(doc["checks"]) == 5  # paths.* : three identity checks, the density, the refusals
    for check in doc["checks"]:
        for key in ("name", "equations", "passed", "error", "tolerance", "seconds"):
            assert key in check
        assert isinstance(check["passed"], bool) and check["passed"]
        assert check["error"] <= check["tolerance"] < check["control_error"]
    md = (out / "report.md").read_text()
    assert all(f"`{c['name']}`" in md for c in doc["checks"])
    # no temporary files left behind
    assert sorted(p.name for p in out.iterdir()) == ["figures", "index.html", "report.json", "report.md"]
    assert sorted(p.name for p in (out / "figures").iterdir()) == ["paths.derivatives.png"]


def test_only_matching_nothing_is_an_error(tmp_path, capsys):
    assert cli.main(["verify", "--only", "no-such-check", "--out", str(tmp_path)]) == 2
    assert "matches no check" in capsys.readouterr().err


def test_seeds_are_stable_and_reports_reproducible():
    (entry,) = registry.registered(only="targets.sampling")
    a = registry.run_check(entry, quick=True)
    b = registry.run_check(entry, quick=True)
    assert a.seed == b.seed == registry.seed_for("targets.sampling")
    assert a.error == b.error and a.control_error == b.control_error


def test_console_script_runs():
    proc = subprocess.run([sys.executable, "-m", "refflow.cli", "verify", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--quick" in proc.stdout


def test_every_check_has_equations_and_is_named_uniquely():
    entries = registry.registered()
    names = [e.name for e in entries]
    assert len(names) == len(set(names))
    assert all(e.equations for e in entries)
    assert any(e.quick for e in entries)


def test_html_report_holds_every_check_and_figure(tmp_path):
    from html.parser import HTMLParser

    out = tmp_path / "r"
    assert cli.main(["verify", "--only", "paths.*,targets.continuity", "--out", str(out)]) == 0
    doc = json.loads((out / "report.json").read_text())

    class Collect(HTMLParser):
        def __init__(self):
            super().__init__()
            self.ids, self.images = set(), []

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "section" and "id" in attrs:
                self.ids.add(attrs["id"])
            if tag == "img":
                self.images.append(attrs)

    parser = Collect()
    parser.feed((out / "index.html").read_text())
    assert parser.ids == {c["name"] for c in doc["checks"]}
    with_figures = [c for c in doc["checks"] if c["figure"]]
    assert len(with_figures) >= 2
    assert len(parser.images) == len(with_figures)
    assert all(img["src"].startswith("data:image/png;base64,") for img in parser.images)
    for c in with_figures:
        assert (out / c["figure"]).read_bytes()[:4] == b"\x89PNG"
        assert f"figure of {c['name']}" in {img["alt"] for img in parser.images}
