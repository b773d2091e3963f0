r"""Check an external flow-matching implementation against closed-form ground truth.

A user hands refflow a function of theirs (a Python callable, or an importable
``"package.module:function"``) of one of five kinds, and a *case* of the
catalog (a Gaussian-mixture target, a path, ``sigma_min`` and a dimension, for
which every quantity is known in closed form, see :mod:`refflow.targets`).
:func:`check` calls the function on inputs drawn by refflow, compares each
output with ground truth and returns a :class:`CheckReport`: one row per
property, with its error, its tolerance, pass or fail, and, for a failure
that looks like a common mistake, the *likely cause*, found by comparing the
output with planted wrong variants computed by refflow (time reversed,
:math:`\sigma_t^2` for :math:`\sigma_t`, :math:`x_0` and :math:`x_1` swapped,
:math:`\sigma_{min}` dropped, the sign of the divergence integral, the
guidance weight off by one, ...).

Calling conventions (all arrays are NumPy float64; ``n`` rows, ``d`` columns)
------------------------------------------------------------------------------

============  =========================  ==========================================
kind          the function               compared with
============  =========================  ==========================================
``path``      ``(x_0, x_1, t) ->``       :math:`x_t = \sigma_t x_0 + \alpha_t x_1`
              ``(x_t, u_t)``             (eq 26) and
                                         :math:`u_t = \sigma_t' x_0 + \alpha_t' x_1`
                                         (eq 29, 35), both ``(n, d)``
``field``     ``(t, x) -> u`` or         the marginal field :math:`u_t(x)` (eq 19);
              ``(t, x, y) -> u``         with ``y`` the field of class ``y``
                                         (eq 38; ``y = -1`` is the null prompt)
``loglik``    ``x -> log p_1(x)``        the closed form :math:`\log p_1(x)`,
                                         ``(n,)`` (eq 14, 16)
``sampler``   ``(n, seed) -> x``         two-sample tests against exact draws of
                                         :math:`p_1`; ``seed`` is an int
``guided``    ``(t, x, y, w) -> u``      eq 40 in either weighting convention,
                                         ``w`` a float, ``y`` labels ``>= 0``
============  =========================  ==========================================

``t`` is an array of shape ``(n,)`` (one time per row), ``y`` int64 of shape
``(n,)``.  Outputs may be NumPy arrays, anything ``numpy.asarray`` accepts,
or torch tensors (converted with ``.detach().cpu().numpy()``; torch is never
imported by refflow).  Inputs are exactly representable in float32, so a
float32 implementation receives them without rounding.

Tolerances (they follow from the method; ``threshold`` overrides the headline one)
-----------------------------------------------------------------------------------

* exact quantities (path, field, guided): row-relative error (see
  :func:`row_error`) at most ``1e-10`` for float64 outputs, and
  ``100 * eps`` of the output dtype for lower precision (``1.2e-5`` for
  float32): a few dozen rounded operations, each off by at most ``eps/2``;
* a trained field: ``threshold`` bounds the relative L2 error
  :math:`E\|u - u^*\|^2 / E\|u^*\|^2` over :math:`t \sim U(0, 1)`,
  :math:`x \sim p_t` (the objective of eq 15 normalised);
* log-likelihood: ``1e-6`` (error relative to ``max(1, |log p_1|)``) for
  float64 outputs, ``1000 * eps`` otherwise: a CNF integrates eq 14
  numerically, so its error is its ODE solver's; ``1e-6`` is met by an
  adaptive solver at ``rtol <= 1e-8`` (RK4 needs a few hundred steps);
* sampler: z-tests and a permutation test at family-wise false-alarm rate
  ``1e-3`` (``threshold`` sets this rate), split by Bonferroni.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import importlib.util
import inspect
import json
import math
import os
import sys
from typing import Callable

import numpy as np

import refflow
from refflow._io import atomic_write_text
from refflow._validation import as_rng, check_scalar
from refflow.paths import (
    AffinePath,
    CosinePath,
    LinearVPPath,
    OTPath,
    PolynomialPath,
    VEPath,
    VPPath,
)
from refflow.solvers import integrate
from refflow.targets import (
    GaussianMixture,
    MixtureMarginal,
    checkerboard,
    eight_gaussians,
    random_mixture,
    two_moons,
)
from refflow.stats import EXACT_TOL, FAMILY_ALPHA, bonferroni_z

__all__ = [
    "KINDS",
    "CAUSES",
    "ImplementationError",
    "LOGLIK_TOL",
    "Case",
    "catalog",
    "get_case",
    "load_impl",
    "PropertyResult",
    "CheckReport",
    "check",
    "check_path",
    "check_field",
    "check_loglik",
    "check_sampler",
    "check_guided",
    "row_error",
    "energy_distance_test",
]

KINDS = ("path", "field", "loglik", "sampler", "guided")
"""The kinds of implementation :func:`check` knows how to test."""

LOGLIK_TOL = 1e-6
"""Default tolerance of a float64 log-likelihood (an ODE solution, see the module notes)."""

_LOG_2PI = math.log(2.0 * math.pi)

# Special times every exact check includes: both ends and points close to them,
# all exactly representable in float32 (the largest float32 below 1 is 1 - 2**-24).
_T_NEAR_ONE = 1.0 - 2.0**-20
_T_NEAR_ONE_WIDE = 1.0 - 2.0**-10
_SPECIAL_TIMES = (0.0, 1.0, 2.0**-20, 2.0**-10, _T_NEAR_ONE_WIDE, _T_NEAR_ONE)

# The seed of the random mixture targets of the catalog (part of their definition).
_MIXTURE_SEED = 20240701


# ---------------------------------------------------------------------------
# Likely causes
# ---------------------------------------------------------------------------

CAUSES = {
    "time_reversed": "time reversed: data at t = 0 and noise at t = 1 (for a VP schedule: "
                     "alpha_t = a(t) instead of a(1 - t), so alpha_0 = 1 instead of ~0)",
    "time_argument_reversed": "time argument reversed: the field is evaluated at 1 - t",
    "sign_flipped": "sign of the velocity flipped (e.g. OT target x_0 - x_1 instead of x_1 - x_0)",
    "sigma_squared": "sigma_t^2 used where sigma_t belongs (variance for standard deviation)",
    "x0_x1_swapped": "x_0 and x_1 swapped (noise and data exchanged in the interpolation)",
    "sigma_min_dropped": "sigma_min dropped: the output matches the sigma_min = 0 formula",
    "nearest_component": "responsibilities missing: the field of the nearest mixture component "
                         "instead of the responsibility-weighted average of eq 19",
    "precision_near_t1": "precision lost near t = 1: the error appears only where sigma_t -> 0, "
                         "a cancellation such as sigma_t'/sigma_t (x_t - alpha_t x_1) or "
                         "sqrt(1 - alpha_t^2) (float32 makes it worse); use forms that stay accurate "
                         "there (sigma_t' x_0 + alpha_t' x_1, sigma_t sigma_t', sqrt(-expm1(-T))) "
                         "or accept the loss with a threshold",
    "target_inconsistent": "u_t is not d x_t / dt of the implementation's own x_t (eq 27): "
                           "the regression target does not belong to the interpolation",
    "nonfinite": "non-finite output (NaN or inf), typically a division by sigma_t = 0 at t = 1",
    "divergence_sign": "sign of the divergence integral flipped: log p_0(x_0) + int div u dt "
                       "instead of minus (eq 14)",
    "no_divergence": "divergence term missing: only log p_0(x_0) of the transported point (eq 14)",
    "missing_normaliser": "base density normalising constant missing: -d/2 log(2 pi) dropped "
                          "from log p_0",
    "negative_log_likelihood": "returns the negative log-likelihood (loss) instead of log p_1",
    "stochastic_divergence": "non-deterministic output: a stochastic divergence estimate "
                             "(Hutchinson probe redrawn per call or per step) or unseeded randomness",
    "guidance_off_by_one": "guidance weight off by one: the other convention of eq 40 "
                           "(notes: (1 - w) u_null + w u_y; flow_matching: (1 + w) u_y - w u_null; "
                           "w_notes = 1 + w_flow_matching)",
    "guidance_swapped": "conditional and unconditional velocities swapped in eq 40",
    "null_prompt_as_class": "null prompt not honoured: label -1 treated as class 0",
    "guidance_ignored": "guidance weight ignored: the output is the conditional field for every w",
    "label_ignored": "label ignored: the output is the unconditional field for every w",
    "seed_ignored": "seed ignored: the same seed gives different samples (global random state?)",
    "source_noise": "returns the source noise: the samples are distributed as p_0 = N(0, I)",
    "wrong_spread": "wrong spread: the sample covariance differs from the target's "
                    "(base noise variance, or too few / wrong solver steps)",
}
"""Keys of the likely causes a report can name, with their explanations."""


# ---------------------------------------------------------------------------
# The catalog
# ---------------------------------------------------------------------------


def _build_target(name: str, dim: int) -> GaussianMixture:
    if name == "eight-gaussians":
        return eight_gaussians()
    if name == "two-moons":
        return two_moons()
    if name == "checkerboard":
        return checkerboard()
    if name == "mixture":
        return random_mixture(dim, 6, _MIXTURE_SEED + dim, n_classes=3)
    raise ValueError(f"target: unknown catalog target {name!r}")


def _build_path(name: str, sigma_min: float) -> AffinePath:
    if name == "ot":
        return OTPath(sigma_min)
    if name == "ve":
        return VEPath(sigma_min, 10.0)
    if name == "vp":
        return VPPath(0.1, 20.0)
    if name == "cosine":
        return CosinePath()
    if name == "polynomial":
        return PolynomialPath(2.0)
    if name == "linear-vp":
        return LinearVPPath()
    raise ValueError(f"path: unknown catalog path {name!r}")


def _fmt_number(value: float) -> str:
    return f"{value:g}"


@dataclasses.dataclass(frozen=True)
class Case:
    r"""One entry of the catalog: a target, a path, ``sigma_min`` and a dimension.

    Its name, e.g. ``"eight-gaussians/ot/sigma_min=0/d=2"``, is stable: golden
    vectors and reports refer to it.

    Attributes
    ----------
    target_name : str
        ``"eight-gaussians"``, ``"two-moons"``, ``"checkerboard"`` (2-D presets of
        :mod:`refflow.targets`) or ``"mixture"`` (``random_mixture(d, 6,
        seed=20240701 + d, n_classes=3)``, full covariances).
    path_name : str
        ``"ot"`` (eq 34), ``"vp"`` (eq 33, beta 0.1 to 20), ``"ve"`` (eq 32,
        sigma_max 10), ``"cosine"``, ``"polynomial"`` (n = 2), ``"linear-vp"``.
    sigma_min : float
        :math:`\sigma_1` of the path (eq 18); 0 for the paths without one.
    dim : int
        Dimension d.
    """

    target_name: str
    path_name: str
    sigma_min: float
    dim: int

    @property
    def name(self) -> str:
        return f"{self.target_name}/{self.path_name}/sigma_min={_fmt_number(self.sigma_min)}/d={self.dim}"

    @functools.cached_property
    def target(self) -> GaussianMixture:
        """The data distribution :math:`q_1` (a labelled Gaussian mixture)."""
        return _build_target(self.target_name, self.dim)

    @functools.cached_property
    def path(self) -> AffinePath:
        """The conditional path (eq 25-26)."""
        return _build_path(self.path_name, self.sigma_min)

    @functools.cached_property
    def marginal(self) -> MixtureMarginal:
        """The closed-form marginal path and field (eq 16, 19)."""
        return self.target.marginal(self.path)

    @property
    def n_classes(self) -> int:
        return self.target.n_classes

    def conditional_marginal(self, label: int) -> MixtureMarginal:
        """The marginal of class ``label`` (eq 38); ``-1`` (the null prompt) gives :attr:`marginal`."""
        label = int(label)
        if label == -1:
            return self.marginal
        cache = self.__dict__.setdefault("_conditional", {})
        if label not in cache:
            cache[label] = self.target.condition(label).marginal(self.path)
        return cache[label]

    @property
    def source_is_standard_normal(self) -> bool:
        """Whether :math:`p_0 = \\mathcal N(0, I)` exactly (eq 17), so a CNF or sampler may start there."""
        b = self.path.boundary()
        return b["alpha_0"] == 0.0 and b["sigma_0"] == 1.0

    @property
    def kinds(self) -> tuple:
        """The kinds this case can test.

        ``loglik`` and ``sampler`` need :math:`p_0 = \\mathcal N(0, I)` exactly:
        the VE path starts at :math:`\\mathcal N(x_1, \\sigma_{max}^2 I)` and
        the VP path only approximately at :math:`\\mathcal N(0, I)`
        (:math:`\\alpha_0 = e^{-T(1)/2} \\approx 0.0066`), so a flow started
        from :math:`\\mathcal N(0, I)` does not end exactly at :math:`p_1`.
        """
        kinds = ["path", "field"]
        if self.source_is_standard_normal:
            kinds += ["loglik", "sampler"]
        if self.n_classes >= 2:
            kinds.append("guided")
        return tuple(kinds)

    def config(self) -> dict:
        """A JSON-able description: names, the path's parameters and the kinds."""
        return {
            "name": self.name,
            "target": self.target_name,
            "path": self.path.config(),
            "sigma_min": self.sigma_min,
            "dim": self.dim,
            "n_components": self.target.n_components,
            "n_classes": self.n_classes,
            "kinds": list(self.kinds),
        }


