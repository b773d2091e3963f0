"""Value checks of Algorithm 1's machinery: Adam, the EMA, label dropout, the gradient, resuming, the losses.

``train.learned_field`` shows that training reaches the closed-form field;
that result is blind to much of the loop (Adam is invariant to the scale of
the gradient, an EMA the wrong way round still converges, a resumed run that
restarts Adam's bias correction still trains).  These checks pin the numbers:

* Adam's first updates against their closed form,
  :math:`\\theta_k = \\theta_{k-1} - \\eta\\,\\hat m_k / (\\sqrt{\\hat v_k} + \\epsilon)`,
  :math:`\\hat m_k = \\frac{1 - \\beta_1}{1 - \\beta_1^k}\\sum_{j \\le k} \\beta_1^{k-j} g_j`
  (and the same for :math:`\\hat v_k` with :math:`g_j^2`);
* the EMA after k steps, :math:`\\bar\\theta_k = \\rho^k \\theta_0 + (1 - \\rho)\\sum_{j=1}^k \\rho^{k-j}\\theta_j`;
* the fraction of prompts replaced by the null prompt, by a binomial z-test;
* the gradient that reaches Adam, :math:`\\nabla_\\theta \\mathcal L_{CFM}` on the first batch
  (eq 36), against autograd through :func:`refflow.losses.cfm_loss`;
* a run stopped, checkpointed, reloaded and continued against the straight run, bit for bit;
* the loss values (eq 15, 20) against the mean of squared norms written out.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np
from autograd import grad

from refflow.losses import cfm_loss, fm_loss
from refflow.nn import MLP
from refflow.paths import VPPath
from refflow.stats import EXACT_TOL, bonferroni_z, rel_err
from refflow.targets import eight_gaussians
from refflow.train import Adam, load_checkpoint, save_checkpoint, train
from refflow.verify.registry import Outcome, register

_GRADS = [np.array([0.3, -4.0, 1e-3, 2.0]), np.array([-0.6, 2.0, 5e-3, 2.0]),
          np.array([0.1, -1.0, -2e-3, -3.0])]


def adam_closed_form(theta_0, grads, lr, beta1=0.9, beta2=0.999, eps=1e-8, bias_correction=True):
    """The iterates of Adam for a given gradient sequence, from the sums (not the recursion)."""
    thetas, theta = [], np.array(theta_0, dtype=np.float64)
    for k in range(1, len(grads) + 1):
        m = sum((1 - beta1) * beta1 ** (k - j) * grads[j - 1] for j in range(1, k + 1))
        v = sum((1 - beta2) * beta2 ** (k - j) * grads[j - 1] ** 2 for j in range(1, k + 1))
        if bias_correction:
            m, v = m / (1 - beta1**k), v / (1 - beta2**k)
        theta = theta - lr * m / (np.sqrt(v) + eps)
        thetas.append(theta)
    return thetas


@register("train.adam_closed_form", equations="Algorithm 1 (Adam)", quick=True)
def check_adam(rng, quick):
    theta_0 = np.array([1.0, -2.0, 0.5, 0.0])
    opt = Adam(lr=0.1)
    got, theta = [], theta_0
    for g in _GRADS:
        theta = opt.update(theta, g)
        got.append(theta)
    ref = adam_closed_form(theta_0, _GRADS, 0.1)
    # the first step moves every coordinate by lr exactly (m_hat / sqrt(v_hat) = sign g)
    first = rel_err(got[0] - theta_0, -0.1 * np.sign(_GRADS[0]) * np.abs(_GRADS[0]) / (np.abs(_GRADS[0]) + 1e-8))
    error = max(first, max(rel_err(a - theta_0, b - theta_0) for a, b in zip(got, ref)))
    wrong = adam_closed_form(theta_0, _GRADS, 0.1, bias_correction=False)
    control = max(rel_err(a - theta_0, b - theta_0) for a, b in zip(wrong, ref))
    return Outcome(
        compared="three refflow.train.Adam updates of a fixed gradient sequence vs Adam's closed form "
                 "(bias-corrected moment sums)",
        error=error, tolerance=EXACT_TOL, why="the same arithmetic in float64: only rounding separates them",
        control="Adam without the bias corrections 1/(1 - beta^k)", control_error=control,
    )


def _small_model(n_classes=None):
    return MLP(2, (16,), "silu", n_classes=n_classes)


@register("train.ema_closed_form", equations="Algorithm 1 (EMA of the weights)", quick=True)
def check_ema(rng, quick):
    model, target, path = _small_model(), eight_gaussians(), VPPath()
    theta_0 = model.init_params(rng)
    rho, k = 0.8, 6
    seen = []
    state = train(model, target, path, steps=k, batch_size=64, lr=1e-2, rng=7, params=theta_0,
                  ema_decay=rho, on_step=lambda s: seen.append(np.array(s.params, copy=True)))
    ref = rho**k * theta_0 + sum((1 - rho) * rho ** (k - j) * seen[j - 1] for j in range(1, k + 1))
    wrong = (1 - rho) ** k * theta_0 + sum(rho * (1 - rho) ** (k - j) * seen[j - 1] for j in range(1, k + 1))
    scale = ref - theta_0  # compare the movement, which is what an EMA bug changes
    return Outcome(
        compared=f"state.ema_params after {k} training steps (decay {rho}) vs rho^k theta_0 + "
                 "(1 - rho) sum_j rho^(k-j) theta_j from the recorded iterates",
        error=rel_err(state.ema_params - theta_0, scale), tolerance=EXACT_TOL,
        why="the same sums in float64, in a different order: only rounding separates them",
        control="the EMA the wrong way round (weight rho on the new iterate)",
        control_error=rel_err(wrong - theta_0, scale),
    )


class _RecordingModel:
    """An MLP that records the prompts training hands it."""

    def __init__(self, mlp):
        self.mlp, self.dim, self.n_classes, self.labels = mlp, mlp.dim, mlp.n_classes, []

    def init_params(self, rng):
        return self.mlp.init_params(rng)

    def apply(self, params, t, x, y=None):
        return self.mlp.apply(params, t, x, y)

    def value_and_vjp(self, params, t, x, y=None):
        self.labels.append(np.array(y, copy=True))
        return self.mlp.value_and_vjp(params, t, x, y)


@register("train.label_dropout", equations="38, 40 (label dropout)", quick=True)
def check_label_dropout(rng, quick):
    p, steps, batch = 0.3, 10, 512
    model = _RecordingModel(_small_model(n_classes=8))
    train(model, eight_gaussians(), VPPath(), steps=steps, batch_size=batch, lr=1e-3, rng=3,
          params=model.init_params(rng), label_dropout=p)
    y = np.concatenate(model.labels)
    N = y.size
    dropped = float(np.mean(y == -1))
    se = np.sqrt(p * (1 - p) / N)
    # the kept prompts must be real classes, spread over all eight
    kept_ok = bool(np.all((y >= -1) & (y < 8))) and len(np.unique(y[y >= 0])) == 8
    z = abs(dropped - p) / se if kept_ok else np.inf
    return Outcome(
        compared=f"fraction of the {N} prompts seen by the model that are the null prompt -1 vs label_dropout = {p}",
        error=float(z), tolerance=bonferroni_z(1),
        why="binomial z-score (standard error sqrt(p(1-p)/N)) against the 4-sigma rule",
        control="the dropout mask inverted (prompts dropped with probability 1 - p)",
        control_error=float(abs((1 - dropped) - p) / se), details={"dropped": dropped, "N": N},
    )


@register("train.gradient", equations="20, 36 (the gradient Adam receives)", quick=True)
def check_gradient(rng, quick):
    model, target, path = _small_model(), eight_gaussians(), VPPath()
    theta_0 = model.init_params(rng)
    batch, seed = 128, 11
    state = train(model, target, path, steps=1, batch_size=batch, lr=1e-3, rng=seed, params=theta_0)
    # Replay the first batch from the documented order of draws: x_1 (and y), then t, then x_0.
    r = np.random.default_rng(seed)
    x_1 = target.sample_with_labels(batch, r)[0]
    t = r.random(batch)
    x_0 = r.standard_normal((batch, 2))
    g_ref = grad(lambda p: cfm_loss(model, p, path, x_0, x_1, t))(theta_0)
    g_seen = state.optimizer.m / (1.0 - state.optimizer.beta1)  # after one step m = (1 - beta1) g
    loss_ref = float(cfm_loss(model, theta_0, path, x_0, x_1, t))
    error = max(rel_err(g_seen, g_ref), rel_err(state.losses[0], loss_ref))
    return Outcome(
        compared="the gradient in Adam's first moment after one training step, and the recorded loss, vs "
                 "autograd through losses.cfm_loss on the same batch (VP path)",
        error=error, tolerance=EXACT_TOL,
        why="two float64 evaluations of the same gradient (hand-written VJP vs autograd)",
        control="the gradient of the loss without its factor 2 (a constant factor Adam cannot see)",
        control_error=rel_err(0.5 * g_ref, g_ref),
    )


@register("train.resume", equations="Algorithm 1 (checkpoints)", quick=True)
def check_resume(rng, quick):
    model, target, path = _small_model(), eight_gaussians(), VPPath()
    theta_0 = model.init_params(rng)
    kw = dict(batch_size=64, lr=1e-2, ema_decay=0.9)
    straight = train(model, target, path, steps=6, rng=5, params=theta_0, **kw)
    first = train(model, target, path, steps=3, rng=5, params=theta_0, **kw)
    with tempfile.TemporaryDirectory() as tmp:
        file = os.path.join(tmp, "ckpt.npz")
        save_checkpoint(file, first, model, path)
        model_2, path_2, state, _ = load_checkpoint(file)
        _, _, restarted, _ = load_checkpoint(file)
    resumed = train(model_2, target, path_2, steps=3, batch_size=kw["batch_size"], resume=state)

    def gap(a):
        return max(float(np.max(np.abs(a.params - straight.params))),
                   float(np.max(np.abs(a.ema_params - straight.ema_params))),
                   float(np.max(np.abs(np.array(a.losses) - np.array(straight.losses)))))

    # Planted bug: a resume that restarts Adam (step count and moments at zero).
    restarted.optimizer.step, restarted.optimizer.m, restarted.optimizer.v = 0, None, None
    wrong = train(model_2, target, path_2, steps=3, batch_size=kw["batch_size"], resume=restarted)
    return Outcome(
        compared="3 steps + save_checkpoint + load_checkpoint + 3 steps vs 6 straight steps: parameters, EMA "
                 "and losses",
        error=gap(resumed), tolerance=0.0,
        why="the checkpoint stores every state, the random generator's included: the runs must agree bit for bit",
        control="a resumed run whose Adam restarts (step 0, no moments)", control_error=gap(wrong),
    )


@register("losses.values", equations="15, 20, 36", quick=True)
def check_losses(rng, quick):
    model, target, path = _small_model(), eight_gaussians(), VPPath()
    theta = model.init_params(rng)
    n = 256
    x_1 = target.sample(n, rng)
    x_0 = rng.standard_normal((n, 2))
    t = rng.uniform(0.0, 0.95, n)
    tc = t[:, None]
    x_t = np.asarray(path.sigma(t))[:, None] * x_0 + np.asarray(path.alpha(t))[:, None] * x_1
    u = model.apply(theta, t, x_t)
    target_u = np.asarray(path.d_sigma(t))[:, None] * x_0 + np.asarray(path.d_alpha(t))[:, None] * x_1
    cfm_ref = float(np.sum((u - target_u) ** 2) / n)
    m = target.marginal(path)
    fm_ref = float(np.sum((u - m.velocity(x_t, t)) ** 2) / n)
    error = max(rel_err(cfm_loss(model, theta, path, x_0, x_1, t), cfm_ref),
                rel_err(fm_loss(model, theta, m, x_t, t), fm_ref))
    del tc
    return Outcome(
        compared="cfm_loss and fm_loss on a batch (VP path) vs (1/n) sum_i |u_theta - target_i|^2 written out",
        error=error, tolerance=EXACT_TOL, why="the same sum in float64",
        control="the squared error averaged over coordinates as well (a factor 1/d)",
        control_error=rel_err(cfm_ref / 2.0, cfm_ref),
    )
