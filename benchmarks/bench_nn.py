"""Timings of the MLP kernels (refflow.nn) against plain NumPy and, when installed, PyTorch CPU.

What is timed, at MLP 3x256 SiLU, d = 2 (input [x, t], 3 columns), batch 256
and 4096, float64 and float32:

* ``fwd``      the velocity u_theta(t, x);
* ``fwd+vjp``  u and the gradient of <g, u> with respect to the parameters
               (the network part of one training step);
* ``div``      the exact divergence tr(du/dx).

Competitors, measured in the same run and interleaved round by round (the
machines are noisy; ratios mean more than absolute times):

* ``numpy``    the same MLP and the same algorithms (stacked tangents for the
               divergence) in plain NumPy, no Numba: ``@`` for the products,
               NumPy ufuncs for the elementwise work;
* ``torch``    ``torch.nn`` MLP on CPU, same dtype and thread count;
               divergence by d backward passes of autograd (the usual way).

Ratios are competitor time / refflow time (> 1: refflow is faster).
Run: ``python benchmarks/bench_nn.py [--quick] [--threads N] [--clock cpu]``;
``--threads`` sets the BLAS / OpenMP thread count of NumPy and torch alike (it
must be set before NumPy loads, hence the environment variables below);
``--clock cpu`` times this process's CPU time instead of the wall clock, which
other sessions' load disturbs far less (use it with ``--threads 1``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def _parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds, shorter timings")
    ap.add_argument("--threads", type=int, default=None,
                    help="BLAS/OpenMP threads for numpy and torch (default: the libraries' own)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall time (default), or this process's CPU time: steadier on a shared "
                         "machine, meaningful with --threads 1 only (spinning threads count)")
    return ap.parse_args(argv)


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None and ARGS.threads:
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from refflow.nn import MLP  # noqa: E402

try:
    import torch
except ImportError:  # torch is an optional dependency
    torch = None

try:
    from threadpoolctl import threadpool_info
except ImportError:
    threadpool_info = None


# ---------------------------------------------------------------------------
# the same network in plain NumPy
# ---------------------------------------------------------------------------

class NumpyMLP:
    """Plain-NumPy SiLU MLP with a hand-written backward pass (no Numba)."""

    def __init__(self, net):
        self.layers = [(np.array(W), np.array(b)) for W, b in net.layers]

    @staticmethod
    def _silu_d1(z):
        s = 1.0 / (1.0 + np.exp(-z))
        return z * s, s * (1.0 + z * (1.0 - s))

    def forward(self, z0):
        h = z0
        for W, b in self.layers[:-1]:
            z = h @ W
            z += b
            h = z / (1.0 + np.exp(-z))
        W, b = self.layers[-1]
        return h @ W + b

    def value_and_grad(self, z0, g):
        hs, Ds, h = [z0], [], z0
        for W, b in self.layers[:-1]:
            z = h @ W
            z += b
            h, D = self._silu_d1(z)
            hs.append(h)
            Ds.append(D)
        W, b = self.layers[-1]
        u = h @ W + b
        grads = [(hs[-1].T @ g, g.sum(0))]
        G = g @ W.T
        for l in range(len(Ds) - 1, -1, -1):
            G *= Ds[l]
            grads.append((hs[l].T @ G, G.sum(0)))
            if l > 0:
                G = G @ self.layers[l][0].T
        return u, grads[::-1]

    def divergence(self, z0, d):
        n = z0.shape[0]
        W1, b1 = self.layers[0]
        z = z0 @ W1 + b1
        h, D = self._silu_d1(z)
        S = np.concatenate([h[None], D[None] * W1[:d, None, :]], axis=0)  # (1+d, n, H)
        for W, b in self.layers[1:-1]:
            P = S @ W
            h, D = self._silu_d1(P[0] + b)
            S = np.concatenate([h[None], D[None] * P[1:]], axis=0)
        Wo = self.layers[-1][0]
        T = S[1:] @ Wo  # (d, n, d)
        return np.einsum("kik->i", T)


# ---------------------------------------------------------------------------
# torch
# ---------------------------------------------------------------------------

def torch_model(net, dtype):
    tdt = {np.float64: torch.float64, np.float32: torch.float32}[dtype]
    mods = []
    for i, (W, b) in enumerate(net.layers):
        lin = torch.nn.Linear(W.shape[0], W.shape[1], dtype=tdt)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(np.array(W.T)))
            lin.bias.copy_(torch.from_numpy(np.array(b)))
        mods.append(lin)
        if i < len(net.layers) - 1:
            mods.append(torch.nn.SiLU())
    return torch.nn.Sequential(*mods)


# ---------------------------------------------------------------------------

CLOCK = time.perf_counter


def timeit(fn, min_time):
    """Seconds per call: calls repeated until ``min_time`` has passed.

    Starts with a pause, so that threads a competitor left spinning (OpenMP,
    OpenBLAS) are idle again, and one untimed warm-up call.
    """
    time.sleep(0.2)
    fn()
    reps, start = 0, CLOCK()
    while True:
        fn()
        reps += 1
        elapsed = CLOCK() - start
        if elapsed >= min_time:
            return elapsed / reps


def bench_case(n, dtype, rounds, min_time, rng):
    d = 2
    mlp = MLP(d, (256, 256, 256), "silu", dtype=dtype)
    params = mlp.init_params(rng)
    net = mlp.unflatten(params)
    x = rng.standard_normal((n, d)).astype(dtype)
    t = rng.uniform(size=n)
    g = rng.standard_normal((n, d)).astype(dtype)
    z0 = np.concatenate([x, t[:, None]], axis=1).astype(dtype)
    ref = NumpyMLP(net)

    def rf_fwd():
        return mlp.apply(params, t, x)

    def rf_vjp():
        u, vjp = mlp.value_and_vjp(params, t, x)
        return vjp(g, wrt_x=False)[0]

    def rf_div():
        return mlp.divergence(params, t, x)

    cases = {
        "fwd": {"refflow": rf_fwd, "numpy": lambda: ref.forward(z0)},
        "fwd+vjp": {"refflow": rf_vjp, "numpy": lambda: ref.value_and_grad(z0, g)},
        "div": {"refflow": rf_div, "numpy": lambda: ref.divergence(z0, d)},
    }
    # same numbers before timing anything
    assert np.allclose(rf_fwd(), ref.forward(z0), rtol=1e-4, atol=1e-5)
    assert np.allclose(rf_div(), ref.divergence(z0, d), rtol=1e-3, atol=1e-4)
    if torch is not None:
        tm = torch_model(net, dtype)
        tz = torch.from_numpy(z0)
        tg = torch.from_numpy(g)

        def t_fwd():
            with torch.no_grad():
                return tm(tz)

        def t_vjp():
            tm.zero_grad(set_to_none=True)
            u = tm(tz)
            u.backward(tg)
            return u

        def t_div():
            xz = tz.clone().requires_grad_(True)
            u = tm(xz)
            div = 0.0
            for k in range(d):
                (gk,) = torch.autograd.grad(u[:, k].sum(), xz, retain_graph=k < d - 1)
                div = div + gk[:, k]
            return div

        with torch.no_grad():
            assert np.allclose(tm(tz).numpy(), rf_fwd(), rtol=1e-4, atol=1e-5)
        cases["fwd"]["torch"] = t_fwd
        cases["fwd+vjp"]["torch"] = t_vjp
        cases["div"]["torch"] = t_div

    results = {}
    for what, fns in cases.items():
        times = {k: [] for k in fns}
        for _ in range(rounds):
            for k, fn in fns.items():
                times[k].append(timeit(fn, min_time))
        results[what] = {k: float(np.median(v)) for k, v in times.items()}
    return results


def main(argv=None):
    global CLOCK
    args = ARGS if argv is None and ARGS is not None else _parse(argv)
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    rounds, min_time = (3, 0.1) if args.quick else (7, 0.3)
    if torch is not None:
        if args.threads:
            torch.set_num_threads(args.threads)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    else:
        print("torch not installed: comparing against plain NumPy only")
    if threadpool_info is not None:
        pools = ", ".join(f"{p['internal_api']}: {p['num_threads']}" for p in threadpool_info())
        print(f"thread pools: {pools}")
    print(f"numpy {np.__version__}; MLP 3x256 SiLU, d=2; median of {rounds} rounds; "
          f"{args.clock} clock; ratio = competitor time / refflow time")
    rng = np.random.default_rng(0)
    header = f"{'dtype':8s} {'batch':>6s} {'what':8s} {'refflow ms':>11s} {'numpy ms':>9s} {'x numpy':>8s}"
    if torch is not None:
        header += f" {'torch ms':>9s} {'x torch':>8s}"
    print(header)
    for dtype in (np.float64, np.float32):
        for n in (256, 4096):
            res = bench_case(n, dtype, rounds, min_time, rng)
            for what, r in res.items():
                line = (f"{np.dtype(dtype).name:8s} {n:6d} {what:8s} {1e3 * r['refflow']:11.3f} "
                        f"{1e3 * r['numpy']:9.3f} {r['numpy'] / r['refflow']:8.2f}")
                if "torch" in r:
                    line += f" {1e3 * r['torch']:9.3f} {r['torch'] / r['refflow']:8.2f}"
                print(line, flush=True)


if __name__ == "__main__":
    main()
