"""Whole runs from validated configs: build the BNN a config describes, then train it (``fit``, the λ-sweep,
data-parallel) or sample it (SGLD chains) in a run directory (:mod:`pyrobnn.cli.rundir`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from .rundir import (RUN_FILE, Interrupted, RunDirectory, RunError, _jsonable, config_diff,  # noqa: F401
                     config_fingerprint, interrupt_guard, open_run, write_json)

#: the run directory's names are :mod:`pyrobnn.cli.rundir`'s (imported above for the commands' convenience)
__all__ = ["build_from_config", "run_fit", "run_sample", "SampleInterrupted"]


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
