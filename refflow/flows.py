r"""Discrete normalizing flows (eq 1-7 of the notes).

A flow :math:`\psi` carries a base point :math:`x_0 \sim p_0 = \mathcal N(0, I)`
to a data point :math:`x_1 = \psi(x_0)` (eq 1).  It is a composition of simple
invertible layers (eq 4), and its density follows from the change of
variables (eq 2, 3, 5):

.. math::

    \log p_1(x_1) = \log p_0\big(\psi^{-1}(x_1)\big)
                    + \sum_k \log\big|\det J_{\phi_k^{-1}}\big|.

Parameter convention (functional style)
---------------------------------------
Layers hold only their *structure* (dimension, masks, hidden sizes, step
``delta`` ...).  Their trainable parameters are a plain ``list`` of float64
arrays, passed explicitly::

    y, logdet = layer.forward(params, x)        # log|det J_phi(x)|,      shape (n,)
    x, logdet_inv = layer.inverse(params, y)    # log|det J_phi^-1(y)|,  shape (n,)

A :class:`Flow` takes a list with one such list per layer.  Everything is
written in ``autograd.numpy``, so ``autograd.grad`` of any scalar built from
``Flow.log_prob`` with respect to the nested parameter list just works, and
:func:`fit` flattens that list into one vector
(``autograd.misc.flatten``) for Adam.

Layers
------
:class:`ElementwiseAffine`  ``y = exp(s) * x + b``; analytic inverse and log-det.
:class:`LUAffine`           ``y = W x + b``, ``W = P L (U + diag(exp(s)))``; analytic.
:class:`AffineCoupling`     RealNVP coupling; analytic inverse and log-det.
:class:`Residual`           ``y = x + delta u(x)`` (eq 6) with a spectrally normalised
                            MLP ``u``; fixed-point inverse (eq 7); log-det by the
                            slogdet of the autograd Jacobian.

Derivatives
-----------
autograd is the source of truth.  The only hand-written derivative is the
VJP of the residual layer's fixed-point inverse (the implicit function
theorem, see :class:`Residual`); it is checked against autograd's trace of
the unrolled iteration in ``refflow.verify.checks.flows`` and in the tests.
"""
from __future__ import annotations

import math

import autograd.numpy as anp
import numpy as np
from autograd import make_vjp, value_and_grad
from autograd.extend import defvjp_argnums, primitive
from autograd.misc import flatten
from autograd.tracer import Box, getval

from refflow._validation import as_rng, check_points, check_scalar
from refflow.autodiff import jacobian_pointwise

__all__ = [
    "FixedPointError",
    "base_log_prob",
    "jacobian_autograd",
    "logdet_autograd",
    "Layer",
    "ElementwiseAffine",
    "LUAffine",
    "AffineCoupling",
    "Residual",
    "Flow",
    "fit",
    "adam",
    "mlp_init",
    "mlp_apply",
    "spectral_norm",
    "alternating_mask",
    "mass_on_grid",
    "tail_mass_bound",
]

_LOG_2PI = math.log(2.0 * math.pi)


class FixedPointError(ValueError):
    """The fixed-point inverse of a residual layer (eq 7) did not converge.

    Attributes
    ----------
    residual : float
        ``max |phi(x_k) - y|`` reached at the last iterate (inf if it blew up).
    iterations : int
        Iterations performed.
    """

    def __init__(self, message: str, residual: float, iterations: int):
        super().__init__(message)
        self.residual = residual
        self.iterations = iterations


# --------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------

def _points(x, name: str, d: int | None = None):
    """Validate points; traced values (autograd boxes) are checked by shape only."""
    if isinstance(x, Box):
        shape = anp.shape(x)
        if len(shape) != 2 or (d is not None and shape[1] != d):
            raise ValueError(f"{name}: expected shape (n, {d}), got shape {shape}")
        return x
    return check_points(x, name, d)


def base_log_prob(x_0):
    r"""Log-density of the base :math:`p_0 = \mathcal N(0, I)` (eq 1, 3).

    .. math::

        \log p_0(x_0) = -\tfrac12 \lVert x_0\rVert^2 - \tfrac d2 \log 2\pi

    Parameters
    ----------
    x_0 : array_like, shape (n, d)

    Returns
    -------
    ndarray, shape (n,)
    """
    x_0 = _points(x_0, "x_0")
    d = anp.shape(x_0)[1]
    return -0.5 * anp.sum(x_0 ** 2, axis=1) - 0.5 * d * _LOG_2PI


# Per-point Jacobians by autograd (d reverse passes; nestable): refflow.autodiff.
jacobian_autograd = jacobian_pointwise


