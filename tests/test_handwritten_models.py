"""pyrobnn priors as ordinary distributions in hand-written Pyro models, with pyrobnn's guides under Pyro's
three ELBOs, and pyro.infer.Predictive on such models and on bnn.model."""
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import SVI, Predictive, Trace_ELBO, TraceGraph_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal

import pyrobnn
from pyrobnn.guides import AdditiveNoise, MeanField
from pyrobnn.lrt import Placeholder, draw, placeholder_of
from pyrobnn.priors import ARD, DeepWeightPrior, Gaussian, KernelVAE, LogUniform


def _vae():
    torch.manual_seed(11)
    return KernelVAE(3, latent_dim=2, hidden=4)


PRIORS = {
    "gaussian": lambda: Gaussian(0.5),
    "log-uniform": LogUniform,
    "ard-empirical": ARD,
    "ard-hierarchical-input": lambda: ARD(mode="hierarchical", a=2.0, b=1.0),
    "ard-hierarchical-weight": lambda: ARD(mode="hierarchical", group="weight", a=2.0, b=1.0),
    "deep-weight": lambda: DeepWeightPrior(_vae()),
}
GUIDES = {"MeanField": MeanField, "AdditiveNoise": AdditiveNoise}
ELBOS = {"TraceMeanField": TraceMeanField_ELBO, "Trace": Trace_ELBO, "TraceGraph": TraceGraph_ELBO}


def _kernel_prior(prior):
    """The prior of a [2, 1, 3, 3] conv kernel: a kernel prior's event is one 3×3 kernel."""
    if isinstance(prior, DeepWeightPrior):
        return prior.expand([2, 1]).to_event(2)
    return prior.expand([2, 1, 3, 3]).to_event(4)


def _bias_prior(prior):
    base = prior.bias_prior if isinstance(prior, DeepWeightPrior) else prior
    return base.expand([2]).to_event(1)


def make_model(prior, seen=None):
    """A small conv regression written the Pyro way; every weight's value is consumed by the model's own
    code (``F.conv2d``, ``@``), the bias site asks for local reparameterisation by hand."""

    def model(x, y=None):
        k = pyro.sample("k", _kernel_prior(prior))
        b = pyro.sample("b", _bias_prior(prior), infer={"local_reparameterization": True})
        h = torch.tanh(F.conv2d(x, k, b)).flatten(1)
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([1, 18]).to_event(2))
        if seen is not None:
            seen.update(k=k * 1, b=b * 1, w=w * 1)
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("obs", dist.Normal((h @ w.T).squeeze(-1), 0.3), obs=y)

    return model


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1, 5, 5, generator=g)
    return x, x[:, 0, 1:4, 1:4].sum((1, 2)) * 0.3


def _check_combination(prior_name, guide_name, elbo_name):
    pyro.clear_param_store()
    torch.manual_seed(0)
    x, y = _data()
    seen = {}
    model = make_model(PRIORS[prior_name](), seen)
    guide = GUIDES[guide_name](model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), ELBOS[elbo_name]())
    losses = [svi.step(x, y) for _ in range(40)]
    assert all(math.isfinite(v) for v in losses)
    # it trains: the last half's mean loss well below the first steps' (a half, not the last few steps: the deep
    # weight prior's KL is a one-draw estimate, and its step-to-step noise is ±10 % of the loss)
    assert sum(losses[-20:]) / 20 < 0.8 * sum(losses[:5]) / 5
    # the guide's draws differ between calls at every site the model consumes, and what the model's code
    # computes with is that draw (not the posterior mean, also at the hand-marked local site "b")
    means = guide.median()
    consumed = []
    for _ in range(2):
        tr = poutine.trace(guide).get_trace(x, y)
        poutine.replay(model, tr)(x, y)
        consumed.append(dict(seen))
    for site in ("k", "b", "w"):
        assert not torch.equal(consumed[0][site], consumed[1][site]), site
        assert not torch.allclose(consumed[0][site], means[site]), site
    # Predictive: posterior predictive draws and the weights they used
    pred = Predictive(model, guide=guide, num_samples=5, return_sites=["k", "b", "obs"])(x)
    # (global sites get Predictive's one leading batch dim per plate level: [5, 1, ...])
    k, b = pred["k"].reshape(5, 2, 1, 3, 3), pred["b"].reshape(5, 2)
    assert pred["obs"].shape == (5, 32)
    assert (b[0] != b[1]).all() and (k[0] != k[1]).all()
    assert type(pred["b"]) is torch.Tensor


