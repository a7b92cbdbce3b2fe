"""Test-time augmentation (TTA) for posterior ensembles, greedy policy search and mean embeddings.

Ashukha et al. (2020), "Pitfalls of in-domain uncertainty estimation and ensembling in deep learning":

* **per-draw TTA** — p(y|x) = 1/(S·A) Σ_s Σ_a p(y | x̂_{s,a}, θ_s), x̂_{s,a} ~ p_aug(·|x): every posterior
  draw θ_s (a guide sample, an SGLD draw or an ensemble member) sees its *own* A random augmentations;
  **classic TTA** gives all draws the same A augmentations. Both cost S·A forward passes.
* **greedy policy search** — a pool of random sub-policies (2–3 transforms with random magnitudes);
  starting from the empty policy, add (with replacement) the sub-policy whose inclusion most improves the
  *calibrated* log-likelihood on a validation split, and stop when no candidate improves it.
* **mean embeddings (MeTTA)** — a layer's activations averaged over augmentations of the input, read
  with a forward hook; a linear probe on them vs on central (un-augmented) embeddings.

Images are float tensors ``[B, C, H, W]`` in [0, 1]. Augmentations are applied to whole batches: the
geometric transforms of a sub-policy are composed into one per-image 2×3 matrix and applied with a
single ``affine_grid``/``grid_sample``; the photometric ones are ``torchvision.transforms.v2.functional``
ops run on the whole batch, selected per image with ``torch.where``. Nothing loops over images in Python;
the only Python loops are over posterior draws and over the (few) sub-policies of a policy.

Posterior draws plug in through :class:`Draws`: a list of callables ``x [N, ...] -> logits [N, K]``, one
per draw (``Draws.from_bnn``, ``Draws.from_posterior`` for SGLD, ``Draws.from_ensemble``).
"""
from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import pyro.poutine as poutine
import torch
import torch.nn as nn
import torch.nn.functional as TF
from torchvision.transforms.v2 import functional as V2

from pyrobnn.data import ArrayLoader
from pyrobnn.metrics import accuracy, calibrated_nll, nll

__all__ = ["OPS", "Transform", "SubPolicy", "Policy", "Draws", "member_outputs", "tta_predict",
           "evaluate_tta", "sample_pool", "greedy_policy_search", "SearchResult", "embeddings",
           "linear_probe", "AugmentedLoader", "default_policy"]

POLICY_FORMAT = "pyrobnn.tta.policy"


# ----------------------------------------------------------------------------------------------------
# transforms
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Op:
    kind: str  # "geometric" (a 2×3 matrix per image) or "pixel" (a batched op on the images)
    max_value: float  # the value at magnitude 1
    signed: bool  # per image: value · U(-1, 1) (geometric) or value · (±1) (pixel); else the value itself
    doc: str


OPS: Dict[str, _Op] = {
    "rotate": _Op("geometric", 30.0, True, "rotation by up to ±30° · magnitude (uniform per image)"),
    "shear_x": _Op("geometric", 0.3, True, "horizontal shear factor up to ±0.3 · magnitude"),
    "shear_y": _Op("geometric", 0.3, True, "vertical shear factor up to ±0.3 · magnitude"),
    "translate_x": _Op("geometric", 0.3, True, "shift up to ±0.15 · magnitude of the width (uniform)"),
    "translate_y": _Op("geometric", 0.3, True, "shift up to ±0.15 · magnitude of the height (uniform)"),
    "zoom": _Op("geometric", 0.3, True, "scale by 1 ± 0.3 · magnitude (uniform)"),
    "hflip": _Op("geometric", 0.0, False, "horizontal flip (magnitude unused)"),
    "brightness": _Op("pixel", 0.5, True, "brightness factor 1 ± 0.5 · magnitude (random sign)"),
    "contrast": _Op("pixel", 0.5, True, "contrast factor 1 ± 0.5 · magnitude (random sign)"),
    "sharpness": _Op("pixel", 0.9, True, "sharpness factor 1 ± 0.9 · magnitude (random sign)"),
    "gamma": _Op("pixel", 0.5, True, "gamma exp(± 0.5 · magnitude) (random sign)"),
    "solarize": _Op("pixel", 0.5, False, "invert pixels above 1 − 0.5 · magnitude"),
    "posterize": _Op("pixel", 4.0, False, "keep 8 − round(4 · magnitude) bits"),
    "blur": _Op("pixel", 1.0, False, "3×3 Gaussian blur, σ = 0.1 + magnitude"),
    "autocontrast": _Op("pixel", 0.0, False, "per-image autocontrast (magnitude unused)"),
    "equalize": _Op("pixel", 0.0, False, "per-image histogram equalisation (magnitude unused)"),
    "cutout": _Op("pixel", 0.5, False, "zero a square of side 0.5 · magnitude · H at a random place"),
}


