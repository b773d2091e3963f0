"""The documentation builds with warnings as errors, and names only real checks.

The build needs the ``docs`` extra (sphinx, myst-parser); without it the build
test is skipped with the reason.  The second test needs only refflow: every
check name the pages cite must be registered in ``refflow verify``.
"""
import importlib
import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest

from refflow.verify.registry import registered

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"


def _missing_docs_tools():
    return [name for name in ("sphinx", "myst_parser") if importlib.util.find_spec(name) is None]


@pytest.mark.skipif(bool(_missing_docs_tools()),
                    reason="the docs extra is not installed (pip install -e '.[docs]': sphinx, myst-parser)")
def test_docs_build_without_warnings(tmp_path):
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
           "-d", str(tmp_path / "doctrees"), str(DOCS), str(tmp_path / "html")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"sphinx -W failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert (tmp_path / "html" / "index.html").is_file()


_TOKEN = re.compile(r"`([a-z_]+\.[a-z_0-9]+)`")


def _cited_check_names():
    """Backticked ``prefix.name`` tokens whose prefix is a check family and that are not
    attributes of the refflow module of the same name (e.g. `cnf.log_prob` is code)."""
    prefixes = {e.name.split(".")[0] for e in registered()}
    cited = {}
    for page in sorted(DOCS.glob("*.md")):
        for token in _TOKEN.findall(page.read_text()):
            prefix, _, attr = token.partition(".")
            if prefix not in prefixes:
                continue
            try:
                module = importlib.import_module(f"refflow.{prefix}")
            except ImportError:
                module = None
            if module is not None and hasattr(module, attr):
                continue
            cited.setdefault(token, page.name)
    return cited


def test_cited_check_names_are_registered():
    names = {e.name for e in registered()}
    cited = _cited_check_names()
    assert cited, "expected the pages to cite checks"
    unknown = {name: page for name, page in cited.items() if name not in names}
    assert not unknown, f"pages cite checks that are not registered: {unknown}"


def test_a_wrong_check_name_would_be_caught(tmp_path, monkeypatch):
    # negative control for the test above
    page = tmp_path / "bogus.md"
    page.write_text("run `paths.no_such_check` with refflow verify")
    monkeypatch.setattr(sys.modules[__name__], "DOCS", tmp_path)
    cited = _cited_check_names()
    assert "paths.no_such_check" in cited