def logdet_autograd(fn, x):
    r"""``log|det J_fn(x)|`` per point, by slogdet of the autograd Jacobian.

    .. math::

        \ell_i = \log\lvert\det J_{fn}(x_i)\rvert

    Used to verify the analytic log-determinants of eq 2 and 5, and as the
    exact log-determinant of the residual layer (eq 6).  ``fn`` must act row
    by row (see :func:`jacobian_autograd`).  Cost: ``d`` reverse passes of
    ``fn`` plus an ``O(n d^3)`` batched LU.

    Parameters
    ----------
    fn : callable, (n, d) -> (n, d)
    x : array_like, shape (n, d)

    Returns
    -------
    array, shape (n,)
    """
    x = _points(x, "x")
    _, logabsdet = anp.linalg.slogdet(jacobian_autograd(fn, x))
    return logabsdet


# --------------------------------------------------------------------------
# a tiny MLP in autograd.numpy
# --------------------------------------------------------------------------

# activation -> (function, Lipschitz constant); the constant enters the
# spectral-normalisation bound of the residual layer.
_ACTIVATIONS = {
    "tanh": (anp.tanh, 1.0),
}


def _activation(name: str):
    if name not in _ACTIVATIONS:
        raise ValueError(
            f"activation: expected one of {sorted(_ACTIVATIONS)}, got {name!r}"
        )
    return _ACTIVATIONS[name]


def mlp_init(sizes, rng, out_scale: float = 1.0) -> list:
    """Parameters ``[W_1, b_1, ..., W_L, b_L]`` of an MLP with layer widths ``sizes``.

    ``W_l`` has shape ``(sizes[l], sizes[l-1])`` and entries
    ``N(0, 1 / fan_in)``; biases are zero.  The last weight matrix is
    multiplied by ``out_scale`` (0 gives a network that outputs 0, which
    makes a coupling or residual layer start at the identity).
    """
    rng = as_rng(rng)
    params = []
    for l, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        W = rng.standard_normal((fan_out, fan_in)) / math.sqrt(fan_in)
        if l == len(sizes) - 2:
            W = out_scale * W
        params += [W, np.zeros(fan_out)]
    return params


def mlp_apply(params, x, activation: str = "tanh"):
    """Apply the MLP ``[W_1, b_1, ..., W_L, b_L]`` to the rows of ``x``; the last layer is linear."""
    act, _ = _activation(activation)
    n_layers = len(params) // 2
    h = x
    for l in range(n_layers):
        h = anp.dot(h, anp.transpose(params[2 * l])) + params[2 * l + 1]
        if l < n_layers - 1:
            h = act(h)
    return h


_POWER_START_SEED = 20240717  # fixed start vector: no hidden random state


def spectral_norm(W, tol: float = 1e-12, max_iter: int = 5000):
    r"""Largest singular value :math:`\sigma_{\max}(W)` by power iteration.

    The singular vectors come from a plain-NumPy power iteration on
    :math:`W^\top W` from a fixed start vector; the returned value
    :math:`\sigma = u^\top W v` is an autograd expression in ``W`` whose
    gradient :math:`u v^\top` is the derivative of :math:`\sigma_{\max}`
    (for a simple top singular value) up to the error of ``v``.

    The iteration stops when ``v`` moves by less than ``tol`` (2-norm).  The
    value then has relative error ~``tol**2`` (the Rayleigh quotient is
    quadratic in the vector error) and is a lower bound of the true norm;
    the gradient's error is ~``tol``.  A nearly repeated top singular value
    slows the vector (not the value) down; ``max_iter`` caps the work.

    Returns
    -------
    sigma : float or ArrayBox
    """
    W_val = np.asarray(getval(W), dtype=np.float64)
    v = np.random.default_rng(_POWER_START_SEED).standard_normal(W_val.shape[1])
    v /= np.linalg.norm(v)
    for _ in range(max_iter):
        Wv = W_val @ v
        norm_Wv = np.linalg.norm(Wv)
        if norm_Wv == 0.0:
            return anp.sum(W * 0.0)  # W = 0 (or v in its kernel): sigma 0, zero gradient
        v_new = W_val.T @ (Wv / norm_Wv)
        v_new /= np.linalg.norm(v_new)
        step = np.linalg.norm(v_new - v)
        v = v_new
        if step <= tol:
            break
    u = W_val @ v
    u /= np.linalg.norm(u)
    return anp.dot(u, anp.dot(W, v))


# --------------------------------------------------------------------------
# layers
# --------------------------------------------------------------------------