def _check_unit(v, what):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0.0 <= v <= 1.0:
        raise ValueError(f"{what} must be a number in [0, 1], got {v!r}")
    return float(v)


@dataclass(frozen=True)
class Transform:
    """One augmentation op: ``name`` (a key of :data:`OPS`), ``magnitude`` ∈ [0, 1] and the probability
    ∈ [0, 1] with which it is applied to each image."""
    name: str
    magnitude: float = 0.5
    probability: float = 1.0

    def __post_init__(self):
        if self.name not in OPS:
            raise ValueError(f"unknown transform {self.name!r}; known: {', '.join(OPS)}")
        object.__setattr__(self, "magnitude", _check_unit(self.magnitude, f"{self.name} magnitude"))
        object.__setattr__(self, "probability", _check_unit(self.probability, f"{self.name} probability"))

    def to_dict(self):
        return {"op": self.name, "magnitude": self.magnitude, "probability": self.probability}

    @classmethod
    def from_dict(cls, d):
        if not isinstance(d, dict) or "op" not in d:
            raise ValueError(f"a transform is a mapping with an 'op' key, got {d!r}")
        unknown = set(d) - {"op", "magnitude", "probability"}
        if unknown:
            raise ValueError(f"unknown transform keys {sorted(unknown)}")
        return cls(d["op"], d.get("magnitude", 0.5), d.get("probability", 1.0))


def _uniform(n, generator, device):
    return torch.rand(n, generator=generator).to(device)


def _geometric_matrix(t: Transform, n: int, generator, device) -> torch.Tensor:
    """Per-image 2×3 affine matrices ``[n, 2, 3]`` (output → input coordinates in [-1, 1])."""
    op = OPS[t.name]
    apply = (_uniform(n, generator, device) < t.probability).float()
    value = t.magnitude * op.max_value * (2 * _uniform(n, generator, device) - 1) * apply
    m = torch.zeros(n, 2, 3, device=device)
    m[:, 0, 0] = m[:, 1, 1] = 1.0
    if t.name == "rotate":
        a = torch.deg2rad(value)
        m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = a.cos(), -a.sin(), a.sin(), a.cos()
    elif t.name == "shear_x":
        m[:, 0, 1] = value
    elif t.name == "shear_y":
        m[:, 1, 0] = value
    elif t.name == "translate_x":
        m[:, 0, 2] = value
    elif t.name == "translate_y":
        m[:, 1, 2] = value
    elif t.name == "zoom":
        m[:, 0, 0] = m[:, 1, 1] = 1.0 / (1.0 + value)
    elif t.name == "hflip":
        m[:, 0, 0] = 1.0 - 2.0 * apply
    return m


