"""Tensor-state files: safetensors for tensors, JSON for everything else, atomic writes, no pickle.

* :func:`write_state` / :func:`read_state` — tensors plus JSON metadata in one safetensors file; a SHA-256
  of the tensor payload is recorded so a torn or altered file is detected on read.
* :func:`flatten_state` / :func:`unflatten_state` — arbitrary nested state (optimizer, scheduler, RNG,
  history) as a JSON skeleton and a flat dict of tensors, for checkpoints.
* :func:`atomic_write_bytes` — readers see the old file or the whole new one.

This module knows nothing of networks: saving a BNN (:mod:`pyrobnn.io`), a deep weight prior, a
checkpoint or a set of posterior draws all write through it.
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

__all__ = ["write_state", "read_state", "atomic_write_bytes", "flatten_state", "unflatten_state", "FORMAT_VERSION"]

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
