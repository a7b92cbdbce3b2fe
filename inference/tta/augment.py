"""Batched image augmentations for test-time augmentation: the transforms (:data:`OPS`,
:class:`Transform`), sub-policies that compose them and :class:`Policy` (a list of sub-policies, JSON).

Images are float tensors ``[B, C, H, W]`` in [0, 1]. The geometric transforms of a sub-policy are
composed into one per-image 2×3 matrix and applied with a single ``affine_grid``/``grid_sample``; the
photometric ones are ``torchvision.transforms.v2.functional`` ops run on the whole batch, selected per
image with ``torch.where``. Nothing loops over images in Python.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as TF
from torchvision.transforms.v2 import functional as V2

from pyrobnn.validation import positive_int, probability

__all__ = ["OPS", "Transform", "SubPolicy", "Policy", "default_policy"]

POLICY_FORMAT = "pyrobnn.tta.policy"


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
    return probability(what, v)


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
        positive_int("num", num)
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
