"""The Normal a pyrobnn guide puts at a site (:class:`GuideNormal`), and the closed-form KLs pyrobnn registers
for it: to a scalar Normal prior over a whole weight tensor (four reductions and one dot product), and to a
Normal elementwise. The densities at a local-reparameterisation placeholder are expectations under q
(:mod:`pyrobnn.lrt`)."""
from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch.distributions.kl import _kl_independent_independent, register_kl

from ..fastpath import constant_tensor, gaussian_sums, gaussian_variance_sums, site_gaussian_terms
from ..lrt import make_placeholder, placeholder_of
from ..site_dist import SiteIndependent, to_site_event

__all__ = ["GuideNormal", "SiteTerms", "expected_normal_log_prob", "mean_field_kl"]


class SiteTerms:
    """The σ² and ``[Σμ², Σσ², Σ log σ, 1]`` of every site of a flat guide, from one autograd node
    (:func:`pyrobnn.fastpath.site_gaussian_terms`), made on the first site's demand and shared by all: a step's
    sites then cost one node for their variances and KL reductions, not one each. ``terms.site(i)`` is a callable
    giving site ``i`` its ``(σ², sums)``; a :class:`GuideNormal` that holds one uses it instead of its own node."""

    __slots__ = ("loc", "scale", "sizes", "shapes", "in_range", "var", "sums")

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, sizes, shapes, in_range: bool = False):
        self.loc, self.scale, self.sizes, self.shapes, self.in_range = loc, scale, sizes, shapes, in_range
        self.var = self.sums = None

    def site(self, i: int):
        return lambda: self._get(i)

    def _get(self, i):
        if self.var is None:
            self.var, sums = site_gaussian_terms(self.loc, self.scale, self.sizes, self.shapes, self.in_range)
            self.sums = sums.unbind(0)
        return self.var[i], self.sums[i]


