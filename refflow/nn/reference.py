r"""The same MLP in plain ``autograd.numpy``: the ground truth for the kernels.

Everything here is written from the specification in the docstring of
:mod:`refflow.nn.mlp` (input order of :math:`z_0`, flat parameter layout,
Fourier frequencies :math:`\omega_k = 2\pi k`, null class row ``n_classes``),
not from the kernel code: slicing, time features and class lookup are redone
here, so a layout or feature mistake in either shows up as a disagreement.
autograd differentiates it to any order, so it also gives the reference
gradient of the divergence.

It is slow (Python-level autograd tracing, ``d`` backward passes for the
divergence); use it for checks only.
"""
from __future__ import annotations

import autograd.numpy as anp
import numpy as np
from autograd import elementwise_grad
from autograd.scipy.special import expit

__all__ = ["activation", "unflatten", "apply", "divergence", "jacobian"]


def activation(name, z):
    """:math:`\\sigma(z)` for the activations of :class:`refflow.nn.MLP`, autograd-traceable."""
    if name == "silu":
        return z * expit(z)
    if name == "tanh":
        return anp.tanh(z)
    if name == "relu":
        return anp.maximum(z, 0.0)
    if name == "softplus":
        return anp.logaddexp(0.0, z)
    raise ValueError(f"activation: expected silu, tanh, relu or softplus, got {name!r}")


def unflatten(model, params):
    """``([(W, b), ...], embedding)`` sliced from ``params`` by the documented layout."""
    widths = [model.dim + 1 + 2 * model.fourier_features + (model.embed_dim if model.n_classes else 0),
              *model.hidden, model.dim]
    layers, o = [], 0
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        W = anp.reshape(params[o:o + fan_in * fan_out], (fan_in, fan_out))
        o += fan_in * fan_out
        b = params[o:o + fan_out]
        o += fan_out
        layers.append((W, b))
    emb = None
    if model.n_classes:
        size = (model.n_classes + 1) * model.embed_dim
        emb = anp.reshape(params[o:o + size], (model.n_classes + 1, model.embed_dim))
        o += size
    if o != len(params):
        raise ValueError(f"params: expected length {o}, got {len(params)}")
    return layers, emb


def _inputs(model, emb, t, x, y):
    n = x.shape[0]
    t = np.broadcast_to(np.asarray(t, dtype=np.float64), (n,)).reshape(n, 1)
    cols = [x, t]
    if model.fourier_features:
        omega = 2.0 * np.pi * np.arange(1, model.fourier_features + 1)
        cols += [np.sin(t * omega), np.cos(t * omega)]
    if model.n_classes:
        labels = np.full(n, -1) if y is None else np.broadcast_to(np.asarray(y), (n,))
        rows = np.where(labels < 0, model.n_classes, labels)
        cols.append(emb[rows])
    return anp.concatenate(cols, axis=1)


def apply(model, params, t, x, y=None):
    r""":math:`u_\theta(t, x, y)` (eq 38's regression target model), traceable in ``params`` and ``x``."""
    layers, emb = unflatten(model, params)
    h = _inputs(model, emb, t, x, y)
    for W, b in layers[:-1]:
        h = activation(model.activation, anp.dot(h, W) + b)
    W, b = layers[-1]
    return anp.dot(h, W) + b


def jacobian(model, params, t, x, y=None):
    r""":math:`\partial u_i / \partial x_j` per point, shape ``(n, d, d)`` (one backward pass per output)."""
    d = model.dim
    rows = [elementwise_grad(lambda xx, i=i: apply(model, params, t, xx, y)[:, i])(x) for i in range(d)]
    return anp.stack(rows, axis=1)


def divergence(model, params, t, x, y=None):
    r""":math:`\mathrm{tr}\, \partial u / \partial x` per point, shape ``(n,)``; differentiable in ``params``.

    Points do not interact, so the gradient of :math:`\sum_i u_k(x_i)` with
    respect to ``x`` is, row by row, :math:`\nabla_x u_k` at each point.
    """
    total = 0.0
    for k in range(model.dim):
        gk = elementwise_grad(lambda xx, k=k: apply(model, params, t, xx, y)[:, k])(x)
        total = total + gk[:, k]
    return total
