"""MeanField guide: exact posterior recovery on conjugate Bayesian linear regression, KL, shapes."""
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn as nn
from pyro.infer import SVI, TraceMeanField_ELBO
from torch.distributions import kl_divergence

import pyrobnn
from pyrobnn.guides import GuideNormal, MeanField
from pyrobnn.priors import Gaussian
from pyrobnn.lrt import mean_var, placeholder_of


def conjugate_problem(n=200, d=3, prior_scale=1.0, noise=0.5, orthogonal=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    if orthogonal:  # orthogonal columns: the mean-field optimum equals the exact marginals
        q, _ = torch.linalg.qr(x)
        x = q * math.sqrt(n)
    w_true = torch.tensor([1.0, -2.0, 0.5])[:d]
    y = x @ w_true + noise * torch.randn(n, generator=g)
    precision = torch.eye(d) / prior_scale ** 2 + x.T @ x / noise ** 2
    cov = torch.linalg.inv(precision)
    mean = cov @ x.T @ y / noise ** 2
    mf_sd = 1 / torch.sqrt(torch.diagonal(precision))  # mean-field optimum: 1/sqrt(Λ_ii)
    return x, y, mean, mf_sd, cov


def _train(model, guide, args, steps=4000, lr=0.02, avg_from=3000, readout=None):
    readout = readout or guide
    optim = pyro.optim.ClippedAdam({"lr": lr, "lrd": 0.1 ** (1 / steps)})
    svi = SVI(model, guide, optim, TraceMeanField_ELBO())
    locs, sds = [], []
    for i in range(steps):
        svi.step(*args)
        if i >= avg_from:  # Polyak averaging removes most of the SGD noise from the read-out
            loc, sd = readout.site_params(readout.site_names()[0])
            locs.append(loc.detach().clone())
            sds.append(sd.detach().clone())
    return torch.stack(locs).mean(0), torch.stack(sds).mean(0)


def test_gamma_parameterization_maps_to_normal_and_decreases_loss():
    """μ = γ·softplus(ρ): the site is exactly N(γσ, σ²), gamma is exposed for ARD, and SVI descends."""
    x, y, mean, mf_sd, _ = conjugate_problem()

    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(x @ w, 0.5), obs=y)

    init = pyro.infer.autoguide.initialization.init_to_value(values={"w": mean / 2})
    guide = MeanField(model, init_scale=0.1, parameterization="gamma", init_loc_fn=init)
    tr = pyro.poutine.trace(guide).get_trace(x, y)
    q = tr.nodes["w"]["fn"].base_dist
    gamma, rho = guide.flat.gamma, guide.flat.rho
    sigma = torch.nn.functional.softplus(rho)
    assert torch.allclose(q.scale, sigma) and torch.allclose(q.loc, gamma * sigma)
    assert torch.allclose(q.gamma, gamma) and torch.allclose(gamma * 0.1, mean / 2, atol=1e-6)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), TraceMeanField_ELBO())
    first = sum(svi.step(x, y) for _ in range(20)) / 20
    for _ in range(500):
        svi.step(x, y)
    last = sum(svi.step(x, y) for _ in range(20)) / 20
    assert last < first - 100


@pytest.mark.parametrize("parameterization", ["softplus"])
def test_meanfield_recovers_conjugate_posterior_pyro_model(parameterization):
    x, y, mean, mf_sd, _ = conjugate_problem()

    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(x @ w, 0.5), obs=y)

    # Start half-way (μ = mean/2): from μ = 0 the γ = μ/σ parameterisation can stall, σ shrinking
    # before γ grows — a property of that parameterisation, documented on MeanField.
    init = pyro.infer.autoguide.initialization.init_to_value(values={"w": mean / 2})
    guide = MeanField(model, init_scale=0.1, parameterization=parameterization, init_loc_fn=init)
    loc, sd = _train(model, guide, (x, y), lr=0.02 if parameterization == "softplus" else 0.05)
    # tolerances: on the mean 0.01 absolute for (μ, ρ) and 0.02 for (γ, ρ), whose μ = γσ carries the
    # σ-gradient noise times γ ≈ 50 (posterior sd is 0.035); 5 % relative on the sd
    assert torch.allclose(loc, mean, atol=0.01 if parameterization == "softplus" else 0.02), (loc, mean)
    assert torch.allclose(sd, mf_sd, rtol=0.05), (sd, mf_sd)


