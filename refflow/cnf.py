r"""Continuous normalizing flows: log-likelihood by the instantaneous change of variables (eq 11-14).

Along a trajectory of the flow ODE :math:`\dot x_t = u_t(x_t)` (eq 8) the
log-density obeys eq 13,

.. math::

    \frac{d}{dt} \log p_t(x_t) = -\nabla \cdot u_t(x_t),

so integrating the augmented state :math:`(x_t, \ell_t)` with

.. math::

    \frac{d x_t}{dt} = u_t(x_t), \qquad
    \frac{d \ell_t}{dt} = -\nabla \cdot u_t(x_t), \qquad \ell_{t_0} = 0,

gives :math:`\ell_{t_1} = \log p_{t_1}(x_{t_1}) - \log p_{t_0}(x_{t_0})`.
From data to source (:math:`t_0 = 1`, :math:`t_1 = 0`) this is eq 14,

.. math::

    \log p_1(x_1) = \log p_0(x_0) - \int_0^1 \nabla \cdot u_t(x_t)\, dt,

evaluated by :func:`log_prob`; from source to data it is
:func:`sample_with_log_prob`.  Both are one call of
:func:`refflow.solvers.integrate` on the ``(n, d + m)`` augmented state
(``m`` = 1, or the number of Hutchinson probes), flattened into one system for
:func:`scipy.integrate.solve_ivp`.

The divergence :math:`\nabla \cdot u = \operatorname{tr} \partial u / \partial x`
comes from one of

* ``"exact"``: a callable ``div(t, x) -> (n,)`` supplied with the field -- the
  MLP's Jacobian-trace kernel (:func:`mlp_field`) or the closed form of a
  mixture marginal (:func:`marginal_field`);
* ``"autograd"``: the trace of the Jacobian of an autograd-traceable field
  (one forward trace, ``d`` reverse passes);
* ``"hutchinson"``: :math:`\mathbb{E}[\varepsilon^\top J \varepsilon] = \operatorname{tr} J`
  for probes with :math:`\mathbb{E}[\varepsilon\varepsilon^\top] = I`
  (Rademacher or Gaussian), each probe drawn once per trajectory and held
  fixed along it, with the standard error over probes.

:func:`euler_flow_log_prob` and :func:`continuous_limit` connect eq 14 to
the discrete flows of eq 5-7: the Euler map with ``K`` steps is a composition
of ``K`` residual maps :math:`x \mapsto x + \delta u_{t_k}(x)` whose exact
log-determinants sum to a log-likelihood that tends to eq 14 as
:math:`K \to \infty` (error :math:`O(1/K)`).
"""
from __future__ import annotations

import dataclasses
import warnings

import numpy as np
from autograd.core import VJPNode, backward_pass
from autograd.tracer import trace

from refflow import autodiff, solvers
from refflow._validation import _xp, as_rng, check_points, check_scalar, exact

__all__ = [
    "CNFResult",
    "EulerFlowResult",
    "ContinuousLimit",
    "DIVERGENCES",
    "PROBES",
    "standard_normal_log_prob",
    "ModelField",
    "MarginalField",
    "mlp_field",
    "marginal_field",
    "hutchinson_divergence",
    "log_density_change",
    "log_prob",
    "sample_with_log_prob",
    "euler_flow_log_prob",
    "continuous_limit",
]

DIVERGENCES: tuple[str, ...] = ("auto", "exact", "autograd", "hutchinson")
"""Names accepted by the ``divergence`` argument (a callable is accepted too)."""

PROBES: tuple[str, ...] = ("rademacher", "gaussian")
"""Probe distributions of Hutchinson's estimator."""

_LOG_2PI = float(np.log(2.0 * np.pi))
# Default number of Hutchinson probes: enough for a usable standard error.
_DEFAULT_PROBES = 8
# Central-difference step (relative) for Hutchinson's estimator on a field
# autograd cannot trace: eps_machine^(1/3) balances truncation (h^2) against
# rounding (eps/h) in a central difference.
_FD_STEP = float(np.finfo(np.float64).eps) ** (1.0 / 3.0)


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class CNFResult:
    r"""The result of :func:`log_prob` / :func:`sample_with_log_prob`.

    Attributes
    ----------
    log_p : ndarray, shape (n,)
        :math:`\log p_1(x_1)` by eq 14 (for Hutchinson: the mean over probes).
    x_0 : ndarray, shape (n, d)
        The source points :math:`x_0 = \psi_1^{-1}(x_1)`.
    x_1 : ndarray, shape (n, d)
        The data points.
    nfe : int
        Evaluations of the augmented right-hand side; each is one value of
        :math:`u_t` together with its divergence (or its probe products).
    divergence_integral : ndarray, shape (n,)
        :math:`\int_0^1 \nabla\cdot u_t(x_t)\, dt` along each trajectory.
    log_p_stderr : ndarray, shape (n,), or None
        Hutchinson only, with at least two probes: the standard error of
        ``log_p`` over probes, ``std(ddof=1) / sqrt(n_probes)``.
    log_p_probes : ndarray, shape (n_probes, n), or None
        Hutchinson only: the estimate of :math:`\log p_1(x_1)` from each probe.
    divergence : str
        How the divergence was computed: ``"exact"``, ``"autograd"``,
        ``"hutchinson"`` (probe products by autograd) or
        ``"hutchinson-fd"`` (by central differences, for a field autograd
        cannot trace).
    method : str
    n_steps : int or None
        Fixed steps, ``None`` for adaptive methods.
    n_probes : int or None
    """

    log_p: np.ndarray
    x_0: np.ndarray
    x_1: np.ndarray
    nfe: int
    divergence_integral: np.ndarray
    log_p_stderr: np.ndarray | None = None
    log_p_probes: np.ndarray | None = None
    divergence: str = "exact"
    method: str = "DOP853"
    n_steps: int | None = None
    n_probes: int | None = None


