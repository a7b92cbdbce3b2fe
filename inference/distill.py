"""Distillation: compress any posterior predictive into one deterministic ``torch.nn.Module`` student.

``distill(teacher, student, inputs, ...)`` trains ``student`` (any architecture) to reproduce the
teacher's *posterior predictive* on a set of inputs — the teacher's labels are never needed — and
returns ``(student, record)``. The student is a plain network: running it needs neither Pyro nor the
teacher's draws.

Teachers (:func:`as_teacher` turns each into the common protocol of :class:`Teacher`):

* a :class:`pyrobnn.inference.SamplePosterior` (kept SG-MCMC draws) or a finished ``pyro.infer.MCMC``
  run on ``bnn.model``: each batch uses ``num_samples`` draws chosen at random (all when None);
* a :class:`pyrobnn.BNN` with its (trained) guide: ``bnn.sample_outputs(x, S)``;
* :class:`SGLDChain` — a *running* SGLD/pSGLD chain (online "Bayesian dark knowledge", Korattikara
  et al. 2015): one teacher update on a fresh training minibatch, then one student update on the
  teacher's *current* draw; the chain holds only its current state, so memory does not grow with the
  number of steps and no draw is ever stored;
* :class:`MCDropout` — a network with dropout, sampled at prediction time (dropout on, S passes);
* :class:`Deterministic` — any fixed network or callable (one "draw").

Objectives (``distillation_loss``), both a divergence that is zero exactly when the student
reproduces the teacher's predictive and positive otherwise:

* classification — with temperature T, p̄_T(x) = (1/S) Σ_s softmax(f_s(x)/T) and
  loss = T² · KL(p̄_T ‖ softmax(g(x)/T)), averaged over the batch. Averaging KL(p_s ‖ q) over draws
  (Korattikara et al.'s objective) differs from this by a constant, so the gradients are the same; the
  T² factor keeps gradient magnitudes comparable across temperatures (Hinton et al. 2015). A Bernoulli
  teacher (one logit l) is the two-class softmax over (0, l); a student may output one logit or two.
* regression — the student outputs ``[B, 2]`` (mean μ, log-variance log σ²) or ``[B, 2D]`` (D means,
  then D log-variances). Its Gaussian NLL averaged over the teacher's draws,
  E_s E_{y ~ N(m_s, v_s)} [−log N(y; μ, σ²)] = ½ log 2πσ² + ((m̄ − μ)² + v̄)/(2σ²), with m̄ the mean of
  the draws' means and v̄ = Var_s(m_s) + E_s v_s the predictive's total variance, is minimised at
  μ = m̄, σ² = v̄. The loss reported is this NLL minus its minimum, i.e. KL(N(m̄, v̄) ‖ N(μ, σ²)) (same
  gradient). v_s is the draw's noise variance (1/τ_s for a latent precision, σ² for a learned or
  fixed one).

Inputs: a tensor ``[N, ...]`` of unlabelled inputs (often the training inputs), an ``(x, y)`` pair
(``y`` is used only by ``label_weight``), or any iterable of batches (``x`` or ``(x, y)``);
``input_noise`` adds fresh Gaussian noise of that standard deviation to every batch (the perturbed
training inputs of the seed). For a fixed teacher and noise-free tensor inputs, the teacher's
predictive on all inputs is computed once and cached (``cache_teacher``).

Adversarial distillation (Bayesian distillation of heterogeneous models, 2020; ``adversarial=True`` or a dict of :class:`Adversarial` options): a
discriminator D separates the teacher's predictive log-probabilities (regression: mean and log total
variance) — optionally concatenated with a hidden layer's activations — from the student's; per batch
one D step, then one student step on loss + ``weight`` · (−log D(student)) (the non-saturating GAN
loss). Log-probabilities rather than raw logits: logits carry an arbitrary per-example offset that
would let D separate the two without telling anything about the predictive. Stabilisers, both on by
default: spectral normalisation of every D layer (Miyato et al. 2018) — D stays 1-Lipschitz, so it
cannot grow arbitrarily sharp and its gradient to the student stays informative even when the two
sets are easy to separate, which they are early on; and one-sided label smoothing (Salimans et al.
2016; teacher target 0.9) — D is never rewarded for extreme confidence on teacher outputs.

Evaluation: :func:`evaluate_distillation` measures teacher ensemble vs students vs a deterministic
network trained on the labels (:func:`train_deterministic`) — accuracy/RMSE, NLL, ECE and latency
per batch in one run. Persistence: :func:`save_student` / :func:`load_student` (safetensors + JSON;
architectures from :mod:`pyrobnn.models` rebuild by name).
"""
from __future__ import annotations

import contextlib
import csv
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import pyro
import pyro.poutine as poutine
import torch
import torch.nn as nn
import torch.nn.functional as F

from pyrobnn import inputs as _inputs
from pyrobnn.bnn import BNN
from pyrobnn.io import read_state, write_state

from .batches import Stream
from .loop import Loop, Progress, check_finite
from .schedules import LRFactor
from .supervised import label_loss, train_deterministic  # noqa: F401  (train_deterministic: re-exported)

__all__ = ["distill", "distillation_loss", "DistillRecord", "Teacher", "SGLDChain", "MCDropout", "Deterministic",
           "SampleTeacher", "GuideTeacher", "as_teacher", "Adversarial", "Discriminator", "evaluate_distillation",
           "train_deterministic", "save_student", "load_student", "student_predictive"]

_TASKS = ("classification", "regression")
_PRECISION = "likelihood.precision"


# ----------------------------------------------------------------------------------------------------
# the teacher's outputs and the loss
# ----------------------------------------------------------------------------------------------------
@dataclass
class TeacherDraws:
    """A teacher's outputs on one batch under S draws.

    classification: ``logits`` ``[S, B, C]``. regression: ``mean`` ``[S, B]`` or ``[S, B, D]`` and
    ``noise_var`` broadcastable to it (the draws' aleatoric variance). ``hidden``: ``[B, H]`` mean over
    draws of a hidden layer's activations, when asked for."""
    logits: Optional[torch.Tensor] = None
    mean: Optional[torch.Tensor] = None
    noise_var: Optional[torch.Tensor] = None
    hidden: Optional[torch.Tensor] = None


