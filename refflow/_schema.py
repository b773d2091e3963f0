"""The schema of a training checkpoint, checked field by field on load.

A checkpoint is an ``.npz`` written by :func:`refflow.train.save_checkpoint`:
arrays (``params``, ``losses``, optionally ``adam_m``/``adam_v`` and
``ema_params``) and a JSON ``config``.  Nothing read from the file is trusted:
every key must be known, every known key present, every value of the stated
type and range, and the model and path configurations must rebuild to exactly
themselves.  The random generator's kind is looked up in a fixed table, never
by name on a module.  Each refusal is a ``ValueError`` naming the file, the
field and the value found.
"""
from __future__ import annotations

import json
import numbers

import numpy as np

__all__ = ["CheckpointError", "read_checkpoint", "BIT_GENERATORS"]

# The bit generators a checkpoint may name: a fixed table, never getattr(numpy.random, name).
BIT_GENERATORS = {
    "PCG64": np.random.PCG64,
    "PCG64DXSM": np.random.PCG64DXSM,
    "Philox": np.random.Philox,
    "SFC64": np.random.SFC64,
    "MT19937": np.random.MT19937,
}

_CONFIG_KEYS = ("format", "model", "path", "step", "adam", "ema_decay", "rng", "rng_kind", "extra")
_ADAM_KEYS = ("lr", "beta1", "beta2", "eps", "step")
_ARRAYS_REQUIRED = ("params", "losses", "config")
_ARRAYS_OPTIONAL = ("adam_m", "adam_v", "ema_params")


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable, or fails its schema."""


def _keys(where, found, required, optional=()):
    found = set(found)
    unknown = sorted(found - set(required) - set(optional))
    missing = [k for k in required if k not in found]
    if unknown:
        raise CheckpointError(f"{where}: unknown key {unknown[0]!r} (expected {', '.join(required + tuple(optional))})")
    if missing:
        raise CheckpointError(f"{where}: missing key {missing[0]!r}")


def _int(where, value, low=0):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise CheckpointError(f"{where}: expected an int >= {low}, got {value!r}")
    return int(value)


def _float(where, value, low, high, low_open=False, high_open=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise CheckpointError(f"{where}: expected a number, got {value!r}")
    v = float(value)
    ok = np.isfinite(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        interval = ("(" if low_open else "[") + f"{low!r}, {high!r}" + (")" if high_open else "]")
        raise CheckpointError(f"{where}: expected a value in {interval}, got {v!r}")
    return v


def _array(where, data, name, shape):
    arr = data[name]
    if arr.dtype.kind != "f":
        raise CheckpointError(f"{where}: array {name!r} has dtype {arr.dtype}, expected floating point")
    if shape is not None and arr.shape != shape:
        raise CheckpointError(f"{where}: array {name!r} has shape {arr.shape}, expected {shape}")
    if not np.all(np.isfinite(arr)):
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        raise CheckpointError(f"{where}: array {name!r} holds {bad} NaN or inf values")
    return arr


def _round_trip(where, config, rebuild):
    """Rebuild an object from its config and require its config to be exactly the one stored."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: expected an object, got {config!r}")
    try:
        obj = rebuild(config)
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    again = json.loads(json.dumps(obj.config()))
    if again != config:
        _keys(where, config, tuple(again))
        for key in again:
            if again[key] != config[key]:
                raise CheckpointError(f"{where}: {key} {config[key]!r} is not a value this version writes "
                                      f"(it would rebuild as {again[key]!r})")
    return obj


