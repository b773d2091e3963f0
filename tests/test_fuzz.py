"""Fuzzing the API and the command line with bad input, interruptions and edited files.

Part 1 drives the API with hypothesis: every bad value is refused with a
ValueError/TypeError that shows the value exactly, valid values never give
NaN, an edited checkpoint is refused field by field.  Part 2 is a table of
command lines, each with its exit status, a piece of its one-line message,
and the promise that a refused command writes nothing.  Part 3 holds the
interruption, divergence and atomic-output behaviour.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import refflow as rf  # noqa: E402
from refflow import cli  # noqa: E402
from refflow._io import atomic_savez, atomic_write, sweep_stale  # noqa: E402
from refflow._validation import check_scalar, check_time  # noqa: E402
from refflow.nn import MLP  # noqa: E402
from refflow.train import (TrainingDiverged, TrainingInterrupted, load_checkpoint,  # noqa: E402
                           save_checkpoint, train)

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
anything = st.floats(allow_nan=True, allow_infinity=True, width=64)


def _dead_pid() -> int:
    """The id of a process that has ended (it is not reused this fast on Linux)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# =========================================================================== part 1: the API


@FAST
@given(st.one_of(finite.filter(lambda v: v < 0 or v > 1), st.sampled_from([np.nan, np.inf, -np.inf])))
def test_time_outside_unit_interval_is_refused_with_its_exact_value(v):
    with pytest.raises(ValueError) as info:
        check_time(np.array([0.5, v, 0.25]))
    message = str(info.value)
    assert repr(float(v)) in message and "index 1" in message and "np.float64" not in message


@FAST
@given(st.floats(min_value=0.0, max_value=1.0))
def test_time_inside_unit_interval_is_accepted(v):
    assert check_time(v) == v


@FAST
@given(finite, finite, finite)
def test_scalar_outside_its_interval_shows_value_and_bounds(v, a, b):
    low, high = min(a, b), max(a, b)
    if low <= v <= high:
        assert check_scalar(np.float64(v), "s", low=low, high=high) == v
        return
    with pytest.raises(ValueError) as info:
        check_scalar(np.float64(v), "s", low=low, high=high)
    message = str(info.value)
    assert message.startswith("s: ") and repr(v) in message and repr(low) in message and repr(high) in message
    assert "np.float64" not in message


def test_a_value_one_ulp_outside_is_shown_unrounded():
    with pytest.raises(ValueError, match=r"got 1\.0000000000000002 at index 0"):
        check_time([np.nextafter(1.0, 2.0)])
    with pytest.raises(ValueError, match=r"got 1\.0000001\b"):
        rf.OTPath().sample(np.zeros((2, 2)), np.zeros((2, 2)), np.array([0.5, 1.0000001]))


@FAST
@given(st.lists(anything, min_size=1, max_size=6))
def test_empirical_weights_are_finite_non_negative_and_sum_to_one(raw):
    w = np.array(raw)
    points = np.arange(2 * w.size, dtype=float).reshape(-1, 2)
    valid = bool(np.all(np.isfinite(w)) and np.all(w >= 0) and abs(w.sum() - 1.0) <= 1e-12 * w.size)
    if valid:
        assert np.isfinite(rf.Empirical(points, weights=w).marginal(rf.OTPath(0.1)).log_prob(points, 0.5)).all()
        return
    with pytest.raises(ValueError, match="weights: expected") as info:
        rf.Empirical(points, weights=w)
    assert "np.float64" not in str(info.value)


def test_nan_weights_are_refused_for_both_targets():
    with pytest.raises(ValueError, match=r"weights: expected finite non-negative values, got nan at index 0"):
        rf.Empirical(np.zeros((5, 2)), weights=[np.nan] * 5)
    with pytest.raises(ValueError, match=r"got nan at index 1"):
        rf.GaussianMixture([0.5, np.nan], np.zeros((2, 2)), [1.0, 1.0])


@FAST
@given(st.floats(min_value=0.02, max_value=1e100), st.floats(min_value=0.0, max_value=1.0))
def test_ve_path_stays_finite_for_every_accepted_sigma_max(sigma_max, t):
    path = rf.VEPath(sigma_min=0.01, sigma_max=sigma_max)
    marginal = rf.eight_gaussians().marginal(path)
    x = np.random.default_rng(0).standard_normal((4, 2)) * path.sigma(np.float64(t))
    assert np.isfinite(marginal.velocity(x, t)).all()
    assert np.isfinite(marginal.log_prob(x, t)).all()
    x_1 = np.ones((4, 2))
    assert np.isfinite(path.conditional_velocity(x, x_1, np.full(4, t))).all()


