"""A Bayesian network inside one's own Pyro model: heteroscedastic regression and a hierarchical model
with group offsets, on sklearn's diabetes data, each trained by SVI and by SGLD and inspected with ArviZ.

    python examples/custom_model.py --out runs/custom_model

``pyrobnn.random_module(name, net, prior=...)`` turns a torch network into a callable whose weights are
Pyro sample sites; the likelihood and the hierarchy are ordinary Pyro code written here:

* **heteroscedastic** — the network predicts a mean and a raw scale per example,
  y ~ N(f(x)₀, softplus(f(x)₁)²); compared with the homoscedastic model y ~ N(f(x)₀, σ²), σ ~ HalfNormal(1),
  on the same split.
* **hierarchical** — the examples fall into ``--groups`` groups by age quantile; every group shares one
  Bayesian network and has its own offset, b_g ~ N(μ_b, τ²) with μ_b ~ N(0, 1), τ ~ HalfNormal(0.5):
  y ~ N(f(x) + b_g, σ²); compared with the same model without offsets.

Inputs and targets are standardised on the training split (a random 80/20 split, ``--split-seed``); the
metrics (test RMSE and mean Gaussian negative log-likelihood per example) are on that scale. SVI runs
``pyrobnn.guides.MeanField`` under ``TraceMeanField_ELBO`` (full batch); SGLD runs the
``pyrobnn.inference.SGLD`` kernel under ``pyro.infer.MCMC`` on the same model, with the minibatch drawn by
``pyro.plate(subsample_size=--batch)``. Each SGLD run goes to ArviZ through ``pyrobnn.to_inference_data``
(PSIS-LOO of the training data, ``az.summary`` of the scalar sites).

Writes ``results.json`` and ``results.md`` into OUT.
"""
from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn
import torch.nn.functional as F
from pyro.infer import SVI, TraceMeanField_ELBO

import pyrobnn
from pyrobnn.guides import MeanField
from pyrobnn.inference import SGLD

_LOG_2PI = math.log(2 * math.pi)


def load_data(split_seed: int = 0, groups: int = 4, test_fraction: float = 0.2):
    """Diabetes (442 × 10), standardised on the train split; group = age quantile (of the train split)."""
    from sklearn.datasets import load_diabetes
    d = load_diabetes()
    x, y = d.data.astype(np.float32), d.target.astype(np.float32)
    perm = np.random.default_rng(split_seed).permutation(len(x))
    n_test = int(round(len(x) * test_fraction))
    te, tr = perm[:n_test], perm[n_test:]
    edges = np.quantile(x[tr, 0], np.linspace(0, 1, groups + 1)[1:-1])
    g = np.searchsorted(edges, x[:, 0], side="right")
    mu, sd = x[tr].mean(0), x[tr].std(0)
    x = (x - mu) / sd
    y = (y - y[tr].mean()) / y[tr].std()
    t = lambda a, dtype=torch.float32: torch.as_tensor(a, dtype=dtype)  # noqa: E731
    return {"x_train": t(x[tr]), "y_train": t(y[tr]), "g_train": t(g[tr], torch.long),
            "x_test": t(x[te]), "y_test": t(y[te]), "g_test": t(g[te], torch.long)}


def _mlp(d_in, hidden, d_out):
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out))


