"""Pruning a Gaussian-posterior BNN: masks, a sparsity/compression report and a plain-torch export.

One criterion, three parameterisations. For a weight with posterior N(μ, σ²):

* ``"log-alpha"`` (sparse VD, the default for :class:`pyrobnn.guides.AdditiveNoise`): keep when
  log α = log σ² − log μ² < ``threshold`` (default 3);
* ``"snr"`` (the default for other Gaussian guides, e.g. :class:`pyrobnn.guides.MeanField`): keep when
  the signal-to-noise ratio |μ|/σ ≥ ``threshold`` (default e^{−3/2} ≈ 0.223);
* ``"density"`` (Grebenkova 2020): keep when the relative density at zero ρ = q(0)/q(μ) = exp(−μ²/2σ²) ≤
  ``threshold`` (default exp(−e^{−3}/2) ≈ 0.9754).

log α = −2 log SNR and ρ = exp(−SNR²/2), so the three defaults keep exactly the same weights (up to
log α's clip range, which contains 3). ``fraction=f`` instead prunes the fraction f of weights with the
lowest SNR (ties broken by position), for accuracy-versus-sparsity sweeps.
:func:`threshold_for_compression` gives the threshold that reaches a compression budget instead.

Masks cover every real-valued weight/bias site of the guide; ``True`` means kept. The *masked
posterior-mean network* sets each site to μ ⊙ mask (other latent sites, e.g. a likelihood's noise, to
their posterior median) and runs the BNN's own network; :func:`export` returns a plain
``torch.nn.Module`` computing the same function.
"""
from __future__ import annotations

import copy
import fnmatch
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .bnn import BNN, bayesian
from .guides.additive_noise import AdditiveNoise
from .guides.base import FlatGaussianGuide
from .layers import BayesianConv, BayesianLinear, BayesianModule, BayesianParams
from .validation import probability, real

__all__ = ["sparse_vd_from_pretrained", "log_alpha", "snr", "masks", "threshold_for_compression", "masked_means",
           "masked_mean_forward", "report", "SparsityReport", "export", "SparseLinear", "ShrunkLinear", "ShrunkConv",
           "DEFAULT_THRESHOLDS"]

DEFAULT_THRESHOLDS = {"log-alpha": 3.0, "snr": math.exp(-1.5), "density": math.exp(-math.exp(-3.0) / 2)}
_EPS = 1e-16


def sparse_vd_from_pretrained(net: nn.Module, *, dataset_size: Optional[int] = None, likelihood="categorical",
                              prior="log-uniform", init_log_sigma2: float = -10.0, log_alpha_clip=(None, 8.0),
                              **bayesian_kwargs) -> BNN:
    """Sparse VD started from a trained deterministic ``net``: a :class:`pyrobnn.BNN` with the
    :class:`~pyrobnn.guides.AdditiveNoise` guide whose θ are ``net``'s weights and biases and whose
    log σ² are ``init_log_sigma2``.

    Same as ``pyrobnn.bayesian(net, prior="log-uniform", guide={"name": "additive-noise", ...})``;
    ``bayesian_kwargs`` (``layers``, ``params``, ``local_reparameterization``, ...) pass through.
    """
    guide = {"name": "additive-noise", "init_log_sigma2": init_log_sigma2,
             "log_alpha_clip": None if log_alpha_clip is None else list(log_alpha_clip)}
    return bayesian(net, prior=prior, guide=guide, likelihood=likelihood, dataset_size=dataset_size,
                    **bayesian_kwargs)


def _guide(bnn) -> FlatGaussianGuide:
    guide = getattr(bnn, "autoguide", None)
    if not isinstance(guide, FlatGaussianGuide):
        raise TypeError("sparsity needs a BNN with a pyrobnn Gaussian guide (AdditiveNoise, MeanField, ...); "
                        f"got guide {type(guide).__name__}")
    if guide.prototype_trace is None:
        raise RuntimeError("the BNN's guide has no parameters yet; train it or call bnn.initialize(x) first")
    return guide


def _prunable_sites(bnn, sites=None) -> List[str]:
    """Real-valued sites of the BNN's layers that the guide covers, in layer order."""
    guide = _guide(bnn)
    layout = guide._layout
    names = [s for s in bnn.site_priors if s in layout and layout[s].transform is None]
    if sites is not None:
        pats = [sites] if isinstance(sites, str) else list(sites)
        names = [s for s in names if any(fnmatch.fnmatchcase(s, p) for p in pats)]
    return names


