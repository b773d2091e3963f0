r"""Checks of the MLP :math:`u_\theta(t, x[, y])` of :mod:`refflow.nn` (eq 15, 20, 38, 40; eq 12-14 for the divergence).

The Numba kernels (forward, VJP, exact divergence and its VJP) are compared
with the same network written in plain ``autograd.numpy``
(:mod:`refflow.nn.reference`) and with central finite differences.  Every
check plants a wrong variant that the same comparison must reject.
"""
from __future__ import annotations

import autograd
import autograd.numpy as anp
import numpy as np

from refflow.nn import ACTIVATIONS, MLP
from refflow.nn import reference as R
from refflow.verify.registry import Outcome, register
from refflow.stats import EXACT_TOL, rel_err


def _setups(rng, quick):
    """Small models covering every activation, with/without classes and Fourier features."""
    configs = [(a, None, 0) for a in ACTIVATIONS] + [(a, 3, 2) for a in ACTIVATIONS]
    if quick:
        configs = [("silu", None, 0), ("tanh", 3, 2), ("softplus", 3, 0), ("relu", None, 2)]
    for act, n_classes, F in configs:
        model = MLP(2, (12, 10, 8), act, n_classes=n_classes, embed_dim=3, fourier_features=F)
        params = model.init_params(rng)
        n = 7
        x = rng.standard_normal((n, 2))
        t = rng.uniform(size=n)
        y = None if n_classes is None else rng.integers(-1, n_classes, size=n)
        yield f"{act}, classes={n_classes}, F={F}", model, params, t, x, y


def _wrong_derivative_vjp(model, params, t, x, y, g):
    """Planted bug: the VJP with sigma(z) in place of sigma'(z) (for SiLU: the sigmoid)."""
    ctx = model._call(params, t, x, y)
    ctx.forward()
    hs, Ds = ctx.cache
    for (W, b), h, D in zip(model.unflatten(params).layers, hs, Ds):
        D[...] = R.activation(model.activation, h @ W + b)
    return ctx.backward(g, (0, 1))


@register("nn.apply_vjp_vs_reference", equations="15, 20, 38, 40", quick=True)
def check_apply_vjp(rng, quick):
    errors, control = {}, 0.0
    for name, model, params, t, x, y in _setups(rng, quick):
        u = model.apply(params, t, x, y)
        g = rng.standard_normal(u.shape)
        got = autograd.grad(lambda p, xx: anp.sum(g * model.apply(p, t, xx, y)), (0, 1))(params, x)
        ref = autograd.grad(lambda p, xx: anp.sum(g * R.apply(model, p, t, xx, y)), (0, 1))(params, x)
        errors[name] = max(rel_err(u, R.apply(model, params, t, x, y)),
                           rel_err(got[0], ref[0]), rel_err(got[1], ref[1]))
        if model.activation == "silu":
            wrong = _wrong_derivative_vjp(model, params, t, x, y, g)
            control = max(control, rel_err(wrong[0], ref[0]))
    return Outcome(
        compared="u_theta and its VJP w.r.t. params and x (autograd through the Numba primitives) vs "
                 "autograd through the plain autograd.numpy MLP, per activation / classes / Fourier features",
        error=max(errors.values()), tolerance=EXACT_TOL,
        why="the same exact network evaluated twice in float64: only rounding separates them",
        control="VJP with sigma(z) in place of sigma'(z) (SiLU)", control_error=control,
        details={"per_model": errors},
    )


@register("nn.divergence_vs_jacobian_trace", equations="12-14", quick=True)
def check_divergence(rng, quick):
    errors, control = {}, 0.0
    for name, model, params, t, x, y in _setups(rng, quick):
        J = R.jacobian(model, params, t, x, y)
        trace = np.trace(J, axis1=1, axis2=2)
        div = model.divergence(params, t, x, y)
        _, div2 = model.field_and_divergence(params, t, x, y)
        errors[name] = max(rel_err(div, trace), rel_err(div2, trace))
        # planted bug: one diagonal term of the trace missing
        control = max(control, rel_err(div - J[:, 0, 0], trace))
    return Outcome(
        compared="exact divergence (stacked tangent pass) vs the trace of the Jacobian from autograd "
                 "(one backward pass per output) of the reference MLP",
        error=max(errors.values()), tolerance=EXACT_TOL,
        why="the same exact quantity evaluated twice in float64: only rounding separates them",
        control="divergence missing the term du_1/dx_1", control_error=control,
        details={"per_model": errors},
    )


