r"""Gaussian conditional probability paths (notes eq 25–37).

Every path here is affine in the pair :math:`(x_0, x_1)`:

.. math::

    \psi_t(x_0 \mid x_1) = \sigma_t x_0 + \alpha_t x_1, \qquad
    p_t(x \mid x_1) = \mathcal N(x \mid \alpha_t x_1, \sigma_t^2 I)

(eq 25–26 with :math:`\mu_t(x_1) = \alpha_t x_1` and :math:`\sigma_t(x_1) = \sigma_t`).
A path is the four scalar functions ``alpha``, ``sigma``, ``d_alpha``,
``d_sigma`` of ``t``; everything else (samples, conditional velocities,
conditional densities, regression targets) follows from them here, once.

Time runs from the source (t = 0, :math:`p_0 = \mathcal N(0, I)`) to the data
(t = 1).  The schedule functions accept a float or an array of shape ``(n,)``
and are written with ``autograd.numpy`` so that the checks can differentiate
them.

Backends: the same code runs on CuPy arrays (:mod:`refflow.backend`).  The
``autograd.numpy`` functions dispatch to CuPy through NumPy's
``__array_ufunc__`` / ``__array_function__`` protocols, so the schedules are
written once.  A float ``t`` works with either backend; an array ``t`` must
live where ``x`` lives.
"""
from __future__ import annotations

import autograd.numpy as anp
import numpy as np
from autograd import elementwise_grad
from autograd.tracer import Box

from refflow._validation import check_points, check_scalar, check_time, unbox
from refflow.backend import namespace_of, to_host

__all__ = [
    "AffinePath",
    "OTPath",
    "VEPath",
    "VPPath",
    "CosinePath",
    "PolynomialPath",
    "LinearVPPath",
    "CustomPath",
    "make_path",
    "PATHS",
]

_LOG_2PI = np.log(2.0 * np.pi)


def _time(t, n=None, name="t"):
    """Validate ``t`` on its plain value; return something autograd can trace."""
    checked = check_time(unbox(t), n, name)
    return t if isinstance(t, Box) else checked


def _on(xp, v):
    """A schedule value ready to multiply arrays of module ``xp``.

    On NumPy, ``v`` as it is.  On CuPy a 0-d NumPy array (what the schedules
    return for a float ``t``) becomes a Python float: CuPy refuses host
    arrays as operands, even 0-d ones.
    """
    if xp is np or not isinstance(v, np.ndarray):
        return v
    return float(v)


def _points(x, name, d=None):
    raw = check_points(unbox(x), name, d)
    return x if isinstance(x, Box) else raw


def _column(t, n):
    """``t`` as something that broadcasts against ``(n, d)``: a scalar or ``(n, 1)``."""
    plain = unbox(t)
    if getattr(plain, "ndim", 0) == 0:
        return t
    if isinstance(t, Box) or isinstance(t, np.ndarray):
        return anp.reshape(t, (n, 1))
    return t.reshape(n, 1)  # a CuPy array


# -- the formulas ---------------------------------------------------------------------
# Each public method of AffinePath validates its input and evaluates the schedule,
# then calls one of these: the equation and nothing else.  sigma_t, alpha_t, ...
# are scalars or (n, 1) columns that broadcast against points of shape (n, d).

def _flow(x_0, x_1, sigma_t, alpha_t):
    r"""Eq 26: :math:`\psi_t(x_0 \mid x_1) = \sigma_t x_0 + \alpha_t x_1`."""
    return sigma_t * x_0 + alpha_t * x_1


def _pair_velocity(x_0, x_1, d_sigma_t, d_alpha_t):
    r"""Eq 29 (eq 35 for OT): :math:`\frac{d}{dt}\psi_t(x_0 \mid x_1) = \sigma_t' x_0 + \alpha_t' x_1`."""
    return d_sigma_t * x_0 + d_alpha_t * x_1


def _conditional_velocity(x, x_1, ratio_t, alpha_t, d_alpha_t):
    r"""Eq 31: :math:`u_t(x \mid x_1) = \frac{\sigma_t'}{\sigma_t}(x - \alpha_t x_1) + \alpha_t' x_1`,
    with ``ratio_t`` :math:`= \sigma_t' / \sigma_t`."""
    return ratio_t * (x - alpha_t * x_1) + d_alpha_t * x_1


