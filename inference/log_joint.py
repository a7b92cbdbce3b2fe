"""The SG-MCMC kernels' potential: a model's log joint at given latent values, in one pass without a trace.

Sites whose prior is a Normal with one constant loc and scale are summed together by one fused node
(:func:`pyrobnn.fastpath.sum_scaled_squared_norms`), and a plain ``Categorical`` observed at a batch of integer
labels is summed by one ``nll_loss``; see :class:`LogJoint`."""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions.util import scale_and_mask
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample
from torch.distributions import Categorical, Independent, Normal

from pyrobnn.fastpath import sum_scaled_squared_norms

__all__ = ["LogJoint", "scalar_normal_plan", "add_prior_gradients"]


class _LogJoint(Messenger):
    """Fixes latent sites to given values and accumulates Σ_sites scale·mask·log p in one pass (no trace).

    Sites whose distribution is a Normal with one constant loc and scale broadcast to the site (every
    weight of a BNN with a Gaussian prior, and ``PyroSample(dist.Normal(0., 1.).expand(shape).to_event(k))``
    in a hand-written ``PyroModule``) are not evaluated one by one: their values are collected and
    :meth:`log_joint` adds all their log-densities with one fused autograd node
    (:func:`pyrobnn.fastpath.sum_scaled_squared_norms`). The same number as ``log_prob(value).sum()``, fewer passes."""

    def __init__(self, values: Dict[str, torch.Tensor]):
        super().__init__()
        self.values = values
        self.terms: List[torch.Tensor] = []
        self.sq_values: List[torch.Tensor] = []
        self.sq_coefs: List[float] = []
        self.sq_sources: List[torch.Tensor] = []   # each fused site's value as the model received it
        self.constant = 0.0

    def _pyro_sample(self, msg):
        if msg["is_observed"] or isinstance(msg["fn"], _Subsample):
            return
        try:
            msg["value"] = self.values[msg["name"]]
        except KeyError:
            raise ValueError(f"the model issued a latent site {msg['name']!r} that its first run did not have; "
                             "SG-MCMC kernels need a fixed set of latent sites") from None
        msg["is_observed"] = True

    def _pyro_post_sample(self, msg):
        fn = msg["fn"]
        if isinstance(fn, _Subsample):
            return
        value = msg["value"]
        scale = msg["scale"]
        if msg["mask"] is None and isinstance(scale, (int, float)) and not msg["args"] and not msg["kwargs"]:
            plan = _scalar_normal_plan(fn)
            if plan is not None and value.shape == plan[0]:
                _, loc, coef, constant = plan
                self.sq_values.append(value if loc == 0.0 else value - loc)
                self.sq_coefs.append(coef * scale)
                self.sq_sources.append(value)
                self.constant += constant * scale
                return
        if msg["mask"] is None and isinstance(scale, (int, float)) and not msg["args"] and not msg["kwargs"]:
            # a distribution that sums its own log-density in one op (a classifier's fused cross-entropy),
            # or a plain Categorical over a batch of labels (one nll_loss instead of log_prob's gather)
            fast = getattr(fn, "log_prob_sum", None)
            lp = fast(value) if fast is not None else _categorical_log_prob_sum(fn, value)
            if lp is not None:
                self.terms.append(lp if scale == 1.0 else lp * scale)
                return
        lp = fn.log_prob(value, *msg["args"], **msg["kwargs"])
        if msg["mask"] is None and isinstance(scale, (int, float)):
            # sum first, then one scalar product (the N/M of a minibatch): same number, fewer passes
            lp = lp.sum() if lp.dim() else lp
            self.terms.append(lp if scale == 1.0 else lp * scale)
            return
        lp = scale_and_mask(lp, scale, msg["mask"])
        self.terms.append(lp.sum() if lp.dim() else lp)

    def log_joint(self) -> torch.Tensor:
        terms = list(self.terms)
        if self.sq_values:
            terms.append(sum_scaled_squared_norms(self.sq_coefs, self.constant, self.sq_values))
        if not terms:
            raise ValueError("the model has no sample sites")
        return _sum_in_order(terms)

    def log_joint_split(self, leaves: Dict[int, int]):
        """The log joint as ``(total, differentiable, prior)`` for a gradient taken by the caller: the fused Normal
        sites whose value is one of ``leaves`` (``{id(tensor): index}``, tensors the caller differentiates with
        respect to directly) enter ``total`` without a graph, and ``prior`` lists ``(index, v − loc, a)`` with
        a = −2c: the gradient of *minus* their log-density is a·(v − loc), to be added to autograd's gradient of
        −``differentiable`` (None when nothing else depends on the sites; :func:`add_prior_gradients` does it).
        The same numbers as :meth:`log_joint` and autograd through it, bit for bit (the same sums in the same
        order), without the prior's backward node."""
        if not self.sq_values or any(id(src) not in leaves for src in self.sq_sources):
            total = self.log_joint()
            return total, total, []
        differentiable = _sum_in_order(self.terms)
        with torch.no_grad():
            values = [v.detach() for v in self.sq_values]
            prior = sum_scaled_squared_norms(self.sq_coefs, self.constant, values)
            total = prior if differentiable is None else differentiable.detach() + prior
        return total, differentiable, [(leaves[id(src)], v, -2.0 * c)
                                       for src, v, c in zip(self.sq_sources, values, self.sq_coefs)]


