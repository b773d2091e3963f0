"""refflow.adapters against the real PyTorch, flow_matching, TorchCFM and JAX (each skipped when absent)."""
import numpy as np
import pytest

from refflow import adapters
from refflow.validate import check, get_case

torch = pytest.importorskip("torch")

OT = "eight-gaussians/ot/sigma_min=0/d=2"
OT_MIN = "eight-gaussians/ot/sigma_min=0.05/d=2"


class MixtureField(torch.nn.Module):
    r"""The closed-form marginal field (eq 19) of an isotropic mixture along the OT path, in torch.

    Component k, N(m_k, v_k I), is carried to N(t m_k, (s_t^2 + t^2 v_k) I) with
    s_t = 1 - (1 - sigma_min) t; its field is m_k + (var_k'/(2 var_k)) (x - t m_k),
    and the marginal field averages them with the posterior weights.
    """

    def __init__(self, case, bug=None):
        super().__init__()
        p = case.parameters()
        self.register_buffer("w", torch.tensor(p["weights"]))
        self.register_buffer("m", torch.tensor(p["means"]))
        self.register_buffer("v", torch.tensor(p["covariances"][:, 0, 0]))
        self.register_buffer("labels", torch.tensor(p["labels"]))
        self.sigma_min = case.sigma_min
        self.bug = bug

    def field(self, x, t, y=None):
        t = t.reshape(-1, 1)
        if self.bug == "reversed":
            t = 1 - t
        s = 1 - (1 - self.sigma_min) * t
        var = s**2 + t**2 * self.v                                   # (n, K)
        d_var = -2 * (1 - self.sigma_min) * s + 2 * t * self.v
        mu = t[:, :, None] * self.m                                  # (n, K, d)
        diff = x[:, None, :] - mu
        u_k = self.m + (d_var / (2 * var))[:, :, None] * diff
        log_r = torch.log(self.w) - 0.5 * x.shape[1] * torch.log(var) - (diff**2).sum(-1) / (2 * var)
        if y is not None:
            keep = (self.labels[None, :] == y[:, None]) | (y[:, None] == -1)
            log_r = torch.where(keep, log_r, torch.full_like(log_r, -torch.inf))
        r = torch.softmax(log_r, dim=1)
        return (r[:, :, None] * u_k).sum(1)


class XT(MixtureField):
    def forward(self, x, t):
        return self.field(x, t)


class TXColumn(MixtureField):
    def forward(self, t, x):
        assert t.shape == (x.shape[0], 1), t.shape
        return self.field(x, t)


class ScalarT(MixtureField):
    def forward(self, x_t, t):
        assert t.ndim == 0
        return self.field(x_t, t.expand(x_t.shape[0]))


class Concat(MixtureField):
    def forward(self, xt):  # TorchCFM's MLP(dim, time_varying=True) convention: [x, t]
        return self.field(xt[:, :-1], xt[:, -1])


class Conditional(MixtureField):
    def forward(self, x, t, *, cond, scale):
        return scale * self.field(x, t, cond)


@pytest.mark.parametrize("module, options", [
    (XT, {}),
    (TXColumn, {"t_shape": "n1"}),
    (ScalarT, {"t_shape": "scalar"}),
    (Concat, {}),
])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_field_signatures(module, options, dtype):
    case = get_case(OT)
    model = module(case).to(dtype)
    n = 256 if module is ScalarT else 1024
    report = check("field", adapters.adapt(model, "field", **options), case, n=n)
    assert report.passed, report.table()
    assert report.settings["output_dtype"] == str(dtype).replace("torch.", "")
    # negative control: the same model with its time reversed
    bad = module(case, bug="reversed").to(dtype)
    assert not check("field", adapters.adapt(bad, "field", **options), case, n=n).passed


def test_torch_field_order_is_read_from_the_signature_and_a_wrong_order_fails():
    case = get_case(OT)
    model = TXColumn(case).double()
    assert adapters.adapt(model, "field", t_shape="n1").__qualname__.endswith("order='tx')")
    with pytest.raises(Exception):
        check("field", adapters.torch_field(model, order="xt", t_shape="n1"), case, n=256)


def test_torch_field_labels_and_conditioning_keywords():
    case = get_case(OT_MIN)
    model = Conditional(case).double()
    field = adapters.torch_field(model, labels="cond", scale=1.0)
    report = check("field", field, case, n=1024)
    assert report.passed and report.settings["conditional"], report.table()
    wrong = adapters.torch_field(model, labels="cond", scale=1.1)
    assert not check("field", wrong, case, n=1024).passed


def test_a_module_passed_without_adapter_gets_one_in_refflow_testing():
    from refflow.testing import assert_field

    assert_field(XT(get_case(OT)).double(), OT, n=512)  # adapter="auto" by default


def test_sampler_from_a_torch_field():
    case = get_case(OT_MIN)
    sampler = adapters.sampler_from_field(adapters.torch_field(XT(case).double()), n_steps=100, method="rk4")
    report = check("sampler", sampler, case, n=1000)
    assert report.passed, report.table()
    bad = adapters.sampler_from_field(adapters.torch_field(XT(case, bug="reversed").double()), n_steps=100)
    assert not check("sampler", bad, case, n=1000).passed


