"""SGLD / pSGLD kernels, step-size schedules and the sample() API (inference/sgld.py, inference/sampling.py)."""
import math
import warnings

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
import torch.nn.functional as F
from pyro.infer import MCMC
from pyro.nn import PyroModule, PyroSample
from pyro.poutine.plate_messenger import block_plate

import pyrobnn
from pyrobnn.diagnostics import function_space_diagnostics
from pyrobnn.inference import (PSGLD, SGLD, ConstantStepSize, CyclicalStepSize, PolynomialDecay, SamplePosterior,
                               sample)
from pyrobnn.inference.sgld import as_schedule, init_to_network_default


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="num_chains=")  # sequential chains on a 2-core machine
        yield


# ----------------------------------------------------------------------------------------------------
# schedules
# ----------------------------------------------------------------------------------------------------
def test_constant_and_polynomial_schedules_give_their_formulas():
    assert ConstantStepSize(0.3)(0) == 0.3 == ConstantStepSize(0.3)(10_000)
    s = PolynomialDecay(a=0.5, b=10.0, gamma=0.55)
    for t in (0, 1, 99, 12345):
        assert s(t) == pytest.approx(0.5 * (10.0 + t) ** -0.55, rel=1e-12)
    assert as_schedule(1e-3)(7) == 1e-3
    assert as_schedule(lambda t: 1.0 / (t + 1))(3) == 0.25


def test_cyclical_schedule_follows_zhang_et_al():
    s = CyclicalStepSize(0.2, num_steps=100, num_cycles=4)   # cycle length ceil(100/4) = 25
    assert s(0) == pytest.approx(0.2)
    assert s(25) == pytest.approx(0.2) and s(50) == pytest.approx(0.2)          # restarts
    for t in (3, 12, 24, 37):
        r = (t % 25) / 25
        assert s(t) == pytest.approx(0.1 * (math.cos(math.pi * r) + 1), rel=1e-12)
    assert s(12) > s(13) > s(24)                                                   # decays within a cycle
    e = CyclicalStepSize(0.2, num_steps=100, num_cycles=4, exploration=0.4)      # first 10 of 25 explore
    assert [e.is_exploring(t) for t in (0, 9, 10, 24, 25, 35)] == [True, True, False, False, True, False]


@pytest.mark.parametrize("bad", [dict(step_size=0.0, num_steps=10), dict(step_size=1.0, num_steps=3, num_cycles=4),
                                 dict(step_size=1.0, num_steps=10, exploration=1.0)])
def test_cyclical_schedule_rejects_bad_arguments(bad):
    with pytest.raises(ValueError):
        CyclicalStepSize(**bad)


def test_schedule_and_kernel_arguments_are_validated():
    with pytest.raises(ValueError):
        PolynomialDecay(a=-1.0)
    with pytest.raises(TypeError):
        as_schedule("fast")
    with pytest.raises(ValueError):
        SGLD(lambda: None, thin=0)
    with pytest.raises(ValueError):
        PSGLD(lambda: None, alpha=1.0)
    with pytest.raises(TypeError):
        SGLD("not a model")


# ----------------------------------------------------------------------------------------------------
# exact update rules
# ----------------------------------------------------------------------------------------------------
X1 = torch.tensor([[1.0, 2.0], [0.5, -1.0], [2.0, 0.0], [-1.0, 1.0]])
Y1 = torch.tensor([1.0, 0.0, 2.0, -0.5])


def _tiny_model(x, y):
    w = pyro.sample("w", dist.Normal(0.0, 2.0).expand([2]).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.Normal(x @ w, 0.5), obs=y)


def _grad_U(w):
    """∇U for _tiny_model in closed form: w/4 + Xᵀ(Xw − y)/0.25."""
    return w / 4.0 + X1.T @ (X1 @ w - Y1) / 0.25


def test_sgld_step_is_exactly_the_welling_teh_update():
    k = SGLD(_tiny_model, step_size=0.01)
    k.setup(0, X1, Y1)
    w0 = torch.tensor([0.3, -0.2])
    torch.manual_seed(5)
    new = k.sample({"w": w0})["w"]
    torch.manual_seed(5)
    expected = w0 - 0.005 * _grad_U(w0) + math.sqrt(0.01) * torch.randn(2)
    assert torch.allclose(new, expected, atol=1e-6)
    assert k.diagnostics()["divergences"] == []