@torch.no_grad()
def log_alpha(bnn, site: str) -> torch.Tensor:
    """log α = log σ² − log μ² of ``site`` (its shape, detached). For an :class:`AdditiveNoise` guide
    this is the guide's own (clipped) log α; otherwise it is computed from (μ, σ), unclipped."""
    guide = _guide(bnn)
    if isinstance(guide, AdditiveNoise):
        return guide.log_alpha(site)
    loc, scale = guide.site_params(site)
    return 2 * scale.log() - (loc * loc + _EPS).log()


@torch.no_grad()
def snr(bnn, site: str) -> torch.Tensor:
    """Signal-to-noise ratio |μ|/σ of ``site`` (its shape, detached)."""
    loc, scale = _guide(bnn).site_params(site)
    return loc.abs() / scale


@torch.no_grad()
def masks(bnn, threshold: Optional[float] = None, criterion: str = "auto", fraction: Optional[float] = None,
          sites: Union[None, str, Sequence[str]] = None) -> Dict[str, torch.Tensor]:
    """Boolean keep-masks ``{site: Tensor[bool] of the site's shape}`` (``True`` = kept).

    :param threshold: the criterion's threshold (module docstring; default :data:`DEFAULT_THRESHOLDS`).
    :param criterion: ``"auto"`` (log-alpha for AdditiveNoise, snr otherwise), ``"log-alpha"``,
        ``"snr"`` or ``"density"``.
    :param fraction: instead of a threshold, prune exactly ``round(fraction · n)`` of the n selected
        weights, those of lowest SNR (global across sites).
    :param sites: fnmatch pattern(s) of sites to mask (default all real-valued layer sites).
    """
    guide = _guide(bnn)
    if criterion == "auto":
        criterion = "log-alpha" if isinstance(guide, AdditiveNoise) else "snr"
    if criterion not in DEFAULT_THRESHOLDS:
        raise ValueError(f"criterion must be 'auto', 'log-alpha', 'snr' or 'density', got {criterion!r}")
    names = _prunable_sites(bnn, sites)
    if not names:
        raise ValueError(f"no real-valued layer site matches sites={sites!r}")
    if fraction is not None:
        if threshold is not None:
            raise ValueError("give either threshold or fraction, not both")
        probability("fraction", fraction)
        ratios = [snr(bnn, s) for s in names]
        flat = torch.cat([r.reshape(-1) for r in ratios])
        k = int(round(fraction * flat.numel()))
        keep = torch.ones(flat.numel(), dtype=torch.bool)
        keep[torch.sort(flat, stable=True).indices[:k]] = False
        out, offset = {}, 0
        for s, r in zip(names, ratios):
            out[s] = keep[offset:offset + r.numel()].view(r.shape)
            offset += r.numel()
        return out
    if threshold is None:
        threshold = DEFAULT_THRESHOLDS[criterion]
    real("threshold", threshold, finite=False)
    out = {}
    for s in names:
        if criterion == "log-alpha":
            out[s] = log_alpha(bnn, s) < threshold
        elif criterion == "snr":
            out[s] = snr(bnn, s) >= threshold
        else:
            r = snr(bnn, s)
            out[s] = torch.exp(-0.5 * r * r) <= threshold
    return out


@torch.no_grad()
def masked_means(bnn, mask: Optional[Dict[str, torch.Tensor]] = None, **mask_kwargs) -> Dict[str, torch.Tensor]:
    """Every latent site's posterior mean/median (constrained), with μ ⊙ mask at the masked sites."""
    guide = _guide(bnn)
    mask = masks(bnn, **mask_kwargs) if mask is None else mask
    values = guide.median()
    for s, m in mask.items():
        if s not in values:
            raise KeyError(f"mask for unknown site {s!r}")
        if m.shape != values[s].shape:
            raise ValueError(f"mask for {s!r} has shape {tuple(m.shape)}, the site {tuple(values[s].shape)}")
        values[s] = values[s] * m.to(values[s].dtype)
    return values


@torch.no_grad()
def masked_mean_forward(bnn, x, mask: Optional[Dict[str, torch.Tensor]] = None, **mask_kwargs) -> torch.Tensor:
    """Output of the masked posterior-mean network on ``x`` (``[B, ...]`` → network output ``[B, ...]``),
    run through the BNN's own layers with every site conditioned to its masked mean."""
    return bnn.run(masked_means(bnn, mask, **mask_kwargs), x)


