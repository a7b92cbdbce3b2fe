"""Initial values for a guide's locations that never sample an improper prior.

Improper priors (log-uniform, empirical ARD: ``improper = True``) only draw a stand-in when sampled, so
:func:`improper_safe_init` replaces an init strategy that would sample the prior by :func:`init_to_fan_in`
there (PyTorch's default Linear/Conv initialisation)."""
from __future__ import annotations

import functools
import math
from typing import Callable

import torch
from pyro.infer.autoguide.initialization import (init_to_feasible, init_to_mean, init_to_median, init_to_sample,
                                                 init_to_uniform)

__all__ = ["is_improper", "init_to_fan_in", "init_to_median_or_fan_in", "improper_safe_init"]


def is_improper(fn) -> bool:
    """Whether a site's distribution is an improper prior (``improper = True`` under any ``Independent``):
    its ``sample`` only draws a stand-in (see :mod:`pyrobnn.priors.log_uniform`), so no initialisation
    should be taken from it."""
    while isinstance(fn, torch.distributions.Independent):
        fn = fn.base_dist
    return bool(getattr(fn, "improper", False))


def init_to_fan_in(site=None):
    """θ ~ U(−1/√fan_in, 1/√fan_in) with fan_in = prod(shape[1:]) (1 for shapes of fewer than 2 dims):
    PyTorch's default Linear/Conv initialisation, so a layer's weights are not all equal (zero), which
    would make every unit the same. Never samples the prior."""
    if site is None:
        return init_to_fan_in
    shape = site["fn"].shape()
    fan_in = math.prod(shape[1:]) if len(shape) >= 2 else 1
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(shape) * 2 - 1) * bound


def init_to_median_or_fan_in(site=None):
    """:func:`init_to_fan_in` at an improper prior (or one that cannot be sampled), ``init_to_median``
    elsewhere."""
    if site is None:
        return init_to_median_or_fan_in
    if not is_improper(site["fn"]):
        try:
            return init_to_median(site, fallback=None)
        except (ValueError, NotImplementedError):
            pass
    return init_to_fan_in(site)


_SAMPLING_INITS = (init_to_median, init_to_sample, init_to_mean, init_to_feasible, init_to_uniform)


def _samples_prior(init_loc_fn) -> bool:
    fn = init_loc_fn
    while isinstance(fn, functools.partial):
        fn = fn.func
    return fn in _SAMPLING_INITS


def improper_safe_init(init_loc_fn: Callable) -> Callable:
    """``init_loc_fn`` with one change: at an improper prior, where Pyro's strategies (median, sample, mean,
    feasible, uniform) would sample the prior or start every weight at 0, :func:`init_to_fan_in`."""
    if not _samples_prior(init_loc_fn):
        return init_loc_fn

    def init(site=None):
        if site is None:
            return init
        if is_improper(site["fn"]):
            return init_to_fan_in(site)
        return init_loc_fn(site)

    return init
