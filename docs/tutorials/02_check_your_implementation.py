# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Tutorial 2: checking your own implementation with `refflow check`
#
# You have written flow matching in PyTorch, JAX or plain NumPy and want to know
# whether it is *right*, not just whether the loss goes down. `refflow check`
# calls your function on inputs it draws, compares the outputs with closed-form
# ground truth on a catalog *case* (a Gaussian-mixture target, a path,
# $\sigma_{min}$, a dimension), and — when something is off — compares your
# output with planted wrong variants to name the *likely cause*.
#
# Five kinds of function can be checked (all arrays NumPy; torch tensors are
# accepted as outputs):
#
# | kind | your function | compared with |
# |---|---|---|
# | `path` | `(x_0, x_1, t) -> (x_t, u_t)` | eq 26 and eq 29/35 |
# | `field` | `(t, x) -> u` or `(t, x, y) -> u` | the marginal field, eq 19 (eq 38 with labels) |
# | `loglik` | `x -> log p_1(x)` | the closed-form $\log p_1$ (eq 14, 16) |
# | `sampler` | `(n, seed) -> x` | two-sample tests against exact draws |
# | `guided` | `(t, x, y, w) -> u` | eq 40, in either weighting convention |
#
# `t` arrives as an array of shape `(n,)`, one time per row. Each failing
# report names the likely cause (`sigma_min_dropped`, `nearest_component`,
# `divergence_sign`, ...). See also
# [checking your implementation](../checking-your-implementation.md).
#
# This page is the script `docs/tutorials/02_check_your_implementation.py`,
# executed when the docs are built; run it with `python` or open it with
# jupytext. `REFFLOW_FAST=1` (CI, `tests/test_tutorials.py`) uses few rows per
# check and runs in seconds. Files go to `tutorial-02/`.

# %%
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np

from refflow import validate

FAST = os.environ.get("REFFLOW_FAST", "") not in ("", "0")
OUT = pathlib.Path("tutorial-02")
OUT.mkdir(exist_ok=True)
N = 64 if FAST else None          # rows per check (None: the defaults of refflow check)
opts = {} if N is None else {"n": N}

# %% [markdown]
# ## The catalog
#
# Every case has every quantity in closed form. `loglik` and `sampler` are only
# offered where the path starts exactly at $\mathcal N(0, I)$ (not VE or VP,
# see the errata).

# %%
for case in validate.catalog()[:6]:
    print(f"{case.name:45s} kinds: {', '.join(case.kinds)}")
CASE = "eight-gaussians/ot/sigma_min=0.05/d=2"

# %% [markdown]
# ## 1. A conditional path
#
# The OT path with $\sigma_{min}$ (eq 34–35): $x_t = (1 - (1-\sigma_{min})t)\,x_0 + t\,x_1$
# and target $u_t = x_1 - (1 - \sigma_{min})x_0$. A correct version, and a
# classic slip — the target written without $\sigma_{min}$:

# %%
SIGMA_MIN = 0.05


def my_path(x_0, x_1, t):
    t = t[:, None]
    x_t = (1 - (1 - SIGMA_MIN) * t) * x_0 + t * x_1
    return x_t, x_1 - (1 - SIGMA_MIN) * x_0


def my_path_buggy(x_0, x_1, t):
    t = t[:, None]
    x_t = (1 - (1 - SIGMA_MIN) * t) * x_0 + t * x_1
    return x_t, x_1 - x_0                     # sigma_min dropped from the target


print(validate.check("path", my_path, CASE, **opts).table())
report = validate.check("path", my_path_buggy, CASE, **opts)
print(report.table())
print("passed:", report.passed, "| failing:", [p.name for p in report.failed])

# %% [markdown]
# ## 2. A velocity field
#
# Suppose you wrote the marginal field of eq 19 for an isotropic Gaussian
# mixture yourself — or trained a network and want to know how far it is from
# it. For components $\mathcal N(m_k, s^2 I)$ on the OT path with $\sigma_{min} = 0.05$:
# $u_t(x) = \sum_k r_k(x)\big(m_k + \frac{\sigma_t\sigma_t' + t s^2}{t^2 s^2 + \sigma_t^2}(x - t m_k)\big)$,
# with responsibilities $r_k \propto \mathcal N(x \mid t m_k, (t^2 s^2 + \sigma_t^2) I)$.
# The buggy variant uses the nearest component instead of the weighted average.

# %%
case = validate.get_case(CASE)
MEANS = case.target.means                       # (8, 2)
S2 = case.target.covariances[0, 0, 0]           # the common variance s^2


def my_field(t, x, nearest=False):
    t = t[:, None, None]                                         # (n, 1, 1)
    sigma = 1 - (1 - SIGMA_MIN) * t
    d_sigma = -(1 - SIGMA_MIN)
    var = t**2 * S2 + sigma**2                                   # (n, 1, 1)
    diff = x[:, None, :] - t * MEANS[None]                       # (n, K, d)
    log_r = -0.5 * np.sum(diff**2, axis=2) / var[:, :, 0]       # equal weights and variances
    if nearest:
        r = np.eye(len(MEANS))[np.argmax(log_r, axis=1)]
    else:
        r = np.exp(log_r - log_r.max(axis=1, keepdims=True))
        r /= r.sum(axis=1, keepdims=True)
    u_k = MEANS[None] + (sigma * d_sigma + t * S2) / var * diff  # (n, K, d)
    return np.einsum("nk,nkd->nd", r, u_k)


print(validate.check("field", my_field, CASE, **opts).table())
print(validate.check("field", lambda t, x: my_field(t, x, nearest=True), CASE, **opts).table())

