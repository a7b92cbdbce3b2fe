"""Tests for pyrobnn.posterior: one protocol answered by a BNN's guide, stored draws, an ensemble, MC
dropout and TTA's Draws — and the same numbers as the older entry points under the same seed."""
import pyro
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from pyro.infer import MCMC
from pyro.infer.autoguide import AutoNormal

import pyrobnn
from pyrobnn.diagnostics import function_space_diagnostics
from pyrobnn.posterior import DrawSet, DropoutPosterior, Ensemble, Posterior, as_posterior, outputs_under_draws
from pyrobnn.inference import SGLD, SamplePosterior, sample
from pyrobnn.inference.tta import Draws, tta_predict


def _data(n=11):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, generator=g)
    return x, (x[:, 0] > 0).long()


def _bnn(**kw):
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    x, _ = _data()
    return pyrobnn.bayesian(net, dataset_size=40, **kw).initialize(x)


def _draw_set(bnn, chains=2, per_chain=3):
    draws = bnn.parameter_draws(chains * per_chain, generator=torch.Generator().manual_seed(4))
    stacked = {k: torch.stack([d[k] for d in draws]) for k in draws[0]}
    return {k: v.reshape((chains, per_chain) + v.shape[1:]) for k, v in stacked.items()}


def _nets(k=3, dropout=False):
    torch.manual_seed(5)
    return [nn.Sequential(nn.Linear(3, 6), nn.ReLU(), *([nn.Dropout(0.4)] if dropout else []), nn.Linear(6, 2))
            for _ in range(k)]


def _all_posteriors():
    bnn = _bnn()
    draws = _draw_set(bnn)
    return {"guide": bnn, "draw-set": DrawSet(bnn, draws), "sample-posterior": SamplePosterior(bnn, draws),
            "ensemble": Ensemble(_nets()), "mc-dropout": DropoutPosterior(_nets(1, dropout=True)[0]),
            "tta-draws": Draws.from_ensemble(_nets())}


# -- the protocol -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(_all_posteriors()))
def test_every_implementation_answers_the_protocol(name):
    post = _all_posteriors()[name]
    assert isinstance(post, Posterior)
    assert as_posterior(post) is post
    x, _ = _data()
    S = 3
    outs = post.outputs(x, S)
    assert outs.shape == (S, 11, 2) and torch.isfinite(outs).all()
    draws = post.parameter_draws(S)
    assert len(draws) == S
    one = post.run(draws[0], x[:4])
    assert one.shape == (4, 2)
    assert isinstance(post.network(draws[0]), nn.Module)
    # None asks for the posterior's own default number of draws
    default = post.outputs(x, None)
    assert default.shape[1:] == (11, 2) and len(post.parameter_draws(None)) == default.shape[0]


def test_things_that_are_not_posteriors():
    assert not isinstance(nn.Linear(3, 2), Posterior)
    assert not isinstance({"0.weight": torch.zeros(2, 3)}, Posterior)
    with pytest.raises(TypeError, match="cannot use a int as a posterior"):
        as_posterior(42)


def test_as_posterior_wraps_networks_and_mcmc_runs():
    nets = _nets()
    assert isinstance(as_posterior(nets), Ensemble) and as_posterior(nets).nets == nets
    assert isinstance(as_posterior(nets[0]), Ensemble)
    assert isinstance(as_posterior(_nets(1, dropout=True)[0]), DropoutPosterior)
    bnn = _bnn()
    x, y = _data(20)
    pyro.set_rng_seed(0)
    mcmc = MCMC(SGLD(bnn.model, step_size=1e-4), num_samples=4, warmup_steps=2, disable_progbar=True)
    mcmc.run(x, y)
    post = as_posterior(mcmc)
    assert type(post) is DrawSet and len(post) == 4
    assert torch.equal(post.outputs(x), SamplePosterior.from_mcmc(mcmc).sample_outputs(x))


# -- batching ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["draw-set", "sample-posterior", "ensemble", "tta-draws"])
def test_fixed_draws_do_not_depend_on_the_batch_size(name):
    post = _all_posteriors()[name]
    x, _ = _data(11)
    whole = post.outputs(x, 4)
    for bs in (1, 3, 11, 50):
        torch.testing.assert_close(post.outputs(x, 4, batch_size=bs), whole, rtol=1e-6, atol=1e-7)