class GuideNormal(dist.Normal):
    """The Normal a pyrobnn guide puts at a site.

    ``gamma`` (optional) is the signal-to-noise ratio μ/σ when the guide is parameterised by it, so
    KL rules can use the exact, 0/0-free form (ARD). ``placeholder=True`` marks a locally
    reparameterised site: :meth:`rsample` returns the mean tagged with this distribution instead of
    a draw. ``log σ`` and ``σ²`` are computed once and shared by the KL, the log-density and the layer.
    """

    def __init__(self, loc, scale, gamma=None, placeholder=False, validate_args=False, consumable=True):
        if (validate_args is False and type(loc) is torch.Tensor and type(scale) is torch.Tensor
                and loc.shape == scale.shape and loc.dtype == scale.dtype and loc.device == scale.device):
            # what Normal.__init__ ends with for two same-shape tensors and no validation (a guide site on
            # the hot path), without its broadcast_all and Distribution.__init__ checks
            self.loc, self.scale = loc, scale
            self._batch_shape, self._event_shape = loc.shape, torch.Size()
            self._validate_args = False
        else:
            super().__init__(loc, scale, validate_args=validate_args)
        self.gamma = gamma
        self.placeholder = placeholder
        self.consumable = consumable
        self._log_scale = None
        self._var = None
        self._loc_sq = None
        self._sums = {}
        self._terms = None

    def to_event(self, reinterpreted_batch_ndims=None):
        return to_site_event(self, reinterpreted_batch_ndims)

    def _sum(self, key, fn):
        """Cached full reductions (Σμ², Σσ², Σ log σ, Σμ) shared by the KL and the log-densities."""
        v = self._sums.get(key)
        if v is None:
            v = self._sums[key] = fn()
        return v

    def fused_sums(self) -> torch.Tensor:
        """``[Σμ², Σσ², Σ log σ, 1]`` (shape ``[4]``) from one autograd node (:func:`pyrobnn.fastpath.gaussian_sums`),
        cached: the closed-form KL to a scalar Normal prior is one dot product with it, and the
        log-densities at a local-reparameterisation placeholder read entries of it."""
        v = self._sums.get("fused")
        if v is None:
            if self._var is None and self._fuse_variance():
                self._var, v = self._terms() if self._terms is not None else gaussian_variance_sums(self.loc, self.scale)
            else:
                v = gaussian_sums(self.loc, self.scale)
            self._sums["fused"] = v
        return v

    def _fuse_variance(self):
        # σ² (the layer's) and the sums (the KL's) from one node, when a backward will run through both
        return self._fusable() and torch.is_grad_enabled() and (self.loc.requires_grad or self.scale.requires_grad)

    def _fusable(self):
        # subclasses derive σ, log σ differently (additive noise: from log σ²); they keep their own sums
        return type(self) is GuideNormal

    def loc_sq_sum(self):
        if self._fusable():
            return self._sum("loc_sq", lambda: self.fused_sums()[0])
        flat = self.loc.reshape(-1)
        return self._sum("loc_sq", lambda: torch.dot(flat, flat))

    def var_sum(self):
        if self._fusable():
            return self._sum("var", lambda: self.fused_sums()[1])
        return self._sum("var", lambda: self.variance.sum())

    def log_scale_sum(self):
        if self._fusable():
            return self._sum("log_scale", lambda: self.fused_sums()[2])
        return self._sum("log_scale", lambda: self.log_scale.sum())

    def loc_sum(self):
        return self._sum("loc", lambda: self.loc.sum())

    def log_prob_sum(self, value):
        """Σ E_q[log q] at the placeholder: −Σ log σ − n(½ log 2π + ½) (the negative entropy); None for
        any other value."""
        if placeholder_of(value) is not self:
            return None
        n = self.loc.numel()
        if self._fusable():
            return self.combine_sums((0.0, 0.0, -1.0, -_NEG_ENTROPY_CONST * n))
        return torch.rsub(self.log_scale_sum(), -_NEG_ENTROPY_CONST * n)

    def combine_sums(self, weights) -> torch.Tensor:
        """w₀Σμ² + w₁Σσ² + w₂Σ log σ + w₃ (a 0-d tensor): one dot product with :meth:`fused_sums`."""
        sums = self.fused_sums()
        return torch.dot(sums, constant_tensor(tuple(weights), sums))

    @property
    def loc_sq(self):
        """The squared mean μ² (cached), shared by the KL and the prior's log-density at the placeholder."""
        if self._loc_sq is None:
            self._loc_sq = self.loc * self.loc
        return self._loc_sq

    @property
    def log_scale(self):
        if self._log_scale is None:
            self._log_scale = self.scale.log()
        return self._log_scale

    @property
    def variance(self):
        if self._var is None:
            if "fused" not in self._sums and self._fuse_variance():
                self.fused_sums()
            else:
                self._var = self.scale * self.scale
        return self._var

    def expand(self, batch_shape, _instance=None):
        new = super().expand(batch_shape, _instance=_instance or GuideNormal.__new__(GuideNormal))
        new.gamma = None if self.gamma is None else self.gamma.expand(batch_shape)
        new.placeholder = self.placeholder
        new.consumable = self.consumable
        new._log_scale = None
        new._var = None
        new._loc_sq = None
        new._sums = {}
        new._terms = None
        return new

    def rsample(self, sample_shape=torch.Size()):
        if not self.placeholder:
            return super().rsample(sample_shape)
        return make_placeholder(self, self._extended_shape(sample_shape), self.consumable)

    def log_prob(self, value):
        if placeholder_of(value) is self:
            # at the placeholder: E_q[log q(w)] = −log σ − ½ log 2π − ½ (see the module doc)
            return torch.rsub(self.log_scale, -_NEG_ENTROPY_CONST)
        return super().log_prob(value)


_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
#: E_q[log q] = −log σ − this, for a Normal q
_NEG_ENTROPY_CONST = _HALF_LOG_2PI + 0.5


def expected_normal_log_prob(q, loc, scale) -> torch.Tensor:
    """E_q[log N(w; loc, scale²)] elementwise for a Normal q: −((μ − loc)² + σ²) / (2 scale²) − log scale
    − ½ log 2π (``loc``, ``scale``: tensors or floats broadcastable to q's shape)."""
    if isinstance(scale, torch.Tensor):
        diff2 = (q.loc - loc) ** 2
        return -(diff2 + q.variance) / (2 * scale * scale) - scale.log() - _HALF_LOG_2PI
    diff2 = q.loc_sq if (loc == 0.0 and hasattr(q, "loc_sq")) else (q.loc - loc) ** 2
    return (q.variance + diff2).mul(-0.5 / scale ** 2).sub_(math.log(scale) + _HALF_LOG_2PI)


