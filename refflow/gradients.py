r"""Gradients of the flow-matching losses and the proof that they agree (notes eq 19–24).

For a model :math:`u_\theta(t, x)`, the per-point integrands of the two losses
(eq 15, 20) expand as (eq 21–22)

.. math::

    \lVert u_\theta - u_t(x \mid x_1) \rVert^2
      &= \lVert u_\theta \rVert^2 + \lVert u_t(x \mid x_1) \rVert^2
         - 2 \langle u_\theta, u_t(x \mid x_1) \rangle, \\
    \lVert u_\theta - u_t(x) \rVert^2
      &= \lVert u_\theta \rVert^2 + \lVert u_t(x) \rVert^2
         - 2 \langle u_\theta, u_t(x) \rangle ,

and the two :math:`\theta`-dependent terms have equal expectations (eq 23–24)
because :math:`u_t(x) = \mathbb E[u_t(x \mid x_1) \mid x_t = x]` (eq 19).
Drawing :math:`(t, x_0, x_1)` once and using the *same* point
:math:`x_t = \sigma_t x_0 + \alpha_t x_1` in both losses (common random
numbers), the per-sample difference of the two gradients is

.. math::

    \nabla_\theta \ell^{CFM}_i - \nabla_\theta \ell^{FM}_i
      = 2\, J_\theta(t_i, x_i)^\top \big(u_{t_i}(x_i) - u_{t_i}(x_i \mid x_1^{(i)})\big),
    \qquad J_\theta = \partial u_\theta / \partial \theta ,

a random vector with mean zero.  This module computes those per-sample
vectors (:func:`per_sample_vjp`, :func:`gradient_difference_samples`), the
per-sample loss differences (:func:`loss_difference_samples`), and the
*exact* posterior average of the CFM gradient for Gaussian-mixture targets
(:func:`posterior_mean_x1`, :func:`posterior_velocity`,
:func:`exact_cfm_gradient`).  :class:`LinearFeatureModel` is a model linear
in its parameters, whose Jacobian is known in closed form.

The checks built on these are in :mod:`refflow.verify.checks.gradients`.
"""
from __future__ import annotations

import autograd.numpy as anp
import numpy as np
from autograd import elementwise_grad, grad

from refflow._validation import as_rng, check_points, check_scalar, check_time
from refflow.losses import squared_error
from refflow.nn import MLP, reference
from refflow.paths import AffinePath

__all__ = [
    "LinearFeatureModel",
    "per_sample_vjp",
    "gradient_difference_samples",
    "loss_difference_samples",
    "posterior_mean_x1",
    "posterior_velocity",
    "exact_cfm_gradient",
    "loss_gradient",
    "fit_output_layer",
]

_LOG_2PI = np.log(2.0 * np.pi)


