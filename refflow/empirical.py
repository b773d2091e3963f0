r"""The exact empirical ("memorising") marginal field of a data set, streamed over the data.

For N data points :math:`x_1^{(j)}` with weights :math:`w_j` (uniform unless
given) and an affine path :math:`x_t = \sigma_t x_0 + \alpha_t x_1` (eq 26),
the marginal path of eq 16 is the mixture of point-mass conditionals

.. math::

    p_t(x) = \sum_{j=1}^N w_j\, \mathcal N\big(x \mid \alpha_t x_1^{(j)},\, \sigma_t^2 I\big),

and the marginal field of eq 19 is the posterior average of the conditional
fields of eq 31.  With the posterior weights
:math:`r_j(x, t) \propto w_j \mathcal N(x \mid \alpha_t x_1^{(j)}, \sigma_t^2 I)`,
their mean :math:`\bar x_1 = \sum_j r_j x_1^{(j)}` and :math:`b_t = \sigma_t\sigma_t'/\sigma_t^2`,

.. math::

    u_t(x) = \alpha_t' \bar x_1 + b_t\,(x - \alpha_t \bar x_1), \qquad
    \nabla \log p_t(x) = -\frac{x - \alpha_t \bar x_1}{\sigma_t^2},

    \nabla\cdot u_t(x) = d\, b_t + \frac{\alpha_t}{\sigma_t^2}\,(\alpha_t' - b_t \alpha_t)
        \Big(\sum_j r_j \lvert x_1^{(j)}\rvert^2 - \lvert \bar x_1\rvert^2\Big)

(the divergence: the trace of :math:`b_t I` plus :math:`\alpha_t' - b_t\alpha_t`
times the trace of :math:`\partial \bar x_1/\partial x`, which is the posterior
covariance of :math:`x_1` scaled by :math:`\alpha_t/\sigma_t^2`).  This is the
field that flow-matching training converges to when the network memorises the
training set (Bertrand et al. 2025; Lim 2025).

Streaming.  Everything above needs only four running sums per query point,
taken over the data block by block: with the logits
:math:`l_j = \log w_j - \lvert x - \alpha_t x_1^{(j)}\rvert^2 / (2\sigma_t^2)` (up to a
term that does not depend on j), keep the running maximum :math:`m`,
:math:`s = \sum_j e^{l_j - m}`, :math:`S_x = \sum_j e^{l_j - m} x_1^{(j)}` and
:math:`S_{xx} = \sum_j e^{l_j - m} \lvert x_1^{(j)}\rvert^2`.  Two partial results
:math:`(m_a, s_a, \dots)` and :math:`(m_b, s_b, \dots)` merge exactly: with
:math:`m = \max(m_a, m_b)`, every sum becomes
:math:`e^{m_a - m} s_a + e^{m_b - m} s_b` (:func:`merge`).  The same merge joins
the blocks of one process and the shards of a Dask cluster.  Memory is bounded
by the block sizes; no N × n matrix is ever held.

Inner work.  Expanding :math:`\lvert x - \alpha x_1\rvert^2 = \lvert x\rvert^2 - 2\alpha\, x\cdot x_1 + \alpha^2 \lvert x_1\rvert^2`,
the j-dependent part of every logit of a block is one matrix product of the
queries :math:`[\tfrac{\alpha}{\sigma^2} x,\; -\tfrac{\alpha^2}{2\sigma^2},\; 0,\; 1]`
with the block :math:`[x_1,\; \lvert x_1\rvert^2,\; 1,\; \log w]`; the weighted
sums are a second product of the exponentiated logits with the same block
(its column of ones gives s, its column of squared norms gives S_xx).  The data
are centred on the mean of their first rows before this (the logits do not
change; the cancellation in the expanded square does shrink).

Backends (:mod:`refflow.backend`): the work runs in the array module of the
query points ``x``.  The data may live on the host (an array, a memory-mapped
``.npy``) while ``x`` is on the GPU: each block is then copied to the device
as it is read -- that copy is the point of streaming a data set larger than the
device's memory.  A GPU data array with host queries is refused.
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple

import numpy as np

from refflow._validation import check_points, check_scalar, check_time, exact
from refflow.backend import backend_name, is_device_array, namespace_of, same_backend, to_host
from refflow.paths import AffinePath

__all__ = [
    "Partial",
    "merge",
    "merge_all",
    "partial_sums",
    "finish",
    "evaluate",
    "StreamingEmpirical",
    "StreamingMarginal",
    "nearest_distances",
    "load_points",
    "digits",
    "NAMES",
]

NAMES = ("log_prob", "velocity", "score", "divergence")
"""The quantities :func:`evaluate` can return."""

_LOG_2PI = math.log(2.0 * math.pi)
# Elements of one (queries x data rows) block of logits: 2**22 float64 is 32 MiB on the
# CPU; on a GPU a bigger block keeps the device busy (2**26: 512 MiB).
_BLOCK_ELEMENTS = 1 << 22
_BLOCK_ELEMENTS_DEVICE = 1 << 26
# Elements of one block of data rows on the CPU (8 MiB of float64).
_DATA_BLOCK_ELEMENTS = 1 << 20
# Queries are taken this many at a time against each data block.
_QUERY_CHUNK = 2048
_EXP_FLOOR = -700.0
# The data are centred on the mean of this many first rows (fixed, so the result does
# not depend on the block size or on the sharding).
_CENTER_ROWS = 1024


class Partial(NamedTuple):
    r"""Running log-sum-exp sums of one slice of the data, per query point.

    All four share the shift ``m``: ``s`` :math:`= \sum_j e^{l_j - m}`,
    ``s_x`` :math:`= \sum_j e^{l_j - m} (x_1^{(j)} - c)` and ``s_xx``
    :math:`= \sum_j e^{l_j - m} \lvert x_1^{(j)} - c\rvert^2`, where c is the
    centre the data were shifted by.  An empty slice has ``m = -inf`` and
    zero sums.  Partials merge (:func:`merge`) only when they were made for
    the same queries, times, path and centre.
    """

    m: object      # (n,)
    s: object      # (n,)
    s_x: object    # (n, d) or None when only log p_t was asked for
    s_xx: object   # (n,) or None


def _rescale(xp, m_part, m):
    """exp(m_part - m), with 0 where m_part = -inf (an empty part) and m_part = m = -inf."""
    m_safe = xp.where(xp.isfinite(m), m, 0.0)
    return xp.exp(m_part - m_safe)


def merge(a: Partial, b: Partial) -> Partial:
    r"""Combine the partial sums of two disjoint slices of the data, exactly.

    With :math:`m = \max(m_a, m_b)` each sum is
    :math:`e^{m_a - m}\,\Sigma_a + e^{m_b - m}\,\Sigma_b`: both factors are at
    most 1 (one of them is exactly 1), so nothing overflows, and the result
    equals the sums taken over the union in one go up to rounding.
    """
    xp = namespace_of(a.m, b.m)
    m = xp.maximum(a.m, b.m)
    ca, cb = _rescale(xp, a.m, m), _rescale(xp, b.m, m)
    s = ca * a.s + cb * b.s
    if a.s_x is None or b.s_x is None:
        return Partial(m, s, None, None)
    s_x = ca[:, None] * a.s_x + cb[:, None] * b.s_x
    s_xx = ca * a.s_xx + cb * b.s_xx
    return Partial(m, s, s_x, s_xx)


def merge_all(parts) -> Partial:
    """:func:`merge` of a sequence of partials, left to right (the order fixes the rounding)."""
    parts = list(parts)
    if not parts:
        raise ValueError("parts: expected at least one Partial, got none")
    out = parts[0]
    for part in parts[1:]:
        out = merge(out, part)
    return out


# -- data -------------------------------------------------------------------------------

def _check_data(data, name="data"):
    """The data as an (N, d) array (host, memory-mapped or CuPy), without reading it all."""
    if isinstance(data, (str, os.PathLike)):
        data = load_points(data)
    if not (isinstance(data, np.ndarray) or is_device_array(data)):
        data = check_points(data, name)
    if data.dtype == object or not (np.issubdtype(data.dtype, np.floating) or np.issubdtype(data.dtype, np.integer)):
        raise TypeError(f"{name}: expected a real numeric array of shape (N, d), got dtype {data.dtype}")
    if data.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array of shape (N, d), got shape {data.shape}")
    if data.shape[0] == 0 or data.shape[1] == 0:
        raise ValueError(f"{name}: expected at least one point of at least one coordinate, got shape {data.shape}")
    return data


def _check_weights(weights, N):
    """Weights of the N points as float64 (N,) on the host: finite, >= 0, summing to 1."""
    if weights is None:
        return None
    try:
        w = np.asarray(to_host(weights), dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"weights: expected {N} real numbers, got {type(weights).__name__}") from None
    if w.shape != (N,):
        raise ValueError(f"weights: expected shape ({N},) to match data, got shape {w.shape}")
    bad = ~(np.isfinite(w) & (w >= 0))
    if np.any(bad):
        i = int(np.argmax(bad))
        raise ValueError(f"weights: expected finite non-negative values, got {exact(w[i])} at index {i}")
    total = float(w.sum())
    if abs(total - 1.0) > 1e-12 * N:
        raise ValueError(f"weights: expected values summing to 1 (within {exact(1e-12 * N)}), got sum {exact(total)}")
    return w


def _read_block(xp, data, start, stop):
    """Rows [start, stop) of the data as float64 in module xp, refused when not finite."""
    block = data[start:stop]
    if xp is not np and not is_device_array(block):
        block = xp.asarray(np.asarray(block, dtype=np.float64))  # host -> device, block by block
    block = block.astype(np.float64, copy=isinstance(block, np.memmap))  # a memmap's rows: copied out
    _release_pages(data)
    if not bool(xp.all(xp.isfinite(block))):
        bad = int(block.size - int(xp.count_nonzero(xp.isfinite(block))))
        raise ValueError(f"data: expected finite values, got {bad} NaN or inf entries in rows {start} to {stop - 1}")
    return block


def _release_pages(data):
    """Let the kernel drop the pages of a memory-mapped file already read (they would count as ours).

    Without this a pass over a memory-mapped data set leaves the whole file resident in
    this process, so its memory would grow with N; the block was copied out before.
    """
    mm = getattr(data, "_mmap", None)  # numpy.memmap keeps its mmap.mmap here
    if mm is None or not hasattr(mm, "madvise"):
        return
    try:
        import mmap

        mm.madvise(mmap.MADV_DONTNEED)
    except (AttributeError, OSError, ValueError):
        pass


def default_center(data):
    """The mean of the data's first rows (host float64, shape (d,)): the shift applied before the products."""
    head = np.asarray(to_host(data[:_CENTER_ROWS]), dtype=np.float64)
    if not np.all(np.isfinite(head)):
        bad = int(head.size - np.count_nonzero(np.isfinite(head)))
        raise ValueError(f"data: expected finite values, got {bad} NaN or inf entries in the first {head.shape[0]} rows")
    return head.mean(axis=0)


