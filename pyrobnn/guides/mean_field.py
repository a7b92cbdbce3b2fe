"""Mean-field Gaussian guide: q(w) = Π N(μ_k, σ_k²), σ = softplus(ρ)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from pyro.infer.autoguide.initialization import init_to_median

from ..registry import GUIDES
from .base import FlatGaussianGuide

__all__ = ["MeanField"]


def _softplus_inv(y: float) -> float:
    return y + math.log(-math.expm1(-y))


_LOG2_E = 1.0 / math.log(2.0)
_SOFTPLUS_THRESHOLD = 20.0  # torch's: softplus(x) = x above it


def _log1p_nonneg(t: torch.Tensor) -> torch.Tensor:
    """log(1 + t) for finite t ≥ 0, within a few float ulps of ``torch.log1p``, from one ``log``.

    torch's CPU ``log1p`` is not vectorised on some hosts: on one AVX-512 machine it takes ~10 ns per
    element against ~0.8 ns for ``log`` — 2.5 ms per step for LeNet-300-100's 266,610 scales, a quarter
    of a whole SVI step. Where ``log1p`` is fast (a 2-core AMD EPYC with AVX-512: 0.8 ns, ``log`` 1.0 ns)
    this detour costs a few elementwise passes, ~0.1 ms per LeNet step: the robust choice across hosts,
    so it is taken everywhere (no per-host switch, the same numbers on every host). With w = fl(1 + t) and
    its rounding error c = (w − 1) − t (exact in floating point), log1p(t) = log(w) − c/w to second
    order in c/w ≤ 2⁻²⁴; at t below the rounding of 1 (w = 1) this gives t itself, as it should.
    Measured relative error ≤ 1.2e-7 against a float64 log1p. Two full-size temporaries (w, c), the
    rest in place."""
    w = t + 1.0
    c = torch.sub(w, 1.0).sub_(t).div_(w)
    return w.log_().sub_(c)


class _Softplus(torch.autograd.Function):
    """σ = softplus(ρ) = log(1 + e^ρ), the same values as ``F.softplus`` to float rounding, faster on CPU.

    e^ρ is taken as 2^(ρ·log₂e): torch's CPU ``exp2`` is about 3–4× faster than its ``exp``, and the
    product adds at most one rounding (≈ 1e-7 relative for |ρ| ≤ 20); log(1 + e^ρ) by
    :func:`_log1p_nonneg` (one ``log``, not torch's slow CPU ``log1p``). e^ρ is kept for the backward,
    dσ/dρ = e^ρ / (1 + e^ρ), so the backward needs no exponential (``softplus_backward`` recomputes one).
    Callers use it only where every ρ ≤ 20 (see :func:`softplus`)."""

    @staticmethod
    def forward(ctx, rho):
        t = torch.mul(rho, _LOG2_E).exp2_()
        ctx.save_for_backward(t)
        return _log1p_nonneg(t)

    @staticmethod
    def backward(ctx, grad):
        (t,) = ctx.saved_tensors
        s = t + 1.0
        return torch.div(t, s, out=s).mul_(grad)


def softplus(rho: torch.Tensor) -> torch.Tensor:
    """``F.softplus(rho)`` (β = 1, threshold 20), by :class:`_Softplus` for a CPU tensor whose every ρ ≤ 20
    — the usual case for a guide's scales, σ ≤ 20 — and by ``F.softplus`` otherwise (on an accelerator the
    range check would synchronise the device every step, and the exp/exp2 difference is a CPU one) and under
    ``torch.jit.trace`` (a Python autograd function cannot be exported)."""
    if (not torch.jit.is_tracing() and rho.device.type == "cpu" and rho.numel() and rho.is_floating_point()
            and float(rho.detach().amax()) <= _SOFTPLUS_THRESHOLD):
        return _Softplus.apply(rho)
    return F.softplus(rho)


def _shaped(chunk, shape):
    # a 1-d site (a bias) is its chunk already: no view, no graph node
    return chunk if chunk.shape == shape else chunk.view(shape)


@GUIDES.register("mean-field")
class MeanField(FlatGaussianGuide):
    """Factorised Normal over every continuous latent site of any Pyro model (an ``AutoGuide``).

    Constrained sites (e.g. a Gamma precision) get a Normal in unconstrained space pushed through
    ``biject_to(support)``; unconstrained sites get a plain Normal, so ``TraceMeanField_ELBO`` uses
    the closed-form KL wherever one is registered.

    :param model: any Pyro model.
    :param init_scale: initial σ of every site (unconstrained space). Default (None): 0.01 at the sites of
        pyrobnn's layers (a network started from its weights with larger noise trains slowly or not at all)
        and 0.1 — Pyro's ``AutoNormal`` default — at every other site of a hand-written model.
    :param parameterization: ``"softplus"`` — free μ and ρ, σ = softplus(ρ); ``"gamma"`` — free γ and
        ρ with μ = γ·σ (the empirical-Bayes ARD parameterisation: μ/σ = γ is a parameter, so ARD's
        KL = ½ Σ log(1 + γ²) has no 0/0 and σ > 0 always). γ lives on a scale 1/σ larger than μ:
        start from non-zero means (a network's initial weights, as ``bayesian()`` does) and give γ a
        larger learning rate than μ would need; from μ = 0 SGD can shrink σ before γ grows.
    :param local_reparameterization: let layers that support it sample activations instead of
        weights (see :mod:`pyrobnn.guides.base`).
    """

    #: initial σ of network sites and of generic sites when ``init_scale`` is not given
    NETWORK_INIT_SCALE = 1e-2
    GENERIC_INIT_SCALE = 0.1

    def __init__(self, model, *, init_loc_fn=init_to_median, init_scale: Optional[float] = None,
                 parameterization: str = "softplus", local_reparameterization: bool = True,
                 create_plates=None):
        if init_scale is not None and (not isinstance(init_scale, (int, float)) or isinstance(init_scale, bool)
                                       or not math.isfinite(init_scale) or init_scale <= 0):
            raise ValueError(f"MeanField init_scale must be a positive finite number (or None), got {init_scale!r}")
        if parameterization not in ("softplus", "gamma"):
            raise ValueError(f"MeanField parameterization must be 'softplus' or 'gamma', got {parameterization!r}")
        self.init_scale = None if init_scale is None else float(init_scale)
        self.parameterization = parameterization
        self.flat_names = ("gamma", "rho") if parameterization == "gamma" else ("loc", "rho")
        super().__init__(model, init_loc_fn=init_loc_fn, local_reparameterization=local_reparameterization,
                         create_plates=create_plates)

    def config(self):
        return {"init_scale": self.init_scale, "parameterization": self.parameterization,
                "local_reparameterization": self.local_reparameterization}

    def _init_flat(self, init_loc, network):
        if self.init_scale is not None:
            scale = torch.full_like(init_loc, self.init_scale)
        else:
            scale = torch.where(network, self.NETWORK_INIT_SCALE, self.GENERIC_INIT_SCALE).to(init_loc.dtype)
        rho = scale + torch.log(-torch.expm1(-scale))  # softplus⁻¹
        if self.parameterization == "gamma":
            return {"gamma": init_loc / scale, "rho": rho}
        return {"loc": init_loc, "rho": rho}

    def _split_flat(self, tensors):
        # σ = softplus(ρ) over the whole flat vector: one op and one graph node, not one per site
        sizes = self._sizes
        first = "gamma" if self.parameterization == "gamma" else "loc"
        return {first: tensors[first].split(sizes), "scale": softplus(tensors["rho"]).split(sizes)}

    def _site_params(self, flat, i, shape):
        scale = _shaped(flat["scale"][i], shape)
        if self.parameterization == "gamma":
            gamma = _shaped(flat["gamma"][i], shape)
            return gamma * scale, scale, gamma
        return _shaped(flat["loc"][i], shape), scale, None
