"""The CPU speed tricks, in one place, each beside its plain-PyTorch reference.

pyrobnn's hot paths (a mean-field guide's σ = softplus(ρ), the KL's reductions, SGLD's Gaussian prior) are
elementwise passes over every weight of the network; on a CPU with a small network they are a large part of
a step. Each function here has two paths:

* the **fast path**: fused ``torch.autograd.Function`` s that take fewer passes and graph nodes than
  autograd's generic rules, and avoid slow CPU kernels;
* the **reference path**: the same mathematics written in plain PyTorch (what the fast path must agree with,
  to float rounding: tests/test_fastpath.py checks values and gradients of every pair).

The fast path is taken for CPU tensors only: on an accelerator the reference path runs (the tricks are CPU
ones, and some would synchronise the device). ``PYROBNN_FASTPATH=0`` in the environment, or
``with pyrobnn.fastpath.disabled():``, selects the reference path everywhere (for debugging, or to compare).

What each trick buys, on LeNet-300-100 (266,610 weights):

* :func:`softplus`: torch's AVX-512 CPU kernel for ``log1p`` (hence ``F.softplus``) is slow on some CPUs —
  8.3 ns per element on an AMD EPYC (Zen 4), against 1.0 ns for ``log`` and 1.3 ns for the AVX2 ``log1p`` kernel
  on the same CPU (``ATEN_CPU_CAPABILITY=avx2``) — so σ is computed from ``exp2`` and one ``log``
  (:class:`_Softplus`): there, forward and backward over LeNet's 266,610 scales take 0.9 ms instead of 2.8 ms
  (one thread). Under the AVX2 kernels the two cost the same (1.1 ms). It is used on every CPU: its output,
  like torch's ``exp`` and ``log``, is the same bit for bit under either kernel set, so a run gives the same
  numbers on both kinds of host.
* :func:`gaussian_sums` / :func:`gaussian_variance_sums`: ``[Σμ², Σσ², Σ log σ, 1]`` (and σ²) in one node, so the
  closed-form KL to a scalar Normal prior is one dot product; :func:`log_sum` takes a quarter of the logs.
* :func:`site_gaussian_terms`: the same for every site of a flat guide at once — one node, not one per site
  (on LeNet-300-100 the per-site nodes cost more Python than their six reductions cost arithmetic).
  :func:`softplus_in_range` tells it when σ's range, read from ρ's in the pass softplus makes anyway, lets the
  grouped log-sums skip their own range checks.
* :func:`sum_scaled_squared_norms`: k + Σ c_i ‖z_i‖² over all Gaussian-prior sites of a model in one node
  (SGLD's log-prior).
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["enabled", "disabled", "softplus", "softplus_in_range", "gaussian_sums", "gaussian_variance_sums",
           "site_gaussian_terms", "log_sum", "sum_scaled_squared_norms", "constant_tensor"]

_ENABLED = os.environ.get("PYROBNN_FASTPATH", "1").strip().lower() not in ("0", "false", "no", "off")


def enabled(t: torch.Tensor = None) -> bool:
    """Whether the fast path applies (globally, and to tensor ``t`` if given: a CPU tensor)."""
    return _ENABLED and (t is None or t.device.type == "cpu")


@contextlib.contextmanager
def disabled():
    """Within this block every function here takes its plain-PyTorch reference path."""
    global _ENABLED
    before, _ENABLED = _ENABLED, False
    try:
        yield
    finally:
        _ENABLED = before


# -- softplus --------------------------------------------------------------------------------------------------
_LOG2_E = 1.0 / math.log(2.0)
_SOFTPLUS_THRESHOLD = 20.0  # torch's: softplus(x) = x above it
def log1p_nonneg(t: torch.Tensor) -> torch.Tensor:
    """log(1 + t) for finite t ≥ 0, within a few float ulps of ``torch.log1p``, from one ``log``: with
    w = fl(1 + t) and its rounding error c = (w − 1) − t (exact in floating point), log1p(t) = log(w) − c/w to
    second order in c/w ≤ 2⁻²⁴; at t below the rounding of 1 (w = 1) this gives t itself. Measured relative
    error ≤ 1.2e-7 against a float64 log1p. Two full-size temporaries (w, c), the rest in place."""
    w = t + 1.0
    c = torch.sub(w, 1.0).sub_(t).div_(w)
    return w.log_().sub_(c)


class _Softplus(torch.autograd.Function):
    """σ = softplus(ρ) = log(1 + e^ρ) for ρ ≤ 20, without ``log1p``: e^ρ as 2^(ρ·log₂e) (torch's CPU ``exp2`` is
    3–4× faster than its ``exp``; the product adds at most one rounding), log(1 + e^ρ) as :func:`log1p_nonneg`
    computes it. e^ρ and 1 + e^ρ are kept for the backward, dσ/dρ = e^ρ / (1 + e^ρ): no exponential and no
    addition there."""

    @staticmethod
    def forward(ctx, rho):
        t = torch.mul(rho, _LOG2_E).exp2_()
        w = t + 1.0
        c = torch.sub(w, 1.0).sub_(t)
        ctx.save_for_backward(t, w)
        # log(w) − c/w in one pass: addcdiv's value·c/w with value −1 is exactly −(c/w)
        return torch.log(w).addcdiv_(c, w, value=-1.0)

    @staticmethod
    def backward(ctx, grad):
        t, w = ctx.saved_tensors
        return torch.div(t, w).mul_(grad)


def softplus(rho: torch.Tensor) -> torch.Tensor:
    """``F.softplus(rho)`` (β = 1, threshold 20). Fast path: :class:`_Softplus` for a CPU float tensor whose every
    ρ ≤ 20 (the usual case for a guide's scales). Otherwise, and under ``torch.jit.trace`` (a Python autograd
    function cannot be exported): ``F.softplus``."""
    return softplus_in_range(rho)[0]


def softplus_in_range(rho: torch.Tensor):
    """(:func:`softplus` of ``rho``, whether every σ lies well inside :data:`_GROUPED_LOG_RANGE`): the range
    of σ follows from ρ's (softplus is increasing), which the fast path reads anyway, so :func:`log_sum` over
    any part of σ can skip its own range check (``in_range=True``)."""
    if enabled(rho) and not torch.jit.is_tracing() and rho.numel() and rho.is_floating_point():
        lo, hi = (float(v) for v in torch.aminmax(rho.detach()))
        if hi <= _SOFTPLUS_THRESHOLD:  # False for NaN
            # a factor of 2 of margin: σ as computed in float32 vs softplus of the extremes in float64
            in_range = (_softplus_float(lo) >= 2.0 * _GROUPED_LOG_RANGE[0]
                        and _softplus_float(hi) <= 0.5 * _GROUPED_LOG_RANGE[1])
            return _Softplus.apply(rho), in_range
    return F.softplus(rho), False


def _softplus_float(x: float) -> float:
    return x + math.log1p(math.exp(-x)) if x > 0 else math.log1p(math.exp(x))


# -- a mean-field Normal's reductions --------------------------------------------------------------------------
#: below this many scales a plain log-sum is as cheap
_GROUPED_LOG_MIN = 4096
#: scales in [lo, hi] multiply four at a time without leaving float32's normal range
_GROUPED_LOG_RANGE = (1.2e-9, 1e9)


def log_sum(scale: torch.Tensor, in_range: bool = False) -> torch.Tensor:
    """Σ log σ of a 1-d tensor of positive scales. Fast path: a quarter of the logarithms, Σ log σ = Σ log(σ_a σ_b
    σ_c σ_d) over groups of four (torch's CPU ``log`` is an order of magnitude slower than a multiply). Each
    group's product carries at most three roundings (≈ 2e-7 relative, the order of one ``log``'s); used only
    where every σ lies in :data:`_GROUPED_LOG_RANGE` (checked, unless the caller knows it: ``in_range=True``;
    otherwise — zeros, infinities, NaN, tiny tensors, float64 — the plain log-sum, which keeps NaN/inf visible)."""
    n = scale.numel()
    m = n - n % 4
    if enabled(scale) and m >= _GROUPED_LOG_MIN and scale.dtype == torch.float32:
        head = scale[:m]
        if not in_range:
            lo, hi = (float(v) for v in torch.aminmax(head.detach()))
        if in_range or (lo >= _GROUPED_LOG_RANGE[0] and hi <= _GROUPED_LOG_RANGE[1]):
            v = head.view(4, m // 4)
            prod = v[0] * v[1]
            total = prod.mul_(v[2]).mul_(v[3]).log_().sum()
            return total if m == n else total + scale[m:].log().sum()
    return scale.log().sum()


def _sum_terms(fl, fs, one, in_range=False):
    """``[Σμ², Σσ², Σ log σ, 1]`` of one site as a list of 0-d tensors (stacked by the caller): the one
    definition behind :class:`_GaussianSums`, :class:`_GaussianVarianceSums` and :class:`_SiteGaussianTerms`."""
    return [torch.dot(fl, fl), torch.dot(fs, fs), log_sum(fs, in_range), one]


def _sums(fl, fs):
    return torch.stack(_sum_terms(fl, fs, fl.new_ones(())))


class _GaussianSums(torch.autograd.Function):
    """``[Σμ², Σσ², Σ log σ, 1]`` in one node. Backward (g the incoming ``[4]`` gradient): ∂/∂μ = 2·g₀·μ,
    ∂/∂σ = 2·g₁·σ + g₂/σ — two tensor passes for σ, one for μ (autograd's generic rules for dot, σ·σ, log and
    sum take about three times as many passes and nodes)."""

    @staticmethod
    def forward(ctx, loc, scale):
        ctx.save_for_backward(loc, scale)
        return _sums(loc.reshape(-1), scale.reshape(-1))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        loc, scale = ctx.saved_tensors
        g0, g1, g2, _ = grad.tolist()
        grad_loc = grad_scale = None
        if ctx.needs_input_grad[0]:
            grad_loc = loc.mul(2.0 * g0)
        if ctx.needs_input_grad[1]:
            if g2 != 0.0:
                grad_scale = torch.reciprocal(scale).mul_(g2)
                if g1 != 0.0:
                    grad_scale.add_(scale, alpha=2.0 * g1)
            else:
                grad_scale = scale.mul(2.0 * g1)
        return grad_loc, grad_scale


class _GaussianVarianceSums(torch.autograd.Function):
    """(σ², ``[Σμ², Σσ², Σ log σ, 1]``) in one node: a layer's pre-activation variance and the KL's reductions.
    Backward (g_v the gradient of σ², g the ``[4]`` one): ∂/∂μ = 2·g₀·μ, ∂/∂σ = 2σ·g_v + 2·g₁·σ + g₂/σ in four
    tensor passes (σ·σ's generic backward, the reductions' and the accumulation of the two take seven)."""

    @staticmethod
    def forward(ctx, loc, scale):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(loc, scale)
        return scale * scale, _sums(loc.reshape(-1), scale.reshape(-1))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_var, grad_sums):
        loc, scale = ctx.saved_tensors
        g0, g1, g2, _ = grad_sums.tolist() if grad_sums is not None else (0.0, 0.0, 0.0, 0.0)
        grad_loc = grad_scale = None
        if ctx.needs_input_grad[0] and g0 != 0.0:
            grad_loc = loc.mul(2.0 * g0)
        if ctx.needs_input_grad[1]:
            grad_scale = _scale_grad(scale, grad_var, g1, g2)
        return grad_loc, grad_scale


class _SiteGaussianTerms(torch.autograd.Function):
    """A flat guide's every site at once: each site's σ² (a view of one flat σ², shaped as the site) and a
    ``[k, 4]`` tensor of per-site ``[Σμ², Σσ², Σ log σ, 1]``, from the flat μ and σ and the sites' sizes, in one
    node. The values, and the gradients element by element, are :class:`_GaussianVarianceSums`'s on each site;
    what is saved is its per-site cost — one node, its Python call and its ``stack`` per site, forward and
    backward — which on a small network is a large part of a step. The per-site σ² are outputs of their own, so
    their gradients arrive here one by one and go straight into their slices of ∂/∂σ: no concatenation of a
    flat σ² gradient (a pass over every weight). Backward: where the per-site weights ``g`` are the same at every
    site (one prior over the network, the usual case) the terms without σ²'s gradient are one vectorised pass
    each over the flat vector, else everything is per site on its slice."""

    @staticmethod
    def forward(ctx, loc, scale, sizes, shapes, in_range):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(loc, scale)
        ctx.sizes = sizes
        one = loc.new_ones(())
        parts = []
        for fl, fs in zip(loc.split(sizes), scale.split(sizes)):
            parts += _sum_terms(fl, fs, one, in_range)
        var = scale * scale
        variances = [v if v.shape == shape else v.view(shape) for v, shape in zip(var.split(sizes), shapes)]
        return (*variances, torch.stack(parts).view(len(sizes), 4))

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        loc, scale = ctx.saved_tensors
        sizes = ctx.sizes
        k = len(sizes)
        grad_vars = [None if g is None else g.reshape(-1) for g in grads[:k]]
        grad_sums = grads[k]
        rows = grad_sums.tolist() if grad_sums is not None else [[0.0] * 4] * k
        uniform = all(r[:3] == rows[0][:3] for r in rows)
        grad_loc = grad_scale = None
        if ctx.needs_input_grad[0] and any(r[0] != 0.0 for r in rows):
            if uniform:
                grad_loc = loc.mul(2.0 * rows[0][0])
            else:
                grad_loc = torch.empty_like(loc)
                for out, fl, r in zip(grad_loc.split(sizes), loc.split(sizes), rows):
                    torch.mul(fl, 2.0 * r[0], out=out) if r[0] != 0.0 else out.zero_()
        if ctx.needs_input_grad[1]:
            if uniform and all(g is None for g in grad_vars):
                grad_scale = _scale_grad(scale, None, rows[0][1], rows[0][2])
            elif uniform:
                grad_scale = _uniform_scale_grad(scale, sizes, grad_vars, rows[0][1], rows[0][2])
            else:
                grad_scale = torch.empty_like(scale)
                for out, fs, gv, r in zip(grad_scale.split(sizes), scale.split(sizes), grad_vars, rows):
                    g = _scale_grad(fs, gv, r[1], r[2])
                    out.copy_(g) if g is not None else out.zero_()
        return grad_loc, grad_scale, None, None, None


def _uniform_scale_grad(scale, sizes, grad_vars, g1, g2):
    """:func:`_scale_grad` over the flat σ with σ²'s gradient given per site (None where a site's σ² got none):
    the same operations element by element, the σ² terms on each site's slice."""
    if g2 != 0.0:
        grad = torch.reciprocal(scale).mul_(g2)
        for out, fs, gv in zip(grad.split(sizes), scale.split(sizes), grad_vars):
            if gv is not None:
                out.addcmul_(fs, gv, value=2.0)
    else:
        grad = torch.empty_like(scale)
        for out, fs, gv in zip(grad.split(sizes), scale.split(sizes), grad_vars):
            torch.mul(fs, gv, out=out) if gv is not None else out.zero_()
        grad.mul_(2.0)
    if g1 != 0.0:
        grad.add_(scale, alpha=2.0 * g1)
    return grad


