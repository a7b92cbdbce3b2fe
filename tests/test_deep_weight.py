"""Deep weight prior: the bound against a closed form, shapes, gradients, frozen VAE, save/load, pipeline."""
import json
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn as nn
from pyro.infer import SVI, TraceMeanField_ELBO

import pyrobnn
from pyrobnn.priors.deep_weight.pipeline import augment_kernels, collect_kernels, fit_kernel_vae, init_from_prior, train_deep_weight_prior
from pyrobnn.priors import DeepWeightPrior, KernelVAE
from pyrobnn.priors.deep_weight import load_kernel_vaes, save_kernel_vaes


@pytest.fixture(autouse=True)
def _one_thread():
    # These tests run many tiny ops; on a shared, oversubscribed CPU two intra-op threads spin-wait
    # for each other (measured: 30× the CPU time of one thread on the VAE fit below).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_convnet():
    """conv 4@5×5 → conv 3@3×3 → linear, on [B, 1, 9, 9] inputs."""
    return nn.Sequential(nn.Conv2d(1, 4, 5), nn.ReLU(), nn.Conv2d(4, 3, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 3 * 3, 5))


def vaes(seed=0):
    torch.manual_seed(seed)
    return {"c5": KernelVAE(5, latent_dim=2, hidden=4), "c3": KernelVAE(3, latent_dim=2, hidden=4)}


# -- the bound ---------------------------------------------------------------------------------------------
def linear_gaussian_vae(seed=0):
    """KernelVAE with decoder p(w|z) = N(A z + b, diag σ²): then p̂(w) = N(b, A Aᵀ + diag σ²) exactly."""
    torch.manual_seed(seed)
    vae = KernelVAE(3, latent_dim=2, hidden=4, decoder="linear")
    with torch.no_grad():
        vae.dec_in.weight.normal_(0, 0.5)
        vae.dec_in.bias.normal_(0, 0.2)
        vae.dec_log_scale.uniform_(-1.5, -0.5)
    return vae


def exact_terms(vae, w):
    """log p̂(w), the exact expected bound E_r[log p(w|z)] − KL(r‖p(z)), and KL(r(z|w) ‖ p(z|w))."""
    A, b = vae.dec_in.weight.double(), vae.dec_in.bias.double()
    sig2 = (2 * torch.as_tensor(vae.decode(torch.zeros(2))[1])).exp().reshape(-1).double()  # soft-clamped σ²
    x = w.reshape(-1).double()
    cov = A @ A.T + torch.diag(sig2)
    log_marginal = torch.distributions.MultivariateNormal(b, cov).log_prob(x)
    mu, log_s = (t.double() for t in vae.encode(w))
    s2 = (2 * log_s).exp()
    # E_r log N(x; Az+b, D) = log N(x; Aμ+b, D) − ½ tr(D⁻¹ A diag(s²) Aᵀ)
    resid = x - (A @ mu + b)
    exp_loglik = (-0.5 * resid ** 2 / sig2 - 0.5 * sig2.log() - 0.5 * math.log(2 * math.pi)).sum() \
        - 0.5 * ((A ** 2 / sig2[:, None]) * s2[None, :]).sum()
    kl_prior = 0.5 * (mu ** 2 + s2 - 1 - s2.log()).sum()
    # exact posterior p(z|w) = N(m, S), S = (I + Aᵀ D⁻¹ A)⁻¹, m = S Aᵀ D⁻¹ (x − b)
    S = torch.linalg.inv(torch.eye(2, dtype=torch.double) + A.T @ (A / sig2[:, None]))
    m = S @ A.T @ ((x - b) / sig2)
    post = torch.distributions.MultivariateNormal(m, S)
    r = torch.distributions.MultivariateNormal(mu, torch.diag(s2))
    return log_marginal, exp_loglik - kl_prior, torch.distributions.kl_divergence(r, post)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bound_is_below_exact_log_density_of_linear_gaussian_vae(seed):
    vae = linear_gaussian_vae(seed)
    prior = DeepWeightPrior(vae)
    torch.manual_seed(100 + seed)
    for w in (prior.sample(), prior.sample() * 3, torch.zeros(3, 3)):
        log_marginal, exact_bound, kl_post = exact_terms(vae, w)
        # the identity log p̂(w) = bound + KL(r ‖ posterior) holds exactly
        assert torch.allclose(log_marginal - exact_bound, kl_post, atol=1e-8, rtol=1e-8)
        assert exact_bound <= log_marginal
        # the Monte-Carlo bound log_prob estimates is unbiased for the exact expected bound
        mc = DeepWeightPrior(vae, num_particles=20000).log_prob(w).double()
        assert abs(mc - exact_bound) < 0.02 * max(1.0, abs(exact_bound.item()))
        assert mc <= log_marginal + 0.02 * max(1.0, abs(log_marginal.item()))


