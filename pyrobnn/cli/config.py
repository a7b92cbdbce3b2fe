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
    kl_warmup = [0, 5]         # hold, ramp (epochs); default "auto", "none" for no warm-up
    lr_schedule = "cosine"
    num_samples = 16
    # lambdas = [0.0, 1.0]     # with guide = "hyper-mean-field": train over this KL-weight range
    [sample]                   # used by `pyrobnn sample` (SGLD / pSGLD) instead of [train]
    kernel = "sgld"            # sgld | psgld
    step_size = 1e-5           # or {schedule = "polynomial", a = 1e-4, b = 1.0, gamma = 0.55}
                               # or {schedule = "cyclical", step_size = 1e-4, num_steps = 2000, num_cycles = 4}
    num_samples = 100          # draws kept per chain
    warmup_steps = 1000        # updates before the first kept draw
    thin = 10                  # updates per kept draw
    num_chains = 2
    batch_size = 128
    temperature = 1.0

``train.kl_warmup = "auto"`` (the default) ramps the KL weight linearly from 0 to 1 over the first
quarter of the epochs when a prior is log-uniform or empirical ARD — without it their ELBO collapses the
network to its prior (chance accuracy) — and uses none for other priors
(:func:`pyrobnn.inference.fit.auto_kl_warmup`). ``"none"`` turns it off, ``[hold, ramp]`` sets it.
"""
from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Dict

from pyrobnn.validation import finite_float, non_negative_float, non_negative_int, positive_float, positive_int

__all__ = ["load_config", "read_toml", "validate_config", "DEFAULTS"]

DEFAULTS: Dict[str, Dict[str, Any]] = {
    "data": {"name": "digits"},
    "model": {"name": "mlp"},
    "bnn": {"prior": "gaussian", "guide": "mean-field", "likelihood": None, "layers": "*",
            "local_reparameterization": True},
    "train": {"epochs": 10, "lr": 1e-3, "batch_size": 128, "optimizer": "adam", "kl_warmup": "auto",
              "lr_schedule": None, "num_samples": 16, "checkpoint_every": None, "grad_clip": None,
              "lambdas": None, "lams_per_batch": 5},
    "sample": {"kernel": "sgld", "step_size": None, "num_samples": 100, "warmup_steps": 1000, "thin": 10,
               "num_chains": 1, "batch_size": 128, "temperature": 1.0},
}
_TOP = {"seed", "data", "model", "bnn", "train", "sample"}
_SCHEDULES = {"constant": {"step_size"}, "polynomial": {"a", "b", "gamma"},
              "cyclical": {"step_size", "num_steps", "num_cycles", "exploration"}}


def load_config(path) -> Dict[str, Any]:
    """Read a TOML run config and return it validated, with :data:`DEFAULTS` filled in (see the module
    docstring for the format). A missing file, bad TOML or an unknown key raises a one-line error."""
    return validate_config(read_toml(path), str(path))


def read_toml(path) -> Dict[str, Any]:
    """The TOML file at ``path`` as a dict; a missing file, bad TOML or non-UTF-8 bytes raise a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path} is not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a UTF-8 text file") from None


