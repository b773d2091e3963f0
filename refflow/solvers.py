r"""Sampling by integrating the flow ODE (Algorithm 2, eq 6-10) and guidance (eq 40).

A velocity field is any callable ``field(t, x) -> u`` with ``t`` a Python float
(one time for the whole batch) and ``x``, ``u`` of shape ``(n, d)``.  The ODE
of eq 8/10,

.. math::

    \frac{d}{dt}\psi_t(x_0) = u_t(\psi_t(x_0)), \qquad \psi_0(x_0) = x_0,

is integrated over any interval ``[t0, t1]`` inside ``[0, 1]``, forwards
(``t0 < t1``, source towards data) or backwards (``t0 > t1``, data towards
source), by

* fixed-step explicit Runge-Kutta methods: ``"euler"`` (Algorithm 2 itself,
  one residual step of eq 6 per time step), ``"midpoint"``, ``"heun"``,
  ``"rk4"``;
* adaptive :func:`scipy.integrate.solve_ivp` methods: ``"RK23"``, ``"RK45"``,
  ``"DOP853"``, ``"Radau"``, ``"BDF"``, ``"LSODA"``, the batch flattened into
  one system of ``n * d`` equations.

:func:`integrate` is the single entry point; :func:`sample` draws
:math:`x_0 \sim \mathcal{N}(0, I)` and integrates from ``t = 0`` to ``t = 1``.

Backends: the fixed-step methods run on CuPy arrays as they are (the state
and the field's outputs stay on the GPU).  :func:`scipy.integrate.solve_ivp`
is CPU-only: the adaptive methods refuse a CuPy ``x`` with a ``TypeError``
(use a fixed-step method, or move ``x`` with
:func:`refflow.backend.to_host`).
:func:`guided_field` builds the classifier-free guided field of eq 40 from a
conditional field ``field(t, x, y)``.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import scipy.integrate
import scipy.sparse

from refflow._validation import _xp, as_rng, check_labels, check_points, check_scalar, check_time, exact
from refflow.backend import as_device_rng, get_namespace, same_backend

__all__ = [
    "Solution",
    "FixedStepMethod",
    "FIXED_STEP_METHODS",
    "SCIPY_METHODS",
    "METHODS",
    "GUIDANCE_CONVENTIONS",
    "GuidedField",
    "integrate",
    "sample",
    "guided_field",
]


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Solution:
    """The result of :func:`integrate` / :func:`sample`.

    Attributes
    ----------
    x : ndarray, shape (n, d)
        The state at ``t1`` (for :func:`sample`: the samples :math:`x_1`).
    x0 : ndarray, shape (n, d)
        The state at ``t0`` (for :func:`sample`: the source draws :math:`x_0`).
    t0, t1 : float
        The interval that was integrated, in the direction ``t0 -> t1``.
    ts : ndarray, shape (m,), or None
        Times at which the trajectory was recorded (``None`` unless ``t_eval``
        was given).  For fixed-step methods these are the step-grid times that
        matched the requested ones; for SciPy methods the requested times.
    xs : ndarray, shape (m, n, d), or None
        The states at ``ts``.
    nfe : int
        Number of evaluations of the velocity field; one call on the whole
        batch counts once (Jacobian estimates of implicit methods included).
    method : str
        Canonical method name.
    n_steps : int or None
        Number of fixed steps; ``None`` for adaptive SciPy methods.
    """

    x: np.ndarray
    x0: np.ndarray
    t0: float
    t1: float
    ts: np.ndarray | None
    xs: np.ndarray | None
    nfe: int
    method: str
    n_steps: int | None = None


# ---------------------------------------------------------------------------
# Fixed-step explicit Runge-Kutta methods
# ---------------------------------------------------------------------------
#
# Each step function maps (u, t, delta, x_t) to x_{t+delta}.  ``u`` is the
# (counted, checked) velocity field; ``delta`` is negative when integrating
# backwards.  They are written out formula by formula rather than through a
# generic Butcher tableau so that each line can be read against its equation.


def _euler_step(u, t, delta, x_t):
    # Algorithm 2, line 2 (a residual step of eq 6): x_{t+δ} = x_t + δ u(t, x_t).
    return x_t + delta * u(t, x_t)


def _midpoint_step(u, t, delta, x_t):
    # Half an Euler step to the middle of the interval, then a full step with
    # the velocity found there.
    x_mid = x_t + (0.5 * delta) * u(t, x_t)
    return x_t + delta * u(t + 0.5 * delta, x_mid)


def _heun_step(u, t, delta, x_t):
    # Explicit trapezoid rule: average the velocity at both ends of the step,
    # the far end reached by an Euler predictor.
    k_1 = u(t, x_t)
    k_2 = u(t + delta, x_t + delta * k_1)
    return x_t + (0.5 * delta) * (k_1 + k_2)


def _rk4_step(u, t, delta, x_t):
    # The classical fourth-order Runge-Kutta method (weights 1/6, 1/3, 1/3, 1/6).
    half = 0.5 * delta
    k_1 = u(t, x_t)
    k_2 = u(t + half, x_t + half * k_1)
    k_3 = u(t + half, x_t + half * k_2)
    k_4 = u(t + delta, x_t + delta * k_3)
    return x_t + (delta / 6.0) * (k_1 + 2.0 * k_2 + 2.0 * k_3 + k_4)


@dataclasses.dataclass(frozen=True)
class FixedStepMethod:
    r"""A fixed-step one-step method for the flow ODE (eq 8).

    Parameters
    ----------
    name : str
        Name reported in :attr:`Solution.method`.
    order : int
        Global order of accuracy: the error at ``t1`` falls like
        :math:`\delta^{\text{order}}`.
    n_stages : int
        Field evaluations per step.
    step : callable
        ``step(u, t, delta, x_t) -> x_next``: one step from time ``t`` to
        ``t + delta`` (``delta < 0`` backwards), where ``u(t, x)`` is the
        velocity field.

    Notes
    -----
    Any instance can be passed as ``method`` to :func:`integrate`; this is how
    the verification checks run deliberately wrong methods through the same
    driver as the right ones.
    """

    name: str
    order: int
    n_stages: int
    step: Callable


FIXED_STEP_METHODS: dict[str, FixedStepMethod] = {
    "euler": FixedStepMethod("euler", 1, 1, _euler_step),
    "midpoint": FixedStepMethod("midpoint", 2, 2, _midpoint_step),
    "heun": FixedStepMethod("heun", 2, 2, _heun_step),
    "rk4": FixedStepMethod("rk4", 4, 4, _rk4_step),
}
"""The fixed-step methods by name, with their orders and stage counts."""

SCIPY_METHODS: tuple[str, ...] = ("RK23", "RK45", "DOP853", "Radau", "BDF", "LSODA")
"""The adaptive :func:`scipy.integrate.solve_ivp` methods accepted by :func:`integrate`."""

METHODS: tuple[str, ...] = tuple(FIXED_STEP_METHODS) + SCIPY_METHODS
"""Every method name accepted by :func:`integrate` (case-insensitive)."""

_METHOD_LOOKUP = {name.lower(): name for name in METHODS}

# A requested fixed-step output time counts as "on the grid" when it lies this
# fraction of a step from a grid time: far above rounding (k * delta is
# computed, not accumulated), far below anything an interpolation would fix.
_GRID_RTOL = 1e-8


# ---------------------------------------------------------------------------
# The counted, checked field
# ---------------------------------------------------------------------------


def _check_velocity(u, n: int, d: int, t: float, name: str = "field") -> np.ndarray:
    """Return the field's output as float64 ``(n, d)``, or raise naming ``name``."""
    xp = _xp(u)
    arr = xp.asarray(u)
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise TypeError(
            f"{name}: expected field(t, x) to return a real array of shape ({n}, {d}), "
            f"got {type(u).__name__} of dtype {arr.dtype} at t={t!r}"
        )
    if arr.shape != (n, d):
        raise ValueError(
            f"{name}: expected field(t, x) to return shape ({n}, {d}) like x, "
            f"got shape {arr.shape} at t={t!r}"
        )
    arr = arr.astype(np.float64, copy=False)
    if not bool(xp.all(xp.isfinite(arr))):
        bad = int(arr.size - int(xp.count_nonzero(xp.isfinite(arr))))
        raise ValueError(
            f"{name}: expected finite velocities, got {bad} NaN or inf entries at t={t!r}"
        )
    return arr


