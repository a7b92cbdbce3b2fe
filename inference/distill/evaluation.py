"""Teacher vs students vs a baseline in one run: accuracy/RMSE, NLL, ECE and latency
(:func:`evaluate_distillation`), and a student's predictive (:func:`student_predictive`)."""
from __future__ import annotations

import math
import statistics
import time
from typing import Dict, List, Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from pyrobnn import inputs as _inputs

from .loss import _aggregate, _binary_to_two_class, _check_task
from .teachers import Teacher, as_teacher

__all__ = ["evaluate_distillation", "student_predictive"]


@torch.no_grad()
def student_predictive(student: nn.Module, x: torch.Tensor, task: str = "classification"):
    """A student's (or any such network's) predictive: class probabilities ``[B, C]`` or (mean, variance)."""
    task = _check_task(task)
    was = student.training
    student.eval()
    try:
        out = _inputs.call(student, _inputs.as_inputs(x, next(iter(student.parameters()), torch.empty(0)).dtype))
    finally:
        student.train(was)
    if task == "classification":
        if out.dim() == 1 or out.shape[-1] == 1:
            return _binary_to_two_class(out.reshape(-1)).softmax(-1)
        return out.softmax(-1)
    D = out.shape[-1] // 2
    mean, log_var = out[:, :D], out[:, D:]
    if D == 1:
        mean, log_var = mean.squeeze(-1), log_var.squeeze(-1)
    return mean, log_var.exp()


def _classification_metrics(probs, y):
    from pyrobnn.metrics import accuracy, ece, nll
    return {"accuracy": accuracy(probs, y), "nll": nll(probs, y), "ece": ece(probs, y)}


def _regression_metrics(mean, var, y, y_scale):
    from pyrobnn.metrics import gaussian_nll, rmse
    return {"rmse": rmse(mean, y) * y_scale, "nll": gaussian_nll(mean, var, y) + math.log(y_scale)}


def _teacher_metrics(t: Teacher, x, y, num_samples, y_scale):
    d = t.draws(x, num_samples)
    if t.task == "classification":
        return _classification_metrics(F.softmax(d.logits, -1).mean(0), y.long())
    mean = d.mean
    var = (torch.zeros((), dtype=mean.dtype) if d.noise_var is None else d.noise_var) + torch.zeros_like(mean)
    # the mixture's log-likelihood log (1/S) Σ_s N(y; m_s, v_s), not a moment-matched Gaussian
    lp = -0.5 * (torch.log(2 * math.pi * var) + (y - mean) ** 2 / var)
    lpd = torch.logsumexp(lp, 0) - math.log(mean.shape[0])
    return {"rmse": ((mean.mean(0) - y) ** 2).mean().sqrt().item() * y_scale,
            "nll": -lpd.mean().item() + math.log(y_scale)}


@torch.no_grad()
def evaluate_distillation(teacher, students: Mapping[str, nn.Module], x: torch.Tensor, y: torch.Tensor, *,
                          task: Optional[str] = None, num_samples: Optional[int] = 16,
                          latency_batch: int = 128, latency_repeats: int = 20, y_scale: float = 1.0,
                          teacher_name: Optional[str] = None) -> Dict[str, Dict[str, float]]:
    """Teacher ensemble vs students (and any other network, e.g. a :func:`train_deterministic`
    baseline, passed among ``students``) on ``(x, y)``, in one run.

    Per row: classification ``accuracy``, ``nll``, ``ece``; regression ``rmse`` and ``nll`` (the
    teacher's mixture log-likelihood; a student's Gaussian), multiplied / shifted by ``y_scale`` so
    that standardised targets are scored in original units; and ``latency_ms``: the median CPU time
    (``time.process_time``, all threads of the process) to predict one batch of ``latency_batch``
    inputs (teacher: the S-draw predictive), over ``latency_repeats`` rounds interleaved across rows;
    ``latency_wall_ms`` the median wall time of the same calls. Students also get ``latency_ratio`` =
    teacher / student CPU latency and ``latency_wall_ratio``. CPU time is the primary column because on
    a shared machine a long call is pre-empted more often than a short one, which inflates wall-time
    ratios.
    """
    t = as_teacher(teacher, task)
    name = teacher_name or f"teacher ensemble (S={num_samples})"
    rows: Dict[str, Dict[str, float]] = {name: _teacher_metrics(t, x, y, num_samples, y_scale)}
    for sname, net in students.items():
        if t.task == "classification":
            rows[sname] = _classification_metrics(student_predictive(net, x, "classification"), y.long())
        else:
            mean, var = student_predictive(net, x, "regression")
            rows[sname] = _regression_metrics(mean, var, y.reshape(mean.shape), y_scale)
    xb = _inputs.rows(_inputs.as_inputs(x), 0, latency_batch)
    fns = {name: (lambda: _aggregate(t.draws(xb, num_samples), t.task, 1.0))}
    for sname, net in students.items():
        fns[sname] = (lambda net=net: student_predictive(net, xb, t.task))
    for fn in fns.values():   # warm-up (lazy initialisation, allocator)
        fn()
    cpu: Dict[str, List[float]] = {k: [] for k in fns}
    wall: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(latency_repeats):
        for k, fn in fns.items():
            c0, w0 = time.process_time(), time.perf_counter()
            fn()
            cpu[k].append(time.process_time() - c0)
            wall[k].append(time.perf_counter() - w0)
    for k in fns:
        rows[k]["latency_ms"] = 1e3 * statistics.median(cpu[k])
        rows[k]["latency_wall_ms"] = 1e3 * statistics.median(wall[k])
    for sname in students:
        rows[sname]["latency_ratio"] = rows[name]["latency_ms"] / max(rows[sname]["latency_ms"], 1e-9)
        rows[sname]["latency_wall_ratio"] = rows[name]["latency_wall_ms"] / rows[sname]["latency_wall_ms"]
    return rows
