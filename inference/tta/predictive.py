"""The TTA predictive: every draw's logits on augmented copies of the inputs (per-draw or classic)
and their mean softmax."""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import torch

from pyrobnn.metrics import accuracy, calibrated_nll, nll
from pyrobnn.validation import positive_int

from .augment import Policy, _check_images
from .draws import Draws, as_draws

__all__ = ["member_outputs", "tta_predict", "evaluate_tta"]

_MODES = ("none", "classic", "per-draw")


def _check_mode(mode):
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")


def _augmented_inputs(x, S, A, policy, mode, generator, sub_policy_index=None):
    """Inputs per draw ``[S, A, b, ...]`` (a broadcast view where all draws share them)."""
    if mode == "none":
        return x.unsqueeze(0).unsqueeze(0).expand((S, 1) + tuple(x.shape))
    if mode == "classic":
        xa = policy.augment(x, A, generator, sub_policy_index)
        return xa.unsqueeze(0).expand((S,) + tuple(xa.shape))
    index = (torch.arange(S * A) % A) % len(policy) if sub_policy_index is None else \
        torch.as_tensor(sub_policy_index).repeat(S)
    return policy.augment(x, S * A, generator, index).reshape((S, A) + tuple(x.shape))


@torch.no_grad()
def member_outputs(draws: Draws, x: torch.Tensor, policy: Optional[Policy] = None, num_augmentations: Optional[int] = None,
                   mode: str = "per-draw", generator: Optional[torch.Generator] = None,
                   chunk_size: int = 1000, sub_policy_index: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Logits ``[S, A, B, K]`` of every draw on every augmented copy of ``x [B, C, H, W]``.

    :param mode: ``"none"`` (A = 1, the images as given), ``"classic"`` (the same A augmentations for
        every draw) or ``"per-draw"`` (draw s sees its own A augmentations).
    :param num_augmentations: A; default ``len(policy)`` (each sub-policy once).
    :param sub_policy_index: ``[A]`` sub-policy of each augmentation (default ``a mod len(policy)``).
    :param chunk_size: images per block (S·A·chunk_size images are held at once).
    """
    _check_mode(mode)
    _check_images(x)
    draws = as_draws(draws)
    S = len(draws)
    if mode == "none":
        A = 1
    else:
        if not isinstance(policy, Policy):
            raise ValueError(f"mode {mode!r} needs a Policy")
        A = len(policy) if num_augmentations is None else num_augmentations
        positive_int("num_augmentations", A)
        if sub_policy_index is not None and len(sub_policy_index) != A:
            raise ValueError(f"sub_policy_index has {len(sub_policy_index)} entries for {A} augmentations")
    outs = []
    for i in range(0, x.shape[0], chunk_size):
        xb = x[i:i + chunk_size]
        xs = _augmented_inputs(xb, S, A, policy, mode, generator, sub_policy_index)
        per_draw = []
        for s in range(S):
            o = draws[s](xs[s].reshape((-1,) + tuple(xb.shape[1:])))
            if o.dim() != 2 or o.shape[0] != A * xb.shape[0]:
                raise ValueError(f"draw {s} returned shape {tuple(o.shape)}; expected logits [{A * xb.shape[0]}, K]")
            per_draw.append(o.reshape(A, xb.shape[0], -1))
        outs.append(torch.stack(per_draw))
    return torch.cat(outs, 2)


def _mean_probs(logits: torch.Tensor) -> torch.Tensor:
    """Predictive ``[B, K]`` from logits ``[S, A, B, K]``: the mean of the members' softmaxes, computed
    in log space (log-mean-exp) so confident members do not underflow."""
    lp = torch.log_softmax(logits.double(), -1).flatten(0, 1)
    return (torch.logsumexp(lp, 0) - math.log(lp.shape[0])).exp().to(logits.dtype)


def tta_predict(draws: Draws, x: torch.Tensor, policy: Optional[Policy] = None, num_augmentations: Optional[int] = None,
                mode: str = "per-draw", generator: Optional[torch.Generator] = None, chunk_size: int = 1000) -> torch.Tensor:
    """Predictive class probabilities ``[B, K]``: 1/(S·A) Σ_s Σ_a softmax(f_s(x̂_{s,a})) (see
    :func:`member_outputs` for the modes)."""
    return _mean_probs(member_outputs(draws, x, policy, num_augmentations, mode, generator, chunk_size))


def evaluate_tta(probs: torch.Tensor, y: torch.Tensor, seed: int = 0) -> Dict[str, float]:
    """Accuracy, NLL and calibrated NLL (temperature fitted on one random half, NLL on the other,
    swapped and averaged; ``seed`` fixes the split) of predictive probabilities ``[B, K]``."""
    return {"accuracy": accuracy(probs, y), "nll": nll(probs, y), "calibrated_nll": calibrated_nll(probs, y, seed)}