def read_checkpoint(file: str, format_name: str):
    """Read and check a checkpoint; returns ``(config, arrays, model, path, rng)``."""
    from refflow.nn import MLP  # the only model kind a checkpoint stores today
    from refflow.paths import make_path

    where = f"model file {file!r}"
    try:
        with np.load(file, allow_pickle=False) as npz:
            if not hasattr(npz, "files"):
                raise CheckpointError(f"{where}: is not a readable refflow checkpoint (a single .npy array, not an .npz)")
            data = {name: npz[name] for name in npz.files}
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{where}: is not a readable refflow checkpoint "
                              f"({type(exc).__name__}: {exc})") from None
    if "config" not in data:
        raise CheckpointError(f"{where}: is not a readable refflow checkpoint (no 'config' array)")
    try:
        config = json.loads(str(data["config"][()]))
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{where}: its config is not JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: its config is not an object, got {type(config).__name__}")
    if config.get("format") != format_name:
        raise CheckpointError(f"{where}: has format {config.get('format')!r}, expected {format_name!r}")
    _keys(f"{where}: config", config, _CONFIG_KEYS)
    _keys(f"{where}: arrays", data, _ARRAYS_REQUIRED, _ARRAYS_OPTIONAL)

    model = _round_trip(f"{where}: model", config["model"], MLP.from_config)
    path = _round_trip(f"{where}: path", config["path"], make_path)
    step = _int(f"{where}: step", config["step"])

    adam = config["adam"]
    if not isinstance(adam, dict):
        raise CheckpointError(f"{where}: adam: expected an object, got {adam!r}")
    _keys(f"{where}: adam", adam, _ADAM_KEYS)
    _float(f"{where}: adam.lr", adam["lr"], 0.0, np.inf, low_open=True, high_open=True)
    _float(f"{where}: adam.beta1", adam["beta1"], 0.0, 1.0, high_open=True)
    _float(f"{where}: adam.beta2", adam["beta2"], 0.0, 1.0, high_open=True)
    _float(f"{where}: adam.eps", adam["eps"], 0.0, np.inf, low_open=True, high_open=True)
    adam_step = _int(f"{where}: adam.step", adam["step"])
    if config["ema_decay"] is not None:
        _float(f"{where}: ema_decay", config["ema_decay"], 0.0, 1.0, low_open=True, high_open=True)
    if not isinstance(config["extra"], dict):
        raise CheckpointError(f"{where}: extra: expected an object, got {config['extra']!r}")

    kind = config["rng_kind"]
    if not isinstance(kind, str) or kind not in BIT_GENERATORS:
        raise CheckpointError(f"{where}: rng_kind: expected one of {sorted(BIT_GENERATORS)}, got {kind!r}")
    bit_generator = BIT_GENERATORS[kind]()
    state = config["rng"]
    if not isinstance(state, dict) or state.get("bit_generator") != kind:
        raise CheckpointError(f"{where}: rng: expected the state of a {kind} generator, got {state!r}"[:300])
    try:
        bit_generator.state = state
    except (TypeError, ValueError, KeyError, OverflowError) as exc:
        raise CheckpointError(f"{where}: rng: not a valid {kind} state ({exc})") from None

    n = model.n_params
    _array(where, data, "params", (n,))
    if ("adam_m" in data) != ("adam_v" in data):
        raise CheckpointError(f"{where}: arrays 'adam_m' and 'adam_v' come together, found only one")
    if ("adam_m" in data) != (adam_step > 0):
        raise CheckpointError(f"{where}: adam.step {adam_step} does not match the presence of Adam's moments")
    if "adam_m" in data:
        _array(where, data, "adam_m", (n,))
        v = _array(where, data, "adam_v", (n,))
        if np.any(v < 0):
            raise CheckpointError(f"{where}: array 'adam_v' (second moments) holds negative values")
    if ("ema_params" in data) != (config["ema_decay"] is not None):
        raise CheckpointError(f"{where}: ema_decay {config['ema_decay']!r} does not match the presence of 'ema_params'")
    if "ema_params" in data:
        _array(where, data, "ema_params", (n,))
    losses = data["losses"]
    if losses.ndim != 1 or losses.shape[0] != step:
        raise CheckpointError(f"{where}: array 'losses' has shape {losses.shape}, expected ({step},) (one per step)")
    _array(where, data, "losses", (step,))
    return config, data, model, path, np.random.Generator(bit_generator)
