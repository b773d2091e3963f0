"""refflow: a float64 reference implementation of flow matching, checked against closed-form ground truth.

Equation numbers refer to the notes ``flow_matching_notes.md`` (eq 1-40).
"""
from refflow.paths import (
    AffinePath,
    CosinePath,
    CustomPath,
    LinearVPPath,
    OTPath,
    PolynomialPath,
    VEPath,
    VPPath,
    make_path,
)
from refflow.targets import (
    Empirical,
    GaussianMixture,
    checkerboard,
    eight_gaussians,
    make_target,
    monte_carlo_velocity,
    random_mixture,
    single_gaussian,
    two_moons,
)

__version__ = "0.1.0"
