"""The tutorials in docs/tutorials/ run: each script, with REFFLOW_FAST=1, exits 0.

Each tutorial is a jupytext percent-format script; REFFLOW_FAST=1 shrinks it
(few training steps, few points) so that this test takes seconds per script.
It runs in a fresh interpreter with a temporary working directory, where the
tutorial writes its outputs.
"""
import os
import pathlib
import subprocess
import sys

import pytest

TUTORIALS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "tutorials"
SCRIPTS = sorted(TUTORIALS.glob("*.py"))


def test_there_are_tutorials():
    assert SCRIPTS, f"no tutorial scripts in {TUTORIALS}"


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_tutorial_is_jupytext_percent(script):
    text = script.read_text()
    assert "# %%" in text, f"{script.name}: expected jupytext percent cells ('# %%')"
    assert "REFFLOW_FAST" in text, f"{script.name}: expected it to honour REFFLOW_FAST"


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_tutorial_runs_fast(script, tmp_path):
    env = dict(os.environ, REFFLOW_FAST="1", MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (
        f"{script.name} exited with {proc.returncode}\n--- stdout (tail)\n{proc.stdout[-4000:]}"
        f"\n--- stderr (tail)\n{proc.stderr[-4000:]}"
    )
