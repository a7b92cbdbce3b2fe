"""Whole runs from validated configs, and the run directory they live in.

A run directory is a unit: ``run.json`` records the config, its fingerprint and the library version;
training state lives in ``checkpoints/`` (``fit``) or ``chains/`` (``sample``); the results are
``metrics.json``, ``history.csv``, ``model.safetensors`` / ``posterior.safetensors`` and
``inference_data.nc`` (the posterior as ArviZ data, read by ``pyrobnn report``).

:func:`open_run` decides what may happen to a directory before any work is done:

* a new run needs an empty (or absent) directory;
* ``resume`` continues the run there, after checking that the stored config equals the given one
  (``train.epochs`` / ``sample.num_chains`` may grow; ``force`` skips the check); with nothing to
  resume it fails, ``resume_or_start`` starts a new run instead;
* ``overwrite`` replaces the run there: the old one is moved aside and deleted only once the new run
  has written its first checkpoint; if the new run fails before that, the old one is put back.

A new run that fails before its first checkpoint leaves nothing behind.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

__all__ = ["build_from_config", "run_fit", "run_sample", "write_json", "open_run", "RunDirectory", "RunError",
           "Interrupted", "SampleInterrupted", "config_fingerprint", "config_diff", "interrupt_guard", "RUN_FILE"]

RUN_FILE = "run.json"
#: config keys that may grow on --resume (the run goes on for longer)
GROWABLE = ("train.epochs", "sample.num_chains")


class RunError(ValueError):
    """A run directory cannot be used as asked (occupied, nothing to resume, config mismatch)."""


class Interrupted(Exception):
    """SIGINT/SIGTERM stopped a run after writing its state; ``exit_code`` is 128 + the signal number."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def write_json(path, obj):
    """Write ``obj`` as indented, key-sorted JSON to ``path`` atomically."""
    from pyrobnn.io import atomic_write_bytes
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


# -- configs: fingerprint and diff -------------------------------------------------------------------------
def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def config_fingerprint(cfg: Dict[str, Any]) -> str:
    """SHA-256 of the config's canonical JSON (sorted keys, tuples as lists)."""
    return hashlib.sha256(json.dumps(_jsonable(cfg), sort_keys=True).encode()).hexdigest()


def _flatten(cfg, prefix="") -> Dict[str, Any]:
    out = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_diff(stored: Dict[str, Any], given: Dict[str, Any]) -> List[Tuple[str, Any, Any]]:
    """``[(dotted key, stored value, given value)]`` of the keys that differ, except a growable key
    (:data:`GROWABLE`) whose given value is larger."""
    a, b = _flatten(_jsonable(stored)), _flatten(_jsonable(given))
    diff = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if va == vb:
            continue
        if key in GROWABLE and isinstance(va, int) and isinstance(vb, int) and vb > va:
            continue
        diff.append((key, va, vb))
    return diff


def _format_diff(diff, limit=6) -> str:
    shown = "; ".join(f"{k}: {json.dumps(a)} in the run, {json.dumps(b)} given" for k, a, b in diff[:limit])
    more = f"; and {len(diff) - limit} more" if len(diff) > limit else ""
    return shown + more


# -- the run directory -------------------------------------------------------------------------------------
def _has_files(d: Path) -> bool:
    return d.is_dir() and any(d.iterdir())


def _checkpoints(out: Path, command: str) -> List[str]:
    pattern = "checkpoints/ckpt-e*-s*.safetensors" if command == "fit" else "chains/chain-*.safetensors"
    return sorted(glob.glob(os.path.join(str(out), pattern)))


