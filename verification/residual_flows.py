"""Residual flows (eq 6-7): phi(x) = x + delta u(x) is invertible when delta Lip(u) < 1.

eq 6:  phi(x) = x + delta u(x)
eq 7:  (phi(x) - x) / delta = u(x);  the inverse solves x = y - delta u(x), a fixed point of
       the map x -> y - delta u(x), which is a contraction with constant delta Lip(u) < 1
       (Banach), so the iteration x_{k+1} = y - delta u(x_k) converges to the unique preimage.

    python verification/residual_flows.py [--quick]
"""
import sys

import numpy as np

from refflow import flows

from common import Table, finish, parse_args, run_registered


def fixed_point_inverse(u, delta, y, iterations):
    """x_{k+1} = y - delta u(x_k), x_0 = y; returns the last iterate and the last step size."""
    x = y.copy()
    step = np.inf
    for _ in range(iterations):
        x_next = y - delta * u(x)
        step = np.abs(x_next - x).max()
        x = x_next
    return x, step


def main():
    args = parse_args(__doc__.splitlines()[0])
    rng = np.random.default_rng(7)
    delta = 0.5
    x = 2.0 * rng.standard_normal((200, 2))
    core = Table("Core computation: u(x) = b tanh(a x) coordinatewise, Lip(u) = a b; 200 points; 200 iterations")

    for a, b in ((1.0, 1.5), (1.5, 1.2)):                        # delta Lip(u) = 0.75, 0.9
        u = lambda z, a=a, b=b: b * np.tanh(a * z)
        kappa = delta * a * b
        y = x + delta * u(x)                                      # eq 6
        x_back, step = fixed_point_inverse(u, delta, y, 200)
        # Banach: |x_k - x*| <= kappa / (1 - kappa) |x_k - x_(k-1)|, plus rounding of y amplified by 1/(1 - kappa)
        bound = (kappa * step + 8 * np.finfo(float).eps * np.abs(y).max()) / (1 - kappa)
        core.compare(f"delta Lip(u) = {kappa:.2f}: max |phi^-1(phi(x)) - x|", np.abs(x_back - x).max(), bound)
        core.compare(f"delta Lip(u) = {kappa:.2f}: eq 7, max |(phi(x) - x)/delta - u(x)|",
                     np.abs((y - x) / delta - u(x)).max(), 1e-14 * np.abs(x).max() / delta)

    # Planted bug: delta Lip(u) = 3 > 1.  phi is still a bijection here (phi' >= 1 since u is increasing),
    # but x -> y - delta u(x) is no contraction near 0: the iteration oscillates instead of converging.
    u = lambda z: 3.0 * np.tanh(2.0 * z)
    y = rng.uniform(-0.1, 0.1, (20, 2))
    x_bad, _ = fixed_point_inverse(u, delta, y, 200)
    core.control("delta Lip(u) = 3: max |phi(x_200) - y| after 200 iterations",
                 np.abs(x_bad + delta * u(x_bad) - y).max(), 1e-10)

    # The library's layer: spectrally normalised, so delta Lip(u) <= kappa by construction.
    layer = flows.Residual(2, hidden=(16,), delta=delta, kappa=0.9)
    params = [9.0 * p for p in layer.init_params(rng, scale=4.0)]
    y, _ = layer.forward(params, x)
    x_back, _ = layer.inverse(params, y)
    core.compare("refflow.flows.Residual: Lipschitz bound delta prod ||W_l|| <= kappa = 0.9",
                 layer.lipschitz_bound(params), 0.9 + 1e-12)
    core.compare("refflow.flows.Residual: max |phi^-1(phi(x)) - x|", np.abs(x_back - x).max(),
                 (0.9 * layer.tol * max(1.0, np.abs(y).max()) + 64 * np.finfo(float).eps * np.abs(y).max()) / 0.1)

    registered = run_registered(["flows.residual_inverse", "flows.fixed_point_vjp", "flows.logdet"], args.quick)
    return finish(core, registered)


if __name__ == "__main__":
    sys.exit(main())
