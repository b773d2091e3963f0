"""Calibration of `refflow check`: false alarms on correct code, flags on wrong code, power.

Runs every kind over many seeds on implementations known to be correct —
refflow's own paths, fields and guided fields in float64 and rounded at the
output to float32 and float16; the natural formulas of the PyTorch libraries
(sqrt(1 - exp(-T)) for VP, 1 - t^2 in float32, a float32/float16 mixture field,
and flow_matching / TorchCFM themselves when installed) — and counts false
alarms (goal: 0 for the exact kinds, at most the nominal rate 1e-3 for the
statistical ones).  Then every entry of the bug zoo (tests/bug_zoo.py) over
the same seeds: the fraction flagged and the fraction with its cause named
(goal >= 99%).  Then a power table for the sampler and trained-field kinds:
the smallest shift of one component's mean, weight and scale flagged with
95% probability at n = 2,000 and n = 20,000.

    python benchmarks/calibrate_check.py --seeds 100            # everything
    python benchmarks/calibrate_check.py --seeds 20 --only exact
    python benchmarks/calibrate_check.py --json calibration.json

The margin column is the largest worst-row error / row bound seen (below 1
passes): how far from a false alarm the correct implementations stay.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import bug_zoo  # noqa: E402

from refflow.targets import GaussianMixture  # noqa: E402
from refflow.validate import catalog, check, get_case  # noqa: E402

DTYPES = (np.float64, np.float32, np.float16)


def _worst_ratio(report) -> float:
    ratios = [p.details["worst_ratio"] for p in report.properties
              if p.passed is not None and "worst_ratio" in p.details]
    return max(ratios) if ratios else 0.0


# ---------------------------------------------------------------------------
# Correct implementations
# ---------------------------------------------------------------------------


def _rounded_path(path, dtype):
    def impl(x_0, x_1, t):
        return path.sample(x_0, x_1, t).astype(dtype), path.pair_velocity(x_0, x_1, t).astype(dtype)
    return impl


def _rounded_field(case, dtype):
    def impl(t, x):
        return case.marginal.velocity(x, t).astype(dtype)
    return impl


def _rounded_guided(case, dtype):
    def impl(t, x, y, w):
        u_null = case.marginal.velocity(x, t)
        u_cond = np.empty_like(x)
        for label in np.unique(y):
            rows = y == label
            u_cond[rows] = case.conditional_marginal(int(label)).velocity(x[rows], t[rows])
        return ((1 - w) * u_null + w * u_cond).astype(dtype)
    return impl


def natural_mixture_field(dtype, sigma_min=bug_zoo.SIGMA_MIN):
    """The eight-Gaussians OT field written the plain way, every operation in ``dtype``."""
    means, std2 = bug_zoo.MEANS.astype(dtype), dtype(bug_zoo.STD**2)
    one, s_min = dtype(1), dtype(sigma_min)

    def impl(t, x):
        t = t.astype(dtype)[:, None]
        x = x.astype(dtype)
        sigma, d_sigma = one - (one - s_min) * t, -(one - s_min)
        var = t**2 * std2 + sigma**2
        z = x[:, None, :] - t[:, :, None] * means[None]
        logits = dtype(-0.5) * np.sum(z**2, axis=2) / var
        r = np.exp(logits - logits.max(axis=1, keepdims=True))
        r /= r.sum(axis=1, keepdims=True)
        gain = (sigma * d_sigma + t * std2) / var
        return np.einsum("nk,nkd->nd", r, means[None] + gain[:, :, None] * z)
    return impl


def _peer_paths():
    """flow_matching's schedulers and TorchCFM's matchers in four precisions, when installed."""
    out = {}
    try:
        import torch
        from flow_matching.path import AffineProbPath
        from flow_matching.path import scheduler as fm
    except ImportError:
        return out
    schedulers = {
        "ot": (fm.CondOTScheduler(), "eight-gaussians/ot/sigma_min=0/d=2"),
        "vp": (fm.VPScheduler(), "eight-gaussians/vp/sigma_min=0/d=2"),
        "linear-vp": (fm.LinearVPScheduler(), "eight-gaussians/linear-vp/sigma_min=0/d=2"),
        "cosine": (fm.CosineScheduler(), "eight-gaussians/cosine/sigma_min=0/d=2"),
        "polynomial": (fm.PolynomialConvexScheduler(2), "eight-gaussians/polynomial/sigma_min=0/d=2"),
        "vp-d5": (fm.VPScheduler(), "mixture/vp/sigma_min=0/d=5"),
    }
    for name, (sched, case) in schedulers.items():
        path = AffineProbPath(sched)
        for dt in ("float64", "float32", "float16", "bfloat16"):
            def impl(x_0, x_1, t, path=path, dt=getattr(torch, dt)):
                s = path.sample(x_0=torch.from_numpy(x_0).to(dt), x_1=torch.from_numpy(x_1).to(dt),
                                t=torch.from_numpy(t).to(dt))
                return s.x_t, s.dx_t
            out[f"flow_matching {name} {dt}"] = ("path", impl, case)
    try:
        from torchcfm import conditional_flow_matching as cfm
    except ImportError:
        return out
    for name, matcher, case in [("ConditionalFlowMatcher(0)", cfm.ConditionalFlowMatcher(0.0), "eight-gaussians/ot/sigma_min=0/d=2"),
                                ("VariancePreservingCFM(0)", cfm.VariancePreservingConditionalFlowMatcher(0.0),
                                 "eight-gaussians/cosine/sigma_min=0/d=2"),
                                ("TargetCFM(0), own noise", cfm.TargetConditionalFlowMatcher(0.0),
                                 "eight-gaussians/ot/sigma_min=0/d=2")]:
        for dt in ("float64", "float32"):
            def impl(x_0, x_1, t, m=matcher, dt=getattr(torch, dt)):
                _, x_t, u_t = m.sample_location_and_conditional_flow(
                    torch.from_numpy(x_0).to(dt), torch.from_numpy(x_1).to(dt), t=torch.from_numpy(t).to(dt))
                return x_t, u_t
            out[f"torchcfm {name} {dt}"] = ("path", impl, case)
    return out


def correct_implementations(field_n):
    """name -> (kind, impl, case, options) of implementations that must pass."""
    impls = {}
    for case in catalog():
        for dt in DTYPES:
            tag = np.dtype(dt).name
            impls[f"refflow path {case.name} {tag}"] = ("path", _rounded_path(case.path, dt), case, {})
            impls[f"refflow field {case.name} {tag}"] = ("field", _rounded_field(case, dt), case, {"n": field_n})
            if "guided" in case.kinds:
                impls[f"refflow guided {case.name} {tag}"] = ("guided", _rounded_guided(case, dt), case, {"n": 512})
    for name in ("ot_path", "ot_path_float32", "vp_path", "vp_path_naive_sigma", "linear_vp_path_float32",
                 "ot_path_float16", "ot_path_own_noise", "ot_field", "ot_field_conditional",
                 "guided_notes", "guided_flow_matching"):
        kind, case, options = bug_zoo.REFERENCES[name]
        impls[f"zoo reference {name}"] = (kind, getattr(bug_zoo, name), case, dict(options))
    for dt in (np.float32, np.float16):
        impls[f"natural mixture field {np.dtype(dt).name}"] = ("field", natural_mixture_field(dt), bug_zoo.OT_MIN,
                                                               {"n": field_n})
    for name, (kind, impl, case) in _peer_paths().items():
        impls[name] = (kind, impl, case, {})
    return impls


def statistical_implementations():
    return {
        "exact sampler": ("sampler", bug_zoo.exact_sampler, bug_zoo.OT, {}),
        "Hutchinson log-likelihood, probe per step": ("loglik", bug_zoo.hutchinson_loglik_per_step, bug_zoo.OT,
                                                      {"n": 32}),
    }


# ---------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------


def false_alarms(impls, seeds, log):
    rows = []
    for name, (kind, impl, case, options) in impls.items():
        alarms, margin, t0 = 0, 0.0, time.perf_counter()
        first = None
        for seed in seeds:
            report = check(kind, impl, case, seed=seed, **options)
            margin = max(margin, _worst_ratio(report))
            if not report.passed:
                alarms += 1
                first = first or (seed, [(p.name, p.error, p.tolerance, p.causes) for p in report.failed])
        rows.append({"implementation": name, "kind": kind, "seeds": len(seeds), "false_alarms": alarms,
                     "margin": margin, "seconds": time.perf_counter() - t0, "first_alarm": first})
        log(f"{alarms:4d}/{len(seeds)}  margin {margin:6.3f}  {name}" + (f"   first: {first}" if first else ""))
    return rows


def zoo(seeds, log):
    rows = []
    for name, (kind, case, options, prop, cause) in bug_zoo.ZOO.items():
        flagged = named = 0
        for seed in seeds:
            report = check(kind, getattr(bug_zoo, name), case, seed=seed, **options)
            hit = (not report.passed) and report[prop].passed is False
            flagged += hit
            named += hit and (cause is None or cause in report[prop].causes)
        rows.append({"bug": name, "kind": kind, "property": prop, "cause": cause, "seeds": len(seeds),
                     "flagged": flagged / len(seeds), "cause_named": named / len(seeds)})
        log(f"flagged {flagged:4d}/{len(seeds)}  cause named {named:4d}/{len(seeds)}  {name} ({prop}, {cause})")
    return rows


def _shifted_target(target: GaussianMixture, what: str, size: float) -> GaussianMixture:
    """Component 0 changed: its mean moved by ``size`` standard deviations, its weight scaled by
    1 + size (renormalised), or its standard deviation scaled by 1 + size."""
    w, m, c = target.weights.copy(), target.means.copy(), target.covariances.copy()
    std0 = math.sqrt(float(np.mean(np.diag(c[0]))))
    if what == "mean":
        m[0, 0] += size * std0
    elif what == "weight":
        w[0] *= 1.0 + size
        w /= w.sum()
    elif what == "scale":
        c[0] *= (1.0 + size) ** 2
    return GaussianMixture(w, m, c, target.labels)


def _flag_rate(kind, what, size, n, seeds, case):
    wrong = _shifted_target(case.target, what, size)
    if kind == "sampler":
        def impl(k, seed):
            return wrong.sample(k, np.random.default_rng([seed, 7]))
        options = {"n": n}
    else:
        marginal = wrong.marginal(case.path)

        def impl(t, x):
            return marginal.velocity(x, t)
        options = {"n": n, "threshold": TRAINED_FIELD_THRESHOLD}
    return float(np.mean([not check(kind, impl, case, seed=s, **options).passed for s in seeds]))


TRAINED_FIELD_THRESHOLD = 1e-2
"""The relative L2 threshold of the trained-field power table."""

POWER_GRID = {
    "mean": (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5),
    "weight": (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5),
    "scale": (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0),
}


def power(seeds, log, sizes=(2000, 20000)):
    case = get_case(bug_zoo.OT)
    rows = []
    for kind in ("sampler", "field"):
        for what, grid in POWER_GRID.items():
            for n in sizes:
                smallest, rates = None, {}
                for size in grid:
                    rates[size] = _flag_rate(kind, what, size, n, seeds, case)
                    if rates[size] >= 0.95:
                        smallest = size
                        break
                rows.append({"kind": kind, "change": what, "n": n, "seeds": len(seeds),
                             "smallest_flagged_95": smallest, "rates": rates})
                log(f"{kind:7s} {what:6s} n={n:6d}: smallest change flagged in >= 95% of {len(seeds)} seeds: "
                    f"{smallest}   rates {rates}")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=100, help="seeds per implementation (default 100)")
    parser.add_argument("--power-seeds", type=int, default=40, help="seeds per point of the power table (default 40)")
    parser.add_argument("--field-n", type=int, default=1024, help="rows of each field check (default 1024)")
    parser.add_argument("--only", choices=("exact", "statistical", "zoo", "power"), action="append",
                        help="run only these parts (repeatable; default all)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    parts = args.only or ["exact", "statistical", "zoo", "power"]
    seeds = list(range(args.seeds))
    results = {"seeds": args.seeds}

    def log(line):
        print(line, flush=True)

    if "exact" in parts:
        log(f"== false alarms of correct implementations over {args.seeds} seeds (exact kinds)")
        results["exact"] = false_alarms(correct_implementations(args.field_n), seeds, log)
        total = sum(r["false_alarms"] for r in results["exact"])
        log(f"   total false alarms: {total} in {sum(r['seeds'] for r in results['exact'])} checks; "
            f"largest margin {max(r['margin'] for r in results['exact']):.3f}")
    if "statistical" in parts:
        log(f"== false alarms of correct stochastic implementations over {args.seeds} seeds "
            "(nominal family-wise rate 1e-3)")
        results["statistical"] = false_alarms(statistical_implementations(), seeds, log)
    if "zoo" in parts:
        log(f"== the bug zoo over {args.seeds} seeds")
        results["zoo"] = zoo(seeds, log)
        log(f"   smallest flag rate {min(r['flagged'] for r in results['zoo']):.2f}, "
            f"smallest cause-named rate {min(r['cause_named'] for r in results['zoo']):.2f}")
    if "power" in parts:
        log(f"== power: smallest change of component 0 flagged with probability >= 0.95 "
            f"({args.power_seeds} seeds per point; field threshold {TRAINED_FIELD_THRESHOLD})")
        results["power"] = power(list(range(args.power_seeds)), log)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
