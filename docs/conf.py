"""Sphinx configuration of the refflow documentation.

Build (warnings are errors)::

    pip install -e ".[docs]"
    python -m sphinx -W -b html docs docs/_build/html

Pages are Markdown (MyST); mathematics is rendered by MathJax through
myst's ``dollarmath`` and ``amsmath`` extensions.  MathJax itself is served
from the built site (``sphinx-mathjax-offline`` ships MathJax 3 and copies it
into ``_static/mathjax``), so the pages render with no network; no page loads
a script or stylesheet from another host (``tests/test_docs_build.py``).

Tutorials (``tutorials/*.py``) are jupytext percent scripts that ``myst-nb``
reads as notebooks and executes at build time, so the pages show their output
and figures.  We chose myst-nb over sphinx-gallery because the scripts are
already jupytext notebooks (cells, Markdown prose with ``$...$`` math that
MyST renders like every other page) and over jupytext + nbconvert because it
needs no separate conversion step.  With ``CI`` set (or ``REFFLOW_FAST=1``)
the tutorials run in their fast mode; set ``REFFLOW_FAST=0`` for a full run.

The figures on the equation pages are drawn at build time, by
``_build_figures`` below, from the same registered checks (and the same
plotting functions of ``refflow.plotting`` / ``refflow.figures``) as the
``refflow verify`` report; they are written to ``_generated/`` (not in git).

Code shown beside an equation is pulled from the source with
``literalinclude`` and ``:pyobject:``, so a renamed or deleted object fails
the build instead of going stale.
"""
from __future__ import annotations

import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:  # the package is installed editable; this is for a bare checkout
    sys.path.insert(0, ROOT)

project = "refflow"
author = "refflow contributors"
copyright = "refflow contributors"

try:
    import refflow

    release = version = refflow.__version__
except Exception:  # pragma: no cover - the API page will then fail loudly
    release = version = "unknown"

# CI builds the tutorials in their fast mode (a few training steps); the kernel
# that myst-nb starts inherits this environment.
if os.environ.get("CI") and "REFFLOW_FAST" not in os.environ:
    os.environ["REFFLOW_FAST"] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")

extensions = [
    "myst_nb",  # MyST Markdown pages, and the tutorials as executed notebooks
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # serves MathJax 3 from _static/mathjax: no CDN
]

root_doc = "index"

# Only the pages are sources: not the build, not the tutorial scripts (they are
# shown by literalinclude), not this file.
exclude_patterns = [
    "_build",
    "Thumbs.db",
    ".DS_Store",
    "**/.ipynb_checkpoints",
    "conf.py",
    "_generated",
    "README.md",
]

# -- myst-nb: the tutorials are jupytext percent scripts, executed at build time ------
nb_custom_formats = {".py": ["jupytext.reads", {"fmt": "py:percent"}]}
nb_execution_mode = "force"
nb_execution_timeout = 900
nb_execution_raise_on_error = True  # a tutorial that fails fails the build
nb_execution_show_tb = True
nb_execution_in_temp = True  # the files a tutorial writes go to a temporary folder
nb_merge_streams = True

# -- MyST -----------------------------------------------------------------------
myst_enable_extensions = [
    "dollarmath",   # $...$ and $$...$$
    "amsmath",      # \begin{aligned} ... blocks
    "colon_fence",  # ::: admonitions
]
myst_dmath_double_inline = True
myst_heading_anchors = 3

# -- autodoc / napoleon -----------------------------------------------------------
autodoc_default_options = {
    "members": True,
    "member-order": "bysource",
}
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False

# -- HTML -------------------------------------------------------------------------
html_theme = "alabaster"
html_title = "refflow"
html_static_path = ["_static"]
html_css_files = ["refflow.css"]
html_show_sourcelink = False

# Sections that napoleon turns into fields.  Any other underlined heading inside a
# docstring ("Network", "Parameter layout", "Derivatives", ...) would be a section
# title nested in an autodoc directive, which docutils rejects; it is shown as a
# rubric instead (see ``_headings_to_rubrics``).
_NAPOLEON_SECTIONS = {
    "args", "arguments", "attention", "attributes", "caution", "danger", "error",
    "example", "examples", "hint", "important", "keyword args", "keyword arguments",
    "methods", "note", "notes", "other parameters", "parameters", "receive", "receives",
    "return", "returns", "raise", "raises", "references", "see also", "tip", "todo",
    "warning", "warnings", "warn", "warns", "yield", "yields",
}
_UNDERLINE = re.compile(r"^\s*([-=~^\"'`#*+])\1{2,}\s*$")


