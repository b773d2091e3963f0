"""Input checks shared by every module.

Each function either returns a clean float64 array or raises a ``ValueError`` /
``TypeError`` whose message names the argument, what was expected and what was
given.  Nothing here broadcasts a wrong shape silently.

The checks follow the backend of their input (see :mod:`refflow.backend`): a
CuPy array is checked with CuPy and returned as a CuPy array (CuPy refuses
``numpy.asarray``, and a copy to the host would be both slow and implicit);
everything else goes through NumPy exactly as before.
"""
from __future__ import annotations

import numbers

import sys

import numpy as np
from autograd.tracer import Box

__all__ = [
    "unbox",
    "as_rng",
    "check_points",
    "check_time",
    "time_column",
    "check_scalar",
    "check_labels",
    "exact",
]


def unbox(value):
    """The plain value under autograd's tracing boxes.

    Public functions validate the plain value and compute with the original,
    so they stay differentiable by autograd while refusing bad input.
    """
    while isinstance(value, Box):
        value = value._value
    return value


def _xp(value):
    """The array module of ``value``: CuPy for a CuPy array, else NumPy.

    Looks CuPy up in ``sys.modules`` so that it is never imported here: if
    nothing imported it, no CuPy array can exist.
    """
    cp = sys.modules.get("cupy")
    if cp is not None and isinstance(value, cp.ndarray):
        return cp
    return np


def exact(value) -> str:
    """The value as an error message shows it: the repr of a Python float or int.

    ``repr(float)`` is the shortest string that reads back to the same float
    (``1.0000001``, not a rounded ``1``), and a NumPy scalar becomes a plain
    number (``1.0``, not ``np.float64(1.0)``).
    """
    if isinstance(value, (bool, np.bool_)):
        return repr(bool(value))
    if isinstance(value, (numbers.Integral, np.integer)):
        return repr(int(value))
    if isinstance(value, (numbers.Real, np.floating)):
        return repr(float(value))
    return repr(value)


def _describe(value) -> str:
    if isinstance(value, np.ndarray) or _xp(value) is not np:
        return f"array of shape {value.shape} and dtype {value.dtype}"
    if isinstance(value, np.generic):
        return f"{type(value).__name__} {exact(value)}"
    return f"{type(value).__name__} {value!r}"[:200]


def as_rng(rng) -> np.random.Generator:
    """Return a ``numpy.random.Generator`` from a Generator or an int seed.

    There is no global random state in refflow: ``None`` is refused so that
    every stochastic result is reproducible from its arguments.
    """
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (numbers.Integral, np.integer)) and not isinstance(rng, bool):
        if rng < 0:
            raise ValueError(f"rng: expected a non-negative int seed, got {rng}")
        return np.random.default_rng(int(rng))
    raise TypeError(
        "rng: expected a numpy.random.Generator or an int seed, got "
        + _describe(rng)
    )


def check_points(x, name: str = "x", d: int | None = None, dtype=np.float64) -> np.ndarray:
    """Return ``x`` as a finite array of shape ``(n, d)``.

    Parameters
    ----------
    x : array_like
        Points, one per row.
    name : str
        Argument name used in error messages.
    d : int, optional
        Required number of columns.
    dtype : numpy dtype
        float64 unless float32 was asked for.
    """
    if isinstance(x, (str, bytes)) or x is None:
        raise TypeError(f"{name}: expected an array of shape (n, d), got {_describe(x)}")
    xp = _xp(x)
    arr = xp.asarray(x)
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise TypeError(
            f"{name}: expected a real numeric array of shape (n, d), got {_describe(arr)}"
        )
    if arr.ndim != 2:
        raise ValueError(
            f"{name}: expected a 2-D array of shape (n, d), got shape {arr.shape}"
        )
    if d is not None and arr.shape[1] != d:
        raise ValueError(
            f"{name}: expected {d} columns (shape (n, {d})), got shape {arr.shape}"
        )
    arr = arr.astype(dtype, copy=False)
    if not bool(xp.all(xp.isfinite(arr))):  # on a GPU: one device-to-host sync
        bad = int(arr.size - int(xp.count_nonzero(xp.isfinite(arr))))
        raise ValueError(f"{name}: expected finite values, got {bad} NaN or inf entries")
    return arr


