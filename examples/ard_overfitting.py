"""ARD against overfitting: does a Bayesian network's train ROC-AUC track its test ROC-AUC?

After an empirical-Bayes ARD study of BNN overfitting (Basov; see docs/bibliography.md).

Breast cancer (sklearn, 569 × 30, binary), a fresh standardised 80/20 split per seed, one hidden ReLU
layer of width h. Three methods per (h, seed):

* ``plain``        — the deterministic network, Adam (lr 1e-2), full batch, no regularisation,
                     ``--epochs-plain`` epochs: long enough to drive the train loss to ~0 (overfit).
* ``ard-empirical`` — ``prior="ard"`` (empirical-Bayes ARD, KL = ½ Σ log(1 + γ²)), mean-field guide with
                     the study's μ = γ·σ parameterisation (init σ = 0.1), SVI (``pyrobnn.inference.fit``),
                     Adam, full batch, ``--epochs-bayes`` epochs.
* ``ard-hierarchical`` — ``prior={"name": "ard", "mode": "hierarchical", "a": --ard-a, "b": --ard-b}``
                     (α ~ Gamma(a, b) per input unit, w ~ N(0, 1/α); default the library's
                     Gamma(0.1, 1e-3)), mean-field guide, softplus parameterisation (a location far
                     from 0 such as log α ≈ 4 moves too slowly with Adam in the γ parameterisation).

Bayesian predictions are posterior-predictive means over ``--num-samples`` draws. For each method the
script reports train and test ROC-AUC per width (mean ± sd over seeds), the Pearson correlation
between train and test AUC over all (width, seed) runs and over the per-width means, a PNG, and a
Markdown table. Each finished run is appended to ``<out>/runs.jsonl`` with its result-relevant
arguments, the git commit and the modified files; re-running skips finished runs and refuses to mix
runs made with other arguments.

    python examples/ard_overfitting.py study                # the study (105 runs, 1455 s wall on the shared 2 cores)
    python examples/ard_overfitting.py relevance            # feature relevance with 10 noise columns
    python examples/ard_overfitting.py tally --json J --figure F.png   # summarise a relevance run's noise draws

``relevance`` appends 10 standard-normal columns to breast cancer (or ``--dataset diabetes``, Gaussian
likelihood) and, for each ``--noise-seeds`` draw, ranks the inputs with every
:func:`pyrobnn.relevance` statistic after fitting hierarchical ARD (one α per input; ``--hidden 0``
is logistic / linear regression), next to two non-ARD references: the marginal |correlation| and the
conditional |coefficient / standard error| of one multivariate fit. ``--inference nuts`` replaces the
mean-field SVI fit by draws of the exact posterior (Pyro's NUTS on the BNN's model; ``--chains`` chains
of ``--warmup`` + ``--samples`` each, pooled; split R-hat and ESS are recorded) and ``--rows all`` fits
on every example instead of the 80 % split. The commands and results are in docs/RESULTS.md (ARD section) and
docs/studies/ard_relevance.md; Gamma(1, 1) measured better than the default.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import pyrobnn
from pyrobnn.data import load_breast_cancer
from pyrobnn.inference import fit
from pyrobnn.metrics import roc_auc
from pyrobnn.models import build
from pyrobnn.priors.ard import DEFAULT_A, DEFAULT_B

METHODS = ("plain", "ard-empirical", "ard-hierarchical")
# arguments that change a study run's result: stored with every record, and a re-run refuses to mix
_STUDY_ARGS = ("epochs_plain", "lr_plain", "epochs_bayes", "lr_bayes", "init_scale", "num_samples", "ard_a", "ard_b")


def _provenance(a):
    """The study's result-relevant arguments plus the git commit and whether the code was modified."""
    import subprocess
    root = Path(__file__).resolve().parent.parent

    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return None
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "pyrobnn", "inference", "models",
                "examples/ard_overfitting.py")
    return {"args": {k: getattr(a, k) for k in _STUDY_ARGS}, "commit": (git("rev-parse", "HEAD") or "").strip() or None,
            "modified_files": sorted(l[3:] for l in dirty.splitlines() if l.strip()) if dirty else []}


