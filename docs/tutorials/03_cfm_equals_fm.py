# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Tutorial 3: the CFM and FM gradients are the same, seen in numbers
#
# Flow matching wants to regress a model $u_\theta(t, x)$ onto the *marginal*
# field $u_t(x)$, which is unknown in practice:
#
# $$\mathcal L_{FM}(\theta) = \mathbb E_{t,\;x \sim p_t}\,\lVert u_\theta(t, x) - u_t(x)\rVert^2 .$$
#
# Conditional flow matching regresses instead onto the *conditional* field of a
# pair, which is known: for the OT path, $x_t = (1-t)\,x_0 + t\,x_1$ and the
# target is $x_1 - x_0$,
#
# $$\mathcal L_{CFM}(\theta) = \mathbb E_{t,\;x_0,\;x_1}\,\lVert u_\theta(t, x_t) - (x_1 - x_0)\rVert^2 .$$
#
# Expanding both squares, the terms that depend on $\theta$ are
# $\lVert u_\theta\rVert^2$ (the same in both) and the cross terms
# $-2\langle u_\theta, u_t(x \mid x_1)\rangle$ and $-2\langle u_\theta, u_t(x)\rangle$,
# which have the same expectation because the marginal field is the posterior
# average of the conditional one, $u_t(x) = \mathbb E[u_t(x \mid x_1) \mid x_t = x]$.
# So the two losses differ by a constant and **their gradients are equal**
# (see [flow matching](../flow-matching.md)). On a finite batch they are not
# equal: the difference is a mean of $N$ zero-mean vectors and shrinks like
# $N^{-1/2}$. This tutorial measures exactly that, on a target where $u_t(x)$ is
# known in closed form. `REFFLOW_FAST=1` uses smaller batches.

# %% tags=["hide-input"]
# `show(fig)`: in a notebook (the docs build runs this page as one) display the
# figure; run as a script, save it under OUT. Not part of the method.
import io
import os
import pathlib

import matplotlib.pyplot as plt

OUT = pathlib.Path("tutorial-03")


def show(fig, name):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    try:
        from IPython import get_ipython
        from IPython.display import Image, display
    except ImportError:
        get_ipython = None
    if get_ipython is not None and get_ipython() is not None:
        display(Image(buf.getvalue()))
    else:
        OUT.mkdir(exist_ok=True)
        (OUT / name).write_bytes(buf.getvalue())


# %%
import numpy as np
from autograd import grad

import refflow as rf
from refflow.figures import plot_rate
from refflow.gradients import exact_cfm_gradient
from refflow.losses import cfm_loss, fm_loss
from refflow.nn import MLP

FAST = os.environ.get("REFFLOW_FAST", "") not in ("", "0")
SIZES = [64, 256, 1024, 4096] if FAST else [64, 256, 1024, 4096, 16384]
REPEATS = 4 if FAST else 8
rng = np.random.default_rng(0)

target = rf.eight_gaussians()
path = rf.OTPath(sigma_min=0.0)
marginal = target.marginal(path)          # closed-form p_t and u_t (eq 16, 19)
model = MLP(2, (32, 32), "silu")
params = model.init_params(rng)           # any theta will do: the identity holds for all


# %% [markdown]
# ## Both gradients on one batch
#
# One draw of $(t, x_0, x_1)$; both losses are evaluated at the *same* points
# $x_t$ (common random numbers), so what differs is only the regression target.

# %%
def draw(n):
    t = rng.uniform(size=n)
    x_0 = rng.standard_normal((n, 2))
    x_1 = target.sample(n, rng)
    return t, x_0, x_1


def gradients(n):
    t, x_0, x_1 = draw(n)
    x_t = path.sample(x_0, x_1, t)
    g_cfm = grad(lambda p: cfm_loss(model, p, path, x_0, x_1, t))(params)
    g_fm = grad(lambda p: fm_loss(model, p, marginal, x_t, t))(params)
    return g_cfm, g_fm, (t, x_t)


g_cfm, g_fm, _ = gradients(SIZES[-1])
print(f"{model.n_params} parameters, batch of {SIZES[-1]}")
print("first entries of grad L_CFM:", np.round(g_cfm[:4], 4))
print("first entries of grad L_FM: ", np.round(g_fm[:4], 4))
print(f"relative difference ||grad CFM - grad FM|| / ||grad FM|| = "
      f"{np.linalg.norm(g_cfm - g_fm) / np.linalg.norm(g_fm):.3f}")

# %% [markdown]
# ## The difference shrinks like $N^{-1/2}$
#
# The relative difference, averaged over a few batches at each size, on a
# log-log scale beside the line $N^{-1/2}$. A loss whose gradient did *not* equal
# the FM gradient (say a target with the sign of $x_0$ flipped) would level off
# at a constant instead.

# %%
def relative_difference(n, wrong=False):
    out = []
    for _ in range(REPEATS):
        t, x_0, x_1 = draw(n)
        x_t = path.sample(x_0, x_1, t)
        if wrong:   # the negative control: regress onto x_1 + x_0 at the same x_t
            g_c = grad(lambda p: np.mean(np.sum((model.apply(p, t, x_t) - (x_1 + x_0)) ** 2, axis=1)))(params)
        else:
            g_c = grad(lambda p: cfm_loss(model, p, path, x_0, x_1, t))(params)
        g_f = grad(lambda p: fm_loss(model, p, marginal, x_t, t))(params)
        out.append(np.linalg.norm(g_c - g_f) / np.linalg.norm(g_f))
    return float(np.sqrt(np.mean(np.square(out))))


curves = {"CFM target x_1 - x_0": [relative_difference(n) for n in SIZES],
          "wrong target x_1 + x_0": [relative_difference(n, wrong=True) for n in SIZES]}
for label, values in curves.items():
    slope = np.polyfit(np.log(SIZES), np.log(values), 1)[0]
    print(f"{label:24s} fitted slope {slope:+.2f}  (CFM = FM predicts -0.5)")
show(plot_rate(SIZES, curves, "||grad L_CFM - grad L_FM|| / ||grad L_FM|| against N"), "rate.png")

# %% [markdown]
# ## With the posterior average done exactly, the difference is zero
#
# The noise above comes from $x_1$: at a given $x_t$ many $x_1$ are possible.
# For a Gaussian mixture the posterior of $x_1$ given $x_t$ is known in closed
# form, so the CFM gradient can be averaged over it exactly
# (`refflow.gradients.exact_cfm_gradient`). At the same points $x_t$ it must
# then equal the FM gradient up to rounding, whatever the batch size.

# %%
t, x_0, x_1 = draw(256)
x_t = path.sample(x_0, x_1, t)
g_exact = exact_cfm_gradient(model, params, target, path, x_t, t)
g_fm = grad(lambda p: fm_loss(model, p, marginal, x_t, t))(params)
print(f"max |E[grad CFM | x_t] - grad FM| = {np.max(np.abs(g_exact - g_fm)):.2e}"
      f"  (max |grad FM| = {np.max(np.abs(g_fm)):.2e})")