def mean_field_kl(loc: torch.Tensor, scale: torch.Tensor, prior_scale: float, prior_loc: float = 0.0) -> torch.Tensor:
    """Σ KL(N(μ, σ²) ‖ N(m, s²)) over all elements of ``loc``/``scale`` (same shape), a 0-d tensor,
    with one :func:`pyrobnn.fastpath.gaussian_sums` node: c·(Σσ² + Σμ²) − Σ log σ + n(log s − ½) with c = 1/(2s²)
    (for m ≠ 0, Σ(μ − m)² = Σμ² − 2mΣμ + n·m²)."""
    prior_loc = float(prior_loc)
    return _kl_from_sums(gaussian_sums(loc, scale), loc.sum() if prior_loc != 0.0 else None, loc.numel(),
                         float(prior_scale), prior_loc)


def _kl_from_sums(sums, loc_sum, count, scale0, loc0):
    c = 0.5 / scale0 ** 2
    kl = torch.dot(sums, constant_tensor((c, c, -1.0, count * (math.log(scale0) - 0.5 + c * loc0 ** 2)), sums))
    return kl if loc0 == 0.0 else kl - (2 * c * loc0) * loc_sum


def _scalar(t: torch.Tensor):
    """The single value of a tensor that is a broadcast scalar (all strides 0), else None."""
    if t.dim() == 0 or all(st == 0 for st in t.stride()):
        return t.reshape(-1)[:1].reshape(())
    return None


@register_kl(SiteIndependent, SiteIndependent)
def _kl_site(q: SiteIndependent, p: SiteIndependent):
    """Whole weight tensor, Normal guide, scalar Normal prior: the summed KL from four reductions,
    c·(Σσ² + Σ(μ − m)²) − Σ log σ + n(log s − ½), instead of an elementwise KL and a sum."""
    qb, pb = q.base_dist, p.base_dist
    scale0 = getattr(pb, "scalar_scale", None)
    n = len(qb.batch_shape)
    if (isinstance(qb, GuideNormal) and scale0 is not None and q.reinterpreted_batch_ndims == n
            and p.reinterpreted_batch_ndims == n and qb.batch_shape == pb.batch_shape):
        loc0, count = pb.scalar_loc, qb.loc.numel()
        if qb._fusable():  # one autograd node for the reductions, one dot product for the KL
            return _kl_from_sums(qb.fused_sums(), qb.loc_sum() if loc0 != 0.0 else None, count, scale0, loc0)
        sq = qb.loc_sq_sum()
        if loc0 != 0.0:
            sq = sq - 2 * loc0 * qb.loc_sum() + count * loc0 ** 2
        return (qb.var_sum() + sq) * (0.5 / scale0 ** 2) - qb.log_scale_sum() + count * (math.log(scale0) - 0.5)
    return _kl_independent_independent(q, p)


@register_kl(GuideNormal, dist.Normal)
def _kl_guide_normal(q: GuideNormal, p: dist.Normal):
    """KL(N(μ, σ²) ‖ N(m, s²)) = log s − log σ + (σ² + (μ − m)²) / (2 s²) − ½, with cached log σ, σ²."""
    loc0, scale0 = getattr(p, "scalar_loc", None), getattr(p, "scalar_scale", None)
    if scale0 is not None:  # pyrobnn's expanded scalar priors carry Python floats: no syncs, fewest ops
        diff2 = q.loc_sq if loc0 == 0.0 else (q.loc - loc0) ** 2
        # in place on fresh temporaries: fewer allocations on the hot path (autograd-safe: no saved outputs)
        return (q.variance + diff2).mul_(0.5 / scale0 ** 2).sub_(q.log_scale).add_(math.log(scale0) - 0.5)
    m, s = _scalar(p.loc), _scalar(p.scale)
    if s is not None and m is not None:
        return (q.variance + (q.loc - m) ** 2) * (0.5 / (s * s)) - q.log_scale + (s.log() - 0.5)
    var_p = p.scale * p.scale
    return (q.variance + (q.loc - p.loc) ** 2) / (2 * var_p) - q.log_scale + p.scale.log() - 0.5
