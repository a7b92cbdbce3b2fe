"""``pyrobnn distill run.toml [--teacher RUN] [--out DIR]``: distil a saved posterior into one
deterministic student.

The config names the teacher (a run directory written by ``pyrobnn fit`` or ``pyrobnn sample``, or a
``.safetensors`` file of a BNN or a SamplePosterior; ``--teacher`` overrides it), the student
architecture from the model registry and the distillation settings::

    teacher = "runs/digits"           # pyrobnn fit/sample --out DIR, or a .safetensors file
    out = "runs/digits_student"       # optional; --out overrides
    seed = 0
    [data]                            # optional: default is the teacher run's [data] (DIR/run.json)
    name = "digits"
    [student]
    name = "mlp"                      # any pyrobnn.models name; in/out sizes inferred for mlp
    hidden = [32]
    [distill]                         # keyword arguments of pyrobnn.inference.distill
    epochs = 20                       # or steps = ...
    batch_size = 128
    lr = 1e-3
    temperature = 1.0
    num_samples = 16
    input_noise = 0.0
    adversarial = false               # or a table of Adversarial options
    [evaluate]
    num_samples = 16                  # teacher draws for the test metrics and latency
    baseline = false                  # also train the student architecture on the labels

Writes ``OUT/student.safetensors`` (load with ``pyrobnn.inference.load_student``), ``OUT/metrics.json``
(teacher vs student on the test split: accuracy or RMSE, NLL, ECE, latency) and ``OUT/history.csv``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from pyrobnn.cli.config import read_toml
from pyrobnn.validation import non_negative_int

_TOP = {"teacher", "out", "seed", "data", "student", "distill", "evaluate"}
_DISTILL_KEYS = {"steps", "epochs", "batch_size", "lr", "weight_decay", "optimizer", "lr_schedule", "temperature",
                 "num_samples", "input_noise", "adversarial", "label_weight", "grad_clip", "log_every"}
_EVAL_KEYS = {"num_samples", "baseline", "baseline_epochs", "latency_batch"}


EPILOG = """\
examples:
  pyrobnn distill distill.toml --teacher runs/digits --out runs/student        # a `pyrobnn fit` run
  pyrobnn distill distill.toml --teacher runs/digits-sgld --out runs/student   # a `pyrobnn sample` run