@dataclasses.dataclass
class EulerFlowResult:
    r"""The result of :func:`euler_flow_log_prob`.

    Attributes
    ----------
    x_1 : ndarray, shape (n, d)
        The image of ``x_0`` under ``n_steps`` residual maps (eq 6).
    log_p : ndarray, shape (n,)
        :math:`\log p_1(x_1)` of the discrete flow by eq 5.
    x_0 : ndarray, shape (n, d)
    log_det : ndarray, shape (n,)
        :math:`\sum_k \log|\det(I + \delta J_{u_{t_k}}(x_k))|`.
    n_steps : int
    """

    x_1: np.ndarray
    log_p: np.ndarray
    x_0: np.ndarray
    log_det: np.ndarray
    n_steps: int


@dataclasses.dataclass
class ContinuousLimit:
    r"""The measured convergence of the Euler flow's likelihood to the CNF's (eq 5-10, 14).

    Attributes
    ----------
    n_steps : ndarray of int, shape (m,)
    errors : ndarray, shape (m,)
        :math:`\max_i |\log p^K_1(x^K_i) - \log p_1(x^K_i)|` for each ``K``: the
        discrete flow's log-density against the CNF's, at the same points.
    slope : float
        Least-squares slope of log error against log step size :math:`1/K`;
        1 is expected (Euler is first order).
    euler : list of EulerFlowResult
        The discrete flow for each ``K``.
    log_p_cnf : list of ndarray, shape (n,)
        The CNF's :math:`\log p_1` at each ``euler[i].x_1``.
    """

    n_steps: np.ndarray
    errors: np.ndarray
    slope: float
    euler: list = dataclasses.field(default_factory=list, repr=False)
    log_p_cnf: list = dataclasses.field(default_factory=list, repr=False)


# ---------------------------------------------------------------------------
# Base density and field helpers
# ---------------------------------------------------------------------------


def standard_normal_log_prob(x):
    r"""Log-density of :math:`p_0 = \mathcal N(0, I)` (eq 3), per row; returns (n,).

    .. math::

        \log p_0(x) = -\tfrac12 \|x\|^2 - \tfrac d2 \log 2\pi
    """
    x = check_points(x, "x")
    return -0.5 * _xp(x).sum(x * x, axis=1) - 0.5 * x.shape[1] * _LOG_2PI


class ModelField:
    r"""A trained model's velocity field with its exact divergence.

    ``field(t, x)`` is ``model.apply(params, t, x, y)`` (autograd-traceable);
    ``field.divergence(t, x)`` is ``model.divergence(params, t, x, y)``, the
    exact trace of the Jacobian (the MLP pushes the ``d`` tangent directions
    through the network with the values).  Built by :func:`mlp_field`.
    """

    def __init__(self, model, params, y=None):
        self.model = model
        self.params = params
        self.y = y

    def __call__(self, t, x):
        return self.model.apply(self.params, t, x, self.y)

    def divergence(self, t, x):
        r""":math:`\nabla\cdot u_t(x)`, exact; returns (n,)."""
        return self.model.divergence(self.params, t, x, self.y)

    def value_and_divergence(self, t, x):
        """``(u_t(x), div u_t(x))``, in one stacked pass when the model offers it."""
        combined = getattr(self.model, "field_and_divergence", None)
        if combined is not None:
            return combined(self.params, t, x, self.y)
        return self(t, x), self.divergence(t, x)

    def value_and_vjp(self, t, x):
        r"""``(u, vjp)`` with ``vjp(g)`` :math:`= g^\top \partial u / \partial x` per row (Hutchinson's products).

        Uses the model's own VJP when it has one, else autograd.
        """
        own = getattr(self.model, "value_and_vjp", None)
        if own is not None:
            u, vjp = own(self.params, t, x, self.y)
            return u, lambda g: vjp(g, wrt_params=False)[1]
        u, end_node = _trace(self, t, x)
        return u, lambda g: backward_pass(g, end_node)

    def __repr__(self):
        return f"ModelField({self.model!r})"


