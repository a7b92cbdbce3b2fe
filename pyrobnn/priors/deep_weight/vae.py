"""The kernel VAE of the deep weight prior (Atanov et al., 2019) and its files.

:class:`KernelVAE` is a small convolutional VAE over ``k×k`` kernels (encoder r(z|w), decoder p(w|z),
p(z) = N(0, I)); its evidence lower bound is the prior's log-density (:mod:`.density`).
:func:`save_kernel_vaes` / :func:`load_kernel_vaes` store a set of them (one per source layer) in one
safetensors file; :mod:`.pipeline` trains them.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from ...state_io import read_state, write_state
from ...validation import boolean, positive_int

__all__ = ["KernelVAE", "save_kernel_vaes", "load_kernel_vaes", "unit_kernels"]

_LOG_2PI = math.log(2 * math.pi)
_KIND = "deep-weight-prior"
# Decoder log-scales are squashed into this range: a collapsing decoder variance would make the
# kernel density unbounded (and the bound's gradients explode) on kernels that sit on the manifold.
_LOG_SCALE_RANGE = (-9.0, 2.0)


def unit_kernels(w: torch.Tensor, eps: float = 1e-12) -> Tuple[torch.Tensor, torch.Tensor]:
    """``w [..., k, k]`` → (w/‖w‖, ‖w‖ ``[...]``), the norm over each kernel's k·k entries (guarded at 0)."""
    norm = w.square().sum((-2, -1)).add(eps).sqrt()
    return w / norm[..., None, None], norm


def _soft_clamp(x, lo, hi):
    return lo + (hi - lo) * torch.sigmoid((x - (lo + hi) / 2) * (4.0 / (hi - lo)))