@register("nn.divergence_vjp_vs_reference", equations="12-14")
def check_divergence_vjp(rng, quick):
    errors, control = {}, 0.0
    for name, model, params, t, x, y in _setups(rng, quick):
        c = rng.standard_normal(x.shape[0])
        got = autograd.grad(lambda p, xx: anp.sum(c * model.divergence(p, t, xx, y)), (0, 1))(params, x)
        ref = autograd.grad(lambda p, xx: anp.sum(c * R.divergence(model, p, t, xx, y)), (0, 1))(params, x)
        # relu: the divergence is piecewise constant in x, both gradients are exactly 0
        errors[name] = max(rel_err(got[0], ref[0]), rel_err(got[1], ref[1]))
        if model.activation in ("silu", "tanh", "softplus"):
            ctx = model._call(params, t, x, y)
            ctx.div_forward()
            for D2 in ctx.cache[3]:
                D2[...] = 0.0  # planted bug: the sigma'' term of the reverse tangent pass dropped
            control = max(control, rel_err(ctx.div_backward(c, (0,))[0], ref[0]))
    return Outcome(
        compared="gradient of <c, div u_theta> w.r.t. params and x (hand-written reverse of the tangent "
                 "pass) vs second-order autograd through the reference MLP",
        error=max(errors.values()), tolerance=EXACT_TOL,
        why="the same exact derivative evaluated twice in float64: only rounding separates them",
        control="reverse tangent pass without the sigma''(z) term", control_error=control,
        details={"per_model": errors},
    )


FD_STEP = 1e-5


@register("nn.vjp_finite_differences", equations="15, 20, 38", quick=True)
def check_finite_differences(rng, quick):
    # Central difference along a unit direction with step h: truncation
    # h^2 |f'''| / 6 ~ 1e-11 and rounding eps |f| / h ~ 2e-11, relative to O(1)
    # derivatives (h = 1e-5, eps = 2.2e-16).  The tolerance (6e-7) is their
    # sum times a safety factor of 5000 for the unknown constants; a wrong
    # derivative is off by O(1).
    h = FD_STEP
    tol = 5e3 * (h**2 + np.finfo(float).eps / h)
    errors, control = {}, 0.0
    for name, model, params, t, x, y in _setups(rng, quick):
        if model.activation == "relu":
            continue  # kinks: a difference quotient across one is not a derivative
        # unit directions: the step h is then the distance moved, as in the error model
        v_p = rng.standard_normal(params.shape)
        v_p /= np.linalg.norm(v_p)
        v_x = rng.standard_normal(x.shape)
        v_x /= np.linalg.norm(v_x)
        w = rng.standard_normal(x.shape)
        c = rng.standard_normal(x.shape[0])
        _, vjp = model.value_and_vjp(params, t, x, y)
        gp, gx = vjp(w)

        def fd(f, z, v):
            return (f(z + h * v) - f(z - h * v)) / (2 * h)

        def compare(vjp_dot_v, cot, jv):
            # error of <cot, J v> relative to ||cot|| ||J v||, its size before any
            # cancellation between terms
            return abs(vjp_dot_v - np.sum(cot * jv)) / (np.linalg.norm(cot) * np.linalg.norm(jv))

        jv_p = fd(lambda p: model.apply(p, t, x, y), params, v_p)
        gd = autograd.grad(lambda p: anp.sum(c * model.divergence(p, t, x, y)))(params)
        errors[name] = {
            "u wrt params": compare(np.sum(gp * v_p), w, jv_p),
            "u wrt x": compare(np.sum(gx * v_x), w, fd(lambda xx: model.apply(params, t, xx, y), x, v_x)),
            "div wrt params": compare(np.sum(gd * v_p), c,
                                      fd(lambda p: model.divergence(p, t, x, y), params, v_p)),
        }
        wrong = _wrong_derivative_vjp(model, params, t, x, y, w)[0]
        control = max(control, compare(np.sum(wrong * v_p), w, jv_p))
    return Outcome(
        compared="directional derivatives <w, J v> from the VJPs (u w.r.t. params and x; divergence "
                 "w.r.t. params) vs central differences with step 1e-5",
        error=max(max(e.values()) for e in errors.values()), tolerance=tol,
        why="central-difference error h^2 |f'''|/6 + eps |f|/h with h = 1e-5, times a safety factor 5000",
        control="VJP with sigma(z) in place of sigma'(z)", control_error=control,
        details={"per_model": errors},
    )
