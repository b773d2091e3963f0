r"""The MLP vector field :math:`u_\theta(t, x[, y])` with Numba kernels as autograd primitives.

Network
-------
The network maps a time, a point and (optionally) a class label to a velocity,
the :math:`u_\theta` of the regression objectives eq 15, 20 and 38 and of the
guided field eq 40:

.. math::

    z_0 &= [\,x,\; t,\; \sin(\omega_1 t), \dots, \sin(\omega_F t),\;
            \cos(\omega_1 t), \dots, \cos(\omega_F t),\; e_y\,] \in \mathbb R^{d_{in}}, \\
    h_l &= \sigma(h_{l-1} W_l + b_l), \quad l = 1, \dots, L, \qquad h_0 = z_0, \\
    u_\theta(t, x, y) &= h_L W_{L+1} + b_{L+1} \in \mathbb R^d,

with :math:`\omega_k = 2 \pi k` (``fourier_features = F``, possibly 0),
:math:`e_y` the row ``y`` of a learned class-embedding table (only when
``n_classes`` is set; the extra last row ``n_classes`` is the null prompt
:math:`\varnothing` of eq 40, used for ``y = -1``), and
:math:`d_{in} = d + 1 + 2F + E` (``E = embed_dim``, 0 without classes).
Points are rows: ``x`` has shape ``(n, d)`` and :math:`W_l` has shape
``(fan_in, fan_out)``, so a layer is ``h @ W + b``.

Parameter layout
----------------
All parameters live in ONE flat 1-D array ``params`` (float64 unless the model
was built with ``dtype=np.float32``), in this order::

    W_1 (d_in, H_1), b_1 (H_1,), W_2 (H_1, H_2), b_2 (H_2,), ...,
    W_{L+1} (H_L, d), b_{L+1} (d,), [embedding (n_classes + 1, E)]

Each matrix is stored row-major (C order): ``W_l[i, j]`` is at
``offset(W_l) + i * fan_out + j``; row ``i`` of ``W_l`` holds the weights
*from* input unit ``i``.  Rows of ``W_1`` follow the order of :math:`z_0`
above: the ``d`` coordinates of ``x``, then ``t``, then the ``F`` sines, the
``F`` cosines, then the ``E`` embedding coordinates.  The embedding table's row
``c`` is class ``c``; row ``n_classes`` is the null class.
:meth:`MLP.layout` lists ``(name, offset, shape)`` for every block;
:meth:`MLP.unflatten` returns views in this order.

A PyTorch ``nn.Linear(fan_in, fan_out)`` stores ``weight`` as
``(fan_out, fan_in)``: ``W_l = linear.weight.T``, ``b_l = linear.bias``.

Initialisation (:meth:`MLP.init_params`) follows PyTorch's defaults: every
``W_l`` and ``b_l`` uniform on :math:`\pm 1/\sqrt{\mathrm{fan\_in}}`, the
embedding standard normal; drawn block by block in layout order from one
``numpy.random.Generator``, in float64, then cast to the model's dtype.

Derivatives
-----------
:meth:`MLP.apply` and :meth:`MLP.divergence` are autograd primitives
(``autograd.extend.primitive``) whose VJPs are hand-written: ``autograd.grad``
of any loss built from their outputs works with respect to ``params`` and to
``x``.  Not differentiable: ``t`` and ``y`` (inputs, not parameters), and the
VJPs themselves (reverse mode, first order only: no forward mode, no
Hessian-vector products through ``apply``; for the trace of the Jacobian use
:meth:`MLP.divergence`, whose first-order VJP *is* defined, for likelihood
training with eq 12-14).  :meth:`MLP.value_and_vjp` gives the same VJP
without autograd's tracing (the training fast path).

Work per call: the matrix products go to NumPy's ``@`` (BLAS); the elementwise
work around them (bias, activation, activation derivative, bias-gradient sums)
is fused in the Numba kernels of :mod:`refflow.nn._kernels`.  The exact
divergence pushes the ``d`` tangent directions through the network stacked
with the values, one ``((1 + d) n, H)`` product per layer.  The products use
NumPy's BLAS threads; the Numba kernels run on the calling thread (splitting
them over a second thread gained under 3% at batch 4096 on the 2-core
machines, and nothing while BLAS's own threads were spinning).  Work arrays
are reused from call to call (see ``_Pool``); :meth:`MLP.clear_workspace`
drops them.

Backends
--------
The passes follow the arrays (:mod:`refflow.backend`): CuPy ``params`` and
``x`` give a GPU evaluation, with cuBLAS products and the elementwise steps
of :class:`refflow.nn._kernels.ArrayElementwise` (fused by ``cupy.fuse``)
in place of the Numba kernels.  The forward pass, the VJP and the stacked
divergence pass are the same functions on both; only the object that does
the elementwise work differs.  ``MLP(..., elementwise="array")`` uses the
array-operation steps on NumPy too: that is how the tests check the GPU code
path against the Numba kernels on a machine without a GPU.  autograd does
not run on CuPy: on the GPU use :meth:`MLP.value_and_vjp` (the same
hand-written VJP that the tests hold to autograd on the CPU),
:meth:`MLP.divergence` and :meth:`MLP.field_and_divergence`.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import numpy as np
from autograd.extend import defvjp_argnums, primitive
from autograd.tracer import getval, isbox

from refflow._validation import _xp, as_rng, check_labels, check_points, check_time
from refflow.backend import backend_name, namespace_of, same_backend
from refflow.nn import _kernels as K

__all__ = ["MLP", "MLPParams", "ACTIVATIONS"]

ACTIVATIONS = tuple(K.ACTIVATION_CODES)


class MLPParams(NamedTuple):
    """Views into a flat parameter vector (see the module docstring).

    ``layers`` is ``[(W_1, b_1), ..., (W_{L+1}, b_{L+1})]``; ``embedding`` is
    the ``(n_classes + 1, E)`` table or ``None``.
    """

    layers: list
    embedding: np.ndarray | None


def _check_int(value, name, low):
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)):
        raise TypeError(f"{name}: expected an int >= {low}, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value}")
    return int(value)


def _check_dtype(dtype):
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype: expected numpy.float64 or numpy.float32, got {dtype!r}") from None
    if dt not in (np.dtype(np.float64), np.dtype(np.float32)):
        raise ValueError(f"dtype: expected numpy.float64 or numpy.float32, got {dt}")
    return dt


class MLP:
    r"""Multilayer perceptron :math:`u_\theta(t, x[, y])` for flow matching.

    Parameters
    ----------
    dim : int
        Dimension ``d`` of the points ``x`` and of the output velocity.
    hidden : sequence of int
        Widths ``H_1, ..., H_L`` of the hidden layers (at least one).
    activation : {"silu", "tanh", "relu", "softplus"}
        Activation :math:`\sigma` of every hidden layer.
    n_classes : int, optional
        Number of classes for a class-conditional field (eq 38); adds an
        embedding table of ``n_classes + 1`` rows, the last for the null
        prompt (eq 40).  ``None``: unconditional.
    embed_dim : int
        Width ``E`` of the class embedding (used only with ``n_classes``).
    fourier_features : int
        Number ``F`` of Fourier frequencies :math:`\omega_k = 2\pi k` of ``t``
        appended to the input (0: ``t`` alone).
    dtype : numpy.float64 or numpy.float32
        Precision of parameters, inputs and outputs (float64 by default).
    elementwise : {"auto", "array"}
        Who does the elementwise work around the matrix products.
        ``"auto"``: the Numba kernels for NumPy arrays, array operations
        (fused by ``cupy.fuse``) for CuPy arrays.  ``"array"``: array
        operations on NumPy too -- the GPU code path run on the CPU, for
        checking it; slower than Numba.  Not part of :meth:`config`: it
        changes rounding only.

    Notes
    -----
    Labels: ``y`` of shape ``(n,)`` or a scalar, ints in ``[-1, n_classes)``,
    ``-1`` the null prompt.  ``y=None`` on a conditional model means the null
    prompt for every point (the unconditional field :math:`u_\theta(t, x,
    \varnothing)` of eq 40); ``y`` given to an unconditional model is an error.
    """

    def __init__(self, dim, hidden=(64, 64), activation="silu", n_classes=None,
                 embed_dim=16, fourier_features=0, dtype=np.float64, *, elementwise="auto"):
        self.dim = _check_int(dim, "dim", 1)
        if isinstance(hidden, (numbers.Integral, np.integer)) and not isinstance(hidden, bool):
            hidden = (hidden,)
        if not isinstance(hidden, (tuple, list)) or len(hidden) == 0:
            raise TypeError(f"hidden: expected a non-empty sequence of ints, got {hidden!r}")
        self.hidden = tuple(_check_int(h, "hidden", 1) for h in hidden)
        if activation not in K.ACTIVATION_CODES:
            raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        self.n_classes = None if n_classes is None else _check_int(n_classes, "n_classes", 1)
        self.embed_dim = _check_int(embed_dim, "embed_dim", 1) if self.n_classes else 0
        self.fourier_features = _check_int(fourier_features, "fourier_features", 0)
        self.dtype = _check_dtype(dtype)

        self.n_time = 1 + 2 * self.fourier_features
        self.d_in = self.dim + self.n_time + self.embed_dim
        self.widths = (self.d_in, *self.hidden, self.dim)
        self._omega = 2.0 * np.pi * np.arange(1, self.fourier_features + 1, dtype=np.float64)

        layout, offset = [], 0
        for l, (fan_in, fan_out) in enumerate(zip(self.widths[:-1], self.widths[1:]), start=1):
            layout.append((f"W{l}", offset, (fan_in, fan_out)))
            offset += fan_in * fan_out
            layout.append((f"b{l}", offset, (fan_out,)))
            offset += fan_out
        if self.n_classes:
            layout.append(("embedding", offset, (self.n_classes + 1, self.embed_dim)))
            offset += (self.n_classes + 1) * self.embed_dim
        self._layout = layout
        self.n_params = offset
        if elementwise not in ("auto", "array"):
            raise ValueError(f"elementwise: expected 'auto' or 'array', got {elementwise!r}")
        self.elementwise = elementwise
        self._kern = K.NUMBA[activation]
        self._pool = _Pool()
        self._backend_tools = {}
        self._net_cache = None

    # ------------------------------------------------------------------ layout

    def layout(self):
        """``[(name, offset, shape), ...]`` of every block of the flat vector, in order."""
        return list(self._layout)

    def unflatten(self, params) -> MLPParams:
        """Views ``MLPParams(layers=[(W, b), ...], embedding)`` into ``params``.

        No copy: writing into a view writes into ``params``.
        """
        p = self._check_params(params)
        return self._views(p)

    def _views(self, p):
        blocks = [p[o:o + math.prod(s)].reshape(s) for _, o, s in self._layout]
        n_lin = 2 * (len(self.widths) - 1)
        layers = [(blocks[i], blocks[i + 1]) for i in range(0, n_lin, 2)]
        return MLPParams(layers, blocks[n_lin] if self.n_classes else None)

    def flatten(self, layers, embedding=None) -> np.ndarray:
        """Inverse of :meth:`unflatten`: pack ``[(W, b), ...]`` (and the table) into one vector."""
        layers = list(layers)
        if len(layers) != len(self.widths) - 1:
            raise ValueError(f"layers: expected {len(self.widths) - 1} (W, b) pairs, got {len(layers)}")
        if (embedding is None) != (self.n_classes is None):
            raise ValueError("embedding: expected a table exactly when the model has classes, got "
                             + ("None" if embedding is None else "a table"))
        arrays = [a for pair in layers for a in pair] + ([embedding] if self.n_classes else [])
        out = np.empty(self.n_params, dtype=self.dtype)
        for (name, o, s), a in zip(self._layout, arrays):
            a = np.asarray(a)
            if a.shape != s:
                raise ValueError(f"{name}: expected shape {s}, got shape {a.shape}")
            out[o:o + a.size] = a.ravel()
        return out

    def init_params(self, rng) -> np.ndarray:
        """Seeded initial parameters (PyTorch's default scheme, see the module docstring).

        Parameters
        ----------
        rng : numpy.random.Generator or int
            Source of randomness; the same seed gives the same vector, bit for bit.
        """
        rng = as_rng(rng)
        out = np.empty(self.n_params, dtype=np.float64)
        for name, o, s in self._layout:
            size = math.prod(s)
            if name == "embedding":
                out[o:o + size] = rng.standard_normal(size)
            else:
                fan_in = s[0] if name.startswith("W") else self._layout_fan_in(name)
                bound = 1.0 / math.sqrt(fan_in)
                out[o:o + size] = rng.uniform(-bound, bound, size)
        return out.astype(self.dtype, copy=False)

    def _layout_fan_in(self, bias_name):
        return self.widths[int(bias_name[1:]) - 1]

    # ------------------------------------------------------------------ config

    def config(self) -> dict:
        """A JSON-able description from which :meth:`from_config` rebuilds the model."""
        return {
            "kind": "refflow.nn.MLP",
            "layout_version": 1,
            "dim": self.dim,
            "hidden": list(self.hidden),
            "activation": self.activation,
            "n_classes": self.n_classes,
            "embed_dim": self.embed_dim if self.n_classes else None,
            "fourier_features": self.fourier_features,
            "dtype": self.dtype.name,
            "n_params": self.n_params,
        }

    @classmethod
    def from_config(cls, config: dict) -> "MLP":
        """Rebuild a model from :meth:`config` (``n_params`` is checked when present)."""
        if not isinstance(config, dict):
            raise TypeError(f"config: expected a dict, got {type(config).__name__}")
        kind = config.get("kind", "refflow.nn.MLP")
        if kind != "refflow.nn.MLP":
            raise ValueError(f"config: expected kind 'refflow.nn.MLP', got {kind!r}")
        if config.get("layout_version", 1) != 1:
            raise ValueError(f"config: expected layout_version 1, got {config['layout_version']!r}")
        try:
            model = cls(
                dim=config["dim"], hidden=tuple(config["hidden"]),
                activation=config.get("activation", "silu"),
                n_classes=config.get("n_classes"),
                embed_dim=config.get("embed_dim") or 16,
                fourier_features=config.get("fourier_features", 0),
                dtype=np.dtype(config.get("dtype", "float64")),
            )
        except KeyError as exc:
            raise ValueError(f"config: missing key {exc.args[0]!r}") from None
        if "n_params" in config and config["n_params"] != model.n_params:
            raise ValueError(f"config: n_params {config['n_params']} does not match the "
                             f"rebuilt model's {model.n_params}")
        return model

    def __repr__(self):
        extra = ""
        if self.n_classes:
            extra += f", n_classes={self.n_classes}, embed_dim={self.embed_dim}"
        if self.fourier_features:
            extra += f", fourier_features={self.fourier_features}"
        if self.dtype != np.float64:
            extra += f", dtype=np.{self.dtype.name}"
        return (f"MLP(dim={self.dim}, hidden={self.hidden}, activation={self.activation!r}"
                f"{extra})  # {self.n_params} parameters")

    # ------------------------------------------------------------------ inputs

    def _check_params(self, params):
        if isbox(params):
            params = getval(params)
        p = params
        xp = _xp(p)
        if xp is not np:
            return self._check_device_params(p, xp)
        # fast path: already a contiguous vector of the model's dtype (the common case)
        if not (type(p) is np.ndarray and p.dtype == self.dtype and p.shape == (self.n_params,)
                and p.flags.c_contiguous):
            if isinstance(params, (str, bytes)) or params is None:
                raise TypeError(f"params: expected a 1-D array of length {self.n_params}, "
                                f"got {type(params).__name__}")
            p = np.asarray(params)
            if p.dtype == object or not (np.issubdtype(p.dtype, np.floating)
                                         or np.issubdtype(p.dtype, np.integer)):
                raise TypeError(f"params: expected a real 1-D array of length {self.n_params}, "
                                f"got dtype {p.dtype}")
            if p.shape != (self.n_params,):
                raise ValueError(f"params: expected the flat vector of shape ({self.n_params},) of "
                                 f"this model, got shape {p.shape}")
            p = np.ascontiguousarray(p, dtype=self.dtype)
        # a finite sum proves every entry finite (NaN and inf propagate); the
        # full test only runs when the sum is not finite (overflow or bad entries)
        if not math.isfinite(p.sum()) and not np.isfinite(p).all():
            raise ValueError("params: expected finite values, got NaN or inf entries")
        return p

    def _check_device_params(self, p, xp):
        """``_check_params`` for a CuPy vector: same checks, done on the device."""
        if not (np.issubdtype(p.dtype, np.floating) or np.issubdtype(p.dtype, np.integer)):
            raise TypeError(f"params: expected a real 1-D array of length {self.n_params}, got dtype {p.dtype}")
        if p.shape != (self.n_params,):
            raise ValueError(f"params: expected the flat vector of shape ({self.n_params},) of "
                             f"this model, got shape {p.shape}")
        p = xp.ascontiguousarray(p, dtype=self.dtype)
        if not bool(xp.isfinite(p.sum())) and not bool(xp.isfinite(p).all()):
            raise ValueError("params: expected finite values, got NaN or inf entries")
        return p

    def _tools(self, xp):
        """``(elementwise steps, work-array pool)`` for arrays of module ``xp``."""
        if xp is np and self.elementwise == "auto":
            return self._kern, self._pool
        key = backend_name(xp)
        tools = self._backend_tools.get(key)
        if tools is None:
            tools = (K.ArrayElementwise(self.activation, xp), _Pool(xp))
            self._backend_tools[key] = tools
        return tools

    def _net(self, p):
        """``_views(p)``, reused while the same array comes back (views keep it alive, so
        no other array can take its ``id``)."""
        cached = self._net_cache
        if cached is not None and cached[0] is p:
            return cached[1]
        net = self._views(p)
        self._net_cache = (p, net)
        return net

    def time_features(self, t, n: int) -> np.ndarray:
        r"""The time columns of :math:`z_0`: ``[t, sin(omega t), cos(omega t)]``, shape ``(n, 1 + 2F)``."""
        out = np.empty((n, self.n_time), dtype=self.dtype)
        self._write_time(out, t, n)
        return out

    def _write_time(self, out, t, n, xp=np):
        """Write the time columns into ``out`` (n, 1 + 2F), validating ``t``."""
        if isbox(t):
            raise TypeError("t: differentiation with respect to t is not supported; "
                            "pass a float or an array of shape (n,)")
        if type(t) is not float:
            same_backend(xp, t, "t")
        # fast paths for a float in [0, 1] and a float64 (n,) array in [0, 1]
        # (NaN fails both comparisons); anything else goes through check_time
        if type(t) is float and 0.0 <= t <= 1.0:
            tt = t
        elif (type(t) is np.ndarray and t.dtype == np.float64 and t.shape == (n,)
              and n > 0 and 0.0 <= t.min() and t.max() <= 1.0):
            tt = t[:, None]
        else:
            tt = check_time(t, n)
            tt = tt[:, None] if tt.ndim else float(tt)
        out[:, 0:1] = tt
        F = self.fourier_features
        if F:
            omega = self._omega if xp is np else xp.asarray(self._omega)
            wt = xp.multiply(tt, omega)  # (F,) for a float, (n, F) for an array
            out[:, 1:1 + F] = xp.sin(wt)
            out[:, 1 + F:] = xp.cos(wt)

    def class_rows(self, y, n: int, xp=np):
        """Rows of the embedding table for labels ``y`` (``-1`` and ``None`` -> the null row).

        ``xp`` is the array module of the evaluation: labels given as an array
        must live there too.
        """
        if self.n_classes is None:
            if y is not None:
                raise ValueError("y: expected None for an unconditional model (n_classes=None), "
                                 f"got {type(y).__name__}")
            return None
        if y is None:
            return xp.full(n, self.n_classes, dtype=np.int64)
        if isbox(y):
            raise TypeError("y: expected integer labels, got an autograd box")
        if xp is not np and getattr(y, "ndim", 0) == 0 and _xp(y) is np:
            # one label for the whole batch: expanded on the host, then copied
            labels = xp.asarray(check_labels(y, n, "y", self.n_classes))
        else:
            same_backend(xp, y, "y")  # label arrays must live where x lives
            labels = check_labels(y, n, "y", self.n_classes)
        return xp.where(labels < 0, self.n_classes, labels)

    def _check_x(self, x):
        xv = getval(x) if isbox(x) else x
        if (type(xv) is np.ndarray and xv.dtype == self.dtype and xv.ndim == 2
                and xv.shape[1] == self.dim and math.isfinite(xv.sum())):
            return xv  # fast path; a finite sum proves every entry finite
        return check_points(xv, "x", d=self.dim, dtype=self.dtype)

    # ------------------------------------------------------------------ public evaluation

    def apply(self, params, t, x, y=None):
        r"""The velocity :math:`u_\theta(t, x, y)`, shape ``(n, d)``.

        Differentiable by autograd with respect to ``params`` and ``x``
        (hand-written VJP, one backward pass for both).

        Parameters
        ----------
        params : array of shape (n_params,)
            Flat parameter vector (layout in the module docstring).
        t : float or array of shape (n,)
            Times in [0, 1].
        x : array of shape (n, d)
            Points.
        y : int or array of shape (n,), optional
            Class labels (conditional models only; -1 or None: null prompt).
        """
        ctx = self._call(params, t, x, y)
        if not (isbox(params) or isbox(x)):
            try:
                return _forward(ctx, store=False)
            finally:
                ctx.release()
        return _apply_primitive(params, x, ctx)

    def divergence(self, params, t, x, y=None):
        r"""Exact divergence :math:`\nabla_x \cdot u_\theta(t, x, y) = \mathrm{tr}\, \partial u / \partial x`, shape ``(n,)``.

        The trace that the CNF log-density of eq 12-14 integrates.  The ``d``
        tangent directions are carried through the network together with the
        values (one stacked product per layer).  Differentiable by autograd
        with respect to ``params`` and ``x`` (hand-written VJP through the
        tangent pass; uses the second derivative of the activation).
        """
        ctx = self._call(params, t, x, y)
        if not (isbox(params) or isbox(x)):
            try:
                return _div_forward(ctx, store=False)[1]
            finally:
                ctx.release()
        return _divergence_primitive(params, x, ctx)

    def field_and_divergence(self, params, t, x, y=None):
        """``(u, div)`` in one stacked pass (plain NumPy, not differentiable): for CNF integration."""
        ctx = self._call(params, t, x, y)
        try:
            u, div = _div_forward(ctx, store=False, want_u=True)
        finally:
            ctx.release()
        return u, div

    def value_and_vjp(self, params, t, x, y=None):
        r"""``(u, vjp)`` without autograd, for a cotangent ``g`` of shape ``(n, d)``.

        ``vjp(g, wrt_params=True, wrt_x=True) -> (grad_params, grad_x)``, the
        entry not asked for being ``None``: skipping the parameter gradient
        (e.g. for Hutchinson's products :math:`g^T \partial u / \partial x`)
        saves the weight-gradient products.  The fast path for a hand-written
        training loop; the same numbers as ``autograd`` through :meth:`apply`.
        ``vjp`` may be called any number of times; the work arrays go back to
        the model's pool when ``vjp`` is dropped.
        """
        ctx = self._call(params, t, x, y)
        u = ctx.forward()

        def vjp(g, wrt_params=True, wrt_x=True):
            argnums = (0,) * bool(wrt_params) + (1,) * bool(wrt_x)
            grads = dict(zip(argnums, ctx.backward(g, argnums)))
            return grads.get(0), grads.get(1)

        return u, vjp

    def field(self, params, y=None):
        """A plain NumPy callable ``(t, x) -> u`` with the parameters bound (fast path for solvers).

        Parameters are validated, copied and unflattened once.  ``t`` is a
        float or an array of shape ``(n,)``; ``y`` is bound too (an int, an
        array of shape ``(n,)`` -- then ``x`` must have ``n`` rows -- or
        ``None``).
        """
        p = self._check_params(params).copy()  # later edits of params must not leak in
        net = self._views(p)

        def u(t, x):
            ctx = _Call(self, net, t, self._check_x(x), y, self.dtype)
            try:
                return _forward(ctx, store=False)
            finally:
                ctx.release()

        u.model = self
        return u

    def clear_workspace(self):
        """Drop the work arrays kept between calls (see :class:`_Pool`)."""
        self._pool.clear()

    def _call(self, params, t, x, y):
        p = self._check_params(params)
        xv = self._check_x(x)
        pv = getval(params)
        grad_dtype = pv.dtype if hasattr(pv, "dtype") else np.asarray(pv).dtype
        return _Call(self, self._net(p), t, xv, y, grad_dtype)

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_pool", None)
        state.pop("_kern", None)
        state.pop("_backend_tools", None)
        state["_net_cache"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.__dict__.setdefault("elementwise", "auto")
        self._kern = K.NUMBA[self.activation]
        self._pool = _Pool()
        self._backend_tools = {}


# ---------------------------------------------------------------------------
# work arrays
# ---------------------------------------------------------------------------

class _Pool:
    """Work arrays reused from call to call, keyed by shape and dtype.

    Why: glibc hands large freed blocks back to the operating system, so a
    fresh ``np.empty`` of a few MiB is page-faulted in again on every call;
    on the virtual machines here that cost as much as the activation kernels.
    Arrays come back to the pool when the call that took them is done (for an
    autograd primitive: when its graph, hence its VJP closure, is dropped).
    Never handed out: the arrays a caller receives (``u``, the divergence,
    gradients).
    """

    __slots__ = ("_free", "xp")
    MAX_PER_KEY = 16
    MAX_KEYS = 32

    def __init__(self, xp=np):
        self._free = {}
        self.xp = xp

    def take(self, shape, dtype):
        lst = self._free.get((shape, dtype))
        if lst:
            try:
                return lst.pop()
            except IndexError:  # emptied by another thread meanwhile
                pass
        return self.xp.empty(shape, dtype)

    def give(self, arrays):
        free = self._free
        for a in arrays:
            key = (a.shape, a.dtype)
            lst = free.get(key)
            if lst is None:
                if len(free) >= self.MAX_KEYS:
                    free.clear()
                lst = free.setdefault(key, [])
            if len(lst) < self.MAX_PER_KEY:
                lst.append(a)

    def clear(self):
        self._free.clear()


# ---------------------------------------------------------------------------
# one evaluation: inputs, forward cache, backward passes
# ---------------------------------------------------------------------------

class _Call:
    """One evaluation of the network.

    Holds the validated inputs (``z0``, class rows), the weights, the work
    arrays of its forward pass and the backward passes that use them.  It is
    handed to the autograd primitives as a non-differentiable argument, so the
    VJP finds the activations of *its* forward pass (autograd builds the VJP
    right after the forward call).
    """

    __slots__ = ("model", "net", "kern", "pool", "xp", "z0", "rows", "grad_dtype", "cache", "owned")

    def __init__(self, model, net, t, xv, y, grad_dtype):
        # the backend follows the arrays; x and the parameters must agree
        W1 = net.layers[0][0]
        xp = self.xp = np if type(xv) is type(W1) is np.ndarray else namespace_of(W1, xv)
        self.model, self.net = model, net
        self.kern, self.pool = model._tools(xp)
        self.owned = []
        n = xv.shape[0]
        rows = model.class_rows(y, n, xp)
        d, nt = model.dim, model.n_time
        z0 = self.take((n, model.d_in))
        model._write_time(z0[:, d:d + nt], t, n, xp)
        z0[:, :d] = xv
        if rows is not None:
            z0[:, d + nt:] = net.embedding[rows]
        self.z0, self.rows = z0, rows
        self.grad_dtype = grad_dtype if grad_dtype.kind == "f" else model.dtype
        self.cache = None

    def take(self, shape):
        a = self.pool.take(shape, self.model.dtype)
        self.owned.append(a)
        return a

    def release(self):
        """Give the work arrays back to the pool (nothing may use them after this)."""
        owned, self.owned, self.cache = self.owned, [], None
        self.pool.give(owned)

    def __del__(self):
        try:
            self.release()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    # ---- u and its VJP

    def forward(self):
        u, hs, Ds = _forward(self, store=True)
        self.cache = (hs, Ds)
        return u

    def backward(self, g, argnums):
        r"""Cotangents of ``params`` (argnum 0) and ``x`` (argnum 1) for ``g = dL/du``.

        .. math:: \bar z_l = \bar h_l \odot \sigma'(z_l), \quad
                  \bar W_l = h_{l-1}^T \bar z_l, \quad \bar b_l = 1^T \bar z_l, \quad
                  \bar h_{l-1} = \bar z_l W_l^T.
        """
        model, net, kern, pool, xp = self.model, self.net, self.kern, self.pool, self.xp
        hs, Ds = self.cache
        want_p, want_x = 0 in argnums, 1 in argnums
        n = self.z0.shape[0]
        g = xp.ascontiguousarray(g, dtype=model.dtype)
        if g.shape != (n, model.dim):
            raise ValueError(f"g: expected a cotangent of shape {(n, model.dim)}, got {g.shape}")
        layers = net.layers
        gnet = grad = None
        if want_p:
            grad = xp.empty(model.n_params, dtype=model.dtype)
            gnet = model._views(grad)
            gWo, gbo = gnet.layers[-1]
            xp.matmul(hs[-1].T, g, out=gWo)
            xp.sum(g, axis=0, out=gbo)
        Wo = layers[-1][0]
        G = pool.take((n, Wo.shape[0]), model.dtype)
        xp.matmul(g, Wo.T, out=G)
        for l in range(len(Ds) - 1, -1, -1):
            W = layers[l][0]
            if want_p:
                gW, gb = gnet.layers[l]
                kern.dact_colsum(G, Ds[l], gb)
                xp.matmul(hs[l].T, G, out=gW)
            else:
                xp.multiply(G, Ds[l], out=G)
            if l > 0:
                G_prev = pool.take((n, W.shape[0]), model.dtype)
                xp.matmul(G, W.T, out=G_prev)
                pool.give((G,))
                G = G_prev
        gx = self._input_grads(G, gnet, want_p, want_x)
        pool.give((G,))
        return self._pack(gx, grad, argnums)

    # ---- divergence and its VJP

    def div_forward(self):
        _, div = _div_forward(self, store=True)
        return div

    def div_backward(self, c, argnums):
        r"""Cotangents of ``params`` / ``x`` for ``c = dL/d div`` (shape (n,)).

        Reverse mode through the stacked tangent pass: for a hidden layer with
        values :math:`h = \sigma(z)` and tangents :math:`\dot h_k = \sigma'(z)\dot z_k`,

        .. math:: \bar z = \bar h\, \sigma'(z) + \sigma''(z) \sum_k \bar{\dot h}_k \dot z_k,
                  \qquad \bar{\dot z}_k = \bar{\dot h}_k\, \sigma'(z),

        and the stacked :math:`[\bar z; \bar{\dot z}_1; \dots]` goes through
        one product with :math:`W^T` and one with the stacked inputs.
        """
        model, net, pool, kern, xp = self.model, self.net, self.pool, self.kern, self.xp
        Ss, Ps, D1s, D2s = self.cache
        want_p, want_x = 0 in argnums, 1 in argnums
        d, n, dt = model.dim, self.z0.shape[0], model.dtype
        c = xp.ascontiguousarray(c, dtype=dt)
        if c.shape != (n,):
            raise ValueError(f"c: expected a cotangent of shape ({n},), got {c.shape}")
        layers = net.layers
        Wo = layers[-1][0]
        H = Wo.shape[0]
        gnet = grad = None
        if want_p:
            grad = xp.empty(model.n_params, dtype=dt)
            gnet = model._views(grad)
            gWo, gbo = gnet.layers[-1]
            # d div / d Wo[j, k] = sum_i c_i * (tangent k of h_L)[i, j]
            gWo[...] = (c @ Ss[-1][n:].reshape(d, n, H)).T
            gbo[...] = 0.0
        # cotangent of the top stacked layer: value block 0, tangent block k: c_i Wo[:, k]
        G = pool.take(Ss[-1].shape, dt)
        G[:n] = 0.0
        xp.multiply(c[None, :, None], Wo.T[:, None, :], out=G[n:].reshape(d, n, H))
        for l in range(len(Ss) - 1, 0, -1):
            W = layers[l][0]
            gb = gnet.layers[l][1] if want_p else xp.empty(W.shape[1], dt)
            kern.div_layer_bwd(G, Ps[l], D1s[l], D2s[l], n, gb)
            if want_p:
                xp.matmul(Ss[l - 1].T, G, out=gnet.layers[l][0])
            G_prev = pool.take((G.shape[0], W.shape[0]), dt)
            xp.matmul(G, W.T, out=G_prev)
            pool.give((G,))
            G = G_prev
        W1 = layers[0][0]
        gb1 = gnet.layers[0][1] if want_p else xp.empty(W1.shape[1], dt)
        gW1x = xp.empty((d, W1.shape[1]), dtype=dt)
        kern.div_first_bwd(G, W1[:d], D1s[0], D2s[0], n, gb1, gW1x)
        Gz = G[:n]
        if want_p:
            gW1 = gnet.layers[0][0]
            xp.matmul(self.z0.T, Gz, out=gW1)
            gW1[:d] += gW1x
        gx = self._input_grads(Gz, gnet, want_p, want_x)
        pool.give((G,))
        return self._pack(gx, grad, argnums)

    # ---- shared tail: cotangents through z0 = [x, time features, e_y]

    def _input_grads(self, Gz, gnet, want_p, want_x):
        model = self.model
        W1 = self.net.layers[0][0]
        d, off = model.dim, model.dim + model.n_time
        gx = None
        if want_x:
            gx = Gz @ W1[:d].T
        if want_p and model.n_classes:
            gE = gnet.embedding
            gE[...] = 0.0
            self.kern.scatter_add_rows(gE, self.rows, Gz @ W1[off:].T)
        return gx

    def _pack(self, gx, grad, argnums):
        out = []
        for a in argnums:
            if a == 0:
                out.append(grad.astype(self.grad_dtype, copy=False))
            elif a == 1:
                out.append(gx)
            else:  # pragma: no cover - the context argument is never boxed
                raise ValueError(f"no derivative with respect to argument {a}")
        return out


# ---------------------------------------------------------------------------
# forward passes
# ---------------------------------------------------------------------------

def _forward(ctx, store):
    """Values through the network.

    With ``store``, returns ``(u, hs, Ds)``: the layer inputs ``hs`` (``hs[0] =
    z0``) and activation derivatives ``Ds`` for the VJP, all owned by ``ctx``.
    Without, returns ``u`` and hands the work arrays back as it goes.
    """
    layers, kern, pool, dt, xp = ctx.net.layers, ctx.kern, ctx.pool, ctx.model.dtype, ctx.xp
    z0 = ctx.z0
    n = z0.shape[0]
    h = z0
    hs, Ds = [z0], []
    for W, b in layers[:-1]:
        if store:
            P = ctx.take((n, W.shape[1]))
            xp.matmul(h, W, out=P)
            D = ctx.take(P.shape)
            kern.bias_act_d1(P, b, D)
            hs.append(P)
            Ds.append(D)
        else:
            P = pool.take((n, W.shape[1]), dt)
            xp.matmul(h, W, out=P)
            kern.bias_act(P, b)
            if h is not z0:
                pool.give((h,))
        h = P
    Wo, bo = layers[-1]
    u = h @ Wo
    u += bo
    if store:
        return u, hs, Ds
    if h is not z0:
        pool.give((h,))
    return u


def _div_forward(ctx, store, want_u=False):
    """Stacked value + tangent pass: ``(u or None, div)``; with ``store`` the cache goes to ``ctx``."""
    layers, kern, dt, d, xp = ctx.net.layers, ctx.kern, ctx.model.dtype, ctx.model.dim, ctx.xp
    z0 = ctx.z0
    n = z0.shape[0]
    W1, b1 = layers[0]
    H = W1.shape[1]
    P = ctx.take((n, H))
    xp.matmul(z0, W1, out=P)
    S = ctx.take(((1 + d) * n, H))
    D1 = ctx.take((n, H))
    D2 = ctx.take((n, H)) if store else _DUMMY[dt]
    kern.div_first(P, b1, W1[:d], S, D1, D2, store)
    Ss, Ps, D1s, D2s = [S], [None], [D1], [D2]
    for W, b in layers[1:-1]:
        H = W.shape[1]
        P = ctx.take(((1 + d) * n, H))
        xp.matmul(S, W, out=P)
        S = ctx.take(P.shape)
        D1 = ctx.take((n, H))
        D2 = ctx.take((n, H)) if store else _DUMMY[dt]
        kern.div_layer(P, b, n, S, D1, D2, store)
        Ss.append(S), Ps.append(P), D1s.append(D1), D2s.append(D2)
    Wo, bo = layers[-1]
    # T[k n + i, m] = d u_m / d x_k at point i; the divergence sums m = k.
    T = S[n:] @ Wo
    if xp is np:
        div = np.einsum("kik->i", T.reshape(d, n, d))
    else:  # the diagonal blocks T[k, :, k] by indexing, summed over k
        k = xp.arange(d)
        div = T.reshape(d, n, d)[k, :, k].sum(axis=0)
    u = None
    if want_u:
        u = S[:n] @ Wo
        u += bo
    if store:
        ctx.cache = (Ss, Ps, D1s, D2s)
    return u, div


_DUMMY = {np.dtype(np.float64): np.zeros((1, 1)), np.dtype(np.float32): np.zeros((1, 1), np.float32)}


# ---------------------------------------------------------------------------
# autograd primitives
# ---------------------------------------------------------------------------

@primitive
def _apply_primitive(params, x, ctx):
    """u_theta for autograd; ``ctx`` (a :class:`_Call`) carries inputs and cache."""
    return ctx.forward()


def _apply_vjp(argnums, ans, args, kwargs):
    ctx = args[2]
    x_dtype = np.asarray(args[1]).dtype

    def vjp(g):
        grads = ctx.backward(g, argnums)
        return tuple(_cast_x(gr, a, x_dtype) for gr, a in zip(grads, argnums))

    return vjp


@primitive
def _divergence_primitive(params, x, ctx):
    """Exact divergence for autograd; ``ctx`` carries inputs and cache."""
    return ctx.div_forward()


def _divergence_vjp(argnums, ans, args, kwargs):
    ctx = args[2]
    x_dtype = np.asarray(args[1]).dtype

    def vjp(c):
        grads = ctx.div_backward(c, argnums)
        return tuple(_cast_x(gr, a, x_dtype) for gr, a in zip(grads, argnums))

    return vjp


def _cast_x(grad, argnum, x_dtype):
    if argnum == 1 and np.issubdtype(x_dtype, np.floating):
        return grad.astype(x_dtype, copy=False)
    return grad


defvjp_argnums(_apply_primitive, _apply_vjp)
defvjp_argnums(_divergence_primitive, _divergence_vjp)
