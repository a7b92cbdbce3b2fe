"""pyrobnn.sparsity: masks, report counts and FLOPs on hand-built cases, export equals the masked mean."""
import math

import pyro.poutine as poutine
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pyrobnn
from pyrobnn import sparsity
from pyrobnn.layers import BayesianModule


def _set_site(guide, name, **flat_values):
    """Write a site's chunk of each flat parameter (e.g. theta=..., log_sigma2=...)."""
    offset, n, shape = guide._layout[name][:3]
    with torch.no_grad():
        for pname, value in flat_values.items():
            getattr(guide.flat, pname)[offset:offset + n] = torch.as_tensor(value, dtype=torch.float32).reshape(-1)


def _mlp_bnn():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2))
    bnn = pyrobnn.bayesian(net, prior="log-uniform", guide="additive-noise", dataset_size=10)
    bnn.initialize(torch.rand(2, 3))
    g = bnn.autoguide
    # θ = 1 everywhere, so log α = log σ² exactly; the threshold is log α < 3 (3.0 itself is pruned)
    for s in bnn.site_priors:
        _set_site(g, s, theta=torch.ones(g._layout[s][1]))
    _set_site(g, "0.weight", log_sigma2=[[-5.0, 4.0, 2.9], [3.1, 0.0, 3.0]])
    _set_site(g, "0.bias", log_sigma2=[-1.0, 5.0])
    _set_site(g, "2.weight", log_sigma2=[[4.0, 4.0], [-2.0, 4.0]])
    _set_site(g, "2.bias", log_sigma2=[0.0, 0.0])
    return bnn


def test_masks_exact_on_hand_built_case():
    m = sparsity.masks(_mlp_bnn())
    assert set(m) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert torch.equal(m["0.weight"], torch.tensor([[True, False, True], [False, True, False]]))
    assert torch.equal(m["0.bias"], torch.tensor([True, False]))
    assert torch.equal(m["2.weight"], torch.tensor([[False, False], [True, False]]))
    assert torch.equal(m["2.bias"], torch.tensor([True, True]))
    m2 = sparsity.masks(_mlp_bnn(), threshold=4.5, sites="*.weight")
    assert set(m2) == {"0.weight", "2.weight"} and int(m2["0.weight"].sum()) == 6 and int(m2["2.weight"].sum()) == 4


def test_threshold_for_compression_reaches_the_budget_exactly_on_a_hand_built_case():
    bnn = _mlp_bnn()
    # the 10 weights' log α, sorted: −5, −2, 0, 2.9, 3, 3.1, 4, 4, 4, 4
    for budget, kept in [(1, 10), (2, 5), (2.5, 4), (3, 3), (10 / 3, 3), (5, 2), (10, 1), (11, 0)]:
        t = sparsity.threshold_for_compression(bnn, budget)
        rep = sparsity.report(bnn, threshold=t)
        assert rep["weights_kept"] == kept, (budget, t)
    # ties at the boundary are pruned together: a budget of ×10/7 would keep 7, but 4.0 is shared by four
    t = sparsity.threshold_for_compression(bnn, 10 / 7)
    assert t == 4.0 and sparsity.report(bnn, threshold=t)["weights_kept"] == 6
    # SNR (a mean-field guide): the same budget, the most clearly non-zero weights kept
    torch.manual_seed(1)
    mf = pyrobnn.bayesian(nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)), prior="gaussian",
                          guide="mean-field", dataset_size=10)
    mf.initialize(torch.rand(2, 5))
    with torch.no_grad():
        mf.autoguide.flat.rho.uniform_(-6.0, 0.0)
    t = sparsity.threshold_for_compression(mf, 4)
    rep = sparsity.report(mf, threshold=t)
    assert rep["weights_kept"] == (20 + 12) // 4
    ratios = torch.cat([sparsity.snr(mf, s).reshape(-1) for s in ("0.weight", "2.weight")])
    assert ratios.sort(descending=True).values[7] >= t > ratios.sort(descending=True).values[8]
    for bad in (0.5, float("inf"), float("nan"), True, "x"):
        with pytest.raises(ValueError, match="compression"):
            sparsity.threshold_for_compression(bnn, bad)


