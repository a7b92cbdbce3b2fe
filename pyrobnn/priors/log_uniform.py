"""Improper log-uniform prior p(|w|) ∝ 1/|w| and the KL approximation of sparse variational dropout.

Molchanov, Ashukha & Vetrov (2017), "Variational Dropout Sparsifies Deep Neural Networks". For a
Normal posterior q(w) = N(θ, σ²) write α = σ²/θ². The KL to the log-uniform prior depends on α only
and is defined up to an additive constant (the prior is improper); the paper's approximation is

    −KL(q ‖ p) ≈ k₁ sigmoid(k₂ + k₃ log α) − ½ log(1 + 1/α) − k₁,   k₁, k₂, k₃ = 0.63576, 1.87320, 1.48695,

with the constant chosen so that −KL → 0 as α → ∞ (a weight that is pure noise costs nothing).
It is registered for ``(GuideNormal, LogUniform)`` and ``(Normal, LogUniform)``, so
``pyro.infer.TraceMeanField_ELBO`` uses it at every log-uniform site, also after the site's prior was
expanded and made an event (``LogUniform().expand(shape).to_event(k)`` is an ``Independent`` whose base
is a ``LogUniform``; torch's Independent–Independent rule sums this elementwise KL).

Where log α comes from:
  * a site of :class:`pyrobnn.guides.AdditiveNoise` (a Normal carrying ``log_variance`` and
    ``log_alpha_clip``): log α = log σ² − log(θ² + 1e-16) clipped to the guide's range, computed with
    the KL and its gradient in one fused autograd function (:func:`sparse_vd_terms`, cached on the
    site's distribution);
  * any other Normal: log α = 2 log σ − log(μ² + 1e-16), clipped to :data:`DEFAULT_LOG_ALPHA_CLIP`.

Why log α is clipped only from above by default (``(None, 8)``). Above, the clip keeps the gradient
finite where θ → 0 (log α → +∞) and changes little: the KL is flat there (< 2e-4 at log α = 8, → 0).
Below, the approximation needs no clip: as log α → −∞ it tends to −½ log α + k₁ (the sigmoid → k₁,
½ log(1 + 1/α) → −½ log α), which is also the exact KL's asymptote, ½ E log(1 + √α ε)² − ½ log α +
const → −½ log α + const (checked numerically down to log α = −30 in tests/test_log_uniform.py). A lower
clip at −8 (the reference implementation's) makes the KL constant below it, so a weight with
log σ² − log θ² < −8 — every weight with |θ| > e⁻¹ when log σ² = −10, the usual start from a
pretrained network — gets *no* KL gradient at all and escapes the prior for good (the data term only
lowers its σ² further). Clipping only from above keeps every weight under the KL; ``(-8, 8)`` is still
available for the reference behaviour. The KL is finite for any log α; the fused version's value
saturates below log α ≈ −87 in float32 (where sigmoid underflows), its gradient stays exact.
"""
from __future__ import annotations

import math

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions.util import sum_rightmost
from torch.distributions import constraints
from torch.distributions.kl import register_kl

from ..guides.base import local_reparam_params
from ..guides.normal import GuideNormal, _scalar
from ..registry import PRIORS

__all__ = ["LogUniform", "kl_log_uniform", "neg_kl_log_uniform", "log_alpha_of_normal", "sparse_vd_terms",
           "sparse_vd_kl", "K1", "K2", "K3", "DEFAULT_LOG_ALPHA_CLIP", "THETA2_EPS"]

K1, K2, K3 = 0.63576, 1.87320, 1.48695
#: log α is clipped to this range wherever the KL is evaluated on a Normal that does not carry its own:
#: from above only (module docstring: a lower clip silences the KL for weights below it)
DEFAULT_LOG_ALPHA_CLIP = (None, 8.0)
#: added to μ² inside log μ², so a weight at exactly 0 has a finite log α (then clipped) and gradient
THETA2_EPS = 1e-16


