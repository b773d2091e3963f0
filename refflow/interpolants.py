r"""Two-sided interpolants: paths conditioned on both ends, with noise of their own.

The paths of :mod:`refflow.paths` are conditioned on :math:`x_1` alone
(:math:`x_t = \sigma_t x_0 + \alpha_t x_1`, eq 26).  The stochastic
interpolants of Albergo and Vanden-Eijnden (2023), and the most used matchers
of TorchCFM (Tong et al. 2023), are conditioned on a *pair*
:math:`(x_0, x_1)` and add an independent Gaussian :math:`\epsilon`:

.. math::

    x_t = a_t x_0 + b_t x_1 + \gamma_t \epsilon, \qquad
    \epsilon \sim \mathcal N(0, I),

with the pair velocity (the regression target of conditional flow matching)

.. math::

    u_t = \frac{d x_t}{dt} = a_t' x_0 + b_t' x_1 + \gamma_t' \epsilon .

Two members are implemented: I-CFM with a constant noise level,
:math:`a_t = 1 - t`, :math:`b_t = t`, :math:`\gamma_t = \sigma`
(:class:`ICFMInterpolant`; TorchCFM's ``ConditionalFlowMatcher(sigma)``), and
the Brownian bridge of SB-CFM, :math:`\gamma_t = \sigma\sqrt{t(1 - t)}`
(:class:`BrownianBridgeInterpolant`; TorchCFM's
``SchrodingerBridgeConditionalFlowMatcher(sigma)``).

**The marginal path of an independent coupling.**  With
:math:`x_0 \sim \mathcal N(0, I)` and :math:`\epsilon` independent of each
other and of :math:`x_1`, the noise :math:`a_t x_0 + \gamma_t \epsilon` is
:math:`\mathcal N(0, s_t^2 I)` with :math:`s_t^2 = a_t^2 + \gamma_t^2`, and

.. math::

    E[a_t' x_0 + \gamma_t' \epsilon \mid a_t x_0 + \gamma_t \epsilon = n]
      = \frac{a_t a_t' + \gamma_t \gamma_t'}{s_t^2}\, n = \frac{s_t s_t'}{s_t^2}\, n .

So the marginal law :math:`p_t` and the marginal field
:math:`u_t(x) = E[u_t \mid x_t = x]` are exactly those of the one-sided affine
path with :math:`\alpha_t = b_t` and :math:`\sigma_t = s_t` (eq 16, 19), whose
only velocity coefficient, :math:`\sigma_t \sigma_t' = a_t a_t' + \gamma_t \gamma_t'`,
stays finite at both ends even where :math:`\gamma_t'` does not (the Brownian
bridge: :math:`\gamma_t \gamma_t' = \sigma^2 (1 - 2t)/2`).
:meth:`Interpolant.marginal_path` returns that path, so every closed form of
:mod:`refflow.targets` (log-density, field, score, divergence of a Gaussian
mixture: per component :math:`\mathcal N(b_t m_k, b_t^2 C_k + s_t^2 I)`)
serves the interpolant unchanged.  For a coupling other than the independent
one (minibatch OT, :mod:`refflow.couplings`) this is no longer the marginal.

This module sits beside :mod:`refflow.paths`, below :mod:`refflow.targets`
(DESIGN.md plans it inside ``paths.py``; a module of its own keeps the two
families apart and each file to one job).
"""
from __future__ import annotations

import autograd.numpy as anp
import numpy as np

from refflow._validation import check_points, check_scalar, check_time
from refflow.paths import AffinePath

__all__ = [
    "Interpolant",
    "ICFMInterpolant",
    "BrownianBridgeInterpolant",
    "MarginalPath",
    "make_interpolant",
]


def _column(t, n):
    t = np.asarray(t, dtype=np.float64)
    if t.ndim == 0:
        return t
    return t.reshape(n, 1)


