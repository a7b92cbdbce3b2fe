"""Test-time augmentation for a Bayesian LeNet-5 and a deep ensemble on Fashion-MNIST.

Compares, for a mean-field Bayesian LeNet-5 (S weight draws from the guide) and an ensemble of
deterministic LeNet-5s: no augmentation, classic TTA (all draws see the same A augmentations), per-draw
TTA (each draw its own A augmentations), and the policy found by greedy policy search on a validation
split held out of the *training* set (per-draw); plus a linear probe on central vs mean (MeTTA)
embeddings of the penultimate layer. All networks are trained with the default augmentation (random
±2 px shift + horizontal flip).

Bayesian LeNet-5 recipe: start the mean-field guide's means at the weights of a trained deterministic
LeNet-5 (ensemble member 0 with ``--init-from-member``, or a separate one trained ``--pretrain-epochs``
epochs), σ = ``--init-scale`` (0.01, log σ ≈ −4.6), then run SVI on the full ELBO (prior N(0, 1/fan_in),
KL weight warmed up linearly over the first epochs, ``--kl-warmup 0,R``; cosine learning rate).
Without either option the guide starts at a fresh network's initial weights.

Full-data run (the one in docs/RESULTS.md)::

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python examples/tta_fashion.py --train 0 --val 5000 --test 0 \
        --member-epochs 8 --init-from-member --bnn-epochs 8 --lr-schedule cosine --kl-warmup 0,2 \
        --out runs/tta/full > runs/tta/full.log 2>&1

Every stage is checkpointed under ``<out>/state`` (per epoch while training, per row while evaluating):
re-running the same command after a kill resumes where it stopped. Writes ``<out>/results.json``,
``<out>/policy_{bnn,ensemble}.json``, the figure, and prints the markdown tables.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

import pyrobnn
import pyrobnn.models as models
from pyrobnn.data import load_fashion_mnist
from pyrobnn.inference import fit
from pyrobnn.inference import train_deterministic as train_baseline
from pyrobnn.inference.tta import (AugmentedLoader, Draws, Policy, default_policy, embeddings, evaluate_tta,
                                   greedy_policy_search, linear_probe, sample_pool, tta_predict)
from pyrobnn.io import flatten_state, read_state, unflatten_state, write_state


@torch.no_grad()
def _accuracy(net, x, y, chunk=1000):
    net.eval()
    correct = sum((net(x[i:i + chunk]).argmax(-1) == y[i:i + chunk]).sum().item() for i in range(0, len(x), chunk))
    return correct / len(x)


class _EpochCheckpoint:
    """One file, rewritten after every epoch: the net and the optimiser state."""

    def __init__(self, path, net, opt, tag):
        self.path, self.net, self.opt, self.tag = path, net, opt, tag

    def prepare(self):
        pass

    def save(self, history, epoch, step, data_seed=None):
        skel, tensors = flatten_state(self.opt.state_dict(), prefix="opt")
        tensors.update({f"net.{k}": v for k, v in self.net.state_dict().items()})
        write_state(self.path, tensors, {"kind": "tta-deterministic", "epoch": epoch, "state": skel})
        return self.path

    def restore(self, history, batches):
        if not os.path.exists(self.path):
            return None
        tensors, meta = read_state(self.path)
        self.net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        self.opt.load_state_dict(unflatten_state(meta["state"], tensors))
        start = int(meta["epoch"])
        print(f"  {self.tag} resumed at epoch {start} from {self.path}", flush=True)
        return self.path, start, 0


def train_deterministic(net, loader, epochs, lr, seed, schedule=None, checkpoint=None, val=None, tag=""):
    """Adam on cross-entropy for ``epochs`` epochs (:func:`pyrobnn.inference.train_deterministic`); with
    ``checkpoint`` (a path) the net and optimiser state are written atomically after every epoch and a
    re-run resumes from the last one (the loader's order and augmentations depend only on (seed, epoch,
    batch), so the resumed run is the same run)."""

    def report(net, rec):
        msg = f"  {tag} epoch {rec['epoch']}/{epochs} loss {rec['loss']:.4f} ({rec['seconds']:.0f}s)"
        if val is not None:
            msg += f" val acc {_accuracy(net, *val):.4f}"
        print(msg, flush=True)

    store = (lambda net, opt: _EpochCheckpoint(checkpoint, net, opt, tag)) if checkpoint else None
    return train_baseline(net, loader, epochs=epochs, lr=lr, seed=seed, lr_schedule=schedule, callbacks=[report],
                          checkpoints=store, resume=store is not None)


def gen(seed):
    return torch.Generator().manual_seed(seed)


class Stages:
    """Results of finished evaluation rows, kept in a JSON file so a re-run skips them."""

    def __init__(self, path):
        self.path = path
        self.done = {}
        if os.path.exists(path):
            with open(path) as f:
                self.done = json.load(f)

    def get(self, key, compute):
        if key not in self.done:
            t0, c0 = time.time(), time.process_time()
            value = compute()
            self.done[key] = {"value": value, "wall_s": time.time() - t0, "cpu_s": time.process_time() - c0}
            tmp = f"{self.path}.tmp"
            with open(tmp, "w") as f:
                json.dump(self.done, f)
            os.replace(tmp, self.path)
        return self.done[key]["value"]

    def seconds(self, prefix):
        return sum(v["cpu_s"] for k, v in self.done.items() if k.startswith(prefix))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=10000,
                   help="training images: a fixed random subset of the 60k; 0 = all that are not validation")
    p.add_argument("--val", type=int, default=2000, help="validation images (held out of the training set)")
    p.add_argument("--test", type=int, default=2000, help="test images (a fixed random subset; 0 = all 10k)")
    p.add_argument("--epochs", type=int, default=5, help="default for --member-epochs and --bnn-epochs")
    p.add_argument("--member-epochs", type=int, help="epochs of every ensemble member")
    p.add_argument("--bnn-epochs", type=int, help="SVI epochs of the BNN")
    p.add_argument("--pretrain-epochs", type=int, default=0,
                   help="epochs of the deterministic LeNet-5 whose weights initialise the guide means (0: none)")
    p.add_argument("--init-from-member", action="store_true",
                   help="initialise the guide means at ensemble member 0's weights (instead of --pretrain-epochs)")
    p.add_argument("--init-scale", type=float, default=0.01, help="initial σ of the mean-field guide")
    p.add_argument("--kl-warmup", default=None, help="'hold,ramp' epochs of linear KL warm-up (default: none)")
    p.add_argument("--lr-schedule", choices=("none", "cosine"), default="none")
    p.add_argument("--members", type=int, default=5)
    p.add_argument("--draws", type=int, default=5, help="S weight draws of the BNN")
    p.add_argument("--augs", type=int, default=4, help="A augmentations per draw (classic / per-draw TTA)")
    p.add_argument("--pool", type=int, default=16, help="greedy search pool size (incl. the identity)")
    p.add_argument("--max-policy", type=int, default=4)
    p.add_argument("--probe-augs", type=int, default=4, help="augmentations averaged in the mean embeddings")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (shared machine: 1)")
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
    a.member_epochs = a.member_epochs or a.epochs
    a.bnn_epochs = a.bnn_epochs or a.epochs
    kl_warmup = None if a.kl_warmup is None else tuple(float(v) for v in a.kl_warmup.split(","))
    torch.set_num_threads(a.threads)
    state_dir = os.path.join(a.out, "state")
    os.makedirs(state_dir, exist_ok=True)
    torch.manual_seed(a.seed)
    t_start, c_start = time.time(), time.process_time()

    ds = load_fashion_mnist()
    perm = torch.randperm(len(ds.x_train), generator=gen(a.seed))
    va = perm[:a.val]
    tr = perm[a.val:] if a.train == 0 else perm[a.val:a.val + a.train]
    if len(tr) + len(va) > len(ds.x_train) or len(tr) == 0:
        raise ValueError(f"--train {a.train} + --val {a.val} exceed the {len(ds.x_train)} training images")
    x_tr, y_tr, x_va, y_va = ds.x_train[tr], ds.y_train[tr], ds.x_train[va], ds.y_train[va]
    if a.test:
        te = torch.randperm(len(ds.x_test), generator=gen(a.seed + 1))[:a.test]
        x_te, y_te = ds.x_test[te], ds.y_test[te]
    else:
        x_te, y_te = ds.x_test, ds.y_test
    print(f"train {len(x_tr)}  val {len(x_va)} (held out of the training set)  test {len(x_te)}", flush=True)
    train_policy = default_policy()
    schedule = None if a.lr_schedule == "none" else a.lr_schedule
    clock = {}

    def loader(seed):
        return AugmentedLoader(x_tr, y_tr, train_policy, batch_size=128, seed=seed)

    # -- ensemble ------------------------------------------------------------------------------------
    c0 = time.process_time()
    nets = []
    for m in range(a.members):
        s = a.seed * 100 + m
        torch.manual_seed(s)
        nets.append(train_deterministic(models.build("lenet5"), loader(s), a.member_epochs, a.lr, s, schedule,
                                        os.path.join(state_dir, f"member{m}.safetensors"), (x_va, y_va),
                                        f"member {m}"))
    clock["train_ensemble_cpu_s"] = time.process_time() - c0

    # -- Bayesian LeNet-5 ----------------------------------------------------------------------------
    c0 = time.process_time()
    init_net = models.build("lenet5")
    if a.init_from_member:
        init_net = nets[0]
    elif a.pretrain_epochs:
        s = a.seed * 100 + 99  # not an ensemble member's seed
        torch.manual_seed(s)
        init_net = train_deterministic(models.build("lenet5"), loader(s), a.pretrain_epochs, a.lr, s, schedule,
                                       os.path.join(state_dir, "pretrain.safetensors"), (x_va, y_va), "pretrain")
    bnn = pyrobnn.bayesian(init_net, prior={"name": "gaussian", "scale": 1.0, "layerwise": True},
                           guide={"name": "mean-field", "init_scale": a.init_scale}, likelihood="categorical",
                           dataset_size=len(x_tr))
    hist = fit(bnn, loader(a.seed), a.bnn_epochs, lr=a.lr, seed=a.seed, progress=False, kl_warmup=kl_warmup,
               lr_schedule=schedule, val=(x_va, y_va), num_samples=4,
               checkpoint_dir=os.path.join(state_dir, "bnn"), resume=True,
               callbacks=[lambda _, rec: print("  BNN epoch", {k: round(v, 4) if isinstance(v, float) else v
                                                               for k, v in rec.items()}, flush=True)])
    clock["train_bnn_cpu_s"] = time.process_time() - c0
    print(f"BNN: {len(hist)} epochs; last {hist[-1]}", flush=True)

    sources = {"bnn": Draws.from_bnn(bnn, a.draws, generator=gen(a.seed + 2)),
               "ensemble": Draws.from_ensemble(nets)}
    pool = sample_pool(a.pool, gen(a.seed + 3))
    results = {"args": vars(a), "pool": [s.to_list() for s in pool], "models": {},
               "training": {"bnn": hist.records}}
    stages = Stages(os.path.join(state_dir, "eval.json"))

    for name, draws in sources.items():
        S = len(draws)
        rows = {}
        rows["none"] = (S, stages.get(f"{name}/none", lambda: evaluate_tta(
            tta_predict(draws, x_te, mode="none"), y_te)))
        for i, mode in enumerate(("classic", "per-draw")):
            rows[mode] = (S * a.augs, stages.get(f"{name}/{mode}", lambda: evaluate_tta(
                tta_predict(draws, x_te, train_policy, a.augs, mode, gen(a.seed + 10 + i)), y_te)))
        print(f"[{name}] TTA rows {json.dumps(rows)}", flush=True)

        def search_fn():
            r = greedy_policy_search(draws, x_va, y_va, pool, max_policy_size=a.max_policy, mode="per-draw",
                                     generator=gen(a.seed + 4))
            return {"chosen": r.chosen, "objective": r.objective, "stopped": r.stopped,
                    "pool_objective": r.pool_objective, "policy": r.policy.to_dict()}
        search = stages.get(f"{name}/search", search_fn)
        policy = Policy.from_dict(search["policy"])
        policy.save(os.path.join(a.out, f"policy_{name}.json"))
        assert Policy.load(os.path.join(a.out, f"policy_{name}.json")) == policy
        print(f"[{name}] search: chosen {search['chosen']}, objective {search['objective']}; {search['stopped']}\n"
              f"  policy {policy}", flush=True)
        K = len(policy)
        rows["greedy"] = (S * K, stages.get(f"{name}/greedy", lambda: evaluate_tta(
            tta_predict(draws, x_te, policy, K, "per-draw", gen(a.seed + 12)), y_te)))
        # mean embeddings: the penultimate layer (the input of fc2, after the ReLU) of one network: the
        # BNN's first weight draw, the ensemble's member 0 (members' features are not aligned). The probe
        # is fitted on the validation images' embeddings and tested on the test images'.
        emb_draws = Draws(draws.members[:1], draws.roots[:1])
        probes = {}
        for label, pol, A in (("central", None, 0), ("mean (default policy)", train_policy, a.probe_augs),
                              ("mean (greedy policy)", policy, max(a.probe_augs, K))):
            def probe_fn():
                ge = gen(a.seed + 20)
                f_va = embeddings(emb_draws, "fc2", x_va, pol, A, capture="input", generator=ge)
                f_te = embeddings(emb_draws, "fc2", x_te, pol, A, capture="input", generator=ge)
                r = linear_probe(f_va, y_va, f_te, y_te)
                r.pop("probs")
                return r
            probes[label] = stages.get(f"{name}/probe/{label}", probe_fn)
        results["models"][name] = {
            "rows": {k: {"forwards_per_image": n, **v} for k, (n, v) in rows.items()},
            "search": search, "probes": probes}
        print(f"[{name}] {json.dumps(results['models'][name]['rows'], indent=None)}", flush=True)
        print(f"[{name}] probes {json.dumps(probes)}", flush=True)
        clock[f"eval_{name}_cpu_s"] = stages.seconds(f"{name}/")
    clock["this_process_cpu_s"] = time.process_time() - c_start
    clock["this_process_wall_s"] = time.time() - t_start
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
    if results.get("training", {}).get("bnn"):
        last = results["training"]["bnn"][-1]
        print(f"BNN last epoch: {json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in last.items()})}")
    print("clock (s):", {k: round(v) for k, v in results["clock"].items()})


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    keys = list(LABELS)
    width = 0.38
    for i, (name, m) in enumerate(results["models"].items()):
        xs = [j + (i - 0.5) * width for j in range(len(keys))]
        axes[0].bar(xs, [m["rows"][k]["calibrated_nll"] for k in keys], width, label=MODEL_LABELS[name])
        axes[1].bar(xs, [m["rows"][k]["accuracy"] for k in keys], width, label=MODEL_LABELS[name])
        obj = m["search"]["objective"]
        axes[2].plot(range(1, len(obj) + 1), [-v for v in obj], "o-", label=MODEL_LABELS[name])
        probe_keys = list(m["probes"])
        axes[3].bar([j + (i - 0.5) * width for j in range(len(probe_keys))],
                    [m["probes"][k]["calibrated_nll"] for k in probe_keys], width, label=MODEL_LABELS[name])
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
    axes[3].set_xticks(range(len(probe_keys)))
    axes[3].set_xticklabels(["central", "mean\n(default policy)", "mean\n(greedy policy)"])
    axes[3].set_title("linear probe on fc2 input: test calibrated NLL")
    lo = min(min(r["calibrated_nll"] for r in m["probes"].values()) for m in results["models"].values())
    axes[3].set_ylim(lo * 0.9, None)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"figure written to {path}")


if __name__ == "__main__":
    main()
