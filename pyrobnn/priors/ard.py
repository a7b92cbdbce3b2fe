"""Automatic relevance determination (ARD): empirical Bayes and a true hierarchy.

Two ways to let every weight (or every group of weights) choose its own prior variance:

* **Empirical Bayes** (:class:`EmpiricalARD`, ``ARD(mode="empirical")``). The prior is N(0, δ_k²)
  per weight and δ_k is *optimised* together with the variational posterior q(w_k) = N(μ_k, σ_k²).
  Maximising the ELBO over δ_k has the closed-form solution δ_k² = μ_k² + σ_k², at which

      KL(q ‖ p) = ½ Σ_k log(1 + μ_k² / σ_k²),

  and with the guide's signal-to-noise parameterisation μ = γ·σ (``MeanField(parameterization=
  "gamma")``) this is ½ Σ_k log(1 + γ_k²): no 0/0 anywhere, σ > 0 always. The KL is registered
  for :class:`~pyrobnn.guides.GuideNormal` (every pyrobnn Gaussian guide, mean-field or additive-noise:
  there μ/σ = 1/√α and the KL is ½ log(1 + 1/α)) and for any ``torch`` Normal, so
  ``pyro.infer.TraceMeanField_ELBO`` uses it. The prior has no density of its own (it depends on q),
  so it can only be used with a variational guide; samplers need the hierarchical mode.

* **Hierarchical** (:class:`HierarchicalARD`, ``ARD(mode="hierarchical")``). A true hierarchy:

      α_g ~ Gamma(a, b)   (rate parameterisation, mean a/b),     w_k ~ N(0, 1/α_{g(k)}),

  with one precision α per weight (``group="weight"``), per input unit (``group="input"``: dim 1 of
  a Linear ``[out, in]`` or Conv ``[out, in, *kernel]`` weight — one relevance per input feature or
  incoming channel, the classic ARD), or per layer (``group="layer"``). The α are ordinary latent
  sites named ``"<weight site>.alpha"``: SVI guides put a (log-normal) variational factor on them,
  samplers sample them in unconstrained space (log α).

Default hyper-parameters of the hierarchy: ``a = 0.1``, ``b = 1e-3`` (shape, rate). Proper, and vague:
mean a/b = 100 but a 90 % interval of [6e-11, 580] and median 0.59, so the precisions start (Pyro
initialises them at the prior median) where they do not crush a freshly initialised network. Two
numbers govern ARD in mean-field VI. For a group of k weights the fixed point is

    E[α] ≈ (a + k/2) / (b + ½ Σ E[w²]),

so a group the data leave at zero climbs to the ceiling ≈ (a + k/2)/b (≥ 600 here: strong pruning)
while a used group settles near k / Σ E[w²]. And the prior mean a/b sets how hard the weights are
shrunk before the data speak: with a = 1, b = 1e-2 (mean 100, median 69) a 4-8-1 ReLU network on 128
points collapses to the constant predictor (every weight pruned, a stable local optimum), while
a = 0.1, b = 1e-3 fits it (tests/test_ard.py). Tipping's a = b = 1e-4 is close to the improper limit
and is refused here: its median (≈ 1e-300) underflows float32, so precisions initialised there are 0.

For *relevance read-outs* (:func:`pyrobnn.relevance`) on standardised data, Gamma(1, 1) and the
``"second-moment"`` statistic E[w²] measured best (docs/studies/ard_relevance.md): with one weight per
α (a single output) α's posterior Gamma(a + ½, b + ½E[w²]) carries little information, and with
a + ½ ≤ 1 its E[1/α] is infinite.
"""
from __future__ import annotations

import math
from typing import Optional

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import TorchDistribution
from torch.distributions import constraints
from torch.distributions.kl import register_kl

from ..guides.base import GuideNormal, expected_normal_log_prob, local_reparam_params
from ..lrt import NETWORK_KEY
from ..registry import PRIORS
from ..validation import positive_float