class Layer:
    """Base class.  A layer holds structure; parameters are passed in (see module doc).

    Subclasses implement ``param_shapes``, ``init_params``, ``_forward`` and
    ``_inverse``; :meth:`forward` and :meth:`inverse` validate and delegate.
    """

    #: whether the log-determinant is a closed-form expression (True) or the
    #: slogdet of an autograd Jacobian (False)
    analytic_logdet = True

    def __init__(self, d: int):
        self.d = check_scalar(d, "d", low=1, integer=True)

    def param_shapes(self) -> list[tuple]:
        raise NotImplementedError

    def init_params(self, rng, scale: float = 0.1) -> list:
        raise NotImplementedError

    def check_params(self, params):
        """Raise if ``params`` is not a list of arrays of :meth:`param_shapes`."""
        name = type(self).__name__
        shapes = self.param_shapes()
        if isinstance(params, (str, bytes, np.ndarray)) or not hasattr(params, "__len__"):
            raise TypeError(f"params: expected a list of {len(shapes)} arrays for {name}, got {type(params).__name__}")
        if len(params) != len(shapes):
            raise ValueError(
                f"params: expected {len(shapes)} arrays for {name} of shapes {shapes}, got {len(params)}"
            )
        for i, shape in enumerate(shapes):
            got = anp.shape(params[i])
            if tuple(got) != tuple(shape):
                raise ValueError(
                    f"params[{i}]: expected shape {shape} for {name}, got shape {tuple(got)}"
                )

    def forward(self, params, x):
        r"""``y = phi(x)`` and ``log|det J_phi(x)|`` per point (shape ``(n,)``)."""
        self.check_params(params)
        return self._forward(params, _points(x, "x", self.d))

    def inverse(self, params, y):
        r"""``x = phi^{-1}(y)`` and ``log|det J_{phi^{-1}}(y)| = -log|det J_phi(x)|`` per point."""
        self.check_params(params)
        return self._inverse(params, _points(y, "y", self.d))

    def __call__(self, params, x):
        return self.forward(params, x)[0]


class ElementwiseAffine(Layer):
    r"""Elementwise affine layer; parameters ``[s, b]``, each of shape ``(d,)``.

    .. math::

        \phi(x) = e^{s} \odot x + b, \qquad
        \log\lvert\det J_\phi\rvert = \textstyle\sum_j s_j, \qquad
        \phi^{-1}(y) = e^{-s} \odot (y - b).
    """

    def param_shapes(self):
        return [(self.d,), (self.d,)]

    def init_params(self, rng, scale: float = 0.1):
        rng = as_rng(rng)
        return [scale * rng.standard_normal(self.d), scale * rng.standard_normal(self.d)]

    def _forward(self, params, x):
        s, b = params[0], params[1]
        n = anp.shape(x)[0]
        return anp.exp(s) * x + b, anp.sum(s) * anp.ones(n)

    def _inverse(self, params, y):
        s, b = params[0], params[1]
        n = anp.shape(y)[0]
        return (y - b) * anp.exp(-s), -anp.sum(s) * anp.ones(n)


class LUAffine(Layer):
    r"""Full affine layer in LU form (Glow's invertible 1x1 convolution).

    Parameters ``[L_raw, U_raw, s, b]`` with shapes ``(d, d), (d, d), (d,), (d,)``;
    only the strictly lower part of ``L_raw`` and the strictly upper part of
    ``U_raw`` are used, so every parameter vector gives an invertible ``W``:

    .. math::

        W = P\,L\,\big(U + \operatorname{diag}(e^{s})\big), \qquad
        \phi(x) = W x + b, \qquad
        \log\lvert\det J_\phi\rvert = \textstyle\sum_j s_j,

    with ``P`` a fixed permutation and ``L`` unit lower triangular, so
    :math:`|\det P| = \det L = 1`.  The inverse uses two triangular solves.

    Parameters
    ----------
    d : int
    permutation : sequence of int, optional
        ``P`` maps row ``i`` to row ``permutation[i]`` (``(P z)_i = z_{perm_i}``).
        Default: reversed order, which mixes coordinates even when ``L = U = 0``.
    """

    def __init__(self, d: int, permutation=None):
        super().__init__(d)
        if permutation is None:
            permutation = np.arange(self.d)[::-1]
        perm = np.asarray(permutation)
        if perm.shape != (self.d,) or not np.issubdtype(perm.dtype, np.integer) or \
                sorted(perm.tolist()) != list(range(self.d)):
            raise ValueError(
                f"permutation: expected a permutation of 0..{self.d - 1}, got {permutation!r}"
            )
        self.permutation = perm.astype(np.int64)
        self.P = np.eye(self.d)[self.permutation]
        self._lower = np.tril(np.ones((self.d, self.d)), -1)
        self._upper = np.triu(np.ones((self.d, self.d)), 1)

    def param_shapes(self):
        d = self.d
        return [(d, d), (d, d), (d,), (d,)]

    def init_params(self, rng, scale: float = 0.1):
        rng = as_rng(rng)
        d = self.d
        return [scale * rng.standard_normal((d, d)), scale * rng.standard_normal((d, d)),
                scale * rng.standard_normal(d), scale * rng.standard_normal(d)]

    def factors(self, params):
        """``(L, U + diag(exp(s)))``: the unit-lower and upper triangular factors."""
        L = self._lower * params[0] + np.eye(self.d)
        U = self._upper * params[1] + anp.diag(anp.exp(params[2]))
        return L, U

    def weight(self, params):
        """The matrix ``W = P L (U + diag(exp(s)))``."""
        L, U = self.factors(params)
        return anp.dot(self.P, anp.dot(L, U))

    def _forward(self, params, x):
        n = anp.shape(x)[0]
        y = anp.dot(x, anp.transpose(self.weight(params))) + params[3]
        return y, anp.sum(params[2]) * anp.ones(n)

    def _inverse(self, params, y):
        n = anp.shape(y)[0]
        L, U = self.factors(params)
        # rows: z = P^T (y - b)  <=>  z_row = (y - b)_row @ P
        z = anp.transpose(anp.dot(y - params[3], self.P))
        # Two solves with the triangular factors.  numpy's general solve is
        # used on purpose: exact up to rounding for triangular matrices, and
        # scipy 1.17's solve_triangular costs ~8 ms per call here (vs ~30 us).
        a = anp.linalg.solve(L, z)
        x = anp.transpose(anp.linalg.solve(U, a))
        return x, -anp.sum(params[2]) * anp.ones(n)


