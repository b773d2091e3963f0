r"""Golden vectors: ground truth on disk, for implementations in any language.

:func:`write_golden` writes, for each case of the catalog
(:func:`refflow.validate.catalog`), one ``.npz`` archive of inputs and
closed-form outputs, and a ``manifest.json`` that states the conventions
(time direction, path formulas, shapes, dtypes, seeds, versions).  An
implementation is then tested by loading the inputs, running its own code
and comparing with the outputs; refflow need not be installed.

The files are byte-for-byte reproducible: fixed seeds, arrays written in
sorted order into an uncompressed zip whose entries all carry the date
1980-01-01 (``numpy.savez`` would stamp the current time), and a manifest
serialised with sorted keys.  Each file is written to a temporary name and
renamed into place, so a folder never holds a half-written file.  Values
depend only on the inputs and float64 arithmetic; the bytes are identical
on the same platform and library versions (recorded in the manifest).

Inputs are exactly representable in float32, so a float32 implementation
reads them without rounding.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
import zlib

import numpy as np

import refflow
from refflow._io import atomic_write_bytes
from refflow.validate import catalog, get_case
from refflow.validate.precision import f32_exact as _f32_exact, finite_pair_velocity_at_one as _finite_pair_velocity_at_one
from refflow.solvers import guided_field

__all__ = ["FORMAT", "ARRAYS", "PATH_FORMULAS", "case_arrays", "write_npz", "write_golden", "case_file_name"]

FORMAT = "refflow-golden/1"
"""Version tag of the file layout; changes when a name, shape or meaning changes."""

N_ROWS = 64
N_TEST = 32
GUIDANCE_W = (0.0, 1.0, 2.5)
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)

PATH_FORMULAS = {
    "ot": "alpha_t = t; sigma_t = 1 - (1 - sigma_min) t  (eq 34)",
    "ve": "alpha_t = 1; sigma_t = sigma_min (sigma_max / sigma_min)^(1 - t)  (eq 32)",
    "vp": "alpha_t = exp(-T(1 - t) / 2); sigma_t = sqrt(1 - exp(-T(1 - t))); "
          "T(s) = beta_min s + (beta_max - beta_min) s^2 / 2  (eq 33)",
    "cosine": "alpha_t = sin(pi t / 2); sigma_t = cos(pi t / 2)",
    "polynomial": "alpha_t = t^n; sigma_t = 1 - t^n",
    "linear-vp": "alpha_t = t; sigma_t = sqrt(1 - t^2)",
}
"""The schedule of each path, in words (x_t = sigma_t x_0 + alpha_t x_1)."""

# name -> (role, shape, dtype, meaning)
ARRAYS = {
    "x_0": ("input", "(n, d)", "float64", "source draws x_0 ~ N(0, I)"),
    "x_1": ("input", "(n, d)", "float64", "data draws x_1 ~ q_1, paired row by row with x_0"),
    "t": ("input", "(n,)", "float64", "times in [0, 1]: 0, 1 (where sigma_t' is finite), 2^-20, 1/2, "
                               "1 - 2^-20, then uniform"),
    "x": ("input", "(n, d)", "float64", "points x ~ p_t at time t (drawn independently of x_0, x_1)"),
    "y": ("input", "(n,)", "int64", "class label of the row of x (-1 = null prompt, every 4th row)"),
    "w": ("input", "(k,)", "float64", "guidance scales, notes convention (eq 40)"),
    "x_test": ("input", "(m, d)", "float64", "test points for log p_1: 3/4 from p_1, 1/4 from N(0, I)"),
    "alpha_t": ("output", "(n,)", "float64", "alpha_t at t"),
    "sigma_t": ("output", "(n,)", "float64", "sigma_t at t"),
    "d_alpha_t": ("output", "(n,)", "float64", "d alpha_t / dt at t"),
    "d_sigma_t": ("output", "(n,)", "float64", "d sigma_t / dt at t"),
    "x_t": ("output", "(n, d)", "float64", "x_t = sigma_t x_0 + alpha_t x_1 (eq 26)"),
    "u_t_pair": ("output", "(n, d)", "float64", "pair velocity u_t(x_t | x_1) = sigma_t' x_0 + alpha_t' x_1 "
                                                "(eq 29, 35): the CFM regression target"),
    "u_t": ("output", "(n, d)", "float64", "marginal field u_t(x) at (x, t) (eq 19)"),
    "u_t_y": ("output", "(n, d)", "float64", "field of class y at (x, t) (eq 38); rows with y = -1: u_t"),
    "u_guided": ("output", "(k, n, d)", "float64", "guided field (1 - w) u_t + w u_t_y at each w (eq 40)"),
    "log_p_t": ("output", "(n,)", "float64", "marginal log-density log p_t(x) (eq 16)"),
    "score": ("output", "(n, d)", "float64", "score grad_x log p_t(x)"),
    "divergence": ("output", "(n,)", "float64", "divergence of u_t at x (eq 11-14)"),
    "log_p_1": ("output", "(m,)", "float64", "log p_1(x_test) (eq 14, 16 at t = 1)"),
    "target_weights": ("target", "(K,)", "float64", "mixture weights of q_1"),
    "target_means": ("target", "(K, d)", "float64", "component means"),
    "target_covariances": ("target", "(K, d, d)", "float64", "component covariances"),
    "target_labels": ("target", "(K,)", "int64", "class label of each component"),
}
"""Every array of a golden archive: role, shape, dtype and meaning."""


def case_file_name(case) -> str:
    """File name of a case's archive, e.g. ``eight-gaussians_ot_sigma_min=0_d=2.npz``."""
    return get_case(case).name.replace("/", "_") + ".npz"


