"""Sparse variational dropout (Molchanov, Ashukha & Vetrov 2017) on Fashion-MNIST, with pyrobnn.

Each run trains one network and writes ``<out>/<tag>.json`` (and resumable checkpoints under
``<out>/<tag>/``); ``table`` gathers the JSON files into the Markdown table of docs/RESULTS.md.

    # deterministic baselines (same architecture, Adam 1e-3, batch 100, lr constant to half then linear to 0)
    python examples/sparse_vd.py run --model lenet300 --method det --epochs 60
    python examples/sparse_vd.py run --model lenet5   --method det --epochs 30
    # sparse VD: log-uniform prior on every weight and bias, AdditiveNoise guide (log σ² init −10,
    # log α clipped from above at 8; --clip-low -8 gives the reference recipe's [−8, 8]), local reparameterisation,
    # KL weight 0 for 5 epochs then linear to 1 by epoch 20, the same optimiser and lr schedule;
    # pruned at log α > 3
    python examples/sparse_vd.py run --model lenet300 --method svd --epochs 60
    python examples/sparse_vd.py run --model lenet5   --method svd --epochs 30
    # recipes with a frozen-mask phase (docs/RESULTS.md; how they were found: docs/studies/sparse_vd_recipe.md).
    # --seed N (N != 0) adds "seedN" to the tag, so the det baseline of that seed is a separate run too.
    # LeNet-5: ×72 within 1 point of the baseline on two random seeds
    python examples/sparse_vd.py run --model lenet5 --method svd --epochs 30 --kl-hold 3 --kl-ramp 8 \
        --finetune-epochs 8 --finetune-lr 3e-3 --threshold 2
    # LeNet-300-100: the frozen-mask phase with weight decay (chosen on the validation split) and the mask
    # by a ×42 compression budget: +0.87 ± 0.07 points above the baseline over 7 random seeds
    python examples/sparse_vd.py run --model lenet300 --method svd --epochs 60 --finetune-epochs 20 \
        --finetune-lr 3e-3 --finetune-weight-decay 0.05 --target-compression 42
    # the same sparse VD written by hand in PyTorch (LeNet-300-100 only), for comparison
    python examples/sparse_vd.py run --model lenet300 --method torch-svd --epochs 60
    # the random-label check (labels shuffled → essentially every weight pruned)
    python examples/sparse_vd.py run --model lenet300 --method svd --epochs 200 --dataset mnist5k --random-labels
    python examples/sparse_vd.py table
    python examples/sparse_vd.py sweep lenet300-svd-fashion_mnist-e60   # other log α thresholds
    python examples/sparse_vd.py clipcheck lenet300-svd-fashion_mnist-pretrained-e60   # kept params with log α < −8
    python examples/sparse_vd.py finetune TAG --finetune-epochs 10 --finetune-lr 1e-3   # frozen-mask phase on a run's mask
    python examples/sparse_vd.py finetune TAG --finetune-epochs 20 --finetune-objective distill --distill-temperature 2

Recipe variants (each changed option adds a suffix to the run's tag and a note in the table, so the
reference runs are never overwritten): ``--init-from`` a deterministic checkpoint, ``--init-log-sigma2``,
``--log-sigma2-lr-mult`` (Adam lr of log σ² = this × the lr of θ), ``--lr``, ``--batch-size``,
``--kl-hold``/``--kl-ramp``, ``--decay-start``, ``--clip-low``; they apply to ``svd`` and ``torch-svd``
alike. ``--finetune-epochs K`` (``svd`` only) spends the last K of the ``--epochs`` budget on a frozen
mask: sparse VD runs the recipe over epochs − K epochs (KL warm-up unchanged, lr constant to half of
them then linear to 0), the mask θ ⊙ [log α < 3] is then fixed and the kept weights and biases of the
plain pruned network are trained on the data term alone (cross-entropy, Adam ``--finetune-lr``, lr
constant for half the K epochs then linear to 0, pruned entries held at 0); the reported error is that
network's, the compression the frozen mask's. ``--threshold`` sets the log α threshold of that mask
(default 3; also the final pruning of a run without a frozen-mask phase). ``--finetune-objective distill``
trains the frozen-mask network instead by distillation from the sparse-VD network's own posterior
predictive at the freeze point (``bnn.sample_outputs``: ``--distill-samples`` draws per training input
from the guide, every weight, computed once), with ``pyrobnn.inference.distillation_loss``
(T²·KL(p̄_T ‖ softmax(g/T)), T = ``--distill-temperature``), mixed with the label cross-entropy by
``--distill-label-weight`` w: (1 − w)·distillation + w·CE. It stays within the epoch budget (the teacher
is the run's own network at epoch epochs − K). ``finetune TAG`` takes the same options (``--threshold``,
``--finetune-objective``, ...) and writes ``<out>/<TAG>/posthoc-finetune-….json``.
Regularisers of the frozen-mask phase (each adds a tag suffix): ``--finetune-weight-decay WD`` (AdamW,
decoupled; ``wdWD``), ``--finetune-label-smoothing S`` (``lsS``), ``--finetune-average`` (report the mean of
the end-of-epoch weights over the lr-decay half instead of the last iterate; ``swa``), ``--finetune-noise``
(train with the freeze-point posterior's multiplicative noise, each kept weight N(θ, α θ²) with α fixed,
local reparameterisation; ``noise``).
``--target-compression C`` replaces ``--threshold``: the mask keeps the ⌊|W|/C⌋ weights of lowest log α at
the freeze (``pyrobnn.sparsity.threshold_for_compression``; tag suffix ``cmpC``), so every seed ends at the
same compression instead of the same threshold.
``--validation`` holds out 5,000 fixed training images and reports every error on them instead of the
test set (tag suffix ``val``; ``finetune`` of such a run replays on the same split), for choosing a
recipe without the test set. ``--stop-after K`` makes a pilot: an ``svd`` run stops after K epochs without writing a result and
resumes from its checkpoint when re-run without it. For example

    python examples/sparse_vd.py run --model lenet300 --method svd --epochs 60 --kl-hold 0 --kl-ramp 5 \
        --init-from runs/sparse_vd/lenet300-det-fashion_mnist-e60/det-ckpt.safetensors --init-log-sigma2 -6

The log α clip. The reference recipe clips log α to [−8, 8] in the KL, so a weight with
log σ² − log θ² < −8 gets no KL gradient at all. From a trained network with log σ² = −10 that is
every weight with |θ| > e⁻¹ ≈ 0.37 (6 % of a trained LeNet-300-100's fc1), and the data term then
pushes σ² further down: such weights are never pruned. pyrobnn's AdditiveNoise clips from above
only by default (``(None, 8)``), and so does this script (``--clip-low`` none, tag suffix ``cliphi8``;
``--clip-low -8`` gives the reference recipe's clip).

A killed run is resumed by re-running the same command (exactly: data order and RNG state are restored).
Test error of a sparse-VD network is that of the pruned posterior-mean network (θ ⊙ [log α < 3]),
computed by the exported plain ``torch.nn.Module`` (``pyrobnn.sparsity.export``).
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import pyrobnn
from pyrobnn import sparsity
from pyrobnn.data import ArrayLoader, load_fashion_mnist, load_mnist5k
from pyrobnn.inference import History, fit
from pyrobnn.inference import train_deterministic as train_baseline
from pyrobnn.inference.schedules import lr_factor_schedule
from pyrobnn.io import flatten_state, read_state, unflatten_state, write_state
from pyrobnn.models import build

DEFAULT_OUT = "runs/sparse_vd"


def _tag(a):
    parts = [a.model, a.method, a.dataset]
    if a.random_labels:
        parts.append("randlabels")
    if a.init_from:
        parts.append("pretrained")
    if a.limit_train:
        parts.append(f"n{a.limit_train}")
    if getattr(a, "validation", False):
        parts.append("val")
    parts += _recipe_suffixes(a)
    if getattr(a, "seed", 0) != 0:  # random seed 0 keeps the plain tag; another seed must not resume its run
        parts.append(f"seed{a.seed}")
    parts.append(f"e{a.epochs}")
    return "-".join(parts)


#: recipe options that default to the reference recipe; a run that changes one gets a tag suffix (so its
#: results do not overwrite the reference runs) and a note in the table
_RECIPE_DEFAULTS = {"lr": 1e-3, "batch_size": 100, "kl_hold": 5.0, "kl_ramp": 15.0, "decay_start": 0.5,
                    "init_log_sigma2": -10.0, "log_sigma2_lr_mult": 1.0, "clip_low": -8.0, "finetune_epochs": 0,
                    "finetune_lr": 1e-3, "threshold": 3.0, "finetune_objective": "data", "distill_temperature": 1.0,
                    "distill_samples": 32, "distill_label_weight": 0.0, "finetune_average": False,
                    "finetune_weight_decay": 0.0, "finetune_noise": False,
                    "finetune_label_smoothing": 0.0}


def _recipe_suffixes(a):
    """Tag parts for the recipe options that differ from the reference recipe (``[]`` for it)."""
    d = _RECIPE_DEFAULTS
    out = []
    if a.lr != d["lr"]:
        out.append(f"lr{a.lr:g}")
    if a.batch_size != d["batch_size"]:
        out.append(f"b{a.batch_size}")
    if (a.kl_hold, a.kl_ramp) != (d["kl_hold"], d["kl_ramp"]):
        out.append(f"kl{a.kl_hold:g}+{a.kl_ramp:g}")
    if a.decay_start != d["decay_start"]:
        out.append(f"decay{a.decay_start:g}")
    if a.init_log_sigma2 != d["init_log_sigma2"]:
        out.append(f"ls2init{a.init_log_sigma2:g}")
    if a.log_sigma2_lr_mult != d["log_sigma2_lr_mult"]:
        out.append(f"ls2lr{a.log_sigma2_lr_mult:g}x")
    if (a.clip_low, a.clip) != (d["clip_low"], 8.0) and a.method != "det":   # no log α in a det run
        out.append(f"cliphi{a.clip:g}" if a.clip_low is None else f"clip{a.clip_low:g}:{a.clip:g}")
    if a.finetune_epochs:
        out.append(f"ft{a.finetune_epochs}" + (f"lr{a.finetune_lr:g}" if a.finetune_lr != d["finetune_lr"] else ""))
    out += _frozen_phase_suffixes(a)
    return out


def _frozen_phase_suffixes(a):
    """Tag parts for the mask threshold and the frozen-mask objective (``[]`` for the defaults)."""
    d = _RECIPE_DEFAULTS
    out = []
    if getattr(a, "target_compression", None):
        out.append(f"cmp{a.target_compression:g}")
    elif a.threshold != d["threshold"]:
        out.append(f"thr{a.threshold:g}")
    if a.finetune_epochs and a.finetune_objective == "distill":
        out.append(f"distT{a.distill_temperature:g}s{a.distill_samples}"
                   + (f"lw{a.distill_label_weight:g}" if a.distill_label_weight != d["distill_label_weight"] else ""))
    if a.finetune_epochs:
        if getattr(a, "finetune_noise", False):
            out.append("noise")
        if getattr(a, "finetune_weight_decay", 0.0):
            out.append(f"wd{a.finetune_weight_decay:g}")
        if getattr(a, "finetune_label_smoothing", 0.0):
            out.append(f"ls{a.finetune_label_smoothing:g}")
        if getattr(a, "finetune_average", False):
            out.append("swa")
    return out


def _recipe_note(recipe, method):
    """Short human-readable list of a result's departures from the reference recipe (for the table)."""
    if not recipe or method == "det":
        return []
    notes = []
    if recipe.get("lr", 1e-3) != 1e-3:
        notes.append(f"Adam lr {recipe['lr']:g}")
    if recipe.get("batch_size", 100) != 100:
        notes.append(f"batch {recipe['batch_size']}")
    hold, ramp = recipe.get("kl_warmup", [5, 15])
    if (hold, ramp) != (5, 15):
        notes.append(f"KL warm-up {hold:g}+{ramp:g}")
    if recipe.get("lr_decay_start_epoch") is not None and recipe.get("lr_decay_start_fraction", 0.5) != 0.5:
        notes.append(f"lr decay from epoch {recipe['lr_decay_start_epoch']:g}")
    if recipe.get("init_log_sigma2", -10.0) != -10.0:
        notes.append(f"log σ² init {recipe['init_log_sigma2']:g}")
    if recipe.get("log_sigma2_lr_mult", 1.0) != 1.0:
        notes.append(f"log σ² lr ×{recipe['log_sigma2_lr_mult']:g}")
    low, high = recipe.get("log_alpha_clip", [-8.0, 8.0])
    if (low, high) != (-8.0, 8.0):
        notes.append(f"log α clip ≤ {high:g} only" if low is None else f"log α clip [{low:g}, {high:g}]")
    if recipe.get("target_compression"):
        notes.append(f"pruned to ×{recipe['target_compression']:g} (log α ≥ {recipe['prune_log_alpha_above']:.3g})")
    elif recipe.get("prune_log_alpha_above", 3.0) != 3.0:
        notes.append(f"pruned at log α > {recipe['prune_log_alpha_above']:g}")
    if recipe.get("finetune_epochs"):
        if recipe.get("finetune_objective", "data") == "distill":
            lw = recipe.get("distill_label_weight", 0.0)
            notes.append(f"last {recipe['finetune_epochs']} epochs: mask frozen, distilled from the sparse-VD "
                         f"posterior predictive at the freeze (T {recipe['distill_temperature']:g}, "
                         f"{recipe['distill_samples']} draws" + (f", label weight {lw:g}" if lw else "") +
                         f"; Adam {recipe.get('finetune_lr', 1e-3):g})")
        else:
            extra = "".join([", posterior noise" if recipe.get("finetune_noise") else "",
                             f", weight decay {recipe['finetune_weight_decay']:g}"
                             if recipe.get("finetune_weight_decay") else "",
                             f", label smoothing {recipe['finetune_label_smoothing']:g}"
                             if recipe.get("finetune_label_smoothing") else "",
                             ", weights averaged over the decay half" if recipe.get("finetune_average") else ""])
            notes.append(f"last {recipe['finetune_epochs']} epochs: mask frozen, data term only "
                         f"(Adam {recipe.get('finetune_lr', 1e-3):g}{extra})")
    return notes


