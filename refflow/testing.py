"""Assertions for your own test suite: ``torch.testing.assert_close``, for flow matching.

Each ``assert_<kind>`` runs :func:`refflow.validate.check` on your
implementation and raises :class:`AssertionError` whose message is the report
table (one row per property, its error, tolerance and likely cause) when a
property fails; it returns the :class:`~refflow.validate.CheckReport` when
every property passes::

    from refflow.testing import assert_field

    def test_my_field():
        assert_field(my_velocity, "eight-gaussians/ot/sigma_min=0/d=2")

They take the options of :func:`refflow.validate.check` (``threshold``,
``seed``, ``timeout``, ``n``, ``batch_size``, ``max_gap``, ...) and an
``adapter`` (:func:`refflow.adapters.adapt`: ``"torch"``, ``"jax"``,
``"flow_matching"``, ``"torchcfm"`` or ``"auto"``) that turns a PyTorch
module, a flow_matching path or a TorchCFM matcher into refflow's calling
convention.  The pytest plugin (:mod:`refflow.pytest_plugin`) adds the
``refflow_case`` fixture and the ``--refflow-seed`` option.
"""
from __future__ import annotations

import sys

import refflow.validate as _validate

__all__ = ["assert_check", "assert_path", "assert_field", "assert_loglik", "assert_sampler", "assert_guided"]

__tracebackhide__ = True  # pytest: show the user's line, not ours


class RefflowAssertionError(AssertionError):
    """A failed refflow check; ``.report`` is its :class:`~refflow.validate.CheckReport`."""

    def __init__(self, report):
        super().__init__("\n" + report.table())
        self.report = report


def assert_check(kind: str, impl, case, *, adapter="auto", adapter_options=None, **options):
    """Check ``impl`` of ``kind`` on ``case``; raise :class:`AssertionError` carrying the table if it fails.

    Parameters
    ----------
    kind : str
        One of :data:`refflow.validate.KINDS`.
    impl : callable or str
        Your implementation (or ``"module:function"``).
    case : str or Case
        A catalog name, a :class:`~refflow.validate.Case` (from the
        ``refflow_case`` fixture, :func:`~refflow.validate.make_case` or
        :func:`~refflow.validate.load_case_file`).
    adapter : str or None
        Wrap ``impl`` with :func:`refflow.adapters.adapt` first.  The default
        ``"auto"`` wraps a torch ``nn.Module``, a flow_matching path and a
        TorchCFM matcher, and leaves a plain function as it is; None never wraps.
    adapter_options : dict, optional
        Keywords of the adapter (``dtype``, ``device``, ``order``, ...).
    **options
        Options of :func:`refflow.validate.check`.

    Returns
    -------
    CheckReport
        When every judged property passed.

    Raises
    ------
    AssertionError
        A property failed; the message is :meth:`CheckReport.table`.
    refflow.validate.ImplementationError
        The implementation raised, crashed, hung or returned the wrong shape.
    """
    __tracebackhide__ = True
    if "seed" not in options:
        plugin = sys.modules.get("refflow.pytest_plugin")
        seed = plugin.selected_seed() if plugin is not None else None
        if seed is not None:  # pytest --refflow-seed
            options["seed"] = seed
    if adapter is not None:
        from refflow.adapters import adapt

        impl = adapt(impl, kind, adapter, **(adapter_options or {}))
    report = _validate.check(kind, impl, case, **options)
    if not report.passed:
        raise RefflowAssertionError(report)
    return report


def assert_path(impl, case, **options):
    """:func:`assert_check` for ``kind="path"``: ``impl(x_0, x_1, t) -> (x_t, u_t)``."""
    __tracebackhide__ = True
    return assert_check("path", impl, case, **options)


def assert_field(impl, case, **options):
    """:func:`assert_check` for ``kind="field"``: ``impl(t, x) -> u`` (or ``impl(t, x, y)``).

    For a trained model give ``threshold`` (the relative L2 error
    :math:`E\\|u - u^*\\|^2 / E\\|u^*\\|^2` it may reach; see the docs page
    "test your flow-matching code" for values measured on trained models).
    """
    __tracebackhide__ = True
    return assert_check("field", impl, case, **options)


def assert_loglik(impl, case, **options):
    """:func:`assert_check` for ``kind="loglik"``: ``impl(x) -> log p_1(x)``."""
    __tracebackhide__ = True
    return assert_check("loglik", impl, case, **options)


def assert_sampler(impl, case, **options):
    """:func:`assert_check` for ``kind="sampler"``: ``impl(n, seed) -> x``.

    For a trained model give ``max_gap`` (nats: the largest mean
    log-likelihood gap accepted) instead of the exact two-sample tests.
    """
    __tracebackhide__ = True
    return assert_check("sampler", impl, case, **options)


def assert_guided(impl, case, **options):
    """:func:`assert_check` for ``kind="guided"``: ``impl(t, x, y, w) -> u`` (eq 40)."""
    __tracebackhide__ = True
    return assert_check("guided", impl, case, **options)


def _add_kind(kind: str) -> None:
    # a kind that arrived in refflow.validate after this module was written (e.g. "coupling")
    name = "assert_" + kind.replace("-", "_")

    def assert_kind(impl, case, **options):
        __tracebackhide__ = True
        return assert_check(kind, impl, case, **options)

    assert_kind.__name__ = assert_kind.__qualname__ = name
    assert_kind.__doc__ = f":func:`assert_check` for ``kind={kind!r}``."
    globals()[name] = assert_kind
    __all__.append(name)


for _kind in _validate.KINDS:
    if "assert_" + _kind.replace("-", "_") not in globals():
        _add_kind(_kind)
del _kind