__all__ = ["ARD", "EmpiricalARD", "HierarchicalARD", "MarginalARD", "empirical_ard_kl", "DEFAULT_A", "DEFAULT_B"]

DEFAULT_A = 0.1
DEFAULT_B = 1e-3
_GROUPS = ("weight", "input", "layer")
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)

_NO_DENSITY = (
    "empirical-Bayes ARD has no fixed density: its variance δ² = μ² + σ² is set from the variational "
    "posterior q(w) = N(μ, σ²), so it is only defined with pyrobnn's guides (pyrobnn.guides.MeanField or "
    "AdditiveNoise, under any of Pyro's ELBOs), which hand its sites a placeholder carrying q; other guides "
    "(e.g. Pyro's AutoNormal) cannot use it. For other guides and for MCMC/SG-MCMC samplers use "
    "ARD(mode='hierarchical'), whose precisions α are real latent sites."
)


# -- empirical Bayes ---------------------------------------------------------------------------------------
class EmpiricalARD(TorchDistribution):
    """N(0, δ²) with δ² at its ELBO optimum μ² + σ² for each weight; scalar, expanded per site.

    Use it like any scalar prior: ``EmpiricalARD().expand(shape).to_event(len(shape))``, or by name
    ``bayesian(net, prior="ard")``. ``batch_shape`` is the weight shape after ``expand``; there are no
    parameters. KL to a Gaussian guide: :func:`empirical_ard_kl`. ``log_prob`` of a value that is not a
    guide's placeholder (:mod:`pyrobnn.lrt`) raises (see the module doc); pyrobnn's guides hand every
    site of this prior a placeholder (``needs_placeholder``), so it works at any site of a hand-written
    model. ``sample`` draws from a stand-in, N(0, 1) (:meth:`stand_in`), only so that a model can be run
    once without a guide (``pyro.infer.Predictive`` does, to find the sites); no density or guide
    initialisation is taken from it (``improper = True``).
    """

    arg_constraints = {}
    support = constraints.real
    # True although it cannot be sampled: a model site's value (replayed from a reparameterised guide)
    # is then differentiable, and Pyro's TraceGraph_ELBO keeps the value — and its placeholder tag — as is
    has_rsample = True
    registry_name = "ard"
    placeholder_expectation = True
    needs_placeholder = True
    improper = True

    def __init__(self, batch_shape=torch.Size(), validate_args=None):
        super().__init__(torch.Size(batch_shape), torch.Size(), validate_args=False)

    def config(self):
        return {"mode": "empirical"}

    def expand(self, batch_shape, _instance=None):
        return EmpiricalARD(batch_shape)

    @property
    def mean(self):
        return torch.zeros(self.batch_shape)

    @property
    def mode(self):
        return torch.zeros(self.batch_shape)

    def stand_in(self) -> dist.TorchDistribution:
        """The distribution :meth:`sample` draws from: N(0, 1) per weight."""
        return dist.Normal(0.0, 1.0).expand(self.batch_shape)

    @torch.no_grad()
    def sample(self, sample_shape=torch.Size()):
        """A draw from :meth:`stand_in` (the prior has no density of its own; see the class doc)."""
        return self.stand_in().sample(sample_shape)

    def rsample(self, sample_shape=torch.Size()):
        return self.sample(sample_shape)

    def log_prob(self, value):
        """E_q[log N(w; 0, δ²)] with δ² = μ² + σ² (the prior at its optimum), −½ log δ² − ½ log 2π − ½,
        for a guide placeholder ``value``.

        A locally reparameterised guide hands the model the posterior mean tagged with its q, so the
        optimum prior is known here, and the placeholder's density is an expectation under q (see
        :mod:`pyrobnn.guides.base`): minus the guide's E_q[log q] it is exactly −KL, so ``Trace_ELBO``
        agrees with the closed form. Any other value (a sampler's proposal, a plain draw) has no
        defined density: ValueError.
        """
        q = local_reparam_params(value)
        if q is None:
            raise ValueError(_NO_DENSITY)
        loc_sq = q.loc_sq if hasattr(q, "loc_sq") else q.loc * q.loc
        return (q.variance + loc_sq).log().mul(-0.5).sub_(_HALF_LOG_2PI + 0.5)

    def __repr__(self):
        return f"EmpiricalARD(batch_shape={tuple(self.batch_shape)})"