def _conditional_log_prob(x, x_1, alpha_t, sigma_t, sigma_rows):
    r"""Eq 25: :math:`\log \mathcal N(x \mid \alpha_t x_1, \sigma_t^2 I)`, one value per row.

    ``sigma_t`` broadcasts against the points, ``sigma_rows`` against the
    rows (the same values, shaped ``(n,)`` or a scalar)."""
    d = x.shape[1]
    r = (x - alpha_t * x_1) / sigma_t
    return -0.5 * anp.sum(r**2, axis=1) - d * anp.log(sigma_rows) - 0.5 * d * _LOG_2PI


class AffinePath:
    r"""Base class of the affine Gaussian paths :math:`x_t = \sigma_t x_0 + \alpha_t x_1`.

    Subclasses define ``_alpha``, ``_sigma``, ``_d_alpha`` and ``_d_sigma`` on
    validated time arrays; the public methods validate their input.
    """

    name = "affine"

    # -- schedule (subclasses) -------------------------------------------------
    def _alpha(self, t):
        raise NotImplementedError

    def _sigma(self, t):
        raise NotImplementedError

    def _d_alpha(self, t):
        raise NotImplementedError

    def _d_sigma(self, t):
        raise NotImplementedError

    def _sigma_d_sigma(self, t):
        # sigma_t * sigma_t' = (1/2) d(sigma_t^2)/dt.  Paths whose sigma' blows up
        # where sigma = 0 override this with a form that stays finite.
        return self._sigma(t) * self._d_sigma(t)

    # -- schedule (public) -----------------------------------------------------
    def alpha(self, t):
        r""":math:`\alpha_t`, the scale of :math:`x_1` in :math:`\mu_t(x_1) = \alpha_t x_1` (eq 25)."""
        return self._alpha(_time(t))

    def sigma(self, t):
        r""":math:`\sigma_t`, the standard deviation of :math:`p_t(x \mid x_1)` (eq 25)."""
        return self._sigma(_time(t))

    def d_alpha(self, t):
        r""":math:`\alpha_t' = d\alpha_t / dt`."""
        return self._d_alpha(_time(t))

    def d_sigma(self, t):
        r""":math:`\sigma_t' = d\sigma_t / dt`."""
        return self._d_sigma(_time(t))

    def sigma_d_sigma(self, t):
        r""":math:`\sigma_t \sigma_t' = \tfrac12 \, d\sigma_t^2/dt`, finite even where :math:`\sigma_t = 0`.

        This product, not :math:`\sigma_t'/\sigma_t`, is what the closed-form
        marginal field needs (see :mod:`refflow.targets`).
        """
        return self._sigma_d_sigma(_time(t))

    # -- conditional flow, field and density -------------------------------------
    def sample(self, x_0, x_1, t):
        r"""The conditional flow :math:`x_t = \psi_t(x_0 \mid x_1) = \sigma_t x_0 + \alpha_t x_1` (eq 26).

        Parameters
        ----------
        x_0 : array, shape (n, d)
            Source points, :math:`x_0 \sim \mathcal N(0, I)`.
        x_1 : array, shape (n, d)
            Data points.
        t : float or array of shape (n,)
            Times in [0, 1].
        """
        xp = namespace_of(x_0, x_1, t)
        x_0 = _points(x_0, "x_0")
        n, d = unbox(x_0).shape
        x_1 = _points(x_1, "x_1", d)
        _same_rows(x_0, x_1, "x_1")
        t = _column(_time(t, n), n)
        return _flow(x_0, x_1, sigma_t=_on(xp, self._sigma(t)), alpha_t=_on(xp, self._alpha(t)))

    def pair_velocity(self, x_0, x_1, t):
        r"""The conditional velocity along the flow, from the pair (eq 27–29, eq 35 for OT).

        .. math::

            u_t(\psi_t(x_0) \mid x_1) = \frac{d}{dt}\psi_t(x_0 \mid x_1)
            = \sigma_t' x_0 + \alpha_t' x_1 .

        This is also the regression target of :math:`\mathcal L_{CFM}`
        (eq 36; eq 37 when :math:`\sigma_{min} = 0`): see :meth:`target`.
        """
        xp = namespace_of(x_0, x_1, t)
        x_0 = _points(x_0, "x_0")
        n, d = unbox(x_0).shape
        x_1 = _points(x_1, "x_1", d)
        _same_rows(x_0, x_1, "x_1")
        t = _time(t, n)
        self._require_finite_d_sigma(t)
        t = _column(t, n)
        return _pair_velocity(x_0, x_1, d_sigma_t=_on(xp, self._d_sigma(t)), d_alpha_t=_on(xp, self._d_alpha(t)))

    def target(self, x_0, x_1, t):
        r"""Regression target of the CFM loss (eq 36, 37): :math:`\sigma_t' x_0 + \alpha_t' x_1`.

        For the OT path this is :math:`x_1 - (1 - \sigma_{min}) x_0` (eq 35–36),
        and :math:`x_1 - x_0` when :math:`\sigma_{min} = 0` (eq 37).
        """
        return self.pair_velocity(x_0, x_1, t)

    def conditional_velocity(self, x, x_1, t):
        r"""The conditional vector field at any point :math:`x` (eq 31).

        .. math::

            u_t(x \mid x_1) = \frac{\sigma_t'}{\sigma_t}\,(x - \alpha_t x_1) + \alpha_t' x_1 .

        Raises ``ValueError`` where :math:`\sigma_t = 0` (e.g. t = 1 with
        :math:`\sigma_{min} = 0`): there the field is only defined on the
        line :math:`x = x_1`.
        """
        xp = namespace_of(x, x_1, t)
        x = _points(x, "x")
        n, d = unbox(x).shape
        x_1 = _points(x_1, "x_1", d)
        _same_rows(x, x_1, "x_1")
        t = _time(t, n)
        self._require_positive_sigma(t, "conditional_velocity")
        t = _column(t, n)
        return _conditional_velocity(x, x_1, ratio_t=_on(xp, self._d_sigma(t) / self._sigma(t)),
                                     alpha_t=_on(xp, self._alpha(t)), d_alpha_t=_on(xp, self._d_alpha(t)))

    def conditional_log_prob(self, x, x_1, t):
        r"""Log-density of the conditional path, :math:`\log \mathcal N(x \mid \alpha_t x_1, \sigma_t^2 I)` (eq 25).

        Returns an array of shape (n,).  Raises ``ValueError`` where
        :math:`\sigma_t = 0` (a point mass has no density).
        """
        xp = namespace_of(x, x_1, t)
        x = _points(x, "x")
        n, d = unbox(x).shape
        x_1 = _points(x_1, "x_1", d)
        _same_rows(x, x_1, "x_1")
        t = _time(t, n)
        self._require_positive_sigma(t, "conditional_log_prob")
        sigma_rows = _on(xp, self._sigma(t))  # one sigma_t per row, for the normalising constant
        t = _column(t, n)
        return _conditional_log_prob(x, x_1, alpha_t=_on(xp, self._alpha(t)), sigma_t=_on(xp, self._sigma(t)),
                                     sigma_rows=sigma_rows)

    # -- helpers -----------------------------------------------------------------
    def _require_positive_sigma(self, t, what):
        s = unbox(self._sigma(t))
        xp = namespace_of(s)
        if bool(xp.any(s <= 0.0)):
            # an error path: bring the few numbers to the host for the message
            s = np.asarray(to_host(s))
            tt = np.broadcast_to(np.asarray(to_host(unbox(t))), s.shape)[s <= 0.0]
            raise ValueError(
                f"t: {self.name} path has sigma_t = 0 at t = {float(np.ravel(tt)[0])!r}; "
                f"{what} needs sigma_t > 0 (expected t where the conditional path has a density)"
            )

    def _require_finite_d_sigma(self, t):
        # Overridden by the paths whose sigma_t' is infinite at t = 1.
        return None

    def boundary(self):
        """The schedule at the ends: ``{"alpha_0", "sigma_0", "alpha_1", "sigma_1"}``.

        Eq 17 asks for alpha_0 = 0, sigma_0 = 1 (so p_0(x|x_1) = N(0, I)); eq 18
        for alpha_1 = 1 and sigma_1 = sigma_min.
        """
        return {
            "alpha_0": float(self._alpha(np.float64(0.0))),
            "sigma_0": float(self._sigma(np.float64(0.0))),
            "alpha_1": float(self._alpha(np.float64(1.0))),
            "sigma_1": float(self._sigma(np.float64(1.0))),
        }

    def config(self) -> dict:
        """A JSON-able description from which :func:`make_path` rebuilds the path."""
        return {"name": self.name}

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({args})"


