"""LogUniform prior: log-density, refusal to sample, and the Molchanov et al. KL approximation."""
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceMeanField_ELBO
from pyro.infer.autoguide.initialization import init_to_value
from scipy import integrate
from torch.distributions import kl_divergence

import pyrobnn
from pyrobnn.guides import AdditiveNoise, GuideNormal
from pyrobnn.priors import LogUniform
from pyrobnn.priors.log_uniform import K1, kl_log_uniform, neg_kl_log_uniform
from pyrobnn.registry import PRIORS


def _neg_kl_reference(log_alpha: float) -> float:
    """−KL(N(θ, αθ²) ‖ log-uniform) up to a constant, by quadrature:
    H(q) + E_q log p(w) = ½ log α − E_{ε~N(0,1)} log|1 + √α ε| + const. The integrand has an integrable
    log singularity at ε = −1/√α, so the integral is split there."""
    s = math.exp(log_alpha / 2)
    f = lambda e: math.log(abs(1 + s * e)) * math.exp(-e * e / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    c = -1 / s
    value = integrate.quad(f, -np.inf, c, limit=400)[0] + integrate.quad(f, c, np.inf, limit=400)[0]
    return 0.5 * log_alpha - value


def test_kl_approximation_matches_quadrature_within_0_01():
    grid = np.linspace(-8, 8, 161)
    reference = np.array([_neg_kl_reference(la) for la in grid])
    approx = neg_kl_log_uniform(torch.tensor(grid, dtype=torch.float64)).numpy()
    # The constant: as α → ∞ the exact expression tends to −E log|ε| = (γ + log 2)/2, and the
    # approximation's −k₁ makes −KL → 0 there. With that constant the two agree within 0.01 ...
    constant = -(np.euler_gamma + math.log(2)) / 2
    assert np.abs(approx - (reference + constant)).max() < 0.01
    # ... and with the best constant (least squares) within 0.008; the fitted constant is −k₁ ± 0.005.
    diff = approx - reference
    assert np.abs(diff - diff.mean()).max() < 0.008
    assert abs(diff.mean() + K1) < 0.005


def test_kl_approximation_keeps_the_exact_asymptote_below_minus_8():
    """Below log α = −8 (where the default guide no longer clips) the approximation stays within 0.001
    of the exact −KL (same constant as above) down to log α = −30: both tend to ½ log α − k₁."""
    grid = np.linspace(-30, -8, 45)
    reference = np.array([_neg_kl_reference(la) for la in grid])
    approx = neg_kl_log_uniform(torch.tensor(grid, dtype=torch.float64)).numpy()
    constant = -(np.euler_gamma + math.log(2)) / 2
    assert np.abs(approx - (reference + constant)).max() < 0.001
    np.testing.assert_allclose(approx[:5], 0.5 * grid[:5] - K1, atol=1e-6)  # the linear asymptote


def test_weight_far_below_minus_8_gets_the_asymptotic_kl_gradient():
    """Default clip (None, 8): a weight with θ = 1 and log σ² ∈ {−10, −30, −60} (log α ≪ −8) has
    KL ≈ −½ log α + k₁ with dKL/d log σ² = −½ and dKL/dθ = 1/θ = 1; with the reference clip (−8, 8)
    both gradients are 0. Far below log α = −87, where sigmoid underflows in float32, the fused KL is
    finite (its value saturates) and its gradient is still exact."""
    def model():
        pyro.sample("w", LogUniform().expand([3]).to_event(1))

    for clip, grad_s2, grad_theta in (((None, 8.0), -0.5, 1.0), ((-8.0, 8.0), 0.0, 0.0)):
        guide = AdditiveNoise(model, init_loc_fn=init_to_value(values={"w": torch.ones(3)}), log_alpha_clip=clip)
        guide()
        with torch.no_grad():
            guide.flat.log_sigma2.copy_(torch.tensor([-10.0, -30.0, -60.0]))
        loss = TraceMeanField_ELBO().differentiable_loss(model, guide)
        expected = torch.tensor([10.0, 30.0, 60.0]) / 2 + K1 if clip[0] is None else kl_log_uniform(
            torch.tensor([-8.0] * 3))
        torch.testing.assert_close(loss, expected.sum(), rtol=1e-4, atol=0)
        loss.backward()
        torch.testing.assert_close(guide.flat.log_sigma2.grad, torch.full((3,), grad_s2), rtol=0, atol=1e-4)
        torch.testing.assert_close(guide.flat.theta.grad, torch.full((3,), grad_theta), rtol=0, atol=1e-4)
    from pyrobnn.priors.log_uniform import sparse_vd_kl
    theta = torch.full((3,), 2.0, requires_grad=True)
    log_var = torch.tensor([-80.0, -200.0, -1e4], requires_grad=True)
    kl = sparse_vd_kl(theta, log_var)
    assert torch.isfinite(kl).all() and kl[2] >= kl[1] > kl[0]
    torch.testing.assert_close(kl[0], torch.tensor((80.0 + math.log(4.0)) / 2 + K1))
    kl.sum().backward()
    torch.testing.assert_close(log_var.grad, torch.full((3,), -0.5))
    torch.testing.assert_close(theta.grad, torch.full((3,), 0.5))  # dKL/dθ = 1/θ


def test_kl_formula_and_sign():
    la = torch.tensor([-8.0, -3.0, 0.0, 3.0, 8.0])
    kl = kl_log_uniform(la)
    expected = -(K1 * torch.sigmoid(1.87320 + 1.48695 * la) - 0.5 * torch.log1p(torch.exp(-la)) - K1)
    torch.testing.assert_close(kl, expected, rtol=0, atol=1e-6)
    assert (kl > 0).all() and (kl[:-1] > kl[1:]).all()  # larger α (more noise) costs less
    assert kl_log_uniform(torch.tensor(40.0)).item() < 1e-6  # → 0 as α → ∞


def test_kl_dispatches_for_expanded_prior_and_plain_normals():
    torch.manual_seed(0)
    loc, scale = torch.randn(3, 4), torch.rand(3, 4) + 0.05
    prior = LogUniform().expand([3, 4]).to_event(2)
    la = (2 * scale.log() - (loc * loc + 1e-16).log()).clamp(max=8)  # DEFAULT_LOG_ALPHA_CLIP: above only
    expected = kl_log_uniform(la).sum()
    for q in (GuideNormal(loc, scale), dist.Normal(loc, scale), torch.distributions.Normal(loc, scale)):
        kl = kl_divergence(q.to_event(2) if hasattr(q, "to_event") else torch.distributions.Independent(q, 2), prior)
        assert kl.shape == torch.Size([])
        torch.testing.assert_close(kl, expected)


def test_kl_at_zero_mean_is_finite_with_finite_gradient():
    loc = torch.zeros(5, requires_grad=True)
    log_scale = torch.full((5,), -3.0, requires_grad=True)
    kl = kl_divergence(GuideNormal(loc, log_scale.exp()), LogUniform().expand([5])).sum()
    kl.backward()
    assert torch.isfinite(kl) and torch.isfinite(loc.grad).all() and torch.isfinite(log_scale.grad).all()
    torch.testing.assert_close(kl, kl_log_uniform(torch.tensor(8.0)) * 5)  # clipped at log α = 8


def test_sample_draws_from_the_documented_proper_stand_in():
    """The improper prior has no samples; ``sample`` draws from the prior restricted to 1e-4 ≤ |w| ≤ 1
    (log|w| uniform there, random sign), so a model can be run once without a guide (Predictive)."""
    torch.manual_seed(0)
    w = LogUniform().expand([200, 100]).to_event(2).sample()
    assert w.shape == (200, 100)
    a = w.abs()
    assert a.min() >= 1e-4 and a.max() <= 1.0
    # log|w| ~ U(log 1e-4, 0): mean log(1e-4)/2, variance (log 1e-4)²/12; signs balanced
    lo = math.log(1e-4)
    assert abs(a.log().mean().item() - lo / 2) < 0.05
    assert abs(a.log().var().item() - lo ** 2 / 12) < 0.2
    assert abs((w > 0).double().mean().item() - 0.5) < 0.02
    assert LogUniform().rsample((3,)).shape == (3,)
    stand_in = LogUniform().stand_in()
    # its density integrates to one: ∫ p = 2 ∫_{1e-4}^{1} 1/(2|w| (−lo)) d|w| = 1 (trapezoid in log|w|)
    u = torch.linspace(lo, 0.0, 2001, dtype=torch.float64)
    dens = stand_in.log_prob(u.exp()).exp() * u.exp()
    assert abs(2 * torch.trapezoid(dens, u).item() - 1.0) < 1e-6
    assert stand_in.log_prob(torch.tensor(2.0)) == -math.inf


def test_log_prob_is_minus_log_abs():
    w = torch.tensor([[-2.0, 0.5], [1.0, -0.1]])
    torch.testing.assert_close(LogUniform().log_prob(w), -w.abs().log())
    d = LogUniform().expand([2, 2]).to_event(2)
    torch.testing.assert_close(d.log_prob(w), -w.abs().log().sum())
    assert LogUniform().expand([4, 3]).log_prob(torch.tensor(2.0)).shape == (4, 3)


def test_registered_by_name_and_config_roundtrip():
    p = PRIORS.build("log-uniform")
    assert isinstance(p, LogUniform) and p.config() == {}
    assert isinstance(PRIORS.build({"name": "log_uniform"}), LogUniform)


def test_trace_mean_field_elbo_uses_the_closed_form():
    """With no observations the negative ELBO of TraceMeanField_ELBO is exactly the summed KL."""
    init = torch.tensor([0.5, -1.0, 2.0, 1e-3])

    def model():
        pyro.sample("w", LogUniform().expand([4]).to_event(1))

    guide = AdditiveNoise(model, init_loc_fn=init_to_value(values={"w": init}), init_log_sigma2=-2.0)
    loss = TraceMeanField_ELBO().differentiable_loss(model, guide)
    la = (torch.tensor(-2.0) - (init * init).log()).clamp(max=8)
    torch.testing.assert_close(loss, kl_log_uniform(la).sum())


def test_bayesian_with_log_uniform_prior_has_placeholder_sites():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(8, 3))
    bnn = pyrobnn.bayesian(net, prior="log-uniform", guide="mean-field", dataset_size=10)
    bnn.initialize(torch.rand(2, 1, 4, 4))
    assert all(v[5] for v in bnn.autoguide._layout.values())  # local reparameterisation everywhere
    assert all(isinstance(p, LogUniform) for p in bnn.site_priors.values())


