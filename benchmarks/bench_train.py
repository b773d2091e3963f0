"""Training steps per second: refflow against PyTorch CPU, same problem, same weights, same batches.

The problem (Algorithm 1, CFM on the OT path, eq 37): an MLP 3x256 SiLU
u_theta(t, x) with d = 2 and the input row [x, t]; x_1 from
``refflow.eight_gaussians()``, t ~ U(0, 1), x_0 ~ N(0, I);
x_t = (1 - t) x_0 + t x_1, target x_1 - x_0, loss mean_i |u(t_i, x_t,i) - target_i|^2;
Adam (lr 1e-3, betas 0.9/0.999, eps 1e-8, bias-corrected, the same on both sides).
Batch 256 and 4096, float64 and float32 (the same dtype on both sides).

What is timed (both sides in the same process, interleaved round by round;
the median of the rounds after a warm-up step; Numba compilation excluded and
reported once on its own):

* ``step``   one training step on a pre-drawn batch (x_0, x_1, t), the same
             batches for both sides, cycled: refflow
             ``refflow.train._loss_and_grad(model, path)`` + ``Adam.update``
             (path.sample, path.target, forward, VJP, Adam: what ``train``
             runs per step); torch: x_t and the target from the same float64
             arrays (``torch.from_numpy(...).to(dtype)``), forward, loss,
             ``backward``, ``torch.optim.Adam.step``;
* ``train``  the public loop ``refflow.train.train(...)`` with a fixed-batch
             sampler (x_1 fixed; t and x_0 drawn by ``train`` from its
             generator, its checks, ``float(loss)`` kept per step); torch: the
             same loop, t and x_0 drawn with ``torch.rand``/``torch.randn``,
             ``loss.item()`` checked finite and kept.  Sampling x_1 from the
             eight Gaussians is left out of both and timed on its own.

Goals: refflow / torch >= 1.5 at batch 256 and >= 1.0 at batch 4096.

Also: the parameters of both after k steps from the same start (a check of
the comparison itself: float64 agrees to ~1e-16 relative, asserted < 1e-10;
float32 to ~1e-7); the Numba kernels
against the same MLP in plain NumPy (``bench_nn.NumpyMLP``); Euler sampling of
1e4 points in 100 steps (``refflow.solvers.sample(..., method="euler")``
against a torch loop under ``torch.no_grad()``, same weights and x_0); and,
when a goal is missed (or with ``--profile``), a breakdown of the refflow step:
each part timed alone, torch's parts, minor page faults per step, the same
step loop in fresh processes with glibc's default and with raised malloc
thresholds (the share of page faults), and cProfile of ``train``.

On the 2-core machines shared with other sessions, two BLAS threads collapse
whenever another process holds a core (a product waits for its descheduled
second thread): ``--threads 1 --clock cpu`` gives the steadier numbers.

Run: ``python benchmarks/bench_train.py [--quick] [--threads N] [--clock cpu] [--profile]``.
``--threads`` sets the BLAS / OpenMP threads of NumPy and torch alike (default:
the BLAS's own count, and torch.set_num_threads to that); ``--clock cpu``
times process CPU time (steadier on a shared machine; use with ``--threads 1``).
Times are printed, never asserted on; the parameter and sample agreement is
asserted (it checks the benchmark, not the speed).
"""
from __future__ import annotations

import argparse
import cProfile
import math
import os
import pstats
import subprocess
import sys
import tempfile
import time

try:
    import resource  # Unix: page-fault counts for the breakdown
except ImportError:
    resource = None

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))

from _common import describe_blas, median_spread, set_thread_env  # noqa: E402


def _parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds, shorter timings, smaller sampling run")
    ap.add_argument("--threads", type=int, default=None,
                    help="BLAS/OpenMP threads for numpy and torch (default: the BLAS's own count)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall time (default) or this process's CPU time (meaningful with --threads 1)")
    ap.add_argument("--rounds", type=int, default=None, help="timing rounds per configuration")
    ap.add_argument("--profile", action="store_true", help="print the refflow step breakdown even if the goals are met")
    ap.add_argument("--no-profile", action="store_true", help="never print the breakdown")
    ap.add_argument("--cold-compile", action="store_true",
                    help="also time a Numba compilation from scratch (subprocess with an empty cache)")
    ap.add_argument("--probe", nargs=2, metavar=("DTYPE", "BATCH"), help=argparse.SUPPRESS)
    return ap.parse_args(argv)


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None:
    set_thread_env(ARGS.threads)

import numpy as np  # noqa: E402

import refflow  # noqa: E402
from refflow.nn import MLP  # noqa: E402
from refflow.nn import _kernels as K  # noqa: E402
from refflow.paths import OTPath  # noqa: E402
from refflow.solvers import sample  # noqa: E402
from refflow.train import Adam, _loss_and_grad, train  # noqa: E402

from bench_nn import NumpyMLP  # noqa: E402  (plain-NumPy reference, no Numba)

