"""Training-time augmentation: an :class:`pyrobnn.data.ArrayLoader` whose batches a policy augments."""
from __future__ import annotations

from typing import Iterator, Tuple

import torch

from pyrobnn.data import ArrayLoader

from .augment import Policy

__all__ = ["AugmentedLoader"]

class AugmentedLoader(ArrayLoader):
    """An :class:`pyrobnn.data.ArrayLoader` whose batches are augmented by ``policy`` (one random copy
    per image, sub-policy chosen uniformly per batch). The randomness of batch b of epoch e depends only
    on ``(seed, e, b)``, so runs resume exactly like the plain loader's."""

    def __init__(self, x, y, policy: Policy, batch_size: int = 128, shuffle: bool = True, seed: int = 0, **kw):
        super().__init__(x, y, batch_size=batch_size, shuffle=shuffle, seed=seed, **kw)
        if not isinstance(policy, Policy):
            raise TypeError(f"policy must be a Policy, got {type(policy).__name__}")
        self.policy = policy

    def batches(self, start: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for b, (xb, yb) in enumerate(super().batches(start), start):
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_003 + b)
            k = torch.randint(len(self.policy), (1,), generator=g)
            yield self.policy.augment(xb, 1, g, k)[0], yb