def test_log_prob_sums_kernels_of_a_conv_weight():
    vae = linear_gaussian_vae(0)
    w = torch.randn(4, 2, 3, 3)
    site = DeepWeightPrior(vae).expand([4, 2]).to_event(2)
    torch.manual_seed(0)
    total = site.log_prob(w)
    torch.manual_seed(0)
    per_kernel = DeepWeightPrior(vae).log_prob(w)
    assert per_kernel.shape == (4, 2) and total.shape == ()
    assert torch.allclose(total, per_kernel.sum())


# -- shapes -----------------------------------------------------------------------------------------------
def test_samples_have_kernel_shapes():
    prior = DeepWeightPrior(vaes())
    assert prior.kernel_sizes() == [3, 5]
    assert prior.for_kernel(5).expand([4, 1]).sample().shape == (4, 1, 5, 5)
    assert prior.for_kernel(3).expand([3, 4]).sample((7,)).shape == (7, 3, 4, 3, 3)
    single = DeepWeightPrior(vaes()["c5"])
    assert single.event_shape == (5, 5) and single.sample().shape == (5, 5)
    # through pyro.sample: the site issued for a conv weight and a conv bias
    with pyro.poutine.trace() as tr:
        w = prior.sample_site("conv.weight", torch.Size([6, 2, 5, 5]))
        b = prior.sample_site("conv.bias", torch.Size([6]))
    assert w.shape == (6, 2, 5, 5) and b.shape == (6,)
    assert tr.trace.nodes["conv.weight"]["fn"].event_shape == (6, 2, 5, 5)
    # samples are not all alike (they come from the decoder, not one fixed kernel)
    s = single.expand([200]).sample()
    assert s.std(0).min() > 0


def test_kernel_size_and_site_checks_are_clear():
    only5 = DeepWeightPrior({"c5": vaes()["c5"]})
    with pytest.raises(ValueError, match=r"has 3×3 kernels.*models 5×5 kernels"):
        only5.site_distribution("conv2.weight", torch.Size([3, 4, 3, 3]))
    with pytest.raises(ValueError, match="not a convolution kernel"):
        only5.site_distribution("fc.weight", torch.Size([5, 27]))
    with pytest.raises(ValueError, match="square"):
        only5.site_distribution("conv.weight", torch.Size([3, 4, 5, 3]))
    with pytest.raises(ValueError, match="models 5×5 kernels"):
        only5.log_prob(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="no VAE named"):
        DeepWeightPrior(vaes(), key="nope")
    with pytest.raises(ValueError, match="needs a VAE"):
        pyrobnn.registry.PRIORS.build("deep-weight")
    with pytest.raises(TypeError):
        DeepWeightPrior(3.0)
    two5 = DeepWeightPrior({"a": KernelVAE(5, 2, 4), "b": KernelVAE(5, 2, 4)})
    with pytest.raises(ValueError, match="choose one with key="):
        two5.for_kernel(5)
    assert DeepWeightPrior({"a": KernelVAE(5, 2, 4), "b": KernelVAE(5, 2, 4)}, key="b").event_shape == (5, 5)


# -- inside a BNN ---------------------------------------------------------------------------------------------
def make_bnn(prior):
    torch.manual_seed(0)
    return pyrobnn.bayesian(small_convnet(), prior={"0*": prior, "2*": prior, "*": "gaussian"}, dataset_size=50)