def _same_rows(a, b, name):
    na, nb = unbox(a).shape[0], unbox(b).shape[0]
    if na != nb:
        raise ValueError(f"{name}: expected {na} rows to match the first argument, got {nb}")


class OTPath(AffinePath):
    r"""The optimal-transport (straight-line) path of eq 34–35.

    .. math::

        \alpha_t = t, \qquad \sigma_t = 1 - (1 - \sigma_{min}) t,

    so :math:`u_t(x_t \mid x_1) = x_1 - (1 - \sigma_{min}) x_0` is constant in t
    (eq 35): each conditional flow is a straight line at constant speed.

    Parameters
    ----------
    sigma_min : float in [0, 1)
        Standard deviation of :math:`p_1(x \mid x_1)` (eq 18).
    """

    name = "ot"

    def __init__(self, sigma_min: float = 0.0):
        self.sigma_min = check_scalar(sigma_min, "sigma_min", low=0.0, high=1.0, high_open=True)

    def _alpha(self, t):
        return t

    def _sigma(self, t):
        return 1.0 - (1.0 - self.sigma_min) * t

    def _d_alpha(self, t):
        return anp.ones_like(t)

    def _d_sigma(self, t):
        return -(1.0 - self.sigma_min) * anp.ones_like(t)

    def config(self):
        return {"name": self.name, "sigma_min": self.sigma_min}