# -- the schedule at the query times ----------------------------------------------------

def _schedule(xp, path, t, n):
    """alpha, sigma^2, alpha', sigma sigma' at t: Python floats for a scalar t, (n,) arrays of xp for a vector."""
    values = (path._alpha(t), path._sigma(t) ** 2, path._d_alpha(t), path._sigma_d_sigma(t))
    if getattr(t, "ndim", 0) == 0:
        return tuple(float(to_host(v)) for v in values)
    return tuple(xp.broadcast_to(xp.asarray(v, dtype=np.float64), (n,)) for v in values)


def _require_positive_sigma(path, t, sigma2):
    if bool(namespace_of(sigma2).any(namespace_of(sigma2).asarray(sigma2) <= 0)):
        s2, tt = np.asarray(to_host(sigma2)), np.asarray(to_host(t))  # error path only
        at = float(np.ravel(np.broadcast_to(tt, s2.shape))[np.argmax(np.ravel(s2 <= 0))])
        raise ValueError(
            "t: the marginal of a point set is singular where sigma_t = 0 "
            f"(here at t = {at!r}); expected t with sigma_t > 0, e.g. t < 1 or sigma_min > 0"
        )


def _col(v):
    return v if isinstance(v, float) else v[:, None]


def _rows(v, rows):
    return v if isinstance(v, float) else v[rows]