def _binary_to_two_class(logit: torch.Tensor) -> torch.Tensor:
    """One logit l per example → two-class logits (0, l) (softmax of which is (1 − σ(l), σ(l)))."""
    return torch.stack([torch.zeros_like(logit), logit], -1)


def _aggregate(draws: TeacherDraws, task: str, temperature: float):
    """The teacher's predictive on a batch: classification → log p̄_T ``[B, C]``;
    regression → (m̄ ``[B(, D)]``, v̄ ``[B(, D)]``)."""
    if task == "classification":
        logits = draws.logits
        S = logits.shape[0]
        return torch.logsumexp(F.log_softmax(logits / temperature, -1), 0) - math.log(S)
    mean = draws.mean
    var = torch.zeros((), dtype=mean.dtype) if draws.noise_var is None else draws.noise_var
    m_bar = mean.mean(0)
    v_bar = mean.var(0, unbiased=False) + (var + torch.zeros_like(mean)).mean(0)
    return m_bar, v_bar


def _student_logits(out: torch.Tensor, num_classes: int) -> torch.Tensor:
    if out.dim() == 1 or (out.dim() == 2 and out.shape[-1] == 1 and num_classes == 2):
        return _binary_to_two_class(out.reshape(out.shape[0]))
    if out.dim() != 2 or out.shape[-1] != num_classes:
        raise ValueError(f"the student outputs shape {tuple(out.shape)}; the teacher's predictive has "
                         f"{num_classes} classes (need [B, {num_classes}]" + (" or [B, 1]" if num_classes == 2 else "") + ")")
    return out


def _student_gaussian(out: torch.Tensor, mean_shape: torch.Size) -> Tuple[torch.Tensor, torch.Tensor]:
    """Student output ``[B, 2]`` / ``[B, 2D]`` → (μ, log σ²) shaped like the teacher's mean ``[B(, D)]``."""
    D = 1 if len(mean_shape) == 1 else mean_shape[-1]
    if out.dim() != 2 or out.shape[-1] != 2 * D:
        raise ValueError(f"a regression student must output [B, {2 * D}] (mean{'s' if D > 1 else ''} then "
                         f"log-variance{'s' if D > 1 else ''}); it gave {tuple(out.shape)}")
    mu, log_var = out[:, :D], out[:, D:]
    return mu.reshape(mean_shape), log_var.reshape(mean_shape)