@pytest.mark.parametrize("clip", [(-8.0, 8.0), (-2.0, 2.0), (None, 2.0), None])
def test_fused_additive_noise_kl_matches_autograd_reference(clip):
    """The fused (θ, log σ²) → KL function: values and gradients equal the plain autograd formula
    (log α clipped; zero gradient where clipped), checked also with torch.autograd.gradcheck."""
    from pyrobnn.priors.log_uniform import sparse_vd_kl
    torch.manual_seed(0)
    theta = (torch.randn(40, dtype=torch.float64) * 0.5).requires_grad_()
    log_var = (torch.randn(40, dtype=torch.float64) * 4 - 3).requires_grad_()
    weights = torch.rand(40, dtype=torch.float64)
    kl = sparse_vd_kl(theta, log_var, clip)
    la = log_var - (theta * theta + 1e-16).log()
    if clip is not None:
        low = -math.inf if clip[0] is None else clip[0]
        la = la.clamp(*clip)
        assert ((la == low) | (la == clip[1])).any() and ((la > low) & (la < clip[1])).any()
    ref = kl_log_uniform(la)
    torch.testing.assert_close(kl, ref)
    g_fused = torch.autograd.grad((kl * weights).sum(), (theta, log_var), retain_graph=True)
    g_ref = torch.autograd.grad((ref * weights).sum(), (theta, log_var), retain_graph=True)
    for a, b in zip(g_fused, g_ref):
        torch.testing.assert_close(a, b)
    # the usual case, a broadcast scalar upstream gradient
    g_fused = torch.autograd.grad(kl.sum() * 0.3, (theta, log_var))
    g_ref = torch.autograd.grad(ref.sum() * 0.3, (theta, log_var))
    for a, b in zip(g_fused, g_ref):
        torch.testing.assert_close(a, b)
    if clip is None:
        assert torch.autograd.gradcheck(lambda t, v: sparse_vd_kl(t, v, None), (theta, log_var))


