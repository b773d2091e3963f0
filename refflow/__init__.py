"""refflow: a float64 reference implementation of flow matching, checked against closed-form ground truth.

Equation numbers refer to the notes on flow matching (eq 1-40); each equation is
stated, with its code, on the docs page of its part (``docs/math-to-code.md``
links every number to its page).
"""
# The names below are imported on first use (PEP 562), so that `import refflow`
# (and the pytest plugin refflow.pytest_plugin, which every pytest run loads)
# costs nothing until a name is used.
_LAZY = {
    "refflow.paths": ("AffinePath", "CosinePath", "CustomPath", "LinearVPPath", "OTPath", "PolynomialPath",
                      "VEPath", "VPPath", "make_path"),
    "refflow.targets": ("Empirical", "GaussianMixture", "checkerboard", "eight_gaussians", "make_target",
                        "monte_carlo_velocity", "random_mixture", "single_gaussian", "two_moons"),
}
_SOURCE = {name: module for module, names in _LAZY.items() for name in names}
__all__ = [name for names in _LAZY.values() for name in names]


def __getattr__(name):
    if name in _SOURCE:
        import importlib

        value = getattr(importlib.import_module(_SOURCE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'refflow' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_SOURCE))


__version__ = "0.1.0"
