"""The distillation objective: the teacher's predictive on a batch (aggregated over its draws) and the
student's divergence to it (see the package docstring for the formulas)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from pyrobnn.validation import positive_float

__all__ = ["distillation_loss", "TeacherDraws"]


_TASKS = ("classification", "regression")
_PRECISION = "likelihood.precision"


# ----------------------------------------------------------------------------------------------------
# the teacher's outputs and the loss
# ----------------------------------------------------------------------------------------------------
@dataclass
class TeacherDraws:
    """A teacher's outputs on one batch under S draws.

    classification: ``logits`` ``[S, B, C]``. regression: ``mean`` ``[S, B]`` or ``[S, B, D]`` and
    ``noise_var`` broadcastable to it (the draws' aleatoric variance). ``hidden``: ``[B, H]`` mean over
    draws of a hidden layer's activations, when asked for."""
    logits: Optional[torch.Tensor] = None
    mean: Optional[torch.Tensor] = None
    noise_var: Optional[torch.Tensor] = None
    hidden: Optional[torch.Tensor] = None


def _binary_to_two_class(logit: torch.Tensor) -> torch.Tensor:
    """One logit l per example → two-class logits (0, l) (softmax of which is (1 − σ(l), σ(l)))."""
    return torch.stack([torch.zeros_like(logit), logit], -1)


def _aggregate(draws: TeacherDraws, task: str, temperature: float):
    """The teacher's predictive on a batch: classification → log p̄_T ``[B, C]``;
    regression → (m̄ ``[B(, D)]``, v̄ ``[B(, D)]``)."""
    if task == "classification":
        logits = draws.logits
        S = logits.shape[0]
        return torch.logsumexp(F.log_softmax(logits / temperature, -1), 0) - math.log(S)
    mean = draws.mean
    var = torch.zeros((), dtype=mean.dtype) if draws.noise_var is None else draws.noise_var
    m_bar = mean.mean(0)
    v_bar = mean.var(0, unbiased=False) + (var + torch.zeros_like(mean)).mean(0)
    return m_bar, v_bar


def _student_logits(out: torch.Tensor, num_classes: int) -> torch.Tensor:
    if out.dim() == 1 or (out.dim() == 2 and out.shape[-1] == 1 and num_classes == 2):
        return _binary_to_two_class(out.reshape(out.shape[0]))
    if out.dim() != 2 or out.shape[-1] != num_classes:
        raise ValueError(f"the student outputs shape {tuple(out.shape)}; the teacher's predictive has "
                         f"{num_classes} classes (need [B, {num_classes}]" + (" or [B, 1]" if num_classes == 2 else "") + ")")
    return out


def _student_gaussian(out: torch.Tensor, mean_shape: torch.Size) -> Tuple[torch.Tensor, torch.Tensor]:
    """Student output ``[B, 2]`` / ``[B, 2D]`` → (μ, log σ²) shaped like the teacher's mean ``[B(, D)]``."""
    D = 1 if len(mean_shape) == 1 else mean_shape[-1]
    if out.dim() != 2 or out.shape[-1] != 2 * D:
        raise ValueError(f"a regression student must output [B, {2 * D}] (mean{'s' if D > 1 else ''} then "
                         f"log-variance{'s' if D > 1 else ''}); it gave {tuple(out.shape)}")
    mu, log_var = out[:, :D], out[:, D:]
    return mu.reshape(mean_shape), log_var.reshape(mean_shape)


def _loss_to_target(target, out: torch.Tensor, task: str, temperature: float) -> torch.Tensor:
    """Per-example divergence ``[B]`` from the teacher's predictive ``target`` to the student's output."""
    if task == "classification":
        log_p = target
        log_q = F.log_softmax(_student_logits(out, log_p.shape[-1]) / temperature, -1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        return kl * temperature ** 2
    m_bar, v_bar = target
    mu, log_var = _student_gaussian(out, m_bar.shape)
    # KL(N(m̄, v̄) ‖ N(μ, σ²)) = ½[log σ² − log v̄ + (v̄ + (m̄ − μ)²)/σ² − 1]; exp(−log σ²) keeps it finite
    kl = 0.5 * (log_var - v_bar.clamp_min(1e-30).log() + (v_bar + (m_bar - mu) ** 2) * torch.exp(-log_var) - 1.0)
    return kl.reshape(kl.shape[0], -1).sum(-1)


def distillation_loss(teacher_outputs, student_output: torch.Tensor, task: str = "classification",
                      temperature: float = 1.0, noise_variance=None) -> torch.Tensor:
    """The distillation objective on one batch (a scalar; see the module docstring).

    :param teacher_outputs: classification — the teacher's logits under S draws ``[S, B, C]`` (or one
        network's ``[B, C]``; binary: ``[S, B]`` logits of a Bernoulli teacher); regression — the draws'
        means ``[S, B]`` / ``[S, B, D]`` (or ``[B]``: one draw).
    :param student_output: classification ``[B, C]`` logits (binary: ``[B]``, ``[B, 1]`` or ``[B, 2]``);
        regression ``[B, 2]`` / ``[B, 2D]`` (means, then log-variances).
    :param noise_variance: regression only: the draws' noise variance, broadcastable to the means
        (``[S]`` per-draw values, ``[S, 1]``, or a float); 0 when None.
    :returns: T²·KL(p̄_T ‖ q_T) or KL(N(m̄, v̄) ‖ N(μ, σ²)), averaged over the batch — 0 iff matched.
    """
    task = _check_task(task)
    _check_temperature(temperature)
    t = torch.as_tensor(teacher_outputs)
    if task == "classification":
        if t.dim() == 2 and student_output.dim() == 2 and t.shape == student_output.shape:
            t = t[None]                                   # one network's logits [B, C]
        elif t.dim() in (1, 2):
            t = _binary_to_two_class(t if t.dim() == 2 else t[None])   # Bernoulli logits [S, B] / [B]
        elif t.dim() == 3 and t.shape[-1] == 1:
            t = _binary_to_two_class(t.squeeze(-1))
        if t.dim() != 3:
            raise ValueError(f"teacher logits must be [S, B, C] or [B, C], got {tuple(t.shape)}")
        if t.shape[1] != student_output.shape[0]:
            raise ValueError(f"teacher has {t.shape[1]} examples, the student {student_output.shape[0]}")
        draws = TeacherDraws(logits=t)
    else:
        if t.dim() == 1:
            t = t[None]
        var = None
        if noise_variance is not None:
            var = torch.as_tensor(noise_variance, dtype=t.dtype)
            if var.dim() == 1 and var.shape[0] == t.shape[0]:
                var = var.reshape((-1,) + (1,) * (t.dim() - 1))
            if (var < 0).any():
                raise ValueError("noise_variance must be ≥ 0")
        draws = TeacherDraws(mean=t, noise_var=var)
    return _loss_to_target(_aggregate(draws, task, temperature), student_output, task, temperature).mean()


def _check_task(task):
    if task not in _TASKS:
        raise ValueError(f"task must be one of {_TASKS}, got {task!r}")
    return task


def _check_temperature(temperature):
    positive_float("temperature", temperature)
