r"""The case handed to the user: its parameters, its data, user-defined cases and their files.

* :func:`bind_case`: an implementation whose signature has a parameter named
  ``case`` receives the :class:`~refflow.validate.catalog.Case` it is checked
  on (so a sampler or a log-likelihood need not hard-code its target).
* :func:`make_case`: a case of the user's own, any
  :class:`~refflow.targets.GaussianMixture` (or :class:`~refflow.targets.Empirical`
  where the kind allows) with any path.
* :func:`case_to_dict` / :func:`case_from_dict`, :func:`save_case_npz` and
  :func:`load_case_file`: a case as JSON or ``.npz``, for other languages and
  for ``refflow check --case-file``.  The JSON form holds the target's weights,
  means, full covariances and labels and the path's schedule
  (:math:`\alpha_t, \sigma_t, \alpha_t', \sigma_t'` on a grid, beside the
  parameters that rebuild it exactly); floats are written with ``repr``, so a
  round trip is exact.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os

import numpy as np

from refflow.paths import AffinePath, make_path
from refflow.targets import Empirical, GaussianMixture
from refflow.validate.catalog import Case

__all__ = [
    "bind_case",
    "wants_case",
    "UserCase",
    "make_case",
    "case_parameters",
    "case_to_dict",
    "case_from_dict",
    "save_case_npz",
    "load_case_file",
    "CASE_FORMAT",
]

CASE_FORMAT = "refflow-case/1"
"""The ``format`` field of a case file; a reader refuses any other."""

# Grid on which a case file tabulates the path's schedule (for readers that do not rebuild it).
_SCHEDULE_POINTS = 101


# ---------------------------------------------------------------------------
# Handing the case to the implementation
# ---------------------------------------------------------------------------


def wants_case(fn) -> bool:
    """Whether ``fn``'s signature has a parameter named ``case`` (not ``*args``/``**kwargs``)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    p = sig.parameters.get("case")
    return p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)


def bind_case(impl, case):
    """``impl`` with ``case=case`` bound when its signature names a ``case`` parameter, else ``impl`` itself.

    ``impl`` is a callable or a ``"module:function"`` string (loaded here
    only to read its signature; the string is returned unchanged when the
    function takes no ``case``).  The bound function keeps the name the
    report shows and ``fn``'s signature without ``case``, so that the checks
    that read the signature (does a field take labels?) see the arguments
    refflow passes.
    """
    from refflow.validate.calling import load_impl

    fn = load_impl(impl) if isinstance(impl, str) else impl
    if not callable(fn) or not wants_case(fn):
        return impl
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def with_case(*args, **kwargs):
        return fn(*args, case=case, **kwargs)

    with_case.__signature__ = sig.replace(parameters=[p for n, p in sig.parameters.items() if n != "case"])
    if isinstance(impl, str):  # the report names the spec the user gave
        with_case.__module__, _, with_case.__qualname__ = impl.rpartition(":")
    return with_case


# ---------------------------------------------------------------------------
# Cases of the user's own
# ---------------------------------------------------------------------------


def _as_path(path, sigma_min) -> AffinePath:
    if isinstance(path, AffinePath):
        if sigma_min is not None:
            raise ValueError("sigma_min: give it in the path object itself, not beside an AffinePath")
        return path
    if isinstance(path, (str, dict)):
        kwargs = {} if sigma_min is None else {"sigma_min": float(sigma_min)}
        return make_path(path, **kwargs)
    raise TypeError(f"path: expected an AffinePath, a path name or a config dict, got {type(path).__name__}")


@dataclasses.dataclass(frozen=True, eq=False)
class UserCase(Case):
    """A case built from the user's own target and path (see :func:`make_case`).

    It behaves as a catalog :class:`~refflow.validate.catalog.Case`; ``name``
    is ``"<label>/<path>/sigma_min=<s>/d=<d>"``.
    """

    user_target: object = None
    user_path: object = None

    @property
    def target(self):
        return self.user_target

    @property
    def path(self):
        return self.user_path

    @property
    def kinds(self) -> tuple:
        kinds = list(super().kinds)
        if isinstance(self.user_target, Empirical):
            # point masses: no density where sigma_1 = 0, so only the path and
            # (with sigma_min > 0) the field, the log-likelihood and the sampler
            if self.path.boundary()["sigma_1"] == 0.0:
                kinds = [k for k in kinds if k == "path"]
            else:
                kinds = [k for k in kinds if k != "guided"]
        return tuple(kinds)


