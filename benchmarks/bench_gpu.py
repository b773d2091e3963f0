"""refflow on the GPU (CuPy) beside NumPy on the CPU and a direct PyTorch-on-GPU version.

Prints, in one run:

1. the closed-form mixture velocity (eq 19; K = 8 full-covariance
   components, OT path, one time per point) for 1e7 points at d = 2 and
   d = 64: points/s of refflow on CuPy, of refflow on NumPy (CPU; measured
   on fewer points, ``--cpu-n``, the rate per point being flat in n), and of
   the same formula written directly in PyTorch on the GPU; with the
   fraction of the GPU's FP64 peak and memory bandwidth that refflow
   reaches (flops and bytes counted below);
2. CFM training steps per second (Algorithm 1 with Adam) at batch 65536,
   MLP 3x256 SiLU, float32: ``refflow.train.train(backend="cupy")`` against
   the same loop in PyTorch on the GPU.  Both draw their batches on the GPU
   and read the loss back every step.

Goal: CuPy within 0.8x of PyTorch or faster on each line (the ``x torch``
column is torch time / refflow time, so goal >= 0.8).

    python benchmarks/bench_gpu.py [--n 10000000] [--cpu-n 200000] [--steps 50]

On a machine without CuPy or a CUDA device it says so and exits with status 0.
Neither CuPy nor PyTorch uses TF32 for float32 products by default; both
are left at their defaults.
"""
import argparse
import math
import sys
import time

import numpy as np

import refflow as rf
from refflow import backend as B

# H200 (SXM) peaks, for the fractions printed; pass --peak-* for another GPU.
H200_BANDWIDTH = 4.8e12      # bytes/s (HBM3e)
H200_FP64 = 67e12            # FP64 tensor-core flop/s (34e12 without tensor cores)


def field_flops_per_point(K, d, full_cov=True):
    """Floating-point operations of the closed-form velocity per point (refflow's algorithm).

    Rotation into the K eigenbases and back: two (d) x (K d) products,
    2 * 2 * d * K * d.  Elementwise work on the (K, d) block: about 16
    operations per entry (z, s, z/s, z*zs, log s, c, c*zs, r*czs, sums).
    Per component: the exponent and the responsibilities, about 10.  The
    mean term r @ means: 2 K d.
    """
    rot = 4 * d * K * d if full_cov else 0
    return rot + 16 * K * d + 10 * K + 2 * K * d


def field_bytes_per_point(K, d):
    """Bytes moved per point, (compulsory, unfused estimate), float64.

    Compulsory: read x and t, write u.  Unfused: each elementwise operation
    on the (n, K, d) intermediates of :meth:`_MixtureCore.terms` reads its
    operands from memory and writes its result, about 30 such (K, d) passes
    for the velocity (counted from the code), plus the (n, K) work.
    """
    compulsory = 8 * (d + 1 + d)
    unfused = 8 * (30 * K * d + 12 * K) + compulsory
    return compulsory, unfused


def best_time(fn, repeat, sync=lambda: None):
    fn()
    sync()
    times = []
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def torch_velocity_fn(torch, gmm, sigma_min, device, block_rows):
    """The closed-form OT-path velocity of eq 19 written directly in PyTorch (float64)."""
    core = gmm._core
    K, d = core.n_components, core.dim
    f64 = torch.float64
    R = torch.as_tensor(core._rotation, dtype=f64, device=device)          # (d, K d)
    rm = torch.as_tensor(core._rotated_means, dtype=f64, device=device)    # (K, d)
    ev = torch.as_tensor(core.eigvals, dtype=f64, device=device)           # (K, d)
    means = torch.as_tensor(core.means, dtype=f64, device=device)
    lw = torch.as_tensor(core.log_weights, dtype=f64, device=device)
    log2pi = math.log(2 * math.pi)

    def block(x, t):
        n = x.shape[0]
        a = t[:, None, None]
        sigma = 1.0 - (1.0 - sigma_min) * a
        s = a * a * ev + sigma * sigma
        z = (x @ R).view(n, K, d) - a * rm
        zs = z / s
        log_n = -0.5 * (z * zs + torch.log(s)).sum(2) - 0.5 * d * log2pi
        r = torch.softmax(lw + log_n, dim=1)
        c = -(1.0 - sigma_min) * sigma + a * ev          # sigma sigma' + alpha alpha' lambda
        return r @ means + (r[:, :, None] * (c * zs)).reshape(n, K * d) @ R.T

    def velocity(x, t):
        return torch.cat([block(x[i:i + block_rows], t[i:i + block_rows])
                          for i in range(0, x.shape[0], block_rows)])

    return velocity