class MarginalField:
    r"""The closed-form marginal field of a mixture (eq 19) with its divergence and base density.

    ``field(t, x)`` is ``marginal.velocity(x, t)``; ``field.divergence(t, x)``
    the closed-form :math:`\nabla\cdot u_t(x)`.  ``base_log_prob(x)`` is the
    marginal's own :math:`\log p_0(x)`: exactly :math:`\mathcal N(0, I)` on
    paths with :math:`\alpha_0 = 0, \sigma_0 = 1`, but not on the VE/VP paths,
    whose :math:`t = 0` end only approximates it; with it eq 14 reproduces
    :math:`\log p_1` of the marginal on every path.  Built by
    :func:`marginal_field`.
    """

    def __init__(self, marginal):
        self.marginal = marginal

    def __call__(self, t, x):
        return self.marginal.velocity(x, t)

    def divergence(self, t, x):
        r""":math:`\nabla\cdot u_t(x)` in closed form; returns (n,)."""
        return self.marginal.divergence(x, t)

    def value_and_divergence(self, t, x):
        """``(u_t(x), div u_t(x))`` from one pass over the mixture components."""
        out = self.marginal.evaluate(x, t, ("velocity", "divergence"))
        return out["velocity"], out["divergence"]

    def base_log_prob(self, x):
        r""":math:`\log p_0(x)` of the marginal path (eq 16 at t = 0)."""
        return self.marginal.log_prob(x, 0.0)

    def sample_base(self, n, rng):
        """Draw ``n`` points from the marginal's :math:`p_0`."""
        return self.marginal.sample(n, 0.0, rng)

    def __repr__(self):
        return f"MarginalField({self.marginal.target!r}, {self.marginal.path!r})"


def mlp_field(mlp, params, y=None) -> ModelField:
    """The velocity field of ``mlp`` at ``params`` (labels ``y`` optional) with its exact divergence."""
    for attr in ("apply", "divergence"):
        if not callable(getattr(mlp, attr, None)):
            raise TypeError(f"mlp: expected a model with .apply and .divergence (refflow.nn.MLP), got {type(mlp).__name__}")
    return ModelField(mlp, params, y)


def marginal_field(marginal) -> MarginalField:
    """The closed-form marginal field of ``target.marginal(path)`` with its divergence and own p_0."""
    for attr in ("velocity", "divergence", "log_prob", "evaluate"):
        if not callable(getattr(marginal, attr, None)):
            raise TypeError(
                "marginal: expected a MixtureMarginal (target.marginal(path)), got " + type(marginal).__name__
            )
    return MarginalField(marginal)


# ---------------------------------------------------------------------------
# Checked evaluations
# ---------------------------------------------------------------------------


def _check_values(u, n, d, t, name):
    xp = _xp(u)
    arr = xp.asarray(u)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"{name}: expected a real array of shape ({n}, {d}), got dtype {arr.dtype} at t={exact(t)}")
    if arr.shape != (n, d):
        raise ValueError(f"{name}: expected shape ({n}, {d}) like x, got shape {arr.shape} at t={exact(t)}")
    arr = arr.astype(np.float64, copy=False)
    if not bool(xp.all(xp.isfinite(arr))):
        raise ValueError(f"{name}: expected finite values, got NaN or inf at t={exact(t)}")
    return arr


def _check_div(v, n, t, name="divergence"):
    xp = _xp(v)
    arr = xp.asarray(v)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"{name}: expected div(t, x) to return a real array of shape ({n},), got dtype {arr.dtype}")
    if arr.shape != (n,):
        raise ValueError(f"{name}: expected div(t, x) to return shape ({n},), got shape {arr.shape} at t={exact(t)}")
    arr = arr.astype(np.float64, copy=False)
    if not bool(xp.all(xp.isfinite(arr))):
        raise ValueError(f"{name}: expected finite divergences, got NaN or inf at t={exact(t)}")
    return arr