@pytest.mark.parametrize("prior_name, guide_name, elbo_name", [
    ("gaussian", "MeanField", "Trace"),
    ("log-uniform", "AdditiveNoise", "TraceMeanField"),
    ("ard-empirical", "MeanField", "TraceGraph"),
    ("ard-hierarchical-input", "AdditiveNoise", "Trace"),
    ("ard-hierarchical-weight", "MeanField", "TraceMeanField"),
    ("deep-weight", "AdditiveNoise", "TraceGraph"),
])
def test_hand_written_model_trains_draws_and_predicts(prior_name, guide_name, elbo_name):
    _check_combination(prior_name, guide_name, elbo_name)


@pytest.mark.slow
@pytest.mark.parametrize("elbo_name", list(ELBOS))
@pytest.mark.parametrize("guide_name", list(GUIDES))
@pytest.mark.parametrize("prior_name", list(PRIORS))
def test_hand_written_model_every_prior_guide_and_elbo(prior_name, guide_name, elbo_name):
    _check_combination(prior_name, guide_name, elbo_name)


@pytest.mark.parametrize("prior_name", list(PRIORS))
def test_every_prior_expands_makes_an_event_samples_and_scores(prior_name):
    prior = PRIORS[prior_name]()
    fn = _kernel_prior(prior)
    assert fn.batch_shape == () and fn.shape() == (2, 1, 3, 3)
    draws = fn.sample((4,))
    assert draws.shape == (4, 2, 1, 3, 3) and torch.isfinite(draws).all()
    if prior_name != "ard-empirical":  # empirical ARD has a density only at a guide's placeholder
        lp = fn.log_prob(draws)
        assert lp.shape == (4,) and torch.isfinite(lp).all()
    assert _bias_prior(prior).sample().shape == (2,)


def test_a_hand_marked_local_site_gets_a_fresh_draw_each_run_and_one_draw_within_a_run():
    """infer={"local_reparameterization": True} on a user's own site: the guide's value is a placeholder, but
    whatever the user's code computes with it sees w ~ q, the same w for every use in one run."""
    torch.manual_seed(0)
    uses = []

    def model():
        w = pyro.sample("w", Gaussian().expand([3]).to_event(1), infer={"local_reparameterization": True})
        uses.append((w + 0.0, w * 1.0))

    guide = MeanField(model, init_scale=0.5)
    tr = poutine.trace(guide).get_trace()
    value = tr.nodes["w"]["value"]
    assert isinstance(value, Placeholder) and placeholder_of(value) is not None
    poutine.replay(model, tr)()
    poutine.replay(model, poutine.trace(guide).get_trace())()
    (a1, a2), (b1, _) = uses[-2:]  # (the first entry is the guide's prototype run)
    assert torch.equal(a1, a2)  # one draw within a run
    assert not torch.equal(a1, b1)  # fresh across runs
    loc, scale = guide.site_params("w")
    assert not torch.allclose(a1, loc)
    # gradients reach the guide's parameters through the draw
    (a1.sum()).backward()
    assert guide.flat.loc.grad is not None and guide.flat.rho.grad is not None


def test_improper_priors_are_never_sampled_to_initialise_a_guide(monkeypatch):
    def refuse(self, *args, **kwargs):
        raise AssertionError("the guide sampled an improper prior")

    monkeypatch.setattr(LogUniform, "sample", refuse)

    def model():
        pyro.sample("w", LogUniform().expand([4, 8]).to_event(2))

    for guide in (MeanField(model), AdditiveNoise(model)):
        guide()
        loc, _ = guide.site_params("w")
        bound = 1 / math.sqrt(8)  # fan-in initialisation
        assert loc.abs().max() <= bound and loc.std() > 0


