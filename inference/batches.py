"""Where a training loop's minibatches come from.

:class:`Batches` — epochs of ``(x, y)`` batches from an :class:`pyrobnn.data.ArrayLoader`, an ``(x, y)``
pair (batched by an ArrayLoader: the order of epoch e depends only on ``(seed, e)``, so a run resumes
mid-epoch) or a torch ``DataLoader`` (resumes at epoch boundaries).

:class:`ShuffledBatches` — ``(x, y)`` tensors reshuffled from one ``torch.Generator`` at every pass,
incomplete last batch dropped (the order of SG-MCMC, distillation and the deterministic baseline).

:class:`Stream` — a fixed number of items taken lazily from an endless iterator, seen by the loop as
one epoch (a chain's updates, a distillation's student steps).
"""
from __future__ import annotations

import warnings
from typing import Iterator

import torch

from pyrobnn import inputs
from pyrobnn.data import ArrayLoader
from pyrobnn.validation import positive_int

__all__ = ["Batches", "ShuffledBatches", "Stream", "check_finite_rows"]


class Batches:
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
            check_finite_rows(self.loader.x, "training x")
            check_finite_rows(self.loader.y, "training y")

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


class ShuffledBatches:
    """``(x, y)`` batches of ``batch_size`` rows, a new permutation from ``generator`` at every pass
    (each epoch), without replacement within a pass; the incomplete last batch is dropped unless
    ``drop_last=False``.

    ``with_index=True`` yields ``(index, x, y)`` (the rows' places in ``x``). ``y`` may be None."""

    def __init__(self, x, y, batch_size: int, generator: torch.Generator, with_index: bool = False,
                 drop_last: bool = True):
        n = inputs.batch_size(x)
        if y is not None and n != y.shape[0]:
            raise ValueError(f"x has {n} examples but y has {y.shape[0]}")
        positive_int("batch_size", batch_size)
        self.x, self.y, self.n, self.batch_size = x, y, n, min(batch_size, n)
        self.generator, self.with_index, self.drop_last = generator, with_index, drop_last
        self.resumable, self.seed = False, None

    def __len__(self):
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def __iter__(self):
        perm = torch.randperm(self.n, generator=self.generator)
        for i in range(len(self)):
            idx = perm[i * self.batch_size:(i + 1) * self.batch_size]
            xb, yb = inputs.index(self.x, idx), (None if self.y is None else self.y[idx])
            yield (idx, xb, yb) if self.with_index else (xb, yb)

    def epoch(self, e, start=0):
        for i, batch in enumerate(self):
            if i >= start:
                yield batch


class Stream:
    """``steps`` items of an endless iterator, taken one at a time as the loop asks for them."""

    resumable, seed = False, None

    def __init__(self, iterator: Iterator, steps: int):
        self.iterator, self.steps = iterator, steps

    def __len__(self):
        return self.steps

    def epoch(self, e, start=0):
        for _ in range(start, self.steps):
            yield next(self.iterator)


def check_finite_rows(data, what):
    """NaN/inf in the data is reported by its row in the user's data (not its place in a shuffled batch)."""
    for t in inputs.leaves(data) if inputs.is_inputs(data) else ():
        _check_finite_tensor_rows(t, what)


def _check_finite_tensor_rows(t, what):
    if t.is_floating_point() and t.dim() >= 1 and not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).reshape(t.shape[0], -1).any(1).nonzero()[:, 0]
        rows = ", ".join(str(i) for i in bad[:5].tolist()) + (", ..." if len(bad) > 5 else "")
        raise ValueError(f"{what} contains NaN or inf in row {bad[0].item()} (0-based row index; "
                         f"{len(bad)} row(s) in all: {rows})")

