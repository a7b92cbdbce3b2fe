"""``SiteIndependent``: the ``Independent`` that wraps a whole weight tensor at a sample site.

It behaves exactly like ``pyro.distributions.Independent``; the difference is speed on the hot path.
When every batch dimension is reinterpreted (a weight site is one event) and the base distribution
offers ``log_prob_sum(value)`` — the summed log-density computed from a few reductions — that is used
instead of an elementwise log-density followed by a sum. pyrobnn's ``GuideNormal`` and ``ScalarNormal``
offer it for local-reparameterisation placeholders, whose density Pyro evaluates on every step.

``LogitsCategorical``: the observation distribution of a classifier, evaluated with one fused
cross-entropy instead of normalise-then-gather.
"""
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions.torch_distribution import TorchDistribution
from torch.distributions.utils import lazy_property

__all__ = ["SiteIndependent", "to_site_event", "LogitsCategorical", "is_real_support"]


class SiteIndependent(dist.Independent):
    """``Independent`` whose ``log_prob`` uses the base distribution's fused ``log_prob_sum`` when it
    has one (the sum over the whole site in one pass)."""

    def log_prob(self, value):
        if self.reinterpreted_batch_ndims == len(self.base_dist.batch_shape):
            fast = getattr(self.base_dist, "log_prob_sum", None)
            if fast is not None:
                out = fast(value)
                if out is not None:
                    return out
        return super().log_prob(value)


def to_site_event(d, reinterpreted_batch_ndims=None):
    """``d.to_event(n)`` returning a :class:`SiteIndependent`."""
    n = len(d.batch_shape) if reinterpreted_batch_ndims is None else reinterpreted_batch_ndims
    return d if n == 0 else SiteIndependent(d, n)


class LogitsCategorical(dist.Categorical):
    """``pyro.distributions.Categorical(logits=...)`` for a classifier's observation site, lazily normalised.

    Same distribution; the difference is the hot path. torch's ``Categorical`` normalises the logits
    (a ``logsumexp`` and a subtraction, with their backward) when it is built and then gathers the
    log-probabilities of the targets (a broadcast, a gather and a scatter in the backward). Here
    ``log_prob`` of integer targets shaped like the batch is one fused ``F.cross_entropy``
    (log-softmax + NLL, forward and backward), and ``logits``/``probs`` are normalised only when
    something asks for them (sampling, ``enumerate_support``, entropy, ...).

    :param logits: unnormalised ``[*batch, C]``.
    """

    def __init__(self, logits: torch.Tensor, validate_args=None):
        if not isinstance(logits, torch.Tensor) or logits.dim() < 1:
            raise ValueError("LogitsCategorical needs a logits tensor of at least one dimension")
        self._raw_logits = logits
        self._num_events = logits.size(-1)
        batch_shape = logits.shape[:-1]
        TorchDistribution.__init__(self, batch_shape, validate_args=validate_args)

    @lazy_property
    def logits(self):
        raw = self._raw_logits
        return raw - raw.logsumexp(dim=-1, keepdim=True)

    @property
    def _param(self):
        return self.logits

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        new = LogitsCategorical(self._raw_logits.expand(batch_shape + (self._num_events,)), validate_args=False)
        new._validate_args = self._validate_args
        return new

    def _fast_targets(self, value):
        return (isinstance(value, torch.Tensor) and value.shape == self.batch_shape and value.dim() >= 1
                and not value.is_floating_point() and not value.is_complex() and value.dtype != torch.bool
                and getattr(value, "_pyro_categorical_support", None) is None)

    def log_prob_sum(self, value):
        """Σ log p(value) as one ``F.cross_entropy(reduction="sum")`` (forward and backward), or None
        where :meth:`log_prob` would not take its fused path."""
        if not self._fast_targets(value):
            return None
        if self._validate_args:
            self._validate_sample(value)
        flat = self._raw_logits.reshape(-1, self._num_events)
        return -F.cross_entropy(flat, value.reshape(-1).long(), reduction="sum")

    def log_prob(self, value):
        raw = self._raw_logits
        if self._fast_targets(value):
            if self._validate_args:
                self._validate_sample(value)
            flat = raw.reshape(-1, self._num_events)
            return -F.cross_entropy(flat, value.reshape(-1).long(), reduction="none").view(value.shape)
        return super().log_prob(value)


def is_real_support(support) -> bool:
    """Whether a site's support is the real line (under any number of ``independent`` wrappers): such a site
    needs no transform to unconstrained space."""
    while isinstance(support, torch.distributions.constraints.independent):
        support = support.base_constraint
    return support is torch.distributions.constraints.real