def bench_field(args, cp, torch):
    from refflow import targets as T

    print("\n== closed-form mixture velocity (eq 19), K = 8 full covariances, OT path, float64 ==")
    print(f"{'d':>3} {'n':>9} {'cupy pts/s':>12} {'numpy pts/s':>12} {'x numpy':>8} "
          f"{'torch pts/s':>12} {'x torch':>8} {'%FP64':>6} {'%BW comp':>8} {'%BW unfused':>11} {'max rel diff':>12}")
    sigma_min = 0.0
    path = rf.OTPath(sigma_min)
    for d in (2, 64):
        K = 8
        gmm = rf.random_mixture(d, K, np.random.default_rng(0))
        m = gmm.marginal(path)
        rng = np.random.default_rng(1)
        n = args.n
        x_host = rng.standard_normal((n, d))
        t_host = rng.uniform(size=n)
        x, t = B.to_device(x_host, "cupy"), B.to_device(t_host, "cupy")
        sync = cp.cuda.Device().synchronize
        t_cp = best_time(lambda: m.velocity(x, t), args.repeat, sync)
        n_cpu = min(n, args.cpu_n if d == 2 else max(args.cpu_n // 16, 1000))
        t_np = best_time(lambda: m.velocity(x_host[:n_cpu], t_host[:n_cpu]), 1) * n / n_cpu
        # agreement on the CPU's points
        u_cpu = m.velocity(x_host[:n_cpu], t_host[:n_cpu])
        u_gpu = B.to_host(m.velocity(x[:n_cpu], t[:n_cpu]))
        diff = float(np.max(np.abs(u_gpu - u_cpu)) / np.max(np.abs(u_cpu)))
        t_torch = float("nan")
        if torch is not None:
            block_rows = max(1, T._BLOCK_DEVICE // (K * d))
            vel = torch_velocity_fn(torch, gmm, sigma_min, "cuda", block_rows)
            xt = torch.as_tensor(x_host, device="cuda")
            tt = torch.as_tensor(t_host, device="cuda")
            t_torch = best_time(lambda: vel(xt, tt), args.repeat, torch.cuda.synchronize)
            u_torch = vel(xt[:n_cpu], tt[:n_cpu]).cpu().numpy()
            diff = max(diff, float(np.max(np.abs(u_torch - u_cpu)) / np.max(np.abs(u_cpu))))
            del xt, tt
        flops = field_flops_per_point(K, d) * n
        comp, unfused = field_bytes_per_point(K, d)
        print(f"{d:>3} {n:>9.0e} {n / t_cp:>12.3e} {n / t_np:>12.3e} {t_np / t_cp:>8.1f} "
              f"{n / t_torch:>12.3e} {t_torch / t_cp:>8.2f} {100 * flops / t_cp / args.peak_flops:>6.1f} "
              f"{100 * comp * n / t_cp / args.peak_bandwidth:>8.2f} "
              f"{100 * unfused * n / t_cp / args.peak_bandwidth:>11.1f} {diff:>12.2e}", flush=True)
        del x, t
        cp.get_default_memory_pool().free_all_blocks()
    print(f"(numpy measured on {args.cpu_n} points at d = 2 and {max(args.cpu_n // 16, 1000)} at d = 64, "
          "scaled to n; %FP64 of the FP64 peak; %BW of the memory bandwidth, for the compulsory traffic "
          "(x, t in, u out) and for an estimate of the unfused intermediates)")


def bench_train(args, cp, torch):
    from refflow.nn import MLP
    from refflow.train import train

    print("\n== CFM training, batch 65536, MLP 3x256 SiLU, float32, Adam ==")
    batch, steps, hidden = args.batch, args.steps, (256, 256, 256)
    gmm, path = rf.eight_gaussians(), rf.OTPath()
    model = MLP(2, hidden, activation="silu", dtype=np.float32)
    sync = cp.cuda.Device().synchronize
    train(model, gmm, path, steps=3, batch_size=batch, rng=0, backend="cupy")  # compile, warm pools
    sync()
    start = time.perf_counter()
    state = train(model, gmm, path, steps=steps, batch_size=batch, rng=0, backend="cupy")
    sync()
    rate_cp = steps / (time.perf_counter() - start)
    rate_torch = float("nan")
    if torch is not None:
        rate_torch = torch_train_rate(torch, gmm, batch, steps, hidden)
    flops_step = 3 * 2 * batch * sum(a * b for a, b in zip((3,) + hidden, hidden + (2,)))
    print(f"{'':10} {'steps/s':>9} {'TFLOP/s':>8}")
    print(f"{'refflow':10} {rate_cp:>9.1f} {rate_cp * flops_step / 1e12:>8.1f}   final loss {state.losses[-1]:.3f}")
    print(f"{'torch':10} {rate_torch:>9.1f} {rate_torch * flops_step / 1e12:>8.1f}")
    print(f"x torch (torch time / refflow time): {rate_cp / rate_torch:.2f}  (goal >= 0.8)")


def torch_train_rate(torch, gmm, batch, steps, hidden):
    nn = torch.nn
    dev = "cuda"
    torch.manual_seed(0)
    layers, fan_in = [], 3
    for h in hidden:
        layers += [nn.Linear(fan_in, h), nn.SiLU()]
        fan_in = h
    net = nn.Sequential(*layers, nn.Linear(fan_in, 2)).to(dev)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    means = torch.as_tensor(gmm.means, dtype=torch.float32, device=dev)
    std = torch.as_tensor(np.sqrt(gmm._core.eigvals), dtype=torch.float32, device=dev)
    weights = torch.as_tensor(gmm.weights, dtype=torch.float32, device=dev)

    def step():
        k = torch.multinomial(weights, batch, replacement=True)
        x_1 = means[k] + std[k] * torch.randn(batch, 2, device=dev)
        t = torch.rand(batch, 1, device=dev)
        x_0 = torch.randn(batch, 2, device=dev)
        x_t = (1 - t) * x_0 + t * x_1
        u = net(torch.cat([x_t, t], dim=1))
        loss = ((u - (x_1 - x_0)) ** 2).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()  # refflow reads its loss back every step too

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000_000, help="points for the field benchmark")
    parser.add_argument("--cpu-n", type=int, default=200_000, help="points for NumPy on the CPU at d = 2")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch", type=int, default=65536)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--peak-bandwidth", type=float, default=H200_BANDWIDTH)
    parser.add_argument("--peak-flops", type=float, default=H200_FP64)
    args = parser.parse_args()
    try:
        cp = B.get_namespace("cupy")
    except B.BackendUnavailableError as exc:
        print(f"no GPU: {exc}")
        print("nothing to measure on this machine; run benchmarks/gpu_check.sh where CuPy and a CUDA device exist")
        return 0
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    print(f"GPU: {name}, {props['totalGlobalMem'] / 2**30:.0f} GiB; CuPy {cp.__version__}; NumPy {np.__version__}")
    try:
        import torch

        if not torch.cuda.is_available():
            print(f"PyTorch {torch.__version__} has no CUDA device: torch columns are NaN")
            torch = None
        else:
            print(f"PyTorch {torch.__version__}")
    except ImportError:
        print("PyTorch not installed: torch columns are NaN")
        torch = None
    bench_field(args, cp, torch)
    bench_train(args, cp, torch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
