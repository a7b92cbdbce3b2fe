"""Teachers: every posterior predictive that :func:`~pyrobnn.inference.distill` can compress, behind
one protocol (:class:`Teacher`): kept draws, a guide, a running SGLD chain, MC dropout, a fixed network,
or any other :class:`pyrobnn.posterior.Posterior` (an ensemble, ...).

The running SGLD chain (:class:`~pyrobnn.inference.distill.SGLDChain`) is in :mod:`.chain`.

A teacher is a posterior: it answers the posterior protocol (``parameter_draws``, ``run``, ``outputs``,
``network``; :mod:`pyrobnn.posterior`) — through the posterior it holds (``teacher.posterior``), or, for
the running chain, itself — and adds what distillation reads: :meth:`Teacher.draws`, the outputs under S
draws turned into logits or Gaussian moments, with a hidden layer's mean activations when asked.

Hidden layers are read with forward hooks (:func:`_capture`; torch functions are never patched)."""
from __future__ import annotations

import contextlib
from typing import Callable, List, Optional

import pyro.poutine as poutine
import torch
import torch.nn as nn
from pyro.infer import MCMC

from pyrobnn import inputs as _inputs
from pyrobnn.bnn import BNN
from pyrobnn.likelihoods import Bernoulli
from pyrobnn.posterior import PRECISION_SITE as _PRECISION
from pyrobnn.posterior import DrawSet, DropoutPosterior, Ensemble, Posterior, outputs_under_draws, stacked_outputs

from ..sampling import SamplePosterior
from ..sgld import SGLD
from .loss import TeacherDraws, _binary_to_two_class, _check_task

__all__ = ["Teacher", "SampleTeacher", "GuideTeacher", "MCDropout", "Deterministic", "PosteriorTeacher",
           "as_teacher"]


# ----------------------------------------------------------------------------------------------------
# hidden-layer capture (forward hooks; never patches torch functions)
# ----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _capture(module: Optional[nn.Module]):
    store: List[torch.Tensor] = []
    if module is None:
        yield store
        return
    handle = module.register_forward_hook(lambda m, i, o: store.append(o.reshape(o.shape[0], -1)))
    try:
        yield store
    finally:
        handle.remove()


def _submodule(net: nn.Module, name: str, who: str) -> nn.Module:
    try:
        return net.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in net.named_modules() if n]
        raise ValueError(f"the {who} has no module {name!r}; its modules: {names}") from None


def _count(num_samples) -> dict:
    """``num_samples`` as a keyword, left out when None (each posterior then uses its own default)."""
    return {} if num_samples is None else {"num_samples": num_samples}


class Teacher:
    """The protocol every teacher follows: the posterior protocol, answered by ``self.posterior``, and
    :meth:`draws` for the distillation loss.

    :ivar task: ``"classification"`` or ``"regression"``.
    :ivar online: True for a running chain (:meth:`advance` moves it; one draw at a time).
    :ivar posterior: the :class:`pyrobnn.posterior.Posterior` the teacher stands for.
    """
    task: str = "classification"
    online: bool = False
    posterior: Posterior

    # -- the posterior protocol ----------------------------------------------------------------------
    def parameter_draws(self, num_samples: Optional[int] = None, *, generator: Optional[torch.Generator] = None):
        """Draws of the teacher's posterior (:meth:`pyrobnn.posterior.Posterior.parameter_draws`)."""
        return self.posterior.parameter_draws(**_count(num_samples), generator=generator)

    def run(self, draw, x) -> torch.Tensor:
        """The network's output on ``x`` under one draw."""
        return self.posterior.run(draw, x)

    def outputs(self, x, num_samples: Optional[int] = None, *, batch_size: Optional[int] = None) -> torch.Tensor:
        """Outputs ``[S, B, ...]`` under S draws."""
        return self.posterior.outputs(x, **_count(num_samples), batch_size=batch_size)

    def network(self, draw=None) -> nn.Module:
        """The network whose hidden layers ``hidden=`` names refer to."""
        return self.posterior.network(draw)

    # -- what distillation reads -----------------------------------------------------------------------
    def draws(self, x: torch.Tensor, num_samples: Optional[int], hidden: Optional[str] = None) -> TeacherDraws:
        """Outputs on ``x`` ``[B, ...]`` under ``num_samples`` draws (see :class:`TeacherDraws`)."""
        raise NotImplementedError

    def advance(self) -> None:
        """Move a running teacher one update (no-op for a fixed posterior)."""

    def state_bytes(self) -> int:
        """Bytes of tensors a running teacher holds (constant for :class:`SGLDChain`)."""
        return 0

    @property
    def stored_draws(self) -> int:
        """How many posterior draws the teacher keeps in memory (0 for a running chain)."""
        return 0


def _bnn_task(bnn: BNN) -> str:
    return "regression" if bnn.likelihood.task == "regression" else "classification"


def _bnn_logits(bnn: BNN, outs: torch.Tensor) -> torch.Tensor:
    if isinstance(bnn.likelihood, Bernoulli):
        return _binary_to_two_class(bnn.likelihood._logit(outs))
    return outs


def _bnn_noise_var(bnn: BNN, precision: Optional[torch.Tensor], mean: torch.Tensor):
    lik = bnn.likelihood
    if precision is not None:
        return precision.to(mean.dtype).reciprocal().reshape((-1,) + (1,) * (mean.dim() - 1))
    if getattr(lik, "scale_mode", None) == "latent":
        raise ValueError("the teacher's likelihood has a latent noise precision but no draws of it")
    return (lik.sigma().detach().to(mean.dtype) ** 2)


def _bnn_draws(bnn: BNN, outs: torch.Tensor, precision: Optional[torch.Tensor], hidden) -> TeacherDraws:
    if _bnn_task(bnn) == "classification":
        return TeacherDraws(logits=_bnn_logits(bnn, outs), hidden=hidden)
    mean = bnn.likelihood._mean(outs)
    return TeacherDraws(mean=mean, noise_var=_bnn_noise_var(bnn, precision, mean), hidden=hidden)


def _hidden_mean(store: List[torch.Tensor], S: int, B: int) -> torch.Tensor:
    h = torch.cat(store, 0)
    if h.shape[0] != S * B:
        raise ValueError(f"captured {h.shape[0]} rows of the hidden layer for {S} draws × {B} examples")
    return h.reshape(S, B, -1).mean(0)


class SampleTeacher(Teacher):
    """Kept posterior draws of a BNN: a :class:`pyrobnn.posterior.DrawSet` such as
    :class:`pyrobnn.inference.SamplePosterior` (or ``pyro.infer.MCMC`` via :meth:`SamplePosterior.from_mcmc`).
    Each call uses ``num_samples`` draws picked at random without replacement (all of them when None or
    larger), an unbiased estimate of the full ensemble's loss."""

    def __init__(self, posterior, generator: Optional[torch.Generator] = None):
        if not isinstance(posterior, DrawSet):
            raise TypeError(f"SampleTeacher needs a SamplePosterior or DrawSet, got {type(posterior).__name__}")
        missing = posterior.missing_sites()
        if missing:
            raise ValueError(f"the posterior kept no draws of sites {missing}; it cannot teach")
        self.posterior = posterior
        self.bnn = posterior.bnn
        self.task = _bnn_task(self.bnn)
        self.flat = posterior.get_samples()
        self.total = next(iter(self.flat.values())).shape[0]
        self.generator = generator

    @property
    def stored_draws(self):
        return self.total

    def draws(self, x, num_samples, hidden=None):
        if num_samples is None or num_samples >= self.total:
            sel = self.flat
        else:
            idx = torch.randperm(self.total, generator=self.generator)[:num_samples]
            sel = {k: v[idx] for k, v in self.flat.items()}
        S = next(iter(sel.values())).shape[0]
        dtype = torch.get_default_dtype()
        h = None
        if hidden is None:
            outs = outputs_under_draws(self.bnn, sel, x)
        else:   # hooks cannot see inside vmap: one forward per draw
            with _capture(_submodule(self.bnn.net, hidden, "teacher")) as store:
                outs = torch.stack([self.bnn.run({k: v[i].to(dtype) for k, v in sel.items() if k != _PRECISION}, x)
                                    for i in range(S)])
            h = _hidden_mean(store, S, _inputs.batch_size(x))
        return _bnn_draws(self.bnn, outs, sel.get(_PRECISION), h)