# %% [markdown]
# A *trained* network is not exact: give `threshold=` to judge the relative L2
# error $\mathbb E\lVert u - u^*\rVert^2 / \mathbb E\lVert u^*\rVert^2$ instead (the
# `u_l2` row), e.g. `refflow check --kind field ... --threshold 0.05`.
#
# ## 3. A log-likelihood (eq 14)
#
# A CNF likelihood integrates the field and its divergence backwards from
# $t = 1$ to $t = 0$. Here is a small RK4 implementation; for the field we use
# refflow's closed-form marginal (it stands in for your trained model and its
# exact divergence). The buggy variant adds the divergence integral instead of
# subtracting it.

# %%
marginal = case.marginal
STEPS = 40 if FAST else 200


def my_loglik(x, sign=-1.0):
    def rhs(t, x):
        out = marginal.evaluate(x, np.full(x.shape[0], t), ("velocity", "divergence"))
        return out["velocity"], -out["divergence"]

    x, ell, dt = np.array(x, dtype=np.float64), np.zeros(len(x)), -1.0 / STEPS
    for k in range(STEPS):                       # RK4 from t = 1 to t = 0
        t, t_mid, t_end = 1.0 - k / STEPS, 1.0 - (k + 0.5) / STEPS, max(1.0 - (k + 1) / STEPS, 0.0)
        k1 = rhs(t, x)
        k2 = rhs(t_mid, x + dt / 2 * k1[0])
        k3 = rhs(t_mid, x + dt / 2 * k2[0])
        k4 = rhs(t_end, x + dt * k3[0])
        x = x + dt / 6 * (k1[0] + 2 * k2[0] + 2 * k3[0] + k4[0])
        ell = ell + dt / 6 * (k1[1] + 2 * k2[1] + 2 * k3[1] + k4[1])
    # ell = log p_0(x_0) - log p_1(x_1) = int_0^1 div u dt
    log_p0 = -0.5 * np.sum(x**2, axis=1) - x.shape[1] / 2 * np.log(2 * np.pi)
    return log_p0 + sign * ell


# RK4 with 200 steps meets the 1e-6 tolerance of a float64 likelihood; the fast
# run's 40 steps do not, and its first table shows the resulting ODE error.
loglik_opts = {} if N is None else {"n": 16}
print(validate.check("loglik", my_loglik, CASE, **loglik_opts).table())
print(validate.check("loglik", lambda x: my_loglik(x, sign=+1.0), CASE, **loglik_opts).table())

# %% [markdown]
# ## 4. Guidance (eq 40): which convention is yours?
#
# The notes weight the fields as $(1-w)\,u_\varnothing + w\,u_y$; the
# facebookresearch/flow_matching examples as $(1 + w)\,u_y - w\,u_\varnothing$.
# `refflow check` detects which one your function follows (`--convention auto`)
# and checks it; declaring the wrong one is reported as `guidance_off_by_one`.


# %%
def class_field(t, x, y):
    u = np.empty_like(x)
    for label in np.unique(y):
        rows = y == label
        u[rows] = case.conditional_marginal(int(label)).velocity(x[rows], t[rows])
    return u


def my_guided(t, x, y, w):                       # flow_matching's weighting
    return (1 + w) * class_field(t, x, y) - w * class_field(t, x, np.full_like(y, -1))


report = validate.check("guided", my_guided, CASE, **opts)
print(report.table())
print("follows:", report["convention"].details["follows"])

# %% [markdown]
# ## 5. The same from the command line
#
# `--impl` takes `package.module:function` or `file.py:function`; the current
# directory is importable. The exit status is 0 when every property passes, 1
# when one fails, 2 for a usage error — so it fits in CI. `--json` writes the
# report as JSON.

# %%
(OUT / "my_impl.py").write_text(textwrap.dedent('''
    SIGMA_MIN = 0.05

    def ot_path(x_0, x_1, t):
        t = t[:, None]
        return (1 - (1 - SIGMA_MIN) * t) * x_0 + t * x_1, x_1 - (1 - SIGMA_MIN) * x_0
'''))
cmd = [sys.executable, "-m", "refflow.cli", "check", "--kind", "path", "--impl", "my_impl.py:ot_path",
       "--case", CASE, "--json", "path-report.json"]
if N is not None:
    cmd += ["--n", str(N)]
print("$ refflow", " ".join(cmd[3:]))
proc = subprocess.run(cmd, cwd=OUT, capture_output=True, text=True)
print(proc.stdout or proc.stderr)
print("exit status:", proc.returncode)
assert proc.returncode == 0, proc.stderr

# %% [markdown]
# For an implementation in another language, `refflow golden --out DIR` writes
# the inputs and closed-form outputs of every case as `.npz` files with a
# `manifest.json` of conventions; the bytes are the same on every run.
#
# ## Who checks the checker?
#
# `refflow check` is itself under test in `refflow verify`:
#
# - `validate.reference_passes` runs refflow's own closed-form path, field (with
#   labels), log-likelihood, sampler and guided field through `refflow check` and
#   requires every property within its tolerance (worst error/tolerance
#   $\le 1$). Negative control: a path whose target drops $\sigma_{min}$, which
#   must fail, and be named `sigma_min_dropped`.
#   `refflow verify --only validate.reference_passes`.
# - `golden.reproducible` writes the golden vectors of two cases twice and
#   requires identical SHA-256 digests for every file. Negative control: the same
#   arrays in zip archives stamped with the wall clock, as `numpy.savez` does,
#   written an hour apart.
