"""Neural vector fields: the MLP :math:`u_\\theta(t, x[, y])` and its autograd reference.

:class:`MLP` evaluates with Numba-fused kernels registered as autograd
primitives (forward, VJP, exact divergence); :mod:`refflow.nn.reference` is
the same network in plain ``autograd.numpy``, the ground truth they are
checked against.  The flat parameter layout is documented in
:mod:`refflow.nn.mlp`.
"""
from refflow.nn import reference
from refflow.nn.mlp import ACTIVATIONS, MLP, MLPParams

__all__ = ["MLP", "MLPParams", "ACTIVATIONS", "reference"]
