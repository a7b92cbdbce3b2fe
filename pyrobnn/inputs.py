"""Network inputs as users have them, batched on dim 0 — in one place.

An input ``x`` is one of

* a tensor (any real or integer dtype: integer tokens for ``nn.Embedding`` stay integer), passed as
  ``net(x)``;
* a tuple (or list) of tensors, passed as positional arguments ``net(a, b)``;
* a dict of tensors, passed as keyword arguments ``net(a=..., b=...)``.

Every tensor has the examples on dim 0, all the same number of them. Everything in pyrobnn that batches,
indexes, repeats, splits or checks inputs (``bayesian``'s model, ``fit``, ``predict``, ``evaluate``, the
SG-MCMC minibatches, distillation, the ArviZ bridge, save/load) does it through this module.

A :class:`Signature` records what one example looks like (structure, per-example shapes, dtypes); it is
part of a saved BNN's spec and gives the example input a loaded BNN is initialised with.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["Inputs", "Signature", "as_inputs", "is_inputs", "batch_size", "index", "rows", "repeat", "call", "leaves",
           "map_leaves", "concat", "check_finite", "describe", "to_tensors", "from_tensors"]

Inputs = Union[torch.Tensor, Tuple[torch.Tensor, ...], Dict[str, torch.Tensor]]

_finite_inputs = WeakIdKeyDictionary()  # large inputs already checked finite: tensor -> its _version
_INT_KINDS = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool)


def _leaf(v, where: str, float_dtype: Optional[torch.dtype]) -> torch.Tensor:
    if not isinstance(v, torch.Tensor):
        if isinstance(v, (str, bytes, dict)) or v is None:
            raise TypeError(f"{where} must be a tensor or array-like, got {type(v).__name__}")
        try:
            v = torch.as_tensor(v)
        except Exception:
            raise TypeError(f"{where} must be a tensor or array-like, got {type(v).__name__}") from None
        if v.is_floating_point() and float_dtype is None:
            v = v.to(torch.get_default_dtype())
    if v.is_complex():
        raise TypeError(f"{where} must be real-valued, got dtype {v.dtype}")
    if not v.is_floating_point() and v.dtype not in _INT_KINDS:
        raise TypeError(f"{where} has unsupported dtype {v.dtype}")
    if float_dtype is not None and v.is_floating_point() and v.dtype != float_dtype:
        v = v.to(float_dtype)  # float64/float16 inputs would fail inside the layers' matmul
    if v.dim() < 1 or v.shape[0] == 0:
        raise ValueError(f"{where} must have a leading batch dimension with at least one example, "
                         f"got shape {tuple(v.shape)}")
    return v


def as_inputs(x: Any, float_dtype: Optional[torch.dtype] = None, what: str = "x") -> Inputs:
    """``x`` as a tensor, a tuple of tensors or a dict of tensors, checked: real or integer dtypes, a
    leading batch dimension, the same number of examples everywhere. Array-likes become tensors; floating
    tensors are cast to ``float_dtype`` when given; integer and bool tensors keep their dtype."""
    if isinstance(x, dict):
        if not x:
            raise ValueError(f"{what} is an empty dict; give the network's keyword inputs")
        bad = [k for k in x if not isinstance(k, str)]
        if bad:
            raise TypeError(f"{what} as a dict needs string keys (the network's keyword arguments), got {bad[0]!r}")
        out: Inputs = {k: _leaf(v, f"{what}[{k!r}]", float_dtype) for k, v in x.items()}
    elif isinstance(x, (tuple, list)) and x and all(isinstance(v, torch.Tensor) for v in x):
        out = tuple(_leaf(v, f"{what}[{i}]", float_dtype) for i, v in enumerate(x))
    else:
        return _leaf(x, what, float_dtype)
    sizes = {name: v.shape[0] for name, v in _named(out)}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"the inputs in {what} have different numbers of examples: "
                         + ", ".join(f"{n}: {s}" for n, s in sizes.items()))
    return out


def is_inputs(obj: Any) -> bool:
    """Whether ``obj`` is structured like inputs: a tensor, a non-empty tuple/list of tensors or a
    non-empty dict of tensors (a test, not a validation)."""
    if isinstance(obj, torch.Tensor):
        return True
    if isinstance(obj, dict):
        return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())
    return isinstance(obj, (tuple, list)) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj)


def _named(x: Inputs, what: str = "x"):
    if isinstance(x, torch.Tensor):
        return [(what, x)]
    if isinstance(x, dict):
        return [(f"{what}[{k!r}]", v) for k, v in x.items()]
    return [(f"{what}[{i}]", v) for i, v in enumerate(x)]


def leaves(x: Inputs) -> List[torch.Tensor]:
    """The tensors of ``x``, in order."""
    if isinstance(x, torch.Tensor):
        return [x]
    return list(x.values()) if isinstance(x, dict) else list(x)


def map_leaves(x: Inputs, fn: Callable[[torch.Tensor], torch.Tensor]) -> Inputs:
    """``x`` with ``fn`` applied to every tensor, structure kept."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, dict):
        return {k: fn(v) for k, v in x.items()}
    return tuple(fn(v) for v in x)


