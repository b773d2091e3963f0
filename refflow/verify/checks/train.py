"""End-to-end checks of Algorithm 1 (CFM training, eq 36-38) and Algorithm 2 (sampling).

A small MLP is trained on the eight-Gaussians mixture and its learned field is
compared with the closed-form marginal field of eq 19, which is what CFM
training is proven (eq 21-24) to regress onto.
"""
from __future__ import annotations

import functools

import numpy as np

from refflow.nn import MLP
from refflow.paths import OTPath
from refflow.plotting import plot_field_comparison, plot_samples
from refflow.solvers import sample
from refflow.targets import eight_gaussians
from refflow.train import train
from refflow.verify.registry import Outcome, register

FIELD_TOL = 0.05
FIELD_WHY = (
    "relative L2 error E|u_theta - u|^2 / E|u|^2 over t ~ U(0,1), x ~ p_t. A trained network is not exact: "
    "its error is set by capacity and optimisation, not by float64. 0.05 means the field is right to about "
    "20% in norm where it matters; a wrong time convention or a wrong target misses it by far more"
)


@functools.lru_cache(maxsize=4)
def trained_model(quick: bool, conditional: bool = False):
    """Train (once per process) the model the checks examine; returns (model, params, target, path)."""
    target, path = eight_gaussians(), OTPath()
    hidden = (64, 64, 64) if quick else (128, 128, 128)
    steps = 1000 if quick else 2000
    model = MLP(2, hidden, "silu", n_classes=8 if conditional else None)
    state = train(model, target, path, steps=steps, batch_size=256, lr=2e-3, rng=12345,
                  ema_decay=0.99, label_dropout=0.2 if conditional else 0.0)
    return model, state.final_params, target, path


def relative_field_error(field, marginal, rng, n):
    """E|field - u|^2 / E|u|^2 with t ~ U(0, 1), x ~ p_t: the learned field against eq 19."""
    t = rng.random(n)
    x = marginal.sample(n, t, rng)
    u = marginal.velocity(x, t)
    return float(np.mean(np.sum((field(t, x) - u) ** 2, axis=1)) / np.mean(np.sum(u**2, axis=1)))


@register("train.learned_field", equations="15, 19, 20, 36-37, Algorithm 1", quick=True)
def check_learned_field(rng, quick):
    model, params, target, path = trained_model(quick)
    m = target.marginal(path)
    n = 20_000
    err = relative_field_error(lambda t, x: model.apply(params, t, x), m, rng, n)
    # Planted bug: the same network queried with time reversed (t -> 1 - t).
    control = relative_field_error(lambda t, x: model.apply(params, 1.0 - t, x), m, rng, n)
    return Outcome(
        compared="MLP trained by Algorithm 1 (OT path, eight Gaussians) vs the closed-form marginal field (eq 19)",
        error=err, tolerance=FIELD_TOL, why=FIELD_WHY,
        measure='relative L2 error E|u_theta - u|^2 / E|u|^2',
        control="the trained network queried with time reversed (t -> 1 - t)", control_error=control,
        details={"hidden": list(model.hidden), "points": n},
        figure=plot_field_comparison(lambda t, x: model.apply(params, t, x), m),
    )


def _loglik_gap(samples, target, reference):
    """Mean exact log-likelihood of ``samples`` under the target minus that of true samples."""
    return float(np.mean(target.log_prob(samples)) - np.mean(target.log_prob(reference)))


@register("train.sample_quality", equations="Algorithm 2, 8-10", quick=False)
def check_sample_quality(rng, quick):
    model, params, target, path = trained_model(quick)
    n = 4000
    field = model.field(params)
    sol = sample(field, n, 2, rng, method="rk4", n_steps=50)
    reference = target.sample(n, rng)
    gap = abs(_loglik_gap(sol.x, target, reference))
    # Planted bug: Algorithm 2 run with the time argument reversed.
    wrong = sample(lambda t, x: field(1.0 - t, x), n, 2, rng, method="rk4", n_steps=50)
    control = abs(_loglik_gap(wrong.x, target, reference))
    return Outcome(
        compared="mean exact log q_1 of 4000 RK4 samples of the trained model vs that of 4000 true samples",
        error=gap, tolerance=0.3,
        measure='gap in mean log q_1 (nats)',
        why="an absolute gap in nats; the sampling noise of each mean is about 0.02 nats, the rest is the "
            "model's error, which train.learned_field bounds; 0.3 nats is a tenth of the target's entropy scale",
        control="samples drawn with the time argument reversed", control_error=control,
        figure=plot_samples(sol.x, target, title="RK4 samples of the trained model over q_1"),
        details={"mean_loglik_model": float(np.mean(target.log_prob(sol.x))),
                 "mean_loglik_true": float(np.mean(target.log_prob(reference))), "nfe": sol.nfe},
    )


@register("train.guidance", equations="38, 40", quick=False)
def check_guidance_training(rng, quick):
    model, params, target, path = trained_model(quick, conditional=True)
    n = 10_000
    errors = {}
    for label in (0, 3, 6):
        m = target.condition(label).marginal(path)
        errors[f"y={label}"] = relative_field_error(lambda t, x: model.apply(params, t, x, label), m, rng, n)
    errors["y=null"] = relative_field_error(lambda t, x: model.apply(params, t, x, -1), target.marginal(path), rng, n)
    # Planted bug: the conditional field queried with the wrong prompt (off by one class).
    m = target.condition(3).marginal(path)
    control = relative_field_error(lambda t, x: model.apply(params, t, x, 4), m, rng, n)
    return Outcome(
        compared="one MLP trained with label dropout 0.2 (eq 38): its conditional fields u(t, x, y) vs the "
                 "closed-form fields of the class mixtures, and u(t, x, null) vs the unconditional field",
        error=max(errors.values()), tolerance=FIELD_TOL, why=FIELD_WHY,
        measure='relative L2 error E|u_theta - u|^2 / E|u|^2',
        control="the conditional field queried with the prompt of the neighbouring class", control_error=control,
        details=errors,
    )