def _validate_queries(data, x, t, path):
    if not isinstance(path, AffinePath):
        raise TypeError(f"path: expected a refflow.paths.AffinePath, got {type(path).__name__}")
    d = data.shape[1]
    if is_device_array(data) and not is_device_array(x):
        raise TypeError("data: a CuPy (GPU) data array needs CuPy query points x; move x with "
                        "refflow.backend.to_device(x, 'cupy'), or pass the data on the host to stream it")
    xp = namespace_of(x, t)
    x = check_points(x, "x", d)
    n = x.shape[0]
    t = check_time(t, n, "t")
    if t.ndim == 1:
        same_backend(xp, t, "t")
    return xp, x, t


def _block_rows(xp, n_queries, block_size, d=1):
    """Data rows per block: the given ``block_size``, else as many as keep both the block of
    logits and the data block itself (about 8 MiB on the CPU, so it stays in cache) in budget."""
    if block_size is not None:
        return check_scalar(block_size, "block_size", low=1, integer=True)
    device = xp is not np
    budget = _BLOCK_ELEMENTS_DEVICE if device else _BLOCK_ELEMENTS
    by_logits = budget // max(1, min(n_queries, _QUERY_CHUNK))
    by_data = (_BLOCK_ELEMENTS_DEVICE if device else _DATA_BLOCK_ELEMENTS) // (d + 3)
    return max(1, min(by_logits, by_data))


