"""SG-MCMC for networks, directly: ``sample(bnn, data)`` streams minibatches through an SGLD/pSGLD kernel
and returns a :class:`SamplePosterior` that predicts with the ensemble of kept draws.

This is the loader-driven twin of ``pyro.infer.MCMC(SGLD(bnn.model))``: the model sees one batch of a
DataLoader per update (``dataset_size`` N scales its log-likelihood by N/B), instead of full data
subsampled by a plate. Both give the same chain; this one also works when the data does not fit in
memory and gives control over what is kept.

Memory. A draw of LeNet-300-100 is 266k numbers (≈1 MB in float32). What is kept is bounded by
``num_samples`` (draws kept, one every ``thin`` updates after ``warmup_steps``), and ``max_draws``: when more
draws than that accumulate, every second one is dropped and the effective thinning doubles, so the
kept draws stay evenly spaced over the whole run under a hard cap (Korattikara et al.'s observation
applies: consecutive SGLD draws are so correlated that dropping them loses little). Further:
``store_dtype=torch.bfloat16`` halves the memory (prediction casts back; the rounding error of
bfloat16, ~0.4 % relative, is small next to the posterior spread of a network weight but not
negligible for a tight posterior); ``keep_sites`` keeps only some sites (for diagnostics — a posterior
missing sites cannot predict); ``eval_x`` records the network's outputs on held-out inputs at every
kept draw, which is all that function-space diagnostics need.
"""
from __future__ import annotations

import fnmatch
import math
import warnings
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import pyro
import pyro.poutine as poutine
import torch

from pyrobnn import inputs
from pyrobnn.bnn import BNN
from pyrobnn.diagnostics import mcmc_sample_stats, per_draw_log_prob
from pyrobnn.posterior import DrawSet, outputs_under_draws
from pyrobnn.io import bnn_from_spec, read_state, write_state
from pyrobnn.validation import integer

from .batches import ShuffledBatches, Stream
from .loop import Loop, Progress
from .sgld import PSGLD, SGLD

__all__ = ["sample", "SamplePosterior"]

_KERNELS = {"sgld": SGLD, "psgld": PSGLD}
_DEFAULT_STEP = {"sgld": 1e-5, "psgld": 1e-3}


# ----------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------
def _forever(batches):
    epoch = 0
    while True:
        if hasattr(batches, "set_epoch"):  # pyrobnn.data.ArrayLoader: a new permutation each epoch
            batches.set_epoch(epoch)
        epoch += 1
        empty = True
        for batch in batches:
            empty = False
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise TypeError("each batch must be an (x, y) pair")
            yield batch[0], batch[1]
        if empty:
            raise ValueError("the data loader yielded no batches")


def _dataset_size(data, x_y) -> Optional[int]:
    if x_y is not None:
        return int(x_y[1].shape[0])
    n = getattr(data, "dataset_size", None)
    if isinstance(n, int):
        return n
    ds = getattr(data, "dataset", None)
    if ds is not None and hasattr(ds, "__len__"):
        return len(ds)
    n = getattr(data, "x", None)
    return int(n.shape[0]) if isinstance(n, torch.Tensor) else None


