""":func:`distill`: the training of a student on the loop (:class:`DistillStep`), and its record."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import pyro
import torch
import torch.nn as nn
import torch.nn.functional as F

from pyrobnn import inputs as _inputs
from pyrobnn.validation import integer, non_negative_float, positive_float, positive_int

from ..batches import Stream
from ..loop import History, Loop, Progress, descend
from ..schedules import LRFactor
from ..supervised import label_loss
from .adversarial import Adversarial, Discriminator, _adv_features
from .loss import _aggregate, _check_task, _check_temperature, _loss_to_target
from .stream import _cache_targets, _index_target, _Inputs
from . import teachers
from .teachers import _capture, _submodule, as_teacher

__all__ = ["distill", "DistillRecord", "DistillStep"]


# ----------------------------------------------------------------------------------------------------
# the record
# ----------------------------------------------------------------------------------------------------
@dataclass
class DistillRecord(History):
    """What happened in a :func:`distill` run.

    :ivar records: one dict every ``log_every`` student steps: ``step``, ``loss`` (distillation loss,
        mean since the last record), ``label_loss``, ``d_loss``/``g_loss`` (adversarial),
        ``teacher_updates``, ``teacher_state_bytes`` (tensor bytes a running teacher holds),
        ``seconds``.
    :ivar teacher_draws_stored: posterior draws the teacher held in memory (0 for a running chain).
    :ivar config: the run's settings.
    """
    teacher_draws_stored: int = 0
    config: Dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    discriminator: Optional[nn.Module] = None


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
        (``step`` counts from 1; ``teacher`` is the :class:`~pyrobnn.inference.distill.Teacher` wrapper).
    :returns: ``(student, record)`` with ``record`` a :class:`DistillRecord`.
    """
    if not isinstance(student, nn.Module):
        raise TypeError(f"the student must be a torch.nn.Module, got {type(student).__name__}")
    generator = torch.Generator()
    if seed is not None:
        integer("seed", seed)
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
        positive_int(name, v)
    if num_samples is not None:
        positive_int("num_samples", num_samples)
    positive_float("lr", lr)
    for name, v in (("input_noise", input_noise), ("label_weight", label_weight), ("weight_decay", weight_decay)):
        non_negative_float(name, v)
    stream = _Inputs(inputs, batch_size, generator)
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps= and epochs=")
    if steps is None:
        per = stream.steps_per_epoch()
        if per is None:
            raise ValueError("epochs= needs inputs of known length; give steps=")
        positive_int("epochs", epochs)
        steps = epochs * per
    positive_int("steps", steps)
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

    def __init__(self, teacher: teachers.Teacher, student: nn.Module, optimizer, task: str, *, temperature: float,
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
                v.shape, generator=self.generator, dtype=v.dtype).to(v.device) if v.is_floating_point() else v)
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
                self.disc = Discriminator(ft.shape[-1], adv.width, adv.spectral_norm).to(ft.device)
                self.d_opt = torch.optim.Adam(self.disc.parameters(), lr=adv.lr, betas=(0.5, 0.999))
            disc = self.disc
            ones = torch.full((ft.shape[0],), 1.0 - adv.label_smoothing, device=ft.device)
            zeros = torch.zeros(fs.shape[0], device=fs.device)
            for _ in range(adv.d_steps):
                d_loss = F.binary_cross_entropy_with_logits(disc(ft.detach()), ones) + \
                    F.binary_cross_entropy_with_logits(disc(fs.detach()), zeros)
                self.d_opt.zero_grad(set_to_none=True)
                d_loss.backward()
                self.d_opt.step()
            for p in disc.parameters():
                p.requires_grad_(False)
            g_loss = F.binary_cross_entropy_with_logits(disc(fs), torch.ones(fs.shape[0], device=fs.device))
            for p in disc.parameters():
                p.requires_grad_(True)
            total = total + adv.weight * g_loss
            logs["d_loss"], logs["g_loss"] = d_loss.item(), g_loss.item()
        descend(total, self.opt, self.params, self.grad_clip, "the distillation loss")
        return logs