class KernelVAE(nn.Module):
    """A small convolutional VAE over ``k×k`` kernels: encoder r(z|w), decoder p(w|z), p(z) = N(0, I).

    :param kernel_size: k (kernels are ``[..., k, k]``).
    :param latent_dim: dimension of z (2–4 in the paper).
    :param hidden: channels of the encoder/decoder convolutions.
    :param decoder: ``"conv"`` — z → linear → ELU → 3×3 conv → ELU → 3×3 conv to (mean, log-scale) per
        pixel; ``"linear"`` — mean = A z + b with a free per-pixel log-scale (linear-Gaussian, so
        p̂ = N(b, A Aᵀ + diag σ²) exactly; used to check the bound against the true density).

    The encoder is 3×3 conv → ELU → 3×3 conv → ELU → linear to (μ_r, log σ_r) for both decoders.

    :param normalized: the VAE models kernel *shapes*, w/‖w‖ (it was fitted to unit-norm kernels; see
        :func:`pyrobnn.priors.deep_weight.pipeline.fit_kernel_vae`'s ``normalize``). :class:`DeepWeightPrior`
        then evaluates the bound at w/‖w‖ and gives the norm its own factor; :meth:`sample` returns
        unit-norm kernels.
    :param source_norm: for a normalised VAE, the source kernels' norm distribution as a log-normal
        ``{"log_mean": m, "log_sd": s}`` (recorded when fitted; used to give initial kernels realistic norms).
    """

    def __init__(self, kernel_size: int, latent_dim: int = 4, hidden: int = 16, decoder: str = "conv",
                 normalized: bool = False, source_norm: Optional[Mapping[str, float]] = None):
        super().__init__()
        for v, what in ((kernel_size, "kernel_size"), (latent_dim, "latent_dim"), (hidden, "hidden")):
            positive_int(f"KernelVAE {what}", v)
        if decoder not in ("conv", "linear"):
            raise ValueError(f"KernelVAE decoder must be 'conv' or 'linear', got {decoder!r}")
        self.kernel_size, self.latent_dim, self.hidden, self.decoder_kind = kernel_size, latent_dim, hidden, decoder
        boolean("KernelVAE normalized", normalized)
        self.normalized = normalized
        self.source_norm = None
        if source_norm is not None:
            try:
                self.source_norm = {"log_mean": float(source_norm["log_mean"]), "log_sd": float(source_norm["log_sd"])}
            except (KeyError, TypeError, ValueError):
                raise ValueError("KernelVAE source_norm must be {'log_mean': float, 'log_sd': float}, "
                                 f"got {source_norm!r}") from None
            if not (math.isfinite(self.source_norm["log_mean"]) and math.isfinite(self.source_norm["log_sd"])
                    and self.source_norm["log_sd"] >= 0):
                raise ValueError(f"KernelVAE source_norm must be finite with log_sd >= 0, got {source_norm!r}")
        k, h = kernel_size, hidden
        self.enc = nn.Sequential(nn.Conv2d(1, h, 3, padding=1), nn.ELU(), nn.Conv2d(h, h, 3, padding=1), nn.ELU(),
                                 nn.Flatten(), nn.Linear(h * k * k, 2 * latent_dim))
        if decoder == "conv":
            self.dec_in = nn.Linear(latent_dim, h * k * k)
            self.dec = nn.Sequential(nn.ELU(), nn.Conv2d(h, h, 3, padding=1), nn.ELU(), nn.Conv2d(h, 2, 3, padding=1))
        else:
            self.dec_in = nn.Linear(latent_dim, k * k)
            self.dec_log_scale = nn.Parameter(torch.full((k, k), -2.0))

    def config(self) -> Dict[str, Any]:
        cfg = {"kernel_size": self.kernel_size, "latent_dim": self.latent_dim, "hidden": self.hidden,
               "decoder": self.decoder_kind}
        if self.normalized:  # absent in files of unnormalised VAEs, as written before the option existed
            cfg["normalized"] = True
            cfg["source_norm"] = self.source_norm
        return cfg

    def _check(self, w):
        k = self.kernel_size
        if w.dim() < 2 or tuple(w.shape[-2:]) != (k, k):
            raise ValueError(f"this KernelVAE models {k}×{k} kernels; got a tensor of shape {tuple(w.shape)}")

    def encode(self, w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``w [..., k, k]`` → ``(μ_r, log σ_r)``, each ``[..., latent_dim]``."""
        self._check(w)
        batch = w.shape[:-2]
        out = self.enc(w.reshape(-1, 1, self.kernel_size, self.kernel_size))
        mu, log_sigma = out.chunk(2, -1)
        log_sigma = _soft_clamp(log_sigma, -8.0, 4.0)
        return mu.reshape(batch + (self.latent_dim,)), log_sigma.reshape(batch + (self.latent_dim,))

    def decode(self, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``z [..., latent_dim]`` → ``(mean, log-scale)`` of p(w|z), each ``[..., k, k]``."""
        k = self.kernel_size
        batch = z.shape[:-1]
        zf = z.reshape(-1, self.latent_dim)
        if self.decoder_kind == "conv":
            out = self.dec(self.dec_in(zf).reshape(-1, self.hidden, k, k))
            mean, log_scale = out[:, 0], out[:, 1]
        else:
            mean = self.dec_in(zf).reshape(-1, k, k)
            log_scale = self.dec_log_scale.expand_as(mean)
        log_scale = _soft_clamp(log_scale, *_LOG_SCALE_RANGE)
        return mean.reshape(batch + (k, k)), log_scale.reshape(batch + (k, k))

    def elbo(self, w: torch.Tensor, num_particles: int = 1) -> torch.Tensor:
        """The evidence lower bound of every kernel: ``w [..., k, k]`` → ``[...]``.

        E_r log p(w|z) is averaged over ``num_particles`` reparameterised draws; KL(r ‖ p(z)) is exact.
        """
        mu, log_sigma = self.encode(w)
        sigma = log_sigma.exp()
        kl = 0.5 * (mu * mu + sigma * sigma - 1.0 - 2.0 * log_sigma).sum(-1)
        eps = torch.randn((num_particles,) + mu.shape, dtype=mu.dtype, device=mu.device)
        z = mu + sigma * eps
        mean, log_scale = self.decode(z)
        resid = (w - mean) * torch.exp(-log_scale)
        log_lik = -(0.5 * resid * resid + log_scale + 0.5 * _LOG_2PI).sum((-2, -1))
        return log_lik.mean(0) - kl

    @torch.no_grad()
    def sample(self, shape=torch.Size(), mean_only: bool = False) -> torch.Tensor:
        """Kernels drawn from p̂: ``[*shape, k, k]`` (z ~ N(0, I), w ~ p(w|z); ``mean_only``: w = μ_θ(z)).
        A normalised VAE's draws are scaled to unit norm (the VAE models shapes)."""
        p = next(self.parameters())
        z = torch.randn(tuple(shape) + (self.latent_dim,), dtype=p.dtype, device=p.device)
        mean, log_scale = self.decode(z)
        w = mean if mean_only else mean + log_scale.exp() * torch.randn_like(mean)
        return unit_kernels(w)[0] if self.normalized else w

    def loss(self, w: torch.Tensor) -> torch.Tensor:
        """Training loss: the negative bound averaged over the kernels ``w [M, k, k]``."""
        return -self.elbo(w).mean()


# -- persistence ----------------------------------------------------------------------------------------------
def save_kernel_vaes(path, vaes: Mapping[str, KernelVAE], provenance: Optional[Dict[str, Any]] = None) -> None:
    """Write VAEs (``{name: KernelVAE}``, e.g. one per source layer) as one safetensors file + JSON."""
    if not vaes:
        raise ValueError("save_kernel_vaes needs at least one VAE")
    tensors, configs = {}, {}
    for name, vae in vaes.items():
        if not isinstance(vae, KernelVAE):
            raise TypeError(f"VAE {name!r} is a {type(vae).__name__}, not a KernelVAE")
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"VAE names must be non-empty strings without '/', got {name!r}")
        configs[name] = vae.config()
        for pname, t in vae.state_dict().items():
            tensors[f"{name}/{pname}"] = t
    write_state(path, tensors, {"kind": _KIND, "vaes": configs, "provenance": dict(provenance or {})})


_CACHE: Dict[Tuple[str, int, int], Tuple[Dict[str, KernelVAE], Dict[str, Any]]] = {}


def load_kernel_vaes(path) -> Tuple[Dict[str, KernelVAE], Dict[str, Any]]:
    """Read a file written by :func:`save_kernel_vaes` → ``({name: frozen KernelVAE}, provenance)``.

    Loads are cached by (path, mtime, size): a BNN whose pattern builds one prior per site shares one
    frozen copy of the VAEs.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"deep weight prior file not found: {path}")
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if key in _CACHE:
        return _CACHE[key]
    tensors, meta = read_state(path)
    if meta.get("kind") != _KIND:
        raise ValueError(f"{path} holds a pyrobnn {meta.get('kind')!r}, not a deep weight prior")
    vaes = {}
    for name, cfg in meta.get("vaes", {}).items():
        vae = KernelVAE(**cfg)
        state = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.split("/", 1)[0] == name}
        try:
            vae.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{path}: tensors of VAE {name!r} do not fit its config: {e}") from None
        vaes[name] = _freeze(vae)
    if not vaes:
        raise ValueError(f"{path} holds no VAE")
    _CACHE[key] = (vaes, meta.get("provenance", {}))
    return _CACHE[key]


def _freeze(vae: KernelVAE) -> KernelVAE:
    vae.eval()
    for p in vae.parameters():
        p.requires_grad_(False)
    return vae