class _CountedField:
    """Wrap ``field``: count calls, pass ``t`` as a float, check every output.

    Stage times such as ``t + delta`` (or SciPy's ``t + c h``) can land one
    rounding error outside ``[t0, t1]``; they are clipped back so that a field
    which validates ``t in [0, 1]`` never sees ``1 + 2**-52``.
    """

    def __init__(self, field, n: int, d: int, t0: float, t1: float, xp=np):
        self.field = field
        self.xp = xp
        self.n = n
        self.d = d
        self.t_lo = min(t0, t1)
        self.t_hi = max(t0, t1)
        self.nfe = 0

    def __call__(self, t, x):
        t = min(max(float(t), self.t_lo), self.t_hi)
        u = self.field(t, x)
        self.nfe += 1
        same_backend(self.xp, u, "field")  # a GPU state needs a GPU field, and vice versa
        return _check_velocity(u, self.n, self.d, t)


# ---------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------


def _resolve_method(method):
    if isinstance(method, FixedStepMethod):
        return method
    if not isinstance(method, str):
        raise TypeError(
            f"method: expected one of {list(METHODS)} or a FixedStepMethod, "
            f"got {type(method).__name__} {method!r}"[:300]
        )
    key = _METHOD_LOOKUP.get(method.lower())
    if key is None:
        raise ValueError(f"method: expected one of {list(METHODS)}, got {method!r}")
    return FIXED_STEP_METHODS.get(key, key)


