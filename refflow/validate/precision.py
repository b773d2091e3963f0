r"""How much error a correct implementation may make: tolerances from the arithmetic, row by row.

An implementation that computes in a dtype with unit roundoff :math:`u`
(``2**-53`` for float64, ``2**-24`` float32, ``2**-11`` float16, ``2**-8``
bfloat16) cannot return the exact value of a quantity :math:`f(z)`: at best it
is *backward stable*, i.e. it returns the exact value for inputs perturbed by
a few roundoffs, rounded once more at the end.  So each row :math:`i` of an
exact check is held to

.. math::

    |f_{impl}(z_i) - f(z_i)| \le c\,u \sum_{\text{terms}} |\text{term}_i|
        + \max_{\|\delta\| \lesssim c u} |f(z_i + \delta) - f(z_i)|,

the rounding of the terms the formula adds (for a path,
:math:`|\sigma_t x_0| + |\alpha_t x_1|`) plus the conditioning of the quantity
at that row, measured by evaluating refflow's reference at perturbed inputs:
the time shifted by :math:`\pm c u` (times are handled in absolute terms:
:math:`1 - t` loses :math:`u` absolutely), for a variance-preserving path
:math:`\alpha_t` scaled by :math:`1 \pm c u` with :math:`\sigma_t = \sqrt{1 - \alpha_t^2}`
(how such paths are computed; :func:`schedule_perturbations`), each coordinate of a point scaled
by :math:`1 \pm c u`, and the target's parameters (weights, means,
covariances) perturbed by relative :math:`c u`, as a float32 implementation
holds them.  :data:`SAFETY` is :math:`c`.

So a plain :math:`1 - t^2` in float32 passes near :math:`t = 1`, where the
path itself is ill-conditioned, while dividing a rounded :math:`x_t` by
:math:`\sigma_t` (error :math:`u |x_t| / \sigma_t`) fails where the target
:math:`x_1 - x_0` is perfectly conditioned.
"""
from __future__ import annotations

import numpy as np

from refflow.paths import AffinePath

__all__ = [
    "SAFETY",
    "FLOAT64_ROUNDOFF",
    "f32_exact",
    "test_times",
    "special_times",
    "finite_pair_velocity_at_one",
    "time_shifts",
    "spread",
    "is_variance_preserving",
    "schedule_perturbations",
]

SAFETY = 16.0
"""The constant c of the rounding bound: about the number of roundings a formula accumulates."""

FLOAT64_ROUNDOFF = 2.0**-53
"""Unit roundoff of float64."""


def f32_exact(a) -> np.ndarray:
    """Round to the nearest float32 and back, so float32 implementations get the same inputs."""
    return np.asarray(a, dtype=np.float64).astype(np.float32).astype(np.float64)


def special_times() -> np.ndarray:
    r"""Times every exact check includes, all exactly representable in float32.

    Both ends; dyadic points next to them (:math:`2^{-20}`, :math:`2^{-10}`,
    :math:`1 - 2^{-10}`, :math:`1 - 2^{-20}`); and, to find cancellations that
    binary fractions hide (:math:`1 - t^2` and :math:`x_1 - x_t` are exact at
    :math:`t = 1 - 2^{-k}`), non-dyadic times packed toward both ends,
    :math:`1.37 \cdot 10^{-k}` and :math:`1 - 1.37 \cdot 10^{-k}` for
    k = 1 ... 7, rounded to float32 and, near 1, moved to an odd multiple of
    :math:`2^{-24}` (the float32 grid there) so that they are not powers of two away from 1.
    """
    near_zero = [1.37 * 10.0**-k for k in range(1, 8)]
    near_one = []
    for k in range(1, 8):
        gap = 1.37 * 10.0**-k
        steps = int(round(gap * 2.0**24)) | 1          # an odd number of float32 steps below 1
        near_one.append(1.0 - steps * 2.0**-24)
    dyadic = [0.0, 1.0, 2.0**-20, 2.0**-10, 1.0 - 2.0**-10, 1.0 - 2.0**-20]
    return f32_exact(np.array(dyadic + near_zero + near_one))