def _compose(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """2×3 matrices of ``a ∘ b`` (apply ``a``'s sampling map after ``b``'s): as 3×3, A @ B."""
    full = lambda m: torch.cat([m, torch.tensor([0.0, 0.0, 1.0], device=m.device).expand(m.shape[0], 1, 3)], 1)  # noqa: E731
    return (full(a) @ full(b))[:, :2]


def _warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = TF.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return TF.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _pixel_op(t: Transform, x: torch.Tensor, generator) -> torch.Tensor:
    """One photometric op on the batch ``x [n, C, H, W]``, applied to each image with ``t.probability``."""
    n = x.shape[0]
    op = OPS[t.name]
    apply = _uniform(n, generator, x.device) < t.probability
    v = t.magnitude * op.max_value
    if op.signed:
        positive = _uniform(n, generator, x.device) < 0.5
        fn = {"brightness": lambda s: V2.adjust_brightness(x, 1.0 + s * v),
              "contrast": lambda s: V2.adjust_contrast(x, 1.0 + s * v),
              "sharpness": lambda s: V2.adjust_sharpness(x, 1.0 + s * v),
              "gamma": lambda s: V2.adjust_gamma(x, math.exp(s * v))}[t.name]
        # the two signs are two batched calls; each image picks its own
        out = torch.where(positive[:, None, None, None], fn(1.0), fn(-1.0))
    elif t.name == "solarize":
        out = V2.solarize(x, 1.0 - v)
    elif t.name == "posterize":
        out = V2.posterize(x, 8 - int(round(v)))
    elif t.name == "blur":
        out = V2.gaussian_blur(x, [3, 3], [0.1 + v, 0.1 + v])
    elif t.name == "autocontrast":
        out = V2.autocontrast(x)
    elif t.name == "equalize":
        out = V2.equalize(x)
    elif t.name == "cutout":
        H, W = x.shape[-2:]
        side = v
        cy, cx = _uniform(n, generator, x.device), _uniform(n, generator, x.device)
        ys = (torch.arange(H, device=x.device) + 0.5) / H
        xs = (torch.arange(W, device=x.device) + 0.5) / W
        inside = ((ys[None, :, None] - cy[:, None, None]).abs() < side / 2) & \
                 ((xs[None, None, :] - cx[:, None, None]).abs() < side / 2)
        out = x.masked_fill(inside[:, None], 0.0)
    else:  # pragma: no cover  (OPS and this function are kept in step)
        raise AssertionError(t.name)
    return torch.where(apply[:, None, None, None], out, x)


@dataclass(frozen=True)
class SubPolicy:
    """An ordered tuple of :class:`Transform` s applied one after another (the empty one is the identity)."""
    transforms: Tuple[Transform, ...] = ()

    def __post_init__(self):
        ts = tuple(self.transforms)
        if not all(isinstance(t, Transform) for t in ts):
            raise TypeError("a SubPolicy holds Transform objects")
        object.__setattr__(self, "transforms", ts)

    def __len__(self):
        return len(self.transforms)

    def __str__(self):
        if not self.transforms:
            return "identity"
        return " → ".join(f"{t.name}(m={t.magnitude:g}, p={t.probability:g})" for t in self.transforms)

    def apply(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Augment every image of ``x [n, C, H, W]`` with its own random parameters; same shape.

        Consecutive geometric transforms are composed into one matrix per image, so they cost one
        ``grid_sample`` (and one interpolation) together."""
        _check_images(x)
        theta = None
        for t in self.transforms:
            if OPS[t.name].kind == "geometric":
                m = _geometric_matrix(t, x.shape[0], generator, x.device)
                # the output of t at u samples the input of t at M_t u, so the pipeline t1 then t2 samples
                # the original at M_t1 (M_t2 u)
                theta = m if theta is None else _compose(theta, m)
            else:
                if theta is not None:
                    x, theta = _warp(x, theta), None
                x = _pixel_op(t, x, generator)
        if theta is not None:
            x = _warp(x, theta)
        return x

    def to_list(self):
        return [t.to_dict() for t in self.transforms]

    @classmethod
    def from_list(cls, items):
        if not isinstance(items, (list, tuple)):
            raise ValueError(f"a sub-policy is a list of transforms, got {items!r}")
        return cls(tuple(Transform.from_dict(d) for d in items))


def _check_images(x):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 4:
        raise ValueError(f"images must be a float tensor [N, C, H, W], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")


class Policy:
    """A list of :class:`SubPolicy` s. ``augment(x, n)`` makes n augmented copies of a batch; copy i
    uses sub-policy ``i mod len(policy)`` (a learned policy of K sub-policies is meant to be used with
    A = K copies, each sub-policy once). Serialises to JSON (``to_json``/``save``/``load``)."""

    def __init__(self, sub_policies: Sequence[Union[SubPolicy, Sequence[Transform]]]):
        subs = [s if isinstance(s, SubPolicy) else SubPolicy(tuple(s)) for s in sub_policies]
        if not subs:
            raise ValueError("a Policy needs at least one sub-policy (SubPolicy() is the identity)")
        self.sub_policies: List[SubPolicy] = subs

    def __len__(self):
        return len(self.sub_policies)

    def __iter__(self):
        return iter(self.sub_policies)

    def __eq__(self, other):
        return isinstance(other, Policy) and self.sub_policies == other.sub_policies

    def __repr__(self):
        return "Policy([" + "; ".join(map(str, self.sub_policies)) + "])"

    @classmethod
    def identity(cls) -> "Policy":
        return cls([SubPolicy()])

    def augment(self, x: torch.Tensor, num: int, generator: Optional[torch.Generator] = None,
                sub_policy_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``num`` augmented copies of ``x [B, C, H, W]``: ``[num, B, C, H, W]``, each image of each copy
        with its own random parameters. ``sub_policy_index [num]`` picks the sub-policy of each copy
        (default ``arange(num) % len(self)``). Loops over sub-policies only, never over images."""
        _check_images(x)
        if isinstance(num, bool) or not isinstance(num, int) or num < 1:
            raise ValueError(f"num must be a positive integer, got {num!r}")
        if sub_policy_index is None:
            sub_policy_index = torch.arange(num) % len(self)
        sub_policy_index = torch.as_tensor(sub_policy_index).long().cpu()
        if sub_policy_index.shape != (num,) or int(sub_policy_index.min()) < 0 \
                or int(sub_policy_index.max()) >= len(self):
            raise ValueError(f"sub_policy_index must be [num] integers in [0, {len(self)})")
        out = x.new_empty((num,) + tuple(x.shape))
        for k, sub in enumerate(self.sub_policies):
            copies = (sub_policy_index == k).nonzero().flatten()
            if copies.numel() == 0:
                continue
            rep = x.unsqueeze(0).expand((copies.numel(),) + tuple(x.shape)).reshape((-1,) + tuple(x.shape[1:]))
            out[copies.to(x.device)] = sub.apply(rep, generator).reshape((copies.numel(),) + tuple(x.shape))
        return out

    # -- JSON ------------------------------------------------------------------------------------------
    def to_dict(self):
        return {"format": POLICY_FORMAT, "version": 1, "sub_policies": [s.to_list() for s in self.sub_policies]}

    @classmethod
    def from_dict(cls, d):
        if not isinstance(d, dict) or d.get("format") != POLICY_FORMAT:
            raise ValueError(f"not a pyrobnn TTA policy (expected format {POLICY_FORMAT!r})")
        if d.get("version") != 1:
            raise ValueError(f"unsupported policy version {d.get('version')!r}")
        return cls([SubPolicy.from_list(s) for s in d.get("sub_policies", [])])

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Policy":
        return cls.from_dict(json.loads(text))

    def save(self, path) -> None:
        """Write the policy as JSON (atomically: a temporary file renamed into place)."""
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(self.to_json())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path) -> "Policy":
        with open(path) as f:
            return cls.from_json(f.read())


def default_policy(translate: float = 0.5, flip: bool = True) -> Policy:
    """The usual small-image augmentation as one sub-policy: random shift (up to ±0.15·``translate`` of
    the size, 2.1 px on 28×28 at the default), then a horizontal flip with probability ½."""
    ts = [Transform("translate_x", translate, 1.0), Transform("translate_y", translate, 1.0)]
    if flip:
        ts.append(Transform("hflip", 0.0, 0.5))
    return Policy([SubPolicy(tuple(ts))])


# ----------------------------------------------------------------------------------------------------
# posterior draws
# ----------------------------------------------------------------------------------------------------
class Draws:
    """S posterior draws as functions: ``draws[s](x [N, ...]) -> logits [N, K]``.

    ``roots[s]`` is the ``nn.Module`` in which draw s's layers live (for :func:`embeddings`' hooks);
    draws of one BNN share ``bnn.net``. Build with :meth:`from_bnn`, :meth:`from_posterior`,
    :meth:`from_ensemble` or directly from callables.
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

    @classmethod
    def from_ensemble(cls, nets: Sequence[nn.Module]) -> "Draws":
        """Deterministic networks, one per member (put in eval mode)."""
        nets = list(nets)
        if not all(isinstance(n, nn.Module) for n in nets):
            raise TypeError("from_ensemble needs torch.nn.Module members")
        for n in nets:
            n.eval()
        return cls(nets, nets, f"ensemble of {len(nets)}")

    @classmethod
    def from_bnn(cls, bnn, num_samples: int, generator: Optional[torch.Generator] = None,
                 mode: str = "weights") -> "Draws":
        """S draws of a trained :class:`pyrobnn.BNN` with a categorical likelihood.

        ``mode="weights"``: S joint weight samples from the guide (``autoguide.sample_latents``), each a
        fixed network (the layers run plain convolutions on the given weights). ``mode="local"``: every
        call samples activations by local reparameterisation (cheap per draw, but a "draw" is then a fresh
        independent weight sample per row and per call)."""
        from pyrobnn.bnn import BNN
        from pyrobnn.likelihoods import Categorical
        if not isinstance(bnn, BNN):
            raise TypeError(f"from_bnn needs a pyrobnn BNN, got {type(bnn).__name__}")
        if not isinstance(bnn.likelihood, Categorical):
            raise ValueError("TTA predictive averaging here is for classifiers (a categorical likelihood)")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        if mode == "weights":
            if getattr(bnn.autoguide, "prototype_trace", None) is None or not hasattr(bnn.autoguide, "sample_latents"):
                raise ValueError("the BNN's guide has no parameters yet (train or bnn.initialize(x) first) or "
                                 "cannot sample latents")
            latents = bnn.autoguide.sample_latents(num_samples, generator=generator)
            members = [_Conditioned(bnn, {k: v[s] for k, v in latents.items()}) for s in range(num_samples)]
        elif mode == "local":
            members = [_LocalDraw(bnn) for _ in range(num_samples)]
        else:
            raise ValueError(f"mode must be 'weights' or 'local', got {mode!r}")
        return cls(members, [bnn.net] * num_samples, f"BNN guide, {mode}")

    @classmethod
    def from_posterior(cls, posterior, num_samples: Optional[int] = None) -> "Draws":
        """Draws kept by an SG-MCMC run (:class:`pyrobnn.inference.SamplePosterior`): all of them, or
        ``num_samples`` evenly spaced ones."""
        flat = posterior.get_samples()
        total = next(iter(flat.values())).shape[0]
        idx = torch.arange(total)
        if num_samples is not None:
            if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
                raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
            idx = torch.linspace(0, total - 1, min(num_samples, total)).round().long()
        bnn = posterior.bnn
        dtype = torch.get_default_dtype()
        members = [_Conditioned(bnn, {k: v[i].to(dtype) for k, v in flat.items()}) for i in idx.tolist()]
        return cls(members, [bnn.net] * len(members), f"sample posterior, {len(members)} of {total} draws")


class _Conditioned:
    """A BNN's network with its latent sites fixed to one draw."""

    def __init__(self, bnn, draw: Dict[str, torch.Tensor]):
        self.bnn, self.draw = bnn, draw

    def __call__(self, x):
        with _eval(self.bnn), poutine.block():
            return poutine.condition(self.bnn._net_only, data=self.draw)(x)


class _LocalDraw:
    """A BNN's network under a fresh guide trace per call (local reparameterisation where enabled)."""

    def __init__(self, bnn):
        self.bnn = bnn

    def __call__(self, x):
        with _eval(self.bnn), poutine.block():
            tr = poutine.trace(self.bnn.autoguide).get_trace(x)
            return poutine.replay(self.bnn._net_only, tr)(x)


@contextmanager
def _eval(module: nn.Module):
    was = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was)


