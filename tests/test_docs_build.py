"""The documentation builds with warnings as errors, and names only real checks.

The build needs the ``docs`` extra (sphinx, myst-nb, jupytext, ipykernel,
sphinx-mathjax-offline); without it the build tests are skipped with the
reason.  Built once per session (tutorials in their fast mode), the site must
load no script or stylesheet from another host (it is read offline), serve
MathJax itself, show the tutorials executed with figures, and show figures on
the equation pages.  The second test needs only refflow: every
check name the pages cite must be registered in ``refflow verify``.
"""
import importlib
import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

from refflow.verify.registry import registered

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"


DOCS_TOOLS = ("sphinx", "myst_parser", "myst_nb", "jupytext", "ipykernel", "sphinx-mathjax-offline")


def _missing_docs_tools():
    return [name for name in DOCS_TOOLS if importlib.util.find_spec(name) is None]


# <script src=...> and <link href=...> (stylesheets, fonts, preloads) that leave the
# site: an absolute URL with a scheme, or protocol-relative (//host/...).
_ASSET = re.compile(r"<(script|link)\b[^>]*?\b(src|href)\s*=\s*[\"']?([^\"'\s>]+)", re.IGNORECASE)
_EXTERNAL = re.compile(r"^([a-z][a-z0-9+.-]*:|//)", re.IGNORECASE)


def external_assets(html: str) -> list[str]:
    """The URLs of scripts and linked resources in ``html`` that are not served by the site itself."""
    return [url for _, _, url in _ASSET.findall(html) if _EXTERNAL.match(url)]


@pytest.fixture(scope="module")
def built_site(tmp_path_factory):
    """The site built once with -W, the tutorials in their fast mode (as in CI)."""
    missing = _missing_docs_tools()
    if missing:
        pytest.skip(f"the docs extra is not installed (pip install -e '.[docs]'): missing {missing}")
    tmp = tmp_path_factory.mktemp("docs")
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
           "-d", str(tmp / "doctrees"), str(DOCS), str(tmp / "html")]
    env = dict(os.environ, REFFLOW_FAST="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    assert proc.returncode == 0, f"sphinx -W failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return tmp / "html"


def test_docs_build_without_warnings(built_site):
    assert (built_site / "index.html").is_file()


def test_no_page_loads_a_script_or_stylesheet_from_elsewhere(built_site):
    pages = sorted(built_site.rglob("*.html"))
    assert len(pages) > 10, f"expected the whole site, found {len(pages)} pages"
    found = {str(p.relative_to(built_site)): external_assets(p.read_text(encoding="utf-8")) for p in pages}
    found = {page: urls for page, urls in found.items() if urls}
    assert not found, f"pages load assets from other hosts (offline they break): {found}"


def test_mathjax_is_served_by_the_site(built_site):
    page = (built_site / "gaussian-paths.html").read_text(encoding="utf-8")
    scripts = [url for tag, _, url in _ASSET.findall(page) if tag.lower() == "script"]
    mathjax = [url for url in scripts if "mathjax" in url.lower()]
    assert mathjax, f"no MathJax script on a page of equations; scripts: {scripts}"
    for url in mathjax:
        assert (built_site / url.split("?")[0]).is_file(), f"{url} is referenced but not in the site"
    fonts = list((built_site / "_static" / "mathjax" / "output" / "chtml" / "fonts").rglob("*.woff"))
    assert fonts, "MathJax's fonts are not in the site"


def test_tutorials_are_executed_with_outputs_and_figures(built_site):
    pages = sorted((built_site / "tutorials").glob("*.html"))
    assert len(pages) >= 4, [p.name for p in pages]
    for page in pages:
        text = page.read_text(encoding="utf-8")
        assert "cell_output" in text, f"{page.name}: no executed output"
        if page.stem in ("01_mixture_to_model", "03_cfm_equals_fm", "04_figure2"):
            assert re.search(r"<img[^>]+src=", text), f"{page.name}: no figure"


def test_equation_pages_show_figures_drawn_by_the_build(built_site):
    for name in ("gaussian-paths", "flow-matching", "likelihood", "training-and-sampling"):
        text = (built_site / f"{name}.html").read_text(encoding="utf-8")
        images = re.findall(r"<img[^>]+src=\"([^\"]+)\"", text)
        assert images, f"{name}.html has no figure"
        for src in images:
            assert (built_site / src).is_file(), f"{name}.html: {src} is missing"


def test_the_asset_scan_catches_a_cdn(tmp_path):
    # negative control for the offline test: a CDN script, a protocol-relative
    # stylesheet and a font preload must all be found; local ones must not.
    html = ('<script defer src="https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js"></script>'
            "<link rel=stylesheet href=//fonts.example.org/css>"
            '<link rel="preload" href="HTTP://example.org/font.woff">'
            '<script src="_static/mathjax/tex-chtml.js"></script><link href="_static/basic.css" rel="stylesheet">'
            '<a href="https://example.org/paper">a link is fine</a>')
    assert external_assets(html) == ["https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js",
                                      "//fonts.example.org/css", "HTTP://example.org/font.woff"]


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