class GuideTeacher(Teacher):
    """A :class:`pyrobnn.BNN` with its guide: draws from ``bnn.sample_outputs(x, S)``; a latent noise
    precision is drawn from the guide alongside."""

    def __init__(self, bnn: BNN):
        if not isinstance(bnn, BNN):
            raise TypeError(f"GuideTeacher needs a pyrobnn BNN, got {type(bnn).__name__}")
        self.bnn = self.posterior = bnn
        self.task = _bnn_task(bnn)

    def _precisions(self, x, S):
        if getattr(self.bnn.likelihood, "scale_mode", None) != "latent":
            return None
        with torch.no_grad(), poutine.block():
            return torch.stack([poutine.trace(self.bnn.autoguide).get_trace(_inputs.rows(x, 0, 1)).nodes[_PRECISION]["value"]
                                for _ in range(S)])

    def draws(self, x, num_samples, hidden=None):
        S = 32 if num_samples is None else num_samples
        module = None if hidden is None else _submodule(self.bnn.net, hidden, "teacher")
        with _capture(module) as store:
            outs = self.bnn.sample_outputs(x, S, max_rows=max(16384, S * _inputs.batch_size(x)))
        h = _hidden_mean(store, S, _inputs.batch_size(x)) if hidden is not None else None
        return _bnn_draws(self.bnn, outs, self._precisions(x, S), h)


def _dropout_modules(net: nn.Module) -> List[nn.Module]:
    return [m for m in net.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]


def _plain_draws(outs: torch.Tensor, task: str, noise_variance, hidden) -> TeacherDraws:
    """Outputs of a plain network ``[S, B, ...]`` → draws. Regression: ``[S, B]``/``[S, B, 1]`` are
    means (noise ``noise_variance``); ``[S, B, 2]`` are (mean, log-variance) per draw."""
    if task == "classification":
        if outs.dim() == 2 or (outs.dim() == 3 and outs.shape[-1] == 1):
            outs = _binary_to_two_class(outs.reshape(outs.shape[:2]))
        return TeacherDraws(logits=outs, hidden=hidden)
    if outs.dim() == 3 and outs.shape[-1] == 2 and noise_variance is None:
        return TeacherDraws(mean=outs[..., 0], noise_var=outs[..., 1].exp(), hidden=hidden)
    mean = outs.squeeze(-1) if outs.dim() == 3 and outs.shape[-1] == 1 else outs
    var = None if noise_variance is None else torch.as_tensor(float(noise_variance), dtype=mean.dtype)
    return TeacherDraws(mean=mean, noise_var=var, hidden=hidden)


class MCDropout(Teacher):
    """A network with dropout as a posterior (Gal & Ghahramani 2016): S passes with dropout on and every
    other layer in eval mode. The S passes run as one batched forward of the input repeated S times
    (dropout masks are drawn per row, so each example's S rows are independent draws).

    :param task: ``"classification"`` (logits ``[B, C]``, or one Bernoulli logit) or ``"regression"``
        (``[B]``/``[B, 1]`` means with ``noise_variance``, or ``[B, 2]`` mean and log-variance).
    :param noise_variance: regression: the homoscedastic noise variance (τ⁻¹ in Gal's notation).
    """

    def __init__(self, net: nn.Module, task: str = "classification", noise_variance: Optional[float] = None,
                 max_rows: int = 65536):
        if not isinstance(net, nn.Module):
            raise TypeError(f"MCDropout needs a torch.nn.Module, got {type(net).__name__}")
        if not _dropout_modules(net):
            raise ValueError("the network has no dropout module; use Deterministic for a fixed network")
        self.net, self.task, self.noise_variance = net, _check_task(task), noise_variance
        self.max_rows = max_rows
        self.posterior = DropoutPosterior(net, max_rows)

    @torch.no_grad()
    def sample(self, x, num_samples: int, hidden: Optional[str] = None):
        """Raw outputs ``[S, B, ...]`` (:meth:`pyrobnn.posterior.DropoutPosterior.outputs`) and the hidden
        layer's ``[S, B, H]`` when asked."""
        module = None if hidden is None else _submodule(self.net, hidden, "teacher")
        with _capture(module) as store:
            outs = self.posterior.outputs(x, num_samples)
        h = torch.cat(store, 0).reshape(num_samples, _inputs.batch_size(x), -1) if store else None
        return outs, h

    def draws(self, x, num_samples, hidden=None):
        outs, h = self.sample(x, 16 if num_samples is None else num_samples, hidden)
        return _plain_draws(outs, self.task, self.noise_variance, None if h is None else h.mean(0))


