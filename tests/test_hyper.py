"""HyperMeanField (λ-hypernetwork guide) and the complexity-control helpers."""
import math

import pyro
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from pyro.infer import Predictive, TraceMeanField_ELBO

import pyrobnn
from pyrobnn.guides import HyperMeanField, MeanField
from pyrobnn import sparsity
from pyrobnn.inference.complexity import (complexity_loss, complexity_weight, fit_complexity, prune,
                                          pruning_curve, removable_fraction, sample_lams, with_guide)

KINDS = ["linear", "lowrank", "piecewise"]


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def _data(n=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _hyper_bnn(kind, lam_range=(0.0, 1.0), **kw):
    bnn = pyrobnn.bayesian(_net(), prior=pyrobnn.priors.Gaussian(scale=0.1 ** 0.5),
                           guide=lambda m, **k: HyperMeanField(m, lam_range=lam_range, kind=kind, **kw, **k),
                           dataset_size=200)
    x, _ = _data()
    bnn.initialize(x)
    return bnn


def _randomise(guide, seed=3):
    """Non-trivial values for every hyper-parameter (so the λ-dependence is visible)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in guide.hyper_params().values():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def _site_vectors(mf):
    """Per-site (loc, rho) of an ordinary MeanField, read back through its public site_params."""
    out = {}
    for s in mf.site_names():
        loc, scale = mf.site_params(s)
        out[s] = (loc, scale)
    return out


# -- G(λ): the formulas -------------------------------------------------------------------------------------
@pytest.mark.parametrize("lam", [0.0, 0.37, 1.0])
def test_at_equals_linear_formula(lam):
    bnn = _hyper_bnn("linear")
    g = bnn.autoguide
    _randomise(g)
    mf = g.at(lam)
    assert type(mf) is MeanField
    p = g.hyper_params()
    for s, (loc, scale) in _site_vectors(mf).items():
        sl = slice(g._layout[s][0], g._layout[s][0] + g._layout[s][1])
        want_loc = lam * p["loc_slope"][sl] + p["loc_bias"][sl]
        want_rho = lam * p["rho_slope"][sl] + p["rho_bias"][sl]
        torch.testing.assert_close(loc.reshape(-1), want_loc, rtol=0, atol=1e-7)
        torch.testing.assert_close(scale.reshape(-1), F.softplus(want_rho), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("lam", [0.0, 0.6, 1.0])
def test_at_equals_lowrank_formula(lam):
    bnn = _hyper_bnn("lowrank", rank=2)
    g = bnn.autoguide
    _randomise(g)
    p = g.hyper_params()
    mf = g.at(lam)
    matrices = 0
    for i, (s, (loc, scale)) in enumerate(_site_vectors(mf).items()):
        offset, n, shape = g._layout[s][:3]
        got = {"loc": loc, "rho": torch.log(torch.expm1(scale))}
        for kind in ("loc", "rho"):
            base = p[f"{kind}_base"][offset:offset + n].view(shape)
            if len(shape) == 2:
                # (U₁ F)(U₂ F)ᵀ + B₁ with F = diag(aλ + c), written as a sum of rank-one terms
                f = lam * p[f"{kind}_a_{i}"] + p[f"{kind}_c_{i}"]
                u1, u2 = p[f"{kind}_u1_{i}"], p[f"{kind}_u2_{i}"]
                assert u1.shape == (shape[0], 2) and u2.shape == (shape[1], 2)
                want = base + sum(f[k] ** 2 * torch.outer(u1[:, k], u2[:, k]) for k in range(2))
            else:
                want = base + lam * p[f"{kind}_slope_{i}"]
            torch.testing.assert_close(got[kind], want, rtol=1e-5, atol=1e-5)
        matrices += len(shape) == 2
    assert matrices == 2


def test_at_equals_piecewise_formula():
    bnn = _hyper_bnn("piecewise", knots=[0.0, 0.2, 0.5, 1.0])
    g = bnn.autoguide
    _randomise(g)
    P = {k: g.hyper_params()[f"{k}_knots"] for k in ("loc", "rho")}
    assert P["loc"].shape == (4, sum(g._sizes))
    for lam, j, t in [(0.0, 0, 0.0), (0.2, 1, 0.0), (0.35, 1, 0.5), (0.9, 2, 0.8), (1.0, 2, 1.0)]:
        loc, rho = g.flat_at(lam)
        torch.testing.assert_close(loc, (1 - t) * P["loc"][j] + t * P["loc"][j + 1], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(rho, (1 - t) * P["rho"][j] + t * P["rho"][j + 1], rtol=1e-6, atol=1e-6)
        mf = g.at(lam)
        torch.testing.assert_close(mf.flat.loc.detach(), loc.detach())
        torch.testing.assert_close(mf.flat.rho.detach(), rho.detach())


def test_initial_guide_is_the_same_for_every_lambda_and_matches_mean_field():
    for kind in KINDS:
        g = _hyper_bnn(kind, init_scale=0.02).autoguide
        loc0, rho0 = g.flat_at(0.0)
        loc1, rho1 = g.flat_at(1.0)
        assert torch.equal(loc0, loc1) and torch.equal(rho0, rho1)
        torch.testing.assert_close(F.softplus(rho1), torch.full_like(rho1, 0.02), rtol=0, atol=1e-7)
        mf = pyrobnn.bayesian(_net(), prior=pyrobnn.priors.Gaussian(scale=0.1 ** 0.5),
                              guide={"name": "mean-field", "init_scale": 0.02}, dataset_size=200).autoguide
        mf(_data()[0])
        torch.testing.assert_close(loc0, mf.flat.loc.detach(), rtol=0, atol=0)


def test_lambda_channel_and_validation():
    g = _hyper_bnn("linear", lam_range=(0.1, 2.0)).autoguide
    assert g.lam == 2.0                      # default_lam = hi
    with g.conditioned(0.5):
        assert g.lam == 0.5
    assert g.lam == 2.0
    with pytest.raises(ValueError, match="outside"):
        g.lam = 0.05
    with pytest.raises(ValueError, match="outside"):
        g.at(2.5)
    with pytest.raises(ValueError, match="kind"):
        HyperMeanField(lambda: None, kind="cubic")
    with pytest.raises(ValueError, match="lo < hi"):
        HyperMeanField(lambda: None, lam_range=(1.0, 1.0))
    with pytest.raises(ValueError, match="knots"):
        HyperMeanField(lambda: None, kind="piecewise", knots=[0.0, 0.7, 0.5, 1.0])


# -- the ELBO and its gradient ----------------------------------------------------------------------------
def test_kl_weight_gives_the_generalised_elbo():
    """With the same noise, −L_λ = NLL-term + λ·KL exactly: loss(λ) = loss(0) + λ (loss(1) − loss(0))."""
    bnn = _hyper_bnn("linear")
    _randomise(bnn.autoguide)
    x, y = _data()
    elbo = TraceMeanField_ELBO()

    def loss(lam_kl, lam_guide=0.4):
        pyro.set_rng_seed(7)
        bnn.kl_weight = lam_kl
        with bnn.autoguide.conditioned(lam_guide):
            return elbo.differentiable_loss(bnn.model, bnn.guide, x, y).item()

    l0, l1, l03 = loss(0.0), loss(1.0), loss(0.3)
    assert l1 - l0 > 1.0   # a real KL term
    assert l03 == pytest.approx(l0 + 0.3 * (l1 - l0), rel=1e-5)
    bnn.kl_weight = 1.0
    with complexity_weight(bnn, 0.4):
        assert bnn.kl_weight == 0.4 and bnn.autoguide.lam == 0.4
    assert bnn.kl_weight == 1.0 and bnn.autoguide.lam == 1.0


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_equals_mean_field_gradient_through_chain_rule(kind):
    """At fixed λ and fixed noise, ∂(−L_λ)/∂θ of the hypernetwork = (∂G/∂θ)ᵀ ∂(−L_λ)/∂(μ, ρ) of the
    ordinary MeanField with (μ, ρ) = G(λ)."""
    lam = 0.3
    bnn = _hyper_bnn(kind, knots=[0.0, 0.25, 0.5, 1.0]) if kind == "piecewise" else _hyper_bnn(kind)
    g = bnn.autoguide
    _randomise(g)
    x, y = _data()
    elbo = TraceMeanField_ELBO()

    pyro.set_rng_seed(11)
    with complexity_weight(bnn, lam):
        loss_h = elbo.differentiable_loss(bnn.model, bnn.guide, x, y)
    theta = list(g.hyper_params().values())
    grads_h = torch.autograd.grad(loss_h, theta)

    mf = g.at(lam)
    view = with_guide(bnn, mf)
    pyro.set_rng_seed(11)
    with complexity_weight(view, lam):
        loss_m = elbo.differentiable_loss(view.model, view.guide, x, y)
    g_loc, g_rho = torch.autograd.grad(loss_m, [mf.flat.loc, mf.flat.rho])

    assert loss_h.item() == pytest.approx(loss_m.item(), rel=1e-6)
    loc, rho = g.flat_at(lam)
    chain = torch.autograd.grad((loc, rho), theta, grad_outputs=(g_loc, g_rho), allow_unused=True)
    for name, a, b in zip(g.hyper_params(), grads_h, chain):
        b = torch.zeros_like(a) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(a.abs().max()) + 1e-6, msg=name)
    assert sum(float(a.abs().sum()) for a in grads_h) > 0


@pytest.mark.parametrize("kind", KINDS)
def test_training_decreases_expected_loss_over_lambda(kind):
    from pyrobnn.data import load_digits
    d = load_digits()
    x, y = d.x_train[:300], d.y_train[:300]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    bnn = pyrobnn.bayesian(net, prior=pyrobnn.priors.Gaussian(scale=0.1 ** 0.5),
                           guide=lambda m, **k: HyperMeanField(m, kind=kind, **k), dataset_size=len(x))
    bnn.initialize(x)
    grid = [0.0, 0.25, 0.5, 0.75, 1.0]

    def losses():   # −L_λ per datum on the whole training set, same noise before and after
        pyro.set_rng_seed(5)
        with torch.no_grad():
            return torch.tensor([complexity_loss(bnn, x, y, [lam]).item() / len(x) for lam in grid])

    before = losses()
    hist = fit_complexity(bnn, (x, y), epochs=3, lr=3e-2, lams_per_batch=2, stratified=True, batch_size=100,
                          seed=0, progress=False)
    after = losses()
    assert len(hist) == 3 and hist[-1]["loss"] < hist[0]["loss"]
    # measured: the mean over the grid falls to 0.80 (linear), 0.69 (lowrank), 0.89 (piecewise) of its start
    assert torch.all(after < before), (before, after)
    assert after.mean() < 0.92 * before.mean(), (before, after)


def test_fit_complexity_rejects_ordinary_guide():
    bnn = pyrobnn.bayesian(_net(), dataset_size=40)
    with pytest.raises(TypeError, match="HyperMeanField"):
        fit_complexity(bnn, _data(), epochs=1)


# -- λ sampling -----------------------------------------------------------------------------------------
def test_sample_lams():
    gen = torch.Generator().manual_seed(0)
    u = torch.tensor(sample_lams((0.2, 0.6), 20000, generator=gen))
    assert u.min() >= 0.2 and u.max() <= 0.6
    assert abs(u.mean().item() - 0.4) < 0.005          # SE of the mean ≈ 0.4/√12/√20000 = 0.0008
    s = sample_lams((0.0, 1.0), 5, stratified=True, generator=gen)
    assert [int(v * 5) for v in s] == [0, 1, 2, 3, 4]   # one draw per fifth of Λ
    lu = torch.tensor(sample_lams((1e-3, 1.0), 20000, "log-uniform", generator=gen))
    assert abs(lu.log().mean().item() - 0.5 * math.log(1e-3)) < 0.05   # log λ ~ U(log lo, log hi)
    with pytest.raises(ValueError, match="lo > 0"):
        sample_lams((0.0, 1.0), 3, "log-uniform")
    with pytest.raises(ValueError, match="distribution"):
        sample_lams((0.0, 1.0), 3, "normal")


# -- reading off and pruning ---------------------------------------------------------------------------
def test_at_guide_works_with_predictive_and_bnn():
    bnn = _hyper_bnn("linear")
    g = bnn.autoguide
    _randomise(g)
    x, _ = _data(8)
    mf = g.at(0.25)
    pred = Predictive(bnn.model, guide=mf, num_samples=3, return_sites=["0.weight", "_RETURN"])(x)
    assert pred["_RETURN"].shape == (3, 8, 3)
    # the hypernetwork read at λ and the fixed guide give the same predictive draws
    pyro.set_rng_seed(2)
    with g.conditioned(0.25):
        a = bnn.sample_outputs(x, 4)
    pyro.set_rng_seed(2)
    b = with_guide(bnn, mf).sample_outputs(x, 4)
    torch.testing.assert_close(a, b)
    assert bnn.autoguide is g   # the view did not replace bnn's guide


def test_registered_by_name():
    bnn = pyrobnn.bayesian(_net(), guide={"name": "hyper-mean-field", "lam_range": [0.0, 2.0], "kind": "piecewise",
                                          "num_knots": 3}, dataset_size=40)
    bnn.initialize(_data()[0])
    assert isinstance(bnn.autoguide, HyperMeanField) and bnn.autoguide.knots == [0.0, 1.0, 2.0]
    assert bnn.spec()["guide"]["kind"] == "piecewise"


def test_prune_by_snr_and_curve():
    bnn = _hyper_bnn("linear")
    _randomise(bnn.autoguide)
    mf = bnn.autoguide.at(0.5)
    view = with_guide(bnn, mf)
    snr = {s: sparsity.snr(view, s) for s in mf.site_names()}
    total = sum(v.numel() for v in snr.values())          # 6·5 + 5 + 5·3 + 3 = 53
    assert total == 53
    masks = sparsity.masks(view, criterion="snr", fraction=0.4)
    removed = torch.cat([(~masks[s]).reshape(-1) for s in snr])
    all_snr = torch.cat([v.reshape(-1) for v in snr.values()])
    assert int(removed.sum()) == round(0.4 * 53)
    assert all_snr[removed].max() <= all_snr[~removed].min()      # the lowest-SNR weights go first
    pruned = prune(mf, masks)
    for s, m in masks.items():
        loc, scale = pruned.site_params(s)
        loc0, scale0 = mf.site_params(s)
        assert torch.all(loc[~m] == 0) and torch.all(scale[~m] < 1e-40)
        torch.testing.assert_close(loc[m], loc0[m])
        torch.testing.assert_close(scale[m], scale0[m], rtol=1e-5, atol=1e-7)
    # everything removed: the network is the zero function (up to the layers' 1e-8 LRT jitter)
    x, y = _data(10)
    outs = with_guide(bnn, prune(mf, sparsity.masks(view, fraction=1.0))).sample_outputs(x, 3)
    assert outs.abs().max() < 1e-6
    curve = pruning_curve(bnn, mf, x, y, [0.0, 0.5, 1.0], num_samples=4, seed=4)
    assert [r["removed"] for r in curve] == [0, round(0.5 * 53), 53] and curve[0]["total"] == 53
    pyro.set_rng_seed(4)
    assert curve[0]["accuracy"] == view.evaluate(x, y, 4)["accuracy"]
    mean_pred = sparsity.masked_mean_forward(view, x, sparsity.masks(view, fraction=0.5)).argmax(-1)
    assert curve[1]["mean_accuracy"] == pytest.approx((mean_pred == y).float().mean().item())


def test_removable_fraction():
    curve = [{"fraction": 0.0, "accuracy": 0.90}, {"fraction": 0.5, "accuracy": 0.895},
             {"fraction": 0.8, "accuracy": 0.85}, {"fraction": 0.9, "accuracy": 0.899}]
    assert removable_fraction(curve, 0.01) == 0.5     # stops at the first fraction that loses too much
    assert removable_fraction(curve, 0.06) == 0.9
    with pytest.raises(ValueError, match="fraction 0"):
        removable_fraction(curve[1:])


def test_at_guide_gives_arviz_inference_data():
    from pyrobnn.diagnostics import to_inference_data
    bnn = _hyper_bnn("piecewise")
    _randomise(bnn.autoguide)
    x, y = _data(12)
    mf = bnn.autoguide.at(0.6)
    idata = to_inference_data(with_guide(bnn, mf), data=(x, y), num_samples=10, max_coords=4)
    assert idata.posterior["0.bias"].shape == (1, 10, 4)          # 5 biases stored as 4 random coordinates
    assert idata.log_likelihood["obs"].shape == (1, 10, 12)
    # the draws are those of q at λ = 0.6 (same generator seed → the same draws)
    want = mf.sample_latents(10, generator=torch.Generator().manual_seed(0))["2.bias"]
    torch.testing.assert_close(torch.as_tensor(idata.posterior["2.bias"].values[0]), want)
    with bnn.autoguide.conditioned(0.6):
        also = bnn.autoguide.sample_latents(10, generator=torch.Generator().manual_seed(0))["2.bias"]
    torch.testing.assert_close(also, want)


def test_save_and_load_roundtrip(tmp_path):
    bnn = _hyper_bnn("lowrank", rank=2)
    _randomise(bnn.autoguide)
    pyrobnn.save(bnn, tmp_path / "hyper.safetensors")
    loaded = pyrobnn.load(tmp_path / "hyper.safetensors", net=_net())
    assert isinstance(loaded.autoguide, HyperMeanField) and loaded.autoguide.kind == "lowrank"
    for lam in (0.0, 0.45, 1.0):
        for a, b in zip(bnn.autoguide.flat_at(lam), loaded.autoguide.flat_at(lam)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
