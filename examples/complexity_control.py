"""Complexity control with a λ-hypernetwork (Grebenkova 2020): one guide for every KL weight λ vs one model per λ.

Setup (Grebenkova 2020's): a 784-100-10 ReLU network, Gaussian prior N(0, 0.1) on every weight and bias,
mean-field Gaussian posterior (local reparameterisation), generalised ELBO
log p(D|w) − λ KL(q‖p). Two routes to a posterior at each λ of a grid:

  (a) separate: one MeanField per λ, trained by ``pyrobnn.inference.fit`` with constant KL weight λ;
  (b) hypernetwork: one ``HyperMeanField`` trained by ``fit_complexity`` with 5 λ ~ U(Λ) per batch,
      read off at each λ of the grid with ``guide.at(λ)``.

Both routes use Adam, the same learning rate, schedule (constant for half the epochs then linear to
0), batch size, epochs and seed. For each λ and route the weights (all of them, biases included) are
pruned by lowest signal-to-noise |μ|/σ — equivalently highest relative density exp(−μ²/2σ²) — and
the test accuracy of the pruned posterior predictive (``--num-samples`` draws) is recorded against the
fraction removed. Training cost of each route is measured around the training calls only, as process
CPU time (the honest cost on a shared machine; the example runs single-threaded) and wall time.

    python examples/complexity_control.py --dataset mnist5k --epochs 50
    python examples/complexity_control.py --dataset fashion --train-limit 10000 --epochs 20

Writes ``runs/complexity_control/<dataset>.json``, ``docs/figures/complexity_control_<dataset>.png``
and prints the Markdown table used in docs/RESULTS.md;
``--summarize runs/complexity_control/mnist5k.json runs/complexity_control/fashion.json`` prints the
hypernetwork-minus-separate comparison from those files.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import pyro
import torch

import pyrobnn
from pyrobnn.data import load_fashion_mnist, load_mnist5k
from pyrobnn.guides import HyperMeanField
from pyrobnn.inference import fit
from pyrobnn.inference.complexity import complexity_loss, fit_complexity, pruning_curve, removable_fraction, with_guide
from pyrobnn.models import build

FRACTIONS = [0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99]


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=["mnist5k", "fashion"], default="mnist5k")
    p.add_argument("--train-limit", type=int, default=None, help="use the first N training examples")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--grid", type=str, default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0")
    p.add_argument("--kinds", type=str, default="linear", help="comma-separated HyperMeanField kinds")
    p.add_argument("--lams-per-batch", type=int, default=5)
    p.add_argument("--prior-variance", type=float, default=0.1)
    p.add_argument("--num-samples", type=int, default=8, help="posterior draws per test prediction")
    p.add_argument("--tolerance", type=float, default=0.01, help="accuracy loss counted as 'no notable loss'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=str, default="runs/complexity_control")
    p.add_argument("--figures", type=str, default="docs/figures")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--summarize", nargs="+", metavar="JSON", default=None,
                   help="only print the hypernetwork-minus-separate table from these result files")
    return p.parse_args(argv)


def _data(a):
    ds = load_mnist5k() if a.dataset == "mnist5k" else load_fashion_mnist(limit_train=a.train_limit)
    x_tr, y_tr = ds.x_train, ds.y_train
    if a.train_limit and a.dataset == "mnist5k":
        x_tr, y_tr = x_tr[:a.train_limit], y_tr[:a.train_limit]
    return x_tr.flatten(1), y_tr, ds.x_test.flatten(1), ds.y_test


def _bnn(a, n, guide):
    torch.manual_seed(a.seed)   # same initial network for every model
    net = build("mlp", in_features=784, out_features=10, hidden=[100], flatten=False)
    prior = pyrobnn.priors.Gaussian(scale=math.sqrt(a.prior_variance))
    return pyrobnn.bayesian(net, prior=prior, guide=guide, likelihood="categorical", dataset_size=n)


@torch.no_grad()
def _train_loss(bnn, x, y, lam, seed):
    """−L_λ per datum on the whole training set (one noise draw, fixed seed)."""
    pyro.set_rng_seed(seed)
    return complexity_loss(bnn, x, y, [lam]).item() / len(x)


def summarize(paths):
    """Markdown rows: each hypernetwork minus the separate models, over the λ grid of a result file."""
    lines = ["| | CPU cost | unpruned accuracy: range, mean \\|Δ\\| | 80 %-pruned accuracy (λ > 0): range "
             "| −L_λ/N gap: range |", "|---|---|---|---|---|"]
    for path in paths:
        r = json.loads(Path(path).read_text())
        sep = r["routes"]["separate"]
        i80 = r["fractions"].index(0.8)
        lams = list(sep["curves"])
        for name, route in r["routes"].items():
            if name == "separate":
                continue
            d0 = [100 * (route["curves"][k][0]["accuracy"] - sep["curves"][k][0]["accuracy"]) for k in lams]
            d80 = [100 * (route["curves"][k][i80]["accuracy"] - sep["curves"][k][i80]["accuracy"])
                   for k in lams if float(k) > 0]
            gap = [route["train_loss"][k] - sep["train_loss"][k] for k in lams]
            ratio = route["total_cpu_seconds"] / sep["total_cpu_seconds"]
            lines.append(f"| {r['args']['dataset']} {name} | {ratio:.2f}× | {min(d0):+.1f} … {max(d0):+.1f} pp, "
                         f"{sum(map(abs, d0)) / len(d0):.2f} pp | {min(d80):+.1f} … {max(d80):+.1f} pp | "
                         f"{min(gap):+.3f} … {max(gap):+.3f} |")
    return "\n".join(lines)


def main(argv=None):
    a = _args(argv)
    if a.summarize:
        print(summarize(a.summarize))
        return 0
    torch.set_num_threads(a.threads)
    grid = [float(v) for v in a.grid.split(",")]
    kinds = [k for k in a.kinds.split(",") if k]
    lam_range = (min(grid), max(grid))
    x_tr, y_tr, x_te, y_te = _data(a)
    n = len(x_tr)
    sched = ("linear-decay", a.epochs / 2)
    print(f"{a.dataset}: {n} train / {len(x_te)} test, 784-100-10, prior N(0, {a.prior_variance}), "
          f"{a.epochs} epochs, Adam lr {a.lr}, batch {a.batch_size}, λ grid {grid}", flush=True)
    results = {"args": vars(a), "n_train": n, "n_test": len(x_te), "grid": grid, "fractions": FRACTIONS,
               "routes": {}}

    # warm-up (untimed): the first SVI steps of a process pay one-off costs that would bias the first route
    warm = _bnn(a, n, "mean-field")
    fit(warm, (x_tr[:2 * a.batch_size], y_tr[:2 * a.batch_size]), 1, lr=a.lr, batch_size=a.batch_size,
        progress=False)
    warm = _bnn(a, n, lambda m, **kw: HyperMeanField(m, lam_range=lam_range, kind="linear", **kw))
    fit_complexity(warm, (x_tr[:2 * a.batch_size], y_tr[:2 * a.batch_size]), 1, lr=a.lr, batch_size=a.batch_size,
                   progress=False)
    del warm

    # (a) separately trained models, one per λ
    sep = {"train_seconds": {}, "train_cpu_seconds": {}, "curves": {}, "train_loss": {}}
    for lam in grid:
        bnn = _bnn(a, n, "mean-field")
        t0, c0 = time.perf_counter(), time.process_time()
        fit(bnn, (x_tr, y_tr), a.epochs, lr=a.lr, batch_size=a.batch_size, kl_warmup=lam, lr_schedule=sched,
            seed=a.seed, progress=False)
        sep["train_seconds"][lam] = time.perf_counter() - t0
        sep["train_cpu_seconds"][lam] = time.process_time() - c0
        sep["train_loss"][lam] = _train_loss(bnn, x_tr, y_tr, lam, a.seed)
        sep["curves"][lam] = pruning_curve(bnn, bnn.autoguide, x_te, y_te, FRACTIONS, a.num_samples, seed=a.seed)
        c = sep["curves"][lam]
        print(f"  separate λ={lam:.2f}: {sep['train_seconds'][lam]:.1f}s wall, "
              f"{sep['train_cpu_seconds'][lam]:.1f}s CPU, acc {c[0]['accuracy']:.4f}, "
              f"at 80% removed {c[3]['accuracy']:.4f}, removable {removable_fraction(c, a.tolerance):.2f}", flush=True)
    sep["total_seconds"] = sum(sep["train_seconds"].values())
    sep["total_cpu_seconds"] = sum(sep["train_cpu_seconds"].values())
    results["routes"]["separate"] = sep

    # (b) one hypernetwork per kind, read at each λ
    for kind in kinds:
        bnn = _bnn(a, n, lambda m, **kw: HyperMeanField(m, lam_range=lam_range, kind=kind, **kw))
        t0, c0 = time.perf_counter(), time.process_time()
        hist = fit_complexity(bnn, (x_tr, y_tr), a.epochs, lr=a.lr, lams_per_batch=a.lams_per_batch,
                              batch_size=a.batch_size, lr_schedule=sched, seed=a.seed, progress=False)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        route = {"total_seconds": seconds, "total_cpu_seconds": cpu, "curves": {}, "train_loss": {},
                 "final_epoch_loss_per_datum": hist[-1]["loss"] / n}
        for lam in grid:
            route["train_loss"][lam] = _train_loss(bnn, x_tr, y_tr, lam, a.seed)
            route["curves"][lam] = pruning_curve(bnn, bnn.autoguide.at(lam), x_te, y_te, FRACTIONS, a.num_samples,
                                                 seed=a.seed)
            c = route["curves"][lam]
            print(f"  hyper-{kind} λ={lam:.2f}: acc {c[0]['accuracy']:.4f}, at 80% removed {c[3]['accuracy']:.4f}, "
                  f"removable {removable_fraction(c, a.tolerance):.2f}", flush=True)
        print(f"  hyper-{kind}: trained in {seconds:.1f}s wall, {cpu:.1f}s CPU (all separate models: "
              f"{sep['total_seconds']:.1f}s wall, {sep['total_cpu_seconds']:.1f}s CPU)", flush=True)
        results["routes"][f"hyper-{kind}"] = route

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{a.dataset}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, path)
    fig_path = Path(a.figures) / f"complexity_control_{a.dataset}.png"
    _plot(results, fig_path, a)
    print(f"wrote {path} and {fig_path}")
    print(_table(results, a))


def _plot(results, path, a):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pyrobnn.plots import savefig

    routes = list(results["routes"])
    grid = results["grid"]
    cmap = plt.get_cmap("viridis")
    ncol = max(len(routes), 3)
    fig, axes = plt.subplots(2, ncol, figsize=(4.2 * ncol, 7.2), squeeze=False)
    for ax, r in zip(axes[0], routes):
        for i, lam in enumerate(grid):
            c = results["routes"][r]["curves"][lam]
            ax.plot([100 * row["fraction"] for row in c], [row["accuracy"] for row in c], marker=".",
                    color=cmap(i / max(len(grid) - 1, 1)), label=f"λ={lam:g}")
        secs = results["routes"][r]["total_cpu_seconds"]
        ax.set(title=f"{r} ({secs:.0f} CPU-s training)", xlabel="% of parameters removed (lowest |μ|/σ)",
               ylabel="test accuracy", ylim=(0, 1))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6, ncol=2, loc="lower left")
    for ax in axes[0][len(routes):]:
        ax.axis("off")
    acc_ax, rem_ax, gap_ax = axes[1][:3]
    for j, r in enumerate(routes):
        curves = results["routes"][r]["curves"]
        i80 = results["fractions"].index(0.8)
        acc_ax.plot(grid, [100 * curves[lam][0]["accuracy"] for lam in grid], marker="o", color=f"C{j}", label=r)
        acc_ax.plot(grid, [100 * curves[lam][i80]["accuracy"] for lam in grid], marker="x", ls="--", color=f"C{j}")
        rem_ax.plot(grid, [100 * removable_fraction(curves[lam], a.tolerance) for lam in grid], marker="o",
                    color=f"C{j}", label=r)
        if r != "separate":
            gap_ax.plot(grid, [results["routes"][r]["train_loss"][lam] - results["routes"]["separate"]["train_loss"][lam]
                               for lam in grid], marker="o", color=f"C{j}", label=r)
    acc_ax.set(title="test acc.: unpruned (—), 80 % removed (--)", xlabel="λ", ylabel="%")
    rem_ax.set(title=f"% removable (≤ {100 * a.tolerance:g} pp acc. loss)", xlabel="λ", ylabel="%")
    gap_ax.set(title="train −L_λ/N: hypernetwork − separate", xlabel="λ", ylabel="nats per example")
    for ax in (acc_ax, rem_ax, gap_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[1][3:]:
        ax.axis("off")
    fig.suptitle(f"{results['args']['dataset']} ({results['n_train']} train): separate models per λ vs λ-hypernetwork")
    fig.tight_layout()
    savefig(fig, path)


def _table(results, a):
    routes = list(results["routes"])
    lines = ["| λ | " + " | ".join(f"{r}: acc / acc@80% / removable / −L_λ/N" for r in routes) + " |",
             "|---" * (len(routes) + 1) + "|"]
    for lam in results["grid"]:
        cells = []
        for r in routes:
            c = results["routes"][r]["curves"][lam]
            cells.append(f"{c[0]['accuracy']:.3f} / {c[3]['accuracy']:.3f} / "
                         f"{100 * removable_fraction(c, a.tolerance):.0f}% / {results['routes'][r]['train_loss'][lam]:.3f}")
        lines.append(f"| {lam:g} | " + " | ".join(cells) + " |")
    lines.append("| training time, all λ: CPU (wall) | " + " | ".join(
        f"{results['routes'][r]['total_cpu_seconds']:.0f} s ({results['routes'][r]['total_seconds']:.0f} s)"
        for r in routes) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
