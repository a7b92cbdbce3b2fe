"""pytest plugin for running Pyro's AutoGuide test module against pyrobnn's guides (see ``run.py``).

It provides what that module expects of its own test set-up (float64 default dtype, a clean parameter
store and validation on before each test, the ``init(rng_seed)``, ``stage`` and ``disable_validation``
markers) and, before the tests are generated, adds :class:`pyrobnn.guides.MeanField` and
:class:`pyrobnn.guides.AdditiveNoise` to every ``parametrize`` list that holds ``AutoNormal`` (also
``functools.partial(AutoNormal, ...)``), with test ids that name the class, so that ``run.py`` can pair
each of their outcomes with AutoNormal's.
"""
import functools
import os

import pyro
import pytest
import torch
from pyro.infer.autoguide import AutoNormal

#: the guides added next to AutoNormal
ADDED = ()


def _added():
    global ADDED
    if not ADDED:
        from pyrobnn.guides import AdditiveNoise, MeanField
        ADDED = (MeanField, AdditiveNoise)
    return ADDED


def pytest_configure(config):
    # Pyro's test set-up runs in float64 (only when loaded as the plugin, never on import)
    torch.set_default_dtype(getattr(torch, os.environ.get("PYRO_DTYPE", "float64")))
    for line in ("init(rng_seed): initialize the RNG using the seed provided.",
                 "stage(NAME): mark test to run when testing stage matches NAME.",
                 "disable_validation: disable all validation on this test."):
        config.addinivalue_line("markers", line)


def pytest_runtest_setup(item):
    pyro.clear_param_store()
    pyro.enable_validation(not item.get_closest_marker("disable_validation"))
    marker = item.get_closest_marker("init")
    if marker:
        pyro.set_rng_seed(marker.kwargs["rng_seed"])


def _is_autonormal(v):
    if isinstance(v, functools.partial):
        return v.func is AutoNormal
    return v is AutoNormal


def _swap(v, cls):
    if isinstance(v, functools.partial):
        return functools.partial(cls, *v.args, **v.keywords)
    return cls


def _value_id(v):
    if isinstance(v, functools.partial):
        inner = getattr(v.func, "__name__", "fn")
        kw = ",".join(f"{k}={getattr(x, '__name__', x)}" for k, x in v.keywords.items())
        return f"partial({inner},{kw})"
    if isinstance(v, type) or callable(v) and hasattr(v, "__name__"):
        return v.__name__
    return None


def _extend(values):
    """The parametrize values with an added copy per guide of each entry that holds AutoNormal."""
    out = list(values)
    for v in values:
        is_param = hasattr(v, "values") and hasattr(v, "marks")  # a pytest.param(...)
        raw = v.values if is_param else v
        items = raw if isinstance(raw, tuple) else (raw,)
        if not any(_is_autonormal(x) for x in items):
            continue
        for cls in _added():
            new = tuple(_swap(x, cls) if _is_autonormal(x) else x for x in items)
            if is_param:
                out.append(pytest.param(*new, marks=v.marks))
            else:
                out.append(new if isinstance(raw, tuple) else new[0])
    return out


@pytest.hookimpl(tryfirst=True)
def pytest_generate_tests(metafunc):
    marks = metafunc.definition.own_markers
    for i, mark in enumerate(marks):
        if mark.name != "parametrize" or len(mark.args) < 2 or "ids" in mark.kwargs:
            continue
        values = list(mark.args[1])
        extended = _extend(values)
        if len(extended) != len(values):
            marks[i] = pytest.mark.parametrize(mark.args[0], extended, ids=_value_id, **mark.kwargs).mark