# -- one run -----------------------------------------------------------------------------------------------
def _train_plain(net, x, y, epochs, lr):
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    yf = y.float()
    for _ in range(epochs):
        loss = F.binary_cross_entropy_with_logits(net(x).squeeze(-1), yf)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    return lambda z: torch.sigmoid(net(z).squeeze(-1))


def _train_bayes(net, method, x, y, a):
    if method == "ard-empirical":
        prior, guide = "ard", {"name": "mean-field", "parameterization": "gamma", "init_scale": a.init_scale}
    else:
        prior = {"name": "ard", "mode": "hierarchical", "a": a.ard_a, "b": a.ard_b}
        guide = {"name": "mean-field", "parameterization": "softplus", "init_scale": a.init_scale}
    bnn = pyrobnn.bayesian(net, prior=prior, guide=guide, likelihood="bernoulli", dataset_size=len(x))
    # no KL warm-up (fit's "auto" would add one for empirical ARD): the recipe docs/RESULTS.md measured
    hist = fit(bnn, (x, y), a.epochs_bayes, lr=a.lr_bayes, batch_size=len(x), progress=False, seed=a.run_seed,
               kl_warmup=None)
    return (lambda z: bnn.predict(z, a.num_samples)), hist[-1]["elbo_per_datum"]


def run_one(method, width, seed, a):
    ds = load_breast_cancer(seed=seed)
    torch.manual_seed(1000 + seed)
    net = build("mlp", in_features=ds.x_train.shape[1], out_features=1, hidden=[width])
    t0 = time.perf_counter()
    a.run_seed = seed
    extra = {}
    if method == "plain":
        predict = _train_plain(net, ds.x_train, ds.y_train, a.epochs_plain, a.lr_plain)
    else:
        predict, extra["final_elbo_per_datum"] = _train_bayes(net, method, ds.x_train, ds.y_train, a)
    with torch.no_grad():
        rec = {"method": method, "width": width, "seed": seed,
               "train_auc": roc_auc(predict(ds.x_train), ds.y_train),
               "test_auc": roc_auc(predict(ds.x_test), ds.y_test),
               "seconds": round(time.perf_counter() - t0, 2), **extra}
    return rec


# -- summaries ---------------------------------------------------------------------------------------------
def pearson(u, v):
    n = len(u)
    if n < 2:
        return float("nan")
    mu, mv = sum(u) / n, sum(v) / n
    su = math.sqrt(sum((x - mu) ** 2 for x in u))
    sv = math.sqrt(sum((y - mv) ** 2 for y in v))
    if su == 0 or sv == 0:
        return float("nan")  # a constant AUC (e.g. train AUC = 1 everywhere) has no correlation
    return sum((x - mu) * (y - mv) for x, y in zip(u, v)) / (su * sv)


def _mean_sd(vals):
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarise(records, widths):
    out = {}
    for m in METHODS:
        rs = [r for r in records if r["method"] == m]
        if not rs:
            continue
        per_w = {}
        for w in widths:
            rw = [r for r in rs if r["width"] == w]
            if rw:
                per_w[w] = {"train": _mean_sd([r["train_auc"] for r in rw]),
                            "test": _mean_sd([r["test_auc"] for r in rw]), "n": len(rw)}
        seeds = sorted({r["seed"] for r in rs})
        within = [pearson([r["train_auc"] for r in rs if r["seed"] == s], [r["test_auc"] for r in rs if r["seed"] == s])
                  for s in seeds]
        within = [c for c in within if not math.isnan(c)]
        out[m] = {"per_width": per_w,
                  "pearson_runs": pearson([r["train_auc"] for r in rs], [r["test_auc"] for r in rs]),
                  "pearson_within_seed": _mean_sd(within) if within else (float("nan"), float("nan")),
                  "n_seeds_with_correlation": len(within),
                  "pearson_width_means": pearson([v["train"][0] for v in per_w.values()],
                                                 [v["test"][0] for v in per_w.values()]),
                  "n_runs": len(rs)}
    return out