class Models:
    """The four Pyro models (two per experiment), each using one ``random_module``.

    Every model takes the full data; ``subsample_size`` (None: all of it) is a setting of this object,
    so that the same function serves SVI (full batch), SGLD (``pyro.plate(subsample_size=M)`` draws the
    minibatch), ArviZ (the finished chain replayed on the full data for pointwise log-likelihoods) and
    prediction (the test inputs, ``y=None``). It returns (mean, scale) of y for the examples it saw.
    """

    def __init__(self, d_in: int, hidden: int, groups: int, prior_scale: float = 1.0):
        self.groups = groups
        self.subsample_size = None
        prior = {"name": "gaussian", "scale": prior_scale}
        self.het_net = pyrobnn.random_module("het", _mlp(d_in, hidden, 2), prior=prior)
        self.hom_net = pyrobnn.random_module("hom", _mlp(d_in, hidden, 1), prior=prior)
        self.hier_net = pyrobnn.random_module("hier", _mlp(d_in, hidden, 1), prior=prior)
        self.flat_net = pyrobnn.random_module("flat", _mlp(d_in, hidden, 1), prior=prior)

    def _observe(self, mean, scale, y, n):
        with pyro.plate("data", n, subsample_size=self.subsample_size) as idx:
            pyro.sample("y", dist.Normal(mean[idx], scale[idx] if scale.dim() else scale),
                        obs=None if y is None else y[idx])
        return idx

    # the network runs on the whole batch it is given; the plate picks the minibatch's rows. Keep the
    # data small (this example's) or index x by the plate first for large data.
    def heteroscedastic(self, x, g=None, y=None):
        out = self.het_net(x)
        mean, scale = out[:, 0], F.softplus(out[:, 1]) + 1e-3
        self._observe(mean, scale, y, x.shape[0])
        return mean, scale

    def homoscedastic(self, x, g=None, y=None):
        sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
        mean = self.hom_net(x)[:, 0]
        self._observe(mean, sigma, y, x.shape[0])
        return mean, sigma.expand(mean.shape)

    def hierarchical(self, x, g, y=None):
        mu_b = pyro.sample("mu_b", dist.Normal(0.0, 1.0))
        tau = pyro.sample("tau", dist.HalfNormal(0.5))
        with pyro.plate("groups", self.groups):
            b = pyro.sample("b", dist.Normal(mu_b, tau))
        sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
        mean = self.hier_net(x)[:, 0] + b[g]
        self._observe(mean, sigma, y, x.shape[0])
        return mean, sigma.expand(mean.shape)

    def pooled(self, x, g=None, y=None):
        sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
        mean = self.flat_net(x)[:, 0]
        self._observe(mean, sigma, y, x.shape[0])
        return mean, sigma.expand(mean.shape)

    def net_of(self, model):
        return {self.heteroscedastic: self.het_net, self.homoscedastic: self.hom_net,
                self.hierarchical: self.hier_net, self.pooled: self.flat_net}[model]


def _metrics(means, scales, y):
    """RMSE of the predictive mean and the mean NLL of the predictive mixture of S Gaussians."""
    S = means.shape[0]
    lp = dist.Normal(means, scales).log_prob(y)                    # [S, B]
    nll = -(torch.logsumexp(lp, 0) - math.log(S)).mean()
    return {"rmse": float((means.mean(0) - y).square().mean().sqrt()), "nll": float(nll)}


def run_svi(model, data, steps, lr, num_samples, seed, init_loc_fn):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = MeanField(model, init_loc_fn=init_loc_fn)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": lr}), TraceMeanField_ELBO())
    args = (data["x_train"], data["g_train"], data["y_train"])
    t0 = time.perf_counter()
    losses = [svi.step(*args) for _ in range(steps)]
    seconds = time.perf_counter() - t0
    means, scales = [], []
    for _ in range(num_samples):  # one guide draw at a time, the network run on the whole test set
        m, s = _one_guide_draw(model, guide, data)
        means.append(m)
        scales.append(s)
    out = _metrics(torch.stack(means), torch.stack(scales), data["y_test"])
    out.update(final_loss_per_example=losses[-1] / len(data["y_train"]), seconds=seconds)
    return out


@torch.no_grad()
def _one_guide_draw(model, guide, data):
    tr = pyro.poutine.trace(guide).get_trace(data["x_train"], data["g_train"], data["y_train"])
    return pyro.poutine.replay(model, tr)(data["x_test"], data["g_test"])