def check_time(t, n: int | None = None, name: str = "t") -> np.ndarray:
    """Return ``t`` as a float64 array, 0-d for a scalar or ``(n,)``.

    ``t`` must lie in [0, 1] (t = 0 is the source, t = 1 the data).
    """
    if isinstance(t, (str, bytes)) or t is None or isinstance(t, bool):
        raise TypeError(f"{name}: expected a float or an array of shape (n,), got {_describe(t)}")
    xp = _xp(t)
    arr = xp.asarray(t)
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise TypeError(f"{name}: expected a real float or array, got {_describe(arr)}")
    arr = arr.astype(np.float64, copy=False)
    if arr.ndim > 1:
        raise ValueError(f"{name}: expected a float or an array of shape (n,), got shape {arr.shape}")
    if arr.ndim == 1 and n is not None and arr.shape[0] != n:
        raise ValueError(f"{name}: expected shape ({n},) to match {n} points, got shape {arr.shape}")
    bad = ~((arr >= 0.0) & (arr <= 1.0))  # NaN fails both comparisons
    if bool(xp.any(bad)):
        # The first offending value, exactly (a rounded "1" would hide 1.0000001).
        flat = bad.reshape(-1)
        i = int(xp.argmax(flat))
        value = float(arr.reshape(-1)[i])
        where = "" if arr.ndim == 0 else f" at index {i}"
        finite = "" if np.isfinite(value) else "finite "
        raise ValueError(f"{name}: expected {finite}values in [0, 1], got {exact(value)}{where}")
    return arr


def time_column(t, n: int, name: str = "t") -> np.ndarray:
    """Return ``t`` as a column of shape ``(n, 1)`` for broadcasting against ``(n, d)``."""
    arr = check_time(t, n, name)
    return _xp(arr).broadcast_to(arr, (n,)).reshape(n, 1)


def check_scalar(
    value,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> float:
    """Return ``value`` as a float (or int) inside the stated interval."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        kind = "an int" if integer else "a real number"
        raise TypeError(f"{name}: expected {kind}, got {_describe(value)}")
    if integer and not isinstance(value, (numbers.Integral, np.integer)):
        raise TypeError(f"{name}: expected an int, got {_describe(value)}")
    v = int(value) if integer else float(value)
    if not np.isfinite(v):
        raise ValueError(f"{name}: expected a finite number, got {v!r}")
    lo_bad = low is not None and (v <= low if low_open else v < low)
    hi_bad = high is not None and (v >= high if high_open else v > high)
    if lo_bad or hi_bad:
        lo = "-inf" if low is None else repr(low)
        hi = "inf" if high is None else repr(high)
        interval = ("(" if low_open or low is None else "[") + f"{lo}, {hi}" + (
            ")" if high_open or high is None else "]"
        )
        raise ValueError(f"{name}: expected a value in {interval}, got {v!r}")
    return v


def check_labels(y, n: int, name: str = "y", n_classes: int | None = None) -> np.ndarray:
    """Return class labels as an int64 array of shape ``(n,)``; -1 is the null prompt."""
    xp = _xp(y)
    arr = xp.asarray(y)
    if arr.ndim == 0:
        arr = xp.full(n, arr)
    if not np.issubdtype(arr.dtype, np.integer):
        if (np.issubdtype(arr.dtype, np.floating) and bool(xp.all(xp.isfinite(arr)))
                and bool(xp.all(arr == xp.round(arr)))):
            arr = arr.astype(np.int64)
        else:
            raise TypeError(f"{name}: expected integer class labels, got {_describe(arr)}")
    if arr.shape != (n,):
        raise ValueError(f"{name}: expected shape ({n},), got shape {arr.shape}")
    if bool(xp.any(arr < -1)):
        raise ValueError(f"{name}: expected labels >= -1 (-1 is the null prompt), got {int(arr.min())}")
    if n_classes is not None and bool(xp.any(arr >= n_classes)):
        raise ValueError(f"{name}: expected labels < {n_classes}, got {int(arr.max())}")
    return arr.astype(np.int64, copy=False)