# --------------------------------------------------------------------------- a linear model
class LinearFeatureModel:
    r"""A vector field linear in its parameters, :math:`u_\theta(t, x) = W \varphi(t, x)`.

    .. math::

        \varphi(t, x) = \big[\,1,\; t,\; x,\; \cos(\Omega x + \omega t + c)\,\big]
        \in \mathbb R^{m}, \qquad m = 2 + d + F,

    with fixed random frequencies :math:`\Omega \in \mathbb R^{F \times d}`,
    :math:`\omega, c \in \mathbb R^F`, and :math:`\theta = \operatorname{vec}(W)`,
    :math:`W \in \mathbb R^{d \times m}` stored row-major.  Its parameter
    Jacobian does not depend on :math:`\theta`:
    :math:`\partial u_a / \partial W_{ab} = \varphi_b`, so the per-sample
    gradient of :math:`\langle g, u_\theta \rangle` is :math:`g \otimes \varphi`
    (:meth:`per_sample_vjp`), with no autograd involved.  The cosine features
    are bounded, which keeps the tails of per-sample gradients light.

    Parameters
    ----------
    dim : int
        Dimension ``d`` of the points.
    n_features : int
        Number ``F`` of random cosine features.
    rng : numpy.random.Generator or int
        Draws the fixed frequencies and phases.
    frequency : float
        Standard deviation of the entries of :math:`\Omega` and :math:`\omega`.
    """

    def __init__(self, dim: int, n_features: int = 16, rng=0, frequency: float = 1.0):
        self.dim = check_scalar(dim, "dim", low=1, integer=True)
        self.n_features = check_scalar(n_features, "n_features", low=0, integer=True)
        frequency = check_scalar(frequency, "frequency", low=0.0)
        rng = as_rng(rng)
        F = self.n_features
        self.Omega = frequency * rng.standard_normal((F, self.dim))
        self.omega = frequency * rng.standard_normal(F)
        self.phase = rng.uniform(0.0, 2.0 * np.pi, F)
        self.n_basis = 2 + self.dim + F
        self.n_params = self.dim * self.n_basis

    def features(self, t, x):
        r""":math:`\varphi(t, x)`, shape ``(n, m)``."""
        x = check_points(x, "x", self.dim)
        n = x.shape[0]
        t = np.broadcast_to(check_time(t, n), (n,)).reshape(n, 1)
        waves = np.cos(x @ self.Omega.T + t * self.omega + self.phase)
        return np.concatenate([np.ones((n, 1)), t, x, waves], axis=1)

    def init_params(self, rng, scale: float = 1.0) -> np.ndarray:
        r"""Random :math:`W` with entries :math:`\mathcal N(0, \text{scale}^2 / m)`, flattened."""
        rng = as_rng(rng)
        return scale * rng.standard_normal(self.n_params) / np.sqrt(self.n_basis)

    def _check_params(self, params):
        shape = np.shape(params)
        if shape != (self.n_params,):
            raise ValueError(f"params: expected shape ({self.n_params},) for this model, got {shape}")

    def apply(self, params, t, x, y=None):
        r""":math:`u_\theta(t, x) = W \varphi(t, x)`, shape ``(n, d)``; autograd-differentiable in ``params``."""
        if y is not None:
            raise ValueError("y: expected None, LinearFeatureModel is unconditional")
        self._check_params(params)
        W = anp.reshape(params, (self.dim, self.n_basis))
        return anp.dot(self.features(t, x), W.T)

    def per_sample_vjp(self, params, t, x, g, y=None):
        r"""Rows :math:`J_\theta(t_i, x_i)^\top g_i = \operatorname{vec}(g_i \varphi_i^\top)`, shape ``(n, n_params)``."""
        if y is not None:
            raise ValueError("y: expected None, LinearFeatureModel is unconditional")
        self._check_params(params)
        phi = self.features(t, x)
        g = _check_cotangent(g, phi.shape[0], self.dim)
        return (g[:, :, None] * phi[:, None, :]).reshape(phi.shape[0], self.n_params)

    def __repr__(self):
        return f"LinearFeatureModel(dim={self.dim}, n_features={self.n_features})  # {self.n_params} parameters"


def _check_cotangent(g, n, d):
    g = np.asarray(g, dtype=np.float64)
    if g.shape != (n, d):
        raise ValueError(f"g: expected a cotangent of shape ({n}, {d}), got {g.shape}")
    if not np.all(np.isfinite(g)):
        raise ValueError("g: expected finite values, got NaN or inf")
    return g


