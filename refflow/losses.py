r"""Flow-matching losses (eq 15, 20, 36–38).

A model is anything with ``model.apply(params, t, x, y=None) -> u`` that
autograd can differentiate with respect to ``params`` (the MLP of
:mod:`refflow.nn` is one).  Each loss is the Monte-Carlo estimate of its
expectation on the batch it is given: the mean over points of the squared
Euclidean norm, as in the notes.
"""
from __future__ import annotations

import autograd.numpy as anp

from refflow.paths import AffinePath
from refflow.targets import MixtureMarginal

__all__ = ["cfm_loss", "fm_loss", "squared_error"]


def squared_error(u, v):
    r""":math:`\frac1n \sum_i \lVert u_i - v_i \rVert^2`: the batch estimate of :math:`\mathbb E \lVert u - v\rVert^2`."""
    return anp.mean(anp.sum((u - v) ** 2, axis=1))


def cfm_loss(model, params, path: AffinePath, x_0, x_1, t, y=None):
    r"""Conditional flow-matching loss on one batch (eq 20, 36; eq 37 for OT with :math:`\sigma_{min}=0`; eq 38 with ``y``).

    .. math::

        \mathcal L_{CFM}(\theta) \approx \frac1n \sum_i
        \big\lVert u_\theta(t_i, \psi_{t_i}(x_0^{(i)} \mid x_1^{(i)}), y_i)
        - (\sigma_{t_i}' x_0^{(i)} + \alpha_{t_i}' x_1^{(i)}) \big\rVert^2

    Parameters
    ----------
    model : object with ``apply(params, t, x, y=None)``
    params : 1-D array
    path : AffinePath
    x_0, x_1 : arrays (n, d)
        Source and data points.
    t : array (n,) or float
    y : int array (n,), optional
        Prompts (eq 38); -1 is the null prompt.
    """
    x_t = path.sample(x_0, x_1, t)
    target = path.target(x_0, x_1, t)
    return squared_error(model.apply(params, t, x_t, y), target)


def fm_loss(model, params, marginal: MixtureMarginal, x, t, y=None):
    r"""Flow-matching loss on one batch against the closed-form marginal field (eq 15).

    .. math::

        \mathcal L_{FM}(\theta) \approx \frac1n \sum_i \lVert u_\theta(t_i, x^{(i)}) - u_{t_i}(x^{(i)}) \rVert^2,
        \qquad x^{(i)} \sim p_{t_i}.

    ``marginal`` is ``target.marginal(path)`` (or, with a prompt, the
    marginal of the conditioned target).
    """
    return squared_error(model.apply(params, t, x, y), marginal.velocity(x, t))
