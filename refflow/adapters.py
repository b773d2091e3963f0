r"""PyTorch, JAX, flow_matching and TorchCFM objects as refflow implementations.

refflow calls implementations with NumPy float64 arrays in fixed orders
(:mod:`refflow.validate`): a path ``(x_0, x_1, t) -> (x_t, u_t)``, a field
``(t, x) -> u`` (or ``(t, x, y)``), a log-likelihood ``x -> log p_1(x)``, a
sampler ``(n, seed) -> x`` and a guided field ``(t, x, y, w) -> u``.  The
functions here wrap what users of the PyTorch and JAX libraries already have,
so that they write no glue:

* :func:`torch_field`: an ``nn.Module`` or a torch callable of any common
  signature: ``(x, t)`` or ``(t, x)``, or one input ``[x, t]`` concatenated
  (TorchCFM's ``MLP(dim, time_varying=True)``); ``t`` as a scalar, ``(n,)``
  or ``(n, 1)``; labels and fixed conditioning passed as keywords; its dtype
  and device;
* :func:`torch_path`, :func:`torch_function`: any torch callable of refflow's
  argument order (inputs become tensors, outputs come back as tensors so that
  refflow reads their dtype);
* :func:`flow_matching_path`: flow_matching's ``AffineProbPath`` (its
  ``sample(x_0, x_1, t)`` returns a ``PathSample`` with ``x_t`` and ``dx_t``);
* :func:`torchcfm_path`: TorchCFM's ``ConditionalFlowMatcher`` family
  (``sample_location_and_conditional_flow(x0, x1, t)`` returns
  ``(t, x_t, u_t)``); the matchers that draw noise of their own are handed
  refflow's (see its ``noise`` argument);
* :func:`jax_field`, :func:`jax_function`: JAX functions;
* :func:`sampler_from_field`: a sampler made from any field (a trained model)
  by integrating the flow ODE (eq 8) from :math:`x_0 \sim \mathcal N(0, I)`;
* :func:`adapt`: picks the right one (``--adapter`` of ``refflow check``).

torch and JAX are imported only inside these functions.
"""
from __future__ import annotations

import functools
import inspect

import numpy as np

__all__ = [
    "ADAPTERS",
    "adapt",
    "torch_field",
    "torch_path",
    "torch_function",
    "flow_matching_path",
    "torchcfm_path",
    "jax_field",
    "jax_function",
    "sampler_from_field",
]

ADAPTERS = ("auto", "torch", "jax", "flow_matching", "torchcfm")
"""The names :func:`adapt` and ``refflow check --adapter`` accept."""

_T_SHAPES = ("n", "n1", "scalar")
_ORDERS = ("auto", "tx", "xt", "concat")
# parameter names that mean "time" in the signatures of the common libraries
_TIME_NAMES = ("t", "time", "times", "timestep", "timesteps", "tau", "s", "sigma")


def _import_torch():
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - exercised where torch is absent
        raise ImportError("refflow.adapters: this adapter needs PyTorch (pip install torch)") from exc
    return torch


def _import_jax():
    try:
        import jax
        import jax.numpy as jnp
    except ImportError as exc:
        raise ImportError("refflow.adapters: this adapter needs JAX (pip install jax jaxlib)") from exc
    return jax, jnp


def _named(fn, name: str):
    fn.__qualname__ = fn.__name__ = name
    fn.__module__ = "refflow.adapters"
    return fn


def _describe(obj) -> str:
    return type(obj).__name__ if not inspect.isfunction(obj) else getattr(obj, "__qualname__", "function")


# ---------------------------------------------------------------------------
# torch
# ---------------------------------------------------------------------------


def _torch_settings(torch, model, dtype, device):
    """dtype and device: given, else those of the module's first floating parameter (or buffer),
    else float32 on the CPU."""
    param = None
    if isinstance(model, torch.nn.Module):
        tensors = list(model.parameters()) + list(model.buffers())
        param = next((p for p in tensors if p.is_floating_point()), None)
    if dtype is None:
        dtype = param.dtype if param is not None else torch.float32
    elif isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype: expected a torch dtype name such as 'float32', got {dtype!r}")
        dtype = getattr(torch, dtype)
    if device is None:
        device = param.device if param is not None else torch.device("cpu")
    return dtype, torch.device(device)


