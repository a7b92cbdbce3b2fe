"""Posterior draws for TTA: :class:`Draws`, S callables ``x -> logits``, built from any
:class:`pyrobnn.posterior.Posterior` (a BNN's guide, stored SG-MCMC draws, an ensemble, MC dropout)
and a posterior itself."""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence

import torch
import torch.nn as nn

from pyrobnn import inputs
from pyrobnn.bnn import BNN
from pyrobnn.posterior import Ensemble, Posterior, as_posterior, stacked_outputs
from pyrobnn.validation import positive_int

__all__ = ["Draws", "as_draws"]


class Draws:
    """S posterior draws as functions: ``draws[s](x [N, ...]) -> logits [N, K]``.

    ``roots[s]`` is the ``nn.Module`` in which draw s's layers live (for :func:`embeddings`' hooks);
    draws of one BNN share ``bnn.net``. Build with :meth:`from_posterior` (any
    :class:`pyrobnn.posterior.Posterior`), :meth:`from_bnn`, :meth:`from_ensemble` or directly from
    callables. ``Draws`` is a posterior too: ``parameter_draws`` gives the members, ``run(member, x)``
    calls one, ``outputs`` stacks them.
    """

    def __init__(self, members: Sequence[Callable[[torch.Tensor], torch.Tensor]],
                 roots: Optional[Sequence[nn.Module]] = None, description: str = ""):
        members = list(members)
        if not members or not all(callable(m) for m in members):
            raise ValueError("Draws needs a non-empty list of callables x -> logits")
        if roots is not None:
            roots = list(roots)
            if len(roots) != len(members):
                raise ValueError(f"{len(roots)} roots for {len(members)} draws")
        self.members = members
        self.roots = roots
        self.description = description

    def __len__(self):
        return len(self.members)

    def __getitem__(self, s):
        return self.members[s]

    def __repr__(self):
        return f"Draws(S={len(self)}{', ' + self.description if self.description else ''})"

    # -- from a posterior --------------------------------------------------------------------------------
    @classmethod
    def from_posterior(cls, posterior, num_samples: Optional[int] = None,
                       generator: Optional[torch.Generator] = None, description: Optional[str] = None) -> "Draws":
        """The draws of any posterior (:func:`pyrobnn.posterior.as_posterior` accepts it): its
        ``parameter_draws(num_samples, generator=generator)``, each run by ``posterior.run``. Stored
        SG-MCMC draws (:class:`pyrobnn.inference.SamplePosterior`): all of them, or ``num_samples``
        evenly spaced ones."""
        posterior = as_posterior(posterior)
        draws = posterior.parameter_draws(num_samples, generator=generator)
        members = [_Run(posterior, d) for d in draws]
        if description is None:
            total = len(posterior) if hasattr(posterior, "__len__") else len(members)
            description = f"{type(posterior).__name__}, {len(members)} of {total} draws"
        return cls(members, [posterior.network(d) for d in draws], description)

    @classmethod
    def from_ensemble(cls, nets: Sequence[nn.Module]) -> "Draws":
        """Deterministic networks, one per member (put in eval mode)."""
        nets = list(nets)
        if not all(isinstance(n, nn.Module) for n in nets):
            raise TypeError("from_ensemble needs torch.nn.Module members")
        for n in nets:
            n.eval()
        return cls.from_posterior(Ensemble(nets), description=f"ensemble of {len(nets)}")

    @classmethod
    def from_bnn(cls, bnn, num_samples: int, generator: Optional[torch.Generator] = None,
                 mode: str = "weights") -> "Draws":
        """S draws of a trained :class:`pyrobnn.BNN` with a categorical likelihood.

        ``mode="weights"``: S joint weight samples from the guide (:meth:`pyrobnn.BNN.parameter_draws`),
        each a fixed network (the layers run plain convolutions on the given weights). ``mode="local"``:
        every call samples activations by local reparameterisation (cheap per draw, but a "draw" is then
        a fresh independent weight sample per row and per call)."""
        from pyrobnn.likelihoods import Categorical
        if not isinstance(bnn, BNN):
            raise TypeError(f"from_bnn needs a pyrobnn BNN, got {type(bnn).__name__}")
        if not isinstance(bnn.likelihood, Categorical):
            raise ValueError("TTA predictive averaging here is for classifiers (a categorical likelihood)")
        positive_int("num_samples", num_samples)
        if mode == "weights":
            return cls.from_posterior(bnn, num_samples, generator, f"BNN guide, {mode}")
        if mode == "local":
            return cls([_LocalDraw(bnn) for _ in range(num_samples)], [bnn.net] * num_samples, f"BNN guide, {mode}")
        raise ValueError(f"mode must be 'weights' or 'local', got {mode!r}")

    # -- the posterior protocol ----------------------------------------------------------------------------
    def parameter_draws(self, num_samples: Optional[int] = None, *,
                        generator: Optional[torch.Generator] = None) -> List[Callable]:
        """The members (all, or ``num_samples`` evenly spaced ones); ``generator`` is unused."""
        if num_samples is None:
            return list(self.members)
        positive_int("num_samples", num_samples)
        idx = torch.linspace(0, len(self) - 1, min(num_samples, len(self))).round().long()
        return [self.members[i] for i in idx.tolist()]

    def run(self, draw: Callable, x) -> torch.Tensor:
        """Member ``draw`` (one of :meth:`parameter_draws`) on ``x``."""
        if not callable(draw):
            raise TypeError(f"a draw of Draws is one of its member callables, got {type(draw).__name__}")
        with torch.no_grad():
            return draw(x)

    def outputs(self, x, num_samples: Optional[int] = None, *, batch_size: Optional[int] = None) -> torch.Tensor:
        """Members' outputs ``[S, B, ...]`` on ``x``, ``batch_size`` rows at a time."""
        return stacked_outputs(self, self.parameter_draws(num_samples), x, batch_size)

    def network(self, draw: Any = None) -> nn.Module:
        """The module in which ``draw``'s layers live (``roots``)."""
        if self.roots is None:
            raise ValueError("these Draws have no roots (modules); build them with roots=")
        if draw is None:
            return self.roots[0]
        for member, root in zip(self.members, self.roots):
            if member is draw:
                return root
        raise ValueError("not a member of these Draws")


def as_draws(obj) -> Draws:
    """``Draws`` pass through; any other posterior (:func:`pyrobnn.posterior.as_posterior`) gives
    :meth:`Draws.from_posterior` with its default number of draws."""
    if isinstance(obj, Draws):
        return obj
    if isinstance(obj, Posterior) or isinstance(obj, (nn.Module, list, tuple)):
        return Draws.from_posterior(obj)
    raise TypeError(f"draws must be a Draws or a pyrobnn posterior, got {type(obj).__name__}")


class _Run:
    """One draw of a posterior as a callable ``x -> outputs``."""

    def __init__(self, posterior: Posterior, draw):
        self.posterior, self.draw = posterior, draw

    def __call__(self, x):
        return self.posterior.run(self.draw, x)


class _LocalDraw:
    """A BNN's network under a fresh guide draw per call (local reparameterisation where enabled): one
    draw of :meth:`pyrobnn.BNN.outputs` over the whole batch."""

    def __init__(self, bnn):
        self.bnn = bnn

    def __call__(self, x):
        return self.bnn.outputs(x, 1, batch_size=inputs.batch_size(x))[0]
