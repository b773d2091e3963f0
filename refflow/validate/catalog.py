"""The catalog of cases: targets and paths for which every quantity is known in closed form.

A :class:`Case` names a Gaussian-mixture target, a path, ``sigma_min`` and a
dimension; its name (``"eight-gaussians/ot/sigma_min=0/d=2"``) is stable, so
reports and golden vectors refer to it.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools

from refflow.paths import (
    AffinePath,
    CosinePath,
    LinearVPPath,
    OTPath,
    PolynomialPath,
    VEPath,
    VPPath,
)
from refflow.interpolants import Interpolant, make_interpolant
from refflow.targets import (
    GaussianMixture,
    MixtureMarginal,
    checkerboard,
    eight_gaussians,
    random_mixture,
    two_moons,
)


def torchcfm_eight_gaussians() -> GaussianMixture:
    """TorchCFM's ``sample_8gaussians`` as a mixture: radius 5, per-coordinate variance sqrt(0.1).

    ``torchcfm.utils.eight_normal_sample(n, 2, scale=5, var=0.1)`` draws its
    noise from ``MultivariateNormal(0, sqrt(var) * I)``, whose *covariance*
    is sqrt(0.1) I (standard deviation 0.1**0.25 = 0.562), not 0.1 I.
    """
    return eight_gaussians(radius=5.0, std=0.1**0.25)

__all__ = ["Case", "catalog", "interpolant_catalog", "get_case", "require_kind"]

# The seed of the random mixture targets of the catalog (part of their definition).
_MIXTURE_SEED = 20240701


def _build_target(name: str, dim: int) -> GaussianMixture:
    if name == "eight-gaussians":
        return eight_gaussians()
    if name == "two-moons":
        return two_moons()
    if name == "checkerboard":
        return checkerboard()
    if name == "torchcfm-eight-gaussians":
        return torchcfm_eight_gaussians()
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
    for family in ("icfm", "sb"):  # two-sided interpolants, e.g. "icfm-sigma=0.1"
        if name.startswith(family + "-sigma="):
            return make_interpolant(family, float(name[len(family) + len("-sigma="):]))
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
        if isinstance(self.path, Interpolant):  # its marginal is that of an affine path
            return self.path.marginal(self.target)
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
        An interpolant case (:mod:`refflow.interpolants`) tests ``path`` and ``coupling``.
        """
        if isinstance(self.path, Interpolant):
            return ("path", "coupling")
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

    # The case handed to users and other languages (refflow.validate.cases).
    def parameters(self) -> dict:
        """The target's ``weights``, ``means``, ``covariances`` (full) and ``labels`` as arrays."""
        from refflow.validate.cases import case_parameters
        return case_parameters(self)

    def sample_data(self, n: int, rng):
        """``n`` training points drawn from the target :math:`q_1`, shape ``(n, d)``."""
        return self.target.sample(n, rng)

    def to_json(self) -> dict:
        """The case as a JSON-able dict (target parameters, path and schedule); see :func:`~refflow.validate.cases.case_to_dict`."""
        from refflow.validate.cases import case_to_dict
        return case_to_dict(self)

    def save_npz(self, file) -> None:
        """Write the case as ``.npz`` (arrays for other languages); see :func:`~refflow.validate.cases.save_case_npz`."""
        from refflow.validate.cases import save_case_npz
        save_case_npz(self, file)


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
    ("torchcfm-eight-gaussians", "ot", 0.0, 2),
    ("mixture", "ot", 0.0, 5),
    ("mixture", "ot", 0.05, 5),
    ("mixture", "vp", 0.0, 5),
    ("mixture", "ot", 0.0, 16),
)

_CATALOG = {case.name: case for case in (Case(*spec) for spec in _CATALOG_SPECS)}

# Two-sided interpolants (kinds path and coupling), kept out of catalog() so that the
# golden vectors and every-kind tests of the Gaussian paths are unchanged.
_INTERPOLANT_SPECS = (
    ("eight-gaussians", "icfm-sigma=0.1", 0.0, 2),
    ("eight-gaussians", "sb-sigma=0.5", 0.0, 2),
    ("eight-gaussians", "sb-sigma=1", 0.0, 2),
    ("mixture", "icfm-sigma=0.1", 0.0, 5),
)

_INTERPOLANTS = {case.name: case for case in (Case(*spec) for spec in _INTERPOLANT_SPECS)}


def interpolant_catalog() -> list[Case]:
    """The interpolant cases (:mod:`refflow.interpolants`; kinds ``path`` and ``coupling``)."""
    return list(_INTERPOLANTS.values())


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
    if case in _INTERPOLANTS:
        return _INTERPOLANTS[case]
    close = difflib.get_close_matches(case, list(_CATALOG) + list(_INTERPOLANTS), n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(
        f"case: expected a catalog case name (see `refflow check --list`), got {case!r}{hint}"
    )




def require_kind(case: Case, kind: str) -> None:
    """Refuse a kind that ``case`` cannot test, saying why."""
    if kind not in case.kinds:
        why = ("loglik and sampler need p_0 = N(0, I) exactly, which the VE and VP paths do not give"
               if kind in ("loglik", "sampler") else "guided needs a target with class labels"
               if kind == "guided" else "coupling is tested on the interpolant cases (interpolant_catalog())"
               if kind == "coupling" else "an interpolant case tests only path and coupling")
        raise ValueError(
            f"case: {case.name!r} does not support kind {kind!r} (its kinds: {', '.join(case.kinds)}); {why}"
        )

