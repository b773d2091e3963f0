"""Figures: samples over a target's density, log-density heat maps.

matplotlib with the Agg backend (no display needed).  Every function writes
its PNG through a temporary file and a rename, so no partly written image is
left behind.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from refflow._io import atomic_write  # noqa: E402

__all__ = ["save_figure", "density_grid", "plot_samples"]


def save_figure(fig, file) -> None:
    """Save ``fig`` as PNG at ``file`` atomically and close it."""
    try:
        atomic_write(file, lambda fh: fig.savefig(fh, format="png", dpi=110, bbox_inches="tight"))
    finally:
        plt.close(fig)


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
    ax.set_xlabel("first coordinate")
    ax.set_ylabel("second coordinate")
    if target is not None:
        from matplotlib.lines import Line2D

        ax.legend([Line2D([], [], ls="none", marker="o", ms=3, color="tab:blue"), Line2D([], [], color="k", lw=0.6)],
                  ["samples", "contours of the target density"], fontsize=7, loc="upper right")
    return fig


def plot_schedules(paths):
    """alpha_t and sigma_t of each path on [0, 1] (eq 25-34)."""
    t = np.linspace(0.0, 1.0, 201)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
    for path in paths:
        axes[0].plot(t, path.alpha(t), label=repr(path))
        axes[1].plot(t, path.sigma(t), label=repr(path))
    axes[0].set_title(r"$\alpha_t$, the scale of $x_1$ (data)")
    axes[1].set_title(r"$\sigma_t$, the scale of $x_0$ (noise), log scale")
    axes[0].set_ylabel(r"$\alpha_t$")
    axes[1].set_ylabel(r"$\sigma_t$")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("time $t$")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right center", fontsize=7)
    return fig


def plot_marginal_fields(marginal, times=(0.0, 0.5, 0.9, 1.0), lim=6.0):
    """Streamlines of the closed-form field u_t over the density p_t at a few times (eq 16, 19)."""
    fig, axes = plt.subplots(1, len(times), figsize=(3.2 * len(times), 3.3))
    for ax, t in zip(np.atleast_1d(axes), times):
        X, Y, lp = density_grid(lambda p: marginal.log_prob(p, t), lim, n=120)
        ax.imshow(np.exp(lp), extent=(-lim, lim, -lim, lim), origin="lower", cmap="Blues")
        g = np.linspace(-lim, lim, 40)
        GX, GY = np.meshgrid(g, g)
        U = marginal.velocity(np.stack([GX.ravel(), GY.ravel()], axis=1), t)
        ax.streamplot(GX, GY, U[:, 0].reshape(GX.shape), U[:, 1].reshape(GX.shape), color="k",
                      linewidth=0.5, density=0.8, arrowsize=0.6)
        ax.set_title(f"$p_t$ (shade) and $u_t$ (lines), $t = {t:g}$", fontsize=9)
        ax.set_xlabel("first coordinate")
    np.atleast_1d(axes)[0].set_ylabel("second coordinate")
    fig.tight_layout()
    return fig


def plot_z_histogram(z, threshold, title="z-scores"):
    """Histogram of z-scores against the standard normal density and the pass threshold."""
    z = np.ravel(z)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist(z, bins=40, density=True, alpha=0.6, label=f"{z.size} z-scores")
    g = np.linspace(-max(threshold, np.abs(z).max()) * 1.05, max(threshold, np.abs(z).max()) * 1.05, 300)
    ax.plot(g, np.exp(-0.5 * g**2) / np.sqrt(2 * np.pi), "k", label="N(0, 1)")
    for k, s in enumerate((-threshold, threshold)):
        ax.axvline(s, color="tab:red", linestyle="--", label=f"pass threshold |z| = {threshold:.2f}" if k else None)
    ax.set_xlabel("z = difference / standard error")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def plot_field_comparison(learned, marginal, t_values=(0.25, 0.75), lim=6.0):
    """Arrows of a learned field beside the closed-form field at a few times."""
    fig, axes = plt.subplots(1, len(t_values), figsize=(4 * len(t_values), 4))
    g = np.linspace(-lim, lim, 15)
    GX, GY = np.meshgrid(g, g)
    pts = np.stack([GX.ravel(), GY.ravel()], axis=1)
    spacing = g[1] - g[0]
    for ax, t in zip(np.atleast_1d(axes), t_values):
        u = marginal.velocity(pts, t)
        v = learned(np.full(len(pts), t), pts)
        # One arrow scale for both fields, so lengths can be compared.
        scale = np.percentile(np.linalg.norm(u, axis=1), 95) / (0.9 * spacing)
        kw = dict(angles="xy", scale_units="xy", scale=scale, alpha=0.6)
        ax.quiver(pts[:, 0], pts[:, 1], u[:, 0], u[:, 1], color="k", label="closed form (eq 19)", **kw)
        ax.quiver(pts[:, 0], pts[:, 1], v[:, 0], v[:, 1], color="tab:orange", label="learned", **kw)
        ax.set_title(f"$u_t(x)$ at $t = {t:g}$")
        ax.set_aspect("equal")
        ax.set_xlabel("first coordinate")
    np.atleast_1d(axes)[0].set_ylabel("second coordinate")
    np.atleast_1d(axes)[0].legend(fontsize=7, loc="lower left")
    return fig


def plot_convergence(curves, title="convergence"):
    """Log-log error against step size, one line per method, with the fitted slopes.

    ``curves`` maps a label to ``(step_sizes, errors, fitted_slope)``.
    """
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for label, (steps, errors, slope) in curves.items():
        ax.loglog(steps, errors, "o-", label=f"{label}: slope {slope:.2f}")
    # labels on the decades only: the minor-tick labels of a short log axis overlap
    from matplotlib.ticker import NullFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(r"step size $\delta$")
    ax.set_ylabel("max error at the end point")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return fig


def plot_log_density_panels(X, Y, panels):
    """Heat maps of log-densities on one grid, side by side, on a shared colour scale.

    ``panels`` is a list of ``(title, log_p)`` with ``log_p`` shaped like ``X``.
    """
    vmax = max(float(np.max(p)) for _, p in panels)
    vmin = vmax - 12.0  # twelve nats below the peak: the tails without the empty far field
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), squeeze=False)
    for ax, (title, values) in zip(axes[0], panels):
        im = ax.pcolormesh(X, Y, np.clip(values, vmin, vmax), shading="auto", cmap="viridis",
                           vmin=vmin, vmax=vmax)
        ax.set_title(title)
        ax.set_aspect("equal")
        ax.set_xlabel("first coordinate")
        fig.colorbar(im, ax=ax, shrink=0.85, label="log-density (nats)")
    axes[0][0].set_ylabel("second coordinate")
    fig.tight_layout()
    return fig
