"""Row errors: each row of an output measured against the reference, relative to its own size."""
from __future__ import annotations

import numpy as np

__all__ = ["row_scale", "row_error"]


def row_scale(ref: np.ndarray, floor: float | None = None) -> np.ndarray:
    n = ref.shape[0]
    mag = np.max(np.abs(ref.reshape(n, -1)), axis=1)
    finite = mag[np.isfinite(mag)]
    if floor is None:
        floor = float(np.median(finite)) if finite.size else 1.0
    return np.maximum(mag, max(floor, np.finfo(float).tiny))


def row_error(got, ref, scale=None) -> np.ndarray:
    r"""Per-row relative error :math:`\max_j |a_{ij} - b_{ij}| / s_i`.

    The scale is :math:`s_i = \max(\max_j |b_{ij}|, \operatorname{median}_k \max_j |b_{kj}|)`:
    each row relative to its own size, never to less than a typical row.  A
    single global scale would let the rows with large values (the VP field
    near t = 1 grows like :math:`(1 - t)^{-1/2}`) hide errors on ordinary
    rows; a purely per-row one would blow up where the reference is near 0.
    Non-finite entries give ``inf``.
    """
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    n = ref.shape[0]
    if scale is None:
        scale = row_scale(ref)
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(got - ref).reshape(n, -1)
        err = np.max(diff, axis=1) / scale
    bad = ~np.all(np.isfinite(got.reshape(n, -1)), axis=1) | ~np.all(np.isfinite(ref.reshape(n, -1)), axis=1)
    err[bad] = np.inf
    return err
