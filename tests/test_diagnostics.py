"""ArviZ bridge (pyrobnn/diagnostics.py, pyrobnn/arviz_compat.py) and the ``pyrobnn report`` command.

Every test here runs on the installed ArviZ line: 0.x (``InferenceData``) or 1.x (``xarray.DataTree``)."""
import json
import math
import warnings

import matplotlib

matplotlib.use("Agg")
import arviz as az  # noqa: E402
import numpy as np  # noqa: E402
import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from pyro.infer import MCMC  # noqa: E402

import pyrobnn  # noqa: E402
from pyrobnn import arviz_compat as compat  # noqa: E402
from pyrobnn.diagnostics import function_space_diagnostics  # noqa: E402
from pyrobnn.inference import SGLD, sample  # noqa: E402


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="num_chains=")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="arviz")
        yield


def _data(n=60):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g)
    y = (x[:, 0] - x[:, 1]).tanh() + 0.1 * torch.randn(n, generator=g)
    return x, y


def _net():
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))


@pytest.fixture(scope="module")
def mcmc_run():
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    x, y = _data()
    bnn = pyrobnn.bayesian(_net(), likelihood={"name": "gaussian", "scale": "latent"}, dataset_size=60,
                           subsample_size=20)
    # 2 × 15 draws: ArviZ 1.x's PSIS needs at least 25 draws in all
    mcmc = MCMC(SGLD(bnn.model, step_size=1e-3, thin=2), num_samples=15, warmup_steps=20, num_chains=2,
                disable_progbar=True)
    mcmc.run(x, y)
    return mcmc, bnn, x, y


def _manual_log_lik(samples, c, s, x, y):
    w = {k: v[c, s] for k, v in samples.items()}
    h = torch.tanh(F.linear(x, w["0.weight"], w["0.bias"]))
    mean = F.linear(h, w["2.weight"], w["2.bias"]).squeeze(-1)
    return dist.Normal(mean, w["likelihood.precision"].rsqrt()).log_prob(y)


