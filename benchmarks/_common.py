"""Small helpers shared by the benchmark scripts (no NumPy import at module level).

* :func:`set_thread_env` must run before NumPy (or torch) is imported: OpenBLAS
  and OpenMP read their thread counts once, when they load.
* :func:`blas_info` says which BLAS NumPy runs, its core type and its thread
  count, through ``threadpoolctl`` when installed, else by asking the loaded
  OpenBLAS library directly (``ctypes``).
* :func:`median_spread` is the summary the benchmarks print: median, min, max.
"""
from __future__ import annotations

import ctypes
import importlib
import os

THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def set_thread_env(threads):
    """Set the BLAS / OpenMP thread variables (call before importing NumPy)."""
    if threads:
        for var in THREAD_VARS:
            os.environ[var] = str(int(threads))


def _loaded_openblas():
    """Paths of the OpenBLAS shared objects mapped into this process (Linux only)."""
    try:
        with open("/proc/self/maps") as fh:
            paths = {line.split()[-1] for line in fh if "openblas" in line.lower() and "/" in line}
    except OSError:
        return []
    return sorted(paths)


def blas_info():
    """``{"name", "corename", "threads"}`` of NumPy's BLAS (values ``None`` when unknown)."""
    importlib.import_module("numpy")  # loads the BLAS

    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        threadpool_info = None
    if threadpool_info is not None:
        for pool in threadpool_info():
            if pool.get("user_api") == "blas":
                return {"name": pool.get("internal_api"), "corename": pool.get("architecture"),
                        "threads": pool.get("num_threads")}
    for path in _loaded_openblas():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        info = {"name": "openblas", "corename": None, "threads": None}
        for prefix in ("scipy_openblas", "openblas"):
            for suffix in ("64_", ""):
                fn = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                if fn is not None and info["threads"] is None:
                    fn.restype = ctypes.c_int
                    info["threads"] = int(fn())
                fn = getattr(lib, f"{prefix}_get_corename{suffix}", None)
                if fn is not None and info["corename"] is None:
                    fn.restype = ctypes.c_char_p
                    info["corename"] = fn().decode()
        if info["threads"] is not None:
            return info
    return {"name": None, "corename": None, "threads": None}


def describe_blas():
    """One line: the BLAS, its core type, its threads, and OPENBLAS_CORETYPE if set."""
    info = blas_info()
    line = (f"numpy BLAS: {info['name'] or 'unknown'} ({info['corename'] or '?'} kernels), "
            f"{info['threads'] if info['threads'] is not None else '?'} threads")
    forced = {v: os.environ[v] for v in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if v in os.environ}
    if forced:
        line += ("; " + ", ".join(f"{k}={v}" for k, v in forced.items())
                 + " is set (slows numpy: unset both in the benchmark's command to time a current numpy)")
    return line, info


def median_spread(values):
    """``(median, min, max)`` of a list of numbers."""
    import numpy as np

    a = np.asarray(values, dtype=float)
    return float(np.median(a)), float(a.min()), float(a.max())
