"""CNF log-likelihood with the exact divergence (eq 14): refflow vs facebookresearch/flow_matching.

Speed: log p_1 of 1000 2-D points through an MLP 3x256 SiLU (float64, the
same weights in both), midpoint method, 100 steps, exact divergence:
``refflow.cnf.log_prob`` (the MLP's Numba Jacobian-trace kernel, values and
tangents in one stacked pass) against flow_matching's
``ODESolver.compute_likelihood(exact_divergence=True)`` (``d`` autograd passes
per evaluation, torchdiffeq).  Both run in the same process; the ratio is
what counts (goal >= 2).

Accuracy: both driven by the closed-form marginal field of the eight-Gaussians
mixture on the OT path (eq 16, 19; for PyTorch a transcription of the same
formula, divergence by torch autograd), log p_1 compared with the closed-form
marginal log p_1 at points drawn from the target, for fixed-step and adaptive
methods.

    python benchmarks/bench_likelihood.py [--n 1000] [--steps 100] [--repeat 3]

The competitor is optional (``pip install torch flow-matching``; it needs
``torchdiffeq`` and ``tqdm`` too); without it only refflow is measured.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from refflow import cnf, targets
from refflow.nn import MLP
from refflow.paths import OTPath


def best_time(fn, repeat):
    times, out = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def load_competitor():
    """``(torch, ODESolver)`` or ``None`` with the reason when flow_matching cannot be imported."""
    try:
        import torch
        from flow_matching.solver import ODESolver
    except Exception as exc:  # ImportError, or a broken optional install
        return None, f"{type(exc).__name__}: {exc}"
    return (torch, ODESolver), ""


def torch_mlp(torch, mlp, params):
    """The same network in torch: nn.Linear weight = W.T, bias = b (layout in refflow.nn.mlp)."""
    layers = []
    net = mlp.unflatten(params)
    for i, (W, b) in enumerate(net.layers):
        lin = torch.nn.Linear(W.shape[0], W.shape[1], dtype=torch.float64)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(W.T)))
            lin.bias.copy_(torch.from_numpy(np.asarray(b)))
        layers.append(lin)
        if i < len(net.layers) - 1:
            layers.append(torch.nn.SiLU())
    seq = torch.nn.Sequential(*layers)

    class Velocity(torch.nn.Module):
        # refflow's input row is [x, t] (no Fourier features).
        def __init__(self):
            super().__init__()
            self.net = seq

        def forward(self, x, t):
            tt = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1).expand(x.shape[0], 1)
            return self.net(torch.cat([x, tt], dim=1))

    return Velocity()


def torch_marginal(torch, target, path):
    """The closed-form marginal field of an isotropic mixture on ``path`` (targets.py formula), in torch."""
    means = torch.from_numpy(target.means)
    var = torch.from_numpy(target.covariances[:, 0, 0].copy())  # isotropic components
    log_w = torch.log(torch.from_numpy(target.weights))

    class Velocity(torch.nn.Module):
        def forward(self, x, t):
            # The unchecked schedule functions: torchdiffeq's dopri5 evaluates
            # stages just outside [0, 1] (where the public methods refuse t);
            # the OT schedule extends smoothly there, and clamping t instead
            # would make the field non-smooth and cost dopri5 accuracy.
            t_np = np.array([float(t)])
            a, sdsig = float(path._alpha(t_np)[0]), float(path._sigma_d_sigma(t_np)[0])
            s2, da = float(path._sigma(t_np)[0]) ** 2, float(path._d_alpha(t_np)[0])
            s = a * a * var + s2                                   # (K,)
            z = x[:, None, :] - a * means[None]                    # (n, K, d)
            d = x.shape[1]
            log_n = -0.5 * (z * z).sum(-1) / s - 0.5 * d * torch.log(2 * torch.pi * s)
            r = torch.softmax(log_w + log_n, dim=1)                # responsibilities
            c = sdsig + a * da * var                               # sigma sigma' + alpha alpha' C_k
            u_k = da * means[None] + (c / s)[None, :, None] * z
            return (r[:, :, None] * u_k).sum(1)

    return Velocity()


def std_normal_torch(torch):
    return lambda x: -0.5 * (x * x).sum(1) - 0.5 * x.shape[1] * float(np.log(2 * np.pi))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--n-accuracy", type=int, default=200, help="points of the accuracy table")
    args = parser.parse_args()
    competitor, why = load_competitor()

    rng = np.random.default_rng(0)
    mlp = MLP(2, (256, 256, 256), "silu")
    params = mlp.init_params(rng)
    x_1 = 2.0 * rng.standard_normal((args.n, 2))
    field = cnf.mlp_field(mlp, params)

    print(f"CNF log-likelihood, exact divergence: {args.n} points, MLP 3x256 SiLU, float64, "
          f"midpoint {args.steps} steps (best of {args.repeat})")
    if competitor is not None:
        torch = competitor[0]
        print(f"threads: numpy/BLAS default, torch {torch.get_num_threads()}; cpus {os.cpu_count()}")
    cnf.log_prob(field, x_1[:8], method="midpoint", n_steps=2)  # compile the kernels outside the timing
    t_ref, res = best_time(lambda: cnf.log_prob(field, x_1, method="midpoint", n_steps=args.steps), args.repeat)
    print(f"  refflow        {t_ref:8.3f} s   ({res.nfe} evaluations)")
    if competitor is None:
        print(f"  flow_matching  skipped ({why})")
    else:
        torch, ODESolver = competitor
        model = torch_mlp(torch, mlp, params)
        solver = ODESolver(velocity_model=model)
        xt = torch.from_numpy(x_1)
        log_p0 = std_normal_torch(torch)

        def run_fm():
            return solver.compute_likelihood(x_1=xt, log_p0=log_p0, step_size=1.0 / args.steps,
                                             method="midpoint", exact_divergence=True)

        t_fm, (x0_fm, logp_fm) = best_time(run_fm, args.repeat)
        diff = float(np.max(np.abs(logp_fm.detach().numpy() - res.log_p)))
        print(f"  flow_matching  {t_fm:8.3f} s")
        print(f"  speed-up refflow / flow_matching: {t_fm / t_ref:.2f}x (goal >= 2)")
        print(f"  same weights, same method: max |log p difference| = {diff:.2e}, "
              f"max |x_0 difference| = {float(np.max(np.abs(x0_fm.detach().numpy() - res.x_0))):.2e}")

    # ---------------------------------------------------------------- accuracy
    target = targets.eight_gaussians()
    path = OTPath()
    marginal = target.marginal(path)
    x_acc = target.sample(args.n_accuracy, np.random.default_rng(1))
    truth = marginal.log_prob(x_acc, 1.0)
    print(f"\nAccuracy vs the closed-form log p_1: eight-Gaussians marginal field (OT path), "
          f"{args.n_accuracy} points from the target; max |error| (time)")
    rows = [("midpoint", dict(method="midpoint", n_steps=args.steps), dict(method="midpoint", step_size=1.0 / args.steps)),
            ("rk4", dict(method="rk4", n_steps=args.steps), dict(method="rk4", step_size=1.0 / args.steps)),
            ("adaptive 1e-7", dict(method="DOP853", rtol=1e-7, atol=1e-7), dict(method="dopri5", step_size=None, rtol=1e-7, atol=1e-7)),
            ("adaptive 1e-10", dict(method="DOP853", rtol=1e-10, atol=1e-10), dict(method="dopri5", step_size=None, rtol=1e-10, atol=1e-10))]
    print(f"  {'method':<16}{'refflow':>26}{'flow_matching':>30}")
    mfield = cnf.marginal_field(marginal)
    if competitor is not None:
        torch, ODESolver = competitor
        fm_solver = ODESolver(velocity_model=torch_marginal(torch, target, path))
        x_acc_t = torch.from_numpy(x_acc)
    for label, ours, theirs in rows:
        start = time.perf_counter()
        err = float(np.max(np.abs(cnf.log_prob(mfield, x_acc, **ours).log_p - truth)))
        ours_s = f"{err:.2e} ({time.perf_counter() - start:.2f} s)"
        theirs_s = "skipped"
        if competitor is not None:
            start = time.perf_counter()
            _, lp = fm_solver.compute_likelihood(x_1=x_acc_t, log_p0=std_normal_torch(torch),
                                                 exact_divergence=True, **theirs)
            theirs_s = f"{float(np.max(np.abs(lp.detach().numpy() - truth))):.2e} ({time.perf_counter() - start:.2f} s)"
        names = f"{ours['method']} / {theirs['method']}"
        print(f"  {label:<16}{ours_s:>26}{theirs_s:>30}   [{names}]", flush=True)


if __name__ == "__main__":
    main()