class _HalfLog1pRatioSq(torch.autograd.Function):
    """½ log(1 + (μ/σ)²) with hand-written gradients that stay finite as σ → 0.

    Autograd through μ/σ would form μ/σ² for ∂/∂σ, which underflows to μ/0 = ∞ in float32 for
    σ ≲ 1e-19 although the true derivative −μ²/(σ(μ² + σ²)) ≈ −1/σ is representable. Writing it as
    −(r²/(1 + r²))/σ and ∂/∂μ as (r/(1 + r²))/σ, r = μ/σ, keeps every intermediate in range.
    """

    @staticmethod
    def forward(ctx, loc, scale):
        ratio = loc / scale
        ctx.save_for_backward(ratio, scale)
        ctx.shapes = (loc.shape, scale.shape)
        return torch.hypot(ratio, ratio.new_ones(())).log()

    @staticmethod
    def backward(ctx, grad):
        ratio, scale = ctx.saved_tensors
        ratio_sq = ratio * ratio
        # d/dr ½ log(1 + r²) = r / (1 + r²), written as 1 / (r + 1/r) where r² could overflow
        d_ratio = torch.where(ratio.abs() > 1, 1.0 / (ratio + 1.0 / ratio), ratio / (1.0 + ratio_sq))
        share = 1.0 / (1.0 + 1.0 / ratio_sq)  # r² / (1 + r²); exactly 0 at r = 0
        grad_loc = grad * d_ratio / scale
        grad_scale = -grad * share / scale
        loc_shape, scale_shape = ctx.shapes
        return grad_loc.sum_to_size(loc_shape), grad_scale.sum_to_size(scale_shape)


def empirical_ard_kl(loc: torch.Tensor, scale: torch.Tensor, gamma: Optional[torch.Tensor] = None) -> torch.Tensor:
    """min_δ KL(N(μ, σ²) ‖ N(0, δ²)) = ½ log(1 + μ²/σ²) elementwise (δ² = μ² + σ²).

    With ``gamma`` (= μ/σ as a free parameter) it is ½ log(1 + γ²) and σ does not enter. Both are
    computed as log hypot(1, r), so r² never overflows; value and gradients are finite for μ → 0
    (exactly 0 gradient at μ = 0) and for σ → 0 (σ > 0), see :class:`_HalfLog1pRatioSq`.
    """
    if gamma is not None:
        return torch.hypot(gamma, gamma.new_ones(())).log()
    return _HalfLog1pRatioSq.apply(loc, scale)


@register_kl(GuideNormal, EmpiricalARD)
def _kl_guidenormal_empirical_ard(q, p):
    return empirical_ard_kl(q.loc, q.scale, q.gamma)


@register_kl(torch.distributions.Normal, EmpiricalARD)
def _kl_normal_empirical_ard(q, p):
    return empirical_ard_kl(q.loc, q.scale, getattr(q, "gamma", None))


# -- hierarchical --------------------------------------------------------------------------------------------
class _ScalarGamma(dist.Gamma):
    """Gamma(a, b) with Python-float a, b broadcast to ``batch_shape``: the log-density uses the floats,
    so it works on whatever device the value lives on (the hyper-prior holds no device tensors)."""

    def __init__(self, a: float, b: float, batch_shape=torch.Size()):
        self.scalar_a, self.scalar_b = float(a), float(b)
        batch_shape = torch.Size(batch_shape)
        super().__init__(torch.tensor(self.scalar_a).expand(batch_shape),
                         torch.tensor(self.scalar_b).expand(batch_shape), validate_args=False)
        self._log_norm = self.scalar_a * math.log(self.scalar_b) - math.lgamma(self.scalar_a)

    def expand(self, batch_shape, _instance=None):
        return _ScalarGamma(self.scalar_a, self.scalar_b, batch_shape)

    def log_prob(self, value):
        a, b = self.scalar_a, self.scalar_b
        lp = -b * value + self._log_norm
        return lp if a == 1.0 else lp + (a - 1.0) * value.log()