def _headings_to_rubrics(app, what, name, obj, options, lines):
    """Turn non-napoleon ``Title / -----`` headings of a docstring into ``.. rubric::``.

    A title may span several lines (the paragraph just above the underline).
    Runs before napoleon (lower priority number) and edits ``lines`` in place.
    """
    out: list[str] = []
    for line in lines:
        if _UNDERLINE.match(line) and out and out[-1].strip():
            # the paragraph above the underline is the title
            k = len(out)
            while k > 0 and out[k - 1].strip() and not _UNDERLINE.match(out[k - 1]):
                k -= 1
            title = " ".join(part.strip() for part in out[k:])
            if title.lower() in _NAPOLEON_SECTIONS:
                out.append(line)
                continue
            indent = out[k][: len(out[k]) - len(out[k].lstrip())]
            del out[k:]
            out += [f"{indent}.. rubric:: {title}", ""]
            continue
        out.append(line)
    lines[:] = out


_INLINE_LITERAL = re.compile(r"(``.+?``|:\w+:`[^`]*`|`[^`]*`_?)")
_DIRECTIVE_WITH_BODY = re.compile(r"^(\s*)\.\. (math|code-block|code|literalinclude)::")
_TWO_COLUMN = re.compile(r"^(\s*)(:\w+:`[^`]+`)\s{2,}(\S.*)$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _escape_pipes(app, what, name, obj, options, lines):
    r"""Escape ``|`` in docstring prose, where docutils reads ``|a - b|`` as a substitution.

    Plain-text docstrings write absolute values as ``|x|``; inside inline
    literals, roles (``:math:`|x|```), math blocks and literal blocks the pipes
    are left alone.
    """
    out = []
    block_indent = None  # indentation of the directive / "::" paragraph whose body we are in
    for line in lines:
        if block_indent is not None:
            if not line.strip() or _indent(line) > block_indent:
                out.append(line)
                continue
            block_indent = None
        m = _DIRECTIVE_WITH_BODY.match(line)
        if m:
            block_indent = len(m.group(1))
            out.append(line)
            continue
        if line.rstrip().endswith("::"):
            block_indent = _indent(line)
        if "|" in line:
            parts = _INLINE_LITERAL.split(line)
            line = "".join(p if i % 2 else p.replace("|", r"\|") for i, p in enumerate(parts))
        out.append(line)
    lines[:] = out


def _two_column_lists(app, what, name, obj, options, lines):
    """Turn an aligned two-column list (``:class:`X`   description`` with indented
    continuation lines) into a definition list, which docutils accepts."""
    out = []
    i = 0
    while i < len(lines):
        m = _TWO_COLUMN.match(lines[i])
        if m:
            indent, term, desc = m.groups()
            j = i + 1
            cont = []
            while j < len(lines) and lines[j].strip() and _indent(lines[j]) > len(indent) \
                    and not _TWO_COLUMN.match(lines[j]):
                cont.append(lines[j].strip())
                j += 1
            # only rewrite real two-column blocks: a neighbour in the same format
            prev_ok = out and _TWO_COLUMN.match(out[-1] if out[-1].strip() else "")
            next_ok = j < len(lines) and _TWO_COLUMN.match(lines[j])
            if cont or prev_ok or next_ok:
                out += [indent + term, indent + "    " + " ".join([desc] + cont), ""]
                i = j
                continue
        out.append(lines[i])
        i += 1
    lines[:] = out


# -- directives ---------------------------------------------------------------------
import importlib.util  # noqa: E402

from docutils import nodes  # noqa: E402
from docutils.parsers.rst import directives  # noqa: E402
from docutils.statemachine import StringList  # noqa: E402
from sphinx.util.docutils import SphinxDirective  # noqa: E402


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def _in_markdown(state) -> bool:
    """Whether nested content is parsed by MyST (Markdown) rather than reStructuredText."""
    try:
        from myst_parser.mocking import MockState
    except ImportError:  # pragma: no cover
        return False
    return isinstance(state, MockState)


class _GeneratedContent(SphinxDirective):
    """A directive that writes source text (Markdown or RST, whichever the page is in) and parses it."""

    def emit(self, markdown: list[str], rst: list[str]):
        lines = markdown if _in_markdown(self.state) else rst
        node = nodes.container()
        self.state.nested_parse(StringList(lines, source=self.get_source_info()[0]), self.content_offset, node)
        return node.children


class OptionalAutomodule(_GeneratedContent):
    """``automodule`` for a module that may not exist yet (written concurrently).

    When the module exists it is documented exactly as ``automodule`` would (an
    import error then fails the build as usual); when it does not, a "planned"
    note is shown instead.
    """

    required_arguments = 1
    option_spec = {"no-members": directives.flag, "planned": directives.unchanged}

    def run(self):
        name = self.arguments[0]
        if _module_exists(name):
            rst = [f".. automodule:: {name}"] + (["   :no-members:"] if "no-members" in self.options else [])
            return self.emit(["```{eval-rst}", *rst, "```"], rst)
        what = self.options.get("planned") or "this module"
        text = (f"**Planned:** `{name}` ({what}) is not in the package yet; "
                "its reference appears here once it lands.")
        rst_text = text.replace("`", "``")
        return self.emit(["```{note}", text, "```"], [".. note::", "", f"   {rst_text}"])


class RefflowChecks(_GeneratedContent):
    """A table of the checks registered in ``refflow verify``, read from the registry at build time.

    ``:only:`` takes the same patterns as ``refflow verify --only``.
    """

    option_spec = {"only": directives.unchanged}

    def run(self):
        from refflow.verify.registry import registered

        only = self.options.get("only")
        entries = registered(only=only)
        if not entries:
            raise self.error(f"refflow-checks: no registered check matches {only!r}")
        md = ["| check | equations | in `--quick` | run it |", "|---|---|---|---|"]
        rst = [".. list-table::", "   :header-rows: 1", "",
               "   * - check", "     - equations", "     - in ``--quick``", "     - run it"]
        for e in entries:
            quick = "yes" if e.quick else "no"
            md.append(f"| `{e.name}` | {e.equations} | {quick} | `refflow verify --only {e.name}` |")
            rst += [f"   * - ``{e.name}``", f"     - {e.equations}", f"     - {quick}",
                    f"     - ``refflow verify --only {e.name}``"]
        out = self.emit(md, rst)
        # Anchor each check's row (the first cell naming it) for the links of the
        # math-to-code table: id "check-<name>", once per page.
        names = {e.name for e in entries}
        document = self.state.document
        for child in out:
            for literal in child.findall(nodes.literal):
                name = literal.astext()
                anchor = check_anchor(name)
                if name in names and anchor not in document.ids:
                    literal.parent["ids"].append(anchor)
                    document.ids[anchor] = literal.parent
        return out


# -- figures drawn at build time -------------------------------------------------------
# The checks whose report figures the equation pages show; each runs in its quick
# mode (a few seconds), exactly as ``refflow verify --quick`` runs it, and its
# figure is the report's figure.  ``gradients.mc_rate`` is not in --quick but
# takes about three seconds.
FIGURE_CHECKS = (
    "paths.derivatives",           # the schedules alpha_t, sigma_t (gaussian-paths)
    "figure2.crossings",           # Figure 2 (gaussian-paths)
    "targets.continuity",          # u_t over p_t (flow-matching)
    "gradients.cfm_fm_monte_carlo",  # z of grad L_CFM - grad L_FM (flow-matching)
    "gradients.mc_rate",           # the N^(-1/2) slope of that difference (flow-matching)
    "solvers.order",               # convergence slopes of Euler / midpoint / RK4 (training-and-sampling)
    "cnf.closed_form_likelihood",  # eq 14 against the closed-form log p_1 (likelihood)
)
GENERATED = os.path.join(HERE, "_generated")


def _fmt(v) -> str:
    return f"{v:.3g}"


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]<>|#$])")


