# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Tutorial 1: from a mixture target to a trained model, samples, likelihoods and a report
#
# We train a flow-matching model on a 2-D Gaussian mixture whose marginal path
# and field are known in closed form, so that every step can be compared with
# the exact answer:
#
# 1. the target $q_1$ and the OT path (eq 34, $\sigma_{min} = 0$);
# 2. the closed-form marginal field $u_t(x)$ (eq 19): the field training should find;
# 3. training by Algorithm 1 (eq 37);
# 4. sampling by Algorithm 2 (and RK4), judged by the exact $\log q_1$;
# 5. likelihoods by the CNF change of variables (eq 14);
# 6. a verification report, `refflow verify` from Python.
#
# This page is the script `docs/tutorials/01_mixture_to_model.py` (jupytext
# percent format), executed when the docs are built. Run it yourself with
# `python docs/tutorials/01_mixture_to_model.py` or open it as a notebook with
# jupytext. With `REFFLOW_FAST=1` (as in CI and in `tests/test_tutorials.py`)
# it runs in seconds with a handful of training steps: the numbers are then not
# meaningful, only the plumbing is; the full run trains for 2000 steps and
# takes minutes. Files go to `tutorial-01/` in the current directory.

# %% tags=["hide-input"]
# `show(fig)`: save the figure under OUT and, in a notebook (the docs build
# runs this page as one), display it too. Not part of the method.
import io
import os
import pathlib

import matplotlib.pyplot as plt


def show(fig, name):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    (OUT / name).write_bytes(buf.getvalue())
    try:
        from IPython import get_ipython
        from IPython.display import Image, display
    except ImportError:
        return
    if get_ipython() is not None:
        display(Image(buf.getvalue()))


# %%
import numpy as np

import refflow as rf
from refflow import cnf
from refflow.nn import MLP
from refflow.plotting import plot_field_comparison, plot_marginal_fields, plot_samples
from refflow.solvers import sample
from refflow.train import train
from refflow.verify.registry import run_checks
from refflow.verify.report import summary_line, write_report

FAST = os.environ.get("REFFLOW_FAST", "") not in ("", "0")
OUT = pathlib.Path("tutorial-01")
OUT.mkdir(exist_ok=True)

STEPS = 30 if FAST else 2000          # Adam steps of Algorithm 1
HIDDEN = (32, 32) if FAST else (128, 128, 128)
N_POINTS = 200 if FAST else 4000      # samples and evaluation points
rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. Target and path
#
# `eight_gaussians()` is a `GaussianMixture` (eight isotropic components on a
# circle of radius 4, labels 0–7). `OTPath(0.0)` is $\alpha_t = t$,
# $\sigma_t = 1 - t$. Their marginal (eq 16, 19) is available in closed form:
# the figure shows the density $p_t$ and streamlines of the field $u_t$ from
# the noise at $t = 0$ to the data at $t = 1$.

# %%
target = rf.eight_gaussians()
path = rf.OTPath(sigma_min=0.0)
marginal = target.marginal(path)
print(target, path)
print("ends of the path:", path.boundary())
show(plot_marginal_fields(marginal), "marginal.png")

# %% [markdown]
# ## 2. The field training should find
#
# By the CFM/FM gradient identity (eq 21–24), regressing onto the conditional
# target $x_1 - x_0$ has the same expected gradient as regressing onto the
# marginal field of eq 19. Here that field is exact:

# %%
t = rng.uniform(size=5)
x_t = marginal.sample(5, t, rng)
print("u_t(x) =", marginal.velocity(x_t, t))
print("div u_t(x) =", marginal.divergence(x_t, t))

# %% [markdown]
# ## 3. Training (Algorithm 1)
#
# Every step draws $x_1 \sim q_1$, $t \sim U(0, 1)$, $x_0 \sim \mathcal N(0, I)$ and
# takes an Adam step on $\lVert u_\theta(t, (1-t)x_0 + t x_1) - (x_1 - x_0)\rVert^2$.
# An exponential moving average of the weights (`ema_decay`) smooths the result.

# %%
model = MLP(2, HIDDEN, "silu")
state = train(model, target, path, steps=STEPS, batch_size=256, lr=2e-3, rng=12345, ema_decay=0.99)
params = state.final_params
print(f"{state.step} steps, last losses {np.round(state.losses[-3:], 3)}")
if FAST:
    print(f"REFFLOW_FAST is set: {STEPS} steps only, so the model below is barely trained and the "
          "numbers and figures show the plumbing, not the method; run without it for a trained model")