def _positional_names(fn):
    target = fn.forward if hasattr(fn, "forward") and not inspect.isfunction(fn) else fn
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return None
    return [p.name for p in sig.parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self"]


def _field_order(fn, order: str) -> str:
    if order not in _ORDERS:
        raise ValueError(f"order: expected one of {list(_ORDERS)}, got {order!r}")
    if order != "auto":
        return order
    names = _positional_names(fn)
    if names is None:
        raise ValueError(f"order: cannot read the signature of {_describe(fn)}; give order='tx', 'xt' or 'concat'")
    if len(names) == 1:
        return "concat"  # one input: [x, t] (TorchCFM's MLP with time_varying=True)
    if not names:
        raise ValueError(f"order: {_describe(fn)} takes no positional argument; give order='tx', 'xt' or 'concat'")
    return "tx" if names[0].lower() in _TIME_NAMES else "xt"


def _time_column(xp, t, t_shape, n):
    if t_shape == "n":
        return t
    if t_shape == "n1":
        return t.reshape(n, 1)
    raise AssertionError(t_shape)


def _call_field(model, order, t_in, x_in, kwargs, cat):
    if order == "tx":
        return model(t_in, x_in, **kwargs)
    if order == "xt":
        return model(x_in, t_in, **kwargs)
    return model(cat(x_in, t_in), **kwargs)


def torch_field(model, *, order: str = "auto", t_shape: str = "n", dtype=None, device=None,
                labels: str | None = None, guidance: str | None = None, **extras):
    r"""A velocity field ``(t, x) -> u`` of refflow from a torch module or callable.

    Parameters
    ----------
    model : torch.nn.Module or callable
        Called under ``torch.no_grad()``; its train/eval mode is left as it is
        (put a model with dropout or batch norm in ``eval()`` first).
    order : {"auto", "tx", "xt", "concat"}
        ``"tx"``: ``model(t, x)`` (torchdyn, TorchCFM's ``torch_wrapper``);
        ``"xt"``: ``model(x, t)`` (flow_matching's ``ModelWrapper``);
        ``"concat"``: ``model(cat([x, t], 1))`` (TorchCFM's ``MLP`` with
        ``time_varying=True``).  ``"auto"`` reads the signature: one
        positional argument means ``"concat"``, a first argument named ``t``
        (``time``, ``timestep``, ...) ``"tx"``, anything else ``"xt"``.
    t_shape : {"n", "n1", "scalar"}
        ``t`` as a ``(n,)`` tensor, a ``(n, 1)`` column or a 0-d tensor (then
        the model is called once per distinct time of the batch).  With
        ``"concat"`` t always enters as a column.
    dtype, device : optional
        Of the inputs; by default those of the module's first floating
        parameter or buffer (float32 on the CPU for a plain callable).
    labels : str, optional
        The keyword under which the model takes class labels; the result is
        then a field ``(t, x, y) -> u`` (y int64, -1 the null prompt).
    guidance : str, optional
        With ``labels``: the keyword of the guidance weight; the result is
        then a guided field ``(t, x, y, w) -> u``.
    **extras
        Fixed conditioning keywords passed on every call (tensors are moved
        to ``device``).

    Returns
    -------
    callable
        Returns torch tensors (refflow converts them and reads their dtype).
    """
    torch = _import_torch()
    if not callable(model):
        raise TypeError(f"model: expected a torch.nn.Module or a callable, got {type(model).__name__}")
    if t_shape not in _T_SHAPES:
        raise ValueError(f"t_shape: expected one of {list(_T_SHAPES)}, got {t_shape!r}")
    if guidance is not None and labels is None:
        raise ValueError("guidance: expected labels= (the keyword of the class labels) beside it, got labels=None")
    order = _field_order(model, order)
    dtype, device = _torch_settings(torch, model, dtype, device)
    fixed = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in extras.items()}

    def cat(x_in, t_in):
        return torch.cat([x_in, t_in.reshape(-1, 1).expand(x_in.shape[0], 1)], dim=1)

    def evaluate(t, x, y=None, w=None):
        x_in = torch.as_tensor(np.asarray(x), dtype=dtype, device=device)
        t_np = np.asarray(t, dtype=np.float64)
        kwargs = dict(fixed)
        if y is not None:
            kwargs[labels] = torch.as_tensor(np.asarray(y), dtype=torch.long, device=device)
        if w is not None:
            kwargs[guidance] = float(w)
        n = x_in.shape[0]
        with torch.no_grad():
            if t_shape == "scalar" and order != "concat":
                out = None
                for value in np.unique(t_np):
                    rows = np.flatnonzero(t_np == value)
                    sub = {k: (v[rows] if k == labels else v) for k, v in kwargs.items()}
                    t_in = torch.tensor(value, dtype=dtype, device=device)
                    part = _call_field(model, order, t_in, x_in[rows], sub, cat)
                    if out is None:
                        out = torch.empty((n,) + tuple(part.shape[1:]), dtype=part.dtype, device=part.device)
                    out[rows] = part
                return out
            t_in = torch.as_tensor(t_np, dtype=dtype, device=device)
            t_in = _time_column(torch, t_in, t_shape, n) if order != "concat" else t_in
            return _call_field(model, order, t_in, x_in, kwargs, cat)

    name = f"torch_field({_describe(model)}, order={order!r})"
    if labels is None:
        return _named(lambda t, x: evaluate(t, x), name)
    if guidance is None:
        return _named(lambda t, x, y: evaluate(t, x, y), name)
    return _named(lambda t, x, y, w: evaluate(t, x, y, w), name)


