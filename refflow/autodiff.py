"""Derivatives by autograd of functions that act point by point.

autograd is the source of truth for derivatives in refflow (DESIGN.md): the
closed forms and the hand-written kernels are checked against these.
"""
from __future__ import annotations

import autograd.numpy as anp
from autograd import elementwise_grad

__all__ = ["divergence", "jacobian_pointwise"]


def _column_grad(fn, x, i):
    # Row i of each point's Jacobian: the gradient of sum_n fn(x)[n, i] with
    # respect to x, because point n's output depends on point n's input only.
    return elementwise_grad(lambda z: anp.sum(fn(z)[:, i]))(x)


def divergence(fn, x):
    r"""Divergence :math:`\nabla \cdot f(x) = \operatorname{tr} \partial f / \partial x` per point, by autograd.

    Parameters
    ----------
    fn : callable
        Maps points (n, d) to vectors (n, d), each output row depending only
        on the same input row, written with ``autograd.numpy``.  Nestable like
        :func:`jacobian_pointwise`.
    x : array, shape (n, d)

    Returns
    -------
    array, shape (n,)
        Uses d reverse passes, one per output coordinate.
    """
    d = anp.shape(x)[1]
    return sum(_column_grad(fn, x, i)[:, i] for i in range(d))


def jacobian_pointwise(fn, x):
    """Per-point Jacobians ``J[n, i, j] = d fn(x)[n, i] / d x[n, j]``, by autograd; shape (n, d, d).

    ``d`` reverse passes give all ``n`` Jacobians (not one ``(n d) x (n d)``
    matrix).  Nestable: it may be called inside a function that autograd
    differentiates.
    """
    d = anp.shape(x)[1]
    return anp.stack([_column_grad(fn, x, i) for i in range(d)], axis=1)
