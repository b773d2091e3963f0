"""Every script in verification/ runs alone and exits 0 (with --quick); the exit code reflects failures."""
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FOLDER = ROOT / "verification"
SCRIPTS = sorted(p.name for p in FOLDER.glob("*.py") if p.name != "common.py")


def test_every_script_is_listed_in_the_readme():
    readme = (FOLDER / "README.md").read_text()
    assert SCRIPTS and all(f"`{name}`" in readme for name in SCRIPTS)


@pytest.fixture(scope="module")
def runs():
    """Start every script at once (each is mostly interpreter start-up and imports), then collect them."""
    # One BLAS thread per process: the scripts run side by side.
    env = dict(os.environ, MPLBACKEND="Agg", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    procs = {name: subprocess.Popen([sys.executable, str(FOLDER / name), "--quick"], cwd=ROOT, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in SCRIPTS}
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate()
        out[name] = (proc.returncode, stdout, stderr)
    return out


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_runs_alone_and_passes(name, runs):
    returncode, stdout, stderr = runs[name]
    assert returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert "ALL PASS" in stdout and "CAUGHT" in stdout


def test_exit_status_is_one_when_a_row_fails_or_a_control_is_missed():
    sys.path.insert(0, str(FOLDER))
    try:
        import common
    finally:
        sys.path.remove(str(FOLDER))
    good = common.Table("ok")
    good.compare("exact", 1e-16, 1e-10)
    good.control("planted bug", 0.5, 1e-10)
    failing = common.Table("fails")
    failing.compare("too large", 1.0, 1e-10)
    missed = common.Table("control missed")
    missed.control("planted bug that looks right", 1e-16, 1e-10)
    assert common.finish(good) == 0
    assert common.finish(good, failing) == 1
    assert common.finish(good, missed) == 1
