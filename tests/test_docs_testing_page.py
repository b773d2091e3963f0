"""docs/testing-your-code.md runs as written: its test files (TorchCFM, flow_matching) pass under pytest
with refflow's plugin, and its other Python blocks run.  Skipped where torch, torchcfm or flow_matching
is absent (CI installs only the test extra)."""
import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

PAGE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "testing-your-code.md"


def _blocks():
    return re.findall(r"```python\n(.*?)```", PAGE.read_text(encoding="utf-8"), flags=re.S)


def _test_files():
    files = {}
    for code in _blocks():
        first = code.splitlines()[0]
        m = re.fullmatch(r"# (test_\w+)\.py", first.strip())
        if m:
            files[m.group(1)] = code
    return files


def test_the_page_holds_both_test_files_and_is_in_the_toctree():
    assert set(_test_files()) == {"test_torchcfm_model", "test_flow_matching_model"}
    index = (PAGE.parent / "index.md").read_text(encoding="utf-8")
    assert re.search(r"^testing-your-code$", index, flags=re.M)


@pytest.mark.parametrize("name, needs", [
    ("test_torchcfm_model", ("torch", "torchcfm")),
    ("test_flow_matching_model", ("torch", "flow_matching")),
])
def test_a_docs_test_file_passes_as_written(name, needs, tmp_path):
    # find_spec, not import: torch is imported only in the child pytest (pytester's sys.modules
    # snapshot would unload it after a test, and torch cannot be imported twice in one process)
    missing = [m for m in needs if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    (tmp_path / f"{name}.py").write_text(_test_files()[name], encoding="utf-8")
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "refflow.pytest_plugin", "-p", "no:cacheprovider",
                          "-q", f"{name}.py"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "3 passed" in run.stdout


def test_the_other_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ran = 0
    for code in _blocks():
        if code.lstrip().startswith("# test_") or "import torch" in code or "@pytest.mark" in code:
            continue  # the test files run above; torch wrappers need torch
        exec(compile(code, str(PAGE), "exec"), {})
        ran += 1
    assert ran >= 1 and (tmp_path / "mine.npz").is_file()