def torch_function(fn, *, dtype=None, device=None, name: str | None = None):
    """Any torch callable of refflow's argument order: arrays in become tensors, tensors come back.

    Non-array arguments (``n``, ``seed``, ``w``) are passed unchanged.  Tuple
    outputs (a path's ``(x_t, u_t)``) are returned as tuples of tensors.
    """
    torch = _import_torch()
    if not callable(fn):
        raise TypeError(f"fn: expected a callable, got {type(fn).__name__}")
    dtype, device = _torch_settings(torch, fn, dtype, device)

    def convert(a):
        if isinstance(a, np.ndarray):
            kind = torch.long if a.dtype.kind in "iu" else dtype
            return torch.as_tensor(a, dtype=kind, device=device)
        return a

    @functools.wraps(fn if inspect.isfunction(fn) else fn.__call__)
    def call(*args, **kwargs):  # kwargs: the case, when fn takes one
        with torch.no_grad():
            return fn(*(convert(a) for a in args), **kwargs)

    call.__wrapped__ = fn if inspect.isfunction(fn) else getattr(fn, "forward", fn.__call__)
    return _named(call, name or f"torch_function({_describe(fn)})")


def torch_path(fn, *, dtype=None, device=None):
    """A torch path ``(x_0, x_1, t) -> (x_t, u_t)`` (t of shape (n,)) as a refflow path."""
    inner = torch_function(fn, dtype=dtype, device=device)
    return _named(lambda x_0, x_1, t: inner(x_0, x_1, t), f"torch_path({_describe(fn)})")


