"""Benchmark of the streamed empirical field (refflow.empirical).

For each (N, d) a child process writes N points in d dimensions to a
memory-mapped .npy, evaluates the full field (log p, u, score, divergence) at
n query points through :func:`refflow.empirical.evaluate`, and in the same run
times the two plain matrix products of the same shapes per block
((n, d+2) @ (d+2, B) and (n, B) @ (B, d+2), repeated over the N/B blocks).
It prints

* data points per second (N / time, for n queries), and query-data pairs per second;
* ``matmul fraction``: the plain products' time over the field's time, i.e. the
  field's rate as a fraction of a plain matmul's rate of the same shapes
  (goal >= 0.7 at d >= 256);
* ``peak MiB``: the child's peak resident set (ru_maxrss), which should stay flat in N;
* the Dask scaling: the same evaluation sharded over a LocalCluster of 1 and of 2
  workers (threads, one BLAS thread each): the speed-up of 2 workers over 1.

BLAS runs one thread (``--threads``, default 1) so that the Dask workers' scaling
means something.  The machines here are shared: run it once, read it as measured
under load.

    python benchmarks/bench_empirical.py --quick
    python benchmarks/bench_empirical.py            # N up to 1e6, d up to 3,072 (GBs of disk)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import set_thread_env  # noqa: E402

_CHILD = r"""
import json, os, resource, sys, time
import numpy as np
from refflow import empirical
from refflow.paths import OTPath

N, d, n, folder, mode, workers = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], int(sys.argv[6])
file = os.path.join(folder, f"data-{N}-{d}.npy")
if not os.path.exists(file):
    mm = np.lib.format.open_memmap(file + ".tmp.npy", mode="w+", dtype=np.float64, shape=(N, d))
    rng = np.random.default_rng(0)
    for lo in range(0, N, 16384):
        mm[lo:lo + 16384] = rng.standard_normal((min(16384, N - lo), d))
    mm.flush(); del mm
    os.replace(file + ".tmp.npy", file)
if mode == "make":  # written by a child of its own, so the pages it dirtied are not counted below
    sys.exit(0)
data = np.load(file, mmap_mode="r")
x = np.random.default_rng(1).standard_normal((n, d))
path = OTPath(0.01)
base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = {"N": N, "d": d, "n": n}
if mode == "field":
    empirical.evaluate(data[:2048], x, 0.5, path)  # warm up (BLAS, page cache of the head)
    t0 = time.perf_counter()
    empirical.evaluate(data, x, 0.5, path)
    out["seconds"] = time.perf_counter() - t0
    B = empirical._block_rows(np, n, None, d)
    rng = np.random.default_rng(2)
    Q = rng.standard_normal((n, d + 2)); A = rng.standard_normal((min(B, N), d + 2))
    reps = -(-N // A.shape[0])
    t0 = time.perf_counter()
    for _ in range(reps):
        L = Q @ A.T
        L @ A
    out["matmul_seconds"] = (time.perf_counter() - t0) * N / (reps * A.shape[0])
    out["block_rows"] = B
else:
    from dask.distributed import Client, LocalCluster
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=False, dashboard_address=":0")
    client = Client(cluster)
    empirical.evaluate(file, x, 0.5, path, client=client)  # warm up
    t0 = time.perf_counter()
    empirical.evaluate(file, x, 0.5, path, client=client)
    out["seconds"] = time.perf_counter() - t0
    client.close(); cluster.close()
out["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
out["peak_before_mib"] = base_kb / 1024.0
print("RESULT", json.dumps(out))
"""


def _child(N, d, n, folder, mode="field", workers=1):
    if mode != "make":
        _child(N, d, n, folder, "make")
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(N), str(d), str(n), folder, mode, str(workers)],
                          capture_output=True, text=True)
    if mode == "make":
        if proc.returncode:
            raise RuntimeError(f"writing the data failed (N={N}, d={d}): {proc.stderr[-2000:]}")
        return None
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"child failed (N={N}, d={d}, {mode}): {proc.stderr[-2000:]}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a minute or two)")
    ap.add_argument("--threads", type=int, default=1, help="BLAS threads of the children")
    ap.add_argument("-n", type=int, default=None, help="query points (default 256 quick, 1024 full)")
    ap.add_argument("--folder", default=None, help="where the data files go (default: a temporary folder)")
    args = ap.parse_args(argv)
    set_thread_env(args.threads)
    if args.quick:
        n = args.n or 256
        grid = [(20_000, 64), (60_000, 64), (200_000, 64), (10_000, 256), (40_000, 256), (10_000, 1024)]
        dask_case = (40_000, 256)
    else:
        n = args.n or 1024
        grid = [(20_000, 64), (100_000, 64), (1_000_000, 64), (10_000, 256), (100_000, 256), (1_000_000, 256),
                (10_000, 1024), (10_000, 3072), (50_000, 3072)]
        dask_case = (100_000, 256)
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        print(f"n = {n} queries, full field (log p, u, score, divergence), OT path, t = 0.5, "
              f"BLAS threads {args.threads}")
        print(f"{'N':>9} {'d':>5} {'seconds':>8} {'points/s':>10} {'pairs/s':>9} {'matmul frac':>11} "
              f"{'peak MiB':>9}")
        rows = []
        for N, d in grid:
            r = _child(N, d, n, folder)
            r["fraction"] = r["matmul_seconds"] / r["seconds"]
            rows.append(r)
            print(f"{N:>9} {d:>5} {r['seconds']:8.3f} {N / r['seconds']:10.3g} {N * n / r['seconds']:9.3g} "
                  f"{r['fraction']:11.2f} {r['peak_mib']:9.1f}")
        by_d = {}
        for r in rows:
            by_d.setdefault(r["d"], []).append(r)
        for d, rs in sorted(by_d.items()):
            if len(rs) > 1:
                lo, hi = rs[0], rs[-1]
                print(f"d = {d}: N x{hi['N'] / lo['N']:.0f} -> peak memory x{hi['peak_mib'] / lo['peak_mib']:.2f}")
        try:
            import dask.distributed  # noqa: F401
        except ImportError:
            print("dask.distributed not installed: no scaling run (pip install -e \".[dask]\")")
            return 0
        N, d = dask_case
        one = _child(N, d, n, folder, "dask", 1)
        two = _child(N, d, n, folder, "dask", 2)
        print(f"Dask LocalCluster, N = {N}, d = {d}: 1 worker {one['seconds']:.3f} s, 2 workers "
              f"{two['seconds']:.3f} s, speed-up {one['seconds'] / two['seconds']:.2f} (ideal 2.00 on 2 free cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
