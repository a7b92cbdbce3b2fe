"""pyrobnn.relevance: closed forms against the guide's parameters and Monte Carlo, the fallbacks,
posterior samples, ranks, the plot, and noise features ranked last on a non-redundant problem."""
import pytest
import torch
import torch.nn as nn

import pyrobnn
from pyrobnn.inference import fit
from pyrobnn.relevance import Relevance, plot_relevance, relevance

from _examples import load_example


def _mlp(prior, d_in=3, hidden=4, guide="mean-field"):
    net = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, 1))
    bnn = pyrobnn.bayesian(net, prior=prior, guide=guide, likelihood="bernoulli", dataset_size=32)
    bnn.initialize(torch.randn(4, d_in))
    # move the guide away from its initial values so the test does not pass by symmetry
    with torch.no_grad():
        for p in bnn.autoguide.flat.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return bnn


def test_hierarchical_input_group_is_posterior_mean_of_inverse_alpha():
    bnn = _mlp({"name": "ard", "mode": "hierarchical", "group": "input"})
    rel = relevance(bnn, statistic="prior-variance")
    assert rel.input_site == "0.weight" and rel.method == "prior-variance"
    loc, scale = bnn.autoguide.site_params("0.weight.alpha")  # q(log α) = N(loc, scale²)
    expected = (-loc.double() + 0.5 * scale.double() ** 2).exp()
    assert rel.inputs.shape == (3,)
    assert torch.allclose(rel.inputs, expected.detach(), rtol=1e-12)
    # Monte Carlo over the guide agrees (20,000 draws; log-normal 1/α with s ≈ 0.3: 1 % tolerance)
    draws = bnn.autoguide.sample_latents(20000, generator=torch.Generator().manual_seed(0))["0.weight.alpha"]
    assert torch.allclose(rel.inputs, (1 / draws.double()).mean(0), rtol=0.01)
    # the hidden layer's input units are the first layer's outputs
    assert rel.units["2.weight"].shape == (4,)
    assert rel.methods == {"0.weight": "prior-variance", "2.weight": "prior-variance"}


def test_hierarchical_weight_group_averages_over_outputs():
    bnn = _mlp({"name": "ard", "mode": "hierarchical", "group": "weight"})
    loc, scale = bnn.autoguide.site_params("0.weight.alpha")
    expected = (-loc.double() + 0.5 * scale.double() ** 2).exp().mean(0)
    assert torch.allclose(relevance(bnn, statistic="prior-variance").inputs, expected.detach(), rtol=1e-12)


@pytest.mark.parametrize("prior", ["ard", "gaussian", {"name": "ard", "mode": "hierarchical", "group": "layer"}])
def test_second_moment_fallback(prior):
    bnn = _mlp(prior)
    rel = relevance(bnn, statistic="prior-variance")  # no per-input α: falls back to E[w²]
    assert rel.method == "second-moment"
    loc, scale = bnn.autoguide.site_params("0.weight")
    expected = (loc.double() ** 2 + scale.double() ** 2).mean(0)
    assert torch.allclose(rel.inputs, expected.detach(), rtol=1e-12)


def test_additive_noise_guide_uses_its_theta_and_sigma():
    if "additive-noise" not in pyrobnn.registry.GUIDES.names():
        pytest.skip("additive-noise guide not available")
    bnn = _mlp("ard", guide="additive-noise")
    loc, scale = bnn.autoguide.site_params("0.weight")
    expected = (loc.double() ** 2 + scale.double() ** 2).mean(0)
    assert torch.allclose(relevance(bnn).inputs, expected.detach(), rtol=1e-10)