def test_gradients_reach_guide_parameters_and_vae_stays_frozen():
    prior = DeepWeightPrior(vaes())
    bnn = make_bnn(prior)
    x, y = torch.rand(8, 1, 9, 9), torch.randint(0, 5, (8,))
    bnn.initialize(x)
    layout = bnn.autoguide._layout
    # every layer is locally reparameterised: the DWP sites' term is the bound at a fresh draw from q
    assert [layout[s][5] for s in ("0.weight", "0.bias", "2.weight", "2.bias", "5.weight")] == [True] * 5
    vae_before = {k: v.clone() for k, v in prior.vaes["c5"].state_dict().items()}
    loss = TraceMeanField_ELBO().differentiable_loss(bnn.model, bnn.guide, x, y)
    loss.backward()
    loc_grad = bnn.autoguide.flat.loc.grad
    rho_grad = bnn.autoguide.flat.rho.grad
    for site in ("0.weight", "2.weight"):
        off, n = layout[site][:2]
        assert loc_grad[off:off + n].abs().sum() > 0 and rho_grad[off:off + n].abs().sum() > 0
    # the VAE is not a parameter of anything being trained
    vae_params = {id(p) for v in prior.vaes.values() for p in v.parameters()}
    assert not vae_params & {id(p) for p in bnn.parameters()}
    assert not vae_params & {id(p) for p in pyro.get_param_store().values()}
    assert all(p.grad is None and not p.requires_grad for v in prior.vaes.values() for p in v.parameters())
    opt = torch.optim.Adam(bnn.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        TraceMeanField_ELBO().differentiable_loss(bnn.model, bnn.guide, x, y).backward()
        opt.step()
    assert all(torch.equal(vae_before[k], v) for k, v in prior.vaes["c5"].state_dict().items())


def test_without_placeholders_the_conv_weights_and_biases_are_drawn():
    bnn = make_bnn(DeepWeightPrior(vaes(), placeholders=False))
    bnn.initialize(torch.rand(8, 1, 9, 9))
    layout = bnn.autoguide._layout
    assert [layout[s][5] for s in ("0.weight", "0.bias", "2.weight", "2.bias", "5.weight")] == \
        [False, False, False, False, True]
    assert DeepWeightPrior(vaes(), placeholders=False).expand([2, 1]).placeholder_expectation is False


def test_placeholder_density_is_an_unbiased_estimate_of_the_expected_bound():
    """At a local-reparameterisation placeholder of q the DWP returns the bound at one draw w ~ q: its mean
    over calls is E_q[bound(w)] (checked against explicit draws), and it is differentiable in q's (μ, σ)."""
    from pyrobnn.guides import GuideNormal
    torch.manual_seed(0)
    prior = DeepWeightPrior(linear_gaussian_vae(1)).expand([2, 1]).to_event(2)
    loc = (torch.randn(2, 1, 3, 3) * 0.3).requires_grad_()
    scale = torch.full((2, 1, 3, 3), 0.1, requires_grad=True)
    q = GuideNormal(loc, scale, placeholder=True)
    value = q.rsample()
    est = torch.stack([prior.log_prob(value) for _ in range(4000)]).mean()
    ref = torch.stack([prior.log_prob(torch.normal(loc.detach(), scale.detach())) for _ in range(4000)]).mean()
    assert est.item() == pytest.approx(ref.item(), abs=0.05 * abs(ref.item()) + 0.05)
    g_loc, g_scale = torch.autograd.grad(prior.log_prob(value), (loc, scale))
    assert g_loc.abs().sum() > 0 and g_scale.abs().sum() > 0


def test_dwp_site_term_of_the_elbo_is_bound_minus_log_q():
    """At a DWP site TraceMeanField_ELBO adds log p̂(w) − log q(w) with the guide's own draw of w."""
    vae = linear_gaussian_vae(1)
    prior = DeepWeightPrior(vae)
    guide_loc, guide_scale = torch.randn(2, 1, 3, 3) * 0.3, torch.full((2, 1, 3, 3), 0.1)

    def model():
        pyro.sample("w", prior.expand([2, 1]).to_event(2))

    def guide():
        pyro.sample("w", dist.Normal(guide_loc, guide_scale).to_event(4))

    torch.manual_seed(3)
    loss = TraceMeanField_ELBO().differentiable_loss(model, guide)
    torch.manual_seed(3)
    w = dist.Normal(guide_loc, guide_scale).to_event(4).rsample()
    expected = -(prior.expand([2, 1]).to_event(2).log_prob(w) - dist.Normal(guide_loc, guide_scale).to_event(4).log_prob(w))
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-5)


def test_pyro_syntax_svi_moves_weights_towards_high_prior_density():
    """Pyro syntax: a DWP site + MeanField guide + SVI, no likelihood: the bound of the guide mean rises."""
    vae = linear_gaussian_vae(2)
    prior = DeepWeightPrior(vae)

    def model():
        pyro.sample("w", prior.expand([8, 1]).to_event(2))

    pyro.set_rng_seed(0)
    guide = pyrobnn.guides.MeanField(model, init_loc_fn=lambda site: torch.full((8, 1, 3, 3), 2.0))
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), TraceMeanField_ELBO())
    svi.step()
    start = DeepWeightPrior(vae, num_particles=200).log_prob(guide.median()["w"]).sum()
    for _ in range(150):
        svi.step()
    end = DeepWeightPrior(vae, num_particles=200).log_prob(guide.median()["w"]).sum()
    assert end > start + 10


