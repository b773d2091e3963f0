"""Figures: samples over a target's density, log-density heat maps.

matplotlib with the Agg backend (no display needed).  Every function writes
its PNG through a temporary file and a rename, so no partly written image is
left behind.
"""
from __future__ import annotations

import os
import tempfile

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["save_figure", "density_grid", "plot_samples"]


def save_figure(fig, file) -> None:
    """Save ``fig`` as PNG at ``file`` atomically and close it."""
    file = os.fspath(file)
    folder = os.path.dirname(os.path.abspath(file))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        os.replace(tmp, file)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


def density_grid(log_prob, lim, n=160):
    """``(X, Y, log p)`` of a 2-D ``log_prob(points) -> (m,)`` on a square grid of half width ``lim``."""
    g = np.linspace(-lim, lim, n)
    X, Y = np.meshgrid(g, g)
    pts = np.stack([X.ravel(), Y.ravel()], axis=1)
    return X, Y, np.asarray(log_prob(pts)).reshape(X.shape)


def plot_samples(samples, target=None, title="samples", max_points=5000):
    """Scatter of 2-D samples over the density contours of ``target`` (when given); returns the figure."""
    samples = np.asarray(samples)
    fig, ax = plt.subplots(figsize=(5, 5))
    lim = float(np.quantile(np.abs(samples), 0.995)) * 1.15 + 1e-9
    if target is not None:
        lim = max(lim, float(np.abs(target.means).max()) + 1.5)
        X, Y, lp = density_grid(target.log_prob, lim)
        ax.contour(X, Y, np.exp(lp), levels=8, colors="k", linewidths=0.6, alpha=0.7)
    shown = samples[:max_points]
    ax.scatter(shown[:, 0], shown[:, 1], s=2, alpha=0.35, color="tab:blue")
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_title(title)
    return fig