class _PlaceholderNormal(dist.Normal):
    """N(loc, scale²) (tensor parameters) whose density at a local-reparameterisation placeholder of q is
    E_q[log p(w)] (see :mod:`pyrobnn.guides.base`); an ordinary Normal everywhere else (torch's
    Normal–Normal KL applies)."""

    placeholder_expectation = True

    def expand(self, batch_shape, _instance=None):
        return super().expand(batch_shape, _instance=_instance or _PlaceholderNormal.__new__(_PlaceholderNormal))

    def log_prob(self, value):
        q = local_reparam_params(value)
        if q is not None:
            return expected_normal_log_prob(q, self.loc, self.scale)
        return super().log_prob(value)


class MarginalARD(TorchDistribution):
    """Hierarchical ARD with its precisions integrated out: what ``HierarchicalARD(...).expand(shape)`` is.

    For a group of k weights sharing one α ~ Gamma(a, b) (rate b), w | α ~ N(0, 1/α):

        log p(w_g) = a log b − log Γ(a) + log Γ(a + k/2) − (a + k/2) log(b + ½ Σ_g w²) − (k/2) log 2π,

    a multivariate Student-t (per weight, k = 1: Student-t with 2a degrees of freedom and scale √(b/a)).
    ``group="weight"``: ``batch_shape = shape`` (independent weights, elementwise). ``"input"`` / ``"layer"``:
    weights that share an α are dependent, so the whole weight tensor is one event (``event_shape = shape``,
    ``to_event(k)`` with k ≤ its dims leaves it so). ``sample`` draws α then w. There is no closed-form
    E_q[log p] (no placeholder: a guide draws these weights) and no closed-form KL (``TraceMeanField_ELBO``
    estimates it with one draw). Use it as an ordinary distribution at a hand-written model's site; to keep
    α as a latent site (for its posterior, or for samplers), use ``bayesian(net, prior=ARD(mode="hierarchical"))``
    or :meth:`HierarchicalARD.sample_site`.
    """

    arg_constraints: dict = {}
    support = constraints.real
    has_rsample = True  # see EmpiricalARD: a replayed guide value stays differentiable

    def __init__(self, group: str, a: float, b: float, shape, validate_args=None):
        self.group, self.a, self.b = group, float(a), float(b)
        shape = torch.Size(shape)
        self.weight_shape = shape
        if group == "weight":
            super().__init__(shape, torch.Size(), validate_args=False)
        else:
            super().__init__(torch.Size(), shape, validate_args=False)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        if self.group == "weight":
            return MarginalARD("weight", self.a, self.b, batch_shape)
        if batch_shape == self.batch_shape:
            return self
        raise ValueError(f"hierarchical ARD (group={self.group!r}) couples the weights that share a precision, so "
                         f"its weight tensor {tuple(self.weight_shape)} is one event and cannot take a batch shape "
                         f"{tuple(batch_shape)}; expand the prior to the whole weight shape instead")

    def to_event(self, reinterpreted_batch_ndims=None):
        if self.group != "weight":
            n = len(self.weight_shape) if reinterpreted_batch_ndims is None else reinterpreted_batch_ndims
            if n > len(self.weight_shape):
                raise ValueError(f"to_event({n}) on a hierarchical ARD weight of {len(self.weight_shape)} dims")
            return self  # already one event over the whole weight
        return super().to_event(reinterpreted_batch_ndims)

    def _group_dims(self, value):
        """Dims of ``value`` summed within a group (the weight's, at the right of ``value``)."""
        nd = len(self.weight_shape)
        dims = list(range(value.dim() - nd, value.dim()))
        if self.group == "input" and nd >= 2:
            dims.pop(1)  # one α per input unit: dim 1 of [out, in, *kernel]
        return dims

    def log_prob(self, value):
        a, b = self.a, self.b
        if self.group == "weight":
            half_k, sq = 0.5, value * value * 0.5
        else:
            dims = self._group_dims(value)
            half_k = 0.5 * math.prod(value.shape[d] for d in dims)
            sq = (value * value).sum(dims) * 0.5
        const = a * math.log(b) - math.lgamma(a) + math.lgamma(a + half_k) - half_k * 2 * _HALF_LOG_2PI
        lp = (sq + b).log() * -(a + half_k) + const
        if self.group == "input" and len(self.weight_shape) >= 2:
            lp = lp.sum(-1)  # one term per input unit's group
        return lp

    @torch.no_grad()
    def sample(self, sample_shape=torch.Size()):
        shape = torch.Size(sample_shape) + self.weight_shape
        hier = HierarchicalARD(self.group, self.a, self.b, _check=False)
        ashape = torch.Size(sample_shape) + hier.alpha_shape(self.weight_shape)
        alpha = torch.distributions.Gamma(torch.tensor(self.a), torch.tensor(self.b)).sample(ashape)
        alpha = alpha.clamp_min(torch.finfo(alpha.dtype).tiny)
        if self.group == "input" and len(self.weight_shape) >= 2:
            alpha = alpha.unsqueeze(-2).reshape(alpha.shape[:-1] + (1, alpha.shape[-1]) + (1,) * (len(self.weight_shape) - 2))
        elif self.group == "layer":
            alpha = alpha.reshape(alpha.shape + (1,) * len(self.weight_shape))
        return torch.randn(shape) * alpha.rsqrt()

    def rsample(self, sample_shape=torch.Size()):
        return self.sample(sample_shape)

    def __repr__(self):
        return f"MarginalARD(group={self.group!r}, a={self.a}, b={self.b}, shape={tuple(self.weight_shape)})"


