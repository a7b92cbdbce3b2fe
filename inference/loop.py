"""One training loop for every way pyrobnn trains: a *step* says what one update is, the
:class:`Loop` does everything around it.

A step is any callable ``step(*batch)`` (e.g. ``step(x, y)``) that makes one update from one
minibatch and returns its loss (a tensor or a float), a dict of numbers to log (``{"loss": ...}``)
or None (nothing to log). A step whose loss is NaN/inf raises :class:`TrainingDiverged` *before* it
changes a parameter (see :func:`check_finite`). A step may also have ``begin(position)``, called
before the loop fetches the step's batch (a running teacher advances there). The library's steps: ``SVIStep`` (fit), the λ-sweep
step (fit_complexity), the SGLD step (sample), the distillation step (distill) and the supervised step
(train_deterministic).

The loop owns:

* **batching** — ``batches.epoch(e, start)`` yields the batches of epoch e from step ``start`` on
  (:mod:`pyrobnn.inference.batches`); ``len(batches)`` is the number of steps per epoch;
* **schedules** — callables ``f(position)`` run before each step (:class:`~.schedules.KLWarmup`,
  :class:`~.schedules.LRFactor`);
* **progress** — a tqdm bar per epoch (:class:`Progress`);
* **records** — the logged numbers are summed and, at each epoch end (or every ``record_every``
  steps), ``summarize(loop, means_source)`` turns them into one record of the :class:`History`;
* **callbacks** — objects with any of ``on_step_end(loop, position, logs)`` and
  ``on_record(loop, record) -> stop?``, called in the order given;
* **the NaN guard** — :class:`TrainingDiverged` is re-raised naming the epoch and step and the last
  good checkpoint;
* **checkpoints and resume** — :class:`~.checkpoint.Checkpoints`: at every epoch end (rank 0), every
  ``checkpoint_every`` steps, and when ``stop_requested()`` turns true (:class:`TrainingInterrupted`);
  ``resume=True`` continues from the newest readable file with the RNG state and data order;
* **data-parallel reduction** — a :class:`~.distributed.DataParallel`: ``synchronize`` once after the
  resume point is known, ``begin_step`` before each step, the mean over ranks of the logged sums,
  the OR of the callbacks' stop votes; rank 0 alone writes and shows progress.
"""
from __future__ import annotations

import csv
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from pyrobnn.validation import one_of, positive_int

__all__ = ["Loop", "Position", "Progress", "History", "TrainingDiverged", "TrainingInterrupted", "check_finite",
           "descend", "make_optimizer", "OnRecord"]


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite; parameters are those of the last good step."""


class TrainingInterrupted(Exception):
    """Training stopped because ``stop_requested()`` turned true: the step in progress was finished and,
    with a checkpoint directory, a checkpoint written at ``checkpoint`` (``resume=True`` continues there)."""

    def __init__(self, checkpoint, epoch: int, step: int):
        where = f"; checkpoint {checkpoint}" if checkpoint else " (no checkpoint_dir: nothing saved)"
        super().__init__(f"training interrupted at epoch {epoch + 1}, step {step}{where}")
        self.checkpoint, self.epoch, self.step = checkpoint, epoch, step


@dataclass
class History:
    """The records of a run (one dict per epoch, or per ``record_every`` steps)."""
    records: List[Dict[str, Any]] = field(default_factory=list)

    def __getitem__(self, i):
        return self.records[i]

    def __len__(self):
        return len(self.records)

    def column(self, key):
        return [r.get(key) for r in self.records]

    def to_csv(self, path):
        keys = []
        for r in self.records:
            keys += [k for k in r if k not in keys]
        tmp = Path(str(path) + ".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.records)
        os.replace(tmp, path)


@dataclass
class Position:
    """Where the loop is: ``epoch`` (0-based), ``step`` (0-based index of the step within its epoch)."""
    epoch: int
    step: int
    steps_per_epoch: int

    @property
    def fraction(self) -> float:
        """The fractional epoch ``epoch + step / steps_per_epoch`` (what epoch schedules read)."""
        return self.epoch + self.step / self.steps_per_epoch

    @property
    def global_step(self) -> int:
        """0-based index of the step in the whole run."""
        return self.epoch * self.steps_per_epoch + self.step


@dataclass
class Progress:
    """How the loop shows progress: a tqdm bar per epoch titled ``desc(epoch, epochs)``; every
    ``postfix_every`` steps (or at each record when ``postfix_every`` is None) ``postfix(loop)``'s
    dict is shown on it; with ``write_records`` each epoch's record is printed."""
    desc: Callable[[int, int], str] = lambda e, n: f"epoch {e + 1}/{n}"
    postfix: Optional[Callable[["Loop"], Dict[str, str]]] = None
    postfix_every: Optional[int] = 10
    write_records: bool = False
    dynamic_ncols: bool = True