class RunDirectory:
    """What :func:`open_run` decided for one directory; use as a context manager around the work."""

    def __init__(self, out: Path, cfg: Dict[str, Any], command: str, resuming: bool, replacing: bool):
        self.out, self.cfg, self.command = out, cfg, command
        self.resuming, self.replacing = resuming, replacing
        self.aside: Optional[Path] = None
        self.created: Optional[Path] = None

    @property
    def checkpoint_dir(self) -> Path:
        return self.out / ("checkpoints" if self.command == "fit" else "chains")

    def has_checkpoint(self) -> bool:
        return bool(_checkpoints(self.out, self.command))

    def __enter__(self):
        from pyrobnn import __version__
        if self.replacing and _has_files(self.out):
            self.aside = self.out.parent / f".{self.out.name}.replaced-{os.getpid()}-{int(time.time())}"
            os.replace(self.out, self.aside)
        if not self.out.exists():
            top = self.out
            while not top.parent.exists():
                top = top.parent
            self.out.mkdir(parents=True)
            self.created = top  # the outermost directory made here: removed again if the run fails early
        record = {"command": self.command, "config": _jsonable(self.cfg), "fingerprint": config_fingerprint(self.cfg),
                  "pyrobnn_version": __version__}
        if self.resuming and (self.out / RUN_FILE).is_file():
            try:
                old = json.loads((self.out / RUN_FILE).read_text())
                record["created"] = old.get("created")
                record["resumed"] = list(old.get("resumed", [])) + [time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())]
            except (ValueError, OSError):
                pass
        record.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        write_json(self.out / RUN_FILE, record)
        return self

    def checkpointed(self, *_):
        """Called once the new run has a checkpoint: the replaced run is deleted now."""
        if self.aside is not None and self.has_checkpoint():
            shutil.rmtree(self.aside, ignore_errors=True)
            self.aside = None
        return False

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            if self.aside is not None:
                shutil.rmtree(self.aside, ignore_errors=True)
                self.aside = None
            return False
        if self.resuming or self.has_checkpoint():
            self.checkpointed()
            return False          # a resumable run stays
        # failed before its first checkpoint: leave nothing behind, put a replaced run back
        if self.created or self.aside is not None:
            shutil.rmtree(self.created or self.out, ignore_errors=True)
        if self.aside is not None:
            os.replace(self.aside, self.out)
            self.aside = None
        return False


def open_run(out, cfg: Dict[str, Any], command: str = "fit", *, resume: bool = False,
             resume_or_start: bool = False, overwrite: bool = False, force: bool = False) -> RunDirectory:
    """Check what may be done with the directory ``out`` (nothing is written here); see the module doc."""
    out = Path(out)
    if resume and resume_or_start:
        raise RunError("give either --resume or --resume-or-start, not both")
    if overwrite and (resume or resume_or_start):
        raise RunError("--overwrite replaces the run; --resume continues it: give one of them")
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file, not a directory")
    if resume or resume_or_start:
        if _checkpoints(out, command):
            run_file = out / RUN_FILE
            stored = None
            if run_file.is_file():
                try:
                    stored = json.loads(run_file.read_text())
                except ValueError:
                    stored = None
            if not force:
                if not isinstance(stored, dict) or not isinstance(stored.get("config"), dict):
                    raise RunError(f"{out} has checkpoints but no readable {RUN_FILE} to check the config against; "
                                   "pass --force to resume anyway")
                if stored.get("command", command) != command:
                    raise RunError(f"{out} holds a `pyrobnn {stored.get('command')}` run, not a `pyrobnn {command}` run")
                diff = config_diff(stored["config"], cfg)
                if diff:
                    raise RunError(f"the config differs from the run in {out}: {_format_diff(diff)}. Start a new run "
                                   "in another --out, or pass --force to resume with the new settings")
            return RunDirectory(out, cfg, command, resuming=True, replacing=False)
        if resume:
            raise RunError(f"nothing to resume in {out}: no checkpoint there. Pass --resume-or-start to start a "
                           "new run when there is none")
    if _has_files(out) and not overwrite:
        what = "a pyrobnn run" if (out / RUN_FILE).is_file() else "files"
        raise RunError(f"{out} already holds {what}; pass --resume to continue it or --overwrite to replace it")
    return RunDirectory(out, cfg, command, resuming=False, replacing=overwrite)


# -- interrupts ------------------------------------------------------------------------------------------
class interrupt_guard:
    """``with interrupt_guard() as stop:`` — SIGINT/SIGTERM set ``stop.signum`` instead of raising, so
    the loop can finish its step and save (``stop()`` is true then); a second signal raises
    ``KeyboardInterrupt`` at once (``immediate=True``: the first one does). Outside the main thread it
    does nothing."""

    def __init__(self, immediate: bool = False):
        self.signum: Optional[int] = None
        self.immediate = immediate  # raise KeyboardInterrupt at the first signal (loops with no step to finish)
        self._old = {}

    def __call__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame):
        first = self.signum is None
        self.signum = self.signum or signum
        if self.immediate or not first:
            raise KeyboardInterrupt

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum or signal.SIGINT)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum or signal.SIGINT).name


