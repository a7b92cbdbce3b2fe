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

from ..supervised import train_deterministic
from .adversarial import Adversarial, Discriminator
from .evaluation import evaluate_distillation, student_predictive
from .loss import TeacherDraws, _aggregate, distillation_loss  # noqa: F401  (_aggregate: for tests)
from .student_io import load_student, save_student
from .chain import SGLDChain
from .teachers import Deterministic, GuideTeacher, MCDropout, PosteriorTeacher, SampleTeacher, Teacher, as_teacher
from .training import DistillRecord, DistillStep, distill

__all__ = ["distill", "distillation_loss", "DistillRecord", "Teacher", "SGLDChain", "MCDropout", "Deterministic",
           "SampleTeacher", "GuideTeacher", "as_teacher", "Adversarial", "Discriminator", "evaluate_distillation",
           "train_deterministic", "save_student", "load_student", "student_predictive", "DistillStep",
           "TeacherDraws", "PosteriorTeacher"]
