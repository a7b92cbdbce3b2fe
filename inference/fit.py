"""``fit``: the SVI loop for a BNN — minibatches with Pyro's N/M scaling, KL warm-up, learning-rate
schedule, tqdm progress with the running ELBO, validation metrics, atomic checkpoints, exact resume,
and a NaN guard that stops without touching the last good parameters or checkpoint.

The loss is ``MeanFieldELBO().differentiable_loss(bnn.model, bnn.guide, x, y)`` (:mod:`pyrobnn.inference.elbo`:
``pyro.infer.TraceMeanField_ELBO``'s loss and gradients with less per-step bookkeeping) — stepped with an ordinary ``torch.optim`` optimiser over
``bnn.parameters()`` (one optimiser for all parameters; its state is checkpointed as tensors).
"""
from __future__ import annotations

import csv
import glob
import json
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pyro
import torch

from pyrobnn import inputs
from pyrobnn.bnn import BNN
from pyrobnn.data import ArrayLoader
from pyrobnn.io import flatten_state, read_state, unflatten_state, write_state

from .elbo import MeanFieldELBO

__all__ = ["fit", "SVIStep", "History", "TrainingDiverged", "TrainingInterrupted", "kl_warmup_schedule",
           "lr_factor_schedule", "latest_checkpoint", "load_checkpoint", "auto_kl_warmup"]


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite; parameters are those of the last good step."""


class TrainingInterrupted(Exception):
    """``fit`` stopped because ``stop_requested()`` turned true: the step in progress was finished and,
    with a ``checkpoint_dir``, a checkpoint written at ``checkpoint`` (``resume=True`` continues there)."""

    def __init__(self, checkpoint, epoch: int, step: int):
        where = f"; checkpoint {checkpoint}" if checkpoint else " (no checkpoint_dir: nothing saved)"
        super().__init__(f"training interrupted at epoch {epoch + 1}, step {step}{where}")
        self.checkpoint, self.epoch, self.step = checkpoint, epoch, step


@dataclass
class History:
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


# -- schedules ------------------------------------------------------------------------------------------
def kl_warmup_schedule(spec) -> Callable[[float], float]:
    """KL weight as a function of (fractional) epoch.

    ``None`` → 1; ``(hold, ramp)`` → 0 for ``hold`` epochs then linear to 1 over ``ramp`` epochs
    (the sparse-VD recipe is ``(5, 15)``); a float → constant; a callable is used as is."""
    if spec is None:
        return lambda e: 1.0
    if callable(spec):
        return spec
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        if not (0 <= spec):
            raise ValueError(f"kl weight must be ≥ 0, got {spec}")
        return lambda e: float(spec)
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


# -- data --------------------------------------------------------------------------------------------------
class _Batches:
    """Uniform view over ArrayLoader, (x, y) tensors and torch DataLoaders."""

    def __init__(self, data, batch_size, seed):
        self.resumable = True
        self._own_loader = False
        if isinstance(data, ArrayLoader):
            self.loader = data
        elif isinstance(data, (tuple, list)) and len(data) == 2:
            self.loader = ArrayLoader(data[0], data[1], batch_size=batch_size, seed=seed)
            self._own_loader = True
        elif isinstance(data, torch.utils.data.DataLoader):
            self.loader = data
            self.resumable = False  # arbitrary DataLoaders resume at epoch boundaries
        else:
            raise TypeError("train data must be a pyrobnn.data.ArrayLoader, an (x, y) pair or a torch DataLoader")
        if isinstance(self.loader, ArrayLoader):
            _check_finite_rows(self.loader.x, "training x")
            _check_finite_rows(self.loader.y, "training y")

    @property
    def seed(self):
        return self.loader.seed if isinstance(self.loader, ArrayLoader) else None

    def restore_seed(self, seed):
        """The data order is part of a run's state: a resumed run continues the checkpointed order."""
        if seed is None or not isinstance(self.loader, ArrayLoader) or seed == self.loader.seed:
            return
        if self._own_loader:
            self.loader.seed = int(seed)
        else:
            warnings.warn(f"the checkpoint was written with data seed {seed} but the ArrayLoader has seed "
                          f"{self.loader.seed}: the resumed run will see a different data order")

    @property
    def dataset_size(self):
        if isinstance(self.loader, ArrayLoader):
            return self.loader.dataset_size
        return len(self.loader.dataset)

    def __len__(self):
        return len(self.loader)

    def epoch(self, e, start=0):
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(e)
        elif hasattr(getattr(self.loader, "sampler", None), "set_epoch"):
            self.loader.sampler.set_epoch(e)
        if isinstance(self.loader, ArrayLoader):
            yield from self.loader.batches(start)
        else:
            for i, batch in enumerate(self.loader):
                if i >= start:
                    yield batch[0], batch[1]

    def first(self):
        for xb, yb in self.epoch(0):
            return xb, yb
        raise ValueError("the training data yielded no batch")