# --------------------------------------------------------------------------- per-sample gradients
def per_sample_vjp(model, params, t, x, g, y=None) -> np.ndarray:
    r"""Per-sample vector-Jacobian products :math:`J_\theta(t_i, x_i, y_i)^\top g_i`, shape ``(n, n_params)``.

    .. math::

        \big[\text{out}\big]_{i} = \sum_a g_{ia}\, \frac{\partial u_\theta(t_i, x_i, y_i)_a}{\partial \theta},

    whose sum over ``i`` is the ordinary VJP (one backward pass).  Keeping
    the rows apart gives the sample variance of a batch gradient, hence its
    standard error.

    * a model with its own ``per_sample_vjp`` (e.g. :class:`LinearFeatureModel`)
      is asked directly;
    * a :class:`refflow.nn.MLP` is differentiated layer by layer for all rows
      at once: for layer :math:`h_l = \sigma(h_{l-1} W_l + b_l)` the per-row
      gradients are :math:`h_{l-1,i} \otimes \bar z_{l,i}` and :math:`\bar z_{l,i}`
      (outer products instead of the summed :math:`h_{l-1}^\top \bar z_l`);
    * any other model is differentiated one row at a time by autograd (slow;
      the reference the fast paths are tested against).

    Parameters
    ----------
    model : object with ``apply(params, t, x, y=None)``
    params : 1-D array
    t : float or array of shape (n,)
    x : array of shape (n, d)
    g : array of shape (n, d)
        Cotangents, one per row.
    y : int array of shape (n,), optional
        Labels, for class-conditional models.
    """
    if hasattr(model, "per_sample_vjp"):
        return model.per_sample_vjp(params, t, x, g, y)
    if isinstance(model, MLP):
        return _mlp_per_sample_vjp(model, params, t, x, g, y)
    return _autograd_per_sample_vjp(model, params, t, x, g, y)


def _autograd_per_sample_vjp(model, params, t, x, g, y=None):
    x = check_points(x, "x")
    n, d = x.shape
    g = _check_cotangent(g, n, d)
    t_all = np.broadcast_to(check_time(t, n), (n,))
    y_all = None if y is None else np.broadcast_to(np.asarray(y), (n,))
    params = np.asarray(params, dtype=np.float64)
    out = np.empty((n, params.size))
    for i in range(n):
        yi = None if y_all is None else y_all[i:i + 1]

        def inner(p, i=i, yi=yi):
            return anp.sum(model.apply(p, t_all[i:i + 1], x[i:i + 1], yi) * g[i:i + 1])

        out[i] = grad(inner)(params)
    return out


def _mlp_forward(model: MLP, params, t, x, y=None):
    """Forward pass in plain NumPy: ``(net, rows, inputs, slopes)`` with ``inputs[l]`` the input
    of layer l + 1 (``inputs[0] = z0``, ``inputs[-1]`` the last hidden layer) and ``slopes[l]``
    the activation derivative of hidden layer l + 1."""
    net = model.unflatten(params)
    x = check_points(x, "x", model.dim)
    n = x.shape[0]
    rows = model.class_rows(y, n)
    columns = [x, model.time_features(t, n).astype(np.float64)]
    if rows is not None:
        columns.append(net.embedding[rows])
    z0 = np.concatenate(columns, axis=1)

    def act(z):
        return reference.activation(model.activation, z)

    d_act = elementwise_grad(act)
    inputs, slopes = [z0], []
    h = z0
    for W, b in net.layers[:-1]:
        z = h @ W + b
        slopes.append(d_act(z))
        h = act(z)
        inputs.append(h)
    return net, rows, inputs, slopes


def _mlp_per_sample_vjp(model: MLP, params, t, x, g, y=None):
    net, rows, inputs, slopes = _mlp_forward(model, params, t, x, y)
    n = inputs[0].shape[0]
    g = _check_cotangent(g, n, model.dim)

    out = np.zeros((n, model.n_params))
    offsets = {name: (o, shape) for name, o, shape in model.layout()}

    def put(name, rows_grad):
        o, shape = offsets[name]
        size = int(np.prod(shape))
        out[:, o:o + size] = rows_grad.reshape(n, size)

    n_layers = len(net.layers)
    G = g  # cotangent of the pre-activation of the current layer, per row
    for l in range(n_layers - 1, -1, -1):
        put(f"W{l + 1}", inputs[l][:, :, None] * G[:, None, :])
        put(f"b{l + 1}", G)
        W = net.layers[l][0]
        G_in = G @ W.T                       # cotangent of h_{l-1} (or of z0)
        G = G_in * slopes[l - 1] if l > 0 else G_in
    if rows is not None:
        # z0 = [x, time, e_y]: the embedding row y_i receives the last columns of G.
        o, (n_rows, E) = offsets["embedding"]
        off = model.dim + model.n_time
        for c in range(n_rows):
            sel = rows == c
            out[sel, o + c * E:o + (c + 1) * E] = G[sel, off:]
    return out


