"""A whole run from a validated config: data → architecture → BNN → fit → metrics, model and plots."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict

import pyro
import torch

from . import data as datasets
from .bnn import bayesian
from .io import atomic_write_bytes, save
from .registry import MODELS

__all__ = ["build_from_config", "run_fit", "write_json"]


def write_json(path, obj):
    """Write ``obj`` as indented, key-sorted JSON to ``path`` atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _default_likelihood(ds):
    return "gaussian" if ds.task == "regression" else "categorical"


def build_from_config(cfg: Dict[str, Any]):
    """(dataset, bnn) for a validated config."""
    dkw = {k: v for k, v in cfg["data"].items() if k != "name"}
    ds = datasets.load(cfg["data"]["name"], **dkw)
    mkw = {k: v for k, v in cfg["model"].items() if k != "name"}
    if cfg["model"]["name"] == "mlp":
        mkw.setdefault("in_features", int(torch.tensor(ds.x_train.shape[1:]).prod()))
        out = ds.meta.get("num_classes", 1) if ds.task == "classification" else 1
        mkw.setdefault("out_features", out)
    net = MODELS.build({"name": cfg["model"]["name"], **mkw})
    b = cfg["bnn"]
    likelihood = b["likelihood"] or _default_likelihood(ds)
    bnn = bayesian(net, prior=b["prior"], guide=b["guide"], likelihood=likelihood,
                   dataset_size=len(ds.x_train), layers=b["layers"],
                   local_reparameterization=b["local_reparameterization"])
    return ds, bnn


def run_fit(cfg: Dict[str, Any], out_dir, resume: bool = False, progress: bool = True) -> Dict[str, Any]:
    """Train from ``cfg`` and write ``metrics.json``, ``history.csv``, ``model.safetensors`` and plots.
    Under ``torchrun`` the training is data-parallel and only rank 0 writes (other ranks return None)."""
    from pyrobnn.inference import fit  # lazily: pyrobnn does not import inference at module level
    from .plots import plot_learning_curves, plot_reliability
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pyro.set_rng_seed(cfg["seed"])
    ds, bnn = build_from_config(cfg)
    t = cfg["train"]
    train, dp = (ds.x_train, ds.y_train), _data_parallel(cfg, ds, bnn)  # under torchrun: this rank's shard
    if dp is not None:
        train = dp.loader(ds.x_train, ds.y_train, t["batch_size"], seed=cfg["seed"])
    history = fit(bnn, train, epochs=t["epochs"], lr=t["lr"], batch_size=t["batch_size"],
                  optimizer=t["optimizer"], kl_warmup=t["kl_warmup"], lr_schedule=t["lr_schedule"],
                  val=(ds.x_test, ds.y_test), num_samples=t["num_samples"],
                  checkpoint_dir=str(out / "checkpoints"), checkpoint_every=t["checkpoint_every"],
                  resume=resume, seed=cfg["seed"], progress=progress, grad_clip=t["grad_clip"], distributed=dp)
    if dp is not None:
        dp.close()
        if not dp.is_main:  # outputs come from rank 0 only
            return None
    torch.manual_seed(cfg["seed"])
    metrics = bnn.evaluate(ds.x_test, ds.y_test, t["num_samples"])
    save(bnn, out / "model.safetensors")
    history.to_csv(out / "history.csv")
    write_json(out / "metrics.json", {"test": metrics, "epochs": t["epochs"], "config": _jsonable(cfg)})
    plot_learning_curves(history, out / "learning_curves.png")
    if bnn.likelihood.task == "classification" and ds.y_test.dim() == 1 and hasattr(bnn.likelihood, "num_classes"):
        probs = bnn.predict(ds.x_test, t["num_samples"])
        if probs.dim() == 2:
            plot_reliability({"BNN": probs}, ds.y_test, out / "reliability.png")
    return metrics


def _data_parallel(cfg, ds, bnn):
    """A DataParallel when launched by torchrun (BNN and test data moved to its device), else None."""
    from pyrobnn.inference.distributed import DataParallel, launched_by_torchrun
    if not launched_by_torchrun():
        return None
    dp = DataParallel.from_env(seed=cfg["seed"])
    bnn.initialize(ds.x_train[:2])  # create the guide's parameters, then move everything to the device
    bnn.to(dp.device)
    ds.x_test, ds.y_test = ds.x_test.to(dp.device), ds.y_test.to(dp.device)
    return dp


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj
