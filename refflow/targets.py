r"""Ground truth: targets whose marginal path and field are known in closed form (eq 16–19).

For a Gaussian-mixture data distribution
:math:`q_1 = \sum_k w_k \mathcal N(m_k, C_k)` and an affine path
:math:`x_t = \sigma_t x_0 + \alpha_t x_1` (eq 26), the marginal path of eq 16
is again a mixture,

.. math::

    p_t(x) = \sum_k w_k \, \mathcal N\big(x \mid \alpha_t m_k,\; \Sigma_k(t)\big),
    \qquad \Sigma_k(t) = \alpha_t^2 C_k + \sigma_t^2 I,

and the marginal field of eq 19 is the responsibility-weighted average of
the per-component fields

.. math::

    u_t(x) = \sum_k r_k(x, t)\, u_k(x, t), \qquad
    u_k = \alpha_t' m_k + \big(\sigma_t\sigma_t' I + \alpha_t\alpha_t' C_k\big)
          \Sigma_k(t)^{-1} (x - \alpha_t m_k),

with :math:`r_k \propto w_k \mathcal N(x \mid \alpha_t m_k, \Sigma_k)`.  This
follows from eq 19 with :math:`u_t(x|x_1)` of eq 31 and the Gaussian
posterior of :math:`x_1` given :math:`x_t` in component k; it is written with
:math:`\sigma_t\sigma_t'` (never :math:`\sigma_t'/\sigma_t`), so it stays
finite when :math:`\sigma_t \to 0` as long as the :math:`C_k` are positive
definite.  It is :math:`u_k = \tfrac12 \dot\Sigma_k \Sigma_k^{-1}(x - \mu_k) + \dot\mu_k`,
the field that transports :math:`\mathcal N(\mu_k, \Sigma_k)` along itself.

Implementation: each :math:`C_k = V_k \operatorname{diag}(\lambda_k) V_k^\top`
is diagonalised once.  Then :math:`\Sigma_k(t)` is diagonal in the basis
:math:`V_k` for every t, so per-point times cost nothing extra and no matrix
is ever inverted; all components are rotated by one matrix product.

Backends: the closed forms are written once, against an array module ``xp``
that follows the points ``x``: ``autograd.numpy`` for NumPy arrays (so the
checks can differentiate them), ``cupy`` for CuPy arrays (see
:mod:`refflow.backend`).  The mixture's constants are copied to the GPU once
and cached (:meth:`_MixtureCore.on`).
"""
from __future__ import annotations

import copy

import autograd.numpy as anp
import numpy as np
from autograd.tracer import Box, getval

from refflow._validation import as_rng, check_labels, check_points, check_scalar, check_time, exact, unbox
from refflow.backend import backend_name, namespace_of, rng_namespace, to_host
from refflow.paths import AffinePath, _on

__all__ = [
    "GaussianMixture",
    "Empirical",
    "MixtureMarginal",
    "monte_carlo_velocity",
    "eight_gaussians",
    "two_moons",
    "checkerboard",
    "random_mixture",
    "single_gaussian",
    "TARGETS",
    "make_target",
]

_LOG_2PI = np.log(2.0 * np.pi)
# Largest n * K * d of one block of intermediate arrays (about 32 MB of float64).
_BLOCK = 1 << 22
# On a GPU the same limit would cost a kernel launch per few thousand rows;
# 2**26 elements is 512 MiB of float64 per intermediate, small beside a
# data-centre GPU's memory and large enough to keep the device busy.
_BLOCK_DEVICE = 1 << 26


def logsumexp(a, axis, xp=anp):
    r""":math:`\log \sum_j e^{a_j}` along ``axis``, shifted by the maximum so nothing overflows.

    Written with the array operations of ``xp`` so that it runs on either
    backend and autograd differentiates it (the shift is taken from the
    plain values: the result does not depend on it, so neither does its
    gradient).  Rows whose maximum is not finite (all ``-inf``) are not
    shifted, giving ``-inf`` rather than NaN.
    """
    m = xp.max(getval(a), axis=axis, keepdims=True)
    m = xp.where(xp.isfinite(m), m, 0.0)
    return xp.log(xp.sum(xp.exp(a - m), axis=axis)) + xp.squeeze(m, axis=axis)


