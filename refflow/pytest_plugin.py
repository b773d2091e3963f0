"""The pytest plugin of refflow (entry point ``pytest11``): cases as fixtures, a seed option.

Inert unless used: it imports nothing of refflow's numerics until a test asks
for a case.  It adds

* the fixture ``refflow_case``: a :class:`~refflow.validate.Case`, the test run
  once per case selected by the marker ``@pytest.mark.refflow_cases(pattern,
  ..., kind=None)`` (shell patterns on the case names, e.g.
  ``"eight-gaussians/*"``; ``kind`` keeps the cases that support that kind;
  Case objects of your own may be given too).  Without the marker, every
  catalog case;
* the fixture ``refflow_seed``: the seed given by ``--refflow-seed`` (0 by
  default).  :mod:`refflow.testing`'s assertions use it as their default
  ``seed``, so a whole suite can be rerun on other draws with
  ``pytest --refflow-seed 7``.
"""
from __future__ import annotations

import fnmatch

import pytest

__all__ = ["selected_seed"]

_MARKER = "refflow_cases"
_state = {"seed": None}


def selected_seed():
    """The ``--refflow-seed`` of the running pytest session, or None."""
    return _state["seed"]


def pytest_addoption(parser):
    group = parser.getgroup("refflow", "refflow checks of flow-matching code")
    group.addoption("--refflow-seed", action="store", type=int, default=None, metavar="SEED",
                    help="seed of refflow's draws in refflow.testing's assertions and the refflow_seed "
                         "fixture (default 0)")


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        f"{_MARKER}(*patterns, kind=None): run a test that takes the refflow_case fixture once per "
        "refflow catalog case whose name matches a pattern (and that supports kind)",
    )
    _state["seed"] = config.getoption("refflow_seed", None)


def pytest_unconfigure(config):
    _state["seed"] = None


def pytest_report_header(config):
    seed = config.getoption("refflow_seed", None)
    return None if seed is None else f"refflow: --refflow-seed {seed}"


def _select(patterns, kind):
    from refflow.validate.catalog import Case, catalog

    chosen, names = [], {}
    for pattern in patterns or ("*",):
        if isinstance(pattern, Case):
            found = [pattern]
        elif isinstance(pattern, str):
            found = [c for c in catalog() if fnmatch.fnmatchcase(c.name, pattern)]
            if not found:
                raise pytest.UsageError(
                    f"refflow_cases: the pattern {pattern!r} matches no refflow case "
                    "(see `refflow check --list`)")
        else:
            raise pytest.UsageError(
                f"refflow_cases: expected case-name patterns (str) or Case objects, got {type(pattern).__name__}")
        for c in found:
            if c.name not in names and (kind is None or kind in c.kinds):
                names[c.name] = c
                chosen.append(c)
    if not chosen:
        raise pytest.UsageError(f"refflow_cases: no selected case supports kind {kind!r}")
    return chosen


def pytest_generate_tests(metafunc):
    if "refflow_case" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker(_MARKER)
    patterns = marker.args if marker else ()
    kind = marker.kwargs.get("kind") if marker else None
    cases = _select(patterns, kind)
    metafunc.parametrize("refflow_case", cases, ids=[c.name for c in cases], indirect=True)


@pytest.fixture
def refflow_case(request):
    """A refflow case (see ``@pytest.mark.refflow_cases``)."""
    return request.param


@pytest.fixture
def refflow_seed(request):
    """The seed of ``--refflow-seed`` (0 when not given)."""
    seed = request.config.getoption("refflow_seed", None)
    return 0 if seed is None else seed
