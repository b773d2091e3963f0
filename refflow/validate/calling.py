"""Loading and calling the user's implementation so that it cannot fool the check.

* The implementation receives *copies* of refflow's inputs; refflow computes
  its reference on its own arrays, and a call that changes its inputs in place
  is recorded (:attr:`Caller.modified`) and reported as a failure.
* Anything the implementation raises, ``SystemExit`` included, becomes an
  :class:`ImplementationError` that names the call and the shapes.
* :func:`run_isolated` runs a whole check in a child process with a time
  limit, so that ``os._exit``, a crash or a hang also end in a clear
  :class:`ImplementationError` instead of a silent exit or a wait for ever.
* Outputs are converted to NumPy (torch tensors through ``.detach().cpu()``,
  bfloat16 included) and their precision, the unit roundoff of their dtype,
  is kept for the tolerance (:mod:`refflow.validate.precision`).
"""
from __future__ import annotations

import importlib
import importlib.util
import multiprocessing
import os
import sys
from typing import Callable

import numpy as np

__all__ = [
    "ImplementationError",
    "load_impl",
    "resolve_impl",
    "Caller",
    "to_numpy",
    "expect_shape",
    "batched",
    "run_isolated",
]


class ImplementationError(RuntimeError):
    """The user's implementation failed to produce an answer refflow can judge.

    It raised (``SystemExit`` included), returned something of the wrong type
    or shape, ended or crashed the process, or ran past the time limit.  The
    message says which call, with which shapes.
    """


