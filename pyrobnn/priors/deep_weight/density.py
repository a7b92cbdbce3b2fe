"""Deep weight prior (Atanov et al., 2019): an implicit prior over convolution kernels given by a VAE.

A conv weight ``[out, in, k, k]`` is treated as ``out·in`` iid kernels, each drawn from

    p̂(w) = ∫ p(w | z) p(z) dz,    p(z) = N(0, I),   p(w | z) = N(μ_θ(z), diag σ_θ²(z))   (w ∈ R^{k×k})

where the decoder p(w|z) was fitted, together with an encoder r(z|w), to kernels of networks trained
on a *source* task (:mod:`pyrobnn.priors.deep_weight.pipeline` makes such VAEs). p̂ has no closed form, so
:meth:`DeepWeightPrior.log_prob` returns the VAE's evidence lower bound for every kernel,

    log p̂(w) ≥ E_{r(z|w)} log p(w | z) − KL(r(z|w) ‖ p(z)),

estimated with reparameterised draws z = μ_r(w) + σ_r(w)·ε, so gradients reach ``w`` (and through
it the guide's parameters). Used as a model site's log-density in SVI, the ELBO stays a lower bound on
the evidence: −KL(q ‖ p̂) ≥ E_q[ELBO_VAE(w) − log q(w)] (the auxiliary bound of Atanov et al.).
There is no closed-form KL to a Normal guide, so ``TraceMeanField_ELBO`` uses the Monte-Carlo term
``log p̂(w) − log q(w)`` there: by default (``placeholders=True``) the layer is locally reparameterised and
``log_prob`` at the placeholder is the bound at one fresh draw w ~ q; with ``placeholders=False`` the guide
draws the weights.

The VAE is frozen: its parameters never require grad and are not registered with Pyro or the BNN.

Shape form: a VAE fitted to unit-norm kernels (``pyrobnn dwp train --normalize``) gives the density
exp(bound(w/‖w‖)) · N(w | 0, scale²I) (up to a constant): the VAE shapes kernels without pulling them to 0
(see :class:`DeepWeightPrior`'s ``scale``; on small MNIST only this form beat N(0, 1), docs/RESULTS.md).

Use it
  * with ``pyro.sample``: ``pyro.sample("w", DeepWeightPrior(vae).expand([32, 1]).to_event(2))``
    draws a ``[32, 1, 7, 7]`` weight (the distribution's event is one ``k×k`` kernel);
  * with ``bayesian``: ``prior={"conv*.weight": {"name": "deep-weight", "path": "dwp.safetensors"},
    "*": "log-uniform"}``. A file may hold one VAE per source layer; each conv site takes the VAE
    whose kernel size matches (``key=`` picks one by name). Non-kernel sites a pattern such as
    ``"conv*"`` also catches (conv biases) get ``bias_prior`` (default N(0, 1)).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

from ...guides.base import local_reparam_params
from ...registry import PRIORS
from ...validation import positive_float, positive_int
from .vae import _LOG_2PI, KernelVAE, _freeze, load_kernel_vaes, save_kernel_vaes, unit_kernels

__all__ = ["DeepWeightPrior"]


# -- the prior ------------------------------------------------------------------------------------------------
@PRIORS.register("deep-weight")
class DeepWeightPrior(dist.TorchDistribution):
    """Implicit kernel prior p̂(w) = ∫ p(w|z) p(z) dz of a frozen VAE; ``log_prob`` is the VAE bound.

    :param path_or_vae: a file from :func:`pyrobnn.priors.deep_weight.pipeline.train_deep_weight_prior` /
        :func:`save_kernel_vaes`, a :class:`KernelVAE`, or a mapping ``{name: KernelVAE}``.
    :param path: the same as ``path_or_vae`` for a file (the name the registry spec uses:
        ``{"name": "deep-weight", "path": "dwp.safetensors"}``).
    :param key: name of the VAE to use at every site; default: the VAE whose kernel size matches the
        site (an error if none or several match).
    :param bias_prior: prior spec for sites that are not ``k×k`` kernels (conv biases caught by a
        ``"conv*"`` pattern); default ``{"name": "gaussian", "scale": 1.0}``.
    :param num_particles: z draws per kernel in the bound's expected log-likelihood.
    :param placeholders: let pyrobnn's Gaussian guides locally reparameterise the layer (default True): the
        layer draws pre-activations from their exact Gaussian, and at the placeholder ``log_prob`` returns the
        bound at one fresh reparameterised draw w ~ q — an unbiased estimate of E_q[bound(w)], so the ELBO
        (its KL term estimated, the data term with local reparameterisation) stays an unbiased estimate of
        the same lower bound (see :mod:`pyrobnn.guides.base`). ``False``: weights are drawn by the guide.
    :param scale: for a *normalised* VAE (one fitted to unit-norm kernels, ``pyrobnn dwp train --normalize``):
        the kernel density is the shape prior times an isotropic Gaussian,

            p(w) = exp(bound(w/‖w‖)) · N(w | 0, scale²·I) / Z,

        so the VAE says which *shapes* are likely and the Gaussian (default N(0, 1), the same as the
        ``gaussian`` prior) says which sizes are. It is a proper density: exp(bound) is bounded (the decoder
        scale is clamped), so Z = E_{N(0, scale²I)}[exp(bound(w/‖w‖))] ≤ max exp(bound) is finite. Z is a
        constant of the frozen VAE that cannot be computed in closed form; ``log_prob`` leaves out log Z, so
        the ELBO is a lower bound up to that constant (gradients are exact). Why: an unnormalised VAE over
        raw kernels is, for typical source kernels, a density peaked at the zero kernel, and its pull
        (∝ 1/σ_dec²) shrinks a small-data posterior's kernels towards 0 (docs/studies/deep_weight_prior.md); a shape
        prior cannot shrink a kernel — its gradient is orthogonal to w. Atanov et al.'s code has this
        evaluation (``normalize``) as an option. Ignored for an unnormalised VAE.

    Shapes: ``batch_shape`` as expanded (default ``()``), ``event_shape = (k, k)`` — one kernel.
    A prior holding VAEs of several kernel sizes without ``key`` has no single event shape; it works
    through :meth:`sample_site` (what ``bayesian`` uses) and :meth:`for_kernel`.
    """

    arg_constraints: Dict[str, Any] = {}
    support = constraints.real
    # the VAE is frozen: a draw has no parameter to differentiate, and a replayed value (a guide's draw or
    # placeholder) is kept as is by Pyro's TraceGraph_ELBO
    has_rsample = True

    def __init__(self, path_or_vae: Union[str, os.PathLike, KernelVAE, Mapping[str, KernelVAE], None] = None, *,
                 path: Union[str, os.PathLike, None] = None, key: Optional[str] = None,
                 bias_prior: Any = None, num_particles: int = 1, placeholders: bool = True, scale: float = 1.0,
                 batch_shape=torch.Size(), validate_args=None):
        if path_or_vae is not None and path is not None:
            raise ValueError("give the deep weight prior's VAE either positionally or as path=, not both")
        source = path if path is not None else path_or_vae
        if source is None:
            raise ValueError("the deep weight prior needs a VAE: DeepWeightPrior('dwp.safetensors') or, by name, "
                             "{'name': 'deep-weight', 'path': 'dwp.safetensors'} (make one with `pyrobnn dwp train`)")
        positive_int("num_particles", num_particles)
        positive_float("the deep weight prior's scale", scale)
        self.scale = float(scale)
        self.path: Optional[str] = None
        self.provenance: Dict[str, Any] = {}
        if isinstance(source, (str, os.PathLike)):
            self.path = os.fspath(source)
            self.vaes, self.provenance = load_kernel_vaes(self.path)
        elif isinstance(source, KernelVAE):
            self.vaes = {"vae": _freeze(source)}
        elif isinstance(source, Mapping):
            if not source or not all(isinstance(v, KernelVAE) for v in source.values()):
                raise TypeError("a mapping given to DeepWeightPrior must map names to KernelVAE instances")
            self.vaes = {str(k): _freeze(v) for k, v in source.items()}
        else:
            raise TypeError(f"DeepWeightPrior takes a file path, a KernelVAE or a mapping of them, "
                            f"got {type(source).__name__}")
        if key is not None and key not in self.vaes:
            raise ValueError(f"no VAE named {key!r} in the deep weight prior; it holds {sorted(self.vaes)}")
        if key is None and len(self.vaes) == 1:
            key = next(iter(self.vaes))
        self.key = key
        self.num_particles = num_particles
        self.placeholder_expectation = bool(placeholders)
        self._bias_spec = bias_prior if bias_prior is not None else {"name": "gaussian", "scale": 1.0}
        self._bias_prior = None
        event_shape = (self.vae.kernel_size,) * 2 if key is not None else ()
        super().__init__(torch.Size(batch_shape), torch.Size(event_shape), validate_args=validate_args)

    # -- selection --------------------------------------------------------------------------------------
    @property
    def vae(self) -> KernelVAE:
        if self.key is None:
            raise ValueError(f"this deep weight prior holds VAEs for kernel sizes {self.kernel_sizes()}; "
                             "pick one with key= or for_kernel(k)")
        return self.vaes[self.key]

    def kernel_sizes(self):
        return sorted({v.kernel_size for v in self.vaes.values()})

    def _key_for(self, k: int, what: str) -> str:
        if self.key is not None:
            if self.vaes[self.key].kernel_size != k:
                raise ValueError(f"{what}: has {k}×{k} kernels but the deep weight prior's VAE {self.key!r} models "
                                 f"{self.vaes[self.key].kernel_size}×{self.vaes[self.key].kernel_size} kernels")
            return self.key
        keys = [n for n, v in self.vaes.items() if v.kernel_size == k]
        if not keys:
            raise ValueError(f"{what}: has {k}×{k} kernels but the deep weight prior only has VAEs for kernel sizes "
                             f"{self.kernel_sizes()}; train one for {k}×{k} (`pyrobnn dwp train`) or use another prior")
        if len(keys) > 1:
            raise ValueError(f"{what}: several VAEs of the deep weight prior model {k}×{k} kernels ({keys}); "
                             "choose one with key=")
        return keys[0]

    def for_kernel(self, k: int) -> "DeepWeightPrior":
        """The prior restricted to the VAE for ``k×k`` kernels (event shape ``(k, k)``)."""
        return self._with(self._key_for(int(k), "requested kernel"), self.batch_shape)

    def _with(self, key, batch_shape) -> "DeepWeightPrior":
        new = DeepWeightPrior.__new__(DeepWeightPrior)
        new.path, new.provenance, new.vaes, new.key = self.path, self.provenance, self.vaes, key
        new.num_particles, new._bias_spec, new._bias_prior = self.num_particles, self._bias_spec, self._bias_prior
        new.placeholder_expectation, new.scale = self.placeholder_expectation, self.scale
        event = (self.vaes[key].kernel_size,) * 2 if key is not None else ()
        dist.TorchDistribution.__init__(new, torch.Size(batch_shape), torch.Size(event), validate_args=False)
        return new

    # -- Distribution API -------------------------------------------------------------------------------------
    def expand(self, batch_shape, _instance=None):
        return self._with(self.key, batch_shape)

    def _vae_for_value(self, value):
        if self.key is not None:
            vae = self.vae
            if value.dim() < 2 or tuple(value.shape[-2:]) != (vae.kernel_size,) * 2:
                raise ValueError(f"the deep weight prior models {vae.kernel_size}×{vae.kernel_size} kernels; "
                                 f"got a value of shape {tuple(value.shape)}")
            return vae
        if value.dim() < 2 or value.shape[-1] != value.shape[-2]:
            raise ValueError(f"the deep weight prior models square kernels [..., k, k]; got shape {tuple(value.shape)}")
        return self.vaes[self._key_for(value.shape[-1], "value")]

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """The VAE evidence lower bound of each kernel: ``value [..., k, k]`` → ``[...]`` (≤ log p̂). At a
        local-reparameterisation placeholder of q: the bound at one reparameterised draw w ~ q (unbiased
        for E_q[bound(w)])."""
        q = local_reparam_params(value) if self.placeholder_expectation else None
        if q is not None:
            value = torch.addcmul(q.loc, q.scale, torch.randn_like(q.loc))
        vae = self._vae_for_value(value)
        p = next(vae.parameters())
        if p.device != value.device or p.dtype != value.dtype:
            vae.to(device=value.device, dtype=value.dtype)
        if vae.normalized:  # shape prior × N(0, scale²I), log Z left out (see the class docstring)
            d = vae.kernel_size ** 2
            shape, _ = unit_kernels(value)
            gauss = value.square().sum((-2, -1)) * (-0.5 / self.scale ** 2) - d * (math.log(self.scale) + 0.5 * _LOG_2PI)
            return vae.elbo(shape, self.num_particles) + gauss
        return vae.elbo(value, self.num_particles)

    @torch.no_grad()
    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        """Kernels from p̂: ``[*sample_shape, *batch_shape, k, k]``. For a normalised VAE: a shape from the VAE's
        generative model times a norm scale·χ_{k²} — the Gaussian factor's exact radial law; the shape's law is
        the VAE's, which approximates exp(bound) on the unit sphere."""
        shape = self._extended_shape(sample_shape)[:-2]
        vae = self.vae
        if not vae.normalized:
            return vae.sample(shape)
        p = next(vae.parameters())
        eps = torch.randn(tuple(shape) + (vae.kernel_size ** 2,), dtype=p.dtype, device=p.device)
        return vae.sample(shape) * (self.scale * eps.norm(dim=-1))[..., None, None]

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        return self.sample(sample_shape)

    # -- use as a pyrobnn layer prior ---------------------------------------------------------------------------
    def site_distribution(self, name: str, shape) -> dist.TorchDistribution:
        """The distribution a weight site of ``shape`` gets: ``[out, in, k, k]`` → kernels iid from p̂
        (``Independent`` over all dims); 1-d sites (biases) → ``bias_prior``."""
        shape = torch.Size(shape)
        if len(shape) >= 3:
            if shape[-1] != shape[-2]:
                raise ValueError(f"site {name!r}: the deep weight prior models square k×k kernels; the weight has "
                                 f"shape {tuple(shape)}")
            prior = self._with(self._key_for(shape[-1], f"site {name!r} of shape {tuple(shape)}"), shape[:-2])
            return prior.to_event(len(shape) - 2)
        if len(shape) <= 1:
            fn = self.bias_prior.expand(shape)
            return fn.to_event(len(shape)) if len(shape) else fn
        raise ValueError(f"site {name!r} of shape {tuple(shape)} is not a convolution kernel; the deep weight prior "
                         "is for conv weights [out, in, k, k] (use e.g. prior={'conv*.weight': 'deep-weight', ...})")

    def sample_site(self, name: str, shape, infer=None) -> torch.Tensor:
        """Issue ``pyro.sample(name, ...)`` for a pyrobnn layer's weight or bias of ``shape``."""
        fn = self.site_distribution(name, shape)
        infer = dict(infer or {})
        if len(torch.Size(shape)) <= 1 and not self.placeholder_expectation:
            # weights drawn (placeholders=False): draw the bias too, as before
            infer.pop("local_reparameterization", None)
        return pyro.sample(name, fn, infer=infer)

    @property
    def bias_prior(self):
        if self._bias_prior is None:
            self._bias_prior = PRIORS.build(self._bias_spec)
        return self._bias_prior

    def config(self) -> Dict[str, Any]:
        if self.path is None:
            raise ValueError("a DeepWeightPrior built from an in-memory VAE cannot be saved by name; save the VAE "
                             "with pyrobnn.priors.deep_weight.save_kernel_vaes and build the prior from the file")
        return {"path": str(Path(self.path).resolve()), "key": self.key if len(self.vaes) > 1 else None,
                "bias_prior": self._bias_spec, "num_particles": self.num_particles,
                "placeholders": self.placeholder_expectation, "scale": self.scale}

    def __repr__(self):
        src = self.path or "in-memory"
        return (f"DeepWeightPrior({src!r}, vaes={ {n: v.kernel_size for n, v in self.vaes.items()} }, key={self.key!r}, "
                f"batch_shape={tuple(self.batch_shape)})")
