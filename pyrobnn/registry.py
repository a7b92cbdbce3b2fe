"""One registry per kind of named thing (prior, guide, likelihood, model, kernel).

Strings, dicts from TOML and ready-made objects all go through :meth:`Registry.build`, so a new
prior (or guide, ...) is added in exactly one place: decorate its factory with ``@PRIORS.register``.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, Mapping, Optional

__all__ = ["Registry", "PRIORS", "GUIDES", "LIKELIHOODS", "MODELS", "KERNELS"]


class Registry:
    """Names → factories for one kind of thing (``"prior"``, ``"guide"``, ...).

    Example::

        @PRIORS.register("my-prior")
        class MyPrior(pyro.distributions.Normal): ...

        PRIORS.build({"name": "my-prior", "scale": 0.1})
    """

    def __init__(self, kind: str, lazy_modules: tuple = ()):
        self.kind = kind
        self._items: Dict[str, Callable[..., Any]] = {}
        # Modules that populate this registry on import (pyrobnn never imports them at module level).
        self._lazy_modules = lazy_modules

    def register(self, name: str, factory: Optional[Callable[..., Any]] = None):
        """Register ``factory`` under ``name``; usable as a decorator."""

        def deco(f):
            key = name.lower()
            if key in self._items and self._items[key] is not f:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[key] = f
            if isinstance(f, type):
                f.registry_name = key
            return f

        return deco(factory) if factory is not None else deco

    def _load_lazy(self):
        for mod in self._lazy_modules:
            importlib.import_module(mod)

    def names(self):
        """The registered names, sorted."""
        self._load_lazy()
        return sorted(self._items)

    def get(self, name: str) -> Callable[..., Any]:
        """The factory registered as ``name`` (case and ``_``/``-`` ignored); unknown names list the known ones."""
        if not isinstance(name, str):
            raise TypeError(f"{self.kind} name must be a string, got {type(name).__name__}")
        key = name.lower().replace("_", "-")
        if key not in self._items:
            self._load_lazy()
        if key not in self._items:
            known = ", ".join(sorted(self._items)) or "none"
            raise ValueError(f"unknown {self.kind} {name!r}; known {self.kind}s: {known}")
        return self._items[key]

    def build(self, spec: Any, **defaults) -> Any:
        """Build from a name, a ``{"name": ..., **kwargs}`` mapping, or pass an object through."""
        if isinstance(spec, str):
            return self._call(spec, {}, defaults)
        if isinstance(spec, Mapping):
            if "name" not in spec:
                raise ValueError(f"{self.kind} spec {dict(spec)!r} has no 'name' key")
            kwargs = {k: v for k, v in spec.items() if k != "name"}
            return self._call(spec["name"], kwargs, defaults)
        return spec

    def _call(self, name, kwargs, defaults):
        factory = self.get(name)
        try:
            return factory(**{**defaults, **kwargs})
        except TypeError as e:
            raise ValueError(f"bad arguments for {self.kind} {name!r}: {e}") from None


PRIORS = Registry("prior")
GUIDES = Registry("guide")
LIKELIHOODS = Registry("likelihood")
MODELS = Registry("model", lazy_modules=("pyrobnn.models",))
KERNELS = Registry("kernel", lazy_modules=("pyrobnn.inference",))


def spec_of(obj: Any) -> Dict[str, Any]:
    """The JSON-able spec of a registered object (``{"name": ..., **config}``)."""
    name = getattr(obj, "registry_name", None)
    config = getattr(obj, "config", None)
    if name is None or config is None:
        raise ValueError(
            f"{type(obj).__name__} is not a registered pyrobnn object with a config; "
            "only registered priors/guides/likelihoods can be saved by name"
        )
    return {"name": name, **config()}