class GroupScaledAdam(torch.optim.Adam):
    """Adam whose param groups may carry ``lr_mult``: each step uses ``lr * lr_mult`` for that group.

    ``pyrobnn.inference.fit`` sets every group's ``lr`` to the scheduled base lr before each step, so a
    per-group lr has to be a multiplier applied at step time (it then follows the same schedule)."""

    @torch.no_grad()
    def step(self, closure=None):
        saved = [g["lr"] for g in self.param_groups]
        for g in self.param_groups:
            g["lr"] = g["lr"] * g.get("lr_mult", 1.0)
        try:
            return super().step(closure)
        finally:
            for g, lr in zip(self.param_groups, saved):
                g["lr"] = lr


def _adam_groups(params, log_sigma2_params, lr, log_sigma2_lr_mult):
    """Adam over ``params`` with the parameters in ``log_sigma2_params`` (log σ²) at ``lr_mult``."""
    ids = {id(p) for p in log_sigma2_params}
    rest = [p for p in params if id(p) not in ids]
    ls2 = [p for p in params if id(p) in ids]
    if len(ls2) != len(ids):
        raise ValueError("some log σ² parameters are not among the optimised parameters")
    return GroupScaledAdam([{"params": rest, "lr_mult": 1.0}, {"params": ls2, "lr_mult": float(log_sigma2_lr_mult)}],
                           lr=lr)