def flow_matching_path(path, *, dtype=None, device=None):
    r"""flow_matching's ``AffineProbPath`` as a refflow path ``(x_0, x_1, t) -> (x_t, u_t)``.

    Its ``sample(x_0=..., x_1=..., t=...)`` returns a ``PathSample`` whose
    ``x_t`` (:math:`\sigma_t x_0 + \alpha_t x_1`) and ``dx_t``
    (:math:`\sigma_t' x_0 + \alpha_t' x_1`) are refflow's ``x_t`` and ``u_t``.
    dtype: float32 unless given.
    """
    torch = _import_torch()
    if not hasattr(path, "sample") or not hasattr(path, "scheduler"):
        raise TypeError(f"path: expected a flow_matching AffineProbPath (with .sample and .scheduler), "
                        f"got {type(path).__name__}")
    dtype, device = _torch_settings(torch, None, dtype, device)

    def sample(x_0, x_1, t):
        args = {k: torch.as_tensor(v, dtype=dtype, device=device) for k, v in (("x_0", x_0), ("x_1", x_1), ("t", t))}
        with torch.no_grad():
            s = path.sample(**args)
        return s.x_t, s.dx_t

    return _named(sample, f"flow_matching_path({type(path.scheduler).__name__})")


def torchcfm_path(matcher, *, noise: str = "auto", dtype=None, device=None):
    r"""A TorchCFM ``ConditionalFlowMatcher`` (or subclass) as a refflow path ``(x_0, x_1, t) -> (x_t, u_t)``.

    ``sample_location_and_conditional_flow(x0, x1, t)`` returns
    ``(t, x_t, u_t)`` with :math:`x_t = \mu_t + \sigma_t \varepsilon`, the noise
    :math:`\varepsilon` drawn inside by ``sample_noise_like`` (``randn_like``).
    refflow hands it its own noise by shadowing that method on the instance
    during the call:

    * ``noise="x_0"``: :math:`\varepsilon = x_0`.  Right for
      ``TargetConditionalFlowMatcher`` (Lipman et al.'s path), which ignores
      its ``x0`` and whose noise *is* the source sample; the default for it;
    * ``noise="zero"``: :math:`\varepsilon = 0`, so the other matchers' path
      is their mean :math:`\mu_t` and their target :math:`u_t`, refflow's OT
      (``ConditionalFlowMatcher``) or cosine (``VariancePreserving...``) path
      with :math:`\sigma_{min} = 0`; the default for those when their
      ``sigma`` is 0, where the noise does not enter;
    * ``"auto"`` refuses a matcher with ``sigma > 0`` that is not a
      ``TargetConditionalFlowMatcher``: its :math:`x_t` carries noise beside
      :math:`x_0` (a two-sided interpolant, not an affine path of refflow's
      form), so say ``noise="zero"`` to check its mean and target.

    The matchers with an OT or Schroedinger-bridge coupling re-pair the batch
    (refflow reports "re-pairs the batch").
    """
    torch = _import_torch()
    if not hasattr(matcher, "sample_location_and_conditional_flow"):
        raise TypeError("matcher: expected a torchcfm ConditionalFlowMatcher (with "
                        f"sample_location_and_conditional_flow), got {type(matcher).__name__}")
    is_target = any(c.__name__ == "TargetConditionalFlowMatcher" for c in type(matcher).__mro__)
    sigma = float(getattr(matcher, "sigma", 0.0))
    if noise == "auto":
        if is_target:
            noise = "x_0"
        elif sigma == 0.0:
            noise = "zero"
        else:
            raise ValueError(
                f"noise: {type(matcher).__name__} with sigma={sigma!r} adds noise of its own beside x_0 "
                "(x_t = mu_t + sigma eps): give noise='zero' to check its mean and target as a path")
    if noise not in ("x_0", "zero"):
        raise ValueError(f"noise: expected 'auto', 'x_0' or 'zero', got {noise!r}")
    dtype, device = _torch_settings(torch, None, dtype, device)

    def sample(x_0, x_1, t):
        x0 = torch.as_tensor(x_0, dtype=dtype, device=device)
        x1 = torch.as_tensor(x_1, dtype=dtype, device=device)
        tt = torch.as_tensor(t, dtype=dtype, device=device)
        eps = x0.clone() if noise == "x_0" else torch.zeros_like(x0)
        matcher.sample_noise_like = lambda x: eps  # refflow's noise instead of randn_like
        try:
            with torch.no_grad():
                out = matcher.sample_location_and_conditional_flow(x0, x1, tt)
        finally:
            del matcher.sample_noise_like
        return out[1], out[2]

    return _named(sample, f"torchcfm_path({type(matcher).__name__}, noise={noise!r})")


