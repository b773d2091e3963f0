"""Value checks of the discrete flows: a general permutation, the round trip of a composed flow, and training.

``flows.logdet`` holds every layer's log-determinant to autograd, with the
default permutation of :class:`~refflow.flows.LUAffine` (reversal), which is
its own inverse, so :math:`P` and :math:`P^\\top` cannot be told apart there.
These checks use cycles (not self-inverse) and pin:

* :math:`W = P L (U + \\operatorname{diag} e^s)` with :math:`(Pz)_i = z_{\\pi(i)}` built
  independently, the forward map :math:`Wx + b`, the inverse, and the round trip
  of a composition of every layer kind (eq 4);
* :meth:`Flow.sample` 's log-density (first line of eq 2) against
  :meth:`Flow.log_prob` at the sampled points (eq 5);
* :func:`refflow.flows.adam` against Adam's closed form, and
  :func:`refflow.flows.fit` (eq 3) step by step against Adam's closed form on
  the gradient of an independently written negative log-likelihood.
"""
from __future__ import annotations

import autograd.numpy as anp
import numpy as np
from autograd import grad

from refflow import flows
from refflow.stats import EXACT_TOL, rel_err
from refflow.verify.checks.train_values import _GRADS, adam_closed_form
from refflow.verify.registry import Outcome, register

ROUND_TRIP_TOL = 1e-9
"""The residual layer's inverse is a fixed-point iteration run to 1e-12 relative; a composition of four
layers with Lipschitz constants of a few amplifies it by at most ~1e3."""


def _perm_matrix(perm):
    d = len(perm)
    P = np.zeros((d, d))
    P[np.arange(d), perm] = 1.0  # (P z)_i = z_perm[i]
    return P


@register("flows.general_permutation", "1, 2, 4, 5", quick=True)
def check_general_permutation(rng, quick):
    errors, control = {}, []
    for perm in ([1, 2, 0], [2, 0, 3, 1]):
        d = len(perm)
        layer = flows.LUAffine(d, permutation=perm)
        p = layer.init_params(rng, scale=0.5)
        L = np.tril(p[0], -1) + np.eye(d)
        U = np.triu(p[1], 1) + np.diag(np.exp(p[2]))
        W = _perm_matrix(perm) @ L @ U
        x = rng.standard_normal((16, d))
        y, ld = layer.forward(p, x)
        x_back, ld_inv = layer.inverse(p, y)
        errors[f"perm {perm}"] = max(rel_err(y, x @ W.T + p[3]), rel_err(x_back, x),
                                     rel_err(ld, np.full(16, np.linalg.slogdet(W)[1])), rel_err(ld_inv, -ld))
        # Planted bug: the inverse applies P where it needs P^T.
        z = np.linalg.solve(U, np.linalg.solve(L, ((y - p[3]) @ _perm_matrix(perm).T).T)).T
        control.append(rel_err(z, x))
    # a composition of every layer kind, with a cyclic permutation inside
    d = 3
    layers = [flows.LUAffine(d, permutation=[1, 2, 0]), flows.ElementwiseAffine(d),
              flows.AffineCoupling(d, flows.alternating_mask(d, 0), hidden=(8,)),
              flows.Residual(d, hidden=(8,), delta=0.5),
              flows.AffineCoupling(d, flows.alternating_mask(d, 1), hidden=(8,))]
    flow = flows.Flow(layers)
    params = flow.init_params(rng, scale=0.5)
    x_1, log_p = flow.sample(params, 32, rng, return_log_prob=True)
    x_0, _ = flow.inverse(params, x_1)
    x_1_again, _ = flow.forward(params, x_0)
    errors["composed round trip"] = rel_err(x_1_again, x_1) * EXACT_TOL / ROUND_TRIP_TOL
    errors["sample log_p vs log_prob"] = rel_err(log_p, flow.log_prob(params, x_1)) * EXACT_TOL / ROUND_TRIP_TOL
    return Outcome(
        compared="LUAffine with cyclic permutations (3- and 4-cycles): W, forward, inverse, log-dets vs a "
                 "directly built P L U; a five-layer flow: inverse(forward) and sample's log_p vs log_prob",
        error=max(errors.values()), tolerance=EXACT_TOL,
        why="exact linear algebra in float64; the compositions (scaled to this tolerance) through the "
            "fixed-point inverse, run to 1e-12 relative",
        control="the LU inverse with P in place of P^T", control_error=min(control), details=errors,
    )


def _nll_elementwise(theta, x):
    """-mean log p of N(0, I) pushed through x = e^s z + b, written out (eq 2, 3)."""
    d = x.shape[1]
    s, b = theta[:d], theta[d:]
    z = (x - b) * anp.exp(-s)
    return anp.mean(0.5 * anp.sum(z**2, axis=1) + 0.5 * d * np.log(2 * np.pi) + anp.sum(s))


def _adam_on(fun_grad, theta, steps, lr, bias_correction=True):
    """Adam from the closed-form moment sums, re-evaluating the gradient at each iterate."""
    grads, thetas = [], [theta]
    for _ in range(steps):
        grads.append(fun_grad(thetas[-1]))
        thetas.append(adam_closed_form(theta, grads, lr, bias_correction=bias_correction)[-1])
    return thetas


@register("flows.adam_fit", "3", quick=True)
def check_adam_fit(rng, quick):
    theta_0 = np.array([1.0, -2.0, 0.5, 0.0])
    seq = iter(_GRADS)
    theta, losses = flows.adam(lambda th, i: (0.0, next(seq)), theta_0, len(_GRADS), 0.1)
    errors = {"adam": rel_err(theta - theta_0, adam_closed_form(theta_0, _GRADS, 0.1)[-1] - theta_0)}
    # fit: full batch (batch_size >= n), so every step's gradient is that of the written-out NLL
    d, steps, lr = 2, 4, 0.05
    data = rng.standard_normal((64, d)) * np.array([2.0, 0.5]) + np.array([1.0, -1.0])
    flow = flows.Flow([flows.ElementwiseAffine(d)])
    start = [[0.1 * rng.standard_normal(d), 0.1 * rng.standard_normal(d)]]
    fitted, history = flows.fit(flow, start, data, steps=steps, lr=lr, batch_size=1000, rng=0)
    theta_start = np.concatenate(start[0])
    g = grad(lambda th: _nll_elementwise(th, data))
    ref = _adam_on(g, theta_start, steps, lr)
    errors["fit params"] = rel_err(np.concatenate(fitted[0]) - theta_start, ref[-1] - theta_start)
    errors["fit losses"] = rel_err(history, [_nll_elementwise(th, data) for th in ref[:-1]])
    wrong = _adam_on(g, theta_start, steps, lr, bias_correction=False)
    return Outcome(
        compared="flows.adam on a fixed gradient sequence vs Adam's closed form; flows.fit of an elementwise "
                 "affine flow (4 full-batch steps): parameters and loss history vs Adam's closed form on the "
                 "gradient of the NLL written out",
        error=max(errors.values()), tolerance=EXACT_TOL,
        why="the same arithmetic in float64 (autograd gradients of two writings of one NLL): rounding only",
        control="Adam without its bias corrections", control_error=rel_err(wrong[-1] - theta_start,
                                                                           ref[-1] - theta_start),
        details=errors,
    )