# -- the streamed sums ------------------------------------------------------------------

def partial_sums(data, x, t, path, *, weights=None, rows=None, center=None, block_size=None,
                 sums=True, _control=None) -> Partial:
    r"""The running log-sum-exp sums of the empirical field over ``data[rows]`` (all rows by default).

    Parameters
    ----------
    data : array (N, d), memory-mapped array, or path of a ``.npy``/``.npz``
        The data points :math:`x_1^{(j)}`; read ``block_size`` rows at a time.
    x : array (n, d)
        Query points (NumPy or CuPy: the work runs there).
    t : float or array (n,)
        Times in [0, 1] with :math:`\sigma_t > 0`.
    path : refflow.paths.AffinePath
    weights : array (N,), optional
        Weights of all N points (summing to 1); uniform when omitted.
    rows : slice, optional
        The slice of the data to sum over (a shard); its weights are ``weights[rows]``.
    center : array (d,), optional
        The shift c of the data (:func:`default_center` when omitted); partials
        merge only when made with the same centre.
    block_size : int, optional
        Data rows per block (default: a block of logits of about 32 MiB on the CPU).
    sums : bool
        False: only ``m`` and ``s`` (enough for :math:`\log p_t`); one product per block.

    Returns
    -------
    Partial
        With the uniform weight :math:`1/N` left out (:func:`finish` adds it).
    """
    data = _check_data(data)
    xp, x, t = _validate_queries(data, x, t, path)
    N, d = data.shape
    w = _check_weights(weights, N)
    n = x.shape[0]
    rows = slice(0, N) if rows is None else rows
    start, stop, step = rows.indices(N)
    if step != 1:
        raise ValueError(f"rows: expected a contiguous slice (step 1), got step {step}")
    c = default_center(data) if center is None else np.asarray(to_host(center), dtype=np.float64)
    if c.shape != (d,):
        raise ValueError(f"center: expected shape ({d},), got shape {c.shape}")
    alpha, sigma2, _, _ = _schedule(xp, path, t, n)
    _require_positive_sigma(path, t, sigma2)
    c_xp = xp.asarray(c)
    B = _block_rows(xp, n, block_size, d)
    weighted = w is not None

    # The queries' side of the product: [a (x - alpha c), -a alpha / 2, 0, (1)], a = alpha / sigma^2.
    a = alpha / sigma2
    width = d + 2 + (1 if weighted else 0)
    Q = xp.zeros((n, width))
    Q[:, :d] = _col(a) * (x - _col(alpha) * c_xp[None, :])
    Q[:, d] = -0.5 * a * alpha
    if weighted:
        Q[:, d + 2] = 1.0

    chunks = [slice(i, min(n, i + _QUERY_CHUNK)) for i in range(0, n, _QUERY_CHUNK)] or [slice(0, 0)]
    running = [None] * len(chunks)
    for lo in range(start, max(start, stop), B):
        hi = min(stop, lo + B)
        A = xp.empty((hi - lo, width))
        y = A[:, :d]
        xp.subtract(_read_block(xp, data, lo, hi), c_xp[None, :], out=y)  # written in place: no temporary
        A[:, d] = xp.einsum("ij,ij->i", y, y)
        A[:, d + 1] = 1.0
        if weighted:
            wb = w[lo:hi]
            keep = wb > 0  # a zero weight is a point that is not there
            if not keep.all():
                A = A[xp.asarray(keep)]
                wb = wb[keep]
                if A.shape[0] == 0:
                    continue
            A[:, d + 2] = xp.asarray(np.log(wb))
        for k, q in enumerate(chunks):
            part = _block_partial(xp, Q[q], A, d, sums, _control)
            join = _merge_unshifted if _control == "merge-drops-max" else merge
            running[k] = part if running[k] is None else join(running[k], part)
    out = []
    for k, q in enumerate(chunks):
        if running[k] is None:  # an empty slice
            m_q = q.stop - q.start
            running[k] = Partial(xp.full(m_q, -np.inf), xp.zeros(m_q),
                                 xp.zeros((m_q, d)) if sums else None, xp.zeros(m_q) if sums else None)
        out.append(running[k])
    if len(out) == 1:
        return out[0]
    return Partial(*(None if out[0][i] is None else xp.concatenate([p[i] for p in out], axis=0) for i in range(4)))