# %% [markdown]
# How close is the learned field to eq 19? The relative L2 error over
# $t \sim U(0, 1)$, $x \sim p_t$ is eq 15 normalised by the size of the field
# (the check `train.learned_field` requires it below 0.05 after full training).

# %%
t = rng.uniform(size=N_POINTS)
x = marginal.sample(N_POINTS, t, rng)
u_true = marginal.velocity(x, t)
u_model = model.apply(params, t, x)
rel_l2 = np.mean(np.sum((u_model - u_true) ** 2, axis=1)) / np.mean(np.sum(u_true**2, axis=1))
print(f"relative L2 error of the learned field: {rel_l2:.3f}")
show(plot_field_comparison(lambda t, x: model.apply(params, t, x), marginal), "fields.png")

# %% [markdown]
# ## 4. Sampling (Algorithm 2)
#
# `sample` draws $x_0 \sim \mathcal N(0, I)$ and integrates from $t = 0$ to 1.
# `method="euler"` is Algorithm 2 itself; RK4 needs fewer steps for the same
# accuracy. The samples are judged by their mean exact log-density under $q_1$,
# against that of true samples.

# %%
field = model.field(params)
euler = sample(field, N_POINTS, 2, rng, method="euler", n_steps=100)
rk4 = sample(field, N_POINTS, 2, rng, method="rk4", n_steps=25)
reference = target.sample(N_POINTS, rng)
for name, sol in (("Euler, 100 steps", euler), ("RK4, 25 steps", rk4)):
    gap = np.mean(target.log_prob(sol.x)) - np.mean(target.log_prob(reference))
    print(f"{name}: {sol.nfe} field evaluations, mean log q_1 gap {gap:+.3f} nats")
show(plot_samples(rk4.x, target, title="RK4 samples of the trained model over q_1"), "samples.png")

# %% [markdown]
# ## 5. Likelihoods (eq 14)
#
# `cnf.log_prob` integrates $\dot x = u_t(x)$, $\dot\ell = -\nabla\cdot u_t(x)$
# from $t = 1$ back to $t = 0$ and returns
# $\log p_0(x_0) - \int_0^1 \nabla\cdot u_t\,dt$. With the MLP's exact divergence
# (`cnf.mlp_field`) this is the model's own density.
#
# First a sanity check that needs no training: driven by the *closed-form*
# marginal field, eq 14 must reproduce the closed-form $\log p_1$ to the ODE
# tolerance.

# %%
x_eval = reference[: min(64, N_POINTS)]
exact_field = cnf.marginal_field(marginal)
res = cnf.log_prob(exact_field, x_eval, method="DOP853", rtol=1e-10, atol=1e-10)
print("eq 14 vs closed form, max |error|:", np.max(np.abs(res.log_p - marginal.log_prob(x_eval, 1.0))))

# %% [markdown]
# Now the trained model. Its log-likelihood on true samples approaches the
# target's as training improves; the Hutchinson estimate (probes fixed along
# each trajectory) is unbiased for it and reports a standard error.

# %%
model_field = cnf.mlp_field(model, params)
exact = cnf.log_prob(model_field, x_eval, method="DOP853", rtol=1e-7, atol=1e-9)
hutch = cnf.log_prob(model_field, x_eval, divergence="hutchinson", n_probes=8, rng=rng,
                     method="rk4", n_steps=20 if FAST else 100)
print(f"mean log p_model(x) = {exact.log_p.mean():.3f} (exact divergence, {exact.nfe} evaluations)")
print(f"mean log p_model(x) = {hutch.log_p.mean():.3f} ± {np.mean(hutch.log_p_stderr):.3f} per point (Hutchinson)")
print(f"mean log q_1(x)     = {target.log_prob(x_eval).mean():.3f} (the target)")

# %% [markdown]
# ## 6. A verification report
#
# `refflow verify` runs the registered checks — each compares code with ground
# truth *and* runs a planted bug that the same comparison must reject — and
# writes `index.html`, `report.md`, `report.json` and figures. From the
# command line:
#
# ```bash
# refflow verify --quick --out refflow-report
# ```
#
# From Python, a subset:

# %%
only = "paths.boundary,paths.conditional_velocity" if FAST else "paths.*,targets.continuity,cnf.round_trip,guidance.eq40"
results = run_checks(quick=True, only=only)
write_report(results, str(OUT / "report"))
for r in results:
    print(f"{r.name:32s} error {r.error:.2e} <= {r.tolerance:.1e}; control {r.control_error:.2e} "
          f"{'caught' if r.control_caught else 'NOT caught'}")
print(summary_line(results), "- report in", OUT / "report")
assert all(r.passed for r in results)