def _loss_to_target(target, out: torch.Tensor, task: str, temperature: float) -> torch.Tensor:
    """Per-example divergence ``[B]`` from the teacher's predictive ``target`` to the student's output."""
    if task == "classification":
        log_p = target
        log_q = F.log_softmax(_student_logits(out, log_p.shape[-1]) / temperature, -1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        return kl * temperature ** 2
    m_bar, v_bar = target
    mu, log_var = _student_gaussian(out, m_bar.shape)
    # KL(N(m̄, v̄) ‖ N(μ, σ²)) = ½[log σ² − log v̄ + (v̄ + (m̄ − μ)²)/σ² − 1]; exp(−log σ²) keeps it finite
    kl = 0.5 * (log_var - v_bar.clamp_min(1e-30).log() + (v_bar + (m_bar - mu) ** 2) * torch.exp(-log_var) - 1.0)
    return kl.reshape(kl.shape[0], -1).sum(-1)


def distillation_loss(teacher_outputs, student_output: torch.Tensor, task: str = "classification",
                      temperature: float = 1.0, noise_variance=None) -> torch.Tensor:
    """The distillation objective on one batch (a scalar; see the module docstring).

    :param teacher_outputs: classification — the teacher's logits under S draws ``[S, B, C]`` (or one
        network's ``[B, C]``; binary: ``[S, B]`` logits of a Bernoulli teacher); regression — the draws'
        means ``[S, B]`` / ``[S, B, D]`` (or ``[B]``: one draw).
    :param student_output: classification ``[B, C]`` logits (binary: ``[B]``, ``[B, 1]`` or ``[B, 2]``);
        regression ``[B, 2]`` / ``[B, 2D]`` (means, then log-variances).
    :param noise_variance: regression only: the draws' noise variance, broadcastable to the means
        (``[S]`` per-draw values, ``[S, 1]``, or a float); 0 when None.
    :returns: T²·KL(p̄_T ‖ q_T) or KL(N(m̄, v̄) ‖ N(μ, σ²)), averaged over the batch — 0 iff matched.
    """
    task = _check_task(task)
    _check_temperature(temperature)
    t = torch.as_tensor(teacher_outputs)
    if task == "classification":
        if t.dim() == 2 and student_output.dim() == 2 and t.shape == student_output.shape:
            t = t[None]                                   # one network's logits [B, C]
        elif t.dim() in (1, 2):
            t = _binary_to_two_class(t if t.dim() == 2 else t[None])   # Bernoulli logits [S, B] / [B]
        elif t.dim() == 3 and t.shape[-1] == 1:
            t = _binary_to_two_class(t.squeeze(-1))
        if t.dim() != 3:
            raise ValueError(f"teacher logits must be [S, B, C] or [B, C], got {tuple(t.shape)}")
        if t.shape[1] != student_output.shape[0]:
            raise ValueError(f"teacher has {t.shape[1]} examples, the student {student_output.shape[0]}")
        draws = TeacherDraws(logits=t)
    else:
        if t.dim() == 1:
            t = t[None]
        var = None
        if noise_variance is not None:
            var = torch.as_tensor(noise_variance, dtype=t.dtype)
            if var.dim() == 1 and var.shape[0] == t.shape[0]:
                var = var.reshape((-1,) + (1,) * (t.dim() - 1))
            if (var < 0).any():
                raise ValueError("noise_variance must be ≥ 0")
        draws = TeacherDraws(mean=t, noise_var=var)
    return _loss_to_target(_aggregate(draws, task, temperature), student_output, task, temperature).mean()


def _check_task(task):
    if task not in _TASKS:
        raise ValueError(f"task must be one of {_TASKS}, got {task!r}")
    return task


def _check_temperature(temperature):
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature <= 0:
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")


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


# ----------------------------------------------------------------------------------------------------
# teachers
# ----------------------------------------------------------------------------------------------------
class Teacher:
    """The protocol every teacher follows.

    :ivar task: ``"classification"`` or ``"regression"``.
    :ivar online: True for a running chain (:meth:`advance` moves it; one draw at a time).
    """
    task: str = "classification"
    online: bool = False

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

    def network(self) -> nn.Module:
        """The network whose hidden layers ``hidden=`` names refer to."""
        raise NotImplementedError


def _bnn_task(bnn: BNN) -> str:
    return "regression" if bnn.likelihood.task == "regression" else "classification"


def _bnn_logits(bnn: BNN, outs: torch.Tensor) -> torch.Tensor:
    from pyrobnn.likelihoods import Bernoulli
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


class _NetUnder:
    """Run a BNN's network with its latent sites fixed to one draw (no Pyro trace kept)."""

    def __init__(self, bnn: BNN):
        self.bnn = bnn

    def __call__(self, draw: Dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        bnn = self.bnn
        saved = getattr(bnn.likelihood, "_precision", None)
        was_training = bnn.training
        bnn.eval()
        try:
            with torch.no_grad(), poutine.block():
                return poutine.condition(bnn._net_only, data=draw)(x)
        finally:
            bnn.train(was_training)
            if hasattr(bnn.likelihood, "_precision"):
                bnn.likelihood._precision = saved


class SampleTeacher(Teacher):
    """Kept posterior draws: a :class:`pyrobnn.inference.SamplePosterior` (or ``pyro.infer.MCMC`` via
    :meth:`SamplePosterior.from_mcmc`). Each call uses ``num_samples`` draws picked at random without
    replacement (all of them when None or larger), an unbiased estimate of the full ensemble's loss."""

    def __init__(self, posterior, generator: Optional[torch.Generator] = None):
        from .sampling import SamplePosterior
        if not isinstance(posterior, SamplePosterior):
            raise TypeError(f"SampleTeacher needs a SamplePosterior, got {type(posterior).__name__}")
        missing = posterior.missing_sites()
        if missing:
            raise ValueError(f"the posterior kept no draws of sites {missing}; it cannot teach")
        self.posterior = posterior
        self.bnn = posterior.bnn
        self.task = _bnn_task(self.bnn)
        self.flat = posterior.get_samples()
        self.total = next(iter(self.flat.values())).shape[0]
        self.generator = generator
        self._net = _NetUnder(self.bnn)

    @property
    def stored_draws(self):
        return self.total

    def network(self):
        return self.bnn.net

    def draws(self, x, num_samples, hidden=None):
        from pyrobnn.diagnostics import outputs_under_draws
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
                outs = torch.stack([self._net({k: v[i].to(dtype) for k, v in sel.items() if k != _PRECISION}, x)
                                    for i in range(S)])
            h = _hidden_mean(store, S, _inputs.batch_size(x))
        return _bnn_draws(self.bnn, outs, sel.get(_PRECISION), h)


class GuideTeacher(Teacher):
    """A :class:`pyrobnn.BNN` with its guide: draws from ``bnn.sample_outputs(x, S)``; a latent noise
    precision is drawn from the guide alongside."""

    def __init__(self, bnn: BNN):
        if not isinstance(bnn, BNN):
            raise TypeError(f"GuideTeacher needs a pyrobnn BNN, got {type(bnn).__name__}")
        self.bnn = bnn
        self.task = _bnn_task(bnn)

    def network(self):
        return self.bnn.net

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

    def network(self):
        return self.net

    @contextlib.contextmanager
    def _mode(self):
        was = self.net.training
        self.net.eval()
        for m in _dropout_modules(self.net):
            m.train()
        try:
            yield
        finally:
            self.net.train(was)

    @torch.no_grad()
    def sample(self, x, num_samples: int, hidden: Optional[str] = None):
        """Raw outputs ``[S, B, ...]`` (and the hidden layer's ``[S, B, H]`` when asked)."""
        S, B = num_samples, _inputs.batch_size(x)
        module = None if hidden is None else _submodule(self.net, hidden, "teacher")
        per = max(1, self.max_rows // B)
        outs, hs = [], []
        with self._mode():
            for s0 in range(0, S, per):
                n = min(per, S - s0)
                with _capture(module) as store:
                    o = _inputs.call(self.net, _inputs.repeat(x, n))
                outs.append(o.reshape((n, B) + o.shape[1:]))
                if store:
                    hs.append(store[0].reshape(n, B, -1))
        return torch.cat(outs, 0), (torch.cat(hs, 0) if hs else None)

    def draws(self, x, num_samples, hidden=None):
        outs, h = self.sample(x, 16 if num_samples is None else num_samples, hidden)
        return _plain_draws(outs, self.task, self.noise_variance, None if h is None else h.mean(0))


class Deterministic(Teacher):
    """A fixed network (or any callable ``x -> outputs``) as a one-draw teacher."""

    def __init__(self, net: Callable, task: str = "classification", noise_variance: Optional[float] = None):
        if not callable(net):
            raise TypeError(f"Deterministic needs a network or callable, got {type(net).__name__}")
        self.net, self.task, self.noise_variance = net, _check_task(task), noise_variance

    def network(self):
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


class SGLDChain(Teacher):
    """A running SGLD / pSGLD chain over a BNN: the online teacher of Bayesian dark knowledge.

    :meth:`advance` makes one kernel update on the next minibatch of ``data`` (the model sees a batch
    of ``batch_size`` rows and scales its log-likelihood by N/M, as :func:`pyrobnn.inference.sample`
    drives the kernel); :meth:`draws` gives the network's outputs at the chain's *current* state
    (S = 1). Only the current state (and the kernel's own constant-size state: the last finite state,
    pSGLD's second moments) is held, so memory is flat in the number of updates.

    :param bnn: a :class:`pyrobnn.BNN` (its ``dataset_size`` defaults to ``len(data)``).
    :param data: ``(x, y)`` training tensors.
    :param kernel: ``"sgld"``, ``"psgld"`` or an :class:`~pyrobnn.inference.SGLD` / ``PSGLD`` instance on
        ``bnn.model``.
    :param step_size: a float, schedule or callable (kernel name only).
    :param burn_in: updates made before the first draw is used (run at the first :meth:`draws`, or by
        :meth:`burn`).
    :param seed: seeds the minibatch order (Pyro's RNG drives the noise; ``distill(seed=...)`` sets it).
    """
    online = True

    def __init__(self, bnn: BNN, data: Tuple[torch.Tensor, torch.Tensor], kernel="sgld", *, step_size=None,
                 batch_size: int = 32, burn_in: int = 0, seed: Optional[int] = None, **kernel_kwargs):
        from .sgld import PSGLD, SGLD
        if not isinstance(bnn, BNN):
            raise TypeError(f"SGLDChain needs a pyrobnn BNN, got {type(bnn).__name__}")
        if not (isinstance(data, (tuple, list)) and len(data) == 2 and _inputs.is_inputs(data[0])
                and isinstance(data[1], torch.Tensor)):
            raise TypeError("data must be an (x, y) pair of tensors (x: a tensor, a tuple or a dict of tensors)")
        x, y = bnn._check_x(data[0]), data[1]
        if _inputs.batch_size(x) != y.shape[0]:
            raise ValueError(f"x has {_inputs.batch_size(x)} examples but y has {y.shape[0]}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if isinstance(burn_in, bool) or not isinstance(burn_in, int) or burn_in < 0:
            raise ValueError(f"burn_in must be an integer ≥ 0, got {burn_in!r}")
        self.bnn, self.x, self.y = bnn, x, y
        self.task = _bnn_task(bnn)
        self.batch_size = min(batch_size, _inputs.batch_size(x))
        self.burn_in = burn_in
        if bnn.dataset_size is None:
            bnn.dataset_size = _inputs.batch_size(x)
        if isinstance(kernel, SGLD):
            if step_size is not None or kernel_kwargs:
                raise ValueError("pass step_size and kernel options to the kernel instance")
            if getattr(kernel.model, "__self__", None) is not bnn:
                raise ValueError("the kernel must be built on this BNN's model (SGLD(bnn.model, ...))")
            self.kernel = kernel
        elif isinstance(kernel, str) and kernel.lower() in ("sgld", "psgld"):
            cls = SGLD if kernel.lower() == "sgld" else PSGLD
            default = 1e-5 if cls is SGLD else 1e-3
            self.kernel = cls(bnn.model, default if step_size is None else step_size, **kernel_kwargs)
        else:
            raise ValueError(f"kernel must be 'sgld', 'psgld' or an SGLD/PSGLD instance, got {kernel!r}")
        self.generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())) if seed is None else seed)
        self._perm = torch.empty(0, dtype=torch.long)
        self._pos = 0
        self.params: Optional[Dict[str, torch.Tensor]] = None
        self.updates = 0
        self._net = _NetUnder(bnn)

    def network(self):
        return self.bnn.net

    def _batch(self):
        if self._pos + self.batch_size > self._perm.shape[0]:
            self._perm = torch.randperm(_inputs.batch_size(self.x), generator=self.generator)
            self._pos = 0
        idx = self._perm[self._pos:self._pos + self.batch_size]
        self._pos += self.batch_size
        return _inputs.index(self.x, idx), self.y[idx]

    @contextlib.contextmanager
    def _stepping(self):
        saved = self.bnn.subsample_size
        self.bnn.subsample_size = None     # this chain supplies the minibatch
        try:
            with pyro.validation_enabled(False), poutine.block():
                yield
        finally:
            self.bnn.subsample_size = saved

    def _start(self):
        xb, yb = self._batch()
        with self._stepping():
            self.kernel.setup(0, xb, yb)
        self.params = self.kernel.initial_params

    def advance(self):
        if self.params is None:
            self._start()
        xb, yb = self._batch()
        with self._stepping():
            self.params = self.kernel.step(self.params, xb, yb)
        self.updates += 1

    def burn(self):
        """Run the remaining burn-in updates."""
        while self.updates < self.burn_in:
            self.advance()

    def current(self) -> Dict[str, torch.Tensor]:
        """The current state in constrained space ``{site: tensor}`` (a view, not a copy)."""
        if self.params is None:
            self._start()
        out = {}
        for name, transform in self.kernel._sites:
            v = self.params[name].detach()
            out[name] = v if transform is None else transform(v)
        return out

    def state_bytes(self):
        seen, total = set(), 0
        tensors = list((self.params or {}).values()) + self.kernel.kept_tensors()
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total

    def draws(self, x, num_samples=None, hidden=None):
        self.burn()
        state = self.current()
        precision = state.pop(_PRECISION, None)
        module = None if hidden is None else _submodule(self.bnn.net, hidden, "teacher")
        with _capture(module) as store:
            out = self._net(state, x)
        return _bnn_draws(self.bnn, out[None], None if precision is None else precision.reshape(1),
                          store[0] if store else None)


def as_teacher(obj, task: Optional[str] = None, generator: Optional[torch.Generator] = None) -> Teacher:
    """Wrap a posterior predictive as a :class:`Teacher`: a Teacher passes through; a SamplePosterior,
    a ``pyro.infer.MCMC`` run, a BNN (its guide), a network with dropout (:class:`MCDropout`), or any
    other network or callable (:class:`Deterministic`, ``task`` defaulting to classification)."""
    from pyro.infer import MCMC

    from .sampling import SamplePosterior
    from .sgld import SGLD
    if isinstance(obj, Teacher):
        return obj
    if isinstance(obj, SamplePosterior):
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
    if callable(obj):
        return Deterministic(obj, task or "classification")
    raise TypeError(f"cannot use a {type(obj).__name__} as a teacher")


# ----------------------------------------------------------------------------------------------------
# adversarial part
# ----------------------------------------------------------------------------------------------------
@dataclass
class Adversarial:
    """Options of adversarial distillation.

    :ivar weight: multiplies the student's fooling loss −log D(student) added to its task loss.
    :ivar hidden: ``(teacher_module, student_module)`` names whose activations (equal widths) are
        appended to the discriminator's input; None: log-probabilities only.
    :ivar lr: the discriminator's Adam learning rate (betas (0.5, 0.999), the usual GAN setting).
    :ivar width: hidden units of the discriminator's two hidden layers.
    :ivar spectral_norm: spectral normalisation of every discriminator layer.
    :ivar label_smoothing: one-sided: the teacher's target is 1 − label_smoothing.
    :ivar d_steps: discriminator updates per student update.
    """
    weight: float = 0.1
    hidden: Optional[Tuple[str, str]] = None
    lr: float = 2e-4
    width: int = 64
    spectral_norm: bool = True
    label_smoothing: float = 0.1
    d_steps: int = 1

    def __post_init__(self):
        if not (isinstance(self.weight, (int, float)) and self.weight >= 0):
            raise ValueError(f"adversarial weight must be ≥ 0, got {self.weight!r}")
        if not (isinstance(self.label_smoothing, (int, float)) and 0 <= self.label_smoothing < 0.5):
            raise ValueError(f"label_smoothing must lie in [0, 0.5), got {self.label_smoothing!r}")
        if self.hidden is not None:
            if not (isinstance(self.hidden, (tuple, list)) and len(self.hidden) == 2
                    and all(isinstance(n, str) for n in self.hidden)):
                raise ValueError("hidden must be a (teacher_module, student_module) pair of names")
            self.hidden = tuple(self.hidden)
        for name in ("lr",):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0):
                raise ValueError(f"{name} must be positive, got {v!r}")
        for name in ("width", "d_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")