def _block_partial(xp, Q, A, d, sums, control):
    """One block: the logits by one product, shifted by their row maximum, exponentiated, summed by a second."""
    logits = Q @ A.T                          # (n_chunk, B): the j-dependent part of every logit
    m = xp.max(logits, axis=1)
    if control == "unshifted":
        m = xp.zeros_like(m)                  # planted bug: exp without the shift over- and underflows
    logits -= m[:, None]
    # exp is several times slower where its result underflows (the subnormal range);
    # a term below e**-700 is below 1e-304 of the row's largest (which is 1): flooring
    # it there changes no sum by more than N * 1e-304 of itself.
    xp.maximum(logits, _EXP_FLOOR, out=logits)
    e = xp.exp(logits, out=logits)
    if not sums:
        return Partial(m, e @ A[:, d + 1], None, None)
    S = e @ A[:, :d + 2]                      # [sum e y, sum e |y|^2, sum e]
    return Partial(m, S[:, d + 1], S[:, :d], S[:, d])


def _merge_unshifted(a, b):
    # Planted bug for the negative control: the sums are added without rescaling to a common max.
    xp = namespace_of(a.m, b.m)
    sx = None if a.s_x is None else a.s_x + b.s_x
    sxx = None if a.s_xx is None else a.s_xx + b.s_xx
    return Partial(xp.maximum(a.m, b.m), a.s + b.s, sx, sxx)


def finish(part: Partial, x, t, path, center, N, names=NAMES, *, weighted=False) -> dict:
    r"""The field from the merged sums of all the data (eq 16, 19; formulas in the module docstring).

    ``N`` is the number of points (for the uniform weight 1/N; ignored when
    ``weighted``, whose partials already hold :math:`\log w_j`).
    """
    xp = namespace_of(x)
    n, d = x.shape
    alpha, sigma2, d_alpha, sigma_d_sigma = _schedule(xp, path, t, n)
    c = xp.asarray(np.asarray(to_host(center), dtype=np.float64))
    xc = x - _col(alpha) * c[None, :]
    out = {}
    if "log_prob" in names:
        log_w = 0.0 if weighted else -math.log(N)
        out["log_prob"] = (part.m + xp.log(part.s) + log_w - xp.sum(xc * xc, axis=1) / (2.0 * sigma2)
                           - 0.5 * d * (_LOG_2PI + xp.log(xp.asarray(sigma2))))
    if set(names) - {"log_prob"}:
        y_bar = part.s_x / part.s[:, None]                        # posterior mean of x_1 - c
        resid = xc - _col(alpha) * y_bar                          # x - alpha_t x_bar
        b = sigma_d_sigma / sigma2
        if "score" in names:
            out["score"] = -resid / _col(sigma2)
        if "velocity" in names:
            out["velocity"] = _col(d_alpha) * (c[None, :] + y_bar) + _col(b) * resid
        if "divergence" in names:
            # trace of the posterior covariance of x_1; >= 0, rounding aside
            spread = xp.maximum(part.s_xx / part.s - xp.sum(y_bar * y_bar, axis=1), 0.0)
            out["divergence"] = d * b + (alpha / sigma2) * (d_alpha - b * alpha) * spread
    return {k: out[k] for k in names}