def _check_t_eval(t_eval, t0: float, t1: float) -> np.ndarray:
    arr = check_time(t_eval, name="t_eval")
    arr = np.atleast_1d(arr)
    if arr.size == 0:
        raise ValueError("t_eval: expected at least one time, got an empty array")
    lo, hi = min(t0, t1), max(t0, t1)
    if np.any(arr < lo) or np.any(arr > hi):
        raise ValueError(
            f"t_eval: expected times inside [{lo!r}, {hi!r}] (the integration interval), "
            f"got {exact(arr[(arr < lo) | (arr > hi)][0])}"
        )
    return arr


# ---------------------------------------------------------------------------
# Drivers
# ---------------------------------------------------------------------------


def _integrate_fixed(method: FixedStepMethod, u, x, t0, t1, n_steps, t_eval):
    # A constant step δ and grid times t_k = t0 + k δ, as in Algorithm 2;
    # k δ is computed rather than accumulated so the grid does not drift.
    delta = (t1 - t0) / n_steps
    grid = t0 + delta * np.arange(n_steps + 1, dtype=np.float64)
    grid[-1] = t1

    wanted = None
    if t_eval is not None:
        k = np.rint((t_eval - t0) / delta).astype(np.int64)
        k = np.clip(k, 0, n_steps)
        miss = np.abs(t_eval - grid[k]) > _GRID_RTOL * abs(delta)
        if np.any(miss):
            bad = t_eval[miss]
            raise ValueError(
                f"t_eval: fixed-step method {method.name!r} records states only on its "
                f"step grid t0 + k*(t1 - t0)/n_steps (n_steps={n_steps}); got off-grid "
                f"times {bad[:5].tolist()}; choose n_steps so they fall on the grid or "
                f"use an adaptive SciPy method"
            )
        wanted = np.unique(k)
        slot = {int(j): i for i, j in enumerate(wanted)}
        stored = _xp(x).empty((wanted.size,) + x.shape)
        if 0 in slot:
            stored[slot[0]] = x

    x_t = x
    for k_step in range(n_steps):
        x_t = method.step(u, float(grid[k_step]), delta, x_t)
        x_t = _check_state(x_t, x.shape, method.name, float(grid[k_step + 1]))
        if wanted is not None and (k_step + 1) in slot:
            stored[slot[k_step + 1]] = x_t

    ts = xs = None
    if t_eval is not None:
        rows = np.searchsorted(wanted, k)
        ts = grid[k]
        xs = stored[_xp(x).asarray(rows)]
    return x_t, ts, xs


