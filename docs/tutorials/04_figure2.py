# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Tutorial 4: Figure 2, straight conditional flows and curved marginal flows
#
# Figure 2 of the notes makes one point: the *conditional* flows of the OT path
# are straight lines, and lines drawn between independent pairs $(x_0, x_1)$
# cross one another; the *marginal* flow, which integrates the averaged field
# $u_t(x)$, bends, and its trajectories never cross. We redraw it in one
# dimension, where "never cross" is a theorem (two solutions of
# $\dot x = u_t(x)$ that met would coincide, so the flow keeps the order of the
# particles) and so can be counted. `REFFLOW_FAST=1` draws fewer trajectories.

# %% tags=["hide-input"]
# `show(fig)`: in a notebook (the docs build runs this page as one) display the
# figure; run as a script, save it under OUT. Not part of the method.
import io
import os
import pathlib

import matplotlib.pyplot as plt

OUT = pathlib.Path("tutorial-04")


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

from refflow.figures import (chord_deviation, count_crossings, figure2_data, line_crossings,
                             plot_figure2, quantile_transport)

FAST = os.environ.get("REFFLOW_FAST", "") not in ("", "0")
N = 16 if FAST else 40
data = figure2_data(np.random.default_rng(2), n=N, n_times=101 if FAST else 201)
print(data["target"])
print(data["path"])

# %% [markdown]
# ## The two kinds of trajectory
#
# *Conditional*: $\psi_t(x_0 \mid x_1) = (1-t)\,x_0 + t\,x_1$ for each pair, a
# straight line at the constant speed $x_1 - x_0$.
#
# *Marginal*: the solution of $\dot x_t = u_t(x_t)$ from the same $x_0$, with
# $u_t$ the closed-form marginal field of the mixture, integrated by an
# adaptive Runge–Kutta method to a tolerance of $10^{-10}$.

# %%
show(plot_figure2(data), "figure2.png")

# %% [markdown]
# ## Counting
#
# A pair of trajectories crosses when the sign of their separation
# $x^{(i)}_t - x^{(j)}_t$ changes on the time grid. For straight lines that
# happens exactly when the pair is in opposite order at $t = 0$ and $t = 1$, a
# count we can make without any grid.

# %%
n_cond, _ = count_crossings(data["conditional"])
n_marg, _ = count_crossings(data["marginal_flow"])
print(f"conditional flows: {n_cond} crossing pairs on the grid, "
      f"{line_crossings(data['x_0'], data['x_1'])} predicted from the end points")
print(f"marginal flows:    {n_marg} crossing pairs of {N * (N - 1) // 2}")

# %% [markdown]
# ## Straight against curved, and the exact marginal flow
#
# How far does each trajectory stray from the chord between its end points?
# Zero for the conditional flows (up to rounding), clearly not for the
# marginal ones. And because an order-preserving map from $p_0$ to $p_t$ is
# unique in one dimension, the marginal flow *is* the quantile map
# $x_t = F_t^{-1}(F_0(x_0))$ with $F_t$ the closed-form CDF of $p_t$: the ODE
# solution must agree with it to the solver's tolerance.

# %%
ts = data["ts"]
print(f"max distance from the chord, conditional: {chord_deviation(data['conditional'], ts).max():.1e}")
print(f"max distance from the chord, marginal:    {chord_deviation(data['marginal_flow'], ts).max():.2f}")
exact = quantile_transport(data["target"], data["path"], data["x_0"], ts)
print(f"max |ODE - quantile map| = {np.max(np.abs(exact - data['marginal_flow'])):.1e}")
