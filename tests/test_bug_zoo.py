"""`refflow check` flags every planted bug of the zoo, names its likely cause, and passes the references.

The table lives in ``tests/bug_zoo.py`` (``ZOO`` and ``REFERENCES``): each bug
with the property that must fail and the cause the report must name.
"""
import json

import pytest

import bug_zoo
from refflow import cli
from refflow.validate import CAUSES, check


@pytest.mark.parametrize("name", list(bug_zoo.REFERENCES))
def test_reference_implementation_passes(name):
    kind, case, options = bug_zoo.REFERENCES[name]
    report = check(kind, getattr(bug_zoo, name), case, **options)
    assert report.passed, report.table()


@pytest.mark.parametrize("name", list(bug_zoo.ZOO))
def test_planted_bug_is_flagged_with_its_cause(name):
    kind, case, options, prop, cause = bug_zoo.ZOO[name]
    report = check(kind, getattr(bug_zoo, name), case, **options)
    assert not report.passed
    assert report[prop].passed is False, report.table()
    if cause is not None:
        assert cause in report[prop].causes, report.table()
        assert CAUSES[cause] in report.table()


def test_the_zoo_is_big_enough_and_its_causes_exist():
    bugs = [name for name in bug_zoo.ZOO if name.startswith("bug_")]
    assert len(bugs) >= 15
    assert {c for *_, c in bug_zoo.ZOO.values() if c} <= set(CAUSES)
    for name in list(bug_zoo.ZOO) + list(bug_zoo.REFERENCES):
        assert callable(getattr(bug_zoo, name))


def test_check_command_flags_a_bug_and_writes_json(tmp_path, capsys):
    out = tmp_path / "report.json"
    code = cli.main(["check", "--kind", "path", "--impl", "bug_zoo:bug_path_sigma_min_dropped",
                     "--case", bug_zoo.OT_MIN, "--json", str(out)])
    assert code == 1
    table = capsys.readouterr().out
    assert "FAIL" in table and "sigma min dropped" in table
    doc = json.loads(out.read_text())
    assert doc["passed"] is False
    (u_t,) = [p for p in doc["properties"] if p["name"] == "u_t"]
    assert u_t["causes"] == ["sigma_min_dropped"] and u_t["passed"] is False


def test_check_command_passes_a_reference(capsys):
    code = cli.main(["check", "--kind", "guided", "--impl", "bug_zoo:guided_flow_matching",
                     "--case", bug_zoo.OT_MIN])
    assert code == 0
    assert "follows 'flow_matching'" in capsys.readouterr().out
