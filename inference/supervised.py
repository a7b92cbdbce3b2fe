"""The deterministic baseline: one network trained on the labels by the training loop.

:func:`train_deterministic` is what the demo, the distillation harness and the examples compare the
Bayesian networks against: Adam on the negative log-likelihood of the labels (:func:`label_loss`:
cross-entropy; one logit: binary cross-entropy; regression: the Gaussian NLL of a ``[B, 2]`` mean /
log-variance output), with the loop's schedules, callbacks, checkpoints and resume.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from pyrobnn import inputs as _inputs
from pyrobnn.validation import positive_float, positive_int

from .batches import Batches, ShuffledBatches
from .checkpoint import Checkpoints
from .loop import History, Loop, OnRecord, Progress, descend
from .schedules import LRFactor, lr_factor_schedule

__all__ = ["train_deterministic", "SupervisedStep", "label_loss"]

_TASKS = ("classification", "regression")


def label_loss(out: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    """Mean negative log-likelihood of labels ``y`` under a network's outputs ``out``: cross-entropy of
    ``[B, C]`` logits, binary cross-entropy of one logit ``[B]`` / ``[B, 1]``, or (regression) the
    Gaussian NLL of ``[B, 2D]`` means then log-variances."""
    if task == "classification":
        if out.dim() == 1 or out.shape[-1] == 1:
            return F.binary_cross_entropy_with_logits(out.reshape(-1), y.reshape(-1).to(out.dtype))
        return F.cross_entropy(out, y.long())
    D = out.shape[-1] // 2
    mu, log_var = out[:, :D].reshape(y.shape), out[:, D:].reshape(y.shape)
    return (0.5 * (log_var + (y - mu) ** 2 * torch.exp(-log_var) + math.log(2 * math.pi))).mean()


class SupervisedStep:
    """One maximum-likelihood step: :func:`label_loss` of ``net(x)``, the NaN guard, backward, step."""

    def __init__(self, net: nn.Module, optimizer: torch.optim.Optimizer, task: str = "classification"):
        self.net, self.opt, self.task = net, optimizer, task

    def __call__(self, x, y):
        loss = label_loss(_inputs.call(self.net, x), y, self.task)
        return descend(loss, self.opt)


def train_deterministic(net: nn.Module, x, y: Optional[torch.Tensor] = None, *, task: str = "classification",
                        epochs: int = 20, batch_size: int = 128, lr: float = 1e-3, weight_decay: float = 0.0,
                        seed: Optional[int] = None, lr_schedule=None, callbacks: Sequence[Callable] = (),
                        checkpoint_dir=None, checkpoints: Optional[Callable] = None, resume: bool = False,
                        progress: bool = False, history: Optional[History] = None, drop_last: bool = True) -> nn.Module:
    """Train ``net`` on labels with Adam (in place); returned in eval mode.

    :param x: inputs ``[N, ...]`` with labels ``y`` — batched from a generator seeded with ``seed`` (0
        when None), a new permutation each epoch, the incomplete last batch dropped (kept with
        ``drop_last=False``) — or, with ``y``
        None, a loader: a :class:`pyrobnn.data.ArrayLoader` (its own seeded order; resumes mid-epoch)
        or a torch ``DataLoader``.
    :param task: ``"classification"`` or ``"regression"`` (see :func:`label_loss`).
    :param seed: when given, ``torch.manual_seed(seed)`` first.
    :param lr_schedule: as in :func:`pyrobnn.inference.fit` (``"cosine"``, ``("linear-decay", start)``, ...).
    :param callbacks: ``f(net, record)`` after each epoch (``record``: ``epoch``, ``loss``, ``seconds``;
        a callback may add entries); return ``True`` to stop.
    :param checkpoint_dir: the loop's checkpoints (``resume=True`` continues from the newest); or
        ``checkpoints``: a factory ``(net, optimizer) -> store`` with the store's ``prepare``, ``save``
        and ``restore`` (:class:`pyrobnn.inference.checkpoint.Checkpoints` is the default one).
    :param history: a :class:`~pyrobnn.inference.History` that receives the epoch records.
    """
    if task not in _TASKS:
        raise ValueError(f"task must be one of {_TASKS}, got {task!r}")
    positive_int("epochs", epochs)
    positive_float("lr", lr)
    if y is None:
        data = Batches(x, batch_size, 0)
    else:
        data = ShuffledBatches(_inputs.as_inputs(x), y, batch_size,
                               torch.Generator().manual_seed(0 if seed is None else seed), drop_last=drop_last)
    if seed is not None:
        torch.manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    store = None
    if checkpoints is not None:
        store = checkpoints(net, opt)
    elif checkpoint_dir is not None:
        store = Checkpoints(checkpoint_dir, net, opt)

    def summarize(loop):
        return {"epoch": loop.position.epoch + 1, "loss": loop.sums.get("loss", 0.0) / max(loop.count, 1),
                "seconds": time.perf_counter() - loop.epoch_started}

    schedules = [] if lr_schedule is None else [LRFactor(opt, lr, lr_factor_schedule(lr_schedule, epochs))]
    Loop(SupervisedStep(net, opt, task), data, epochs=epochs, model=net, schedules=schedules,
         callbacks=[OnRecord(cb, net) for cb in callbacks], summarize=summarize,
         progress=Progress(dynamic_ncols=False) if progress else None, checkpoints=store,
         resume=resume and store is not None, history=history).run()
    net.eval()
    return net