def _check_names(names):
    if isinstance(names, str):
        names = (names,)
    names = tuple(names)
    bad = [k for k in names if k not in NAMES]
    if bad or not names:
        raise ValueError(f"names: expected a non-empty subset of {list(NAMES)}, got {list(names)!r}")
    return names


def evaluate(data, x, t, path, names=NAMES, *, weights=None, block_size=None, center=None,
             scheduler=None, client=None, n_workers=2, shards=None) -> dict:
    r"""The empirical marginal :math:`\log p_t`, :math:`u_t`, score and divergence at ``x`` (eq 16, 19).

    Streamed over the data in blocks (:func:`partial_sums`), in this process
    by default, or sharded over Dask workers.

    Parameters
    ----------
    data, x, t, path, weights, block_size, center
        As in :func:`partial_sums`.
    names : sequence of str
        A subset of ``("log_prob", "velocity", "score", "divergence")``.
    scheduler : None, "local" or str
        None: this process.  ``"local"``: a ``dask.distributed.LocalCluster``
        of ``n_workers`` workers, started and closed here.  Any other string:
        the address of a running scheduler (``"tcp://host:8786"``).
    client : dask.distributed.Client, optional
        A client to use instead (not closed here).
    n_workers : int
        Workers of the local cluster.
    shards : int, optional
        Slices of the data, one task each (default: the number of workers).
        A data file given by its path is opened by each worker (a shared file
        system); an in-memory array is sent to the workers shard by shard.

    Returns
    -------
    dict of arrays, one per name: (n,) for log_prob and divergence, (n, d) for velocity and score.
    """
    names = _check_names(names)
    source = data
    data = _check_data(data)
    xp, x, t = _validate_queries(data, x, t, path)
    N = data.shape[0]
    w = _check_weights(weights, N)
    c = default_center(data) if center is None else np.asarray(to_host(center), dtype=np.float64)
    sums = bool(set(names) - {"log_prob"})
    kw = dict(center=c, block_size=block_size, sums=sums)
    if scheduler is None and client is None:
        part = partial_sums(data, x, t, path, weights=w, **kw)
    else:
        if xp is not np:
            raise TypeError("x: the Dask workers run on NumPy; move x to the host with refflow.backend.to_host")
        part = _dask_partial(source, data, x, t, path, w, kw, scheduler, client, n_workers, shards)
    return finish(part, x, t, path, c, N, names, weighted=w is not None)


# -- Dask ---------------------------------------------------------------------------------

def shard_rows(N, shards):
    """``shards`` contiguous slices covering range(N), as equal as possible (the first ones one longer)."""
    shards = check_scalar(shards, "shards", low=1, integer=True)
    edges = [N * i // shards for i in range(shards + 1)]
    return [slice(edges[i], edges[i + 1]) for i in range(shards) if edges[i + 1] > edges[i]]


def _dask_partial(source, data, x, t, path, w, kw, scheduler, client, n_workers, shards):
    if client is None and not (isinstance(scheduler, str) and scheduler):
        raise TypeError(f"scheduler: expected None, 'local' or a scheduler address, got {scheduler!r}")
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise ImportError('scheduler/client: sharding over Dask needs dask.distributed; '
                          'install the extra with pip install -e ".[dask]"') from None
    own_cluster = own_client = None
    try:
        if client is None:
            if scheduler == "local":
                n_workers = check_scalar(n_workers, "n_workers", low=1, integer=True)
                own_cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=False,
                                           dashboard_address=":0")
                own_client = client = Client(own_cluster)
            elif isinstance(scheduler, str) and scheduler:
                own_client = client = Client(scheduler)
            else:
                raise TypeError(f"scheduler: expected None, 'local' or a scheduler address, got {scheduler!r}")
        if shards is None:
            shards = max(1, len(client.scheduler_info().get("workers", {})))
        N = data.shape[0]
        from_file = isinstance(source, (str, os.PathLike))
        futures = []
        for rows in shard_rows(N, shards):
            w_shard = None if w is None else w[rows]
            if from_file:
                futures.append(client.submit(_weighted_shard, os.fspath(source), rows, x, t, path, w_shard, kw,
                                             pure=False))
            else:
                shard = client.scatter(np.ascontiguousarray(data[rows]))
                futures.append(client.submit(_weighted_shard, shard, rows, x, t, path, w_shard, kw, pure=False))
        parts = client.gather(futures)
    finally:
        if own_client is not None:
            own_client.close()
        if own_cluster is not None:
            own_cluster.close()
    return merge_all(parts)  # in shard order, so the rounding does not depend on which worker finished first


