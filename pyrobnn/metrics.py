"""Predictive metrics: accuracy, NLL, ECE, Brier, RMSE, Gaussian NLL, calibrated NLL, and the
entropy split into aleatoric and epistemic parts.

Conventions: ``probs`` are predictive class probabilities ``[B, C]``; ``y`` integer labels ``[B]``.
All functions return Python floats (or tensors where noted) and validate their inputs.
"""
from __future__ import annotations

import math
from typing import Dict

import torch

__all__ = ["accuracy", "nll", "ece", "brier", "rmse", "gaussian_nll", "entropy_decomposition",
           "reliability", "fit_temperature", "calibrated_nll", "roc_auc", "evaluate_outputs"]

_EPS = 1e-12


def _check_probs(probs, y):
    if probs.dim() != 2:
        raise ValueError(f"probs must have shape [B, C], got {tuple(probs.shape)}")
    if y.shape != probs.shape[:1]:
        raise ValueError(f"labels must have shape [{probs.shape[0]}], got {tuple(y.shape)}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= probs.shape[1]):
        raise ValueError(f"labels must lie in [0, {probs.shape[1] - 1}]")


def accuracy(probs: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of rows of ``probs [N, C]`` whose arg-max equals ``y [N]``."""
    _check_probs(probs, y)
    return (probs.argmax(-1) == y).float().mean().item()


def nll(probs: torch.Tensor, y: torch.Tensor) -> float:
    """Mean negative log predictive probability of the true class."""
    _check_probs(probs, y)
    return -probs.gather(1, y[:, None]).clamp_min(_EPS).log().mean().item()


def reliability(probs: torch.Tensor, y: torch.Tensor, num_bins: int = 15):
    """Per-bin (confidence, accuracy, count) of the top-label prediction, equal-width bins on [0, 1]."""
    _check_probs(probs, y)
    conf, pred = probs.max(-1)
    correct = (pred == y).float()
    bins = torch.clamp((conf * num_bins).long(), max=num_bins - 1)
    count = torch.bincount(bins, minlength=num_bins).float()
    conf_sum = torch.bincount(bins, weights=conf, minlength=num_bins)
    acc_sum = torch.bincount(bins, weights=correct, minlength=num_bins)
    safe = count.clamp_min(1)
    return conf_sum / safe, acc_sum / safe, count


def ece(probs: torch.Tensor, y: torch.Tensor, num_bins: int = 15) -> float:
    """Expected calibration error: Σ_b (n_b/n) |acc_b − conf_b| over equal-width confidence bins."""
    conf, acc, count = reliability(probs, y, num_bins)
    return ((count / count.sum()) * (acc - conf).abs()).sum().item()


def brier(probs: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over examples of Σ_c (p_c − 1[y = c])²."""
    _check_probs(probs, y)
    onehot = torch.nn.functional.one_hot(y, probs.shape[1]).to(probs.dtype)
    return ((probs - onehot) ** 2).sum(-1).mean().item()


def rmse(mean: torch.Tensor, y: torch.Tensor) -> float:
    """Root mean squared error between predictions ``mean`` and targets ``y`` of the same shape."""
    if mean.shape != y.shape:
        raise ValueError(f"mean {tuple(mean.shape)} and y {tuple(y.shape)} must have the same shape")
    return (mean - y).pow(2).mean().sqrt().item()


def gaussian_nll(mean: torch.Tensor, var: torch.Tensor, y: torch.Tensor) -> float:
    """Mean negative log-density of y under N(mean, var) (a moment-matched predictive)."""
    if not (mean.shape == var.shape == y.shape):
        raise ValueError("mean, var and y must have the same shape")
    if (var <= 0).any():
        raise ValueError("var must be positive")
    return (0.5 * (torch.log(2 * math.pi * var) + (y - mean) ** 2 / var)).mean().item()


def entropy_decomposition(member_probs: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Split predictive entropy for S members' probabilities ``[S, B, C]``:
    total = H[E_s p_s], aleatoric = E_s H[p_s], epistemic = total − aleatoric (mutual information)."""
    if member_probs.dim() != 3:
        raise ValueError(f"member_probs must have shape [S, B, C], got {tuple(member_probs.shape)}")
    mean = member_probs.mean(0)
    total = -(mean * mean.clamp_min(_EPS).log()).sum(-1)
    aleatoric = -(member_probs * member_probs.clamp_min(_EPS).log()).sum(-1).mean(0)
    return {"total": total, "aleatoric": aleatoric, "epistemic": (total - aleatoric).clamp_min(0)}


def fit_temperature(log_probs: torch.Tensor, y: torch.Tensor, bounds=(0.05, 20.0), iters: int = 60) -> float:
    """Temperature T minimising NLL of softmax(log_probs / T), by golden-section search on log T."""
    a, b = math.log(bounds[0]), math.log(bounds[1])
    g = (math.sqrt(5) - 1) / 2

    def f(logt):
        return torch.nn.functional.cross_entropy(log_probs / math.exp(logt), y).item()

    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return math.exp((a + b) / 2)


def calibrated_nll(probs: torch.Tensor, y: torch.Tensor, seed: int = 0) -> float:
    """Calibrated log-likelihood (Ashukha et al. 2020) as an NLL: split the set in two random halves,
    fit a temperature on one, evaluate NLL on the other, swap, and average."""
    _check_probs(probs, y)
    n = y.shape[0]
    if n < 2:
        raise ValueError("calibrated_nll needs at least 2 examples")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    halves = (perm[: n // 2], perm[n // 2:])
    logp = probs.clamp_min(_EPS).log()
    total = 0.0
    for fit_idx, ev_idx in (halves, halves[::-1]):
        t = fit_temperature(logp[fit_idx], y[fit_idx])
        total += torch.nn.functional.cross_entropy(logp[ev_idx] / t, y[ev_idx]).item()
    return total / 2


def roc_auc(scores: torch.Tensor, y: torch.Tensor) -> float:
    """Area under the ROC curve for binary labels (ties counted as 1/2), via the rank statistic."""
    y = y.reshape(-1).long()
    s = scores.reshape(-1).double()
    pos, neg = int((y == 1).sum()), int((y == 0).sum())
    if pos == 0 or neg == 0:
        raise ValueError("roc_auc needs both classes present")
    order = torch.argsort(s)
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(1, len(s) + 1, dtype=torch.double)
    # average ranks over ties
    uniq, inv = torch.unique(s, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=torch.double).index_add_(0, inv, ranks)
    cnts = torch.zeros(len(uniq), dtype=torch.double).index_add_(0, inv, torch.ones_like(ranks))
    ranks = (sums / cnts)[inv]
    return ((ranks[y == 1].sum() - pos * (pos + 1) / 2) / (pos * neg)).item()


def evaluate_outputs(likelihood, outs: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
    """Metrics of the predictive formed by S network outputs ``outs`` ``[S, B, ...]``."""
    from .likelihoods import Bernoulli, Categorical
    lpd = likelihood.predictive_log_prob(outs, y).mean().item()
    if isinstance(likelihood, Categorical):
        probs = likelihood.aggregate(outs)
        return {"accuracy": accuracy(probs, y), "nll": -lpd, "ece": ece(probs, y), "brier": brier(probs, y)}
    if isinstance(likelihood, Bernoulli):
        p1 = likelihood.aggregate(outs)
        probs = torch.stack([1 - p1, p1], -1)
        yl = y.long()
        return {"accuracy": accuracy(probs, yl), "nll": -lpd, "ece": ece(probs, yl), "brier": brier(probs, yl),
                "roc_auc": roc_auc(p1, yl) if 0 < int(yl.sum()) < len(yl) else float("nan")}
    mean, var = likelihood.aggregate(outs)
    return {"rmse": rmse(mean, y), "nll": -lpd, "gaussian_nll": gaussian_nll(mean, var, y)}