@PRIORS.register("log-uniform")
class LogUniform(dist.TorchDistribution):
    """Improper log-uniform prior over a real weight: p(w) ∝ 1/|w| (density uniform in log|w|).

    A scalar distribution: use it at a weight site as ``LogUniform().expand(shape).to_event(len(shape))``
    (what ``pyrobnn.bayesian(net, prior="log-uniform")`` does). Its parameters-free batch shape is all
    it stores, so expanding is free.

    * ``log_prob(w) = −log|w|`` (the normaliser does not exist; constant dropped), shape ``w.shape``
      broadcast with ``batch_shape``.
    * ``sample`` draws from a proper stand-in, :meth:`stand_in`: the prior restricted to
      10⁻⁴ ≤ |w| ≤ 1 (there it is normalisable: log|w| uniform, a random sign). An improper density has
      no samples; the stand-in exists so that what runs a model once without a guide works:
      ``pyro.infer.Predictive`` traces the model unconditioned to find its sites (the values are then
      replaced by the guide's), and a prior predictive check shows weights of a plausible magnitude. No
      density is taken from the stand-in, and pyrobnn's guides never initialise from it
      (``improper = True``: :func:`pyrobnn.guides.base.improper_safe_init`).
    * KL to a Normal guide: the Molchanov et al. approximation (module docstring).
    * At a local-reparameterisation placeholder of q (a guide's mean tagged with q) ``log_prob`` is
      E_q[log p(w)] := −KL(q ‖ p) − H(q), so every ELBO agrees with the closed form
      (:mod:`pyrobnn.guides.base`).
    """

    arg_constraints = {}
    support = constraints.real
    # True although it cannot be sampled: a model site's value (replayed from a reparameterised guide)
    # is then differentiable, and Pyro's TraceGraph_ELBO keeps the value — and its placeholder tag — as is
    has_rsample = True
    placeholder_expectation = True
    #: improper: ``sample`` draws from :meth:`stand_in`, never used to initialise a guide
    improper = True
    #: the stand-in's range of log|w|
    STAND_IN_LOG_RANGE = (math.log(1e-4), 0.0)

    def __init__(self, batch_shape=torch.Size(), validate_args=None):
        super().__init__(torch.Size(batch_shape), torch.Size(), validate_args=False)

    def config(self):
        return {}

    def stand_in(self) -> dist.TorchDistribution:
        """The proper distribution :meth:`sample` draws from: p(w) ∝ 1/|w| on 10⁻⁴ ≤ |w| ≤ 1."""
        return _SignedLogUniform(self.STAND_IN_LOG_RANGE, self.batch_shape)

    def expand(self, batch_shape, _instance=None):
        return LogUniform(torch.Size(batch_shape))

    def to_event(self, reinterpreted_batch_ndims=None):
        if reinterpreted_batch_ndims is None:
            reinterpreted_batch_ndims = len(self.batch_shape)
        if reinterpreted_batch_ndims == 0:
            return self
        return _IndependentLogUniform(self, reinterpreted_batch_ndims)

    def log_prob(self, value):
        q = local_reparam_params(value)
        if q is not None:
            return _broadcast(_expected_log_prob(q), self)
        lp = -value.abs().log()
        if lp.shape != self.batch_shape and self.batch_shape:
            lp = lp.expand(torch.broadcast_shapes(lp.shape, self.batch_shape))
        return lp

    @torch.no_grad()
    def sample(self, sample_shape=torch.Size()):
        """A draw from :meth:`stand_in` (the improper prior has none of its own; see the class doc)."""
        return self.stand_in().sample(sample_shape)

    def rsample(self, sample_shape=torch.Size()):
        return self.sample(sample_shape)

    @property
    def mean(self):
        raise NotImplementedError("the improper LogUniform prior has no mean")

    @property
    def variance(self):
        raise NotImplementedError("the improper LogUniform prior has no variance")

    def __repr__(self):
        shape = f"batch_shape={tuple(self.batch_shape)}" if self.batch_shape else ""
        return f"LogUniform({shape})"


class _SignedLogUniform(dist.TorchDistribution):
    """±exp(u), u ~ U(lo, hi), sign ±1 with probability ½: p(w) = 1/(2|w|(hi − lo)) on e^lo ≤ |w| ≤ e^hi."""

    arg_constraints = {}
    support = constraints.real

    def __init__(self, log_range, batch_shape=torch.Size()):
        self.log_range = log_range
        super().__init__(torch.Size(batch_shape), torch.Size(), validate_args=False)

    def sample(self, sample_shape=torch.Size()):
        shape = self._extended_shape(sample_shape)
        lo, hi = self.log_range
        magnitude = torch.empty(shape).uniform_(lo, hi).exp_()
        return torch.where(torch.rand(shape) < 0.5, -magnitude, magnitude)

    def log_prob(self, value):
        lo, hi = self.log_range
        a = value.abs()
        lp = -a.log() - math.log(2 * (hi - lo))
        inside = (a >= math.exp(lo)) & (a <= math.exp(hi))
        return torch.where(inside, lp, torch.full_like(lp, -math.inf))


