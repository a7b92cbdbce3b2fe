"""Pyro's own ``AutoGuide`` classes as guides of a :class:`pyrobnn.BNN`, and how they are saved.

``bayesian(net, guide=AutoNormal)`` (or ``AutoDiagonalNormal``, ``AutoLowRankMultivariateNormal``,
``AutoMultivariateNormal``, ``AutoDelta``, or a ``functools.partial`` of one of them) trains with
``pyrobnn.inference.fit``, predicts, samples and goes to ArviZ like pyrobnn's own guides. Saving needs
to rebuild the guide from a file without unpickling anything, so only an allow-list of Pyro's classes
is saved: the file records the class name and the constructor arguments that decide the parameters'
shapes or values (``init_scale``, ``rank``), and the parameters themselves are tensors of the BNN's
``state_dict``. ``init_loc_fn`` is not recorded: it only chooses starting values, which the saved
parameters replace. Any other guide (a hand-written one, another AutoGuide class, a partial with
other arguments) is refused by :func:`pyro_guide_spec` — that is, at ``save``, not at ``load``.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Mapping, Tuple

from pyro.infer.autoguide import (AutoDelta, AutoDiagonalNormal, AutoGuide, AutoLowRankMultivariateNormal,
                                  AutoMultivariateNormal, AutoNormal)

from ..validation import positive_float, positive_int

__all__ = ["PYRO_AUTOGUIDES", "PYRO_PREFIX", "is_pyro_autoguide", "pyro_guide_spec", "build_pyro_guide"]

#: a saved guide spec whose name starts with this names one of :data:`PYRO_AUTOGUIDES`
PYRO_PREFIX = "pyro."

#: class name → (class, the constructor arguments saved with it, read from the instance by ``_read``)
PYRO_AUTOGUIDES: Dict[str, Tuple[type, Tuple[str, ...]]] = {
    "AutoNormal": (AutoNormal, ("init_scale",)),
    "AutoDiagonalNormal": (AutoDiagonalNormal, ("init_scale",)),
    "AutoLowRankMultivariateNormal": (AutoLowRankMultivariateNormal, ("init_scale", "rank")),
    "AutoMultivariateNormal": (AutoMultivariateNormal, ("init_scale",)),
    "AutoDelta": (AutoDelta, ()),
}

#: arguments of a ``functools.partial`` factory that are not saved (they only set starting values)
_UNSAVED = ("init_loc_fn",)


def _factory_class(factory) -> Any:
    while isinstance(factory, functools.partial):
        factory = factory.func
    return factory


def is_pyro_autoguide(guide) -> bool:
    """Whether ``guide`` (an instance, a class or a partial of one) is exactly one of the allow-listed
    Pyro classes (a subclass is not: it may hold parameters the file would not describe)."""
    cls = guide if isinstance(guide, type) else type(guide)
    if isinstance(guide, functools.partial):
        cls = _factory_class(guide)
    return any(cls is c for c, _ in PYRO_AUTOGUIDES.values())


def _read(guide, arg):
    if arg == "init_scale":
        return float(guide._init_scale)
    if arg == "rank":
        return None if guide.rank is None else int(guide.rank)
    raise KeyError(arg)


def pyro_guide_spec(guide: AutoGuide, factory: Callable = None) -> Dict[str, Any]:
    """The JSON-able spec of an allow-listed Pyro AutoGuide instance: ``{"name": "pyro.AutoNormal",
    "init_scale": 0.1}``. ``factory`` (what the guide was built from) is checked too: a partial may
    only bind arguments that are saved or only set starting values. Anything else: ValueError."""
    name = type(guide).__name__
    entry = PYRO_AUTOGUIDES.get(name)
    if entry is None or type(guide) is not entry[0]:
        raise ValueError(f"cannot save a BNN whose guide is {type(guide).__module__}.{type(guide).__qualname__}: "
                         f"save() rebuilds guides by name and knows pyrobnn's registered guides and Pyro's "
                         f"{', '.join(sorted(PYRO_AUTOGUIDES))}. Use one of those, or save the guide's "
                         "parameters yourself (bnn.state_dict() with pyrobnn.io.write_state)")
    cls, args = entry
    if isinstance(factory, functools.partial):
        bound = dict(factory.keywords)
        extra = sorted(set(bound) - set(args) - set(_UNSAVED))
        if factory.args or extra:
            raise ValueError(f"cannot save a BNN whose guide factory is {factory!r}: only the arguments "
                             f"{', '.join(args + _UNSAVED)} of {name} can be saved (got {extra or factory.args})")
    return {"name": PYRO_PREFIX + name, **{a: _read(guide, a) for a in args}}


def build_pyro_guide(spec: Mapping[str, Any], model: Callable, init_loc_fn: Callable) -> AutoGuide:
    """Rebuild a guide from :func:`pyro_guide_spec`'s output (a saved file's spec), checking it first."""
    name = str(spec["name"])[len(PYRO_PREFIX):]
    entry = PYRO_AUTOGUIDES.get(name)
    if entry is None:
        raise ValueError(f"unknown Pyro guide {spec['name']!r}; known: "
                         f"{', '.join(PYRO_PREFIX + n for n in sorted(PYRO_AUTOGUIDES))}")
    cls, args = entry
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    unknown = sorted(set(kwargs) - set(args))
    if unknown:
        raise ValueError(f"guide {spec['name']!r} does not take {', '.join(unknown)}")
    if "init_scale" in kwargs:
        positive_float(f"guide {spec['name']!r}: init_scale", kwargs["init_scale"])
    if kwargs.get("rank") is not None:
        positive_int(f"guide {spec['name']!r}: rank", kwargs["rank"])
    return cls(model, init_loc_fn=init_loc_fn, **kwargs)
