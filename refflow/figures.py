r"""Figure 2 of the notes: conditional flows are straight and cross, marginal flows are curved and do not.

The figure is drawn, like the notes', for one-dimensional data in the
:math:`(t, x)` plane: time runs left to right from the source
:math:`p_0 = \mathcal N(0, 1)` to a mixture of narrow Gaussians.

* **Conditional flows** (OT path, eq 34 with :math:`\sigma_{min} = 0`): for
  independent pairs :math:`(x_0, x_1)`,
  :math:`\psi_t(x_0 \mid x_1) = (1 - t)\,x_0 + t\,x_1` (eq 26), a straight line
  at the constant velocity :math:`x_1 - x_0` (eq 35).  Two lines cross exactly
  when the pairs are in opposite order at the two ends.
* **Marginal flows**: solutions of :math:`\dot x_t = u_t(x_t)` (eq 8–10) for
  the closed-form marginal field of eq 19, integrated by
  :func:`refflow.solvers.integrate`.

What "do not intersect" means, and why it is a theorem
------------------------------------------------------
Two drawn curves intersect when :math:`x^{(i)}_t = x^{(j)}_t` at some time
:math:`t`, i.e. when the two solutions occupy the same point at the same time.
The marginal field is smooth in :math:`x` (locally Lipschitz) on :math:`[0, 1]`,
so by uniqueness of solutions (Picard–Lindelöf) two solutions that meet once
coincide for all time; distinct trajectories never meet.  In one dimension the
separation :math:`x^{(i)}_t - x^{(j)}_t` is continuous and never zero, so its
sign never changes: the flow preserves the order of the particles.  Hence

* what is counted: pairs :math:`i < j` whose separation changes sign (or
  vanishes) somewhere on the time grid, i.e. whose polylines
  :math:`(t_k, x^{(i)}_{t_k})` intersect (segments over the same time interval
  cross exactly when the separation changes sign across it; segments over
  different intervals cannot meet except at shared grid times);
* a consequence used as ground truth: an order-preserving map that pushes
  :math:`p_0` to :math:`p_t` is unique in 1-D, the quantile map, so the
  marginal flow is :math:`\psi_t(x_0) = F_t^{-1}(F_0(x_0))` with :math:`F_t` the
  closed-form CDF of :math:`p_t` (:func:`quantile_transport`).

In :math:`d \geq 2` the statement in the plane is not a theorem: solutions of a
time-dependent field may pass through the same *point* at different *times*,
so their plane projections may cross; and the space-time curves of
independent straight lines almost surely never meet (lines in
:math:`\mathbb R^{1+d}` are generically skew).  The falsifiable content of
the figure is the one-dimensional one, which is what is drawn and checked.
"""
from __future__ import annotations

import warnings

import numpy as np
from autograd import elementwise_grad
from scipy.special import ndtr

from refflow import autodiff
from refflow._validation import as_rng, check_points
from refflow.paths import AffinePath, OTPath
from refflow.solvers import integrate
from refflow.targets import GaussianMixture

__all__ = [
    "figure2_target",
    "figure2_data",
    "conditional_trajectories",
    "marginal_trajectories",
    "count_crossings",
    "line_crossings",
    "chord_deviation",
    "marginal_acceleration",
    "pair_acceleration",
    "curvature",
    "mixture_cdf",
    "quantile_transport",
    "figure2",
    "plot_figure2",
    "plot_rate",
]


def figure2_target() -> GaussianMixture:
    """The 1-D data distribution of the figure: three narrow Gaussians (std 0.2) at -2, 0.5 and 2.5."""
    return GaussianMixture([0.25, 0.45, 0.30], [[-2.0], [0.5], [2.5]], [0.04, 0.04, 0.04])


def conditional_trajectories(path: AffinePath, x_0, x_1, ts) -> np.ndarray:
    r"""Conditional flows :math:`\psi_t(x_0^{(i)} \mid x_1^{(i)}) = \sigma_t x_0^{(i)} + \alpha_t x_1^{(i)}` (eq 26) at the times ``ts``.

    Returns an array of shape ``(len(ts), n, d)``.
    """
    ts = np.asarray(ts, dtype=np.float64)
    return np.stack([path.sample(x_0, x_1, float(t)) for t in ts])


