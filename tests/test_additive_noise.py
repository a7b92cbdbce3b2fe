"""AdditiveNoise guide: parameterisation, clipping, initialisation, local reparameterisation, training."""
import math

import pyro
import pytest
import torch
import torch.nn as nn
from pyro.infer import TraceMeanField_ELBO
from pyro.infer.autoguide.initialization import init_to_value

import pyrobnn
from pyrobnn import sparsity
from pyrobnn.guides import AdditiveNoise, AdditiveNoiseNormal
from pyrobnn.priors import LogUniform
from pyrobnn.priors.log_uniform import kl_log_uniform
from pyrobnn.registry import GUIDES


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))


def _bnn(net=None, **guide_kw):
    net = net or _net()
    bnn = pyrobnn.bayesian(net, prior="log-uniform", guide={"name": "additive-noise", **guide_kw}, dataset_size=100)
    bnn.initialize(torch.rand(2, 5))
    return bnn


def test_registered_and_initialised_from_network_weights():
    assert GUIDES.get("additive-noise") is AdditiveNoise
    net = _net()
    bnn = _bnn(net)
    guide = bnn.autoguide
    for name, p in net.named_parameters():
        theta, sigma = guide.site_params(name)
        assert torch.equal(theta, p.detach())
        torch.testing.assert_close(sigma, torch.full_like(sigma, math.exp(-5.0)))  # log σ² = −10
    assert torch.equal(guide.flat.log_sigma2, torch.full_like(guide.flat.log_sigma2, -10.0))


def test_log_alpha_is_clipped_log_sigma2_minus_log_theta2():
    bnn = _bnn(log_alpha_clip=(-3.0, 3.0))
    g = bnn.autoguide
    with torch.no_grad():
        torch.manual_seed(3)
        g.flat.log_sigma2.normal_(-4.0, 6.0)
    theta, sigma = g.site_params("0.weight")
    raw = 2 * sigma.log() - theta.pow(2).log()
    torch.testing.assert_close(g.log_alpha("0.weight", clip=False), raw, rtol=0, atol=1e-5)
    torch.testing.assert_close(g.log_alpha("0.weight"), raw.clamp(-3, 3), rtol=0, atol=1e-5)
    assert raw.min() < -3 and raw.max() > 3  # the clip is exercised
    torch.testing.assert_close(sparsity.log_alpha(bnn, "0.weight"), raw.clamp(-3, 3), rtol=0, atol=1e-5)
    with pytest.raises(KeyError, match="unknown site"):
        g.log_alpha("nope.weight")


def test_kl_in_elbo_uses_the_clipped_log_alpha_and_sigma2_is_unchanged():
    """KL = Σ kl(clip(log σ² − log θ²)); beyond the clip the KL's gradient w.r.t. log σ² is zero."""
    theta = torch.tensor([1.0, 1.0, 1.0])

    def model():
        pyro.sample("w", LogUniform().expand([3]).to_event(1))

    guide = AdditiveNoise(model, init_loc_fn=init_to_value(values={"w": theta}), log_alpha_clip=(-8.0, 8.0))
    guide()
    with torch.no_grad():
        guide.flat.log_sigma2.copy_(torch.tensor([-10.0, 0.0, 10.0]))
    loss = TraceMeanField_ELBO().differentiable_loss(model, guide)
    torch.testing.assert_close(loss, kl_log_uniform(torch.tensor([-8.0, 0.0, 8.0])).sum())
    loss.backward()
    grad = guide.flat.log_sigma2.grad
    assert grad[0] == 0 and grad[2] == 0 and grad[1] < 0  # inside the clip: more noise lowers the KL
    # the site's distribution keeps the free σ² (σ = e^{5} for log σ² = 10), only log α is clipped
    tr = pyro.poutine.trace(guide).get_trace()
    q = tr.nodes["w"]["fn"].base_dist
    assert isinstance(q, AdditiveNoiseNormal)
    torch.testing.assert_close(q.scale, torch.tensor([math.exp(-5), 1.0, math.exp(5)]))


def test_default_clip_is_from_above_only_so_no_weight_escapes_the_kl():
    """Default (None, 8): a weight at log α = −12 (|θ| = 1, log σ² = −12) keeps a KL gradient that
    raises its σ² (−½ at the asymptote); one at log α = 10 is clipped (gradient 0)."""
    theta = torch.tensor([1.0, 1.0, 1.0])

    def model():
        pyro.sample("w", LogUniform().expand([3]).to_event(1))

    guide = AdditiveNoise(model, init_loc_fn=init_to_value(values={"w": theta}))
    assert guide.log_alpha_clip == (None, 8.0) and guide.config()["log_alpha_clip"] == [None, 8.0]
    guide()
    with torch.no_grad():
        guide.flat.log_sigma2.copy_(torch.tensor([-12.0, 0.0, 10.0]))
    loss = TraceMeanField_ELBO().differentiable_loss(model, guide)
    torch.testing.assert_close(loss, kl_log_uniform(torch.tensor([-12.0, 0.0, 8.0])).sum())
    loss.backward()
    grad = guide.flat.log_sigma2.grad
    assert abs(grad[0] + 0.5) < 1e-3 and grad[1] < 0 and grad[2] == 0
    torch.testing.assert_close(guide.log_alpha("w"), torch.tensor([-12.0, 0.0, 8.0]))