class _IndependentLogUniform(dist.Independent):
    """``LogUniform(...).to_event(k)``: at a local-reparameterisation placeholder of q the density is
    E_q[log p(w)] := −KL(q ‖ p) − H(q) elementwise (the improper prior's log-density is defined up to
    the constant the KL approximation fixes), summed, reusing the KL terms cached on q; so minus the
    guide's E_q[log q] it is −KL exactly (see :mod:`pyrobnn.guides.base`). Elsewhere it is the ordinary
    Independent log-density."""

    def log_prob(self, value):
        q = local_reparam_params(value)
        if q is None:
            return super().log_prob(value)
        k = self.reinterpreted_batch_ndims
        # −(Σ KL + Σ log σ + n(½ log 2π + ½)) from sums: no elementwise temporary on the hot path
        log_var = getattr(q, "log_variance", None)
        log_scale_sum = (sum_rightmost(log_var, k) * 0.5 if log_var is not None
                         else sum_rightmost(q.log_scale, k))
        n = math.prod(q.batch_shape[len(q.batch_shape) - k:])
        lp = (sum_rightmost(_kl_elementwise(q), k) + log_scale_sum).add_(n * _HALF_LOG_2PI_PLUS_HALF).neg_()
        if self.batch_shape and lp.shape != self.batch_shape:
            lp = lp.expand(torch.broadcast_shapes(lp.shape, self.batch_shape))
        return lp


_HALF_LOG_2PI_PLUS_HALF = 0.5 * math.log(2 * math.pi) + 0.5


def _expected_log_prob(q):
    """E_q[log p(w)] = −KL(q ‖ log-uniform) − H(q), elementwise; the KL as registered below (cached on
    an additive-noise q, where the ELBO's KL reuses it)."""
    kl = _kl_elementwise(q)
    return (kl + q.log_scale).add_(_HALF_LOG_2PI_PLUS_HALF).neg_()


# -- the KL approximation ------------------------------------------------------------------------------------
def neg_kl_log_uniform(log_alpha: torch.Tensor) -> torch.Tensor:
    """−KL(N(θ, αθ²) ‖ log-uniform) ≈ k₁ sigmoid(k₂ + k₃ log α) − ½ log(1 + 1/α) − k₁, elementwise."""
    return K1 * torch.sigmoid(K2 + K3 * log_alpha) - 0.5 * F.softplus(-log_alpha) - K1


def kl_log_uniform(log_alpha: torch.Tensor) -> torch.Tensor:
    """KL ≈ k₁ sigmoid(−k₂ − k₃ log α) + ½ log(1 + e^{−log α}) ≥ 0, elementwise (same shape).

    Written as k₁(1 − sigmoid(k₂ + k₃ la)) = k₁ sigmoid(−k₂ − k₃ la) so no constant is added and
    subtracted, and with ``softplus`` for log(1 + 1/α) (stable for any log α)."""
    return K1 * torch.sigmoid(log_alpha * (-K3) - K2) + 0.5 * F.softplus(-log_alpha)


def log_alpha_of_normal(q, clip=DEFAULT_LOG_ALPHA_CLIP) -> torch.Tensor:
    """log α = log σ² − log μ² of a Normal (``q.log_alpha`` if it carries one), clipped to ``clip``
    (``(low, high)``, either bound may be None, or None)."""
    carried = getattr(q, "log_alpha", None)
    if carried is not None:
        return carried
    log_var = 2 * q.log_scale if isinstance(q, GuideNormal) else 2 * q.scale.log()
    la = log_var - (q.loc * q.loc + THETA2_EPS).log()
    return _clamp(la, clip)


def _clamp(la, clip):
    """``la`` clamped to ``clip`` = (low, high) (either may be None) or returned as is for None."""
    if clip is None or (clip[0] is None and clip[1] is None):
        return la
    return la.clamp(clip[0], clip[1])


def _bounds(clip):
    """(low, high) floats-or-None of a clip (None: unclipped)."""
    if clip is None:
        return None, None
    return tuple(None if b is None else float(b) for b in clip)


_CONSTANTS = {}


def _constants(like):
    """0-dim tensors (ε, −k₂) of ``like``'s dtype/device, made once (broadcast operands of fused ops)."""
    key = (like.dtype, like.device)
    c = _CONSTANTS.get(key)
    if c is None:
        c = _CONSTANTS[key] = (torch.tensor(THETA2_EPS, dtype=like.dtype, device=like.device),
                               torch.tensor(-K2, dtype=like.dtype, device=like.device))
    return c