def marginal_trajectories(marginal, x_0, ts, method="DOP853", rtol=1e-10, atol=1e-12, field=None) -> np.ndarray:
    r"""Marginal flows: :math:`\dot x_t = u_t(x_t)`, :math:`x_{t_0} = x_0` (eq 8–10), recorded at ``ts``.

    ``ts`` must be increasing from its first to its last entry (the
    integration interval).  ``field`` replaces the closed-form marginal field
    ``marginal.field()`` (the negative controls plant wrong fields here).
    Returns an array of shape ``(len(ts), n, d)``.
    """
    ts = np.asarray(ts, dtype=np.float64)
    field = marginal.field() if field is None else field
    sol = integrate(field, x_0, float(ts[0]), float(ts[-1]), method=method, rtol=rtol, atol=atol, t_eval=ts)
    order = np.argsort(sol.ts, kind="stable")
    return sol.xs[order]


def _one_dimensional(trajectories):
    X = np.asarray(trajectories, dtype=np.float64)
    if X.ndim != 3 or X.shape[2] != 1:
        raise ValueError(
            "trajectories: expected shape (T, n, 1), 1-D trajectories drawn in the (t, x) plane "
            f"(see the module docstring for why), got shape {X.shape}"
        )
    return X[:, :, 0]


def count_crossings(trajectories):
    r"""Number of pairs :math:`i < j` whose (t, x) polylines intersect.

    Two polylines sampled at the same times intersect exactly when the
    separation :math:`x^{(i)}_{t_k} - x^{(j)}_{t_k}` changes sign between
    consecutive grid times, or is zero at one of them.

    Parameters
    ----------
    trajectories : array, shape (T, n, 1)

    Returns
    -------
    count : int
    crossed : bool array, shape (n, n)
        Symmetric; ``crossed[i, j]`` for each intersecting pair.
    """
    X = _one_dimensional(trajectories)
    sep = np.sign(X[:, :, None] - X[:, None, :])                    # (T, n, n)
    crossed = np.any(sep[:-1] * sep[1:] < 0, axis=0) | np.any(sep == 0, axis=0)
    np.fill_diagonal(crossed, False)
    return int(np.triu(crossed, 1).sum()), crossed


def line_crossings(x_0, x_1) -> int:
    """Pairs of straight 1-D lines from ``x_0`` to ``x_1`` that cross: opposite order at the two ends."""
    a = np.sign(np.subtract.outer(np.ravel(x_0), np.ravel(x_0)))
    b = np.sign(np.subtract.outer(np.ravel(x_1), np.ravel(x_1)))
    return int(np.triu(a * b <= 0, 1).sum())


def chord_deviation(trajectories, ts) -> np.ndarray:
    r"""Largest distance of each trajectory from its chord, shape ``(n,)``.

    .. math::

        \max_k \big\lVert x_{t_k} - \big(x_{t_0} + \tfrac{t_k - t_0}{t_1 - t_0}(x_{t_1} - x_{t_0})\big) \big\rVert ,

    zero for a straight line traversed at constant speed (eq 35).
    """
    X = np.asarray(trajectories, dtype=np.float64)
    ts = np.asarray(ts, dtype=np.float64)
    s = ((ts - ts[0]) / (ts[-1] - ts[0]))[:, None, None]
    chord = X[0][None] + s * (X[-1] - X[0])[None]
    return np.max(np.linalg.norm(X - chord, axis=2), axis=0)


def marginal_acceleration(marginal, x, t) -> np.ndarray:
    r"""Acceleration along the marginal flow, :math:`\ddot x_t = \partial_t u_t(x) + (\partial_x u_t)(x)\, u_t(x)`, by autograd; shape ``(n, d)``."""
    x = check_points(x, "x", marginal.dim)
    n, d = x.shape
    t = np.broadcast_to(np.asarray(t, dtype=np.float64), (n,)).copy()
    u = marginal.velocity(x, t)
    du_dt = np.stack([elementwise_grad(lambda s, j=j: marginal.velocity(x, s)[:, j])(t) for j in range(d)], axis=1)
    J = autodiff.jacobian_pointwise(lambda z: marginal.velocity(z, t), x)
    return du_dt + np.einsum("nij,nj->ni", J, u)