_CATALOG_SPECS = (
    ("eight-gaussians", "ot", 0.0, 2),
    ("eight-gaussians", "ot", 0.05, 2),
    ("eight-gaussians", "cosine", 0.0, 2),
    ("eight-gaussians", "polynomial", 0.0, 2),
    ("eight-gaussians", "linear-vp", 0.0, 2),
    ("eight-gaussians", "vp", 0.0, 2),
    ("eight-gaussians", "ve", 0.01, 2),
    ("two-moons", "ot", 0.0, 2),
    ("two-moons", "vp", 0.0, 2),
    ("checkerboard", "ot", 0.0, 2),
    ("mixture", "ot", 0.0, 5),
    ("mixture", "ot", 0.05, 5),
    ("mixture", "vp", 0.0, 5),
    ("mixture", "ot", 0.0, 16),
)

_CATALOG = {case.name: case for case in (Case(*spec) for spec in _CATALOG_SPECS)}


def catalog() -> list[Case]:
    """Every case of the catalog, in a fixed order."""
    return list(_CATALOG.values())


def get_case(case) -> Case:
    """The :class:`Case` of a name such as ``"eight-gaussians/ot/sigma_min=0/d=2"`` (or a Case)."""
    if isinstance(case, Case):
        return case
    if not isinstance(case, str):
        raise TypeError(f"case: expected a catalog case name (str) or a Case, got {type(case).__name__}")
    if case in _CATALOG:
        return _CATALOG[case]
    close = difflib.get_close_matches(case, list(_CATALOG), n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(
        f"case: expected a catalog case name (see `refflow check --list`), got {case!r}{hint}"
    )


# ---------------------------------------------------------------------------
# Loading and calling the user's function
# ---------------------------------------------------------------------------


def load_impl(spec: str) -> Callable:
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
    except Exception as exc:  # report any import failure as a bad --impl
        raise ValueError(
            f"impl: could not import {module_name!r} (expected an importable module or a .py file): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"impl: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"impl: expected {spec!r} to name a callable, got {type(obj).__name__}")
    return obj


def _resolve_impl(impl):
    if isinstance(impl, str):
        return load_impl(impl), impl
    if not callable(impl):
        raise TypeError(f"impl: expected a callable or 'module:function', got {type(impl).__name__}")
    name = getattr(impl, "__module__", None), getattr(impl, "__qualname__", None) or type(impl).__name__
    return impl, ":".join(str(p) for p in name if p)


class ImplementationError(RuntimeError):
    """The user's function raised: the message says which call, with which shapes."""


def _invoke(fn, signature: str, *args):
    """Call the user's function; an exception it raises becomes an :class:`ImplementationError`."""
    try:
        return fn(*args)
    except Exception as exc:
        shapes = ", ".join(f"shape {np.shape(a)}" if isinstance(a, np.ndarray) else repr(a) for a in args)
        raise ImplementationError(
            f"impl: calling {signature} with ({shapes}) raised {type(exc).__name__}: {exc}"
        ) from exc


def _to_numpy(value, what: str) -> np.ndarray:
    """The user's output as a NumPy array (torch tensors through ``.detach().cpu().numpy()``)."""
    if hasattr(value, "detach") and hasattr(value, "cpu") and hasattr(value, "numpy"):
        value = value.detach().cpu().numpy()
    try:
        arr = np.asarray(value)
    except Exception as exc:
        raise TypeError(f"impl: expected {what} to be an array, got {type(value).__name__}") from exc
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"impl: expected {what} to be a real array, got {type(value).__name__} of dtype {arr.dtype}")
    return arr