def alternating_mask(d: int, parity: int) -> np.ndarray:
    """Mask ``m_j = (j + parity) % 2 == 0`` as 0/1 floats: alternate ``parity`` 0 and 1 between couplings."""
    return ((np.arange(d) + parity) % 2 == 0).astype(np.float64)


class AffineCoupling(Layer):
    r"""Affine coupling layer (RealNVP).

    With a fixed 0/1 mask ``m`` (1 = passed through and conditioned on):

    .. math::

        \phi(x) = x \odot e^{s(m\odot x)} + t(m\odot x), \qquad
        \log\lvert\det J_\phi\rvert = \textstyle\sum_j s_j(m\odot x),

    where ``s`` and ``t`` vanish on the masked coordinates, so the Jacobian
    is triangular up to a permutation and ``m * phi(x) = m * x``; hence
    :math:`\phi^{-1}(y) = (y - t(m\odot y)) \odot e^{-s(m\odot y)}`.
    ``s`` is soft-clamped, :math:`s = s_{\max}\tanh(h_s / s_{\max})`, to keep
    training stable (it is still exact: the clamp is part of the map).

    Parameters are those of the conditioner MLP ``d -> hidden -> 2d`` (see
    :func:`mlp_init`); its output is split into ``h_s`` and ``t``.

    Parameters
    ----------
    d : int
    mask : array_like of 0/1, shape (d,)
        Must contain at least one 0 and one 1.
    hidden : tuple of int
    s_max : float
    """

    def __init__(self, d: int, mask, hidden=(32, 32), s_max: float = 3.0):
        super().__init__(d)
        m = np.asarray(mask, dtype=np.float64)
        if m.shape != (self.d,) or not np.all((m == 0) | (m == 1)) or m.min() == m.max():
            raise ValueError(
                f"mask: expected {self.d} entries of 0/1 with at least one of each, got {mask!r}"
            )
        self.mask = m
        self.hidden = tuple(check_scalar(h, "hidden", low=1, integer=True) for h in hidden)
        self.s_max = check_scalar(s_max, "s_max", low=0.0, low_open=True)
        self.sizes = (self.d,) + self.hidden + (2 * self.d,)

    def param_shapes(self):
        shapes = []
        for fan_in, fan_out in zip(self.sizes[:-1], self.sizes[1:]):
            shapes += [(fan_out, fan_in), (fan_out,)]
        return shapes

    def init_params(self, rng, scale: float = 0.1):
        return mlp_init(self.sizes, rng, out_scale=scale)

    def scale_shift(self, params, x):
        """``(s, t)`` of the coupling at the conditioning part of ``x``; zero on the mask."""
        h = mlp_apply(params, x * self.mask)
        free = 1.0 - self.mask
        s = self.s_max * anp.tanh(h[:, : self.d] / self.s_max) * free
        t = h[:, self.d:] * free
        return s, t

    def _forward(self, params, x):
        s, t = self.scale_shift(params, x)
        return x * anp.exp(s) + t, anp.sum(s, axis=1)

    def _inverse(self, params, y):
        s, t = self.scale_shift(params, y)  # m * y = m * x
        return (y - t) * anp.exp(-s), -anp.sum(s, axis=1)