def _data(a):
    ds = load_mnist5k() if a.dataset == "mnist5k" else load_fashion_mnist(limit_train=a.limit_train)
    x_tr, y_tr, x_te, y_te = ds.x_train, ds.y_train, ds.x_test, ds.y_test
    if a.limit_train and a.dataset == "mnist5k":
        x_tr, y_tr = x_tr[:a.limit_train], y_tr[:a.limit_train]
    if a.random_labels:
        g = torch.Generator().manual_seed(12345)
        y_tr = y_tr[torch.randperm(len(y_tr), generator=g)]
    if getattr(a, "validation", False):
        # recipe selection without the test set: a fixed VALIDATION_SIZE of the training images (the same for
        # every seed and run) is held out and takes the test set's place in every number the run reports
        if len(x_tr) <= 2 * VALIDATION_SIZE:
            raise SystemExit(f"--validation needs more than {2 * VALIDATION_SIZE} training images, got {len(x_tr)}")
        perm = torch.randperm(len(x_tr), generator=torch.Generator().manual_seed(20261204))
        val, keep = perm[:VALIDATION_SIZE], perm[VALIDATION_SIZE:]
        return x_tr[keep], y_tr[keep], x_tr[val], y_tr[val]
    return x_tr, y_tr, x_te, y_te


#: training images held out by ``--validation``
VALIDATION_SIZE = 5000


@torch.no_grad()
def _error(net, x, y, batch=2000):
    net.eval()
    wrong = 0
    for i in range(0, len(x), batch):
        wrong += int((net(x[i:i + batch]).argmax(-1) != y[i:i + batch]).sum())
    return wrong / len(x)


# -- deterministic baseline ----------------------------------------------------------------------------------
class _DetCheckpoint:
    """The baseline's checkpoint: one file rewritten after every epoch (net, optimiser, RNG, history)."""

    def __init__(self, path: Path, net, opt):
        self.path, self.net, self.opt = path, net, opt

    def prepare(self):
        pass

    def save(self, history, epoch, step, data_seed=None):
        skel, tensors = flatten_state({"optimizer": self.opt.state_dict()}, prefix="opt")
        tensors.update({f"net.{k}": v for k, v in self.net.state_dict().items()})
        tensors["rng"] = torch.get_rng_state()
        write_state(self.path, tensors, {"opt": skel, "history": history.records, "epoch": epoch})
        return self.path

    def restore(self, history, batches):
        if not self.path.exists():
            return None
        tensors, meta = read_state(self.path)
        self.net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        self.opt.load_state_dict(unflatten_state(meta["opt"], tensors)["optimizer"])
        torch.set_rng_state(tensors["rng"])
        history.records = list(meta["history"])
        print(f"resumed at epoch {meta['epoch']}", flush=True)
        return self.path, int(meta["epoch"]), 0