def case_seed(case) -> int:
    """The seed of a case's draws: CRC-32 of its name (stable across runs and platforms)."""
    return zlib.crc32(get_case(case).name.encode()) & 0x7FFFFFFF


def case_arrays(case) -> dict:
    """Inputs and closed-form outputs of one case (see :data:`ARRAYS`)."""
    case = get_case(case)
    rng = np.random.default_rng(case_seed(case))
    path, target, marginal, d = case.path, case.target, case.marginal, case.dim
    n, m = N_ROWS, N_TEST
    special = [0.0, 2.0**-20, 0.5, 1.0 - 2.0**-20]
    if _finite_pair_velocity_at_one(path):
        special.insert(1, 1.0)
    t = _f32_exact(np.concatenate([special, rng.uniform(0.0, 1.0, n - len(special))]))
    x_1 = _f32_exact(target.sample(n, rng))
    x_0 = _f32_exact(rng.standard_normal((n, d)))
    xb_1, y, _ = target.sample_with_labels(n, rng)
    x = _f32_exact(path.sample(rng.standard_normal((n, d)), xb_1, t))
    y = y.astype(np.int64)
    y[::4] = -1
    n_data = (3 * m) // 4
    x_test = _f32_exact(np.concatenate([marginal.sample(n_data, 1.0, rng),
                                        rng.standard_normal((m - n_data, d))]))
    w = np.asarray(GUIDANCE_W, dtype=np.float64)

    ev = marginal.evaluate(x, t, ("log_prob", "velocity", "score", "divergence"))
    u_t_y = np.empty((n, d))
    for label in np.unique(y):
        rows = np.flatnonzero(y == label)
        u_t_y[rows] = case.conditional_marginal(int(label)).velocity(x[rows], t[rows])

    def conditional_field(tt, xx, yy):
        # tt is one float here; rows of x keep their own labels
        out = np.empty_like(xx)
        for label in np.unique(yy):
            rows = np.flatnonzero(yy == label)
            out[rows] = case.conditional_marginal(int(label)).velocity(xx[rows], t[rows])
        return out

    # eq 40 through refflow.solvers.guided_field (time is per row here, so the
    # field closes over t and ignores the scalar the solvers would pass)
    u_guided = np.stack([guided_field(conditional_field, y, wk, "notes")(0.0, x) for wk in w])
    d_sigma = np.asarray(path._d_sigma(t), dtype=np.float64)
    arrays = {
        "x_0": x_0, "x_1": x_1, "t": t, "x": x, "y": y, "w": w, "x_test": x_test,
        "alpha_t": np.asarray(path.alpha(t), dtype=np.float64),
        "sigma_t": np.asarray(path.sigma(t), dtype=np.float64),
        "d_alpha_t": np.asarray(path.d_alpha(t), dtype=np.float64),
        "d_sigma_t": d_sigma,
        "x_t": path.sample(x_0, x_1, t),
        "u_t_pair": path.pair_velocity(x_0, x_1, t),
        "u_t": ev["velocity"],
        "u_t_y": u_t_y,
        "u_guided": u_guided,
        "log_p_t": ev["log_prob"],
        "score": ev["score"],
        "divergence": ev["divergence"],
        "log_p_1": marginal.log_prob(x_test, 1.0),
        "target_weights": target.weights,
        "target_means": target.means,
        "target_covariances": target.covariances,
        "target_labels": target.labels.astype(np.int64),
    }
    for key, value in arrays.items():
        dtype = ARRAYS[key][2]
        arrays[key] = np.ascontiguousarray(np.asarray(value, dtype=np.dtype(dtype).newbyteorder("<")))
        if not np.all(np.isfinite(arrays[key])):
            raise RuntimeError(f"golden: non-finite values in {key!r} of case {case.name!r}")
    return arrays