# -- building ---------------------------------------------------------------------------------------------
def _default_likelihood(ds):
    return "gaussian" if ds.task == "regression" else "categorical"


def _guide_arg(cfg):
    """The guide as ``bayesian`` takes it; ``[train] lambdas`` sets a hyper-mean-field guide's λ range."""
    guide = cfg["bnn"]["guide"]
    lams = cfg["train"].get("lambdas")
    if lams is not None:
        guide = dict(guide) if isinstance(guide, dict) else {"name": guide}
        guide["lam_range"] = list(lams)
    return guide


def build_from_config(cfg: Dict[str, Any]):
    """(dataset, bnn) for a validated config."""
    import torch

    from pyrobnn import data as datasets
    from pyrobnn.bnn import bayesian
    from pyrobnn.registry import MODELS
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
    bnn = bayesian(net, prior=b["prior"], guide=_guide_arg(cfg), likelihood=likelihood,
                   dataset_size=len(ds.x_train), layers=b["layers"],
                   local_reparameterization=b["local_reparameterization"])
    _check_targets(ds, bnn)
    return ds, bnn


def _check_targets(ds, bnn):
    """A likelihood that cannot describe the data set's targets is a config error, found before training."""
    lik = bnn.likelihood
    if ds.task == "classification" and lik.task == "regression":
        raise ValueError(f"bnn.likelihood {type(lik).__name__} is a regression likelihood but the data set is a "
                         "classification one (integer class labels); use likelihood = \"categorical\"")
    if ds.task == "regression" and lik.task == "classification":
        raise ValueError(f"bnn.likelihood {type(lik).__name__} is a classification likelihood but the data "
                         "set's targets are real-valued; use likelihood = \"gaussian\"")


def _is_hyper(bnn) -> bool:
    from pyrobnn.guides.hyper import HyperMeanField
    return isinstance(bnn.autoguide, HyperMeanField)


def _held_out(ds, limit=256):
    return ds.x_test[:limit], ds.y_test[:limit]


def write_inference_data(idata, path) -> None:
    """Write ArviZ data (InferenceData on ArviZ 0.x, DataTree on 1.x) to ``path`` atomically."""
    from pyrobnn.arviz_compat import write
    write(idata, path)


# -- fit ---------------------------------------------------------------------------------------------------
def run_fit(cfg: Dict[str, Any], out_dir, resume: bool = False, progress: bool = True, *,
            run: Optional[RunDirectory] = None, stop_requested: Optional[Callable[[], bool]] = None):
    """Train from ``cfg`` and write ``metrics.json``, ``history.csv``, ``model.safetensors``,
    ``inference_data.nc`` and plots into ``out_dir``. Under ``torchrun`` the training is data-parallel
    and only rank 0 writes (other ranks return None).

    ``run``: a :class:`RunDirectory` from :func:`open_run` (the CLI's path: the directory is checked
    before the data are loaded, created only once the config has built); without it ``out_dir`` is
    used as is (the Python API's behaviour)."""
    import pyro
    import torch

    from pyrobnn.inference import fit  # lazily: pyrobnn does not import inference at module level
    from pyrobnn.io import save
    out = Path(out_dir)
    pyro.set_rng_seed(cfg["seed"])
    ds, bnn = build_from_config(cfg)
    t = cfg["train"]
    hyper = _is_hyper(bnn)
    if hyper and resume:
        raise RunError("a λ-sweep run (hyper-mean-field guide) cannot be resumed; start it again with --overwrite")
    if run is None:  # the Python API writes into the directory as it is
        out.mkdir(parents=True, exist_ok=True)
        run, ctx = RunDirectory(out, cfg, "fit", resuming=resume, replacing=False), _nullcontext(None)
    else:
        ctx = run
    with ctx:
        if hyper:
            history = _fit_hyper(cfg, ds, bnn, progress)
        else:
            train, dp = (ds.x_train, ds.y_train), _data_parallel(cfg, ds, bnn)  # under torchrun: this rank's shard
            if dp is not None:
                train = dp.loader(ds.x_train, ds.y_train, t["batch_size"], seed=cfg["seed"])
            history = fit(bnn, train, epochs=t["epochs"], lr=t["lr"], batch_size=t["batch_size"],
                          optimizer=t["optimizer"], kl_warmup=_kl_warmup(t["kl_warmup"]), lr_schedule=t["lr_schedule"],
                          val=(ds.x_test, ds.y_test), num_samples=t["num_samples"],
                          checkpoint_dir=str(out / "checkpoints"), checkpoint_every=t["checkpoint_every"],
                          resume=resume, seed=cfg["seed"], progress=progress, grad_clip=t["grad_clip"],
                          distributed=dp, callbacks=[run.checkpointed], stop_requested=stop_requested)
            if dp is not None:
                dp.close()
                if not dp.is_main:  # outputs come from rank 0 only
                    return None
        torch.manual_seed(cfg["seed"])
        metrics = bnn.evaluate(ds.x_test, ds.y_test, t["num_samples"])
        save(bnn, out / "model.safetensors")
        history.to_csv(out / "history.csv")
        result = {"test": metrics, "epochs": t["epochs"], "config": _jsonable(cfg)}
        if hyper:
            result["lambda_curve"] = _lambda_curve(bnn, ds, t["num_samples"], cfg["seed"])
        write_json(out / "metrics.json", result)
        _fit_inference_data(bnn, ds, cfg, result, out)
        _fit_plots(bnn, ds, history, t, out)
    return metrics