class _SparseVDKL(torch.autograd.Function):
    """Elementwise KL(N(θ, σ²) ‖ log-uniform) from (θ, log σ²) with log α clipped, and its gradient.

    One pass computes the KL, log(θ² + ε) (returned, not differentiable) and the two partial
    derivatives, so the backward is two scalings. With u = log α (clipped to [low, high], either bound
    may be None), s = sigmoid(−k₂ − k₃u), p = sigmoid(u):  KL = k₁ s − ½ log p,
    dKL/du = ½ (p − 1 − 2 k₁k₃ s(1 − s)) (0 where clipped), du/d log σ² = 1, du/dθ = −2θ / (θ² + ε).
    −log sigmoid(u) = log(1 + 1/α) is taken as −log max(sigmoid(u), tiny): exact down to u ≈ −87 in
    float32 (−708 in float64), saturated below, where the gradient stays exact.
    """

    @staticmethod
    def forward(ctx, theta, log_var, low, high):
        eps, neg_k2 = _constants(theta)
        t = torch.addcmul(eps, theta, theta)
        log_t = t.log()
        raw = log_var - log_t
        clipped = low is not None or high is not None
        la = raw.clamp(low, high) if clipped else raw
        s = torch.add(neg_k2, la, alpha=-K3).sigmoid_()
        p = torch.sigmoid(la)
        u = torch.add(p, torch.addcmul(s, s, s, value=-1), alpha=-2 * K1 * K3).sub_(1)  # 2·dKL/du
        # log p in place; the floor keeps it finite where sigmoid underflows (log α < −87 in float32)
        # at 1/6 of logsigmoid's cost; there the KL value saturates, its gradient (from u) stays exact
        kl = torch.add(p.clamp_min_(torch.finfo(p.dtype).tiny).log_(), s, alpha=-2 * K1).mul_(-0.5)
        if clipped:
            u.masked_fill_(raw != la, 0.0)
        d_theta = torch.div(theta, t).mul_(u)  # −dKL/dθ
        ctx.save_for_backward(u, d_theta)
        ctx.mark_non_differentiable(log_t)
        return kl, log_t

    @staticmethod
    def backward(ctx, grad_kl, _grad_log_t):
        u, d_theta = ctx.saved_tensors
        g = _scalar(grad_kl)
        if g is not None:  # the usual case: grad of a (weighted) sum is one broadcast scalar
            return d_theta * (-g), u * (0.5 * g), None, None
        return d_theta * grad_kl.neg(), u * grad_kl * 0.5, None, None


def sparse_vd_terms(q):
    """(elementwise KL, log(θ² + ε)) of an additive-noise Normal ``q`` (``q.loc`` = θ,
    ``q.log_variance`` = log σ², ``q.log_alpha_clip``), computed once and cached on ``q``."""
    cached = getattr(q, "_sparse_vd_terms", None)
    if cached is None:
        low, high = _bounds(q.log_alpha_clip)
        cached = _SparseVDKL.apply(q.loc, q.log_variance, low, high)
        q._sparse_vd_terms = cached
    return cached


def sparse_vd_kl(theta: torch.Tensor, log_var: torch.Tensor, clip=DEFAULT_LOG_ALPHA_CLIP) -> torch.Tensor:
    """Elementwise KL from raw (θ, log σ²) tensors of one shape, log α clipped to ``clip`` =
    ``(low, high)`` (either bound may be None; default: from above only) or None (unclipped)."""
    low, high = _bounds(clip)
    return _SparseVDKL.apply(theta, log_var, low, high)[0]


def _kl_elementwise(q):
    if getattr(q, "log_variance", None) is not None and hasattr(q, "log_alpha_clip"):
        return sparse_vd_terms(q)[0]
    return kl_log_uniform(log_alpha_of_normal(q))


def _kl(q, p):
    return _broadcast(_kl_elementwise(q), p)


def _broadcast(kl, p):
    if p.batch_shape and kl.shape != p.batch_shape:
        kl = kl.expand(torch.broadcast_shapes(kl.shape, p.batch_shape))
    return kl


@register_kl(GuideNormal, LogUniform)
def _kl_guide_normal_log_uniform(q, p):
    return _kl(q, p)


@register_kl(dist.Normal, LogUniform)
def _kl_normal_log_uniform(q, p):
    return _kl(q, p)


@register_kl(torch.distributions.Normal, LogUniform)
def _kl_torch_normal_log_uniform(q, p):
    return _kl(q, p)