# -- persistence ----------------------------------------------------------------------------------------------
def test_save_load_gives_the_same_log_prob(tmp_path):
    v = vaes(3)
    path = tmp_path / "dwp.safetensors"
    save_kernel_vaes(path, v, {"source": "test"})
    loaded = DeepWeightPrior(path)
    by_name = pyrobnn.registry.PRIORS.build({"name": "deep-weight", "path": str(path)})
    original = DeepWeightPrior(v)
    assert loaded.provenance == {"source": "test"}
    w = torch.randn(6, 4, 5, 5) * 0.2
    results = []
    for p in (original, loaded, by_name):
        torch.manual_seed(7)
        results.append(p.log_prob(w))
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
    assert loaded.config()["path"] == str(path.resolve())


def test_bnn_with_dwp_saves_and_loads(tmp_path):
    path = tmp_path / "dwp.safetensors"
    save_kernel_vaes(path, vaes(4))
    spec = {"name": "deep-weight", "path": str(path)}
    torch.manual_seed(0)
    bnn = pyrobnn.bayesian(small_convnet(), prior={"0.weight": spec, "2.weight": spec, "*": "gaussian"},
                           dataset_size=20)
    x = torch.rand(5, 1, 9, 9)
    bnn.initialize(x)
    pyrobnn.save(bnn, tmp_path / "bnn.safetensors")
    again = pyrobnn.load(tmp_path / "bnn.safetensors", net=small_convnet())
    assert isinstance(again.site_priors["0.weight"], DeepWeightPrior)
    assert torch.equal(again.autoguide.flat.loc, bnn.autoguide.flat.loc)
    w = torch.randn(4, 1, 5, 5) * 0.1
    torch.manual_seed(1)
    a = bnn.site_priors["0.weight"].log_prob(w)
    torch.manual_seed(1)
    b = again.site_priors["0.weight"].log_prob(w)
    assert torch.equal(a, b)


def test_load_rejects_foreign_files(tmp_path):
    from pyrobnn.io import write_state
    write_state(tmp_path / "x.safetensors", {"a": torch.zeros(1)}, {"kind": "bnn"})
    with pytest.raises(ValueError, match="not a deep weight prior"):
        load_kernel_vaes(tmp_path / "x.safetensors")
    with pytest.raises(FileNotFoundError):
        DeepWeightPrior(tmp_path / "missing.safetensors")


# -- the pipeline -----------------------------------------------------------------------------------------------
def test_collect_kernels_drops_near_zero_kernels():
    nets = [small_convnet(), small_convnet()]
    with torch.no_grad():
        nets[0][0].weight[1, 0].zero_()
        nets[1][2].weight[2, 3].mul_(1e-4)
    kernels, counts = collect_kernels(nets, min_norm_fraction=0.05)
    assert counts["0"] == {"total": 8, "kept": 7, "kernel_size": 5}
    assert counts["2"] == {"total": 24, "kept": 23, "kernel_size": 3}
    assert kernels["0"].shape == (7, 5, 5) and kernels["2"].shape == (23, 3, 3)


def test_augment_kernels_gives_the_dihedral_and_sign_images():
    torch.manual_seed(0)
    w = torch.randn(3, 5, 5)
    assert torch.equal(augment_kernels(w, "none"), w)
    s = augment_kernels(w, "sign")
    assert s.shape == (6, 5, 5) and torch.equal(s[3:], -w)
    d = augment_kernels(w, "dihedral+sign")
    assert d.shape == (48, 5, 5) and torch.equal(d[:3], w)
    # every image is a rotation/transpose of an original, up to sign, and all 16 images are distinct
    k = w[0]
    group = [torch.rot90(k, r) for r in range(4)] + [torch.rot90(k, r).T for r in range(4)]
    group += [-g for g in group]
    images = d[0::3]
    assert len(images) == 16 and all(any(torch.equal(i, g) for g in group) for i in images)
    assert len({tuple(i.flatten().tolist()) for i in images}) == 16
    # norms are preserved
    assert torch.allclose(d.flatten(1).norm(dim=1), w.flatten(1).norm(dim=1).repeat(16))
    with pytest.raises(ValueError, match="augment must be one of"):
        augment_kernels(w, "flip")
    with pytest.raises(ValueError, match="kernels must be"):
        augment_kernels(torch.randn(3, 4, 5), "sign")


