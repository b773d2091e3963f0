"""Checks of ``refflow check`` and the golden vectors (refflow.validate, refflow.golden).

The validator is itself a check of other people's code, so it must pass
refflow's own reference implementations and must flag a planted bug; the
golden vectors must be the same bytes on every run.
"""
from __future__ import annotations

import hashlib
import io
import os
import tempfile
import time
import zipfile

import numpy as np

from refflow.golden import _npz_bytes, case_arrays, write_golden
from refflow.validate import check, get_case
from refflow.verify.registry import Outcome, register

_CASE = "eight-gaussians/ot/sigma_min=0.05/d=2"


def _references(case):
    """refflow's own closed forms, wrapped in the calling conventions of ``refflow check``."""
    path, marginal = case.path, case.marginal

    def conditional(t, x, y):
        u = np.empty_like(x)
        for label in np.unique(y):
            rows = y == label
            u[rows] = case.conditional_marginal(int(label)).velocity(x[rows], t[rows])
        return u

    def guided(t, x, y, w):
        # eq 40, notes convention
        return (1.0 - w) * marginal.velocity(x, t) + w * conditional(t, x, y)

    return {
        "path": lambda x_0, x_1, t: (path.sample(x_0, x_1, t), path.pair_velocity(x_0, x_1, t)),
        "field": conditional,
        "loglik": lambda x: marginal.log_prob(x, 1.0),
        "sampler": lambda n, seed: marginal.sample(n, 1.0, seed),
        "guided": guided,
    }


def _worst_ratio(report) -> float:
    """Largest error / tolerance over the judged properties (> 1 means a failure)."""
    ratios = []
    for p in report.properties:
        if p.passed is None:
            continue
        if p.tolerance == 0:
            ratios.append(0.0 if p.error == 0 else np.inf)
        else:
            ratios.append(p.error / p.tolerance)
    return max(ratios)


def _sigma_min_dropped_path(case):
    # Planted bug: the target x_1 - x_0 of eq 37 on a path with sigma_min > 0 (eq 36).
    def path(x_0, x_1, t):
        return case.path.sample(x_0, x_1, t), x_1 - x_0

    return path


@register("validate.reference_passes", equations="14, 16, 19, 26, 29, 40", quick=True)
def check_reference_passes(rng, quick):
    case = get_case(_CASE)
    seed = int(rng.integers(2**31 - 1))
    ratios = {}
    for kind, fn in _references(case).items():
        options = {"n": 512} if kind == "field" else {}
        ratios[kind] = _worst_ratio(check(kind, fn, case, seed=seed, **options))
    control = check("path", _sigma_min_dropped_path(case), case, seed=seed)
    named = control["u_t"].causes
    return Outcome(
        compared=f"refflow's own path, field (with labels), log-likelihood, sampler and guided field "
                 f"through `refflow check` on {_CASE}: worst error/tolerance over all properties",
        error=max(ratios.values()), tolerance=1.0,
        why="each property's tolerance follows from its method (exact: the rounding bound of each row, "
            "ODE 1e-6, z-tests at family-wise rate 1e-3); the reference must meet all of them",
        control="a path whose target drops sigma_min (x_1 - x_0 with sigma_min = 0.05)",
        control_error=_worst_ratio(control),
        details={"per_kind": ratios, "control_named_cause": named},
    )


def _digest(folder):
    return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(folder))}


def _clock_stamped_bytes(arrays, when):
    # What numpy.savez does: each zip entry carries the wall-clock time of the write.
    data = _npz_bytes(arrays)
    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            stamped = zipfile.ZipInfo(info.filename, date_time=time.localtime(when)[:6])
            dst.writestr(stamped, src.read(info.filename))
    return out.getvalue()


@register("golden.reproducible", equations="16, 19, 26, 29", quick=True)
def check_golden_reproducible(rng, quick):
    cases = ["eight-gaussians/ot/sigma_min=0/d=2", "mixture/vp/sigma_min=0/d=5"]
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        write_golden(a, cases)
        write_golden(b, cases)
        first, second = _digest(a), _digest(b)
        differing = sum(first[k] != second.get(k) for k in first) + len(set(second) - set(first))
    # Control: the same arrays in archives stamped with the clock of two runs an hour apart.
    arrays = case_arrays(cases[0])
    now = time.time()
    control = int(hashlib.sha256(_clock_stamped_bytes(arrays, now)).digest()
                  != hashlib.sha256(_clock_stamped_bytes(arrays, now + 3600)).digest())
    return Outcome(
        compared=f"SHA-256 of every file of two `refflow golden` writes of {len(cases)} cases "
                 "(number of files that differ)",
        error=float(differing), tolerance=0.0,
        why="fixed seeds, sorted arrays, fixed zip dates: the bytes must be identical",
        control="the same arrays in zip archives stamped with the wall clock (as numpy.savez does), "
                "written an hour apart",
        control_error=float(control),
        details={"files": len(first)},
    )