def _trace(field, t, x):
    """Trace ``x -> field(t, x)`` with autograd; returns ``(u, end_node)`` or raises TypeError.

    ``end_node`` is None when the output does not depend on ``x`` through
    autograd's operations: the field is constant, or (far more likely) it
    left the trace, e.g. through ``np.asarray`` or a compiled kernel without
    a registered VJP.  Either way autograd cannot give its Jacobian.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            u, end_node = trace(VJPNode.new_root(), lambda z: field(t, z), x)
    except Exception as exc:  # any failure inside the field's code under tracing
        raise TypeError(
            f"field: expected a callable autograd can trace (written with autograd.numpy), "
            f"tracing failed with {type(exc).__name__}: {exc}"[:400]
        ) from exc
    if end_node is None:
        raise TypeError(
            "field: expected a callable autograd can trace, but its output does not depend on x "
            "through autograd operations (np.asarray, a compiled kernel, or a constant field)"
        )
    return u, end_node


class _ExactDivergence:
    """Divergence from a user callable (or the field's own ``.divergence``)."""

    name = "exact"
    n_columns = 1

    def __init__(self, field, div, combined=None):
        self.field, self.div, self.combined = field, div, combined

    def __call__(self, t, x):
        n, d = x.shape
        if self.combined is not None:
            u, v = self.combined(t, x)
        else:
            u, v = self.field(t, x), self.div(t, x)
        return _check_values(u, n, d, t, "field"), _check_div(v, n, t)[:, None]


class _AutogradDivergence:
    """tr J by autograd: one forward trace, one reverse pass per coordinate."""

    name = "autograd"
    n_columns = 1

    def __init__(self, field):
        self.field = field

    def __call__(self, t, x):
        n, d = x.shape
        u, end_node = _trace(self.field, t, x)
        u = _check_values(u, n, d, t, "field")
        div = np.zeros(n)
        basis = np.zeros((n, d))
        for i in range(d):
            # Each point's output depends on its own input only, so the VJP with
            # the i-th unit vector in every row gives row i of every Jacobian.
            basis[:, i] = 1.0
            div += np.asarray(backward_pass(basis, end_node))[:, i]
            basis[:, i] = 0.0
        return u, div[:, None]


class _HutchinsonDivergence:
    r"""Hutchinson's estimator with probes fixed for the whole trajectory.

    ``probes`` has shape (k, n, d); column j of the output is
    :math:`\varepsilon_j^\top J \varepsilon_j` per point.  The probe
    products come from autograd VJPs (:math:`\varepsilon^\top J`), or, for
    a field autograd cannot trace, from central differences of ``u`` along
    :math:`\varepsilon` (:math:`J\varepsilon`, error :math:`O(h^2)`).
    """

    def __init__(self, field, probes, traceable):
        self.field = field
        self.probes = probes
        self.traceable = traceable
        self.name = "hutchinson" if traceable else "hutchinson-fd"
        self.n_columns = probes.shape[0]

    def __call__(self, t, x):
        n, d = x.shape
        eps = self.probes
        if self.traceable:
            own = getattr(self.field, "value_and_vjp", None)
            if own is not None:
                u, vjp = own(t, x)
            else:
                u, end_node = _trace(self.field, t, x)
                vjp = lambda g: backward_pass(g, end_node)  # noqa: E731
            u = _check_values(u, n, d, t, "field")
            est = np.stack([np.sum(np.asarray(vjp(e)) * e, axis=1) for e in eps], axis=1)
            return u, est
        u = _check_values(self.field(t, x), n, d, t, "field")
        # A step relative to each point's scale, divided by the probe's length
        # so the displacement h * eps has that size whatever the probe.
        scale = np.maximum(1.0, np.sqrt(np.mean(x * x, axis=1, keepdims=True)))
        cols = []
        for e in eps:
            h = _FD_STEP * scale / np.sqrt(np.mean(e * e, axis=1, keepdims=True))
            plus = _check_values(self.field(t, x + h * e), n, d, t, "field")
            minus = _check_values(self.field(t, x - h * e), n, d, t, "field")
            cols.append(np.sum((plus - minus) / (2.0 * h) * e, axis=1))
        return u, np.stack(cols, axis=1)


def _draw_probes(rng, probe, shape):
    if probe == "rademacher":
        return rng.integers(0, 2, size=shape).astype(np.float64) * 2.0 - 1.0
    return rng.standard_normal(shape)


def hutchinson_divergence(field, t, x, rng, n_probes: int = _DEFAULT_PROBES, probe: str = "rademacher"):
    r"""Hutchinson's estimate of :math:`\nabla\cdot u_t(x)` at one time, with its standard error.

    .. math::

        \nabla \cdot u_t(x) = \operatorname{tr} J = \mathbb{E}_\varepsilon
        \big[\varepsilon^\top J \varepsilon\big], \qquad
        \mathbb{E}[\varepsilon\varepsilon^\top] = I,

    averaged over ``n_probes`` independent probes per point.  Its variance
    per probe is :math:`2\|S\|_F^2` for Gaussian probes and
    :math:`2\|S\|_F^2 - 2\sum_i J_{ii}^2` for Rademacher probes, with
    :math:`S = (J + J^\top)/2`.

    Parameters
    ----------
    field : callable
        ``field(t, x) -> u``, autograd-traceable (otherwise central
        differences are used for :math:`J\varepsilon`).
    t : float
    x : array_like, shape (n, d)
    rng : numpy.random.Generator or int
    n_probes : int
        Probes per point (>= 1).
    probe : {"rademacher", "gaussian"}

    Returns
    -------
    estimate : ndarray, shape (n,)
    stderr : ndarray, shape (n,), or None
        ``std(ddof=1) / sqrt(n_probes)``; None for one probe.
    samples : ndarray, shape (n_probes, n)
        The per-probe values :math:`\varepsilon_j^\top J \varepsilon_j`.
    """
    if not callable(field):
        raise TypeError(f"field: expected a callable field(t, x), got {type(field).__name__}")
    t = check_scalar(t, "t", low=0.0, high=1.0)
    x = check_points(x, "x")
    n_probes = check_scalar(n_probes, "n_probes", low=1, integer=True)
    probe = _check_probe(probe)
    rng = _require_rng(rng, "hutchinson")
    eps = _draw_probes(rng, probe, (n_probes,) + x.shape)
    strategy = _HutchinsonDivergence(field, eps, _is_traceable(field, t, x))
    _, est = strategy(t, x)
    samples = est.T.copy()
    stderr = samples.std(axis=0, ddof=1) / np.sqrt(n_probes) if n_probes > 1 else None
    return samples.mean(axis=0), stderr, samples


def _is_traceable(field, t, x) -> bool:
    try:
        _trace(field, t, x)
    except TypeError:
        return False
    return True


# ---------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------


def _check_probe(probe):
    if not isinstance(probe, str) or probe.lower() not in PROBES:
        raise ValueError(f"probe: expected one of {list(PROBES)}, got {probe!r}"[:300])
    return probe.lower()


def _require_rng(rng, why):
    if rng is None:
        raise TypeError(
            f"rng: the {why} estimator draws random probes; expected a numpy.random.Generator "
            "or an int seed, got None"
        )
    return as_rng(rng)


def _check_method(method):
    if isinstance(method, solvers.FixedStepMethod):
        return method
    if not isinstance(method, str):
        raise TypeError(f"method: expected one of {list(solvers.METHODS)}, got {type(method).__name__} {method!r}"[:300])
    if method.lower() not in {m.lower() for m in solvers.METHODS}:
        raise ValueError(f"method: expected one of {list(solvers.METHODS)}, got {method!r}")
    return method


def _make_strategy(field, divergence, x, t_start, n_probes, probe, rng):
    """Choose how the divergence is computed; returns the strategy object."""
    n, d = x.shape
    if callable(divergence) and not isinstance(divergence, str):
        if n_probes is not None:
            raise ValueError("n_probes: only used with divergence='hutchinson' (or 'auto'), got a divergence callable")
        return _ExactDivergence(field, divergence)
    if not isinstance(divergence, str) and divergence is not None:
        raise TypeError(f"divergence: expected one of {list(DIVERGENCES)} or a callable div(t, x), got {type(divergence).__name__}")
    mode = "auto" if divergence is None else divergence.lower()
    if mode not in DIVERGENCES:
        raise ValueError(f"divergence: expected one of {list(DIVERGENCES)} or a callable div(t, x), got {divergence!r}")
    own_div = getattr(field, "divergence", None)
    if mode in ("exact", "autograd") and n_probes is not None:
        raise ValueError(f"n_probes: only used with divergence='hutchinson' (or 'auto'), got divergence={divergence!r}")
    if mode == "exact" or (mode == "auto" and callable(own_div)):
        if n_probes is not None:
            raise ValueError("n_probes: the field carries its exact divergence, which 'auto' uses; "
                             "pass divergence='hutchinson' to use probes")
        if not callable(own_div):
            raise ValueError(
                "divergence: 'exact' needs a field with a .divergence(t, x) method (cnf.mlp_field, "
                f"cnf.marginal_field) or a callable div(t, x); {type(field).__name__} has none; "
                "use 'autograd' or 'hutchinson'"
            )
        return _ExactDivergence(field, own_div, getattr(field, "value_and_divergence", None))
    if mode == "autograd":
        _trace(field, t_start, x)  # fail now, naming the reason, rather than mid-integration
        return _AutogradDivergence(field)
    traceable = _is_traceable(field, t_start, x)
    if mode == "auto" and traceable:
        if n_probes is not None:
            raise ValueError("n_probes: the field is traceable, so 'auto' uses the exact autograd trace; "
                             "pass divergence='hutchinson' to use probes")
        return _AutogradDivergence(field)
    # Hutchinson, asked for or as the fallback for a field autograd cannot trace.
    k = _DEFAULT_PROBES if n_probes is None else check_scalar(n_probes, "n_probes", low=1, integer=True)
    probe = _check_probe(probe)
    rng = _require_rng(rng, "hutchinson" if mode == "hutchinson" else
                       "field is not autograd-traceable, so divergence='auto' falls back to the Hutchinson")
    # One probe per (probe index, point), drawn once: the same eps_j is used
    # at every time of the trajectory, so the integral of eps^T J eps over
    # the trajectory is unbiased for the integral of tr J.
    return _HutchinsonDivergence(field, _draw_probes(rng, probe, (k, n, d)), traceable)


def _check_base(base_log_prob, field):
    if base_log_prob is None:
        own = getattr(field, "base_log_prob", None)
        return own if callable(own) else standard_normal_log_prob
    if not callable(base_log_prob):
        raise TypeError(f"base_log_prob: expected a callable x -> log p_0(x) of shape (n,), got {type(base_log_prob).__name__}")
    return base_log_prob


def _eval_base(base_log_prob, x):
    n = x.shape[0]
    xp = _xp(x)
    v = xp.asarray(base_log_prob(x))
    if v.shape != (n,):
        raise ValueError(f"base_log_prob: expected shape ({n},), got shape {v.shape}")
    v = v.astype(np.float64, copy=False)
    if not bool(xp.all(xp.isfinite(v))):
        raise ValueError("base_log_prob: expected finite log-densities, got NaN or inf")
    return v


# ---------------------------------------------------------------------------
# The augmented ODE
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class _Transport:
    x_end: np.ndarray
    delta: np.ndarray          # (m, n): log p_{t1}(x_{t1}) - log p_{t0}(x_{t0}), per probe column
    nfe: int
    method: str
    n_steps: int | None
    divergence: str
    n_probes: int | None


def log_density_change(field, x, t0: float, t1: float, *, divergence=None, method="DOP853",
                       n_steps: int = 100, rtol: float = 1e-7, atol: float = 1e-9,
                       n_probes: int | None = None, probe: str = "rademacher", rng=None):
    r"""Integrate the augmented ODE (eq 8, 13) from ``t0`` to ``t1``.

    .. math::

        \frac{d}{dt}\begin{pmatrix} x_t \\ \ell_t \end{pmatrix}
        = \begin{pmatrix} u_t(x_t) \\ -\nabla\cdot u_t(x_t) \end{pmatrix},
        \qquad \ell_{t_0} = 0
        \;\Rightarrow\;
        \ell_{t_1} = \log p_{t_1}(x_{t_1}) - \log p_{t_0}(x_{t_0})
        = -\int_{t_0}^{t_1} \nabla\cdot u_t(x_t)\, dt.

    The building block of :func:`log_prob` (``t0 = 1, t1 = 0``) and
    :func:`sample_with_log_prob` (``t0 = 0, t1 = 1``); arguments as there.

    Returns
    -------
    x_end : ndarray, shape (n, d)
        :math:`x_{t_1}`.
    delta_log_p : ndarray, shape (n,)
        :math:`\ell_{t_1}` (for Hutchinson: the mean over probes).
    info : dict
        ``"probes"`` (m, n) the per-column values of :math:`\ell_{t_1}`,
        ``"nfe"``, ``"method"``, ``"n_steps"``, ``"divergence"``, ``"n_probes"``.
    """
    if not callable(field):
        raise TypeError(f"field: expected a callable field(t, x), got {type(field).__name__}")
    x = check_points(x, "x")
    t0 = check_scalar(t0, "t0", low=0.0, high=1.0)
    t1 = check_scalar(t1, "t1", low=0.0, high=1.0)
    tr = _transport(field, x, t0, t1, divergence, method, n_steps, rtol, atol, n_probes, probe, rng)
    info = {"probes": tr.delta, "nfe": tr.nfe, "method": tr.method, "n_steps": tr.n_steps,
            "divergence": tr.divergence, "n_probes": tr.n_probes}
    return tr.x_end, tr.delta.mean(axis=0), info


def _transport(field, x, t0, t1, divergence, method, n_steps, rtol, atol, n_probes, probe, rng) -> _Transport:
    n, d = x.shape
    if n < 1 or d < 1:
        raise ValueError(f"x: expected at least one point of at least one dimension, got shape {x.shape}")
    method = _check_method(method)
    # The solver re-checks these; checking them first keeps a bad argument
    # from costing a field trace or a draw of probes.
    n_steps = check_scalar(n_steps, "n_steps", low=1, integer=True)
    rtol = check_scalar(rtol, "rtol", low=0.0, low_open=True)
    atol = check_scalar(atol, "atol", low=0.0)
    if n_probes is not None:
        n_probes = check_scalar(n_probes, "n_probes", low=1, integer=True)
    xp = _xp(x)
    if xp is not np:
        # On the GPU: an exact divergence (the field's own, or a callable) with
        # a fixed-step method; autograd and the Hutchinson machinery are CPU-only,
        # and solvers.integrate refuses the adaptive methods with its own message.
        own = callable(divergence) or (divergence in (None, "auto", "exact")
                                       and callable(getattr(field, "divergence", None)))
        if not own or n_probes is not None:
            raise TypeError(
                "divergence: on CuPy (GPU) arrays only the exact divergence is available (a field with "
                ".divergence such as cnf.mlp_field / cnf.marginal_field, or a callable div(t, x)); "
                f"got divergence={divergence!r}; autograd and Hutchinson run on the host (refflow.backend.to_host)"
            )
    strategy = _make_strategy(field, divergence, x, t0, n_probes, probe, rng)
    m = strategy.n_columns

    def augmented(t, z):
        u, div = strategy(t, z[:, :d])
        # eq 13: d/dt log p_t(x_t) = -div u_t(x_t).
        return xp.concatenate([u, -div], axis=1)

    # np.concatenate hands CuPy arrays to cupy.concatenate (__array_function__)
    z_start = np.concatenate([x, xp.zeros((n, m))], axis=1)
    sol = solvers.integrate(augmented, z_start, t0, t1, method=method, n_steps=n_steps, rtol=rtol, atol=atol)
    return _Transport(
        x_end=sol.x[:, :d].copy(), delta=sol.x[:, d:].T.copy(), nfe=sol.nfe, method=sol.method,
        n_steps=sol.n_steps, divergence=strategy.name,
        n_probes=m if isinstance(strategy, _HutchinsonDivergence) else None,
    )


def _result(tr: _Transport, x_0, x_1, log_p_probes) -> CNFResult:
    # log_p_probes: (m, n), one row per probe column.
    hutch = tr.n_probes is not None
    m = log_p_probes.shape[0]
    log_p = log_p_probes.mean(axis=0)
    stderr = log_p_probes.std(axis=0, ddof=1) / np.sqrt(m) if hutch and m > 1 else None
    return CNFResult(
        log_p=log_p, x_0=x_0, x_1=x_1, nfe=tr.nfe, divergence_integral=None,
        log_p_stderr=stderr, log_p_probes=log_p_probes if hutch else None,
        divergence=tr.divergence, method=tr.method, n_steps=tr.n_steps, n_probes=tr.n_probes,
    )


def log_prob(field, x_1, *, divergence=None, method="DOP853", n_steps: int = 100, rtol: float = 1e-7,
             atol: float = 1e-9, n_probes: int | None = None, probe: str = "rademacher", rng=None,
             base_log_prob=None) -> CNFResult:
    r"""Log-likelihood of a CNF by the instantaneous change of variables (eq 14).

    Integrates :math:`\dot x_t = u_t(x_t)`, :math:`\dot\ell_t = -\nabla\cdot u_t(x_t)`
    (eq 8, 13) from :math:`t = 1` (:math:`x_1`, :math:`\ell_1 = 0`) to
    :math:`t = 0`, which gives :math:`x_0 = \psi_1^{-1}(x_1)` and
    :math:`\ell_0 = \int_0^1 \nabla\cdot u_t(x_t)\,dt`, and returns

    .. math::

        \log p_1(x_1) = \log p_0(x_0) - \int_0^1 \nabla \cdot u_t(x_t)\, dt .

    Parameters
    ----------
    field : callable
        ``field(t, x) -> u`` with ``t`` a float and ``x``, ``u`` of shape
        (n, d).  :func:`mlp_field` and :func:`marginal_field` give fields
        that carry their exact divergence (and, for a marginal, its own
        :math:`p_0`).
    x_1 : array_like, shape (n, d)
        Points at which to evaluate :math:`\log p_1`.
    divergence : None, "auto", "exact", "autograd", "hutchinson" or callable
        ``None``/``"auto"``: the field's own ``.divergence`` when it has one,
        else the autograd trace when autograd can trace the field, else
        Hutchinson with central-difference probe products (then ``rng`` is
        required).  ``"exact"``: the field's ``.divergence``.  A callable
        ``div(t, x) -> (n,)``: used as the exact divergence.
        ``"autograd"``: :math:`\operatorname{tr}\partial u/\partial x` by ``d``
        reverse passes.  ``"hutchinson"``: :math:`\varepsilon^\top J\varepsilon`
        averaged over ``n_probes`` probes drawn once per trajectory.
    method : str or FixedStepMethod
        ``"DOP853"`` (default) or any method of
        :func:`refflow.solvers.integrate`.
    n_steps : int
        Steps of a fixed-step method.
    rtol, atol : float
        Tolerances of an adaptive method; they control :math:`\ell_t` as
        well as :math:`x_t`.
    n_probes : int, optional
        Hutchinson probes per point (default 8).
    probe : {"rademacher", "gaussian"}
    rng : numpy.random.Generator or int, optional
        Required for Hutchinson.
    base_log_prob : callable, optional
        :math:`\log p_0`, ``x -> (n,)``; default the field's own
        ``base_log_prob`` if it has one, else :math:`\mathcal N(0, I)`.

    Returns
    -------
    CNFResult
        ``log_p``, ``x_0``, ``nfe``, ``divergence_integral``, and for
        Hutchinson ``log_p_stderr`` and ``log_p_probes``.

    Notes
    -----
    With Hutchinson and a fixed-step method, every probe's estimate is an
    unbiased estimate of the same method's exact-divergence result (the
    trajectory of :math:`x_t` does not depend on the probes and the
    quadrature is linear in the integrand).  An adaptive method chooses its
    steps from the whole augmented state, so its steps depend on the probes
    and the bias is bounded by the solver tolerance only.
    """
    if not callable(field):
        raise TypeError(f"field: expected a callable field(t, x), got {type(field).__name__}")
    x_1 = check_points(x_1, "x_1")
    base = _check_base(base_log_prob, field)
    tr = _transport(field, x_1, 1.0, 0.0, divergence, method, n_steps, rtol, atol, n_probes, probe, rng)
    x_0 = tr.x_end
    # l_0 = log p_0(x_0) - log p_1(x_1) = int_0^1 div u_t(x_t) dt.
    integral = tr.delta
    out = _result(tr, x_0, x_1.copy(), _eval_base(base, x_0)[None, :] - integral)
    out.divergence_integral = integral.mean(axis=0)
    return out


def sample_with_log_prob(field, n: int, dim: int, rng, *, divergence=None, method="DOP853",
                         n_steps: int = 100, rtol: float = 1e-7, atol: float = 1e-9,
                         n_probes: int | None = None, probe: str = "rademacher") -> CNFResult:
    r"""Sample :math:`x_1` and its log-density in one forward integration (eq 9, 13, 14).

    Draws :math:`x_0 \sim p_0` and integrates the augmented ODE from
    :math:`t = 0` (:math:`\ell_0 = 0`) to :math:`t = 1`:

    .. math::

        x_1 = x_0 + \int_0^1 u_t(x_t)\, dt, \qquad
        \log p_1(x_1) = \log p_0(x_0) - \int_0^1 \nabla\cdot u_t(x_t)\, dt .

    :math:`p_0` is :math:`\mathcal N(0, I)`, or the field's own base when it
    has ``sample_base`` and ``base_log_prob`` (:func:`marginal_field`).
    ``rng`` draws :math:`x_0` first, then any Hutchinson probes.  Other
    arguments as in :func:`log_prob`.

    Returns
    -------
    CNFResult
        ``x_1`` the samples, ``log_p`` :math:`\log p_1(x_1)`, ``x_0`` the draws.
    """
    if not callable(field):
        raise TypeError(f"field: expected a callable field(t, x), got {type(field).__name__}")
    n = check_scalar(n, "n", low=1, integer=True)
    dim = check_scalar(dim, "dim", low=1, integer=True)
    rng = as_rng(rng)
    own_sampler = getattr(field, "sample_base", None)
    own_log_prob = getattr(field, "base_log_prob", None)
    if callable(own_sampler) and callable(own_log_prob):
        x_0 = check_points(own_sampler(n, rng), "sample_base", dim)
        base = own_log_prob
    else:
        x_0 = rng.standard_normal((n, dim))
        base = standard_normal_log_prob
    tr = _transport(field, x_0, 0.0, 1.0, divergence, method, n_steps, rtol, atol, n_probes, probe, rng)
    # l_1 = log p_1(x_1) - log p_0(x_0) = -int_0^1 div u_t(x_t) dt.
    out = _result(tr, x_0, tr.x_end, _eval_base(base, x_0)[None, :] + tr.delta)
    out.divergence_integral = -tr.delta.mean(axis=0)
    return out


# ---------------------------------------------------------------------------
# The continuous limit (eq 5-10)
# ---------------------------------------------------------------------------


def euler_flow_log_prob(field, x_0, n_steps: int, *, base_log_prob=None) -> EulerFlowResult:
    r"""The Euler map as a discrete residual flow, with its exact log-likelihood (eq 5, 6).

    With :math:`\delta = 1/K` and :math:`t_k = k\delta`, the map
    :math:`x_1 = \phi_{K-1} \circ \dots \circ \phi_0(x_0)` is composed of the
    residual layers of eq 6, :math:`\phi_k(x) = x + \delta\, u_{t_k}(x)`, and
    the change of variables (eq 2, 5) gives

    .. math::

        \log p^K_1(x_1) = \log p_0(x_0)
          - \sum_{k=0}^{K-1} \log\big|\det\big(I + \delta J_{u_{t_k}}(x_k)\big)\big| .

    As :math:`K \to \infty` this tends to eq 14 (since
    :math:`\log\det(I + \delta J) = \delta \operatorname{tr} J + O(\delta^2)`),
    with error :math:`O(\delta)`; see :func:`continuous_limit`.

    Parameters
    ----------
    field : callable
        ``field(t, x) -> u``, autograd-traceable (the Jacobians come from
        :func:`refflow.autodiff.jacobian_pointwise`, ``d`` reverse passes a
        step; meant for small ``d``).
    x_0 : array_like, shape (n, d)
    n_steps : int
        ``K >= 1``.
    base_log_prob : callable, optional
        :math:`\log p_0`; default the field's own, else :math:`\mathcal N(0, I)`.

    Raises
    ------
    ValueError
        A step with :math:`\det(I + \delta J) \le 0` somewhere: :math:`\delta`
        exceeds the bound :math:`\delta\,\mathrm{Lip}(u) < 1` of eq 6 and the
        step folds space or reverses orientation; use more steps.
    """
    if not callable(field):
        raise TypeError(f"field: expected a callable field(t, x), got {type(field).__name__}")
    x_0 = check_points(x_0, "x_0")
    n, d = x_0.shape
    if n < 1 or d < 1:
        raise ValueError(f"x_0: expected at least one point of at least one dimension, got shape {x_0.shape}")
    K = check_scalar(n_steps, "n_steps", low=1, integer=True)
    base = _check_base(base_log_prob, field)
    delta = 1.0 / K
    x_k = x_0.copy()
    log_det = np.zeros(n)
    eye = np.eye(d)
    for k in range(K):
        t_k = k * delta
        _trace(field, t_k, x_k)  # a clear TypeError for a field autograd cannot trace
        J = autodiff.jacobian_pointwise(lambda z: field(t_k, z), x_k)
        sign, logabs = np.linalg.slogdet(eye + delta * J)
        if np.any(sign <= 0):
            raise ValueError(
                f"n_steps: the residual map x + delta u(t, x) at step {k} (t = {t_k:.6g}, delta = {delta:.3g}) "
                f"has det(I + delta J) <= 0 at {int(np.sum(sign <= 0))} point(s): the step exceeds the bound "
                "delta Lip(u) < 1 of eq 6 and folds space or reverses its orientation, which no flow does; "
                "use more steps"
            )
        log_det += logabs
        x_k = x_k + delta * _check_values(field(t_k, x_k), n, d, t_k, "field")
    log_p = _eval_base(base, x_0) - log_det
    return EulerFlowResult(x_1=x_k, log_p=log_p, x_0=x_0, log_det=log_det, n_steps=K)


def continuous_limit(field, x_0, n_steps=(8, 16, 32, 64, 128), *, divergence=None, rtol: float = 1e-10,
                     atol: float = 1e-10, base_log_prob=None) -> ContinuousLimit:
    r"""Measure how the Euler flow's likelihood (eq 5-6) approaches the CNF's (eq 14) as K grows.

    For each ``K`` the discrete flow carries ``x_0`` to :math:`x^K_1` with
    log-density :math:`\log p^K_1(x^K_1)` (:func:`euler_flow_log_prob`); the
    CNF's :math:`\log p_1(x^K_1)` at the same points is computed by
    :func:`log_prob` with DOP853 at ``rtol``/``atol``.  The error

    .. math::

        e_K = \max_i \big|\log p^K_1(x^K_{1,i}) - \log p_1(x^K_{1,i})\big|
            = O(1/K)

    is fitted against :math:`\delta = 1/K` on a log-log scale; Euler is first
    order, so the slope is 1.

    Returns
    -------
    ContinuousLimit
    """
    steps = np.asarray(n_steps)
    if steps.ndim != 1 or steps.size < 2 or not np.issubdtype(steps.dtype, np.integer) or np.any(steps < 1):
        raise ValueError(f"n_steps: expected at least two step counts >= 1, got {n_steps!r}"[:300])
    errors, flows, refs = [], [], []
    for K in steps:
        euler = euler_flow_log_prob(field, x_0, int(K), base_log_prob=base_log_prob)
        cnf = log_prob(field, euler.x_1, divergence=divergence, method="DOP853", rtol=rtol, atol=atol,
                       base_log_prob=base_log_prob)
        errors.append(float(np.max(np.abs(euler.log_p - cnf.log_p))))
        flows.append(euler)
        refs.append(cnf.log_p)
    errors = np.array(errors)
    slope = float(np.polyfit(np.log(1.0 / steps), np.log(errors), 1)[0])
    return ContinuousLimit(n_steps=steps.astype(np.int64), errors=errors, slope=slope, euler=flows, log_p_cnf=refs)
