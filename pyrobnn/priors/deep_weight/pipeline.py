"""Making a deep weight prior: source networks → their kernels → one small VAE per layer → a file.

The pipeline of Atanov et al. (2019), as library functions (the CLI ``pyrobnn dwp train`` calls
:func:`train_deep_weight_prior`):

1. :func:`train_source_nets` — train K small convnets (``fconv`` by default) on a *source* dataset;
2. :func:`collect_kernels` — gather every conv layer's ``k×k`` kernels ``[out·in, k, k]`` over the K
   nets, dropping near-zero kernels (dead filters carry no shape information and would put a spike at 0);
3. :func:`fit_kernel_vae` — fit a small convolutional VAE (:class:`~pyrobnn.priors.deep_weight.KernelVAE`,
   latent 2–4) per layer;
4. save the VAEs as safetensors + JSON provenance (source data, K, epochs, kernel counts, held-out bound)
   through :func:`pyrobnn.state_io.write_state`; :class:`~pyrobnn.priors.DeepWeightPrior` reads the file.

:func:`init_from_prior` initialises a network's (or a BNN guide's) kernels with prior samples — the
paper's faster-convergence result.
"""
from __future__ import annotations

import fnmatch
import math
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from pyrobnn.inference.batches import ShuffledBatches
from pyrobnn.inference.loop import Loop, OnRecord, descend
from pyrobnn.inference.supervised import SupervisedStep

from ...validation import boolean, positive_int
from .density import DeepWeightPrior
from .vae import KernelVAE, save_kernel_vaes, unit_kernels

__all__ = ["train_source_nets", "collect_kernels", "augment_kernels", "fit_kernel_vae", "train_deep_weight_prior", "init_from_prior",
           "SOURCES"]

_CONV = (nn.Conv2d,)


def _load_source(name, limit_train: Optional[int]):
    from ... import data
    if isinstance(name, data.Dataset):
        if limit_train:
            name.x_train, name.y_train = name.x_train[:limit_train], name.y_train[:limit_train]
        return name
    if not isinstance(name, str):
        raise TypeError(f"source must be a dataset name or a pyrobnn.data.Dataset, got {type(name).__name__}")
    key = name.lower().replace("_", "-")
    if key == "fashion-mnist":
        return data.load_fashion_mnist(limit_train=limit_train)
    if key == "mnist5k":
        ds = data.load_mnist5k()
        if limit_train:
            ds.x_train, ds.y_train = ds.x_train[:limit_train], ds.y_train[:limit_train]
        return ds
    raise ValueError(f"unknown source dataset {name!r}; known: {', '.join(SOURCES)}")


#: source datasets :func:`train_deep_weight_prior` knows by name
SOURCES = ("fashion-mnist", "mnist5k")


