"""Local reparameterisation: the one protocol that guides, priors and layers share.

Kingma, Salimans & Welling (2015): if a layer's weights have a factorised Gaussian posterior
q(w) = N(μ, σ²), its pre-activation b = x·w is Gaussian too, b ~ N(x·μ, x²·σ²). Drawing b instead of w
gives the same marginal per example, lower-variance gradients, and no weight draw at all.

**What a placeholder is.** A guide cannot know whether the model will feed a site's value to a layer
that draws b itself, or use the weights directly. So at a site that may be locally reparameterised it
returns a :class:`Placeholder`: a tensor whose data is the posterior mean μ and which carries q (the
site's Normal, anything with ``loc``, ``scale`` and ``variance``; see :func:`placeholder_of`).

* A **consuming layer** reads ``(μ, σ²)`` with :func:`mean_var` and draws its pre-activations; it never
  computes with the placeholder itself.
* **Anything else** — the user's own code multiplying by the site's value, ``torch.stack`` inside
  ``pyro.infer.Predictive``, a print — gets a real draw: the first torch operation on a placeholder draws
  w = μ + σ·ε once (reparameterised: gradients reach μ and σ), and every later operation on the same
  placeholder sees that same w (:func:`draw`). So the mean is never silently used as if it were a draw,
  also not at a user's site marked ``infer={"local_reparameterization": True}``.
* **Densities.** Pyro's ELBOs evaluate log p and log q at every site's value. At a placeholder both are
  expectations under q: the guide's q gives E_q[log q(w)] (minus the entropy) and a prior following
  :class:`PlaceholderPrior` gives E_q[log p(w)] (exactly, or an unbiased estimate). Their difference is
  −KL(q ‖ p), so ``Trace_ELBO``, ``TraceGraph_ELBO`` and ``TraceMeanField_ELBO`` agree with the closed
  form; where the model's code also consumes a draw, the data term uses it and the ELBO estimate stays
  unbiased (its density terms are Rao–Blackwellised).

**Which sites get one.** A guide with local reparameterisation on places a placeholder at a site with
real support whose prior follows :class:`PlaceholderPrior` (``placeholder_expectation = True``) and whose
``infer`` dict has :data:`LOCAL_REPARAM_KEY` (:func:`wants_placeholder`). A prior that has no density
except at a placeholder (empirical ARD: ``needs_placeholder = True``) gets one at every site, marked not
consumable, so layers draw weights from it (:func:`is_consumable`).

**How a new prior joins.** Implement :class:`PlaceholderPrior`: set ``placeholder_expectation = True`` and
make ``log_prob(value)`` return E_q[log p(w)] (elementwise, the shape ``log_prob`` would have) when
``placeholder_of(value)`` is a q, the ordinary density otherwise. A prior without that expectation simply
does not declare it: its sites are drawn.

**How a new layer joins.** Issue the weight's site with ``infer=consumer_infer(enabled)``, then
``mean, var = mean_var(value)``: ``var is None`` means a drawn weight (use ``mean`` as the weight);
otherwise compute the pre-activation's mean from ``mean`` and its variance from ``var`` and draw it.
pyrobnn's Linear and Conv layers (:mod:`pyrobnn.layers`) do exactly this.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Protocol, Tuple, runtime_checkable

import torch
from torch._C import DisableTorchFunctionSubclass
from torch.utils._pytree import tree_map

__all__ = ["LOCAL_REPARAM_KEY", "NETWORK_KEY", "Placeholder", "PlaceholderPrior", "make_placeholder", "placeholder_of",
           "is_consumable", "mean_var", "draw", "consumer_infer", "expects_placeholders", "needs_placeholders",
           "wants_placeholder"]

#: the ``infer`` key a model site sets to let a guide hand it a placeholder
LOCAL_REPARAM_KEY = "local_reparameterization"
#: the ``infer`` key of every site a pyrobnn layer (or a site-issuing prior inside one) issues: a network
#: weight, which pyrobnn's guides start with a network's small initial scale (:mod:`pyrobnn.guides.base`)
NETWORK_KEY = "pyrobnn_network"


@runtime_checkable
class PlaceholderPrior(Protocol):
    """A prior that evaluates a placeholder as E_q[log p(w)] (see the module doc).

    ``placeholder_expectation``: True when ``log_prob`` does so. ``needs_placeholder`` (optional, default
    False): the prior has no density anywhere else (empirical ARD), so guides place a placeholder at its
    sites whatever their ``infer`` says. ``log_prob(value)``: E_q[log p(w)] at ``placeholder_of(value) = q``,
    the ordinary log-density elsewhere.
    """

    placeholder_expectation: bool

    def log_prob(self, value: torch.Tensor) -> torch.Tensor: ...


# Tensor metadata that reading must not turn a placeholder into a draw (Pyro reads shapes everywhere).
_METADATA = frozenset([
    torch.Tensor.shape.__get__, torch.Tensor.dtype.__get__, torch.Tensor.device.__get__,
    torch.Tensor.ndim.__get__, torch.Tensor.requires_grad.__get__, torch.Tensor.grad_fn.__get__,
    torch.Tensor.is_leaf.__get__, torch.Tensor.layout.__get__, torch.Tensor.dim, torch.Tensor.size,
    torch.Tensor.numel, torch.Tensor.is_floating_point, torch.Tensor.is_complex, torch.Tensor.__len__,
])


class Placeholder(torch.Tensor):
    """The posterior mean of a site, carrying its q; any torch operation on it sees a draw from q instead.

    Made by :func:`make_placeholder`. ``q`` (:func:`placeholder_of`) is the site's Normal; ``consumable``
    (:func:`is_consumable`) whether a layer may draw pre-activations from it instead of using a draw."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _METADATA:
            args, kwargs = tree_map(_drawn, (args, kwargs))
        with DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