# ----------------------------------------------------------------------------------------------------
# the posterior object
# ----------------------------------------------------------------------------------------------------
class SamplePosterior(DrawSet):
    """An ensemble of posterior draws of a BNN's latent sites, as an SG-MCMC run (or
    ``pyro.infer.MCMC``) leaves them: a :class:`pyrobnn.posterior.DrawSet` (``outputs``, ``predict``,
    ``parameter_draws``, ``run``) with the sampler's statistics, held-out outputs and persistence.

    :ivar bnn: the :class:`pyrobnn.BNN` whose ``model`` the draws belong to.
    :ivar draws: ``{site: Tensor[C, S, *site_shape]}`` (C chains, S draws each), constrained values.
    :ivar stats: ``{name: Tensor[C, S]}`` per-draw sampler statistics (``potential_energy``,
        ``step_size``, ``diverging``).
    :ivar eval_x: held-out inputs ``[B, ...]`` or None; ``eval_outputs`` ``[C, S, B, ...]`` the network's
        outputs on them at each draw (for function-space diagnostics).
    """

    def __init__(self, bnn: BNN, draws: Dict[str, torch.Tensor], stats: Optional[Dict[str, torch.Tensor]] = None,
                 eval_x: Optional[torch.Tensor] = None, eval_outputs: Optional[torch.Tensor] = None,
                 config: Optional[Dict[str, Any]] = None):
        super().__init__(bnn, draws)
        self.stats = dict(stats or {})
        self.eval_x = eval_x
        self.eval_outputs = eval_outputs
        self.config = dict(config or {})

    @torch.no_grad()
    def evaluate(self, x, y, num_samples: Optional[int] = None) -> Dict[str, float]:
        """Metrics of the ensemble predictive on ``(x, y)`` (:func:`pyrobnn.metrics.evaluate_outputs`)."""
        from pyrobnn.metrics import evaluate_outputs, gaussian_nll, rmse
        outs, precision = self._outputs_and_precision(x, num_samples)
        lik = self.bnn.likelihood
        y = lik.check_targets(outs[0], y)
        if precision is None:
            return evaluate_outputs(lik, outs, y)
        lp, _ = per_draw_log_prob(lik, outs, y, precision)
        lpd = (torch.logsumexp(lp, 0) - math.log(lp.shape[0])).mean().item()
        mean, var = self.predict(x, num_samples)
        return {"rmse": rmse(mean, y), "nll": -lpd, "gaussian_nll": gaussian_nll(mean, var, y)}

    # -- persistence -----------------------------------------------------------------------------------
    def save(self, path) -> None:
        """Write draws, statistics, held-out outputs, the BNN's deterministic parameters and its spec to
        one safetensors file (atomic, checksummed; :func:`pyrobnn.state_io.write_state`)."""
        if self.bnn.input_signature is None:
            raise ValueError("the BNN has never run on data; nothing to describe its inputs")
        tensors = {f"draw/{k}": v for k, v in self.draws.items()}
        tensors.update({f"stat/{k}": v for k, v in self.stats.items()})
        if self.eval_x is not None:
            tensors.update(inputs.to_tensors(self.eval_x, "eval_x"))
        if self.eval_outputs is not None:
            tensors["eval_outputs"] = self.eval_outputs
        tensors.update({f"bnn/{k}": v for k, v in _deterministic_state(self.bnn).items()})
        write_state(path, tensors, {"kind": "sample-posterior", "spec": self.bnn.spec(), "config": self.config})

    @classmethod
    def load(cls, path, net: Optional[torch.nn.Module] = None) -> "SamplePosterior":
        """Read a file written by :meth:`save`. ``net``: a fresh instance of the architecture when it was
        not built from :mod:`pyrobnn.models`."""
        tensors, meta = read_state(path)
        if meta.get("kind") != "sample-posterior":
            raise ValueError(f"{path} holds a pyrobnn {meta.get('kind')!r}, not a sample-posterior")
        bnn = bnn_from_spec(meta.get("spec"), tensors, path, net)  # size-checked before allocating
        state = {k[4:]: v for k, v in tensors.items() if k.startswith("bnn/")}
        missing, unexpected = bnn.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("autoguide.")]
        if missing or unexpected:
            raise ValueError(f"{path}: parameters do not fit the architecture (missing {missing}, unexpected {unexpected})")
        draws = {k[5:]: v for k, v in tensors.items() if k.startswith("draw/")}
        stats = {k[5:]: v for k, v in tensors.items() if k.startswith("stat/")}
        eval_x = inputs.from_tensors(tensors, "eval_x", bnn.input_signature)
        return cls(bnn, draws, stats, eval_x, tensors.get("eval_outputs"), meta.get("config"))

    # -- from pyro.infer.MCMC --------------------------------------------------------------------------
    @classmethod
    def from_mcmc(cls, mcmc, bnn: Optional[BNN] = None) -> "SamplePosterior":
        """Wrap a finished ``pyro.infer.MCMC`` run on ``bnn.model`` (any kernel)."""
        bnn = bnn if bnn is not None else getattr(mcmc.kernel.model, "__self__", None)
        if not isinstance(bnn, BNN):
            raise TypeError("from_mcmc needs the BNN whose model was sampled (pass bnn=...)")
        draws = mcmc.get_samples(group_by_chain=True)
        return cls(bnn, draws, mcmc_sample_stats(mcmc), config=getattr(mcmc.kernel, "config", dict)())


