"""A student on disk: one safetensors file with its ``state_dict`` and a JSON description (architectures
from :mod:`pyrobnn.models` rebuild by name)."""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch.nn as nn

from pyrobnn.state_io import read_state, write_state

__all__ = ["save_student", "load_student"]


def save_student(student: nn.Module, path, meta: Optional[Dict[str, Any]] = None) -> None:
    """Write a student's ``state_dict`` and a JSON description to one safetensors file (atomic,
    checksummed). A network built by :func:`pyrobnn.models.build` carries its architecture, so
    :func:`load_student` can rebuild it; ``meta`` (JSON-able) is stored alongside (task, temperature...)."""
    if not isinstance(student, nn.Module):
        raise TypeError(f"save_student takes a torch.nn.Module, got {type(student).__name__}")
    arch = getattr(student, "_pyrobnn_arch", None)
    write_state(path, dict(student.state_dict()), {"kind": "distilled-student", "arch": arch, "meta": dict(meta or {})})


def load_student(path, net: Optional[nn.Module] = None) -> Tuple[nn.Module, Dict[str, Any]]:
    """Read a file written by :func:`save_student` → ``(student in eval mode, meta)``. ``net``: a fresh
    instance of the architecture when it was not built from :mod:`pyrobnn.models`."""
    tensors, header = read_state(path)
    if header.get("kind") != "distilled-student":
        raise ValueError(f"{path} holds a pyrobnn {header.get('kind')!r}, not a distilled student")
    if net is None:
        arch = header.get("arch")
        if not arch:
            raise ValueError(f"{path} was saved from a custom network; pass net=<a fresh instance>")
        from pyrobnn.models import build
        net = build(dict(arch))
    try:
        net.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: tensors do not fit the architecture: {e}") from None
    net.eval()
    return net, header.get("meta", {})
