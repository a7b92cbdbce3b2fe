"""Likelihoods p(y | f(x; w)): the observation site of a BNN and its predictive summaries.

Each likelihood validates its targets at the boundary, issues the ``obs`` site inside the data plate
(Pyro applies the N/M scaling), and turns S network outputs ``[S, B, ...]`` into predictive quantities.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import LIKELIHOODS
from .site_dist import LogitsCategorical
from .validation import positive_float

__all__ = ["Likelihood", "Categorical", "Bernoulli", "Gaussian"]


def _as_tensor(y, what="y"):
    if isinstance(y, torch.Tensor):
        return y
    try:
        return torch.as_tensor(y)
    except Exception:
        raise TypeError(f"{what} must be a tensor or array-like, got {type(y).__name__}") from None


class Likelihood(nn.Module):
    """Observation model p(y | f(x)) for a network's output ``[B, ...]``; the base of the registered
    likelihoods. A subclass implements :meth:`distribution` (and :meth:`check_targets`); it may own
    parameters or latent sites (:meth:`sample_latents`)."""

    #: "classification" or "regression"
    task = "classification"

    def config(self):
        return {}

    def sample_latents(self):
        """Issue the likelihood's own latent sites, if any (called by the model before the network)."""

    def check_output(self, out: torch.Tensor) -> None:
        """Raise a clear error if the network's output ``[B, ...]`` does not fit this likelihood."""

    def check_targets(self, out: torch.Tensor, y) -> torch.Tensor:
        """Validate targets ``y [B, ...]`` against the output ``out`` and return them as a tensor."""
        raise NotImplementedError

    def distribution(self, out: torch.Tensor):
        """The distribution of ``y`` given the network output ``out [B, ...]`` (batch shape ``[B]``)."""
        raise NotImplementedError

    def aggregate(self, outs: torch.Tensor):
        """The posterior predictive from the outputs of S draws ``outs [S, B, ...]`` (what
        :meth:`pyrobnn.BNN.predict` returns): class probabilities, a mean and variance, ..."""
        raise NotImplementedError(f"{type(self).__name__} does not define aggregate(outs); BNN.predict needs it")

    def observe(self, out, y, plate):
        with plate:
            # Marked so guides never treat an unobserved (y=None) observation site as a latent.
            return pyro.sample("obs", self.distribution(out), obs=y, infer={"pyrobnn_observation": True})

    def log_prob(self, out, y):
        """Per-example log p(y | out), shape ``out.shape[:-1]`` or ``[..., B]``."""
        return self.distribution(out).log_prob(y)

    def predictive_log_prob(self, outs, y):
        """log (1/S) Σ_s p(y | out_s): the posterior-predictive log-likelihood per example."""
        lp = self.log_prob(outs, y.unsqueeze(0).expand((outs.shape[0],) + y.shape))
        return torch.logsumexp(lp, 0) - math.log(outs.shape[0])


@LIKELIHOODS.register("categorical")
class Categorical(Likelihood):
    """Softmax classifier: the network outputs logits ``[B, C]``; targets are class indices."""

    def __init__(self, num_classes: Optional[int] = None):
        super().__init__()
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 2):
            raise ValueError(f"num_classes must be an integer ≥ 2, got {num_classes!r}")
        self.num_classes = num_classes

    def config(self):
        return {"num_classes": self.num_classes}

    def check_output(self, out):
        if out.dim() != 2:
            raise ValueError(f"categorical likelihood needs logits of shape [B, C]; the network gave {tuple(out.shape)}")

    def check_targets(self, out, y):
        y = _as_tensor(y)
        self.check_output(out)
        C = out.shape[-1]
        if self.num_classes is not None and C != self.num_classes:
            raise ValueError(f"the network outputs {C} logits but the likelihood has num_classes={self.num_classes}")
        if y.is_floating_point():
            if not torch.isfinite(y).all():
                raise ValueError("targets y contain NaN or inf")
            if not torch.equal(y, y.round()):
                raise ValueError("categorical targets must be integer class labels, got non-integer floats")
            y = y.long()
        elif y.dtype == torch.bool or y.is_complex():
            raise TypeError(f"categorical targets must be integer class labels, got dtype {y.dtype}")
        if y.shape != out.shape[:-1]:
            raise ValueError(f"targets y have shape {tuple(y.shape)} but the logits need {tuple(out.shape[:-1])}")
        if y.numel():
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= C:
                raise ValueError(f"class labels must lie in [0, {C - 1}]; got labels in [{lo}, {hi}]")
        return y

    def distribution(self, out):
        return LogitsCategorical(out, validate_args=False)

    def log_prob(self, out, y):
        return -F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="none").view(y.shape)

    def aggregate(self, outs):
        """Predictive class probabilities (1/S) Σ softmax(out_s): ``[B, C]``."""
        return outs.softmax(-1).mean(0)

    def predictive_log_prob(self, outs, y):
        logp = torch.logsumexp(outs.log_softmax(-1), 0) - math.log(outs.shape[0])
        return logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)