def _expect_shape(arr: np.ndarray, shape: tuple, what: str) -> np.ndarray:
    if arr.shape != shape:
        raise ValueError(f"impl: expected {what} of shape {shape}, got shape {arr.shape}")
    return arr


def _precision(arrays) -> np.dtype:
    """The least precise floating dtype among the outputs (integers count as float64)."""
    worst = np.dtype(np.float64)
    for a in arrays:
        if np.issubdtype(a.dtype, np.floating) and np.finfo(a.dtype).eps > np.finfo(worst).eps:
            worst = a.dtype
    return worst


def _exact_tol(dtype) -> float:
    # float64: EXACT_TOL; lower precision: 100 eps, a few dozen roundings of eps/2.
    if np.dtype(dtype) == np.float64:
        return EXACT_TOL
    return 100.0 * float(np.finfo(dtype).eps)


def _loglik_tol(dtype) -> float:
    # An integrated quantity: ~1000 rounded steps for lower precision.
    if np.dtype(dtype) == np.float64:
        return LOGLIK_TOL
    return 1000.0 * float(np.finfo(dtype).eps)


def _batched(call, n: int, batch_size):
    """Call ``call(rows)`` on slices of at most ``batch_size`` rows and stack the results."""
    if batch_size is None or batch_size >= n:
        return call(slice(0, n))
    parts = [call(slice(s, min(n, s + batch_size))) for s in range(0, n, batch_size)]
    if isinstance(parts[0], tuple):
        return tuple(np.concatenate([p[i] for p in parts], axis=0) for i in range(len(parts[0])))
    return np.concatenate(parts, axis=0)


def _f32_exact(a) -> np.ndarray:
    """Round to the nearest float32 and back, so float32 implementations get the same inputs."""
    return np.asarray(a, dtype=np.float64).astype(np.float32).astype(np.float64)


def _test_times(n: int, rng, special=_SPECIAL_TIMES, path: AffinePath | None = None) -> np.ndarray:
    """``special`` times then uniform ones; t = 1 dropped where the path's sigma_t' is infinite there."""
    special = list(special)
    if path is not None and 1.0 in special and not _finite_pair_velocity_at_one(path):
        special.remove(1.0)
    k = min(len(special), n)
    return _f32_exact(np.concatenate([special[:k], rng.uniform(0.0, 1.0, n - k)]))


def _finite_pair_velocity_at_one(path: AffinePath) -> bool:
    try:
        path.pair_velocity(np.zeros((1, 1)), np.zeros((1, 1)), 1.0)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------
# Errors and the diagnosis of likely causes
# ---------------------------------------------------------------------------


def _row_scale(ref: np.ndarray, floor: float | None = None) -> np.ndarray:
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
        scale = _row_scale(ref)
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(got - ref).reshape(n, -1)
        err = np.max(diff, axis=1) / scale
    bad = ~np.all(np.isfinite(got.reshape(n, -1)), axis=1) | ~np.all(np.isfinite(ref.reshape(n, -1)), axis=1)
    err[bad] = np.inf
    return err


def _max_row_distance(scale):
    def distance(a, b):
        # rows where the variant (b) is undefined (an infinite sigma_t') are left out
        err = row_error(a, b, scale)
        ok = np.all(np.isfinite(np.asarray(b, dtype=np.float64).reshape(len(err), -1)), axis=1)
        if ok.sum() < 0.5 * ok.size:
            return np.inf
        return float(np.max(err[ok]))

    return distance


def _l2_distance(truth):
    denom = float(np.sum(np.asarray(truth, dtype=np.float64) ** 2)) or np.finfo(float).tiny

    def distance(a, b):
        a = np.asarray(a, dtype=np.float64)
        b = np.asarray(b, dtype=np.float64)
        ok = np.all(np.isfinite(b.reshape(len(b), -1)), axis=1)
        if ok.sum() < 0.5 * ok.size:
            return np.inf
        with np.errstate(invalid="ignore", over="ignore"):
            return float(np.sum((a[ok] - b[ok]) ** 2)) / denom

    return distance


def _match_variants(got, truth, variants: dict, distance) -> list[str]:
    """The planted variants the output matches, best first.

    A variant is matched when the output lies within a tenth of the
    variant's own distance from the truth, ``dist(got, v) <= 0.1 dist(v, truth)``,
    and nearer to it than to the truth.  Variants that coincide with the truth
    on these inputs (e.g. ``sigma_min`` dropped when ``sigma_min = 0``) are
    skipped: they cannot be told apart.  ``variants`` maps a cause key to an
    array or a zero-argument function computing it (computed only here, on failure).
    """
    d_truth = distance(got, truth)
    found = []
    for key, value in variants.items():
        try:
            with np.errstate(all="ignore"):
                v = np.asarray(value() if callable(value) else value, dtype=np.float64)
        except (ValueError, FloatingPointError, ZeroDivisionError):
            continue
        if v.shape != np.shape(truth):
            continue
        separation = distance(truth, v)
        if not np.isfinite(separation) or separation <= 1e-8:
            continue
        d_variant = distance(got, v)
        if d_variant <= 0.1 * separation and d_variant < d_truth:
            found.append((d_variant / separation, key))
    found.sort()
    return [key for _, key in found]


def _localised_near_one(err_rows, t, tol) -> bool:
    """Whether the error exceeds ``tol`` only close to t = 1 (within 2**-10)."""
    t = np.broadcast_to(np.asarray(t, dtype=np.float64), err_rows.shape)
    near = t >= _T_NEAR_ONE_WIDE
    far = t <= 0.99
    return bool(near.any() and far.any() and np.max(err_rows[far]) <= tol and np.max(err_rows[near]) > tol)


# ---------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class PropertyResult:
    """One row of a :class:`CheckReport`.

    Attributes
    ----------
    name : str
        Short name, e.g. ``"u_t"``.
    compared : str
        What was compared with what (equation numbers of the notes).
    error : float
        The measured error, on the scale of ``tolerance``.
    tolerance : float or None
        The pass rule is ``error <= tolerance``; None for a reported-only row.
    passed : bool or None
        None for a reported-only row (it neither passes nor fails the check).
    causes : list of str
        Keys of :data:`CAUSES` the output matches, best first (failures only).
    details : dict
        Extra numbers (JSON-able).
    note : str
        A remark shown in the table where no cause is named (e.g. the
        detected guidance convention).
    """

    name: str
    compared: str
    error: float
    tolerance: float | None
    passed: bool | None
    causes: list = dataclasses.field(default_factory=list)
    details: dict = dataclasses.field(default_factory=dict)
    note: str = ""

    @property
    def likely_cause(self) -> str:
        """The named likely causes, in words ("" when none)."""
        return "; or ".join(CAUSES[c] for c in self.causes)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "compared": self.compared,
            "error": _json_float(self.error),
            "tolerance": None if self.tolerance is None else _json_float(self.tolerance),
            "passed": self.passed,
            "causes": list(self.causes),
            "likely_cause": self.likely_cause,
            "note": self.note,
            "details": _jsonable(self.details),
        }


def _json_float(v):
    v = float(v)
    return v if np.isfinite(v) else str(v)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return _json_float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