def _rounded_path(path, dtype):
    def impl(x_0, x_1, t):
        return path.sample(x_0, x_1, t).astype(dtype), path.pair_velocity(x_0, x_1, t).astype(dtype)

    return impl


def _cancelling_path_float32(x_0, x_1, t):
    # Planted: the OT target from x_t, (x_1 - x_t) / (1 - t), in float32: exact arithmetic, unstable rounding
    x_0, x_1, t = (np.asarray(a, dtype=np.float32) for a in (x_0, x_1, t))
    tc = np.minimum(t, np.float32(1 - 2**-23))[:, None]
    x_t = (1 - tc) * x_0 + tc * x_1
    return x_t, (x_1 - x_t) / (1 - tc)


@register("validate.rounding_bounds", equations="26, 29, 35", quick=True)
def check_rounding_bounds(rng, quick):
    """Every catalog path rounded to float32 and float16 passes its per-row bound; an unstable formula does not."""
    from refflow.validate import catalog

    seed = int(rng.integers(2**31 - 1))
    worst = 0.0
    per = {}
    for case in catalog():
        for dtype in (np.float32, np.float16):
            r = check("path", _rounded_path(case.path, dtype), case, seed=seed)
            ratio = _worst_ratio(r)
            per[f"{case.path_name}/{np.dtype(dtype).name}"] = max(per.get(f"{case.path_name}/{np.dtype(dtype).name}", 0.0), ratio)
            worst = max(worst, ratio)
    ot = get_case("eight-gaussians/ot/sigma_min=0/d=2")
    control = check("path", _cancelling_path_float32, ot, seed=seed)
    # and a bound that is not loose: float32 output 1e-5 (about 170 roundoffs) too large must fail
    exact32 = _rounded_path(ot.path, np.float32)
    scaled = check("path", lambda x_0, x_1, t: tuple((1 + 1e-5) * a for a in exact32(x_0, x_1, t)), ot, seed=seed)
    return Outcome(
        compared="refflow's paths of every catalog case rounded to float32 and float16 at the output, "
                 "through `refflow check --kind path`: worst row error / row bound",
        error=worst, tolerance=1.0,
        why="the bound is 16 unit roundoffs of the output dtype times the formula's terms plus the change "
            "under perturbed inputs: a correctly rounded result is within one roundoff",
        control="both of: the OT target computed as (x_1 - x_t) / (1 - t) in float32 (exact in exact "
                "arithmetic, error u |x| / (1 - t) near t = 1), and the float32 OT path 1e-5 too large "
                "(about 170 roundoffs: a bound looser than that would pass it); the smaller of the two",
        control_error=min(_worst_ratio(control), _worst_ratio(scaled)),
        details={"per_path_and_dtype": per, "control_causes": control["u_t"].causes,
                 "scaled_control_ratio": _worst_ratio(scaled)},
    )


@register("validate.cannot_be_fooled", equations="26, 29", quick=True)
def check_cannot_be_fooled(rng, quick):
    """An implementation that changes its inputs in place fails; one that draws its own noise is judged by its law."""
    case = get_case(_CASE)
    path = case.path
    seed = int(rng.integers(2**31 - 1))

    def own_noise(x_0, x_1, t):
        noise = np.random.default_rng(seed + 1).standard_normal(x_0.shape)
        return path.sample(noise, x_1, t), path.pair_velocity(noise, x_1, t)

    def in_place(x_0, x_1, t):
        x_0 *= 2.0
        return path.sample(x_0, x_1, t), path.pair_velocity(x_0, x_1, t)

    def own_noise_wrong_scale(x_0, x_1, t):
        noise = 1.5 * np.random.default_rng(seed + 1).standard_normal(x_0.shape)
        return path.sample(noise, x_1, t), path.pair_velocity(noise, x_1, t)

    good = check("path", own_noise, case, seed=seed)
    fooled = check("path", in_place, case, seed=seed)
    wrong = check("path", own_noise_wrong_scale, case, seed=seed)
    # pass: the own-noise path passes and the in-place one fails with its cause named
    error = _worst_ratio(good) + (0.0 if (not fooled.passed and "modified_inputs" in fooled["inputs"].causes) else 2.0)
    return Outcome(
        compared="a correct path that draws its own noise (must pass, judged by x_t_law and u_t_given_x_t) "
                 "and one that doubles x_0 in place (must fail with 'modified_inputs'): worst error/tolerance "
                 "of the first, plus 2 if the second is not caught",
        error=error, tolerance=1.0,
        why="the reference is computed on refflow's own copy before the call; own noise is judged by a "
            "z-test at family-wise rate 1e-3",
        control="a path that draws its own noise with standard deviation 1.5 instead of 1",
        control_error=_worst_ratio(wrong),
        details={"own_noise_passed": good.passed, "in_place_causes": fooled["inputs"].causes},
    )