def _check_weights(weights, K, why):
    """Mixture weights as a float64 array of shape (K,): finite, non-negative, summing to 1."""
    try:
        weights = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"weights: expected {K} real numbers, got {type(weights).__name__}") from None
    if weights.shape != (K,):
        raise ValueError(f"weights: expected shape ({K},) {why}, got shape {weights.shape}")
    bad = ~(np.isfinite(weights) & (weights >= 0))  # NaN fails both
    if np.any(bad):
        i = int(np.argmax(bad))
        raise ValueError(f"weights: expected finite non-negative values, got {exact(weights[i])} at index {i}")
    total = weights.sum()
    if abs(total - 1.0) > 1e-12 * K:
        raise ValueError(f"weights: expected values summing to 1 (within {exact(1e-12 * K)}), got sum {exact(total)}")
    return weights


class _MixtureCore:
    """Weights, means and eigen-decomposed covariances shared by mixtures and point sets.

    ``eigvecs`` is None when every covariance is diagonal (including the
    point masses of :class:`Empirical`): then no rotation is needed.
    """

    def __init__(self, weights, means, eigvals, eigvecs):
        self.xp = anp  # the array module of the constants below; see on()
        self._copies = {}
        self.weights = weights
        self.log_weights = np.log(weights, out=np.full_like(weights, -np.inf), where=weights > 0)
        self.means = means
        self.eigvals = eigvals
        self.eigvecs = eigvecs
        K, d = means.shape
        self.n_components, self.dim = K, d
        if eigvecs is None:
            self._rotation = None
            self._rotated_means = means
        else:
            # One (d, K*d) matrix rotates x into every component's eigenbasis at once.
            self._rotation = np.ascontiguousarray(np.transpose(eigvecs, (1, 0, 2)).reshape(d, K * d))
            self._rotated_means = np.einsum("kd,kde->ke", means, eigvecs)
        self.min_eigval = float(eigvals.min())

    _DEVICE_FIELDS = ("weights", "log_weights", "means", "eigvals", "eigvecs", "_rotation", "_rotated_means")

    def on(self, xp):
        """This core with its constant arrays on the backend of module ``xp`` (cached).

        ``numpy`` or ``autograd.numpy``: ``self``.  ``cupy``: a copy whose
        arrays live on the GPU, made once and kept, so repeated calls do not
        copy the constants again.
        """
        name = backend_name(xp)
        if name == "numpy":
            return self
        dev = self._copies.get(name)
        if dev is None:
            dev = copy.copy(self)
            dev._copies = {}
            dev.xp = xp
            for field in self._DEVICE_FIELDS:
                value = getattr(self, field)
                if value is not None:
                    setattr(dev, field, xp.asarray(value))
            self._copies[name] = dev
        return dev

    def rotate(self, x):
        xp, n = self.xp, x.shape[0]
        if self._rotation is None:
            return xp.reshape(x, (n, 1, self.dim))
        return xp.reshape(xp.dot(x, self._rotation), (n, self.n_components, self.dim))

    def unrotate_sum(self, v):
        """sum_k V_k v_k for v of shape (n, K, d) given in the eigenbases."""
        xp, n = self.xp, v.shape[0]
        if self._rotation is None:
            return xp.sum(v, axis=1)
        return xp.dot(xp.reshape(v, (n, self.n_components * self.dim)), self._rotation.T)

    def terms(self, x, alpha, sigma2, want):
        """Closed-form quantities of the mixture N(alpha m_k, alpha^2 C_k + sigma2 I).

        ``alpha`` and ``sigma2`` are scalars or (n, 1) columns.  ``want`` is a
        set of names from {"log_prob", "resp", "score", "velocity",
        "divergence"}; the latter two need the path coefficients in
        ``want["coef"]``.
        """
        xp, d = self.xp, x.shape[1]
        a = _as3(xp, alpha)
        s2 = _as3(xp, sigma2)
        z = self.rotate(x) - a * self._rotated_means[None, :, :]          # (n, K, d)
        s = a**2 * self.eigvals[None, :, :] + s2                           # (n|1, K, d)
        zs = z / s
        log_n = -0.5 * xp.sum(z * zs + xp.log(s), axis=2) - 0.5 * d * _LOG_2PI  # (n, K)
        joint = self.log_weights[None, :] + log_n
        log_p = logsumexp(joint, 1, xp)
        out = {"log_prob": log_p}
        if set(want) - {"coef"} <= {"log_prob"}:
            return out
        r = xp.exp(joint - log_p[:, None])                                # (n, K)
        out["resp"] = r
        r3 = r[:, :, None]
        if "score" in want or "divergence" in want:
            out["score"] = -self.unrotate_sum(r3 * zs)
        if "velocity" in want or "divergence" in want:
            coef = want["coef"]
            c = _as3(xp, coef["sigma_d_sigma"]) + _as3(xp, coef["alpha_d_alpha"]) * self.eigvals[None, :, :]
            d_alpha = _as2(xp, coef["d_alpha"])
            czs = c * zs
            out["velocity"] = d_alpha * xp.dot(r, self.means) + self.unrotate_sum(r3 * czs)
            if "divergence" in want:
                # div u = sum_k r_k tr(A_k) + sum_k r_k (s_k - s).(u_k - u), with the
                # covariance term expanded as sum_k r_k s_k.u_k - s.u; each s_k.u_k
                # is an inner product taken inside component k's eigenbasis.
                trace = xp.sum(c / s, axis=2)
                s_dot_u = -d_alpha * xp.sum(zs * self._rotated_means[None, :, :], axis=2) - xp.sum(zs * czs, axis=2)
                out["divergence"] = xp.sum(r * (trace + s_dot_u), axis=1) - xp.sum(
                    out["score"] * out["velocity"], axis=1
                )
        return out


