"""Bayesian dark knowledge on Boston housing: an SGLD teacher distilled *online* into one network.

    nice -n 10 python examples/boston_dark_knowledge.py --splits 20 --out runs/boston_dark_knowledge

Per random 90/10 split (``pyrobnn.data.load_boston(seed=s)``, s = 0 … splits−1; inputs standardised
on the training split, targets standardised for training and scored in $1000s):

* teacher — a BNN 13-50-1 (ReLU), N(0, 1) priors on all weights, Gaussian likelihood with a latent
  noise precision τ ~ Gamma(6, 6), sampled by SGLD (minibatch 32, step size η_t = a(b + t)^−0.55
  from ``--step-size`` down to ≈0.3 of it) as a *running chain* (:class:`pyrobnn.inference.SGLDChain`);
* student — a plain 13-50-2 MLP (mean, log-variance), trained by :func:`pyrobnn.inference.distill`
  online: after ``--burn-in`` teacher-only updates, each step is one SGLD update and one Adam step
  of the student on the teacher's *current* draw's predictive N(m_θ(x̃), 1/τ) at training inputs
  perturbed by Gaussian noise (x̃ = x + ``--input-noise``·ε). No teacher draw is stored;
* ensemble — the teacher's posterior predictive (1/S) Σ_s N(y; m_s(x), 1/τ_s) over the draws of the
  same run (one every ``--thin`` updates after burn-in), accumulated on the test inputs as the chain
  runs (a running sum and log-sum-exp; again no draw is stored);
* teacher (single draw) — the network at the chain's final state, with its own τ: what a user of
  one SGLD sample would deploy.

Reported: mean ± standard error over splits of test RMSE and test log-likelihood per point (original
units), next to the published numbers (HSE student report: teacher 3.642, student 3.201, ensemble 3.057 RMSE;
Korattikara et al. 2015: SGLD −2.306, distilled −2.350 log-likelihood) and the literature (PBP 3.01 /
−2.57, MC dropout 2.97 / −2.46). Writes OUT/results.json and OUT/results.md.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import pyro
import torch

import pyrobnn
from pyrobnn.data import load_boston
from pyrobnn.inference import PolynomialDecay, SGLDChain, distill, save_student, load_student
from pyrobnn.inference.distill import student_predictive
from pyrobnn.models import build

SEED_NUMBERS = {"teacher (single draw)": (3.642, None), "student": (3.201, -2.350), "ensemble": (3.057, -2.306)}
LITERATURE = {"PBP": (3.01, -2.57), "MC dropout": (2.97, -2.46)}


class EnsembleOnTest:
    """A distill() callback: every ``thin`` student steps, adds the chain's current draw's predictive on
    the test inputs to a running mean (for RMSE) and a running log-sum-exp (for the log-likelihood)."""

    def __init__(self, x, y, thin):
        self.x, self.y, self.thin = x, y, thin
        self.count = 0
        self.sum_mean = torch.zeros_like(y)
        self.log_sum = torch.full_like(y, -math.inf)
        self.single_rmse = []

    def __call__(self, step, teacher, student, record):
        if step % self.thin:
            return
        d = teacher.draws(self.x)
        mean, var = d.mean[0], d.noise_var.reshape(-1)[0]
        lp = -0.5 * (torch.log(2 * math.pi * var) + (self.y - mean) ** 2 / var)
        self.log_sum = torch.logaddexp(self.log_sum, lp)
        self.sum_mean += mean
        self.count += 1
        self.single_rmse.append(((mean - self.y) ** 2).mean().sqrt().item())

    def metrics(self, y_std):
        mean = self.sum_mean / self.count
        lpd = self.log_sum - math.log(self.count)
        return {"rmse": ((mean - self.y) ** 2).mean().sqrt().item() * y_std,
                "log_likelihood": lpd.mean().item() - math.log(y_std)}


def gaussian_ll(mean, var, y, y_std):
    return (-0.5 * (torch.log(2 * math.pi * var) + (y - mean) ** 2 / var)).mean().item() - math.log(y_std)


def run_split(split: int, args, out: Path):
    ds = load_boston(test_fraction=0.1, seed=split)
    y_mean, y_std = ds.meta["y_mean"], ds.meta["y_std"]
    y_train = (ds.y_train - y_mean) / y_std
    y_test = (ds.y_test - y_mean) / y_std
    n = ds.x_train.shape[0]
    torch.manual_seed(args.seed + split)
    pyro.set_rng_seed(args.seed + split)
    teacher_net = build("mlp", in_features=13, out_features=1, hidden=(args.hidden,))
    bnn = pyrobnn.bayesian(teacher_net, prior="gaussian", likelihood={"name": "gaussian", "scale": "latent"},
                           dataset_size=n)
    total = args.burn_in + args.steps
    b = max(1.0, total / 10)     # η decays from η_0 to ≈ η_0 · (b / (b + total))^0.55 ≈ 0.27 η_0
    schedule = PolynomialDecay(a=args.step_size * b ** 0.55, b=b, gamma=0.55)
    chain = SGLDChain(bnn, (ds.x_train, y_train), "sgld", step_size=schedule, batch_size=args.batch,
                      burn_in=args.burn_in, seed=args.seed + split)
    student = build("mlp", in_features=13, out_features=2, hidden=(args.hidden,))
    ensemble = EnsembleOnTest(ds.x_test, y_test, args.thin)
    t0 = time.perf_counter()
    student, record = distill(chain, student, ds.x_train, task="regression", steps=args.steps,
                              batch_size=args.student_batch, lr=args.lr, lr_schedule="cosine",
                              input_noise=args.input_noise, seed=args.seed + split, log_every=500,
                              callbacks=[ensemble])
    seconds = time.perf_counter() - t0

    d = chain.draws(ds.x_test)          # the final state: a single SGLD sample
    single_mean, single_var = d.mean[0], d.noise_var.reshape(-1)[0].expand_as(y_test)
    s_mean, s_var = student_predictive(student, ds.x_test, "regression")
    row = {
        "split": split,
        "teacher (single draw)": {"rmse": ((single_mean - y_test) ** 2).mean().sqrt().item() * y_std,
                                  "log_likelihood": gaussian_ll(single_mean, single_var, y_test, y_std)},
        "student": {"rmse": ((s_mean - y_test) ** 2).mean().sqrt().item() * y_std,
                    "log_likelihood": gaussian_ll(s_mean, s_var, y_test, y_std)},
        "ensemble": ensemble.metrics(y_std),
        "ensemble_draws": ensemble.count,
        "mean_single_draw_rmse": float(np.mean(ensemble.single_rmse)) * y_std,
        "teacher_updates": chain.updates,
        "teacher_state_bytes_first_last": [record.records[0]["teacher_state_bytes"],
                                           record.records[-1]["teacher_state_bytes"]],
        "teacher_draws_stored": record.teacher_draws_stored,
        "seconds": seconds,
    }
    if split == 0:   # the deployable artefact, and a check that it reloads to the same outputs
        path = out / "student_split0.safetensors"
        save_student(student, path, {"task": "regression", "y_mean": y_mean, "y_std": y_std})
        again, _ = load_student(path)
        assert torch.equal(again(ds.x_test), student(ds.x_test))
    return row


def mean_se(values):
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/boston_dark_knowledge")
    p.add_argument("--splits", type=int, default=20)
    p.add_argument("--first-split", type=int, default=0)
    p.add_argument("--hidden", type=int, default=50)
    p.add_argument("--burn-in", type=int, default=2000, help="teacher-only SGLD updates before distillation")
    p.add_argument("--steps", type=int, default=8000, help="paired (teacher update, student update) steps")
    p.add_argument("--thin", type=int, default=20, help="steps between ensemble draws")
    p.add_argument("--batch", type=int, default=32, help="teacher (SGLD) minibatch")
    p.add_argument("--student-batch", type=int, default=32, help="perturbed inputs per student step")
    p.add_argument("--step-size", type=float, default=4e-4, help="SGLD η at the first update")
    p.add_argument("--lr", type=float, default=3e-3, help="student Adam learning rate (cosine-decayed)")
    p.add_argument("--input-noise", type=float, default=0.1, help="std of the input perturbation (standardised units)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    t0 = time.perf_counter()
    for s in range(args.first_split, args.first_split + args.splits):
        row = run_split(s, args, out)
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("split", "teacher (single draw)", "student", "ensemble", "seconds")}),
              flush=True)
    names = ["teacher (single draw)", "student", "ensemble"]
    summary = {}
    for name in names:
        summary[name] = {}
        for metric in ("rmse", "log_likelihood"):
            m, se = mean_se([r[name][metric] for r in rows])
            summary[name][metric] = m
            summary[name][metric + "_se"] = se
    ratio = summary["student"]["rmse"] / summary["ensemble"]["rmse"]
    report = {"config": vars(args), "summary": summary, "student_over_ensemble_rmse": ratio,
              "total_seconds": time.perf_counter() - t0, "splits": rows}
    (out / "results.json").write_text(json.dumps(report, indent=2))
    lines = [f"Boston housing, {args.splits} random 90/10 splits, 13-50-1 (teacher) / 13-50-2 (student); "
             f"{args.burn_in} burn-in + {args.steps} paired SGLD/student steps per split; "
             f"ensemble of {rows[0]['ensemble_draws']} draws (one every {args.thin} steps)",
             "", "| predictor | test RMSE ($1000s) | test log-likelihood | published RMSE / LL | literature |",
             "|---|---|---|---|---|"]
    for name in names:
        s = summary[name]
        ref_rmse, ref_ll = SEED_NUMBERS[name]
        ref = f"{ref_rmse}" + (f" / {ref_ll}" if ref_ll is not None else "")
        lines.append(f"| {name} | {s['rmse']:.3f} ± {s['rmse_se']:.3f} | {s['log_likelihood']:.3f} ± "
                     f"{s['log_likelihood_se']:.3f} | {ref} | |")
    for name, (r, ll) in LITERATURE.items():
        lines.append(f"| {name} (literature) | | | | {r} / {ll} |")
    lines += ["", f"student RMSE / ensemble RMSE = {ratio:.3f} (target ≤ 1.05); ensemble RMSE target ≤ 3.06",
              f"teacher draws stored: {rows[0]['teacher_draws_stored']}; teacher state bytes first/last record: "
              f"{rows[0]['teacher_state_bytes_first_last']}; total time {report['total_seconds']:.0f} s"]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    main()