class Discriminator(nn.Module):
    """D(z) = P(z came from the teacher) as a logit ``[B]``: in → width → width → 1, LeakyReLU(0.2),
    every Linear spectrally normalised (when asked)."""

    def __init__(self, in_features: int, width: int = 64, spectral_norm: bool = True):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm if spectral_norm else (lambda m: m)
        self.body = nn.Sequential(sn(nn.Linear(in_features, width)), nn.LeakyReLU(0.2),
                                  sn(nn.Linear(width, width)), nn.LeakyReLU(0.2), sn(nn.Linear(width, 1)))

    def forward(self, z):
        return self.body(z).squeeze(-1)


def _adv_features(target, out, task, temperature, hidden):
    """Teacher / student discriminator inputs from the predictive target and the student's output."""
    if task == "classification":
        t = target
        s = F.log_softmax(_student_logits(out, target.shape[-1]) / temperature, -1)
    else:
        m_bar, v_bar = target
        mu, log_var = _student_gaussian(out, m_bar.shape)
        flat = lambda a: a.reshape(a.shape[0], -1)  # noqa: E731
        t = torch.cat([flat(m_bar), flat(v_bar.clamp_min(1e-30).log())], -1)
        s = torch.cat([flat(mu), flat(log_var)], -1)
    if hidden is not None:
        th, sh = hidden
        if th.shape[-1] != sh.shape[-1]:
            raise ValueError(f"hidden layers differ in width (teacher {th.shape[-1]}, student {sh.shape[-1]}); "
                             "the discriminator needs equal widths")
        t, s = torch.cat([t, th], -1), torch.cat([s, sh], -1)
    return t, s


