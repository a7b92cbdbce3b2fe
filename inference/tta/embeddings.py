"""Mean embeddings (MeTTA): a layer's activations averaged over augmentations of the input, read with
a forward hook, and a linear probe on them."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as TF

from pyrobnn.validation import non_negative_int

from .augment import Policy
from .draws import Draws, as_draws
from .predictive import _augmented_inputs, evaluate_tta

__all__ = ["embeddings", "linear_probe"]

@contextmanager
def _capture(module: nn.Module, capture: str, store: List[torch.Tensor]):
    if capture == "output":
        h = module.register_forward_hook(lambda m, inp, out: store.append(out.detach().flatten(1)))
    else:
        h = module.register_forward_pre_hook(lambda m, inp: store.append(inp[0].detach().flatten(1)))
    try:
        yield
    finally:
        h.remove()


@torch.no_grad()
def embeddings(draws: Draws, layer: str, x: torch.Tensor, policy: Optional[Policy] = None,
               num_augmentations: int = 0, capture: str = "output", generator: Optional[torch.Generator] = None,
               chunk_size: int = 1000, reduce_draws: bool = True) -> torch.Tensor:
    """Activations of the module ``layer`` (a dotted path in ``draws.roots[s]``), averaged over
    ``num_augmentations`` per-draw augmentations of ``x [B, C, H, W]`` (MeTTA), or of ``x`` itself when
    ``num_augmentations == 0`` (central embeddings). ``capture`` reads the module's ``"output"`` or its
    ``"input"``. Returns ``[B, D]`` averaged over draws too (``reduce_draws``), else ``[S, B, D]``.
    Averaging over draws only makes sense when their features are aligned (draws of one mean-field
    posterior); for an ensemble of independently trained nets pass ``reduce_draws=False`` or one member."""
    draws = as_draws(draws)
    if capture not in ("output", "input"):
        raise ValueError(f"capture must be 'output' or 'input', got {capture!r}")
    if draws.roots is None:
        raise ValueError("these Draws have no roots (modules) to hook; build them with roots=")
    non_negative_int("num_augmentations", num_augmentations)
    if num_augmentations and not isinstance(policy, Policy):
        raise ValueError("augmented embeddings need a Policy")
    modules = []
    for s, root in enumerate(draws.roots):
        try:
            modules.append(root.get_submodule(layer))
        except AttributeError:
            names = [n for n, _ in root.named_modules() if n]
            raise ValueError(f"draw {s} has no module {layer!r}; modules: {names}") from None
    mode = "per-draw" if num_augmentations else "none"
    S, out = len(draws), []
    for i in range(0, x.shape[0], chunk_size):
        xb = x[i:i + chunk_size]
        A = max(1, num_augmentations)
        xs = _augmented_inputs(xb, S, A, policy, mode, generator)
        feats = []
        for s in range(S):
            store: List[torch.Tensor] = []
            with _capture(modules[s], capture, store):
                draws[s](xs[s].reshape((-1,) + tuple(xb.shape[1:])))
            if len(store) != 1:
                raise ValueError(f"module {layer!r} ran {len(store)} times in one forward; expected once")
            feats.append(store[0].reshape(A, xb.shape[0], -1).mean(0))
        out.append(torch.stack(feats))
    e = torch.cat(out, 1)
    return e.mean(0) if reduce_draws else e


def linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, l2: float = 1e-3, max_iter: int = 200, split_seed: int = 0) -> Dict:
    """Multinomial logistic regression on standardised features (L-BFGS, L2 penalty ``l2``·‖W‖²/2 per
    example), trained on ``train_*``; returns test ``accuracy``, ``nll``, ``calibrated_nll`` and ``probs``."""
    for f, what in ((train_features, "train_features"), (test_features, "test_features")):
        if f.dim() != 2:
            raise ValueError(f"{what} must be [N, D], got {tuple(f.shape)}")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError("train and test features have different widths")
    y = torch.as_tensor(train_labels).long()
    yt = torch.as_tensor(test_labels).long()
    if y.shape != train_features.shape[:1] or yt.shape != test_features.shape[:1]:
        raise ValueError("labels must have one entry per feature row")
    mu, sd = train_features.mean(0), train_features.std(0).clamp_min(1e-6)
    xtr = ((train_features - mu) / sd).double()
    xte = ((test_features - mu) / sd).double()
    K = int(max(y.max(), yt.max())) + 1
    W = torch.zeros(xtr.shape[1], K, dtype=torch.double, requires_grad=True)
    b = torch.zeros(K, dtype=torch.double, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = TF.cross_entropy(xtr @ W + b, y) + 0.5 * l2 * (W * W).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        probs = torch.softmax(xte @ W + b, -1).float()
    return {**evaluate_tta(probs, yt, split_seed), "probs": probs}