# ----------------------------------------------------------------------------------------------------
# TTA predictive
# ----------------------------------------------------------------------------------------------------
_MODES = ("none", "classic", "per-draw")


def _check_mode(mode):
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")


def _augmented_inputs(x, S, A, policy, mode, generator, sub_policy_index=None):
    """Inputs per draw ``[S, A, b, ...]`` (a broadcast view where all draws share them)."""
    if mode == "none":
        return x.unsqueeze(0).unsqueeze(0).expand((S, 1) + tuple(x.shape))
    if mode == "classic":
        xa = policy.augment(x, A, generator, sub_policy_index)
        return xa.unsqueeze(0).expand((S,) + tuple(xa.shape))
    index = (torch.arange(S * A) % A) % len(policy) if sub_policy_index is None else \
        torch.as_tensor(sub_policy_index).repeat(S)
    return policy.augment(x, S * A, generator, index).reshape((S, A) + tuple(x.shape))


@torch.no_grad()
def member_outputs(draws: Draws, x: torch.Tensor, policy: Optional[Policy] = None, num_augmentations: Optional[int] = None,
                   mode: str = "per-draw", generator: Optional[torch.Generator] = None,
                   chunk_size: int = 1000, sub_policy_index: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Logits ``[S, A, B, K]`` of every draw on every augmented copy of ``x [B, C, H, W]``.

    :param mode: ``"none"`` (A = 1, the images as given), ``"classic"`` (the same A augmentations for
        every draw) or ``"per-draw"`` (draw s sees its own A augmentations).
    :param num_augmentations: A; default ``len(policy)`` (each sub-policy once).
    :param sub_policy_index: ``[A]`` sub-policy of each augmentation (default ``a mod len(policy)``).
    :param chunk_size: images per block (S·A·chunk_size images are held at once).
    """
    _check_mode(mode)
    _check_images(x)
    if not isinstance(draws, Draws):
        raise TypeError(f"draws must be a Draws, got {type(draws).__name__}")
    S = len(draws)
    if mode == "none":
        A = 1
    else:
        if not isinstance(policy, Policy):
            raise ValueError(f"mode {mode!r} needs a Policy")
        A = len(policy) if num_augmentations is None else num_augmentations
        if isinstance(A, bool) or not isinstance(A, int) or A < 1:
            raise ValueError(f"num_augmentations must be a positive integer, got {A!r}")
        if sub_policy_index is not None and len(sub_policy_index) != A:
            raise ValueError(f"sub_policy_index has {len(sub_policy_index)} entries for {A} augmentations")
    outs = []
    for i in range(0, x.shape[0], chunk_size):
        xb = x[i:i + chunk_size]
        xs = _augmented_inputs(xb, S, A, policy, mode, generator, sub_policy_index)
        per_draw = []
        for s in range(S):
            o = draws[s](xs[s].reshape((-1,) + tuple(xb.shape[1:])))
            if o.dim() != 2 or o.shape[0] != A * xb.shape[0]:
                raise ValueError(f"draw {s} returned shape {tuple(o.shape)}; expected logits [{A * xb.shape[0]}, K]")
            per_draw.append(o.reshape(A, xb.shape[0], -1))
        outs.append(torch.stack(per_draw))
    return torch.cat(outs, 2)


def _mean_probs(logits: torch.Tensor) -> torch.Tensor:
    """Predictive ``[B, K]`` from logits ``[S, A, B, K]``: the mean of the members' softmaxes, computed
    in log space (log-mean-exp) so confident members do not underflow."""
    lp = torch.log_softmax(logits.double(), -1).flatten(0, 1)
    return (torch.logsumexp(lp, 0) - math.log(lp.shape[0])).exp().to(logits.dtype)


def tta_predict(draws: Draws, x: torch.Tensor, policy: Optional[Policy] = None, num_augmentations: Optional[int] = None,
                mode: str = "per-draw", generator: Optional[torch.Generator] = None, chunk_size: int = 1000) -> torch.Tensor:
    """Predictive class probabilities ``[B, K]``: 1/(S·A) Σ_s Σ_a softmax(f_s(x̂_{s,a})) (see
    :func:`member_outputs` for the modes)."""
    return _mean_probs(member_outputs(draws, x, policy, num_augmentations, mode, generator, chunk_size))


def evaluate_tta(probs: torch.Tensor, y: torch.Tensor, seed: int = 0) -> Dict[str, float]:
    """Accuracy, NLL and calibrated NLL (temperature fitted on one random half, NLL on the other,
    swapped and averaged; ``seed`` fixes the split) of predictive probabilities ``[B, K]``."""
    return {"accuracy": accuracy(probs, y), "nll": nll(probs, y), "calibrated_nll": calibrated_nll(probs, y, seed)}


# ----------------------------------------------------------------------------------------------------
# greedy policy search
# ----------------------------------------------------------------------------------------------------
def sample_pool(size: int, generator: Optional[torch.Generator] = None, ops: Optional[Sequence[str]] = None,
                min_transforms: int = 2, max_transforms: int = 3, probability_range=(0.5, 1.0),
                include_identity: bool = True) -> List[SubPolicy]:
    """A pool of ``size`` random sub-policies, each of ``min_transforms``–``max_transforms`` distinct
    transforms with magnitude ~ U(0, 1) and probability ~ U(``probability_range``), rounded to 2 decimals
    (short, exact JSON). With ``include_identity`` the first entry is the identity sub-policy."""
    ops = list(OPS) if ops is None else list(ops)
    for o in ops:
        if o not in OPS:
            raise ValueError(f"unknown transform {o!r}; known: {', '.join(OPS)}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    if not 1 <= min_transforms <= max_transforms <= len(ops):
        raise ValueError(f"need 1 <= min_transforms <= max_transforms <= {len(ops)}")
    lo, hi = probability_range
    _check_unit(lo, "probability_range[0]"), _check_unit(hi, "probability_range[1]")
    pool = [SubPolicy()] if include_identity else []
    while len(pool) < size:
        k = int(torch.randint(min_transforms, max_transforms + 1, (1,), generator=generator))
        names = [ops[i] for i in torch.randperm(len(ops), generator=generator)[:k].tolist()]
        mags = torch.rand(k, generator=generator).tolist()
        probs = (lo + (hi - lo) * torch.rand(k, generator=generator)).tolist()
        pool.append(SubPolicy(tuple(Transform(n, round(m, 2), round(p, 2)) for n, m, p in zip(names, mags, probs))))
    return pool


@dataclass
class SearchResult:
    """Outcome of :func:`greedy_policy_search`.

    :ivar policy: the chosen sub-policies in the order added (repeats allowed).
    :ivar chosen: their indices in ``pool``.
    :ivar objective: validation calibrated log-likelihood (= −calibrated NLL) after each addition.
    :ivar candidates: per step, the objective each pool entry would have given ``[steps, P]``.
    :ivar pool_objective: each pool entry alone ``[P]``.
    :ivar stopped: why the search ended.
    """
    policy: Policy
    chosen: List[int]
    objective: List[float]
    candidates: List[List[float]]
    pool: List[SubPolicy]
    pool_objective: List[float] = field(default_factory=list)
    stopped: str = ""


def greedy_policy_search(draws: Draws, x_val: torch.Tensor, y_val: torch.Tensor, pool: Sequence[SubPolicy],
                         max_policy_size: int = 5, samples_per_sub_policy: int = 1, mode: str = "per-draw",
                         generator: Optional[torch.Generator] = None, split_seed: int = 0,
                         chunk_size: int = 1000, tolerance: float = 0.0) -> SearchResult:
    """Greedy policy search (Ashukha et al. 2020) maximising the calibrated log-likelihood on validation.

    Each pool entry's predictive on ``x_val`` is computed once (``samples_per_sub_policy`` augmentations
    per draw, per-draw or classic); a policy's predictive is the mean of its entries' predictives. From
    the empty policy, add (with replacement) the entry that gives the highest objective; stop at
    ``max_policy_size`` entries or when the best candidate would not raise the objective by more than
    ``tolerance`` — a sub-policy that lowers the objective is never added. The calibration split is
    fixed by ``split_seed`` so every candidate is scored on the same halves.
    """
    pool = list(pool)
    if not pool or not all(isinstance(p, SubPolicy) for p in pool):
        raise ValueError("pool must be a non-empty list of SubPolicy")
    if isinstance(max_policy_size, bool) or not isinstance(max_policy_size, int) or max_policy_size < 1:
        raise ValueError(f"max_policy_size must be a positive integer, got {max_policy_size!r}")
    if mode not in ("classic", "per-draw"):
        raise ValueError(f"mode must be 'classic' or 'per-draw', got {mode!r}")
    y_val = torch.as_tensor(y_val).long()
    if y_val.shape != x_val.shape[:1]:
        raise ValueError(f"y_val must have shape [{x_val.shape[0]}], got {tuple(y_val.shape)}")
    pool_probs = torch.stack([
        tta_predict(draws, x_val, Policy([sub]), samples_per_sub_policy, mode, generator, chunk_size)
        for sub in pool]).double()  # [P, B, K]

    def objective(probs):
        return -calibrated_nll(probs.float(), y_val, split_seed)

    pool_obj = [objective(p) for p in pool_probs]
    chosen: List[int] = []
    history: List[float] = []
    candidates: List[List[float]] = []
    total = torch.zeros_like(pool_probs[0])
    stopped = f"reached max_policy_size={max_policy_size}"
    for step in range(max_policy_size):
        scores = [objective((total + pool_probs[j]) / (step + 1)) for j in range(len(pool))]
        candidates.append(scores)
        best = max(range(len(pool)), key=lambda j: scores[j])
        if history and not scores[best] > history[-1] + tolerance:
            stopped = f"no candidate improves the objective (best {scores[best]:.5f} vs {history[-1]:.5f})"
            break
        chosen.append(best)
        history.append(scores[best])
        total = total + pool_probs[best]
    return SearchResult(Policy([pool[j] for j in chosen]), chosen, history, candidates, pool, pool_obj, stopped)


# ----------------------------------------------------------------------------------------------------
# mean embeddings (MeTTA) and a linear probe
# ----------------------------------------------------------------------------------------------------
@contextmanager
def _capture(module: nn.Module, capture: str, store: List[torch.Tensor]):
    if capture == "output":
        h = module.register_forward_hook(lambda m, inp, out: store.append(out.detach().flatten(1)))
    else:
        h = module.register_forward_pre_hook(lambda m, inp: store.append(inp[0].detach().flatten(1)))
    try:
        yield
    finally:
        h.remove()


@torch.no_grad()
def embeddings(draws: Draws, layer: str, x: torch.Tensor, policy: Optional[Policy] = None,
               num_augmentations: int = 0, capture: str = "output", generator: Optional[torch.Generator] = None,
               chunk_size: int = 1000, reduce_draws: bool = True) -> torch.Tensor:
    """Activations of the module ``layer`` (a dotted path in ``draws.roots[s]``), averaged over
    ``num_augmentations`` per-draw augmentations of ``x [B, C, H, W]`` (MeTTA), or of ``x`` itself when
    ``num_augmentations == 0`` (central embeddings). ``capture`` reads the module's ``"output"`` or its
    ``"input"``. Returns ``[B, D]`` averaged over draws too (``reduce_draws``), else ``[S, B, D]``.
    Averaging over draws only makes sense when their features are aligned (draws of one mean-field
    posterior); for an ensemble of independently trained nets pass ``reduce_draws=False`` or one member."""
    if capture not in ("output", "input"):
        raise ValueError(f"capture must be 'output' or 'input', got {capture!r}")
    if draws.roots is None:
        raise ValueError("these Draws have no roots (modules) to hook; build them with roots=")
    if isinstance(num_augmentations, bool) or not isinstance(num_augmentations, int) or num_augmentations < 0:
        raise ValueError(f"num_augmentations must be a non-negative integer, got {num_augmentations!r}")
    if num_augmentations and not isinstance(policy, Policy):
        raise ValueError("augmented embeddings need a Policy")
    modules = []
    for s, root in enumerate(draws.roots):
        try:
            modules.append(root.get_submodule(layer))
        except AttributeError:
            names = [n for n, _ in root.named_modules() if n]
            raise ValueError(f"draw {s} has no module {layer!r}; modules: {names}") from None
    mode = "per-draw" if num_augmentations else "none"
    S, out = len(draws), []
    for i in range(0, x.shape[0], chunk_size):
        xb = x[i:i + chunk_size]
        A = max(1, num_augmentations)
        xs = _augmented_inputs(xb, S, A, policy, mode, generator)
        feats = []
        for s in range(S):
            store: List[torch.Tensor] = []
            with _capture(modules[s], capture, store):
                draws[s](xs[s].reshape((-1,) + tuple(xb.shape[1:])))
            if len(store) != 1:
                raise ValueError(f"module {layer!r} ran {len(store)} times in one forward; expected once")
            feats.append(store[0].reshape(A, xb.shape[0], -1).mean(0))
        out.append(torch.stack(feats))
    e = torch.cat(out, 1)
    return e.mean(0) if reduce_draws else e


def linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, l2: float = 1e-3, max_iter: int = 200, split_seed: int = 0) -> Dict:
    """Multinomial logistic regression on standardised features (L-BFGS, L2 penalty ``l2``·‖W‖²/2 per
    example), trained on ``train_*``; returns test ``accuracy``, ``nll``, ``calibrated_nll`` and ``probs``."""
    for f, what in ((train_features, "train_features"), (test_features, "test_features")):
        if f.dim() != 2:
            raise ValueError(f"{what} must be [N, D], got {tuple(f.shape)}")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError("train and test features have different widths")
    y = torch.as_tensor(train_labels).long()
    yt = torch.as_tensor(test_labels).long()
    if y.shape != train_features.shape[:1] or yt.shape != test_features.shape[:1]:
        raise ValueError("labels must have one entry per feature row")
    mu, sd = train_features.mean(0), train_features.std(0).clamp_min(1e-6)
    xtr = ((train_features - mu) / sd).double()
    xte = ((test_features - mu) / sd).double()
    K = int(max(y.max(), yt.max())) + 1
    W = torch.zeros(xtr.shape[1], K, dtype=torch.double, requires_grad=True)
    b = torch.zeros(K, dtype=torch.double, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = TF.cross_entropy(xtr @ W + b, y) + 0.5 * l2 * (W * W).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        probs = torch.softmax(xte @ W + b, -1).float()
    return {**evaluate_tta(probs, yt, split_seed), "probs": probs}


# ----------------------------------------------------------------------------------------------------
# training-time augmentation
# ----------------------------------------------------------------------------------------------------
class AugmentedLoader(ArrayLoader):
    """An :class:`pyrobnn.data.ArrayLoader` whose batches are augmented by ``policy`` (one random copy
    per image, sub-policy chosen uniformly per batch). The randomness of batch b of epoch e depends only
    on ``(seed, e, b)``, so runs resume exactly like the plain loader's."""

    def __init__(self, x, y, policy: Policy, batch_size: int = 128, shuffle: bool = True, seed: int = 0, **kw):
        super().__init__(x, y, batch_size=batch_size, shuffle=shuffle, seed=seed, **kw)
        if not isinstance(policy, Policy):
            raise TypeError(f"policy must be a Policy, got {type(policy).__name__}")
        self.policy = policy

    def batches(self, start: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for b, (xb, yb) in enumerate(super().batches(start), start):
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_003 + b)
            k = torch.randint(len(self.policy), (1,), generator=g)
            yield self.policy.augment(xb, 1, g, k)[0], yb