# ----------------------------------------------------------------------------------------------------
# the record
# ----------------------------------------------------------------------------------------------------
@dataclass
class DistillRecord:
    """What happened in a :func:`distill` run.

    :ivar records: one dict every ``log_every`` student steps: ``step``, ``loss`` (distillation loss,
        mean since the last record), ``label_loss``, ``d_loss``/``g_loss`` (adversarial),
        ``teacher_updates``, ``teacher_state_bytes`` (tensor bytes a running teacher holds),
        ``seconds``.
    :ivar teacher_draws_stored: posterior draws the teacher held in memory (0 for a running chain).
    :ivar config: the run's settings.
    """
    records: List[Dict[str, Any]] = field(default_factory=list)
    teacher_draws_stored: int = 0
    config: Dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    discriminator: Optional[nn.Module] = None

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return self.records[i]

    def column(self, key):
        return [r.get(key) for r in self.records]

    def to_csv(self, path):
        keys: List[str] = []
        for r in self.records:
            keys += [k for k in r if k not in keys]
        tmp = Path(str(path) + ".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.records)
        os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------
class _Inputs:
    """An endless stream of (x, y or None) batches from a tensor, an (x, y) pair or an iterable."""

    def __init__(self, inputs, batch_size, generator):
        self.generator = generator
        self.labels = None
        self.iterable = None
        if isinstance(inputs, (torch.Tensor, dict)):
            self.x = inputs
        elif isinstance(inputs, (tuple, list)) and len(inputs) == 2 and _inputs.is_inputs(inputs[0]) \
                and isinstance(inputs[1], torch.Tensor):
            self.x, self.labels = inputs
        elif hasattr(inputs, "__iter__") and not isinstance(inputs, (str, bytes, dict)):
            self.x = None
            self.iterable = inputs
        else:
            raise TypeError("inputs must be a tensor [N, ...], an (x, y) pair of tensors or an iterable of batches")
        if self.x is not None:
            self.x = _inputs.as_inputs(self.x, torch.get_default_dtype(), what="inputs")
            _inputs.check_finite(self.x, "inputs")
            n = _inputs.batch_size(self.x)
            if self.labels is not None and self.labels.shape[0] != n:
                raise ValueError(f"inputs x has {n} examples but y has {self.labels.shape[0]}")
            self.batch_size = min(batch_size, n)
        self._stream = self._tensor_stream() if self.x is not None else self._iter_stream()
        self.epoch = 0

    def _tensor_stream(self):
        n = _inputs.batch_size(self.x)
        while True:
            perm = torch.randperm(n, generator=self.generator)
            for i in range(0, n - self.batch_size + 1, self.batch_size):
                idx = perm[i:i + self.batch_size]
                yield idx, _inputs.index(self.x, idx), (None if self.labels is None else self.labels[idx])
            self.epoch += 1

    def _iter_stream(self):
        while True:
            if hasattr(self.iterable, "set_epoch"):
                self.iterable.set_epoch(self.epoch)
            empty = True
            for batch in self.iterable:
                empty = False
                if isinstance(batch, (torch.Tensor, dict)):
                    yield None, batch, None
                elif isinstance(batch, (tuple, list)) and batch and _inputs.is_inputs(batch[0]):
                    yield None, batch[0], (batch[1] if len(batch) > 1 else None)
                else:
                    raise TypeError("each batch must be a tensor x or an (x, y) pair")
            if empty:
                raise ValueError("the inputs iterable yielded no batches")
            self.epoch += 1

    def steps_per_epoch(self):
        if self.x is not None:
            return max(1, _inputs.batch_size(self.x) // self.batch_size)
        return len(self.iterable) if hasattr(self.iterable, "__len__") else None

    def __next__(self):
        return next(self._stream)


@torch.no_grad()
def _cache_targets(teacher: Teacher, x: torch.Tensor, num_samples, temperature, chunk: int = 512):
    parts = [_aggregate(teacher.draws(_inputs.rows(x, i, i + chunk), num_samples), teacher.task, temperature)
             for i in range(0, _inputs.batch_size(x), chunk)]
    if teacher.task == "classification":
        return torch.cat(parts, 0)
    return torch.cat([p[0] for p in parts], 0), torch.cat([p[1] for p in parts], 0)


def _index_target(target, idx, task):
    return target[idx] if task == "classification" else (target[0][idx], target[1][idx])


def _lr_factor(schedule, step, total):
    if schedule is None:
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * step / total))
    if schedule == "linear-decay":
        return 1.0 - step / total
    if callable(schedule):
        return float(schedule(step))
    raise ValueError(f"lr_schedule must be None, 'cosine', 'linear-decay' or a callable step -> factor, got {schedule!r}")