def test_fit_kernel_vae_augments_only_the_training_kernels():
    torch.manual_seed(0)
    w = torch.randn(40, 3, 3) * 0.1
    _, rec = fit_kernel_vae(w, latent_dim=2, hidden=4, epochs=1, min_steps=2, holdout=0.25, augment="dihedral")
    assert rec["kernels_heldout"] == 10 and rec["kernels_train"] == 30 * 8 and rec["augment"] == "dihedral"


def test_fit_kernel_vae_learns_a_kernel_distribution():
    torch.manual_seed(0)
    # kernels on a 1-d manifold: scaled copies of one pattern plus small noise
    pattern = torch.randn(3, 3)
    kernels = torch.randn(600, 1, 1) * pattern + 0.01 * torch.randn(600, 3, 3)
    vae, rec = fit_kernel_vae(kernels, latent_dim=2, hidden=8, epochs=1, min_steps=300, batch_size=128, seed=0)
    untrained = KernelVAE(3, 2, 8)
    with torch.no_grad():
        before = untrained.elbo(kernels).mean().item()
    assert rec["bound_heldout"] > before + 20
    assert rec["kernels_heldout"] == 60 and rec["kernels_train"] == 540


def tiny_source(n=96, seed=0):
    """Random 'images' with labels: enough for the pipeline's mechanics (not for useful kernels)."""
    from pyrobnn.data import Dataset
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return Dataset(x, y, x[:32], y[:32], {"name": "tiny"})


SMALL_FCONV = {"name": "fconv", "channels": [12, 8]}


def test_train_deep_weight_prior_end_to_end_and_cli(tmp_path, monkeypatch):
    out = tmp_path / "p.safetensors"
    prior = train_deep_weight_prior(out, source=tiny_source(), num_nets=2, epochs=1, arch=SMALL_FCONV,
                                    latent_dim={"conv1": 2, "conv2": 3}, hidden=4, vae_epochs=1, vae_min_steps=5,
                                    weight_decay=1e-3, log=None)
    assert sorted(prior.vaes) == ["conv1", "conv2"] and prior.kernel_sizes() == [5, 7]
    assert prior.vaes["conv2"].latent_dim == 3
    prov = prior.provenance
    assert prov["source"] == "tiny" and prov["num_nets"] == 2 and prov["source_train_size"] == 96
    assert prov["weight_decay"] == 1e-3 and prov["epochs"] == 1
    assert prov["kernels"]["conv1"]["total"] == 2 * 12 and prov["kernels"]["conv2"]["total"] == 2 * 8 * 12
    assert len(prov["source_nets"]) == 2 and 0 <= prov["source_nets"][0]["test_accuracy"] <= 1
    # the CLI runs the same pipeline (dataset lookup replaced by the tiny set)
    import pyrobnn.priors.deep_weight.pipeline as dwp_module
    monkeypatch.setattr(dwp_module, "_load_source", lambda name, limit: tiny_source(limit or 96))
    from pyrobnn.cli import main
    out2 = tmp_path / "q.safetensors"
    rc = main(["dwp", "train", "--source", "fashion-mnist", "--k", "1", "--epochs", "1", "--limit-train", "64",
               "--arch", json.dumps(SMALL_FCONV), "--latent", "2", "--hidden", "4", "--vae-epochs", "1",
               "--vae-min-steps", "3", "--quiet", "--out", str(out2)])
    assert rc == 0
    loaded = DeepWeightPrior(out2)
    assert loaded.kernel_sizes() == [5, 7] and loaded.provenance["source_train_size"] == 64
    assert not any(v.normalized for v in loaded.vaes.values()) and loaded.provenance["normalize"] is False
    out3 = tmp_path / "s.safetensors"
    rc = main(["dwp", "train", "--source", "fashion-mnist", "--k", "1", "--epochs", "1", "--limit-train", "64",
               "--arch", json.dumps(SMALL_FCONV), "--latent", "2", "--hidden", "4", "--vae-epochs", "1",
               "--vae-min-steps", "3", "--normalize", "--quiet", "--out", str(out3)])
    assert rc == 0
    shape = DeepWeightPrior(out3)
    assert all(v.normalized and v.source_norm is not None for v in shape.vaes.values())
    assert shape.provenance["normalize"] is True
    monkeypatch.undo()
    assert main(["dwp", "train", "--source", "nope", "--out", str(tmp_path / "r.safetensors")]) == 2
    assert not (tmp_path / "r.safetensors").exists()