_VE_SIGMA_MAX = 1e100


class VEPath(AffinePath):
    r"""The variance-exploding path of eq 32.

    .. math::

        \alpha_t = 1, \qquad \sigma_t = s(1 - t), \qquad
        s(r) = \sigma_{min} \left(\frac{\sigma_{max}}{\sigma_{min}}\right)^{r},

    so the noise scale falls from :math:`\sigma_{max}` at t = 0 to
    :math:`\sigma_{min}` at t = 1.  Its t = 0 end is
    :math:`\mathcal N(x_1, \sigma_{max}^2 I)`, not :math:`\mathcal N(0, I)`:
    eq 17 holds only approximately (see the errata in the docs).
    """

    name = "ve"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 10.0):
        self.sigma_min = check_scalar(sigma_min, "sigma_min", low=0.0, low_open=True)
        # sigma_t^2 enters the marginal (eq 19) and sigma_t sigma_t': above 1e100
        # they would come within a factor 1e108 of float64's overflow (1.8e308) and
        # turn into inf, then NaN, for ordinary data; refuse such scales instead.
        self.sigma_max = check_scalar(sigma_max, "sigma_max", low=self.sigma_min, high=_VE_SIGMA_MAX,
                                      low_open=True)
        self._log_ratio = float(np.log(self.sigma_max / self.sigma_min))

    def _alpha(self, t):
        return anp.ones_like(t)

    def _sigma(self, t):
        return self.sigma_min * anp.exp(self._log_ratio * (1.0 - t))

    def _d_alpha(self, t):
        return anp.zeros_like(t)

    def _d_sigma(self, t):
        return -self._log_ratio * self._sigma(t)

    def config(self):
        return {"name": self.name, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}


