"""Throughput of the closed-form mixture marginal (eq 16, 19).

Prints, for K = 8 components and d in {2, 16, 64}, points per second of
``log_prob`` and ``velocity`` (and ``divergence``) at n = 1e4, 1e5, 1e6, and
the ratio time(velocity) / time(log_prob) on the same points (goal <= 2).
Cost per point should stay flat as n grows (linear cost in n).

    python benchmarks/bench_targets.py [--max-n 1000000] [--repeat 3]
"""
import argparse
import time

import numpy as np

import refflow as rf


def best_time(fn, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-n", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"{'d':>3} {'n':>8} {'log_prob pts/s':>15} {'velocity pts/s':>15} {'divergence pts/s':>17} {'vel/logp':>9}")
    for d in (2, 16, 64):
        gmm = rf.random_mixture(d, 8, rng)
        m = gmm.marginal(rf.OTPath())
        for n in (10_000, 100_000, 1_000_000):
            if n > args.max_n:
                continue
            t = rng.uniform(size=n)
            x = m.sample(n, t, rng)
            t_logp = best_time(lambda: m.log_prob(x, t), args.repeat)
            t_vel = best_time(lambda: m.velocity(x, t), args.repeat)
            t_div = best_time(lambda: m.divergence(x, t), args.repeat)
            print(f"{d:>3} {n:>8} {n / t_logp:>15.3e} {n / t_vel:>15.3e} {n / t_div:>17.3e} {t_vel / t_logp:>9.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
