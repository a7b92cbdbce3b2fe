"""Shared machinery of pyrobnn's factorised Gaussian guides.

Every latent site of the model gets an independent Normal in unconstrained space. The variational
parameters of all sites live in two flat vectors (one ``loc``-like, one ``scale``-like) and each site
reads a view of them: Pyro's SVI then sees two parameters instead of two per site, which keeps the
per-step bookkeeping (param-store calls, one optimiser per parameter in ``pyro.optim``) constant in
the number of layers.

Local reparameterisation (the protocol, what a placeholder is and who consumes it: :mod:`pyrobnn.lrt`).
At a site with real support whose prior follows :class:`pyrobnn.lrt.PlaceholderPrior` and that declares
``infer={"local_reparameterization": True}`` (pyrobnn's Bayesian layers do), the guide's value is a
placeholder: the posterior mean carrying q, from which a layer draws its pre-activations; any other use of
the value sees a real draw. At a placeholder the densities are expectations under q — the guide gives
E_q[log q(w)] = −log σ − ½ log 2π − ½, the prior E_q[log p(w)] — so every ELBO that is linear in
log p − log q agrees with the closed-form one: ``TraceMeanField_ELBO`` (which uses the KL, and
``pyrobnn.inference.fit``), ``Trace_ELBO`` and ``TraceGraph_ELBO`` (tests/test_placeholders.py). A site whose
prior does not implement the expectation (a foreign distribution) gets no placeholder: its weights are drawn.

Network sites and generic sites. A site issued by a pyrobnn layer (its ``infer`` carries
:data:`pyrobnn.lrt.NETWORK_KEY`) starts with the small scale a network needs (a network started from its
initial weights with large noise does not train); any other site of a hand-written model starts like Pyro's
``AutoNormal`` (σ = 0.1), unless the guide is given an explicit initial scale.

Improper priors (log-uniform, empirical ARD: ``improper = True``) are never sampled to initialise a guide:
:func:`improper_safe_init` replaces an init strategy that would sample the prior by
:func:`init_to_fan_in` there.
"""
from __future__ import annotations

import functools
import itertools
import math
import weakref
from contextlib import ExitStack
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions.util import sum_rightmost
from pyro.infer.autoguide import AutoGuide
from pyro.infer.autoguide.guides import prototype_hide_fn
from pyro.infer.autoguide.utils import helpful_support_errors
from pyro.infer.autoguide.initialization import (InitMessenger, init_to_feasible, init_to_mean, init_to_median,
                                                 init_to_sample, init_to_uniform)
from torch.distributions import biject_to, constraints
from torch.distributions.kl import _kl_independent_independent, kl_divergence, register_kl

from ..fastpath import gaussian_sums, gaussian_variance_sums
from ..lrt import (LOCAL_REPARAM_KEY, NETWORK_KEY, expects_placeholders, make_placeholder, placeholder_of,
                   wants_placeholder)
from ..site_dist import SiteIndependent, to_site_event

__all__ = ["GuideNormal", "FlatGaussianGuide", "SiteLayout", "local_reparam_params", "mean_field_kl",
           "LOCAL_REPARAM_KEY", "expects_placeholders", "expected_normal_log_prob", "is_improper",
           "init_to_fan_in", "init_to_median_or_fan_in", "improper_safe_init"]

_uid = itertools.count()

#: the pyrobnn site's placeholder's q, if ``value`` is one (an alias of :func:`pyrobnn.lrt.placeholder_of`)
local_reparam_params = placeholder_of


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
                self._var, v = gaussian_variance_sums(self.loc, self.scale)
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
        return torch.dot(sums, _weights(tuple(weights), sums))

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
    kl = torch.dot(sums, _weights((c, c, -1.0, count * (math.log(scale0) - 0.5 + c * loc0 ** 2)), sums))
    return kl if loc0 == 0.0 else kl - (2 * c * loc0) * loc_sum


_WEIGHTS: Dict[tuple, torch.Tensor] = {}


def _weights(values: tuple, like: torch.Tensor) -> torch.Tensor:
    """A constant ``[4]`` tensor of ``values`` (dtype/device of ``like``), reused across steps: a BNN asks
    for the same few (one per site and term) every step."""
    key = (values, like.dtype, like.device)
    w = _WEIGHTS.get(key)
    if w is None:
        if len(_WEIGHTS) > 4096:  # bounded: many distinct sites or priors just rebuild
            _WEIGHTS.clear()
        w = _WEIGHTS[key] = torch.tensor(values, dtype=like.dtype, device=like.device)
    return w


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