# ---------------------------------------------------------------------------
# JAX
# ---------------------------------------------------------------------------


def _jax_dtype(jax, jnp, dtype):
    dtype = jnp.dtype(dtype or "float32")
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise ValueError("dtype: float64 in JAX needs jax.config.update('jax_enable_x64', True) first, "
                         "got dtype='float64' with x64 disabled")
    return dtype


def jax_field(fn, *, order: str = "auto", t_shape: str = "n", dtype=None, labels: str | None = None,
              jit: bool = False, **extras):
    """A JAX velocity field as a refflow field ``(t, x) -> u`` (see :func:`torch_field` for the options).

    ``dtype`` is float32 unless given (float64 needs ``jax_enable_x64``);
    ``jit=True`` compiles ``fn`` with ``jax.jit`` once.
    """
    jax, jnp = _import_jax()
    if not callable(fn):
        raise TypeError(f"fn: expected a callable, got {type(fn).__name__}")
    if t_shape not in _T_SHAPES:
        raise ValueError(f"t_shape: expected one of {list(_T_SHAPES)}, got {t_shape!r}")
    order = _field_order(fn, order)
    dtype = _jax_dtype(jax, jnp, dtype)
    call = jax.jit(fn) if jit else fn

    def cat(x_in, t_in):
        return jnp.concatenate([x_in, jnp.reshape(t_in, (-1, 1)) * jnp.ones((x_in.shape[0], 1), x_in.dtype)], axis=1)

    def evaluate(t, x, y=None):
        x_in = jnp.asarray(np.asarray(x), dtype=dtype)
        t_np = np.asarray(t, dtype=np.float64)
        kwargs = dict(extras)
        if y is not None:
            kwargs[labels] = jnp.asarray(np.asarray(y))
        n = x_in.shape[0]
        if t_shape == "scalar" and order != "concat":
            out = np.empty((n, x_in.shape[1]))
            out_dtype = None
            for value in np.unique(t_np):
                rows = np.flatnonzero(t_np == value)
                sub = {k: (v[rows] if k == labels else v) for k, v in kwargs.items()}
                part = np.asarray(_call_field(call, order, jnp.asarray(value, dtype=dtype), x_in[rows], sub, cat))
                out_dtype = part.dtype
                out[rows] = part
            return out.astype(out_dtype)
        t_in = jnp.asarray(t_np, dtype=dtype)
        t_in = _time_column(jnp, t_in, t_shape, n) if order != "concat" else t_in
        return np.asarray(_call_field(call, order, t_in, x_in, kwargs, cat))

    name = f"jax_field({_describe(fn)}, order={order!r})"
    if labels is None:
        return _named(lambda t, x: evaluate(t, x), name)
    return _named(lambda t, x, y: evaluate(t, x, y), name)


def jax_function(fn, *, dtype=None, jit: bool = False):
    """Any JAX function of refflow's argument order (arrays become ``jnp`` arrays, outputs NumPy)."""
    jax, jnp = _import_jax()
    if not callable(fn):
        raise TypeError(f"fn: expected a callable, got {type(fn).__name__}")
    dtype = _jax_dtype(jax, jnp, dtype)
    inner = jax.jit(fn) if jit else fn

    def convert(a):
        if isinstance(a, np.ndarray):
            return jnp.asarray(a) if a.dtype.kind in "iu" else jnp.asarray(a, dtype=dtype)
        return a

    def call(*args, **kwargs):
        out = inner(*(convert(a) for a in args), **kwargs)
        return tuple(np.asarray(o) for o in out) if isinstance(out, tuple) else np.asarray(out)

    try:
        call.__signature__ = inspect.signature(fn)
    except (TypeError, ValueError):
        pass
    return _named(call, f"jax_function({_describe(fn)})")


# ---------------------------------------------------------------------------
# A sampler from a field
# ---------------------------------------------------------------------------


