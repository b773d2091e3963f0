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
``coupling``  ``(x_0, x_1) ->`` a plan   exact or entropic OT for the squared
              ``(n, m)`` or a re-paired  cost (:mod:`~refflow.validate.coupling`;
              batch ``(x_0', x_1')``     ``method=``, ``reg=``)
============  =========================  ==========================================

On an interpolant case (:func:`interpolant_catalog`) the ``path`` kind is
``(x_0, x_1, t, eps) -> (x_t, u_t)`` with
:math:`x_t = a_t x_0 + b_t x_1 + \gamma_t \epsilon`, or ``(x_0, x_1, t)`` for
an implementation that draws its own noise (:mod:`~refflow.validate.interpolant`).

``t`` is an array of shape ``(n,)`` (one time per row), ``y`` int64 of shape
``(n,)``.  Outputs may be NumPy arrays, anything ``numpy.asarray`` accepts,
or torch tensors (converted with ``.detach().cpu().numpy()``; torch is never
imported by refflow).  Inputs are exactly representable in float32, so a
float32 implementation receives them without rounding.

Tolerances (they follow from the method; ``threshold`` overrides the headline one)
-----------------------------------------------------------------------------------

* exact quantities (path, field, guided): each row is held to what a
  backward-stable implementation in the output's dtype can make at that row
  (:mod:`refflow.validate.precision`): the rounding of the formula's terms
  plus the conditioning of the quantity there, measured by evaluating the
  reference at inputs perturbed by 16 unit roundoffs.  So float16 and
  bfloat16 outputs get their own, honest bound, and an ill-conditioned
  corner (a VP path near t = 1) gets the room that a correct formula needs
  there, while a cancellation that a correct formula avoids does not;
* a trained field: ``threshold`` bounds the relative L2 error
  :math:`E\|u - u^*\|^2 / E\|u^*\|^2` over :math:`t \sim U(0, 1)`,
  :math:`x \sim p_t` (the objective of eq 15 normalised);
* log-likelihood: ``1e-6`` (error relative to ``max(1, |log p_1|)``, the
  error of an ODE solver at ``rtol <= 1e-8``) plus the rounding bound of
  the output dtype; a stochastic (Hutchinson) estimate is judged by the mean
  of repeated calls, by a z-test;
* sampler: z-tests and a permutation test at family-wise false-alarm rate
  ``1e-3`` (``threshold`` sets this rate), split by Bonferroni.

The implementation cannot fool the check: refflow computes its reference
first, on its own arrays, and hands the implementation copies (one that
changes them fails the ``inputs`` property); anything it raises, exits with
or crashes on becomes :class:`ImplementationError`; ``timeout=`` runs the
check in a child process with a time limit (:mod:`refflow.validate.calling`).

The package: :mod:`~refflow.validate.catalog` (the cases),
:mod:`~refflow.validate.calling` (loading and calling implementations),
:mod:`~refflow.validate.precision` (tolerances from the arithmetic),
:mod:`~refflow.validate.causes` (likely causes), one module per kind
(:mod:`~refflow.validate.path`, :mod:`~refflow.validate.field`,
:mod:`~refflow.validate.loglik`, :mod:`~refflow.validate.sampler`,
:mod:`~refflow.validate.guided`), and :mod:`~refflow.validate.report`.
"""
from __future__ import annotations

from refflow.stats import energy_distance_test
from refflow.validate.calling import ImplementationError, load_impl, run_isolated
from refflow.validate.catalog import Case, catalog, get_case, interpolant_catalog, require_kind
from refflow.validate.cases import bind_case, load_case_file, make_case
from refflow.validate.causes import CAUSES
from refflow.validate.coupling import check_coupling
from refflow.validate.errors import row_error
from refflow.validate.field import check_field
from refflow.validate.guided import GUIDANCE_WEIGHTS, check_guided
from refflow.validate.interpolant import check_interpolant
from refflow.validate.loglik import LOGLIK_TOL, check_loglik
from refflow.validate.path import check_path
from refflow.validate.report import CheckReport, PropertyResult
from refflow.validate.sampler import check_sampler

__all__ = [
    "KINDS",
    "CAUSES",
    "ImplementationError",
    "LOGLIK_TOL",
    "GUIDANCE_WEIGHTS",
    "Case",
    "catalog",
    "interpolant_catalog",
    "get_case",
    "make_case",
    "load_case_file",
    "bind_case",
    "load_impl",
    "PropertyResult",
    "CheckReport",
    "check",
    "check_path",
    "check_field",
    "check_loglik",
    "check_sampler",
    "check_guided",
    "check_interpolant",
    "check_coupling",
    "row_error",
    "energy_distance_test",
]

KINDS = ("path", "field", "loglik", "sampler", "guided", "coupling")
"""The kinds of implementation :func:`check` knows how to test."""


def _check_any_path(impl, case, **options):
    # an interpolant case (x_t = a_t x_0 + b_t x_1 + gamma_t eps) has its own path check
    if getattr(case.path, "marginal_path", None) is not None:
        return check_interpolant(impl, case, **options)
    return check_path(impl, case, **options)


_CHECKS = {
    "path": _check_any_path,
    "coupling": check_coupling,
    "field": check_field,
    "loglik": check_loglik,
    "sampler": check_sampler,
    "guided": check_guided,
}


def check(kind: str, impl, case, *, threshold=None, seed=0, timeout=None, **options) -> CheckReport:
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
    timeout : float, optional
        Seconds.  When given, the check runs in a child process (``fork``),
        so that an implementation that hangs, crashes or calls ``os._exit``
        ends in an :class:`ImplementationError` instead of taking this
        process with it.  None (the default) runs it here.
    **options
        Passed to the ``check_<kind>`` function (``n``, ``batch_size``,
        ``conditional``, ``convention``, ...).

    Returns
    -------
    CheckReport

    Raises
    ------
    ImplementationError
        The implementation raised, exited, crashed, hung past ``timeout`` or
        returned something of the wrong type or shape.
    ValueError, TypeError
        A bad argument of this call (unknown kind or case, bad options).
    """
    if kind not in _CHECKS:
        raise ValueError(f"kind: expected one of {list(KINDS)}, got {kind!r}")
    case = get_case(case)
    require_kind(case, kind)
    impl = bind_case(impl, case)  # an implementation with a `case` parameter receives the Case
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"timeout: expected a positive number of seconds or None, got {timeout!r}")
        return run_isolated(_CHECKS[kind], (impl, case), dict(threshold=threshold, seed=seed, **options),
                            timeout=float(timeout))
    return _CHECKS[kind](impl, case, threshold=threshold, seed=seed, **options)