def test_model_log_prob_at_placeholder_is_the_expectation_under_q():
    """At a locally reparameterised site the model's log p is E_q[log p(w)] := −Σ KL − H(q) (from the KL
    terms cached on q) and the guide's log q is E_q[log q] = −Σ ½ log σ² − n(½ log 2π + ½): their
    difference is −KL exactly, so Trace_ELBO and TraceMeanField_ELBO agree."""
    from pyrobnn.priors.log_uniform import sparse_vd_kl
    net = torch.nn.Sequential(torch.nn.Linear(3, 4))
    bnn = pyrobnn.bayesian(net, prior="log-uniform", guide="additive-noise", dataset_size=10)
    x = torch.rand(2, 3)
    bnn.initialize(x)
    guide_tr = pyro.poutine.trace(bnn.guide).get_trace(x)
    model_tr = pyro.poutine.trace(pyro.poutine.replay(bnn.model, guide_tr)).get_trace(x, torch.tensor([0, 1]))
    theta, sigma = bnn.autoguide.site_params("0.weight")
    lp = model_tr.nodes["0.weight"]["fn"].log_prob(model_tr.nodes["0.weight"]["value"])
    lq = guide_tr.nodes["0.weight"]["fn"].log_prob(guide_tr.nodes["0.weight"]["value"])
    torch.testing.assert_close(lq, -torch.distributions.Normal(theta, sigma).entropy().sum())
    kl = sparse_vd_kl(theta, 2 * sigma.log(), clip=(None, 8.0)).sum()
    torch.testing.assert_close(lq - lp, kl)
    # an ordinary value takes the ordinary path
    w = torch.randn(4, 3)
    torch.testing.assert_close(model_tr.nodes["0.weight"]["fn"].log_prob(w), -w.abs().log().sum())