def test_meanfield_optimum_sd_on_correlated_design():
    """Non-orthogonal design: mean-field sd is 1/sqrt(Λ_ii), smaller than the exact marginal sd."""
    x, y, mean, mf_sd, cov = conjugate_problem(orthogonal=False, n=60, seed=1)
    x = x + 0.8 * x[:, :1]  # correlate the columns
    precision = torch.eye(3) + x.T @ x / 0.25
    cov = torch.linalg.inv(precision)
    mean = cov @ x.T @ y / 0.25
    mf_sd = 1 / torch.sqrt(torch.diagonal(precision))

    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(x @ w, 0.5), obs=y)

    guide = MeanField(model, init_scale=0.1)
    loc, sd = _train(model, guide, (x, y), steps=5000, avg_from=4000)
    assert torch.allclose(loc, mean, atol=0.02), (loc, mean)
    assert torch.allclose(sd, mf_sd, rtol=0.06), (sd, mf_sd)
    assert (sd < torch.diagonal(cov).sqrt()).all()


def test_bnn_linear_layer_recovers_conjugate_posterior_with_local_reparameterization():
    x, y, mean, mf_sd, _ = conjugate_problem()
    net = nn.Sequential(nn.Linear(3, 1, bias=False))
    bnn = pyrobnn.bayesian(net, prior=Gaussian(1.0), likelihood={"name": "gaussian", "scale": 0.5},
                           guide={"name": "mean-field", "init_scale": 0.1}, dataset_size=200)
    assert bnn.autoguide  # the guide is built lazily on the first call
    bnn.initialize(x)
    assert bnn.autoguide._layout["0.weight"][5], "the weight site should be locally reparameterised"
    loc, sd = _train(bnn.model, bnn.guide, (x, y), readout=bnn.autoguide)
    assert torch.allclose(loc.reshape(-1), mean, atol=0.01)
    assert torch.allclose(sd.reshape(-1), mf_sd, rtol=0.05)


def test_minibatch_scaling_matches_full_batch_elbo_in_expectation():
    """With dataset_size=N, a minibatch's log-likelihood is scaled by N/M (Pyro's plate)."""
    x, y, *_ = conjugate_problem()
    net = nn.Sequential(nn.Linear(3, 1, bias=False))
    bnn = pyrobnn.bayesian(net, prior=Gaussian(1.0), likelihood={"name": "gaussian", "scale": 0.5},
                           dataset_size=200, local_reparameterization=False)
    bnn.initialize(x)
    tr = pyro.poutine.trace(pyro.poutine.replay(bnn.model, pyro.poutine.trace(bnn.guide).get_trace(x[:50])))\
        .get_trace(x[:50], y[:50])
    tr.compute_log_prob()
    obs = tr.nodes["obs"]
    assert obs["scale"] == pytest.approx(200 / 50)
    assert obs["log_prob_sum"].item() == pytest.approx(4 * obs["unscaled_log_prob"].sum().item(), rel=1e-5)


@pytest.mark.parametrize("prior", [Gaussian(0.7), Gaussian(1.3, loc=0.4), dist.Normal(torch.tensor(0.2), torch.tensor(0.9))])
def test_closed_form_kl_matches_monte_carlo(prior):
    torch.manual_seed(1)
    loc, scale = torch.randn(50), torch.rand(50) * 0.5 + 0.1
    q = GuideNormal(loc, scale)
    p = prior.expand([50])
    kl = kl_divergence(q, p)
    z = q.rsample((200_000,))
    mc = (q.log_prob(z) - p.log_prob(z)).mean(0)
    # MC standard error grows with the KL itself: 1 % relative or 0.01 absolute
    assert torch.allclose(kl, mc, rtol=0.01, atol=0.01), (kl - mc).abs().max()
    # and against torch's own Normal–Normal rule
    ref = kl_divergence(dist.Normal(loc, scale), dist.Normal(p.loc, p.scale))
    assert torch.allclose(kl, ref, atol=1e-5)