def _sum_in_order(terms: List[torch.Tensor]) -> Optional[torch.Tensor]:
    """((t₀ + t₁) + t₂) + …, the one order both ways of taking the log joint add its terms in (None if empty)."""
    total = terms[0] if terms else None
    for t in terms[1:]:
        total = total + t
    return total


def add_prior_gradients(grads: list, prior) -> list:
    """``grads[i]`` (autograd's, or None) plus a·v for each ``(i, v, a)`` of :meth:`LogJoint.log_joint_split`,
    rounded as autograd rounds it — the product a·v, then the sum. Where a = 1 (an N(0, 1) prior: the product is
    exact) the sum goes into autograd's tensor in place, one pass and no allocation, when that tensor is
    contiguous and shares its memory with no other gradient (autograd may hand one tensor to several inputs)."""
    storages: Dict[int, int] = {}
    for g in grads:
        if g is not None:
            key = g.untyped_storage().data_ptr()
            storages[key] = storages.get(key, 0) + 1
    with torch.no_grad():
        for i, v, a in prior:
            g = grads[i]
            if g is None:
                grads[i] = v * a
            elif a == 1.0 and g.is_contiguous() and storages[g.untyped_storage().data_ptr()] == 1:
                g.add_(v)
            else:
                grads[i] = (v * a).add_(g)
    return grads


def _categorical_log_prob_sum(fn, value) -> Optional[torch.Tensor]:
    """Σ_i log p(value_i) of a ``Categorical`` with logits ``[B, C]`` at integer labels ``[B]`` as one
    ``nll_loss`` on its normalised logits (``Categorical.log_prob`` then ``.sum()`` takes a broadcast, a gather
    and a reduction, and as many nodes backwards); the same number up to the order of the sum's additions. The
    distribution's own argument checks still run when it validates. None for anything else (a subclass with its
    own ``log_prob``, other shapes or dtypes): the caller then uses ``log_prob``."""
    if type(fn).log_prob not in _CATEGORICAL_LOG_PROBS or value.dtype != torch.int64 or value.dim() != 1:
        return None
    logits = fn.logits
    if logits.dim() != 2 or logits.shape[0] != value.shape[0]:
        return None
    if fn._validate_args:
        fn._validate_sample(value)
    return -F.nll_loss(logits, value, reduction="sum")


_CATEGORICAL_LOG_PROBS = (Categorical.log_prob, dist.Categorical.log_prob)
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
_PLAN = "_pyrobnn_sgld_plan"


def _constant_scalar(t) -> Optional[float]:
    """The one value of ``t`` if it is a Python number or a tensor that holds a single number (one element,
    or expanded from one: every stride 0) and does not need a gradient; else None."""
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        return float(t)
    if not isinstance(t, torch.Tensor) or t.requires_grad or t.numel() == 0 or t.is_complex():
        return None
    if t.numel() != 1 and any(t.stride()):
        return None
    return float(t[(0,) * t.dim()])


def _scalar_normal_plan(fn):
    """For a Normal whose loc and scale are each one constant number broadcast to the site's shape —
    ``dist.Normal(0., 1.).expand(shape)``, a ``PyroSample(Normal(0, 1).expand(...).to_event(k))``
    weight, a pyrobnn Gaussian prior — possibly wrapped in ``Independent``: (shape, loc, c, k) with
    Σ log N(v; loc, s²) = c‖v − loc‖² + k; else None (the site is evaluated by its own ``log_prob``).

    Only distributions whose log-density *is* Normal's qualify: ``torch.distributions.Normal`` and
    subclasses that keep its ``log_prob`` or declare Python-float parameters (``scalar_loc``,
    ``scalar_scale``). The plan is cached on the distribution object (a ``PyroSample`` prior or a
    layer's prior is the same object every step), stamped with the versions of loc and scale so that
    an in-place change of either is seen; a distribution built anew in the model costs two scalar
    reads per step."""
    base = fn
    while isinstance(base, Independent):
        base = base.base_dist
    if not isinstance(base, Normal):
        return None
    stamp = None if hasattr(base, "scalar_scale") else (base.loc._version, base.scale._version)
    cached = fn.__dict__.get(_PLAN)
    if cached is not None and cached[1] == stamp:
        return cached[0]
    plan = None
    if stamp is None:
        loc, scale = base.scalar_loc, base.scalar_scale
    elif type(base).log_prob is Normal.log_prob:
        loc, scale = _constant_scalar(base.loc), _constant_scalar(base.scale)
    else:
        loc = scale = None
    if loc is not None and scale is not None and math.isfinite(loc) and math.isfinite(scale) and scale > 0:
        shape = fn.batch_shape + fn.event_shape
        plan = (shape, loc, -0.5 / scale ** 2, -math.prod(shape) * (math.log(scale) + _HALF_LOG_2PI))
    try:
        fn.__dict__[_PLAN] = (plan, stamp)
    except (AttributeError, TypeError):
        pass
    return plan


#: public names of the same objects
LogJoint = _LogJoint
scalar_normal_plan = _scalar_normal_plan
