"""``SiteIndependent``: the ``Independent`` that wraps a whole weight tensor at a sample site.

It behaves exactly like ``pyro.distributions.Independent``; the difference is speed on the hot path.
When every batch dimension is reinterpreted (a weight site is one event) and the base distribution
offers ``log_prob_sum(value)`` — the summed log-density computed from a few reductions — that is used
instead of an elementwise log-density followed by a sum. pyrobnn's ``GuideNormal`` and ``ScalarNormal``
offer it for local-reparameterisation placeholders, whose density Pyro evaluates on every step.
"""
import pyro.distributions as dist

__all__ = ["SiteIndependent", "to_site_event"]


class SiteIndependent(dist.Independent):
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
