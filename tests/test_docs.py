"""The math-to-code index stays true: every equation has a row, every row names importable code."""
import importlib
import pathlib
import re

import pytest

from refflow.verify.registry import registered

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "math-to-code.md"


def _rows():
    rows = []
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] not in ("eq", "---"):
            rows.append(cells)
    return rows


def test_every_equation_has_a_row():
    eqs = {re.match(r"\d+", r[0]).group() for r in _rows() if re.match(r"\d+", r[0])}
    assert eqs == {str(i) for i in range(1, 41)}
    assert {"Algorithm 1", "Algorithm 2"} <= {r[0] for r in _rows()}


def _resolve(ref):
    module, _, qualname = ref.partition(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("ref", sorted({m for r in _rows() for m in re.findall(r"`([\w.]+:[\w.]+)`", r[2])}))
def test_code_reference_imports(ref):
    assert callable(_resolve(ref)) or isinstance(_resolve(ref), type)


def test_check_names_are_registered():
    names = {e.name for e in registered()}
    for row in _rows():
        for name in re.findall(r"`([\w.]+)`", row[3]):
            assert name in names, f"eq {row[0]}: check {name!r} is not registered"


def test_a_wrong_reference_would_fail():
    # negative control for the import test
    with pytest.raises(AttributeError):
        _resolve("refflow.paths:NoSuchPath")