try:
    import torch
except ImportError:  # optional competitor
    torch = None
else:
    from bench_nn import torch_model  # noqa: E402

D = 2
HIDDEN = (256, 256, 256)
LR, BETAS, EPS = 1e-3, (0.9, 0.999), 1e-8
GOALS = {256: 1.5, 4096: 1.0}
CLOCK = time.perf_counter
PAUSE = 0.1  # before each timed block: lets threads a competitor left spinning go idle


def tdtype(dtype):
    return {np.dtype(np.float64): torch.float64, np.dtype(np.float32): torch.float32}[np.dtype(dtype)]


# ---------------------------------------------------------------------------
# the problem
# ---------------------------------------------------------------------------

def make_batches(n, count, rng):
    """``count`` batches ``(x_0, x_1, t)`` in float64, drawn in train()'s order (x_1, t, x_0)."""
    target = refflow.eight_gaussians()
    out = []
    for _ in range(count):
        x_1 = target.sample(n, rng)
        t = rng.random(n)
        x_0 = rng.standard_normal((n, D))
        out.append((x_0, x_1, t))
    return out


class RefflowStep:
    """What train() runs per step: _loss_and_grad(model, path) then Adam.update."""

    def __init__(self, mlp, params, path):
        self.lg = _loss_and_grad(mlp, path)
        self.params = params.copy()
        self.opt = Adam(lr=LR, beta1=BETAS[0], beta2=BETAS[1], eps=EPS)
        self.i = 0

    def __call__(self, batch):
        x_0, x_1, t = batch
        value, grad = self.lg(self.params, x_0, x_1, t, None)
        self.params = self.opt.update(self.params, grad)
        return value

    def steps(self, batches, k):
        for _ in range(k):
            self(batches[self.i % len(batches)])
            self.i += 1


class TorchStep:
    """The same step in torch: nn.Linear layers holding refflow's W_l.T and b_l, torch.optim.Adam."""

    def __init__(self, mlp, params):
        self.dt = tdtype(mlp.dtype)
        self.net = torch_model(mlp.unflatten(params), mlp.dtype.type)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=LR, betas=BETAS, eps=EPS)
        self.i = 0

    def step_tensors(self, X0, X1, T):
        T = T.unsqueeze(1)
        x_t = (1.0 - T) * X0 + T * X1          # OT path, sigma_min = 0 (eq 34)
        u = self.net(torch.cat([x_t, T], dim=1))  # refflow's input row [x, t]
        r = u - (X1 - X0)                      # eq 37 target
        loss = (r * r).sum(dim=1).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss

    def __call__(self, batch):
        x_0, x_1, t = batch
        dt = self.dt
        return self.step_tensors(torch.from_numpy(x_0).to(dt), torch.from_numpy(x_1).to(dt),
                                 torch.from_numpy(t).to(dt))

    def steps(self, batches, k):
        for _ in range(k):
            self(batches[self.i % len(batches)])
            self.i += 1

    def train_loop(self, x_1, k, gen):
        """The loop train() runs, in torch: draw t and x_0, step, check and keep the loss."""
        n, dt = x_1.shape[0], self.dt
        losses = []
        for _ in range(k):
            X1 = torch.from_numpy(x_1).to(dt)
            T = torch.rand(n, dtype=dt, generator=gen)
            X0 = torch.randn(n, D, dtype=dt, generator=gen)
            value = self.step_tensors(X0, X1, T).item()
            if not math.isfinite(value):
                raise FloatingPointError(f"loss became {value}")
            losses.append(value)
        return losses

    def flat(self):
        """torch's parameters in refflow's flat layout (W_l = weight.T row-major, then b_l)."""
        parts = []
        for mod in self.net:
            if isinstance(mod, torch.nn.Linear):
                parts += [mod.weight.detach().T.contiguous().reshape(-1), mod.bias.detach()]
        return torch.cat(parts).numpy()

    def flat_grad(self):
        parts = []
        for mod in self.net:
            if isinstance(mod, torch.nn.Linear):
                parts += [mod.weight.grad.T.contiguous().reshape(-1), mod.bias.grad]
        return torch.cat(parts).numpy()


# ---------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------

def timed_block(run, k):
    """Seconds per step of ``run(k)``, after a pause and one untimed warm-up step."""
    time.sleep(PAUSE)
    run(1)
    start = CLOCK()
    run(k)
    return (CLOCK() - start) / k


def interleaved(fns, k, rounds):
    """``{name: [seconds per step, one per round]}``, the functions taking turns each round."""
    times = {name: [] for name in fns}
    for r in range(rounds):
        order = list(fns) if r % 2 == 0 else list(fns)[::-1]  # alternate who goes first
        for name in order:
            times[name].append(timed_block(fns[name], k))
    return times


def fastest(fn, tries=5):
    """The fastest of a few single calls (to size the timed blocks; a burst of load inflates one call)."""
    best = math.inf
    for _ in range(tries):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def steps_for(seconds_per_step, budget):
    return int(min(200, max(3, round(budget / max(seconds_per_step, 1e-6)))))


