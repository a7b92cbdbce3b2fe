"""Complexity control: training over the KL weight λ, and pruning by signal-to-noise.

Generalised ELBO (per λ):   L_λ = E_q log p(D | w) − λ KL(q(w) ‖ p(w)),
estimated on a minibatch of M of N examples as (N/M) Σ_batch E_q log p(y | x, w) − λ KL, with the
closed-form KL (``TraceMeanField_ELBO``). The λ-hypernetwork guide
(:class:`pyrobnn.guides.HyperMeanField`) is trained on E_{λ ~ U(Λ)} [−L_λ], estimated per batch by
averaging −L_λ over ``lams_per_batch`` draws of λ (uniform, or log-uniform, over Λ). An ordinary guide
is trained at one fixed λ by :func:`pyrobnn.inference.fit` with ``kl_warmup=λ`` (a constant KL weight).

How λ is applied: the BNN's ``kl_weight`` already multiplies the log-density of every weight site in
both model and guide (a Messenger around the network), which turns the ELBO's KL term into λ·KL;
:func:`complexity_weight` sets it together with the guide's ``lam``.

Pruning (Grebenkova 2020): the relative density of the posterior at zero, ρ_i = q(0)/q(μ_i) = exp(−μ_i²/(2σ_i²)),
is a monotone function of the signal-to-noise ratio |μ_i|/σ_i; removing a fraction f of the weights
removes the f·D with the highest density at 0 (lowest SNR), globally over all sites (the masks are
:func:`pyrobnn.sparsity.masks`; :func:`prune` turns them into a guide whose removed weights are gone). A removed weight has
μ = 0 and σ ≈ 4e-44, so it contributes nothing to any forward pass.
"""
from __future__ import annotations

import copy
import math
import time
from contextlib import contextmanager
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

import pyro
import torch
from pyro.infer import TraceMeanField_ELBO

from pyrobnn.bnn import BNN
from pyrobnn.guides.base import FlatGaussianGuide
from pyrobnn.guides.hyper import HyperMeanField, mean_field_like
from pyrobnn.guides.mean_field import MeanField
from pyrobnn.validation import non_negative_float, positive_float, positive_int

from .fit import training_batches
from .loop import History, Loop, OnRecord, Progress, descend, make_optimizer
from .schedules import LRFactor, lr_factor_schedule

__all__ = ["complexity_weight", "sample_lams", "complexity_loss", "fit_complexity", "with_guide", "prune",
           "pruning_curve", "removable_fraction"]

#: ρ of a removed weight: softplus(−100) ≈ 4e-44, i.e. σ = 0 in float32 arithmetic, with a finite log σ.
_REMOVED_RHO = -100.0


# -- λ ------------------------------------------------------------------------------------------------
def _hyper_guide(bnn: BNN) -> HyperMeanField:
    if not isinstance(bnn, BNN):
        raise TypeError(f"expected a pyrobnn BNN, got {type(bnn).__name__}")
    if not isinstance(bnn.autoguide, HyperMeanField):
        raise TypeError("this needs a BNN built with guide=HyperMeanField (or 'hyper-mean-field'), "
                        f"got {type(bnn.autoguide).__name__}")
    return bnn.autoguide


@contextmanager
def complexity_weight(bnn: BNN, lam: float):
    """Inside the block ``bnn``'s ELBO is the generalised one at λ: ``bnn.kl_weight = λ`` and, when the
    guide is a :class:`HyperMeanField`, the guide reads G(λ). Both are restored on exit."""
    lam = non_negative_float("λ", float(lam))
    old = bnn.kl_weight
    bnn.kl_weight = lam
    try:
        if isinstance(bnn.autoguide, HyperMeanField):
            with bnn.autoguide.conditioned(lam):
                yield
        else:
            yield
    finally:
        bnn.kl_weight = old


def sample_lams(lam_range: Sequence[float], num: int, distribution: str = "uniform", stratified: bool = False,
                generator: Optional[torch.Generator] = None) -> List[float]:
    """``num`` draws of λ over Λ = (lo, hi): uniform, or log-uniform (needs lo > 0).

    ``stratified=True`` splits Λ (in the sampling scale) into ``num`` equal cells and draws one λ per
    cell — the same marginal U(Λ), lower variance of the per-batch average over λ."""
    positive_int("the number of λ draws", num)
    lo, hi = float(lam_range[0]), float(lam_range[1])
    if not (0 <= lo < hi):
        raise ValueError(f"lam_range must satisfy 0 ≤ lo < hi, got {(lo, hi)}")
    if distribution not in ("uniform", "log-uniform"):
        raise ValueError(f"λ distribution must be 'uniform' or 'log-uniform', got {distribution!r}")
    if distribution == "log-uniform" and lo <= 0:
        raise ValueError("a log-uniform λ needs lam_range with lo > 0")
    u = torch.rand(num, generator=generator, dtype=torch.float64)
    if stratified:
        u = (torch.arange(num, dtype=torch.float64) + u) / num
    if distribution == "uniform":
        lams = lo + (hi - lo) * u
    else:
        lams = torch.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * u)
    return lams.clamp(lo, hi).tolist()