def test_init_from_prior_sets_kernels_of_net_and_bnn():
    prior = DeepWeightPrior(vaes(5))
    net = small_convnet()
    fc_before = net[5].weight.clone()
    torch.manual_seed(11)
    names = init_from_prior(net, prior)
    assert names == ["0.weight", "2.weight"]
    torch.manual_seed(11)
    expected = prior.for_kernel(5).expand([4, 1]).sample()
    assert torch.equal(net[0].weight, expected)
    assert torch.equal(net[5].weight, fc_before)
    # a BNN before its guide exists: the guide's means start at the samples
    bnn = pyrobnn.bayesian(small_convnet(), prior="gaussian", dataset_size=10)
    torch.manual_seed(12)
    init_from_prior(bnn, prior, layers="2")
    torch.manual_seed(12)
    expected = prior.for_kernel(3).expand([3, 4]).sample()
    bnn.initialize(torch.rand(2, 1, 9, 9))
    assert torch.equal(bnn.autoguide.site_params("2.weight")[0], expected)
    # and after: the means are overwritten
    torch.manual_seed(13)
    init_from_prior(bnn, prior, layers=["0"])
    torch.manual_seed(13)
    assert torch.equal(bnn.autoguide.site_params("0.weight")[0], prior.for_kernel(5).expand([4, 1]).sample())
    with pytest.raises(ValueError, match="has no VAE"):
        init_from_prior(small_convnet(), DeepWeightPrior({"c5": KernelVAE(5, 2, 4)}), layers="2")


def test_init_from_prior_mean_only_gives_decoder_means():
    """``mean_only=True`` (the paper's w = μ_θ(z)) vs the default full draw w ~ p(w|z). With a linear
    decoder μ_θ(z) = A z + b, mean-only kernels lie in the 2-d affine span exactly; full draws (decoder
    σ ≈ e^{-2} per pixel) leave a residual of about σ per pixel."""
    torch.manual_seed(3)
    vae = KernelVAE(3, latent_dim=2, hidden=4, decoder="linear")
    prior = DeepWeightPrior(vae)
    A, b = vae.dec_in.weight.detach(), vae.dec_in.bias.detach()          # [9, 2], [9]

    def span_residual(w):                                                 # w [out, in, 3, 3]
        d = w.reshape(-1, 9) - b
        z = torch.linalg.lstsq(A, d.T).solution                           # [2, M]
        return (d - (A @ z).T).pow(2).mean().sqrt().item()

    net = torch.nn.Sequential(torch.nn.Conv2d(4, 6, 3))
    init_from_prior(net, prior, generator_seed=0, mean_only=True)
    assert span_residual(net[0].weight.detach()) < 1e-5
    init_from_prior(net, prior, generator_seed=0)
    noisy = span_residual(net[0].weight.detach())
    # 24 kernels × 7 residual dims of N(0, e^{-4}): RMS within ±25 % of e^{-2} = 0.135
    assert 0.75 * math.exp(-2) < noisy < 1.25 * math.exp(-2)


def test_dwp_term_and_data_term_are_scaled_like_the_elbo():
    """In a BNN with dataset_size N and a batch of B, the likelihood is scaled by N/B while the DWP
    sites (model and guide) carry only the KL weight: −KL(q‖p̂) enters once, not once per datum."""
    from pyro import poutine
    bnn = make_bnn(DeepWeightPrior(vaes()))
    x, y = torch.rand(8, 1, 9, 9), torch.randint(0, 5, (8,))
    bnn.initialize(x)
    bnn.kl_weight = 0.25
    guide_trace = poutine.trace(bnn.guide).get_trace(x, y)
    model_trace = poutine.trace(poutine.replay(bnn.model, trace=guide_trace)).get_trace(x, y)
    scales = {n: s["scale"] for n, s in model_trace.nodes.items() if s["type"] == "sample"}
    assert scales["obs"] == pytest.approx(50 / 8)
    for site in ("0.weight", "2.weight"):
        assert isinstance(model_trace.nodes[site]["fn"].base_dist, DeepWeightPrior)
        assert scales[site] == 0.25 and guide_trace.nodes[site]["scale"] == 0.25


# -- the shape prior: a VAE over w/‖w‖ times N(0, scale²I) ------------------------------------------------
def shape_vae(seed=0):
    torch.manual_seed(seed)
    return KernelVAE(5, latent_dim=2, hidden=4, normalized=True, source_norm={"log_mean": math.log(0.3), "log_sd": 0.2})