distill.toml (every key but [student] name is optional; the data default to the teacher run's):
  [student]
  name = "mlp"
  hidden = [32]
  [distill]
  epochs = 20
  temperature = 1.0
  [evaluate]
  baseline = true          # also train the student architecture on the labels alone

writes into DIR: student.safetensors (pyrobnn.inference.load_student), history.csv and metrics.json
(teacher vs student on the test split: accuracy or RMSE, NLL, ECE, latency).
"""


def register(sub):
    from ._common import add_parser
    p = add_parser(sub, "distill", help="distil a run's posterior (fit or sample run) into a deterministic student",
                   description="Distil a saved posterior into one deterministic network.", epilog=EPILOG)
    p.add_argument("config", help="TOML distillation config (see `python -m pydoc pyrobnn.cli.commands.distill`)")
    p.add_argument("--teacher", default=None, metavar="RUN",
                   help="the teacher: a `pyrobnn fit`/`pyrobnn sample` run directory or a .safetensors file "
                        "(default: the config's 'teacher')")
    p.add_argument("--out", default=None, metavar="DIR", help="output directory (default: the config's 'out')")
    p.add_argument("--progress", action="store_true", help="show a progress bar")
    p.set_defaults(func=run)


def load_distill_config(path, teacher=None) -> dict:
    path = Path(path)
    raw = read_toml(path)
    unknown = set(raw) - _TOP
    if unknown:
        raise ValueError(f"{path}: unknown top-level keys {sorted(unknown)}; allowed: {sorted(_TOP)}")
    if teacher is not None:
        raw["teacher"] = str(teacher)
    if not isinstance(raw.get("teacher"), str):
        raise ValueError(f"{path}: no teacher: give --teacher RUN or teacher = \"...\" (a pyrobnn fit/sample run "
                         "directory or a .safetensors file)")
    for section in ("data", "student", "distill", "evaluate"):
        if not isinstance(raw.get(section, {}), dict):
            raise ValueError(f"{path}: [{section}] must be a table")
    student = raw.get("student", {})
    if not isinstance(student.get("name"), str):
        raise ValueError(f"{path}: [student] needs a string 'name' (a pyrobnn.models architecture)")
    for section, allowed in (("distill", _DISTILL_KEYS), ("evaluate", _EVAL_KEYS)):
        bad = set(raw.get(section, {})) - allowed
        if bad:
            raise ValueError(f"{path}: unknown keys in [{section}]: {sorted(bad)}; allowed: {sorted(allowed)}")
    seed = raw.get("seed", 0)
    non_negative_int(f"{path}: seed", seed)
    d = dict(raw.get("distill", {}))
    if "steps" not in d and "epochs" not in d:
        d["epochs"] = 10
    return {"teacher": raw["teacher"], "out": raw.get("out"), "seed": seed, "data": raw.get("data"),
            "student": student, "distill": d, "evaluate": dict(raw.get("evaluate", {})), "where": str(path)}


def _load_teacher(spec: str, where: str):
    """(teacher object, the teacher run's config or None) from a fit directory or a .safetensors file."""
    import pyrobnn
    from pyrobnn.inference import SamplePosterior
    from pyrobnn.io import read_state
    path = Path(spec)
    if not path.is_absolute() and not path.exists():
        path = Path(where).parent / spec
    run_cfg = None
    if path.is_dir():
        for record in ("run.json", "metrics.json"):
            if (path / record).is_file():
                try:
                    run_cfg = json.loads((path / record).read_text()).get("config")
                except (ValueError, AttributeError):
                    raise ValueError(f"{path / record} is not a pyrobnn run record (unreadable JSON)") from None
                break
        run_dir = path
        path = next((path / f for f in ("model.safetensors", "posterior.safetensors") if (path / f).is_file()),
                    path / "model.safetensors")
        if not path.is_file():
            raise FileNotFoundError(f"teacher not found: {run_dir} holds neither model.safetensors (`pyrobnn fit`) "
                                    "nor posterior.safetensors (`pyrobnn sample`); is the run finished?")
    if not path.is_file():
        raise FileNotFoundError(f"teacher not found: {path} (expected a run directory or a .safetensors file)")
    _, meta = read_state(path)
    kind = meta.get("kind")
    if kind == "bnn":
        return pyrobnn.load(path), run_cfg
    if kind == "sample-posterior":
        return SamplePosterior.load(path), run_cfg
    raise ValueError(f"{path} holds a pyrobnn {kind!r}; a teacher must be a saved BNN or SamplePosterior")


def run(args):
    import pyro
    import torch

    from pyrobnn import data as datasets
    from pyrobnn.inference import distill, evaluate_distillation, save_student, train_deterministic
    from pyrobnn.models import build
    from pyrobnn.cli.run import write_json

    cfg = load_distill_config(args.config, getattr(args, "teacher", None))
    out = Path(args.out or cfg["out"] or "")
    if not str(out) or str(out) == ".":
        raise ValueError("give an output directory: --out DIR or out = \"...\" in the config")
    teacher, run_cfg = _load_teacher(cfg["teacher"], cfg["where"])
    data_cfg = cfg["data"] or (run_cfg or {}).get("data")
    if not data_cfg or not isinstance(data_cfg.get("name"), str):
        raise ValueError("no [data] in the config and none recorded with the teacher run")
    ds = datasets.load(data_cfg["name"], **{k: v for k, v in data_cfg.items() if k != "name"})
    bnn = getattr(teacher, "bnn", teacher)
    task = "regression" if bnn.likelihood.task == "regression" else "classification"

    pyro.set_rng_seed(cfg["seed"])
    skw = {k: v for k, v in cfg["student"].items() if k != "name"}
    if cfg["student"]["name"] == "mlp":
        skw.setdefault("in_features", math.prod(ds.x_train.shape[1:]))
        if task == "classification":
            with torch.no_grad():
                skw.setdefault("out_features", int(teacher_outputs_width(teacher, ds.x_train[:2])))
        else:
            width = ds.y_train[0].numel()
            skw.setdefault("out_features", 2 * width)
    student = build({"name": cfg["student"]["name"], **skw})
    dkw = dict(cfg["distill"])
    student, record = distill(teacher, student, ds.x_train if dkw.get("label_weight", 0) == 0 else (ds.x_train, ds.y_train),
                              seed=cfg["seed"], progress=args.progress, **dkw)
    out.mkdir(parents=True, exist_ok=True)
    save_student(student, out / "student.safetensors",
                 {"task": task, "temperature": dkw.get("temperature", 1.0), "teacher": str(cfg["teacher"]),
                  "data": data_cfg})
    record.to_csv(out / "history.csv")
    ev = cfg["evaluate"]
    nets = {"student": student}
    if ev.get("baseline"):
        base = build({"name": cfg["student"]["name"], **skw})
        nets["deterministic (labels)"] = train_deterministic(base, ds.x_train, ds.y_train, task=task,
                                                            epochs=ev.get("baseline_epochs", 20), seed=cfg["seed"])
    torch.manual_seed(cfg["seed"])
    rows = evaluate_distillation(teacher, nets, ds.x_test, ds.y_test, task=task,
                                 num_samples=ev.get("num_samples", 16), latency_batch=ev.get("latency_batch", 128))
    result = {"test": rows, "distill": record.config, "seconds": record.seconds,
              "final_loss": record.records[-1]["loss"] if record.records else None}
    write_json(out / "metrics.json", result)
    print(json.dumps(result, indent=2))
    return 0


def teacher_outputs_width(teacher, x):
    """Number of classes of a classification teacher's predictive (2 for a Bernoulli likelihood)."""
    from pyrobnn.inference.distill import as_teacher
    return as_teacher(teacher).draws(x, 1).logits.shape[-1]