def train_deterministic(a, out_dir: Path):
    torch.manual_seed(a.seed)
    x_tr, y_tr, x_te, y_te = _data(a)
    net = build(a.model)
    history = History()

    def on_epoch(net, rec):
        rec["test_error"] = _error(net, x_te, y_te)
        print(json.dumps(rec), flush=True)

    train_baseline(net, ArrayLoader(x_tr, y_tr, batch_size=a.batch_size, seed=a.seed), epochs=a.epochs, lr=a.lr,
                   lr_schedule=("linear-decay", a.epochs * a.decay_start), callbacks=[on_epoch], history=history,
                   checkpoints=lambda net, opt: _DetCheckpoint(out_dir / "det-ckpt.safetensors", net, opt), resume=True)
    history = history.records
    n_weights = sum(m.weight.numel() for m in net.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
    return net, {"test_error": history[-1]["test_error"], "train_seconds": sum(r["seconds"] for r in history),
                 "compression": 1.0, "weights": n_weights, "weights_kept": n_weights, "history": history}


# -- hand-written PyTorch sparse VD (the comparison the issue asks for) ------------------------------------------
K1, K2, K3 = 0.63576, 1.87320, 1.48695


class TorchSVDLinear(torch.nn.Module):
    """Sparse-VD Linear written directly in PyTorch: θ and log σ² for weight and bias, local
    reparameterisation, KL on log α clipped to ``clip`` = (low or None, high); the same mathematics as pyrobnn's
    log-uniform prior + AdditiveNoise guide."""

    def __init__(self, linear, init_log_sigma2, clip):
        super().__init__()
        self.theta = torch.nn.Parameter(linear.weight.detach().clone())
        self.log_sigma2 = torch.nn.Parameter(torch.full_like(self.theta, init_log_sigma2))
        self.theta_b = torch.nn.Parameter(linear.bias.detach().clone())
        self.log_sigma2_b = torch.nn.Parameter(torch.full_like(self.theta_b, init_log_sigma2))
        self.clip = clip

    def log_alpha(self, theta, log_s2):
        return (log_s2 - (theta * theta + 1e-16).log()).clamp(self.clip[0], self.clip[1])  # low may be None

    def forward(self, x):
        if not self.training:
            keep_w = self.log_alpha(self.theta, self.log_sigma2) < 3
            keep_b = self.log_alpha(self.theta_b, self.log_sigma2_b) < 3
            return F.linear(x, self.theta * keep_w, self.theta_b * keep_b)
        mean = F.linear(x, self.theta, self.theta_b)
        var = F.linear(x * x, self.log_sigma2.exp(), self.log_sigma2_b.exp())
        return mean + (var + 1e-16).sqrt() * torch.randn_like(mean)

    def kl(self):
        total = 0.0
        for theta, log_s2 in ((self.theta, self.log_sigma2), (self.theta_b, self.log_sigma2_b)):
            la = self.log_alpha(theta, log_s2)
            total = total + (K1 * torch.sigmoid(-K2 - K3 * la) + 0.5 * F.softplus(-la)).sum()
        return total


def train_torch_sparse_vd(a, out_dir: Path):
    if a.model != "lenet300":
        raise SystemExit("--method torch-svd is written for lenet300 only")
    torch.manual_seed(a.seed)
    x_tr, y_tr, x_te, y_te = _data(a)
    base = build("lenet300")
    if a.init_from:
        tensors, _ = read_state(Path(a.init_from))
        base.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
    if a.finetune_epochs:
        raise SystemExit("--finetune-epochs is implemented for --method svd only")
    clip = (a.clip_low, a.clip)
    net = torch.nn.Sequential(torch.nn.Flatten(), TorchSVDLinear(base.fc1, a.init_log_sigma2, clip), torch.nn.ReLU(),
                              TorchSVDLinear(base.fc2, a.init_log_sigma2, clip), torch.nn.ReLU(),
                              TorchSVDLinear(base.fc3, a.init_log_sigma2, clip))
    layers = [net[1], net[3], net[5]]
    opt = _adam_groups(list(net.parameters()), [p for m in layers for p in (m.log_sigma2, m.log_sigma2_b)],
                       a.lr, a.log_sigma2_lr_mult)
    loader = ArrayLoader(x_tr, y_tr, batch_size=a.batch_size, seed=a.seed)
    lr_of = lr_factor_schedule(("linear-decay", a.epochs * a.decay_start), a.epochs)
    N, steps, history = len(x_tr), len(loader), []
    for epoch in range(a.epochs):
        if a.stop_after and epoch >= a.stop_after:
            return net, None
        net.train()
        loader.set_epoch(epoch)
        t0 = time.perf_counter()
        for step, (xb, yb) in enumerate(loader.batches()):
            e = epoch + step / steps
            kl_w = 0.0 if e < a.kl_hold else min(1.0, (e - a.kl_hold) / a.kl_ramp)
            for g in opt.param_groups:
                g["lr"] = a.lr * lr_of(e)
            loss = F.cross_entropy(net(xb), yb, reduction="sum") * (N / len(xb)) + kl_w * sum(m.kl() for m in layers)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            kept = sum(int((m.log_alpha(m.theta, m.log_sigma2) < 3).sum()) for m in layers)
            total = sum(m.theta.numel() for m in layers)
        rec = {"epoch": epoch + 1, "seconds": seconds, "test_error_pruned": _error(net, x_te, y_te),
               "compression": total / max(kept, 1),
               "layer_sparsity": {f"fc{i + 1}": 1 - float((m.log_alpha(m.theta, m.log_sigma2) < 3).float().mean())
                                  for i, m in enumerate(layers)}}
        history.append(rec)
        print(json.dumps(rec), flush=True)
    return net, {"test_error": history[-1]["test_error_pruned"], "train_seconds": sum(r["seconds"] for r in history),
                 "compression": total / max(kept, 1), "weights": total, "weights_kept": kept,
                 "layers": [{"layer": k, "sparsity": v} for k, v in history[-1]["layer_sparsity"].items()],
                 "history": history}


# -- sparse VD -----------------------------------------------------------------------------------------------
def train_sparse_vd(a, out_dir: Path):
    torch.manual_seed(a.seed)
    x_tr, y_tr, x_te, y_te = _data(a)
    net = build(a.model)
    if a.init_from:
        tensors, _ = read_state(Path(a.init_from))
        net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
    bnn = pyrobnn.sparsity.sparse_vd_from_pretrained(net, dataset_size=len(x_tr), init_log_sigma2=a.init_log_sigma2,
                                                      log_alpha_clip=(a.clip_low, a.clip))
    svd_epochs = a.epochs - a.finetune_epochs
    log_path = out_dir / "epochs.jsonl"

    def on_epoch(bnn, record):
        rep = sparsity.report(bnn)
        pruned = sparsity.export(bnn)
        extra = {"test_error_pruned": _error(pruned, x_te, y_te),
                 "compression": rep["compression"], "sparsity": rep["sparsity"],
                 "layer_sparsity": {r["layer"]: r["sparsity"] for r in rep.layers}}
        record.update(extra)
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in record.items()}), flush=True)
        return bool(a.stop_after) and record["epoch"] >= a.stop_after

    def optimizer(params):
        return _adam_groups(params, [dict(bnn.named_parameters())["autoguide.flat.log_sigma2"]], a.lr,
                            a.log_sigma2_lr_mult)

    loader = ArrayLoader(x_tr, y_tr, batch_size=a.batch_size, seed=a.seed)
    hist = fit(bnn, loader, svd_epochs, lr=a.lr,
               kl_warmup=(a.kl_hold, a.kl_ramp), lr_schedule=("linear-decay", svd_epochs * a.decay_start),
               checkpoint_dir=str(out_dir / "ckpt"), resume=True, seed=a.seed, progress=False,
               callbacks=[on_epoch], optimizer=optimizer)
    if len(hist.records) < svd_epochs:  # --stop-after: a pilot; re-running without it resumes
        return bnn, None
    _set_freeze_threshold(a, bnn)
    mask = sparsity.masks(bnn, threshold=a.freeze_threshold)
    rep = sparsity.report(bnn, mask=mask)
    pruned = sparsity.export(bnn, mask=mask)
    # the unpruned posterior mean, for reference
    full = sparsity.export(bnn, mask={s: torch.ones_like(m) for s, m in mask.items()})
    error_at_freeze = _error(pruned, x_te, y_te)
    finetune_history, teacher = [], {}
    if a.finetune_epochs:
        pruned, finetune_history, teacher = _finetune_frozen_mask(a, bnn, pruned, mask, loader, x_te, y_te, out_dir)
    result = {"test_error": _error(pruned, x_te, y_te), "test_error_unpruned_mean": _error(full, x_te, y_te),
              "test_error_before_finetune": error_at_freeze, "finetune_history": finetune_history,
              "distill_teacher": teacher,
              "train_seconds": sum(r["seconds"] for r in hist.records) + sum(r["seconds"] for r in finetune_history),
              "compression": rep["compression"],
              "sparsity": rep["sparsity"], "weights": rep["weights"], "weights_kept": rep["weights_kept"],
              "params_kept": rep["params_kept"], "params": rep["params"], "flops": rep["flops"],
              "flops_kept": rep["flops_kept"], "layers": rep.layers, "report_table": rep.table(),
              "history": hist.records}
    pyrobnn.save(bnn, out_dir / "bnn.safetensors")
    return bnn, result