def test_guide_weight_draws_do_not_depend_on_the_batch_size():
    bnn = _bnn(local_reparameterization=False)
    x, _ = _data(11)
    torch.manual_seed(9)
    whole = bnn.outputs(x, 5)
    rows = []
    hook = bnn.net[0].register_forward_hook(lambda m, i, o: rows.append(o.shape[0]))
    torch.manual_seed(9)
    batched = bnn.outputs(x, 5, batch_size=4)
    hook.remove()
    assert rows == [4, 4, 3] * 5  # each draw's weights ran on blocks of 4 rows
    torch.testing.assert_close(batched, whole, rtol=1e-6, atol=1e-7)
    torch.manual_seed(10)
    assert not torch.allclose(bnn.outputs(x, 5, batch_size=4), whole)  # another seed, other draws


def test_local_reparameterisation_batches_by_rows():
    bnn = _bnn()
    x, _ = _data(11)
    torch.manual_seed(9)
    a = bnn.outputs(x, 5, batch_size=4)
    torch.manual_seed(9)
    b = bnn.sample_outputs(x, 5, max_rows=20)  # the same blocks of 4 rows
    assert torch.equal(a, b) and a.shape == (5, 11, 2)


# -- the same numbers as before ------------------------------------------------------------------------------
def test_guide_outputs_are_what_predict_summarises():
    bnn = _bnn()
    x, _ = _data()
    torch.manual_seed(7)
    outs = bnn.outputs(x, 6)
    torch.manual_seed(7)
    probs = bnn.predict(x, 6)
    torch.manual_seed(7)
    assert torch.equal(bnn.sample_outputs(x, 6), outs)
    assert torch.equal(bnn.likelihood.aggregate(outs), probs)
    torch.manual_seed(8)
    assert not torch.equal(bnn.outputs(x, 6), outs)


def test_draw_set_reproduces_sample_posterior():
    x, y = _data(30)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    bnn = pyrobnn.bayesian(net, likelihood={"name": "gaussian", "scale": "latent"})
    post = sample(bnn, (x, x[:, 0]), num_samples=4, warmup_steps=3, thin=1, num_chains=2, seed=0, step_size=1e-3)
    again = DrawSet(bnn, post.draws)
    assert torch.equal(again.outputs(x), post.sample_outputs(x))
    assert torch.equal(again.outputs(x, 3), post.sample_outputs(x, 3))
    for a, b in zip(again.predict(x), post.predict(x)):
        assert torch.equal(a, b)
    # the flat list of draws is chain after chain, and each draw runs as its own network
    flat = DrawSet.from_draws(bnn, post.parameter_draws())
    assert flat.num_chains == 1 and len(flat) == 8
    assert torch.equal(flat.outputs(x), post.outputs(x))
    by_run = torch.stack([post.run(d, x) for d in post.parameter_draws()])
    torch.testing.assert_close(by_run, post.outputs(x), rtol=1e-5, atol=1e-6)


def test_ensemble_outputs_are_its_members_outputs():
    nets = _nets(4)
    x, _ = _data()
    ens = Ensemble(nets)
    with torch.no_grad():
        expected = torch.stack([n(x) for n in nets])
    assert torch.equal(ens.outputs(x), expected)
    assert torch.equal(ens.outputs(x, 2), expected[[0, 3]])  # evenly spaced members
    assert ens.parameter_draws(2) == [nets[0], nets[3]]
    rows = []
    nets[1][0].register_forward_hook(lambda m, i, o: rows.append(o.shape[0]))
    assert torch.equal(ens.outputs(x, batch_size=5), expected) and rows == [5, 5, 1]