def _npz_bytes(arrays: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for key in sorted(arrays):
            data = io.BytesIO()
            np.lib.format.write_array(data, np.ascontiguousarray(arrays[key]), allow_pickle=False)
            # a fixed date and attributes: np.savez would stamp the current time
            info = zipfile.ZipInfo(key + ".npy", date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_STORED
            info.create_system = 3
            info.external_attr = 0o644 << 16
            zf.writestr(info, data.getvalue())
    return buf.getvalue()


def write_npz(path: str, arrays: dict) -> str:
    """Write ``arrays`` as a reproducible ``.npz`` (readable by ``numpy.load``); return its SHA-256."""
    if not isinstance(arrays, dict) or not all(isinstance(k, str) for k in arrays):
        raise TypeError("arrays: expected a dict from str names to arrays")
    data = _npz_bytes(arrays)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def _conventions() -> dict:
    return {
        "time": "t in [0, 1]; t = 0 is the source p_0 = N(0, I), t = 1 the data q_1 "
                "(Lipman et al. 2023, facebookresearch/flow_matching, TorchCFM)",
        "path": "x_t = sigma_t x_0 + alpha_t x_1 (affine Gaussian path, eq 25-26); "
                "p_t(x | x_1) = N(alpha_t x_1, sigma_t^2 I)",
        "pair_velocity": "u_t(x_t | x_1) = sigma_t' x_0 + alpha_t' x_1 (eq 29); OT: x_1 - (1 - sigma_min) x_0 (eq 35)",
        "marginal": "q_1 = sum_k w_k N(m_k, C_k); p_t = sum_k w_k N(alpha_t m_k, alpha_t^2 C_k + sigma_t^2 I) "
                    "(eq 16); u_t = responsibility-weighted component fields (eq 19)",
        "log_likelihood": "log p_1(x) = log p_0(x_0) - int_0^1 div u_t(x_t) dt (eq 14) = closed-form log p_t at t = 1",
        "labels": "y = -1 is the null prompt (unconditional); y >= 0 a class (eq 38)",
        "guidance": "notes convention (eq 40): (1 - w) u_null + w u_y; the flow_matching convention "
                    "(1 + w') u_y - w' u_null is the same with w' = w - 1",
        "arrays": "npz (zip of .npy, uncompressed), little-endian float64 '<f8' and int64 '<i8', C order; "
                  "rows of x_0, x_1, t (and of x, y) correspond",
        "float32": "every input is exactly representable in float32",
        "comparison": "float64 implementations agree to ~1e-10 relative; float32 ones to ~1e-5",
    }


def manifest(cases=None, hashes=None) -> dict:
    """The manifest: conventions, array descriptions and one entry per case."""
    cases = [get_case(c) for c in (catalog() if cases is None else cases)]
    entries = []
    for case in cases:
        entries.append({
            "name": case.name,
            "file": case_file_name(case),
            "sha256": None if hashes is None else hashes[case.name],
            "seed": case_seed(case),
            "n": N_ROWS, "m": N_TEST, "k": len(GUIDANCE_W), "d": case.dim,
            "K": case.target.n_components,
            "path": {**case.path.config(), "formula": PATH_FORMULAS[case.path_name]},
            "target": case.target_name,
            "sigma_min": case.sigma_min,
            "kinds": list(case.kinds),
        })
    return {
        "format": FORMAT,
        "refflow_version": refflow.__version__,
        "numpy_version": np.__version__,
        "conventions": _conventions(),
        "arrays": {k: {"role": r, "shape": s, "dtype": dt, "meaning": m} for k, (r, s, dt, m) in ARRAYS.items()},
        "cases": entries,
    }


def write_golden(out_dir: str, cases=None) -> dict:
    """Write one ``.npz`` per case and ``manifest.json`` into ``out_dir``; return the manifest.

    Parameters
    ----------
    out_dir : str
        Folder (created if missing).  Existing files of the same names are
        replaced atomically.
    cases : list of str or Case, optional
        Default: the whole catalog.
    """
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir: expected a folder path, got {type(out_dir).__name__}")
    out_dir = os.fspath(out_dir)
    cases = [get_case(c) for c in (catalog() if cases is None else cases)]
    hashes = {}
    for case in cases:
        hashes[case.name] = write_npz(os.path.join(out_dir, case_file_name(case)), case_arrays(case))
    doc = manifest(cases, hashes)
    text = json.dumps(doc, indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(os.path.join(out_dir, "manifest.json"), text.encode("utf-8"))
    return doc
