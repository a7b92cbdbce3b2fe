"""Schedules of a training loop, as functions of the (fractional) epoch: the KL weight's warm-up and
the learning-rate factor; and :class:`KLWarmup` / :class:`LRFactor`, which apply them before each step."""
from __future__ import annotations

import math
from typing import Callable, List

from pyrobnn.validation import non_negative_float

__all__ = ["kl_warmup_schedule", "lr_factor_schedule", "auto_kl_warmup", "KLWarmup", "LRFactor"]


def kl_warmup_schedule(spec) -> Callable[[float], float]:
    """KL weight as a function of (fractional) epoch.

    ``None`` → 1; ``(hold, ramp)`` → 0 for ``hold`` epochs then linear to 1 over ``ramp`` epochs
    (the sparse-VD recipe is ``(5, 15)``); a float → constant; a callable is used as is."""
    if spec is None:
        return lambda e: 1.0
    if callable(spec):
        return spec
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        weight = non_negative_float("kl weight", spec)
        return lambda e: weight
    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        hold, ramp = float(spec[0]), float(spec[1])
        if hold < 0 or ramp < 0:
            raise ValueError(f"kl_warmup (hold, ramp) must be ≥ 0, got {spec}")
        return lambda e: 0.0 if e < hold else (1.0 if ramp == 0 else min(1.0, (e - hold) / ramp))
    raise ValueError(f"kl_warmup must be None, a number, (hold_epochs, ramp_epochs) or a callable, got {spec!r}")


def _collapsing_priors(bnn) -> List[str]:
    """Names of the priors of ``bnn`` whose ELBO is known to collapse to the prior without a KL warm-up
    (log-uniform, empirical ARD: at initialisation their KL term outweighs the data term and drives every
    weight to zero before the likelihood can pull it back)."""
    from pyrobnn.priors.ard import EmpiricalARD
    from pyrobnn.priors.log_uniform import LogUniform
    found = set()
    for prior in bnn.site_priors.values():
        d = prior
        while d is not None:
            if isinstance(d, LogUniform):
                found.add("log-uniform")
            elif isinstance(d, EmpiricalARD):
                found.add("empirical ARD")
            d = getattr(d, "base_dist", None)
    return sorted(found)


def auto_kl_warmup(bnn, epochs: int):
    """What ``kl_warmup="auto"`` means for ``bnn``: ``(0, max(1, epochs // 4))`` — the KL weight ramps
    linearly from 0 to 1 over the first quarter of training — when a prior is log-uniform or empirical
    ARD, else ``None`` (no warm-up)."""
    return (0, max(1, epochs // 4)) if _collapsing_priors(bnn) else None


def lr_factor_schedule(spec, epochs: int) -> Callable[[float], float]:
    """Learning-rate multiplier as a function of (fractional) epoch.

    ``None`` → 1; ``"cosine"`` → ½(1 + cos(π e/E)); ``"linear-decay"`` or ``("linear-decay", k)`` →
    constant until epoch k (default E/2) then linear to 0 at E; a callable is used as is."""
    if spec is None:
        return lambda e: 1.0
    if callable(spec):
        return spec
    name, arg = (spec, None) if isinstance(spec, str) else (spec[0], spec[1] if len(spec) > 1 else None)
    if name == "cosine":
        return lambda e: 0.5 * (1 + math.cos(math.pi * min(e, epochs) / epochs))
    if name == "linear-decay":
        start = float(arg) if arg is not None else epochs / 2
        if not (0 <= start <= epochs):
            raise ValueError(f"linear-decay start {start} must lie in [0, {epochs}]")
        return lambda e: 1.0 if e < start else max(0.0, (epochs - e) / max(epochs - start, 1e-12))
    raise ValueError(f"unknown lr_schedule {spec!r}; use None, 'cosine', ('linear-decay', start) or a callable")


class KLWarmup:
    """Before each step: ``model.kl_weight = weight(epoch + step / steps_per_epoch)``."""

    def __init__(self, model, weight: Callable[[float], float]):
        self.model, self.weight = model, weight

    def __call__(self, position) -> None:
        self.model.kl_weight = self.weight(position.fraction)


class LRFactor:
    """Before each step: every parameter group's ``lr = base_lr * factor(t)``, with t the fractional
    epoch (``per="epoch"``) or the 0-based index of the step in the run (``per="step"``)."""

    def __init__(self, optimizer, base_lr: float, factor: Callable[[float], float], per: str = "epoch"):
        if per not in ("epoch", "step"):
            raise ValueError(f"per must be 'epoch' or 'step', got {per!r}")
        self.optimizer, self.base_lr, self.factor, self.per = optimizer, base_lr, factor, per

    def __call__(self, position) -> None:
        f = self.factor(position.fraction if self.per == "epoch" else position.global_step)
        for g in self.optimizer.param_groups:
            g["lr"] = self.base_lr * f