def _check_state(x_t, shape, name, t):
    # A custom FixedStepMethod could return a wrong shape; the built-in ones
    # cannot, and the field's outputs are already checked finite.
    x_t = _xp(x_t).asarray(x_t, dtype=np.float64)
    if x_t.shape != shape:
        raise ValueError(
            f"method: step of {name!r} expected to return shape {shape}, "
            f"got shape {x_t.shape} at t={t!r}"
        )
    return x_t


def _block_sparsity(n: int, d: int):
    # A velocity field acts on each point separately, so the Jacobian of the
    # flattened system is block diagonal with n blocks of d x d.
    return scipy.sparse.kron(
        scipy.sparse.identity(n, format="csr"), np.ones((d, d)), format="csc"
    )


def _integrate_scipy(method: str, u, x, t0, t1, rtol, atol, t_eval):
    n, d = x.shape

    def rhs(t, y):
        # A copy, so that a field returning its input unchanged cannot alias
        # SciPy's state vector.
        return u(t, y.reshape(n, d)).reshape(-1).copy()

    options = {}
    if method in ("Radau", "BDF"):
        options["jac_sparsity"] = _block_sparsity(n, d)
    elif method == "LSODA":
        # Block diagonal in row-major flattening = banded with half-width d - 1.
        options["lband"] = d - 1
        options["uband"] = d - 1

    if t_eval is None:
        return _step_to_end(method, rhs, x, t0, t1, rtol, atol, options), None, None

    # With t_eval SciPy keeps only the requested times
    # (plus t1, so the end state comes from the same dense output); they are
    # passed sorted in the direction of integration, as solve_ivp requires.
    times, inverse = np.unique(np.append(t_eval, t1), return_inverse=True)
    if t1 < t0:
        times = times[::-1]
        inverse = times.size - 1 - inverse
    sol = scipy.integrate.solve_ivp(
        rhs, (t0, t1), x.reshape(-1), method=method, t_eval=times,
        rtol=rtol, atol=atol, **options,
    )
    if sol.status != 0:
        raise RuntimeError(f"solve_ivp ({method}) failed: {sol.message}")
    states = sol.y.T.reshape(times.size, n, d)[inverse]
    return states[-1].copy(), t_eval.copy(), states[:-1]


def _step_to_end(method, rhs, x, t0, t1, rtol, atol, options):
    """The end state of SciPy's ``method`` stepped from t0 to t1, keeping only the current state.

    ``solve_ivp`` without ``t_eval`` stores every accepted step (memory
    growing with the number of steps times n d); driving its step class
    directly gives the same end state, bit for bit, in the memory of one
    state and the method's stages.
    """
    n, d = x.shape
    solver = getattr(scipy.integrate, method)(rhs, t0, x.reshape(-1).copy(), t1, rtol=rtol, atol=atol, **options)
    while solver.status == "running":
        message = solver.step()
        if solver.status == "failed":
            raise RuntimeError(f"solve_ivp ({method}) failed: {message}")
    return solver.y.reshape(n, d).copy()


