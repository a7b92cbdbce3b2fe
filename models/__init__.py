"""Architecture zoo, by name: ``pyrobnn.models.build("lenet5")`` or through the MODELS registry.

Built networks are plain ``torch.nn.Module`` s tagged with their (name, kwargs), so a BNN made from
them can be saved and loaded without the user passing the architecture again.
"""
from __future__ import annotations

from typing import Sequence

import torch.nn as nn

from pyrobnn.registry import MODELS
from pyrobnn.validation import positive_int

__all__ = ["build", "mlp", "lenet300", "lenet5", "names"]

_ACT = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "elu": nn.ELU, "sigmoid": nn.Sigmoid}


def _tag(net, name, kwargs):
    net._pyrobnn_arch = {"name": name, **kwargs}
    return net


@MODELS.register("mlp")
def mlp(in_features: int, out_features: int, hidden: Sequence[int] = (100,), activation: str = "relu",
        flatten: bool = True):
    """Fully connected network in → hidden… → out with the given activation."""
    if activation not in _ACT:
        raise ValueError(f"unknown activation {activation!r}; known: {', '.join(_ACT)}")
    positive_int("in_features", in_features)
    positive_int("out_features", out_features)
    hidden = [positive_int(f"hidden[{i}]", h) for i, h in enumerate(hidden)]
    layers = [nn.Flatten()] if flatten else []
    dims = [in_features] + hidden
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), _ACT[activation]()]
    layers.append(nn.Linear(dims[-1], out_features))
    return _tag(nn.Sequential(*layers), "mlp", dict(in_features=in_features, out_features=out_features,
                                                    hidden=hidden, activation=activation, flatten=flatten))


class _LeNet300(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1, self.fc2, self.fc3 = nn.Linear(784, 300), nn.Linear(300, 100), nn.Linear(100, num_classes)

    def forward(self, x):
        x = self.flatten(x)
        return self.fc3(self.fc2(self.fc1(x).relu()).relu())


@MODELS.register("lenet300")
def lenet300(num_classes: int = 10):
    """LeNet-300-100: 784-300-100-10 with ReLU (input [B, 1, 28, 28] or [B, 784])."""
    return _tag(_LeNet300(num_classes), "lenet300", dict(num_classes=num_classes))


class _LeNet5(nn.Module):
    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(800, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def features(self, x):
        x = nn.functional.max_pool2d(self.conv1(x).relu(), 2)
        x = nn.functional.max_pool2d(self.conv2(x).relu(), 2)
        return x.flatten(1)

    def forward(self, x):
        return self.fc2(self.fc1(self.features(x)).relu())


@MODELS.register("lenet5")
def lenet5(num_classes: int = 10, in_channels: int = 1):
    """Caffe LeNet-5: conv 20@5×5 → pool → conv 50@5×5 → pool → fc 500 → fc 10 (input [B, 1, 28, 28])."""
    return _tag(_LeNet5(num_classes, in_channels), "lenet5", dict(num_classes=num_classes, in_channels=in_channels))


def build(name_or_spec, **kwargs):
    """Build a registered architecture from a name (plus kwargs) or a ``{"name": ..., **kwargs}`` spec."""
    if isinstance(name_or_spec, str):
        return MODELS.build({"name": name_or_spec, **kwargs})
    return MODELS.build(name_or_spec)


def names():
    """The registered architecture names, sorted (``["fconv", "lenet300", "lenet5", "mlp", ...]``)."""
    return MODELS.names()
from . import fconv  # noqa: E402,F401  (registers "fconv": the deep-weight-prior convnet)
