"""The distillation inputs: an endless stream of batches from a tensor, an ``(x, y)`` pair or an
iterable; and the teacher's predictive on all of them computed once (the cache)."""
from __future__ import annotations

import torch

from pyrobnn import inputs as _inputs

from .loss import _aggregate
from .teachers import Teacher


class _Inputs:
    """An endless stream of (x, y or None) batches from a tensor, an (x, y) pair or an iterable."""

    def __init__(self, inputs, batch_size, generator):
        self.generator = generator
        self.labels = None
        self.iterable = None
        if isinstance(inputs, (torch.Tensor, dict)):
            self.x = inputs
        elif isinstance(inputs, (tuple, list)) and len(inputs) == 2 and _inputs.is_inputs(inputs[0]) \
                and isinstance(inputs[1], torch.Tensor):
            self.x, self.labels = inputs
        elif hasattr(inputs, "__iter__") and not isinstance(inputs, (str, bytes, dict)):
            self.x = None
            self.iterable = inputs
        else:
            raise TypeError("inputs must be a tensor [N, ...], an (x, y) pair of tensors or an iterable of batches")
        if self.x is not None:
            self.x = _inputs.as_inputs(self.x, torch.get_default_dtype(), what="inputs")
            _inputs.check_finite(self.x, "inputs")
            n = _inputs.batch_size(self.x)
            if self.labels is not None and self.labels.shape[0] != n:
                raise ValueError(f"inputs x has {n} examples but y has {self.labels.shape[0]}")
            self.batch_size = min(batch_size, n)
        self._stream = self._tensor_stream() if self.x is not None else self._iter_stream()
        self.epoch = 0

    def _tensor_stream(self):
        n = _inputs.batch_size(self.x)
        while True:
            perm = torch.randperm(n, generator=self.generator)
            for i in range(0, n - self.batch_size + 1, self.batch_size):
                idx = perm[i:i + self.batch_size]
                yield idx, _inputs.index(self.x, idx), (None if self.labels is None else self.labels[idx])
            self.epoch += 1

    def _iter_stream(self):
        while True:
            if hasattr(self.iterable, "set_epoch"):
                self.iterable.set_epoch(self.epoch)
            empty = True
            for batch in self.iterable:
                empty = False
                if isinstance(batch, (torch.Tensor, dict)):
                    yield None, batch, None
                elif isinstance(batch, (tuple, list)) and batch and _inputs.is_inputs(batch[0]):
                    yield None, batch[0], (batch[1] if len(batch) > 1 else None)
                else:
                    raise TypeError("each batch must be a tensor x or an (x, y) pair")
            if empty:
                raise ValueError("the inputs iterable yielded no batches")
            self.epoch += 1

    def steps_per_epoch(self):
        if self.x is not None:
            return max(1, _inputs.batch_size(self.x) // self.batch_size)
        return len(self.iterable) if hasattr(self.iterable, "__len__") else None

    def __next__(self):
        return next(self._stream)


@torch.no_grad()
def _cache_targets(teacher: Teacher, x: torch.Tensor, num_samples, temperature, chunk: int = 512):
    parts = [_aggregate(teacher.draws(_inputs.rows(x, i, i + chunk), num_samples), teacher.task, temperature)
             for i in range(0, _inputs.batch_size(x), chunk)]
    if teacher.task == "classification":
        return torch.cat(parts, 0)
    return torch.cat([p[0] for p in parts], 0), torch.cat([p[1] for p in parts], 0)


def _index_target(target, idx, task):
    return target[idx] if task == "classification" else (target[0][idx], target[1][idx])