def _check_finite_rows(data, what):
    """NaN/inf in the data is reported by its row in the user's data (not its place in a shuffled batch)."""
    for t in inputs.leaves(data) if inputs.is_inputs(data) else ():
        _check_finite_tensor_rows(t, what)


def _check_finite_tensor_rows(t, what):
    if t.is_floating_point() and t.dim() >= 1 and not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).reshape(t.shape[0], -1).any(1).nonzero()[:, 0]
        rows = ", ".join(str(i) for i in bad[:5].tolist()) + (", ..." if len(bad) > 5 else "")
        raise ValueError(f"{what} contains NaN or inf in row {bad[0].item()} (0-based row index; "
                         f"{len(bad)} row(s) in all: {rows})")


def _val_xy(val):
    if val is None:
        return None
    if isinstance(val, ArrayLoader):
        xy = val.x, val.y
    elif isinstance(val, (tuple, list)) and len(val) == 2:
        xy = inputs.as_inputs(val[0], what="val x"), torch.as_tensor(val[1])
    else:
        raise TypeError("val must be an (x, y) pair or an ArrayLoader")
    _check_finite_rows(xy[0], "validation x")
    _check_finite_rows(xy[1], "validation y")
    return xy


def _collapse_check(bnn, data, num_samples):
    """Warn when the fitted predictive is no better than the class prior on (up to 512 rows of) the
    training data — a network collapsed to its prior predicts the class frequencies and nothing else."""
    if bnn.likelihood.task != "classification" or not isinstance(data.loader, ArrayLoader):
        return None
    n = min(512, inputs.batch_size(data.loader.x))
    x, y = inputs.rows(data.loader.x, 0, n), data.loader.y[:n]
    if y.is_floating_point() or y.dim() != 1:
        return None
    try:
        nll = bnn.evaluate(x, y, max(1, min(num_samples, 4)))["nll"]
    except (ValueError, KeyError, RuntimeError):
        return None
    freq = torch.bincount(y.long()).double()
    freq = freq[freq > 0] / len(y)
    prior_nll = float(-(freq * freq.log()).sum())
    if nll >= prior_nll - 0.02 * max(prior_nll, 1e-12):
        warnings.warn(f"the fitted predictive is no better than the class prior on the training data "
                      f"(NLL {nll:.4f} vs {prior_nll:.4f} for predicting the class frequencies): the network "
                      "has collapsed to its prior. Try a KL warm-up (kl_warmup=(0, epochs // 4)), a lower "
                      "learning rate or more epochs.", RuntimeWarning)
    return nll, prior_nll


# -- checkpoints -------------------------------------------------------------------------------------------
def _rng_state():
    return {"torch": torch.get_rng_state(), "numpy": json.dumps(_np_state()), "python": json.dumps(random.getstate())}


def _np_state():
    s = np.random.get_state()
    return [s[0], s[1].tolist(), s[2], s[3], s[4]]