def test_torch_path_and_function():
    def ot(x_0, x_1, t):
        t = t[:, None]
        return (1 - t) * x_0 + t * x_1, x_1 - x_0

    assert check("path", adapters.torch_path(ot, dtype="float64"), OT).passed
    assert check("path", adapters.torch_path(ot, dtype=torch.float32), OT).passed
    with pytest.raises(ValueError, match="dtype: expected a torch dtype name"):
        adapters.torch_path(ot, dtype="float33")


def test_flow_matching_affine_prob_path():
    fm_path = pytest.importorskip("flow_matching.path")
    scheduler = pytest.importorskip("flow_matching.path.scheduler")
    for sched, case in ((scheduler.CondOTScheduler(), OT),
                        (scheduler.CosineScheduler(), "eight-gaussians/cosine/sigma_min=0/d=2")):
        path = fm_path.AffineProbPath(sched)
        for dtype in (torch.float32, torch.float64):
            report = check("path", adapters.adapt(path, "path", dtype=dtype), case)
            assert report.passed, report.table()
    # negative control: the OT path checked against the cosine case
    wrong = adapters.adapt(fm_path.AffineProbPath(scheduler.CondOTScheduler()), "path")
    assert not check("path", wrong, "eight-gaussians/cosine/sigma_min=0/d=2").passed


def test_flow_matching_model_wrapper_is_called_as_x_t():
    wrapper = pytest.importorskip("flow_matching.utils.model_wrapper")

    class Wrapped(wrapper.ModelWrapper):
        def forward(self, x, t, **extras):
            return self.model.field(x, t.reshape(-1).expand(x.shape[0]))

    case = get_case(OT)
    model = Wrapped(XT(case).double())
    assert check("field", adapters.adapt(model, "field"), case, n=512).passed


def test_torchcfm_matchers():
    cfm = pytest.importorskip("torchcfm.conditional_flow_matching")
    for matcher, case in ((cfm.ConditionalFlowMatcher(0.0), OT),
                          (cfm.VariancePreservingConditionalFlowMatcher(0.0), "eight-gaussians/cosine/sigma_min=0/d=2")):
        for dtype in (torch.float32, torch.float64):
            report = check("path", adapters.adapt(matcher, "path", dtype=dtype), case)
            assert report.passed, report.table()
    # Lipman et al.'s matcher: its noise is the source sample; refflow hands it x_0.  It
    # divides a rounded x_t by sigma_t, so it is checked, and must be judged, where sigma_t > 0
    target = cfm.TargetConditionalFlowMatcher(0.05)
    fn = adapters.adapt(target, "path", dtype=torch.float64)
    x_0, x_1, t = np.random.default_rng(0).normal(size=(3, 5, 2))
    t = np.linspace(0.1, 0.9, 5)
    x_t, u_t = fn(x_0, x_1, t)
    path = get_case(OT_MIN).path
    np.testing.assert_allclose(x_t.numpy(), path.sigma(t)[:, None] * x_0 + path.alpha(t)[:, None] * x_1,
                               rtol=1e-12)
    np.testing.assert_allclose(u_t.numpy(), path.d_sigma(t)[:, None] * x_0 + path.d_alpha(t)[:, None] * x_1,
                               rtol=1e-9)
    # a matcher that draws noise beside x_0 is refused unless told what to do with it
    with pytest.raises(ValueError, match="noise: ConditionalFlowMatcher with sigma=0.1"):
        adapters.adapt(cfm.ConditionalFlowMatcher(0.1), "path")
    assert check("path", adapters.torchcfm_path(cfm.ConditionalFlowMatcher(0.1), noise="zero"), OT).passed
    # the OT matcher re-pairs the batch: a coupling, named as such
    report = check("path", adapters.adapt(cfm.ExactOptimalTransportConditionalFlowMatcher(0.0), "path"), OT)
    assert not report.passed and "repairs_batch" in report["u_t"].causes


def test_torchcfm_mlp_concat_convention():
    models = pytest.importorskip("torchcfm.models.models")
    mlp = models.MLP(2, time_varying=True)
    fn = adapters.adapt(mlp, "field")
    assert "order='concat'" in fn.__qualname__
    u = fn(np.full(4, 0.5), np.zeros((4, 2)))
    assert tuple(u.shape) == (4, 2)


def test_adapt_refuses_unknown_names_and_passes_plain_functions():
    with pytest.raises(ValueError, match="adapter: expected one of"):
        adapters.adapt(lambda t, x: x, "field", "keras")
    f = lambda t, x: x  # noqa: E731
    assert adapters.adapt(f, "field") is f


def test_jax_field():
    jnp = pytest.importorskip("jax.numpy")
    jax = pytest.importorskip("jax")
    case = get_case(OT)
    p = case.parameters()
    w, m, v = jnp.asarray(p["weights"]), jnp.asarray(p["means"]), jnp.asarray(p["covariances"][:, 0, 0])

    def field(x, t):
        t = t.reshape(-1, 1)
        s = 1 - t
        var = s**2 + t**2 * v
        d_var = -2 * s + 2 * t * v
        diff = x[:, None, :] - t[:, :, None] * m
        u_k = m + (d_var / (2 * var))[:, :, None] * diff
        log_r = jnp.log(w) - jnp.log(var) - (diff**2).sum(-1) / (2 * var)
        r = jax.nn.softmax(log_r, axis=1)
        return (r[:, :, None] * u_k).sum(1)

    report = check("field", adapters.jax_field(field, jit=True), case, n=1024)
    assert report.passed and report.settings["output_dtype"] == "float32", report.table()
    assert not check("field", adapters.jax_field(lambda x, t: field(x, 1 - t)), case, n=1024).passed