def test_dropout_posterior_is_mc_dropout():
    net = _nets(1, dropout=True)[0]
    x, _ = _data()
    post = DropoutPosterior(net)
    torch.manual_seed(3)
    outs = post.outputs(x, 6)
    torch.manual_seed(3)
    from pyrobnn.inference import MCDropout
    ref, _ = MCDropout(net).sample(x, 6)
    assert torch.equal(outs, ref)
    assert not torch.equal(outs[0], outs[1])  # dropout is on
    assert net.training  # the module's mode is given back
    seeds = post.parameter_draws(3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(post.run(seeds[0], x), post.run(seeds[0], x))  # a seed is a fixed mask
    assert not torch.equal(post.run(seeds[0], x), post.run(seeds[1], x))
    with pytest.raises(ValueError, match="no dropout module"):
        DropoutPosterior(_nets(1)[0])


# -- running the network under a draw ------------------------------------------------------------------------
def test_run_under_a_draw_is_the_plain_forward():
    bnn = _bnn()
    x, _ = _data()
    draw = bnn.parameter_draws(1, generator=torch.Generator().manual_seed(0))[0]
    h = torch.tanh(F.linear(x, draw["0.weight"], draw["0.bias"]))
    expected = F.linear(h, draw["2.weight"], draw["2.bias"])
    torch.testing.assert_close(bnn.run(draw, x), expected, rtol=1e-6, atol=1e-6)
    # and many draws at once, vmapped
    draws = bnn.parameter_draws(3, generator=torch.Generator().manual_seed(1))
    stacked = {k: torch.stack([d[k] for d in draws]) for k in draws[0]}
    by_hand = torch.stack([F.linear(torch.tanh(F.linear(x, d["0.weight"], d["0.bias"])), d["2.weight"], d["2.bias"])
                           for d in draws])
    torch.testing.assert_close(outputs_under_draws(bnn, stacked, x), by_hand, rtol=1e-5, atol=1e-6)
    assert bnn.training  # run puts the BNN in eval mode only while it runs


def test_guide_draws_match_the_guide_and_other_guides_draw_too():
    bnn = _bnn()
    draws = bnn.parameter_draws(400, generator=torch.Generator().manual_seed(0))
    w = torch.stack([d["2.bias"] for d in draws])
    loc, scale = bnn.autoguide.site_params("2.bias")
    assert ((w.mean(0) - loc).abs() < 4 * scale / 20).all()
    same = bnn.parameter_draws(400, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.stack([d["2.bias"] for d in same]), w)
    auto = _bnn(guide=AutoNormal)
    pyro.set_rng_seed(3)
    draws = auto.parameter_draws(2)
    assert set(draws[0]) >= set(auto.site_priors) and not torch.equal(draws[0]["0.weight"], draws[1]["0.weight"])
    with pytest.raises(ValueError, match="global random state"):
        auto.parameter_draws(2, generator=torch.Generator())


# -- bad input ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(_all_posteriors()))
def test_bad_input_is_named(name):
    post = _all_posteriors()[name]
    x, _ = _data()
    with pytest.raises(ValueError, match="num_samples"):
        post.outputs(x, 0)
    with pytest.raises(ValueError, match="batch_size"):
        post.outputs(x, 2, batch_size=0)
    with pytest.raises(TypeError, match="x must be"):
        post.outputs("not a tensor", 2)
    with pytest.raises((TypeError, ValueError)):
        post.run(object(), x)


def test_bad_draws_are_named():
    bnn = _bnn()
    x, _ = _data()
    draw = bnn.parameter_draws(1)[0]
    del draw["2.bias"]
    with pytest.raises(ValueError, match=r"no value for sites \['2.bias'\]"):
        bnn.run(draw, x)
    with pytest.raises(TypeError, match="mapping"):
        bnn.run([1, 2], x)
    with pytest.raises(TypeError, match="member network"):
        Ensemble(_nets()).run("net", x)
    with pytest.raises(TypeError, match="integer seed"):
        DropoutPosterior(_nets(1, dropout=True)[0]).run(1.5, x)
    with pytest.raises(ValueError, match="at least one site"):
        DrawSet(bnn, {})
    with pytest.raises(TypeError, match="non-empty list"):
        Ensemble([])
    kept = DrawSet(bnn, {"0.weight": _draw_set(bnn)["0.weight"]})
    with pytest.raises(ValueError, match="kept no draws of sites"):
        kept.outputs(x)


# -- consumers take any posterior ---------------------------------------------------------------------------
def test_arviz_bridge_takes_a_draw_set():
    bnn = _bnn()
    x, y = _data()
    draws = _draw_set(bnn)
    a = pyrobnn.to_inference_data(DrawSet(bnn, draws), data=(x, y), test=x[:5])
    b = pyrobnn.to_inference_data(SamplePosterior(bnn, draws), data=(x, y), test=x[:5])
    assert a.posterior.sizes["chain"] == 2 and a.posterior.sizes["draw"] == 3
    for group in ("posterior", "log_likelihood", "predictions"):
        for v in getattr(a, group).data_vars:
            assert (getattr(a, group)[v].values == getattr(b, group)[v].values).all()
    with pytest.raises(TypeError, match="Ensemble has none"):
        pyrobnn.to_inference_data(Ensemble(_nets()))


def test_function_space_diagnostics_take_any_posterior():
    bnn = _bnn()
    x, _ = _data()
    draws = _draw_set(bnn)
    fs = function_space_diagnostics(SamplePosterior(bnn, draws), x=x)
    assert fs == function_space_diagnostics(DrawSet(bnn, draws), x=x)
    assert fs["num_quantities"] == 11 * 2
    one = function_space_diagnostics(Ensemble(_nets(4)), x=x)
    assert one["num_quantities"] == 22 and one["ess_bulk_min"] > 0


def test_tta_takes_a_posterior_directly():
    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Flatten(), nn.Linear(16, 3)) for _ in range(3)]
    x = torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    a = tta_predict(Ensemble(nets), x, mode="none")
    b = tta_predict(Draws.from_ensemble(nets), x, mode="none")
    assert torch.equal(a, b)
    bnn = pyrobnn.bayesian(nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), dataset_size=5).initialize(x)
    torch.manual_seed(1)
    direct = tta_predict(bnn, x, mode="none")  # a BNN: its default 32 guide draws
    torch.manual_seed(1)
    assert torch.equal(direct, tta_predict(Draws.from_posterior(bnn, 32), x, mode="none"))
    with pytest.raises(TypeError, match="Draws or a pyrobnn posterior"):
        tta_predict("nets", x, mode="none")