def per_call(fn, budget=0.15, repeats=7, best=False):
    """Seconds per call of ``fn()``: median of ``repeats`` loops, or their minimum with ``best``
    (the breakdown's parts: a burst of load from another process then spoils one loop, not the row)."""
    fn()
    once = time.perf_counter()
    fn()
    once = time.perf_counter() - once
    k = max(1, int(budget / repeats / max(once, 1e-7)))
    out = []
    for _ in range(repeats):
        start = CLOCK()
        for _ in range(k):
            fn()
        out.append((CLOCK() - start) / k)
    return float(np.min(out) if best else np.median(out))


# ---------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------

def compile_report(cold):
    """First calls of the kernels (Numba cache load or compilation), once per dtype."""
    dispatchers = list(vars(K.KERNELS["silu"]).values()) + [K.dact_colsum]
    lines = []
    for dtype in (np.float64, np.float32):
        mlp = MLP(D, HIDDEN, "silu", dtype=dtype)
        p = mlp.init_params(0)
        x = np.zeros((4, D))
        start = time.perf_counter()
        u, vjp = mlp.value_and_vjp(p, 0.5, x)
        vjp(u, wrt_x=False)
        mlp.apply(p, 0.5, x)
        sample(mlp.field(p), 4, D, 0, method="euler", n_steps=1)
        lines.append(f"{np.dtype(dtype).name} {time.perf_counter() - start:.2f} s")
    hits = sum(sum(dsp.stats.cache_hits.values()) for dsp in dispatchers)
    misses = sum(sum(dsp.stats.cache_misses.values()) for dsp in dispatchers)
    print(f"Numba first calls (excluded from all timings): {', '.join(lines)} "
          f"[cache hits {hits}, misses {misses}: {'loaded from the on-disk cache' if not misses else 'compiled'}]")
    if cold:
        code = ("import time, numpy as np; from refflow.nn import MLP; s = time.perf_counter()\n"
                "for dt in (np.float64, np.float32):\n"
                "    m = MLP(2, (256, 256, 256), 'silu', dtype=dt); p = m.init_params(0)\n"
                "    u, vjp = m.value_and_vjp(p, 0.5, np.zeros((4, 2))); vjp(u); m.apply(p, 0.5, np.zeros((4, 2)))\n"
                "print(f'{time.perf_counter() - s:.2f}')")
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, NUMBA_CACHE_DIR=cache)
            start = time.perf_counter()
            res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
            total = time.perf_counter() - start
        if res.returncode == 0:
            print(f"Numba compilation from scratch (empty cache, both dtypes, forward + VJP kernels): "
                  f"{res.stdout.strip()} s (process with imports: {total:.1f} s)")
        else:
            print(f"cold compile run failed: {res.stderr.strip().splitlines()[-1:]}")


def agreement(dtype, n, k, seed):
    """Parameters after k steps from the same start on the same batches; prints and returns the discrepancy."""
    mlp = MLP(D, HIDDEN, "silu", dtype=dtype)
    p0 = mlp.init_params(seed)
    batches = make_batches(n, k, np.random.default_rng(seed + 1))
    rf, th = RefflowStep(mlp, p0, OTPath()), TorchStep(mlp, p0)
    assert np.array_equal(th.flat(), p0), "torch did not receive refflow's weights"
    # the first gradient on its own
    _, g_rf = rf.lg(p0, *batches[0][:2], batches[0][2], None)
    loss_t = th(batches[0]).item()
    g_th = th.flat_grad()
    th = TorchStep(mlp, p0)  # start again (the call above took a step)
    grad_rel = float(np.linalg.norm(g_rf.astype(np.float64) - g_th) / np.linalg.norm(g_th))
    losses_rf, losses_th = [], []
    for b in batches:
        losses_rf.append(float(rf(b)))
        losses_th.append(th(b).item())
    p_rf, p_th = rf.params.astype(np.float64), th.flat().astype(np.float64)
    moved = np.linalg.norm(p_th - p0.astype(np.float64))
    diff = np.linalg.norm(p_rf - p_th)
    rel_p = float(diff / np.linalg.norm(p_th))
    rel_move = float(diff / moved)
    max_abs = float(np.max(np.abs(p_rf - p_th)))
    loss_rel = float(np.max(np.abs(np.subtract(losses_rf, losses_th)) / np.abs(losses_th)))
    print(f"  {np.dtype(dtype).name:8s} batch {n:5d}, {k} steps: |dp|/|p| {rel_p:.1e}, |dp|/|p_k - p_0| "
          f"{rel_move:.1e}, max|dp| {max_abs:.1e}; first gradient {grad_rel:.1e}; losses {loss_rel:.1e} "
          f"(loss_0 {losses_rf[0]:.4f} vs {float(loss_t):.4f})")
    return rel_p, grad_rel