def test_shape_prior_is_the_bound_at_the_unit_kernel_plus_a_gaussian():
    vae = shape_vae()
    w = torch.randn(6, 5, 5) * 0.3
    for scale in (1.0, 0.5):
        prior = DeepWeightPrior(vae, scale=scale).expand([6])
        torch.manual_seed(3)
        got = prior.log_prob(w)
        torch.manual_seed(3)
        unit = w / w.flatten(1).norm(dim=1)[:, None, None]
        want = vae.elbo(unit) + torch.distributions.Normal(0.0, scale).log_prob(w).sum((-2, -1))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # an unnormalised VAE ignores scale: the bound at w itself
    raw = KernelVAE(5, latent_dim=2, hidden=4)
    torch.manual_seed(3)
    a = DeepWeightPrior(raw, scale=0.5).log_prob(w)
    torch.manual_seed(3)
    torch.testing.assert_close(a, raw.elbo(w))


def test_shape_part_cannot_shrink_a_kernel():
    """The VAE term depends on w/‖w‖ only: its gradient is orthogonal to w (no pull towards 0); the only
    radial force is the Gaussian's −w/scale²."""
    vae = shape_vae(1)
    prior = DeepWeightPrior(vae, scale=2.0).expand([8])
    w = (torch.randn(8, 5, 5) * 0.3).requires_grad_()
    torch.manual_seed(0)
    lp = prior.log_prob(w).sum() + w.square().sum() / (2 * 2.0 ** 2)  # remove the Gaussian part
    (g,) = torch.autograd.grad(lp, w)
    radial = (g * w).sum((-2, -1)) / (g.flatten(1).norm(dim=1) * w.detach().flatten(1).norm(dim=1))
    assert radial.abs().max() < 1e-4, radial
    assert g.abs().max() > 1e-2  # the shape term does push (tangentially)


def test_normalised_fit_records_norms_and_samples_have_the_right_norms(tmp_path):
    torch.manual_seed(0)
    pattern = torch.randn(5, 5)
    pattern /= pattern.norm()
    norms = torch.exp(math.log(0.3) + 0.25 * torch.randn(400))
    kernels = (pattern + 0.05 * torch.randn(400, 5, 5)) * norms[:, None, None]
    vae, rec = fit_kernel_vae(kernels, latent_dim=2, hidden=4, epochs=1, min_steps=150, normalize=True)
    assert vae.normalized and rec["normalize"] is True
    unit_norms = (kernels / kernels.flatten(1).norm(dim=1)[:, None, None]).flatten(1).norm(dim=1)
    assert torch.allclose(unit_norms, torch.ones(400))
    assert abs(vae.source_norm["log_mean"] - kernels.flatten(1).norm(dim=1).log().mean().item()) < 1e-5
    assert abs(vae.source_norm["log_sd"] - 0.25) < 0.05
    # VAE draws are unit kernels; the prior's draws have the Gaussian's radial law: E‖w‖² = scale²·25
    assert torch.allclose(vae.sample((50,)).flatten(1).norm(dim=1), torch.ones(50), atol=1e-5)
    prior = DeepWeightPrior(vae, scale=0.5)
    torch.manual_seed(1)
    draws = prior.expand([4000]).sample()
    assert draws.shape == (4000, 5, 5)
    assert abs(draws.square().sum((-2, -1)).mean().item() / (0.25 * 25) - 1) < 0.05
    # save → load keeps the flag, the norm law and the density
    path = tmp_path / "shape.safetensors"
    save_kernel_vaes(path, {"conv2": vae}, {"normalize": True})
    loaded = DeepWeightPrior(path, scale=0.5)
    assert loaded.vae.normalized and loaded.vae.source_norm == vae.source_norm
    assert loaded.config()["scale"] == 0.5
    w = torch.randn(3, 5, 5) * 0.3
    torch.manual_seed(5)
    a = prior.expand([3]).log_prob(w)
    torch.manual_seed(5)
    assert torch.equal(a, loaded.expand([3]).log_prob(w))
    # initial kernels: shapes from the VAE, norms from the recorded source law (not the Gaussian's ≈ scale·5)
    net = nn.Sequential(nn.Conv2d(20, 30, 5))
    init_from_prior(net, loaded, generator_seed=0)
    log_norms = net[0].weight.detach().flatten(2).norm(dim=-1).log()
    assert abs(log_norms.mean().item() - vae.source_norm["log_mean"]) < 0.05
    assert abs(log_norms.std().item() - vae.source_norm["log_sd"]) < 0.05


