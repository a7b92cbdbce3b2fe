"""Bayesian layers: ordinary ``nn.Module`` s whose weights are Pyro sample sites.

``bayesian()`` swaps these in for the selected modules of a user's network, so the network's own
``forward`` runs unchanged. Layers never return ``(out, kl)`` tuples (they compose in
``nn.Sequential``); the KL lives where Pyro puts it, in the ELBO.

Local reparameterisation: when the guide hands a layer a placeholder carrying the weight posterior's
``(loc, scale)``, Linear/Conv layers draw the pre-activation b ~ N(x·μ, x²·σ²) directly (Kingma et al.
2015) — same marginal, lower gradient variance, no weight draw. These layers are consumers in the sense of
:mod:`pyrobnn.lrt` (which says how another layer joins). This is done here, inside pyrobnn's layers; no
torch function is patched.
"""
from __future__ import annotations

from typing import Dict

import pyro
import torch
import torch.nn as nn
import torch.nn.functional as F

from .lrt import consumer_infer, draw, mean_var

__all__ = ["BayesianModule", "BayesianLinear", "BayesianConv", "BayesianParams"]

_LRT_EPS = 1e-16


class BayesianModule(nn.Module):
    """Common part: which parameters are sites, their priors, and how a site is sampled."""

    def __init__(self, prefix: str, shapes: Dict[str, torch.Size], priors: Dict[str, object],
                 local_reparameterization: bool):
        super().__init__()
        self.site_prefix = prefix
        self.site_shapes = {k: torch.Size(v) for k, v in shapes.items()}
        self.priors = dict(priors)
        self.local_reparameterization = local_reparameterization
        self._prior_cache: Dict[str, object] = {}

    def site_name(self, pname: str) -> str:
        return f"{self.site_prefix}.{pname}" if self.site_prefix else pname

    def _apply(self, fn, *args, **kwargs):
        self._prior_cache.clear()  # cached expanded priors hold tensors that must follow .to(device)
        return super()._apply(fn, *args, **kwargs)

    def sample_param(self, pname: str, lrt: bool = False) -> torch.Tensor:
        prior = self.priors[pname]
        shape = self.site_shapes[pname]
        infer = consumer_infer(lrt and self.local_reparameterization)
        if hasattr(prior, "sample_site"):
            value = prior.sample_site(self.site_name(pname), shape, infer=infer)
        else:
            fn = self._prior_cache.get(pname)
            if fn is None:
                fn = prior.expand(shape)
                if len(shape):
                    fn = fn.to_event(len(shape))
                self._prior_cache[pname] = fn
            value = pyro.sample(self.site_name(pname), fn, infer=infer)
        if value.shape != shape and value.shape[-len(shape):] == shape and value.numel() == shape.numel():
            # one draw given with leading singleton dims (pyro.infer.Predictive pads conditioned values to
            # the model's plate nesting): the layer's weight is the draw itself
            value = value.reshape(shape)
        return value


class _AffineBayesian(BayesianModule):
    def _affine(self, x, w, b):
        raise NotImplementedError

    def forward(self, x):
        w = self.sample_param("weight", lrt=True)
        b = self.sample_param("bias", lrt=True) if "bias" in self.site_shapes else None
        w_mean, w_var = mean_var(w)
        if w_var is None:
            # a drawn weight (its prior has no placeholder protocol) next to a placeholder bias: draw the bias
            # from its q too, so the layer's output has the bias's noise
            return self._affine(x, w_mean, None if b is None else draw(b, fresh=True))
        b_mean, b_var = mean_var(b) if b is not None else (None, None)
        mean = self._affine(x, w_mean, b_mean)
        # in place on the fresh pre-activation variance (the affine op's backward does not keep its output);
        # addcmul: μ + σ·ε without a temporary for σ·ε
        std = self._affine(x * x, w_var, b_var).add_(_LRT_EPS).sqrt_()
        return torch.addcmul(mean, std, torch.randn_like(mean))


class BayesianLinear(_AffineBayesian):
    """``nn.Linear`` with weight ``[out, in]`` and bias ``[out]`` as sample sites; input ``[..., in]`` →
    output ``[..., out]``. With local reparameterisation the pre-activations are drawn from
    N(xμ + b_μ, x²σ² + b_σ²) instead of the weights. Made by :func:`pyrobnn.bayesian`."""

    def __init__(self, linear: nn.Linear, prefix: str, priors, local_reparameterization=True):
        shapes = {"weight": linear.weight.shape}
        if linear.bias is not None:
            shapes["bias"] = linear.bias.shape
        super().__init__(prefix, shapes, priors, local_reparameterization)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def _affine(self, x, w, b):
        return F.linear(x, w, b)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, sites={list(self.site_shapes)}"


class BayesianConv(_AffineBayesian):
    """Conv1d/2d/3d; the wrapped (parameter-free) conv module supplies stride, padding, padding_mode."""

    def __init__(self, conv: nn.modules.conv._ConvNd, prefix: str, priors, local_reparameterization=True):
        shapes = {"weight": conv.weight.shape}
        if conv.bias is not None:
            shapes["bias"] = conv.bias.shape
        super().__init__(prefix, shapes, priors, local_reparameterization)
        conv = _strip_params(conv)
        conv.bias = None  # read by the conv's extra_repr; the bias (if any) is a site here
        # geometry only (stride, padding, ...): kept outside the module tree, it has no tensors and no
        # place in repr() or state_dict()
        self.__dict__["conv"] = conv

    def _affine(self, x, w, b):
        return self.conv._conv_forward(x, w, b)

    def extra_repr(self):
        geometry = self.conv.extra_repr().replace(", bias=False", "")
        return f"{type(self.conv).__name__}({geometry}), sites={list(self.site_shapes)}"


class BayesianParams(BayesianModule):
    """Any other module (BatchNorm, LayerNorm, embeddings, ...) whose selected parameters are sites.

    The forward is the wrapped module's own, run with the sampled parameters through
    ``torch.func.functional_call``. No local reparameterisation (weights are drawn).
    """

    def __init__(self, module: nn.Module, prefix: str, priors, names):
        shapes = {n: getattr(module, n).shape for n in names}
        super().__init__(prefix, shapes, priors, local_reparameterization=False)
        for n in names:  # keep the tensors (a frozen record of the initial values), out of training
            getattr(module, n).requires_grad_(False)
        self.module = module

    def forward(self, *args, **kwargs):
        values = {n: draw(self.sample_param(n), fresh=True) for n in self.site_shapes}
        return torch.func.functional_call(self.module, values, args, kwargs)


def _strip_params(module: nn.Module) -> nn.Module:
    for n in list(module._parameters):
        del module._parameters[n]
    return module