def bench_training(dtype, n, rounds, budget, seed):
    """steps/s of both sides, both rows ('step', 'train'); returns the per-round times."""
    mlp = MLP(D, HIDDEN, "silu", dtype=dtype)
    p0 = mlp.init_params(seed)
    path = OTPath()
    batches = make_batches(n, 8, np.random.default_rng(seed + 1))
    rf = RefflowStep(mlp, p0, path)
    fns = {"refflow step": lambda k: rf.steps(batches, k)}
    fixed_x1 = batches[0][1]

    def fixed_sampler(m, rng):
        return fixed_x1

    train_rng = np.random.default_rng(seed + 2)
    fns["refflow train"] = lambda k: train(mlp, fixed_sampler, path, steps=k, batch_size=n, lr=LR,
                                           rng=train_rng, params=p0)
    if torch is not None:
        th = TorchStep(mlp, p0)
        th_loop = TorchStep(mlp, p0)
        gen = torch.Generator().manual_seed(seed)
        fns["torch step"] = lambda k: th.steps(batches, k)
        fns["torch train"] = lambda k: th_loop.train_loop(fixed_x1, k, gen)
    # warm-up and the number of steps per timed block (from refflow's step)
    for fn in fns.values():
        fn(2)
    k = steps_for(fastest(lambda: rf.steps(batches, 1)), budget)
    times = interleaved(fns, k, rounds)
    return times, k


def bench_kernels(dtype, n, rounds, budget, seed):
    """fwd and fwd+VJP: refflow (Numba kernels + BLAS) vs bench_nn.NumpyMLP (BLAS + NumPy ufuncs)."""
    rng = np.random.default_rng(seed)
    mlp = MLP(D, HIDDEN, "silu", dtype=dtype)
    params = mlp.init_params(rng)
    ref = NumpyMLP(mlp.unflatten(params))
    x = rng.standard_normal((n, D)).astype(dtype)
    t = rng.uniform(size=n)
    g = rng.standard_normal((n, D)).astype(dtype)
    z0 = np.concatenate([x, t[:, None]], axis=1).astype(dtype)
    # same numbers first
    u, vjp = mlp.value_and_vjp(params, t, x)
    grad = vjp(g, wrt_x=False)[0]
    u_np, grads_np = ref.value_and_grad(z0, g)
    tol = dict(rtol=1e-9, atol=1e-11) if dtype == np.float64 else dict(rtol=2e-3, atol=2e-4)
    assert np.allclose(u, u_np, **tol)
    assert np.allclose(grad, mlp.flatten(grads_np), **tol)

    def loop(fn):
        def run(k):
            for _ in range(k):
                fn()
        return run

    def rf_vjp():
        _, vjp = mlp.value_and_vjp(params, t, x)
        return vjp(g, wrt_x=False)[0]

    out = {}
    for what, fns in (("fwd", {"refflow": loop(lambda: mlp.apply(params, t, x)),
                               "numpy": loop(lambda: ref.forward(z0))}),
                      ("fwd+vjp", {"refflow": loop(rf_vjp),
                                   "numpy": loop(lambda: ref.value_and_grad(z0, g))})):
        k = steps_for(fastest(lambda: fns["refflow"](1)), budget)
        out[what] = interleaved(fns, k, rounds)
    return out


def bench_euler(dtype, n, steps, rounds, seed):
    mlp = MLP(D, HIDDEN, "silu", dtype=dtype)
    params = mlp.init_params(seed)
    x_0 = np.random.default_rng(seed + 1).standard_normal((n, D))  # what sample() draws from that seed
    box = {}

    def rf(k):
        for _ in range(k):
            box["rf"] = sample(mlp.field(params), n, D, seed + 1, method="euler", n_steps=steps)

    fns = {"refflow": rf}
    if torch is not None:
        net = torch_model(mlp.unflatten(params), mlp.dtype.type)
        dt = tdtype(dtype)

        def th(k):
            for _ in range(k):
                with torch.no_grad():
                    xs = np.random.default_rng(seed + 1).standard_normal((n, D))
                    x = torch.from_numpy(xs).to(dt)
                    tcol = torch.empty(n, 1, dtype=dt)
                    delta = 1.0 / steps
                    for j in range(steps):
                        tcol.fill_(j * delta)
                        x = x + delta * net(torch.cat([x, tcol], dim=1))
                box["torch"] = x.numpy()

        fns["torch"] = th
    times = {name: [] for name in fns}
    for r in range(rounds):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            time.sleep(PAUSE)
            start = CLOCK()
            fns[name](1)
            times[name].append(CLOCK() - start)
    assert np.array_equal(box["rf"].x0, x_0)
    diff = None
    if "torch" in box:
        diff = float(np.max(np.abs(box["rf"].x - box["torch"])))
    return times, diff