def _weighted_shard(source, rows, x, t, path, w_shard, kw):
    """A shard's partial; weights renormalised on the shard and their total's log put back into m."""
    if isinstance(source, (str, os.PathLike)):
        data, local = load_points(source), rows
    else:
        data, local = source, slice(0, rows.stop - rows.start)
    if w_shard is None:
        return partial_sums(data, x, t, path, weights=None, rows=local, **kw)
    total = float(w_shard.sum())
    if total == 0:
        n = x.shape[0]
        d = x.shape[1]
        return Partial(np.full(n, -np.inf), np.zeros(n), np.zeros((n, d)) if kw["sums"] else None,
                       np.zeros(n) if kw["sums"] else None)
    full = np.zeros(data.shape[0])
    full[local] = w_shard / total
    part = partial_sums(data, x, t, path, weights=full, rows=local, **kw)
    return part._replace(m=part.m + math.log(total))


# -- a target-like object ----------------------------------------------------------------

class StreamingEmpirical:
    r"""A data set as the target :math:`q_1 = \sum_j w_j \delta_{x_1^{(j)}}`, its field streamed.

    The same marginal as :class:`refflow.targets.Empirical`, without holding an
    N × n matrix: ``StreamingEmpirical(data).marginal(path)`` has the methods
    ``log_prob``, ``velocity``, ``score``, ``divergence`` and ``evaluate``.

    Parameters
    ----------
    data : array (N, d), memory-mapped array, or path of a ``.npy``/``.npz``
    weights : array (N,), optional
    block_size : int, optional
        Data rows per block.
    """

    def __init__(self, data, weights=None, *, block_size=None):
        self.source = data
        self.data = _check_data(data)
        self.weights = _check_weights(weights, self.data.shape[0])
        self.block_size = None if block_size is None else check_scalar(block_size, "block_size", low=1, integer=True)
        self.center = default_center(self.data)

    @property
    def dim(self) -> int:
        return int(self.data.shape[1])

    @property
    def n_points(self) -> int:
        return int(self.data.shape[0])

    def marginal(self, path: AffinePath) -> "StreamingMarginal":
        if not isinstance(path, AffinePath):
            raise TypeError(f"path: expected a refflow.paths.AffinePath, got {type(path).__name__}")
        return StreamingMarginal(self, path)

    def __repr__(self):
        return f"StreamingEmpirical(N={self.n_points}, d={self.dim}, backend={backend_name(namespace_of(self.data))})"


class StreamingMarginal:
    """The marginal path and field of a :class:`StreamingEmpirical` on ``path`` (eq 16, 19)."""

    def __init__(self, target: StreamingEmpirical, path: AffinePath):
        self.target = target
        self.path = path

    @property
    def dim(self) -> int:
        return self.target.dim

    def evaluate(self, x, t, names=NAMES, **dask):
        """Several quantities in one pass over the data; ``dask`` takes ``scheduler``, ``client``, ... of :func:`evaluate`."""
        tg = self.target
        source = tg.source if isinstance(tg.source, (str, os.PathLike)) else tg.data
        return evaluate(source, x, t, self.path, names, weights=tg.weights, block_size=tg.block_size,
                        center=tg.center, **dask)

    def log_prob(self, x, t):
        r""":math:`\log p_t(x)`; returns (n,)."""
        return self.evaluate(x, t, ("log_prob",))["log_prob"]

    def velocity(self, x, t):
        r""":math:`u_t(x)` of eq 19; returns (n, d)."""
        return self.evaluate(x, t, ("velocity",))["velocity"]

    def score(self, x, t):
        r""":math:`\nabla_x \log p_t(x)`; returns (n, d)."""
        return self.evaluate(x, t, ("score",))["score"]

    def divergence(self, x, t):
        r""":math:`\nabla\cdot u_t(x)`; returns (n,)."""
        return self.evaluate(x, t, ("divergence",))["divergence"]

    def field(self):
        """The field as a callable ``(t, x) -> u`` for the solvers."""
        return lambda t, x: self.velocity(x, t)