def test_placeholder_log_prob_is_the_expected_log_density_under_q():
    """At a placeholder (the mean, tagged with q) log q is E_q[log q(w)] = −H(q) elementwise, so that with
    the prior's E_q[log p(w)] every ELBO sees −KL exactly (Monte Carlo check of the expectation)."""
    torch.manual_seed(0)
    q = GuideNormal(torch.randn(5), torch.rand(5) + 0.1, placeholder=True)
    v = q.rsample()
    assert placeholder_of(v) is q and torch.equal(mean_var(v)[0], q.loc)
    assert torch.allclose(q.log_prob(v), -dist.Normal(q.loc, q.scale).entropy())
    mc = dist.Normal(q.loc, q.scale).log_prob(dist.Normal(q.loc, q.scale).sample((200000,))).mean(0)
    assert torch.allclose(q.log_prob(v), mc, atol=1e-2)


def test_constrained_site_gets_transformed_guide():
    def model():
        pyro.sample("tau", dist.Gamma(2.0, 1.0))
        pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))

    guide = MeanField(model)
    samples = [guide()["tau"] for _ in range(100)]
    assert all(s > 0 for s in samples)
    assert set(guide.median()) == {"tau", "w"}


def test_guides_do_not_share_parameters_through_the_param_store():
    net = nn.Sequential(nn.Linear(2, 2))
    a = pyrobnn.bayesian(net, dataset_size=10)
    b = pyrobnn.bayesian(net, dataset_size=10)
    x = torch.randn(4, 2)
    a.initialize(x)
    b.initialize(x)
    with torch.no_grad():
        a.autoguide.flat.loc.add_(1.0)
    assert not torch.equal(a.autoguide.flat.loc, b.autoguide.flat.loc)


def test_init_scale_and_parameterization_are_validated():
    with pytest.raises(ValueError, match="init_scale"):
        MeanField(lambda: None, init_scale=-1.0)
    with pytest.raises(ValueError, match="parameterization"):
        MeanField(lambda: None, parameterization="exp")


def test_fit_step_validates_the_first_step_and_restores_pyro_validation():
    """SVIStep runs Pyro's structural validation on its first step only and leaves the global setting
    as it found it; later steps still optimise the same ELBO (loss decreases on a fixed batch)."""
    from pyro.infer.util import is_validation_enabled

    from pyrobnn.inference.fit import SVIStep
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    bnn = pyrobnn.bayesian(torch.nn.Sequential(torch.nn.Linear(4, 3)), dataset_size=32,
                           guide={"name": "mean-field", "init_scale": 0.05})
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    bnn.initialize(x)
    step = SVIStep(bnn, torch.optim.Adam(bnn.parameters(), lr=0.05))
    with pyro.validation_enabled(True):
        losses = [step(x, y).item() for _ in range(60)]
        assert is_validation_enabled()
    assert step._validated
    assert sum(losses[-10:]) < sum(losses[:10])


@pytest.mark.parametrize("prior_loc", [0.0, 0.4])
def test_fused_mean_field_kl_matches_elementwise_formula_and_gradients(prior_loc):
    """The fused (μ, ρ) KL — one autograd node for Σμ², Σσ², Σ log σ with a hand-written backward —
    equals the elementwise closed form Σ[log s − log σ + (σ² + (μ − m)²)/(2s²) − ½] and its gradients
    w.r.t. μ and ρ (σ = softplus(ρ)), in float64 to rounding; gradcheck on the fused node itself."""
    from pyrobnn.fastpath import _GaussianSums
    from pyrobnn.guides.base import mean_field_kl
    from pyrobnn.priors.gaussian import ScalarNormal
    torch.manual_seed(3)
    s = 0.7
    loc = torch.randn(20, 9, dtype=torch.float64, requires_grad=True)
    rho = torch.randn(20, 9, dtype=torch.float64, requires_grad=True)
    sigma = torch.nn.functional.softplus(rho)
    ref = (math.log(s) - sigma.log() + (sigma ** 2 + (loc - prior_loc) ** 2) / (2 * s * s) - 0.5).sum()
    ref_grads = torch.autograd.grad(ref, (loc, rho), retain_graph=True)
    for kl in (mean_field_kl(loc, sigma, s, prior_loc),
               kl_divergence(GuideNormal(loc, sigma).to_event(2), ScalarNormal(prior_loc, s, (20, 9)).to_event(2))):
        assert kl.shape == ()
        assert abs(kl.item() - ref.item()) < 1e-10 * abs(ref.item())
        grads = torch.autograd.grad(kl, (loc, rho), retain_graph=True)
        for g, r in zip(grads, ref_grads):
            assert torch.allclose(g, r, rtol=1e-12, atol=1e-12), (g - r).abs().max()
    assert torch.autograd.gradcheck(_GaussianSums.apply, (loc.detach().clone().requires_grad_(),
                                                          sigma.detach().clone().requires_grad_()))