def test_default_init_works_with_the_improper_prior():
    torch.manual_seed(0)

    def model():
        pyro.sample("w", LogUniform().expand([30, 40]).to_event(2))
        pyro.sample("b", LogUniform().expand([30]).to_event(1))

    guide = AdditiveNoise(model)
    guide()
    w, _ = guide.site_params("w")
    bound = 1 / math.sqrt(40)
    assert w.abs().max() <= bound and w.std() > 0.5 * bound / math.sqrt(3)  # U(−1/√fan_in, 1/√fan_in)
    b, _ = guide.site_params("b")
    assert b.abs().max() <= 1.0 and b.std() > 0.2


def test_invalid_arguments():
    for clip in [(3.0, -3.0), (1.0,), "8", (0.0, math.inf), (None, None), (-8.0, None), (None, math.nan)]:
        with pytest.raises(ValueError, match="log_alpha_clip"):
            AdditiveNoise(lambda: None, log_alpha_clip=clip)
    with pytest.raises(ValueError, match="init_log_sigma2"):
        AdditiveNoise(lambda: None, init_log_sigma2=float("nan"))
    with pytest.raises(RuntimeError, match="no parameters yet"):
        AdditiveNoise(lambda: None).log_alpha("w")


def test_from_pretrained_and_save_load_roundtrip(tmp_path):
    net = _net()
    bnn = sparsity.sparse_vd_from_pretrained(net, dataset_size=50, init_log_sigma2=-8.0, log_alpha_clip=(-6, 6))
    bnn.initialize(torch.rand(2, 5))
    assert isinstance(bnn.autoguide, AdditiveNoise) and bnn.autoguide.log_alpha_clip == (-6.0, 6.0)
    assert all(isinstance(p, LogUniform) for p in bnn.site_priors.values())
    torch.testing.assert_close(bnn.autoguide.site_params("2.weight")[0], net[2].weight.detach())
    with torch.no_grad():
        bnn.autoguide.flat.log_sigma2.normal_(-4, 2)
    pyrobnn.save(bnn, tmp_path / "svd.safetensors")
    loaded = pyrobnn.load(tmp_path / "svd.safetensors", net=_net())
    assert loaded.autoguide.log_alpha_clip == (-6.0, 6.0)
    for s in bnn.site_priors:
        torch.testing.assert_close(loaded.autoguide.log_alpha(s), bnn.autoguide.log_alpha(s))
    # the default one-sided clip survives save/load too
    default = sparsity.sparse_vd_from_pretrained(_net(), dataset_size=50)
    default.initialize(torch.rand(2, 5))
    pyrobnn.save(default, tmp_path / "default.safetensors")
    assert pyrobnn.load(tmp_path / "default.safetensors", net=_net()).autoguide.log_alpha_clip == (None, 8.0)


@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_local_reparameterisation_moments(layer):
    """The layer's pre-activation under the guide is N(x·θ + b, x²·σ² + σ_b²), checked by Monte Carlo."""
    torch.manual_seed(1)
    if layer == "linear":
        net = nn.Sequential(nn.Linear(6, 3))
        x = torch.randn(2, 6)
    else:
        net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten())
        x = torch.randn(1, 2, 4, 4)
    bnn = pyrobnn.bayesian(net, prior="log-uniform", guide="additive-noise", dataset_size=10)
    bnn.initialize(x)
    g = bnn.autoguide
    assert all(v.local for v in g._layout.values())  # every site is a local-reparameterisation placeholder
    with torch.no_grad():
        g.flat.log_sigma2.uniform_(-4, -1)
    (w, sw), (b, sb) = g.site_params("0.weight"), g.site_params("0.bias")
    f = net[0]._conv_forward if layer == "conv" else (lambda inp, wt, bs: nn.functional.linear(inp, wt, bs))
    mean, var = f(x, w, b).detach().flatten(1), f(x * x, sw ** 2, sb ** 2).detach().flatten(1)
    S = 20000
    outs = bnn.sample_outputs(x, S)
    z_mean = (outs.mean(0) - mean) / (var / S).sqrt()
    assert z_mean.abs().max() < 5
    # sample variance: relative standard error sqrt(2/(S−1)) ≈ 1 %
    assert ((outs.var(0) / var) - 1).abs().max() < 0.06


def test_training_prunes_irrelevant_inputs():
    """Two of ten inputs carry the label: sparse VD keeps (some of) their weights and prunes every
    weight on the eight noise inputs."""
    torch.manual_seed(0)
    x = torch.randn(400, 10)
    y = (2 * x[:, 0] - 2 * x[:, 1] + 0.3 * torch.randn(400) > 0).long()
    net = nn.Sequential(nn.Linear(10, 2))
    bnn = pyrobnn.bayesian(net, prior="log-uniform", guide="additive-noise", dataset_size=400)
    bnn.initialize(x)
    opt = torch.optim.Adam(bnn.parameters(), lr=0.02)
    elbo = TraceMeanField_ELBO()
    for _ in range(600):
        loss = elbo.differentiable_loss(bnn.model, bnn.guide, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    keep = sparsity.masks(bnn)["0.weight"]
    assert not keep[:, 2:].any()
    assert keep[:, :2].any(0).all()
    err = (sparsity.export(bnn)(x).argmax(-1) != y).float().mean()
    assert err < 0.1