def markdown(summary, widths):
    lines = ["| width | " + " | ".join(f"{m} train | {m} test" for m in summary) + " |",
             "|---:|" + "---:|---:|" * len(summary)]
    for w in widths:
        cells = []
        for m, s in summary.items():
            v = s["per_width"].get(w)
            cells += [f"{v['train'][0]:.4f} ± {v['train'][1]:.4f}", f"{v['test'][0]:.4f} ± {v['test'][1]:.4f}"] \
                if v else ["–", "–"]
        lines.append(f"| {w} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("| method | runs | Pearson(train, test) over runs | over per-width means | "
                 "within a seed, across widths (mean ± sd over seeds) | "
                 "mean test AUC (all widths) | test AUC h=1 → h=max | mean train − test gap |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    for m, s in summary.items():
        pw = s["per_width"]
        tests = [v["test"][0] for v in pw.values()]
        gaps = [v["train"][0] - v["test"][0] for v in pw.values()]
        first, last = pw[min(pw)], pw[max(pw)]
        ws_mean, ws_sd = s["pearson_within_seed"]
        lines.append(f"| {m} | {s['n_runs']} | {s['pearson_runs']:.3f} | {s['pearson_width_means']:.3f} | "
                     f"{ws_mean:.3f} ± {ws_sd:.3f} (n={s['n_seeds_with_correlation']}) | "
                     f"{statistics.fmean(tests):.4f} | {first['test'][0]:.4f} → {last['test'][0]:.4f} | "
                     f"{statistics.fmean(gaps):+.4f} |")
    return "\n".join(lines)


def plot(summary, records, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, (m, s) in enumerate(summary.items()):
        ws = sorted(s["per_width"])
        for key, ls in (("train", "--"), ("test", "-")):
            mean = [s["per_width"][w][key][0] for w in ws]
            sd = [s["per_width"][w][key][1] for w in ws]
            axes[0].errorbar(ws, mean, yerr=sd, ls=ls, marker="o", ms=3, capsize=2, color=f"C{i}",
                             label=f"{m} {key}")
        rs = [r for r in records if r["method"] == m]
        axes[1].scatter([r["train_auc"] for r in rs], [r["test_auc"] for r in rs], s=12, color=f"C{i}",
                        label=f"{m} (r = {s['pearson_runs']:.2f})")
    axes[0].set(xscale="log", xlabel="hidden width", ylabel="ROC-AUC", title="breast cancer: train (--) / test (—)")
    axes[0].legend(fontsize=7)
    axes[1].set(xlabel="train ROC-AUC", ylabel="test ROC-AUC", title="every (width, seed) run")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def study(a):
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "runs.jsonl"
    records = [json.loads(l) for l in log.read_text().splitlines() if l.strip()] if log.exists() else []
    prov = _provenance(a)
    mixed = [r for r in records if r.get("args") != prov["args"]]
    if mixed:
        raise SystemExit(f"{log} holds {len(mixed)} runs made with other arguments ({mixed[0].get('args')}); "
                         f"use another --out")
    done = {(r["method"], r["width"], r["seed"]) for r in records}
    widths = [int(w) for w in a.widths.split(",")]
    t0 = time.perf_counter()
    for seed in range(a.seeds):
        for w in widths:
            for m in METHODS:
                if (m, w, seed) in done:
                    continue
                rec = {**run_one(m, w, seed, a), **prov}
                records.append(rec)
                with open(log, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(json.dumps(rec), flush=True)
    summary = summarise(records, widths)
    table = markdown(summary, widths)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "table.md").write_text(table + "\n")
    plot(summary, records, out / "ard_overfitting.png")
    print(f"\n{table}\n\nstudy wall time this invocation: {time.perf_counter() - t0:.0f} s; "
          f"files in {out}/ (runs.jsonl, summary.json, table.md, ard_overfitting.png)")


# -- relevance with noise columns ---------------------------------------------------------------------------
def _relevance_data(name, split_seed, rows="train"):
    """Standardised inputs/targets, likelihood name and feature names of a real dataset: the 80 % training
    split (``rows="train"``) or every example (``rows="all"``; relevance is a property of the fitted
    posterior, not a test-set metric, so all the data may inform it)."""
    if name == "breast_cancer":
        if rows == "all":
            from sklearn.datasets import load_breast_cancer as _load
            raw = _load()
            x = torch.tensor(raw.data, dtype=torch.float32)
            return (x - x.mean(0)) / x.std(0), torch.tensor(raw.target), "bernoulli", list(raw.feature_names)
        ds = load_breast_cancer(seed=split_seed)
        return ds.x_train, ds.y_train, "bernoulli", list(ds.meta["feature_names"])
    from sklearn.datasets import load_diabetes  # 442 × 10 regression; pyrobnn.data has no loader for it
    raw = load_diabetes()
    x, y = torch.tensor(raw.data, dtype=torch.float32), torch.tensor(raw.target, dtype=torch.float32)
    if rows == "train":
        train = torch.randperm(len(x), generator=torch.Generator().manual_seed(split_seed))[: int(0.8 * len(x))]
        x, y = x[train], y[train]
    return (x - x.mean(0)) / x.std(0), (y - y.mean()) / y.std(), "gaussian", list(raw.feature_names)


def _fit_nuts(net, prior, lik, x, y, a, seed):
    """The exact hierarchical-ARD posterior by NUTS (Pyro's sampler on the BNN's own model; ``--chains``
    chains run one after the other, chain c seeded ``seed + 1000·c``; weights sampled directly, α in log
    space): returns the BNN, the pooled draws ``{site: [chains·S, *shape]}`` and the worst split R-hat
    (across chains) and smallest effective sample size over the weight and α sites."""
    import pyro
    from pyro.infer import MCMC, NUTS
    from pyro.ops.stats import effective_sample_size, split_gelman_rubin
    bnn = pyrobnn.bayesian(net, prior=prior, likelihood=lik, dataset_size=len(x), local_reparameterization=False)
    per_chain = []
    for c in range(a.chains):
        pyro.set_rng_seed(seed + 1000 * c)
        kernel = NUTS(bnn.model, target_accept_prob=0.9, max_tree_depth=a.max_tree_depth, jit_compile=True,
                      ignore_jit_warnings=True)
        mcmc = MCMC(kernel, num_samples=a.samples, warmup_steps=a.warmup, disable_progbar=True)
        mcmc.run(x, y)
        per_chain.append(mcmc.get_samples())
    samples = {k: torch.cat([d[k] for d in per_chain]) for k in per_chain[0]}
    chains = {k: torch.stack([d[k] for d in per_chain]).double() for k in per_chain[0]}  # [chain, S, ...]
    # α are positive and skewed: diagnose them in log space, where the sampler moves
    chains = {k: (v.log() if k.endswith(".alpha") else v) for k, v in chains.items()}
    rhat = max(float(split_gelman_rubin(v, chain_dim=0, sample_dim=1).max()) for v in chains.values())
    ess = min(float(effective_sample_size(v, chain_dim=0, sample_dim=1).min()) for v in chains.values())
    return bnn, samples, {"max_split_rhat": round(rhat, 4), "min_ess": round(ess, 1)}


def _ranks(scores):
    order = torch.argsort(torch.as_tensor(scores, dtype=torch.float64), descending=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(1, len(order) + 1)
    return ranks


def _noise_summary(scores, n_noise):
    """How the last ``n_noise`` inputs (the noise) rank among all: ranks, the best noise rank, how many
    real features rank below the best noise column, and the fraction of (real, noise) pairs ordered
    correctly (1 = every real feature above every noise column)."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    ranks = _ranks(scores)
    real, noise = scores[:-n_noise], scores[-n_noise:]
    d = len(scores)
    return {"noise_ranks": sorted(ranks[-n_noise:].tolist()), "best_noise_rank": int(ranks[-n_noise:].min()),
            "real_below_best_noise": int((real < noise.max()).sum()),
            "pair_auc": float((real[:, None] > noise[None, :]).double().mean()),
            "all_noise_in_bottom_third": bool(ranks[-n_noise:].min() > d - d // 3),
            "all_noise_last": bool(ranks[-n_noise:].min() > d - n_noise)}


def _conditional_z(x, y, likelihood):
    """|coefficient / standard error| of every input in one multivariate fit (reference, not ARD): ordinary
    least squares for the Gaussian likelihood; for Bernoulli, L2-penalised (C = 1) logistic regression
    with the Laplace standard errors from the penalised Hessian (an unpenalised fit does not exist on
    near-separable breast cancer). ``[d]`` float64."""
    import numpy as np
    xs, ys = x.double().numpy(), y.double().numpy()
    design = np.c_[np.ones(len(xs)), xs]
    if likelihood == "gaussian":
        beta, *_ = np.linalg.lstsq(design, ys, rcond=None)
        resid = ys - design @ beta
        cov = np.linalg.inv(design.T @ design) * (resid @ resid / (len(ys) - design.shape[1]))
    else:
        from sklearn.linear_model import LogisticRegression
        model = LogisticRegression(C=1.0, max_iter=10000).fit(xs, ys)
        beta = np.r_[model.intercept_, model.coef_[0]]
        p = model.predict_proba(xs)[:, 1]
        penalty = np.eye(design.shape[1])
        penalty[0, 0] = 0.0  # sklearn does not penalise the intercept
        cov = np.linalg.inv(design.T @ (design * (p * (1 - p))[:, None]) + penalty)
    return torch.from_numpy(np.abs(beta / np.sqrt(np.diag(cov)))[1:])


def relevance_experiment(a):
    """Per noise seed: append ``--n-noise`` N(0, 1) columns, fit hierarchical ARD (one α per input),
    rank the inputs with every relevance statistic, and (reference, not ARD) by the marginal
    |correlation| with the target. Writes ``<out>/relevance_<tag>.json`` and a PNG for the first seed."""
    from pyrobnn.relevance import STATISTICS, plot_relevance
    x0, y, lik, names0 = _relevance_data(a.dataset, a.split_seed, a.rows)
    if a.features:
        keep = [f.strip() for f in a.features.split(",")]
        missing = [f for f in keep if f not in names0]
        if missing:
            raise SystemExit(f"unknown --features {missing}; {a.dataset} has {names0}")
        x0, names0 = x0[:, [names0.index(f) for f in keep]], keep
    hidden = [a.hidden] if a.hidden > 0 else []  # --hidden 0: logistic / linear regression
    tag = f"{a.dataset}{'_' + '-'.join(names0).replace(' ', '') if a.features else ''}_h{a.hidden}_a{a.ard_a:g}_b{a.ard_b:g}"
    tag += f"_e{a.epochs_bayes}" if a.inference == "svi" else \
        f"_nuts{a.warmup}-{a.samples}" + (f"x{a.chains}" if a.chains > 1 else "")
    tag += "_allrows" if a.rows == "all" else ""
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    per_seed = []
    for noise_seed in [int(s) for s in a.noise_seeds.split(",")]:
        g = torch.Generator().manual_seed(noise_seed)
        x = torch.cat([x0, torch.randn(len(x0), a.n_noise, generator=g)], 1)
        names = names0 + [f"noise {i}" for i in range(a.n_noise)]
        torch.manual_seed(noise_seed)
        net = build("mlp", in_features=x.shape[1], out_features=1, hidden=hidden)
        prior = {"name": "ard", "mode": "hierarchical", "a": a.ard_a, "b": a.ard_b}
        t0 = time.process_time()
        if a.inference == "svi":
            bnn = pyrobnn.bayesian(net, prior=prior, guide={"name": "mean-field", "init_scale": a.init_scale},
                                   likelihood=lik, dataset_size=len(x))
            hist = fit(bnn, (x, y), a.epochs_bayes, lr=a.lr_bayes, batch_size=len(x), progress=False, seed=noise_seed)
            samples, fitted = None, {"final_elbo_per_datum": hist[-1]["elbo_per_datum"]}
        else:
            bnn, samples, fitted = _fit_nuts(net, prior, lik, x, y, a, noise_seed)
        rec = {"noise_seed": noise_seed, "cpu_s": round(time.process_time() - t0, 1), **fitted, "statistics": {}}
        for stat in STATISTICS:
            rel = pyrobnn.relevance(bnn, samples=samples, statistic=stat)
            rec["statistics"][stat] = {**_noise_summary(rel.inputs, a.n_noise), "scores": rel.inputs.tolist()}
            if stat == a.statistic and not per_seed:
                plot_relevance(rel, out / f"relevance_{tag}.png", feature_names=names,
                               highlight=range(x.shape[1] - a.n_noise, x.shape[1]), highlight_label="noise column",
                               title=f"hierarchical ARD, {a.dataset} ({a.rows} rows) + {a.n_noise} noise columns\n"
                                     f"hidden {a.hidden}, Gamma({a.ard_a:g}, {a.ard_b:g}), "
                                     + (f"SVI {a.epochs_bayes} epochs" if a.inference == "svi" else
                                        f"NUTS {a.chains} × ({a.warmup} + {a.samples})")
                                     + f", noise seed {noise_seed}, statistic {stat}")
        xc, yc = x - x.mean(0), y.double() - y.double().mean()
        corr = (xc.double() * yc[:, None]).sum(0) / (xc.double().norm(dim=0) * yc.norm())
        rec["statistics"]["marginal-abs-correlation (reference, not ARD)"] = _noise_summary(corr.abs(), a.n_noise)
        rec["statistics"]["conditional-abs-z (reference, not ARD)"] = _noise_summary(_conditional_z(x, y, lik), a.n_noise)
        per_seed.append(rec)
        print(json.dumps({"noise_seed": noise_seed, "cpu_s": rec["cpu_s"], **fitted,
                          **{k: [v["best_noise_rank"], v["real_below_best_noise"], round(v["pair_auc"], 3)]
                             for k, v in rec["statistics"].items()}}), flush=True)
    summary = {}
    for stat in per_seed[0]["statistics"]:
        rows = [r["statistics"][stat] for r in per_seed]
        summary[stat] = {"best_noise_rank": [r["best_noise_rank"] for r in rows],
                         "real_below_best_noise": [r["real_below_best_noise"] for r in rows],
                         "pair_auc_mean": statistics.fmean(r["pair_auc"] for r in rows),
                         "seeds_all_noise_in_bottom_third": sum(r["all_noise_in_bottom_third"] for r in rows),
                         "seeds_all_noise_last": sum(r["all_noise_last"] for r in rows)}
    prov = _provenance(a)
    res = {"commit": prov["commit"], "modified_files": prov["modified_files"],
           "dataset": a.dataset, "features": a.features or "all", "n_inputs": x.shape[1], "n_noise": a.n_noise, "hidden": a.hidden, "a": a.ard_a,
           "b": a.ard_b, "inference": a.inference, "rows": a.rows,
           **({"epochs": a.epochs_bayes, "lr": a.lr_bayes, "init_scale": a.init_scale} if a.inference == "svi" else
              {"warmup": a.warmup, "samples": a.samples, "chains": a.chains, "max_tree_depth": a.max_tree_depth}),
           "split_seed": a.split_seed, "feature_names": names, "summary": summary, "runs": per_seed}
    (out / f"relevance_{tag}.json").write_text(json.dumps(res, indent=1))
    fitted_by = f"SVI {a.epochs_bayes} epochs" if a.inference == "svi" else \
        f"NUTS {a.chains} chain(s) × ({a.warmup} warm-up + {a.samples} draws)"
    print(f"\n{a.dataset} ({a.rows} rows), {x.shape[1]} inputs ({a.n_noise} noise), hidden {a.hidden}, "
          f"Gamma({a.ard_a:g}, {a.ard_b:g}), {fitted_by}; per noise seed: best noise rank | real features below "
          f"the best noise | pair AUC")
    print("| statistic | best noise rank | real features below the best noise column | mean pair AUC | "
          "seeds with all noise in bottom third | seeds with all noise last |")
    print("|---|---|---|---:|---:|---:|")
    for stat, v in summary.items():
        print(f"| {stat} | {v['best_noise_rank']} | {v['real_below_best_noise']} | {v['pair_auc_mean']:.3f} | "
              f"{v['seeds_all_noise_in_bottom_third']}/{len(per_seed)} | {v['seeds_all_noise_last']}/{len(per_seed)} |")
    print(f"files: {out}/relevance_{tag}.json, .png")


def tally(a):
    """Across the noise draws of one ``relevance`` JSON (``--json``): how often every noise column lands in the
    bottom third, the distribution of the best noise rank per statistic, and how often each real feature
    ranks below the best noise column (``--statistic``). Prints both and draws them (``--figure``)."""
    if not a.json:
        raise SystemExit("tally needs --json <relevance_*.json written by the relevance command>")
    if not Path(a.json).is_file():
        raise SystemExit(f"tally: no file {a.json}")
    res = json.loads(Path(a.json).read_text())
    missing = [k for k in ("runs", "feature_names", "n_noise", "n_inputs", "summary") if k not in res]
    if missing:
        raise SystemExit(f"tally: {a.json} is not a relevance JSON of this example (no {', '.join(missing)})")
    runs, names, n_noise = res["runs"], res["feature_names"], res["n_noise"]
    d = res["n_inputs"]
    stats = [s for s in (a.statistic, "geometric-prior-variance", "marginal-abs-correlation (reference, not ARD)")
             if s in res["summary"]]
    if not stats or stats[0] != a.statistic:
        raise SystemExit(f"--statistic {a.statistic!r} is not in {a.json}; it has {sorted(res['summary'])}")
    threshold = d - d // 3 + 1  # the smallest rank in the bottom third (28 of 40)
    below = [0] * (d - n_noise)
    for run in runs:
        scores = run["statistics"][a.statistic]["scores"]
        best_noise = max(scores[d - n_noise:])
        for i in range(d - n_noise):
            below[i] += scores[i] < best_noise
    print(f"{a.json}: {len(runs)} noise draws, {d} inputs ({n_noise} noise); bottom third = rank >= {threshold}")
    for s in stats:
        best = res["summary"][s]["best_noise_rank"]
        print(f"  {s}: all noise in the bottom third in {sum(r >= threshold for r in best)}/{len(best)} draws; "
              f"best noise rank median {statistics.median(best):g}, min {min(best)}, max {max(best)}")
    order = sorted(range(d - n_noise), key=lambda i: -below[i])
    print(f"  real features ranked below the best noise column ({a.statistic}), draws out of {len(runs)}: "
          + ", ".join(f"{names[i]} {below[i]}" for i in order if below[i]))
    if a.figure:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from pyrobnn.plots import savefig
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1.25, 1]})
        bins = [r - 0.5 for r in range(1, d - n_noise + 3)]
        axes[0].axvspan(threshold - 0.5, d - n_noise + 1.5, color="0.9", label=f"bottom third (rank ≥ {threshold})")
        for k, s in enumerate(stats):
            best = res["summary"][s]["best_noise_rank"]
            label = f"{s}: {sum(r >= threshold for r in best)}/{len(best)} draws in the bottom third"
            if "reference" in s:  # one tall spike: named in the legend, not drawn, so the ARD histograms stay legible
                axes[0].plot([], [], " ", label=f"{label}\n(ranks {min(best)}–{max(best)}, not drawn)")
                continue
            axes[0].hist(best, bins=bins, histtype="bar" if k == 0 else "step", lw=1.6, color=f"C{k}",
                         alpha=0.8 if k == 0 else 1.0, label=label)
        axes[0].set(xlabel=f"rank of the most relevant noise column (of {d})", ylabel="noise draws",
                    title="best noise rank per noise draw")
        axes[0].set_ylim(0, axes[0].get_ylim()[1] * 1.9)  # room for the legend above the bars
        axes[0].legend(fontsize=7, loc="upper left")
        top = [i for i in order if below[i]][:15]
        axes[1].barh([names[i] for i in top][::-1], [below[i] for i in top][::-1], color="C3")
        axes[1].set(xlabel=f"noise draws (of {len(runs)}) where it ranks below the best noise column",
                    title=f"real features that fall among the noise ({a.statistic})")
        axes[1].tick_params(axis="y", labelsize=7)
        fig.suptitle(f"{res['dataset']} + {n_noise} noise columns, hidden {res['hidden']}, "
                     f"Gamma({res['a']:g}, {res['b']:g}), {res['inference']}, {len(runs)} noise draws", fontsize=9)
        fig.tight_layout()
        savefig(fig, a.figure)
        print(f"  figure: {a.figure}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["study", "relevance", "tally"])
    p.add_argument("--widths", default="1,2,4,8,16,32,60")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs-plain", type=int, default=2000)
    p.add_argument("--lr-plain", type=float, default=1e-2)
    p.add_argument("--epochs-bayes", type=int, default=600)
    p.add_argument("--lr-bayes", type=float, default=1e-2)
    p.add_argument("--init-scale", type=float, default=0.1)
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/ard_overfitting")
    # relevance experiment
    p.add_argument("--dataset", choices=["breast_cancer", "diabetes"], default="breast_cancer")
    p.add_argument("--noise-seeds", default="1,2,3,4,5")
    p.add_argument("--n-noise", type=int, default=10)
    p.add_argument("--features", default="", help="comma-separated subset of the dataset's features (default all)")
    p.add_argument("--statistic", default="second-moment", help="relevance statistic drawn in the PNG")
    p.add_argument("--hidden", type=int, default=0, help="hidden width; 0 = logistic / linear regression")
    p.add_argument("--ard-a", type=float, default=DEFAULT_A)
    p.add_argument("--ard-b", type=float, default=DEFAULT_B)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--noise-seed", type=int, default=1)
    p.add_argument("--rows", choices=["train", "all"], default="train",
                   help="relevance: fit on the 80 %% training split or on every example")
    p.add_argument("--inference", choices=["svi", "nuts"], default="svi",
                   help="relevance: mean-field SVI (--epochs-bayes) or NUTS (--warmup, --samples)")
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--max-tree-depth", type=int, default=8)
    p.add_argument("--chains", type=int, default=1, help="NUTS chains per noise draw (run one after another)")
    p.add_argument("--json", default="", help="tally: a relevance_*.json written by the relevance command")
    p.add_argument("--figure", default="", help="tally: where to draw the PNG (none if empty)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    {"study": study, "relevance": relevance_experiment, "tally": tally}[a.what](a)


if __name__ == "__main__":
    main()