@pytest.mark.parametrize("sigma_max", [1e101, 1e154, 1e300])
def test_ve_path_refuses_a_sigma_max_whose_square_overflows(sigma_max):
    with pytest.raises(ValueError, match=re.escape(f"sigma_max: expected a value in (0.01, 1e+100], got {sigma_max!r}")):
        rf.VEPath(sigma_max=sigma_max)


# --------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A small trained checkpoint, its files, and points to evaluate."""
    folder = tmp_path_factory.mktemp("fuzz")
    model, path = MLP(2, hidden=(8,)), rf.OTPath()
    state = train(model, rf.eight_gaussians(), path, steps=3, batch_size=16, rng=0, ema_decay=0.9)
    ckpt = folder / "model.npz"
    save_checkpoint(ckpt, state, model, path, extra={"target": "eight-gaussians", "batch_size": 16,
                                                     "label_dropout": 0.0})
    points = np.random.default_rng(1).standard_normal((6, 2))
    np.savez(folder / "points.npz", points)
    np.save(folder / "points.npy", points)
    np.savez(folder / "wide.npz", np.zeros((3, 5)))
    np.savez(folder / "nan.npz", np.array([[0.0, np.nan]]))
    (folder / "corrupt.npz").write_bytes(b"not a zip file")
    (folder / "a_file").write_text("x")
    (folder / "a_folder").mkdir()
    return folder


def _edited(work, name, edit, arrays_edit=None):
    """A copy of the checkpoint with ``edit(config)`` (and ``arrays_edit(arrays)``) applied."""
    with np.load(work / "model.npz") as data:
        arrays = {k: data[k] for k in data.files}
    config = json.loads(str(arrays["config"][()]))
    edit(config)
    arrays["config"] = np.array(json.dumps(config))
    if arrays_edit is not None:
        arrays_edit(arrays)
    out = work / name
    np.savez(out, **arrays)
    return out


def _walk(config, prefix=()):
    """Every (key path) of the nested config dicts."""
    for key, value in config.items():
        yield prefix + (key,)
        if isinstance(value, dict) and key != "rng":
            yield from _walk(value, prefix + (key,))


json_values = st.recursive(st.none() | st.booleans() | st.integers(-3, 10**6) | finite | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                     max_size=3), max_leaves=5)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_an_edited_checkpoint_is_refused_or_loads_unchanged(work, data):
    with np.load(work / "model.npz") as npz:
        original = json.loads(str(npz["config"][()]))
    keys = sorted(_walk(original))
    where = data.draw(st.sampled_from(keys))
    how = data.draw(st.sampled_from(["delete", "replace", "add"]))
    value = data.draw(json_values)

    def edit(config):
        node = config
        for key in where[:-1]:
            node = node[key]
        if how == "delete":
            del node[where[-1]]
        elif how == "replace":
            node[where[-1]] = value
        else:
            node["unknown_" + where[-1]] = value

    file = _edited(work, "edited.npz", edit)
    try:
        model, path, state, extra = load_checkpoint(file)
    except ValueError as exc:  # never KeyError, AttributeError or a bare TypeError
        assert str(exc).startswith("model file") and "\n" not in str(exc)
        return
    # Accepted: only an edit that leaves a valid checkpoint (same value, or a free 'extra' entry).
    assert how == "replace" or where[0] == "extra"
    assert np.isfinite(state.params).all()


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.pop("adam"), "missing key 'adam'"),
    (lambda c: c["adam"].pop("beta2"), "adam: missing key 'beta2'"),
    (lambda c: c.__setitem__("rng_kind", "RandomState"), "rng_kind: expected one of"),
    (lambda c: c.__setitem__("rng_kind", "__class__"), "rng_kind: expected one of"),
    (lambda c: c.__setitem__("surprise", 1), "unknown key 'surprise'"),
    (lambda c: c["model"].__setitem__("hidden", [9]), "model:"),
    (lambda c: c["path"].__setitem__("sigma_min", 2.0), "path: sigma_min: expected a value in [0.0, 1.0), got 2.0"),
    (lambda c: c["adam"].__setitem__("lr", -1.0), "adam.lr: expected a value in (0.0, inf), got -1.0"),
    (lambda c: c.__setitem__("step", 2), "'losses' has shape (3,), expected (2,)"),
    (lambda c: c["rng"]["state"].__setitem__("state", "x"), "rng: not a valid PCG64 state"),
])
def test_edited_checkpoint_fields_are_named(work, edit, message):
    with pytest.raises(ValueError) as info:
        load_checkpoint(_edited(work, "named.npz", edit))
    assert message in str(info.value)


