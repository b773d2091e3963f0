r"""Array backends: NumPy on the CPU (always), CuPy on an NVIDIA GPU (optional).

The rule is simple: **the array module follows the inputs**.  NumPy arrays
in, NumPy arrays out; CuPy arrays in, CuPy arrays out.  A function that
creates arrays from nothing (random draws, initial parameters) takes an
explicit ``backend="numpy"`` or ``backend="cupy"``.  Moving data between the
host and the device is always explicit:

>>> import numpy as np
>>> from refflow import backend
>>> x = np.zeros((3, 2))
>>> backend.to_host(backend.to_device(x, "numpy")) is x
True

(``to_device(x, "cupy")`` copies to the GPU, ``to_host`` copies back.)  No
function of refflow converts silently: a CuPy array mixed with a NumPy array
in one call is refused with a ``TypeError`` that names the argument.

CuPy is an optional extra (``pip install -e ".[gpu]"``); it is imported only
when a CuPy array is seen or ``backend="cupy"`` is asked for, so without it
nothing changes.

What runs where
---------------
On both backends: the paths (:mod:`refflow.paths`), the closed-form mixture
marginals (log-density, velocity, score, divergence; :mod:`refflow.targets`),
the MLP's forward pass, VJP and exact divergence (:mod:`refflow.nn`), a CFM
training step with Adam, the fixed-step solvers (Euler, midpoint, Heun, RK4)
and the exact-divergence log-likelihood with a fixed-step method.  On the CPU
only: :func:`scipy.integrate.solve_ivp` (the adaptive methods), autograd
(differentiation through ``apply`` and anything else traced), Hutchinson's
estimator and the verification checks.

Random streams differ: a seed on ``backend="cupy"`` seeds a
``cupy.random.Generator``, which does not reproduce NumPy's PCG64 stream.
Compare the backends on the same pre-drawn inputs, moved with
:func:`to_device`.
"""
from __future__ import annotations

import sys
import types

import numpy as np
from autograd.tracer import Box

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "available_backends",
    "get_namespace",
    "namespace_of",
    "backend_name",
    "is_device_array",
    "to_device",
    "to_host",
    "same_backend",
    "as_device_rng",
    "rng_namespace",
]

BACKENDS: tuple[str, ...] = ("numpy", "cupy")
"""The names accepted wherever a ``backend`` argument is taken."""


class BackendUnavailableError(RuntimeError):
    """The backend that was asked for cannot run here (the message says what is missing)."""


def _cupy_module():
    """The imported ``cupy`` module, or None when nothing has imported it (then no CuPy array exists)."""
    return sys.modules.get("cupy")


def _import_cupy():
    """Import CuPy and make sure a CUDA device is usable; raise naming what is missing."""
    try:
        import cupy
    except ImportError as exc:
        raise BackendUnavailableError(
            "backend: 'cupy' needs the CuPy package, which is not installed "
            f"({exc}); install it with pip install -e \".[gpu]\" (cupy-cuda12x), "
            "or use backend='numpy'"
        ) from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # no driver, no runtime library, no device
        raise BackendUnavailableError(
            f"backend: 'cupy' is installed but no CUDA device is usable ({type(exc).__name__}: {exc}); "
            "use backend='numpy'"
        ) from None
    if count < 1:
        raise BackendUnavailableError(
            "backend: 'cupy' is installed but found no CUDA device (device count 0); use backend='numpy'"
        )
    return cupy


def available_backends() -> list[str]:
    """The backends that can run on this machine: ``["numpy"]``, plus ``"cupy"`` with CuPy and a GPU."""
    out = ["numpy"]
    try:
        _import_cupy()
    except BackendUnavailableError:
        return out
    out.append("cupy")
    return out


def _check_name(backend) -> str:
    if not isinstance(backend, str) or backend.lower() not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {backend!r}"[:300])
    return backend.lower()