def test_geometric_prior_variance_and_squared_mean_closed_forms():
    bnn = _mlp({"name": "ard", "mode": "hierarchical", "group": "input"})
    loc, scale = bnn.autoguide.site_params("0.weight.alpha")
    rel = relevance(bnn, statistic="geometric-prior-variance")
    assert rel.methods == {"0.weight": "geometric-prior-variance", "2.weight": "geometric-prior-variance"}
    assert torch.allclose(rel.inputs, (-loc.double()).exp().detach(), rtol=1e-12)
    # exp(−E[log α]) ≤ E[1/α] (Jensen), with ratio exp(s²/2) exactly for a log-normal q
    ratio = relevance(bnn, statistic="prior-variance").inputs / rel.inputs
    assert torch.allclose(ratio, (0.5 * scale.double() ** 2).exp().detach(), rtol=1e-12)
    # Monte Carlo: the geometric mean of 1/α over 20,000 draws (s ≈ 0.1-0.4: 1 % tolerance)
    draws = bnn.autoguide.sample_latents(20000, generator=torch.Generator().manual_seed(1))["0.weight.alpha"]
    assert torch.allclose(rel.inputs, (-draws.double().log().mean(0)).exp(), rtol=0.01)
    w_loc, _ = bnn.autoguide.site_params("0.weight")
    sq = relevance(bnn, statistic="squared-mean")
    assert sq.method == "squared-mean"
    assert torch.allclose(sq.inputs, (w_loc.double() ** 2).mean(0).detach(), rtol=1e-12)
    # "second-moment" forced on a hierarchical site reads the weights, not α
    w_loc, w_scale = bnn.autoguide.site_params("0.weight")
    sm = relevance(bnn, statistic="second-moment")
    assert torch.allclose(sm.inputs, (w_loc.double() ** 2 + w_scale.double() ** 2).mean(0).detach(), rtol=1e-12)
    with pytest.raises(ValueError, match="statistic"):
        relevance(bnn, statistic="snr")


def test_alpha_statistics_fall_back_without_alpha():
    bnn = _mlp("gaussian")
    rel = relevance(bnn, statistic="geometric-prior-variance")
    assert rel.method == "second-moment"


def test_relevance_from_posterior_samples():
    bnn = pyrobnn.bayesian(nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1)),
                           prior={"*0.*": {"name": "ard", "mode": "hierarchical"}, "*": "gaussian"},
                           likelihood="bernoulli")
    alpha = torch.tensor([[1.0, 2.0, 4.0], [4.0, 2.0, 1.0]])  # two draws of the input precisions
    w2 = torch.tensor([[[1.0, -2.0]], [[3.0, 0.0]]])  # two draws of the second layer's weight
    rel = relevance(bnn, samples={"0.weight.alpha": alpha, "2.weight": w2}, statistic="prior-variance")
    assert torch.allclose(rel.inputs, torch.tensor([0.625, 0.5, 0.625], dtype=torch.float64))
    assert torch.allclose(rel.units["2.weight"], torch.tensor([5.0, 2.0], dtype=torch.float64))
    assert rel.methods == {"0.weight": "prior-variance", "2.weight": "second-moment"}
    with pytest.raises(ValueError, match="2.weight"):
        relevance(bnn, samples={"0.weight.alpha": alpha}, statistic="prior-variance")
    geo = relevance(bnn, samples={"0.weight.alpha": alpha, "2.weight": w2}, statistic="geometric-prior-variance")
    assert torch.allclose(geo.inputs, torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64))  # 1/√(α₁α₂)
    w0 = torch.tensor([[[1.0, 0.0, 2.0], [0.0, 0.0, 0.0]], [[3.0, 0.0, -2.0], [2.0, 0.0, 0.0]]])
    sq = relevance(bnn, samples={"0.weight.alpha": alpha, "0.weight": w0, "2.weight": w2}, statistic="squared-mean")
    assert torch.allclose(sq.inputs, torch.tensor([2.5, 0.0, 0.0], dtype=torch.float64))  # means [[2,0,0],[1,0,0]]
    assert torch.allclose(sq.units["2.weight"], torch.tensor([4.0, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="0.weight"):
        relevance(bnn, samples={"0.weight.alpha": alpha, "2.weight": w2}, statistic="squared-mean")


def test_conv_relevance_is_per_input_channel():
    net = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 4 * 4, 2))
    bnn = pyrobnn.bayesian(net, prior={"name": "ard", "mode": "hierarchical"}, likelihood="categorical")
    bnn.initialize(torch.randn(2, 3, 6, 6))
    rel = relevance(bnn)
    assert rel.input_site == "0.weight" and rel.inputs.shape == (3,)
    assert rel.units["3.weight"].shape == (80,)


def test_ranks_and_errors():
    rel = Relevance(inputs=torch.tensor([0.1, 3.0, 0.5, 2.0]), units={}, methods={"s": "prior-variance"},
                    input_site="s")
    assert rel.ranks().tolist() == [4, 1, 3, 2]
    with pytest.raises(TypeError, match="BNN"):
        relevance(nn.Linear(2, 1))
    bnn = pyrobnn.bayesian(nn.Sequential(nn.Linear(2, 1)), prior="ard", likelihood="bernoulli")
    with pytest.raises(ValueError, match="not initialised"):
        relevance(bnn)