def _set_rng_state(st):
    torch.set_rng_state(st["torch"])
    s = json.loads(st["numpy"])
    np.random.set_state((s[0], np.array(s[1], dtype=np.uint32), s[2], s[3], s[4]))
    py = json.loads(st["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))


def _check_optimizer_state(opt, fresh_groups):
    """A restored optimizer state must be one this optimizer could have written: the same
    hyper-parameter names and kinds of value, state tensors shaped like their parameters. Otherwise
    torch fails only at the first step (e.g. Adam's state resumed into SGD: KeyError 'momentum')."""
    for group, fresh in zip(opt.param_groups, fresh_groups):
        if set(group) != set(fresh):
            raise ValueError(f"optimizer hyper-parameters {sorted(group)} are not this optimizer's {sorted(fresh)}")
        for k, v in fresh.items():
            number = (int, float)
            same = type(group[k]) is type(v) or (isinstance(v, number) and isinstance(group[k], number)
                                                 and not isinstance(group[k], bool) and not isinstance(v, bool))
            if k != "params" and not same:
                raise ValueError(f"optimizer hyper-parameter {k!r} is {group[k]!r}, expected a {type(v).__name__}")
            values = group[k] if isinstance(group[k], (tuple, list)) and k != "params" else [group[k]]
            if any(isinstance(x, float) and not (math.isfinite(x) and x >= 0) for x in values) or \
                    (k == "betas" and not all(0 <= x < 1 for x in values)):
                raise ValueError(f"optimizer hyper-parameter {k!r} is out of range: {group[k]!r}")
        for p in group["params"]:
            for name, t in opt.state.get(p, {}).items():
                if isinstance(t, torch.Tensor) and t.shape != p.shape and not (name == "step" and t.dim() == 0):
                    raise ValueError(f"optimizer state {name!r} has shape {tuple(t.shape)}, its parameter {tuple(p.shape)}")


def _ckpt_name(epoch, step):
    return f"ckpt-e{epoch:05d}-s{step:07d}.safetensors"


def latest_checkpoint(directory) -> Optional[Tuple[Path, Dict, Dict]]:
    """The newest readable checkpoint in ``directory`` as (path, tensors, meta); torn or corrupt files
    are skipped with a warning (falling back to the previous one)."""
    paths = sorted(glob.glob(os.path.join(str(directory), "ckpt-e*-s*.safetensors")), reverse=True)
    for p in paths:
        try:
            tensors, meta = read_state(p)
            if meta.get("kind") == "checkpoint":
                return Path(p), tensors, meta
        except ValueError as e:
            warnings.warn(f"skipping unreadable checkpoint {p}: {e}")
    return None


def load_checkpoint(bnn: BNN, path) -> Dict:
    """Load only the BNN parameters of a checkpoint file into ``bnn`` (must be initialised)."""
    tensors, meta = read_state(path)
    if meta.get("kind") != "checkpoint":
        raise ValueError(f"{path} is not a pyrobnn training checkpoint")
    bnn.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    return meta


def _save_checkpoint(directory, bnn, opt, history, epoch, step, keep, data_seed=None):
    tensors = {f"model.{k}": v for k, v in bnn.state_dict().items()}
    skel, t2 = flatten_state({"optimizer": opt.state_dict(), "rng": _rng_state()}, prefix="state")
    tensors.update(t2)
    path = Path(directory) / _ckpt_name(epoch, step)
    write_state(path, tensors, {"kind": "checkpoint", "epoch": epoch, "step": step, "state": skel,
                                "history": history.records, "spec": _safe_spec(bnn), "data_seed": data_seed})
    old = sorted(glob.glob(os.path.join(str(directory), "ckpt-e*-s*.safetensors")))
    for p in old[:-keep]:
        os.unlink(p)
    return path


def _safe_spec(bnn):
    try:
        return bnn.spec()
    except ValueError:
        return None


# -- the loop ----------------------------------------------------------------------------------------------
class SVIStep:
    """One SVI step as ``fit`` runs it: mean-field ELBO, backward, optional clipping, optimiser step.

    Returns the loss tensor; a non-finite loss raises :class:`TrainingDiverged` *before* any parameter
    changes.

    Pyro's validation (when enabled, its default) runs on the first step only: it checks the model and
    guide structure (matching sites, shapes), which cannot change between steps of a BNN, and warns
    about NaN/inf log-densities, which the NaN guard here turns into an error on every step anyway.
    Keeping it on costs ≈ 27 hooks and NaN/inf reductions per LeNet step (≈7 % of the step)."""

    def __init__(self, bnn: BNN, optimizer: torch.optim.Optimizer, grad_clip: Optional[float] = None):
        self.bnn, self.opt, self.grad_clip = bnn, optimizer, grad_clip
        self.elbo = MeanFieldELBO()
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self._validated = False

    def __call__(self, x, y):
        if self._validated:
            with pyro.validation_enabled(False):
                loss = self.elbo.differentiable_loss(self.bnn.model, self.bnn.guide, x, y)
        else:
            loss = self.elbo.differentiable_loss(self.bnn.model, self.bnn.guide, x, y)
            self._validated = True
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"the ELBO became {loss.item()}")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.opt.step()
        return loss.detach()


_OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


def fit(bnn: BNN, train, epochs: int, lr: float = 1e-3, *, batch_size: int = 128,
        optimizer: Union[str, Callable] = "adam", optimizer_kwargs: Optional[dict] = None,
        kl_warmup="auto", lr_schedule=None, val=None, num_samples: int = 16,
        checkpoint_dir: Optional[str] = None, checkpoint_every: Optional[int] = None, keep_checkpoints: int = 2,
        resume: bool = False, seed: Optional[int] = None, progress: bool = True,
        callbacks: Sequence[Callable] = (), grad_clip: Optional[float] = None, distributed=None,
        stop_requested: Optional[Callable[[], bool]] = None) -> History:
    """Train ``bnn`` by SVI on the mean-field ELBO.

    :param train: ``ArrayLoader``, ``(x, y)`` tensors (batched with ``batch_size``) or a DataLoader.
    :param epochs: total epochs (a resumed run continues up to this number).
    :param kl_warmup: ``"auto"`` (default: :func:`auto_kl_warmup` — a linear ramp over the first quarter
        of the epochs for log-uniform and empirical-ARD priors, whose ELBO collapses to the prior without
        one; none otherwise), ``None`` (no warm-up), a constant, ``(hold_epochs, ramp_epochs)`` or
        ``f(epoch) -> weight``.
    :param lr_schedule: ``None``, ``"cosine"``, ``("linear-decay", start_epoch)`` or ``f(epoch) -> factor``.
    :param val: ``(x, y)`` evaluated each epoch with ``num_samples`` posterior draws.
    :param checkpoint_dir: write an atomic checkpoint at each epoch end (and every ``checkpoint_every``
        steps); ``resume=True`` continues from the newest readable one, with data order and RNG state.
    :param callbacks: ``f(bnn, record)`` after each epoch; return ``True`` to stop early.
    :param stop_requested: polled after every step (e.g. a flag set by a SIGINT handler); when it turns
        true the step in progress is finished, a checkpoint written (with ``checkpoint_dir``) and
        :class:`TrainingInterrupted` raised, naming it.
    :param distributed: a :class:`pyrobnn.inference.distributed.DataParallel` (data-parallel training;
        use ``fit_distributed``): rank 0 writes checkpoints and shows progress, every rank reads them.
    :returns: :class:`History` with one record per epoch.
    """
    if not isinstance(bnn, BNN):
        raise TypeError(f"fit() trains a pyrobnn BNN, got {type(bnn).__name__}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir")
    if seed is not None:
        pyro.set_rng_seed(seed)
    data = _Batches(train, batch_size, seed or 0)
    n = data.dataset_size
    if bnn.dataset_size is None:
        bnn.dataset_size = n
    elif bnn.dataset_size < n:
        raise ValueError(f"bnn.dataset_size ({bnn.dataset_size}) is smaller than the training set ({n} examples)")
    val_xy = _val_xy(val)
    x0, y0 = data.first()
    bnn.initialize(x0)
    params = [p for p in bnn.parameters() if p.requires_grad]
    if isinstance(optimizer, str):
        if optimizer.lower() not in _OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; known: {', '.join(_OPTIMIZERS)}")
        opt = _OPTIMIZERS[optimizer.lower()](params, lr=lr, **(optimizer_kwargs or {}))
    else:
        opt = optimizer(params)
    if isinstance(kl_warmup, str) and kl_warmup == "auto":
        kl_warmup = auto_kl_warmup(bnn, epochs)
    kl_of = kl_warmup_schedule(kl_warmup)
    lr_of = lr_factor_schedule(lr_schedule, epochs)
    svi_step = SVIStep(bnn, opt, grad_clip)
    history = History()
    start_epoch, start_step = 0, 0
    last_ckpt = None
    if resume:
        found = latest_checkpoint(checkpoint_dir)
        if found is not None:
            last_ckpt, tensors, meta = found
            try:
                bnn.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
                state = unflatten_state(meta["state"], tensors)
                fresh_groups = [dict(g) for g in opt.param_groups]
                opt.load_state_dict(state["optimizer"])
                _check_optimizer_state(opt, fresh_groups)
                _set_rng_state(state["rng"])
                history.records = list(meta.get("history", []))
                start_epoch, start_step = int(meta["epoch"]), int(meta["step"])
                data.restore_seed(meta.get("data_seed"))
            except (KeyError, IndexError, TypeError, AttributeError, RuntimeError, OverflowError) as e:
                raise ValueError(f"{last_ckpt} does not fit this BNN and optimizer (another run's checkpoint?): "
                                 f"{type(e).__name__}: {e}") from None
            if start_step and not data.resumable:
                warnings.warn("resuming a torch DataLoader mid-epoch: the epoch restarts from its first batch")
                start_step = 0
    if distributed is not None:  # rank 0's parameters everywhere, same resume point, gradient all-reduce
        distributed.synchronize(bnn, start_epoch, start_step)
    steps_per_epoch = len(data)
    if start_step >= steps_per_epoch:
        start_epoch, start_step = start_epoch + 1, 0
    if checkpoint_dir is not None:
        os.makedirs(checkpoint_dir, exist_ok=True)
    main = distributed is None or distributed.is_main
    progress = progress and main
    bar = None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        progress = False
    for epoch in range(start_epoch, epochs):
        bnn.train()
        t0 = time.perf_counter()
        total, count = 0.0, 0
        if progress:
            bar = tqdm(total=steps_per_epoch, initial=start_step, desc=f"epoch {epoch + 1}/{epochs}",
                       leave=False, dynamic_ncols=True)
        step = start_step
        for xb, yb in data.epoch(epoch, start_step):
            if distributed is not None:
                distributed.begin_step(epoch, step)
            e = epoch + step / steps_per_epoch
            bnn.kl_weight = kl_of(e)
            factor = lr_of(e)
            for g in opt.param_groups:
                g["lr"] = lr * factor
            try:
                loss = svi_step(xb, yb)
            except TrainingDiverged as e:
                where = f" Last good checkpoint: {last_ckpt}." if last_ckpt else ""
                raise TrainingDiverged(f"{e} at epoch {epoch + 1}, step {step + 1}; parameters are those of the "
                                       f"previous step.{where} Lower the learning rate or the initial scale.") from None
            total += loss.item()
            count += 1
            step += 1
            if bar is not None:
                bar.update(1)
                if step % 10 == 0:
                    bar.set_postfix(elbo_per_datum=f"{-total / count / bnn.dataset_size:.4f}", kl_w=f"{bnn.kl_weight:.2f}")
            if main and checkpoint_dir is not None and checkpoint_every and step % checkpoint_every == 0 \
                    and step < steps_per_epoch:
                last_ckpt = _save_checkpoint(checkpoint_dir, bnn, opt, history, epoch, step, keep_checkpoints,
                                             data.seed)
            if stop_requested is not None and step < steps_per_epoch and stop_requested():
                if bar is not None:
                    bar.close()
                saved = None
                if main and checkpoint_dir is not None:
                    saved = _save_checkpoint(checkpoint_dir, bnn, opt, history, epoch, step, keep_checkpoints,
                                             data.seed)
                raise TrainingInterrupted(saved, epoch, step)
        if bar is not None:
            bar.close()
        start_step = 0
        if distributed is not None:
            total = distributed.mean(total)
        record = {"epoch": epoch + 1, "loss": total / max(count, 1), "elbo_per_datum": -total / max(count, 1) / bnn.dataset_size,
                  "kl_weight": bnn.kl_weight, "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
        if val_xy is not None:
            record.update({f"val_{k}": v for k, v in bnn.evaluate(val_xy[0], val_xy[1], num_samples).items()})
        history.records.append(record)
        if main and checkpoint_dir is not None:
            last_ckpt = _save_checkpoint(checkpoint_dir, bnn, opt, history, epoch + 1, 0, keep_checkpoints,
                                         data.seed)
        if progress:
            shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in record.items()}
            tqdm.write(" ".join(f"{k}={v}" for k, v in shown.items()))
        stop = any(cb(bnn, record) for cb in callbacks)
        if distributed is not None:
            stop = distributed.any(stop)
        if stop:
            break
        if stop_requested is not None and epoch + 1 < epochs and stop_requested():
            raise TrainingInterrupted(last_ckpt if main else None, epoch + 1, 0)
    bnn.kl_weight = 1.0
    bnn.eval()
    if main:
        _collapse_check(bnn, data, num_samples)
    return history
