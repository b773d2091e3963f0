"""The MLP's array (GPU) elementwise code path, run through NumPy, against the Numba kernels.

``MLP(..., elementwise="array")`` does the elementwise steps around the
matrix products with :class:`refflow.nn._kernels.ArrayElementwise`, the code
that runs on CuPy arrays on a GPU.  Run with NumPy arrays it is the same code
on the CPU, so it can be held to the Numba kernels (which
``nn.apply_vjp_vs_reference`` holds to autograd): the forward pass, the VJP
(parameters and inputs), the exact divergence and the VJP of the divergence
(which needs every activation's second derivative), for every activation,
with and without classes and Fourier features.
"""
from __future__ import annotations

import numpy as np
from autograd import grad

from refflow.nn import ACTIVATIONS, MLP
from refflow.stats import EXACT_TOL, rel_err
from refflow.verify.registry import Outcome, register


def _quantities(model, params, t, x, y, g, c):
    u, vjp = model.value_and_vjp(params, t, x, y)
    gp, gx = vjp(g)
    div = model.divergence(params, t, x, y)
    gdiv = grad(lambda p: np.sum(model.divergence(p, t, x, y) * c))(params)
    return {"u": u, "vjp params": gp, "vjp x": gx, "divergence": div, "divergence vjp": gdiv}


@register("nn.array_elementwise", equations="12-15, 20, 38", quick=True)
def check_array_elementwise(rng, quick):
    errors, control = {}, []
    for act in ACTIVATIONS:
        for n_classes, F in ((None, 0), (3, 2)):
            kw = dict(hidden=(9, 7, 5), activation=act, n_classes=n_classes, embed_dim=3, fourier_features=F)
            numba_model = MLP(2, **kw)
            array_model = MLP(2, elementwise="array", **kw)
            params = numba_model.init_params(rng)
            n = 6
            x = rng.standard_normal((n, 2))
            t = rng.uniform(size=n)
            y = None if n_classes is None else rng.integers(-1, n_classes, size=n)
            g, c = rng.standard_normal((n, 2)), rng.standard_normal(n)
            ref = _quantities(numba_model, params, t, x, y, g, c)
            got = _quantities(array_model, params, t, x, y, g, c)
            errors[f"{act} classes={n_classes} F={F}"] = max(rel_err(got[k], ref[k]) for k in ref)
            if n_classes is None:
                # Planted bug: the divergence VJP of the same model with sigma'' dropped, measured as
                # the change it makes (finite differences of the divergence would see the same)
                tools = array_model._tools(np)[0]
                real = tools._act_d2
                tools._act_d2 = lambda z, real=real: (lambda a, g1, g2: (a, g1, 0.0 * g2))(*real(z))
                try:
                    bad = _quantities(array_model, params, t, x, y, g, c)["divergence vjp"]
                finally:
                    tools._act_d2 = real
                if act != "relu":  # relu'' = 0: the control cannot differ there
                    control.append(rel_err(bad, ref["divergence vjp"]))
    return Outcome(
        compared="MLP(elementwise='array') on NumPy vs the Numba kernels: u, VJP (params, x), divergence and the "
                 "divergence's VJP, every activation, with/without classes and Fourier features, three hidden layers",
        error=max(errors.values()), tolerance=EXACT_TOL,
        why="the same float64 network computed by two implementations of its elementwise steps",
        control="the array path's divergence VJP with sigma'' set to 0", control_error=min(control),
        details=errors,
    )
