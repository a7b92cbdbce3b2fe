"""Mean-field Gaussian guide: q(w) = Π N(μ_k, σ_k²), σ = softplus(ρ)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from pyro.infer.autoguide.initialization import init_to_median

from ..registry import GUIDES
from .. import fastpath
from ..fastpath import softplus_in_range
from ..validation import one_of, positive_float
from .base import FlatGaussianGuide
from .normal import SiteTerms

__all__ = ["MeanField"]


def _softplus_inv(y: float) -> float:
    return y + math.log(-math.expm1(-y))


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
        self.init_scale = None if init_scale is None else positive_float("MeanField init_scale", init_scale)
        one_of("MeanField parameterization", parameterization, ("softplus", "gamma"))
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
        scale, in_range = softplus_in_range(tensors["rho"])
        flat = {first: tensors[first].split(sizes), "scale": scale.split(sizes)}
        if first == "loc" and fastpath.enabled(scale):
            # every site's σ² and KL reductions from one node, made when a layer or a KL first asks
            flat["terms"] = SiteTerms(tensors["loc"], scale, sizes, [lay.shape for lay in self._layout.values()],
                                      in_range)
        return flat

    def _site_params(self, flat, i, shape):
        scale = _shaped(flat["scale"][i], shape)
        if self.parameterization == "gamma":
            gamma = _shaped(flat["gamma"][i], shape)
            return gamma * scale, scale, gamma
        return _shaped(flat["loc"][i], shape), scale, None