# ----------------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------------
def distill(teacher, student: nn.Module, inputs, *, task: Optional[str] = None, steps: Optional[int] = None,
            epochs: Optional[int] = None, batch_size: int = 128, lr: float = 1e-3, weight_decay: float = 0.0,
            optimizer: str = "adam", lr_schedule=None, temperature: float = 1.0, num_samples: Optional[int] = 16,
            input_noise: float = 0.0, teacher_steps: int = 1, adversarial: Union[None, bool, Mapping, Adversarial] = None,
            label_weight: float = 0.0, cache_teacher: Optional[bool] = None, grad_clip: Optional[float] = None,
            seed: Optional[int] = None, log_every: int = 100, callbacks: Sequence[Callable] = (),
            progress: bool = False) -> Tuple[nn.Module, DistillRecord]:
    """Train ``student`` to reproduce ``teacher``'s posterior predictive on ``inputs``.

    :param teacher: anything :func:`as_teacher` accepts (SamplePosterior, ``MCMC``, BNN, :class:`SGLDChain`,
        :class:`MCDropout`, a network).
    :param student: any ``torch.nn.Module`` mapping a batch ``[B, ...]`` of inputs to logits ``[B, C]``
        (classification) or ``[B, 2]`` / ``[B, 2D]`` means and log-variances (regression). Trained in
        place and returned (in eval mode).
    :param inputs: tensor ``[N, ...]``, ``(x, y)`` pair, or iterable of batches (module docstring).
    :param task: ``"classification"`` / ``"regression"``; taken from a BNN teacher's likelihood.
    :param steps: student updates (or ``epochs`` passes over tensor inputs; one of the two).
    :param temperature: T of the classification loss (1: match the predictive itself).
    :param num_samples: teacher draws per batch (a running chain always gives its one current draw).
    :param input_noise: standard deviation of the Gaussian noise added to every input batch.
    :param teacher_steps: running chain: teacher updates per student update.
    :param adversarial: None/False, True (defaults), a mapping of :class:`Adversarial` fields or an instance.
    :param label_weight: adds ``label_weight`` × the student's NLL on the labels of ``(x, y)`` inputs.
    :param cache_teacher: compute the teacher's predictive on all inputs once (default: when the teacher
        is fixed, inputs are a noise-free tensor and no hidden layer is matched).
    :param callbacks: each called as ``cb(step, teacher, student, record)`` after every student step
        (``step`` counts from 1; ``teacher`` is the :class:`Teacher` wrapper).
    :returns: ``(student, record)`` with ``record`` a :class:`DistillRecord`.
    """
    if not isinstance(student, nn.Module):
        raise TypeError(f"the student must be a torch.nn.Module, got {type(student).__name__}")
    generator = torch.Generator()
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        pyro.set_rng_seed(seed)
        generator.manual_seed(seed)
    else:
        generator.manual_seed(int(torch.randint(0, 2**62, ())))
    t = as_teacher(teacher, task, generator)
    if task is not None and _check_task(task) != t.task:
        raise ValueError(f"task={task!r} but the teacher is a {t.task} model")
    task = t.task
    _check_temperature(temperature)
    for name, v in (("batch_size", batch_size), ("teacher_steps", teacher_steps), ("log_every", log_every)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1):
        raise ValueError(f"num_samples must be a positive integer or None, got {num_samples!r}")
    for name, v in (("lr", lr),):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name} must be a positive number, got {v!r}")
    for name, v in (("input_noise", input_noise), ("label_weight", label_weight), ("weight_decay", weight_decay)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be a finite number ≥ 0, got {v!r}")
    stream = _Inputs(inputs, batch_size, generator)
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps= and epochs=")
    if steps is None:
        per = stream.steps_per_epoch()
        if per is None:
            raise ValueError("epochs= needs inputs of known length; give steps=")
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
        steps = epochs * per
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if label_weight > 0 and stream.labels is None and stream.iterable is None:
        raise ValueError("label_weight > 0 needs labelled inputs: pass inputs=(x, y)")
    adv = None
    if adversarial is True:
        adv = Adversarial()
    elif isinstance(adversarial, Adversarial):
        adv = adversarial
    elif isinstance(adversarial, Mapping):
        adv = Adversarial(**adversarial)
    elif adversarial not in (None, False):
        raise TypeError(f"adversarial must be None, a bool, a mapping or an Adversarial, got {adversarial!r}")
    hidden_t = hidden_s = None
    if adv is not None and adv.hidden is not None:
        hidden_t = adv.hidden[0]
        _submodule(t.network(), hidden_t, "teacher")
        hidden_s = _submodule(student, adv.hidden[1], "student")
    can_cache = (not t.online and stream.x is not None and input_noise == 0 and hidden_t is None)
    if cache_teacher is None:
        cache_teacher = can_cache
    elif cache_teacher and not can_cache:
        raise ValueError("cache_teacher needs a fixed teacher, noise-free tensor inputs and no hidden-layer matching")
    opts = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}
    if optimizer not in opts:
        raise ValueError(f"optimizer must be one of {sorted(opts)}, got {optimizer!r}")
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the student has no trainable parameters")
    opt = opts[optimizer](params, lr=lr, weight_decay=weight_decay)

    record = DistillRecord(teacher_draws_stored=t.stored_draws, config={
        "task": task, "teacher": type(t).__name__, "steps": steps, "batch_size": batch_size, "lr": lr,
        "optimizer": optimizer, "temperature": temperature, "num_samples": num_samples, "input_noise": input_noise,
        "teacher_steps": teacher_steps, "label_weight": label_weight, "cache_teacher": bool(cache_teacher),
        "adversarial": None if adv is None else dict(adv.__dict__), "seed": seed})
    t0 = time.perf_counter()
    cached = _cache_targets(t, stream.x, num_samples, temperature) if cache_teacher else None
    if t.online and hasattr(t, "burn"):
        t.burn()
    step = DistillStep(t, student, opt, task, temperature=temperature, num_samples=num_samples,
                       input_noise=input_noise, generator=generator, cached=cached, hidden=(hidden_t, hidden_s),
                       label_weight=label_weight, adversarial=adv, grad_clip=grad_clip, teacher_steps=teacher_steps)

    def summarize(loop):
        return {"step": loop.position.global_step + 1, **{k: v / loop.count for k, v in loop.sums.items()},
                "teacher_updates": getattr(t, "updates", 0), "teacher_state_bytes": t.state_bytes(),
                "seconds": time.perf_counter() - t0}

    bar = Progress(desc=lambda e, n: "distill", postfix=lambda loop: {"loss": f"{loop.history[-1]['loss']:.4g}"},
                   postfix_every=None, dynamic_ncols=False) if progress else None
    was_training = student.training
    try:
        Loop(step, Stream(stream, steps), model=student,
             schedules=[LRFactor(opt, lr, lambda k: _lr_factor(lr_schedule, k, steps), per="step")],
             callbacks=[_OnStep(cb, t, student, record) for cb in callbacks], summarize=summarize,
             record_every=log_every, progress=bar, history=record, diverged_at="step").run()
    finally:
        student.train(was_training)
    student.eval()
    record.seconds = time.perf_counter() - t0
    record.discriminator = step.disc
    return student, record


