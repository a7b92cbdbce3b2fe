"""One posterior protocol: whatever stands for a posterior — a BNN with its guide, a set of MCMC/SGLD
draws, a running chain, an ensemble of networks, a network with dropout — answers the same four calls.

:class:`Posterior` (a ``typing.Protocol``, checkable with ``isinstance``):

* ``parameter_draws(num_samples=None, *, generator=None)`` — a list of draws. What a draw is depends
  on the posterior: ``{site: tensor}`` for a BNN (guide draws, stored MCMC/SGLD draws), a member
  network for an ensemble, a mask seed for MC dropout.
* ``run(draw, x)`` — the network's output on ``x`` ``[B, ...]`` under one draw: ``[B, ...]``.
* ``outputs(x, num_samples=None, *, batch_size=None)`` — outputs under S draws, ``[S, B, ...]``,
  ``batch_size`` rows of ``x`` at a time. Where the draws are fixed (stored draws, an ensemble) this is
  ``run`` stacked over ``parameter_draws`` and the batching does not change the numbers. A guide with
  local reparameterisation and MC dropout draw their randomness per row inside the forward: there
  ``outputs`` is a fresh Monte-Carlo estimate of the same predictive, and ``batch_size`` changes
  which random numbers a row sees, not their distribution.
* ``network(draw=None)`` — the ``torch.nn.Module`` whose layers run ``draw`` (where forward hooks go).

Implementations: :class:`pyrobnn.BNN` itself (its guide), :class:`DrawSet` (stored draws of a BNN's
sites, chains kept apart; :class:`pyrobnn.inference.SamplePosterior` is one), :class:`Ensemble`
(plain networks) and :class:`DropoutPosterior` (MC dropout). :func:`as_posterior` turns what a user
has into one. Prediction (``predict``), distillation teachers, TTA (:class:`pyrobnn.inference.tta.Draws`),
sparsity and the ArviZ bridge (:func:`pyrobnn.to_inference_data`) take a posterior.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, List, Mapping, Optional, Protocol, Sequence, runtime_checkable

import torch
import torch.nn as nn

from . import inputs
from .bnn import BNN
from .validation import positive_int

__all__ = ["Posterior", "DrawSet", "Ensemble", "DropoutPosterior", "as_posterior", "outputs_under_draws",
           "stacked_outputs"]

PRECISION_SITE = "likelihood.precision"


@runtime_checkable
class Posterior(Protocol):
    """The interface every posterior answers (see the module docstring)."""

    def parameter_draws(self, num_samples: Optional[int] = None, *,
                        generator: Optional[torch.Generator] = None) -> List[Any]:
        """A list of draws (``{site: tensor}``, a network, a seed: the posterior says which)."""

    def run(self, draw: Any, x) -> torch.Tensor:
        """Output ``[B, ...]`` of the network on ``x`` ``[B, ...]`` under one draw."""

    def outputs(self, x, num_samples: Optional[int] = None, *, batch_size: Optional[int] = None) -> torch.Tensor:
        """Outputs ``[S, B, ...]`` on ``x`` under S draws, ``batch_size`` rows at a time."""

    def network(self, draw: Any = None) -> nn.Module:
        """The module whose layers run ``draw``."""


def _check_positive(value, what, allow_none=True):
    if value is None and allow_none:
        return None
    return positive_int(what, value)


def _check_inputs(x):
    if not inputs.is_inputs(x):
        raise TypeError(f"x must be a tensor, or a tuple or dict of tensors, got {type(x).__name__}")
    return x


def _evenly_spaced(total: int, num_samples: Optional[int]) -> Optional[torch.Tensor]:
    """Indices of ``num_samples`` evenly spaced draws out of ``total`` (None: all of them)."""
    if _check_positive(num_samples, "num_samples") is None:
        return None
    return torch.linspace(0, total - 1, min(num_samples, total)).round().long()


def _in_row_blocks(fn, x, batch_size):
    """``fn`` over blocks of ``batch_size`` rows of ``x``, concatenated along dim 1 (outputs ``[S, b, ...]``)."""
    x = _check_inputs(x)
    _check_positive(batch_size, "batch_size")
    B = inputs.batch_size(x)
    if batch_size is None or batch_size >= B:
        return fn(x)
    return torch.cat([fn(inputs.rows(x, i, i + batch_size)) for i in range(0, B, batch_size)], 1)


def stacked_outputs(posterior: Posterior, draws: Sequence[Any], x, batch_size: Optional[int] = None) -> torch.Tensor:
    """``posterior.run(draw, x)`` for every draw, stacked ``[S, B, ...]``, ``batch_size`` rows of ``x`` at a
    time: the ``outputs`` of a posterior whose draws are fixed (an ensemble, a running chain's state)."""
    if not draws:
        raise ValueError("no draws given")
    return _in_row_blocks(lambda xb: torch.stack([posterior.run(d, xb) for d in draws]), x, batch_size)


# ----------------------------------------------------------------------------------------------------
# stored draws of a BNN's sites
# ----------------------------------------------------------------------------------------------------
def outputs_under_draws(bnn: BNN, draws: Dict[str, torch.Tensor], x, chunk: int = 64,
                        max_rows: int = 1 << 16, batch_size: Optional[int] = None) -> torch.Tensor:
    """Network outputs ``[S, B, ...]`` of a BNN for draws ``{site: [S, *site_shape]}`` on ``x`` ``[B, ...]``.

    Draws run ``chunk`` at a time through ``torch.func.vmap`` over :meth:`BNN.run` (one batched
    functional forward); a Python loop over draws is the fallback for networks that cannot be vmapped.
    Inputs are split into blocks of ``batch_size`` rows (default ``max_rows // chunk``) to bound the
    activations' memory.
    """
    draws = {k: v for k, v in draws.items() if k != PRECISION_SITE}  # the network does not read it
    if not draws:
        raise ValueError("no weight draws given")
    S = next(iter(draws.values())).shape[0]
    dtype = bnn._input_dtype()  # the network's (draws stored in bfloat16 are cast back to it)
    rows = max(1, max_rows // max(1, min(chunk, S))) if batch_size is None else batch_size
    outs = []
    for s0 in range(0, S, chunk):
        part = {k: v[s0:s0 + chunk].to(dtype) for k, v in draws.items()}
        cols = []
        for r0 in range(0, inputs.batch_size(x), rows):
            xb = inputs.rows(x, r0, r0 + rows)
            try:
                o = torch.func.vmap(lambda d: bnn.run(d, xb))(part)
            except (RuntimeError, ValueError, NotImplementedError):
                n = next(iter(part.values())).shape[0]
                o = torch.stack([bnn.run({k: v[i] for k, v in part.items()}, xb) for i in range(n)])
            cols.append(o)
        outs.append(torch.cat(cols, 1))
    return torch.cat(outs, 0)


class DrawSet:
    """Stored posterior draws of a BNN's latent sites (MCMC, SGLD, guide draws kept for reuse).

    :ivar bnn: the :class:`pyrobnn.BNN` whose ``model`` the draws belong to.
    :ivar draws: ``{site: Tensor[C, S, *site_shape]}`` (C chains, S draws each), constrained values.

    ``outputs(x, num_samples)`` runs all C·S draws, or ``num_samples`` evenly spaced ones, vmapped over
    draws; ``predict`` summarises them with the BNN's likelihood (with a latent noise precision among
    the draws, the variance is var(means) + mean over draws of 1/τ).
    """

    def __init__(self, bnn: BNN, draws: Dict[str, torch.Tensor]):
        if not isinstance(bnn, BNN):
            raise TypeError(f"{type(self).__name__} needs a pyrobnn BNN, got {type(bnn).__name__}")
        if not isinstance(draws, Mapping) or not draws:
            raise ValueError(f"a {type(self).__name__} needs at least one site's draws")
        lead = None
        for name, v in draws.items():
            if not isinstance(v, torch.Tensor) or v.dim() < 2:
                raise ValueError(f"draws[{name!r}] must be a tensor [chains, draws, ...]")
            if lead is None:
                lead = v.shape[:2]
            elif v.shape[:2] != lead:
                raise ValueError(f"draws[{name!r}] has leading shape {tuple(v.shape[:2])}, others {tuple(lead)}")
        self.bnn = bnn
        self.draws = dict(draws)

    @classmethod
    def from_draws(cls, bnn: BNN, draws: Sequence[Mapping[str, torch.Tensor]]) -> "DrawSet":
        """One chain of the given draws (``[{site: tensor}, ...]``, e.g. ``bnn.parameter_draws(S)``)."""
        draws = list(draws)
        if not draws or not all(isinstance(d, Mapping) for d in draws):
            raise ValueError("from_draws needs a non-empty list of {site: tensor} draws")
        return cls(bnn, {k: torch.stack([d[k] for d in draws])[None] for k in draws[0]})

    @property
    def num_chains(self) -> int:
        return next(iter(self.draws.values())).shape[0]

    @property
    def num_draws(self) -> int:
        """Draws per chain."""
        return next(iter(self.draws.values())).shape[1]

    def __len__(self):
        return self.num_chains * self.num_draws

    def missing_sites(self) -> List[str]:
        """Latent sites of the BNN with no draws here (a set that misses any cannot predict)."""
        names = list(self.bnn.site_priors)
        if getattr(self.bnn.likelihood, "scale_mode", None) == "latent":
            names.append(PRECISION_SITE)
        return [s for s in names if s not in self.draws]

    def get_samples(self, group_by_chain: bool = False) -> Dict[str, torch.Tensor]:
        """``{site: [C, S, ...]}`` or, flattened over chains, ``{site: [C·S, ...]}`` (as ``MCMC.get_samples``)."""
        if group_by_chain:
            return dict(self.draws)
        return {k: v.reshape((-1,) + v.shape[2:]) for k, v in self.draws.items()}

    def _selected(self, num_samples: Optional[int]) -> Dict[str, torch.Tensor]:
        flat = self.get_samples()
        idx = _evenly_spaced(len(self), num_samples)
        return flat if idx is None else {k: v[idx] for k, v in flat.items()}

    def _check_complete(self):
        missing = self.missing_sites()
        if missing:
            raise ValueError(f"this posterior kept no draws of sites {missing} (keep_sites); it cannot predict")

    # -- the protocol ----------------------------------------------------------------------------------
    def parameter_draws(self, num_samples: Optional[int] = None, *,
                        generator: Optional[torch.Generator] = None) -> List[Dict[str, torch.Tensor]]:
        """All C·S draws (chain after chain) or ``num_samples`` evenly spaced ones, each ``{site: tensor}``
        in the default dtype. ``generator`` is unused: the draws are fixed."""
        sel = self._selected(num_samples)
        dtype = torch.get_default_dtype()
        n = next(iter(sel.values())).shape[0]
        return [{k: v[i].to(dtype) for k, v in sel.items()} for i in range(n)]

    def run(self, draw: Mapping[str, torch.Tensor], x) -> torch.Tensor:
        """The BNN's network on ``x`` under ``draw`` (:meth:`pyrobnn.BNN.run`)."""
        return self.bnn.run(draw, _check_inputs(x))

    @torch.no_grad()
    def outputs(self, x, num_samples: Optional[int] = None, *, batch_size: Optional[int] = None) -> torch.Tensor:
        """Network outputs ``[S', B, ...]`` under all C·S draws or ``num_samples`` evenly spaced ones."""
        return self._outputs_and_precision(x, num_samples, batch_size)[0]

    def network(self, draw=None) -> nn.Module:
        return self.bnn.net

    # -- prediction ------------------------------------------------------------------------------------
    def _outputs_and_precision(self, x, num_samples, batch_size=None):
        self._check_complete()
        _check_positive(batch_size, "batch_size")
        flat = self._selected(num_samples)
        x = self.bnn._check_x(_check_inputs(x))
        outs = outputs_under_draws(self.bnn, flat, x, batch_size=batch_size)
        precision = flat.get(PRECISION_SITE)
        return outs, (None if precision is None else precision.to(outs.dtype))

    def sample_outputs(self, x, num_samples: Optional[int] = None) -> torch.Tensor:
        """The same as :meth:`outputs` (the name :meth:`pyrobnn.BNN.sample_outputs` uses)."""
        return self.outputs(x, num_samples)

    @torch.no_grad()
    def predict(self, x, num_samples: Optional[int] = None):
        """Predictive class probabilities ``[B, C]`` (classification) or ``(mean, variance)``."""
        outs, precision = self._outputs_and_precision(x, num_samples)
        lik = self.bnn.likelihood
        if precision is None:
            return lik.aggregate(outs)
        means = lik._mean(outs)
        return means.mean(0), means.var(0, unbiased=False) + precision.reciprocal().mean()

    def __repr__(self):
        return (f"{type(self).__name__}(chains={self.num_chains}, draws={self.num_draws}, sites={list(self.draws)}, "
                f"MB={sum(v.numel() * v.element_size() for v in self.draws.values()) / 2**20:.1f})")


# ----------------------------------------------------------------------------------------------------
# plain networks
# ----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _mode(net: nn.Module, dropout: bool):
    """Eval mode (dropout modules in train mode when ``dropout``), no gradients; restored afterwards."""
    was = net.training
    net.eval()
    if dropout:
        for m in _dropout_modules(net):
            m.train()
    try:
        with torch.no_grad():
            yield
    finally:
        net.train(was)


def _dropout_modules(net: nn.Module) -> List[nn.Module]:
    return [m for m in net.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]


class Ensemble:
    """Independently trained networks as a posterior (a deep ensemble): draw k is member k."""

    def __init__(self, nets: Sequence[nn.Module]):
        nets = list(nets) if isinstance(nets, (list, tuple, nn.ModuleList)) else nets
        if not isinstance(nets, list) or not nets or not all(isinstance(n, nn.Module) for n in nets):
            raise TypeError("an Ensemble needs a non-empty list of torch.nn.Module members")
        self.nets = nets

    def __len__(self):
        return len(self.nets)

    def __repr__(self):
        return f"Ensemble({len(self)} members)"

    def parameter_draws(self, num_samples: Optional[int] = None, *,
                        generator: Optional[torch.Generator] = None) -> List[nn.Module]:
        """The members (all, or ``num_samples`` evenly spaced ones); ``generator`` is unused."""
        idx = _evenly_spaced(len(self), num_samples)
        return list(self.nets) if idx is None else [self.nets[i] for i in idx.tolist()]

    def run(self, draw: nn.Module, x) -> torch.Tensor:
        """Member ``draw`` on ``x`` in eval mode."""
        if not isinstance(draw, nn.Module):
            raise TypeError(f"a draw of an Ensemble is one of its member networks, got {type(draw).__name__}")
        x = _check_inputs(x)
        with _mode(draw, dropout=False):
            return inputs.call(draw, x)

    def outputs(self, x, num_samples: Optional[int] = None, *, batch_size: Optional[int] = None) -> torch.Tensor:
        """Members' outputs ``[k, B, ...]``, ``batch_size`` rows at a time."""
        return stacked_outputs(self, self.parameter_draws(num_samples), x, batch_size)

    def network(self, draw=None) -> nn.Module:
        return self.nets[0] if draw is None else draw


class DropoutPosterior:
    """A network with dropout as a posterior (MC dropout, Gal & Ghahramani 2016): dropout on, every
    other layer in eval mode. ``outputs`` runs the S passes as one batched forward of the input
    repeated S times (at most ``max_rows`` rows at once; masks are drawn per row, so each example's S
    rows are independent draws). A draw of :meth:`parameter_draws` is an integer seed of the masks:
    ``run(seed, x)`` gives the same output for the same seed and input."""

    def __init__(self, net: nn.Module, max_rows: int = 65536):
        if not isinstance(net, nn.Module):
            raise TypeError(f"DropoutPosterior needs a torch.nn.Module, got {type(net).__name__}")
        if not _dropout_modules(net):
            raise ValueError("the network has no dropout module; use Ensemble([net]) for a fixed network")
        self.net = net
        self.max_rows = _check_positive(max_rows, "max_rows", allow_none=False)

    def __repr__(self):
        return f"DropoutPosterior({type(self.net).__name__})"

    def parameter_draws(self, num_samples: Optional[int] = 16, *,
                        generator: Optional[torch.Generator] = None) -> List[int]:
        """``num_samples`` mask seeds (from ``generator``, else torch's global random state)."""
        n = _check_positive(16 if num_samples is None else num_samples, "num_samples")
        return torch.randint(0, 2**62, (n,), generator=generator).tolist()

    def run(self, draw: int, x) -> torch.Tensor:
        """The network on ``x`` with the dropout masks drawn from seed ``draw``."""
        if isinstance(draw, bool) or not isinstance(draw, int):
            raise TypeError(f"a draw of MC dropout is an integer seed, got {type(draw).__name__}")
        x = _check_inputs(x)
        devices = sorted({v.device.index or 0 for v in inputs.leaves(x) if v.device.type == "cuda"})
        with torch.random.fork_rng(devices=devices), _mode(self.net, dropout=True):
            torch.manual_seed(draw)
            return inputs.call(self.net, x)

    def outputs(self, x, num_samples: Optional[int] = 16, *, batch_size: Optional[int] = None) -> torch.Tensor:
        """Outputs ``[S, B, ...]`` of S dropout passes (torch's global random state draws the masks)."""
        S = _check_positive(16 if num_samples is None else num_samples, "num_samples")

        def block(xb):
            B = inputs.batch_size(xb)
            per = max(1, self.max_rows // B)
            outs = []
            for s0 in range(0, S, per):
                n = min(per, S - s0)
                o = inputs.call(self.net, inputs.repeat(xb, n))
                outs.append(o.reshape((n, B) + o.shape[1:]))
            return torch.cat(outs, 0)

        with _mode(self.net, dropout=True):
            return _in_row_blocks(block, x, batch_size)

    def network(self, draw=None) -> nn.Module:
        return self.net


# ----------------------------------------------------------------------------------------------------
# the adapter
# ----------------------------------------------------------------------------------------------------
def as_posterior(obj) -> Posterior:
    """What a user has → a :class:`Posterior`: a posterior passes through (a :class:`pyrobnn.BNN`, a
    :class:`DrawSet` / ``SamplePosterior``, ...); a finished ``pyro.infer.MCMC`` run on ``bnn.model``
    → a :class:`DrawSet`; a network with dropout → :class:`DropoutPosterior`; any other network →
    a one-member :class:`Ensemble`; a list of networks → an :class:`Ensemble`."""
    from pyro.infer import MCMC
    if isinstance(obj, Posterior):
        return obj
    if isinstance(obj, MCMC):
        bnn = getattr(obj.kernel.model, "__self__", None)
        if not isinstance(bnn, BNN):
            raise TypeError("as_posterior takes an MCMC run on a BNN's model (bnn.model); wrap other runs with "
                            "DrawSet(bnn, mcmc.get_samples(group_by_chain=True))")
        if obj._samples is None:
            raise ValueError("this MCMC object has not been run")
        return DrawSet(bnn, obj.get_samples(group_by_chain=True))
    if isinstance(obj, nn.Module):
        return DropoutPosterior(obj) if _dropout_modules(obj) else Ensemble([obj])
    if isinstance(obj, (list, tuple)) and obj and all(isinstance(n, nn.Module) for n in obj):
        return Ensemble(list(obj))
    raise TypeError(f"cannot use a {type(obj).__name__} as a posterior: pass a BNN, a DrawSet or SamplePosterior, "
                    "a pyro.infer.MCMC run on bnn.model, a network or a list of networks")