def batch_size(x: Inputs) -> int:
    """The number of examples (dim 0)."""
    return (x if isinstance(x, torch.Tensor) else leaves(x)[0]).shape[0]


def index(x: Inputs, idx: torch.Tensor) -> Inputs:
    """The examples ``idx`` (an index tensor) of every tensor."""
    if isinstance(x, torch.Tensor):
        return x[idx]
    return map_leaves(x, lambda v: v[idx])


def rows(x: Inputs, start: int, stop: int) -> Inputs:
    """Examples ``start:stop`` (views, no copy)."""
    if isinstance(x, torch.Tensor):
        return x[start:stop]
    return map_leaves(x, lambda v: v[start:stop])


def repeat(x: Inputs, n: int) -> Inputs:
    """Every tensor tiled ``n`` times along dim 0 (``[B, ...]`` → ``[n·B, ...]``)."""
    return map_leaves(x, lambda v: v.repeat((n,) + (1,) * (v.dim() - 1)))


def concat(parts: Sequence[Inputs]) -> Inputs:
    """Batches of the same structure joined along dim 0."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(list(parts), 0)
    if isinstance(first, dict):
        return {k: torch.cat([p[k] for p in parts], 0) for k in first}
    return tuple(torch.cat([p[i] for p in parts], 0) for i in range(len(first)))


def call(fn: Callable, x: Inputs):
    """``fn(x)``, ``fn(*x)`` or ``fn(**x)`` by the structure of ``x``."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, dict):
        return fn(**x)
    return fn(*x)


def to_tensors(x: Inputs, name: str) -> Dict[str, torch.Tensor]:
    """Flat ``{key: tensor}`` for a safetensors file: ``name`` for one tensor, ``name/0``, ``name/1``, ...
    in order for a tuple or dict (the structure is the BNN's :class:`Signature`)."""
    if isinstance(x, torch.Tensor):
        return {name: x}
    return {f"{name}/{i}": v for i, v in enumerate(leaves(x))}


def from_tensors(tensors: Dict[str, torch.Tensor], name: str, signature: Optional["Signature"]) -> Optional[Inputs]:
    """The inputs :func:`to_tensors` stored under ``name`` (None when there are none)."""
    if name in tensors:
        return tensors[name]
    parts = [tensors[f"{name}/{i}"] for i in range(len(tensors)) if f"{name}/{i}" in tensors]
    if not parts:
        return None
    if signature is None or signature.kind == "tensor" or len(parts) != len(signature.shapes):
        raise ValueError(f"stored {name} does not fit the network's inputs")
    return dict(zip(signature.keys, parts)) if signature.kind == "dict" else tuple(parts)


def check_finite(x: Inputs, what: str = "x") -> None:
    """A clear error naming the first example with a NaN or inf in a floating tensor of ``x``.

    One reduction first (cheap on the hot path), the exact check only when it is not finite. SG-MCMC
    passes the same full data every step: a large tensor is checked once per version."""
    for name, v in _named(x, what):
        if not v.is_floating_point() or _finite_inputs.get(v) == v._version:
            continue
        if not torch.isfinite(v.sum()) and not torch.isfinite(v).all():
            bad = (~torch.isfinite(v)).reshape(v.shape[0], -1).any(1).nonzero()[0, 0].item()
            raise ValueError(f"{name} contains NaN or inf (first in example {bad})")
        if v.numel() >= 1 << 20:  # full data sets, not minibatches
            _finite_inputs[v] = v._version


def describe(x: Inputs) -> str:
    """A short description (for error messages)."""
    return ", ".join(f"{n}: {tuple(v.shape[1:])} {str(v.dtype).replace('torch.', '')}" for n, v in _named(x))


_DTYPES = {str(d).replace("torch.", ""): d for d in _INT_KINDS + (torch.float16, torch.bfloat16, torch.float32,
                                                                   torch.float64)}