class HierarchicalARD:
    """α ~ Gamma(a, b) per weight / input unit / layer, then w ~ N(0, 1/α) (see the module doc).

    A site-issuing prior: the Bayesian layer calls :meth:`sample_site` for each of its parameters, which
    issues α as its own latent site. As an ordinary distribution at a hand-written model's site,
    ``HierarchicalARD(...).expand(shape).to_event(k)`` is the marginal over α (:class:`MarginalARD`).

    :param group: ``"input"`` (default) — one α per input unit: shape ``[in]`` for a ``[out, in, *k]``
        weight; a 1-d parameter (a bias) has no input dimension and gets one α for the whole site.
        ``"weight"`` — α of the parameter's own shape. ``"layer"`` — one scalar α per site.
    :param a: Gamma shape (> 0). :param b: Gamma rate (> 0). Defaults :data:`DEFAULT_A`, :data:`DEFAULT_B`.
    """

    registry_name = "ard"

    def __init__(self, group: str = "input", a: float = DEFAULT_A, b: float = DEFAULT_B, _check: bool = True):
        if not _check:
            self.group, self.a, self.b = group, float(a), float(b)
            return
        if group not in _GROUPS:
            raise ValueError(f"hierarchical ARD group must be one of {', '.join(_GROUPS)}; got {group!r}")
        positive_float("ARD Gamma shape a", a)
        positive_float("ARD Gamma rate b", b)
        if a < 1:
            # Pyro starts α at a median of prior draws; for small a the median ≈ (Γ(a + 1)/2)^(1/a) / b
            # (a = b = 1e-3: ≈ 1e-299) underflows float32 to α = 0, w ~ N(0, ∞), and SVI fails with NaN.
            log10_median = ((math.lgamma(a + 1.0) - math.log(2.0)) / a - math.log(b)) / math.log(10.0)
            if log10_median < -20:
                raise ValueError(f"ARD Gamma({a:g}, {b:g}) has median ≈ 1e{log10_median:.0f}: precisions "
                                 f"initialised there underflow float32 to 0 (NaN loss). Use a larger shape a "
                                 f"(e.g. the default a = {DEFAULT_A}) or a smaller rate b")
        self.group, self.a, self.b = group, float(a), float(b)
        self._hyper = _ScalarGamma(self.a, self.b)

    def config(self):
        return {"mode": "hierarchical", "group": self.group, "a": self.a, "b": self.b}

    def expand(self, shape) -> MarginalARD:
        """The prior of a weight of ``shape`` with α integrated out (:class:`MarginalARD`)."""
        return MarginalARD(self.group, self.a, self.b, shape)

    def alpha_shape(self, shape) -> torch.Size:
        """Shape of the α site for a parameter of shape ``shape``."""
        shape = torch.Size(shape)
        if self.group == "weight":
            return shape
        if self.group == "input" and len(shape) >= 2:
            return shape[1:2]
        return torch.Size()

    def _broadcastable(self, alpha, shape):
        if self.group == "input" and len(shape) >= 2:
            return alpha.reshape((shape[1],) + (1,) * (len(shape) - 2))
        return alpha

    def sample_site(self, name: str, shape, infer: Optional[dict] = None) -> torch.Tensor:
        """Issue ``f"{name}.alpha"`` (shape :meth:`alpha_shape`) and ``name`` (shape ``shape``); return w."""
        shape = torch.Size(shape)
        ashape = self.alpha_shape(shape)
        hyper = self._hyper.expand(ashape)
        infer = infer or {}
        # α belongs to the same network as its weight (a network site for the guide's initial scale)
        alpha_infer = {NETWORK_KEY: True} if infer.get(NETWORK_KEY) else {}
        alpha = pyro.sample(f"{name}.alpha", hyper.to_event(len(ashape)) if len(ashape) else hyper, infer=alpha_infer)
        scale = self._broadcastable(alpha, shape).rsqrt().expand(shape)
        prior = _PlaceholderNormal(scale.new_zeros(()).expand(shape), scale)
        return pyro.sample(name, prior.to_event(len(shape)) if len(shape) else prior, infer=infer)

    def __repr__(self):
        return f"HierarchicalARD(group={self.group!r}, a={self.a}, b={self.b})"


