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
:func:`pyrobnn.guides.init.improper_safe_init` replaces an init strategy that would sample the prior by
:func:`pyrobnn.guides.init.init_to_fan_in` there. The Normal at each site and its KLs: :mod:`pyrobnn.guides.normal`.
"""
from __future__ import annotations

import itertools
import weakref
from contextlib import ExitStack
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoGuide
from pyro.infer.autoguide.guides import prototype_hide_fn
from pyro.infer.autoguide.utils import helpful_support_errors
from pyro.infer.autoguide.initialization import InitMessenger, init_to_median
from torch.distributions import biject_to

from ..lrt import LOCAL_REPARAM_KEY, NETWORK_KEY, expects_placeholders, placeholder_of, wants_placeholder
from ..site_dist import is_real_support as _is_real
from .init import improper_safe_init, init_to_fan_in, init_to_median_or_fan_in, is_improper
from .normal import GuideNormal, expected_normal_log_prob, mean_field_kl

__all__ = ["GuideNormal", "FlatGaussianGuide", "SiteLayout", "local_reparam_params", "mean_field_kl",
           "LOCAL_REPARAM_KEY", "expects_placeholders", "expected_normal_log_prob", "is_improper",
           "init_to_fan_in", "init_to_median_or_fan_in", "improper_safe_init"]

_uid = itertools.count()

#: the pyrobnn site's placeholder's q, if ``value`` is one (an alias of :func:`pyrobnn.lrt.placeholder_of`)
local_reparam_params = placeholder_of


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
        terms = flat.get("terms")
        result = {}
        for i, name, shape, event_dim, transform, placeholder, local, frames, model_event_dim in self._site_plan():
            loc, scale, gamma = self._site_params(flat, i, shape)
            if not frames:  # a global site (every weight of a network): no plate to enter
                result[name] = pyro.sample(name, self._site_dist(loc, scale, gamma, placeholder, event_dim,
                                                                 transform, model_event_dim, local,
                                                                 None if terms is None else terms.site(i)))
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

    def _site_dist(self, loc, scale, gamma, placeholder, event_dim, transform, model_event_dim, local=True,
                   terms=None):
        base = self._site_normal(loc, scale, gamma, placeholder)
        base._terms = terms  # the site's share of the guide's one σ²-and-sums node (guides.normal.SiteTerms)
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
            # drawn where the generator lives (the CPU's unless given another), then moved to the site's device
            eps = torch.randn((num_samples,) + tuple(loc.shape), generator=generator, dtype=loc.dtype,
                              device=generator.device if generator is not None else loc.device).to(loc.device)
            out[name] = _constrain(self._layout[name].transform, loc + scale * eps)
        return out
