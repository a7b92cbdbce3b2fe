"""ARD priors: the empirical-Bayes KL against a numerical optimum, its gradients at the edges, the
hierarchy's sites and shapes, relevance recovery on a linear regression, and SVI convergence."""
import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
import torch.nn as nn
from pyro.infer import SVI, TraceMeanField_ELBO
from scipy.optimize import minimize_scalar
from torch.distributions import kl_divergence

import pyrobnn
from pyrobnn.guides import GuideNormal
from pyrobnn.priors import ARD, EmpiricalARD, HierarchicalARD
from pyrobnn.priors.ard import DEFAULT_A, DEFAULT_B, empirical_ard_kl
from pyrobnn.registry import PRIORS, spec_of


def _normal_kl(mu, sigma, delta):
    """KL(N(μ, σ²) ‖ N(0, δ²)) in float64."""
    return math.log(delta / sigma) + (sigma ** 2 + mu ** 2) / (2 * delta ** 2) - 0.5


PAIRS = [(0.0, 1.0), (0.3, 0.1), (-2.0, 0.5), (1e-3, 1e-2), (5.0, 1e-3), (-0.7, 3.0)]


@pytest.mark.parametrize("mu,sigma", PAIRS)
def test_empirical_kl_is_min_over_delta(mu, sigma):
    # numerical minimum over log δ of the Normal–Normal KL
    res = minimize_scalar(lambda log_d: _normal_kl(mu, sigma, math.exp(log_d)),
                          bracket=(math.log(sigma) - 1, math.log(sigma) + 1), tol=1e-12)
    numeric = res.fun
    assert math.exp(2 * res.x) == pytest.approx(mu ** 2 + sigma ** 2, rel=1e-5)  # the optimum δ²
    loc, scale = torch.tensor([mu], dtype=torch.float64), torch.tensor([sigma], dtype=torch.float64)
    closed = empirical_ard_kl(loc, scale).item()
    assert closed == pytest.approx(numeric, rel=1e-9, abs=1e-12)
    # through the registered rule, in both guide parameterisations
    p = EmpiricalARD().expand([1])
    assert kl_divergence(GuideNormal(loc, scale), p).item() == pytest.approx(numeric, rel=1e-9, abs=1e-12)
    assert kl_divergence(GuideNormal(loc, scale, gamma=loc / scale), p).item() == pytest.approx(numeric, rel=1e-9,
                                                                                                  abs=1e-12)
    assert kl_divergence(dist.Normal(loc, scale), p).item() == pytest.approx(numeric, rel=1e-9, abs=1e-12)


def test_empirical_kl_of_independent_sums_elementwise():
    loc, scale = torch.randn(3, 4, dtype=torch.float64), torch.rand(3, 4, dtype=torch.float64) + 0.1
    q = GuideNormal(loc, scale).to_event(2)
    p = EmpiricalARD().expand([3, 4]).to_event(2)
    expected = 0.5 * torch.log1p(loc ** 2 / scale ** 2).sum()
    assert kl_divergence(q, p).item() == pytest.approx(expected.item(), rel=1e-12)


def test_empirical_kl_gradients_finite_at_zero_mean_and_zero_scale():
    # γ parameterisation (empirical-Bayes ARD): KL = ½ log(1 + γ²), σ = softplus(ρ) never appears
    gamma = torch.tensor([0.0, 1e-30, 1.0, -1e6], requires_grad=True)
    rho = torch.tensor([-100.0, -100.0, -80.0, 0.0], requires_grad=True)  # σ ≈ 4e-44 (denormal) ... 0.69
    sigma = torch.nn.functional.softplus(rho)
    kl = empirical_ard_kl(gamma * sigma, sigma, gamma)
    kl.sum().backward()
    assert torch.isfinite(kl).all() and torch.isfinite(gamma.grad).all()
    assert rho.grad is None  # in this parameterisation the KL does not depend on σ at all
    assert gamma.grad[0].item() == 0.0
    assert gamma.grad[2].item() == pytest.approx(0.5)  # d/dγ ½ log(1 + γ²) = γ / (1 + γ²)
    assert kl[3].item() == pytest.approx(math.log(1e6), rel=1e-6)  # no overflow of γ² when large
    # (μ, σ) parameterisation (additive noise / softplus guides): μ → 0 and σ → 0 separately
    mu = torch.tensor([0.0, 0.0, 1e-20, 1.0, 1e-3], dtype=torch.float32, requires_grad=True)
    sigma = torch.tensor([1.0, 1e-30, 1e-30, 1e-30, 1e-12], dtype=torch.float32, requires_grad=True)
    kl = empirical_ard_kl(mu, sigma)
    kl.sum().backward()
    assert torch.isfinite(kl).all() and torch.isfinite(mu.grad).all() and torch.isfinite(sigma.grad).all()
    assert mu.grad[0].item() == 0.0 and mu.grad[1].item() == 0.0
    assert kl[3].item() == pytest.approx(math.log(1e30), rel=1e-6)
    # dKL/dμ = μ / (μ² + σ²) where representable
    assert mu.grad[4].item() == pytest.approx(1e3, rel=1e-5)


