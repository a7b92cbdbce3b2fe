"""Test-time augmentation for a Bayesian LeNet-5 and a deep ensemble on Fashion-MNIST.

Compares, for a mean-field Bayesian LeNet-5 (S weight draws from the guide) and an ensemble of
deterministic LeNet-5s: no augmentation, classic TTA (all draws see the same A augmentations), per-draw
TTA (each draw its own A augmentations), and the policy found by greedy policy search on a validation
split (per-draw); plus a linear probe on central vs mean (MeTTA) embeddings of the penultimate layer.
Both models are trained with the default augmentation (random ±2 px shift + horizontal flip).

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python examples/tta_fashion.py \
        --train 10000 --val 2000 --test 2000 --epochs 5 > runs/tta/log.txt 2>&1

Writes ``<out>/results.json``, ``<out>/policy_{bnn,ensemble}.json``, the figure, and prints the
markdown tables.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

import pyrobnn
import pyrobnn.models as models
from pyrobnn.data import load_fashion_mnist
from pyrobnn.inference import fit
from pyrobnn.inference.tta import (AugmentedLoader, Draws, Policy, default_policy, embeddings, evaluate_tta,
                                   greedy_policy_search, linear_probe, sample_pool, tta_predict)


def train_deterministic(net, loader, epochs, lr, seed):
    torch.manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    for e in range(epochs):
        loader.set_epoch(e)
        for xb, yb in loader.batches():
            loss = F.cross_entropy(net(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.eval()


def gen(seed):
    return torch.Generator().manual_seed(seed)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=10000, help="training images (a fixed random subset of 60k)")
    p.add_argument("--val", type=int, default=2000, help="validation images (held out of the training set)")
    p.add_argument("--test", type=int, default=2000, help="test images (a fixed random subset; 0 = all 10k)")
    p.add_argument("--epochs", type=int, default=5, help="epochs for the BNN and every ensemble member")
    p.add_argument("--members", type=int, default=5)
    p.add_argument("--draws", type=int, default=5, help="S weight draws of the BNN")
    p.add_argument("--augs", type=int, default=4, help="A augmentations per draw (classic / per-draw TTA)")
    p.add_argument("--pool", type=int, default=16, help="greedy search pool size (incl. the identity)")
    p.add_argument("--max-policy", type=int, default=4)
    p.add_argument("--probe-augs", type=int, default=4, help="augmentations averaged in the mean embeddings")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/tta")
    p.add_argument("--figure", default="docs/figures/tta_fashion.png")
    p.add_argument("--replot", metavar="RESULTS_JSON", help="only reprint the tables and redraw the figure")
    a = p.parse_args(argv)
    if a.replot:
        with open(a.replot) as f:
            results = json.load(f)
        print_tables(results)
        plot(results, a.figure)
        return
    os.makedirs(a.out, exist_ok=True)
    torch.manual_seed(a.seed)
    clock = {}

    ds = load_fashion_mnist()
    perm = torch.randperm(len(ds.x_train), generator=gen(a.seed))
    tr, va = perm[:a.train], perm[a.train:a.train + a.val]
    x_tr, y_tr, x_va, y_va = ds.x_train[tr], ds.y_train[tr], ds.x_train[va], ds.y_train[va]
    if a.test:
        te = torch.randperm(len(ds.x_test), generator=gen(a.seed + 1))[:a.test]
        x_te, y_te = ds.x_test[te], ds.y_test[te]
    else:
        x_te, y_te = ds.x_test, ds.y_test
    print(f"train {len(x_tr)}  val {len(x_va)}  test {len(x_te)}", flush=True)
    train_policy = default_policy()

    # -- models --------------------------------------------------------------------------------------
    t = time.time()
    bnn = pyrobnn.bayesian(models.build("lenet5"), prior={"name": "gaussian", "scale": 1.0, "layerwise": True},
                           guide="mean-field", likelihood="categorical", dataset_size=len(x_tr))
    hist = fit(bnn, AugmentedLoader(x_tr, y_tr, train_policy, batch_size=128, seed=a.seed), a.epochs, lr=a.lr,
               seed=a.seed, progress=False, callbacks=[lambda _, rec: print("  BNN epoch", rec, flush=True)])
    clock["train_bnn_s"] = time.time() - t
    print(f"BNN trained in {clock['train_bnn_s']:.0f}s; last epoch {hist[-1]}", flush=True)
    t = time.time()
    nets = []
    for m in range(a.members):
        torch.manual_seed(a.seed * 100 + m)
        net = models.build("lenet5")
        nets.append(train_deterministic(net, AugmentedLoader(x_tr, y_tr, train_policy, batch_size=128,
                                                             seed=a.seed * 100 + m), a.epochs, a.lr, a.seed * 100 + m))
        print(f"  member {m} trained ({time.time() - t:.0f}s)", flush=True)
    clock["train_ensemble_s"] = time.time() - t

    sources = {"bnn": Draws.from_bnn(bnn, a.draws, generator=gen(a.seed + 2)),
               "ensemble": Draws.from_ensemble(nets)}
    pool = sample_pool(a.pool, gen(a.seed + 3))
    results = {"args": vars(a), "pool": [s.to_list() for s in pool], "models": {}}

    for name, draws in sources.items():
        t = time.time()
        S = len(draws)
        rows = {}
        g = gen(a.seed + 10)
        rows["none"] = (S, evaluate_tta(tta_predict(draws, x_te, mode="none"), y_te))
        rows["classic"] = (S * a.augs, evaluate_tta(tta_predict(draws, x_te, train_policy, a.augs, "classic", g), y_te))
        rows["per-draw"] = (S * a.augs, evaluate_tta(tta_predict(draws, x_te, train_policy, a.augs, "per-draw", g), y_te))
        print(f"[{name}] TTA rows in {time.time() - t:.0f}s", flush=True)
        t = time.time()
        search = greedy_policy_search(draws, x_va, y_va, pool, max_policy_size=a.max_policy, mode="per-draw",
                                      generator=gen(a.seed + 4))
        search.policy.save(os.path.join(a.out, f"policy_{name}.json"))
        assert Policy.load(os.path.join(a.out, f"policy_{name}.json")) == search.policy
        clock[f"search_{name}_s"] = time.time() - t
        print(f"[{name}] search in {clock[f'search_{name}_s']:.0f}s: chosen {search.chosen}, objective "
              f"{search.objective}; {search.stopped}\n  policy {search.policy}", flush=True)
        K = len(search.policy)
        rows["greedy"] = (S * K, evaluate_tta(tta_predict(draws, x_te, search.policy, K, "per-draw", g), y_te))
        # mean embeddings: the penultimate layer (the input of fc2, after the ReLU) of one network: the
        # BNN's first weight draw, the ensemble's member 0 (members' features are not aligned).
        t = time.time()
        emb_draws = Draws(draws.members[:1], draws.roots[:1])
        probes = {}
        for label, pol, A in (("central", None, 0), ("mean (default policy)", train_policy, a.probe_augs),
                              ("mean (greedy policy)", search.policy, max(a.probe_augs, K))):
            ge = gen(a.seed + 20)
            f_va = embeddings(emb_draws, "fc2", x_va, pol, A, capture="input", generator=ge)
            f_te = embeddings(emb_draws, "fc2", x_te, pol, A, capture="input", generator=ge)
            r = linear_probe(f_va, y_va, f_te, y_te)
            r.pop("probs")
            probes[label] = r
        clock[f"probe_{name}_s"] = time.time() - t
        results["models"][name] = {
            "rows": {k: {"forwards_per_image": n, **v} for k, (n, v) in rows.items()},
            "search": {"chosen": search.chosen, "objective": search.objective, "stopped": search.stopped,
                       "pool_objective": search.pool_objective, "policy": search.policy.to_dict()},
            "probes": probes}
        print(f"[{name}] {json.dumps(results['models'][name]['rows'], indent=None)}", flush=True)
        print(f"[{name}] probes {json.dumps(probes)}", flush=True)
    results["clock"] = clock
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print_tables(results)
    plot(results, a.figure)


LABELS = {"none": "no augmentation", "classic": "classic TTA (default policy)",
          "per-draw": "per-draw TTA (default policy)", "greedy": "greedy-searched policy (per-draw)"}
MODEL_LABELS = {"bnn": "Bayesian LeNet-5 (mean-field)", "ensemble": "ensemble of deterministic LeNet-5"}


def print_tables(results):
    a = results["args"]
    print("\n| model | method | forwards / image | accuracy | NLL | calibrated NLL |\n|---|---|---|---|---|---|")
    for name, m in results["models"].items():
        S = a["draws"] if name == "bnn" else a["members"]
        for k, r in m["rows"].items():
            print(f"| {MODEL_LABELS[name]}, S={S} | {LABELS[k]} | {r['forwards_per_image']} | {r['accuracy']:.4f} | "
                  f"{r['nll']:.4f} | {r['calibrated_nll']:.4f} |")
    print("\n| model | embeddings (input of fc2) | probe accuracy | probe NLL | probe calibrated NLL |\n|---|---|---|---|---|")
    for name, m in results["models"].items():
        who = "Bayesian LeNet-5 (one weight draw)" if name == "bnn" else "deterministic LeNet-5 (member 0)"
        for k, r in m["probes"].items():
            print(f"| {who} | {k} | {r['accuracy']:.4f} | {r['nll']:.4f} | {r['calibrated_nll']:.4f} |")
    print("\nsearched policies:")
    for name, m in results["models"].items():
        print(f"  {name}: {Policy.from_dict(m['search']['policy'])}  (pool indices {m['search']['chosen']}, "
              f"validation objective {[round(v, 4) for v in m['search']['objective']]}; {m['search']['stopped']})")
    print("clock (s):", {k: round(v) for k, v in results["clock"].items()})


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    keys = list(LABELS)
    width = 0.38
    for i, (name, m) in enumerate(results["models"].items()):
        xs = [j + (i - 0.5) * width for j in range(len(keys))]
        axes[0].bar(xs, [m["rows"][k]["calibrated_nll"] for k in keys], width, label=MODEL_LABELS[name])
        axes[1].bar(xs, [m["rows"][k]["accuracy"] for k in keys], width, label=MODEL_LABELS[name])
        obj = m["search"]["objective"]
        axes[2].plot(range(1, len(obj) + 1), [-v for v in obj], "o-", label=MODEL_LABELS[name])
    for ax, title in ((axes[0], "test calibrated NLL (lower is better)"), (axes[1], "test accuracy")):
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels(["none", "classic", "per-draw", "greedy"])
        ax.set_title(title)
    lo = min(min(m["rows"][k]["accuracy"] for k in keys) for m in results["models"].values())
    axes[1].set_ylim(lo - 0.02, None)
    lo = min(min(m["rows"][k]["calibrated_nll"] for k in keys) for m in results["models"].values())
    axes[0].set_ylim(lo * 0.9, None)
    axes[2].set_xlabel("sub-policies in the greedy policy")
    axes[2].set_ylabel("validation calibrated NLL")
    axes[2].set_title("greedy policy search")
    axes[2].legend(fontsize=8)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"figure written to {path}")


if __name__ == "__main__":
    main()