def integrate(
    field,
    x,
    t0: float = 0.0,
    t1: float = 1.0,
    method="rk4",
    n_steps: int = 100,
    rtol: float = 1e-7,
    atol: float = 1e-9,
    t_eval=None,
) -> Solution:
    r"""Integrate the flow ODE (eq 8, eq 10) from ``t0`` to ``t1``.

    Solves

    .. math::

        \frac{d x_t}{dt} = u_t(x_t), \qquad
        x_{t_1} = x_{t_0} + \int_{t_0}^{t_1} u_s(x_s)\, ds

    (eq 9 with a general start time) for every row of ``x`` at once.  With
    ``method="euler"``, ``t0=0``, ``t1=1`` this is Algorithm 2 with
    :math:`\delta = 1/n_\text{steps}`:

    .. math::

        x_{t+\delta} = x_t + \delta\, u_\theta(t, x_t),
        \qquad t = 0, \delta, \dots, 1 - \delta,

    each step being one residual map :math:`\phi(x) = x + \delta u(x)` of eq 6.

    Parameters
    ----------
    field : callable
        ``field(t, x) -> u``, called with a Python float ``t`` and the whole
        batch ``x`` of shape ``(n, d)``; must return a finite real array of
        shape ``(n, d)`` and act on each row independently (as any velocity
        field does; the implicit SciPy methods rely on it).
    x : array_like, shape (n, d)
        The state at ``t0``.  A CuPy array runs the fixed-step methods on
        the GPU (the field must then return CuPy arrays); the SciPy methods
        are CPU-only.
    t0, t1 : float
        Start and end times in ``[0, 1]``; ``t1 < t0`` integrates backwards
        (data towards source), ``t0 == t1`` returns ``x`` unchanged.
    method : str or FixedStepMethod
        ``"euler"``, ``"midpoint"``, ``"heun"``, ``"rk4"`` (fixed step,
        ``n_steps`` steps of size :math:`(t_1 - t_0)/n_\text{steps}`), or a
        :func:`scipy.integrate.solve_ivp` method ``"RK23"``, ``"RK45"``,
        ``"DOP853"``, ``"Radau"``, ``"BDF"``, ``"LSODA"`` (adaptive, controlled
        by ``rtol`` / ``atol``).  Names are case-insensitive.  The implicit
        methods (Radau, BDF, and LSODA when it switches to BDF) estimate the
        Jacobian of the flattened ``n * d`` system by finite differences; the
        block-diagonal structure (one ``d x d`` block per point) is passed to
        SciPy, which keeps that to ``d`` extra evaluations per Jacobian, but
        they remain meant for small batches.
    n_steps : int
        Number of fixed steps (>= 1); ignored by SciPy methods.
    rtol, atol : float
        Relative (> 0) and absolute (>= 0) tolerances of SciPy methods;
        ignored by fixed-step methods.
    t_eval : array_like, optional
        Times in the interval at which to record the trajectory, in any
        order, repeats allowed.  SciPy methods interpolate with their dense
        output (DOP853 then spends 3 extra evaluations per step that holds a
        requested time, and ``x`` too is read from the interpolant at
        ``t1``, equal to the step's end point up to rounding).  Without
        ``t_eval`` SciPy keeps every accepted step internally (memory
        ``n * d`` per step).  Fixed-step
        methods do not interpolate: each time must lie on the step grid
        :math:`t_0 + k (t_1 - t_0)/n_\text{steps}` (to within ``1e-8`` of a
        step), otherwise ``ValueError``; e.g. ``n_steps=100`` and
        ``t_eval=np.linspace(0, 1, 11)``.

    Returns
    -------
    Solution
        ``x`` at ``t1``, ``ts`` / ``xs`` when ``t_eval`` was given, ``nfe``.

    Raises
    ------
    TypeError, ValueError
        Bad arguments (the message names the argument), or a field output of
        the wrong shape, dtype, or with NaN / inf.
    RuntimeError
        An adaptive SciPy method failed (e.g. the step size underflowed).

    Examples
    --------
    >>> import numpy as np
    >>> sol = integrate(lambda t, x: -x, np.ones((2, 1)), method="rk4", n_steps=50)
    >>> bool(np.allclose(sol.x, np.exp(-1.0))), sol.nfe
    (True, 200)
    """
    if not callable(field):
        raise TypeError(f"field: expected a callable field(t, x), got {type(field).__name__}")
    resolved = _resolve_method(method)
    x = check_points(x, "x")
    n, d = x.shape
    if n < 1 or d < 1:
        raise ValueError(f"x: expected at least one point of at least one dimension, got shape {x.shape}")
    # check_scalar, not check_time: one start and one end time for the batch.
    t0 = check_scalar(t0, "t0", low=0.0, high=1.0)
    t1 = check_scalar(t1, "t1", low=0.0, high=1.0)
    n_steps = check_scalar(n_steps, "n_steps", low=1, integer=True)
    rtol = check_scalar(rtol, "rtol", low=0.0, low_open=True)
    atol = check_scalar(atol, "atol", low=0.0)
    if t_eval is not None:
        t_eval = _check_t_eval(t_eval, t0, t1)

    name = resolved.name if isinstance(resolved, FixedStepMethod) else resolved
    fixed = isinstance(resolved, FixedStepMethod)
    xp = _xp(x)
    if not fixed and xp is not np:
        raise TypeError(
            f"method: {name!r} runs scipy.integrate.solve_ivp, which is CPU-only, but x is a CuPy (GPU) "
            f"array; use a fixed-step method ({', '.join(FIXED_STEP_METHODS)}) on the GPU, or move x "
            "to the host with refflow.backend.to_host (and use a field that returns NumPy arrays)"
        )
    x0 = x.copy()
    if t0 == t1:
        # Nothing to integrate: the flow map over an empty interval is the identity.
        ts = None if t_eval is None else t_eval.copy()
        xs = None if t_eval is None else xp.broadcast_to(x0, (t_eval.size, n, d)).copy()
        return Solution(x0.copy(), x0, t0, t1, ts, xs, 0, name, n_steps if fixed else None)

    u = _CountedField(field, n, d, t0, t1, xp)
    if fixed:
        x_end, ts, xs = _integrate_fixed(resolved, u, x0, t0, t1, n_steps, t_eval)
        return Solution(x_end, x0, t0, t1, ts, xs, u.nfe, name, n_steps)
    x_end, ts, xs = _integrate_scipy(resolved, u, x0, t0, t1, rtol, atol, t_eval)
    return Solution(x_end, x0, t0, t1, ts, xs, u.nfe, name, None)


