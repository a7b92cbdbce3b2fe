"""Saving and loading a BNN: one ``.safetensors`` file whose header metadata holds the JSON spec
(architecture, priors, guide, likelihood, format version), so tensors and spec never drift apart.

* :func:`save` / :func:`load` — a BNN to and from such a file;
* :func:`bnn_from_spec` — the (uninitialised) BNN a saved spec describes, size-checked first.

The file format itself (safetensors + JSON, atomic writes, checksums, nested state) is
:mod:`pyrobnn.state_io`; its functions are re-exported here.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from .bnn import BNN, bayesian
from .inputs import Signature
from .registry import MODELS
from .state_io import (FORMAT_VERSION, atomic_write_bytes, flatten_state, read_state, unflatten_state,  # noqa: F401
                       write_state)

__all__ = ["save", "load", "bnn_from_spec"]


# -- BNN -------------------------------------------------------------------------------------------------
def save(bnn, path) -> None:
    """Save a BNN (guide parameters, deterministic parameters, spec) to ``path`` atomically."""
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