class OnRecord:
    """A callback from a function: ``fn(*args, record)`` at every record; its true return stops training."""

    def __init__(self, fn: Callable, *args):
        self.fn, self.args = fn, args

    def on_record(self, loop, record):
        return self.fn(*self.args, record)


def check_finite(loss: torch.Tensor, what: str = "the loss") -> None:
    """The NaN guard of a step: raise :class:`TrainingDiverged` when ``loss`` is NaN or infinite (call it
    before the optimiser step, so the parameters stay those of the last good step)."""
    if not torch.isfinite(loss):
        raise TrainingDiverged(f"{what} became {loss.item()}")


def descend(loss: torch.Tensor, optimizer: torch.optim.Optimizer, params=None, grad_clip: Optional[float] = None,
            what: str = "the loss") -> torch.Tensor:
    """The end of a gradient step: the NaN guard (:func:`check_finite`), zeroed gradients, backward,
    optional clipping of the gradient norm of ``params`` to ``grad_clip``, the optimiser step; returns
    the loss detached."""
    check_finite(loss, what)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return loss.detach()


_OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


def make_optimizer(optimizer, params, lr: float, kwargs: Optional[dict] = None) -> torch.optim.Optimizer:
    """``"adam"``, ``"adamw"`` or ``"sgd"`` (with ``lr`` and ``kwargs``), or a factory ``params -> optimizer``."""
    if isinstance(optimizer, str):
        if optimizer.lower() not in _OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; known: {', '.join(_OPTIMIZERS)}")
        return _OPTIMIZERS[optimizer.lower()](params, lr=lr, **(kwargs or {}))
    return optimizer(params)


