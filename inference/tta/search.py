"""Greedy policy search (Ashukha et al. 2020): a pool of random sub-policies, and the greedy choice
of those that most improve the calibrated log-likelihood on a validation split."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch

from pyrobnn.metrics import calibrated_nll
from pyrobnn.validation import positive_int

from .augment import OPS, Policy, SubPolicy, Transform, _check_unit
from .draws import Draws, as_draws
from .predictive import tta_predict

__all__ = ["sample_pool", "SearchResult", "greedy_policy_search"]

def sample_pool(size: int, generator: Optional[torch.Generator] = None, ops: Optional[Sequence[str]] = None,
                min_transforms: int = 2, max_transforms: int = 3, probability_range=(0.5, 1.0),
                include_identity: bool = True) -> List[SubPolicy]:
    """A pool of ``size`` random sub-policies, each of ``min_transforms``–``max_transforms`` distinct
    transforms with magnitude ~ U(0, 1) and probability ~ U(``probability_range``), rounded to 2 decimals
    (short, exact JSON). With ``include_identity`` the first entry is the identity sub-policy."""
    ops = list(OPS) if ops is None else list(ops)
    for o in ops:
        if o not in OPS:
            raise ValueError(f"unknown transform {o!r}; known: {', '.join(OPS)}")
    positive_int("size", size)
    if not 1 <= min_transforms <= max_transforms <= len(ops):
        raise ValueError(f"need 1 <= min_transforms <= max_transforms <= {len(ops)}")
    lo, hi = probability_range
    _check_unit(lo, "probability_range[0]"), _check_unit(hi, "probability_range[1]")
    pool = [SubPolicy()] if include_identity else []
    while len(pool) < size:
        k = int(torch.randint(min_transforms, max_transforms + 1, (1,), generator=generator))
        names = [ops[i] for i in torch.randperm(len(ops), generator=generator)[:k].tolist()]
        mags = torch.rand(k, generator=generator).tolist()
        probs = (lo + (hi - lo) * torch.rand(k, generator=generator)).tolist()
        pool.append(SubPolicy(tuple(Transform(n, round(m, 2), round(p, 2)) for n, m, p in zip(names, mags, probs))))
    return pool


@dataclass
class SearchResult:
    """Outcome of :func:`greedy_policy_search`.

    :ivar policy: the chosen sub-policies in the order added (repeats allowed).
    :ivar chosen: their indices in ``pool``.
    :ivar objective: validation calibrated log-likelihood (= −calibrated NLL) after each addition.
    :ivar candidates: per step, the objective each pool entry would have given ``[steps, P]``.
    :ivar pool_objective: each pool entry alone ``[P]``.
    :ivar stopped: why the search ended.
    """
    policy: Policy
    chosen: List[int]
    objective: List[float]
    candidates: List[List[float]]
    pool: List[SubPolicy]
    pool_objective: List[float] = field(default_factory=list)
    stopped: str = ""


def greedy_policy_search(draws: Draws, x_val: torch.Tensor, y_val: torch.Tensor, pool: Sequence[SubPolicy],
                         max_policy_size: int = 5, samples_per_sub_policy: int = 1, mode: str = "per-draw",
                         generator: Optional[torch.Generator] = None, split_seed: int = 0,
                         chunk_size: int = 1000, tolerance: float = 0.0) -> SearchResult:
    """Greedy policy search (Ashukha et al. 2020) maximising the calibrated log-likelihood on validation.

    Each pool entry's predictive on ``x_val`` is computed once (``samples_per_sub_policy`` augmentations
    per draw, per-draw or classic); a policy's predictive is the mean of its entries' predictives. From
    the empty policy, add (with replacement) the entry that gives the highest objective; stop at
    ``max_policy_size`` entries or when the best candidate would not raise the objective by more than
    ``tolerance`` — a sub-policy that lowers the objective is never added. The calibration split is
    fixed by ``split_seed`` so every candidate is scored on the same halves.
    """
    draws = as_draws(draws)
    pool = list(pool)
    if not pool or not all(isinstance(p, SubPolicy) for p in pool):
        raise ValueError("pool must be a non-empty list of SubPolicy")
    positive_int("max_policy_size", max_policy_size)
    if mode not in ("classic", "per-draw"):
        raise ValueError(f"mode must be 'classic' or 'per-draw', got {mode!r}")
    y_val = torch.as_tensor(y_val).long()
    if y_val.shape != x_val.shape[:1]:
        raise ValueError(f"y_val must have shape [{x_val.shape[0]}], got {tuple(y_val.shape)}")
    pool_probs = torch.stack([
        tta_predict(draws, x_val, Policy([sub]), samples_per_sub_policy, mode, generator, chunk_size)
        for sub in pool]).double()  # [P, B, K]

    def objective(probs):
        return -calibrated_nll(probs.float(), y_val, split_seed)

    pool_obj = [objective(p) for p in pool_probs]
    chosen: List[int] = []
    history: List[float] = []
    candidates: List[List[float]] = []
    total = torch.zeros_like(pool_probs[0])
    stopped = f"reached max_policy_size={max_policy_size}"
    for step in range(max_policy_size):
        scores = [objective((total + pool_probs[j]) / (step + 1)) for j in range(len(pool))]
        candidates.append(scores)
        best = max(range(len(pool)), key=lambda j: scores[j])
        if history and not scores[best] > history[-1] + tolerance:
            stopped = f"no candidate improves the objective (best {scores[best]:.5f} vs {history[-1]:.5f})"
            break
        chosen.append(best)
        history.append(scores[best])
        total = total + pool_probs[best]
    return SearchResult(Policy([pool[j] for j in chosen]), chosen, history, candidates, pool, pool_obj, stopped)