# -- nearest training points -------------------------------------------------------------

def nearest_distances(data, x, *, k=2, block_size=None):
    r"""Distances from each row of ``x`` to its ``k`` nearest data points, streamed; returns (dist, index).

    The candidates are found block by block from
    :math:`\lvert x\rvert^2 - 2 x\cdot x_1 + \lvert x_1\rvert^2` (one product per
    block); the distances returned are then recomputed directly from the
    chosen points, so an exact copy of a training point has distance 0.
    ``dist`` and ``index`` have shape (n, k), nearest first.
    """
    data = _check_data(data)
    N, d = data.shape
    xp = namespace_of(x)
    x = check_points(x, "x", d)
    k = check_scalar(k, "k", low=1, high=N, integer=True)
    n = x.shape[0]
    B = _block_rows(xp, n, block_size, d)
    best_d2 = xp.full((n, k), np.inf)
    best_i = xp.zeros((n, k), dtype=np.int64)
    x2 = xp.sum(x * x, axis=1)
    for lo in range(0, N, B):
        hi = min(N, lo + B)
        y = _read_block(xp, data, lo, hi)
        d2 = x2[:, None] - 2.0 * (x @ y.T) + xp.sum(y * y, axis=1)[None, :]
        cand_d2 = xp.concatenate([best_d2, d2], axis=1)
        cand_i = xp.concatenate([best_i, xp.broadcast_to(xp.arange(lo, hi), (n, hi - lo))], axis=1)
        pick = xp.argpartition(cand_d2, k - 1, axis=1)[:, :k]
        best_d2 = xp.take_along_axis(cand_d2, pick, axis=1)
        best_i = xp.take_along_axis(cand_i, pick, axis=1)
    idx_host = np.asarray(to_host(best_i))
    flat = idx_host.ravel()
    order = np.argsort(flat, kind="stable")
    rows = np.empty((flat.size, d))
    chosen = np.sort(flat)  # a memmap reads its rows in order
    picked = data[xp.asarray(chosen)] if is_device_array(data) else data[chosen]
    rows[order] = np.asarray(to_host(picked), dtype=np.float64)
    pts = xp.asarray(rows).reshape(n, k, d)
    dist = xp.sqrt(xp.sum((x[:, None, :] - pts) ** 2, axis=2))
    resort = xp.argsort(dist, axis=1, kind="stable")
    return xp.take_along_axis(dist, resort, axis=1), xp.take_along_axis(best_i, resort, axis=1)


# -- loading data ---------------------------------------------------------------------------

def load_points(source, key=None):
    """Data points from a ``.npy`` (memory-mapped, read block by block) or a ``.npz`` (loaded).

    A ``.npz`` needs ``key`` unless it holds one array (or an array named ``x_1``).
    """
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data: {path!r} does not exist")
    lower = path.lower()
    try:
        if lower.endswith(".npy"):
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        elif lower.endswith(".npz"):
            with np.load(path, allow_pickle=False) as z:
                keys = list(z.keys())
                if key is None:
                    key = keys[0] if len(keys) == 1 else ("x_1" if "x_1" in keys else None)
                if key not in keys:
                    raise ValueError(f"key: expected one of {keys} for {path!r}, got {key!r}")
                arr = z[key]
        else:
            raise ValueError(f"data: expected a .npy or .npz file, got {path!r}")
    except (OSError, EOFError) as exc:
        raise ValueError(f"data: {path!r} is not a readable NumPy file ({exc})") from None
    if arr.ndim != 2:
        raise ValueError(f"data: expected a 2-D array of shape (N, d) in {path!r}, got shape {arr.shape}")
    return arr


def digits():
    """scikit-learn's handwritten digits (N = 1797, d = 64), pixels 0..16 scaled to [-1, 1].

    Needs the optional extra ``data`` (``pip install -e ".[data]"``, scikit-learn).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError('digits: needs scikit-learn; install the extra with pip install -e ".[data]"') from None
    return load_digits().data.astype(np.float64) / 8.0 - 1.0