def fit_output_layer(model, params, t, x, u_target, y=None) -> np.ndarray:
    r"""Refit the parameters the model is linear in, by least squares on one batch.

    .. math::

        \hat\theta = \arg\min_{\theta_{out}} \frac1n \sum_i
            \lVert u_\theta(t_i, x_i) - v_i \rVert^2 ,

    over the output layer :math:`(W_{L+1}, b_{L+1})` of a :class:`refflow.nn.MLP`
    (the hidden layers stay as in ``params``), or over all of :math:`W` for a
    :class:`LinearFeatureModel`.  With :math:`v_i` the CFM regression targets
    this is the exact minimiser of the batch CFM loss over those parameters:
    a parameter value a training run could reach, at which a model's field
    follows the data (a random initialisation does not).

    Returns a new parameter vector; ``params`` is not modified.
    """
    u_target = np.asarray(u_target, dtype=np.float64)
    if isinstance(model, LinearFeatureModel):
        phi = model.features(t, x)
        u_target = _check_cotangent(u_target, phi.shape[0], model.dim)
        W = np.linalg.lstsq(phi, u_target, rcond=None)[0].T
        return np.ascontiguousarray(W).ravel()
    if isinstance(model, MLP):
        _, _, inputs, _ = _mlp_forward(model, params, t, x, y)
        hidden = inputs[-1]
        u_target = _check_cotangent(u_target, hidden.shape[0], model.dim)
        design = np.concatenate([hidden, np.ones((hidden.shape[0], 1))], axis=1)
        coef = np.linalg.lstsq(design, u_target, rcond=None)[0]
        net = model.unflatten(params)
        layers = [(np.array(W), np.array(b)) for W, b in net.layers[:-1]] + [(coef[:-1], coef[-1])]
        return model.flatten(layers, net.embedding)
    raise TypeError(f"model: expected an MLP or a LinearFeatureModel, got {type(model).__name__}")


def _conditional_path(marginal, path):
    if path is None:
        return marginal.path
    if not isinstance(path, AffinePath):
        raise TypeError(f"path: expected an AffinePath or None, got {type(path).__name__}")
    return path


def gradient_difference_samples(model, params, marginal, x_0, x_1, t, y=None, path=None) -> np.ndarray:
    r"""Per-sample differences of the CFM and FM loss gradients at common points, shape ``(n, n_params)``.

    With :math:`x_i = \psi_{t_i}(x_0^{(i)} \mid x_1^{(i)})` (eq 26),

    .. math::

        D_i = \nabla_\theta \lVert u_\theta(t_i, x_i) - u_{t_i}(x_i \mid x_1^{(i)}) \rVert^2
              - \nabla_\theta \lVert u_\theta(t_i, x_i) - u_{t_i}(x_i) \rVert^2
            = 2\, J_\theta(t_i, x_i)^\top \big(u_{t_i}(x_i) - u_{t_i}(x_i \mid x_1^{(i)})\big).

    By eq 23–24 :math:`\mathbb E D_i = 0`; the column means of ``D`` are the
    difference of the two batch gradients, ``grad cfm_loss - grad fm_loss``.

    Parameters
    ----------
    model, params
        The model :math:`u_\theta` (see :func:`per_sample_vjp`).
    marginal : MixtureMarginal
        ``target.marginal(path)``: supplies the closed-form :math:`u_t(x)` (eq 19).
    x_0, x_1 : arrays (n, d)
        Source and data draws.
    t : float or array (n,)
    y : int array (n,), optional
    path : AffinePath, optional
        The path whose conditional target (eq 29, 36) is used; defaults to
        ``marginal.path``.  A different path here plants a wrong conditional
        field (the negative controls do this).
    """
    cond_path = _conditional_path(marginal, path)
    x_t = marginal.path.sample(x_0, x_1, t)
    u_cond = cond_path.target(x_0, x_1, t)
    u_marg = marginal.velocity(x_t, t)
    return per_sample_vjp(model, params, t, x_t, 2.0 * (u_marg - u_cond), y)