def _plain(text: str) -> str:
    """``text`` escaped so that MyST shows it as it is (a check's prose has ``||x||``, ``*``, ``_``)."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)


def _build_figures(app):
    """Run the checks of ``FIGURE_CHECKS`` and write ``_generated/<check>.png`` and ``.md``.

    The ``.md`` snippet is the figure with a caption that says what the check
    compared, its error against its tolerance and whether its negative control
    was caught; the pages include it with ``{include}``.  A check that fails
    fails the build.
    """
    from refflow.plotting import save_figure
    from refflow.verify.registry import registered, run_check

    os.makedirs(GENERATED, exist_ok=True)
    entries = {e.name: e for e in registered()}
    for name in FIGURE_CHECKS:
        r = run_check(entries[name], quick=True)
        if not r.passed or r.figure is None:
            raise RuntimeError(f"docs figure {name}: check failed or drew no figure ({r.message})")
        save_figure(r.figure, os.path.join(GENERATED, f"{name}.png"))
        caution = "caught" if r.control_caught else "NOT caught"
        text = [
            f"```{{figure}} /_generated/{name}.png",
            f":alt: figure of the check {name}",
            f":name: fig-{name.replace('.', '-')}",
            "",
            f"Drawn by the docs build from the check `{name}` (eq {r.equations}), the figure of the "
            f"report of `refflow verify --only {name}`. Compared: {_plain(r.compared)}. "
            f"Error ({_plain(r.measure or 'see the check')}) {_fmt(r.error)} against tolerance "
            f"{_fmt(r.tolerance)}; negative control "
            f"({_plain(r.control)}) error {_fmt(r.control_error)}, {caution}.",
            "```",
            "",
        ]
        with open(os.path.join(GENERATED, f"{name}.md"), "w") as fh:
            fh.write("\n".join(text))


# -- the math-to-code table: links ----------------------------------------------------------
# docs/math-to-code.md stays a plain table that tests/test_docs.py reads (code as
# `module:qualname`, checks as `name`); at build time each row gets links: the
# equation to the page that states it, the code to its API entry, each check to
# its row on the checks page (anchored there by ``RefflowChecks``).
_EQUATION_PAGES = (
    (range(1, 6), "normalizing-flows.md"),
    (range(6, 11), "residual-flows.md"),
    (range(11, 15), "likelihood.md"),
    (range(15, 25), "flow-matching.md"),
    (range(25, 38), "gaussian-paths.md"),
    (range(38, 41), "guidance.md"),
)
_CODE_REF = re.compile(r"`(refflow[\w.]*):([\w.]+)`")
_CHECK_REF = re.compile(r"`([a-z_0-9]+\.[a-z_0-9]+)`")


def check_anchor(name: str) -> str:
    return "check-" + re.sub(r"[^a-z0-9]+", "-", name.lower())


def _equation_page(eq: str) -> str | None:
    if eq.startswith("Figure 2"):
        return "gaussian-paths.md"
    if eq.startswith("Algorithm"):
        return "training-and-sampling.md"
    m = re.match(r"\d+", eq)
    if m:
        for numbers, page in _EQUATION_PAGES:
            if int(m.group()) in numbers:
                return page
    return None


def _link_math_to_code(app, docname, source):
    if docname != "math-to-code":
        return
    out = []
    for line in source[0].splitlines():
        cells = line.strip().strip("|").split("|")
        if line.startswith("|") and len(cells) == 4 and cells[0].strip() not in ("eq", "---"):
            eq, says, code, checks = (c.strip() for c in cells)
            page = _equation_page(eq)
            eq = f"[{eq}]({page})" if page else eq
            code = _CODE_REF.sub(lambda m: f"{{py:obj}}`{m.group(1)}:{m.group(2)} <{m.group(1)}.{m.group(2)}>`", code)
            checks = _CHECK_REF.sub(
                lambda m: f'<a class="check-link" href="checks.html#{check_anchor(m.group(1))}">'
                          f"<code>{m.group(1).replace('.', '.<wbr>')}</code></a>", checks)
            line = f"| {eq} | {says} | {code} | {checks} |"
        out.append(line)
    source[0] = "\n".join(out) + "\n"


def setup(app):
    app.connect("source-read", _link_math_to_code)
    app.connect("builder-inited", _build_figures)
    app.add_directive("optional-automodule", OptionalAutomodule)
    app.add_directive("refflow-checks", RefflowChecks)
    app.connect("autodoc-process-docstring", _headings_to_rubrics, priority=100)
    app.connect("autodoc-process-docstring", _two_column_lists, priority=101)
    app.connect("autodoc-process-docstring", _escape_pipes, priority=102)