def test_report_counts_compression_and_flops_exact():
    rep = sparsity.report(_mlp_bnn())
    l0, l2 = rep.layers
    assert (l0["layer"], l0["weights"], l0["weights_kept"], l0["params"], l0["params_kept"]) == ("0", 6, 3, 8, 4)
    assert (l2["layer"], l2["weights"], l2["weights_kept"], l2["params"], l2["params_kept"]) == ("2", 4, 1, 6, 3)
    assert l0["sparsity"] == 0.5 and l2["sparsity"] == 0.75
    # FLOPs per example: 2 per weight multiply-accumulate + 1 per bias add
    assert (l0["flops"], l0["flops_kept"]) == (2 * 6 + 2, 2 * 3 + 1)
    assert (l2["flops"], l2["flops_kept"]) == (2 * 4 + 2, 2 * 1 + 2)
    t = rep.total
    assert (t["weights"], t["weights_kept"], t["params"], t["params_kept"]) == (10, 4, 14, 7)
    assert t["compression"] == 2.5 and t["sparsity"] == pytest.approx(0.6)
    assert (t["flops"], t["flops_kept"]) == (24, 11)
    assert "| total (×2.5) | 10 | 4 | 60.00 % | 7 / 14 | 11 / 24 |" in rep.table()
    # a site without a mask counts as dense
    m = sparsity.masks(_mlp_bnn(), sites="0.*")
    assert sparsity.report(_mlp_bnn(), mask=m).total["weights_kept"] == 3 + 4


def test_conv_flops_count_output_positions():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten())
    bnn = pyrobnn.bayesian(net, prior="log-uniform", guide="additive-noise", dataset_size=10)
    bnn.initialize(torch.rand(2, 2, 5, 5))  # output 3×3 = 9 positions per channel
    g = bnn.autoguide
    _set_site(g, "0.weight", theta=torch.ones(54), log_sigma2=torch.tensor([5.0] * 40 + [-5.0] * 14))
    _set_site(g, "0.bias", theta=torch.ones(3), log_sigma2=torch.tensor([5.0, -5.0, -5.0]))
    r = sparsity.report(bnn).layers[0]
    assert (r["weights"], r["weights_kept"], r["params_kept"]) == (54, 14, 16)
    assert (r["flops"], r["flops_kept"]) == (2 * 54 * 9 + 3 * 9, 2 * 14 * 9 + 2 * 9)


def test_masked_mean_forward_is_the_masked_network():
    bnn = _mlp_bnn()
    m = sparsity.masks(bnn)
    x = torch.randn(7, 3)
    mu = {s: bnn.autoguide.site_params(s)[0].detach() * m[s] for s in m}
    h = F.linear(x, mu["0.weight"], mu["0.bias"]).relu()
    expected = F.linear(h, mu["2.weight"], mu["2.bias"])
    assert torch.equal(sparsity.masked_mean_forward(bnn, x), expected)


def test_snr_density_and_log_alpha_criteria_agree_for_mean_field():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    bnn = pyrobnn.bayesian(net, prior="gaussian", guide="mean-field", dataset_size=10)
    bnn.initialize(torch.rand(2, 20))
    with torch.no_grad():
        bnn.autoguide.flat.rho.normal_(-2.0, 1.5)
    by_snr = sparsity.masks(bnn)  # auto → snr for a mean-field guide
    by_density = sparsity.masks(bnn, criterion="density")
    by_alpha = sparsity.masks(bnn, criterion="log-alpha")
    n_kept = sum(int(v.sum()) for v in by_snr.values())
    assert 0 < n_kept < sum(v.numel() for v in by_snr.values())
    for s in by_snr:
        loc, scale = bnn.autoguide.site_params(s)
        expected = (loc.abs() / scale) >= math.exp(-1.5)
        assert torch.equal(by_snr[s], expected)
        assert torch.equal(by_density[s], expected) and torch.equal(by_alpha[s], expected)


def test_fraction_prunes_exactly_the_lowest_snr():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    bnn = pyrobnn.bayesian(net, guide="mean-field", dataset_size=10)
    bnn.initialize(torch.rand(2, 20))
    m = sparsity.masks(bnn, fraction=0.8)
    total = sum(v.numel() for v in m.values())
    pruned = sum(int((~v).sum()) for v in m.values())
    assert pruned == round(0.8 * total)
    snrs = {s: sparsity.snr(bnn, s) for s in m}
    max_pruned = max(snrs[s][~m[s]].max() for s in m)
    min_kept = min(snrs[s][m[s]].min() for s in m if m[s].any())
    assert max_pruned <= min_kept
    with pytest.raises(ValueError, match="either threshold or fraction"):
        sparsity.masks(bnn, fraction=0.5, threshold=1.0)
    with pytest.raises(ValueError, match="fraction"):
        sparsity.masks(bnn, fraction=1.5)