def test_empirical_log_prob_and_sample_explain_themselves():
    p = EmpiricalARD().expand([2, 3])
    with pytest.raises(ValueError, match="hierarchical"):
        p.log_prob(torch.zeros(2, 3))
    # sample: the documented stand-in N(0, 1), so a model runs once without a guide (Predictive)
    torch.manual_seed(1)
    s = EmpiricalARD().expand([400, 500]).sample()
    assert s.shape == (400, 500) and abs(s.mean().item()) < 0.01 and abs(s.std().item() - 1) < 0.01
    # a local-reparameterisation placeholder carries q, so the prior at its optimum is defined, and its
    # density there is the expectation under q: E_q[log N(w; 0, μ² + σ²)] (Monte Carlo below)
    torch.manual_seed(0)
    loc, scale = torch.randn(2, 3), torch.rand(2, 3) + 0.1
    q = GuideNormal(loc, scale, placeholder=True)
    value = q.rsample()
    prior = dist.Normal(0.0, (loc ** 2 + scale ** 2).sqrt())
    mc = prior.log_prob(dist.Normal(loc, scale).sample((200000,))).mean(0)
    assert torch.allclose(p.log_prob(value), mc, atol=5e-3)
    # minus the guide's E_q[log q] it is −KL exactly, ½ log(1 + μ²/σ²) per weight
    assert torch.allclose(q.log_prob(value) - p.log_prob(value), 0.5 * torch.log1p(loc ** 2 / scale ** 2),
                          atol=1e-5)


def test_empirical_ard_fails_clearly_without_a_guide():
    bnn = pyrobnn.bayesian(nn.Sequential(nn.Linear(2, 1)), prior="ard", likelihood="bernoulli")
    x, y = torch.randn(8, 2), torch.randint(0, 2, (8,))
    # running the model from its prior draws from the stand-in (what Predictive does to find the sites) ...
    tr = poutine.trace(bnn.model).get_trace(x, y)
    assert tr.nodes["0.weight"]["value"].shape == (1, 2)
    # ... but it has no density there
    with pytest.raises(ValueError, match="ARD\\(mode='hierarchical'\\)"):
        tr.log_prob_sum()
    # a sampler's potential: the model conditioned on plain weight values
    values = {"0.weight": torch.zeros(1, 2), "0.bias": torch.zeros(1)}
    tr = poutine.trace(poutine.condition(bnn.model, data=values)).get_trace(x, y)
    with pytest.raises(ValueError, match="samplers"):
        tr.log_prob_sum()


def test_registry_names_config_and_validation():
    assert isinstance(PRIORS.build("ard"), EmpiricalARD)
    assert isinstance(PRIORS.build("ard-empirical"), EmpiricalARD)
    h = PRIORS.build({"name": "ard", "mode": "hierarchical", "group": "weight", "a": 2.0, "b": 0.5})
    assert isinstance(h, HierarchicalARD) and (h.group, h.a, h.b) == ("weight", 2.0, 0.5)
    assert PRIORS.build("ard-hierarchical").group == "input"
    assert spec_of(h) == {"name": "ard", "mode": "hierarchical", "group": "weight", "a": 2.0, "b": 0.5}
    assert spec_of(EmpiricalARD()) == {"name": "ard", "mode": "empirical"}
    assert (DEFAULT_A, DEFAULT_B) == (0.1, 1e-3)
    rebuilt = PRIORS.build(spec_of(h))
    assert rebuilt.config() == h.config()
    with pytest.raises(ValueError, match="mode"):
        ARD(mode="bayes")
    with pytest.raises(ValueError, match="group"):
        ARD(mode="hierarchical", group="output")
    with pytest.raises(ValueError, match="per weight"):
        ARD(mode="empirical", group="input")
    with pytest.raises(ValueError, match="positive"):
        ARD(mode="hierarchical", b=0.0)
    with pytest.raises(TypeError):
        ARD(mode="hierarchical", a="1")