class Loop:
    """Run ``step`` over ``batches`` for ``epochs`` epochs (see the module docstring).

    :param step: the update (``step(*batch)``; optional ``step.begin(position)``).
    :param batches: ``len(batches)`` steps per epoch, ``batches.epoch(e, start)`` their batches.
    :param model: the module put in training mode at each epoch start (and synchronised by
        ``distributed``); None leaves modes alone.
    :param schedules: ``f(position)`` called before every step, in order.
    :param callbacks: objects with ``on_step_end(loop, position, logs)`` and/or ``on_record(loop,
        record)``; a true return of ``on_record`` stops training after that record.
    :param summarize: ``summarize(loop) -> dict`` builds a record from ``loop.sums`` / ``loop.count``
        (the logged numbers summed since the last record); None keeps no records.
    :param record_every: record every this many steps (counted over the run) instead of per epoch.
    :param progress: a :class:`Progress`, or None for no bar.
    :param checkpoints: a :class:`~.checkpoint.Checkpoints`; ``checkpoint_every`` adds mid-epoch saves.
    :param resume: continue from the newest checkpoint (needs ``checkpoints``).
    :param distributed: a :class:`~.distributed.DataParallel`.
    :param stop_requested: polled after every step; see :class:`TrainingInterrupted`.
    :param diverged_at: ``"epoch"`` names the epoch and step of a divergence, ``"step"`` the step of the run.
    """

    def __init__(self, step: Callable, batches, *, epochs: int = 1, model: Optional[torch.nn.Module] = None,
                 schedules: Sequence[Callable] = (), callbacks: Sequence[Any] = (),
                 summarize: Optional[Callable[["Loop"], Dict[str, Any]]] = None, record_every: Optional[int] = None,
                 progress: Optional[Progress] = None, checkpoints=None, checkpoint_every: Optional[int] = None,
                 resume: bool = False, distributed=None, stop_requested: Optional[Callable[[], bool]] = None,
                 history: Optional[History] = None, diverged_at: str = "epoch"):
        if resume and checkpoints is None:
            raise ValueError("resume=True needs checkpoint_dir")
        for name, v in (("epochs", epochs), ("record_every", record_every), ("checkpoint_every", checkpoint_every)):
            if v is not None:
                positive_int(name, v)
        one_of("diverged_at", diverged_at, ("epoch", "step"))
        if not callable(step):
            raise TypeError(f"the step must be callable, got {type(step).__name__}")
        self.step, self.batches, self.epochs, self.model = step, batches, epochs, model
        self.schedules, self.callbacks = list(schedules), list(callbacks)
        self.summarize, self.record_every, self.progress = summarize, record_every, progress
        self.checkpoints, self.checkpoint_every, self.resume = checkpoints, checkpoint_every, resume
        self.distributed, self.stop_requested = distributed, stop_requested
        self.history = history if history is not None else History()
        self.diverged_at = diverged_at
        self.sums: Dict[str, float] = {}
        self.count = 0
        self.position: Optional[Position] = None
        self.last_checkpoint = None
        self.epoch_started = self.started = time.perf_counter()

    # -- pieces --------------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.distributed is None or self.distributed.is_main

    def _save(self, epoch, step):
        self.last_checkpoint = self.checkpoints.save(self.history, epoch, step, getattr(self.batches, "seed", None))
        return self.last_checkpoint

    def _diverged(self, err, pos, updated=False):
        where = (f"at epoch {pos.epoch + 1}, step {pos.step + 1}" if self.diverged_at == "epoch"
                 else f"at step {pos.global_step + 1}")
        params = ("the step had already updated the parameters" if updated
                  else "parameters are those of the previous step")
        ckpt = f" Last good checkpoint: {self.last_checkpoint}." if self.last_checkpoint else ""
        return TrainingDiverged(f"{err} {where}; {params}.{ckpt} Lower the learning rate or the initial scale.")

    def _log(self, out) -> Dict[str, float]:
        if out is None:
            return {}
        if isinstance(out, dict):
            return {k: float(v) for k, v in out.items()}
        return {"loss": out.item() if isinstance(out, torch.Tensor) else float(out)}

    def _make_record(self) -> Dict[str, Any]:
        """A record of the logged sums so far (reduced over ranks first), appended to the history."""
        if self.distributed is not None:
            self.sums = {k: self.distributed.mean(v) for k, v in (self.sums or {"loss": 0.0}).items()}
        record = self.summarize(self)
        self.history.records.append(record)
        return record

    def _on_record(self, record) -> bool:
        """The callbacks' stop vote on a new record (the first true vote skips the callbacks after it)."""
        return any(bool(cb.on_record(self, record)) for cb in self.callbacks if hasattr(cb, "on_record"))

    # -- the loop ------------------------------------------------------------------------------------
    def _start(self) -> Tuple[int, int]:
        """The resume point (after restoring the newest checkpoint when resuming), ranks synchronised."""
        start_epoch, start_step = 0, 0
        if self.resume:
            found = self.checkpoints.restore(self.history, self.batches)
            if found is not None:
                self.last_checkpoint, start_epoch, start_step = found
                if start_step and not getattr(self.batches, "resumable", False):
                    warnings.warn("resuming a torch DataLoader mid-epoch: the epoch restarts from its first batch")
                    start_step = 0
        if self.distributed is not None:  # rank 0's parameters everywhere, same resume point, gradient all-reduce
            self.distributed.synchronize(self.model, start_epoch, start_step)
        if start_step >= len(self.batches):
            start_epoch, start_step = start_epoch + 1, 0
        if self.checkpoints is not None:
            self.checkpoints.prepare()
        return start_epoch, start_step

    def run(self) -> History:
        """Train from the start (or the resume point) to the last epoch; returns the history."""
        start_epoch, start_step = self._start()
        self._saving = self.is_main and self.checkpoints is not None
        self._tqdm = None
        if self.progress is not None and self.is_main:
            try:
                from tqdm.auto import tqdm
                self._tqdm = tqdm
            except ImportError:  # pragma: no cover
                pass
        self._bar = None
        self.started = time.perf_counter()
        try:
            for epoch in range(start_epoch, self.epochs):
                stop = self._epoch(epoch, start_step)
                start_step = 0
                if self._end_of_epoch(epoch, stop):
                    break
                if self.stop_requested is not None and epoch + 1 < self.epochs and self.stop_requested():
                    raise TrainingInterrupted(self.last_checkpoint if self.is_main else None, epoch + 1, 0)
        finally:
            self._close_bar()
        return self.history

    def _close_bar(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _epoch(self, epoch: int, start_step: int) -> bool:
        """The steps of one epoch from ``start_step``; True when a callback asked to stop."""
        spe = len(self.batches)
        if self.model is not None:
            self.model.train()
        self.epoch_started = time.perf_counter()
        if not self.record_every:   # records every n steps run across epoch boundaries
            self.sums, self.count = {}, 0
        if self._tqdm is not None:
            self._bar = self._tqdm(total=spe, initial=start_step, desc=self.progress.desc(epoch, self.epochs),
                                   leave=False, dynamic_ncols=self.progress.dynamic_ncols)
        self.position = Position(epoch, start_step, spe)
        batches = self.batches.epoch(epoch, start_step)
        for step in range(start_step, spe):
            pos = self.position = Position(epoch, step, spe)
            if hasattr(self.step, "begin"):
                self.step.begin(pos)
            try:
                batch = next(batches)
            except StopIteration:
                break
            if self._step(pos, batch):
                return True
        return False

    def _step(self, pos: Position, batch) -> bool:
        """One step and what follows it; True when a callback asked to stop."""
        epoch, spe = pos.epoch, pos.steps_per_epoch
        if self.distributed is not None:
            self.distributed.begin_step(epoch, pos.step)
        for schedule in self.schedules:
            schedule(pos)
        try:
            out = self.step(*batch)
        except TrainingDiverged as e:
            raise self._diverged(e, pos) from None
        logs = self._log(out)
        if "loss" in logs and not math.isfinite(logs["loss"]):
            raise self._diverged(TrainingDiverged(f"the loss became {logs['loss']}"), pos, updated=True)
        for k, v in logs.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1
        done = pos.step + 1                     # steps done in this epoch
        stop = recorded = False
        if self.summarize is not None and self.record_every and \
                ((pos.global_step + 1) % self.record_every == 0 or (epoch + 1 == self.epochs and done == spe)):
            record = self._make_record()
            self.sums, self.count = {}, 0
            stop, recorded = self._on_record(record), True
        if self._bar is not None:
            self._bar.update(1)
            p = self.progress
            if p.postfix is not None and ((p.postfix_every and done % p.postfix_every == 0) or
                                          (p.postfix_every is None and recorded)):
                self._bar.set_postfix(**p.postfix(self))
        for cb in self.callbacks:
            if hasattr(cb, "on_step_end"):
                cb.on_step_end(self, pos, logs)
        if self._saving and self.checkpoint_every and done % self.checkpoint_every == 0 and done < spe:
            self._save(epoch, done)
        if self.stop_requested is not None and done < spe and self.stop_requested():
            self._close_bar()
            raise TrainingInterrupted(self._save(epoch, done) if self._saving else None, epoch, done)
        return stop

    def _end_of_epoch(self, epoch: int, stop: bool) -> bool:
        """The epoch's record, callbacks and checkpoint; True when training stops here."""
        self._close_bar()
        if self.summarize is not None and not self.record_every:
            record = self._make_record()
            if self.progress is not None and self.progress.write_records and self._tqdm is not None:
                shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in record.items()}
                self._tqdm.write(" ".join(f"{k}={v}" for k, v in shown.items()))
            stop = self._on_record(record)
        if self._saving:  # after the callbacks: what they add to the record, and the RNG they drew, is saved
            self._save(epoch + 1, 0)
        if self.distributed is not None:
            stop = self.distributed.any(stop)
        return stop