class Residual(Layer):
    r"""Residual layer of eq 6 with a contractive MLP ``u``.

    .. math::

        \phi(x) = x + \delta\, u(x), \qquad
        \delta\,\mathrm{Lip}(u) \le \kappa < 1 .

    ``u`` is the MLP ``d -> hidden -> d`` (activation Lipschitz constant
    :math:`\lambda`, 1 for tanh) applied with *spectrally normalised*
    weights :math:`\hat W_l = W_l \min(1, c/\sigma_{\max}(W_l))`, where
    :math:`\sigma_{\max}` comes from power iteration (:func:`spectral_norm`)
    and the per-matrix bound ``c`` solves
    :math:`\delta\, c^{L} \lambda^{L-1} = \kappa` for ``L`` weight matrices,
    so :math:`\delta\,\mathrm{Lip}(u) \le \delta \prod_l \lVert\hat W_l\rVert
    \lambda^{L-1} \le \kappa`.

    **Inverse** (eq 7): :math:`\phi(x) = y \iff x = y - \delta u(x)`; the map
    :math:`x \mapsto y - \delta u(x)` is a :math:`\kappa`-contraction, so the
    iteration :math:`x_{k+1} = y - \delta u(x_k)`, :math:`x_0 = y`, converges
    (Banach).  The step :math:`x_{k+1} - x_k = y - \phi(x_k)` is the residual
    of :math:`x_k`; iteration stops when its max-norm is at most
    ``tol * max(1, max|y|)``, and then :math:`|x_{k+1} - x^*| \le \kappa\,
    \mathrm{tol}/(1-\kappa)`.  It needs about
    :math:`\log(\mathrm{tol}) / \log \kappa` iterations; when it does not
    converge within ``max_iter`` (only possible when the bound is switched
    off) a :class:`FixedPointError` reports the residual reached.

    The inverse is an autograd primitive whose VJP comes from the implicit
    function theorem: with :math:`A = I + \delta J_u(x)` at the solution,
    :math:`\bar y = A^{-\top}\bar x` and :math:`\bar\theta = -\delta\,
    (\partial u/\partial\theta)^\top \bar y` — exact, no differentiation
    through the iterations (first order only).

    **Log-determinant** (exact, no estimator): :math:`\log\det(I + \delta
    J_u(x))` from the slogdet of the per-point Jacobian, which autograd
    builds with ``d`` reverse passes of ``u`` (:func:`jacobian_autograd`).
    Cost per call: ``d`` backward passes through ``u`` plus ``O(n d^3)``;
    its gradient in training is a second-order autograd trace, a few times
    that.  Fine for the small ``d`` here; for large ``d`` one would use a
    stochastic (Hutchinson power-series) estimator instead.

    Parameters
    ----------
    d : int
    hidden : tuple of int
        Hidden widths of ``u``.
    delta : float
        Step size :math:`\delta > 0` of eq 6.
    kappa : float
        Target bound on :math:`\delta\,\mathrm{Lip}(u)`, in (0, 1).
    spectral_normalise : bool
        Switch the bound off (negative controls only: invertibility is then
        no longer guaranteed).
    tol, max_iter : float, int
        Fixed-point stopping rule.
    activation : str
        ``"tanh"``.
    """

    analytic_logdet = False

    def __init__(self, d: int, hidden=(32,), delta: float = 1.0, kappa: float = 0.9,
                 spectral_normalise: bool = True, tol: float = 1e-12, max_iter: int = 1000,
                 activation: str = "tanh"):
        super().__init__(d)
        self.hidden = tuple(check_scalar(h, "hidden", low=1, integer=True) for h in hidden)
        self.delta = check_scalar(delta, "delta", low=0.0, low_open=True)
        self.kappa = check_scalar(kappa, "kappa", low=0.0, high=1.0, low_open=True, high_open=True)
        self.spectral_normalise = bool(spectral_normalise)
        self.tol = check_scalar(tol, "tol", low=0.0, low_open=True)
        self.max_iter = check_scalar(max_iter, "max_iter", low=1, integer=True)
        self.activation = activation
        _, self.act_lipschitz = _activation(activation)
        self.sizes = (self.d,) + self.hidden + (self.d,)
        n_w = len(self.sizes) - 1
        # delta * c^L * lambda^(L-1) = kappa
        self.c = (self.kappa / (self.delta * self.act_lipschitz ** (n_w - 1))) ** (1.0 / n_w)

    def param_shapes(self):
        shapes = []
        for fan_in, fan_out in zip(self.sizes[:-1], self.sizes[1:]):
            shapes += [(fan_out, fan_in), (fan_out,)]
        return shapes

    def init_params(self, rng, scale: float = 0.1):
        return mlp_init(self.sizes, rng, out_scale=scale)

    def normalised_params(self, params):
        r"""MLP parameters with each weight scaled to spectral norm :math:`\le c`."""
        out = []
        for l in range(len(params) // 2):
            W, b = params[2 * l], params[2 * l + 1]
            if self.spectral_normalise:
                sigma = spectral_norm(W)
                if getval(sigma) > self.c:  # rescale only when the bound is exceeded
                    W = W * (self.c / sigma)
            out += [W, b]
        return out

    def lipschitz_bound(self, params) -> float:
        r"""Upper bound :math:`\delta \prod_l \lVert \hat W_l\rVert_2 \lambda^{L-1}` on :math:`\delta\,\mathrm{Lip}(u)` (exact SVD norms)."""
        w = self.normalised_params([getval(p) for p in params])
        prod = np.prod([np.linalg.norm(np.asarray(w[2 * l]), 2) for l in range(len(w) // 2)])
        return float(self.delta * prod * self.act_lipschitz ** (len(w) // 2 - 1))

    def u(self, params, x):
        """The velocity ``u(x)`` of eq 6-7 with normalised weights."""
        return mlp_apply(self.normalised_params(params), x, self.activation)

    def _logdet_at(self, weights, x):
        J = jacobian_autograd(lambda z: mlp_apply(weights, z, self.activation), x)
        _, logabsdet = anp.linalg.slogdet(np.eye(self.d) + self.delta * J)
        return logabsdet

    def _forward(self, params, x):
        w = self.normalised_params(params)
        y = x + self.delta * mlp_apply(w, x, self.activation)
        return y, self._logdet_at(w, x)

    def _inverse(self, params, y):
        w = self.normalised_params(params)
        x = _fixed_point_inverse(y, self, *[w[i] for i in range(len(w))])
        return x, -self._logdet_at(w, x)

    # plain-NumPy pieces used by the primitive -------------------------------
    def _solve(self, y, weights):
        """Banach iteration of eq 7 on plain arrays; raises FixedPointError."""
        y = np.asarray(y, dtype=np.float64)
        tol = self.tol * max(1.0, float(np.max(np.abs(y))) if y.size else 1.0)
        x = y.copy()
        residual = np.inf
        for k in range(1, self.max_iter + 1):
            x_new = y - self.delta * mlp_apply(weights, x, self.activation)
            residual = float(np.max(np.abs(x_new - x))) if y.size else 0.0  # = max|y - phi(x)|
            x = x_new
            if not np.isfinite(residual):
                break
            if residual <= tol:
                return x
        if self.spectral_normalise:
            hint = f"delta * Lip(u) <= kappa = {self.kappa:g}, so this should not happen"
        else:
            bound = self.lipschitz_bound(weights)
            hint = (f"spectral normalisation is off; delta * prod ||W_l|| = {bound:.3g}"
                    + (" >= 1: x -> y - delta u(x) need not be a contraction" if bound >= 1 else ""))
        raise FixedPointError(
            f"residual layer inverse (eq 7): fixed-point iteration did not converge after {k} "
            f"iterations; residual max|phi(x_k) - y| = {residual:.3e} > tolerance {tol:.1e} ({hint})",
            residual=residual, iterations=k,
        )


@primitive
def _fixed_point_inverse(y, layer, *weights):
    """x with x + delta u(x) = y (eq 7); see Residual for the implicit VJP."""
    return layer._solve(y, [np.asarray(w) for w in weights])


def _fixed_point_inverse_vjp(argnums, x, args, kwargs):
    y, layer = args[0], args[1]
    if isinstance(x, Box) or any(isinstance(a, Box) for a in args):
        # nested traces would need this VJP to be differentiable itself;
        # refuse rather than silently drop the outer derivative
        raise NotImplementedError(
            "second-order derivatives through the residual layer's fixed-point inverse "
            "are not implemented (the implicit-function VJP is first order)"
        )
    weights = [np.asarray(w) for w in args[2:]]
    act = layer.activation
    J = jacobian_autograd(lambda z: mlp_apply(weights, z, act), x)
    A_T = np.swapaxes(np.eye(layer.d) + layer.delta * J, 1, 2)  # (d phi / d x)^T per point

    def vjp(g):
        if isinstance(g, Box):
            raise NotImplementedError(
                "second-order derivatives through the residual layer's fixed-point inverse "
                "are not implemented (the implicit-function VJP is first order)"
            )
        g = np.asarray(g)
        y_bar = np.linalg.solve(A_T, g[:, :, None])[:, :, 0]
        out = []
        w_bar = None
        for argnum in argnums:
            if argnum == 0:
                out.append(y_bar)
            elif argnum == 1:
                raise NotImplementedError("the layer argument is not differentiable")
            else:
                if w_bar is None:
                    u_vjp, _ = make_vjp(lambda ws: mlp_apply(ws, x, act))(list(weights))
                    w_bar = u_vjp(-layer.delta * y_bar)
                out.append(w_bar[argnum - 2])
        return tuple(out)

    return vjp


defvjp_argnums(_fixed_point_inverse, _fixed_point_inverse_vjp)


# --------------------------------------------------------------------------
# composition
# --------------------------------------------------------------------------

class Flow:
    r"""Composition of layers (eq 4), base :math:`\mathcal N(0, I)`.

    ``layers[0]`` acts first on the base point:
    :math:`\psi = \phi_{K-1}\circ\dots\circ\phi_0`, ``x_1 = psi(x_0)``.
    Parameters are a list holding one parameter list per layer.
    """

    def __init__(self, layers):
        layers = list(layers)
        if not layers or not all(isinstance(l, Layer) for l in layers):
            raise TypeError(f"layers: expected a non-empty list of Layer objects, got {layers!r}"[:300])
        dims = {l.d for l in layers}
        if len(dims) != 1:
            raise ValueError(f"layers: expected one dimension d for every layer, got {sorted(dims)}")
        self.layers = layers
        self.d = dims.pop()

    def init_params(self, rng, scale: float = 0.1) -> list:
        """One parameter list per layer (see each layer's ``init_params``)."""
        rng = as_rng(rng)
        return [layer.init_params(rng, scale) for layer in self.layers]

    def _check(self, params):
        if isinstance(params, (str, bytes, np.ndarray)) or not hasattr(params, "__len__") \
                or len(params) != len(self.layers):
            got = len(params) if hasattr(params, "__len__") else type(params).__name__
            raise ValueError(
                f"params: expected a list of {len(self.layers)} per-layer parameter lists, got {got}"
            )

    def forward(self, params, x_0):
        r"""``x_1 = psi(x_0)`` (eq 1) and :math:`\log|\det J_\psi(x_0)| = \sum_k \log|\det J_{\phi_k}|`."""
        self._check(params)
        x = _points(x_0, "x_0", self.d)
        total = 0.0
        for k, layer in enumerate(self.layers):
            x, ld = layer.forward(params[k], x)
            total = total + ld
        return x, total

    def inverse(self, params, x_1):
        r"""``x_0 = psi^{-1}(x_1)`` and :math:`\log|\det J_{\psi^{-1}}(x_1)| = \sum_k \log|\det J_{\phi_k^{-1}}|` (eq 5)."""
        self._check(params)
        x = _points(x_1, "x_1", self.d)
        total = 0.0
        for k in range(len(self.layers) - 1, -1, -1):
            x, ld = self.layers[k].inverse(params[k], x)
            total = total + ld
        return x, total

    def log_prob(self, params, x_1):
        r"""Log-density of the flow at data points (eq 2, 3, 5).

        .. math::

            \log p_1(x_1) = \log p_0\big(\psi^{-1}(x_1)\big)
                            + \sum_{k} \log\big|\det J_{\phi_k^{-1}}\big|

        Returns
        -------
        array, shape (n,)
        """
        x_0, logdet_inv = self.inverse(params, x_1)
        return base_log_prob(x_0) + logdet_inv

    def nll(self, params, x_1):
        """Mean negative log-likelihood ``-mean log p_1(x_1)`` (the loss of eq 3), in nats."""
        return -anp.mean(self.log_prob(params, x_1))

    def sample(self, params, n: int, rng, return_log_prob: bool = False):
        r"""Draw ``x_1 = psi(x_0)``, ``x_0 ~ N(0, I)`` (eq 1).

        With ``return_log_prob``, also :math:`\log p_1(x_1) = \log p_0(x_0)
        - \log|\det J_\psi(x_0)|` (first line of eq 2), which costs no inverse.
        """
        n = check_scalar(n, "n", low=1, integer=True)
        x_0 = as_rng(rng).standard_normal((n, self.d))
        x_1, logdet = self.forward(params, x_0)
        if return_log_prob:
            return x_1, base_log_prob(x_0) - logdet
        return x_1


# --------------------------------------------------------------------------
# maximum-likelihood training (eq 3)
# --------------------------------------------------------------------------

def adam(value_and_grad_fn, theta, steps: int, lr: float, b1: float = 0.9, b2: float = 0.999,
         eps: float = 1e-8):
    r"""Adam (Kingma & Ba) on a flat vector; ``value_and_grad_fn(theta, step) -> (loss, grad)``.

    Returns the final ``theta`` and the array of losses (one per step,
    evaluated before that step's update).
    """
    theta = np.array(theta, dtype=np.float64)
    m = np.zeros_like(theta)
    v = np.zeros_like(theta)
    losses = np.empty(steps)
    for i in range(steps):
        loss, g = value_and_grad_fn(theta, i)
        losses[i] = loss
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g ** 2
        m_hat = m / (1 - b1 ** (i + 1))
        v_hat = v / (1 - b2 ** (i + 1))
        theta = theta - lr * m_hat / (np.sqrt(v_hat) + eps)
    return theta, losses


def fit(flow: Flow, params, data, steps: int = 1000, lr: float = 1e-2,
        batch_size: int = 256, rng=0):
    r"""Maximum-likelihood training of a flow (eq 3) with autograd and Adam.

    Minimises the minibatch negative log-likelihood

    .. math::

        \mathcal L(\theta) = -\frac1B \sum_{i\in\text{batch}}
        \Big[\log p_0\big(\psi_\theta^{-1}(x_1^i)\big)
             + \log\big|\det J_{\psi_\theta^{-1}}(x_1^i)\big|\Big].

    Parameters
    ----------
    flow : Flow
    params : list
        Initial parameters (``flow.init_params(rng)``); not modified.
    data : array_like, shape (n, d)
    steps : int
    lr : float
    batch_size : int
        Minibatch size, drawn without replacement each step; the full data
        when ``batch_size >= n``.
    rng : Generator or int

    Returns
    -------
    params : list
        Trained parameters, same nesting as the input.
    loss_history : ndarray, shape (steps,)
        Minibatch NLL (nats) before each update.
    """
    if not isinstance(flow, Flow):
        raise TypeError(f"flow: expected a Flow, got {type(flow).__name__}")
    data = check_points(data, "data", flow.d)
    steps = check_scalar(steps, "steps", low=1, integer=True)
    lr = check_scalar(lr, "lr", low=0.0, low_open=True)
    batch_size = check_scalar(batch_size, "batch_size", low=1, integer=True)
    rng = as_rng(rng)
    flow._check(params)
    theta0, unflatten = flatten(params)
    n = data.shape[0]

    def objective(theta, batch):
        return flow.nll(unflatten(theta), batch)

    objective_vg = value_and_grad(objective)

    def step_fn(theta, i):
        batch = data if batch_size >= n else data[rng.choice(n, batch_size, replace=False)]
        return objective_vg(theta, batch)

    theta, losses = adam(step_fn, theta0, steps, lr)
    return unflatten(theta), losses


# --------------------------------------------------------------------------
# verification helpers (2-D normalisation check of eq 2)
# --------------------------------------------------------------------------

def mass_on_grid(log_prob, half_width: float, h: float) -> float:
    r"""Trapezoid-rule mass :math:`\int_{[-R, R]^2} e^{\log p(x)}\,dx` on a grid of spacing ``h``.

    ``log_prob`` maps ``(n, 2)`` points to ``(n,)`` log-densities.  ``R`` is
    rounded up to a multiple of ``h``.  For a smooth density that is
    negligible at the box edge the trapezoid rule converges faster than any
    power of ``h`` (Euler-Maclaurin), so the error is dominated by the mass
    outside the box (:func:`tail_mass_bound`).
    """
    half_width = check_scalar(half_width, "half_width", low=0.0, low_open=True)
    h = check_scalar(h, "h", low=0.0, low_open=True)
    m = int(math.ceil(half_width / h))
    g = h * np.arange(-m, m + 1)
    w = np.full(g.size, h)
    w[0] = w[-1] = h / 2
    X, Y = np.meshgrid(g, g, indexing="ij")
    pts = np.column_stack([X.ravel(), Y.ravel()])
    p = np.exp(np.asarray(log_prob(pts))).reshape(g.size, g.size)
    return float(w @ p @ w)


def tail_mass_bound(flow: "Flow", params, half_width: float, n_boundary: int = 4000) -> float:
    r"""Upper bound on the mass of a 2-D flow outside :math:`B = [-R, R]^2`.

    If :math:`\psi(0) \in B`, the preimage :math:`\psi^{-1}(B)` is a
    topological disk containing 0 whose boundary is
    :math:`\psi^{-1}(\partial B)`, so it contains the ball of radius
    :math:`r = \min_{x\in\partial B} \lVert\psi^{-1}(x)\rVert`, and for the
    2-D standard normal base

    .. math::

        P(x_1 \notin B) \le P(\lVert x_0\rVert > r) = e^{-r^2/2}.

    ``r`` is the minimum over ``n_boundary`` points per side of
    :math:`\partial B` (a fine sample of the boundary, not a certified
    minimum).  Returns 1.0 (no bound) when :math:`\psi(0) \notin B`.
    """
    if not isinstance(flow, Flow) or flow.d != 2:
        raise ValueError("flow: expected a Flow on d = 2")
    R = check_scalar(half_width, "half_width", low=0.0, low_open=True)
    n_boundary = check_scalar(n_boundary, "n_boundary", low=2, integer=True)
    centre, _ = flow.forward(params, np.zeros((1, 2)))
    if np.max(np.abs(centre)) >= R:
        return 1.0
    s = np.linspace(-R, R, n_boundary)
    one = np.full_like(s, R)
    boundary = np.concatenate([
        np.column_stack([s, one]), np.column_stack([s, -one]),
        np.column_stack([one, s]), np.column_stack([-one, s]),
    ])
    z, _ = flow.inverse(params, boundary)
    r = float(np.min(np.linalg.norm(z, axis=1)))
    return math.exp(-0.5 * r * r)