def test_empirical_elbo_uses_closed_form_kl_in_both_parameterisations():
    torch.manual_seed(0)
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    for par in ("gamma", "softplus"):
        net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
        bnn = pyrobnn.bayesian(net, prior="ard", guide={"name": "mean-field", "parameterization": par},
                               likelihood="bernoulli", dataset_size=16)
        bnn.initialize(x)
        # hide the observation: the loss is then exactly Σ_sites KL
        model = poutine.block(bnn.model, hide=["obs"])
        loss = TraceMeanField_ELBO().differentiable_loss(model, bnn.guide, x, y)
        expected = 0.0
        for site in bnn.autoguide.site_names():
            loc, scale = bnn.autoguide.site_params(site)
            expected += 0.5 * torch.log1p((loc / scale) ** 2).sum().item()
        assert loss.item() == pytest.approx(expected, rel=1e-5)
        assert bnn.autoguide._layout["0.weight"][5]  # the weight site is locally reparameterised


def test_empirical_ard_with_additive_noise_guide():
    if "additive-noise" not in pyrobnn.registry.GUIDES.names():
        pytest.skip("additive-noise guide not available")
    torch.manual_seed(0)
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    bnn = pyrobnn.bayesian(nn.Sequential(nn.Linear(3, 2)), prior="ard", guide="additive-noise",
                           likelihood="categorical", dataset_size=16)
    bnn.initialize(x)
    loss = TraceMeanField_ELBO().differentiable_loss(poutine.block(bnn.model, hide=["obs"]), bnn.guide, x, y)
    expected = 0.0
    for site in bnn.autoguide.site_names():
        loc, scale = bnn.autoguide.site_params(site)
        expected += 0.5 * torch.log1p((loc / scale) ** 2).sum().item()
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("group,alpha_shapes", [
    ("input", {"0.weight.alpha": (5,), "0.bias.alpha": (), "1.weight.alpha": (4,), "1.bias.alpha": ()}),
    ("weight", {"0.weight.alpha": (2, 5), "0.bias.alpha": (2,), "1.weight.alpha": (3, 4, 3, 3),
                "1.bias.alpha": (3,)}),
    ("layer", {"0.weight.alpha": (), "0.bias.alpha": (), "1.weight.alpha": (), "1.bias.alpha": ()}),
])
def test_hierarchical_sites_and_broadcast(group, alpha_shapes):
    net = nn.Sequential(nn.Linear(5, 2), nn.Conv2d(4, 3, 3))
    prior = HierarchicalARD(group=group)
    torch.manual_seed(0)
    with poutine.trace() as tr:
        w0 = prior.sample_site("0.weight", net[0].weight.shape, infer={})
        prior.sample_site("0.bias", net[0].bias.shape, infer={})
        prior.sample_site("1.weight", net[1].weight.shape, infer={"local_reparameterization": True})
        prior.sample_site("1.bias", net[1].bias.shape, infer={})
    nodes = tr.trace.nodes
    for name, shape in alpha_shapes.items():
        assert tuple(nodes[name]["value"].shape) == shape
        assert isinstance(nodes[name]["fn"].base_dist if shape else nodes[name]["fn"], dist.Gamma)
    assert w0.shape == (2, 5)
    assert nodes["1.weight"]["infer"] == {"local_reparameterization": True}
    # w ~ N(0, 1/α): the scale at weight [o, i, ...] is α^(-1/2) of its group
    a1, s1 = nodes["1.weight.alpha"]["value"], nodes["1.weight"]["fn"].base_dist.scale
    if group == "input":
        for i in range(4):
            assert torch.allclose(s1[:, i], a1[i].rsqrt().expand_as(s1[:, i]))
    elif group == "weight":
        assert torch.allclose(s1, a1.rsqrt())
    else:
        assert torch.allclose(s1, a1.rsqrt().expand_as(s1))
    # the Gamma's log-density is Gamma(a, b)'s
    alpha = nodes["0.weight.alpha"]
    ref = dist.Gamma(torch.tensor(DEFAULT_A), torch.tensor(DEFAULT_B)).log_prob(alpha["value"])
    assert torch.allclose(alpha["fn"].log_prob(alpha["value"]), ref.sum() if ref.dim() else ref, atol=1e-5)