def _scale_grad(scale, grad_var, g1, g2):
    """∂/∂σ of g_v·σ² + g₁Σσ² + g₂Σ log σ: 2σ·g_v + 2·g₁·σ + g₂/σ (None where it is zero), in the operations and
    order of :class:`_GaussianVarianceSums`'s backward."""
    if grad_var is not None:
        grad = scale * grad_var if g2 == 0.0 else \
            torch.reciprocal(scale).mul_(g2).addcmul_(scale, grad_var, value=2.0)
        if g2 == 0.0:
            grad.mul_(2.0)
        if g1 != 0.0:
            grad.add_(scale, alpha=2.0 * g1)
        return grad
    if g2 != 0.0:
        grad = torch.reciprocal(scale).mul_(g2)
        if g1 != 0.0:
            grad.add_(scale, alpha=2.0 * g1)
        return grad
    if g1 != 0.0:
        return scale.mul(2.0 * g1)
    return None


def _reference_sums(loc, scale):
    return torch.stack([(loc * loc).sum(), (scale * scale).sum(), scale.log().sum(), loc.new_ones(())])


def gaussian_sums(loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``[Σμ², Σσ², Σ log σ, 1]`` (shape ``[4]``) of a Normal's loc and scale (same shape)."""
    if enabled(loc):
        return _GaussianSums.apply(loc, scale)
    return _reference_sums(loc, scale)


def gaussian_variance_sums(loc: torch.Tensor, scale: torch.Tensor):
    """(σ², :func:`gaussian_sums`) — the variance and the reductions, from one node on the fast path."""
    if enabled(loc):
        return _GaussianVarianceSums.apply(loc, scale)
    return scale * scale, _reference_sums(loc, scale)


def site_gaussian_terms(loc: torch.Tensor, scale: torch.Tensor, sizes: List[int], shapes: List[torch.Size],
                        in_range: bool = False):
    """(per-site σ² shaped by ``shapes``, ``[k, 4]``): a flat guide's sites' variances and, per site (consecutive
    chunks of ``sizes``), its :func:`gaussian_sums`. One node on the fast path (:class:`_SiteGaussianTerms`); one
    per site otherwise. ``in_range``: every σ is known to lie in :data:`_GROUPED_LOG_RANGE`
    (:func:`softplus_in_range`)."""
    if enabled(loc):
        *variances, sums = _SiteGaussianTerms.apply(loc, scale, list(sizes), list(shapes), bool(in_range))
        return variances, sums
    pairs = list(zip(loc.split(sizes), scale.split(sizes)))
    return ([(fs * fs).view(shape) for (_, fs), shape in zip(pairs, shapes)],
            torch.stack([_reference_sums(fl, fs) for fl, fs in pairs]))


# -- SGLD's Gaussian log-prior ---------------------------------------------------------------------------------
_CONSTANTS: Dict[tuple, torch.Tensor] = {}


def constant_tensor(values, like: torch.Tensor) -> torch.Tensor:
    """A small constant tensor of ``values`` (dtype and device of ``like``), made once and reused: the hot paths
    ask for the same few every step (a KL's four weights per site, SGLD's prior coefficients)."""
    key = (tuple(values), like.dtype, like.device)
    t = _CONSTANTS.get(key)
    if t is None:
        if len(_CONSTANTS) > 4096:  # bounded: many distinct sites or priors just rebuild
            _CONSTANTS.clear()
        t = _CONSTANTS[key] = torch.tensor(key[0], dtype=like.dtype, device=like.device)
    return t


class _SumScaledSquaredNorms(torch.autograd.Function):
    """k + Σ_i c_i ‖z_i‖² over several tensors: one ``_foreach_norm`` forward, one ``_foreach_mul`` backward
    (g·2c_i)·z_i. Autograd's generic rule for z·z takes three passes per tensor and one node per operation."""

    @staticmethod
    def forward(ctx, coefs: List[float], constant: float, *zs):
        ctx.save_for_backward(*zs)
        ctx.coefs = coefs
        return _scaled_squared_norms(coefs, constant, zs)

    @staticmethod
    def backward(ctx, grad):
        zs = ctx.saved_tensors
        g = float(grad)
        return (None, None, *torch._foreach_mul(zs, [2.0 * c * g for c in ctx.coefs]))


def _scaled_squared_norms(coefs, constant, zs) -> torch.Tensor:
    norms = torch.stack(torch._foreach_norm(zs))
    total = torch.dot(norms * norms, constant_tensor(coefs, norms))
    return total.add_(constant) if constant else total


def sum_scaled_squared_norms(coefs: List[float], constant: float, zs: List[torch.Tensor]) -> torch.Tensor:
    """k + Σ_i c_i ‖z_i‖² (a 0-d tensor)."""
    if enabled(zs[0]):
        if not torch.is_grad_enabled() or not any(z.requires_grad for z in zs):
            with torch.no_grad():  # the value alone: the same numbers without an autograd node
                return _scaled_squared_norms(coefs, constant, zs)
        return _SumScaledSquaredNorms.apply(coefs, constant, *zs)
    total = sum(c * (z * z).sum() for c, z in zip(coefs, zs))
    return total + constant if constant else total