def _set_freeze_threshold(a, bnn):
    """``a.freeze_threshold``: the log α threshold of the mask — ``--threshold``, or with
    ``--target-compression C`` the one that keeps the ⌊|W|/C⌋ weights of lowest log α at the freeze
    (``pyrobnn.sparsity.threshold_for_compression``), so every seed gets the same compression."""
    target = getattr(a, "target_compression", None)
    a.freeze_threshold = sparsity.threshold_for_compression(bnn, target) if target else a.threshold
    if target:
        print(json.dumps({"target_compression": target, "threshold": a.freeze_threshold}), flush=True)


@torch.no_grad()
def _teacher_log_probs(bnn, x, num_samples, temperature, seed, batch=2000):
    """log p̄_T(x) ``[N, C]``: the log of the posterior predictive of ``bnn`` (its guide, every weight,
    none pruned) at temperature T, p̄_T = (1/S) Σ_s softmax(f_s(x)/T) over S draws (local
    reparameterisation: independent draws per example). Drawn with its own seed, so a run and a replay
    of its frozen-mask phase get the same targets."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        out = []
        for i in range(0, len(x), batch):
            logits = bnn.sample_outputs(x[i:i + batch], num_samples)          # [S, B, C]
            out.append(torch.logsumexp(F.log_softmax(logits / temperature, -1), 0) - math.log(num_samples))
    return torch.cat(out)


def _posterior_noise_hooks(bnn, pruned, keep):
    """Forward hooks that add, in training mode, the output noise of each kept weight and bias
    w ~ N(θ, α θ²) to ``pruned``'s Linear/Conv2d layers — local reparameterisation: the pre-activation gets
    N(0, Σ x² α θ² + α_b θ_b²) — with α = exp(log α) of the sparse-VD guide at the freeze, fixed; θ are
    the layer's current (trained) weights. Multiplicative noise, so growing θ does not escape it (Gaussian
    dropout with one rate per weight). Returns the hook handles."""
    handles = []
    for name, module in pruned.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        alpha_w = sparsity.log_alpha(bnn, f"{name}.weight").exp() * keep[f"{name}.weight"]
        alpha_b = (sparsity.log_alpha(bnn, f"{name}.bias").exp() * keep[f"{name}.bias"]
                   if module.bias is not None else None)

        def hook(mod, inputs, out, alpha_w=alpha_w, alpha_b=alpha_b):
            if not mod.training:
                return out
            x = inputs[0]
            var_w = alpha_w * mod.weight * mod.weight
            var_b = alpha_b * mod.bias * mod.bias if alpha_b is not None else None
            if isinstance(mod, nn.Linear):
                var = F.linear(x * x, var_w, var_b)
            else:
                var = F.conv2d(x * x, var_w, var_b, mod.stride, mod.padding, mod.dilation, mod.groups)
            return out + (var + 1e-8).sqrt() * torch.randn_like(out)
        handles.append(module.register_forward_hook(hook))
    return handles


def _finetune_frozen_mask(a, bnn, pruned, mask, loader, x_te, y_te, out_dir: Path, save_as="finetuned.safetensors"):
    """Train the kept weights and biases of the exported pruned network ``pruned`` (whose mask is
    ``mask``) for ``a.finetune_epochs`` epochs (epochs svd_epochs … epochs − 1 of the budget, continuing
    the data order), mask frozen: pruned entries get zero gradient and are reset to 0 after every step.

    ``a.finetune_objective``: ``data`` — cross-entropy on the labels; ``distill`` — distillation from
    the sparse-VD network's own posterior predictive at the freeze point (``bnn``'s guide, S =
    ``a.distill_samples`` draws per training input, computed once), the objective of
    ``pyrobnn.inference.distillation_loss``, T²·KL(p̄_T ‖ softmax(g/T)) at T = ``a.distill_temperature``,
    mixed with the label cross-entropy as (1 − w)·distill + w·CE, w = ``a.distill_label_weight``.
    Returns (network, per-epoch records, teacher summary — ``{}`` for ``data``)."""
    params = dict(pruned.named_parameters())
    if set(mask) != set(params):
        raise RuntimeError(f"exported parameters {sorted(params)} do not match the mask sites {sorted(mask)}")
    keep = {n: mask[n].to(params[n].dtype) for n in params}
    for p in params.values():
        p.requires_grad_(True)
    wd = getattr(a, "finetune_weight_decay", 0.0)
    opt = (torch.optim.AdamW(params.values(), lr=a.finetune_lr, weight_decay=wd) if wd
           else torch.optim.Adam(params.values(), lr=a.finetune_lr))
    K, start = a.finetune_epochs, a.epochs - a.finetune_epochs
    hooks = _posterior_noise_hooks(bnn, pruned, keep) if getattr(a, "finetune_noise", False) else []
    average = getattr(a, "finetune_average", False)
    avg, n_avg = {n: torch.zeros_like(p) for n, p in params.items()}, 0
    lr_of = lr_factor_schedule(("linear-decay", K * 0.5), K)
    steps, history, teacher = len(loader), [], {}
    distill = a.finetune_objective == "distill"
    if distill:
        from pyrobnn.inference import distillation_loss
        T, w = a.distill_temperature, a.distill_label_weight
        t0 = time.perf_counter()
        log_p = _teacher_log_probs(bnn, loader.x, a.distill_samples, T, a.seed + 104729)
        # the same batches as ``loader`` (same seed, batch size and epoch permutation), labelled by index
        index_loader = ArrayLoader(loader.x, torch.arange(len(loader.x)), batch_size=loader.batch_size,
                                   seed=loader.seed)
        p_test = _teacher_log_probs(bnn, x_te, a.distill_samples, 1.0, a.seed + 104729 + 1)
        teacher = {"test_error": float((p_test.argmax(-1) != y_te).float().mean()),
                   "train_error_T": float((log_p.argmax(-1) != loader.y).float().mean()),
                   "samples": a.distill_samples, "temperature": T, "label_weight": w,
                   "seconds": time.perf_counter() - t0}
        print(json.dumps({"distill_teacher": teacher}), flush=True)
    kept_before = sum(int((p != 0).sum()) for p in params.values())
    for k in range(K):
        pruned.train()
        loader.set_epoch(start + k)
        t0, total = time.perf_counter(), 0.0
        if distill:
            index_loader.set_epoch(start + k)
            batches = ((xb, loader.y[ib], ib) for xb, ib in index_loader.batches())
        else:
            batches = ((xb, yb, None) for xb, yb in loader.batches())
        for step, (xb, yb, ib) in enumerate(batches):
            for g in opt.param_groups:
                g["lr"] = a.finetune_lr * lr_of(k + step / steps)
            if distill:
                out = pruned(xb)
                # T·log p̄_T as one network's logits: its softmax at temperature T is p̄_T itself
                loss = (1 - w) * distillation_loss(T * log_p[ib], out, temperature=T)
                if w:
                    loss = loss + w * F.cross_entropy(out, yb)
            else:
                loss = F.cross_entropy(pruned(xb), yb, label_smoothing=getattr(a, "finetune_label_smoothing", 0.0))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for n, p in params.items():
                p.grad.mul_(keep[n])
            opt.step()
            with torch.no_grad():
                for n, p in params.items():
                    p.mul_(keep[n])
            total += loss.item()
        rec = {"epoch": start + k + 1, "phase": "finetune", "loss": total / steps,
               "seconds": time.perf_counter() - t0, "test_error_pruned": _error(pruned.eval(), x_te, y_te)}
        if average and k >= K // 2:   # the lr-decay half: a running mean of the end-of-epoch weights
            n_avg += 1
            with torch.no_grad():
                for n, p in params.items():
                    avg[n].add_(p - avg[n], alpha=1.0 / n_avg)
            rec["averaged_epochs"] = n_avg
        history.append(rec)
        print(json.dumps(rec), flush=True)
    for h in hooks:
        h.remove()
    if average and n_avg:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(avg[n] * keep[n])
        history[-1]["test_error_last_iterate"] = history[-1]["test_error_pruned"]
        history[-1]["test_error_pruned"] = _error(pruned.eval(), x_te, y_te)
        print(json.dumps({"averaged_over_epochs": n_avg, "test_error_averaged": history[-1]["test_error_pruned"]}),
              flush=True)
    kept_after = sum(int((p != 0).sum()) for p in params.values())
    if kept_after > kept_before:
        raise RuntimeError("fine-tuning revived pruned entries")
    for p in params.values():
        p.requires_grad_(False)
    write_state(out_dir / save_as, {k: v.detach().clone() for k, v in pruned.state_dict().items()},
                {"finetune_epochs": K, "finetune_lr": a.finetune_lr, "finetune_objective": a.finetune_objective,
                 "threshold": getattr(a, "freeze_threshold", a.threshold), "finetune_noise": bool(hooks),
                 "finetune_weight_decay": wd,
                 "finetune_average": average,
                 "finetune_label_smoothing": getattr(a, "finetune_label_smoothing", 0.0)})
    return pruned.eval(), history, teacher


def cmd_run(a):
    torch.set_num_threads(a.threads)
    tag = _tag(a)
    out_dir = Path(a.out) / tag
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"== {tag} ==", flush=True)
    t0 = time.perf_counter()
    if a.method == "det":
        _, result = train_deterministic(a, out_dir)
    elif a.method == "torch-svd":
        _, result = train_torch_sparse_vd(a, out_dir)
    else:
        _, result = train_sparse_vd(a, out_dir)
    if result is None:
        print(f"stopped after epoch {a.stop_after} (--stop-after); no result written", flush=True)
        return
    result.update({"tag": tag, "model": a.model, "method": a.method, "dataset": a.dataset, "epochs": a.epochs,
                   "seed": a.seed,
                   "limit_train": a.limit_train,
                   "random_labels": a.random_labels, "validation": bool(getattr(a, "validation", False)),
                   "init_from": a.init_from, "command": " ".join(sys.argv),
                   "threads": a.threads, "wall_seconds_this_invocation": time.perf_counter() - t0,
                   "recipe": {"lr": a.lr, "batch_size": a.batch_size, "kl_warmup": [a.kl_hold, a.kl_ramp],
                              "lr_decay_start_epoch": a.epochs * a.decay_start, "init_log_sigma2": a.init_log_sigma2,
                              "lr_decay_start_fraction": a.decay_start, "log_sigma2_lr_mult": a.log_sigma2_lr_mult,
                              "log_alpha_clip": [a.clip_low, a.clip],
                              "prune_log_alpha_above": getattr(a, "freeze_threshold", a.threshold),
                              "target_compression": a.target_compression,
                              "finetune_epochs": a.finetune_epochs, "finetune_lr": a.finetune_lr,
                              "finetune_objective": a.finetune_objective,
                              "distill_temperature": a.distill_temperature, "distill_samples": a.distill_samples,
                              "distill_label_weight": a.distill_label_weight,
                              "finetune_noise": a.finetune_noise, "finetune_weight_decay": a.finetune_weight_decay,
                              "finetune_average": a.finetune_average,
                              "finetune_label_smoothing": a.finetune_label_smoothing}})
    with open(Path(a.out) / f"{tag}.json", "w") as f:
        json.dump(result, f, indent=1)
    summary = {k: result[k] for k in ("test_error", "compression", "train_seconds") if k in result}
    print("RESULT", tag, json.dumps(summary), flush=True)
    if "report_table" in result:
        print(result["report_table"])


def cmd_table(a):
    rows = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(a.out, "*.json")))]
    if not rows:
        print(f"no results in {a.out}")
        return
    print("| network | data | method | epochs | test error | compression | per-layer sparsity (weights) | train time |")
    print("|---|---|---|---:|---:|---:|---|---:|")
    for r in rows:
        layers = ", ".join(f"{x['layer']} {100 * x['sparsity']:.1f} %" for x in r.get("layers", [])) or "dense"
        data = r["dataset"] + (" (random labels)" if r["random_labels"] else "")
        method = {"det": "deterministic", "svd": "sparse VD (pyrobnn)",
                  "torch-svd": "sparse VD (hand-written PyTorch)"}[r["method"]]
        method += " (from det.)" if r.get("init_from") else ""
        notes = _recipe_note(r.get("recipe"), r["method"])
        method += f" ({', '.join(notes)})" if notes else ""
        if r["method"] == "det":
            comp = "×1"
        elif r["weights_kept"] == 0:
            comp = "∞ (all pruned)"
        else:
            comp = f"×{r['compression']:.1f}"
        print(f"| {r['model']} | {data} | {method} | {r['epochs']} | {100 * r['test_error']:.2f} % | {comp} | "
              f"{layers} | {r['train_seconds'] / 60:.1f} min |")


def cmd_finetune(a):
    """Diagnostic: a frozen-mask phase applied to the mask saved at the end of a finished run's sparse-VD
    phase (``bnn.safetensors``). For a run without one this adds epochs beyond its budget (not a result
    for the epoch-budget targets); for a run made with ``--finetune-epochs K`` and the same K here it
    replays that run's phase with other settings (same epochs, same data order). Prints the test error
    of the pruned network per epoch."""
    torch.set_num_threads(a.threads)
    result = json.load(open(Path(a.out) / f"{a.tag}.json"))
    if a.seed is None:  # the run's own seed; results written before it was recorded carry it in the tag only
        match = re.search(r"-seed(\d+)-", a.tag)
        a.seed = result.get("seed", int(match.group(1)) if match else 0)
    bnn = pyrobnn.load(Path(a.out) / a.tag / "bnn.safetensors", net=build(result["model"]))
    limit = result.get("limit_train")
    if limit is None:  # results written before limit_train was recorded carry it in the tag only
        match = re.search(r"-n(\d+)-", a.tag)
        limit = int(match.group(1)) if match else None
    x_tr, y_tr, x_te, y_te = _data(argparse.Namespace(dataset=result["dataset"], limit_train=limit,
                                                      random_labels=result["random_labels"],
                                                      validation=result.get("validation", False)))
    _set_freeze_threshold(a, bnn)
    mask = sparsity.masks(bnn, threshold=a.freeze_threshold)
    pruned = sparsity.export(bnn, mask=mask)
    rep = sparsity.report(bnn, mask=mask)
    before = _error(pruned, x_te, y_te)
    print(json.dumps({"tag": a.tag, "threshold": a.freeze_threshold, "test_error_pruned_before": before,
                      "compression": rep["compression"]}), flush=True)
    # the sparse-VD phase of the run had epochs − (its own frozen-mask epochs) epochs; continue the data order
    # from there, so with the run's own K this is the run's frozen-mask phase with other settings
    svd_epochs = result["epochs"] - result.get("recipe", {}).get("finetune_epochs", 0)
    a.epochs = svd_epochs + a.finetune_epochs
    loader = ArrayLoader(x_tr, y_tr, batch_size=result.get("recipe", {}).get("batch_size", 100), seed=a.seed)
    name = "-".join([f"posthoc-finetune-ft{a.finetune_epochs}", f"lr{a.finetune_lr:g}"] + _frozen_phase_suffixes(a))
    t0 = time.perf_counter()
    _, hist, teacher = _finetune_frozen_mask(a, bnn, pruned, mask, loader, x_te, y_te, Path(a.out) / a.tag,
                                             save_as=f"{name}.safetensors")
    record = {"tag": a.tag, "replay": name, "epochs": a.finetune_epochs, "lr": a.finetune_lr,
              "threshold": a.freeze_threshold, "target_compression": a.target_compression,
              "objective": a.finetune_objective, "noise": a.finetune_noise,
              "weight_decay": a.finetune_weight_decay, "average": a.finetune_average,
              "label_smoothing": a.finetune_label_smoothing,
              "within_budget": a.finetune_epochs == result.get("recipe", {}).get("finetune_epochs", 0),
              "test_error_before": before, "test_error": hist[-1]["test_error_pruned"],
              "compression": rep["compression"], "weights_kept": rep["weights_kept"],
              "layer_sparsity": {r["layer"]: r["sparsity"] for r in rep.layers},
              "distill_teacher": teacher, "seconds": time.perf_counter() - t0,
              "finetune_history": hist, "command": " ".join(sys.argv)}
    if a.finetune_objective == "distill":
        record.update({"distill_temperature": a.distill_temperature, "distill_samples": a.distill_samples,
                       "distill_label_weight": a.distill_label_weight})
    with open(Path(a.out) / a.tag / f"{name}.json", "w") as f:
        json.dump(record, f, indent=1)
    print("FINETUNE", a.tag, json.dumps({k: record[k] for k in ("replay", "within_budget", "test_error_before",
                                                                 "test_error", "compression")}), flush=True)


def cmd_clipcheck(a):
    """For finished sparse-VD runs: kept parameters (weights and biases, log α < 3) whose unclipped
    log α is below −8 — the ones a lower clip at −8 leaves without KL gradient — and the lowest log σ²."""
    torch.set_num_threads(a.threads)
    for tag in a.tags:
        result = json.load(open(Path(a.out) / f"{tag}.json"))
        bnn = pyrobnn.load(Path(a.out) / tag / "bnn.safetensors", net=build(result["model"]))
        g, kept, below, lowest = bnn.autoguide, 0, 0, math.inf
        for site in bnn.site_priors:
            la = g.log_alpha(site, clip=False)
            kept += int((la < 3).sum())
            below += int((la < -8).sum())
            lowest = min(lowest, float(g.site_log_params(site)[1].detach().min()))
        print(json.dumps({"tag": tag, "params_kept": kept, "kept_with_log_alpha_below_-8": below,
                          "min_log_sigma2": round(lowest, 2)}), flush=True)


def cmd_sweep(a):
    """Test error and compression of a trained sparse-VD run's pruned mean network at several log α
    thresholds (the recipe's is 3), and with biases left unpruned."""
    torch.set_num_threads(a.threads)
    tag_dir = Path(a.out) / a.tag
    result = json.load(open(Path(a.out) / f"{a.tag}.json"))
    bnn = pyrobnn.load(tag_dir / "bnn.safetensors", net=build(result["model"]))
    ds = load_fashion_mnist() if result["dataset"] == "fashion_mnist" else load_mnist5k()
    print("| masks | log α threshold | test error | compression |")
    print("|---|---:|---:|---:|")
    for sites, label in ((None, "weights and biases"), ("*.weight", "weights only")):
        for thr in a.thresholds:
            m = sparsity.masks(bnn, threshold=thr, sites=sites)
            err = _error(sparsity.export(bnn, mask=m), ds.x_test, ds.y_test)
            comp = sparsity.report(bnn, mask=m)["compression"]
            print(f"| {label} | {thr} | {100 * err:.2f} % | ×{comp:.1f} |")


def _optional_float(text):
    return None if text.lower() in ("none", "") else float(text)


def _frozen_phase_args(p):
    p.add_argument("--threshold", type=float, default=3.0,
                   help="log α threshold of the reported network's mask (the frozen mask with --finetune-epochs)")
    p.add_argument("--target-compression", type=float, default=None,
                   help="instead of --threshold: the threshold that reaches this compression |W|/|W≠0| at the "
                        "freeze (the weights of lowest log α kept)")
    p.add_argument("--finetune-objective", choices=["data", "distill"], default="data",
                   help="frozen-mask phase: data (cross-entropy on the labels) or distill (from the sparse-VD "
                        "posterior predictive at the freeze point)")
    p.add_argument("--distill-temperature", type=float, default=1.0)
    p.add_argument("--distill-samples", type=int, default=32, help="posterior draws per training input (teacher)")
    p.add_argument("--distill-label-weight", type=float, default=0.0,
                   help="loss = (1 − w)·distillation + w·label cross-entropy")
    p.add_argument("--finetune-noise", action="store_true",
                   help="frozen-mask phase: train with the multiplicative Gaussian noise of the posterior at the "
                        "freeze (each kept weight w ~ N(θ, α θ²), α fixed from the guide; local "
                        "reparameterisation), like Gaussian dropout with per-weight rates; evaluation uses θ")
    p.add_argument("--finetune-weight-decay", type=float, default=0.0,
                   help="frozen-mask phase: decoupled weight decay (AdamW) on the kept weights and biases")
    p.add_argument("--finetune-label-smoothing", type=float, default=0.0,
                   help="frozen-mask phase (data objective): label smoothing of the cross-entropy")
    p.add_argument("--finetune-average", action="store_true",
                   help="frozen-mask phase: report the average of the kept weights at the end of each epoch of "
                        "the lr-decay half (stochastic weight averaging) instead of the last iterate")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train one network")
    r.add_argument("--model", choices=["lenet300", "lenet5"], default="lenet300")
    r.add_argument("--method", choices=["det", "svd", "torch-svd"], default="svd",
                   help="det: deterministic baseline; svd: pyrobnn sparse VD; torch-svd: hand-written PyTorch "
                        "sparse VD (lenet300, same mathematics and recipe, no checkpoints)")
    r.add_argument("--dataset", choices=["fashion_mnist", "mnist5k"], default="fashion_mnist")
    r.add_argument("--random-labels", action="store_true")
    r.add_argument("--limit-train", type=int, default=None)
    r.add_argument("--epochs", type=int, default=60)
    r.add_argument("--lr", type=float, default=1e-3)
    r.add_argument("--batch-size", type=int, default=100)
    r.add_argument("--kl-hold", type=float, default=5)
    r.add_argument("--kl-ramp", type=float, default=15)
    r.add_argument("--decay-start", type=float, default=0.5, help="lr constant until this fraction of the epochs")
    r.add_argument("--init-log-sigma2", type=float, default=-10.0)
    r.add_argument("--log-sigma2-lr-mult", type=float, default=1.0,
                   help="Adam lr of the log σ² parameters = this × the lr of θ (both follow the lr schedule)")
    r.add_argument("--stop-after", type=int, default=None,
                   help="pilot: stop after this many epochs without writing a result (svd resumes from its checkpoint)")
    r.add_argument("--clip", type=float, default=8.0, help="log α clipped from above at this value")
    r.add_argument("--clip-low", type=_optional_float, default=None,
                   help="lower log α clip ('none', the default: clipped from above only, pyrobnn's default; "
                        "-8: the reference recipe's [-8, 8])")
    r.add_argument("--finetune-epochs", type=int, default=0,
                   help="svd: the last K of --epochs train the pruned network with the mask frozen, data term only")
    r.add_argument("--finetune-lr", type=float, default=1e-3, help="Adam lr of the frozen-mask phase")
    _frozen_phase_args(r)
    r.add_argument("--init-from", default=None, help="det checkpoint (…/det-ckpt.safetensors) to start θ from")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--validation", action="store_true",
                   help=f"hold out {VALIDATION_SIZE} fixed training images and report every error on them instead "
                        "of the test set (tag suffix 'val'): for choosing a recipe without the test set")
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--out", default=DEFAULT_OUT)
    r.set_defaults(func=cmd_run)
    t = sub.add_parser("table", help="print the results table")
    t.add_argument("--out", default=DEFAULT_OUT)
    t.set_defaults(func=cmd_table)
    w = sub.add_parser("sweep", help="error/compression of a finished sparse-VD run at other thresholds")
    w.add_argument("tag", help="run tag, e.g. lenet300-svd-fashion_mnist-e60")
    w.add_argument("--thresholds", type=float, nargs="+", default=[2.0, 3.0, 4.0])
    w.add_argument("--threads", type=int, default=1)
    w.add_argument("--out", default=DEFAULT_OUT)
    w.set_defaults(func=cmd_sweep)
    ft = sub.add_parser("finetune", help="diagnostic: frozen-mask fine-tuning after a finished svd run")
    ft.add_argument("tag")
    ft.add_argument("--finetune-epochs", type=int, default=10)
    ft.add_argument("--finetune-lr", type=float, default=1e-3)
    _frozen_phase_args(ft)
    ft.add_argument("--seed", type=int, default=None,
                    help="data-order seed (default: the run's own, so that the replay sees the run's batches)")
    ft.add_argument("--threads", type=int, default=1)
    ft.add_argument("--out", default=DEFAULT_OUT)
    ft.set_defaults(func=cmd_finetune)
    c = sub.add_parser("clipcheck", help="kept parameters of finished svd runs with unclipped log α < −8")
    c.add_argument("tags", nargs="+")
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--out", default=DEFAULT_OUT)
    c.set_defaults(func=cmd_clipcheck)
    a = p.parse_args(argv)
    if a.cmd == "run" and not 0 <= a.finetune_epochs < a.epochs:
        p.error("--finetune-epochs must be in [0, --epochs)")
    if a.cmd == "run" and a.finetune_objective != "data" and not a.finetune_epochs:
        p.error("--finetune-objective needs --finetune-epochs K > 0")
    if a.cmd in ("run", "finetune"):
        if a.target_compression is not None and not a.target_compression >= 1:
            p.error("--target-compression must be ≥ 1")
        if a.distill_samples < 1 or a.distill_temperature <= 0 or not 0 <= a.distill_label_weight <= 1:
            p.error("need --distill-samples ≥ 1, --distill-temperature > 0 and --distill-label-weight in [0, 1]")
    a.func(a)


if __name__ == "__main__":
    main()
