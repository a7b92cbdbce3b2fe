"""Gaussian prior N(loc, scale²), iid or with layerwise (fan-in) scaling."""
from __future__ import annotations

import math

import pyro.distributions as dist
import torch

from ..registry import PRIORS
from ..guides.base import expected_normal_log_prob
from ..lrt import placeholder_of
from ..site_dist import to_site_event
from ..validation import finite_float, positive_float

__all__ = ["Gaussian", "ScalarNormal"]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class ScalarNormal(dist.Normal):
    """N(loc, scale²) with one Python-float loc and scale broadcast to ``batch_shape``.

    What a scalar prior becomes at a weight site. Knowing the parameters are scalars lets the
    log-density and the KL (``pyrobnn.guides.base``) skip full-size temporaries for loc and scale.
    """

    #: evaluates a local-reparameterisation placeholder as E_q[log p(w)] (see ``pyrobnn.guides.base``)
    placeholder_expectation = True

    def __init__(self, loc: float, scale: float, batch_shape=torch.Size()):
        self.scalar_loc, self.scalar_scale = float(loc), float(scale)
        batch_shape = torch.Size(batch_shape)
        super().__init__(torch.tensor(self.scalar_loc).expand(batch_shape),
                         torch.tensor(self.scalar_scale).expand(batch_shape), validate_args=False)

    def expand(self, batch_shape, _instance=None):
        return ScalarNormal(self.scalar_loc, self.scalar_scale, batch_shape)

    def to_event(self, reinterpreted_batch_ndims=None):
        return to_site_event(self, reinterpreted_batch_ndims)

    def log_prob_sum(self, value):
        """Σ E_q[log p(w)] for a local-reparameterisation placeholder of q = N(μ, σ²):
        −(Σ(μ − m)² + Σσ²) / (2s²) − n(log s + ½ log 2π), from the sums the KL needs anyway; None for
        any other value (the elementwise path is used)."""
        q = placeholder_of(value)
        if q is None or not hasattr(q, "loc_sq_sum"):
            return None
        n = q.loc.numel()
        c, const = -0.5 / self.scalar_scale ** 2, -n * (math.log(self.scalar_scale) + _HALF_LOG_2PI)
        combine = getattr(q, "combine_sums", None)
        if self.scalar_loc == 0.0 and combine is not None and q._fusable():
            return combine((c, c, 0.0, const))   # one dot product with the guide's fused [Σμ², Σσ², Σ log σ, 1]
        sq = q.loc_sq_sum()
        if self.scalar_loc != 0.0:
            sq = sq - 2 * self.scalar_loc * q.loc_sum() + n * self.scalar_loc ** 2
        return (sq + q.var_sum()) * c + const

    def log_prob(self, value):
        q = placeholder_of(value)  # a local-reparameterisation placeholder
        if q is not None:
            return expected_normal_log_prob(q, self.scalar_loc, self.scalar_scale)
        z = value if self.scalar_loc == 0.0 else value - self.scalar_loc
        return (z * z) * (-0.5 / self.scalar_scale ** 2) - (math.log(self.scalar_scale) + _HALF_LOG_2PI)


@PRIORS.register("gaussian")
class Gaussian(dist.Normal):
    """N(loc, scale²) for every weight.

    A scalar distribution; use it at any site as ``Gaussian(0.1).expand(shape).to_event(len(shape))``.

    With ``layerwise=True`` the scale is divided by sqrt(fan_in) when the prior is expanded to a
    weight shape: fan_in = prod(shape[1:]) for a Linear ``[out, in]`` or Conv ``[out, in, *k]``
    weight, 1 for 1-d shapes (biases). This is the He/LeCun-style prior that keeps pre-activation
    variance constant across layers of different width.

    KL to a Normal guide is Pyro/torch's closed form (the Normal–Normal rule applies to subclasses).
    """

    def __init__(self, scale: float = 1.0, loc: float = 0.0, layerwise: bool = False, validate_args=None):
        positive_float("Gaussian prior scale", scale)
        finite_float("Gaussian prior loc", loc)
        self.layerwise = bool(layerwise)
        self._scale0, self._loc0 = float(scale), float(loc)
        super().__init__(torch.tensor(float(loc)), torch.tensor(float(scale)), validate_args=validate_args)

    def config(self):
        return {"scale": self._scale0, "loc": self._loc0, "layerwise": self.layerwise}

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        scale = self.scale
        if self.layerwise and self.batch_shape == torch.Size() and len(batch_shape) >= 2:
            scale = scale / math.sqrt(math.prod(batch_shape[1:]))
        return ScalarNormal(self._loc0, float(scale), batch_shape)

    def __repr__(self):
        lw = ", layerwise" if self.layerwise else ""
        return f"Gaussian(scale={self._scale0}, loc={self._loc0}{lw})"