def _deterministic_state(bnn: BNN) -> Dict[str, torch.Tensor]:
    return {k: v for k, v in bnn.state_dict().items() if not k.startswith("autoguide.")}


# ----------------------------------------------------------------------------------------------------
# the sampler loop
# ----------------------------------------------------------------------------------------------------
def sample(bnn: BNN, data: Union[Tuple[torch.Tensor, torch.Tensor], Iterable], kernel: Union[str, SGLD] = "sgld", *,
           num_samples: int = 100, warmup_steps: int = 1000, thin: int = 10, num_chains: int = 1,
           step_size=None, batch_size: int = 128, max_draws: Optional[int] = None,
           keep_sites: Optional[Sequence[str]] = None, store_dtype: Optional[torch.dtype] = None,
           eval_x: Optional[torch.Tensor] = None, seed: Optional[int] = None, progress: bool = False,
           warmup: Optional[int] = None, **kernel_kwargs) -> SamplePosterior:
    """Run SGLD/pSGLD on a BNN over a stream of minibatches and keep an ensemble of draws.

    :param bnn: a :class:`pyrobnn.BNN`; ``bnn.dataset_size`` (N) is taken from the data when unset.
    :param data: ``(x, y)`` tensors (shuffled into batches of ``batch_size`` each epoch) or any
        re-iterable of ``(x, y)`` batches (a ``torch.utils.data.DataLoader``, ``pyrobnn.data.ArrayLoader``).
    :param kernel: ``"sgld"``, ``"psgld"`` or a kernel instance built on ``bnn.model``.
    :param num_samples: draws kept per chain (one every ``thin`` updates after ``warmup_steps`` updates).
    :param warmup_steps: updates before the first kept draw (the name ``pyro.infer.MCMC`` uses; the
        older ``warmup=`` still works and warns).
    :param max_draws: cap on draws kept per chain; beyond it the kept set is halved (every second draw)
        and the thinning doubled, so memory stays bounded and the draws stay evenly spaced.
    :param keep_sites: fnmatch patterns of sites to keep (default all; the result cannot predict
        unless all are kept).
    :param store_dtype: dtype of the kept draws (e.g. ``torch.bfloat16`` to halve memory).
    :param eval_x: held-out inputs ``[B, ...]``; the network's outputs on them are recorded at every
        kept draw (``SamplePosterior.eval_outputs`` ``[C, S, B, ...]``) for function-space R-hat/ESS.
    :param kernel_kwargs: passed to the kernel class (``temperature``, ``alpha``, ``init_strategy``...).
    :returns: a :class:`SamplePosterior` with draws ``[num_chains, ≤num_samples, ...]``.

    Cyclical schedules with an exploration stage: draws falling in that stage are not kept.
    """
    if not isinstance(bnn, BNN):
        raise TypeError(f"sample() needs a pyrobnn BNN, got {type(bnn).__name__}")
    if warmup is not None:
        warnings.warn("sample(..., warmup=) is deprecated; use warmup_steps= (as pyro.infer.MCMC)",
                      DeprecationWarning, stacklevel=2)
        warmup_steps = warmup
    for name, v, lo in (("num_samples", num_samples, 1), ("warmup_steps", warmup_steps, 0), ("thin", thin, 1),
                        ("num_chains", num_chains, 1)):
        integer(name, v, minimum=lo)
    if max_draws is not None:
        integer("max_draws", max_draws, minimum=2)
    generator = torch.Generator()
    if seed is not None:
        pyro.set_rng_seed(seed)
        generator.manual_seed(seed)
    else:
        generator.manual_seed(int(torch.randint(0, 2**62, ())))
    x_y = None
    if isinstance(data, (tuple, list)) and len(data) == 2 and inputs.is_inputs(data[0]) \
            and isinstance(data[1], torch.Tensor):
        x_y = (data[0], torch.as_tensor(data[1]))
        batches = ShuffledBatches(inputs.as_inputs(x_y[0]), x_y[1], batch_size, generator)
    elif hasattr(data, "__iter__"):
        batches = data
    else:
        raise TypeError("data must be an (x, y) pair of tensors or an iterable of (x, y) batches")
    n = _dataset_size(data, x_y)
    if bnn.dataset_size is None:
        if n is None:
            raise ValueError("set bnn.dataset_size: the number of training examples cannot be read from this loader")
        bnn.dataset_size = n
    if eval_x is not None:
        eval_x = bnn._check_x(eval_x)
    k = _make_kernel(bnn, kernel, step_size, kernel_kwargs)
    patterns = list(keep_sites) if keep_sites is not None else None

    saved_subsample = bnn.subsample_size
    bnn.subsample_size = None  # the loader supplies the minibatch
    chains: List[Dict[str, list]] = []
    try:
        with pyro.validation_enabled(False), poutine.block():
            stream = _forever(batches)
            for c in range(num_chains):
                chains.append(_run_chain(bnn, k, stream, num_samples, warmup_steps, thin, max_draws, patterns,
                                         store_dtype, eval_x, progress, c))
    finally:
        bnn.subsample_size = saved_subsample
    S = min(len(ch["stats"]["step_size"]) for ch in chains)
    if S == 0:
        raise ValueError("no draw was kept (a cyclical schedule's exploration stage covered every kept step?)")
    draws = {name: torch.stack([torch.stack(ch["draws"][name][:S]) for ch in chains]) for name in chains[0]["draws"]}
    stats = {key: torch.tensor([ch["stats"][key][:S] for ch in chains],
                               dtype=torch.bool if key == "diverging" else torch.float64)
             for key in chains[0]["stats"]}
    eval_outputs = torch.stack([torch.stack(ch["eval"][:S]) for ch in chains]) if eval_x is not None else None
    config = {**k.config(), "num_samples": num_samples, "warmup_steps": warmup_steps, "max_draws": max_draws,
              "num_chains": num_chains, "dataset_size": bnn.dataset_size}
    return SamplePosterior(bnn, draws, stats, eval_x, eval_outputs, config)


