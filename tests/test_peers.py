"""Real implementations through `refflow check`: facebookresearch/flow_matching and TorchCFM.

They must pass where they are correct, in float64 and in lower precision,
and fail where their arithmetic is unstable.  Skipped when the packages are
absent (they are not test dependencies: `pip install torch flow_matching torchcfm`).
"""
import numpy as np
import pytest

from refflow.validate import check

torch = pytest.importorskip("torch")

OT = "eight-gaussians/ot/sigma_min=0/d=2"


def _flow_matching_path(scheduler, dtype):
    from flow_matching.path import AffineProbPath

    path = AffineProbPath(scheduler)

    def impl(x_0, x_1, t):
        sample = path.sample(x_0=torch.from_numpy(x_0).to(dtype), x_1=torch.from_numpy(x_1).to(dtype),
                             t=torch.from_numpy(t).to(dtype))
        return sample.x_t, sample.dx_t

    return impl


FLOW_MATCHING_CASES = {
    "CondOTScheduler": ((), OT),
    "VPScheduler": ((), "eight-gaussians/vp/sigma_min=0/d=2"),
    "LinearVPScheduler": ((), "eight-gaussians/linear-vp/sigma_min=0/d=2"),
    "CosineScheduler": ((), "eight-gaussians/cosine/sigma_min=0/d=2"),
    "PolynomialConvexScheduler": ((2,), "eight-gaussians/polynomial/sigma_min=0/d=2"),
}


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
@pytest.mark.parametrize("name", list(FLOW_MATCHING_CASES))
def test_flow_matching_paths_pass_in_every_precision(name, dtype):
    scheduler_module = pytest.importorskip("flow_matching.path.scheduler")
    args, case = FLOW_MATCHING_CASES[name]
    impl = _flow_matching_path(getattr(scheduler_module, name)(*args), getattr(torch, dtype))
    for seed in range(3):
        report = check("path", impl, case, seed=seed)
        assert report.passed, report.table()
        assert report.settings["output_dtype"] == dtype


def _torchcfm(matcher, dtype, hand_noise):
    def impl(x_0, x_1, t):
        x_0_t = torch.from_numpy(x_0).to(dtype)
        if hand_noise:                   # the matcher's eps is refflow's x_0: judged exactly
            matcher.sample_noise_like = lambda x: x_0_t
        _, x_t, u_t = matcher.sample_location_and_conditional_flow(
            x_0_t, torch.from_numpy(x_1).to(dtype), t=torch.from_numpy(t).to(dtype))
        return x_t, u_t

    return impl


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_torchcfm_matchers_with_sigma_zero_pass(dtype):
    cfm = pytest.importorskip("torchcfm.conditional_flow_matching")
    dt = getattr(torch, dtype)
    assert check("path", _torchcfm(cfm.ConditionalFlowMatcher(0.0), dt, False), OT).passed
    vp = check("path", _torchcfm(cfm.VariancePreservingConditionalFlowMatcher(0.0), dt, False),
               "eight-gaussians/cosine/sigma_min=0/d=2")
    assert vp.passed, vp.table()
    # TargetConditionalFlowMatcher draws its own eps: judged by its law, and correct as a stochastic path
    own = check("path", _torchcfm(cfm.TargetConditionalFlowMatcher(0.0), dt, False), OT)
    assert own.passed, own.table()
    assert "draws_own_noise" in own["x_t"].causes or own["x_t"].passed is None
    assert own["x_t_law"].passed and own["u_t_given_x_t"].passed


def test_torchcfm_target_matcher_in_float32_loses_precision_near_t1():
    """u_t = (x_1 - x_t) / (1 - t) divides a rounded x_t by sigma_t: error u |x| / (1 - t) where the
    target x_1 - x_0 is perfectly conditioned."""
    cfm = pytest.importorskip("torchcfm.conditional_flow_matching")
    report = check("path", _torchcfm(cfm.TargetConditionalFlowMatcher(0.0), torch.float32, True), OT)
    assert report["x_t"].passed
    assert report["u_t"].passed is False
    assert "precision_near_t1" in report["u_t"].causes
    assert report["u_t"].error > 1e-3


def test_torchcfm_exact_ot_matcher_is_named_a_coupling():
    cfm = pytest.importorskip("torchcfm.conditional_flow_matching")
    pytest.importorskip("ot")
    report = check("path", _torchcfm(cfm.ExactOptimalTransportConditionalFlowMatcher(0.0), torch.float64, False), OT)
    assert report["x_t"].passed is False
    assert "repairs_batch" in report["x_t"].causes