def sampler_from_field(field, *, n_steps: int = 100, method: str = "midpoint", dim: int | None = None):
    r"""A sampler ``(n, seed, case) -> x`` that integrates ``field`` (a refflow field ``(t, x) -> u``,
    e.g. :func:`torch_field` of a trained model) from :math:`x_0 \sim \mathcal N(0, I)` at t = 0 to
    t = 1 (eq 8) with ``n_steps`` fixed steps of ``method`` (``"euler"``, ``"midpoint"``, ``"rk4"``).

    ``x_0`` is drawn by ``numpy.random.default_rng(seed)``, so the same seed
    gives the same samples; the dimension comes from the case refflow hands
    over (or ``dim``).
    """
    from refflow.solvers import integrate

    if not callable(field):
        raise TypeError(f"field: expected a callable (t, x) -> u, got {type(field).__name__}")
    if method not in ("euler", "midpoint", "rk4"):
        raise ValueError(f"method: expected 'euler', 'midpoint' or 'rk4', got {method!r}")
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps: expected a positive int, got {n_steps!r}")

    def numpy_field(t, x):
        from refflow.validate.calling import to_numpy

        t_rows = np.full(x.shape[0], float(t))
        return to_numpy(field(t_rows, x), "the field's output")[0]

    def sampler(n, seed, case=None):
        d = dim if dim is not None else (case.dim if case is not None else None)
        if d is None:
            raise ValueError("dim: expected the dimension (give dim=, or let refflow hand over the case)")
        x_0 = np.random.default_rng(seed).standard_normal((n, d))
        return integrate(numpy_field, x_0, 0.0, 1.0, method=method, n_steps=n_steps).x

    return _named(sampler, f"sampler_from_field({getattr(field, '__qualname__', 'field')}, "
                           f"{method}, {n_steps} steps)")


# ---------------------------------------------------------------------------
# Choosing the adapter
# ---------------------------------------------------------------------------


def _detect(obj) -> str | None:
    modules = [c.__module__ or "" for c in type(obj).__mro__]
    if any(m.startswith("flow_matching.path") for m in modules) and hasattr(obj, "sample"):
        return "flow_matching"
    if hasattr(obj, "sample_location_and_conditional_flow"):
        return "torchcfm"
    if any(m.startswith("torch.nn") for m in modules):
        return "torch"
    if any(m.split(".")[0] in ("jax", "jaxlib") for m in modules):
        return "jax"
    return None


def adapt(obj, kind: str, adapter: str = "auto", **options):
    """Wrap ``obj`` for :func:`refflow.validate.check` of ``kind`` with the adapter named ``adapter``.

    ``"auto"`` recognises a flow_matching path, a TorchCFM matcher, a torch
    ``nn.Module`` and a jitted JAX function, and returns anything else
    unchanged.  ``options`` go to the adapter (``dtype``, ``device``,
    ``order``, ``t_shape``, ``labels``, ``noise``, ...).
    """
    if adapter not in ADAPTERS:
        raise ValueError(f"adapter: expected one of {list(ADAPTERS)}, got {adapter!r}")
    if adapter == "auto":
        adapter = _detect(obj)
        if adapter is None:
            if options:
                raise ValueError(f"adapter: 'auto' found no adapter for {type(obj).__name__}, "
                                 f"so the options {sorted(options)} have nowhere to go")
            return obj
    if adapter == "flow_matching":
        if kind == "path":
            return flow_matching_path(obj, **options)
        adapter = "torch"  # a ModelWrapper is an nn.Module: model(x, t, **extras)
    if adapter == "torchcfm":
        if kind == "path":
            return torchcfm_path(obj, **options)
        adapter = "torch"  # TorchCFM's models are nn.Modules
    if adapter == "torch":
        if kind == "field":
            return torch_field(obj, **options)
        if kind == "guided":
            return torch_field(obj, **{"labels": "y", "guidance": "w", **options})
        if kind == "path":
            return torch_path(obj, **options)
        return torch_function(obj, **options)
    if kind == "field":
        return jax_field(obj, **options)
    return jax_function(obj, **options)