def test_plot_relevance_writes_png(tmp_path):
    bnn = _mlp({"name": "ard", "mode": "hierarchical"})
    rel = relevance(bnn)
    path = plot_relevance(rel, tmp_path / "sub" / "rel.png", feature_names=["a", "b", "c"], highlight=[2])
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert not list((tmp_path / "sub").glob(".*tmp*"))  # atomic write left no temporary
    with pytest.raises(ValueError, match="feature_names"):
        plot_relevance(rel, tmp_path / "x.png", feature_names=["a"])


def test_noise_features_rank_last_on_independent_features():
    """Logistic data from 4 independent informative inputs + 6 pure-noise inputs: hierarchical ARD
    (one α per input) ranks every noise input below every informative one."""
    g = torch.Generator().manual_seed(0)
    n = 400
    x = torch.randn(n, 10, generator=g)
    logits = x[:, :4] @ torch.tensor([2.0, -1.5, 1.0, 0.7])
    y = (torch.rand(n, generator=g) < torch.sigmoid(logits)).long()
    bnn = pyrobnn.bayesian(nn.Sequential(nn.Linear(10, 1)), prior={"name": "ard", "mode": "hierarchical"},
                           guide={"name": "mean-field", "init_scale": 0.1}, likelihood="bernoulli", dataset_size=n)
    fit(bnn, (x, y), 300, lr=0.05, batch_size=n, progress=False, seed=0)
    rel = relevance(bnn)
    assert sorted(rel.ranks()[4:].tolist()) == [5, 6, 7, 8, 9, 10]
    assert rel.inputs[:4].min() > 3 * rel.inputs[4:].max()  # measured: 0.753 vs 0.161 (E[w²])
    rel = relevance(bnn, statistic="prior-variance")
    assert sorted(rel.ranks()[4:].tolist()) == [5, 6, 7, 8, 9, 10]
    assert rel.inputs[:4].min() > 2 * rel.inputs[4:].max()  # measured: 2.93 vs 0.87 (E[1/α])


def test_noise_columns_rank_last_on_diabetes():
    """Real data: sklearn diabetes (standardised, 80 % train split, random seed 0), its four inputs with the
    largest marginal |correlation| with the target that are not near-duplicates (bmi, s5, bp, s3) plus 10
    N(0, 1) columns (noise seed 1); linear model, Gaussian likelihood, hierarchical ARD Gamma(1, 1) per
    input. Every noise column ranks below every real input (the same run as
    ``examples/ard_overfitting.py relevance --dataset diabetes --features bmi,s5,bp,s3 --ard-a 1
    --ard-b 1 --epochs-bayes 800``, noise seed 1; over noise seeds 1-5 this held in 4/5 — in noise draw 5
    a noise column also beats bp and s3 by |t| in least squares, see docs/studies/ard_relevance.md)."""
    from sklearn.datasets import load_diabetes
    raw = load_diabetes()
    keep = [raw.feature_names.index(f) for f in ("bmi", "s5", "bp", "s3")]
    x, y = torch.tensor(raw.data[:, keep], dtype=torch.float32), torch.tensor(raw.target, dtype=torch.float32)
    train = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[: int(0.8 * len(x))]
    x, y = x[train], y[train]
    x, y = (x - x.mean(0)) / x.std(0), (y - y.mean()) / y.std()
    x = torch.cat([x, torch.randn(len(x), 10, generator=torch.Generator().manual_seed(1))], 1)
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(14, 1))
    bnn = pyrobnn.bayesian(net, prior={"name": "ard", "mode": "hierarchical", "a": 1.0, "b": 1.0},
                           guide={"name": "mean-field", "init_scale": 0.1}, likelihood="gaussian", dataset_size=len(x))
    fit(bnn, (x, y), 800, lr=0.01, batch_size=len(x), progress=False, seed=1)
    rel = relevance(bnn)
    assert rel.method == "second-moment"
    assert sorted(rel.ranks()[4:].tolist()) == list(range(5, 15))
    assert rel.inputs[:4].min() > 1.5 * rel.inputs[4:].max()  # measured: 0.0196 (s3) vs 0.0080 (noise 0)
    # the ranking agrees with least squares' |coefficient / standard error| on the real inputs
    design = torch.cat([torch.ones(len(x), 1), x], 1).double()
    beta = torch.linalg.lstsq(design, y.double()[:, None]).solution.squeeze(1)
    resid = y.double() - design @ beta
    se = (torch.linalg.inv(design.T @ design).diagonal() * (resid @ resid) / (len(x) - 15)).sqrt()
    t = (beta / se).abs()[1:]
    assert torch.argsort(rel.inputs, descending=True)[:4].tolist() == torch.argsort(t, descending=True)[:4].tolist()


