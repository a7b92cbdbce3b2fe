"""Training checkpoints: atomic safetensors files that a run resumes from exactly.

One file per save, ``ckpt-eEEEEE-sSSSSSSS.safetensors`` in the checkpoint directory (the newest
``keep`` are kept): the model's ``state_dict`` under ``model.``, the optimiser's state and the torch /
NumPy / Python RNG states flattened under ``state`` (:func:`pyrobnn.state_io.flatten_state`), and in
the JSON header ``kind = "checkpoint"``, the position (epoch, step), the history so far, the model's
spec and the data order's seed. Written by :func:`pyrobnn.state_io.write_state` (temporary file, then
rename); read without unpickling.
"""
from __future__ import annotations

import glob
import json
import math
import os
import random
import warnings
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch

from pyrobnn.state_io import flatten_state, read_state, unflatten_state, write_state

__all__ = ["Checkpoints", "latest_checkpoint", "load_checkpoint"]


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


def load_checkpoint(model: torch.nn.Module, path) -> Dict:
    """Load only the model parameters of a checkpoint file into ``model`` (a BNN must be initialised)."""
    tensors, meta = read_state(path)
    if meta.get("kind") != "checkpoint":
        raise ValueError(f"{path} is not a pyrobnn training checkpoint")
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    return meta


def _save_checkpoint(directory, model, opt, history, epoch, step, keep, data_seed=None, spec=None):
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    skel, t2 = flatten_state({"optimizer": opt.state_dict(), "rng": _rng_state()}, prefix="state")
    tensors.update(t2)
    path = Path(directory) / _ckpt_name(epoch, step)
    write_state(path, tensors, {"kind": "checkpoint", "epoch": epoch, "step": step, "state": skel,
                                "history": history.records, "spec": spec, "data_seed": data_seed})
    old = sorted(glob.glob(os.path.join(str(directory), "ckpt-e*-s*.safetensors")))
    for p in old[:-keep]:
        os.unlink(p)
    return path


class Checkpoints:
    """The checkpoint directory of one training run, as the loop uses it.

    :param directory: where the files go (created when the loop starts).
    :param model: the module whose ``state_dict`` is saved (and restored on resume).
    :param optimizer: the optimiser whose state is saved (and restored, after checking it fits).
    :param keep: how many of the newest files to keep.
    :param spec: ``() -> JSON-able`` description of the model stored in every file (or None).
    """

    def __init__(self, directory, model: torch.nn.Module, optimizer: torch.optim.Optimizer, keep: int = 2,
                 spec: Optional[Callable[[], object]] = None):
        self.directory, self.model, self.optimizer, self.keep = directory, model, optimizer, keep
        self.spec = spec

    def prepare(self) -> None:
        os.makedirs(self.directory, exist_ok=True)

    def save(self, history, epoch: int, step: int, data_seed=None) -> Path:
        return _save_checkpoint(self.directory, self.model, self.optimizer, history, epoch, step, self.keep,
                                data_seed, None if self.spec is None else self.spec())

    def restore(self, history, batches) -> Optional[Tuple[Path, int, int]]:
        """Load the newest readable checkpoint into the model, the optimiser, the RNGs, ``history`` and
        the data order; ``(path, epoch, step)``, or None when the directory holds none."""
        found = latest_checkpoint(self.directory)
        if found is None:
            return None
        path, tensors, meta = found
        try:
            self.model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
            state = unflatten_state(meta["state"], tensors)
            fresh_groups = [dict(g) for g in self.optimizer.param_groups]
            self.optimizer.load_state_dict(state["optimizer"])
            _check_optimizer_state(self.optimizer, fresh_groups)
            _set_rng_state(state["rng"])
            history.records = list(meta.get("history", []))
            epoch, step = int(meta["epoch"]), int(meta["step"])
            if hasattr(batches, "restore_seed"):
                batches.restore_seed(meta.get("data_seed"))
        except (KeyError, IndexError, TypeError, AttributeError, RuntimeError, OverflowError) as e:
            raise ValueError(f"{path} does not fit this BNN and optimizer (another run's checkpoint?): "
                             f"{type(e).__name__}: {e}") from None
        return path, epoch, step
