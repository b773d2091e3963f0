"""Numba kernels for the elementwise work of the MLP.

The matrix products of the MLP are left to NumPy's ``@`` (BLAS).  What this
module fuses is the elementwise work around them, which would otherwise cost
several passes over memory and several temporary arrays per layer:

* forward: bias add, activation and (when a VJP will follow) the activation
  derivative, in one pass (``bias_act``, ``bias_act_d1``);
* VJP: multiplication by the stored derivative and the bias-gradient column
  sum, in one pass (:func:`dact_colsum`);
* exact divergence: the values and the ``d`` tangent directions of every layer
  stacked into one ``((1 + d) n, H)`` matrix, so that one product per layer
  propagates all of them; the kernels here apply the activation to the value
  block and its derivative to the tangent blocks (``div_first``,
  ``div_layer``), and the reverse of those two steps
  (:func:`div_first_bwd`, :func:`div_layer_bwd`).

The kernels that evaluate the activation exist once per activation
(``KERNELS["silu"].bias_act_d1``, ...), so that their loops carry no branch on
the activation and vectorise.  Every kernel is compiled on first use, once per
dtype (float32, float64), and cached on disk (``cache=True``); arrays are
always passed C-contiguous so no other specialisation is made.

Options: ``error_model="numpy"`` (a float division by zero gives inf instead
of raising: one branch less per division, which lets LLVM vectorise) and
``fastmath={"contract"}`` (fused multiply-add allowed; no reassociation, no
assumption about NaN or inf).

Fast exponential
----------------
Numba has no vectorised ``exp`` without Intel SVML, and a scalar libm call per
element costs as much as the matrix product at width 256.  The sigmoid needs
``exp(-|z|)`` only, an argument <= 0, for which :func:`exp_nonpos` evaluates

.. math::  e^{x} = 2^{k} e^{r}, \\quad k = \\mathrm{round}(x / \\ln 2),
           \\quad r = x - k \\ln 2 \\in [-\\ln 2 / 2, \\ln 2 / 2],

with a Taylor polynomial for :math:`e^r` (degree 13 in float64: truncation
:math:`0.35^{14}/14! < 10^{-17}`; degree 7 in float32: :math:`0.35^8/8! < 10^{-8}`)
and :math:`2^k` built from its exponent bits.  The loop then vectorises (AVX2).
Measured accuracy: a few ulp (tested in ``tests/test_nn.py``).  Arguments
below -708 (float64) or -87 (float32) are clamped there; the result is then
below 1e-307 (1e-37) instead of smaller, which changes a sigmoid by less than
that absolute amount.
"""
from __future__ import annotations

import math
from fractions import Fraction
from types import SimpleNamespace

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

__all__ = [
    "SILU", "TANH", "RELU", "SOFTPLUS", "ACTIVATION_CODES", "KERNELS",
    "exp_nonpos_array", "dact_colsum", "div_first_bwd", "div_layer_bwd",
    "scatter_add_rows",
]

SILU, TANH, RELU, SOFTPLUS = 0, 1, 2, 3
ACTIVATION_CODES = {"silu": SILU, "tanh": TANH, "relu": RELU, "softplus": SOFTPLUS}

_JIT = dict(cache=True, nogil=True, error_model="numpy", fastmath={"contract"})


# --------------------------------------------------------------------------
# bit casts (scalar, inlined, vectorisable)
# --------------------------------------------------------------------------