def pair_acceleration(path: AffinePath, x_0, x_1, t) -> np.ndarray:
    r"""Acceleration along the conditional flow, :math:`\frac{d}{dt}(\sigma_t' x_0 + \alpha_t' x_1)`, by autograd; shape ``(n, d)``.

    Identically zero for the OT path (eq 35: the velocity does not depend on t).
    """
    x_0 = check_points(x_0, "x_0")
    n, d = x_0.shape
    t = np.broadcast_to(np.asarray(t, dtype=np.float64), (n,)).copy()
    with warnings.catch_warnings():
        # autograd warns when the output does not depend on t: for the OT path that is eq 35 itself.
        warnings.simplefilter("ignore", UserWarning)
        return np.stack([elementwise_grad(lambda s, j=j: path.pair_velocity(x_0, x_1, s)[:, j])(t)
                         for j in range(d)], axis=1)


def curvature(velocity, acceleration) -> np.ndarray:
    r"""Curvature of 1-D trajectories drawn in the :math:`(t, x)` plane, :math:`\kappa = |\ddot x| / (1 + \dot x^2)^{3/2}`."""
    v = np.asarray(velocity, dtype=np.float64)[..., 0]
    a = np.asarray(acceleration, dtype=np.float64)[..., 0]
    return np.abs(a) / (1.0 + v**2) ** 1.5


def _mixture_parts(target, path, t):
    if target.dim != 1:
        raise ValueError(f"target: expected a 1-D mixture (the quantile map is one-dimensional), got d = {target.dim}")
    t = np.asarray(t, dtype=np.float64)
    # the schedules take a float or a flat array of times
    alpha = np.asarray(path.alpha(t.ravel()), dtype=np.float64).reshape(t.shape)[..., None]
    sigma = np.asarray(path.sigma(t.ravel()), dtype=np.float64).reshape(t.shape)[..., None]
    var = np.asarray(target.covariances, dtype=np.float64)[:, 0, 0]
    loc = alpha * target.means[:, 0]
    scale = np.sqrt(alpha**2 * var + sigma**2)
    return loc, scale, np.asarray(target.weights, dtype=np.float64)


def mixture_cdf(target: GaussianMixture, path: AffinePath, x, t) -> np.ndarray:
    r"""CDF of the 1-D marginal :math:`p_t = \sum_k w_k \mathcal N(\alpha_t m_k, \alpha_t^2 c_k + \sigma_t^2)` (eq 16).

    ``x`` and ``t`` broadcast against each other; returns their broadcast shape.
    """
    x = np.asarray(x, dtype=np.float64)
    loc, scale, w = _mixture_parts(target, path, t)
    return np.sum(w * ndtr((x[..., None] - loc) / scale), axis=-1)


def quantile_transport(target: GaussianMixture, path: AffinePath, x_0, ts) -> np.ndarray:
    r"""The exact 1-D marginal flow :math:`\psi_t(x_0) = F_t^{-1}(F_{t_0}(x_0))` at the times ``ts``, shape ``(T, n, 1)``.

    The marginal flow preserves order (see the module docstring) and carries
    :math:`p_{t_0}` to :math:`p_t` (eq 11, 16, 19); the only such map in 1-D
    is the quantile map.  :math:`F_t^{-1}` is evaluated by bisection to the
    last bit (the CDF is strictly increasing).
    """
    x_0 = check_points(x_0, "x_0", 1)[:, 0]
    ts = np.asarray(ts, dtype=np.float64)
    level = mixture_cdf(target, path, x_0, ts[0])[None, :]               # (1, n)
    T = ts[:, None]
    loc, scale, _ = _mixture_parts(target, path, ts)                      # (T, K)
    lo = np.broadcast_to((loc - 40.0 * scale).min(axis=1)[:, None], (ts.size, x_0.size)).copy()
    hi = np.broadcast_to((loc + 40.0 * scale).max(axis=1)[:, None], (ts.size, x_0.size)).copy()
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np.all((mid == lo) | (mid == hi)):
            break
        below = mixture_cdf(target, path, mid, T) < level
        lo = np.where(below, mid, lo)
        hi = np.where(below, hi, mid)
    return (0.5 * (lo + hi))[:, :, None]


def figure2_data(rng, n: int = 40, n_times: int = 201):
    """Everything Figure 2 shows: a dict with the target, path, times, draws and both sets of trajectories."""
    rng = as_rng(rng)
    target, path = figure2_target(), OTPath(0.0)
    marginal = target.marginal(path)
    x_0 = rng.standard_normal((n, 1))
    x_1 = target.sample(n, rng)
    ts = np.linspace(0.0, 1.0, n_times)
    return {
        "target": target, "path": path, "marginal": marginal, "ts": ts, "x_0": x_0, "x_1": x_1,
        "conditional": conditional_trajectories(path, x_0, x_1, ts),
        "marginal_flow": marginal_trajectories(marginal, x_0, ts),
    }


