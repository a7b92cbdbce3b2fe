"""Boston housing with SGLD under ``pyro.infer.MCMC``: 4 chains, test RMSE and log-likelihood, an
R-hat/ESS table (function space and weight space) and trace / PPC / reliability plots — one command:

    python examples/boston_sgld.py --out runs/boston_sgld

Set-up (as in Korattikara et al. 2015 and Hernández-Lobato & Adams 2015): one hidden layer of 50 ReLU units, Gaussian priors N(0, 1/fan_in) on the weights
(``--prior iid`` for N(0, 1)), Gaussian
likelihood with a latent noise precision τ ~ Gamma(6, 6) sampled alongside the weights; inputs and
targets standardised on the training split (targets back-transformed for the metrics); a random
90/10 split (``--split-seed``). The model draws its own minibatch of 32 through
``pyro.plate(subsample_size=32)``; SGLD with a polynomially decaying step η_t = a(b + t)^−0.55 over
warm-up (from ``--step-size`` down to ≈0.27 of it), then held constant while draws are kept
(``--decay warmup``, the default: the chain's stationary distribution does not drift while it is
sampled — a step size still decaying then shifts the noise precision's distribution and inflates its
R-hat); ``--decay all`` decays over warm-up and sampling, ``--decay none`` keeps ``--step-size``;
one draw kept every ``--thin`` updates.

Writes into OUT: ``results.json`` / ``results.md`` (metrics, R-hat/ESS), ``inference_data.nc`` (ArviZ),
and, through ``pyrobnn report``, ``report/{trace,ppc,reliability}.png`` and ``report/index.html``.

Published reference points (20 random splits, 50 hidden units; docs/bibliography.md): SGLD test RMSE 3.642
(HSE report), SGLD test log-likelihood −2.306 (Korattikara et al. 2015); PBP 3.01 / −2.57.
This script runs one split by default (``--splits`` for more).
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
import torch

from pyrobnn import arviz_compat


class DecayThenConstant:
    """η_t = decay(min(t, until)): a decaying schedule frozen at its value at update ``until``."""

    def __init__(self, decay, until: int):
        self.decay, self.until = decay, int(until)

    def __call__(self, t: int) -> float:
        return self.decay(min(t, self.until))


def run_split(split_seed: int, args):
    from pyro.infer import MCMC

    import pyrobnn
    from pyrobnn.data import load_boston
    from pyrobnn.diagnostics import function_space_diagnostics
    from pyrobnn.inference import SGLD, ConstantStepSize, PolynomialDecay, SamplePosterior
    from pyrobnn.models import build

    ds = load_boston(test_fraction=0.1, seed=split_seed)
    y_mean, y_std = ds.meta["y_mean"], ds.meta["y_std"]
    y_train = (ds.y_train - y_mean) / y_std
    y_test = (ds.y_test - y_mean) / y_std
    n = ds.x_train.shape[0]
    torch.manual_seed(args.seed)
    pyro.set_rng_seed(args.seed)
    net = build("mlp", in_features=ds.x_train.shape[1], out_features=1, hidden=(args.hidden,))
    prior = {"name": "gaussian", "scale": 1.0, "layerwise": args.prior == "layerwise"}
    bnn = pyrobnn.bayesian(net, prior=prior, likelihood={"name": "gaussian", "scale": "latent"},
                           dataset_size=n, subsample_size=args.batch)
    total = args.warmup + args.samples * args.thin
    # η_0 = --step-size, decaying as a(b + t)^−0.55 to ≈ 0.27 η_0 at the end of the decay
    decay_steps = args.warmup if args.decay == "warmup" else total
    b = max(1.0, decay_steps / 10)
    poly = PolynomialDecay(a=args.step_size * b ** 0.55, b=b, gamma=0.55)
    schedule = {"warmup": DecayThenConstant(poly, args.warmup), "all": poly,
                "none": ConstantStepSize(args.step_size)}[args.decay]
    kernel = SGLD(bnn.model, step_size=schedule, thin=args.thin)
    mcmc = MCMC(kernel, num_samples=args.samples, warmup_steps=args.warmup, num_chains=args.chains,
                disable_progbar=not args.progress)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="num_chains=")
        mcmc.run(ds.x_train, y_train)
    seconds = time.perf_counter() - t0

    post = SamplePosterior.from_mcmc(mcmc, bnn)
    m = post.evaluate(ds.x_test, y_test)
    metrics = {
        "split_seed": split_seed,
        "test_rmse": m["rmse"] * y_std,                     # $1000s
        "test_log_likelihood": -m["nll"] - math.log(y_std),  # per test point, original units
        "train_seconds": seconds,
        "updates_per_chain": total,
        "draws": args.chains * args.samples,
    }
    idata = pyrobnn.to_inference_data(mcmc, test=(ds.x_test, y_test), max_coords=8, seed=0,
                                      attrs={"pyrobnn_metrics": metrics})
    fs = function_space_diagnostics(idata)
    weights = [s for s in bnn.site_priors if s.endswith(".weight")]       # "1.weight", "3.weight"
    posterior = arviz_compat.group(idata, "posterior")
    weight_rhat = float(max(np.nanmax(arviz_compat.rhat(posterior[w].values)) for w in weights))
    table = arviz_compat.summary(idata, var_names=["likelihood.precision"] + [f"{w}_norm" for w in weights],
                                 kind="diagnostics")
    lp = arviz_compat.summary(idata, group="sample_stats", var_names=["lp"], kind="diagnostics") \
        if "lp" in arviz_compat.group(idata, "sample_stats") else None
    metrics.update({f"function_space_{k}": v for k, v in fs.items()})
    metrics["weight_coordinate_rhat_max"] = weight_rhat
    return metrics, idata, table, lp


def markdown(frame) -> str:
    """A pandas DataFrame as a Markdown table (no extra dependency)."""
    cols = list(frame.columns)
    rows = ["| | " + " | ".join(map(str, cols)) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in frame.iterrows():
        rows.append(f"| {name} | " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row) + " |")
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/boston_sgld")
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--samples", type=int, default=400, help="draws kept per chain")
    p.add_argument("--warmup", type=int, default=6000, help="warm-up updates per chain")
    p.add_argument("--thin", type=int, default=100, help="updates per kept draw")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--hidden", type=int, default=50)
    p.add_argument("--step-size", type=float, default=5e-4,
                   help="η at the first update (decays to ≈0.27× of it, see --decay)")
    p.add_argument("--decay", choices=("warmup", "all", "none"), default="warmup",
                   help="warmup: decay over warm-up, then constant while sampling (default); all: decay over "
                        "warm-up and sampling; none: constant --step-size")
    p.add_argument("--prior", choices=("layerwise", "iid"), default="layerwise",
                   help="N(0, 1/fan_in) weight priors (default; mixes faster: weakly identified weights do not "
                        "have to random-walk out to norm ≈ √(#weights)) or N(0, 1) for every weight")
    p.add_argument("--splits", type=int, default=1, help="random 90/10 splits (seeds split-seed, +1, ...)")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    results = []
    for i in range(args.splits):
        metrics, idata, table, lp = run_split(args.split_seed + i, args)
        results.append(metrics)
        print(json.dumps(metrics, indent=2))
        if i == 0:  # the first split's InferenceData, tables and plots
            arviz_compat.write(idata, out / "inference_data.nc")
            first_table, first_lp = table, lp
    summary = {k: float(np.mean([r[k] for r in results])) for k in ("test_rmse", "test_log_likelihood")}
    if args.splits > 1:
        summary.update({f"{k}_se": float(np.std([r[k] for r in results], ddof=1) / math.sqrt(len(results)))
                        for k in ("test_rmse", "test_log_likelihood")})
    report = {"config": vars(args), "splits": results, "mean_over_splits": summary}
    (out / "results.json").write_text(json.dumps(report, indent=2))

    from pyrobnn.cli.commands.report import render
    index = render(out / "inference_data.nc", out / "report")
    r0 = results[0]
    lines = [f"# Boston housing, SGLD, {args.chains} chains × {args.samples} draws (split seed {args.split_seed})",
             "", "| metric | value |", "|---|---|"]
    lines += [f"| test RMSE ($1000s), mean of {args.splits} split(s) | {summary['test_rmse']:.3f} |",
              f"| test log-likelihood, mean of {args.splits} split(s) | {summary['test_log_likelihood']:.3f} |",
              f"| function-space R-hat max / median (first split) | {r0['function_space_rhat_max']:.3f} / "
              f"{r0['function_space_rhat_median']:.3f} |",
              f"| function-space ESS bulk min / median | {r0['function_space_ess_bulk_min']:.0f} / "
              f"{r0['function_space_ess_bulk_median']:.0f} |",
              f"| weight-coordinate R-hat max (not meaningful under symmetries) | {r0['weight_coordinate_rhat_max']:.3f} |",
              f"| sampling time per split (s) | {r0['train_seconds']:.1f} |",
              "", "R-hat / ESS of per-draw scalars (first split):", "", markdown(first_table)]
    if first_lp is not None:
        lines += ["", markdown(first_lp)]
    lines += ["", f"Plots: {index.parent}/trace.png, ppc.png, reliability.png; page {index}"]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    main()