def test_sgld_potential_is_minus_log_joint():
    k = SGLD(_tiny_model)
    k.setup(0, X1, Y1)
    w = torch.tensor([0.7, 0.1])
    potential, (grad,) = k.potential_and_grad({"w": w}, X1, Y1)
    log_joint = dist.Normal(0.0, 2.0).log_prob(w).sum() + dist.Normal(X1 @ w, 0.5).log_prob(Y1).sum()
    assert potential.item() == pytest.approx(-log_joint.item(), rel=1e-6)
    assert torch.allclose(grad, _grad_U(w), atol=1e-5)


def test_bnn_potential_with_fused_gaussian_prior_is_exact():
    """BNN weight sites with a Gaussian prior take the fused ‖z‖² path; value and gradient must equal
    −log p(θ) − (N/M)·Σ log p(y|x,θ) computed directly (prior N(0.2, 0.5²), kl_weight 0.5 scales it)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    bnn = pyrobnn.bayesian(net, prior={"name": "gaussian", "scale": 0.5, "loc": 0.2}, dataset_size=50)
    bnn.kl_weight = 0.5
    x, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    k = SGLD(bnn.model)
    k.setup(0, x, y)
    params = {n: torch.randn_like(v) for n, v in k.initial_params.items()}
    potential, grads = k.potential_and_grad(params, x, y)
    leaves = {n: v.clone().requires_grad_() for n, v in params.items()}
    out = F.linear(torch.tanh(F.linear(x, leaves["0.weight"], leaves["0.bias"])), leaves["2.weight"], leaves["2.bias"])
    log_lik = -F.cross_entropy(out, y, reduction="sum") * 5.0                     # N/M = 50/10
    log_prior = sum(dist.Normal(0.2, 0.5).log_prob(v).sum() for v in leaves.values())
    expected = -(log_lik + 0.5 * log_prior)
    assert potential.item() == pytest.approx(expected.item(), rel=1e-5)
    for (name, _), g in zip(k._sites, grads):
        (g_ref,) = torch.autograd.grad(expected, leaves[name], retain_graph=True)
        assert torch.allclose(g, g_ref, rtol=1e-4, atol=1e-5), name


def test_psgld_step_is_the_preconditioned_update():
    k = PSGLD(_tiny_model, step_size=0.01, alpha=0.9, eps=1e-3)
    k.setup(0, X1, Y1)
    w0, w1 = torch.tensor([0.3, -0.2]), None
    torch.manual_seed(1)
    w1 = k.sample({"w": w0})["w"]
    w2 = k.sample({"w": w1})["w"]
    torch.manual_seed(1)
    g0 = _grad_U(w0)
    v = g0 * g0                                               # V starts at the first squared gradient
    p = 1.0 / (1e-3 + v.sqrt())
    e1 = w0 - 0.005 * p * g0 + torch.randn(2) * (0.01 * p).sqrt()
    g1 = _grad_U(e1)
    v = 0.9 * v + 0.1 * g1 * g1
    p = 1.0 / (1e-3 + v.sqrt())
    e2 = e1 - 0.005 * p * g1 + torch.randn(2) * (0.01 * p).sqrt()
    assert torch.allclose(w1, e1, atol=1e-6) and torch.allclose(w2, e2, atol=1e-5)


def test_zero_temperature_and_exploration_take_noise_free_steps():
    w0 = torch.tensor([0.3, -0.2])
    k = SGLD(_tiny_model, step_size=0.01, temperature=0.0)
    k.setup(0, X1, Y1)
    assert torch.allclose(k.sample({"w": w0})["w"], w0 - 0.005 * _grad_U(w0), atol=1e-6)
    k = SGLD(_tiny_model, step_size=CyclicalStepSize(0.01, num_steps=10, num_cycles=1, exploration=0.5))
    k.setup(0, X1, Y1)
    assert torch.allclose(k.sample({"w": w0})["w"], w0 - 0.005 * _grad_U(w0), atol=1e-6)


def test_thin_and_warmup_count_updates_and_draws():
    mcmc = MCMC(SGLD(_tiny_model, step_size=1e-3, thin=4), num_samples=5, warmup_steps=3, disable_progbar=True)
    mcmc.run(X1, Y1)
    assert mcmc.kernel._t == 3 + 5 * 4
    assert mcmc.get_samples()["w"].shape == (5, 2)
    diag = mcmc.diagnostics()
    assert len(diag["step_size"]["chain 0"]) == 5 and len(diag["potential_energy"]["chain 0"]) == 5


# ----------------------------------------------------------------------------------------------------
# constrained sites and divergences
# ----------------------------------------------------------------------------------------------------
def test_positive_site_uses_log_jacobian_and_matches_conjugate_gamma_posterior():
    # y_n ~ N(0, 1/τ), τ ~ Gamma(a, b): posterior Gamma(a + N/2, b + Σy²/2), mean ≈ 7.77, sd ≈ 0.86
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    y = torch.randn(160) * 0.35
    a, b = 2.0, 1.0
    a_post, b_post = a + 80, b + 0.5 * (y * y).sum().item()

    def model(y):
        tau = pyro.sample("tau", dist.Gamma(a, b))
        with pyro.plate("data", 160, subsample_size=80) as idx:
            pyro.sample("obs", dist.Normal(0.0, tau.rsqrt()), obs=y[idx])

    kernel = SGLD(model, step_size=2e-3, thin=5)          # curvature in log τ ≈ 82: η·λ ≈ 0.16
    mcmc = MCMC(kernel, num_samples=1500, warmup_steps=300, disable_progbar=True,
                initial_params={"tau": torch.tensor(math.log(a_post / b_post))})
    mcmc.run(y)
    tau = mcmc.get_samples()["tau"]
    assert "tau" in kernel.transforms                               # log transform, undone by MCMC
    assert (tau > 0).all()
    mean, sd = a_post / b_post, math.sqrt(a_post) / b_post
    # minibatch noise (ηV/4 ≈ 0.04) and discretisation (ηλ/4 ≈ 0.04) inflate the sd by ≈ 4 %;
    # Monte-Carlo error ≈ 0.06 sd on the mean and ≈ 4 % on the sd (ESS ≈ 300)
    assert abs(tau.mean().item() - mean) < 0.3 * sd
    assert 0.9 < tau.std().item() / sd < 1.2


def test_sgld_updates_its_own_state_in_place_and_never_the_callers():
    """The update is in place on kernel-owned copies: the caller's tensors (initial_params included) stay
    as they were, a returned state is reused by the next step it is given, and the update equals the
    Welling–Teh formula from the state the caller saw."""
    k = SGLD(_tiny_model, step_size=0.01)
    k.setup(0, X1, Y1)
    w0 = torch.tensor([0.3, -0.2])
    start = {"w": w0}
    torch.manual_seed(5)
    first = k.step(start, X1, Y1)
    assert torch.equal(w0, torch.tensor([0.3, -0.2])) and first["w"] is not w0
    w1 = first["w"].clone()
    torch.manual_seed(6)
    second = k.step(first, X1, Y1)
    assert second["w"] is first["w"]                                   # updated where it was
    torch.manual_seed(6)
    expected = w1 - 0.005 * _grad_U(w1) + math.sqrt(0.01) * torch.randn(2)
    assert torch.allclose(second["w"], expected, atol=1e-6)
    # under pyro.infer.MCMC the user's initial_params are never written
    init = {"w": torch.tensor([0.1, 0.1])}
    MCMC(SGLD(_tiny_model, step_size=0.01), num_samples=5, warmup_steps=2, initial_params=init,
         disable_progbar=True).run(X1, Y1)
    assert torch.equal(init["w"], torch.tensor([0.1, 0.1]))


def test_divergent_state_is_undone_to_the_previous_state():
    """A state with an infinite potential is left: the kernel subtracts the increment that led there and
    returns the previous state (to rounding)."""

    def model():
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
        pyro.factor("wall", torch.where(w[0] > 0.5, torch.tensor(-math.inf), torch.tensor(0.0)))

    k = SGLD(model, step_size=0.5)
    k.setup(0)
    state = k.step({"w": torch.tensor([0.45, 0.0, 0.0])})
    before = {"w": torch.tensor([0.45, 0.0, 0.0])}
    for _ in range(200):                       # walk until an update lands in the zero-density region
        before = {"w": state["w"].clone()}
        state = k.step(state)
        if state["w"][0] > 0.5:
            break
    assert state["w"][0] > 0.5
    back = k.step(state)
    assert k._diverged and not math.isfinite(k._last_potential)
    assert torch.allclose(back["w"], before["w"], atol=1e-6)


def test_divergent_steps_are_rejected_and_reported_for_arviz():
    import arviz as az

    def model():
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        pyro.factor("wall", torch.where(w > 0.5, torch.tensor(-math.inf), torch.tensor(0.0)))

    pyro.set_rng_seed(3)
    mcmc = MCMC(SGLD(model, step_size=0.5), num_samples=200, warmup_steps=10, disable_progbar=True,
                initial_params={"w": torch.tensor(0.0)})
    mcmc.run()
    w = mcmc.get_samples()["w"]
    div = mcmc.diagnostics()["divergences"]["chain 0"]
    assert len(div) > 5
    # exactly the kept draws in the zero-density region are flagged; the chain always came back
    assert sorted(div) == torch.nonzero(w > 0.5).flatten().tolist()
    idata = pyrobnn.to_inference_data(mcmc, log_likelihood=False)
    assert int(idata.sample_stats["diverging"].sum()) == len(div)
    if hasattr(az, "from_pyro"):   # ArviZ 0.x reads the kernel's divergences the same way (1.x has no from_pyro)
        assert int(az.from_pyro(mcmc, log_likelihood=False).sample_stats["diverging"].sum()) == len(div)


def test_discrete_sites_and_local_latents_in_subsampled_plates_are_refused():
    def discrete():
        pyro.sample("k", dist.Bernoulli(0.5))

    with pytest.raises(ValueError, match="continuous"):
        SGLD(discrete).setup(0)

    def local(x):
        with pyro.plate("data", 10, subsample_size=5):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="local latent"):
        SGLD(local).setup(0, torch.zeros(10))


# ----------------------------------------------------------------------------------------------------
# conjugate Bayesian linear regression, exact posterior, 4 chains
# ----------------------------------------------------------------------------------------------------
N, D, M, SIGMA = 200, 3, 100, 0.5


def _regression():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + SIGMA * torch.randn(N, generator=g)
    precision = torch.eye(D) + x.T @ x / SIGMA ** 2            # prior N(0, I)
    cov = torch.linalg.inv(precision)
    return x, y, cov @ x.T @ y / SIGMA ** 2, cov


def _linear_model(x, y):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([D]).to_event(1))
    with pyro.plate("data", N, subsample_size=M) as idx:
        pyro.sample("obs", dist.Normal(x[idx] @ w, SIGMA), obs=y[idx])


@pytest.mark.parametrize("kernel_cls,step", [(SGLD, 1.1e-4), (PSGLD, 4.4e-3)])
def test_conjugate_linear_regression_matches_exact_posterior(kernel_cls, step):
    """Posterior precision eigenvalues ≈ 710–910 (sd ≈ 0.035); η·λ_max ≈ 0.1 for SGLD (pSGLD's
    preconditioner P ≈ 1/40 gives about the same effective step), so discretisation and minibatch
    noise inflate the variance by ≈5 % (sd by ≈2.5 %). Chains start over-dispersed (±3 sd) around the
    mean; one draw per 13 updates (the autocorrelation time is ≈ 2/(η·λ_min) ≈ 26 updates).
    Tolerances: |mean error| < 0.3 sd and sd within ±15 % — about 4 and 3 Monte-Carlo standard errors
    at the 150–250 effective draws such a run gives."""
    x, y, mean, cov = _regression()
    sd = cov.diag().sqrt()
    pyro.set_rng_seed(1)
    init = {"w": mean + 3 * sd * torch.randn(4, D, generator=torch.Generator().manual_seed(2))}
    mcmc = MCMC(kernel_cls(_linear_model, step_size=step, thin=13), num_samples=250, warmup_steps=200,
                num_chains=4, initial_params=init, disable_progbar=True)
    mcmc.run(x, y)
    w = mcmc.get_samples(group_by_chain=True)["w"]                 # [4, 250, 3]
    flat = w.reshape(-1, D)
    assert ((flat.mean(0) - mean).abs() / sd).max() < 0.3
    ratio = flat.std(0) / sd
    assert ((ratio > 0.85) & (ratio < 1.15)).all(), ratio
    # function space: predictions at held-out inputs, 4 chains
    x_test = torch.randn(10, D, generator=torch.Generator().manual_seed(9))
    diag = function_space_diagnostics(w @ x_test.T)                 # [4, 250, 10]
    assert diag["rhat_max"] < 1.05
    assert diag["num_quantities"] == 10


# ----------------------------------------------------------------------------------------------------
# initialisation, multiple chains, BNN models
# ----------------------------------------------------------------------------------------------------
def test_init_to_network_default_uses_fan_in_bounds_and_fresh_draws():
    net = torch.nn.Sequential(torch.nn.Linear(50, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    bnn = pyrobnn.bayesian(net, dataset_size=20)
    x, y = torch.randn(20, 50), torch.randint(0, 2, (20,))
    k = SGLD(bnn.model)
    k.setup(0, x, y)
    first = {n: v.clone() for n, v in k.initial_params.items()}
    assert first["0.weight"].abs().max() <= 1 / math.sqrt(50) and first["0.bias"].abs().max() <= 1 / math.sqrt(50)
    assert first["2.weight"].abs().max() <= 1 / math.sqrt(8) and first["2.bias"].abs().max() <= 1 / math.sqrt(8)
    assert first["0.weight"].abs().max() > 0.5 / math.sqrt(50)
    k.cleanup()
    k.setup(0, x, y)
    assert not torch.equal(first["0.weight"], k.initial_params["0.weight"])   # chains start apart
    assert init_to_network_default() is init_to_network_default


def test_lenet300_bnn_runs_under_pyro_mcmc_with_minibatches_and_converts_to_arviz():
    """MCMC(SGLD(bnn.model)) on LeNet-300-100 with minibatches; to_inference_data (and ArviZ 0.x's
    from_pyro) succeed."""
    import arviz as az
    import pyrobnn.models
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    n = 256
    x, y = torch.rand(n, 784), torch.randint(0, 10, (n,))
    bnn = pyrobnn.bayesian(pyrobnn.models.build("lenet300"), dataset_size=n)
    mcmc = MCMC(SGLD(bnn.model, step_size=1e-5), num_samples=4, warmup_steps=2, num_chains=2, disable_progbar=True)
    mcmc.run(x, y, subsample_size=32)
    samples = mcmc.get_samples(group_by_chain=True)
    assert samples["fc1.weight"].shape == (2, 4, 300, 784)
    assert sum(v[0, 0].numel() for v in samples.values()) == 266_610
    assert torch.isfinite(samples["fc3.weight"]).all()
    if hasattr(az, "from_pyro"):   # ArviZ 0.x only
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            idata_pyro = az.from_pyro(mcmc)
        assert idata_pyro.posterior["fc1.weight"].shape == (2, 4, 300, 784)
    idata = pyrobnn.to_inference_data(mcmc, max_coords=8)
    assert idata.posterior["fc1.weight"].shape == (2, 4, 8)
    assert idata.log_likelihood["obs"].shape == (2, 4, n)       # full data, not the minibatch
    assert idata.observed_data["obs"].shape == (n,)
    assert az.summary(idata, var_names=["fc1.weight_norm"]).shape[0] == 1


# ----------------------------------------------------------------------------------------------------
# the sample() API
# ----------------------------------------------------------------------------------------------------
def _toy_regression_bnn():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=g)
    y = (x[:, 0] - x[:, 1]).tanh() + 0.1 * torch.randn(200, generator=g)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    bnn = pyrobnn.bayesian(net, likelihood={"name": "gaussian", "scale": "latent"})
    return bnn, x, y


def test_sample_keeps_evenly_spaced_draws_under_a_cap_and_saves_loads(tmp_path):
    bnn, x, y = _toy_regression_bnn()
    post = sample(bnn, (x, y), "sgld", num_samples=30, warmup_steps=100, thin=2, num_chains=2, step_size=1e-4,
                  batch_size=50, max_draws=10, eval_x=x[:7], seed=0)
    assert bnn.dataset_size == 200 and bnn.subsample_size is None
    # 30 draws under a cap of 10: halved at 11 (→6, thin 4) and at 11 again (→6, thin 8), then 2 more
    assert post.num_chains == 2 and post.num_draws == 8
    assert post.draws["0.weight"].shape == (2, 8, 8, 3)
    assert post.eval_outputs.shape == (2, 8, 7, 1)
    assert (post.draws["likelihood.precision"] > 0).all()
    # the recorded held-out outputs are the network under the kept draws
    again = post.sample_outputs(x[:7]).reshape(2, 8, 7, 1)
    assert torch.allclose(again, post.eval_outputs, atol=1e-5)
    metrics = post.evaluate(x, y)
    assert set(metrics) == {"rmse", "nll", "gaussian_nll"} and metrics["rmse"] < 0.7
    path = tmp_path / "post.safetensors"
    post.save(path)
    loaded = SamplePosterior.load(path, net=torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(),
                                                                torch.nn.Linear(8, 1)))
    assert torch.equal(loaded.draws["0.weight"], post.draws["0.weight"])
    assert torch.allclose(loaded.predict(x)[0], post.predict(x)[0])
    assert loaded.evaluate(x, y) == pytest.approx(metrics)


def test_sample_with_psgld_cyclical_keep_sites_and_bfloat16():
    bnn, x, y = _toy_regression_bnn()
    sched = CyclicalStepSize(1e-3, num_steps=160, num_cycles=2, exploration=0.5)   # cycles of 80 updates
    post = sample(bnn, (x, y), PSGLD(bnn.model, step_size=sched), num_samples=40, warmup_steps=0, thin=4,
                  keep_sites=["0.*"], store_dtype=torch.bfloat16, seed=1)
    assert set(post.draws) == {"0.weight", "0.bias"}
    assert post.draws["0.weight"].dtype == torch.bfloat16
    assert post.num_draws == 20            # draws in the exploration halves of both cycles are dropped
    with pytest.raises(ValueError, match="cannot predict"):
        post.predict(x)


def test_sample_validates_its_inputs():
    bnn, x, y = _toy_regression_bnn()
    with pytest.raises(ValueError):
        sample(bnn, (x, y), "hmc")
    with pytest.raises(ValueError):
        sample(bnn, (x, y), num_samples=0)
    with pytest.raises(TypeError):
        sample(torch.nn.Linear(2, 2), (x, y))
    with pytest.raises(ValueError, match="this BNN"):
        other, _, _ = _toy_regression_bnn()
        sample(bnn, (x, y), SGLD(other.model))


def test_sample_takes_pyros_warmup_steps_and_the_old_name_warns():
    bnn, x, y = _toy_regression_bnn()
    new = sample(bnn, (x, y), num_samples=3, warmup_steps=4, thin=1, step_size=1e-4, batch_size=50, seed=3)
    with pytest.warns(DeprecationWarning, match="warmup_steps"):
        old = sample(bnn, (x, y), num_samples=3, warmup=4, thin=1, step_size=1e-4, batch_size=50, seed=3)
    assert new.config["warmup_steps"] == old.config["warmup_steps"] == 4
    for name in new.draws:
        assert torch.equal(new.draws[name], old.draws[name]), name
    with pytest.raises(ValueError, match="warmup_steps"):
        sample(bnn, (x, y), warmup_steps=-1)


# ----------------------------------------------------------------------------------------------------
# the fast log-joint on hand-written Pyro models equals the reference (trace + condition)
# ----------------------------------------------------------------------------------------------------
class _PyroNet(PyroModule):
    """A network written the Pyro way: PyroSample weights, the minibatch drawn by a subsampled plate."""

    def __init__(self, n, m, prior_loc=0.0, prior_scale=1.0):
        super().__init__()
        self.n, self.m = n, m
        self.fc1 = PyroModule[torch.nn.Linear](3, 5)
        self.fc2 = PyroModule[torch.nn.Linear](5, 2)
        for layer in (self.fc1, self.fc2):
            layer.weight = PyroSample(dist.Normal(prior_loc, prior_scale).expand(layer.weight.shape).to_event(2))
            layer.bias = PyroSample(dist.Normal(prior_loc, prior_scale).expand(layer.bias.shape).to_event(1))

    def forward(self, x, y):
        with pyro.plate("data", self.n, subsample_size=self.m) as idx:
            with block_plate("data"):
                logits = self.fc2(torch.tanh(self.fc1(x[idx])))
            pyro.sample("obs", dist.Categorical(logits=logits), obs=y[idx])
        return logits


def _mixed_model(x, y):
    """Sites of every kind: fused Normal priors (zero and non-zero loc), a Normal with a full loc tensor,
    a hierarchical scale (a latent inside the prior's scale), a positive site (log-Jacobian), and a
    Gaussian likelihood in a plate of 40 subsampled to 8 (scale N/M = 5)."""
    w = pyro.sample("w", dist.Normal(0.0, 1.5).expand([3, 2]).to_event(2))
    b = pyro.sample("b", dist.Normal(0.3, 2.0).expand([2]).to_event(1))
    c = pyro.sample("c", dist.Normal(torch.tensor([0.1, -0.2]), 0.7).to_event(1))
    tau = pyro.sample("tau", dist.LogNormal(0.0, 1.0))
    v = pyro.sample("v", dist.Normal(0.0, tau).expand([2]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("data", x.shape[0], subsample_size=8) as idx:
        mean = x[idx] @ w + b + c * v
        pyro.sample("obs", dist.Normal(mean, sigma).to_event(1), obs=y[idx])


def _reference_potential(kernel, model, params, *args):
    """U from Pyro's own machinery: the model conditioned on the constrained values, traced, its
    scaled log-density summed (``Trace.log_prob_sum``), plus the log-Jacobians of the transforms."""
    leaves = {n: params[n].clone().requires_grad_() for n, _ in kernel._sites}
    values, logdet = {}, 0.0
    for name, transform in kernel._sites:
        u = leaves[name]
        values[name] = u if transform is None else transform(u)
        if transform is not None:
            logdet = logdet + transform.log_abs_det_jacobian(u, values[name]).sum()
    trace = poutine.trace(poutine.condition(model, data=values)).get_trace(*args)
    potential = -(trace.log_prob_sum() + logdet)
    grads = torch.autograd.grad(potential, [leaves[n] for n, _ in kernel._sites])
    return potential.detach(), grads


@pytest.mark.parametrize("which", ["mixed", "pyro-module"])
def test_fast_potential_equals_trace_and_condition_on_hand_written_models(which):
    torch.manual_seed(0)
    if which == "mixed":
        model, x, y = _mixed_model, torch.randn(40, 3), torch.randn(40, 2)
    else:
        model, x, y = _PyroNet(40, 8, prior_loc=0.2, prior_scale=0.8), torch.randn(40, 3), torch.randint(0, 2, (40,))
    k = SGLD(model)
    k.setup(0, x, y)
    for trial in range(3):
        params = {n: torch.randn_like(v) for n, v in k.initial_params.items()}
        torch.manual_seed(100 + trial)           # the same minibatch for both evaluations
        potential, grads = k.potential_and_grad(params, x, y)
        torch.manual_seed(100 + trial)
        ref_potential, ref_grads = _reference_potential(k, model, params, x, y)
        assert potential.item() == pytest.approx(ref_potential.item(), rel=1e-6)
        for (name, _), g, g_ref in zip(k._sites, grads, ref_grads):
            assert torch.allclose(g, g_ref, rtol=1e-5, atol=1e-6), name


def test_fused_normal_plan_applies_to_constant_scalar_normals_only():
    from pyrobnn.inference.log_joint import scalar_normal_plan as _scalar_normal_plan
    plan = _scalar_normal_plan(dist.Normal(0.5, 2.0).expand([3, 4]).to_event(2))
    assert plan[0] == (3, 4) and plan[1] == 0.5 and plan[2] == pytest.approx(-0.125)
    assert plan[3] == pytest.approx(-12 * (math.log(2.0) + 0.5 * math.log(2 * math.pi)))
    assert _scalar_normal_plan(pyrobnn.priors.Gaussian(2.0).expand([3, 4]).to_event(2))[2] == pytest.approx(-0.125)
    tau = torch.tensor(1.0, requires_grad=True)
    assert _scalar_normal_plan(dist.Normal(0.0, tau).expand([3])) is None            # a latent in the scale
    assert _scalar_normal_plan(dist.Normal(torch.tensor([0.0, 1.0]), 1.0)) is None   # a loc per element
    assert _scalar_normal_plan(dist.Laplace(0.0, 1.0).expand([3])) is None

    class ShiftedNormal(dist.Normal):   # a subclass with its own density is left to its log_prob
        def log_prob(self, value):
            return super().log_prob(value) + 1.0
    assert _scalar_normal_plan(ShiftedNormal(0.0, 1.0).expand([3])) is None
    # an in-place change of a cached prior's parameters is seen
    loc = torch.tensor(0.0)
    prior = dist.Normal(loc, 1.0).expand([2]).to_event(1)
    assert _scalar_normal_plan(prior)[1] == 0.0
    loc.fill_(3.0)
    assert _scalar_normal_plan(prior)[1] == 3.0


def test_sgld_on_a_pyro_module_network_equals_sgld_on_bayesian_model():
    """The same network written the Pyro way (PyroSample weights, subsampled plate) and made by
    ``bayesian()``: from the same state and RNG state, one SGLD update gives the same state."""
    torch.manual_seed(0)
    x, y = torch.randn(40, 3), torch.randint(0, 2, (40,))
    pyro_net = _PyroNet(40, 8)
    net = torch.nn.Sequential()
    net.fc1, net.act, net.fc2 = torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)
    bnn = pyrobnn.bayesian(net, prior="gaussian", likelihood="categorical", dataset_size=40, subsample_size=8)
    k_pyro, k_bnn = SGLD(pyro_net, step_size=1e-3), SGLD(bnn.model, step_size=1e-3)
    k_pyro.setup(0, x, y)
    k_bnn.setup(0, x, y)
    assert [n for n, _ in k_pyro._sites] == [n for n, _ in k_bnn._sites]
    state = {n: torch.randn_like(v) for n, v in k_bnn.initial_params.items()}
    torch.manual_seed(7)
    a = k_pyro.sample(dict(state))
    torch.manual_seed(7)
    b = k_bnn.sample(dict(state))
    for n in state:
        assert torch.allclose(a[n], b[n], rtol=1e-5, atol=1e-6), n
    assert k_pyro.diagnostics()["potential_energy"] == pytest.approx(k_bnn.diagnostics()["potential_energy"], rel=1e-5)


def test_categorical_observations_sum_in_one_op_with_the_same_value_and_checks():
    from pyrobnn.inference.log_joint import _categorical_log_prob_sum
    torch.manual_seed(0)
    logits = torch.randn(16, 5, requires_grad=True)
    y = torch.randint(0, 5, (16,))
    for d in (dist.Categorical(logits=logits), torch.distributions.Categorical(logits=logits),
              dist.Categorical(probs=logits.softmax(-1))):
        fast = _categorical_log_prob_sum(d, y)
        ref = d.log_prob(y).sum()
        assert fast.item() == pytest.approx(ref.item(), rel=1e-6)
        g_fast, = torch.autograd.grad(fast, logits, retain_graph=True)
        g_ref, = torch.autograd.grad(ref, logits)
        assert torch.allclose(g_fast, g_ref, atol=1e-6)
    d = dist.Categorical(logits=logits)
    assert _categorical_log_prob_sum(d, y.float()) is None                 # float labels: log_prob's own path
    assert _categorical_log_prob_sum(dist.Categorical(logits=torch.randn(2, 16, 5)), y) is None

    class Tempered(dist.Categorical):   # a subclass with its own density is left to its log_prob
        def log_prob(self, value):
            return 0.5 * super().log_prob(value)
    assert _categorical_log_prob_sum(Tempered(logits=logits), y) is None
    with pyro.validation_enabled(True), pytest.raises(ValueError, match="support"):
        _categorical_log_prob_sum(dist.Categorical(logits=logits), torch.full((16,), 7))


@pytest.mark.parametrize("which", ["unit-prior", "scaled-prior", "mixed"])
def test_closed_form_prior_gradient_equals_autograd_bit_for_bit(which):
    """The kernel adds the Gaussian prior's gradient in closed form instead of through a backward node: the
    potential and every gradient are the same bits as autograd through the whole log joint."""
    from pyrobnn.inference.log_joint import LogJoint
    torch.manual_seed(0)
    if which == "mixed":
        model, x, y = _mixed_model, torch.randn(40, 3), torch.randn(40, 2)
    else:
        scale = 1.0 if which == "unit-prior" else 0.8
        model, x, y = _PyroNet(40, 8, prior_scale=scale), torch.randn(40, 3), torch.randint(0, 2, (40,))
    k = SGLD(model)
    k.setup(0, x, y)
    params = {n: torch.randn_like(v) for n, v in k.initial_params.items()}
    torch.manual_seed(5)
    potential, grads = k.potential_and_grad(params, x, y)
    torch.manual_seed(5)
    leaves, values, logdet = [], {}, 0.0
    for name, transform in k._sites:
        u = params[name].detach().requires_grad_()
        leaves.append(u)
        values[name] = u if transform is None else transform(u)
        if transform is not None:
            logdet = logdet + transform.log_abs_det_jacobian(u, values[name]).sum()
    joint = LogJoint(values)
    with joint:
        model(x, y)
    ref = -(joint.log_joint() + logdet)
    ref_grads = torch.autograd.grad(ref, leaves)
    assert torch.equal(potential, ref.detach())
    for (name, _), g, g_ref in zip(k._sites, grads, ref_grads):
        assert torch.equal(g, g_ref), name


def test_prior_gradients_go_in_place_only_into_unshared_contiguous_tensors():
    from pyrobnn.inference.log_joint import add_prior_gradients
    v = [torch.randn(3, 4), torch.randn(4), torch.randn(2), torch.randn(5)]
    shared = torch.randn(4)
    expanded = torch.tensor(0.7).expand(2)
    own = torch.randn(5)
    grads = [torch.randn(3, 4), shared, shared, None]
    grads[2] = shared                          # one tensor handed to two inputs
    before = [None if g is None else g.clone() for g in grads]
    out = add_prior_gradients(list(grads), [(0, v[0], 1.0), (1, v[1], 1.0), (3, v[3], 1.0)])
    assert torch.equal(out[0], before[0] + v[0]) and out[0] is grads[0]        # in place
    assert torch.equal(out[1], before[1] + v[1]) and torch.equal(shared, before[1])  # the shared one untouched
    assert out[2] is shared and torch.equal(out[3], v[3])
    out = add_prior_gradients([expanded, own.clone()], [(0, v[2], 1.0), (1, v[3], -0.6)])
    assert torch.equal(out[0], expanded + v[2]) and torch.equal(expanded, torch.full((2,), 0.7))
    assert torch.equal(out[1], v[3] * -0.6 + own)                             # product first, as autograd