class _OnStep:
    """``cb(step, teacher, student, record)`` after every student step (``step`` counts from 1)."""

    def __init__(self, cb, teacher, student, record):
        self.cb, self.teacher, self.student, self.record = cb, teacher, student, record

    def on_step_end(self, loop, position, logs):
        self.cb(position.global_step + 1, self.teacher, self.student, self.record)


class DistillStep:
    """One student update of :func:`distill`: advance a running teacher (``begin``, before the batch is
    drawn), perturb the batch (``input_noise``), the teacher's predictive on it (cached or fresh), the
    student's divergence to it plus the label and adversarial terms, the NaN guard, one optimiser step.
    Returns the logged numbers (``loss``, ``label_loss``, ``d_loss``, ``g_loss``)."""

    def __init__(self, teacher: Teacher, student: nn.Module, optimizer, task: str, *, temperature: float,
                 num_samples: Optional[int], input_noise: float, generator: torch.Generator, cached=None,
                 hidden=(None, None), label_weight: float = 0.0, adversarial: Optional[Adversarial] = None,
                 grad_clip: Optional[float] = None, teacher_steps: int = 1):
        self.teacher, self.student, self.opt, self.task = teacher, student, optimizer, task
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.temperature, self.num_samples, self.input_noise = temperature, num_samples, input_noise
        self.generator, self.cached, (self.hidden_t, self.hidden_s) = generator, cached, hidden
        self.label_weight, self.adv, self.grad_clip = label_weight, adversarial, grad_clip
        self.teacher_steps = teacher_steps
        self.disc = self.d_opt = None

    def begin(self, position):
        for _ in range(self.teacher_steps if self.teacher.online else 0):
            self.teacher.advance()

    def __call__(self, idx, xb, yb):
        t, task, temperature, adv = self.teacher, self.task, self.temperature, self.adv
        if self.input_noise > 0:
            xb = _inputs.map_leaves(xb, lambda v: v + self.input_noise * torch.randn(
                v.shape, generator=self.generator, dtype=v.dtype) if v.is_floating_point() else v)
        if self.cached is not None:
            target, th = _index_target(self.cached, idx, task), None
        else:
            with torch.no_grad():
                d = t.draws(xb, self.num_samples, self.hidden_t)
                target, th = _aggregate(d, task, temperature), d.hidden
        with _capture(self.hidden_s) as store:
            out = _inputs.call(self.student, xb)
        loss = _loss_to_target(target, out, task, temperature).mean()
        total = loss
        logs = {"loss": loss.item()}
        if self.label_weight > 0:
            if yb is None:
                raise ValueError("label_weight > 0 but a batch came without labels")
            lab = label_loss(out, yb, task)
            total = total + self.label_weight * lab
            logs["label_loss"] = lab.item()
        if adv is not None:
            sh = store[0] if store else None
            ft, fs = _adv_features(target, out, task, temperature, None if th is None else (th, sh))
            if self.disc is None:
                self.disc = Discriminator(ft.shape[-1], adv.width, adv.spectral_norm)
                self.d_opt = torch.optim.Adam(self.disc.parameters(), lr=adv.lr, betas=(0.5, 0.999))
            disc = self.disc
            ones = torch.full((ft.shape[0],), 1.0 - adv.label_smoothing)
            zeros = torch.zeros(fs.shape[0])
            for _ in range(adv.d_steps):
                d_loss = F.binary_cross_entropy_with_logits(disc(ft.detach()), ones) + \
                    F.binary_cross_entropy_with_logits(disc(fs.detach()), zeros)
                self.d_opt.zero_grad(set_to_none=True)
                d_loss.backward()
                self.d_opt.step()
            for p in disc.parameters():
                p.requires_grad_(False)
            g_loss = F.binary_cross_entropy_with_logits(disc(fs), torch.ones(fs.shape[0]))
            for p in disc.parameters():
                p.requires_grad_(True)
            total = total + adv.weight * g_loss
            logs["d_loss"], logs["g_loss"] = d_loss.item(), g_loss.item()
        check_finite(total, "the distillation loss")
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.opt.step()
        return logs


# ----------------------------------------------------------------------------------------------------
# predictive of a student, a deterministic baseline, evaluation
# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def student_predictive(student: nn.Module, x: torch.Tensor, task: str = "classification"):
    """A student's (or any such network's) predictive: class probabilities ``[B, C]`` or (mean, variance)."""
    task = _check_task(task)
    was = student.training
    student.eval()
    try:
        out = _inputs.call(student, _inputs.as_inputs(x, next(iter(student.parameters()), torch.empty(0)).dtype))
    finally:
        student.train(was)
    if task == "classification":
        if out.dim() == 1 or out.shape[-1] == 1:
            return _binary_to_two_class(out.reshape(-1)).softmax(-1)
        return out.softmax(-1)
    D = out.shape[-1] // 2
    mean, log_var = out[:, :D], out[:, D:]
    if D == 1:
        mean, log_var = mean.squeeze(-1), log_var.squeeze(-1)
    return mean, log_var.exp()