def _is_real(support) -> bool:
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real


def _constrain(transform, x):
    return x if transform is None else transform(x)


class _Flat(torch.nn.Module):
    """Plain container so the flat parameters are ordinary ``nn.Parameter`` s (no PyroModule magic)."""


def _release(names):
    store = pyro.get_param_store()
    for n in names:
        if n in store:
            del store[n]


def _prototype_hide(msg):
    return prototype_hide_fn(msg) or bool(msg.get("infer", {}).get("pyrobnn_observation"))


class SiteLayout(NamedTuple):
    """Where one latent site lives in a :class:`FlatGaussianGuide`'s flat parameters, and how it is drawn."""

    offset: int                 #: first element of the site in each flat vector
    size: int                   #: number of elements (the full size along subsampled plates)
    shape: torch.Size           #: unconstrained shape (full plate sizes)
    event_dim: int              #: event dims of the unconstrained value
    transform: Optional[Any]    #: unconstrained → constrained, None for a real site
    local: bool                 #: a layer may draw pre-activations from its placeholder (pyrobnn.lrt)
    placeholder: bool           #: the guide's value is a placeholder (local, or a prior that needs one)
    network: bool               #: issued by a pyrobnn layer (network initial scale) rather than generic


class _SitePlan(NamedTuple):
    """What ``forward`` needs per site, read once from the prototype trace."""

    index: int
    name: str
    shape: torch.Size
    event_dim: int
    transform: Optional[Any]
    placeholder: bool
    local: bool
    frames: tuple               #: the site's vectorised plates
    model_event_dim: int


def is_improper(fn) -> bool:
    """Whether a site's distribution is an improper prior (``improper = True`` under any ``Independent``):
    its ``sample`` only draws a stand-in (see :mod:`pyrobnn.priors.log_uniform`), so no initialisation
    should be taken from it."""
    while isinstance(fn, torch.distributions.Independent):
        fn = fn.base_dist
    return bool(getattr(fn, "improper", False))


def init_to_fan_in(site=None):
    """θ ~ U(−1/√fan_in, 1/√fan_in) with fan_in = prod(shape[1:]) (1 for shapes of fewer than 2 dims):
    PyTorch's default Linear/Conv initialisation, so a layer's weights are not all equal (zero), which
    would make every unit the same. Never samples the prior."""
    if site is None:
        return init_to_fan_in
    shape = site["fn"].shape()
    fan_in = math.prod(shape[1:]) if len(shape) >= 2 else 1
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(shape) * 2 - 1) * bound


def init_to_median_or_fan_in(site=None):
    """:func:`init_to_fan_in` at an improper prior (or one that cannot be sampled), ``init_to_median``
    elsewhere."""
    if site is None:
        return init_to_median_or_fan_in
    if not is_improper(site["fn"]):
        try:
            return init_to_median(site, fallback=None)
        except (ValueError, NotImplementedError):
            pass
    return init_to_fan_in(site)


_SAMPLING_INITS = (init_to_median, init_to_sample, init_to_mean, init_to_feasible, init_to_uniform)


def _samples_prior(init_loc_fn) -> bool:
    fn = init_loc_fn
    while isinstance(fn, functools.partial):
        fn = fn.func
    return fn in _SAMPLING_INITS


def improper_safe_init(init_loc_fn: Callable) -> Callable:
    """``init_loc_fn`` with one change: at an improper prior, where Pyro's strategies (median, sample, mean,
    feasible, uniform) would sample the prior or start every weight at 0, :func:`init_to_fan_in`."""
    if not _samples_prior(init_loc_fn):
        return init_loc_fn

    def init(site=None):
        if site is None:
            return init
        if is_improper(site["fn"]):
            return init_to_fan_in(site)
        return init_loc_fn(site)

    return init