@intrinsic
def _f64_bits(typingctx, x):
    """Reinterpret a float64 as its int64 bit pattern."""
    sig = types.int64(types.float64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return sig, codegen


@intrinsic
def _f64_from_bits(typingctx, k):
    """Reinterpret an int64 bit pattern as a float64."""
    sig = types.float64(types.int64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return sig, codegen


@intrinsic
def _f32_bits(typingctx, x):
    """Reinterpret a float32 as its int32 bit pattern, widened to int64."""
    sig = types.int64(types.float32)

    def codegen(context, builder, signature, args):
        bits = builder.bitcast(args[0], ir.IntType(32))
        return builder.sext(bits, ir.IntType(64))

    return sig, codegen


@intrinsic
def _f32_from_bits(typingctx, k):
    """Reinterpret the low 32 bits of an int64 as a float32."""
    sig = types.float32(types.int64)

    def codegen(context, builder, signature, args):
        low = builder.trunc(args[0], ir.IntType(32))
        return builder.bitcast(low, ir.FloatType())

    return sig, codegen


# --------------------------------------------------------------------------
# scalar helpers, one implementation per float width (constants of that width
# so that float32 work stays in float32)
# --------------------------------------------------------------------------

_LN2 = Fraction("0.69314718055994530941723212145817656807550013436026")


def _split_ln2(bits):
    """ln 2 = hi + lo with ``hi`` on ``bits`` binary digits, so that ``k * hi`` is
    exact for the exponents ``k`` in use (Cody and Waite's range reduction)."""
    hi = Fraction(math.floor(_LN2 * 2**bits), 2**bits)
    return float(hi), float(_LN2 - hi)


def _make_scalar_helpers(ft):
    """Build exp / activation helpers whose constants have float type ``ft``.

    Returns plain Python functions; numba's ``@overload`` (below) compiles them
    inside each kernel, where LLVM inlines them and vectorises the loop.
    """
    zero, one, two, four = ft(0.0), ft(1.0), ft(2.0), ft(4.0)
    if ft is np.float64:
        # round-to-integer by adding 1.5 * 2**52: the integer lands in the low
        # mantissa bits, and (bits + bias) << 52 is the exponent field of 2**k.
        magic, bias, shift = ft(1.5 * 2.0**52), 1023, 52
        lowest = ft(-708.0)
        ln2_hi, ln2_lo = (ft(v) for v in _split_ln2(32))
        n_exp, n_expm1, n_atanh = 13, 13, 11
        from_bits, bits = _f64_from_bits, _f64_bits
    else:
        magic, bias, shift = ft(1.5 * 2.0**23), 127, 23
        lowest = ft(-87.0)
        ln2_hi, ln2_lo = (ft(v) for v in _split_ln2(12))
        n_exp, n_expm1, n_atanh = 7, 7, 6
        from_bits, bits = _f32_from_bits, _f32_bits
    inv_ln2 = ft(1.0 / math.log(2.0))
    half_ln2 = ft(-0.5 * math.log(2.0))
    ln2 = ft(math.log(2.0))
    three = ft(3.0)
    sqrt2_m1 = ft(math.sqrt(2.0) - 1.0)
    # Horner coefficients, highest degree first (at most 16 of them: longer
    # constant tuples are not unrolled by LLVM and the loop stops vectorising):
    #   e^r   = sum_{i <= n_exp} r^i / i!,            |r| <= ln2 / 2
    #   (e^x - 1) / x = sum_{i < n_expm1} x^i / (i + 1)!,  -ln2 / 2 <= x <= 0
    #   atanh(w) / w  = sum_{i < n_atanh} q^i / (2 i + 1),  q = w^2 <= 0.0295
    #     (truncation q^11 / 23 < 1e-18 in float64, q^6 / 13 < 1e-10 in float32)
    c_exp = tuple(ft(1.0 / math.factorial(i)) for i in range(n_exp, -1, -1))
    c_expm1 = tuple(ft(1.0 / math.factorial(i + 1)) for i in range(n_expm1 - 1, -1, -1))
    c_atanh = tuple(ft(1.0 / (2 * i + 1)) for i in range(n_atanh - 1, -1, -1))

    @numba.njit
    def horner(coeffs, r):
        p = zero
        for c in coeffs:  # a constant tuple: the loop is unrolled by LLVM
            p = p * r + c
        return p

    @numba.njit
    def exp_nonpos(x):
        # e^x for x <= 0 (clamped below, see the module docstring)
        x = x if x > lowest else lowest
        km = x * inv_ln2 + magic
        kf = km - magic
        r = (x - kf * ln2_hi) - kf * ln2_lo
        return horner(c_exp, r) * from_bits((bits(km) + bias) << shift)

    @numba.njit
    def exp_expm1_nonpos(x):
        # (e^x, e^x - 1) for x <= 0; near 0 the second from its own series,
        # which keeps full relative accuracy where e^x - 1 would cancel.
        e = exp_nonpos(x)
        series = x * horner(c_expm1, x)
        return e, (e - one if x < half_ln2 else series)

    @numba.njit
    def log1p_unit(u):
        # log(1 + u) for u in [0, 1] as 2 atanh(w), w = u / (2 + u); above
        # u = sqrt(2) - 1 first halve 1 + u: log(1 + u) = ln 2 + 2 atanh(w) with
        # w = (u - 1) / (u + 3).  Either way |w| <= 3 - 2 sqrt(2) = 0.1716.
        big = u > sqrt2_m1
        w = (u - one) / (u + three) if big else u / (u + two)
        return (ln2 if big else zero) + two * w * horner(c_atanh, w * w)

    @numba.njit
    def sigmoid_pair(z):
        # (sigma(z), 1 - sigma(z)), both without cancellation and overflow
        e = exp_nonpos(-abs(z))
        r = one / (one + e)
        if z >= zero:
            return r, e * r
        return e * r, r

    @numba.njit
    def tanh_d1(z):
        # tanh z = sign(z) (1 - e) / (1 + e) and 1 - tanh^2 z = 4 e / (1 + e)^2,
        # e = exp(-2|z|), with 1 - e = -expm1(-2|z|) taken without cancellation.
        e, m = exp_expm1_nonpos(-two * abs(z))
        q = one / (one + e)
        t = -m * q
        return (t if z >= zero else -t), four * e * q * q

    @numba.njit
    def softplus(z):
        # log(1 + e^z) = max(z, 0) + log1p(exp(-|z|)): never overflows
        return (z if z > zero else zero) + log1p_unit(exp_nonpos(-abs(z)))

    def exp_nonpos_py(z):
        return exp_nonpos(z)

    # One function per activation and derivative order, each returning
    # sigma(z), (sigma, sigma') or (sigma, sigma', sigma'').
    def silu(z):
        s, _ = sigmoid_pair(z)
        return z * s

    def silu_d1(z):
        s, sc = sigmoid_pair(z)
        return z * s, s * (one + z * sc)

    def silu_d2(z):
        s, sc = sigmoid_pair(z)
        # d/dz [s + z s (1 - s)] = s (1 - s) (2 + z (1 - 2 s))
        return z * s, s * (one + z * sc), s * sc * (two + z * (sc - s))

    def tanh(z):
        t, _ = tanh_d1(z)
        return t

    def tanh_d1_(z):
        return tanh_d1(z)

    def tanh_d2(z):
        t, d1 = tanh_d1(z)
        return t, d1, -two * t * d1

    def relu(z):
        return z if z > zero else zero

    def relu_d1(z):
        if z > zero:
            return z, one
        return zero, zero

    def relu_d2(z):
        if z > zero:
            return z, one, zero
        return zero, zero, zero

    def softplus_(z):
        return softplus(z)

    def softplus_d1(z):
        s, _ = sigmoid_pair(z)
        return softplus(z), s

    def softplus_d2(z):
        s, sc = sigmoid_pair(z)
        return softplus(z), s, s * sc

    # plain Python functions: numba's @overload compiles them in the caller
    return {
        "exp_nonpos": exp_nonpos_py,
        ("act", SILU): silu, ("act_d1", SILU): silu_d1, ("act_d2", SILU): silu_d2,
        ("act", TANH): tanh, ("act_d1", TANH): tanh_d1_, ("act_d2", TANH): tanh_d2,
        ("act", RELU): relu, ("act_d1", RELU): relu_d1, ("act_d2", RELU): relu_d2,
        ("act", SOFTPLUS): softplus_, ("act_d1", SOFTPLUS): softplus_d1,
        ("act_d2", SOFTPLUS): softplus_d2,
    }


_HELPERS = {32: _make_scalar_helpers(np.float32), 64: _make_scalar_helpers(np.float64)}


def _width_dispatch(key):
    """A Python stub whose numba overload picks ``_HELPERS[width][key]`` by the float width."""

    def stub(z):  # pragma: no cover - only called from compiled code
        raise NotImplementedError(f"{key} is callable from numba-compiled code only")

    @overload(stub)
    def _ov(z):
        if isinstance(z, types.Float):
            return _HELPERS[z.bitwidth][key]
        return None

    return stub


_exp_nonpos = _width_dispatch("exp_nonpos")


# --------------------------------------------------------------------------
# array kernels that apply the activation: one set per activation
# --------------------------------------------------------------------------
#
# Each activation gets its own compiled kernels (the activation is fixed when
# the kernel is built, so the loop body is branch-free and vectorises), made
# by the factory below and compiled lazily on first use, per dtype.  Each is
# given a distinct __qualname__ so that numba's on-disk cache keeps them apart.
#
# Stacked layout of the divergence kernels: rows [0, n) of a stacked matrix
# hold the values of a layer, rows [(k + 1) n, (k + 2) n) the derivative of
# those values along the input direction e_k (k = 0 .. d-1).  For a hidden
# layer z = h W + b, h' = sigma(z):
#   value block:   h'      = sigma(z)
#   tangent block: h'_k    = sigma'(z) * (h_k W)        (no bias in a tangent)
# For the first layer the tangent of the pre-activation is the k-th row of W
# itself (the input's derivative along e_k is e_k), the same for every point.


def _activation_kernels(name):
    code = ACTIVATION_CODES[name]
    act = _width_dispatch(("act", code))
    act_d1 = _width_dispatch(("act_d1", code))
    act_d2 = _width_dispatch(("act_d2", code))

    def bias_act(P, b):
        """In place: ``P <- sigma(P + b)`` (forward without derivative)."""
        n, H = P.shape
        for i in range(n):
            for j in range(H):
                P[i, j] = act(P[i, j] + b[j])

    def bias_act_d1(P, b, D):
        """In place: ``P <- sigma(P + b)`` and ``D <- sigma'(P + b)``."""
        n, H = P.shape
        for i in range(n):
            for j in range(H):
                a, g = act_d1(P[i, j] + b[j])
                P[i, j] = a
                D[i, j] = g

    def act_array(z, out, d1, d2):
        """Activation and its first two derivatives elementwise (for tests)."""
        zf, of, d1f, d2f = z.ravel(), out.ravel(), d1.ravel(), d2.ravel()
        for i in range(zf.size):
            a, g1, g2 = act_d2(zf[i])
            of[i] = a
            d1f[i] = g1
            d2f[i] = g2

    def div_first(P, b, W1x, S, D1, D2, store_d2):
        """First layer of the stacked pass.

        ``P`` (n, H): ``z0 @ W1`` without bias.  Writes ``S`` ((1+d) n, H),
        ``D1 = sigma'(z)`` and, when ``store_d2``, ``D2 = sigma''(z)``.
        """
        n, H = P.shape
        d = W1x.shape[0]
        for i in range(n):
            if store_d2:
                for j in range(H):
                    a, g1, g2 = act_d2(P[i, j] + b[j])
                    S[i, j] = a
                    D1[i, j] = g1
                    D2[i, j] = g2
            else:
                for j in range(H):
                    a, g1 = act_d1(P[i, j] + b[j])
                    S[i, j] = a
                    D1[i, j] = g1
            for k in range(d):
                r = (k + 1) * n + i
                for j in range(H):
                    S[r, j] = D1[i, j] * W1x[k, j]

    def div_layer(P, b, n, S, D1, D2, store_d2):
        """Hidden layer >= 2 of the stacked pass.

        ``P`` ((1+d) n, H): the stacked product ``S_prev @ W`` without bias.
        Writes ``S`` (same shape), ``D1`` (n, H) and, when ``store_d2``, ``D2``.
        """
        H = P.shape[1]
        d = P.shape[0] // n - 1 if n > 0 else 0
        for i in range(n):
            if store_d2:
                for j in range(H):
                    a, g1, g2 = act_d2(P[i, j] + b[j])
                    S[i, j] = a
                    D1[i, j] = g1
                    D2[i, j] = g2
            else:
                for j in range(H):
                    a, g1 = act_d1(P[i, j] + b[j])
                    S[i, j] = a
                    D1[i, j] = g1
            for k in range(d):
                r = (k + 1) * n + i
                for j in range(H):
                    S[r, j] = D1[i, j] * P[r, j]

    out = {}
    for f in (bias_act, bias_act_d1, act_array, div_first, div_layer):
        base = f.__name__
        f.__name__ = f.__qualname__ = f"{base}_{name}"
        out[base] = numba.njit(**_JIT)(f)
    return SimpleNamespace(**out)


#: ``KERNELS[activation]`` has ``bias_act``, ``bias_act_d1``, ``act_array``,
#: ``div_first`` and ``div_layer`` for that activation.
KERNELS = {name: _activation_kernels(name) for name in ACTIVATION_CODES}


# --------------------------------------------------------------------------
# array kernels that do not depend on the activation
# --------------------------------------------------------------------------

@numba.njit(**_JIT)
def exp_nonpos_array(x, out):
    """``out = exp(x)`` elementwise for ``x <= 0`` (the fast exp; for tests)."""
    xf = x.ravel()
    of = out.ravel()
    for i in range(xf.size):
        of[i] = _exp_nonpos(xf[i])


@numba.njit(**_JIT)
def dact_colsum(G, D, gb):
    """In place: ``G <- G * D`` (cotangent of the pre-activation); ``gb <- sum_i G[i]``."""
    n, H = G.shape
    for j in range(H):
        gb[j] = 0.0
    for i in range(n):
        for j in range(H):
            g = G[i, j] * D[i, j]
            G[i, j] = g
            gb[j] += g


@numba.njit(**_JIT)
def div_layer_bwd(G, P, D1, D2, n, gb):
    """Reverse of :func:`div_layer`, in place on ``G``.

    On entry ``G`` ((1+d) n, H) holds the cotangents of the stacked outputs
    (value block and tangent blocks); on exit, those of the stacked
    pre-activations:

    .. math:: \\bar z = \\bar h \\sigma'(z) + \\sigma''(z) \\sum_k \\bar h_k \\dot z_k,
              \\qquad \\bar{\\dot z}_k = \\bar h_k \\sigma'(z),

    and ``gb`` the bias gradient (column sums of :math:`\\bar z`).
    """
    H = G.shape[1]
    d = G.shape[0] // n - 1 if n > 0 else 0
    for j in range(H):
        gb[j] = 0.0
    for i in range(n):
        for j in range(H):
            G[i, j] = G[i, j] * D1[i, j]
        for k in range(d):
            r = (k + 1) * n + i
            for j in range(H):
                g = G[r, j]
                G[i, j] += g * P[r, j] * D2[i, j]
                G[r, j] = g * D1[i, j]
        for j in range(H):
            gb[j] += G[i, j]


@numba.njit(**_JIT)
def div_first_bwd(G, W1x, D1, D2, n, gb, gW1x):
    """Reverse of :func:`div_first`.

    On exit ``G[:n]`` holds the cotangent of the first pre-activation (value
    path); ``gb`` its column sums; ``gW1x[k] = sum_i G_k[i] * sigma'(z_i)``, the
    part of the gradient of the x-rows of ``W1`` that comes through the
    tangents (``dz/dx_k = W1[k]``).
    """
    H = G.shape[1]
    d = W1x.shape[0]
    for j in range(H):
        gb[j] = 0.0
        for k in range(d):
            gW1x[k, j] = 0.0
    for i in range(n):
        for j in range(H):
            G[i, j] = G[i, j] * D1[i, j]
        for k in range(d):
            r = (k + 1) * n + i
            for j in range(H):
                g = G[r, j]
                G[i, j] += g * W1x[k, j] * D2[i, j]
                gW1x[k, j] += g * D1[i, j]
        for j in range(H):
            gb[j] += G[i, j]


@numba.njit(**_JIT)
def scatter_add_rows(out, rows, vals):
    """``out[rows[i]] += vals[i]`` (gradient of an embedding-table lookup)."""
    n, E = vals.shape
    for i in range(n):
        r = rows[i]
        for j in range(E):
            out[r, j] += vals[i, j]


# --------------------------------------------------------------------------
# the same steps with array operations (any array module: NumPy, CuPy)
# --------------------------------------------------------------------------
#
# The MLP calls its elementwise steps through one object, ``ctx.kern``; on
# NumPy arrays that is the Numba namespace ``NUMBA[activation]`` below, on
# CuPy arrays an :class:`ArrayElementwise`.  Both write into the same buffers
# with the same meaning, so the forward pass, the VJP and the stacked
# divergence pass in :mod:`refflow.nn.mlp` exist once.  ``ArrayElementwise``
# with NumPy is what the tests hold to the Numba kernels (1e-12): that is how
# the GPU code path is checked on a machine without a GPU.


def _sigmoid_pair(xp, z):
    # (sigma(z), 1 - sigma(z)) from e = exp(-|z|) <= 1: neither overflows nor cancels.
    e = xp.exp(-xp.abs(z))
    r = 1.0 / (1.0 + e)
    er = e * r
    pos = z >= 0
    return xp.where(pos, r, er), xp.where(pos, er, r)


def _act_d2(xp, name, z):
    """``(sigma(z), sigma'(z), sigma''(z))`` of activation ``name`` with the ops of ``xp``.

    The same stable forms as the Numba helpers above (and as
    :mod:`refflow.nn.reference`): sigmoid and tanh' from ``exp(-|z|)``.
    """
    if name == "silu":
        s, sc = _sigmoid_pair(xp, z)
        return z * s, s * (1.0 + z * sc), s * sc * (2.0 + z * (sc - s))
    if name == "tanh":
        e = xp.exp(-2.0 * xp.abs(z))
        q = 1.0 / (1.0 + e)
        t = xp.tanh(z)
        d1 = 4.0 * e * q * q
        return t, d1, -2.0 * t * d1
    if name == "relu":
        # only ufuncs (no astype, no zeros_like), so that cupy.fuse can fuse it;
        # 0 * z is a zero of z's dtype for finite z
        zero = 0.0 * z
        pos = z > 0
        return xp.where(pos, z, zero), xp.where(pos, zero + 1.0, zero), zero
    if name == "softplus":
        s, sc = _sigmoid_pair(xp, z)
        return xp.maximum(z, 0.0) + xp.log1p(xp.exp(-xp.abs(z))), s, s * sc
    raise ValueError(f"activation: expected one of {tuple(ACTIVATION_CODES)}, got {name!r}")


def _fused_or_plain(fuse, f):
    """``cupy.fuse(f)``, falling back to ``f`` itself (one kernel per operation, same
    numbers) if this CuPy cannot fuse it, with a warning that says so."""
    fused = fuse()(f)
    state = {"call": fused}

    def call(z):
        try:
            return state["call"](z)
        except Exception as exc:  # pragma: no cover - depends on the CuPy version
            if state["call"] is f:
                raise
            import warnings

            warnings.warn(f"cupy.fuse failed on {f.__name__} ({type(exc).__name__}: {exc}); "
                          "using unfused CuPy operations", RuntimeWarning, stacklevel=2)
            state["call"] = f
            return f(z)

    return call


class ArrayElementwise:
    """The MLP's elementwise steps written with the operations of an array module ``xp``.

    Same signatures and in-place semantics as the Numba kernels (see
    ``bias_act``, ``div_first``, :func:`div_layer_bwd`, ...), so that
    :mod:`refflow.nn.mlp` calls either without knowing which.  On CuPy the
    activation and its derivatives are fused into one GPU kernel each by
    ``cupy.fuse`` (one pass over memory instead of one per operation); on
    NumPy they run as plain ufuncs (the CPU check of this code path).
    """

    def __init__(self, activation, xp):
        if activation not in ACTIVATION_CODES:
            raise ValueError(f"activation: expected one of {tuple(ACTIVATION_CODES)}, got {activation!r}")
        self.activation, self.xp = activation, xp

        def act(z):
            return _act_d2(xp, activation, z)[0]

        def act_d1(z):
            a, g1, _ = _act_d2(xp, activation, z)
            return a, g1

        def act_d2(z):
            return _act_d2(xp, activation, z)

        fuse = getattr(xp, "fuse", None) if xp is not np else None
        if fuse is not None:
            act, act_d1, act_d2 = (_fused_or_plain(fuse, f) for f in (act, act_d1, act_d2))
        self._act, self._act_d1, self._act_d2 = act, act_d1, act_d2

    def __repr__(self):
        return f"ArrayElementwise({self.activation!r}, {self.xp.__name__})"

    # ---- forward
    def bias_act(self, P, b):
        """In place: ``P <- sigma(P + b)``."""
        P[...] = self._act(P + b)

    def bias_act_d1(self, P, b, D):
        """In place: ``P <- sigma(P + b)``, ``D <- sigma'(P + b)``."""
        a, g1 = self._act_d1(P + b)
        P[...] = a
        D[...] = g1

    def _values(self, Z, D1, D2, store_d2):
        if store_d2:
            a, g1, g2 = self._act_d2(Z)
            D2[...] = g2
        else:
            a, g1 = self._act_d1(Z)
        D1[...] = g1
        return a, g1

    def div_first(self, P, b, W1x, S, D1, D2, store_d2):
        """First layer of the stacked pass (see the Numba ``div_first``)."""
        n, H = P.shape
        d = W1x.shape[0]
        a, g1 = self._values(P + b, D1, D2, store_d2)
        S[:n] = a
        # tangent k of the pre-activation is row k of W1 for every point
        S[n:].reshape(d, n, H)[...] = g1[None, :, :] * W1x[:, None, :]

    def div_layer(self, P, b, n, S, D1, D2, store_d2):
        """Hidden layer >= 2 of the stacked pass (see the Numba ``div_layer``)."""
        H = P.shape[1]
        d = P.shape[0] // n - 1 if n > 0 else 0
        a, g1 = self._values(P[:n] + b, D1, D2, store_d2)
        S[:n] = a
        S[n:].reshape(d, n, H)[...] = g1[None, :, :] * P[n:].reshape(d, n, H)

    # ---- reverse
    def dact_colsum(self, G, D, gb):
        """In place: ``G <- G * D``; ``gb <- sum_i G[i]``."""
        G *= D
        gb[...] = G.sum(axis=0)

    def div_layer_bwd(self, G, P, D1, D2, n, gb):
        """Reverse of ``div_layer`` in place on ``G`` (formula in :func:`div_layer_bwd`)."""
        H = G.shape[1]
        d = G.shape[0] // n - 1 if n > 0 else 0
        Gt = G[n:].reshape(d, n, H)
        G[:n] = G[:n] * D1 + D2 * (Gt * P[n:].reshape(d, n, H)).sum(axis=0)
        Gt *= D1[None, :, :]
        gb[...] = G[:n].sum(axis=0)

    def div_first_bwd(self, G, W1x, D1, D2, n, gb, gW1x):
        """Reverse of ``div_first`` (formula in :func:`div_first_bwd`)."""
        H = G.shape[1]
        d = W1x.shape[0]
        Gt = G[n:].reshape(d, n, H)
        gW1x[...] = (Gt * D1[None, :, :]).sum(axis=1)
        G[:n] = G[:n] * D1 + D2 * (Gt * W1x[:, None, :]).sum(axis=0)
        gb[...] = G[:n].sum(axis=0)

    def scatter_add_rows(self, out, rows, vals):
        """``out[rows[i]] += vals[i]``, repeated rows accumulating."""
        xp = self.xp
        if xp is np:
            np.add.at(out, rows, vals)
        else:  # CuPy's add.at is cupyx.scatter_add
            import cupyx

            cupyx.scatter_add(out, rows, vals)


def _numba_namespace(name):
    """The Numba kernels of one activation together with the activation-free ones."""
    ns = SimpleNamespace(**vars(KERNELS[name]))
    ns.dact_colsum, ns.div_layer_bwd, ns.div_first_bwd = dact_colsum, div_layer_bwd, div_first_bwd
    ns.scatter_add_rows = scatter_add_rows
    return ns


#: ``NUMBA[activation]``: every elementwise step of the MLP as a Numba kernel,
#: the interface :class:`ArrayElementwise` shares.
NUMBA = {name: _numba_namespace(name) for name in ACTIVATION_CODES}