class _nullcontext:
    def __init__(self, value):
        self.value = value

    def __enter__(self):
        return self.value

    def __exit__(self, *exc):
        return False


def _kl_warmup(spec):
    return None if spec == "none" else spec


def _fit_hyper(cfg, ds, bnn, progress):
    from pyrobnn.inference import fit_complexity
    t = cfg["train"]
    return fit_complexity(bnn, (ds.x_train, ds.y_train), epochs=t["epochs"], lr=t["lr"], batch_size=t["batch_size"],
                          optimizer=t["optimizer"], lams_per_batch=t["lams_per_batch"], lr_schedule=t["lr_schedule"],
                          seed=cfg["seed"], progress=progress, grad_clip=t["grad_clip"])


LAMBDA_GRID = 5
IDATA_DRAWS = 64   # guide draws in a fit run's inference_data.nc
PRUNE_FRACTIONS = (0.0, 0.5, 0.8, 0.9, 0.95)


def _lambda_curve(bnn, ds, num_samples, seed) -> List[Dict[str, float]]:
    """Test accuracy/NLL and removable fraction (accuracy within 0.01 of the unpruned guide) at
    :data:`LAMBDA_GRID` evenly spaced λ of the guide's range."""
    import torch

    from pyrobnn.inference.complexity import pruning_curve, removable_fraction
    guide = bnn.autoguide
    lo, hi = guide.lam_range
    rows = []
    for lam in torch.linspace(lo, hi, LAMBDA_GRID).tolist():
        curve = pruning_curve(bnn, guide.at(lam), ds.x_test, ds.y_test, PRUNE_FRACTIONS,
                              num_samples=min(num_samples, 8), seed=seed)
        base = curve[0]
        row = {"lambda": lam, "removable_fraction": removable_fraction(curve, 0.01, _metric(base))}
        row.update({k: v for k, v in base.items() if k in ("accuracy", "nll", "rmse", "ece")})
        rows.append(row)
    return rows


def _metric(row):
    return "accuracy" if "accuracy" in row else "nll"


def _fit_inference_data(bnn, ds, cfg, result, out):
    """The posterior's ArviZ file: guide draws, held-out log-likelihood / predictive and function-space
    predictions on (up to 256 rows of) the test split."""
    from pyrobnn.diagnostics import to_inference_data
    held = _held_out(ds)
    model = bnn
    if _is_hyper(bnn):
        from pyrobnn.inference.complexity import with_guide
        model = with_guide(bnn, bnn.autoguide.at(bnn.autoguide.lam_range[1]))
    attrs = {"pyrobnn_metrics": result["test"], "pyrobnn_run": "fit"}
    if "lambda_curve" in result:
        attrs["pyrobnn_lambda_curve"] = result["lambda_curve"]
    idata = to_inference_data(model, data=held, test=held, num_samples=IDATA_DRAWS, seed=cfg["seed"], attrs=attrs)
    write_inference_data(idata, out / "inference_data.nc")