def _drawn(v):
    return draw(v) if isinstance(v, Placeholder) else v


def make_placeholder(q, shape: torch.Size, consumable: bool = True) -> Placeholder:
    """The placeholder of q (a Normal with ``loc``, ``scale``, ``variance``) for a value of ``shape``."""
    loc = q.loc
    value = (loc if loc.shape == shape else loc.expand(shape)).as_subclass(Placeholder)
    value._pyrobnn_q = q
    value._pyrobnn_consumable = consumable
    value._pyrobnn_draw = None
    return value


def placeholder_of(value) -> Optional[Any]:
    """The q behind ``value`` if it is a placeholder, else None (cheap on ordinary tensors)."""
    return value.__dict__["_pyrobnn_q"] if type(value) is Placeholder else None


def is_consumable(value) -> bool:
    """Whether a layer may draw pre-activations from this placeholder (False for ordinary tensors)."""
    return type(value) is Placeholder and value.__dict__["_pyrobnn_consumable"]


def draw(value, fresh: bool = False) -> torch.Tensor:
    """A real draw for ``value``: for a placeholder, w = μ + σ·ε, made once and then reused (so every use
    of one site's value sees the same w); an ordinary tensor is returned as is. ``fresh=True``: a new draw
    each call, not cached — what a consuming layer takes, as it draws new pre-activation noise at every
    forward pass (also when one guide trace is replayed several times)."""
    if type(value) is not Placeholder:
        return value
    d = None if fresh else value.__dict__["_pyrobnn_draw"]
    if d is None:
        q = value.__dict__["_pyrobnn_q"]
        with DisableTorchFunctionSubclass():
            loc, scale = q.loc, q.scale
            eps = torch.randn(value.shape, dtype=loc.dtype, device=loc.device)
            d = torch.addcmul(loc, scale, eps)
        if not fresh:
            value._pyrobnn_draw = d
    return d


def mean_var(value) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """What a consuming layer reads: ``(μ, σ²)`` of a consumable placeholder, ``(weight, None)`` for anything
    else (a drawn weight; a non-consumable placeholder is drawn here, afresh: see :func:`draw`)."""
    if is_consumable(value):
        q = value.__dict__["_pyrobnn_q"]
        return q.loc, q.variance
    return draw(value, fresh=True), None


def consumer_infer(enabled: bool = True) -> Dict[str, bool]:
    """The ``infer`` dict a layer gives its weight sites: a network site, locally reparameterised if
    ``enabled`` (a fresh dict each call: Pyro keeps a reference)."""
    return {NETWORK_KEY: True, LOCAL_REPARAM_KEY: True} if enabled else {NETWORK_KEY: True}


def _base(fn):
    while isinstance(fn, torch.distributions.Independent):
        fn = fn.base_dist
    return fn


def expects_placeholders(fn) -> bool:
    """Whether a site's distribution follows :class:`PlaceholderPrior` (under any ``Independent``)."""
    return bool(getattr(_base(fn), "placeholder_expectation", False))


def needs_placeholders(fn) -> bool:
    """Whether a site's distribution has a density only at placeholders (empirical ARD)."""
    return bool(getattr(_base(fn), "needs_placeholder", False))


def wants_placeholder(site: Dict[str, Any], enabled: bool, real: bool) -> Tuple[bool, bool]:
    """``(placeholder, consumable)`` for a model site (a Pyro message) under a guide whose local
    reparameterisation is ``enabled``; ``real``: whether the site's support is the real line."""
    if not real or not expects_placeholders(site["fn"]):
        return False, False
    local = enabled and bool(site["infer"].get(LOCAL_REPARAM_KEY))
    return local or needs_placeholders(site["fn"]), local