# -- report ------------------------------------------------------------------------------------------------
@dataclass
class SparsityReport:
    """Per-layer rows and totals. ``compression`` = |W| / |W ≠ 0| over the weights of Linear/Conv
    layers (biases and other sites excluded, as in Molchanov et al.); ``params`` counts every layer
    site. FLOPs per example = 2 × multiply-accumulates of the weights (each weight once per output
    position; a sparse kernel's count) + one add per output element with a bias; activations and
    pooling are not counted. FLOPs are None when ``bnn.input_shape`` is unknown (run the BNN once)."""

    layers: List[Dict] = field(default_factory=list)
    total: Dict = field(default_factory=dict)

    def __getitem__(self, key):
        return self.total[key]

    def to_dict(self):
        return {"layers": self.layers, "total": self.total}

    def table(self) -> str:
        """A Markdown table: one row per layer and a total row."""
        lines = ["| layer | weights | kept | sparsity | params kept | FLOPs kept |", "|---|---:|---:|---:|---:|---:|"]

        def flops(r):
            return "n/a" if r.get("flops") is None else f"{r['flops_kept']:,} / {r['flops']:,}"

        for r in self.layers:
            lines.append(f"| {r['layer']} | {r['weights']:,} | {r['weights_kept']:,} | {100 * r['sparsity']:.2f} % | "
                         f"{r['params_kept']:,} / {r['params']:,} | {flops(r)} |")
        t = self.total
        lines.append(f"| total (×{t['compression']:.1f}) | {t['weights']:,} | {t['weights_kept']:,} | "
                     f"{100 * t['sparsity']:.2f} % | {t['params_kept']:,} / {t['params']:,} | {flops(t)} |")
        return "\n".join(lines)

    def __str__(self):
        return self.table()


def _layers(bnn):
    return [(name, m) for name, m in bnn.net.named_modules() if isinstance(m, BayesianModule)]


@torch.no_grad()
def _output_positions(bnn, values):
    """Per Bayesian Linear/Conv layer: output elements per example divided by output channels/features."""
    if bnn.input_signature is None:
        return None
    positions, hooks = {}, []
    for name, m in _layers(bnn):
        if isinstance(m, (BayesianLinear, BayesianConv)):
            channels = m.site_shapes["weight"][0]
            dim = -1 if isinstance(m, BayesianLinear) else 1

            def hook(mod, inp, out, name=name, channels=channels, dim=dim):
                positions[name] = out[0].numel() // channels if out.shape[dim] == channels else None
            hooks.append(m.register_forward_hook(hook))
    try:
        bnn.run(values, bnn.input_signature.example(1))
    finally:
        for h in hooks:
            h.remove()
    return positions


@torch.no_grad()
def threshold_for_compression(bnn, compression: float, criterion: str = "auto") -> float:
    """The ``criterion`` threshold at which :func:`masks` keeps as many Linear/Conv weights as a
    compression |W| / |W ≠ 0| of at least ``compression`` allows: the ⌊|W| / compression⌋ weights most
    clearly signal (lowest log α, highest SNR), ties resolved towards pruning, so the reached compression
    is ≥ the budget (it can be larger only where weights tie at the boundary, e.g. at log α's clip).
    Biases follow the same threshold (they do not count in the compression).

    :param compression: the budget, a number ≥ 1.
    :param criterion: ``"auto"``, ``"log-alpha"`` or ``"snr"`` (as in :func:`masks`).
    """
    real("compression", compression, minimum=1)
    guide = _guide(bnn)
    if criterion == "auto":
        criterion = "log-alpha" if isinstance(guide, AdditiveNoise) else "snr"
    if criterion not in ("log-alpha", "snr"):
        raise ValueError(f"criterion must be 'auto', 'log-alpha' or 'snr', got {criterion!r}")
    prunable = set(_prunable_sites(bnn))
    weights = [m.site_name("weight") for _, m in _layers(bnn)
               if isinstance(m, (BayesianLinear, BayesianConv)) and m.site_name("weight") in prunable]
    if not weights:
        raise ValueError("the BNN has no Bayesian Linear/Conv weight site to prune")
    # as "larger is pruned first" scores: log α, or −SNR (masks keeps log α < t, SNR ≥ t)
    score = torch.cat([(log_alpha(bnn, w) if criterion == "log-alpha" else -snr(bnn, w)).reshape(-1)
                       for w in weights])
    n = score.numel()
    keep = int(math.floor(n / compression))
    if keep >= n:
        return math.inf if criterion == "log-alpha" else 0.0
    boundary = torch.sort(score).values[keep]   # the first weight to prune; everything scored as high goes too
    if criterion == "log-alpha":
        return float(boundary)                   # kept: log α < boundary
    # kept: SNR ≥ the next representable value above −boundary (in the scores' dtype), i.e. SNR > −boundary
    return float(torch.nextafter(-boundary, torch.tensor(math.inf, dtype=boundary.dtype)))


