r"""Effect sizes of trained models: a ratio of means with its standard error, curves over t.

A trained field is judged by its relative L2 error
:math:`R = E\|u - u^*\|^2 / E\|u^*\|^2` (eq 15 normalised), estimated by the
ratio of the sample means :math:`\bar a / \bar b` of
:math:`a_i = \|u(t_i, x_i) - u^*(t_i, x_i)\|^2` and :math:`b_i = \|u^*(t_i, x_i)\|^2`.
Its standard error is the delta method's,

.. math::

    \operatorname{se}(\bar a / \bar b)^2 \approx \frac{1}{m}\left(
        \frac{s_a^2}{\bar b^2} - \frac{2 \bar a s_{ab}}{\bar b^3} + \frac{\bar a^2 s_b^2}{\bar b^4}\right),

and a 95 % interval is :math:`R \pm 1.96\,\operatorname{se}`, clipped at 0.
"""
from __future__ import annotations

import numpy as np

__all__ = ["ratio_of_means", "curve_over_t"]


def ratio_of_means(num, den) -> tuple[float, float]:
    """``(sum(num) / sum(den), delta-method standard error)``; inf/NaN propagate to the ratio."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    m = num.size
    with np.errstate(all="ignore"):
        a, b = num.mean(), den.mean()
        ratio = float(num.sum() / max(den.sum(), np.finfo(float).tiny))
        if m < 2:
            return ratio, float("inf")
        cov = np.cov(np.stack([num, den]))
        var = cov[0, 0] / b**2 - 2 * a * cov[0, 1] / b**3 + a**2 * cov[1, 1] / b**4
    return ratio, float(np.sqrt(max(var, 0.0) / m)) if np.isfinite(var) else float("inf")


def curve_over_t(num, den, t, n_bins: int = 10) -> dict:
    """The ratio in ``n_bins`` equal bins of t in [0, 1]: ``{"[a,b)": [ratio, stderr, low95, high95, rows]}``."""
    t = np.asarray(t, dtype=np.float64)
    bins = np.minimum((t * n_bins).astype(int), n_bins - 1)
    out = {}
    for k in range(n_bins):
        sel = bins == k
        if not sel.any():
            continue
        r, se = ratio_of_means(num[sel], den[sel])
        out[f"[{k / n_bins:.1f},{(k + 1) / n_bins:.1f})"] = [r, se, max(r - 1.96 * se, 0.0), r + 1.96 * se,
                                                          int(sel.sum())]
    return out
