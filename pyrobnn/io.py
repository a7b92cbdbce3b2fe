"""Safe persistence: safetensors for tensors, JSON for everything else, atomic writes, no pickle.

* :func:`save` / :func:`load` — a BNN as one ``.safetensors`` file whose header metadata holds the JSON
  spec (architecture, priors, guide, likelihood, format version), so tensors and spec never drift apart.
* :func:`write_state` / :func:`read_state` — arbitrary nested state (optimizer, scheduler, RNG, history)
  for checkpoints: tensors go into safetensors, the structure into JSON; a SHA-256 of the tensor payload
  is recorded so a torn or altered file is detected on read.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

__all__ = ["save", "load", "bnn_from_spec", "write_state", "read_state", "atomic_write_bytes", "flatten_state",
           "unflatten_state", "FORMAT_VERSION"]

FORMAT_VERSION = 1
_KEY = "pyrobnn"


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; the file gets the mode open() would give it
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    """The process umask (read by setting and restoring it: there is no read-only call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _digest(tensors: Dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().contiguous().cpu()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # reshape: 0-dim (Adam step)
    return h.hexdigest()


def _prepare(tensors):
    out = {}
    for k, v in tensors.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"state entry {k!r} is not a tensor")
        out[k] = v.detach().contiguous().cpu().clone()
    return out


def write_state(path, tensors: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> None:
    """Atomically write tensors + JSON metadata (with a payload checksum) to one safetensors file."""
    tensors = _prepare(tensors)
    header = {_KEY: json.dumps({"version": FORMAT_VERSION, "sha256": _digest(tensors), **meta})}
    atomic_write_bytes(path, st_save(tensors, metadata=header))


def read_state(path) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Read a file written by :func:`write_state`; a torn, altered or foreign file raises ``ValueError``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    data = path.read_bytes()
    try:
        tensors = st_load(data)
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path} is not a readable safetensors file (torn or corrupt?): {e}") from None
    if _KEY not in header:
        raise ValueError(f"{path} is a safetensors file but not one written by pyrobnn (no '{_KEY}' metadata)")
    try:
        meta = json.loads(header[_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: pyrobnn metadata is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("version"), int):
        raise ValueError(f"{path}: pyrobnn metadata has no format version")
    if meta["version"] > FORMAT_VERSION:
        raise ValueError(f"{path} was written by a newer pyrobnn (format {meta['version']} > {FORMAT_VERSION})")
    if meta.get("sha256") != _digest(tensors):
        raise ValueError(f"{path}: checksum mismatch — the file is torn or was altered")
    return tensors, meta


# -- nested state <-> (tensors, JSON) --------------------------------------------------------------------
def flatten_state(obj: Any, tensors: Optional[dict] = None, prefix: str = "s") -> Tuple[Any, dict]:
    """Split nested dict/list/tuple state into a JSON-able skeleton and a flat dict of tensors."""
    tensors = {} if tensors is None else tensors
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}"
        tensors[key] = obj
        return {"__tensor__": key}, tensors
    if isinstance(obj, dict):
        items = []
        for i, (k, v) in enumerate(obj.items()):
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise TypeError(f"state keys must be str or int, got {k!r}")
            sk, _ = flatten_state(v, tensors, f"{prefix}.{i}")
            items.append([k, sk])
        return {"__dict__": items}, tensors
    if isinstance(obj, (list, tuple)):
        seq = [flatten_state(v, tensors, f"{prefix}.{i}")[0] for i, v in enumerate(obj)]
        return ({"__tuple__": seq} if isinstance(obj, tuple) else seq), tensors
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj, tensors
    raise TypeError(f"cannot store object of type {type(obj).__name__} in a checkpoint")


def unflatten_state(skel: Any, tensors: Dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`: rebuild the nested state from its skeleton and tensors."""
    if isinstance(skel, dict):
        if set(skel) == {"__tensor__"}:
            key = skel["__tensor__"]
            if key not in tensors:
                raise ValueError(f"checkpoint refers to a missing tensor {key!r}")
            return tensors[key]
        if set(skel) == {"__dict__"}:
            return {k: unflatten_state(v, tensors) for k, v in skel["__dict__"]}
        if set(skel) == {"__tuple__"}:
            return tuple(unflatten_state(v, tensors) for v in skel["__tuple__"])
        raise ValueError(f"malformed checkpoint structure: {list(skel)[:3]}")
    if isinstance(skel, list):
        return [unflatten_state(v, tensors) for v in skel]
    return skel


# -- BNN -------------------------------------------------------------------------------------------------
def save(bnn, path) -> None:
    """Save a BNN (guide parameters, deterministic parameters, spec) to ``path`` atomically."""
    from .bnn import BNN
    if not isinstance(bnn, BNN):
        raise TypeError(f"save() takes a pyrobnn BNN, got {type(bnn).__name__}")
    if bnn.autoguide.prototype_trace is None or bnn.input_signature is None:
        raise ValueError("this BNN has not been initialised; train it or call bnn.initialize(x) before saving")
    write_state(path, bnn.state_dict(), {"kind": "bnn", "spec": bnn.spec()})


MAX_INPUT_NUMEL = 1 << 26   # numbers in one example's input (64M): far above any network here, far below RAM


def check_spec_size(spec: Dict[str, Any], tensors: Dict[str, torch.Tensor], path, build_arch: bool = True) -> None:
    """Refuse a spec that would make a loader allocate more than its file holds — a 1 kB hostile file
    naming ``hidden=[2**30]`` would otherwise ask for gigabytes before anything is checked. The
    architecture is built on the meta device (no memory) and its parameter count compared with the
    numbers stored; the example input the loader builds is bounded by :data:`MAX_INPUT_NUMEL`."""
    from .registry import MODELS
    shape = spec.get("input_shape")
    if isinstance(shape, list) and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        numel = 1
        for s in shape:
            numel *= s
        if numel > MAX_INPUT_NUMEL:
            raise ValueError(f"{path}: input_shape {shape} has {numel} numbers per example (limit {MAX_INPUT_NUMEL})")
    if spec.get("inputs") is not None:
        numel = _signature(spec, path).numel()
        if numel > MAX_INPUT_NUMEL:
            raise ValueError(f"{path}: the inputs have {numel} numbers per example (limit {MAX_INPUT_NUMEL})")
    if not build_arch or not spec.get("arch"):
        return
    try:
        with torch.device("meta"):
            probe = MODELS.build(spec["arch"])
        need = sum(p.numel() for p in probe.parameters())
    except RuntimeError as e:  # e.g. "storage size calculation overflowed": sizes beyond any memory
        raise ValueError(f"{path}: the spec's architecture cannot be built: {e}") from None
    except NotImplementedError:  # an architecture that cannot be built on the meta device: the real build decides
        return
    have = sum(t.numel() for t in tensors.values())
    if need > have:
        raise ValueError(f"{path}: the spec's architecture has {need} parameters but the file stores only {have} "
                         "numbers; the spec does not describe these tensors")


def bnn_from_spec(spec, tensors: Dict[str, torch.Tensor], path, net: Optional[torch.nn.Module] = None):
    """Rebuild the (uninitialised) BNN a saved spec describes; ``bnn.input_shape`` is set from the spec.

    Shared by every loader of saved BNN state (:func:`load`, ``SamplePosterior.load``): the spec is
    size-checked against the tensors the file holds before anything is allocated."""
    from .bnn import bayesian
    from .registry import MODELS
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: spec is missing")
    try:
        check_spec_size(spec, tensors, path, build_arch=net is None)
        if net is None:
            if not spec.get("arch"):
                raise ValueError(f"{path} was saved from a custom network; pass net=<a fresh instance> to load()")
            net = MODELS.build(spec["arch"])
        bnn = bayesian(net, prior=spec["prior"], guide=spec["guide"], likelihood=spec["likelihood"],
                       dataset_size=spec["dataset_size"], layers=spec["layers"], params=spec.get("params", ()),
                       local_reparameterization=spec["local_reparameterization"])
        shape = spec["input_shape"]
    except KeyError as e:
        raise ValueError(f"{path}: spec lacks {e}") from None
    if spec.get("inputs") is not None:  # the input signature (tensor, tuple or dict; dtypes)
        bnn.input_signature = _signature(spec, path)
        return bnn
    if not (isinstance(shape, list) and all(isinstance(s, int) and s > 0 for s in shape)):
        raise ValueError(f"{path}: bad input_shape {shape!r}")
    bnn.input_shape = torch.Size(shape)
    return bnn


def _signature(spec, path):
    from .inputs import Signature
    return Signature.from_json(spec["inputs"], f"{path}: inputs")


def load(path, net: Optional[torch.nn.Module] = None):
    """Load a BNN saved by :func:`save`. ``net`` is required only when the architecture was not built
    from :mod:`pyrobnn.models` (a custom ``nn.Module``): pass a fresh instance of the same class."""
    tensors, meta = read_state(path)
    if meta.get("kind") != "bnn":
        raise ValueError(f"{path} holds a pyrobnn {meta.get('kind')!r}, not a BNN")
    bnn = bnn_from_spec(meta.get("spec"), tensors, path, net)
    bnn.initialize(bnn.input_signature.example(1))
    try:
        bnn.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: tensors do not fit the architecture in its spec: {e}") from None
    return bnn
