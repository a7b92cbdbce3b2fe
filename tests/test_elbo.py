"""MeanFieldELBO gives TraceMeanField_ELBO's loss and gradients, term for term, on every kind of model."""
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from pyro.infer import SVI, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal

import pyrobnn
from pyrobnn.guides import AdditiveNoise, MeanField
from pyrobnn.inference import MeanFieldELBO


def _net():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def _data(n=16):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def _loss_and_grads(elbo, model, guide, params, *args, seed=3):
    pyro.set_rng_seed(seed)
    loss = elbo.differentiable_loss(model, guide, *args)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss.detach(), grads


def _assert_same(model, guide, *args, params=None, **elbo_kwargs):
    pyro.set_rng_seed(0)
    guide(*args)  # create the guide's parameters
    params = params if params is not None else [p for p in pyro.get_param_store().values() if p.requires_grad]
    params = [p.unconstrained() if hasattr(p, "unconstrained") else p for p in params]
    ref_loss, ref_grads = _loss_and_grads(TraceMeanField_ELBO(**elbo_kwargs), model, guide, params, *args)
    loss, grads = _loss_and_grads(MeanFieldELBO(**elbo_kwargs), model, guide, params, *args)
    assert torch.equal(loss, ref_loss), (loss, ref_loss)
    assert len(grads) == len(ref_grads) and any(g is not None for g in grads)
    for g, r in zip(grads, ref_grads):
        assert (g is None) == (r is None)
        if g is not None:
            assert torch.equal(g, r)
    return loss


@pytest.mark.parametrize("prior,guide", [("gaussian", "mean-field"), ("log-uniform", "additive-noise"),
                                         ("ard", "mean-field"), ("gaussian", "additive-noise")])
def test_bnn_model_same_loss_and_gradients(prior, guide):
    pyro.clear_param_store()
    x, y = _data()
    bnn = pyrobnn.bayesian(_net(), prior=prior, guide=guide, dataset_size=160)
    bnn.initialize(x)
    _assert_same(bnn.model, bnn.guide, x, y, params=list(bnn.parameters()))


def test_same_parameters_after_svi_steps():
    """Several SVI steps with each ELBO from the same start and seed end at the same parameters."""
    x, y = _data()
    finals = []
    for elbo in (TraceMeanField_ELBO(), MeanFieldELBO()):
        pyro.clear_param_store()
        torch.manual_seed(0)
        bnn = pyrobnn.bayesian(_net(), dataset_size=160)
        bnn.initialize(x)
        svi = SVI(bnn.model, bnn.guide, pyro.optim.Adam({"lr": 1e-2}), elbo)
        losses = [svi.step(x, y) for _ in range(5)]
        finals.append((losses, [p.detach().clone() for p in bnn.parameters()]))
    assert finals[0][0] == finals[1][0]
    assert all(torch.equal(a, b) for a, b in zip(finals[0][1], finals[1][1]))


def _hand_written(subsample_size=None):
    """A hand-written hierarchical model: a Gamma precision (no closed-form KL to the guide's transformed
    Normal: the log p − log q fallback), a global weight, a local per-datum offset inside a plate that may be
    subsampled at random (a replayed subsample site), and an observed Normal."""
    def model(x, y=None):
        prec = pyro.sample("prec", dist.Gamma(2.0, 2.0))
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([4]).to_event(1))
        with pyro.plate("data", x.shape[0], subsample_size=subsample_size) as idx:
            b = pyro.sample("b", dist.Normal(0.0, 1.0))
            pyro.sample("y", dist.Normal(x[idx] @ w + b, prec.rsqrt()), obs=None if y is None else y[idx])
    return model


@pytest.mark.parametrize("subsample_size", [None, 5])
@pytest.mark.parametrize("guide_cls", [MeanField, AdditiveNoise, AutoNormal, AutoDiagonalNormal])
def test_hand_written_model_same_loss_and_gradients(guide_cls, subsample_size):
    if guide_cls is AdditiveNoise and subsample_size:
        pytest.skip("AdditiveNoise has no local (per-datum) sites")
    pyro.clear_param_store()
    x = torch.randn(12, 4)
    y = x @ torch.tensor([1.0, -1.0, 0.5, 0.0]) + 0.1 * torch.randn(12)
    model = _hand_written(subsample_size)
    guide = guide_cls(model)
    _assert_same(model, guide, x, y)


def test_random_module_model_and_particles():
    pyro.clear_param_store()
    x, y = _data()
    net = pyrobnn.random_module("net", _net(), prior="gaussian")

    def model(x, y=None):
        logits = net(x)
        with pyro.plate("data", 160, subsample=torch.arange(x.shape[0])):
            pyro.sample("obs", dist.Categorical(logits=logits), obs=y)

    guide = MeanField(model, init_loc_fn=net.init_loc_fn)
    _assert_same(model, guide, x, y)
    _assert_same(model, guide, x, y, num_particles=3)


def test_vectorized_particles_fall_back_to_trace_elbo():
    pyro.clear_param_store()
    y = torch.randn(12) + 1.0

    def model(y):
        loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(y), dim=-1):
            pyro.sample("y", dist.Normal(loc, 1.0), obs=y)

    guide = MeanField(model)
    _assert_same(model, guide, y, num_particles=2, vectorize_particles=True, max_plate_nesting=1)


def test_validation_catches_what_trace_elbo_catches():
    """A model latent site the guide does not have: the same warning as TraceMeanField_ELBO, then the same
    KeyError; a guide site missing from the model without ``is_auxiliary``: a clear error."""
    pyro.clear_param_store()

    def model():
        pyro.sample("a", dist.Normal(0.0, 1.0))
        pyro.sample("b", dist.Normal(0.0, 1.0))

    def guide():
        pyro.sample("a", dist.Normal(pyro.param("m", torch.tensor(0.0)), 1.0))

    for elbo in (TraceMeanField_ELBO(), MeanFieldELBO()):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            with pytest.raises(KeyError):
                elbo.differentiable_loss(model, guide)
        assert any("b" in str(m.message) and "model but not guide" in str(m.message) for m in w)

    def guide_extra():
        guide()
        pyro.sample("c", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="'c' is not in the model"):
        MeanFieldELBO().differentiable_loss(lambda: pyro.sample("a", dist.Normal(0.0, 1.0)), guide_extra)


def test_validation_runs_again_when_the_sites_change():
    pyro.clear_param_store()
    x, y = _data()
    bnn = pyrobnn.bayesian(_net(), dataset_size=160)
    bnn.initialize(x)
    elbo = MeanFieldELBO()
    elbo.differentiable_loss(bnn.model, bnn.guide, x, y)
    elbo.differentiable_loss(bnn.model, bnn.guide, x, y)
    assert len(elbo._validated) == 1
    elbo.differentiable_loss(bnn.model, bnn.guide, x[:5], y[:5])  # another batch size: other site shapes
    assert len(elbo._validated) == 2
    with pyro.validation_enabled(False):
        elbo.differentiable_loss(bnn.model, bnn.guide, x[:3], y[:3])
    assert len(elbo._validated) == 2


def test_nan_loss_warns():
    pyro.clear_param_store()

    def model():
        pyro.sample("a", dist.Normal(0.0, 1.0))
        inf = torch.tensor(float("inf"))  # passes validation; (inf - inf)² in the log-density is NaN
        pyro.sample("y", dist.Normal(pyro.param("s", inf), 1.0), obs=inf)

    guide = MeanField(model)
    with pytest.warns(UserWarning, match="NaN"):
        MeanFieldELBO().differentiable_loss(model, guide)