def test_shape_prior_bad_input_is_clear():
    with pytest.raises(ValueError, match="scale"):
        DeepWeightPrior(shape_vae(), scale=0.0)
    with pytest.raises(ValueError, match="source_norm"):
        KernelVAE(5, normalized=True, source_norm={"log_mean": 0.0})
    with pytest.raises(ValueError, match="non-zero norm"):
        fit_kernel_vae(torch.zeros(40, 3, 3), latent_dim=2, hidden=4, epochs=1, min_steps=1, normalize=True)


def test_bnn_with_the_shape_prior_trains_saves_and_loads(tmp_path):
    """The shape form through bayesian(): gradients reach the guide, a few SVI steps lower the loss, and a
    saved BNN reloads with the prior's scale and the same density (the normalised VAE's flag and norm law
    travel in the prior file)."""
    torch.manual_seed(0)
    c5 = KernelVAE(5, latent_dim=2, hidden=4, normalized=True, source_norm={"log_mean": -1.0, "log_sd": 0.3})
    c3 = KernelVAE(3, latent_dim=2, hidden=4, normalized=True, source_norm={"log_mean": -1.0, "log_sd": 0.3})
    path = tmp_path / "shape.safetensors"
    save_kernel_vaes(path, {"c5": c5, "c3": c3})
    spec = {"name": "deep-weight", "path": str(path), "scale": 0.5}
    torch.manual_seed(0)
    bnn = pyrobnn.bayesian(small_convnet(), prior={"0.weight": spec, "2.weight": spec, "*": "gaussian"},
                           dataset_size=40)
    x, y = torch.rand(40, 1, 9, 9), torch.randint(0, 5, (40,))
    bnn.initialize(x)
    first, last = _loss_before_and_after_svi(bnn, x, y, grads=("loc",))
    assert last < first
    pyrobnn.save(bnn, tmp_path / "bnn.safetensors")
    again = pyrobnn.load(tmp_path / "bnn.safetensors", net=small_convnet())
    p0, p1 = bnn.site_priors["2.weight"], again.site_priors["2.weight"]
    assert p1.scale == 0.5 and all(v.normalized for v in p1.vaes.values())
    w = torch.randn(3, 4, 3, 3) * 0.2
    torch.manual_seed(2)
    a = p0.site_distribution("2.weight", w.shape).log_prob(w)
    torch.manual_seed(2)
    assert torch.equal(a, p1.site_distribution("2.weight", w.shape).log_prob(w))


@pytest.mark.parametrize("normalized", [False, True])
def test_dwp_with_the_additive_noise_guide(normalized):
    """Both forms of the prior under the additive-noise (sparse VD) guide: the conv layer is locally
    reparameterised, gradients reach θ and log σ², and SVI lowers the loss."""
    torch.manual_seed(0)
    vae = KernelVAE(5, latent_dim=2, hidden=4, normalized=normalized,
                    source_norm={"log_mean": -1.0, "log_sd": 0.3} if normalized else None)
    net = nn.Sequential(nn.Conv2d(1, 4, 5), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 5))
    bnn = pyrobnn.bayesian(net, prior={"0.weight": DeepWeightPrior(vae), "*": "log-uniform"},
                           guide="additive-noise", dataset_size=40)
    x, y = torch.rand(40, 1, 9, 9), torch.randint(0, 5, (40,))
    bnn.initialize(x)
    assert bnn.autoguide._layout["0.weight"][5] is True
    first, last = _loss_before_and_after_svi(bnn, x, y, grads=("theta", "log_sigma2"))
    assert last < first


def _loss_before_and_after_svi(bnn, x, y, grads, steps=60):
    """The 4-particle ELBO loss before and after ``steps`` Adam steps (same noise seed for both), checking
    on the way that the first loss's gradient reaches the guide's ``grads`` parameters at conv site 0."""
    elbo = TraceMeanField_ELBO(num_particles=4)
    torch.manual_seed(1)
    first = elbo.differentiable_loss(bnn.model, bnn.guide, x, y)
    first.backward()
    off, n = bnn.autoguide._layout["0.weight"][:2]
    for name in grads:
        assert getattr(bnn.autoguide.flat, name).grad[off:off + n].abs().sum() > 0, name
    opt = torch.optim.Adam(bnn.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        elbo.differentiable_loss(bnn.model, bnn.guide, x, y).backward()
        opt.step()
    torch.manual_seed(1)
    return first.item(), elbo.differentiable_loss(bnn.model, bnn.guide, x, y).item()