def test_non_finite_parameters_are_refused(work):
    def poison(arrays):
        arrays["params"] = arrays["params"].copy()
        arrays["params"][0] = np.nan

    with pytest.raises(ValueError, match="array 'params' holds 1 NaN or inf values"):
        load_checkpoint(_edited(work, "nanparams.npz", lambda c: None, poison))


# --------------------------------------------------------------------------- training


def test_ctrl_c_stops_after_a_whole_step_and_resumes_bit_for_bit():
    model, path, target = MLP(2, hidden=(8,)), rf.OTPath(), rf.eight_gaussians()
    whole = train(model, target, path, steps=10, batch_size=16, rng=5)

    def interrupt_at_7(state):
        if state.step == 7:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(TrainingInterrupted) as info:
        train(model, target, path, steps=10, batch_size=16, rng=5, on_step=interrupt_at_7)
    assert info.value.state.step == 7
    rest = train(model, target, path, steps=3, batch_size=16, resume=info.value.state)
    np.testing.assert_array_equal(rest.params, whole.params)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("lr", [1e10, 1e30])
def test_a_diverging_loss_names_the_learning_rate(lr):
    with pytest.raises(TrainingDiverged, match=re.escape(f"the learning rate lr = {lr!r} is likely too large")):
        train(MLP(2, hidden=(8,)), rf.eight_gaussians(), rf.OTPath(), steps=50, batch_size=16, lr=lr, rng=0)


# --------------------------------------------------------------------------- atomic outputs


def test_a_failed_write_leaves_the_destination_and_no_temporary_file(tmp_path):
    dest = tmp_path / "out.npz"
    atomic_savez(dest, x=np.ones(2))
    before = dest.read_bytes()

    def broken(fh):
        fh.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(dest, broken)
    assert dest.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["out.npz"]


def test_stale_temporary_files_of_killed_runs_are_swept_by_the_next_write(tmp_path):
    dead, alive = _dead_pid(), os.getpid()
    stale = tmp_path / f".tmp-{dead}-abc-out.npz"
    stale.write_bytes(b"x" * 1000)
    (tmp_path / f".tmp-{dead}-abc-other.npz").write_bytes(b"x")  # another destination's: kept
    running = tmp_path / f".tmp-{alive}-def-out.npz"  # a writer still running: kept
    running.write_bytes(b"x")
    atomic_savez(tmp_path / "out.npz", x=np.ones(2))
    assert not stale.exists() and running.exists()
    assert sorted(os.listdir(tmp_path)) == sorted(["out.npz", f".tmp-{dead}-abc-other.npz", running.name])
    assert sweep_stale(tmp_path / "other.npz") == [f".tmp-{dead}-abc-other.npz"]


# =========================================================================== part 2: the command line