def make_case(target, path="ot", *, sigma_min=None, name: str = "user") -> Case:
    r"""A case of the user's own: ``target`` carried along ``path``.

    Parameters
    ----------
    target : GaussianMixture or Empirical
        The data distribution :math:`q_1`.  An :class:`~refflow.targets.Empirical`
        target (point masses) has no density where :math:`\sigma_1 = 0`, so
        with ``sigma_min = 0`` only the ``path`` kind can use it.
    path : AffinePath, str or dict
        A path object (:mod:`refflow.paths`, ``CustomPath`` included), a
        name (``"ot"``, ``"vp"``, ...) or an :meth:`AffinePath.config` dict.
    sigma_min : float, optional
        With a path name: its :math:`\sigma_{min}` (``"ot"``, ``"ve"``).
    name : str
        The label of the target in the case's name.
    """
    if not isinstance(target, (GaussianMixture, Empirical)):
        raise TypeError(f"target: expected a GaussianMixture or an Empirical, got {type(target).__name__}")
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"name: expected a non-empty label without '/', got {name!r}")
    path_obj = _as_path(path, sigma_min)
    sigma_1 = float(path_obj.boundary()["sigma_1"])
    return UserCase(name, path_obj.name, sigma_1, int(target.dim), user_target=target, user_path=path_obj)


# ---------------------------------------------------------------------------
# A case as data
# ---------------------------------------------------------------------------


def case_parameters(case) -> dict:
    """The target's parameters as arrays: ``weights``, ``means``, ``covariances`` (full) and ``labels``.

    For an :class:`~refflow.targets.Empirical` target, ``points`` and
    ``weights`` (``covariances`` is all zeros).  ``labels`` is None when the
    target has none.
    """
    target = case.target
    out = {"weights": target.weights.copy(), "means": target.means.copy(),
           "labels": None if target.labels is None else np.asarray(target.labels, dtype=np.int64).copy()}
    if isinstance(target, GaussianMixture):
        out["covariances"] = target.covariances.copy()
    else:
        out["covariances"] = np.zeros((target.n_components, target.dim, target.dim))
    return out


def _tabulate(fn, t) -> list:
    """``fn`` on the grid; None (JSON null) where it is not finite (e.g. the VP path's sigma_t' at t = 1)."""
    try:
        with np.errstate(all="ignore"):
            values = np.asarray(fn(t), dtype=np.float64)
    except ValueError:  # a path that refuses an end point: tabulate the inner points one by one
        values = np.empty(t.shape)
        for i, ti in enumerate(t):
            try:
                values[i] = float(np.asarray(fn(t[i:i + 1]))[0])
            except ValueError:
                values[i] = np.nan
    return [float(v) if np.isfinite(v) else None for v in values]


def _schedule(path: AffinePath) -> dict:
    t = np.linspace(0.0, 1.0, _SCHEDULE_POINTS)
    return {"t": t.tolist(), "alpha": _tabulate(path.alpha, t), "sigma": _tabulate(path.sigma, t),
            "d_alpha": _tabulate(path.d_alpha, t), "d_sigma": _tabulate(path.d_sigma, t)}


def case_to_dict(case) -> dict:
    """A JSON-able description of ``case`` from which :func:`case_from_dict` rebuilds it exactly.

    Keys: ``format``, ``name``, ``dim``, ``sigma_min``, ``kinds``, ``target``
    (``type`` ``"gaussian_mixture"`` or ``"empirical"``, ``weights``, ``means``
    or ``points``, ``covariances`` (full d x d), ``labels``) and ``path``
    (its config, and ``schedule``: :math:`t, \\alpha_t, \\sigma_t, \\alpha_t',
    \\sigma_t'` on 101 points of [0, 1]; null where not finite, e.g. the VP path's
    :math:`\\sigma_t'` at t = 1).
    """
    target = case.target
    params = case_parameters(case)
    if isinstance(target, GaussianMixture):
        t_json = {"type": "gaussian_mixture", "weights": params["weights"].tolist(),
                  "means": params["means"].tolist(), "covariances": params["covariances"].tolist()}
    else:
        t_json = {"type": "empirical", "weights": params["weights"].tolist(), "points": params["means"].tolist()}
    t_json["labels"] = None if params["labels"] is None else params["labels"].tolist()
    label = case.name.split("/", 1)[0]
    return {
        "format": CASE_FORMAT,
        "name": case.name,
        "label": label,
        "dim": int(case.dim),
        "sigma_min": float(case.sigma_min),
        "kinds": list(case.kinds),
        "target": t_json,
        "path": {**case.path.config(), "schedule": _schedule(case.path)},
    }