def _as3(xp, v):
    if getattr(unbox(v), "ndim", 0) == 0:
        return v
    return xp.reshape(v, (-1, 1, 1))


def _as2(xp, v):
    if getattr(unbox(v), "ndim", 0) == 0:
        return v
    return xp.reshape(v, (-1, 1))


def _points_traceable(x, name, d):
    raw = check_points(unbox(x), name, d)
    return x if isinstance(x, Box) else raw


def _run_blocked(core, x, fn_of_block, outputs):
    """Evaluate ``fn_of_block(x_block, rows)`` over row blocks that fit in memory."""
    n = unbox(x).shape[0]
    xp = namespace_of(x)
    per_row = max(1, core.n_components * core.dim)
    block = max(1, (_BLOCK if xp is np else _BLOCK_DEVICE) // per_row)
    if isinstance(x, Box) or n <= block:
        whole = fn_of_block(x, slice(0, n))
        return {key: whole[key] for key in outputs}
    results = {}
    for start in range(0, n, block):
        rows = slice(start, min(n, start + block))
        part = fn_of_block(x[rows], rows)
        for key in outputs:
            results.setdefault(key, []).append(part[key])
    return {key: xp.concatenate(parts, axis=0) for key, parts in results.items()}


class _MixtureBase:
    """Shared behaviour of :class:`GaussianMixture` and :class:`Empirical`."""

    _core: _MixtureCore
    labels: np.ndarray | None

    @property
    def dim(self) -> int:
        return self._core.dim

    @property
    def n_components(self) -> int:
        return self._core.n_components

    @property
    def weights(self) -> np.ndarray:
        return self._core.weights

    @property
    def means(self) -> np.ndarray:
        return self._core.means

    @property
    def n_classes(self) -> int:
        return 0 if self.labels is None else int(self.labels.max()) + 1

    def marginal(self, path: AffinePath) -> "MixtureMarginal":
        """The marginal path and field of this target under ``path`` (eq 16, 19)."""
        if not isinstance(path, AffinePath):
            raise TypeError(f"path: expected an AffinePath (e.g. refflow.paths.OTPath()), got {type(path).__name__}")
        return MixtureMarginal(self, path)

    def _evaluate(self, x, names):
        x = _points_traceable(x, "x", self.dim)
        self._require_density()
        core = self._core.on(namespace_of(x))

        def block(xb, rows):
            return core.terms(xb, 1.0, 0.0, dict.fromkeys(names))

        return _run_blocked(self._core, x, block, names)

    def log_prob(self, x):
        """Log-density of the target at points ``x`` of shape (n, d); returns (n,)."""
        return self._evaluate(x, ["log_prob"])["log_prob"]

    def score(self, x):
        r"""Score :math:`\nabla_x \log q_1(x)` at points ``x``; returns (n, d)."""
        return self._evaluate(x, ["score"])["score"]

    def _component_of_label(self, label):
        if self.labels is None:
            raise ValueError("label: this target has no class labels (expected labels= at construction)")
        label = check_scalar(label, "label", low=0, integer=True)
        mask = self.labels == label
        if not np.any(mask):
            raise ValueError(f"label: expected one of {sorted(set(self.labels.tolist()))}, got {label}")
        return mask

    def _require_density(self):
        return None


class GaussianMixture(_MixtureBase):
    r"""A Gaussian mixture :math:`q_1(x) = \sum_k w_k \mathcal N(x \mid m_k, C_k)`.

    Parameters
    ----------
    weights : array, shape (K,)
        Non-negative, summing to 1.
    means : array, shape (K, d)
    covariances : array, shape (K, d, d), (K, d) or (K,)
        Full symmetric positive-definite matrices, diagonals, or isotropic
        variances.
    labels : array of int, shape (K,), optional
        A class label per component (for prompt conditioning, eq 38, and
        guidance, eq 40).  :meth:`condition` returns the mixture of one class.
    """

    def __init__(self, weights, means, covariances, labels=None):
        means = check_points(means, "means")
        K, d = means.shape
        if K == 0:
            raise ValueError("means: expected at least one component, got an empty (0, d) array")
        weights = _check_weights(weights, K, "to match means")
        cov = np.asarray(covariances, dtype=np.float64)
        if not np.all(np.isfinite(cov)):
            raise ValueError("covariances: expected finite values, got NaN or inf")
        if cov.shape == (K,):
            if np.any(cov <= 0):
                raise ValueError(f"covariances: expected positive isotropic variances, got {exact(cov.min())}")
            eigvals, eigvecs = np.repeat(cov[:, None], d, axis=1), None
            full = cov[:, None, None] * np.eye(d)
        elif cov.shape == (K, d):
            if np.any(cov <= 0):
                raise ValueError(f"covariances: expected positive diagonal variances, got {exact(cov.min())}")
            eigvals, eigvecs = cov.copy(), None
            full = np.einsum("ki,ij->kij", cov, np.eye(d))
        elif cov.shape == (K, d, d):
            asym = np.abs(cov - np.transpose(cov, (0, 2, 1))).max()
            scale = np.abs(cov).max()
            if asym > 1e-12 * scale:
                raise ValueError(f"covariances: expected symmetric matrices, got max |C - C^T| = {exact(asym)}")
            full = 0.5 * (cov + np.transpose(cov, (0, 2, 1)))
            for k in range(K):
                try:
                    np.linalg.cholesky(full[k])
                except np.linalg.LinAlgError:
                    raise ValueError(f"covariances: expected positive-definite matrices, component {k} is not") from None
            eigvals, eigvecs = np.linalg.eigh(full)
            if np.any(eigvals <= 0):
                raise ValueError(f"covariances: expected positive-definite matrices, got eigenvalue {exact(eigvals.min())}")
        else:
            raise ValueError(
                f"covariances: expected shape ({K}, {d}, {d}), ({K}, {d}) or ({K},), got {cov.shape}"
            )
        self.covariances = full
        self.labels = None if labels is None else check_labels(labels, K, "labels")
        if self.labels is not None and np.any(self.labels < 0):
            raise ValueError("labels: expected labels >= 0 for components (-1 is reserved for the null prompt)")
        self._core = _MixtureCore(weights, means, eigvals, eigvecs)

    def sample(self, n: int, rng) -> np.ndarray:
        """Draw ``n`` points; returns (n, d).

        ``rng`` may be a ``cupy.random.Generator`` (see
        :func:`refflow.backend.as_device_rng`): the points are then drawn on
        the GPU, from a different random stream than NumPy's.
        """
        return self.sample_with_labels(n, rng)[0]

    def sample_with_labels(self, n: int, rng):
        """Draw ``n`` points with their class labels and component indices.

        Returns ``(x, y, k)``: points (n, d), labels (n,) (-1 when the mixture
        has no labels) and components (n,).
        """
        n = check_scalar(n, "n", low=0, integer=True)
        xp = rng_namespace(rng)
        if xp is np:
            rng = as_rng(rng)
            core = self._core
            k = rng.choice(core.n_components, size=n, p=core.weights)
        else:
            # A CuPy generator (backend "cupy"): its own stream, not NumPy's.
            # Components by inverting the cumulative weights (CuPy's
            # Generator has no weighted choice).
            core = self._core.on(xp)
            k = xp.searchsorted(xp.cumsum(core.weights), rng.random(n), side="right")
            k = xp.minimum(k, core.n_components - 1)
        z = rng.standard_normal((n, core.dim))
        scaled = z * xp.sqrt(core.eigvals[k])
        if core.eigvecs is not None:
            # Rotate by V_k component by component: gathering one (d, d) matrix
            # per point would need n d^2 memory.
            rotated = xp.empty_like(scaled)
            for c in range(core.n_components):
                rows = k == c
                rotated[rows] = scaled[rows] @ core.eigvecs[c].T
            scaled = rotated
        x = core.means[k] + scaled
        y = xp.full(n, -1, dtype=np.int64) if self.labels is None else xp.asarray(self.labels)[k]
        return x, y, k

    def condition(self, label: int) -> "GaussianMixture":
        """The mixture of the components labelled ``label``, weights renormalised (eq 38)."""
        mask = self._component_of_label(label)
        w = self.weights[mask]
        return GaussianMixture(w / w.sum(), self.means[mask], self.covariances[mask], self.labels[mask])

    def __repr__(self):
        return f"GaussianMixture(K={self.n_components}, d={self.dim}, classes={self.n_classes})"


class Empirical(_MixtureBase):
    r"""A finite point set :math:`q_1 = \frac1N \sum_j \delta_{x^{(j)}}` (optionally weighted).

    Its marginal field is eq 19 for a sum of deltas, the "memorising" field
    whose flow reproduces the training points.  At a time where
    :math:`\sigma_t = 0` (t = 1 with :math:`\sigma_{min} = 0`) the marginal
    has no density and the field is singular: the methods raise ``ValueError``.
    """

    def __init__(self, points, weights=None, labels=None):
        points = check_points(points, "points")
        N, d = points.shape
        if N == 0:
            raise ValueError("points: expected at least one point, got an empty array")
        if weights is None:
            weights = np.full(N, 1.0 / N)
        weights = _check_weights(weights, N, "to match points")
        self.labels = None if labels is None else check_labels(labels, N, "labels")
        self._core = _MixtureCore(weights, points, np.zeros((N, d)), None)

    @property
    def points(self):
        return self._core.means

    def sample(self, n: int, rng) -> np.ndarray:
        """Draw ``n`` of the points (with replacement)."""
        n = check_scalar(n, "n", low=0, integer=True)
        rng = as_rng(rng)
        return self.points[rng.choice(self.n_components, size=n, p=self.weights)]

    def _require_density(self):
        raise ValueError("x: an empirical target (a sum of point masses) has no density at t = 1")

    def condition(self, label: int) -> "Empirical":
        mask = self._component_of_label(label)
        w = self.weights[mask]
        return Empirical(self.points[mask], w / w.sum(), self.labels[mask])


class MixtureMarginal:
    r"""Closed-form marginal probability path and vector field (eq 16, 19).

    Obtained from ``target.marginal(path)``.  All methods take points ``x``
    of shape (n, d) and times ``t`` (a float or shape (n,)) in [0, 1], and
    are differentiable by autograd in both.
    """

    def __init__(self, target: _MixtureBase, path: AffinePath):
        self.target = target
        self.path = path
        self._core = target._core

    @property
    def dim(self):
        return self._core.dim

    def _coefficients(self, t):
        p = self.path
        return {
            "alpha": p._alpha(t),
            "sigma2": p._sigma(t) ** 2,
            "d_alpha": p._d_alpha(t),
            "alpha_d_alpha": p._alpha(t) * p._d_alpha(t),
            "sigma_d_sigma": p._sigma_d_sigma(t),
        }

    def _evaluate(self, x, t, names):
        xp = namespace_of(x, t)  # refuses a GPU x with a host t array, and the reverse
        x = _points_traceable(x, "x", self.dim)
        n = unbox(x).shape[0]
        t_raw = check_time(unbox(t), n, "t")
        t_val = t if isinstance(t, Box) else t_raw
        self._require_nonsingular(t_raw)
        per_point = t_raw.ndim == 1
        core = self._core.on(xp)

        def block(xb, rows):
            tb = t_val[rows] if per_point else t_val
            coef = self._coefficients(tb)
            if per_point:
                coef_col = {k: _as2(core.xp, v) for k, v in coef.items()}
            else:
                coef_col = {k: _on(xp, v) for k, v in coef.items()}
            want = dict.fromkeys(names)
            want["coef"] = coef_col
            return core.terms(xb, coef_col["alpha"], coef_col["sigma2"], want)

        return _run_blocked(self._core, x, block, names)

    def _require_nonsingular(self, t):
        if self._core.min_eigval > 0:
            return
        sigma = self.path._sigma(t)
        if bool(namespace_of(sigma).any(sigma == 0)):
            sigma, t = np.asarray(to_host(sigma)), np.asarray(to_host(t))  # error path only
            raise ValueError(
                "t: the marginal of a point set is singular where sigma_t = 0 "
                f"(here at t = {float(np.ravel(np.broadcast_to(t, sigma.shape))[np.argmax(np.ravel(sigma == 0))])}); "
                "expected t with sigma_t > 0, e.g. t < 1 or sigma_min > 0"
            )

    def log_prob(self, x, t):
        r"""Marginal log-density :math:`\log p_t(x)` (eq 16); returns (n,)."""
        return self._evaluate(x, t, ["log_prob"])["log_prob"]

    def velocity(self, x, t):
        r"""Marginal vector field :math:`u_t(x)` of eq 19, in closed form; returns (n, d)."""
        return self._evaluate(x, t, ["velocity"])["velocity"]

    def score(self, x, t):
        r"""Marginal score :math:`\nabla_x \log p_t(x)`; returns (n, d)."""
        return self._evaluate(x, t, ["score"])["score"]

    def divergence(self, x, t):
        r"""Divergence :math:`\nabla\cdot u_t(x) = \operatorname{tr} \partial u_t / \partial x`, closed form; returns (n,)."""
        return self._evaluate(x, t, ["divergence"])["divergence"]

    def responsibilities(self, x, t):
        r"""Posterior component probabilities :math:`r_k(x, t)`; returns (n, K)."""
        return self._evaluate(x, t, ["resp"])["resp"]

    def evaluate(self, x, t, names=("log_prob", "velocity", "score", "divergence")):
        """Several quantities in one pass; returns a dict of arrays."""
        allowed = {"log_prob", "velocity", "score", "divergence", "resp"}
        bad = set(names) - allowed
        if bad:
            raise ValueError(f"names: expected a subset of {sorted(allowed)}, got {sorted(bad)}")
        return self._evaluate(x, t, list(names))

    def field(self):
        """The marginal field as a callable ``(t, x) -> u`` for the solvers."""
        return lambda t, x: self.velocity(x, t)

    def sample(self, n: int, t, rng) -> np.ndarray:
        r"""Draw :math:`x_t = \sigma_t x_0 + \alpha_t x_1` with :math:`x_1 \sim q_1`, :math:`x_0 \sim \mathcal N(0, I)`."""
        n = check_scalar(n, "n", low=0, integer=True)
        rng = as_rng(rng)
        t = check_time(t, n, "t")
        x_1 = self.target.sample(n, rng)
        x_0 = rng.standard_normal((n, self.dim))
        return self.path.sample(x_0, x_1, t)


def monte_carlo_velocity(path: AffinePath, x_1, x, t):
    r"""Monte-Carlo estimate of the marginal field of eq 19 from data samples.

    With samples :math:`x_1^{(j)} \sim q_1` and self-normalised weights
    :math:`w_j \propto p_t(x \mid x_1^{(j)})`,

    .. math::

        \hat u_t(x) = \sum_j w_j\, u_t(x \mid x_1^{(j)}), \qquad
        \widehat{\mathrm{se}}^2 = \sum_j w_j^2 \big(u_t(x \mid x_1^{(j)}) - \hat u_t(x)\big)^2

    (the delta-method standard error of a ratio estimator).  This is what a
    user has when no closed form exists; it also checks the closed form.

    Returns
    -------
    u_hat : (n, d)
    stderr : (n, d)
    ess : (n,)
        Effective sample size :math:`1 / \sum_j w_j^2`; the standard error is
        trustworthy only when it is large.
    """
    if not isinstance(path, AffinePath):
        raise TypeError(f"path: expected an AffinePath, got {type(path).__name__}")
    x_1 = check_points(x_1, "x_1")
    x = check_points(x, "x", x_1.shape[1])
    n, d = x.shape
    t = check_time(t, n, "t")
    t_col = np.broadcast_to(t, (n,)).reshape(n, 1, 1)
    alpha, sigma = path._alpha(t_col), path._sigma(t_col)
    if np.any(sigma <= 0):
        raise ValueError("t: expected sigma_t > 0 (the conditional path has no density where sigma_t = 0)")
    d_alpha, d_sigma = path._d_alpha(t_col), path._d_sigma(t_col)
    u_hat = np.empty((n, d))
    se = np.empty((n, d))
    ess = np.empty(n)
    block = max(1, _BLOCK // (x_1.shape[0] * d))
    for start in range(0, n, block):
        rows = slice(start, min(n, start + block))
        diff = x[rows, None, :] - alpha[rows] * x_1[None, :, :]                  # (b, N, d)
        log_w = -0.5 * np.sum(diff**2, axis=2) / sigma[rows, :, 0] ** 2
        w = np.exp(log_w - log_w.max(axis=1, keepdims=True))
        w /= w.sum(axis=1, keepdims=True)
        u_cond = d_sigma[rows] / sigma[rows] * diff + d_alpha[rows] * x_1[None, :, :]  # eq 31
        u_hat[rows] = np.einsum("bn,bnd->bd", w, u_cond)
        se[rows] = np.sqrt(np.einsum("bn,bnd->bd", w**2, (u_cond - u_hat[rows, None, :]) ** 2))
        ess[rows] = 1.0 / np.sum(w**2, axis=1)
    return u_hat, se, ess


# --------------------------------------------------------------------------- presets
def eight_gaussians(radius: float = 4.0, std: float = 0.4) -> GaussianMixture:
    """Eight equal isotropic Gaussians on a circle; component k has label k."""
    radius = check_scalar(radius, "radius", low=0.0, low_open=True)
    std = check_scalar(std, "std", low=0.0, low_open=True)
    angles = 2.0 * np.pi * np.arange(8) / 8
    means = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return GaussianMixture(np.full(8, 1 / 8), means, np.full(8, std**2), labels=np.arange(8))


def two_moons(components_per_moon: int = 12, std: float = 0.12, scale: float = 2.0) -> GaussianMixture:
    """Two interleaved half circles, each a chain of small Gaussians; labels 0 and 1 by moon."""
    m = check_scalar(components_per_moon, "components_per_moon", low=1, integer=True)
    std = check_scalar(std, "std", low=0.0, low_open=True)
    scale = check_scalar(scale, "scale", low=0.0, low_open=True)
    theta = np.linspace(0.0, np.pi, m)
    upper = np.stack([np.cos(theta), np.sin(theta)], axis=1)
    lower = np.stack([1.0 - np.cos(theta), 0.5 - np.sin(theta)], axis=1)
    means = scale * (np.concatenate([upper, lower]) - np.array([0.5, 0.25]))
    K = 2 * m
    return GaussianMixture(np.full(K, 1 / K), means, np.full(K, (scale * std) ** 2),
                           labels=np.repeat([0, 1], m))


def checkerboard(squares: int = 4, per_side: int = 3, half_width: float = 2.0) -> GaussianMixture:
    """A checkerboard of ``squares x squares`` cells on [-w, w]^2, the filled cells each
    covered by ``per_side^2`` small Gaussians; the label of a component is its filled cell."""
    squares = check_scalar(squares, "squares", low=1, integer=True)
    per_side = check_scalar(per_side, "per_side", low=1, integer=True)
    w = check_scalar(half_width, "half_width", low=0.0, low_open=True)
    side = 2 * w / squares
    sub = side / per_side
    offsets = (np.arange(per_side) + 0.5) * sub
    means, labels, cell = [], [], 0
    for i in range(squares):
        for j in range(squares):
            if (i + j) % 2:
                continue
            x0, y0 = -w + i * side, -w + j * side
            for ox in offsets:
                for oy in offsets:
                    means.append((x0 + ox, y0 + oy))
                    labels.append(cell)
            cell += 1
    means = np.array(means)
    K = len(means)
    return GaussianMixture(np.full(K, 1 / K), means, np.full(K, (0.5 * sub) ** 2), labels=np.array(labels))


def random_mixture(dim: int, n_components: int, rng, mean_scale: float = 3.0, n_classes: int | None = None) -> GaussianMixture:
    """A random mixture in ``dim`` dimensions with full SPD covariances.

    Weights from a Dirichlet(2) draw, means N(0, mean_scale^2 I), covariances
    A A^T / dim + 0.05 I with A standard normal (well conditioned, anisotropic).
    Labels cycle over ``n_classes`` when given.
    """
    dim = check_scalar(dim, "dim", low=1, integer=True)
    K = check_scalar(n_components, "n_components", low=1, integer=True)
    rng = as_rng(rng)
    weights = rng.dirichlet(np.full(K, 2.0))
    weights /= weights.sum()
    means = mean_scale * rng.standard_normal((K, dim))
    A = rng.standard_normal((K, dim, dim)) * (0.6 / np.sqrt(dim))
    cov = A @ np.transpose(A, (0, 2, 1)) + 0.05 * np.eye(dim)
    labels = None if n_classes is None else np.arange(K) % int(n_classes)
    return GaussianMixture(weights, means, cov, labels=labels)


def single_gaussian(mean, covariance) -> GaussianMixture:
    """One Gaussian N(mean, covariance): its marginal field is affine in x."""
    mean = np.atleast_1d(np.asarray(mean, dtype=np.float64))
    return GaussianMixture(np.ones(1), mean[None, :], np.asarray(covariance, dtype=np.float64)[None])


TARGETS = {
    "eight-gaussians": eight_gaussians,
    "two-moons": two_moons,
    "checkerboard": checkerboard,
}


def make_target(name: str, **kwargs) -> GaussianMixture:
    """A preset 2-D target by name: ``"eight-gaussians"``, ``"two-moons"``, ``"checkerboard"``."""
    if not isinstance(name, str):
        raise TypeError(f"name: expected a target name (str), got {type(name).__name__}")
    key = name.lower().replace("_", "-")
    if key not in TARGETS:
        raise ValueError(f"name: expected one of {sorted(TARGETS)}, got {name!r}")
    return TARGETS[key](**kwargs)