@torch.no_grad()
def report(bnn, mask: Optional[Dict[str, torch.Tensor]] = None, **mask_kwargs) -> SparsityReport:
    """Per-layer and total sparsity, compression |W|/|W≠0|, parameters and FLOPs kept.

    ``mask`` defaults to :func:`masks` ``(bnn, **mask_kwargs)``; a site without a mask counts as dense.
    """
    mask = masks(bnn, **mask_kwargs) if mask is None else mask
    values = masked_means(bnn, mask)
    positions = _output_positions(bnn, values)
    rows = []
    for name, m in _layers(bnn):
        row = {"layer": name, "type": type(m).__name__, "weights": 0, "weights_kept": 0, "params": 0,
               "params_kept": 0}
        flops = flops_kept = 0
        pos = None if positions is None else positions.get(name)
        for pname, shape in m.site_shapes.items():
            site = m.site_name(pname)
            n = math.prod(shape)
            kept = int(mask[site].sum()) if site in mask else n
            row["params"] += n
            row["params_kept"] += kept
            is_weight = pname == "weight" and isinstance(m, (BayesianLinear, BayesianConv))
            if is_weight:
                row["weights"] += n
                row["weights_kept"] += kept
            if pos is not None:
                if is_weight:
                    flops += 2 * n * pos
                    flops_kept += 2 * kept * pos
                elif pname == "bias":
                    flops += n * pos
                    flops_kept += kept * pos
        row["sparsity"] = 1 - row["weights_kept"] / row["weights"] if row["weights"] else 0.0
        has_flops = pos is not None and isinstance(m, (BayesianLinear, BayesianConv))
        row["flops"] = flops if has_flops else None
        row["flops_kept"] = flops_kept if has_flops else None
        rows.append(row)
    total = {k: sum(r[k] for r in rows) for k in ("weights", "weights_kept", "params", "params_kept")}
    total["sparsity"] = 1 - total["weights_kept"] / total["weights"] if total["weights"] else 0.0
    total["compression"] = total["weights"] / total["weights_kept"] if total["weights_kept"] else math.inf
    with_flops = [r for r in rows if r["flops"] is not None]
    total["flops"] = sum(r["flops"] for r in with_flops) if with_flops else None
    total["flops_kept"] = sum(r["flops_kept"] for r in with_flops) if with_flops else None
    return SparsityReport(rows, total)


# -- export ------------------------------------------------------------------------------------------------
class SparseLinear(nn.Module):
    """y = x Wᵀ + b with W stored as a sparse COO tensor ``[out, in]``; x is ``[..., in]``."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.to_sparse().coalesce())
        self.register_buffer("bias", None if bias is None else bias.clone())

    def forward(self, x):
        lead = x.shape[:-1]
        y = torch.sparse.mm(self.weight, x.reshape(-1, self.in_features).t()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(lead + (self.out_features,))

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.weight._nnz()}"


class ShrunkLinear(nn.Module):
    """A Linear with the all-zero input columns and output rows of W removed.

    Computes y[..., kept_out] = x[..., kept_in] W_kept_inᵀ + b[kept_out] and y[..., other] = b[other]
    (a removed output unit has only its bias), so the interface ``[..., in] → [..., out]`` is unchanged."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        nz = weight != 0
        in_idx, out_idx = nz.any(0).nonzero().flatten(), nz.any(1).nonzero().flatten()
        self.register_buffer("in_idx", in_idx)
        self.register_buffer("out_idx", out_idx)
        self.weight = nn.Parameter(weight[out_idx][:, in_idx].clone())
        full_bias = torch.zeros(self.out_features, dtype=weight.dtype) if bias is None else bias.clone()
        self.register_buffer("full_bias", full_bias)
        self.bias = nn.Parameter(full_bias[out_idx].clone())

    def forward(self, x):
        y_kept = F.linear(x.index_select(-1, self.in_idx), self.weight, self.bias)
        y = self.full_bias.expand(x.shape[:-1] + (self.out_features,)).clone()
        y[..., self.out_idx] = y_kept
        return y

    def extra_repr(self):
        return (f"in_features={self.in_features} (kept {self.in_idx.numel()}), "
                f"out_features={self.out_features} (kept {self.out_idx.numel()})")


