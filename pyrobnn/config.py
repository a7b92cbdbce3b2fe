"""TOML run configs: data, architecture, prior, guide, likelihood and training, validated up front.

Example (``pyrobnn fit run.toml --out DIR``)::

    seed = 0
    [data]
    name = "digits"            # digits | breast_cancer | boston | mnist5k | fashion_mnist
    [model]
    name = "mlp"               # any name in pyrobnn.models; in/out sizes inferred for mlp
    hidden = [100]
    [bnn]
    prior = {name = "gaussian", scale = 1.0}     # or a table of patterns: [bnn.prior] "fc*" = "log-uniform"
    guide = "mean-field"
    likelihood = "categorical"
    [train]
    epochs = 30
    lr = 0.01
    batch_size = 128
    kl_warmup = [0, 5]         # hold, ramp (epochs)
    lr_schedule = "cosine"
    num_samples = 16
"""
from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any, Dict

__all__ = ["load_config", "validate_config", "DEFAULTS"]

DEFAULTS: Dict[str, Dict[str, Any]] = {
    "data": {"name": "digits"},
    "model": {"name": "mlp"},
    "bnn": {"prior": "gaussian", "guide": "mean-field", "likelihood": None, "layers": "*",
            "local_reparameterization": True},
    "train": {"epochs": 10, "lr": 1e-3, "batch_size": 128, "optimizer": "adam", "kl_warmup": None,
              "lr_schedule": None, "num_samples": 16, "checkpoint_every": None, "grad_clip": None},
}
_TOP = {"seed", "data", "model", "bnn", "train"}


def load_config(path) -> Dict[str, Any]:
    """Read a TOML run config and return it validated, with :data:`DEFAULTS` filled in (see the module
    docstring for the format). A missing file, bad TOML or an unknown key raises a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path} is not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a UTF-8 text file") from None
    return validate_config(raw, str(path))


def _positive_int(v, what):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{what} must be a positive integer, got {v!r}")


def _positive_float(v, what):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{what} must be a positive number, got {v!r}")


def validate_config(raw: Dict[str, Any], where: str = "config") -> Dict[str, Any]:
    """Check a config already parsed into a dict (tables ``data``, ``model``, ``bnn``, ``train``, and
    ``seed``) and return it with defaults filled in; errors name the key and ``where``."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: top level must be a table")
    unknown = set(raw) - _TOP
    if unknown:
        raise ValueError(f"{where}: unknown top-level keys {sorted(unknown)}; allowed: {sorted(_TOP)}")
    cfg: Dict[str, Any] = {"seed": raw.get("seed", 0)}
    if isinstance(cfg["seed"], bool) or not isinstance(cfg["seed"], int) or cfg["seed"] < 0:
        raise ValueError(f"{where}: seed must be a non-negative integer, got {cfg['seed']!r}")
    for section, defaults in DEFAULTS.items():
        got = raw.get(section, {})
        if not isinstance(got, dict):
            raise ValueError(f"{where}: [{section}] must be a table, got {type(got).__name__}")
        if section in ("train", "bnn"):
            unknown = set(got) - set(defaults)
            if unknown:
                raise ValueError(f"{where}: unknown keys in [{section}]: {sorted(unknown)}; allowed: {sorted(defaults)}")
        cfg[section] = {**defaults, **got}
    for section in ("data", "model"):
        if not isinstance(cfg[section].get("name"), str):
            raise ValueError(f"{where}: [{section}] needs a string 'name'")
    t = cfg["train"]
    _positive_int(t["epochs"], "train.epochs")
    _positive_int(t["batch_size"], "train.batch_size")
    _positive_int(t["num_samples"], "train.num_samples")
    _positive_float(t["lr"], "train.lr")
    if t["checkpoint_every"] is not None:
        _positive_int(t["checkpoint_every"], "train.checkpoint_every")
    if t["grad_clip"] is not None:
        _positive_float(t["grad_clip"], "train.grad_clip")
    if t["kl_warmup"] is not None:
        kw = t["kl_warmup"]
        ok = isinstance(kw, list) and len(kw) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0 for v in kw)
        if not ok:
            raise ValueError(f"{where}: train.kl_warmup must be [hold_epochs, ramp_epochs] ≥ 0, got {kw!r}")
        t["kl_warmup"] = tuple(kw)
    ls = t["lr_schedule"]
    if ls is not None and not (ls in ("cosine", "linear-decay") or
                               (isinstance(ls, list) and len(ls) == 2 and ls[0] == "linear-decay")):
        raise ValueError(f"{where}: train.lr_schedule must be 'cosine', 'linear-decay' or ['linear-decay', start], got {ls!r}")
    if isinstance(ls, list):
        t["lr_schedule"] = tuple(ls)
    b = cfg["bnn"]
    for key in ("prior", "guide"):
        if not isinstance(b[key], (str, dict)):
            raise ValueError(f"{where}: bnn.{key} must be a name or a table, got {b[key]!r}")
    return cfg