# (name, argv with {w} the work folder, exit status, piece of the message)
TABLE = [
    ("train steps 0", "train --steps 0 --out {w}/o.npz", 2, "--steps: expected an integer >= 1, got 0"),
    ("train out folder", "train --out {w}/a_folder", 2, "--out: '{w}/a_folder' is a folder"),
    ("train out under file", "train --out {w}/a_file/o.npz", 2, "--out: '{w}/a_file' is a file"),
    ("train out missing folder", "train --out {w}/nowhere/o.npz", 2, "--out: folder '{w}/nowhere' does not exist"),
    ("train sigma-min with vp", "train --path vp --sigma-min 0.1 --out {w}/o.npz", 2,
     "--sigma-min: applies only to --path ot or ve, not --path vp"),
    ("train lr nan", "train --lr nan --out {w}/o.npz", 2, "--lr: expected a finite value in (0.0, inf), got nan"),
    ("train lr negative", "train --lr -0.001 --out {w}/o.npz", 2, "got -0.001"),
    ("train ema 1", "train --ema 1.0 --out {w}/o.npz", 2, "--ema: expected a finite value in (0.0, 1.0), got 1.0"),
    ("train hidden", "train --hidden 8,x --out {w}/o.npz", 2, "--hidden: expected comma-separated ints"),
    ("train dropout unconditional", "train --label-dropout 0.3 --out {w}/o.npz", 2,
     "--label-dropout: applies only with --conditional"),
    ("train resume with lr", "train --resume {w}/model.npz --lr 0.1 --out {w}/o.npz", 2,
     "--lr: does not apply with --resume"),
    ("train resume missing", "train --resume {w}/absent.npz --out {w}/o.npz", 2, "--resume: '{w}/absent.npz' does not exist"),
    ("train resume corrupt", "train --resume {w}/corrupt.npz --steps 1 --out {w}/o.npz", 2, "not a readable refflow checkpoint"),
    ("train diverges", "train --lr 1e10 --steps 30 --hidden 8 --batch-size 16 --quiet --out {w}/o.npz", 1,
     "the learning rate lr = 10000000000.0 is likely too large"),
    ("sample out folder", "sample {w}/model.npz --out {w}/a_folder", 2, "--out: '{w}/a_folder' is a folder"),
    ("sample plot suffix", "sample {w}/model.npz --out {w}/o.npz --plot {w}/p.txt", 2, "--plot: expected a .png"),
    ("sample plot under file", "sample {w}/model.npz --out {w}/o.npz --plot {w}/a_file/p.png", 2, "--plot:"),
    ("sample n 0", "sample {w}/model.npz -n 0 --out {w}/o.npz", 2, "-n: expected an integer >= 1, got 0"),
    ("sample method", "sample {w}/model.npz --method nope --out {w}/o.npz", 2, "--method: expected one of"),
    ("sample rtol fixed", "sample {w}/model.npz --method rk4 --rtol 1e-3 --out {w}/o.npz", 2,
     "--rtol: applies only to an adaptive method"),
    ("sample steps adaptive", "sample {w}/model.npz --method RK45 --steps 5 --out {w}/o.npz", 2,
     "--steps: applies only to a fixed-step method"),
    ("sample convention", "sample {w}/model.npz --convention notes --out {w}/o.npz", 2,
     "--convention: applies only with --guidance"),
    ("sample label", "sample {w}/model.npz --label 1 --out {w}/o.npz", 2, "expected a class-conditional model"),
    ("sample missing model", "sample {w}/absent.npz --out {w}/o.npz", 2, "model: '{w}/absent.npz' does not exist"),
    ("sample npy model", "sample {w}/points.npy --out {w}/o.npz", 2, "not a readable refflow checkpoint"),
    ("sample edited rng", "sample {w}/rng.npz --out {w}/o.npz", 2, "rng_kind: expected one of"),
    ("sample removed adam", "sample {w}/noadam.npz --out {w}/o.npz", 2, "missing key 'adam'"),
    ("likelihood wide", "likelihood {w}/model.npz --points {w}/wide.npz --out {w}/o.npz", 2,
     "--points: points: expected 2 columns"),
    ("likelihood nan", "likelihood {w}/model.npz --points {w}/nan.npz --out {w}/o.npz", 2, "expected finite values"),
    ("likelihood corrupt points", "likelihood {w}/model.npz --points {w}/corrupt.npz --out {w}/o.npz", 2,
     "is not a readable .npz or .npy file"),
    ("likelihood probes exact", "likelihood {w}/model.npz --points {w}/points.npz --n-probes 3 --out {w}/o.npz", 2,
     "--n-probes: applies only with --divergence hutchinson"),
    ("likelihood grid no plot", "likelihood {w}/model.npz --points {w}/points.npz --grid 10 --out {w}/o.npz", 2,
     "--grid: applies only with --plot"),
    ("likelihood out folder", "likelihood {w}/model.npz --points {w}/points.npz --out {w}/a_folder", 2, "--out:"),
    ("likelihood batch 0", "likelihood {w}/model.npz --points {w}/points.npz --batch-size 0 --out {w}/o.npz", 2,
     "--batch-size: expected an integer >= 1, got 0"),
    ("check json under file", "check --kind path --impl numpy:add --case eight-gaussians/ot/sigma_min=0/d=2 "
     "--json {w}/a_file/r.json", 2, "--json: '{w}/a_file' is a file"),
    ("check timeout", "check --kind path --impl numpy:add --case eight-gaussians/ot/sigma_min=0/d=2 --timeout -1", 2,
     "--timeout: expected a finite value in [0.0, inf), got -1.0"),
    ("check list with kind", "check --list --kind path", 2, "--kind: does not apply with --list"),
    ("check impl fails", "check --kind path --impl numpy:linalg.inv --case eight-gaussians/ot/sigma_min=0/d=2 "
     "--timeout 0", 1, "FAILED: "),
    ("golden out file", "golden --out {w}/a_file", 2, "--out: '{w}/a_file' is a file, expected a folder"),
    ("verify out file", "verify --out {w}/a_file", 2, "--out: '{w}/a_file' is a file"),
    ("verify json under file", "verify --out {w}/rep --json {w}/a_file/r.json", 2, "--json:"),
    ("verify only nothing", "verify --out {w}/rep --only no-such-check", 2, "--only 'no-such-check' matches no check"),
]


@pytest.fixture(scope="module")
def edited_checkpoints(work):
    _edited(work, "rng.npz", lambda c: c.__setitem__("rng_kind", "RandomState"))
    _edited(work, "noadam.npz", lambda c: c.pop("adam"))
    return work


def _listing(folder):
    return sorted(os.path.relpath(os.path.join(root, f), folder)
                  for root, _, files in os.walk(folder) for f in files)


@pytest.mark.parametrize("name, argv, status, message", TABLE, ids=[row[0] for row in TABLE])
def test_command_table(edited_checkpoints, capsys, name, argv, status, message):
    w = str(edited_checkpoints)
    before = _listing(w)
    rc = cli.main(argv.format(w=w).split())
    out, err = capsys.readouterr()
    assert rc == status, (out, err)
    text = err if status == 2 or name == "train diverges" else out
    assert message.format(w=w) in text, text
    assert "Traceback" not in out + err
    if status == 2:
        assert err.count("\n") == 1 and err.startswith("refflow ")
    assert _listing(w) == before  # nothing written, no temporary file left


def test_every_flag_shows_its_default():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, p in sub.choices.items():
        for action in p._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert "default" in action.help or "required" in action.help, (name, action.option_strings)


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"refflow {rf.__version__}"


# =========================================================================== part 3: outputs and interruptions


def test_sample_writes_samples_and_plot_together_and_batches_do_not_change_them(work, capsys):
    a, b, plot = work / "s1.npz", work / "s2.npz", work / "s.png"
    assert cli.main(["sample", str(work / "model.npz"), "-n", "50", "--method", "rk4", "--steps", "4",
                     "--batch-size", "7", "--out", str(a), "--plot", str(plot), "--quiet"]) == 0
    assert cli.main(["sample", str(work / "model.npz"), "-n", "50", "--method", "rk4", "--steps", "4",
                     "--out", str(b), "--quiet"]) == 0
    with np.load(a) as x, np.load(b) as y:
        np.testing.assert_array_equal(x["x_0"], y["x_0"])
        # fixed steps treat every point alone: only the BLAS's summation order may differ
        np.testing.assert_allclose(x["x_1"], y["x_1"], rtol=1e-13, atol=1e-13)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()


def test_likelihood_reads_npy_points_and_batches_agree(work, capsys):
    a, b = work / "l1.npz", work / "l2.npz"
    common = ["--method", "rk4", "--n-steps", "5", "--quiet"]
    assert cli.main(["likelihood", str(work / "model.npz"), "--points", str(work / "points.npy"),
                     "--out", str(a), "--batch-size", "4", *common]) == 0
    assert cli.main(["likelihood", str(work / "model.npz"), "--points", str(work / "points.npz"),
                     "--out", str(b), *common]) == 0
    with np.load(a) as x, np.load(b) as y:
        np.testing.assert_allclose(x["log_p"], y["log_p"], rtol=1e-13, atol=1e-13)
    capsys.readouterr()


def test_a_stale_temporary_file_is_swept_by_the_next_command(work, capsys):
    stale = work / f".tmp-{_dead_pid()}-xyz-swept.npz"
    stale.write_bytes(b"x" * 4096)
    assert cli.main(["sample", str(work / "model.npz"), "-n", "5", "--steps", "2", "--quiet",
                     "--out", str(work / "swept.npz")]) == 0
    assert not stale.exists()
    capsys.readouterr()


def test_divergence_keeps_the_last_good_periodic_checkpoint(tmp_path, capsys):
    out = tmp_path / "c.npz"
    rc = cli.main(["train", "--lr", "1e10", "--steps", "30", "--hidden", "8", "--batch-size", "16",
                   "--checkpoint-every", "1", "--quiet", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and "keeps the checkpoint of step 1" in err
    _, _, state, _ = load_checkpoint(out)  # loads: finite, schema-valid
    assert state.step == 1


def test_ctrl_c_saves_a_resumable_checkpoint_and_exits_130(tmp_path):
    out = tmp_path / "c.npz"
    cmd = [sys.executable, "-m", "refflow.cli", "train", "--steps", "100000000", "--hidden", "8",
           "--batch-size", "8", "--checkpoint-every", "20", "--quiet", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Wait for an event (the first periodic checkpoint), not for a time.
        while not out.exists() and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert err.count("\n") == 1 and "resume with: refflow train --resume" in err
    _, _, state, _ = load_checkpoint(out)
    assert state.step >= 20 and f"after step {state.step} " in err
    assert [f for f in os.listdir(tmp_path)] == ["c.npz"]