class Interpolant:
    r"""Base class of :math:`x_t = a_t x_0 + b_t x_1 + \gamma_t \epsilon` (module docstring).

    Subclasses define the schedules ``_a, _b, _gamma`` and their derivatives
    ``_d_a, _d_b, _d_gamma``, and ``_gamma_d_gamma`` (:math:`\gamma_t\gamma_t'`,
    written so that it stays finite where :math:`\gamma_t'` is infinite).
    They are elementwise functions of ``t``, differentiable by autograd.
    """

    name = "interpolant"

    def _a(self, t):
        return 1.0 - t

    def _b(self, t):
        return t

    def _d_a(self, t):
        return -anp.ones_like(t)

    def _d_b(self, t):
        return anp.ones_like(t)

    def _gamma(self, t):
        raise NotImplementedError

    def _d_gamma(self, t):
        raise NotImplementedError

    def _gamma_d_gamma(self, t):
        return self._gamma(t) * self._d_gamma(t)

    # ---- public schedule functions (validated t) -------------------------------

    def a(self, t):
        """:math:`a_t`, the weight of :math:`x_0`."""
        return self._a(check_time(t))

    def b(self, t):
        """:math:`b_t`, the weight of :math:`x_1`."""
        return self._b(check_time(t))

    def gamma(self, t):
        r""":math:`\gamma_t`, the standard deviation of the added noise."""
        return self._gamma(check_time(t))

    def d_gamma(self, t):
        r""":math:`\gamma_t'`; ValueError where it is infinite."""
        t = check_time(t)
        self._require_finite_d_gamma(t)
        return self._d_gamma(t)

    def _require_finite_d_gamma(self, t):
        pass

    # ---- the conditional path ---------------------------------------------------

    def _inputs(self, x_0, x_1, t, eps):
        x_0 = check_points(x_0, "x_0")
        n, d = x_0.shape
        x_1 = check_points(x_1, "x_1", d)
        eps = check_points(eps, "eps", d)
        for name, arr in (("x_1", x_1), ("eps", eps)):
            if arr.shape[0] != n:
                raise ValueError(f"{name}: expected {n} rows like x_0, got shape {arr.shape}")
        t = check_time(t, n, "t")
        return x_0, x_1, _column(t, n), eps, t

    def sample(self, x_0, x_1, t, eps):
        r""":math:`x_t = a_t x_0 + b_t x_1 + \gamma_t \epsilon`; returns (n, d)."""
        x_0, x_1, tc, eps, _ = self._inputs(x_0, x_1, t, eps)
        return self._a(tc) * x_0 + self._b(tc) * x_1 + self._gamma(tc) * eps

    def pair_velocity(self, x_0, x_1, t, eps):
        r""":math:`u_t = a_t' x_0 + b_t' x_1 + \gamma_t' \epsilon`, the CFM target; returns (n, d).

        Raises ValueError at times where :math:`\gamma_t'` is infinite (the
        Brownian bridge at t = 0 and t = 1).
        """
        x_0, x_1, tc, eps, t = self._inputs(x_0, x_1, t, eps)
        self._require_finite_d_gamma(t)
        return self._d_a(tc) * x_0 + self._d_b(tc) * x_1 + self._d_gamma(tc) * eps

    def conditional_velocity(self, x, x_0, x_1, t):
        r"""The field of the pair's Gaussian path at a point :math:`x`:

        .. math::

            u_t(x \mid x_0, x_1) = \frac{\gamma_t'}{\gamma_t}(x - a_t x_0 - b_t x_1) + a_t' x_0 + b_t' x_1,

        which equals :meth:`pair_velocity` at :math:`x = x_t`.  Needs
        :math:`\gamma_t > 0`.
        """
        x = check_points(x, "x")
        n, d = x.shape
        x_0 = check_points(x_0, "x_0", d)
        x_1 = check_points(x_1, "x_1", d)
        t = check_time(t, n, "t")
        tc = _column(t, n)
        gamma = np.broadcast_to(self._gamma(tc), np.shape(tc))
        if np.any(gamma <= 0):
            raise ValueError(f"t: expected times with gamma_t > 0 for the conditional field, got gamma_t = "
                             f"{float(np.min(gamma))!r}")
        mean = self._a(tc) * x_0 + self._b(tc) * x_1
        return self._d_gamma(tc) / gamma * (x - mean) + self._d_a(tc) * x_0 + self._d_b(tc) * x_1

    def marginal_path(self) -> "MarginalPath":
        r"""The one-sided affine path with the same marginals for an independent coupling.

        :math:`\alpha_t = b_t`, :math:`\sigma_t = \sqrt{a_t^2 + \gamma_t^2}`,
        :math:`\sigma_t\sigma_t' = a_t a_t' + \gamma_t\gamma_t'` (module docstring).
        """
        return MarginalPath(self)

    def marginal(self, target):
        """The closed-form marginal (log-density, field, score, divergence) of ``target`` under this interpolant."""
        return target.marginal(self.marginal_path())

    def config(self) -> dict:
        return {"name": self.name, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class ICFMInterpolant(Interpolant):
    r"""I-CFM with noise level :math:`\sigma`: :math:`x_t = (1 - t) x_0 + t x_1 + \sigma\epsilon`.

    :math:`u_t = x_1 - x_0` (:math:`\gamma' = 0`): TorchCFM's
    ``ConditionalFlowMatcher(sigma)`` (Tong et al. 2023, eq 14-15).
    ``sigma = 0`` is the OT path with ``sigma_min = 0``.
    """

    name = "icfm"

    def __init__(self, sigma: float = 0.1):
        self.sigma = check_scalar(sigma, "sigma", low=0.0)

    def _gamma(self, t):
        return self.sigma * anp.ones_like(t)

    def _d_gamma(self, t):
        return anp.zeros_like(t)

    def _gamma_d_gamma(self, t):
        return anp.zeros_like(t)


class BrownianBridgeInterpolant(Interpolant):
    r"""The Brownian bridge of SB-CFM: :math:`x_t = (1 - t) x_0 + t x_1 + \sigma\sqrt{t(1 - t)}\,\epsilon`.

    :math:`\gamma_t' = \sigma (1 - 2t) / (2\sqrt{t(1 - t)})`, infinite at
    both ends, while :math:`\gamma_t\gamma_t' = \sigma^2 (1 - 2t)/2` is not.
    TorchCFM's ``SchrodingerBridgeConditionalFlowMatcher(sigma)`` (Tong et al.
    2024): the bridge of a Brownian motion with diffusion :math:`\sigma`.
    """

    name = "sb"

    def __init__(self, sigma: float = 1.0):
        self.sigma = check_scalar(sigma, "sigma", low=0.0, low_open=True)

    def _gamma(self, t):
        return self.sigma * anp.sqrt(t * (1.0 - t))

    def _d_gamma(self, t):
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.sigma * (1.0 - 2.0 * t) / (2.0 * anp.sqrt(t * (1.0 - t)))

    def _gamma_d_gamma(self, t):
        return self.sigma**2 * (1.0 - 2.0 * t) / 2.0

    def _require_finite_d_gamma(self, t):
        t = np.asarray(t, dtype=np.float64)
        if np.any((t == 0.0) | (t == 1.0)):
            raise ValueError("t: the Brownian bridge's gamma_t' is infinite at t = 0 and t = 1; "
                             f"expected 0 < t < 1, got {float(t.flat[np.argmax((t.ravel() == 0) | (t.ravel() == 1))])!r}")


class MarginalPath(AffinePath):
    r"""The affine path :math:`(\alpha_t, \sigma_t) = (b_t, \sqrt{a_t^2 + \gamma_t^2})` of an interpolant.

    Same marginals :math:`p_t` and marginal field :math:`u_t(x)` as the
    interpolant with an independent coupling (module docstring); its
    *conditional* quantities are those of a different, one-sided path.
    """

    name = "interpolant-marginal"

    def __init__(self, interpolant: Interpolant):
        self.interpolant = interpolant

    def _alpha(self, t):
        return self.interpolant._b(t)

    def _d_alpha(self, t):
        return self.interpolant._d_b(t)

    def _sigma(self, t):
        ip = self.interpolant
        return anp.sqrt(ip._a(t) ** 2 + ip._gamma(t) ** 2)

    def _sigma_d_sigma(self, t):
        ip = self.interpolant
        return ip._a(t) * ip._d_a(t) + ip._gamma_d_gamma(t)

    def _d_sigma(self, t):
        return self._sigma_d_sigma(t) / self._sigma(t)

    def config(self) -> dict:
        return {"name": self.name, "interpolant": self.interpolant.config()}

    def __repr__(self):
        return f"MarginalPath({self.interpolant!r})"


def make_interpolant(name: str, sigma: float) -> Interpolant:
    """``"icfm"`` or ``"sb"`` with noise level ``sigma``."""
    if name == "icfm":
        return ICFMInterpolant(sigma)
    if name == "sb":
        return BrownianBridgeInterpolant(sigma)
    raise ValueError(f"name: expected 'icfm' or 'sb', got {name!r}")