@dataclass(frozen=True)
class Signature:
    """What one example of the inputs looks like: ``kind`` (``"tensor"``, ``"tuple"`` or ``"dict"``),
    ``keys`` (the dict's keys, else None), per-example ``shapes`` and ``dtypes`` (integer or floating,
    as names: ``"int64"``, ``"float32"``), one per tensor."""
    kind: str
    shapes: Tuple[Tuple[int, ...], ...]
    dtypes: Tuple[str, ...]
    keys: Optional[Tuple[str, ...]] = None

    @classmethod
    def of(cls, x: Inputs) -> "Signature":
        kind = "tensor" if isinstance(x, torch.Tensor) else "dict" if isinstance(x, dict) else "tuple"
        ls = leaves(x)
        return cls(kind, tuple(tuple(v.shape[1:]) for v in ls), tuple(str(v.dtype).replace("torch.", "") for v in ls),
                   tuple(x) if kind == "dict" else None)

    @property
    def integer(self) -> Tuple[bool, ...]:
        return tuple(_DTYPES[d] in _INT_KINDS for d in self.dtypes)

    def check(self, x: Inputs, what: str = "x") -> Inputs:
        """``x`` checked against this signature; integer tensors where this signature has floating ones
        are converted (a network built on floats), floating ones where it has integers are refused."""
        if self.kind == "tensor" and isinstance(x, torch.Tensor):  # the hot path: one tensor
            if tuple(x.shape[1:]) != self.shapes[0]:
                raise ValueError(f"{what} has per-example shape {tuple(x.shape[1:])} but the network was built "
                                 f"for {self.shapes[0]}")
            return self._leaf(x, self.dtypes[0], what)
        other = Signature.of(x)
        if other.kind != self.kind or other.keys != self.keys or len(other.shapes) != len(self.shapes):
            raise ValueError(f"{what} is {other.describe()} but the network was built for {self.describe()}")
        for (name, v), shape in zip(_named(x, what), self.shapes):
            if tuple(v.shape[1:]) != shape:
                raise ValueError(f"{name} has per-example shape {tuple(v.shape[1:])} but the network was built for "
                                 f"{shape}")
        names = [n for n, _ in _named(x, what)]
        if isinstance(x, dict):
            return {k: self._leaf(v, d, n) for (k, v), d, n in zip(x.items(), self.dtypes, names)}
        return tuple(self._leaf(v, d, n) for v, d, n in zip(x, self.dtypes, names))

    @staticmethod
    def _leaf(v, dtype, name):
        want = _DTYPES[dtype]
        if want in _INT_KINDS:
            if v.is_floating_point():
                raise TypeError(f"{name} has dtype {str(v.dtype).replace('torch.', '')} but the network takes "
                                f"integer inputs ({dtype}) there")
            return v
        return v if v.is_floating_point() else v.to(want)  # integers given to a network built on floats

    def example(self, n: int = 1) -> Inputs:
        """Zeros shaped like ``n`` examples (valid tokens for an embedding: index 0)."""
        ts = [torch.zeros((n,) + tuple(s), dtype=_DTYPES[d]) for s, d in zip(self.shapes, self.dtypes)]
        if self.kind == "tensor":
            return ts[0]
        return dict(zip(self.keys, ts)) if self.kind == "dict" else tuple(ts)

    def numel(self) -> int:
        total = 0
        for s in self.shapes:
            k = 1
            for d in s:
                k *= d
            total += k
        return total

    def describe(self) -> str:
        parts = [f"{list(s)} {d}" for s, d in zip(self.shapes, self.dtypes)]
        if self.kind == "tensor":
            return f"one tensor of per-example shape {parts[0]}"
        if self.kind == "dict":
            return "a dict of tensors {" + ", ".join(f"{k!r}: {p}" for k, p in zip(self.keys, parts)) + "}"
        return f"a tuple of {len(parts)} tensors (" + ", ".join(parts) + ")"

    def to_json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"kind": self.kind, "shapes": [list(s) for s in self.shapes], "dtypes": list(self.dtypes)}
        if self.keys is not None:
            out["keys"] = list(self.keys)
        return out

    @classmethod
    def from_json(cls, obj: Any, where: str = "inputs") -> "Signature":
        """The signature a spec describes; anything malformed is a ``ValueError`` naming ``where``."""
        if not isinstance(obj, dict) or obj.get("kind") not in ("tensor", "tuple", "dict"):
            raise ValueError(f"{where}: bad input signature {obj!r}")
        shapes, dtypes, keys = obj.get("shapes"), obj.get("dtypes"), obj.get("keys")
        ok = (isinstance(shapes, list) and isinstance(dtypes, list) and len(shapes) == len(dtypes) >= 1
              and all(isinstance(s, list) and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in s)
                      for s in shapes)
              and all(isinstance(d, str) and d in _DTYPES for d in dtypes))
        if obj["kind"] == "tensor":
            ok = ok and len(shapes) == 1 and keys is None
        elif obj["kind"] == "dict":
            ok = ok and isinstance(keys, list) and len(keys) == len(shapes) and len(set(keys)) == len(keys) \
                and all(isinstance(k, str) for k in keys)
        else:
            ok = ok and keys is None
        if not ok:
            raise ValueError(f"{where}: bad input signature {obj!r}")
        return cls(obj["kind"], tuple(tuple(s) for s in shapes), tuple(dtypes),
                   tuple(keys) if keys is not None else None)