@torch.no_grad()
def _accuracy(net, x, y, batch=1000):
    net.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += (net(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum().item()
    net.train()
    return correct / max(len(x), 1)


class _LastLoss:
    """The loss of the last step (a loop callback)."""
    loss = float("nan")

    def on_step_end(self, loop, position, logs):
        self.loss = logs["loss"]


def train_source_nets(x: torch.Tensor, y: torch.Tensor, num_nets: int = 4, epochs: int = 2,
                      arch: Union[str, Mapping] = "fconv", lr: float = 1e-3, batch_size: int = 128,
                      weight_decay: float = 0.0, seed: int = 0, log: Optional[Callable[[str], None]] = None,
                      x_test: Optional[torch.Tensor] = None, y_test: Optional[torch.Tensor] = None
                      ) -> Tuple[List[nn.Module], List[Dict[str, float]]]:
    """Train ``num_nets`` networks (different seeds) with Adam on ``x [N, C, H, W]``, ``y [N]``.

    Returns ``(nets, records)``; each record has the net's seed, final train loss and (when test data
    are given) test accuracy.
    """
    from pyrobnn.models import build
    positive_int("num_nets", num_nets)
    positive_int("epochs", epochs)
    positive_int("batch_size", batch_size)
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"source data: x has {len(x)} examples, y has {len(y)}")
    nets, records = [], []
    for i in range(num_nets):
        net_seed = seed * 1000 + i
        torch.manual_seed(net_seed)
        net = build(arch) if isinstance(arch, str) else build(dict(arch))
        opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
        batches = ShuffledBatches(x, y, batch_size, torch.Generator().manual_seed(net_seed), drop_last=False)
        last = _LastLoss()
        t0 = time.time()
        Loop(SupervisedStep(net, opt), batches, epochs=epochs, model=net, callbacks=[last]).run()
        rec = {"seed": net_seed, "train_loss": last.loss, "seconds": time.time() - t0}
        if x_test is not None:
            rec["test_accuracy"] = _accuracy(net, x_test, y_test)
        records.append(rec)
        if log:
            log(f"source net {i + 1}/{num_nets}: " + ", ".join(f"{k}={v:.4g}" for k, v in rec.items()))
        nets.append(net.eval())
    return nets, records


@torch.no_grad()
def collect_kernels(nets, min_norm_fraction: float = 0.05, layers: Union[str, List[str]] = "*"
                    ) -> Tuple[Dict[str, torch.Tensor], Dict[str, Dict[str, int]]]:
    """Every square conv layer's kernels, pooled over ``nets``: ``{layer: [M, k, k]}``.

    Kernels with L2 norm below ``min_norm_fraction`` × the layer's median kernel norm are dropped.
    Returns ``(kernels, counts)`` with ``counts[layer] = {"total": ..., "kept": ..., "kernel_size": k}``.
    """
    if not (0.0 <= min_norm_fraction < 1.0):
        raise ValueError(f"min_norm_fraction must lie in [0, 1), got {min_norm_fraction}")
    pats = [layers] if isinstance(layers, str) else list(layers)
    pooled: Dict[str, List[torch.Tensor]] = {}
    for net in nets:
        for name, m in net.named_modules():
            if isinstance(m, _CONV) and any(fnmatch.fnmatchcase(name, p) for p in pats):
                kh, kw = m.weight.shape[-2:]
                if kh != kw:
                    continue
                pooled.setdefault(name, []).append(m.weight.detach().reshape(-1, kh, kw).clone())
    if not pooled:
        raise ValueError("no square Conv2d layer found in the source networks")
    kernels, counts = {}, {}
    for name, ws in pooled.items():
        w = torch.cat(ws)
        norms = w.flatten(1).norm(dim=1)
        keep = norms >= min_norm_fraction * norms.median()
        kernels[name] = w[keep]
        counts[name] = {"total": int(len(w)), "kept": int(keep.sum()), "kernel_size": int(w.shape[-1])}
    return kernels, counts


#: symmetry groups :func:`augment_kernels` knows
AUGMENTATIONS = ("none", "sign", "dihedral", "dihedral+sign")


def augment_kernels(kernels: torch.Tensor, augment: str = "dihedral+sign") -> torch.Tensor:
    """``kernels [M, k, k]`` with their images under a symmetry group: ``[G·M, k, k]``, originals first.

    ``"sign"``: w, −w (G = 2); ``"dihedral"``: the 4 rotations by 90° and their transposes (G = 8);
    ``"dihedral+sign"``: both (G = 16); ``"none"``: the kernels themselves. A first conv layer has only
    K·out kernels (128 for 8 fconv-16 nets), too few for a VAE — it overfits them and its held-out bound
    collapses; natural-image filter statistics are close to invariant under these maps.
    """
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")
    if kernels.dim() != 3 or kernels.shape[-1] != kernels.shape[-2]:
        raise ValueError(f"kernels must be [M, k, k], got shape {tuple(kernels.shape)}")
    out = [kernels]
    if augment.startswith("dihedral"):
        rots = [torch.rot90(kernels, r, dims=(-2, -1)) for r in range(4)]
        out = rots + [r.transpose(-2, -1) for r in rots]
    if augment.endswith("sign"):
        out = out + [-w for w in out]
    return torch.cat(out)


def fit_kernel_vae(kernels: torch.Tensor, latent_dim: int = 4, hidden: int = 16, epochs: int = 100,
                   batch_size: int = 256, lr: float = 1e-3, seed: int = 0, holdout: float = 0.1, min_steps: int = 2000,
                   decoder: str = "conv", augment: str = "none", normalize: bool = False,
                   log: Optional[Callable[[str], None]] = None) -> Tuple[KernelVAE, Dict[str, Any]]:
    """Fit a :class:`KernelVAE` to ``kernels [M, k, k]`` by maximising the mean bound (Adam).

    A fraction ``holdout`` of the kernels is kept aside; the returned record holds the final mean
    bound per kernel on the training and held-out kernels (single-particle estimates averaged over 8).
    Small kernel sets (a first layer has only K·out kernels) get more epochs, so that at least
    ``min_steps`` optimiser steps are taken. ``augment`` (see :func:`augment_kernels`) enlarges the
    *training* part only, after the split, so the held-out bound is on kernels (and symmetry images of
    kernels) the VAE has not seen in any orientation: held-out kernels are not augmented.

    ``normalize=True`` fits the VAE to the kernels' shapes w/‖w‖ (a *normalised* VAE, for the shape-times-Gaussian
    form of :class:`~pyrobnn.priors.DeepWeightPrior`) and records the kernels' norm distribution as a log-normal
    (``source_norm``, used by :func:`init_from_prior`); the record's bounds are then on unit-norm kernels.
    """
    if kernels.dim() != 3 or kernels.shape[-1] != kernels.shape[-2]:
        raise ValueError(f"kernels must be [M, k, k], got shape {tuple(kernels.shape)}")
    if len(kernels) < 10:
        raise ValueError(f"too few kernels to fit a VAE ({len(kernels)}); train more source nets")
    positive_int("epochs", epochs)
    boolean("normalize", normalize)
    source_norm = None
    if normalize:
        kernels, norms = unit_kernels(kernels)
        if not bool((norms > 1e-6).all()):
            raise ValueError("normalize=True needs kernels of non-zero norm (drop near-zero kernels first: "
                             "collect_kernels' min_norm_fraction)")
        log_n = norms.log()
        source_norm = {"log_mean": log_n.mean().item(), "log_sd": log_n.std().item() if len(log_n) > 1 else 0.0}
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(kernels), generator=g)
    n_hold = int(round(holdout * len(kernels)))
    hold, train = kernels[perm[:n_hold]], augment_kernels(kernels[perm[n_hold:]], augment)
    epochs = max(epochs, math.ceil(min_steps / math.ceil(len(train) / batch_size)))
    vae = KernelVAE(int(kernels.shape[-1]), latent_dim=latent_dim, hidden=hidden, decoder=decoder,
                    normalized=normalize, source_norm=source_norm)
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)

    def vae_step(w, _):
        loss = vae.loss(w)
        return {"total": descend(loss, opt, what="the VAE's loss").item() * len(w)}

    def end_of_epoch(record):
        sched.step()
        if log and record["epoch"] % max(1, epochs // 5) == 0:
            log(f"  vae k={vae.kernel_size} epoch {record['epoch']}/{epochs}: mean bound per kernel "
                f"{record['bound']:.4f}")

    t0 = time.time()
    Loop(vae_step, ShuffledBatches(train, None, batch_size, g, drop_last=False), epochs=epochs,
         summarize=lambda loop: {"epoch": loop.position.epoch + 1, "bound": -loop.sums["total"] / len(train)},
         callbacks=[OnRecord(end_of_epoch)]).run()
    vae.eval()
    with torch.no_grad():
        bound = lambda w: torch.stack([vae.elbo(w) for _ in range(8)]).mean().item() if len(w) else float("nan")  # noqa: E731
        record = {"kernels_train": int(len(train)), "kernels_heldout": int(len(hold)),
                  "bound_train": bound(train), "bound_heldout": bound(hold), "seconds": time.time() - t0,
                  "latent_dim": latent_dim, "hidden": hidden, "epochs": epochs, "augment": augment,
                  "normalize": normalize, "source_norm": source_norm}
    return vae, record


def train_deep_weight_prior(out, source: str = "fashion-mnist", num_nets: int = 4, epochs: int = 2,
                            limit_train: Optional[int] = None, arch: Union[str, Mapping] = "fconv",
                            latent_dim: Union[int, Mapping[str, int]] = 4, hidden: int = 16, vae_epochs: int = 100,
                            min_norm_fraction: float = 0.05, seed: int = 0, lr: float = 1e-3,
                            vae_min_steps: int = 2000, weight_decay: float = 0.0, augment: str = "none",
                            normalize: bool = False, log: Optional[Callable[[str], None]] = print) -> DeepWeightPrior:
    """The whole pipeline: source nets → kernels → one VAE per conv layer → ``out`` (safetensors + JSON).

    :param source: ``"fashion-mnist"`` (full 60,000 training images unless ``limit_train``), ``"mnist5k"``,
        or a :class:`pyrobnn.data.Dataset` of ``[N, C, H, W]`` images.
    :param num_nets: K, the number of source networks; ``epochs`` each.
    :param latent_dim: one int, or ``{layer: int}``.
    :param weight_decay: L2 coefficient of the source nets' Adam (coupled, ``torch.optim.Adam``): with
        few source epochs it removes the untrained part of the initial kernels, so the VAE models the
        learned structure rather than the initialisation noise.
    :param augment: symmetry augmentation of the VAEs' training kernels (:func:`augment_kernels`).
    :param normalize: fit the VAEs to kernel shapes w/‖w‖ (see :func:`fit_kernel_vae` and
        :class:`~pyrobnn.priors.DeepWeightPrior`'s ``scale``).
    :returns: the :class:`DeepWeightPrior` read back from ``out``.
    """
    t0 = time.time()
    ds = _load_source(source, limit_train)
    source_name = source if isinstance(source, str) else ds.meta.get("name", "custom")
    if log:
        log(f"source {source_name}: {len(ds.x_train)} training images; training {num_nets} × {arch!r} for {epochs} epochs")
    nets, net_records = train_source_nets(ds.x_train, ds.y_train, num_nets=num_nets, epochs=epochs, arch=arch,
                                          lr=lr, weight_decay=weight_decay, seed=seed, log=log,
                                          x_test=ds.x_test, y_test=ds.y_test)
    kernels, counts = collect_kernels(nets, min_norm_fraction=min_norm_fraction)
    vaes, vae_records = {}, {}
    for layer, w in kernels.items():
        if isinstance(latent_dim, Mapping) and layer not in latent_dim:
            raise ValueError(f"latent_dim gives no size for layer {layer!r} (layers: {sorted(kernels)})")
        ld = latent_dim[layer] if isinstance(latent_dim, Mapping) else latent_dim
        if log:
            log(f"layer {layer}: {counts[layer]['kept']}/{counts[layer]['total']} kernels of "
                f"{counts[layer]['kernel_size']}×{counts[layer]['kernel_size']} kept; fitting VAE (latent {ld})")
        vaes[layer], vae_records[layer] = fit_kernel_vae(w, latent_dim=ld, hidden=hidden, epochs=vae_epochs,
                                                         seed=seed, min_steps=vae_min_steps, augment=augment,
                                                         normalize=normalize, log=log)
        if log:
            r = vae_records[layer]
            log(f"  bound per kernel: train {r['bound_train']:.3f}, held-out {r['bound_heldout']:.3f}")
    provenance = {"source": source_name, "source_train_size": int(len(ds.x_train)), "num_nets": num_nets,
                  "epochs": epochs, "arch": arch, "seed": seed, "vae_min_steps": vae_min_steps,
                  "lr": lr, "weight_decay": weight_decay, "min_norm_fraction": min_norm_fraction, "augment": augment,
                  "normalize": normalize,
                  "source_nets": net_records, "kernels": counts, "vae": vae_records,
                  "seconds": time.time() - t0, "torch": torch.__version__}
    save_kernel_vaes(out, vaes, provenance)
    if log:
        log(f"wrote {out} ({time.time() - t0:.0f} s)")
    return DeepWeightPrior(out)


@torch.no_grad()
def init_from_prior(target, prior: DeepWeightPrior, layers: Union[str, List[str]] = "*",
                    generator_seed: Optional[int] = None, mean_only: bool = False) -> List[str]:
    """Initialise conv kernels with samples of ``prior``; returns the names initialised.

    ``mean_only=False`` (default) draws full kernels, z ~ N(0, I), w ~ p(w|z); ``mean_only=True`` sets
    each kernel to the decoder mean μ_θ(z) (what Atanov et al.'s code does). The two differ a lot for
    kernel VAEs whose decoder scale is large: on the Fashion-MNIST priors of docs/studies/deep_weight_prior.md, sample − mean
    has sd 0.07–0.13 against mean |μ_θ(z)| 0.03–0.06, and a mean-field BNN with the DWP started from
    decoder means ended less accurate on small MNIST than one started from full draws (measured there).

    ``target`` is a ``torch.nn.Module`` (its ``Conv2d`` weights are overwritten in place) or a
    :class:`pyrobnn.BNN` (the guide's means of the conv weight sites are set; before the guide is
    initialised this sets the values its means start from). Only conv layers whose module name
    matches ``layers`` and whose kernel size has a VAE in ``prior`` are touched; a layer matched
    explicitly (a pattern without wildcards) that has no VAE raises ``ValueError``.
    """
    from ...bnn import BNN
    if not isinstance(prior, DeepWeightPrior):
        raise TypeError(f"init_from_prior needs a DeepWeightPrior, got {type(prior).__name__}")
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    pats = [layers] if isinstance(layers, str) else list(layers)
    sizes = set(prior.kernel_sizes()) if prior.key is None else {prior.vae.kernel_size}

    def wanted(name, shape, what):
        if not any(fnmatch.fnmatchcase(name, p) for p in pats):
            return False
        if len(shape) == 4 and shape[-1] == shape[-2] and shape[-1] in sizes:
            return True
        if name in pats:
            raise ValueError(f"{what} {name!r} of shape {tuple(shape)} has no VAE in the prior "
                             f"(kernel sizes {sorted(sizes)})")
        return False

    done = []
    if isinstance(target, BNN):
        guide = target.autoguide
        for site, _ in target.site_priors.items():
            module = site.rpartition(".")[0]
            shape = _bnn_site_shape(target, site)
            if not site.endswith(".weight") or shape is None or not wanted(module, shape, "layer"):
                continue
            value = _prior_kernels(prior, shape, mean_only)
            if guide.prototype_trace is None:
                target._init_values[site] = value
            else:
                _set_guide_mean(guide, site, value)
            done.append(site)
    elif isinstance(target, nn.Module):
        for name, m in target.named_modules():
            if isinstance(m, _CONV) and wanted(name, m.weight.shape, "layer"):
                m.weight.copy_(_prior_kernels(prior, m.weight.shape, mean_only).to(m.weight))
                done.append(f"{name}.weight")
    else:
        raise TypeError(f"init_from_prior needs an nn.Module or a BNN, got {type(target).__name__}")
    if not done:
        raise ValueError(f"no conv layer matching {pats} has kernels of a size the prior models ({sorted(sizes)})")
    return done


def _prior_kernels(prior, shape, mean_only):
    """Kernels ``[out, in, k, k]`` from the VAE for ``k×k``: decoder means of z ~ N(0, I), or full draws.
    A normalised VAE gives the shapes; their norms are drawn from the source kernels' log-normal norm law
    recorded with the VAE (the prior's own radial factor, N(0, scale²I), has its mass at norms ≈ scale·k —
    far larger than trained kernels, no place to start from)."""
    vae = prior.for_kernel(shape[-1]).vae
    w = vae.sample(tuple(shape[:2]), mean_only=mean_only)
    if vae.normalized:
        if vae.source_norm is None:
            raise ValueError("this normalised kernel VAE has no recorded source_norm; cannot give initial kernels a norm")
        m, sd = vae.source_norm["log_mean"], vae.source_norm["log_sd"]
        w = w * torch.exp(m + sd * torch.randn(tuple(shape[:2]), dtype=w.dtype, device=w.device))[..., None, None]
    return w


def _bnn_site_shape(bnn, site):
    mname, _, pname = site.rpartition(".")
    module = bnn.net.get_submodule(mname) if mname else bnn.net
    shapes = getattr(module, "site_shapes", {})
    return shapes.get(pname)


def _set_guide_mean(guide, site, value):
    flat = guide.flat
    offset, n = guide._layout[site].offset, guide._layout[site].size
    if guide._layout[site].transform is not None:
        raise ValueError(f"site {site!r} is constrained; init_from_prior sets real-valued kernels only")
    for pname in ("loc", "theta"):
        if hasattr(flat, pname):
            getattr(flat, pname).data[offset:offset + n] = value.reshape(-1)
            return
    if hasattr(flat, "gamma"):  # μ = γ·σ
        loc, scale = guide.site_params(site)
        flat.gamma.data[offset:offset + n] = (value / scale).reshape(-1)
        return
    raise ValueError(f"cannot set the mean of {type(guide).__name__}; call init_from_prior before the guide is "
                     "initialised (before the first step)")
