"""Additive-noise Gaussian guide of sparse variational dropout (Molchanov, Ashukha & Vetrov 2017).

q(w) = Π N(θ_k, σ_k²) with θ and log σ² free. The dropout rate of a weight is α = σ²/θ², so

    log α = log σ² − log θ²

and a weight with log α > 3 is (almost) pure noise and can be pruned (:mod:`pyrobnn.sparsity`). The
additive parameterisation (free σ² rather than α) is what makes large α trainable: the gradient of the
data term w.r.t. θ does not carry the multiplicative noise of α.

How clipping enters. log α is clipped to ``log_alpha_clip`` wherever log α is *used*: in the KL to
the log-uniform prior (:mod:`pyrobnn.priors.log_uniform`, which reads the site's ``log_variance`` and
``log_alpha_clip``) and in :meth:`AdditiveNoise.log_alpha`. σ² itself is never changed: the noise the
network sees (local reparameterisation: b ~ N(xθ, x²σ²)) uses the free log σ².

The default clip is ``(None, 8)``: from above only. The upper clip keeps the KL's gradient finite as
θ → 0 and costs nothing (the KL is < 2e-4 there and flat). A lower clip (the reference implementation's
[−8, 8]) makes the KL constant below it, so every weight with log σ² − log θ² < −8 gets no KL gradient:
started from a pretrained network with log σ² = −10, that is every weight with |θ| > e⁻¹, and the data
term alone then drives its σ² down further — such weights are never pruned and the network is partly
trained without its prior. The approximation needs no lower clip (it tends to −½ log α + k₁, the exact
KL's asymptote; see :mod:`pyrobnn.priors.log_uniform`). Pass ``log_alpha_clip=(-8, 8)`` for the
reference behaviour.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import pyro.distributions as dist
import torch
from pyro.distributions.util import sum_rightmost

from ..registry import GUIDES
from ..validation import finite_float
from .base import FlatGaussianGuide, GuideNormal, init_to_median_or_fan_in, local_reparam_params

__all__ = ["AdditiveNoise", "AdditiveNoiseNormal", "init_to_median_or_fan_in"]  # the init re-exported

#: added to θ² inside log θ² so a weight at exactly zero has a finite log α (then clipped) and gradient
_THETA2_EPS = 1e-16
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class AdditiveNoiseNormal(GuideNormal):
    """N(θ, σ²) at one site of :class:`AdditiveNoise`, parameterised by θ and log σ².

    σ, σ², log σ and the clipped log α are derived from ``log_variance`` on first use and cached: the
    locally reparameterised path needs only σ² = exp(log σ²) (the layer) and the KL (which reads
    ``log_variance`` and ``log_alpha_clip``, see :func:`pyrobnn.priors.log_uniform.sparse_vd_terms`),
    so σ itself is never computed there.

    :param loc: θ, any shape. :param log_variance: log σ² (same shape).
    :param log_alpha_clip: ``(low, high)`` (``low`` may be None: clipped from above only) or None.
    """

    def __init__(self, loc, log_variance, log_alpha_clip=(None, 8.0), placeholder=False):
        # Normal.__init__ assigns ``scale``; the property below stores it, so pass loc (same shape)
        # and then forget it: σ is computed from log σ² when first asked for.
        super().__init__(loc, loc, placeholder=placeholder)
        self._scale = None
        self.log_variance = log_variance
        self.log_alpha_clip = log_alpha_clip
        self._log_alpha = None
        self._sparse_vd_terms = None

    @property
    def scale(self):
        if self._scale is None:
            self._scale = (0.5 * self.log_variance).exp()
        return self._scale

    @scale.setter
    def scale(self, value):
        self._scale = value

    @property
    def log_scale(self):
        if self._log_scale is None:
            self._log_scale = 0.5 * self.log_variance
        return self._log_scale

    @property
    def variance(self):
        if self._var is None:
            self._var = self.log_variance.exp()
        return self._var

    @property
    def log_alpha(self):
        """log σ² − log(θ² + 1e-16), clipped to ``log_alpha_clip``; shape of ``loc``."""
        if self._log_alpha is None:
            theta = self.loc
            la = self.log_variance - (theta * theta + _THETA2_EPS).log()
            clip = self.log_alpha_clip
            self._log_alpha = la if clip is None else la.clamp(clip[0], clip[1])  # clamp accepts min=None
        return self._log_alpha

    def expand(self, batch_shape, _instance=None):
        new = super().expand(batch_shape, _instance=_instance or AdditiveNoiseNormal.__new__(AdditiveNoiseNormal))
        new.log_variance = self.log_variance.expand(batch_shape)
        new.log_alpha_clip = self.log_alpha_clip
        new._log_alpha = None
        new._sparse_vd_terms = None
        return new

    def to_event(self, reinterpreted_batch_ndims=None):
        if reinterpreted_batch_ndims is None:
            reinterpreted_batch_ndims = len(self.batch_shape)
        if reinterpreted_batch_ndims == 0:
            return self
        return _IndependentAdditiveNoise(self, reinterpreted_batch_ndims)


class _IndependentAdditiveNoise(dist.Independent):
    """At the site's own placeholder, E_q[log q] = −Σ ½ log σ² − n(½ log 2π + ½): one reduction of
    log σ² (see :mod:`pyrobnn.guides.base` for why the placeholder's density is an expectation)."""

    def log_prob(self, value):
        base = self.base_dist
        if local_reparam_params(value) is not base:
            return super().log_prob(value)
        n = math.prod(base.batch_shape[len(base.batch_shape) - self.reinterpreted_batch_ndims:])
        return sum_rightmost(base.log_variance, self.reinterpreted_batch_ndims) * -0.5 - n * (_HALF_LOG_2PI + 0.5)


def _check_clip(clip) -> Optional[Tuple[Optional[float], float]]:
    """None, or ``(low, high)`` with ``low`` a finite number or None (no lower clip) and ``high`` a
    finite number above it."""
    if clip is None:
        return None
    if isinstance(clip, (str, bytes)) or not isinstance(clip, Sequence) or len(clip) != 2:
        raise ValueError(f"log_alpha_clip must be None or a (low, high) pair, got {clip!r}")
    low, high = clip
    for v in ((high,) if low is None else (low, high)):
        finite_float("log_alpha_clip bounds (low may be None)", v)
    if low is not None and not low < high:
        raise ValueError(f"log_alpha_clip needs low < high, got {clip!r}")
    return None if low is None else float(low), float(high)


@GUIDES.register("additive-noise")
class AdditiveNoise(FlatGaussianGuide):
    """Sparse-VD guide: factorised N(θ, σ²) with free θ and log σ² over every continuous latent site
    of any Pyro model (an ``AutoGuide``). Pair it with :class:`pyrobnn.priors.LogUniform` and
    ``pyro.infer.TraceMeanField_ELBO``.

    :param model: any Pyro model.
    :param init_log_sigma2: initial log σ² of every site. Default (None): −10 at the sites of pyrobnn's
        layers (the reference recipe: training starts from (nearly) the deterministic network) and
        log 0.1² — Pyro's ``AutoNormal`` initial scale — at every other site of a hand-written model.
    :param log_alpha_clip: ``(low, high)`` range log α is clipped to where it is used (KL, masks);
        ``low`` may be None (the default ``(None, 8)``: clipped from above only, so no weight escapes
        the KL; module docstring), or None for no clip. σ² is never clipped.
    :param init_loc_fn: initial θ per site. ``bayesian()`` passes one that copies the converted
        network's weights, so ``bayesian(pretrained_net, prior="log-uniform", guide="additive-noise")``
        starts sparse VD from a pretrained deterministic network (see also
        :func:`pyrobnn.sparsity.sparse_vd_from_pretrained`).
        The default works with improper priors (:func:`init_to_median_or_fan_in`).
    :param local_reparameterization: let Linear/Conv layers sample pre-activations
        b ~ N(xθ, x²σ²) instead of weights (see :mod:`pyrobnn.guides.base`).

    Flat parameters: ``theta`` and ``log_sigma2`` (one vector each over all sites).
    """

    flat_names = ("theta", "log_sigma2")

    #: initial log σ² of network sites and of generic sites when ``init_log_sigma2`` is not given
    NETWORK_INIT_LOG_SIGMA2 = -10.0
    GENERIC_INIT_LOG_SIGMA2 = 2 * math.log(0.1)

    def __init__(self, model, *, init_loc_fn=init_to_median_or_fan_in, init_log_sigma2: Optional[float] = None,
                 log_alpha_clip=(None, 8.0), local_reparameterization: bool = True, create_plates=None):
        self.init_log_sigma2 = (None if init_log_sigma2 is None
                                else finite_float("AdditiveNoise init_log_sigma2", init_log_sigma2))
        self.log_alpha_clip = _check_clip(log_alpha_clip)
        super().__init__(model, init_loc_fn=init_loc_fn, local_reparameterization=local_reparameterization,
                         create_plates=create_plates)

    def config(self):
        return {"init_log_sigma2": self.init_log_sigma2,
                "log_alpha_clip": None if self.log_alpha_clip is None else list(self.log_alpha_clip),
                "local_reparameterization": self.local_reparameterization}

    # -- FlatGaussianGuide hooks ------------------------------------------------------------------------
    def _init_flat(self, init_loc, network):
        if self.init_log_sigma2 is not None:
            return {"theta": init_loc, "log_sigma2": torch.full_like(init_loc, self.init_log_sigma2)}
        log_var = torch.where(network, self.NETWORK_INIT_LOG_SIGMA2, self.GENERIC_INIT_LOG_SIGMA2)
        return {"theta": init_loc, "log_sigma2": log_var.to(init_loc.dtype)}

    def _site_params(self, flat, i, shape):
        # (θ, log σ², None): the base class passes the second item, subsampled along plates like θ,
        # to _site_normal below as "scale"; here it is log σ², so σ is only computed where it is
        # used. site_params() (the public (loc, scale) view) is overridden accordingly.
        return flat["theta"][i].view(shape), flat["log_sigma2"][i].view(shape), None

    def _site_normal(self, loc, log_var, gamma, placeholder):
        return AdditiveNoiseNormal(loc, log_var, self.log_alpha_clip, placeholder=placeholder)

    def site_params(self, name: str):
        """Unconstrained ``(θ, σ)`` of a site (θ a view of the flat parameter)."""
        theta, log_var = self.site_log_params(name)
        return theta, (0.5 * log_var).exp()

    def site_log_params(self, name: str):
        """``(θ, log σ²)`` of a site (views of the flat parameters)."""
        i = self._index[name]
        theta, log_var, _ = self._site_params(self._flat_params(register=False), i, self._layout[name].shape)
        return theta, log_var

    # -- public -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def log_alpha(self, site: str, clip: bool = True) -> torch.Tensor:
        """log α = log σ² − log θ² of ``site`` (its shape), clipped to ``log_alpha_clip`` unless
        ``clip=False``. Detached."""
        if self.prototype_trace is None:
            raise RuntimeError("the guide has no parameters yet; run it (or bnn.initialize(x)) once first")
        if site not in self._index:
            raise KeyError(f"unknown site {site!r}; sites: {', '.join(self._layout)}")
        theta, log_var = self.site_log_params(site)
        la = log_var - (theta * theta + _THETA2_EPS).log()
        if clip and self.log_alpha_clip is not None:
            la = la.clamp(*self.log_alpha_clip)  # min may be None
        return la.clone()