def loss_difference_samples(model, params, marginal, x_0, x_1, t, y=None, path=None) -> np.ndarray:
    r"""Per-sample :math:`\ell^{CFM}_i - \ell^{FM}_i` at common points, shape ``(n,)`` (eq 21–22).

    .. math::

        \ell^{CFM}_i - \ell^{FM}_i
          = \lVert u_\theta - u_t(x_i \mid x_1^{(i)}) \rVert^2 - \lVert u_\theta - u_t(x_i) \rVert^2
          = \lVert u_t(x_i \mid x_1^{(i)}) \rVert^2 - \lVert u_t(x_i) \rVert^2
            - 2 \langle u_\theta(t_i, x_i),\, u_t(x_i \mid x_1^{(i)}) - u_t(x_i) \rangle .

    Their mean is ``cfm_loss - fm_loss`` on the batch.  Arguments as in
    :func:`gradient_difference_samples`.
    """
    cond_path = _conditional_path(marginal, path)
    x_t = marginal.path.sample(x_0, x_1, t)
    u_theta = np.asarray(model.apply(params, t, x_t, y))
    u_cond = cond_path.target(x_0, x_1, t)
    u_marg = marginal.velocity(x_t, t)
    return np.sum((u_theta - u_cond) ** 2, axis=1) - np.sum((u_theta - u_marg) ** 2, axis=1)


# --------------------------------------------------------------------------- exact posterior average
def posterior_mean_x1(target, path: AffinePath, x, t) -> np.ndarray:
    r"""Posterior mean :math:`\mathbb E[x_1 \mid x_t = x]` for a Gaussian-mixture target, shape ``(n, d)``.

    With :math:`q_1 = \sum_k w_k \mathcal N(m_k, C_k)` and
    :math:`x_t = \alpha_t x_1 + \sigma_t x_0`, the pair :math:`(x_1, x_t)` is
    jointly Gaussian within component k, so the posterior of :math:`x_1` is
    a mixture of Gaussians with responsibilities :math:`r_k` and means
    :math:`\mu_k`:

    .. math::

        \Sigma_k = \alpha_t^2 C_k + \sigma_t^2 I, \qquad
        r_k(x) = \frac{w_k \mathcal N(x \mid \alpha_t m_k, \Sigma_k)}
                      {\sum_j w_j \mathcal N(x \mid \alpha_t m_j, \Sigma_j)}, \qquad
        \mu_k(x) = m_k + \alpha_t C_k \Sigma_k^{-1} (x - \alpha_t m_k),

    .. math::

        \mathbb E[x_1 \mid x_t = x] = \sum_k r_k(x)\, \mu_k(x).

    Computed here with a Cholesky factorisation of every :math:`\Sigma_k` per
    point, independently of the eigen-decomposition used by
    :class:`refflow.targets.MixtureMarginal`, so that the two can check each
    other.  Point masses (``Empirical`` targets, :math:`C_k = 0`) are allowed
    where :math:`\sigma_t > 0`.

    Parameters
    ----------
    target : GaussianMixture or Empirical
    path : AffinePath
    x : array (n, d)
    t : float or array (n,)
    """
    if not isinstance(path, AffinePath):
        raise TypeError(f"path: expected an AffinePath, got {type(path).__name__}")
    means = np.asarray(target.means, dtype=np.float64)
    K, d = means.shape
    x = check_points(x, "x", d)
    n = x.shape[0]
    t = np.broadcast_to(check_time(t, n), (n,))
    cov = getattr(target, "covariances", None)
    cov = np.zeros((K, d, d)) if cov is None else np.asarray(cov, dtype=np.float64)
    alpha = np.asarray(path.alpha(t), dtype=np.float64)[:, None, None, None]
    sigma = np.asarray(path.sigma(t), dtype=np.float64)[:, None, None, None]
    Sigma = alpha**2 * cov[None] + sigma**2 * np.eye(d)               # (n, K, d, d)
    try:
        L = np.linalg.cholesky(Sigma)
    except np.linalg.LinAlgError:
        raise ValueError(
            "t: the posterior of x_1 given x_t is degenerate here (alpha_t^2 C_k + sigma_t^2 I is singular); "
            "expected sigma_t > 0 or positive-definite covariances"
        ) from None
    a2 = alpha[:, :, :, 0]                                              # (n, 1, 1)
    z = x[:, None, :] - a2 * means[None]                                # (n, K, d)
    Sz = np.linalg.solve(Sigma, z[..., None])[..., 0]                   # Sigma_k^{-1} z
    logdet = 2.0 * np.sum(np.log(np.diagonal(L, axis1=2, axis2=3)), axis=2)
    log_n = -0.5 * (np.sum(z * Sz, axis=2) + logdet + d * _LOG_2PI)
    with np.errstate(divide="ignore"):
        joint = np.log(np.asarray(target.weights, dtype=np.float64))[None] + log_n
    joint -= joint.max(axis=1, keepdims=True)
    r = np.exp(joint)
    r /= r.sum(axis=1, keepdims=True)
    mu = means[None] + a2 * np.einsum("kij,nkj->nki", cov, Sz)          # (n, K, d)
    return np.einsum("nk,nkd->nd", r, mu)


