"""Peak memory of ``refflow sample`` and ``refflow likelihood`` against the number of points.

Each measurement runs the command in a fresh child process, which reports its
own peak resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``)
when it ends; the parent also reads ``RUSAGE_CHILDREN`` as a cross-check.
The batched runs use the default ``--batch-size`` (sized to the available
memory); the "one batch" runs pass ``--batch-size n``, i.e. the old
behaviour of integrating every point together, for the sizes where that
still fits.  What counts:

* the batched peak minus the baseline (the peak of the same command on 10
  points: Python, NumPy, SciPy, Numba and the model) should stay flat as
  ``n`` grows tenfold; only the output arrays (``n`` rows) must grow;
* the likelihood of 1e6 2-D points must stay under 1 GB peak RSS.

    python benchmarks/bench_memory.py [--sizes 1e4,1e5,1e6] [--hidden 32,32] [--one-batch-max 1e5]

A small model (MLP 32x32, 20 training steps) keeps the run short; the memory
per point of the solver does not depend on how well the model is trained.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

_CHILD = (
    "import resource, sys\n"
    "from refflow.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
    "sys.exit(rc)\n"
)


def _run(args):
    """Run ``refflow <args>`` in a child; returns (peak MiB, seconds)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"refflow {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    peak_kb = [int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("PEAK_KB")][-1]
    return peak_kb / 1024.0, seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e4,1e5,1e6", help="numbers of points (default 1e4,1e5,1e6)")
    parser.add_argument("--hidden", default="32,32", help="hidden widths of the small model (default 32,32)")
    parser.add_argument("--one-batch-max", type=float, default=1e5,
                        help="largest n also run as one batch (default 1e5)")
    parser.add_argument("--skip-sample", action="store_true", help="measure only the likelihood")
    opts = parser.parse_args()
    sizes = [int(float(s)) for s in opts.sizes.split(",")]

    import numpy as np

    work = tempfile.mkdtemp(prefix="bench-memory-")
    model = os.path.join(work, "model.npz")
    _run(["train", "--steps", "20", "--hidden", opts.hidden, "--out", model, "--quiet"])
    rng = np.random.default_rng(0)
    files = {}
    for n in [10, *sizes]:
        files[n] = os.path.join(work, f"points-{n}.npy")
        np.save(files[n], 3.0 * rng.standard_normal((n, 2)))

    limit_mib = 1000.0 * 1e6 / 2**20  # 1 GB
    print(f"model: MLP {opts.hidden}, d = 2; peak RSS of each command in its own process (MiB)")
    commands = [("likelihood", lambda n, out, bs: ["likelihood", model, "--points", files[n], "--out", out,
                                                   "--quiet", *bs])]
    if not opts.skip_sample:
        commands.append(("sample", lambda n, out, bs: ["sample", model, "-n", str(n), "--out", out,
                                                       "--quiet", *bs]))
    for name, command in commands:
        out = os.path.join(work, f"{name}.npz")
        base, _ = _run(command(10, out, []))
        print(f"\nrefflow {name} (default method; baseline on 10 points: {base:.0f} MiB)")
        print(f"{'n':>9} {'batched MiB':>12} {'- baseline':>11} {'output MiB':>11} {'s':>7} "
              f"{'one batch MiB':>14} {'one/batched':>12}")
        for n in sizes:
            peak, seconds = _run(command(n, out, []))
            output = n * 2 * 8 * 2 / 2**20  # x (or log p) and x_0, float64, for d = 2
            line = f"{n:>9} {peak:>12.0f} {peak - base:>11.0f} {output:>11.1f} {seconds:>7.1f}"
            if n <= opts.one_batch_max:
                whole, _ = _run(command(n, out, ["--batch-size", str(n)]))
                line += f" {whole:>14.0f} {whole / peak:>12.2f}"
            else:
                line += f" {'(skipped)':>14} {'':>12}"
            if name == "likelihood" and n >= 10**6:
                line += f"   {peak / limit_mib:.2f} of the 1 GB limit: {'ok' if peak < limit_mib else 'OVER'}"
            print(line, flush=True)
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    print(f"\nlargest child peak (RUSAGE_CHILDREN): {children:.0f} MiB")


if __name__ == "__main__":
    main()