def test_placeholder_log_densities_from_fused_sums_are_exact():
    """At a local-reparameterisation placeholder (= μ), the guide's Σ E_q[log q] and the prior's
    Σ E_q[log p] read the fused sums; both equal the closed-form expectations summed (their difference
    is −KL), and stay differentiable."""
    from pyrobnn.priors.gaussian import ScalarNormal
    torch.manual_seed(4)
    loc = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    scale = (torch.rand(6, 5, dtype=torch.float64) + 0.1).requires_grad_()
    q = GuideNormal(loc, scale, placeholder=True).to_event(2)
    v = q.rsample()
    p = ScalarNormal(0.0, 0.3, (6, 5)).to_event(2)
    lq, lp = q.log_prob(v), p.log_prob(v)
    ref_q = -dist.Normal(loc, scale).entropy().sum()
    ref_p = (-(loc ** 2 + scale ** 2) / (2 * 0.09) - math.log(0.3) - 0.5 * math.log(2 * math.pi)).sum()
    assert abs(lq.item() - ref_q.item()) < 1e-10 and abs(lp.item() - ref_p.item()) < 1e-10
    kl = kl_divergence(dist.Normal(loc, scale), dist.Normal(torch.zeros((), dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64))).sum()
    assert abs((lq - lp).item() - kl.item()) < 1e-10
    g_scale, = torch.autograd.grad(lq, scale, retain_graph=True)  # lq and lp share the fused sums
    assert torch.allclose(g_scale, -1 / scale.detach())
    g_loc, g_scale_p = torch.autograd.grad(lp, (loc, scale))
    assert torch.allclose(g_loc, -loc.detach() / 0.09) and torch.allclose(g_scale_p, -scale.detach() / 0.09)


def test_svi_steps_only_its_own_guide_parameters():
    """A second BNN's SVI must not capture (and Adam-step) the first guide's tensors: the guide's flat
    module is not pyro.module-registered under a name shared by every guide of the class."""
    net = nn.Sequential(nn.Linear(3, 2))
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    first, second = (pyrobnn.bayesian(net, dataset_size=8) for _ in range(2))
    first.initialize(x)
    second.initialize(x)
    with pyro.poutine.trace(param_only=True) as capture:
        TraceMeanField_ELBO().differentiable_loss(second.model, second.guide, x, y)
    captured = {id(site["value"].unconstrained()) for site in capture.trace.nodes.values()}
    assert captured == {id(p) for p in second.autoguide.flat.parameters()}
    assert not any("$$$" in name for name in pyro.get_param_store().keys())