def _fit_plots(bnn, ds, history, t, out):
    from pyrobnn.plots import plot_learning_curves, plot_reliability
    plot_learning_curves(history, out / "learning_curves.png")
    if bnn.likelihood.task == "classification" and ds.y_test.dim() == 1 and hasattr(bnn.likelihood, "num_classes") \
            and not _is_hyper(bnn):
        probs = bnn.predict(ds.x_test, t["num_samples"])
        if probs.dim() == 2:
            plot_reliability({"BNN": probs}, ds.y_test, out / "reliability.png")


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


# -- sample ------------------------------------------------------------------------------------------------
def _step_size(spec):
    from pyrobnn.inference import ConstantStepSize, CyclicalStepSize, PolynomialDecay
    if isinstance(spec, dict):
        kw = {k: v for k, v in spec.items() if k != "schedule"}
        cls = {"constant": ConstantStepSize, "polynomial": PolynomialDecay, "cyclical": CyclicalStepSize}[spec["schedule"]]
        return cls(**kw)
    return spec


def _chain_path(out: Path, c: int) -> Path:
    return out / "chains" / f"chain-{c:03d}.safetensors"


def run_sample(cfg: Dict[str, Any], out_dir, resume: bool = False, progress: bool = True, *,
               run: Optional[RunDirectory] = None, stop_requested: Optional[Callable[[], bool]] = None):
    """SGLD/pSGLD chains from ``cfg`` (its ``[sample]`` table). Each chain is written to
    ``chains/chain-NNN.safetensors`` when it ends (a resumed run skips finished chains); then
    ``posterior.safetensors`` (all chains), ``inference_data.nc`` and ``metrics.json``."""
    import pyro
    import torch

    from pyrobnn.inference import SamplePosterior, sample
    from pyrobnn.inference.distributed import chain_seed
    out = Path(out_dir)
    pyro.set_rng_seed(cfg["seed"])
    ds, bnn = build_from_config(cfg)
    s = cfg["sample"]
    if run is None:
        out.mkdir(parents=True, exist_ok=True)
        ctx = _nullcontext(None)
    else:
        ctx = run
    held = _held_out(ds)
    step_size = _step_size(s["step_size"])  # a bad schedule is a config error: found before any work
    with ctx:
        (out / "chains").mkdir(exist_ok=True)
        chains = []
        for c in range(s["num_chains"]):
            path = _chain_path(out, c)
            if resume and path.is_file():
                chains.append(SamplePosterior.load(path))
                continue
            try:
                if stop_requested is not None and stop_requested():
                    raise KeyboardInterrupt
                post = sample(bnn, (ds.x_train, ds.y_train), s["kernel"], num_samples=s["num_samples"],
                              warmup_steps=s["warmup_steps"], thin=s["thin"], num_chains=1, step_size=step_size,
                              batch_size=s["batch_size"], eval_x=held[0], seed=chain_seed(cfg["seed"], c),
                              progress=progress, temperature=s["temperature"])
            except KeyboardInterrupt:
                raise SampleInterrupted(c, s["num_chains"]) from None
            post.save(path)
            chains.append(post)
            if run is not None:
                run.checkpointed()
        posterior = SamplePosterior(
            chains[0].bnn, {k: torch.cat([p.draws[k] for p in chains]) for k in chains[0].draws},
            {k: torch.cat([p.stats[k] for p in chains]) for k in chains[0].stats}, held[0],
            torch.cat([p.eval_outputs for p in chains]), {**chains[0].config, "num_chains": len(chains)})
        posterior.save(out / "posterior.safetensors")
        torch.manual_seed(cfg["seed"])
        metrics = posterior.evaluate(ds.x_test, ds.y_test)
        result = {"test": metrics, "num_chains": len(chains), "draws_per_chain": posterior.num_draws,
                  "config": _jsonable(cfg)}
        write_json(out / "metrics.json", result)
        from pyrobnn.diagnostics import to_inference_data
        idata = to_inference_data(posterior, data=held, test=held, seed=cfg["seed"],
                                  attrs={"pyrobnn_metrics": metrics, "pyrobnn_run": "sample"})
        write_inference_data(idata, out / "inference_data.nc")
    return metrics


class SampleInterrupted(Exception):
    """SIGINT/SIGTERM during chain ``chain`` (0-based): the chains before it are saved, this one is not."""

    def __init__(self, chain: int, num_chains: int):
        super().__init__(f"interrupted during chain {chain + 1} of {num_chains}; {chain} finished chain(s) saved")
        self.chain, self.num_chains = chain, num_chains