def _lenet_like():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3), nn.ReLU(),
                        nn.Flatten(), nn.Linear(6 * 3 * 3, 20), nn.ReLU(), nn.Linear(20, 10))
    bnn = pyrobnn.bayesian(net, prior="log-uniform", guide="additive-noise", dataset_size=100)
    x = torch.rand(16, 1, 12, 12)
    bnn.initialize(x)
    with torch.no_grad():
        bnn.autoguide.flat.log_sigma2.normal_(-6.0, 4.0)
    g = bnn.autoguide
    # a whole filter of the second conv and a whole hidden unit of the first Linear pruned,
    # with their biases kept (their outputs are then constant)
    offset = g._layout["3.weight"][0]
    with torch.no_grad():
        g.flat.log_sigma2[offset:offset + 4 * 9] = 20.0
        off6 = g._layout["6.weight"][0]
        g.flat.log_sigma2[off6 + 5 * 54: off6 + 6 * 54] = 20.0
        ob = g._layout["3.bias"][0]
        g.flat.log_sigma2[ob] = -20.0
        g.flat.theta[ob] = 0.7
    return bnn, x


def test_export_dense_equals_masked_posterior_mean_exactly():
    bnn, x = _lenet_like()
    exported = sparsity.export(bnn, "dense")
    assert not any(isinstance(m, BayesianModule) for m in exported.modules())
    with poutine.trace() as tr:
        out = exported(x)
    assert not [n for n, s in tr.trace.nodes.items() if s["type"] == "sample"]  # plain torch, no Pyro sites
    assert torch.equal(out, sparsity.masked_mean_forward(bnn, x))
    assert isinstance(exported[0], nn.Conv2d) and isinstance(exported[6], nn.Linear)
    masks = sparsity.masks(bnn)
    assert int((exported[6].weight != 0).sum()) == int(masks["6.weight"].sum())


@pytest.mark.parametrize("mode", ["sparse", "shrink"])
def test_export_sparse_and_shrink_agree_to_rounding(mode):
    bnn, x = _lenet_like()
    exported = sparsity.export(bnn, mode)
    ref = sparsity.masked_mean_forward(bnn, x)
    out = exported(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert torch.equal(out.argmax(-1), ref.argmax(-1))
    m = sparsity.masks(bnn)
    if mode == "shrink":
        rows = m["6.weight"].any(1).sum().item()
        cols = m["6.weight"].any(0).sum().item()
        assert tuple(exported[6].weight.shape) == (rows, cols) and rows < 20
        assert exported[3].conv.weight.shape[0] == 5  # the pruned filter is gone
    else:
        assert exported[6].weight.is_sparse and exported[6].weight._nnz() == int(m["6.weight"].sum())


def test_export_other_bayesian_params_and_bad_mode():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3))
    bnn = pyrobnn.bayesian(net, prior="log-uniform", guide="additive-noise", dataset_size=10, params=["1.weight"])
    x = torch.randn(5, 4)
    bnn.initialize(x)
    with torch.no_grad():
        bnn.autoguide.flat.log_sigma2.normal_(-3.0, 4.0)
    exported = sparsity.export(bnn)
    assert isinstance(exported[1], nn.LayerNorm)
    assert torch.equal(exported(x), sparsity.masked_mean_forward(bnn, x))
    with pytest.raises(ValueError, match="export mode"):
        sparsity.export(bnn, "zip")


def test_needs_a_pyrobnn_gaussian_guide():
    net = nn.Sequential(nn.Linear(2, 2))
    bnn = pyrobnn.bayesian(net, prior="log-uniform", guide="additive-noise", dataset_size=10)
    with pytest.raises(RuntimeError, match="initialize"):
        sparsity.masks(bnn)
    bnn.initialize(torch.rand(2, 2))
    with pytest.raises(ValueError, match="criterion"):
        sparsity.masks(bnn, criterion="magnitude")
