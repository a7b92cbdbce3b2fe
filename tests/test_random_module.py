"""random_module: a Bayesian network inside one's own Pyro model; PyroModule interop; repr; early prior errors."""
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from pyro.infer import SVI, Predictive, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule, PyroSample

import pyrobnn
from pyrobnn.guides import AdditiveNoise, MeanField
from pyrobnn.models import build
from pyrobnn.priors import DeepWeightPrior, Gaussian, KernelVAE


def _net():
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


@pytest.mark.parametrize("elbo_cls", [TraceMeanField_ELBO, Trace_ELBO])
def test_random_module_in_own_model_matches_bayesian(elbo_cls):
    torch.manual_seed(0)
    net = _net()
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    bnn = pyrobnn.bayesian(net, dataset_size=16)
    rm = pyrobnn.random_module("clf", net)

    def model(x, y=None):  # the same likelihood, written by hand
        logits = rm(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Categorical(logits=logits), obs=y)

    guide = MeanField(model, init_loc_fn=rm.init_loc_fn)
    with poutine.block(), torch.no_grad():
        bnn.initialize(x)
        guide(x, y)
    latent = {n for n, s in poutine.trace(model).get_trace(x, y).nodes.items()
              if s["type"] == "sample" and not s["is_observed"] and n != "data"}
    assert latent == {f"clf.{s}" for s in bnn.site_priors} == set(rm.site_priors)
    elbo = elbo_cls()
    for seed in (1, 2):
        pyro.set_rng_seed(seed)
        a = elbo.differentiable_loss(bnn.model, bnn.guide, x, y)
        pyro.set_rng_seed(seed)
        b = elbo.differentiable_loss(model, guide, x, y)
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-5), (a, b)
    ga = torch.autograd.grad(elbo.differentiable_loss(bnn.model, bnn.guide, x, y), bnn.autoguide.flat.loc)
    assert ga[0].abs().sum() > 0


def test_random_module_heteroscedastic_model_trains_with_pyro_and_pyrobnn_guides():
    torch.manual_seed(0)
    x = torch.linspace(-2, 2, 64)[:, None]
    y = (x[:, 0] ** 2 + 0.05 * (1 + x[:, 0].abs()) * torch.randn(64))
    for guide_cls, kw in ((AutoNormal, {"init_scale": 0.01}), (MeanField, {}), (AdditiveNoise, {})):
        pyro.clear_param_store()
        net = pyrobnn.random_module("het", nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 2)))

        def model(x, y=None):
            out = net(x)
            with pyro.plate("data", x.shape[0]):
                pyro.sample("y", dist.Normal(out[:, 0], F.softplus(out[:, 1]) + 1e-3), obs=y)
            return out

        guide = guide_cls(model, init_loc_fn=net.init_loc_fn, **kw)

        def rmse():
            pred = Predictive(model, guide=guide, num_samples=16, return_sites=["_RETURN"])(x)["_RETURN"]
            return float((pred[..., 0].mean(0) - x[:, 0] ** 2).square().mean().sqrt())

        svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
        losses = [svi.step(x, y)]  # builds the guide from (x, y); Predictive below passes no y
        before = rmse()
        losses += [svi.step(x, y) for _ in range(99)]
        assert sum(losses[-10:]) < 0.7 * sum(losses[:10]), guide_cls
        if guide_cls is not AutoNormal:  # (AutoNormal explains more of the data as noise at this point)
            assert rmse() < 0.6 * before, guide_cls
        # the deterministic parameters are not trained here (all weights are sites); the guide's are
        assert any(n.startswith(("AutoNormal", "pyrobnn")) for n in pyro.get_param_store())


def test_random_module_site_names_and_deterministic_params():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    rm = pyrobnn.random_module("body", net, layers="0", params=["1.weight"])
    tr = poutine.trace(rm).get_trace(torch.randn(5, 3))
    assert [n for n, s in tr.nodes.items() if s["type"] == "sample"] == ["body.0.weight", "body.0.bias", "body.1.weight"]
    params = {n for n, s in tr.nodes.items() if s["type"] == "param"}
    assert params == {"body.1.module.bias", "body.2.weight", "body.2.bias"}  # paths in the converted network
    assert pyro.get_param_store()["body.2.weight"] is rm.net[2].weight
    # a stale value under the same name (e.g. an earlier module) is replaced by this module's parameter
    again = pyrobnn.random_module("body", net, layers="0", params=["1.weight"])
    again(torch.randn(5, 3))
    assert pyro.get_param_store()["body.2.weight"] is again.net[2].weight
    with pytest.raises(ValueError, match="non-empty name"):
        pyrobnn.random_module("", net)
    with pytest.raises(ValueError, match="no module of the network matched"):
        pyrobnn.random_module("x", net, layers="nothing*")