def test_fused_variance_and_sums_node_matches_autograd():
    """The layer's σ² and the KL's reductions from one node (what a locally reparameterised site uses
    while training): values and gradients equal the elementwise computation; gradcheck on the node."""
    from pyrobnn.fastpath import _GaussianVarianceSums
    from pyrobnn.priors.gaussian import ScalarNormal
    torch.manual_seed(5)
    loc = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    rho = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 4, dtype=torch.float64)
    noise = torch.randn(3, 7, dtype=torch.float64)

    def objective(fused):
        sigma = torch.nn.functional.softplus(rho)
        q = GuideNormal(loc, sigma, placeholder=True)
        if fused:
            var = q.variance
            kl = kl_divergence(q.to_event(2), ScalarNormal(0.0, 0.5, (7, 4)).to_event(2))
        else:
            var = sigma * sigma
            kl = (math.log(0.5) - sigma.log() + (sigma ** 2 + loc ** 2) / 0.5 - 0.5).sum()
        out = x @ loc.T + (x * x @ var.T).sqrt() * noise
        return (out ** 2).sum() + kl

    a, b = objective(True), objective(False)
    assert abs(a.item() - b.item()) < 1e-10 * abs(b.item())
    for ga, gb in zip(torch.autograd.grad(a, (loc, rho)), torch.autograd.grad(b, (loc, rho))):
        assert torch.allclose(ga, gb, rtol=1e-11, atol=1e-12)
    sigma = (torch.rand(5, 3, dtype=torch.float64) + 0.2).requires_grad_()
    assert torch.autograd.gradcheck(_GaussianVarianceSums.apply, (loc.detach()[:5, :3].clone().requires_grad_(), sigma))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_softplus_matches_torch_softplus_values_and_gradients(dtype):
    from pyrobnn.fastpath import _Softplus, softplus
    torch.manual_seed(0)
    rho = torch.cat([torch.linspace(-20, 20, 401), torch.randn(1000) * 3 - 4.6]).to(dtype).requires_grad_()
    ref = torch.nn.functional.softplus(rho)
    fast = _Softplus.apply(rho)
    tol = 2e-6 if dtype == torch.float32 else 1e-12
    assert torch.allclose(fast, ref, rtol=tol, atol=0)
    g = torch.randn_like(rho)
    (gr,) = torch.autograd.grad(ref, rho, g)
    (gf,) = torch.autograd.grad(fast, rho, g)
    assert torch.allclose(gf, gr, rtol=tol, atol=1e-30)
    # above torch's threshold (ρ > 20), and for NaN, the dispatcher takes F.softplus itself
    big = torch.tensor([1.0, 25.0, 100.0], dtype=dtype)
    assert torch.equal(softplus(big), torch.nn.functional.softplus(big))
    assert torch.isnan(softplus(torch.tensor([0.0, float("nan")], dtype=dtype))[1])
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(_Softplus.apply, (rho[:50].detach().clone().requires_grad_(),))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log1p_from_one_log_matches_float64_log1p(dtype):
    """The softplus's log(1 + t) without torch's (slow on CPU) log1p: a few ulps from a float64 log1p for
    t from 0 through the smallest normal numbers to e^20, where a plain log(1 + t) is off by ~100 %."""
    from pyrobnn.fastpath import log1p_nonneg as _log1p_nonneg
    t = torch.cat([torch.tensor([0.0, 1e-38, 1e-30, 1e-12, 1e-8, 3e-8, 6e-8, 1e-7, 1e-4]),
                   torch.logspace(-30, 8.6, 2001), torch.rand(1000)]).to(dtype)
    ref = torch.log1p(t.double())
    got = _log1p_nonneg(t).double()
    eps = torch.finfo(dtype).eps
    rel = ((got - ref).abs() / ref.clamp_min(torch.finfo(dtype).tiny))
    assert rel.max() <= 4 * eps, rel.max()
    assert got[0] == 0.0
    naive = torch.log(t + 1.0).double()
    assert ((naive - ref).abs() / ref.clamp_min(1e-300))[1:4].max() > 0.5  # what the correction fixes


def test_grouped_log_sum_matches_float64_and_falls_back_outside_its_range():
    """Σ log σ from products of four (the fused KL's log term) equals the float64 log-sum to float32
    accuracy over the scales a guide meets, and takes the plain path where products could under- or
    overflow, or the input is not a large float32 CPU tensor (so 0, inf and NaN stay visible)."""
    from pyrobnn.fastpath import log_sum as _log_sum
    torch.manual_seed(0)
    for lo, hi in [(1e-4, 1.0), (1e-8, 20.0), (0.5, 2.0)]:
        for n in (4096, 4099, 30001, 235200):
            x = torch.exp(torch.empty(n).uniform_(math.log(lo), math.log(hi)))
            ref = x.double().log().sum().item()
            assert _log_sum(x).item() == pytest.approx(ref, rel=1e-6, abs=1e-3)
    x = torch.rand(10000) + 0.5
    x[17] = 1e-30                      # a product of four could underflow: plain path, exact
    assert _log_sum(x).item() == pytest.approx(x.double().log().sum().item(), rel=1e-6)
    x[17] = 0.0
    assert _log_sum(x).item() == -math.inf
    x[17] = float("nan")
    assert math.isnan(_log_sum(x).item())
    small = torch.rand(100) + 0.1
    assert torch.equal(_log_sum(small), small.log().sum())
