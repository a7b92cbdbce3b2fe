"""Local-reparameterisation placeholders under every Pyro ELBO.

At a placeholder the guide's density is E_q[log q] and the prior's E_q[log p], so log p − log q = −KL
exactly and ``Trace_ELBO`` / ``TraceGraph_ELBO`` give the same loss and the same gradients as
``TraceMeanField_ELBO`` (which uses the closed-form KL) — for every prior that implements the
protocol, with every pyrobnn Gaussian guide. A prior that does not implement it gets no placeholder.
"""
import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn as nn
from pyro.infer import Trace_ELBO, TraceGraph_ELBO, TraceMeanField_ELBO

import pyrobnn
from pyrobnn.guides import MeanField
from pyrobnn.guides.base import expects_placeholders
from pyrobnn.priors import Gaussian

CASES = [
    ("gaussian", "mean-field"),
    ({"name": "gaussian", "scale": 0.5, "loc": 0.3}, "mean-field"),
    ({"name": "gaussian", "scale": 1.0, "layerwise": True}, {"name": "mean-field", "parameterization": "gamma"}),
    ("gaussian", "additive-noise"),
    ("ard", "mean-field"),
    ("ard", {"name": "mean-field", "parameterization": "gamma"}),
    ("ard", "additive-noise"),
    ({"name": "ard", "mode": "hierarchical", "group": "input"}, "mean-field"),
    ("log-uniform", "additive-noise"),
    ("log-uniform", "mean-field"),
]


def _bnn(prior, guide, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    x, y = torch.randn(12, 3), torch.randint(0, 2, (12,))
    bnn = pyrobnn.bayesian(net, prior=prior, guide=guide, likelihood="categorical", dataset_size=40)
    bnn.initialize(x)
    return bnn, x, y


def _loss_and_grads(elbo, bnn, x, y):
    params = [p for p in bnn.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    torch.manual_seed(123)  # the same activation noise for every estimator
    loss = elbo.loss_and_grads(bnn.model, bnn.guide, x, y)
    return loss, [p.grad.clone() for p in params]


@pytest.mark.parametrize("prior,guide", CASES)
def test_every_elbo_agrees_with_the_closed_form_at_placeholders(prior, guide):
    bnn, x, y = _bnn(prior, guide)
    layout = bnn.autoguide._layout
    weight_sites = [n for n in layout if not n.endswith(".alpha")]
    assert all(layout[n][5] for n in weight_sites)  # every weight and bias site is locally reparameterised
    with torch.no_grad():  # move σ away from its initial value so the σ terms of the KL matter
        for p in bnn.autoguide.flat.parameters():
            p.add_(0.3 * torch.randn_like(p))
    ref_loss, ref_grads = _loss_and_grads(TraceMeanField_ELBO(), bnn, x, y)
    for elbo in (Trace_ELBO(), TraceGraph_ELBO()):
        loss, grads = _loss_and_grads(elbo, bnn, x, y)
        assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-4), type(elbo).__name__
        for g, r in zip(grads, ref_grads):
            assert torch.allclose(g, r, rtol=1e-4, atol=1e-5), (type(elbo).__name__, (g - r).abs().max())


@pytest.mark.parametrize("prior,guide", [("gaussian", "mean-field"), ("log-uniform", "additive-noise"),
                                         ({"name": "ard", "mode": "hierarchical"}, "mean-field")])
def test_conv_layers_agree_across_elbos_too(prior, guide):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    x, y = torch.randn(6, 1, 6, 6), torch.randint(0, 2, (6,))
    bnn = pyrobnn.bayesian(net, prior=prior, guide=guide, likelihood="categorical", dataset_size=30)
    bnn.initialize(x)
    assert bnn.autoguide._layout["0.weight"][5]
    with torch.no_grad():
        for p in bnn.autoguide.flat.parameters():
            p.add_(0.3 * torch.randn_like(p))
    ref_loss, ref_grads = _loss_and_grads(TraceMeanField_ELBO(), bnn, x, y)
    loss, grads = _loss_and_grads(Trace_ELBO(), bnn, x, y)
    assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-4)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-4, atol=1e-5)


def test_gaussian_placeholder_densities_are_expectations_under_q():
    """The prior's density at a placeholder is E_q[log p(w)] (checked by Monte Carlo), not log p(μ)."""
    bnn, x, y = _bnn({"name": "gaussian", "scale": 0.5, "loc": 0.3}, "mean-field")
    guide_tr = pyro.poutine.trace(bnn.guide).get_trace(x, y)
    model_tr = pyro.poutine.trace(pyro.poutine.replay(bnn.model, guide_tr)).get_trace(x, y)
    site = model_tr.nodes["0.weight"]
    loc, scale = bnn.autoguide.site_params("0.weight")
    draws = dist.Normal(loc, scale).sample((100000,))
    mc = dist.Normal(0.3, 0.5).log_prob(draws).sum((-1, -2)).mean()
    assert site["fn"].log_prob(site["value"]).item() == pytest.approx(mc.item(), abs=0.05)


def test_a_scalar_torch_normal_prior_becomes_pyrobnn_gaussian():
    net = nn.Sequential(nn.Linear(3, 2))
    bnn = pyrobnn.bayesian(net, prior=torch.distributions.Normal(0.1, 2.0), likelihood="categorical")
    prior = bnn.net[0].priors["weight"]
    assert isinstance(prior, Gaussian) and (prior.config()["scale"], prior.config()["loc"]) == (2.0, pytest.approx(0.1))


def test_a_prior_without_the_protocol_gets_drawn_weights():
    """A foreign prior (here a plain Normal at a site of a hand-written model that asks for local
    reparameterisation) does not evaluate placeholders as expectations: the guide draws its weights, so
    every ELBO stays correct for it."""
    def model(x):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([3]).to_event(1), infer={"local_reparameterization": True})
        return x @ w

    guide = MeanField(model)
    guide(torch.randn(4, 3))
    assert not guide._layout["w"][5]
    assert not expects_placeholders(dist.Normal(0.0, 1.0).expand([3]).to_event(1))
    assert expects_placeholders(Gaussian(1.0).expand([3]).to_event(1))


def test_a_placeholder_bias_next_to_a_drawn_weight_is_drawn_by_the_layer():
    """Weight prior without the protocol (drawn), bias prior with it (placeholder): the layer draws the bias
    from its q, so the output keeps the bias's noise (replaying one guide trace twice gives two outputs
    that differ by the bias draws, with the right spread)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4))
    bnn = pyrobnn.bayesian(net, prior={"0.weight": dist.Laplace(0.0, 1.0), "0.bias": "gaussian"},
                           guide={"name": "mean-field", "init_scale": 0.5}, likelihood="categorical",
                           dataset_size=10)
    x = torch.randn(5, 3)
    bnn.initialize(x)
    layout = bnn.autoguide._layout
    assert not layout["0.weight"][5] and layout["0.bias"][5]
    tr = pyro.poutine.trace(bnn.guide).get_trace(x)
    outs = torch.stack([pyro.poutine.replay(bnn.model, tr)(x) for _ in range(4000)])
    w = tr.nodes["0.weight"]["value"]
    loc, scale = bnn.autoguide.site_params("0.bias")
    assert torch.allclose(outs.mean(0), x @ w.T + loc, atol=0.05)
    assert torch.allclose(outs.std(0), scale.expand(5, 4), rtol=0.1)
