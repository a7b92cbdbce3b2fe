"""The small "fconv" convnet of the deep-weight-prior experiments (Atanov et al. 2019, MNIST/notMNIST).

conv ``c1``@7×7 → ReLU → max-pool 2 → conv ``c2``@5×5 → ReLU → max-pool 2 → linear → classes.
On ``[B, 1, 28, 28]`` inputs the feature maps are 22×22 → 11×11 → 7×7 → 3×3, so the linear layer
sees ``c2 · 9`` features. The 7×7 and 5×5 kernels are what a deep weight prior models.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pyrobnn.registry import MODELS
from pyrobnn.validation import positive_int

__all__ = ["FConv", "fconv"]


class FConv(nn.Module):
    """The fconv network (see the module docstring): input ``[B, in_channels, image_size, image_size]``
    → logits ``[B, num_classes]``."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, channels=(32, 64), image_size: int = 28):
        super().__init__()
        c1, c2 = channels
        self.conv1 = nn.Conv2d(in_channels, c1, 7)
        self.conv2 = nn.Conv2d(c1, c2, 5)
        side = ((image_size - 6) // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"image_size {image_size} is too small for fconv (needs ≥ 18)")
        self.fc = nn.Linear(c2 * side * side, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in, H, W]`` → ``[B, c2·side²]``."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return x.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in, H, W]`` → logits ``[B, num_classes]``."""
        return self.fc(self.features(x))


@MODELS.register("fconv")
def fconv(num_classes: int = 10, in_channels: int = 1, channels=(32, 64), image_size: int = 28):
    """fconv: conv c1@7×7 → pool → conv c2@5×5 → pool → fc (default c = (32, 64), 28×28 inputs)."""
    channels = list(channels)
    if len(channels) != 2:
        raise ValueError(f"fconv channels must be two positive integers, got {channels!r}")
    channels = [positive_int(f"fconv channels[{i}]", c) for i, c in enumerate(channels)]
    for v, what in ((num_classes, "num_classes"), (in_channels, "in_channels"), (image_size, "image_size")):
        positive_int(what, v)
    net = FConv(num_classes, in_channels, channels, image_size)
    net._pyrobnn_arch = {"name": "fconv", "num_classes": num_classes, "in_channels": in_channels,
                         "channels": channels, "image_size": image_size}
    return net