def _classification_metrics(probs, y):
    from pyrobnn.metrics import accuracy, ece, nll
    return {"accuracy": accuracy(probs, y), "nll": nll(probs, y), "ece": ece(probs, y)}


def _regression_metrics(mean, var, y, y_scale):
    from pyrobnn.metrics import gaussian_nll, rmse
    return {"rmse": rmse(mean, y) * y_scale, "nll": gaussian_nll(mean, var, y) + math.log(y_scale)}


def _teacher_metrics(t: Teacher, x, y, num_samples, y_scale):
    d = t.draws(x, num_samples)
    if t.task == "classification":
        return _classification_metrics(F.softmax(d.logits, -1).mean(0), y.long())
    mean = d.mean
    var = (torch.zeros((), dtype=mean.dtype) if d.noise_var is None else d.noise_var) + torch.zeros_like(mean)
    # the mixture's log-likelihood log (1/S) Σ_s N(y; m_s, v_s), not a moment-matched Gaussian
    lp = -0.5 * (torch.log(2 * math.pi * var) + (y - mean) ** 2 / var)
    lpd = torch.logsumexp(lp, 0) - math.log(mean.shape[0])
    return {"rmse": ((mean.mean(0) - y) ** 2).mean().sqrt().item() * y_scale,
            "nll": -lpd.mean().item() + math.log(y_scale)}


@torch.no_grad()
def evaluate_distillation(teacher, students: Mapping[str, nn.Module], x: torch.Tensor, y: torch.Tensor, *,
                          task: Optional[str] = None, num_samples: Optional[int] = 16,
                          latency_batch: int = 128, latency_repeats: int = 20, y_scale: float = 1.0,
                          teacher_name: Optional[str] = None) -> Dict[str, Dict[str, float]]:
    """Teacher ensemble vs students (and any other network, e.g. a :func:`train_deterministic`
    baseline, passed among ``students``) on ``(x, y)``, in one run.

    Per row: classification ``accuracy``, ``nll``, ``ece``; regression ``rmse`` and ``nll`` (the
    teacher's mixture log-likelihood; a student's Gaussian), multiplied / shifted by ``y_scale`` so
    that standardised targets are scored in original units; and ``latency_ms``: the median CPU time
    (``time.process_time``, all threads of the process) to predict one batch of ``latency_batch``
    inputs (teacher: the S-draw predictive), over ``latency_repeats`` rounds interleaved across rows;
    ``latency_wall_ms`` the median wall time of the same calls. Students also get ``latency_ratio`` =
    teacher / student CPU latency and ``latency_wall_ratio``. CPU time is the primary column because on
    a shared machine a long call is pre-empted more often than a short one, which inflates wall-time
    ratios.
    """
    t = as_teacher(teacher, task)
    name = teacher_name or f"teacher ensemble (S={num_samples})"
    rows: Dict[str, Dict[str, float]] = {name: _teacher_metrics(t, x, y, num_samples, y_scale)}
    for sname, net in students.items():
        if t.task == "classification":
            rows[sname] = _classification_metrics(student_predictive(net, x, "classification"), y.long())
        else:
            mean, var = student_predictive(net, x, "regression")
            rows[sname] = _regression_metrics(mean, var, y.reshape(mean.shape), y_scale)
    xb = _inputs.rows(_inputs.as_inputs(x), 0, latency_batch)
    fns = {name: (lambda: _aggregate(t.draws(xb, num_samples), t.task, 1.0))}
    for sname, net in students.items():
        fns[sname] = (lambda net=net: student_predictive(net, xb, t.task))
    for fn in fns.values():   # warm-up (lazy initialisation, allocator)
        fn()
    cpu: Dict[str, List[float]] = {k: [] for k in fns}
    wall: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(latency_repeats):
        for k, fn in fns.items():
            c0, w0 = time.process_time(), time.perf_counter()
            fn()
            cpu[k].append(time.process_time() - c0)
            wall[k].append(time.perf_counter() - w0)
    for k in fns:
        rows[k]["latency_ms"] = 1e3 * statistics.median(cpu[k])
        rows[k]["latency_wall_ms"] = 1e3 * statistics.median(wall[k])
    for sname in students:
        rows[sname]["latency_ratio"] = rows[name]["latency_ms"] / max(rows[sname]["latency_ms"], 1e-9)
        rows[sname]["latency_wall_ratio"] = rows[name]["latency_wall_ms"] / rows[sname]["latency_wall_ms"]
    return rows


# ----------------------------------------------------------------------------------------------------
# persistence
# ----------------------------------------------------------------------------------------------------
def save_student(student: nn.Module, path, meta: Optional[Dict[str, Any]] = None) -> None:
    """Write a student's ``state_dict`` and a JSON description to one safetensors file (atomic,
    checksummed). A network built by :func:`pyrobnn.models.build` carries its architecture, so
    :func:`load_student` can rebuild it; ``meta`` (JSON-able) is stored alongside (task, temperature...)."""
    if not isinstance(student, nn.Module):
        raise TypeError(f"save_student takes a torch.nn.Module, got {type(student).__name__}")
    arch = getattr(student, "_pyrobnn_arch", None)
    write_state(path, dict(student.state_dict()), {"kind": "distilled-student", "arch": arch, "meta": dict(meta or {})})


def load_student(path, net: Optional[nn.Module] = None) -> Tuple[nn.Module, Dict[str, Any]]:
    """Read a file written by :func:`save_student` → ``(student in eval mode, meta)``. ``net``: a fresh
    instance of the architecture when it was not built from :mod:`pyrobnn.models`."""
    tensors, header = read_state(path)
    if header.get("kind") != "distilled-student":
        raise ValueError(f"{path} holds a pyrobnn {header.get('kind')!r}, not a distilled student")
    if net is None:
        arch = header.get("arch")
        if not arch:
            raise ValueError(f"{path} was saved from a custom network; pass net=<a fresh instance>")
        from pyrobnn.models import build
        net = build(dict(arch))
    try:
        net.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: tensors do not fit the architecture: {e}") from None
    net.eval()
    return net, header.get("meta", {})