class Deterministic(Teacher):
    """A fixed network (or any callable ``x -> outputs``) as a one-draw teacher."""

    def __init__(self, net: Callable, task: str = "classification", noise_variance: Optional[float] = None):
        if not callable(net):
            raise TypeError(f"Deterministic needs a network or callable, got {type(net).__name__}")
        self.net, self.task, self.noise_variance = net, _check_task(task), noise_variance
        self.posterior = Ensemble([net]) if isinstance(net, nn.Module) else None

    def parameter_draws(self, num_samples=None, *, generator=None):
        return [self.net]

    @torch.no_grad()
    def run(self, draw, x) -> torch.Tensor:
        return draw(x) if self.posterior is None else self.posterior.run(draw, x)

    def outputs(self, x, num_samples=None, *, batch_size=None) -> torch.Tensor:
        return stacked_outputs(self, self.parameter_draws(), x, batch_size)

    def network(self, draw=None):
        if not isinstance(self.net, nn.Module):
            raise ValueError("hidden= needs a teacher that is a torch.nn.Module")
        return self.net

    @torch.no_grad()
    def draws(self, x, num_samples, hidden=None):
        module = None if hidden is None else _submodule(self.network(), hidden, "teacher")
        was = getattr(self.net, "training", None)
        if was is not None:
            self.net.eval()
        try:
            with _capture(module) as store:
                out = self.net(x)
        finally:
            if was:
                self.net.train()
        return _plain_draws(out[None], self.task, self.noise_variance, store[0] if store else None)


class PosteriorTeacher(Teacher):
    """Any :class:`pyrobnn.posterior.Posterior` whose outputs are a plain network's (an
    :class:`~pyrobnn.posterior.Ensemble`, a :class:`~pyrobnn.posterior.DropoutPosterior`, one of your
    own) as a teacher: ``outputs(x, num_samples)``; with ``hidden=``, one ``run`` per draw of
    ``parameter_draws`` with the hidden layer of ``network(draw)`` read by a forward hook.

    :param task: as for :class:`MCDropout` (logits, or regression means / mean and log-variance).
    :param noise_variance: regression: the homoscedastic noise variance.
    """

    def __init__(self, posterior: Posterior, task: str = "classification", noise_variance: Optional[float] = None,
                 generator: Optional[torch.Generator] = None):
        if not isinstance(posterior, Posterior):
            raise TypeError(f"PosteriorTeacher needs a pyrobnn.posterior.Posterior, got {type(posterior).__name__}")
        self.posterior, self.task, self.noise_variance = posterior, _check_task(task), noise_variance
        self.generator = generator

    @property
    def stored_draws(self):
        return len(self.posterior) if isinstance(self.posterior, Ensemble) else 0

    @torch.no_grad()
    def draws(self, x, num_samples, hidden=None):
        if hidden is None:
            return _plain_draws(self.outputs(x, num_samples), self.task, self.noise_variance, None)
        outs, hs = [], []
        for draw in self.parameter_draws(num_samples, generator=self.generator):
            with _capture(_submodule(self.network(draw), hidden, "teacher")) as store:
                outs.append(self.run(draw, x))
            hs.append(store[0])
        return _plain_draws(torch.stack(outs), self.task, self.noise_variance, torch.stack(hs).mean(0))


def as_teacher(obj, task: Optional[str] = None, generator: Optional[torch.Generator] = None) -> Teacher:
    """Wrap a posterior predictive as a :class:`Teacher`: a Teacher passes through; a SamplePosterior or
    :class:`~pyrobnn.posterior.DrawSet`, a ``pyro.infer.MCMC`` run, a BNN (its guide), a network with
    dropout (:class:`MCDropout`), any other network or callable (:class:`Deterministic`), a list of
    networks (an :class:`~pyrobnn.posterior.Ensemble`) or any other posterior (:class:`PosteriorTeacher`);
    ``task`` defaults to classification where the posterior does not say."""
    if isinstance(obj, Teacher):
        return obj
    if isinstance(obj, DrawSet):
        return SampleTeacher(obj, generator)
    if isinstance(obj, MCMC):
        return SampleTeacher(SamplePosterior.from_mcmc(obj), generator)
    if isinstance(obj, BNN):
        return GuideTeacher(obj)
    if isinstance(obj, SGLD):
        raise TypeError("a bare SGLD kernel has no data to run on: wrap it as SGLDChain(bnn, (x, y), kernel=k)")
    if isinstance(obj, nn.Module):
        task = task or "classification"
        return MCDropout(obj, task) if _dropout_modules(obj) else Deterministic(obj, task)
    if isinstance(obj, (list, tuple)) and obj and all(isinstance(n, nn.Module) for n in obj):
        return PosteriorTeacher(Ensemble(list(obj)), task or "classification", generator=generator)
    if isinstance(obj, Posterior):
        return PosteriorTeacher(obj, task or "classification", generator=generator)
    if callable(obj):
        return Deterministic(obj, task or "classification")
    raise TypeError(f"cannot use a {type(obj).__name__} as a teacher")