def run_sgld(models, model, data, samples, warmup, thin, step_size, batch, seed, init_loc_fn):
    pyro.set_rng_seed(seed)
    # the chain starts at the network's initial weights (as SVI's guide does), other sites at their median
    kernel = SGLD(model, step_size=step_size, thin=thin, init_strategy=init_loc_fn)
    mcmc = pyro.infer.MCMC(kernel, num_samples=samples, warmup_steps=warmup, disable_progbar=True)
    t0 = time.perf_counter()
    models.subsample_size = batch
    try:
        mcmc.run(data["x_train"], data["g_train"], data["y_train"])
    finally:
        models.subsample_size = None
    seconds = time.perf_counter() - t0
    draws = mcmc.get_samples()
    with torch.no_grad():
        means, scales = [], []
        for i in range(samples):
            cond = pyro.poutine.condition(model, data={k: v[i] for k, v in draws.items()})
            m, s = cond(data["x_test"], data["g_test"])
            means.append(m)
            scales.append(s)
    out = _metrics(torch.stack(means), torch.stack(scales), data["y_test"])
    out["seconds"] = seconds
    return out, mcmc


def arviz_view(mcmc, data, scalar_sites):
    """LOO of the training data and a summary of the scalar sites, through pyrobnn.to_inference_data."""
    import arviz as az

    from pyrobnn import arviz_compat
    idata = pyrobnn.to_inference_data(mcmc, data=None, posterior_predictive=False)
    view = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # az.loo warns on high Pareto k; the share of them is reported
        loo = arviz_compat.loo(idata)   # az.loo on either ArviZ line
    view["elpd_loo"] = loo["elpd_loo"]
    view["pareto_k_above_0.7"] = float((loo["pareto_k"] > 0.7).mean())
    names = [s for s in scalar_sites if s in idata.posterior]
    if names:
        summ = az.summary(idata, var_names=names, kind="stats")
        view["summary"] = {k: {c: float(summ.loc[k, c]) for c in ("mean", "sd")} for k in summ.index}
    return view


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/custom_model")
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--svi-steps", type=int, default=3000)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--samples", type=int, default=100, help="SGLD draws kept (and SVI predictive draws)")
    p.add_argument("--warmup", type=int, default=3000, help="SGLD warm-up updates")
    p.add_argument("--thin", type=int, default=20, help="SGLD updates per kept draw")
    p.add_argument("--step-size", type=float, default=1e-4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    data = load_data(args.split_seed, args.groups)
    torch.manual_seed(args.seed)
    models = Models(data["x_train"].shape[1], args.hidden, args.groups)
    pairs = {"heteroscedastic": (models.heteroscedastic, models.homoscedastic),
             "hierarchical": (models.hierarchical, models.pooled)}
    results = {"n_train": len(data["y_train"]), "n_test": len(data["y_test"]), "args": vars(args)}
    for experiment, (model, baseline) in pairs.items():
        for name, m in (("model", model), ("baseline", baseline)):
            key = f"{experiment}/{name}"
            svi = run_svi(m, data, args.svi_steps, args.lr, args.samples, args.seed, models.net_of(m).init_loc_fn)
            sgld, mcmc = run_sgld(models, m, data, args.samples, args.warmup, args.thin, args.step_size, args.batch,
                                  args.seed, models.net_of(m).init_loc_fn)
            sgld["arviz"] = arviz_view(mcmc, data, ["sigma", "tau", "mu_b", "b"])
            results[key] = {"svi": svi, "sgld": sgld}
            print(f"{key:28s} SVI  rmse {svi['rmse']:.4f} nll {svi['nll']:.4f} ({svi['seconds']:.0f} s) | "
                  f"SGLD rmse {sgld['rmse']:.4f} nll {sgld['nll']:.4f} elpd_loo {sgld['arviz']['elpd_loo']:.1f} "
                  f"({sgld['seconds']:.0f} s)", flush=True)
    results["wall_seconds"] = time.perf_counter() - t_start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    lines = ["| model | SVI test RMSE | SVI test NLL | SGLD test RMSE | SGLD test NLL | SGLD elpd_loo (train) |",
             "|---|---|---|---|---|---|"]
    for key in (k for k in results if "/" in k):
        r = results[key]
        lines.append(f"| {key} | {r['svi']['rmse']:.4f} | {r['svi']['nll']:.4f} | {r['sgld']['rmse']:.4f} | "
                     f"{r['sgld']['nll']:.4f} | {r['sgld']['arviz']['elpd_loo']:.1f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print(f"wall {results['wall_seconds']:.0f} s; wrote {out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