class ShrunkConv(nn.Module):
    """A Conv (groups=1) with the all-zero input channels and output filters removed; a removed
    filter's output map is its bias everywhere. Input/output shapes are those of the original conv."""

    def __init__(self, conv: nn.modules.conv._ConvNd, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        super().__init__()
        if conv.groups != 1:
            raise ValueError("ShrunkConv handles groups=1 convolutions only")
        self.out_channels = weight.shape[0]
        nz = weight.reshape(weight.shape[0], weight.shape[1], -1) != 0
        in_idx, out_idx = nz.any(2).any(0).nonzero().flatten(), nz.any(2).any(1).nonzero().flatten()
        if out_idx.numel() == 0:  # keep one (zero) filter so the output's spatial size is still computed
            out_idx = torch.zeros(1, dtype=torch.long)
        if in_idx.numel() == 0:
            in_idx = torch.zeros(1, dtype=torch.long)
        self.register_buffer("in_idx", in_idx)
        self.register_buffer("out_idx", out_idx)
        full_bias = torch.zeros(self.out_channels, dtype=weight.dtype) if bias is None else bias.clone()
        self.register_buffer("full_bias", full_bias)
        small = copy.deepcopy(conv)
        for n in list(small._parameters):
            del small._parameters[n]
        small.weight = nn.Parameter(weight[out_idx][:, in_idx].clone())
        small.bias = nn.Parameter(full_bias[out_idx].clone())
        small.in_channels, small.out_channels = in_idx.numel(), out_idx.numel()
        self.conv = small

    def forward(self, x):
        y_kept = self.conv(x.index_select(1, self.in_idx))
        shape = (x.shape[0], self.out_channels) + y_kept.shape[2:]
        y = self.full_bias.view((1, -1) + (1,) * (y_kept.dim() - 2)).expand(shape).clone()
        y[:, self.out_idx] = y_kept
        return y


def _plain_affine(module: BayesianModule, w, b):
    if isinstance(module, BayesianLinear):
        lin = nn.Linear(module.in_features, module.out_features, bias=b is not None)
        lin.weight = nn.Parameter(w.clone())
        if b is not None:
            lin.bias = nn.Parameter(b.clone())
        return lin
    conv = copy.deepcopy(module.conv)
    conv.weight = nn.Parameter(w.clone())
    if b is not None:
        conv.bias = nn.Parameter(b.clone())
    else:
        conv.register_parameter("bias", None)
    return conv


def _set_module(root: nn.Module, name: str, new: nn.Module):
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


@torch.no_grad()
def export(bnn, mode: str = "dense", mask: Optional[Dict[str, torch.Tensor]] = None, **mask_kwargs) -> nn.Module:
    """A plain ``torch.nn.Module`` (no Pyro) computing the masked posterior-mean network.

    :param mode: ``"dense"`` — the original layer types with pruned weights set to zero; its outputs
        equal :func:`masked_mean_forward` exactly (same kernels, same values). ``"sparse"`` — Linear
        weights as torch sparse COO tensors (:class:`SparseLinear`; convolutions stay dense).
        ``"shrink"`` — all-zero input columns/channels and output rows/filters removed
        (:class:`ShrunkLinear`, :class:`ShrunkConv`; groups≠1 convs stay dense). ``"sparse"`` and
        ``"shrink"`` sum the same non-zero products in another order, so their outputs agree with the
        masked posterior mean to float rounding, not bit for bit.
    :param mask: masks from :func:`masks`; default ``masks(bnn, **mask_kwargs)``.

    The exported module is in eval mode and its parameters do not require gradients.
    """
    if mode not in ("dense", "sparse", "shrink"):
        raise ValueError(f"export mode must be 'dense', 'sparse' or 'shrink', got {mode!r}")
    values = masked_means(bnn, mask, **mask_kwargs)
    net = copy.deepcopy(bnn.net)
    for name, m in list(net.named_modules()):
        if not isinstance(m, BayesianModule):
            continue
        if isinstance(m, BayesianParams):
            inner = m.module
            for pname in m.site_shapes:
                getattr(inner, pname).copy_(values[m.site_name(pname)])
            new = inner
        else:
            w = values[m.site_name("weight")]
            b = values[m.site_name("bias")] if "bias" in m.site_shapes else None
            if mode == "sparse" and isinstance(m, BayesianLinear):
                new = SparseLinear(w, b)
            elif mode == "shrink" and isinstance(m, BayesianLinear):
                new = ShrunkLinear(w, b)
            elif mode == "shrink" and isinstance(m, BayesianConv) and m.conv.groups == 1:
                new = ShrunkConv(m.conv, w, b)
            else:
                new = _plain_affine(m, w, b)
        _set_module(net, name, new)
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()
