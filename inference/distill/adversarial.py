"""Adversarial distillation: a discriminator between the teacher's and the student's predictive
log-probabilities (optionally with hidden activations), trained against the student (see the package
docstring)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from pyrobnn.validation import positive_float, positive_int

from .loss import _student_gaussian, _student_logits

__all__ = ["Adversarial", "Discriminator"]


@dataclass
class Adversarial:
    """Options of adversarial distillation.

    :ivar weight: multiplies the student's fooling loss −log D(student) added to its task loss.
    :ivar hidden: ``(teacher_module, student_module)`` names whose activations (equal widths) are
        appended to the discriminator's input; None: log-probabilities only.
    :ivar lr: the discriminator's Adam learning rate (betas (0.5, 0.999), the usual GAN setting).
    :ivar width: hidden units of the discriminator's two hidden layers.
    :ivar spectral_norm: spectral normalisation of every discriminator layer.
    :ivar label_smoothing: one-sided: the teacher's target is 1 − label_smoothing.
    :ivar d_steps: discriminator updates per student update.
    """
    weight: float = 0.1
    hidden: Optional[Tuple[str, str]] = None
    lr: float = 2e-4
    width: int = 64
    spectral_norm: bool = True
    label_smoothing: float = 0.1
    d_steps: int = 1

    def __post_init__(self):
        if not (isinstance(self.weight, (int, float)) and self.weight >= 0):
            raise ValueError(f"adversarial weight must be ≥ 0, got {self.weight!r}")
        if not (isinstance(self.label_smoothing, (int, float)) and 0 <= self.label_smoothing < 0.5):
            raise ValueError(f"label_smoothing must lie in [0, 0.5), got {self.label_smoothing!r}")
        if self.hidden is not None:
            if not (isinstance(self.hidden, (tuple, list)) and len(self.hidden) == 2
                    and all(isinstance(n, str) for n in self.hidden)):
                raise ValueError("hidden must be a (teacher_module, student_module) pair of names")
            self.hidden = tuple(self.hidden)
        positive_float("lr", self.lr)
        positive_int("width", self.width)
        positive_int("d_steps", self.d_steps)


class Discriminator(nn.Module):
    """D(z) = P(z came from the teacher) as a logit ``[B]``: in → width → width → 1, LeakyReLU(0.2),
    every Linear spectrally normalised (when asked)."""

    def __init__(self, in_features: int, width: int = 64, spectral_norm: bool = True):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm if spectral_norm else (lambda m: m)
        self.body = nn.Sequential(sn(nn.Linear(in_features, width)), nn.LeakyReLU(0.2),
                                  sn(nn.Linear(width, width)), nn.LeakyReLU(0.2), sn(nn.Linear(width, 1)))

    def forward(self, z):
        return self.body(z).squeeze(-1)


def _adv_features(target, out, task, temperature, hidden):
    """Teacher / student discriminator inputs from the predictive target and the student's output."""
    if task == "classification":
        t = target
        s = F.log_softmax(_student_logits(out, target.shape[-1]) / temperature, -1)
    else:
        m_bar, v_bar = target
        mu, log_var = _student_gaussian(out, m_bar.shape)
        flat = lambda a: a.reshape(a.shape[0], -1)  # noqa: E731
        t = torch.cat([flat(m_bar), flat(v_bar.clamp_min(1e-30).log())], -1)
        s = torch.cat([flat(mu), flat(log_var)], -1)
    if hidden is not None:
        th, sh = hidden
        if th.shape[-1] != sh.shape[-1]:
            raise ValueError(f"hidden layers differ in width (teacher {th.shape[-1]}, student {sh.shape[-1]}); "
                             "the discriminator needs equal widths")
        t, s = torch.cat([t, th], -1), torch.cat([s, sh], -1)
    return t, s