def finite_pair_velocity_at_one(path: AffinePath) -> bool:
    """Whether the path's :math:`\\sigma_t'` is finite at t = 1 (not for VP and linear-VP)."""
    try:
        path.pair_velocity(np.zeros((1, 1)), np.zeros((1, 1)), 1.0)
    except ValueError:
        return False
    return True


def test_times(n: int, rng, special=None, path: AffinePath | None = None) -> np.ndarray:
    """``special`` times (default :func:`special_times`), then uniform ones, float32-exact.

    t = 1 is dropped where the path's :math:`\\sigma_t'` is infinite there.
    """
    special = list(special_times() if special is None else special)
    if path is not None and 1.0 in special and not finite_pair_velocity_at_one(path):
        special.remove(1.0)
    k = min(len(special), n)
    return f32_exact(np.concatenate([special[:k], rng.uniform(0.0, 1.0, n - k)]))


def time_shifts(t, unit_roundoff: float):
    """The times :math:`t \\pm c u`, clipped to [0, 1] (one of them equals t at an end)."""
    step = SAFETY * unit_roundoff
    return np.clip(t + step, 0.0, 1.0), np.clip(t - step, 0.0, 1.0)


def spread(reference, perturbed) -> np.ndarray:
    """Elementwise ``max_k |perturbed_k - reference|`` (inf where a perturbed value is not finite)."""
    reference = np.asarray(reference, dtype=np.float64)
    out = np.zeros_like(reference)
    with np.errstate(invalid="ignore", over="ignore"):
        for p in perturbed:
            diff = np.abs(np.asarray(p, dtype=np.float64) - reference)
            diff[~np.isfinite(diff)] = np.inf
            out = np.maximum(out, diff)
    return out


class _HeldByAlpha(AffinePath):
    r"""A variance-preserving path as an implementation holding :math:`\alpha_t` to relative ``delta`` has it.

    With :math:`\alpha_t^2 + \sigma_t^2 = 1`, implementations compute
    :math:`\sigma_t = \sqrt{1 - \alpha_t^2}` (or :math:`\sqrt{1 - e^{-T}}`): the
    relation, not t, carries the rounding, and near :math:`\alpha_t = 1` it
    turns a relative error :math:`\delta` of :math:`\alpha_t` into
    :math:`\delta / \sigma_t^2` of :math:`\sigma_t`.
    """

    def __init__(self, base: AffinePath, delta: float):
        self.base, self.delta = base, delta
        self.name = f"{base.name}-held-by-alpha"

    def _alpha(self, t):
        return self.base._alpha(t) * (1.0 + self.delta)

    def _d_alpha(self, t):
        return self.base._d_alpha(t) * (1.0 + self.delta)

    def _sigma(self, t):
        with np.errstate(invalid="ignore"):
            return np.sqrt(np.maximum(1.0 - self._alpha(t) ** 2, 0.0))

    def _sigma_d_sigma(self, t):
        return -self._alpha(t) * self._d_alpha(t)

    def _d_sigma(self, t):
        with np.errstate(divide="ignore", invalid="ignore"):
            return self._sigma_d_sigma(t) / self._sigma(t)


def is_variance_preserving(path: AffinePath) -> bool:
    """Whether :math:`\\alpha_t^2 + \\sigma_t^2 = 1` on (0, 1) (VP, linear-VP, cosine)."""
    t = np.linspace(0.05, 0.95, 19)
    with np.errstate(all="ignore"):
        return bool(np.all(np.abs(path._alpha(t) ** 2 + path._sigma(t) ** 2 - 1.0) < 1e-12))


def schedule_perturbations(path: AffinePath, unit_roundoff: float) -> list:
    """Paths whose schedule is perturbed as a correct implementation's may be (see :class:`_HeldByAlpha`).

    Empty unless the path is variance preserving.
    """
    if not is_variance_preserving(path):
        return []
    step = SAFETY * unit_roundoff
    return [_HeldByAlpha(path, step), _HeldByAlpha(path, -step)]