def test_exact_posterior_second_moment_ranks_near_duplicates_above_noise():
    """Draws of the exact hierarchical-ARD posterior (Pyro's NUTS on the BNN's own model) fed to
    ``relevance(samples=...)``. Logistic data driven by a signal z, seen only through two near-duplicate
    inputs (z + 0.1·noise each), and one independent input; 4 pure-noise inputs. The data cannot say how
    the effect of z splits between the duplicates, so each duplicate's posterior variance is large, and
    E[w²] = E[w]² + Var(w) ranks both above every noise column, whose weight the data pin near 0."""
    import pyro
    from pyro.infer import MCMC, NUTS
    g = torch.Generator().manual_seed(0)
    n = 200
    z, x3 = torch.randn(n, generator=g), torch.randn(n, generator=g)
    dup = z[:, None] + 0.1 * torch.randn(n, 2, generator=g)
    x = torch.cat([dup, x3[:, None], torch.randn(n, 4, generator=g)], 1)
    y = (torch.rand(n, generator=g) < torch.sigmoid(1.5 * z + x3)).long()
    bnn = pyrobnn.bayesian(nn.Sequential(nn.Linear(7, 1)), prior={"name": "ard", "mode": "hierarchical", "a": 1.0, "b": 1.0},
                           likelihood="bernoulli", dataset_size=n, local_reparameterization=False)
    pyro.set_rng_seed(0)
    mcmc = MCMC(NUTS(bnn.model, jit_compile=True, ignore_jit_warnings=True), num_samples=200, warmup_steps=200,
                disable_progbar=True)
    mcmc.run(x, y)
    samples = mcmc.get_samples()
    rel = relevance(bnn, samples=samples)
    assert rel.method == "second-moment"
    assert sorted(rel.ranks()[3:].tolist()) == [4, 5, 6, 7]
    w = samples["0.weight"][:, 0, :].double()
    assert torch.allclose(rel.inputs, (w ** 2).mean(0))
    # the mechanism: the duplicates' posterior variance dwarfs the noise columns' (measured: 0.54, 0.58 vs ≤ 0.029)
    assert w.var(0)[:2].min() > 5 * w.var(0)[3:].max()
    # and their weights are anti-correlated: the data fix only their sum (measured: −0.95)
    assert torch.corrcoef(w[:, :2].T)[0, 1] < -0.8


def test_example_tally_agrees_with_the_relevance_run(tmp_path, capsys):
    """``relevance`` on a short SVI fit, then ``tally`` on its JSON: the draws counted in the bottom third and
    the real features counted below the best noise column agree with the run's own per-draw summaries."""
    import json
    ex = load_example("ard_overfitting")
    ex.main(["relevance", "--dataset", "diabetes", "--features", "bmi,s5,bp,s3,age,sex", "--n-noise", "3",
             "--noise-seeds", "1,2,3", "--epochs-bayes", "60", "--ard-a", "1", "--ard-b", "1", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("relevance_*.json")
    res = json.loads(path.read_text())
    capsys.readouterr()
    figure = tmp_path / "tally.png"
    ex.main(["tally", "--json", str(path), "--figure", str(figure)])
    out = capsys.readouterr().out
    summary = res["summary"]["second-moment"]
    # 9 inputs: the bottom third is rank ≥ 7
    assert "bottom third = rank >= 7" in out
    assert f"second-moment: all noise in the bottom third in {summary['seeds_all_noise_in_bottom_third']}/3 draws" in out
    listed = out.split("draws out of 3: ")[1].splitlines()[0]
    counted = sum(int(item.rsplit(" ", 1)[1]) for item in listed.split(", ")) if listed.strip() else 0
    assert counted == sum(summary["real_below_best_noise"])
    assert figure.stat().st_size > 10_000
    with pytest.raises(SystemExit, match="not in"):
        ex.main(["tally", "--json", str(path), "--statistic", "nonsense"])
    with pytest.raises(SystemExit, match="needs --json"):
        ex.main(["tally"])
    with pytest.raises(SystemExit, match="no file"):
        ex.main(["tally", "--json", str(tmp_path / "absent.json")])
    (tmp_path / "other.json").write_text(json.dumps({"runs": []}))
    with pytest.raises(SystemExit, match="not a relevance JSON"):
        ex.main(["tally", "--json", str(tmp_path / "other.json")])
