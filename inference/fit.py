"""``fit``: the SVI loop for a BNN — minibatches with Pyro's N/M scaling, KL warm-up, learning-rate
schedule, tqdm progress with the running ELBO, validation metrics, atomic checkpoints, exact resume,
and a NaN guard that stops without touching the last good parameters or checkpoint.

The loss is ``MeanFieldELBO().differentiable_loss(bnn.model, bnn.guide, x, y)`` (:mod:`pyrobnn.inference.elbo`:
``pyro.infer.TraceMeanField_ELBO``'s loss and gradients with less per-step bookkeeping) — stepped with an ordinary ``torch.optim`` optimiser over
``bnn.parameters()`` (one optimiser for all parameters; its state is checkpointed as tensors).
"""
from __future__ import annotations

import time
import warnings
from typing import Callable, Optional, Sequence, Tuple, Union

import pyro
import torch

from pyrobnn import inputs
from pyrobnn.bnn import BNN
from pyrobnn.data import ArrayLoader
from pyrobnn.validation import positive_float, positive_int

from .batches import Batches, check_finite_rows
from .checkpoint import Checkpoints, latest_checkpoint, load_checkpoint
from .loop import (History, Loop, OnRecord, Progress, TrainingDiverged, TrainingInterrupted, descend,
                   make_optimizer)
from .schedules import KLWarmup, LRFactor, auto_kl_warmup, kl_warmup_schedule, lr_factor_schedule

from .elbo import MeanFieldELBO

__all__ = ["fit", "SVIStep", "History", "TrainingDiverged", "TrainingInterrupted", "kl_warmup_schedule",
           "lr_factor_schedule", "latest_checkpoint", "load_checkpoint", "auto_kl_warmup"]

_Batches = Batches


# -- validation data and the collapse check ---------------------------------------------------------------
def _val_xy(val):
    if val is None:
        return None
    if isinstance(val, ArrayLoader):
        xy = val.x, val.y
    elif isinstance(val, (tuple, list)) and len(val) == 2:
        xy = inputs.as_inputs(val[0], what="val x"), torch.as_tensor(val[1])
    else:
        raise TypeError("val must be an (x, y) pair or an ArrayLoader")
    check_finite_rows(xy[0], "validation x")
    check_finite_rows(xy[1], "validation y")
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


# -- the SVI step and the loop -------------------------------------------------------------------------
class SVIStep:
    """One SVI step as ``fit`` runs it: mean-field ELBO, backward, optional clipping, optimiser step.

    Returns the loss tensor; a non-finite loss raises :class:`TrainingDiverged` *before* any parameter
    changes.

    Pyro's validation (when enabled, its default) runs on the first step only: there :class:`MeanFieldELBO`
    checks the model and guide structure (matching sites, shapes), which cannot change between steps of a BNN,
    and the distributions check their arguments; afterwards the NaN guard here turns a non-finite loss into an
    error on every step."""

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
        return descend(loss, self.opt, self.params, self.grad_clip, "the ELBO")


def training_batches(bnn: BNN, train, batch_size: int, seed: Optional[int]) -> Tuple[Batches, tuple]:
    """The minibatches of ``train`` for training ``bnn``, and the first batch ``(x, y)``: sets
    ``bnn.dataset_size`` from the data when unset (refuses one smaller than the data) and initialises the guide
    on the first batch (read once: a shuffling DataLoader draws its order from the global RNG)."""
    data = Batches(train, batch_size, seed or 0)
    n = data.dataset_size
    if bnn.dataset_size is None:
        bnn.dataset_size = n
    elif bnn.dataset_size < n:
        raise ValueError(f"bnn.dataset_size ({bnn.dataset_size}) is smaller than the training set ({n} examples)")
    first = data.first()
    bnn.initialize(first[0])
    return data, first


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
    positive_int("epochs", epochs)
    positive_float("lr", lr)
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir")
    if seed is not None:
        pyro.set_rng_seed(seed)
    data, (x0, y0) = training_batches(bnn, train, batch_size, seed)
    val_xy = _val_xy(val)
    opt = make_optimizer(optimizer, [p for p in bnn.parameters() if p.requires_grad], lr, optimizer_kwargs)
    if isinstance(kl_warmup, str) and kl_warmup == "auto":
        kl_warmup = auto_kl_warmup(bnn, epochs)

    def summarize(loop):
        total, count = loop.sums.get("loss", 0.0), loop.count
        record = {"epoch": loop.position.epoch + 1, "loss": total / max(count, 1),
                  "elbo_per_datum": -total / max(count, 1) / bnn.dataset_size, "kl_weight": bnn.kl_weight,
                  "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - loop.epoch_started}
        if val_xy is not None:
            record.update({f"val_{k}": v for k, v in bnn.evaluate(val_xy[0], val_xy[1], num_samples).items()})
        return record

    def postfix(loop):
        return {"elbo_per_datum": f"{-loop.sums['loss'] / loop.count / bnn.dataset_size:.4f}",
                "kl_w": f"{bnn.kl_weight:.2f}"}

    loop = Loop(SVIStep(bnn, opt, grad_clip), data, epochs=epochs, model=bnn,
                schedules=[KLWarmup(bnn, kl_warmup_schedule(kl_warmup)),
                           LRFactor(opt, lr, lr_factor_schedule(lr_schedule, epochs))],
                callbacks=[OnRecord(cb, bnn) for cb in callbacks], summarize=summarize,
                progress=Progress(postfix=postfix, write_records=True) if progress else None,
                checkpoints=None if checkpoint_dir is None else Checkpoints(checkpoint_dir, bnn, opt,
                                                                             keep_checkpoints, lambda: _safe_spec(bnn)),
                checkpoint_every=checkpoint_every, resume=resume, distributed=distributed,
                stop_requested=stop_requested)
    history = loop.run()
    bnn.kl_weight = 1.0
    bnn.eval()
    if loop.is_main:
        _collapse_check(bnn, data, num_samples)
    return history


def _safe_spec(bnn):
    try:
        return bnn.spec()
    except ValueError:
        return None