def _make_kernel(bnn, kernel, step_size, kernel_kwargs) -> SGLD:
    if isinstance(kernel, SGLD):
        if step_size is not None or kernel_kwargs:
            raise ValueError("pass step_size and kernel options to the kernel instance, not to sample()")
        if getattr(kernel.model, "__self__", None) is not bnn:
            raise ValueError("the kernel must be built on this BNN's model (SGLD(bnn.model, ...))")
        return kernel
    if not isinstance(kernel, str) or kernel.lower() not in _KERNELS:
        raise ValueError(f"kernel must be one of {sorted(_KERNELS)} or an SGLD/PSGLD instance, got {kernel!r}")
    name = kernel.lower()
    return _KERNELS[name](bnn.model, _DEFAULT_STEP[name] if step_size is None else step_size, **kernel_kwargs)


class SGLDStep:
    """One update of an SG-MCMC kernel (set up, with its state in ``params``) on a minibatch."""

    def __init__(self, kernel: SGLD, params: Dict[str, torch.Tensor]):
        self.kernel, self.params = kernel, params

    def __call__(self, x, y):
        self.params = self.kernel.step(self.params, x, y)


class _DrawKeeper:
    """After each update: keep the state every ``thin`` updates after ``warmup_steps`` (outside a cyclical
    schedule's exploration stage), with its sampler statistics and outputs on ``eval_x``; halve the kept
    set and double the thinning beyond ``max_draws``; mark a kept draw diverging when the update after
    it was not finite."""

    def __init__(self, bnn, step: SGLDStep, kept, warmup_steps, thin, max_draws, store_dtype, eval_x):
        self.bnn, self.step, self.kept = bnn, step, kept
        self.inv = {n: t for n, t in step.kernel._sites}
        self.warmup_steps, self.every, self.max_draws = warmup_steps, thin, max_draws
        self.store_dtype, self.eval_x = store_dtype, eval_x
        self.out = {"draws": {n: [] for n in kept},
                    "stats": {"potential_energy": [], "step_size": [], "diverging": []}, "eval": []}
        self.since = 0
        self.recorded_at = -2

    def on_step_end(self, loop, position, logs):
        k, params, out, inv = self.step.kernel, self.step.params, self.out, self.inv
        t = position.global_step
        if not math.isfinite(k._last_potential) and self.recorded_at == t - 1:
            out["stats"]["diverging"][-1] = True   # the draw kept after the last update was that state
        if t < self.warmup_steps:
            return
        self.since += 1
        if self.since < self.every:
            return
        self.since = 0
        if k.schedule.is_exploring(k._t - 1):
            return
        store_dtype = self.store_dtype
        for n in self.kept:
            v = params[n].detach()
            v = v if inv[n] is None else inv[n](v)
            out["draws"][n].append(v.to(store_dtype, copy=True) if store_dtype is not None else v.clone())
        out["stats"]["potential_energy"].append(k._last_potential)
        out["stats"]["step_size"].append(k._last_step_size)
        out["stats"]["diverging"].append(False)
        self.recorded_at = t
        if self.eval_x is not None:
            draw = {n: (params[n] if inv[n] is None else inv[n](params[n])).detach() for n in inv}
            with torch.no_grad():
                out["eval"].append(outputs_under_draws(self.bnn, {n: v[None] for n, v in draw.items()},
                                                       self.eval_x)[0])
        count = len(out["stats"]["step_size"])
        if self.max_draws is not None and count > self.max_draws:
            # keep every second draw counting back from the newest, so that with the doubled
            # thinning the next draw continues the same even spacing
            start = (count - 1) % 2
            for n in self.kept:
                out["draws"][n] = out["draws"][n][start::2]
            for key in out["stats"]:
                out["stats"][key] = out["stats"][key][start::2]
            out["eval"] = out["eval"][start::2]
            self.every *= 2


def _run_chain(bnn, k: SGLD, stream, num_samples, warmup_steps, thin, max_draws, patterns, store_dtype, eval_x,
               progress, chain_id):
    xb, yb = next(stream)
    k.setup(0, xb, yb)
    kept = [n for n, _ in k._sites if patterns is None or any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not kept:
        raise ValueError(f"keep_sites {patterns} match no site of {[n for n, _ in k._sites]}")
    step = SGLDStep(k, k.initial_params)
    keeper = _DrawKeeper(bnn, step, kept, warmup_steps, thin, max_draws, store_dtype, eval_x)
    bar = Progress(desc=lambda e, n: f"chain {chain_id}", dynamic_ncols=False) if progress else None
    try:
        Loop(step, Stream(stream, warmup_steps + num_samples * thin), callbacks=[keeper], progress=bar).run()
    finally:
        k.cleanup()
    return keeper.out