def figure2(rng, n: int = 30):
    r"""Reproduce Figure 2 of the notes; returns a :class:`matplotlib.figure.Figure` (Agg canvas).

    Left, (a): conditional flows, straight lines from :math:`x_0 \sim \mathcal N(0, 1)`
    to independent :math:`x_1 \sim q_1` (eq 26, 35).  Right, (b): marginal flows of
    the closed-form field (eq 19) from the same :math:`x_0`.  Both over the
    density :math:`p_t(x)` (eq 16); the titles give the number of crossing pairs.

    Parameters
    ----------
    rng : numpy.random.Generator or int
    n : int
        Number of trajectories per panel.
    """
    return plot_figure2(figure2_data(rng, n=n))


def plot_figure2(data):
    """Draw Figure 2 from :func:`figure2_data` output (see :func:`figure2`)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import PowerNorm
    from matplotlib.figure import Figure

    ts, marginal = data["ts"], data["marginal"]
    cond, marg = data["conditional"][:, :, 0], data["marginal_flow"][:, :, 0]
    n_cond, _ = count_crossings(data["conditional"])
    n_marg, _ = count_crossings(data["marginal_flow"])

    lim = 3.6
    tg, xg = np.linspace(0.0, 1.0, 201), np.linspace(-lim, lim, 301)
    TT, XX = np.meshgrid(tg, xg)
    density = np.exp(marginal.log_prob(XX.reshape(-1, 1), TT.ravel())).reshape(XX.shape)

    # A bare Figure with its own Agg canvas: no pyplot state, nothing to close.
    fig = Figure(figsize=(10.5, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    colours = _colours(data["x_0"][:, 0])
    panels = (
        (axes[0], cond, f"(a) conditional flows: straight, {n_cond} crossing pairs"),
        (axes[1], marg, f"(b) marginal flows: curved, {n_marg} crossing pairs"),
    )
    for ax, paths, title in panels:
        image = ax.imshow(density, origin="lower", extent=(0.0, 1.0, -lim, lim), aspect="auto",
                          cmap="Greys", norm=PowerNorm(0.5, vmin=0.0, vmax=float(density.max())))
        for i in range(paths.shape[1]):
            ax.plot(ts, paths[:, i], color=colours[i], lw=1.0, alpha=0.9)
        ax.scatter(np.zeros(paths.shape[1]), paths[0], s=10, color="k", zorder=3)
        ax.scatter(np.ones(paths.shape[1]), paths[-1], s=10, color="k", zorder=3)
        ax.set_xlim(0.0, 1.0)
        ax.set_ylim(-lim, lim)
        ax.set_xticks([0.0, 0.25, 0.5, 0.75, 1.0], ["0", "0.25", "0.5", "0.75", "1"])
        ax.set_xlabel("time $t$ (noise at 0, data at 1)")
        ax.set_title(title, fontsize=10)
    axes[0].set_ylabel("position $x$ (lines coloured by the rank of $x_0$)")
    fig.colorbar(image, ax=axes, shrink=0.9, pad=0.01, label="density $p_t(x)$ (square-root scale)")
    fig.get_layout_engine().set(wspace=0.06)
    fig.suptitle("Figure 2: noise N(0, 1) at t = 0 to a mixture of narrow Gaussians at t = 1 (OT path, "
                 "sigma_min = 0), over the density p_t(x)", fontsize=10)
    return fig


def plot_rate(sizes, curves, title="relative difference of the gradients"):
    """Log-log plot of ``curves`` (label -> values at ``sizes``) with a N^(-1/2) guide; returns the figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sizes = np.asarray(sizes, dtype=np.float64)
    fig = Figure(figsize=(5.5, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for label, values in curves.items():
        ax.loglog(sizes, values, "o-", ms=3, label=label)
    top = max(float(np.max(v)) for v in curves.values())
    ax.loglog(sizes, 1.5 * top * np.sqrt(sizes[0] / sizes), "k--", lw=1, label=r"$N^{-1/2}$ (guide)")
    ax.set_xlabel("batch size $N$")
    ax.set_ylabel("relative difference (RMS over batches)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    return fig


def _colours(x_0):
    from matplotlib import colormaps

    rank = np.argsort(np.argsort(x_0))
    return colormaps["viridis"](rank / max(len(x_0) - 1, 1))