def complexity_loss(bnn: BNN, x, y, lams: Iterable[float], elbo=None) -> torch.Tensor:
    """(1/K) Σ_k −L_{λ_k}(x, y): the negative generalised ELBO averaged over the given λ's (a scalar,
    differentiable in the guide's parameters). One model/guide pass per λ."""
    elbo = elbo or TraceMeanField_ELBO()
    losses = []
    for lam in lams:
        with complexity_weight(bnn, lam):
            losses.append(elbo.differentiable_loss(bnn.model, bnn.guide, x, y))
    if not losses:
        raise ValueError("complexity_loss needs at least one λ")
    return torch.stack(losses).mean()


def fit_complexity(bnn: BNN, train, epochs: int, lr: float = 1e-3, *, lams_per_batch: int = 5,
                   lam_distribution: str = "uniform", stratified: bool = False, batch_size: int = 128,
                   optimizer: Union[str, Callable] = "adam", optimizer_kwargs: Optional[dict] = None,
                   lr_schedule=None, seed: Optional[int] = None, progress: bool = True,
                   callbacks: Sequence[Callable] = (), grad_clip: Optional[float] = None) -> History:
    """Train a BNN whose guide is a :class:`HyperMeanField` on E_{λ ~ Λ}[−L_λ].

    Each step draws ``lams_per_batch`` values of λ over the guide's ``lam_range`` and descends the
    average of their negative generalised ELBOs on the same minibatch (cost: that many model/guide
    passes per step).

    :param train: ``ArrayLoader``, ``(x, y)`` tensors (batched with ``batch_size``) or a DataLoader.
    :param lam_distribution: ``"uniform"`` (Grebenkova 2020's U(Λ)) or ``"log-uniform"``.
    :param stratified: one λ per equal cell of Λ (see :func:`sample_lams`).
    :param lr_schedule: as in :func:`pyrobnn.inference.fit`.
    :param callbacks: ``f(bnn, record)`` after each epoch; return ``True`` to stop.
    :returns: :class:`~pyrobnn.inference.History`, one record per epoch (``loss`` is the mean over
        the epoch's steps of the λ-averaged negative ELBO; ``seconds`` its wall time).
    """
    guide = _hyper_guide(bnn)
    positive_int("epochs", epochs)
    positive_float("lr", lr)
    positive_int("lams_per_batch", lams_per_batch)
    sample_lams(guide.lam_range, 1, lam_distribution)  # validates the distribution against Λ up front
    if seed is not None:
        pyro.set_rng_seed(seed)
    lam_gen = torch.Generator().manual_seed(0 if seed is None else int(seed))
    data, _ = training_batches(bnn, train, batch_size, seed)
    params = [p for p in bnn.parameters() if p.requires_grad]
    opt = make_optimizer(optimizer, params, lr, optimizer_kwargs)
    step = LambdaSweepStep(bnn, opt, params, lams_per_batch, lam_distribution, stratified, lam_gen, grad_clip)

    def summarize(loop):
        total, count = loop.sums.get("loss", 0.0), loop.count
        return {"epoch": loop.position.epoch + 1, "loss": total / max(count, 1),
                "elbo_per_datum": -total / max(count, 1) / bnn.dataset_size,
                "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - loop.epoch_started}

    history = Loop(step, data, epochs=epochs, model=bnn,
                   schedules=[LRFactor(opt, lr, lr_factor_schedule(lr_schedule, epochs))],
                   callbacks=[OnRecord(cb, bnn) for cb in callbacks], summarize=summarize,
                   progress=Progress(dynamic_ncols=False) if progress else None).run()
    bnn.eval()
    return history


class LambdaSweepStep:
    """One step of :func:`fit_complexity`: draw ``lams_per_batch`` values of λ over the guide's Λ,
    descend the mean of their negative generalised ELBOs on the minibatch (the NaN guard first)."""

    def __init__(self, bnn: BNN, optimizer, params, lams_per_batch: int, distribution: str, stratified: bool,
                 generator: torch.Generator, grad_clip: Optional[float] = None):
        self.bnn, self.opt, self.params = bnn, optimizer, params
        self.guide = _hyper_guide(bnn)
        self.lams_per_batch, self.distribution, self.stratified = lams_per_batch, distribution, stratified
        self.generator, self.grad_clip = generator, grad_clip
        self.elbo = TraceMeanField_ELBO()

    def __call__(self, x, y):
        lams = sample_lams(self.guide.lam_range, self.lams_per_batch, self.distribution, self.stratified,
                           self.generator)
        loss = complexity_loss(self.bnn, x, y, lams, self.elbo)
        return descend(loss, self.opt, self.params, self.grad_clip, f"the λ-averaged loss (λ = {lams})")


# -- fixed guides inside a BNN -------------------------------------------------------------------------
def with_guide(bnn: BNN, guide: FlatGaussianGuide) -> BNN:
    """A BNN sharing ``bnn``'s network, priors and likelihood but using ``guide`` (e.g.
    ``hyper.at(λ)`` or a pruned guide) — for ``sample_outputs``, ``predict`` and ``evaluate``.

    A shallow view, not a copy: it holds the same network modules, so training one trains the other's
    deterministic parameters. ``bnn`` itself is unchanged."""
    if not isinstance(bnn, BNN):
        raise TypeError(f"expected a pyrobnn BNN, got {type(bnn).__name__}")
    if guide.prototype_trace is None:
        raise ValueError("the guide is not set up; build it from a set-up guide (e.g. hyper.at(λ))")
    view = copy.copy(bnn)
    view._modules = dict(bnn._modules)   # own module table, so replacing the guide leaves bnn alone
    view._modules["autoguide"] = guide
    return view


# -- pruning by signal-to-noise (masks from pyrobnn.sparsity) -------------------------------------------
@torch.no_grad()
def prune(guide: FlatGaussianGuide, masks: Dict[str, torch.Tensor]) -> MeanField:
    """A :class:`MeanField` equal to ``guide`` except that weights with ``mask == False`` are removed
    (μ = 0, σ ≈ 4e-44: nothing reaches the layer's output). ``guide`` is unchanged."""
    locs, rhos = [], []
    for s in guide.site_names():
        loc, scale = guide.site_params(s)
        rho = scale + torch.log(-torch.expm1(-scale))  # softplus⁻¹, stable for small σ
        m = masks.get(s)
        if m is not None:
            if m.shape != loc.shape:
                raise ValueError(f"mask of {s!r} has shape {tuple(m.shape)}, the site {tuple(loc.shape)}")
            loc = torch.where(m, loc, torch.zeros_like(loc))
            rho = torch.where(m, rho, torch.full_like(rho, _REMOVED_RHO))
        locs.append(loc.reshape(-1))
        rhos.append(rho.reshape(-1))
    return mean_field_like(guide, torch.cat(locs), torch.cat(rhos))


@torch.no_grad()
def pruning_curve(bnn: BNN, guide: FlatGaussianGuide, x, y, fractions: Sequence[float], num_samples: int = 16,
                  sites=None, seed: int = 0) -> List[Dict[str, float]]:
    """Metrics of ``guide`` (in ``bnn``) with each fraction of weights removed by lowest SNR.

    Masks are :func:`pyrobnn.sparsity.masks` with ``fraction=f`` (global over the real-valued layer
    sites, or those matching ``sites``). Two predictions per fraction: the ``num_samples``-draw
    posterior predictive of the pruned guide (:func:`prune`; the RNG is reseeded to ``seed`` for every
    fraction so curves are comparable) and the masked posterior-mean network (keys prefixed ``mean_``).

    :returns: one dict per fraction: ``{"fraction": f, "removed": n, "total": D, accuracy, nll, ...,
        mean_accuracy, mean_nll, ...}`` (classification keys; regression gives rmse, nll, ...).
    """
    from pyrobnn import sparsity
    from pyrobnn.metrics import evaluate_outputs

    view = with_guide(bnn, guide)
    rows = []
    for f in fractions:
        masks = sparsity.masks(view, criterion="snr", fraction=float(f), sites=sites)
        pruned_view = with_guide(bnn, prune(guide, masks))
        pyro.set_rng_seed(seed)
        metrics = pruned_view.evaluate(x, y, num_samples)
        out = sparsity.masked_mean_forward(view, x, masks)
        y_t = bnn.likelihood.check_targets(out, y)
        mean_metrics = evaluate_outputs(bnn.likelihood, out.unsqueeze(0), y_t)
        rows.append({"fraction": float(f), "removed": int(sum((~m).sum().item() for m in masks.values())),
                     "total": int(sum(m.numel() for m in masks.values())), **metrics,
                     **{f"mean_{k}": v for k, v in mean_metrics.items()}})
    return rows


def removable_fraction(curve: Sequence[Dict[str, float]], tolerance: float = 0.01, metric: str = "accuracy") -> float:
    """The largest fraction f in ``curve`` (from :func:`pruning_curve`, which must include fraction 0)
    such that at every fraction ≤ f the ``metric`` is at most ``tolerance`` below the unpruned one."""
    rows = sorted(curve, key=lambda r: r["fraction"])
    if not rows or rows[0]["fraction"] != 0.0:
        raise ValueError("the pruning curve must include fraction 0 (the unpruned model)")
    base, best = rows[0][metric], 0.0
    for r in rows:
        if r[metric] < base - tolerance:
            break
        best = r["fraction"]
    return best