class FlatGaussianGuide(AutoGuide):
    """Base class: subclasses define the two flat parameters and how a site's (loc, scale) is read.

    Subclass hooks:
      * ``_init_flat(init_loc_unconstrained: Tensor[D]) -> dict[name, Tensor[D]]``
      * ``_site_params(flat: dict[name, Tensor], sl: slice, shape) -> (loc, scale, gamma_or_None)``
    """

    _prototype_hide_fn = staticmethod(_prototype_hide)

    #: names of the flat parameters, set by subclasses
    flat_names: Tuple[str, ...] = ()

    def __init__(self, model: Callable, *, init_loc_fn: Callable = init_to_median,
                 local_reparameterization: bool = True, create_plates=None):
        self.init_loc_fn = init_loc_fn
        self.local_reparameterization = bool(local_reparameterization)
        model = InitMessenger(improper_safe_init(init_loc_fn))(model)
        super().__init__(model, create_plates=create_plates)
        self._uname = f"pyrobnn.{type(self).__name__}{next(_uid)}"
        self.flat = _Flat()
        self._layout: Dict[str, SiteLayout] = {}
        self._finalizer = None

    @property
    def flat(self) -> torch.nn.Module:
        """The module holding the flat variational parameters (``flat.<name>``, one vector each).

        Read straight from ``_modules``: ``PyroModule.__getattr__`` would ``pyro.module``-register a plain
        submodule under a class-derived name (``"MeanField.flat$$$loc"``) that every guide of the class
        shares, so the param store would keep the first guide's tensors and ``SVI`` would step them too."""
        return self._modules["flat"]

    # -- set-up -----------------------------------------------------------------------------------
    def _setup_prototype(self, *args, **kwargs):
        super()._setup_prototype(*args, **kwargs)
        inits, networks, offset = [], [], 0
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            support = site["fn"].support
            with helpful_support_errors(site):  # Pyro's messages: enumerate a discrete site, reparameterise a sphere
                transform = biject_to(support)
            init = transform.inv(site["value"].detach()).detach()
            event_dim = site["fn"].event_dim + init.dim() - site["value"].dim()
            full_shape = list(init.shape)
            for frame in site["cond_indep_stack"]:
                full_size = frame.full_size or frame.size
                if full_size != frame.size:
                    dim = frame.dim - event_dim
                    init = pyro.ops.tensor_utils.periodic_repeat(init, full_size, dim).contiguous()
                    full_shape = list(init.shape)
            n = init.numel()
            real = _is_real(support)
            # a prior that implements E_q[log p] at placeholders (exactly, or unbiasedly as the deep weight
            # prior does) needs no closed-form KL: ELBOs fall back to log p − log q there, which is then −KL
            placeholder, local = wants_placeholder(site, self.local_reparameterization, real)
            network = bool(site["infer"].get(NETWORK_KEY))
            self._layout[name] = SiteLayout(offset, n, torch.Size(full_shape), event_dim,
                                            None if real else transform, local, placeholder, network)
            inits.append(init.reshape(-1))
            networks.append(torch.full((n,), network))
            offset += n
        init_flat = torch.cat(inits) if inits else torch.zeros(0)
        network_flat = torch.cat(networks) if networks else torch.zeros(0, dtype=torch.bool)
        self._sizes = [v.size for v in self._layout.values()]
        self._index = {name: i for i, name in enumerate(self._layout)}
        for pname, tensor in self._init_flat(init_flat, network_flat).items():
            setattr(self.flat, pname, torch.nn.Parameter(tensor.detach().clone()))
        self._finalizer = weakref.finalize(self, _release, [f"{self._uname}.{p}" for p in self.flat_names])

    # -- subclass hooks ---------------------------------------------------------------------------
    def _init_flat(self, init_loc: torch.Tensor, network: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Initial flat parameters from the unconstrained initial values; ``network`` (bool, same length)
        marks the elements of network sites (see the module doc for their initial scale)."""
        raise NotImplementedError

    def _site_params(self, flat, i: int, shape) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(loc, scale, gamma-or-None) of site number ``i``; ``flat[p][i]`` is its chunk of parameter p."""
        raise NotImplementedError

    def _site_normal(self, loc, scale, gamma, placeholder) -> GuideNormal:
        """The site's Normal; a subclass may return a GuideNormal subclass carrying more cached terms."""
        return GuideNormal(loc, scale, gamma=gamma, placeholder=placeholder)

    # -- public -----------------------------------------------------------------------------------
    def _flat_params(self, register: bool = True):
        # Registered with Pyro under instance-unique names, so two guides never share parameters
        # through the global param store (and the names are released when the guide is collected).
        # One split per parameter: its backward is a single concatenation, not one scatter per site.
        flat = self._modules["flat"]
        tensors = {p: (pyro.param(f"{self._uname}.{p}", getattr(flat, p)) if register else getattr(flat, p))
                   for p in self.flat_names}
        return self._split_flat(tensors)

    def _split_flat(self, tensors: Dict[str, torch.Tensor]) -> Dict[str, tuple]:
        """Per-site chunks of the flat parameters; a subclass may first transform a whole vector
        (one elementwise op and one graph node instead of one per site)."""
        sizes = self._sizes
        return {p: t.split(sizes) for p, t in tensors.items()}

    def site_params(self, name: str):
        """Unconstrained ``(loc, scale)`` of a site (views of the flat parameters)."""
        i = self._index[name]
        loc, scale, _ = self._site_params(self._flat_params(register=False), i, self._layout[name].shape)
        return loc, scale

    def site_names(self):
        return list(self._layout)

    def _site_plan(self):
        """Per latent site, what ``forward`` needs (a :class:`_SitePlan`), read once from the prototype trace."""
        cached = self.__dict__.get("_plan_cache")
        if cached is not None and cached[0] is self.prototype_trace:
            return cached[1]
        plan = []
        for i, (name, site) in enumerate(self.prototype_trace.iter_stochastic_nodes()):
            lay = self._layout[name]
            frames = tuple(f for f in site["cond_indep_stack"] if f.vectorized)
            plan.append(_SitePlan(i, name, lay.shape, lay.event_dim, lay.transform, lay.placeholder, lay.local,
                                  frames, site["fn"].event_dim))
        self.__dict__["_plan_cache"] = (self.prototype_trace, plan)
        return plan

    def forward(self, *args, **kwargs):
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)
        flat = self._flat_params()
        result = {}
        for i, name, shape, event_dim, transform, placeholder, local, frames, model_event_dim in self._site_plan():
            loc, scale, gamma = self._site_params(flat, i, shape)
            if not frames:  # a global site (every weight of a network): no plate to enter
                result[name] = pyro.sample(name, self._site_dist(loc, scale, gamma, placeholder, event_dim,
                                                                 transform, model_event_dim, local))
                continue
            with ExitStack() as stack:
                for frame in frames:
                    plate = stack.enter_context(plates[frame.name])
                    full_size = frame.full_size or frame.size
                    if full_size != frame.size:
                        dim = frame.dim - event_dim
                        loc = loc.index_select(dim, plate)
                        scale = scale.index_select(dim, plate)
                        gamma = None if gamma is None else gamma.index_select(dim, plate)
                result[name] = pyro.sample(name, self._site_dist(loc, scale, gamma, placeholder, event_dim,
                                                                 transform, model_event_dim, local))
        return result

    def _site_dist(self, loc, scale, gamma, placeholder, event_dim, transform, model_event_dim, local=True):
        base = self._site_normal(loc, scale, gamma, placeholder)
        if placeholder and not local:
            base.consumable = False  # a placeholder only for the prior's densities: layers draw weights
        fn = base.to_event(event_dim) if event_dim else base
        if transform is not None:
            fn = dist.TransformedDistribution(fn, [transform.with_cache()])
            extra = model_event_dim - fn.event_dim
            if extra > 0:
                fn = fn.to_event(extra)
        return fn

    @torch.no_grad()
    def median(self, *args, **kwargs):
        out = {}
        for name in self._layout:
            loc, _ = self.site_params(name)
            out[name] = _constrain(self._layout[name].transform, loc).detach().clone()
        return out

    @torch.no_grad()
    def quantiles(self, quantiles, *args, **kwargs):
        out = {}
        for name in self._layout:
            loc, scale = self.site_params(name)
            q = torch.as_tensor(quantiles, dtype=loc.dtype).reshape((-1,) + (1,) * loc.dim())
            out[name] = _constrain(self._layout[name].transform, dist.Normal(loc, scale).icdf(q))
        return out

    @torch.no_grad()
    def sample_latents(self, num_samples: int = 1, generator: Optional[torch.Generator] = None):
        """``num_samples`` joint draws of every latent site (constrained), shape ``[S, *site_shape]``."""
        out = {}
        for name in self._layout:
            loc, scale = self.site_params(name)
            eps = torch.randn((num_samples,) + tuple(loc.shape), generator=generator, dtype=loc.dtype)
            out[name] = _constrain(self._layout[name].transform, loc + scale * eps)
        return out