def sample(
    field,
    n: int,
    dim: int,
    rng,
    method="euler",
    n_steps: int = 100,
    rtol: float = 1e-7,
    atol: float = 1e-9,
    t_eval=None,
    backend: str = "numpy",
) -> Solution:
    r"""Draw samples by Algorithm 2: :math:`x_0 \sim \mathcal{N}(0, I)`, then integrate 0 -> 1.

    .. math::

        x_0 \sim \mathcal{N}(0, I_{\text{dim}}), \qquad
        x_1 = x_0 + \int_0^1 u_t(x_t)\, dt \quad \text{(eq 9)}

    The default ``method="euler"`` is Algorithm 2 exactly; any method of
    :func:`integrate` may be used instead.

    Parameters
    ----------
    field : callable
        ``field(t, x) -> u``, see :func:`integrate`; for guided sampling pass
        :func:`guided_field` ``(cond_field, y, w)``.
    n : int
        Number of samples (>= 1).
    dim : int
        Dimension ``d`` (>= 1).
    rng : numpy.random.Generator or int
        Source of the draws of :math:`x_0`.
    method, n_steps, rtol, atol, t_eval
        As in :func:`integrate`.
    backend : {"numpy", "cupy"}
        Where :math:`x_0` is drawn and the ODE integrated.  ``"cupy"`` draws
        from a ``cupy.random.Generator`` seeded from ``rng`` (a different
        stream from NumPy's) and needs a fixed-step method and a field that
        takes and returns CuPy arrays.

    Returns
    -------
    Solution
        ``x`` are the samples :math:`x_1`, ``x0`` the source draws.
    """
    n = check_scalar(n, "n", low=1, integer=True)
    dim = check_scalar(dim, "dim", low=1, integer=True)
    if get_namespace(backend) is np:
        x_0 = as_rng(rng).standard_normal((n, dim))
    else:
        x_0 = as_device_rng(rng, backend).standard_normal((n, dim))
    return integrate(
        field, x_0, 0.0, 1.0, method=method, n_steps=n_steps, rtol=rtol, atol=atol,
        t_eval=t_eval,
    )


# ---------------------------------------------------------------------------
# Classifier-free guidance (eq 40)
# ---------------------------------------------------------------------------

GUIDANCE_CONVENTIONS: tuple[str, ...] = ("notes", "flow_matching")
"""Weightings of guidance: ``"notes"`` (eq 40) and ``"flow_matching"``
(facebookresearch/flow_matching examples); ``w_notes = 1 + w_flow_matching``."""

NULL_LABEL = -1
"""The label of the null prompt ∅ in eq 40."""


def _check_prompt(y) -> np.ndarray:
    if isinstance(y, bool) or isinstance(y, (str, bytes)) or y is None:
        raise TypeError(f"y: expected an int label or int labels of shape (n,), got {type(y).__name__} {y!r}"[:300])
    arr = np.asarray(y)
    if arr.ndim > 1:
        raise ValueError(f"y: expected an int label or labels of shape (n,), got shape {arr.shape}")
    return check_labels(arr, 1 if arr.ndim == 0 else arr.shape[0], name="y")