def breakdown(dtype, n, seed, profile_steps):
    """Where the refflow step's time goes (each part timed on its own, the best of 7 loops)."""
    mlp = MLP(D, HIDDEN, "silu", dtype=dtype)
    params = mlp.init_params(seed)
    path = OTPath()
    x_0, x_1, t = make_batches(n, 1, np.random.default_rng(seed + 1))[0]
    lg = _loss_and_grad(mlp, path)
    _, grad = lg(params, x_0, x_1, t, None)
    opt = Adam(lr=LR)
    opt.update(params, grad)
    x_t = path.sample(x_0, x_1, t)
    u, vjp = mlp.value_and_vjp(params, t, x_t)
    residual = u - path.target(x_0, x_1, t)
    g = residual * (2.0 / n)
    net = mlp.unflatten(params)
    dt = mlp.dtype
    kern = mlp._kern

    # the products alone (preallocated outputs): the BLAS floor of a step
    z0 = np.concatenate([x_t, t[:, None]], axis=1).astype(dt)
    hs = [z0] + [np.empty((n, H), dt) for H in HIDDEN]
    Ds = [np.empty((n, H), dt) for H in HIDDEN]
    for l, (W, b) in enumerate(net.layers[:-1]):
        np.matmul(hs[l], W, out=hs[l + 1])
        kern.bias_act_d1(hs[l + 1], b, Ds[l])
    gq = g.astype(dt)
    gW = [np.empty_like(W) for W, _ in net.layers]
    Gs = [np.empty((n, H), dt) for H in HIDDEN]
    uo = np.empty((n, D), dt)

    def products_fwd():
        for l, (W, _) in enumerate(net.layers[:-1]):
            np.matmul(hs[l], W, out=Ps[l])
        np.matmul(hs[-1], net.layers[-1][0], out=uo)

    Ps = [np.empty((n, H), dt) for H in HIDDEN]

    def products_bwd():
        np.matmul(hs[-1].T, gq, out=gW[-1])
        np.matmul(gq, net.layers[-1][0].T, out=Gs[-1])
        for l in range(len(HIDDEN) - 1, -1, -1):
            np.matmul(hs[l].T, Gs[l], out=gW[l])
            if l > 0:
                np.matmul(Gs[l], net.layers[l][0].T, out=Gs[l - 1])

    P_src = [h.copy() for h in hs[1:]]
    P_work = [np.empty_like(h) for h in hs[1:]]

    def copies():
        for src, dst in zip(P_src, P_work):
            np.copyto(dst, src)

    def kernels_fwd():  # bias + SiLU + SiLU' in one pass, per hidden layer (on fresh copies)
        copies()
        for l, (_, b) in enumerate(net.layers[:-1]):
            kern.bias_act_d1(P_work[l], b, Ds[l])

    gbs = [np.empty(H, dt) for H in HIDDEN]

    def kernels_bwd():  # G * D and the bias-gradient column sum, per hidden layer
        copies()
        for l in range(len(HIDDEN)):
            K.dact_colsum(P_work[l], Ds[l], gbs[l])

    parts = [
        ("whole step: _loss_and_grad + Adam.update", lambda: opt.update(params, lg(params, x_0, x_1, t, None)[1])),
        ("path.sample (x_t, with checks)", lambda: path.sample(x_0, x_1, t)),
        ("path.target (with checks)", lambda: path.target(x_0, x_1, t)),
        ("  both, unchecked arithmetic", lambda: ((1.0 - t)[:, None] * x_0 + t[:, None] * x_1, x_1 - x_0)),
        ("forward: value_and_vjp", lambda: mlp.value_and_vjp(params, t, x_t)),
        ("  input checks (_check_params + _check_x)", lambda: (mlp._check_params(params), mlp._check_x(x_t))),
        ("  products alone, forward (4 matmuls)", products_fwd),
        ("  fused kernels, forward (bias_act_d1 x3)", kernels_fwd),
        ("backward: vjp(g) as train calls it (wrt_x too)", lambda: vjp(g)),
        ("  vjp(g, wrt_x=False)", lambda: vjp(g, wrt_x=False)),
        ("  products alone, backward (7 matmuls)", products_bwd),
        ("  fused kernels, backward (dact_colsum x3)", kernels_bwd),
        ("loss value + residual + cotangent", lambda: (
            np.mean(np.sum((u - x_1 + x_0) ** 2, axis=1)), (u - (x_1 - x_0)) * (2.0 / n))),
        ("Adam.update", lambda: opt.update(params, grad)),
        ("  (copies subtracted from the kernel rows)", copies),
    ]
    # Adam without temporaries (preallocated buffer, in-place ufuncs): what a fused update could cost
    m, v, buf = opt.m.copy(), opt.v.copy(), np.empty_like(params)
    p_work = params.copy()
    b1, b2 = opt.beta1, opt.beta2

    def adam_in_place():
        np.multiply(m, b1, out=m)
        np.multiply(grad, 1.0 - b1, out=buf)
        np.add(m, buf, out=m)
        np.multiply(v, b2, out=v)
        np.multiply(grad, grad, out=buf)
        np.multiply(buf, 1.0 - b2, out=buf)
        np.add(v, buf, out=v)
        np.multiply(v, 1.0 / (1.0 - b2 ** 2), out=buf)
        np.sqrt(buf, out=buf)
        np.add(buf, opt.eps, out=buf)
        np.divide(m, buf, out=buf)
        np.multiply(buf, opt.lr / (1.0 - b1 ** 2), out=buf)
        np.subtract(p_work, buf, out=p_work)

    parts.insert(-1, ("  reference: Adam in place, no temporaries (numpy out=)", adam_in_place))
    if torch is not None:
        th = TorchStep(mlp, params)
        tx0, tx1, tt = (torch.from_numpy(a).to(th.dt) for a in (x_0, x_1, t))

        def th_fwd():
            T = tt.unsqueeze(1)
            x_t = (1.0 - T) * tx0 + T * tx1
            r = th.net(torch.cat([x_t, T], dim=1)) - (tx1 - tx0)
            return (r * r).sum(dim=1).mean()

        def th_fwd_bwd():
            th.opt.zero_grad(set_to_none=True)
            th_fwd().backward()

        th_fwd_bwd()
        parts += [("torch, whole step", lambda: th(batches_one)),
                  ("torch forward + loss (with graph)", th_fwd),
                  ("torch forward + loss + backward", th_fwd_bwd),
                  ("torch Adam.step (foreach)", th.opt.step)]
        batches_one = (x_0, x_1, t)
    res = {name: per_call(fn, best=True) for name, fn in parts}
    copy_t = res.pop("  (copies subtracted from the kernel rows)")
    res["  fused kernels, forward (bias_act_d1 x3)"] -= copy_t
    res["  fused kernels, backward (dact_colsum x3)"] -= copy_t
    whole = res["whole step: _loss_and_grad + Adam.update"]
    flops = 2 * n * sum(a * b for a, b in zip((D + 1, *HIDDEN), (*HIDDEN, D)))  # one forward
    flops_step = flops + 2 * flops - 2 * n * (D + 1) * HIDDEN[0]  # + weight grads + input grads (not layer 1)
    prod = res["  products alone, forward (4 matmuls)"] + res["  products alone, backward (7 matmuls)"]
    print(f"\n  {np.dtype(dtype).name} batch {n}: {1e3 * whole:.3f} ms per step; products "
          f"{flops_step / 1e6:.0f} MFLOP at {flops_step / prod / 1e9:.1f} GFLOP/s alone")
    top = sum(sec for name, sec in res.items() if not name.startswith((" ", "whole", "torch")))
    res_rf = [(k, v) for k, v in res.items() if not k.startswith("torch")]
    res_th = [(k, v) for k, v in res.items() if k.startswith("torch")]
    rows = res_rf + [("sum of the unindented parts", top),
                     ("  unaccounted (glue; caches warm when timed alone)", whole - top)] + res_th
    for name, sec in rows:
        print(f"    {name:56s} {1e3 * sec:8.3f} ms {100 * sec / whole:6.1f}%")
    # page faults: freshly allocated large arrays touched for the first time (glibc gives freed
    # blocks above its trim threshold back to the system, so the next step faults them in again)
    if resource is not None:
        k = 30 if n == 256 else 5
        rf = RefflowStep(mlp, params, path)
        batches = [(x_0, x_1, t)]
        rf.steps(batches, 3)
        f0 = _faults()
        rf.steps(batches, k)
        f_step = (_faults() - f0) / k
        f0 = _faults()
        for _ in range(k):
            rf.params = rf.opt.update(rf.params, grad)
        f_adam = (_faults() - f0) / k
        print(f"    minor page faults per step in this process: {f_step:.0f} ({f_step * 4 / 1024:.1f} MiB "
              f"first-touched), Adam.update alone {f_adam:.0f} (depends on the heap's history: "
              f"glibc's trim threshold grows after large frees)")
        probe = {}
        for label, env in (("glibc defaults", {}),
                           ("MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ raised", _NO_TRIM_ENV)):
            probe[label] = _run_probe(dtype, n, env)
        if all(probe.values()):
            (a_ms, a_f), (b_ms, b_f) = probe.values()
            print(f"    what-if, the same step loop in a fresh process: glibc defaults {a_ms:.3f} ms "
                  f"({a_f:.0f} faults/step); malloc thresholds raised {b_ms:.3f} ms ({b_f:.0f} faults/step): "
                  f"{100 * (a_ms - b_ms) / a_ms:+.1f}%"
                  + (" (the page faults' share)" if a_f > b_f else " (no faults either way: noise)"))
    # cProfile of the public loop: which Python functions carry the time
    fixed = lambda m, rng: x_1  # noqa: E731
    prof = cProfile.Profile()
    prof.enable()
    train(mlp, fixed, path, steps=profile_steps, batch_size=n, rng=seed, params=params)
    prof.disable()
    st = pstats.Stats(prof)
    rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:10]
    total = sum(v[2] for v in st.stats.values())
    print(f"    cProfile of train(..., steps={profile_steps}), top by own time "
          f"(total {1e3 * total / profile_steps:.2f} ms/step under the profiler):")
    for (file, line, func), (cc, nc, tt, ct, _) in rows:
        where = f"{os.path.relpath(file, os.path.dirname(HERE)) if file.startswith('/') else file}:{line}({func})"
        print(f"      {1e3 * tt / profile_steps:8.3f} ms/step {nc // profile_steps:4d} calls/step  {where[-70:]}")