class VPPath(AffinePath):
    r"""The variance-preserving path of eq 33.

    .. math::

        \alpha_t = a(1 - t), \quad \sigma_t = \sqrt{1 - a(1 - t)^2}, \quad
        a(r) = e^{-T(r)/2}, \quad T(r) = \beta_{min} r + \tfrac12 (\beta_{max} - \beta_{min}) r^2 .

    :math:`\sigma_t` is computed as ``sqrt(-expm1(-T))`` to keep its relative
    accuracy near t = 1.  There :math:`\sigma_t \to 0` like
    :math:`\sqrt{\beta_{min}(1-t)}`, so :math:`\sigma_t'` is infinite at
    t = 1 and ``d_sigma(1)`` raises; :meth:`sigma_d_sigma`
    :math:`= -\alpha_t \alpha_t'` stays finite.  :math:`\alpha_0 = e^{-T(1)/2}`
    is small but not 0 (eq 17 holds approximately).
    """

    name = "vp"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        self.beta_min = check_scalar(beta_min, "beta_min", low=0.0, low_open=True)
        self.beta_max = check_scalar(beta_max, "beta_max", low=self.beta_min)

    def _T(self, r):
        return self.beta_min * r + 0.5 * (self.beta_max - self.beta_min) * r**2

    def _dT(self, r):
        return self.beta_min + (self.beta_max - self.beta_min) * r

    def _alpha(self, t):
        return anp.exp(-0.5 * self._T(1.0 - t))

    def _sigma(self, t):
        return anp.sqrt(-anp.expm1(-self._T(1.0 - t)))

    def _d_alpha(self, t):
        # d/dt a(1 - t) = -a'(r) = a(r) T'(r) / 2 at r = 1 - t
        return 0.5 * self._alpha(t) * self._dT(1.0 - t)

    def _d_sigma(self, t):
        return -self._alpha(t) * self._d_alpha(t) / self._sigma(t)

    def _sigma_d_sigma(self, t):
        # sigma^2 = 1 - alpha^2, so sigma sigma' = -alpha alpha': finite at t = 1.
        return -self._alpha(t) * self._d_alpha(t)

    def _require_finite_d_sigma(self, t):
        _refuse_t_one(self, t)

    def d_sigma(self, t):
        t = _time(t)
        _refuse_t_one(self, t)
        return self._d_sigma(t)

    def config(self):
        return {"name": self.name, "beta_min": self.beta_min, "beta_max": self.beta_max}


def _refuse_t_one(path, t):
    t = unbox(t)
    if bool(namespace_of(t).any(t == 1.0)):
        raise ValueError(
            f"t: the {path.name} path has sigma_t' = -inf at t = 1 (sigma_t ~ sqrt(1 - t)); "
            "expected t < 1 here, or use sigma_d_sigma, which is finite at t = 1"
        )


class CosinePath(AffinePath):
    r"""The cosine schedule :math:`\alpha_t = \sin(\pi t/2)`, :math:`\sigma_t = \cos(\pi t/2)`.

    Offered for parity with facebookresearch/flow_matching.  :math:`\sigma_t`
    is computed as :math:`\sin(\pi(1-t)/2)` so that it is exactly 0 at t = 1.
    """

    name = "cosine"

    def _alpha(self, t):
        return anp.sin(0.5 * np.pi * t)

    def _sigma(self, t):
        return anp.sin(0.5 * np.pi * (1.0 - t))

    def _d_alpha(self, t):
        return 0.5 * np.pi * anp.sin(0.5 * np.pi * (1.0 - t))

    def _d_sigma(self, t):
        return -0.5 * np.pi * anp.sin(0.5 * np.pi * t)


class PolynomialPath(AffinePath):
    r"""The polynomial schedule :math:`\alpha_t = t^n`, :math:`\sigma_t = 1 - t^n`, n >= 1."""

    name = "polynomial"

    def __init__(self, n: float = 2.0):
        self.n = check_scalar(n, "n", low=1.0)

    def _alpha(self, t):
        return t**self.n

    def _sigma(self, t):
        return 1.0 - t**self.n

    def _d_alpha(self, t):
        return self.n * t ** (self.n - 1.0)

    def _d_sigma(self, t):
        return -self.n * t ** (self.n - 1.0)

    def config(self):
        return {"name": self.name, "n": self.n}