def test_repr_of_conv_networks():
    for net in (build("lenet5"), nn.Sequential(nn.Conv1d(2, 3, 3, bias=False), nn.Flatten(), nn.Linear(3, 1)),
                nn.Sequential(nn.Conv3d(1, 2, 2, stride=2, groups=1), nn.Flatten())):
        text = repr(pyrobnn.bayesian(net, likelihood="gaussian"))
        assert "BayesianConv(Conv" in text
    text = repr(pyrobnn.bayesian(build("lenet5")))
    assert "BayesianConv(Conv2d(1, 20, kernel_size=(5, 5), stride=(1, 1)), sites=['weight', 'bias'])" in text
    text = repr(pyrobnn.bayesian(nn.Sequential(nn.Conv1d(2, 3, 3, bias=False), nn.Flatten()), likelihood="gaussian"))
    assert "BayesianConv(Conv1d(2, 3, kernel_size=(3,), stride=(1,)), sites=['weight'])" in text
    assert "BayesianLinear(in_features=4, out_features=8" in repr(pyrobnn.random_module("n", _net()))


def test_inapplicable_prior_is_reported_by_bayesian():
    dwp = DeepWeightPrior(KernelVAE(3, latent_dim=2, hidden=4))
    with pytest.raises(ValueError, match=r"site '0.weight' of shape \(8, 4\) is not a convolution kernel"):
        pyrobnn.bayesian(_net(), prior=dwp)
    with pytest.raises(ValueError, match="5×5 kernels"):
        pyrobnn.bayesian(nn.Sequential(nn.Conv2d(1, 2, 5), nn.Flatten()), prior={"*.weight": dwp, "*": "gaussian"})
    with pytest.raises(ValueError, match=r"site 'n.0.weight'"):
        pyrobnn.random_module("n", _net(), prior=dwp)
    pyrobnn.bayesian(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()), prior={"*.weight": dwp, "*": "gaussian"})


class _PyroMLP(PyroModule):
    def __init__(self, prior_w=None):
        super().__init__()
        self.fc1 = PyroModule[nn.Linear](4, 8)
        self.fc1.weight = PyroSample(prior_w if prior_w is not None else dist.Normal(0., 2.).expand([8, 4]).to_event(2))
        self.fc1.bias = PyroSample(dist.Laplace(0., 1.).expand([8]).to_event(1))
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def test_bayesian_keeps_pyro_sample_priors():
    torch.manual_seed(0)
    bnn = pyrobnn.bayesian(_PyroMLP(), prior={"name": "gaussian", "scale": 0.5}, dataset_size=10)
    sp = bnn.site_priors
    assert set(sp) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    # N(0, 2²) iid becomes pyrobnn's Gaussian (local reparameterisation, closed-form KL); the rest is kept
    assert isinstance(sp["fc1.weight"], Gaussian) and float(sp["fc1.weight"].scale) == 2.0
    assert float(sp["fc2.weight"].scale) == 0.5
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    tr = poutine.trace(bnn.model).get_trace(x, y)
    bias = tr.nodes["fc1.bias"]
    assert bias["value"].shape == (8,) and isinstance(bias["fn"].base_dist, dist.Laplace)
    assert torch.allclose(bias["fn"].log_prob(bias["value"]), dist.Laplace(0., 1.).log_prob(bias["value"]).sum())
    # and it trains and predicts
    from pyrobnn.inference import fit
    hist = fit(bnn, (x, y), epochs=30, lr=0.05, batch_size=10, progress=False, seed=0)
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert bnn.predict(x, 4).shape == (10, 3)


def test_bayesian_refuses_pyro_modules_it_cannot_convert_with_what_to_do():
    with pytest.raises(ValueError, match=r"fc1.weight is a PyroSample whose prior is a function of the module"):
        pyrobnn.bayesian(_PyroMLP(prior_w=lambda self: dist.Normal(0., 1.).expand([8, 4]).to_event(2)))
    with pytest.raises(ValueError, match=r"fc1.weight has shape \(8, 4\) but its PyroSample prior has shape \(4, 8\)"):
        pyrobnn.bayesian(_PyroMLP(prior_w=dist.Normal(0., 1.).expand([4, 8]).to_event(2)))
    net = PyroModule[nn.Sequential](nn.Linear(4, 4), PyroModule[nn.LayerNorm](4))
    net[1].weight = PyroSample(dist.Normal(1., 0.1).expand([4]).to_event(1))
    with pytest.raises(ValueError, match=r"1.weight: PyroSample on a LayerNorm.*params=\[\.\.\.\]"):
        pyrobnn.bayesian(net)


def test_readme_own_model_example_runs():
    """The README's "In your own Pyro model" block, run as written (fewer SVI steps)."""
    import re
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("### In your own Pyro model", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "random_module" in code and "range(500)" in code
    scope = {}
    exec(compile(code.replace("range(500)", "range(30)"), "README.md", "exec"), scope)
    assert scope["draws"]["y"].shape == (32, 100)
    assert set(scope["net"].site_priors) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}