@LIKELIHOODS.register("bernoulli")
class Bernoulli(Likelihood):
    """Binary classifier: the network outputs one logit per example (``[B]`` or ``[B, 1]``)."""

    def check_output(self, out):
        if not (out.dim() == 1 or (out.dim() == 2 and out.shape[-1] == 1)):
            raise ValueError(f"bernoulli likelihood needs one logit per example ([B] or [B, 1]); "
                             f"the network gave {tuple(out.shape)}")

    def check_targets(self, out, y):
        y = _as_tensor(y)
        self.check_output(out)
        y = y.to(torch.get_default_dtype())
        if not torch.isfinite(y).all():
            raise ValueError("targets y contain NaN or inf")
        if not ((y == 0) | (y == 1)).all():
            raise ValueError("bernoulli targets must be 0 or 1")
        if y.numel() != out.shape[0]:
            raise ValueError(f"targets y have {y.numel()} entries but the batch has {out.shape[0]} examples")
        return y.reshape(out.shape[:1])

    def distribution(self, out):
        return dist.Bernoulli(logits=out.reshape(out.shape[:-1] if out.dim() > 1 and out.shape[-1] == 1 else out.shape),
                              validate_args=False)

    def _logit(self, outs):
        return outs.squeeze(-1) if outs.shape[-1] == 1 else outs

    def log_prob(self, out, y):
        logit = self._logit(out)
        return -F.binary_cross_entropy_with_logits(logit, y.expand_as(logit), reduction="none")

    def aggregate(self, outs):
        """Predictive P(y = 1): ``[B]``."""
        return torch.sigmoid(self._logit(outs)).mean(0)


@LIKELIHOODS.register("gaussian")
class Gaussian(Likelihood):
    """y ~ N(f(x), σ²). ``scale``: a fixed float, or ``"learned"`` (point estimate, σ = softplus(ρ),
    trained with the guide: type-II maximum likelihood), or ``"latent"`` (a precision site
    τ = 1/σ² ~ Gamma(a, b) that guides and samplers treat like any weight).
    The network outputs ``[B]``, ``[B, 1]`` or ``[B, D]``."""

    task = "regression"

    def __init__(self, scale: Union[float, str] = "learned", init_scale: float = 1.0,
                 precision_prior: tuple = (6.0, 6.0)):
        super().__init__()
        if isinstance(scale, str):
            if scale not in ("learned", "latent"):
                raise ValueError(f"gaussian scale must be a positive float, 'learned' or 'latent', got {scale!r}")
        else:
            positive_float("gaussian likelihood scale", scale)
        positive_float("init_scale", init_scale)
        if not (isinstance(precision_prior, (tuple, list)) and len(precision_prior) == 2):
            raise ValueError(f"precision_prior must be a pair (a, b), got {precision_prior!r}")
        a, b = (positive_float(f"precision_prior[{i}]", v) for i, v in enumerate(precision_prior))
        self.scale_mode = scale
        self.init_scale = float(init_scale)
        self.precision_prior = (float(a), float(b))
        if scale == "learned":
            self.rho = nn.Parameter(torch.tensor(self.init_scale).expm1().log())
        self._precision = None
        self._event_dim = 0

    def config(self):
        return {"scale": self.scale_mode, "init_scale": self.init_scale, "precision_prior": list(self.precision_prior)}

    def sigma(self):
        if self.scale_mode == "learned":
            return F.softplus(self.rho)
        if self.scale_mode == "latent":
            if self._precision is None:
                raise RuntimeError("the latent noise precision is only defined inside the model")
            return self._precision.rsqrt()
        return torch.tensor(float(self.scale_mode))

    def sample_latents(self):
        """Issue the precision site (for ``scale="latent"``); called by the model before ``observe``."""
        if self.scale_mode == "latent":
            a, b = self.precision_prior
            self._precision = pyro.sample("likelihood.precision", dist.Gamma(torch.tensor(a), torch.tensor(b)))

    def check_output(self, out):
        """Called by the model on one forward's output ``[B]``/``[B, 1]``/``[B, D]``: D > 1 outputs form an
        event. Recorded here, from the model's own output, so later calls on stacked ``[S, B, ...]``
        outputs (prediction, diagnostics) read it instead of guessing from their shape."""
        if out.dim() not in (1, 2):
            raise ValueError(f"gaussian likelihood needs outputs of shape [B] or [B, D]; the network gave {tuple(out.shape)}")
        self._event_dim = 1 if out.dim() == 2 and out.shape[-1] > 1 else 0

    def check_targets(self, out, y):
        y = _as_tensor(y)
        self.check_output(out)
        if not y.is_floating_point():
            y = y.to(torch.get_default_dtype())
        if not torch.isfinite(y).all():
            raise ValueError("targets y contain NaN or inf")
        mean = self._mean(out)
        if y.numel() != mean.numel():
            raise ValueError(f"targets y have shape {tuple(y.shape)} but the network output has shape {tuple(out.shape)}")
        return y.reshape(mean.shape)

    def _mean(self, out):
        return out.squeeze(-1) if out.dim() >= 2 and out.shape[-1] == 1 else out

    def distribution(self, out):
        mean = self._mean(out)
        d = dist.Normal(mean, self.sigma().expand_as(mean), validate_args=False)
        return d.to_event(1) if self._event_dim else d

    def log_prob(self, out, y):
        mean = self._mean(out)
        lp = dist.Normal(mean, self.sigma().expand_as(mean), validate_args=False).log_prob(y)
        return lp.sum(-1) if self._event_dim else lp

    def aggregate(self, outs):
        """Predictive mean and total variance (epistemic var of means + aleatoric σ²)."""
        means = self._mean(outs)
        return means.mean(0), means.var(0, unbiased=False) + self.sigma().detach() ** 2