class GuidedField:
    r"""The classifier-free guided velocity field of eq 40, a callable ``(t, x) -> ũ``.

    Built by :func:`guided_field`; see there for the formulas.

    Attributes
    ----------
    field : callable
        The conditional field ``field(t, x, y)``.
    y : ndarray
        The prompt: one label for every point (0-d) or labels of shape ``(n,)``.
    w : float
        Guidance scale in the chosen ``convention``.
    convention : str
        ``"notes"`` or ``"flow_matching"``.
    """

    def __init__(self, field, y, w, convention):
        self.field = field
        self.y = y
        self.w = w
        self.convention = convention

    @property
    def w_notes(self) -> float:
        """The guidance scale of eq 40 equivalent to ``w`` (``1 + w`` for ``"flow_matching"``)."""
        return self.w if self.convention == "notes" else 1.0 + self.w

    def __repr__(self):
        return f"GuidedField(w={self.w!r}, convention={self.convention!r}, y={self.y!r})"

    def __call__(self, t, x):
        x = np.asarray(x)
        if x.ndim != 2:
            raise ValueError(f"x: expected shape (n, d), got shape {x.shape}")
        n, d = x.shape
        y = check_labels(self.y, n, name="y")
        y_null = np.full(n, NULL_LABEL, dtype=np.int64)
        # Two calls, as eq 40 is written: the conditional velocity does not
        # depend on which other rows share its batch.
        u_null = _check_velocity(self.field(t, x, y_null), n, d, t)
        u_cond = _check_velocity(self.field(t, x, y), n, d, t)
        w = self.w
        if self.convention == "notes":
            # eq 40: ũ = (1 - w) u(t, x, ∅) + w u(t, x, y)
            return (1.0 - w) * u_null + w * u_cond
        # flow_matching examples: ũ = (1 + w) u(t, x, y) - w u(t, x, ∅)
        return (1.0 + w) * u_cond - w * u_null


def guided_field(field, y, w, convention: str = "notes") -> GuidedField:
    r"""Classifier-free guidance (eq 40): mix the conditional and unconditional velocities.

    With ``convention="notes"`` (eq 40, guidance for :math:`w > 1`):

    .. math::

        \tilde u(t, x, y) = (1 - w)\, u(t, x, \varnothing) + w\, u(t, x, y),

    so ``w = 1`` is the conditional field and ``w = 0`` the unconditional one.
    With ``convention="flow_matching"`` (the weighting of the examples of
    facebookresearch/flow_matching, ``cfg_scale``):

    .. math::

        \tilde u(t, x, y) = (1 + w)\, u(t, x, y) - w\, u(t, x, \varnothing),

    so ``w = 0`` is the conditional field and ``w = -1`` the unconditional one.
    The two agree when :math:`w_\text{notes} = 1 + w_\text{flow\_matching}`
    (up to rounding in forming ``1 + w``).

    Parameters
    ----------
    field : callable
        Conditional field ``field(t, x, y) -> u`` with ``y`` int labels of
        shape ``(n,)``; label ``-1`` is the null prompt :math:`\varnothing`.
    y : int or array_like of int, shape (n,)
        The prompt: one label for the whole batch, or one per point (then the
        guided field only accepts batches of that size).  Labels >= -1.
    w : float
        Guidance scale, any finite real number, in the chosen convention.
    convention : {"notes", "flow_matching"}
        Which weighting ``w`` refers to.

    Returns
    -------
    GuidedField
        A velocity field ``(t, x) -> ũ`` for :func:`integrate` / :func:`sample`;
        each call evaluates ``field`` twice (once with ∅, once with ``y``).
    """
    if not callable(field):
        raise TypeError(f"field: expected a callable field(t, x, y), got {type(field).__name__}")
    if convention not in GUIDANCE_CONVENTIONS:
        raise ValueError(f"convention: expected one of {list(GUIDANCE_CONVENTIONS)}, got {convention!r}")
    w = check_scalar(w, "w")
    y_arr = _check_prompt(y)
    y_stored = y_arr.reshape(()) if np.ndim(y) == 0 else y_arr
    return GuidedField(field, y_stored, w, convention)