def posterior_velocity(target, path: AffinePath, x, t) -> np.ndarray:
    r"""The posterior average of the conditional field, :math:`\mathbb E[u_t(x \mid x_1) \mid x_t = x]` (eq 19).

    The conditional field of eq 31 is affine in :math:`x_1`,

    .. math::

        u_t(x \mid x_1) = \frac{\sigma_t'}{\sigma_t}\,x
          + \Big(\alpha_t' - \frac{\sigma_t' \alpha_t}{\sigma_t}\Big) x_1 ,

    so its posterior mean is the field at the posterior mean of :math:`x_1`:

    .. math::

        \int u_t(x \mid x_1)\, p(x_1 \mid x_t = x)\, dx_1
          = u_t\big(x \mid \mathbb E[x_1 \mid x_t = x]\big),

    which is the right-hand side of eq 19, the marginal field :math:`u_t(x)`.
    Needs :math:`\sigma_t > 0` (eq 31 divides by it).
    """
    x1_bar = posterior_mean_x1(target, path, x, t)
    return path.conditional_velocity(x, x1_bar, t)


def loss_gradient(model, params, x, t, u_target, y=None) -> np.ndarray:
    r"""Gradient of the batch regression loss :math:`\frac1n\sum_i \lVert u_\theta(t_i, x_i) - v_i\rVert^2` in :math:`\theta` (autograd)."""
    u_target = np.asarray(u_target, dtype=np.float64)
    return grad(lambda p: squared_error(model.apply(p, t, x, y), u_target))(np.asarray(params, dtype=np.float64))


def exact_cfm_gradient(model, params, target, path: AffinePath, x, t, y=None) -> np.ndarray:
    r"""The CFM gradient averaged over the posterior of :math:`x_1` at fixed :math:`(t_i, x_i)`, in closed form.

    .. math::

        \frac1n \sum_i \mathbb E_{x_1 \sim p(x_1 \mid x_{t_i} = x_i)}
          \nabla_\theta \lVert u_\theta(t_i, x_i) - u_{t_i}(x_i \mid x_1) \rVert^2
        = \frac2n \sum_i J_\theta(t_i, x_i)^\top
          \big(u_\theta(t_i, x_i) - \mathbb E[u_{t_i}(x_i \mid x_1) \mid x_i]\big),

    because the gradient is linear in the regression target.  The posterior
    mean of the target is :func:`posterior_velocity`; by eq 19 this equals
    the FM gradient :math:`\nabla_\theta \frac1n \sum_i \lVert u_\theta - u_{t_i}(x_i) \rVert^2`
    (eq 21–24 at fixed :math:`(t, x)`, before the average over :math:`p_t`).
    """
    return loss_gradient(model, params, x, t, posterior_velocity(target, path, x, t), y)