def load_impl(spec: str, require_callable: bool = True) -> Callable:
    """Import the callable named by ``"package.module:function"`` or ``"path/file.py:function"``.

    The part after the colon may be dotted (``"mod:Class.method"``,
    ``"mod:model.forward"``).  Errors name the argument (``impl``), what was
    expected and what went wrong.
    """
    if not isinstance(spec, str):
        raise TypeError(f"impl: expected 'module:function' (str), got {type(spec).__name__}")
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"impl: expected 'package.module:function' or 'file.py:function', got {spec!r}")
    try:
        if module_name.endswith(".py"):
            if not os.path.isfile(module_name):
                raise FileNotFoundError(f"no file {module_name!r}")
            mod_id = "_refflow_impl_" + os.path.splitext(os.path.basename(module_name))[0]
            spec_obj = importlib.util.spec_from_file_location(mod_id, module_name)
            module = importlib.util.module_from_spec(spec_obj)
            sys.modules[mod_id] = module
            spec_obj.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except BaseException as exc:  # any import failure, SystemExit included, is a bad --impl
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise ValueError(
            f"impl: could not import {module_name!r} (expected an importable module or a .py file): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"impl: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if require_callable and not callable(obj):  # an adapter (refflow.adapters) may wrap a non-callable
        raise TypeError(f"impl: expected {spec!r} to name a callable, got {type(obj).__name__}")
    return obj


def resolve_impl(impl):
    """``(callable, name)`` of an implementation given as a callable or a ``"module:function"`` string."""
    if isinstance(impl, str):
        return load_impl(impl), impl
    if not callable(impl):
        raise TypeError(f"impl: expected a callable or 'module:function', got {type(impl).__name__}")
    name = getattr(impl, "__module__", None), getattr(impl, "__qualname__", None) or type(impl).__name__
    return impl, ":".join(str(p) for p in name if p)


def _describe_args(args) -> str:
    return ", ".join(f"shape {np.shape(a)}" if isinstance(a, np.ndarray) else repr(a) for a in args)


class Caller:
    """Calls the user's function on copies of refflow's arrays and watches what it does to them.

    Parameters
    ----------
    fn : callable
    signature : str
        How the call is written in messages, e.g. ``"path(x_0, x_1, t)"``.
    names : sequence of str
        The names of the positional arguments (for the "modified its inputs" message).

    Attributes
    ----------
    modified : set of str
        Names of the array arguments that some call changed in place.
    precision : float
        The largest unit roundoff among the outputs seen so far (float64's
        by default); see :func:`to_numpy`.
    """

    def __init__(self, fn, signature: str, names):
        self.fn = fn
        self.signature = signature
        self.names = tuple(names)
        self.modified: set = set()
        self.precision = float(np.finfo(np.float64).eps) / 2.0
        self.dtypes: set = set()

    def __call__(self, *args):
        copies = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
        try:
            out = self.fn(*copies)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # SystemExit too: the check must end in a verdict
            what = "called sys.exit" if isinstance(exc, SystemExit) else "raised"
            raise ImplementationError(
                f"impl: calling {self.signature} with ({_describe_args(args)}) {what} "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        for name, original, given in zip(self.names, args, copies):
            if isinstance(original, np.ndarray) and not np.array_equal(original, given, equal_nan=True):
                self.modified.add(name)
        return out

    def output(self, value, what: str, shape: tuple) -> np.ndarray:
        """The output ``value`` as a float64 array of ``shape``, its precision recorded."""
        arr, u, dtype_name = to_numpy(value, what)
        self.precision = max(self.precision, u)
        self.dtypes.add(dtype_name)
        return expect_shape(arr, shape, what)

    @property
    def dtype_name(self) -> str:
        """The least precise output dtype seen (for the report)."""
        if not self.dtypes:
            return "float64"
        return max(self.dtypes, key=lambda name: _UNIT_ROUNDOFF.get(name, 0.0))


# Unit roundoff (half the machine epsilon) of the dtypes an implementation may return.
_UNIT_ROUNDOFF = {
    "float64": 2.0**-53,
    "float32": 2.0**-24,
    "float16": 2.0**-11,
    "bfloat16": 2.0**-8,
    "int": 2.0**-53,
}


def to_numpy(value, what: str):
    """``(array as float64, unit roundoff of its dtype, dtype name)`` of an implementation's output.

    torch tensors are converted with ``.detach().cpu()`` (bfloat16 through
    float32, which holds it exactly); JAX and ml_dtypes arrays through NumPy.
    torch is never imported here.
    """
    dtype_name = None
    if hasattr(value, "detach") and hasattr(value, "cpu") and hasattr(value, "numpy"):
        value = value.detach().cpu()
        dtype_name = str(getattr(value, "dtype", "")).replace("torch.", "")
        if dtype_name == "bfloat16":
            value = value.float()
        value = value.numpy()
    try:
        arr = np.asarray(value)
    except Exception as exc:
        raise ImplementationError(f"impl: expected {what} to be an array, got {type(value).__name__}") from exc
    name = dtype_name or arr.dtype.name
    if name == "bfloat16" and arr.dtype.name == "bfloat16":
        arr = arr.astype(np.float32)  # ml_dtypes' bfloat16 (JAX): exact in float32
    if arr.dtype == object or arr.dtype.kind not in "fiu":
        raise ImplementationError(
            f"impl: expected {what} to be a real array, got {type(value).__name__} of dtype {arr.dtype}"
        )
    if arr.dtype.kind in "iu":
        name = "int"
    if name not in _UNIT_ROUNDOFF:
        if arr.dtype.kind == "f" and arr.dtype.itemsize > 8:  # long double
            name = "float64"
        else:
            raise ImplementationError(f"impl: expected {what} of a float dtype, got dtype {name}")
    return arr.astype(np.float64), _UNIT_ROUNDOFF[name], name


def expect_shape(arr: np.ndarray, shape: tuple, what: str) -> np.ndarray:
    """Refuse an output of the wrong shape (never broadcast it)."""
    if arr.shape != shape:
        raise ImplementationError(f"impl: expected {what} of shape {shape}, got shape {arr.shape}")
    return arr


def batched(call, n: int, batch_size):
    """Call ``call(rows)`` on slices of at most ``batch_size`` rows and stack the results."""
    if batch_size is None or batch_size >= n:
        return call(slice(0, n))
    parts = [call(slice(s, min(n, s + batch_size))) for s in range(0, n, batch_size)]
    if isinstance(parts[0], tuple):
        return tuple(np.concatenate([p[i] for p in parts], axis=0) for i in range(len(parts[0])))
    return np.concatenate(parts, axis=0)


# ---------------------------------------------------------------------------
# A check in a child process
# ---------------------------------------------------------------------------


def _child(conn, func, args, kwargs):
    try:
        result = ("ok", func(*args, **kwargs))
    except ImplementationError as exc:
        result = ("impl", str(exc))
    except (ValueError, TypeError) as exc:
        result = ("usage", type(exc).__name__, str(exc))
    except BaseException as exc:  # noqa: BLE001 - anything else ended the check
        result = ("impl", f"impl: the check ended with {type(exc).__name__}: {exc}")
    try:
        conn.send(result)
    except Exception as exc:  # an unpicklable result: say so rather than vanish
        conn.send(("impl", f"impl: the check's result could not be sent back: {type(exc).__name__}: {exc}"))
    conn.close()


def run_isolated(func, args=(), kwargs=None, timeout: float | None = None):
    """Run ``func(*args, **kwargs)`` in a forked child process and return its result.

    Errors are re-raised in the parent with their type (ValueError and
    TypeError for usage errors, :class:`ImplementationError` otherwise).  A
    child that exits without answering (``os._exit``, a crash, a signal) or
    that runs past ``timeout`` seconds (then it is killed) raises
    :class:`ImplementationError`.  Needs the ``fork`` start method (Linux,
    macOS); where it is missing the call runs in this process.
    """
    kwargs = kwargs or {}
    if "fork" not in multiprocessing.get_all_start_methods():
        return func(*args, **kwargs)
    ctx = multiprocessing.get_context("fork")
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child_conn, func, args, kwargs), daemon=True)
    sys.stdout.flush()
    sys.stderr.flush()
    proc.start()
    child_conn.close()
    try:
        ready = parent_conn.poll(timeout)
        message = parent_conn.recv() if ready else None
    except EOFError:  # the child ended without a word
        message, ready = None, True
    except KeyboardInterrupt:
        proc.kill()
        raise
    finally:
        if not ready:
            proc.kill()
        proc.join(5.0)
        if proc.is_alive():
            proc.kill()
            proc.join()
        parent_conn.close()
    if message is None:
        if not ready:
            raise ImplementationError(
                f"impl: no answer within the time limit of {timeout:g} s (a hang, or far too slow); "
                "the implementation was stopped (raise the limit with --timeout / timeout=)"
            )
        code = proc.exitcode
        how = (f"was killed by signal {-code}" if code is not None and code < 0
               else f"ended the process with exit status {code}")
        raise ImplementationError(
            f"impl: the implementation {how} before returning (os._exit, a crash, or a signal); "
            "refflow could not judge it"
        )
    if message[0] == "ok":
        return message[1]
    if message[0] == "usage":
        raise (ValueError if message[1] == "ValueError" else TypeError)(message[2])
    raise ImplementationError(message[1])