def test_mcmc_run_becomes_inference_data_with_exact_values(mcmc_run):
    mcmc, bnn, x, y = mcmc_run
    idata = pyrobnn.to_inference_data(mcmc, test=(x[:5], y[:5]), max_coords=5, seed=3)
    samples = mcmc.get_samples(group_by_chain=True)
    assert {"posterior", "log_likelihood", "posterior_predictive", "observed_data", "sample_stats",
            "predictions", "predictions_constant_data"} == set(compat.group_names(idata))
    # a 4×3 weight (12 numbers > 5) is stored as 5 seeded coordinates + per-draw summaries
    coords = idata.posterior["0.weight_coord"].values.copy()
    assert len(coords) == 5 and len(set(coords.tolist())) == 5 and coords.max() < 12
    flat = samples["0.weight"].reshape(2, 15, 12)
    np.testing.assert_array_equal(idata.posterior["0.weight"].values, flat[:, :, coords].numpy())
    np.testing.assert_allclose(idata.posterior["0.weight_norm"].values, flat.norm(dim=-1).numpy(), rtol=1e-6)
    np.testing.assert_allclose(idata.posterior["0.weight_std"].values, flat.std(-1).numpy(), rtol=1e-5)
    assert idata.posterior["0.bias"].shape == (2, 15, 4)                    # 4 ≤ 5: stored whole
    assert json.loads(idata.posterior.attrs["pyrobnn_site_shapes"])["0.weight"] == [4, 3]
    # the same seed gives the same coordinates
    again = pyrobnn.to_inference_data(mcmc, max_coords=5, seed=3, log_likelihood=False, posterior_predictive=False)
    np.testing.assert_array_equal(again.posterior["0.weight_coord"].values, coords)
    # log-likelihood per observation on the full data, by hand for two draws
    assert idata.log_likelihood["obs"].shape == (2, 15, 60)
    for c, s in ((0, 0), (1, 5)):
        np.testing.assert_allclose(idata.log_likelihood["obs"].values[c, s],
                                   _manual_log_lik(samples, c, s, x, y).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(idata.observed_data["obs"].values, y.numpy())
    assert idata.posterior_predictive["obs"].shape == (2, 15, 60)
    # sample stats: minus the kernel's recorded potentials, its step sizes, no divergences
    diag = mcmc.diagnostics()
    np.testing.assert_allclose(idata.sample_stats["lp"].values,
                               -np.array([diag["potential_energy"]["chain 0"], diag["potential_energy"]["chain 1"]]))
    assert (idata.sample_stats["step_size"].values == 1e-3).all()
    assert not idata.sample_stats["diverging"].values.any()
    # function space: the held-out means are the network under each draw
    w = {k: v[1, 2] for k, v in samples.items()}
    f = F.linear(torch.tanh(F.linear(x[:5], w["0.weight"], w["0.bias"])), w["2.weight"], w["2.bias"]).squeeze(-1)
    np.testing.assert_allclose(idata.predictions["f_test"].values[1, 2], f.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(idata.predictions_constant_data["y_test"].values, y[:5].numpy())


def test_groups_have_the_arviz_dims_and_coords(mcmc_run):
    mcmc, bnn, x, y = mcmc_run
    idata = pyrobnn.to_inference_data(mcmc, test=(x[:5], y[:5]), max_coords=5, seed=3)
    post = compat.group(idata, "posterior")
    assert post["0.weight"].dims == ("chain", "draw", "0.weight_coord")
    assert post["0.weight_norm"].dims == ("chain", "draw")
    assert post["likelihood.precision"].dims == ("chain", "draw")
    np.testing.assert_array_equal(post["chain"].values, [0, 1])
    np.testing.assert_array_equal(post["draw"].values, np.arange(15))
    assert compat.group(idata, "log_likelihood")["obs"].dims == ("chain", "draw", "observation")
    assert compat.group(idata, "posterior_predictive")["obs"].dims == ("chain", "draw", "observation")
    assert compat.group(idata, "observed_data")["obs"].dims == ("observation",)
    np.testing.assert_array_equal(compat.group(idata, "observed_data")["observation"].values, np.arange(60))
    assert compat.group(idata, "predictions")["f_test"].dims == ("chain", "draw", "test_point")
    assert compat.group(idata, "predictions_constant_data")["y_test"].dims == ("test_point",)
    assert set(compat.group(idata, "sample_stats").data_vars) == {"lp", "step_size", "diverging"}
    assert compat.group(idata, "sample_stats")["diverging"].dtype == bool
    attrs = post.attrs
    assert attrs["inference_library"] == "pyrobnn" and attrs["pyrobnn_task"] == "regression"
    assert attrs["pyrobnn_likelihood"] == "gaussian" and json.loads(attrs["pyrobnn_subsampled_sites"]) == ["0.weight"]
    with pytest.raises(KeyError, match="no 'prior' group"):
        compat.group(idata, "prior")


def test_arviz_functions_run_on_the_result(mcmc_run):
    mcmc, bnn, x, y = mcmc_run
    idata = pyrobnn.to_inference_data(mcmc, test=x[:5], max_coords=5)
    assert compat.is_inference_data(idata) and not compat.is_inference_data({"posterior": {}})
    summary = az.summary(idata, var_names=["likelihood.precision", "0.weight_norm"])
    assert list(summary.index) == ["likelihood.precision", "0.weight_norm"]
    assert np.isfinite(az.rhat(idata)["likelihood.precision"].values)
    assert np.isfinite(az.ess(idata)["likelihood.precision"].values)
    loo = az.loo(idata)
    assert loo.n_data_points == 60
    assert np.isfinite(compat.loo(idata)["elpd_loo"])
    import matplotlib.pyplot as plt
    if compat.is_datatree_line():   # ArviZ 1.x: arviz_plots, which return a PlotCollection
        assert az.plot_trace_dist(idata, var_names=["likelihood.precision"], backend="matplotlib") is not None
        assert az.plot_ppc_dist(idata, num_samples=5, backend="matplotlib") is not None
    else:
        assert az.plot_trace(idata, var_names=["likelihood.precision"]).shape == (1, 2)
        assert az.plot_ppc(idata, num_pp_samples=5, random_seed=0) is not None
    plt.close("all")
    names = compat.group_names(idata)
    assert "predictions" in names and "predictions_constant_data" not in names


def test_loo_and_waic_match_a_hand_computation_from_the_stored_log_likelihood():
    import _arviz_run as run
    idata = run.build(draws=500)   # independent guide draws, enough for stable Pareto-k estimates
    x, y = run.data()
    ll_store = compat.group(idata, "log_likelihood")["obs"].values
    # the stored values are the network under each stored draw (float32 forward vs float64 by hand)
    ll_hand = run.log_lik_by_hand(compat.group(idata, "posterior"), x, y).numpy()
    np.testing.assert_allclose(ll_store, ll_hand, rtol=1e-5, atol=1e-5)
    ll = ll_store.reshape(-1, run.N)                                     # [S, n]
    S = ll.shape[0]
    lppd = np.array([math.log(np.exp(ll[:, i] - ll[:, i].max()).mean()) + ll[:, i].max() for i in range(run.N)])
    p_waic = ll.var(0)                                                 # over draws, divided by S
    w = compat.waic(idata)
    assert w["elpd_waic"] == pytest.approx(float((lppd - p_waic).sum()), rel=1e-12)
    assert w["p_waic"] == pytest.approx(float(p_waic.sum()), rel=1e-12)
    assert w["se"] == pytest.approx(math.sqrt(run.N * (lppd - p_waic).var()), rel=1e-12)
    assert w["n_data_points"] == run.N and S == 500
    if not compat.is_datatree_line():   # ArviZ 0.x has its own WAIC: the same numbers
        ref = az.waic(idata)
        assert float(ref.elpd_waic) == pytest.approx(w["elpd_waic"], rel=1e-10)
        assert float(ref.p_waic) == pytest.approx(w["p_waic"], rel=1e-10)
    # LOO: with every Pareto k small, PSIS-LOO ≈ plain importance-sampling LOO,
    # elpd_i = −log mean_s exp(−ll[s, i]), and both ≈ WAIC
    lo = compat.loo(idata)
    assert lo["pareto_k"].shape == (run.N,) and lo["pareto_k"].max() < 0.5
    is_loo = float(sum(-(math.log(np.exp(-ll[:, i] + ll[:, i].min()).mean()) - ll[:, i].min())
                       for i in range(run.N)))
    assert lo["elpd_loo"] == pytest.approx(is_loo, abs=0.005)               # here 0.0015 apart
    assert lo["elpd_loo"] == pytest.approx(w["elpd_waic"], abs=0.005)
    assert lo["n_data_points"] == run.N and lo["p_loo"] == pytest.approx(w["p_waic"], abs=0.005)
    # the line's own az.loo agrees with the adapter
    native = az.loo(idata)
    assert float(getattr(native, "elpd_loo", getattr(native, "elpd", None))) == pytest.approx(lo["elpd_loo"], rel=1e-12)


def test_waic_and_loo_say_what_is_missing(mcmc_run):
    mcmc, *_ = mcmc_run
    idata = pyrobnn.to_inference_data(mcmc, max_coords=4, log_likelihood=False)
    with pytest.raises(ValueError, match="no log_likelihood group"):
        compat.waic(idata)
    with pytest.raises(TypeError, match="InferenceData or DataTree"):
        compat.group_names({"posterior": None})
    if compat.is_datatree_line():   # ArviZ 1.x's PSIS cannot smooth the tail of fewer than 25 draws
        few = pyrobnn.to_inference_data(mcmc, max_coords=4, max_draws=10)
        with pytest.raises(ValueError, match="at least 25 draws on ArviZ 1.x; this run has 20"):
            compat.loo(few)


def test_netcdf_round_trip_keeps_dotted_site_names(mcmc_run, tmp_path):
    mcmc, *_ = mcmc_run
    idata = pyrobnn.to_inference_data(mcmc, max_coords=4)
    path = compat.write(idata, tmp_path / "run.nc")
    assert not list(tmp_path.glob(".*tmp"))                    # written atomically: no temporary left
    back = compat.read(path)
    assert compat.group_names(back) == compat.group_names(idata)
    assert set(compat.group(back, "posterior").data_vars) == set(compat.group(idata, "posterior").data_vars)
    np.testing.assert_array_equal(compat.group(back, "posterior")["2.weight"].values,
                                  compat.group(idata, "posterior")["2.weight"].values)
    np.testing.assert_array_equal(compat.group(back, "log_likelihood")["obs"].values,
                                  compat.group(idata, "log_likelihood")["obs"].values)
    assert compat.group(back, "posterior").attrs["pyrobnn_site_shapes"] == \
        compat.group(idata, "posterior").attrs["pyrobnn_site_shapes"]
    (tmp_path / "bad.nc").write_text("not netCDF")
    with pytest.raises(ValueError, match="not an ArviZ netCDF file"):
        compat.read(tmp_path / "bad.nc")
    with pytest.raises(FileNotFoundError):
        compat.read(tmp_path / "absent.nc")


@pytest.mark.parametrize("name", ["arviz0_run.nc", "arviz1_run.nc"])
def test_a_run_saved_under_either_arviz_line_opens_and_reports(name, tmp_path):
    """The committed files were written by ArviZ 0.23 and 1.3 (``python tests/_arviz_run.py``); one of
    them comes from the other line than the one running this test."""
    import _arviz_run as run
    from pyrobnn.cli import main
    idata = compat.read(run.DATA / name)
    assert set(compat.group_names(idata)) == {"posterior", "posterior_predictive", "log_likelihood",
                                              "observed_data", "predictions", "predictions_constant_data"}
    x, y = run.data()
    post = compat.group(idata, "posterior")
    assert post.sizes["chain"] == 1 and post.sizes["draw"] == run.DRAWS
    assert post["0.weight"].dims == ("chain", "draw", "0.weight_dim_0", "0.weight_dim_1")
    np.testing.assert_allclose(compat.group(idata, "log_likelihood")["obs"].values,
                               run.log_lik_by_hand(post, x, y).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(compat.group(idata, "observed_data")["obs"].values, y.numpy())
    assert compat.waic(idata)["n_data_points"] == run.N
    assert np.isfinite(az.summary(idata, var_names=["0.weight_norm"] if "0.weight_norm" in post else
                                  ["2.bias"], kind="stats").to_numpy(dtype=float)).all()
    assert main(["report", str(run.DATA / name), "--out", str(tmp_path)]) == 0
    for png in ("trace.png", "ppc.png", "reliability.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "test_rmse" in (tmp_path / "index.html").read_text()


def test_sample_posterior_uses_its_recorded_held_out_outputs():
    x, y = _data()
    bnn = pyrobnn.bayesian(_net(), likelihood={"name": "gaussian", "scale": 0.1})
    post = sample(bnn, (x, y), num_samples=20, warmup_steps=50, thin=2, num_chains=2, step_size=1e-4, batch_size=20,
                  eval_x=x[:8], seed=0)
    idata = pyrobnn.to_inference_data(post, data=(x, y))
    np.testing.assert_allclose(idata.predictions["f_test"].values, post.eval_outputs.squeeze(-1).numpy())
    assert idata.log_likelihood["obs"].shape == (2, 20, 60)
    # fixed noise scale 0.1: per-observation log-likelihood of draw (0, 0) by hand
    out = post.sample_outputs(x)[0].squeeze(-1)
    np.testing.assert_allclose(idata.log_likelihood["obs"].values[0, 0], dist.Normal(out, 0.1).log_prob(y).numpy(),
                               rtol=1e-5, atol=1e-5)
    a = function_space_diagnostics(idata)
    b = function_space_diagnostics(post)
    assert a == pytest.approx(b) and a["num_quantities"] == 8


def test_guide_draws_of_a_trained_bnn():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 3, generator=g)
    y = (x[:, 0] > 0).long()
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    bnn = pyrobnn.bayesian(net, likelihood="categorical", dataset_size=40)
    bnn.initialize(x)
    idata = pyrobnn.to_inference_data(bnn, data=(x, y), test=(x[:10], y[:10]), num_samples=400, seed=0)
    assert idata.posterior.sizes["chain"] == 1 and idata.posterior.sizes["draw"] == 400
    loc, scale = bnn.autoguide.site_params("2.bias")
    draws = torch.as_tensor(idata.posterior["2.bias"].values[0])
    # mean of 400 guide draws within 4 standard errors of the guide's mean; sd within 15 %
    assert ((draws.mean(0) - loc.detach()).abs() < 4 * scale.detach() / 20).all()
    assert ((draws.std(0) / scale.detach() - 1).abs() < 0.15).all()
    p = idata.predictions["p_test"].values
    assert p.shape == (1, 400, 10, 2) and np.allclose(p.sum(-1), 1, atol=1e-5)
    assert idata.log_likelihood["obs"].shape == (1, 400, 40)
    assert np.issubdtype(idata.posterior_predictive["obs"].dtype, np.integer)
    assert idata.posterior.attrs["pyrobnn_task"] == "classification"


def test_generic_pyro_model_log_likelihood_and_unreplayable_subsample_warning():
    x = torch.linspace(-1, 1, 10)
    y = 2 * x + 0.1

    def model(x, y):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 10):
            pyro.sample("y", dist.Normal(w * x, 0.5), obs=y)

    pyro.set_rng_seed(0)
    mcmc = MCMC(SGLD(model, step_size=1e-2), num_samples=5, warmup_steps=5, disable_progbar=True)
    mcmc.run(x, y)
    idata = pyrobnn.to_inference_data(mcmc)
    w = mcmc.get_samples()["w"]
    np.testing.assert_allclose(idata.log_likelihood["y"].values[0, 3], dist.Normal(w[3] * x, 0.5).log_prob(y).numpy(),
                               rtol=1e-6)

    def sub_model(x, y):   # indexes its data with indices of its own, not the plate's: cannot be replayed
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        own = torch.randperm(10)[:5]
        with pyro.plate("data", 10, subsample=own):
            pyro.sample("y", dist.Normal(w * x[own], 0.5), obs=y[own])

    mcmc = MCMC(SGLD(sub_model, step_size=1e-2), num_samples=5, warmup_steps=5, disable_progbar=True)
    mcmc.run(x, y)
    with pytest.warns(UserWarning, match="observed values change from one replay to the next"):
        idata = pyrobnn.to_inference_data(mcmc)
    assert "log_likelihood" not in compat.group_names(idata) and idata.posterior["w"].shape == (1, 5)


def test_minibatched_pyro_model_gets_its_log_likelihood_on_the_full_data():
    """SGLD on a hand-written model whose plate subsamples 4 of 11 points: the log-likelihood group
    holds every one of the 11 observations under every draw (windows 0–3, 4–7, 7–10 of the plate)."""
    g = torch.Generator().manual_seed(0)
    x = torch.linspace(-1, 1, 11)
    y = 2 * x + 0.1 + 0.3 * torch.randn(11, generator=g)

    def model(x, y):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        b = pyro.sample("b", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 11, subsample_size=4) as idx:
            pyro.sample("y", dist.Normal(w * x[idx] + b, 0.5), obs=y[idx])

    pyro.set_rng_seed(0)
    mcmc = MCMC(SGLD(model, step_size=1e-2), num_samples=30, warmup_steps=20, disable_progbar=True)
    mcmc.run(x, y)
    idata = pyrobnn.to_inference_data(mcmc)
    s = mcmc.get_samples()
    hand = dist.Normal(s["w"][:, None] * x + s["b"][:, None], 0.5).log_prob(y)            # [30, 11]
    ll = compat.group(idata, "log_likelihood")["y"]
    assert ll.shape == (1, 30, 11)
    np.testing.assert_allclose(ll.values[0], hand.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(compat.group(idata, "observed_data")["y"].values, y.numpy())
    assert compat.group(idata, "posterior_predictive")["y"].shape == (1, 30, 11)
    lo = compat.loo(idata)
    assert lo["n_data_points"] == 11 and np.isfinite(lo["elpd_loo"])

    def local_latent(x, y):   # a per-datum latent inside the subsampled plate: its draws cover one minibatch
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 11, subsample_size=4) as idx:
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("y", dist.Normal(w * x[idx] + z, 0.5), obs=y[idx])

    # SGLD refuses such a model; draws of it from elsewhere are not replayed either
    from pyrobnn.diagnostics import _model_observations
    draws = {"w": torch.zeros(3), "z": torch.zeros(3, 4)}
    with pytest.warns(UserWarning, match=r"latent sites \['z'\] lie in subsampled plate 'data'"):
        assert _model_observations((local_latent, (x, y), {}), draws, 1, 3, True, True) == {}


def test_function_space_diagnostics_separates_mixed_from_stuck_chains():
    rng = np.random.default_rng(0)
    mixed = rng.standard_normal((4, 500, 3))
    d = function_space_diagnostics(mixed)
    assert d["rhat_max"] < 1.02 and d["ess_bulk_min"] > 1000 and d["num_quantities"] == 3
    stuck = mixed.copy()
    stuck[3] += 3.0                                   # one chain in another mode
    assert function_space_diagnostics(stuck)["rhat_max"] > 1.3      # rank-normalised R-hat ≈ 1.48 here
    with_constant = np.concatenate([mixed, np.ones((4, 500, 1))], -1)
    assert function_space_diagnostics(with_constant)["num_quantities"] == 3   # constant column skipped


def test_inputs_are_validated(mcmc_run):
    mcmc, *_ = mcmc_run
    with pytest.raises(TypeError):
        pyrobnn.to_inference_data(object())
    with pytest.raises(ValueError):
        pyrobnn.to_inference_data(mcmc, max_coords=0)
    with pytest.raises(ValueError, match="not been run"):
        pyrobnn.to_inference_data(MCMC(SGLD(lambda: None), num_samples=2))
    with pytest.raises(ValueError):
        function_space_diagnostics(np.zeros(5))


def test_report_command_renders_plots_and_html(mcmc_run, tmp_path):
    from pyrobnn.cli import main
    mcmc, bnn, x, y = mcmc_run
    idata = pyrobnn.to_inference_data(mcmc, test=(x[:20], y[:20]), attrs={"pyrobnn_metrics": {"test_rmse": 0.5}})
    compat.write(idata, tmp_path / "inference_data.nc")
    assert main(["report", str(tmp_path)]) == 0
    report = tmp_path / "report"
    for name in ("trace.png", "ppc.png", "reliability.png"):
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (report / "index.html").read_text()
    assert "Function-space convergence" in page and "test_rmse" in page and "trace.png" in page
    assert main(["report", str(tmp_path / "missing")]) == 2