def test_generic_sites_start_at_autonormal_scale_network_sites_stay_small():
    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0).expand([3]).to_event(1))

    g = MeanField(model)
    g()
    assert torch.allclose(g.site_params("z")[1], torch.full((3,), 0.1))
    a = AdditiveNoise(model)
    a()
    assert torch.allclose(a.site_params("z")[1], torch.full((3,), 0.1))
    bnn = pyrobnn.bayesian(nn.Sequential(nn.Linear(2, 3)), dataset_size=4)
    bnn.initialize(torch.randn(2, 2))
    assert torch.allclose(bnn.autoguide.site_params("0.weight")[1], torch.full((3, 2), 0.01))
    sv = pyrobnn.bayesian(nn.Sequential(nn.Linear(2, 3)), prior="log-uniform", guide="additive-noise", dataset_size=4)
    sv.initialize(torch.randn(2, 2))
    assert torch.allclose(sv.autoguide.site_log_params("0.weight")[1], torch.full((3, 2), -10.0))


def test_empirical_ard_needs_a_pyrobnn_guide_and_says_so_naming_the_site():
    """Empirical ARD has a density only at a pyrobnn guide's placeholder. A hand-written model with another
    guide fails at the first ELBO evaluation, naming the site and the fix; bayesian() refuses at once."""
    def model():
        pyro.sample("w_ard", ARD().expand([3]).to_event(1))

    for elbo in (Trace_ELBO(), TraceMeanField_ELBO()):
        with pytest.raises(ValueError, match="(?s)w_ard.*MeanField"):
            elbo.loss(model, AutoNormal(model))
    assert math.isfinite(Trace_ELBO().loss(model, MeanField(model)))
    with pytest.raises(ValueError, match="(?s)site '0.weight'.*empirical-Bayes ARD.*mean-field"):
        pyrobnn.bayesian(nn.Sequential(nn.Linear(2, 2)), prior="ard", guide=AutoNormal)


# -- Predictive on bnn.model for every registered prior with each guide that accepts it ---------------------
def _conv_net():
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(18, 2))


BNN_PRIORS = {
    "gaussian": "gaussian",
    "log-uniform": "log-uniform",
    "ard": "ard",
    "ard-hierarchical": {"name": "ard", "mode": "hierarchical"},
    "deep-weight": None,  # built in the test: an in-memory VAE for the conv kernels, log-uniform elsewhere
}


# AutoNormal does not accept empirical ARD (no density without a placeholder: bayesian() refuses, above) nor
# hierarchical ARD through bayesian(): it nests its parameters by the dots of site names, and the precision
# site "0.weight.alpha" cannot sit inside the weight site "0.weight"
@pytest.mark.parametrize("prior_name, guide", [(p, g) for p in BNN_PRIORS for g in ("mean-field", "additive-noise")]
                         + [(p, AutoNormal) for p in ("gaussian", "log-uniform", "deep-weight")],
                         ids=lambda v: v if isinstance(v, str) else "AutoNormal")
def test_predictive_on_bnn_model(prior_name, guide):
    prior = BNN_PRIORS[prior_name]
    if prior is None:
        prior = {"0.weight": DeepWeightPrior(_vae()), "*": "log-uniform"}
    torch.manual_seed(0)
    x = torch.randn(6, 1, 5, 5)
    bnn = pyrobnn.bayesian(_conv_net(), prior=prior, guide=guide, dataset_size=6).initialize(x)
    pred = Predictive(bnn.model, guide=bnn.guide, num_samples=4, return_sites=["obs", "0.weight", "3.weight", "_RETURN"])(x)
    assert pred["obs"].shape == (4, 6)
    w, k = pred["3.weight"].reshape(4, 2, 18), pred["0.weight"].reshape(4, 2, 1, 3, 3)
    assert type(pred["3.weight"]) is torch.Tensor
    # real draws (not the posterior mean at every draw): they differ, and so do the network outputs
    assert (w[0] != w[1]).all() and (k[0] != k[1]).all()
    assert not torch.allclose(pred["_RETURN"][0], pred["_RETURN"][1])