def test_relevance_reads_stored_draws():
    bnn = _bnn()
    post = SamplePosterior(bnn, _draw_set(bnn))
    a = pyrobnn.relevance(bnn, samples=post)
    b = pyrobnn.relevance(bnn, samples=post.get_samples())
    assert torch.equal(a.inputs, b.inputs)
    flat = post.get_samples()
    assert torch.allclose(a.inputs, (flat["0.weight"].double() ** 2).mean(0).mean(0))  # E[w²] averaged over units


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_posteriors_on_the_gpu():
    dev = torch.device("cuda")
    bnn = _bnn()
    x, _ = _data()
    draws = _draw_set(bnn)
    cpu = DrawSet(bnn, draws).outputs(x)
    bnn.to(dev)
    gpu = DrawSet(bnn, {k: v.to(dev) for k, v in draws.items()})
    torch.testing.assert_close(gpu.outputs(x.to(dev), batch_size=4).cpu(), cpu, rtol=1e-4, atol=1e-5)
    assert bnn.outputs(x.to(dev), 3).device.type == "cuda"
    nets = _nets()
    expected = Ensemble(nets).outputs(x)
    torch.testing.assert_close(Ensemble([n.to(dev) for n in nets]).outputs(x.to(dev)).cpu(), expected,
                               rtol=1e-4, atol=1e-5)
    drop = DropoutPosterior(_nets(1, dropout=True)[0].to(dev))
    assert torch.equal(drop.run(7, x.to(dev)), drop.run(7, x.to(dev)))
    assert drop.outputs(x.to(dev), 4).shape == (4, 11, 2)


def test_the_network_under_a_draw_runs_through_one_public_door():
    """Outside pyrobnn/bnn.py the library runs a BNN's network only through BNN.run / outputs (the private
    Pyro program ``_net_only`` stays inside the BNN)."""
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    offenders = [str(p.relative_to(root)) for folder in ("pyrobnn", "inference", "models", "examples", "benchmarks")
                 for p in sorted((root / folder).rglob("*.py"))
                 if "_net_only" in p.read_text() and p != root / "pyrobnn" / "bnn.py"]
    assert offenders == []