# -- by name -------------------------------------------------------------------------------------------------
def ARD(mode: str = "empirical", group: Optional[str] = None, a: float = DEFAULT_A, b: float = DEFAULT_B):
    """Automatic relevance determination prior (registered as ``"ard"``).

    :param mode: ``"empirical"`` → :class:`EmpiricalARD` (one optimal variance per weight; variational
        guides only); ``"hierarchical"`` → :class:`HierarchicalARD` (Gamma-distributed precisions).
    :param group: hierarchical only: ``"input"`` (default), ``"weight"`` or ``"layer"``. Empirical ARD
        is per weight (``None`` or ``"weight"``).
    :param a: hierarchical only: the shape of the Gamma(a, b) on the precisions.
    :param b: hierarchical only: the rate of that Gamma.
    """
    if mode == "empirical":
        if group not in (None, "weight"):
            raise ValueError(f"empirical-Bayes ARD sets one variance per weight; group must be None or 'weight', "
                             f"got {group!r} (use mode='hierarchical' for per-input groups)")
        if (a, b) != (DEFAULT_A, DEFAULT_B):
            raise ValueError("empirical-Bayes ARD has no hyper-prior; a and b apply to mode='hierarchical' only")
        return EmpiricalARD()
    if mode == "hierarchical":
        return HierarchicalARD(group="input" if group is None else group, a=a, b=b)
    raise ValueError(f"ARD mode must be 'empirical' or 'hierarchical', got {mode!r}")


PRIORS.register("ard", ARD)


@PRIORS.register("ard-empirical")
def _ard_empirical():
    return EmpiricalARD()


@PRIORS.register("ard-hierarchical")
def _ard_hierarchical(group: str = "input", a: float = DEFAULT_A, b: float = DEFAULT_B):
    return HierarchicalARD(group=group, a=a, b=b)
