"""The implementation cannot end, hang or crash `refflow check` without a verdict.

In-process, anything the implementation raises (SystemExit included) is an
ImplementationError; with ``timeout=`` the check runs in a child process, so
``os._exit``, a crash and a hang are ImplementationErrors too, and the
command line prints FAILED and exits 1 for each.
"""
import os
import sys

import numpy as np
import pytest

from refflow import cli
from refflow.validate import ImplementationError, check, get_case

OT = "eight-gaussians/ot/sigma_min=0/d=2"
needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="the child process needs fork")


def _path(x_0, x_1, t):
    t = t[:, None]
    return (1 - t) * x_0 + t * x_1, x_1 - x_0


def test_sys_exit_in_process_is_an_implementation_error():
    def exits(x_0, x_1, t):
        sys.exit(0)

    with pytest.raises(ImplementationError, match=r"called sys.exit SystemExit"):
        check("path", exits, OT)


@needs_fork
def test_a_child_process_gives_the_same_report():
    here, there = check("path", _path, OT, seed=3), check("path", _path, OT, seed=3, timeout=120)
    assert here.passed and there.passed
    assert [p.to_json() for p in here.properties] == [p.to_json() for p in there.properties]


@needs_fork
def test_os_exit_crash_and_hang_end_in_implementation_errors():
    def os_exit(x_0, x_1, t):
        os._exit(0)

    def crash(x_0, x_1, t):
        import ctypes
        import faulthandler
        faulthandler.disable()       # pytest's handler would print a page of module names
        ctypes.string_at(0)          # reads address 0: SIGSEGV

    def hang(x_0, x_1, t):
        import time
        time.sleep(60)

    with pytest.raises(ImplementationError, match="ended the process with exit status 0"):
        check("path", os_exit, OT, timeout=120)
    with pytest.raises(ImplementationError, match="killed by signal"):
        check("path", crash, OT, timeout=120)
    with pytest.raises(ImplementationError, match="no answer within the time limit of 1 s"):
        check("path", hang, OT, timeout=1)


@needs_fork
def test_usage_errors_keep_their_type_through_the_child():
    with pytest.raises(ValueError, match="n: expected"):
        check("path", _path, OT, n=1, timeout=120)
    with pytest.raises(ValueError, match="timeout: expected a positive number of seconds"):
        check("path", _path, OT, timeout=0)


@needs_fork
@pytest.mark.parametrize("body, words", [
    ("import os\n    os._exit(0)", "ended the process with exit status 0"),
    ("import sys\n    sys.exit(0)", "called sys.exit"),
    ("import time\n    time.sleep(60)", "no answer within the time limit"),
], ids=["os_exit", "sys_exit", "hang"])
def test_the_command_never_exits_0_without_a_verdict(tmp_path, capsys, monkeypatch, body, words):
    impl = tmp_path / "impl.py"
    impl.write_text("def path(x_0, x_1, t):\n    " + body + "\n")
    monkeypatch.chdir(tmp_path)
    code = cli.main(["check", "--kind", "path", "--impl", f"{impl}:path", "--case", OT, "--timeout", "2"])
    captured = capsys.readouterr()
    out = captured.out
    assert code == 1, captured.err
    assert out.startswith("FAILED:") and words in out


def test_changed_inputs_are_caught_and_the_reference_is_not_fooled():
    case = get_case(OT)

    def doubles_x_0(x_0, x_1, t):
        x_0 *= 2.0                       # as an in-place op on torch.from_numpy(x_0) would
        return case.path.sample(x_0, x_1, t), case.path.pair_velocity(x_0, x_1, t)

    report = check("path", doubles_x_0, case)
    assert not report.passed
    assert report["inputs"].passed is False and report["inputs"].causes == ["modified_inputs"]
    assert report["x_t"].passed is False      # judged against refflow's own x_0, not the doubled one


def test_float16_output_five_percent_off_fails_and_exact_float16_passes():
    case = get_case(OT)

    def f16(scale):
        def impl(x_0, x_1, t):
            return tuple((scale * a).astype(np.float16)
                         for a in (case.path.sample(x_0, x_1, t), case.path.pair_velocity(x_0, x_1, t)))
        return impl

    good, bad = check("path", f16(1.0), case), check("path", f16(1.05), case)
    assert good.passed, good.table()
    assert bad["x_t"].passed is False and bad["u_t"].passed is False
    # the bound follows float16's unit roundoff 2^-11, far below the 5% error
    assert bad["x_t"].tolerance < 0.01 < bad["x_t"].error