def test_hyper_prior_whose_median_underflows_is_refused():
    with pytest.raises(ValueError, match="underflow"):
        HierarchicalARD(a=1e-3, b=1e-3)  # median ≈ 5e-299: α initialised at 0 in float32, NaN loss
    with pytest.raises(ValueError, match="underflow"):
        ARD(mode="hierarchical", a=1e-4, b=1e-4)
    HierarchicalARD(a=0.05, b=1e-3)  # median ≈ 6e-4: fine
    HierarchicalARD(a=1.0, b=1.0)


def test_scalar_gamma_log_prob_matches_torch_for_shape_not_one():
    prior = HierarchicalARD(group="weight", a=2.5, b=0.3)
    fn = prior._hyper.expand([4])
    v = torch.tensor([0.1, 1.0, 7.0, 30.0])
    assert torch.allclose(fn.log_prob(v), dist.Gamma(2.5, 0.3).log_prob(v), atol=1e-5)


def _regression_problem(seed=0, n=200):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    w_true = torch.tensor([2.0, -1.5, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    y = x @ w_true + 0.3 + 0.1 * torch.randn(n, generator=g)
    return x, y, w_true


def test_hierarchical_ard_linear_regression_prunes_irrelevant_inputs():
    from pyrobnn.inference import fit
    x, y, w_true = _regression_problem()
    bnn = pyrobnn.bayesian(nn.Sequential(nn.Linear(8, 1)), prior=HierarchicalARD("input"),
                           likelihood={"name": "gaussian", "scale": 0.1}, dataset_size=len(x))
    fit(bnn, (x, y), 400, lr=0.05, batch_size=len(x), progress=False, seed=0)
    loc, scale = bnn.autoguide.site_params("0.weight.alpha")
    log_alpha = loc.detach()
    # irrelevant inputs: α far up (towards the ceiling (a + ½)/b = 600, log α ≈ 6.4)
    assert log_alpha[3:].min() > 4.0
    assert log_alpha[:3].max() < 1.5
    assert log_alpha[3:].min() - log_alpha[:3].max() > 3.0  # > e³ ≈ 20× in precision
    w, _ = bnn.autoguide.site_params("0.weight")
    w = w.detach().squeeze(0)
    assert torch.allclose(w[:3], w_true[:3], atol=0.03)  # relevant weights recovered
    assert w[3:].abs().max() < 0.03
    rel = pyrobnn.relevance(bnn, statistic="prior-variance")
    assert rel.method == "prior-variance"
    assert sorted(rel.ranks()[3:].tolist()) == [4, 5, 6, 7, 8]
    assert rel.inputs[:3].min() > 20 * rel.inputs[3:].max()


def _svi_toy(a, b, steps=300):
    """Plain Pyro SVI on a BNN's model/guide: hierarchical ARD (group="layer"), 4-8-1 ReLU, 128 points."""
    pyro.set_rng_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(128, 4, generator=g)
    y = ((x[:, 0] - 0.5 * x[:, 1]) > 0).long()
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    bnn = pyrobnn.bayesian(net, prior={"name": "ard", "mode": "hierarchical", "group": "layer", "a": a, "b": b},
                           guide={"name": "mean-field", "init_scale": 0.05}, likelihood="bernoulli",
                           dataset_size=128)
    bnn.initialize(x)
    svi = SVI(bnn.model, bnn.guide, pyro.optim.Adam({"lr": 0.05}), TraceMeanField_ELBO())
    losses = [svi.step(x, y) for _ in range(steps)]
    accuracy = (bnn.predict(x, 32).round() == y).float().mean().item()
    return [sum(losses[i:i + 50]) / 50 for i in range(0, steps, 50)], accuracy


def test_hierarchical_ard_svi_decreases_loss_and_converges():
    windows, accuracy = _svi_toy(DEFAULT_A, DEFAULT_B)
    first, before_last, last = windows[0], windows[-2], windows[-1]
    assert last < 0.5 * first  # measured: 153 → 49
    assert abs(last - before_last) < 0.05 * first  # converged: the last 100 steps move the loss little
    assert last < 128 * math.log(2)  # far below the constant predictor's NLL (88.7 nats)
    assert accuracy > 0.95


@pytest.mark.slow
def test_strong_hyper_prior_mean_collapses_the_toy_network():
    """Why the defaults are a = 0.1, b = 1e-3: Gamma(1, 0.01) (mean 100, median 69) prunes every
    weight of the same network — the loss stalls at the constant predictor's (documented in ard.py)."""
    windows, accuracy = _svi_toy(1.0, 1e-2)
    assert windows[-1] > 128 * math.log(2)
    assert accuracy < 0.7