@dataclasses.dataclass
class CheckReport:
    """The outcome of :func:`check`: one :class:`PropertyResult` per property.

    ``passed`` is true when no judged property failed.  ``report["u_t"]``
    returns the property of that name; :meth:`table` renders the readable
    table, :meth:`to_json` the JSON document of ``refflow check --json``.
    """

    kind: str
    case: str
    impl: str
    properties: list
    settings: dict = dataclasses.field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(p.passed is not False for p in self.properties)

    @property
    def failed(self) -> list:
        """The properties that failed."""
        return [p for p in self.properties if p.passed is False]

    def __getitem__(self, name: str) -> PropertyResult:
        for p in self.properties:
            if p.name == name:
                return p
        raise KeyError(f"name: expected one of {[p.name for p in self.properties]}, got {name!r}")

    def to_json(self) -> dict:
        return {
            "refflow_version": refflow.__version__,
            "kind": self.kind,
            "case": self.case,
            "impl": self.impl,
            "passed": self.passed,
            "settings": _jsonable(self.settings),
            "properties": [p.to_json() for p in self.properties],
        }

    def write_json(self, path: str) -> None:
        """Write :meth:`to_json` to ``path`` atomically (temporary file, then rename)."""
        atomic_write_text(path, json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n")

    def table(self) -> str:
        """The readable report: a header, one row per property, then what each compared."""
        lines = [f"refflow check  kind={self.kind}  case={self.case}", f"impl: {self.impl}"]
        if self.settings:
            lines.append("settings: " + ", ".join(f"{k}={v}" for k, v in self.settings.items()))
        lines.append("")
        header = ("property", "error", "tolerance", "result", "likely cause / note")
        rows = []
        for p in self.properties:
            result = "-" if p.passed is None else ("pass" if p.passed else "FAIL")
            tol = "-" if p.tolerance is None else f"{p.tolerance:.3g}"
            cause = "; or ".join(c.replace("_", " ") for c in p.causes) or p.note
            rows.append((p.name, _fmt_err(p.error), tol, result, cause))
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
        for r in [header] + rows:
            lines.append("  " + "  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4])
        lines.append("")
        for p in self.properties:
            lines.append(f"  {p.name}: {p.compared}")
            if "stderr" in p.details:
                lines.append(f"      standard error of the estimate: {p.details['stderr']:.2g}")
            if "by_t" in p.details:
                lines.append("      by t: " + ", ".join(f"{k} {v:.2g}" for k, v in p.details["by_t"].items()))
            if p.causes:
                for c in p.causes:
                    lines.append(f"      likely cause ({c}): {CAUSES[c]}")
        n_fail = len(self.failed)
        judged = sum(p.passed is not None for p in self.properties)
        lines.append("")
        lines.append("PASSED" if self.passed else f"FAILED: {n_fail} of {judged} properties")
        return "\n".join(lines)


def _fmt_err(v: float) -> str:
    if not np.isfinite(v):
        return str(v)
    return f"{v:.3g}"


def _exact_property(name, compared, got, truth, tol, t, variants, *, judged=True, details=None,
                    scale=None, note=""):
    """Compare ``got`` with ``truth`` row by row; on failure, name the likely causes."""
    scale = _row_scale(truth) if scale is None else scale
    err_rows = row_error(got, truth, scale)
    error = float(np.max(err_rows))
    passed = bool(error <= tol) if judged else None
    causes = []
    if judged and not passed:
        if not np.all(np.isfinite(got)):
            causes.append("nonfinite")
            bad = ~np.all(np.isfinite(got.reshape(len(got), -1)), axis=1)
            if t is not None:
                details = dict(details or {})
                details["nonfinite_at_t"] = sorted({float(v) for v in np.broadcast_to(t, bad.shape)[bad]})[:5]
        else:
            causes += _match_variants(got, truth, variants, _max_row_distance(scale))
            if not causes and t is not None and _localised_near_one(err_rows, t, tol):
                causes.append("precision_near_t1")
    return PropertyResult(name, compared, error, tol if judged else None, passed, causes, details or {}, note)


# ---------------------------------------------------------------------------
# Planted variants: wrong paths built from the right one
# ---------------------------------------------------------------------------


class _SquaredSigmaPath(AffinePath):
    """Planted bug: sigma_t^2 where sigma_t belongs."""

    name = "sigma-squared"

    def __init__(self, base):
        self.base = base

    def _alpha(self, t):
        return self.base._alpha(t)

    def _d_alpha(self, t):
        return self.base._d_alpha(t)

    def _sigma(self, t):
        return self.base._sigma(t) ** 2

    def _d_sigma(self, t):
        return 2.0 * self.base._sigma_d_sigma(t)

    def _sigma_d_sigma(self, t):
        return self.base._sigma(t) ** 2 * 2.0 * self.base._sigma_d_sigma(t)


class _SwappedPath(AffinePath):
    """Planted bug: x_0 and x_1 exchanged, x_t = alpha_t x_0 + sigma_t x_1."""

    name = "swapped"

    def __init__(self, base):
        self.base = base

    def _alpha(self, t):
        return self.base._sigma(t)

    def _d_alpha(self, t):
        return self.base._d_sigma(t)

    def _sigma(self, t):
        return self.base._alpha(t)

    def _d_sigma(self, t):
        return self.base._d_alpha(t)

    def _sigma_d_sigma(self, t):
        return self.base._alpha(t) * self.base._d_alpha(t)


def _no_sigma_min(path: AffinePath):
    """The same path with sigma_min = 0, or None when it has no sigma_min > 0."""
    if isinstance(path, OTPath) and path.sigma_min > 0:
        return OTPath(0.0)
    return None


def _col(t, n):
    return np.broadcast_to(np.asarray(t, dtype=np.float64), (n,)).reshape(n, 1)


def _pair_velocity_raw(path, x_0, x_1, t):
    # The private schedule, so that a variant evaluated where sigma_t' is
    # infinite gives inf (left out of the comparison) instead of raising.
    tc = _col(t, x_0.shape[0])
    with np.errstate(all="ignore"):
        return path._d_sigma(tc) * x_0 + path._d_alpha(tc) * x_1


def _sample_raw(path, x_0, x_1, t):
    tc = _col(t, x_0.shape[0])
    return path._sigma(tc) * x_0 + path._alpha(tc) * x_1


# ---------------------------------------------------------------------------
# kind = "path"
# ---------------------------------------------------------------------------


def check_path(impl, case, *, threshold=None, n: int = 512, seed=0, batch_size=None) -> CheckReport:
    r"""Check a conditional path ``impl(x_0, x_1, t) -> (x_t, u_t)`` (eq 26, 29, 35).

    Properties
    ----------
    ``x_t``
        :math:`x_t = \psi_t(x_0 \mid x_1) = \sigma_t x_0 + \alpha_t x_1` (eq 26).
    ``u_t``
        The pair velocity, the CFM regression target,
        :math:`u_t = \frac{d}{dt}\psi_t = \sigma_t' x_0 + \alpha_t' x_1` (eq 29, 35-37).
    ``consistency``
        The implementation's ``u_t`` against a central difference of its own
        ``x_t`` in ``t`` (eq 27), on rows with t in [0.05, 0.95]: tells a
        target that does not belong to the interpolation from a consistently
        wrong path.  Step :math:`h = 2^{-14}` (float64) or :math:`2^{-6}`;
        error :math:`\lesssim h^2 |x'''|/6 + \epsilon |x| / h`, tolerance
        ``1e-6`` (float64) or ``1e-2``.

    Rows: t = 0, 1 (where :math:`\sigma_t'` is finite), :math:`2^{-20}`,
    :math:`2^{-10}`, :math:`1 - 2^{-10}`, :math:`1 - 2^{-20}` and uniform t;
    :math:`x_1 \sim q_1`, :math:`x_0 \sim \mathcal N(0, I)`.
    """
    fn, impl_name = _resolve_impl(impl)
    case = get_case(case)
    n = check_scalar(n, "n", low=16, integer=True)
    rng = as_rng(seed)
    path, d = case.path, case.dim
    x_1 = _f32_exact(case.target.sample(n, rng))
    x_0 = _f32_exact(rng.standard_normal((n, d)))
    t = _test_times(n, rng, path=path)

    def call(x0, x1, tt):
        def one(rows):
            out = _invoke(fn, "path(x_0, x_1, t)", x0[rows], x1[rows], tt[rows])
            if not isinstance(out, (tuple, list)) or len(out) != 2:
                raise ValueError(
                    f"impl: expected the path function to return a pair (x_t, u_t), got {type(out).__name__}"
                    + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else "")
                )
            m = x0[rows].shape[0]
            a = _expect_shape(_to_numpy(out[0], "x_t (first output)"), (m, d), "x_t (first output)")
            b = _expect_shape(_to_numpy(out[1], "u_t (second output)"), (m, d), "u_t (second output)")
            return a, b

        return _batched(one, x0.shape[0], batch_size)

    x_t_got, u_t_got = call(x_0, x_1, t)
    dtype = _precision([x_t_got, u_t_got])
    x_t_got = x_t_got.astype(np.float64)
    u_t_got = u_t_got.astype(np.float64)
    tol = _exact_tol(dtype) if threshold is None else check_scalar(threshold, "threshold", low=0.0)

    x_t_true = path.sample(x_0, x_1, t)
    u_t_true = path.pair_velocity(x_0, x_1, t)
    squared, swapped, no_min = _SquaredSigmaPath(path), _SwappedPath(path), _no_sigma_min(path)
    x_variants = {
        "time_reversed": lambda: _sample_raw(path, x_0, x_1, 1.0 - t),
        "sigma_squared": lambda: _sample_raw(squared, x_0, x_1, t),
        "x0_x1_swapped": lambda: _sample_raw(path, x_1, x_0, t),
    }
    u_variants = {
        "time_reversed": lambda: -_pair_velocity_raw(path, x_0, x_1, 1.0 - t),
        "time_argument_reversed": lambda: _pair_velocity_raw(path, x_0, x_1, 1.0 - t),
        "sign_flipped": lambda: -u_t_true,
        "sigma_squared": lambda: _pair_velocity_raw(squared, x_0, x_1, t),
        "x0_x1_swapped": lambda: _pair_velocity_raw(path, x_1, x_0, t),
    }
    if no_min is not None:
        x_variants["sigma_min_dropped"] = lambda: no_min.sample(x_0, x_1, t)
        u_variants["sigma_min_dropped"] = lambda: no_min.pair_velocity(x_0, x_1, t)
    rows_desc = f"{n} rows: t = 0, 1, near 0 and 1, and uniform; x_1 ~ q_1, x_0 ~ N(0, I)"
    props = [
        _exact_property("x_t", "x_t = sigma_t x_0 + alpha_t x_1 (eq 26) vs refflow; " + rows_desc,
                        x_t_got, x_t_true, tol, t, x_variants),
        _exact_property("u_t", "u_t = sigma_t' x_0 + alpha_t' x_1 (eq 29, 35) vs refflow", u_t_got,
                        u_t_true, tol, t, u_variants),
        _path_consistency(call, x_0, x_1, t, u_t_got, dtype),
    ]
    return CheckReport("path", case.name, impl_name, props,
                       {"n": n, "seed": seed, "output_dtype": str(dtype), "threshold": threshold})


def _path_consistency(call, x_0, x_1, t, u_t_got, dtype) -> PropertyResult:
    low = np.dtype(dtype) != np.float64
    h = 2.0**-6 if low else 2.0**-14
    rows = np.flatnonzero((t >= 0.05) & (t <= 0.95))[:64]
    # times on a 2^-20 grid, so t +- h are exact in float32 too
    tc = np.round(t[rows] * 2.0**20) / 2.0**20
    x_plus = call(x_0[rows], x_1[rows], tc + h)[0]
    x_minus = call(x_0[rows], x_1[rows], tc - h)[0]
    u_mid = call(x_0[rows], x_1[rows], tc)[1]
    fd = (x_plus.astype(np.float64) - x_minus.astype(np.float64)) / (2.0 * h)
    tol = 1e-2 if low else 1e-6
    err = row_error(u_mid.astype(np.float64), fd)
    error = float(np.max(err)) if err.size else 0.0
    passed = bool(error <= tol)
    return PropertyResult(
        "consistency",
        f"the implementation's u_t vs a central difference (h = 2^{int(np.log2(h))}) of its own x_t "
        f"in t (eq 27), {rows.size} rows with t in [0.05, 0.95]",
        error, tol, passed, [] if passed else ["target_inconsistent"],
    )


# ---------------------------------------------------------------------------
# kind = "field"
# ---------------------------------------------------------------------------


def _accepts_labels(fn) -> bool:
    """Whether ``fn`` takes a third positional argument (the labels y)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    positional = [p for p in sig.parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind == p.VAR_POSITIONAL for p in sig.parameters.values()):
        return False
    return len(positional) >= 3 and positional[2].default is inspect.Parameter.empty


def _by_label(y, fn_of_marginal, case, n_out_shape):
    """Assemble ``fn_of_marginal(marginal, rows)`` over the label groups of ``y``."""
    out = np.empty(n_out_shape)
    for label in np.unique(y):
        rows = np.flatnonzero(y == label)
        out[rows] = fn_of_marginal(case.conditional_marginal(int(label)), rows)
    return out


def _nearest_component_velocity(marginal: MixtureMarginal, x, t):
    """Planted bug: the field of the most responsible component only (no averaging, eq 19)."""
    target = marginal.target
    k = np.argmax(marginal.responsibilities(x, t), axis=1)
    out = np.empty_like(x)
    t_arr = np.broadcast_to(np.asarray(t, dtype=np.float64), (x.shape[0],))
    for comp in np.unique(k):
        rows = np.flatnonzero(k == comp)
        single = GaussianMixture(np.ones(1), target.means[comp:comp + 1],
                                 target.covariances[comp:comp + 1])
        out[rows] = single.marginal(marginal.path).velocity(x[rows], t_arr[rows])
    return out


def _field_variants(case, x, t, y, truth):
    path = case.path
    no_min = _no_sigma_min(path)

    def under(other_path, time_map=lambda s: s, sign=1.0):
        def compute():
            def one(m, rows):
                mm = m.target.marginal(other_path) if other_path is not path else m
                with np.errstate(all="ignore"):
                    return sign * mm.velocity(x[rows], time_map(t[rows]))
            return _by_label(y, one, case, truth.shape)
        return compute

    variants = {
        "time_reversed": under(path, lambda s: 1.0 - s, -1.0),
        "time_argument_reversed": under(path, lambda s: 1.0 - s),
        "sign_flipped": lambda: -truth,
        "nearest_component": lambda: _by_label(
            y, lambda m, rows: _nearest_component_velocity(m, x[rows], t[rows]), case, truth.shape),
        "sigma_squared": under(_SquaredSigmaPath(path)),
        "x0_x1_swapped": under(_SwappedPath(path)),
    }
    if no_min is not None:
        variants["sigma_min_dropped"] = under(no_min)
    return variants


def check_field(impl, case, *, threshold=None, n: int = 4096, seed=0, conditional=None,
                batch_size=None) -> CheckReport:
    r"""Check a velocity field ``impl(t, x) -> u`` (or ``impl(t, x, y) -> u``) against eq 19.

    Properties
    ----------
    ``u``
        Largest row error (:func:`row_error`) against the closed-form
        marginal field :math:`u_t(x) = \sum_k r_k(x, t) u_k(x, t)` (eq 19; for
        labels, the field of class y, eq 38; y = -1 the unconditional one).
        Judged with the exact tolerance unless ``threshold`` is given.
    ``u_l2``
        :math:`E\|u - u^*\|^2 / E\|u^*\|^2` over :math:`t \sim U(0, 1)`,
        :math:`x \sim p_t`: the flow-matching loss of eq 15 relative to the
        size of the field.  Judged against ``threshold`` when given (the
        setting for a trained model); ``details`` holds its standard error and
        its value in ten bins of t.

    Parameters
    ----------
    impl : callable or str
        The field, or ``"module:function"``.
    case : str or Case
        A catalog case.
    threshold : float, optional
        Bound on the relative L2 error of a trained (approximate) field.
    n : int
        Number of rows (8 at special times, the rest with uniform t).
    seed : int or Generator
        Draws of t, x (and y).
    conditional : bool, optional
        Whether to pass labels ``y``; by default, when ``impl`` takes a third
        required positional argument.
    batch_size : int, optional
        Call ``impl`` on at most this many rows at a time.
    """
    fn, impl_name = _resolve_impl(impl)
    case = get_case(case)
    n = check_scalar(n, "n", low=16, integer=True)
    rng = as_rng(seed)
    if conditional is None:
        conditional = _accepts_labels(fn)
    if conditional and case.n_classes < 1:
        raise ValueError(f"conditional: case {case.name!r} has no class labels")
    d = case.dim
    t = _test_times(n, rng, _SPECIAL_TIMES + (0.5, 0.25))
    if conditional:
        y = rng.integers(-1, case.n_classes, size=n).astype(np.int64)
    else:
        y = np.full(n, -1, dtype=np.int64)
    x = np.empty((n, d))
    for label in np.unique(y):
        rows = np.flatnonzero(y == label)
        x[rows] = case.conditional_marginal(int(label)).sample(rows.size, t[rows], rng)
    x = _f32_exact(x)

    def one(rows):
        out = (_invoke(fn, "field(t, x, y)", t[rows], x[rows], y[rows]) if conditional
               else _invoke(fn, "field(t, x)", t[rows], x[rows]))
        m = x[rows].shape[0]
        return _expect_shape(_to_numpy(out, "the field's output u"), (m, d), "the field's output u")

    u_got = _batched(one, n, batch_size)
    dtype = _precision([u_got])
    u_got = u_got.astype(np.float64)
    truth = _by_label(y, lambda m, rows: m.velocity(x[rows], t[rows]), case, (n, d))
    variants = _field_variants(case, x, t, y, truth)
    exact_tol = _exact_tol(dtype)
    approximate = threshold is not None
    what = "labels y (-1 = null) and " if conditional else ""
    p_max = _exact_property(
        "u", f"u_t(x) vs the closed-form marginal field (eq 19{', 38' if conditional else ''}); "
             f"{n} rows, {what}t = 0, 1, near 0 and 1, and uniform, x ~ p_t",
        u_got, truth, exact_tol, t, variants, judged=not approximate,
        note="reported only: a threshold judges u_l2" if approximate else "")
    p_l2 = _l2_property(u_got, truth, t, y, threshold, variants, n_special=len(_SPECIAL_TIMES) + 2)
    settings = {"n": n, "seed": seed, "conditional": bool(conditional), "output_dtype": str(dtype),
                "threshold": threshold}
    return CheckReport("field", case.name, impl_name, [p_max, p_l2], settings)


def _l2_property(u_got, truth, t, y, threshold, variants, n_special):
    # the Monte-Carlo rows only: t ~ U(0, 1), x ~ p_t
    mc = slice(n_special, None)
    g, r, tt = u_got[mc], truth[mc], t[mc]
    num = np.sum((g - r) ** 2, axis=1)
    den = np.sum(r**2, axis=1)
    with np.errstate(invalid="ignore", over="ignore"):
        ratio = float(num.sum() / den.sum())
        # delta-method standard error of a ratio of means
        m = num.size
        a, b = num.mean(), den.mean()
        cov = np.cov(np.stack([num, den])) if m > 1 else np.zeros((2, 2))
        se = float(np.sqrt(max(cov[0, 0] / b**2 - 2 * a * cov[0, 1] / b**3 + a**2 * cov[1, 1] / b**4, 0.0) / m))
    bins = np.minimum((tt * 10).astype(int), 9)
    by_t = {}
    for k in range(10):
        sel = bins == k
        if sel.any():
            by_t[f"[{k / 10:.1f},{(k + 1) / 10:.1f})"] = float(num[sel].sum() / max(den[sel].sum(), np.finfo(float).tiny))
    judged = threshold is not None
    tol = check_scalar(threshold, "threshold", low=0.0) if judged else None
    passed = bool(np.isfinite(ratio) and ratio <= tol) if judged else None
    causes = []
    if judged and not passed:
        if not np.all(np.isfinite(g)):
            causes = ["nonfinite"]
        else:
            sub = {k: (lambda v=v: (v() if callable(v) else v)[mc]) for k, v in variants.items()}
            causes = _match_variants(g, r, sub, _l2_distance(r))
    return PropertyResult(
        "u_l2", f"relative L2 error E||u - u*||^2 / E||u*||^2 (eq 15 normalised), t ~ U(0, 1), x ~ p_t, "
                f"{num.size} rows",
        ratio, tol, passed, causes, {"stderr": se, "by_t": by_t},
        "" if judged else "reported only: set a threshold to judge it",
    )


# ---------------------------------------------------------------------------
# kind = "loglik"
# ---------------------------------------------------------------------------


def _require_kind(case: Case, kind: str):
    if kind not in case.kinds:
        why = ("loglik and sampler need p_0 = N(0, I) exactly, which the VE and VP paths do not give"
               if kind in ("loglik", "sampler") else "guided needs a target with class labels")
        raise ValueError(
            f"case: {case.name!r} does not support kind {kind!r} (its kinds: {', '.join(case.kinds)}); {why}"
        )


def _pull_back(case: Case, x) -> np.ndarray:
    """x_0 = psi_1^{-1}(x): integrate the exact field from t = 1 back to t = 0 (eq 10)."""
    # the variants only need to be told apart (to 10 % of their distance): rtol 1e-6 is ample
    sol = integrate(case.marginal.field(), x, 1.0, 0.0, method="DOP853", rtol=1e-6, atol=1e-6)
    return sol.x


def _log_normal(x) -> np.ndarray:
    return -0.5 * np.sum(x**2, axis=1) - 0.5 * x.shape[1] * _LOG_2PI


def check_loglik(impl, case, *, threshold=None, n: int = 128, seed=0, batch_size=None) -> CheckReport:
    r"""Check a log-likelihood ``impl(x) -> log p_1(x)`` against the closed form (eq 14, 16).

    Properties
    ----------
    ``log_p1``
        :math:`\max_i |\ell_i - \log p_1(x_i)| / \max(1, |\log p_1(x_i)|)` against
        ``case.marginal.log_prob(x, 1)``; tolerance :data:`LOGLIK_TOL` for
        float64 output (a CNF is as exact as its ODE solver), ``threshold`` if
        given.
    ``deterministic``
        A second call on the same points returns the same values (exact
        tolerance of the output dtype).  A Hutchinson trace estimate with a
        probe drawn per call or per step fails here.

    Points: 3/4 drawn from :math:`p_1`, 1/4 from :math:`\mathcal N(0, I)`
    (between the modes, where the flow bends most).
    """
    fn, impl_name = _resolve_impl(impl)
    case = get_case(case)
    _require_kind(case, "loglik")
    n = check_scalar(n, "n", low=8, integer=True)
    rng = as_rng(seed)
    d = case.dim
    n_data = (3 * n) // 4
    x = _f32_exact(np.concatenate([case.marginal.sample(n_data, 1.0, rng),
                                   rng.standard_normal((n - n_data, d))]))

    def one(rows):
        m = x[rows].shape[0]
        out = _to_numpy(_invoke(fn, "loglik(x)", x[rows]), "the log-likelihood")
        return _expect_shape(out, (m,), "the log-likelihood (one value per row of x)")

    first = _batched(one, n, batch_size)
    second = _batched(one, n, batch_size)
    dtype = _precision([first, second])
    first, second = first.astype(np.float64), second.astype(np.float64)
    truth = case.marginal.log_prob(x, 1.0)
    scale = np.maximum(np.abs(truth), 1.0)
    tol = _loglik_tol(dtype) if threshold is None else check_scalar(threshold, "threshold", low=0.0)

    @functools.lru_cache(maxsize=1)
    def x_0():
        return _pull_back(case, x)

    no_min = _no_sigma_min(case.path)
    variants = {
        # log p_0(x_0) - int div = truth, so flipping the integral's sign gives 2 log p_0(x_0) - truth
        "divergence_sign": lambda: 2.0 * _log_normal(x_0()) - truth,
        "no_divergence": lambda: _log_normal(x_0()),
        "missing_normaliser": lambda: truth + 0.5 * d * _LOG_2PI,
        "negative_log_likelihood": lambda: -truth,
    }
    if no_min is not None:
        variants["sigma_min_dropped"] = lambda: case.target.marginal(no_min).log_prob(x, 1.0)
    err_rows = row_error(first[:, None], truth[:, None], scale)
    error = float(np.max(err_rows))
    passed = bool(error <= tol)
    causes = []
    det_err = float(np.max(row_error(second[:, None], first[:, None], scale)))
    det_tol = _exact_tol(dtype)
    if not passed:
        if not np.all(np.isfinite(first)):
            causes = ["nonfinite"]
        elif det_err > det_tol:
            causes = ["stochastic_divergence"]
        else:
            causes = _match_variants(first[:, None], truth[:, None],
                                     {k: (lambda v=v: v()[:, None]) for k, v in variants.items()},
                                     _max_row_distance(scale))
    p_value = PropertyResult(
        "log_p1", f"log p_1(x) vs the closed form (eq 16 at t = 1), error relative to max(1, |log p_1|); "
                  f"{n} points, {n_data} from p_1 and {n - n_data} from N(0, I)",
        error, tol, passed, causes, {"max_abs_error_nats": float(np.max(np.abs(first - truth)))},
    )
    det_passed = bool(det_err <= det_tol)
    p_det = PropertyResult(
        "deterministic", "a second call on the same points gives the same values",
        det_err, det_tol, det_passed, [] if det_passed else ["stochastic_divergence"],
    )
    return CheckReport("loglik", case.name, impl_name, [p_value, p_det],
                       {"n": n, "seed": seed, "output_dtype": str(dtype), "threshold": threshold})


# ---------------------------------------------------------------------------
# kind = "sampler"
# ---------------------------------------------------------------------------


def energy_distance_test(X, Y, n_permutations: int, rng) -> tuple[float, float]:
    r"""Energy distance between samples ``X`` and ``Y`` and its permutation critical value.

    .. math::

        \mathcal E = \frac{2}{nm}\sum_{i,j}\|X_i - Y_j\| - \frac{1}{n^2}\sum_{i,i'}\|X_i - X_{i'}\|
                    - \frac{1}{m^2}\sum_{j,j'}\|Y_j - Y_{j'}\|

    is 0 exactly when the distributions agree.  Its null distribution comes
    from relabelling the pooled sample ``n_permutations`` times; all
    relabellings are evaluated at once as one matrix product ``D S`` with the
    pairwise distance matrix ``D`` and a 0/1 membership matrix ``S``.

    Returns
    -------
    statistic : float
    critical : float
        The largest permuted statistic: rejecting when ``statistic`` exceeds it
        is a test at level ``1 / (n_permutations + 1)``.
    """
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    Z = np.concatenate([X, Y])
    N, n, m = Z.shape[0], X.shape[0], Y.shape[0]
    sq = np.sum(Z**2, axis=1)
    D = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * (Z @ Z.T), 0.0))
    np.fill_diagonal(D, 0.0)
    rng = as_rng(rng)
    B = int(n_permutations)
    # column 0: the observed split; the others: each column shuffled independently
    S = np.zeros((N, B + 1))
    S[:n, :] = 1.0
    S[:, 1:] = rng.permuted(S[:, 1:], axis=0)
    DS = D @ S
    total = D.sum()
    xx = np.einsum("ib,ib->b", S, DS)          # s^T D s
    row = DS.sum(axis=0)                       # 1^T D s
    xy = row - xx
    yy = total - 2.0 * row + xx
    stats = 2.0 * xy / (n * m) - xx / n**2 - yy / m**2
    return float(stats[0]), float(stats[1:].max())


# Relabellings of the energy test: memory grows like (2 n_energy) x permutations.
_MAX_PERMUTATIONS = 29999


def check_sampler(impl, case, *, threshold=None, n: int = 2000, seed=0, n_reference: int = 20000,
                  n_energy: int = 500) -> CheckReport:
    r"""Check a sampler ``impl(n, seed) -> x`` of shape ``(n, d)`` against exact draws of :math:`p_1`.

    ``seed`` is a Python int; the same seed must give the same samples.

    Properties (family-wise false-alarm rate ``alpha = threshold`` or ``1e-3``,
    split equally between the three tests, Bonferroni)
    ----------
    ``seeded``
        Two calls with the same seed return the same samples.
    ``mean_log_prob``
        z-test of :math:`\overline{\log p_1(X)}` (the user's samples, exact
        log-density of eq 16) against the mean over ``n_reference`` exact
        draws: :math:`z = \Delta / \sqrt{s_X^2/n + s_Y^2/m}`.
    ``energy``
        Energy distance between ``n_energy`` of the samples and as many exact
        draws, against its permutation critical value
        (:func:`energy_distance_test` with :math:`3/\alpha - 1` relabellings).
    ``moments``
        Largest |z| of the differences of the means and second moments
        :math:`E[x_i x_j]` from the exact draws; Bonferroni over the
        :math:`d + d(d+1)/2` statistics.
    """
    fn, impl_name = _resolve_impl(impl)
    case = get_case(case)
    _require_kind(case, "sampler")
    n = check_scalar(n, "n", low=16, integer=True)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed: expected an int (it is passed to the sampler), got {type(seed).__name__}")
    seed = int(seed)
    alpha = FAMILY_ALPHA if threshold is None else check_scalar(threshold, "threshold", low=0.0, high=1.0,
                                                                 low_open=True, high_open=True)
    if alpha < 3.0 / (_MAX_PERMUTATIONS + 1):
        raise ValueError(
            f"threshold: expected a sampler false-alarm rate >= {3.0 / (_MAX_PERMUTATIONS + 1):.2g} "
            f"(the permutation test needs 3/threshold relabellings, at most {_MAX_PERMUTATIONS}), got {alpha!r}"
        )
    d = case.dim

    def draw(k):
        out = _to_numpy(_invoke(fn, "sampler(n, seed)", k, seed), "the samples")
        return _expect_shape(out, (k, d), f"the samples (sampler({k}, seed))")

    a, b = draw(16).astype(np.float64), draw(16).astype(np.float64)
    seed_err = float(np.max(row_error(b, a)))
    p_seed = PropertyResult("seeded", "two calls sampler(16, seed) with the same seed agree", seed_err,
                            EXACT_TOL, bool(seed_err <= EXACT_TOL), [] if seed_err <= EXACT_TOL else ["seed_ignored"])
    X = draw(n).astype(np.float64)
    if not np.all(np.isfinite(X)):
        bad = PropertyResult("finite", "all samples finite", np.inf, 0.0, False, ["nonfinite"])
        return CheckReport("sampler", case.name, impl_name, [p_seed, bad], {"n": n, "seed": seed})
    ref_rng = np.random.default_rng([seed, 0x5EED])
    Y = case.marginal.sample(n_reference, 1.0, ref_rng)
    per_test = alpha / 3.0
    z_tol = bonferroni_z(1, per_test)

    lx, ly = case.marginal.log_prob(X, 1.0), case.marginal.log_prob(Y, 1.0)
    se = math.sqrt(lx.var(ddof=1) / lx.size + ly.var(ddof=1) / ly.size)
    z_lp = float((lx.mean() - ly.mean()) / se)
    ne = min(n_energy, n)
    n_perm = int(math.ceil(1.0 / per_test)) - 1
    stat, crit = energy_distance_test(X[:ne], Y[:ne], n_perm, np.random.default_rng([seed, 0xE0]))
    moments_z, n_stats, spread = _moment_z(X, Y)
    m_tol = bonferroni_z(n_stats, per_test)

    causes_all = []
    if abs(z_lp) > z_tol or stat > crit or moments_z > m_tol:
        causes_all = _sampler_causes(case, X, Y[ne:2 * ne] if Y.shape[0] >= 2 * ne else Y[:ne], ne,
                                     per_test, seed, spread, moments_z > m_tol)
    props = [
        p_seed,
        PropertyResult("mean_log_prob",
                       f"z of mean exact log p_1 of {n} samples vs {n_reference} exact draws (eq 16)",
                       abs(z_lp), z_tol, bool(abs(z_lp) <= z_tol), causes_all if abs(z_lp) > z_tol else [],
                       {"z": z_lp, "mean_log_prob": float(lx.mean()), "reference": float(ly.mean())}),
        PropertyResult("energy",
                       f"energy distance of {ne} samples vs {ne} exact draws; tolerance: "
                       f"largest of {n_perm} permuted statistics (level {per_test:.2g})",
                       stat, crit, bool(stat <= crit), causes_all if stat > crit else []),
        PropertyResult("moments",
                       f"max |z| of the {n_stats} means and second moments vs exact draws (Bonferroni)",
                       moments_z, m_tol, bool(moments_z <= m_tol), causes_all if moments_z > m_tol else [],
                       {"covariance_trace_ratio": spread}),
    ]
    return CheckReport("sampler", case.name, impl_name, props,
                       {"n": n, "seed": seed, "alpha": alpha, "n_reference": n_reference})


def _moment_z(X, Y):
    d = X.shape[1]
    iu = np.triu_indices(d)

    def feats(A):
        return np.concatenate([A, (A[:, :, None] * A[:, None, :])[:, iu[0], iu[1]]], axis=1)

    fx, fy = feats(X), feats(Y)
    se = np.sqrt(fx.var(axis=0, ddof=1) / fx.shape[0] + fy.var(axis=0, ddof=1) / fy.shape[0])
    z = np.abs(fx.mean(axis=0) - fy.mean(axis=0)) / np.maximum(se, np.finfo(float).tiny)
    spread = float(np.trace(np.cov(X.T).reshape(d, d)) / np.trace(np.cov(Y.T).reshape(d, d)))
    return float(z.max()), z.size, spread


def _sampler_causes(case, X, Y_fresh, ne, per_test, seed, spread, moments_failed):
    """Name the variants whose samples the user's samples are indistinguishable from."""
    rng = np.random.default_rng([seed, 0xBAD])
    z = rng.standard_normal((ne, case.dim))
    variants = {
        "source_noise": lambda: z,
        "time_reversed": lambda: integrate(case.marginal.field(), z, 1.0, 0.0, method="rk4", n_steps=50).x,
    }
    # a classification, not the test of the user: a level of 1e-3 is enough here
    n_perm = 999
    found = []
    for key, make in variants.items():
        V = make()
        stat, crit = energy_distance_test(X[:ne], V, n_perm, rng)
        if stat <= crit:
            # indistinguishable from the variant; make sure the variant is not the truth itself
            s_true, c_true = energy_distance_test(Y_fresh, V, n_perm, rng)
            if s_true > c_true:
                found.append(key)
    if not found and moments_failed and abs(spread - 1.0) > 0.05:
        found.append("wrong_spread")
    return found


# ---------------------------------------------------------------------------
# kind = "guided"
# ---------------------------------------------------------------------------

GUIDANCE_WEIGHTS = (0.0, 1.0, 2.5)
"""Guidance scales at which a guided field is evaluated."""


def _guided_formula(convention, w, u_null, u_cond):
    if convention == "notes":
        return (1.0 - w) * u_null + w * u_cond          # eq 40
    return (1.0 + w) * u_cond - w * u_null              # flow_matching's cfg_scale weighting


def check_guided(impl, case, *, threshold=None, n: int = 1024, seed=0, convention: str = "auto",
                 weights=GUIDANCE_WEIGHTS, batch_size=None) -> CheckReport:
    r"""Check a guided field ``impl(t, x, y, w) -> u`` (classifier-free guidance, eq 40).

    The exact conditional fields :math:`u_y` (class y of the mixture, eq 38)
    and the unconditional :math:`u_\varnothing` give both weightings:

    .. math::

        \text{notes (eq 40):}\quad (1 - w)\, u_\varnothing + w\, u_y, \qquad
        \text{flow\_matching:}\quad (1 + w)\, u_y - w\, u_\varnothing .

    Properties
    ----------
    ``u_guided``
        Largest row error over ``weights`` against the declared
        ``convention``, or, with ``"auto"``, the closer of the two.
    ``convention``
        Reported only: which convention the output follows (``details``).

    ``w`` is passed as a Python float, ``y`` as int64 labels ``>= 0``.
    """
    fn, impl_name = _resolve_impl(impl)
    case = get_case(case)
    _require_kind(case, "guided")
    if convention not in ("auto", "notes", "flow_matching"):
        raise ValueError(f"convention: expected 'auto', 'notes' or 'flow_matching', got {convention!r}")
    n = check_scalar(n, "n", low=16, integer=True)
    weights = [check_scalar(w, "weights") for w in weights]
    rng = as_rng(seed)
    d = case.dim
    t = _test_times(n, rng, (0.0, 1.0, 0.5))
    y = rng.integers(0, case.n_classes, size=n).astype(np.int64)
    x = np.empty((n, d))
    for label in np.unique(y):
        rows = np.flatnonzero(y == label)
        x[rows] = case.conditional_marginal(int(label)).sample(rows.size, t[rows], rng)
    x = _f32_exact(x)

    outputs = []
    for w in weights:
        def one(rows, w=w):
            m = x[rows].shape[0]
            out = _invoke(fn, "guided(t, x, y, w)", t[rows], x[rows], y[rows], float(w))
            out = _to_numpy(out, f"the guided field's output at w={w}")
            return _expect_shape(out, (m, d), f"the guided field's output at w={w}")
        outputs.append(_batched(one, n, batch_size))
    dtype = _precision(outputs)
    got = np.stack([o.astype(np.float64) for o in outputs])           # (W, n, d)
    u_null = case.marginal.velocity(x, t)
    u_cond = _by_label(y, lambda m, rows: m.velocity(x[rows], t[rows]), case, (n, d))
    u_class0 = case.conditional_marginal(0).velocity(x, t)
    w_arr = np.asarray(weights)[:, None, None]
    expected = {c: _guided_formula(c, w_arr, u_null, u_cond) for c in ("notes", "flow_matching")}
    flat = lambda a: a.reshape(-1, d)                                  # noqa: E731
    t_rows = np.tile(t, len(weights))
    errors = {c: float(np.max(row_error(flat(got), flat(e)))) for c, e in expected.items()}
    chosen = min(errors, key=errors.get) if convention == "auto" else convention
    other = "flow_matching" if chosen == "notes" else "notes"
    truth = flat(expected[chosen])
    tol = _exact_tol(dtype) if threshold is None else check_scalar(threshold, "threshold", low=0.0)
    # mistakes made inside either convention; with "auto" the closer version of each counts
    conventions = ("notes", "flow_matching") if convention == "auto" else (chosen,)

    def closest(make):
        versions = [flat(make(c)) for c in conventions]
        return min(versions, key=lambda v: float(np.max(row_error(flat(got), v))))

    variants = {
        "guidance_swapped": lambda: closest(lambda c: _guided_formula(c, w_arr, u_cond, u_null)),
        "null_prompt_as_class": lambda: closest(lambda c: _guided_formula(c, w_arr, u_class0, u_cond)),
        "guidance_ignored": flat(np.broadcast_to(u_cond, got.shape)),
        "label_ignored": flat(np.broadcast_to(u_null, got.shape)),
    }
    if convention != "auto":
        variants["guidance_off_by_one"] = flat(expected[other])
    p = _exact_property(
        "u_guided",
        f"guided field vs eq 40 in the {chosen!r} convention"
        f"{' (detected)' if convention == 'auto' else ' (declared)'}, w in {list(weights)}; {n} rows, "
        "y >= 0, x ~ p_t(. | y)",
        flat(got), truth, tol, t_rows, variants)
    p_conv = PropertyResult(
        "convention", "which weighting the output follows: error against each convention",
        min(errors.values()), None, None,
        details={"errors": errors, "follows": min(errors, key=errors.get), "declared": convention},
        note=f"follows {min(errors, key=errors.get)!r}",
    )
    return CheckReport("guided", case.name, impl_name, [p, p_conv],
                       {"n": n, "seed": seed, "convention": convention, "weights": list(weights),
                        "output_dtype": str(dtype), "threshold": threshold})


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------

_CHECKS = {
    "path": check_path,
    "field": check_field,
    "loglik": check_loglik,
    "sampler": check_sampler,
    "guided": check_guided,
}


def check(kind: str, impl, case, *, threshold=None, seed=0, **options) -> CheckReport:
    """Check ``impl`` of the given ``kind`` on a catalog ``case``; see the ``check_<kind>`` functions.

    Parameters
    ----------
    kind : {"path", "field", "loglik", "sampler", "guided"}
    impl : callable or str
        The user's function, or ``"package.module:function"`` / ``"file.py:function"``.
    case : str or Case
        A catalog case name (:func:`catalog`).
    threshold : float, optional
        Replaces the headline tolerance (for a sampler: the family-wise false-alarm rate).
    seed : int
        Seed of refflow's draws (and the sampler's ``seed`` argument).
    **options
        Passed to the ``check_<kind>`` function (``n``, ``batch_size``,
        ``conditional``, ``convention``, ...).

    Returns
    -------
    CheckReport
    """
    if kind not in _CHECKS:
        raise ValueError(f"kind: expected one of {list(KINDS)}, got {kind!r}")
    case = get_case(case)
    _require_kind(case, kind)
    return _CHECKS[kind](impl, case, threshold=threshold, seed=seed, **options)