def _field(d: dict, key: str, where: str):
    if not isinstance(d, dict) or key not in d:
        raise ValueError(f"case file: expected a field {key!r} in {where}, got "
                         f"{sorted(d) if isinstance(d, dict) else type(d).__name__}")
    return d[key]


def case_from_dict(data: dict) -> Case:
    """Rebuild a case from :func:`case_to_dict`'s dictionary (refusing other formats, with the field named)."""
    fmt = _field(data, "format", "the case")
    if fmt != CASE_FORMAT:
        raise ValueError(f"case file: expected format {CASE_FORMAT!r}, got {fmt!r}")
    t = _field(data, "target", "the case")
    kind = _field(t, "type", "target")
    labels = t.get("labels")
    if kind == "gaussian_mixture":
        target = GaussianMixture(_field(t, "weights", "target"), _field(t, "means", "target"),
                                 _field(t, "covariances", "target"), labels)
    elif kind == "empirical":
        target = Empirical(_field(t, "points", "target"), t.get("weights"), labels)
    else:
        raise ValueError(f"case file: target type: expected 'gaussian_mixture' or 'empirical', got {kind!r}")
    p = dict(_field(data, "path", "the case"))
    p.pop("schedule", None)
    if p.get("custom"):
        raise ValueError("case file: the path is a CustomPath (Python functions), which a file cannot hold; "
                         "build the case with refflow.validate.make_case in Python instead")
    label = data.get("label") or str(data.get("name", "user")).split("/", 1)[0] or "user"
    return make_case(target, p, name=label)


def save_case_npz(case, file) -> None:
    """Write ``case`` as ``.npz``: the arrays ``weights``, ``means``, ``covariances``, ``labels``
    (absent when there are none), the schedule ``t``, ``alpha_t``, ``sigma_t``, ``d_alpha_t``,
    ``d_sigma_t``, and ``case_json`` (the JSON of :func:`case_to_dict`)."""
    from refflow._io import atomic_write_bytes

    import io

    data = case_to_dict(case)
    params = case_parameters(case)
    sched = data["path"]["schedule"]
    arrays = {"weights": params["weights"], "means": params["means"], "covariances": params["covariances"],
              "t": np.asarray(sched["t"]), "case_json": np.asarray(json.dumps(data))}
    for key in ("alpha", "sigma", "d_alpha", "d_sigma"):  # NaN where the JSON has null
        arrays[key + "_t"] = np.array([np.nan if v is None else v for v in sched[key]])
    if params["labels"] is not None:
        arrays["labels"] = params["labels"]
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(os.fspath(file), buf.getvalue())


def load_case_file(file) -> Case:
    """Read a case from a ``.json`` file (:func:`case_to_dict`) or an ``.npz`` file (:func:`save_case_npz`)."""
    file = os.fspath(file)
    if not os.path.isfile(file):
        raise ValueError(f"case file: expected an existing .json or .npz file, got {file!r}")
    try:
        if file.endswith(".npz"):
            with np.load(file, allow_pickle=False) as z:
                if "case_json" not in z:
                    raise ValueError(f"case file: expected an array 'case_json' in {file!r} "
                                     "(written by Case.save_npz), got " + ", ".join(sorted(z.files)))
                data = json.loads(str(z["case_json"]))
        elif file.endswith(".json"):
            with open(file, encoding="utf-8") as fh:
                data = json.load(fh)
        else:
            raise ValueError(f"case file: expected a name ending in .json or .npz, got {file!r}")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"case file: could not read {file!r}: {type(exc).__name__}: {exc}") from exc
    return case_from_dict(data)