_NO_TRIM_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 31)}


def _faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def probe_main(dtype_name, n):
    """``--probe``: the refflow step loop alone; prints 'ms_per_step faults_per_step' (best of 5)."""
    dtype, n = np.dtype(dtype_name), int(n)
    mlp = MLP(D, HIDDEN, "silu", dtype=dtype)
    rf = RefflowStep(mlp, mlp.init_params(13), OTPath())
    batches = make_batches(n, 8, np.random.default_rng(14))
    rf.steps(batches, 5)
    k = 40 if n <= 256 else 4
    best = (math.inf, 0.0)
    for _ in range(5):
        f0, start = _faults(), CLOCK()
        rf.steps(batches, k)
        best = min(best, ((CLOCK() - start) / k, (_faults() - f0) / k))
    print(f"{1e3 * best[0]:.6f} {best[1]:.1f}")


def _run_probe(dtype, n, extra_env, tries=3):
    """Best ``(ms, faults)`` of a few ``--probe`` subprocesses (same threads and clock as this run)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--probe", np.dtype(dtype).name, str(n)]
    if ARGS is not None and ARGS.threads:
        cmd += ["--threads", str(ARGS.threads)]
    if CLOCK is time.process_time:
        cmd += ["--clock", "cpu"]
    best = None
    for _ in range(tries):
        res = subprocess.run(cmd, env={**os.environ, **extra_env}, capture_output=True, text=True)
        if res.returncode != 0:
            return None
        ms, faults = map(float, res.stdout.split()[-2:])
        best = (ms, faults) if best is None or ms < best[0] else best
    return best


# ---------------------------------------------------------------------------

def fmt_rate(times):
    """steps/s: median and [min - max] from seconds per step."""
    med, lo, hi = median_spread(times)
    return f"{1 / med:8.1f} [{1 / hi:7.1f}-{1 / lo:7.1f}]"


def main(argv=None):
    global CLOCK
    args = ARGS if argv is None and ARGS is not None else _parse(argv)
    if argv is not None:
        set_thread_env(args.threads)  # only effective if numpy was not yet loaded
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.probe:
        return probe_main(*args.probe)
    rounds = args.rounds or (3 if args.quick else 7)
    budget = 0.15 if args.quick else 0.4
    blas_line, blas = describe_blas()
    print(blas_line)
    if torch is not None:
        torch.set_num_threads(args.threads or blas["threads"] or os.cpu_count())
        print(f"torch {torch.__version__}: {torch.get_num_threads()} intra-op threads "
              f"(= refflow's BLAS threads {blas['threads']}); cpus {os.cpu_count()}")
    else:
        print("torch not installed (pip install torch==2.13.0): timing refflow alone, no ratios")
    print(f"numpy {np.__version__}; MLP 3x256 SiLU, d=2, input [x, t]; Adam lr {LR}; OT path; "
          f"{args.clock} clock; median of {rounds} interleaved rounds [min-max]")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    if load > 0.5:
        print(f"load average {load:.2f} on {os.cpu_count()} cpus before starting: other processes share the "
              "machine, expect noisy times (the per-round ratios pair runs made back to back)")
    compile_report(args.cold_compile)

    configs = [(dt, n) for dt in (np.float64, np.float32) for n in (256, 4096)]

    # ---- the comparison is only meaningful if both sides compute the same thing
    if torch is not None:
        k = 5 if args.quick else 20
        print(f"\nParameter agreement after {k} Adam steps (same start, same batches):")
        for dt, n in configs:
            rel_p, grad_rel = agreement(dt, n, k, seed=3)
            if dt == np.float64:
                assert rel_p < 1e-10 and grad_rel < 1e-10, "float64 sides disagree: the comparison is broken"

    # ---- training steps
    print("\nTraining steps/s (median [min-max] over rounds); ratio = refflow steps/s / torch steps/s, "
          "the median of the per-round ratios [min-max] (each round runs both back to back); 'step' = _loss_and_grad + Adam.update on pre-drawn batches, "
          "'train' = train() with a fixed x_1 (draws t, x_0)")
    head = f"{'dtype':8s} {'batch':>5s} {'row':5s} {'k':>4s} {'refflow steps/s':>24s}"
    if torch is not None:
        head += f" {'torch steps/s':>24s} {'ratio':>6s} {'per round':>13s}  goal"
    print(head)
    missed = []
    target = refflow.eight_gaussians()
    sample_cost = {}
    for dt, n in configs:
        times, k = bench_training(dt, n, rounds, budget, seed=11)
        for row in ("step", "train"):
            rf_t = times[f"refflow {row}"]
            line = f"{np.dtype(dt).name:8s} {n:5d} {row:5s} {k:4d} {fmt_rate(rf_t):>24s}"
            if torch is not None:
                th_t = times[f"torch {row}"]
                per = np.asarray(th_t) / np.asarray(rf_t)  # paired: the two ran back to back
                ratio = float(np.median(per))
                ok = ratio >= GOALS[n]
                if not ok:
                    missed.append((dt, n, row, ratio))
                line += (f" {fmt_rate(th_t):>24s} {ratio:6.2f} [{per.min():5.2f}-{per.max():5.2f}]"
                         f"  >= {GOALS[n]}: {'met' if ok else 'MISSED'}")
            print(line, flush=True)
        rng = np.random.default_rng(0)
        sample_cost[n] = per_call(lambda: target.sample(n, rng))
        sample_cost[(dt, n)] = np.median(times["refflow train"])
    print("x_1 sampling (eight_gaussians().sample), not in the rows above: "
          + ", ".join(f"batch {n}: {1e3 * sample_cost[n]:.3f} ms/step "
                      f"({100 * sample_cost[n] / sample_cost[(np.float64, n)]:.1f}% of a float64 train step)"
                      for n in (256, 4096)))

    # ---- Numba kernels vs plain NumPy
    print("\nNumba kernels (refflow.nn, BLAS products + fused elementwise) vs the same MLP in plain NumPy "
          "(bench_nn.NumpyMLP): ms per call (median), ratio = numpy / refflow per round, median [min-max] "
          "(> 1: kernels win)")
    print(f"{'dtype':8s} {'batch':>5s} {'what':8s} {'refflow ms':>10s} {'numpy ms':>9s} {'ratio':>6s} {'per round':>13s}")
    for dt, n in configs:
        for what, tm in bench_kernels(dt, n, rounds, budget / 2, seed=5).items():
            r, p = np.median(tm["refflow"]), np.median(tm["numpy"])
            per = np.asarray(tm["numpy"]) / np.asarray(tm["refflow"])
            ratio = float(np.median(per))  # median of the paired per-round ratios
            print(f"{np.dtype(dt).name:8s} {n:5d} {what:8s} {1e3 * r:10.3f} {1e3 * p:9.3f} {ratio:6.2f} "
                  f"[{per.min():5.2f}-{per.max():5.2f}]{'' if ratio > 1 else '  <- kernels lose'}", flush=True)

    # ---- Euler sampling
    n_pts, n_steps = 10_000, (20 if args.quick else 100)
    e_rounds = 2 if args.quick else 3
    print(f"\nEuler sampling, {n_pts} points, {n_steps} steps: refflow.solvers.sample(mlp.field(p), "
          f"method='euler') vs a torch loop under no_grad (same weights, same x_0); seconds, "
          f"median of {e_rounds} [min-max]")
    for dt in ((np.float64,) if args.quick else (np.float64, np.float32)):
        times, diff = bench_euler(dt, n_pts, n_steps, e_rounds, seed=7)
        med, lo, hi = median_spread(times["refflow"])
        line = f"  {np.dtype(dt).name:8s} refflow {med:7.3f} s [{lo:.3f}-{hi:.3f}]"
        if "torch" in times:
            tmed, tlo, thi = median_spread(times["torch"])
            per = np.asarray(times["torch"]) / np.asarray(times["refflow"])
            line += (f"   torch {tmed:7.3f} s [{tlo:.3f}-{thi:.3f}]   ratio torch/refflow {np.median(per):5.2f} "
                     f"[{per.min():.2f}-{per.max():.2f}]   "
                     f"max|x_1 difference| {diff:.1e}")
            if dt == np.float64:
                assert diff < 1e-8, "Euler samples disagree: the comparison is broken"
        if dt == np.float32:
            line += "  (refflow's solver keeps the state in float64)"
        print(line, flush=True)

    # ---- where the time goes
    if args.no_profile or not (missed or args.profile):
        if torch is not None and not missed:
            print("\nAll goals met (no breakdown; --profile prints it anyway).")
        return
    if missed:
        print("\nGoals missed: " + ", ".join(f"{np.dtype(dt).name} batch {n} {row} {r:.2f}"
                                            for dt, n, row, r in missed))
    print("Breakdown of the refflow step (each part timed alone, best of 7 loops; % of the whole refflow "
          "step; indented rows are parts of the rows above; torch's parts for comparison):")
    which = sorted({(dt, n) for dt, n, _, _ in missed}, key=lambda c: (c[0] != np.float64, c[1])) \
        if (missed and not args.profile) else configs
    for dt, n in which:
        breakdown(dt, n, seed=13, profile_steps=30 if n == 256 else 5)


if __name__ == "__main__":
    main()
