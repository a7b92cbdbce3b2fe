"""Pyro's own AutoGuides as the guide of bayesian(): fit → predict → ArviZ → save → load → same predictions."""
import functools

import pyro
import pytest
import torch
import torch.nn as nn
from pyro.infer.autoguide import (AutoDelta, AutoDiagonalNormal, AutoLaplaceApproximation,
                                  AutoLowRankMultivariateNormal, AutoMultivariateNormal, AutoNormal)

import pyrobnn
from pyrobnn.inference import fit

GUIDES = [AutoNormal, AutoDiagonalNormal, AutoLowRankMultivariateNormal, AutoMultivariateNormal,
          functools.partial(AutoLowRankMultivariateNormal, rank=2, init_scale=0.05)]


def _net(out):
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, out))


def _data(likelihood):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 3, generator=g)
    y = (x[:, 0] > 0).long() if likelihood == "categorical" else x[:, 0] - 0.5 * x[:, 1]
    return x, y


@pytest.mark.parametrize("guide, likelihood", [(g, "categorical") for g in GUIDES]
                         + [(AutoNormal, "gaussian"), (AutoMultivariateNormal, "gaussian")],
                         ids=lambda g: getattr(g, "__name__", g if isinstance(g, str) else "partial"))
def test_pyro_autoguide_fit_predict_save_load(guide, likelihood, tmp_path):
    x, y = _data(likelihood)
    net = _net(2 if likelihood == "categorical" else 1)
    bnn = pyrobnn.bayesian(net, guide=guide, likelihood=likelihood, dataset_size=40)
    hist = fit(bnn, (x, y), epochs=8, batch_size=20, lr=5e-2, progress=False, seed=0)
    assert hist[-1]["loss"] < hist[0]["loss"]  # it trains
    # posterior draws differ (the guide is stochastic), outputs are [S, B, ...]
    outs = bnn.sample_outputs(x[:5], num_samples=6)
    assert outs.shape[:2] == (6, 5) and not torch.allclose(outs[0], outs[1])
    path = tmp_path / "g.safetensors"
    pyrobnn.save(bnn, path)
    loaded = pyrobnn.load(path, net=net)
    assert type(loaded.autoguide) is type(bnn.autoguide)
    for k, v in bnn.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    torch.manual_seed(5)
    a = bnn.predict(x[:7], num_samples=8)
    torch.manual_seed(5)
    b = loaded.predict(x[:7], num_samples=8)
    for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        assert torch.equal(u, v)
    # the copy owns its parameters: training the original does not move the loaded guide
    before = {k: v.clone() for k, v in loaded.state_dict().items()}
    fit(bnn, (x, y), epochs=1, batch_size=20, lr=2e-2, progress=False, seed=1)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in before.items())


def test_pyro_autoguide_goes_to_arviz():
    pytest.importorskip("arviz")
    x, y = _data("categorical")
    bnn = pyrobnn.bayesian(_net(2), guide=AutoNormal, dataset_size=40)
    fit(bnn, (x, y), epochs=2, batch_size=20, lr=1e-2, progress=False, seed=0)
    idata = pyrobnn.to_inference_data(bnn, data=(x, y), num_samples=20)
    post = idata.posterior
    assert "0.weight" in post and "2.bias" in post
    assert post["2.bias"].shape[:2] == (1, 20)
    assert float(post["2.bias"].std()) > 0


def test_two_bnns_with_pyro_guides_do_not_share_parameters():
    x, y = _data("categorical")
    a = pyrobnn.bayesian(_net(2), guide=AutoNormal, dataset_size=40).initialize(x)
    b = pyrobnn.bayesian(_net(2), guide=AutoNormal, dataset_size=40).initialize(x)
    fit(a, (x, y), epochs=3, batch_size=20, lr=5e-2, progress=False, seed=0)
    la = dict(a.autoguide.named_parameters())
    lb = dict(b.autoguide.named_parameters())
    assert set(la) == set(lb)
    assert all(not torch.equal(la[k], lb[k]) for k in la if "locs" in k)


@pytest.mark.parametrize("guide, match", [
    (AutoLaplaceApproximation, "AutoLaplaceApproximation"),
    (functools.partial(AutoNormal, create_plates=lambda *a, **k: []), "create_plates"),
])
def test_unsupported_pyro_guides_are_refused_at_save(guide, match, tmp_path):
    x, y = _data("categorical")
    bnn = pyrobnn.bayesian(_net(2), guide=guide, dataset_size=40).initialize(x)
    with pytest.raises(ValueError, match=match):
        pyrobnn.save(bnn, tmp_path / "no.safetensors")
    assert not (tmp_path / "no.safetensors").exists()


def test_saved_pyro_guide_spec_is_checked_at_load():
    net = _net(2)
    with pytest.raises(ValueError, match="unknown Pyro guide"):
        pyrobnn.bayesian(net, guide={"name": "pyro.AutoIAFNormal"})
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        pyrobnn.bayesian(net, guide={"name": "pyro.AutoLowRankMultivariateNormal", "rank": -1})
    with pytest.raises(ValueError, match="does not take"):
        pyrobnn.bayesian(net, guide={"name": "pyro.AutoNormal", "hidden_dims": [3]})
    ok = pyrobnn.bayesian(net, guide={"name": "pyro.AutoDelta"})
    assert isinstance(ok.autoguide, AutoDelta)