def validate_config(raw: Dict[str, Any], where: str = "config") -> Dict[str, Any]:
    """Check a config already parsed into a dict (tables ``data``, ``model``, ``bnn``, ``train``, and
    ``seed``) and return it with defaults filled in; errors name the key and ``where``."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: top level must be a table")
    unknown = set(raw) - _TOP
    if unknown:
        raise ValueError(f"{where}: unknown top-level keys {sorted(unknown)}; allowed: {sorted(_TOP)}")
    cfg: Dict[str, Any] = {"seed": raw.get("seed", 0)}
    non_negative_int(f"{where}: seed", cfg["seed"])
    for section, defaults in DEFAULTS.items():
        got = raw.get(section, {})
        if not isinstance(got, dict):
            raise ValueError(f"{where}: [{section}] must be a table, got {type(got).__name__}")
        if section in ("train", "bnn", "sample"):
            unknown = set(got) - set(defaults)
            if unknown:
                raise ValueError(f"{where}: unknown keys in [{section}]: {sorted(unknown)}; allowed: {sorted(defaults)}")
        cfg[section] = {**defaults, **got}
    for section in ("data", "model"):
        if not isinstance(cfg[section].get("name"), str):
            raise ValueError(f"{where}: [{section}] needs a string 'name'")
    t = cfg["train"]
    for key in ("epochs", "batch_size", "num_samples", "lams_per_batch"):
        positive_int(f"{where}: train.{key}", t[key])
    positive_float(f"{where}: train.lr", t["lr"])
    if t["checkpoint_every"] is not None:
        positive_int(f"{where}: train.checkpoint_every", t["checkpoint_every"])
    if t["grad_clip"] is not None:
        positive_float(f"{where}: train.grad_clip", t["grad_clip"])
    if isinstance(t["kl_warmup"], str):
        if t["kl_warmup"] not in ("auto", "none"):
            raise ValueError(f"{where}: train.kl_warmup must be \"auto\", \"none\" or [hold_epochs, ramp_epochs], "
                             f"got {t['kl_warmup']!r}")
    elif t["kl_warmup"] is not None:
        kw = t["kl_warmup"]
        if not (isinstance(kw, list) and len(kw) == 2):
            raise ValueError(f"{where}: train.kl_warmup must be [hold_epochs, ramp_epochs] ≥ 0, got {kw!r}")
        for i, v in enumerate(kw):
            non_negative_float(f"{where}: train.kl_warmup[{i}]", v)
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
    guide_name = b["guide"] if isinstance(b["guide"], str) else b["guide"].get("name")
    lams = t["lambdas"]
    if lams is not None:
        if not (isinstance(lams, list) and len(lams) == 2):
            raise ValueError(f"{where}: train.lambdas must be [lo, hi] with 0 ≤ lo < hi, got {lams!r}")
        for i, v in enumerate(lams):
            finite_float(f"{where}: train.lambdas[{i}]", v)
        if not 0 <= lams[0] < lams[1]:
            raise ValueError(f"{where}: train.lambdas must be [lo, hi] with 0 ≤ lo < hi, got {lams!r}")
        if guide_name != "hyper-mean-field":
            raise ValueError(f"{where}: train.lambdas trains a λ-hypernetwork; it needs "
                             f"bnn.guide = \"hyper-mean-field\", got {guide_name!r}")
        t["lambdas"] = tuple(float(v) for v in lams)
    _validate_sample(cfg["sample"], where)
    return cfg


def _validate_sample(s, where):
    if s["kernel"] not in ("sgld", "psgld"):
        raise ValueError(f"{where}: sample.kernel must be \"sgld\" or \"psgld\", got {s['kernel']!r}")
    for key in ("num_samples", "thin", "num_chains", "batch_size"):
        positive_int(f"{where}: sample.{key}", s[key])
    non_negative_int(f"{where}: sample.warmup_steps", s["warmup_steps"])
    positive_float(f"{where}: sample.temperature", s["temperature"])
    step = s["step_size"]
    if isinstance(step, dict):
        kind = step.get("schedule")
        if kind not in _SCHEDULES:
            raise ValueError(f"{where}: sample.step_size.schedule must be one of {sorted(_SCHEDULES)}, got {kind!r}")
        bad = set(step) - _SCHEDULES[kind] - {"schedule"}
        if bad:
            raise ValueError(f"{where}: unknown keys in sample.step_size ({kind}): {sorted(bad)}; "
                             f"allowed: {sorted(_SCHEDULES[kind])}")
        for k, v in step.items():
            if k != "schedule":
                finite_float(f"{where}: sample.step_size.{k}", v)
    elif step is not None:
        positive_float(f"{where}: sample.step_size", step)