class LinearVPPath(AffinePath):
    r"""The linear variance-preserving schedule :math:`\alpha_t = t`, :math:`\sigma_t = \sqrt{1 - t^2}`.

    Like :class:`VPPath`, :math:`\sigma_t'` is infinite at t = 1 while
    :math:`\sigma_t\sigma_t' = -t` is finite.
    """

    name = "linear-vp"

    def _alpha(self, t):
        return t

    def _sigma(self, t):
        return anp.sqrt((1.0 - t) * (1.0 + t))

    def _d_alpha(self, t):
        return anp.ones_like(t)

    def _d_sigma(self, t):
        return -t / self._sigma(t)

    def _sigma_d_sigma(self, t):
        return -t * anp.ones_like(t)

    def _require_finite_d_sigma(self, t):
        _refuse_t_one(self, t)

    def d_sigma(self, t):
        t = _time(t)
        _refuse_t_one(self, t)
        return self._d_sigma(t)


class CustomPath(AffinePath):
    r"""An affine path from user functions :math:`\alpha(t)`, :math:`\sigma(t)`.

    The derivatives are taken by autograd when not given, so the functions
    must then be written with ``autograd.numpy``.  Each function must accept
    a float array of times and return an array of the same shape.

    The constructor evaluates the schedule on a grid of [0, 1] and refuses
    functions that return non-finite values or a negative sigma.
    """

    name = "custom"

    def __init__(self, alpha, sigma, d_alpha=None, d_sigma=None, name: str = "custom"):
        for arg, fn in (("alpha", alpha), ("sigma", sigma), ("d_alpha", d_alpha), ("d_sigma", d_sigma)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{arg}: expected a callable of t, got {type(fn).__name__}")
        self._alpha_fn = alpha
        self._sigma_fn = sigma
        self._d_alpha_fn = d_alpha if d_alpha is not None else elementwise_grad(alpha)
        self._d_sigma_fn = d_sigma if d_sigma is not None else elementwise_grad(sigma)
        self.name = str(name)
        grid = np.linspace(0.0, 1.0, 101)
        for arg, fn in (("alpha", self._alpha_fn), ("sigma", self._sigma_fn)):
            values = np.asarray(fn(grid), dtype=np.float64)
            if values.shape != grid.shape:
                raise ValueError(f"{arg}: expected an output of shape {grid.shape} for t of that shape, got {values.shape}")
            if not np.all(np.isfinite(values)):
                raise ValueError(f"{arg}: expected finite values on [0, 1], got NaN or inf")
        if np.any(np.asarray(self._sigma_fn(grid)) < 0):
            raise ValueError("sigma: expected sigma_t >= 0 on [0, 1], got negative values")

    def _alpha(self, t):
        return self._alpha_fn(t)

    def _sigma(self, t):
        return self._sigma_fn(t)

    def _d_alpha(self, t):
        return self._d_alpha_fn(t)

    def _d_sigma(self, t):
        return self._d_sigma_fn(t)

    def config(self):
        return {"name": self.name, "custom": True}


PATHS = {
    "ot": OTPath,
    "ve": VEPath,
    "vp": VPPath,
    "cosine": CosinePath,
    "polynomial": PolynomialPath,
    "linear-vp": LinearVPPath,
}


def make_path(name, **kwargs) -> AffinePath:
    """Build a path from its name (``"ot"``, ``"ve"``, ``"vp"``, ``"cosine"``,
    ``"polynomial"``, ``"linear-vp"``) or from a :meth:`AffinePath.config` dict."""
    if isinstance(name, dict):
        kwargs = {k: v for k, v in name.items() if k != "name"}
        name = name.get("name")
    if not isinstance(name, str):
        raise TypeError(f"name: expected a path name (str) or a config dict, got {type(name).__name__}")
    key = name.lower().replace("_", "-")
    if key not in PATHS:
        raise ValueError(f"name: expected one of {sorted(PATHS)}, got {name!r}")
    if kwargs.pop("custom", False):
        raise ValueError("name: a custom path cannot be rebuilt from its config; pass its functions to CustomPath")
    return PATHS[key](**kwargs)