def get_namespace(backend) -> types.ModuleType:
    """The array module of a backend name: ``numpy`` or ``cupy`` (imported, device checked)."""
    if _check_name(backend) == "numpy":
        return np
    return _import_cupy()


def _plain(x):
    # autograd's boxes wrap NumPy values only; look beneath them.
    while isinstance(x, Box):
        x = x._value
    return x


def is_device_array(x) -> bool:
    """Whether ``x`` is a CuPy array (False when CuPy was never imported)."""
    cp = _cupy_module()
    return cp is not None and isinstance(_plain(x), cp.ndarray)


def namespace_of(*values) -> types.ModuleType:
    """The array module the values live in: ``cupy`` if any is a CuPy array, else ``numpy``.

    Scalars and ``None`` are neutral.  Mixing a CuPy array with a NumPy array
    is refused (``TypeError``): refflow never moves data implicitly.
    """
    cp = _cupy_module()
    if cp is None:
        return np
    device = host = False
    for v in values:
        v = _plain(v)
        if isinstance(v, cp.ndarray):
            device = True
        elif isinstance(v, np.ndarray) and v.ndim > 0:
            host = True
    if device and host:
        raise TypeError(
            "arrays: expected all arrays on one backend, got CuPy (GPU) and NumPy (CPU) arrays "
            "together; move them explicitly with refflow.backend.to_device or to_host"
        )
    return cp if device else np


def backend_name(xp) -> str:
    """``"numpy"`` or ``"cupy"`` for an array module (``autograd.numpy`` counts as numpy)."""
    return "cupy" if getattr(xp, "__name__", "").startswith("cupy") else "numpy"


def same_backend(xp, value, name: str):
    """Refuse an array argument that lives on the other backend than ``xp`` (scalars pass)."""
    v = _plain(value)
    if xp is np:
        if is_device_array(v):
            raise TypeError(
                f"{name}: expected a NumPy array like the other arguments, got a CuPy (GPU) array; "
                "move it with refflow.backend.to_host"
            )
    elif isinstance(v, np.ndarray) and v.ndim > 0:
        raise TypeError(
            f"{name}: expected a CuPy (GPU) array like the other arguments, got a NumPy array of "
            f"shape {v.shape}; move it with refflow.backend.to_device({name}, 'cupy')"
        )
    return value


def to_device(x, backend: str = "cupy"):
    """Copy ``x`` to ``backend`` (``"cupy"``: host to GPU; ``"numpy"``: GPU to host).

    Arrays already there are returned as they are (no copy).  Any array-like
    (list, scalar, NumPy array) is accepted.
    """
    name = _check_name(backend)
    if name == "numpy":
        return to_host(x)
    cp = _import_cupy()
    return cp.asarray(x)


def to_host(x):
    """Copy a CuPy array to a NumPy array; NumPy arrays and other values pass unchanged."""
    if is_device_array(x):
        return _plain(x).get()
    return x


def rng_namespace(rng) -> types.ModuleType:
    """The array module a random generator draws into: ``cupy`` for a CuPy generator, else ``numpy``."""
    if type(rng).__module__.startswith("cupy"):
        return _import_cupy()
    return np


def as_device_rng(rng, backend: str):
    """A random generator for ``backend`` from a seed (or a generator already of that backend).

    ``numpy``: :func:`refflow._validation.as_rng`.  ``cupy``: a
    ``cupy.random.Generator`` seeded with the int; its stream is not NumPy's.
    A NumPy generator on ``cupy`` gives a CuPy generator seeded from one draw
    of it, so a run stays reproducible from the NumPy seed.
    """
    from refflow._validation import as_rng

    if _check_name(backend) == "numpy":
        return as_rng(rng)
    cp = _import_cupy()
    if isinstance(rng, cp.random.Generator):
        return rng
    as_rng(rng)  # refuses None, negative and non-int seeds with the usual message
    seed = int(rng.integers(0, 2**63 - 1)) if isinstance(rng, np.random.Generator) else int(rng)
    return cp.random.default_rng(seed)
