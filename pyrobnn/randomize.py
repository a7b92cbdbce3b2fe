"""``random_module(name, net, prior=...)``: a network whose weights are Pyro sample sites, for any Pyro model.

The building block under :func:`pyrobnn.bayesian`. It copies a plain ``torch.nn.Module``, swaps pyrobnn's
Bayesian layers in for the selected Linear/Conv modules (and for the modules of other parameters named in
``params``), and returns a callable network. Calling it inside a Pyro model issues one sample site per
selected parameter, named ``"{name}.{module path}.{parameter}"`` (``"net.fc1.weight"``), and registers the
parameters that stay deterministic with ``pyro.param`` under the same prefix (so ``pyro.infer.SVI`` trains
them). The likelihood, plates and any hierarchy around the network are the user's::

    net = pyrobnn.random_module("net", torch.nn.Sequential(...), prior="gaussian")

    def model(x, y=None):
        out = net(x)                                   # [B, 2]: mean and raw scale
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(out[:, 0], F.softplus(out[:, 1])), obs=y)

    guide = pyrobnn.guides.MeanField(model, init_loc_fn=net.init_loc_fn)

With pyrobnn's guides the Linear/Conv layers get local reparameterisation (pre-activations drawn from
their Gaussian, no weight draw); with any other guide (Pyro's ``AutoNormal``, ``AutoDiagonalNormal``, ...)
they use the drawn weights. ``net.init_loc_fn`` starts a guide at the network's initial weights (an
``init_loc_fn`` of Pyro's autoguides), falling back to ``init_to_median`` for every other site.

A ``PyroModule`` network whose Linear/Conv weights are ``PyroSample`` s is accepted: those sites keep
their own priors; ``prior=`` applies to the rest.
"""
from __future__ import annotations

import copy
import fnmatch
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn

from . import priors as _priors  # noqa: F401  (registers the built-in priors)
from .guides.base import init_to_median_or_fan_in
from .layers import BayesianConv, BayesianLinear, BayesianModule, BayesianParams
from .registry import PRIORS

__all__ = ["RandomModule", "random_module", "build_prior"]

_AFFINE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def build_prior(spec):
    """A prior from a registered name, a ``{"name": ...}`` mapping or a distribution."""
    if isinstance(spec, (str, Mapping)):
        return PRIORS.build(spec)
    if (type(spec) in (torch.distributions.Normal, pyro.distributions.Normal) and spec.batch_shape == torch.Size()
            and spec.event_shape == torch.Size()):
        # a scalar Normal given as a plain distribution is pyrobnn's Gaussian: the same prior, which also
        # evaluates local-reparameterisation placeholders exactly (pyrobnn.guides.base) and can be saved
        from .priors.gaussian import Gaussian
        return Gaussian(scale=float(spec.scale), loc=float(spec.loc))
    if isinstance(spec, torch.distributions.Distribution) or hasattr(spec, "sample_site"):
        return spec
    raise TypeError(f"a prior must be a registered name, a {{'name': ...}} mapping or a distribution, got {spec!r}")


class _ShapedPrior:
    """A distribution that already has a site's full shape (a ``PyroSample`` prior such as
    ``Normal(0, 1).expand([out, in]).to_event(2)``): issued as it is, its batch dims made event dims."""

    def __init__(self, fn):
        self.fn = fn

    def sample_site(self, name, shape, infer=None):
        fn = self.fn
        if fn.batch_shape:
            fn = fn.to_event(len(fn.batch_shape))
        return pyro.sample(name, fn, infer=infer or {})

    def __repr__(self):
        return f"{type(self).__name__}({self.fn!r})"


def _constant(t) -> Optional[float]:
    t = torch.as_tensor(t)
    flat = t.reshape(-1)
    if flat.numel() == 0 or not bool((flat == flat[0]).all()):
        return None
    return float(flat[0])


def _from_pyro_sample(prior, shape: torch.Size, site: str):
    """The pyrobnn prior for a ``PyroSample`` prior at a weight site of ``shape``."""
    if not isinstance(prior, torch.distributions.Distribution):
        raise ValueError(f"{site} is a PyroSample whose prior is a function of the module; bayesian() needs a "
                         f"distribution there, e.g. PyroSample(dist.Normal(0., 1.).expand({list(shape)}).to_event("
                         f"{len(shape)})), or pass the plain torch network with prior=...")
    base = prior
    while isinstance(base, torch.distributions.Independent):
        base = base.base_dist
    full = prior.batch_shape + prior.event_shape
    if full not in (torch.Size(), shape):
        raise ValueError(f"{site} has shape {tuple(shape)} but its PyroSample prior has shape {tuple(full)}")
    if type(base) in (torch.distributions.Normal, dist.Normal):
        loc, scale = _constant(base.loc), _constant(base.scale)
        if loc is not None and scale is not None:  # N(m, s²) iid: pyrobnn's Gaussian (local reparameterisation)
            return build_prior(dist.Normal(loc, scale))
    return prior if full == torch.Size() else _ShapedPrior(prior)


def _weight_shapes(module: nn.Module) -> Dict[str, torch.Size]:
    if isinstance(module, nn.Linear):
        w = (module.out_features, module.in_features)
    else:
        w = (module.out_channels, module.in_channels // module.groups) + tuple(module.kernel_size)
    return {"weight": torch.Size(w), "bias": torch.Size(w[:1])}


def _plain_affine(module: nn.Module, mname: str):
    """A ``PyroModule`` Linear/Conv as its plain torch class, with torch's default initial weights in place
    of its ``PyroSample`` s; returns (module, {parameter: PyroSample prior})."""
    samples = dict(module.__dict__.get("_pyro_samples", {}))
    if module.__dict__.get("_pyro_params"):
        raise ValueError(f"module {mname!r} has PyroParam attributes {sorted(module._pyro_params)}; bayesian() needs "
                         "plain nn.Parameters there (or PyroSample priors)")
    torch_cls = next(c for c in type(module).__mro__ if c in _AFFINE)
    plain = torch_cls.__new__(torch_cls)
    plain.__dict__.update(module.__dict__)
    for k in ("_pyro_name", "_pyro_context", "_pyro_params", "_pyro_samples"):
        plain.__dict__.pop(k, None)
    plain._parameters = dict(module._parameters)
    plain.__class__ = torch_cls
    shapes = _weight_shapes(plain)
    for p in samples:
        if p not in shapes:
            raise ValueError(f"{mname}.{p} is a PyroSample but not a weight or bias of the {torch_cls.__name__}")
    has_bias = "bias" in samples or plain._parameters.get("bias") is not None
    plain._parameters["weight"] = nn.Parameter(torch.empty(shapes["weight"]))
    plain._parameters["bias"] = nn.Parameter(torch.empty(shapes["bias"])) if has_bias else None
    old_w, old_b = module._parameters.get("weight"), module._parameters.get("bias")
    plain.reset_parameters()  # torch's initialisation: the guide's starting point for the PyroSample sites
    with torch.no_grad():
        if old_w is not None:
            plain.weight.copy_(old_w)
        if old_b is not None:
            plain.bias.copy_(old_b)
    return plain, samples


class RandomModule(nn.Module):
    """A network whose selected parameters are Pyro sample sites (see the module doc); build it with
    :func:`random_module`.

    Attributes: ``net`` (the converted network), ``name`` (the site prefix), ``site_priors``
    (site name → prior), ``init_values`` (site name → the original network's value).
    """

    def __init__(self, net: nn.Module, name: str, *, prior: Any = "gaussian",
                 layers: Union[str, Sequence[str]] = "*", params: Sequence[str] = (),
                 local_reparameterization: bool = True, param_prefix: Optional[str] = None):
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"a Bayesian network needs a torch.nn.Module, got {type(net).__name__}")
        if not isinstance(name, str):
            raise TypeError(f"the network's name must be a string, got {type(name).__name__}")
        if isinstance(layers, str):
            layers = [layers]
        if not all(isinstance(p, str) for p in layers) or isinstance(params, str) or \
                not all(isinstance(p, str) for p in params):
            raise TypeError("layers and params must be fnmatch patterns (a string or a list of strings)")
        self.name = name
        self.param_prefix = name if param_prefix is None else param_prefix
        self.local_reparameterization = bool(local_reparameterization)
        self.layers = list(layers)
        self.params = list(params)
        self.net = copy.deepcopy(net)
        self.init_values: Dict[str, torch.Tensor] = {}
        self.site_priors: Dict[str, Any] = {}
        self._convert(prior)
        if not self.site_priors:
            raise ValueError(f"no module of the network matched layers={self.layers!r} (Linear/Conv modules) or "
                             f"params={self.params!r}; nothing would be Bayesian")
        self._param_names = None

    # -- construction -------------------------------------------------------------------------------
    def _site(self, path: str) -> str:
        return f"{self.name}.{path}" if self.name else path

    def _prior_for(self, module_name: str, site: str, prior_arg):
        if isinstance(prior_arg, Mapping) and "name" not in prior_arg:
            for pattern, spec in prior_arg.items():
                if fnmatch.fnmatchcase(site, pattern) or fnmatch.fnmatchcase(module_name, pattern):
                    return build_prior(spec)
            raise ValueError(f"no prior pattern in {list(prior_arg)} matches site {site!r}; add a '*' entry")
        return build_prior(prior_arg)

    def _convert(self, prior_arg):
        if not isinstance(prior_arg, Mapping) or "name" in prior_arg:
            shared = build_prior(prior_arg)
            prior_of = lambda mname, path: shared  # noqa: E731  one object for every site
        else:
            def prior_of(mname, path):  # patterns match the path inside the network ("fc1.weight")
                return self._prior_for(mname, path, prior_arg)

        replacements = []
        for mname, module in self.net.named_modules():
            if isinstance(module, BayesianModule):
                raise ValueError(f"module {mname!r} is already Bayesian; pass the original network")
            own_samples = module.__dict__.get("_pyro_samples")
            if isinstance(module, _AFFINE) and (own_samples or any(fnmatch.fnmatchcase(mname, p) for p in self.layers)):
                replacements.append((mname, module))
            elif own_samples:
                names = ", ".join(f"{mname}.{p}" if mname else p for p in own_samples)
                kind = next(c for c in type(module).__mro__ if c.__module__.startswith("torch.")).__name__
                raise ValueError(f"{names}: PyroSample on a {kind}; bayesian() turns PyroSample "
                                 "weights of Linear/Conv layers into sites. Make it an nn.Parameter and select it "
                                 "with params=[...] and prior=..., or write the model by hand")
        for mname, module in replacements:
            pyro_priors = {}
            if "_pyro_samples" in module.__dict__ or "_pyro_params" in module.__dict__:
                module, pyro_priors = _plain_affine(module, mname)
            shapes = {p: v.shape for p, v in module.named_parameters(recurse=False) if v is not None}
            priors = {p: (_from_pyro_sample(pyro_priors[p], shapes[p], f"{mname}.{p}") if p in pyro_priors
                          else prior_of(mname, f"{mname}.{p}")) for p in shapes}
            for p, v in module.named_parameters(recurse=False):
                self.init_values[self._site(f"{mname}.{p}")] = v.detach().clone()
            cls = BayesianLinear if isinstance(module, nn.Linear) else BayesianConv
            self._install(mname, cls(module, self._site(mname), priors, self.local_reparameterization), priors)
        # other parameters asked for by name ("bn1.weight", "*.bias", ...)
        if self.params:
            groups: Dict[str, list] = {}
            for full, v in list(self.net.named_parameters()):
                if any(fnmatch.fnmatchcase(full, pat) for pat in self.params):
                    mname, _, pname = full.rpartition(".")
                    groups.setdefault(mname, []).append(pname)
            for mname, pnames in groups.items():
                module = self.net.get_submodule(mname) if mname else self.net
                priors = {p: prior_of(mname, f"{mname}.{p}") for p in pnames}
                for p in pnames:
                    self.init_values[self._site(f"{mname}.{p}")] = getattr(module, p).detach().clone()
                self._install(mname, BayesianParams(module, self._site(mname), priors, pnames), priors)

    def _install(self, mname, layer: BayesianModule, priors):
        for p, prior in priors.items():
            site = layer.site_name(p)
            check = getattr(prior, "site_distribution", None)
            if check is not None:  # a prior that cannot apply to this site says so now, not at the first forward
                check(site, layer.site_shapes[p])
            self.site_priors[site] = prior
        if not mname:
            raise ValueError("the network itself is a single layer; wrap it in nn.Sequential")
        parent_name, _, child = mname.rpartition(".")
        parent = self.net.get_submodule(parent_name) if parent_name else self.net
        setattr(parent, child, layer)

    def init_loc_fn(self, site) -> torch.Tensor:
        """An autoguide ``init_loc_fn``: the original network's value at this module's sites,
        ``init_to_median`` elsewhere (a fan-in draw at an improper prior, which cannot be sampled)."""
        value = self.init_values.get(site["name"])
        if value is not None and value.shape == site["fn"].shape():
            return value.clone()
        return init_to_median_or_fan_in(site)

    # -- running ------------------------------------------------------------------------------------
    def deterministic_params(self):
        """(param-store name, parameter) of the trainable parameters that are not sample sites."""
        prefix = f"{self.param_prefix}." if self.param_prefix else ""
        return [(f"{prefix}{n}", p) for n, p in self.net.named_parameters() if p.requires_grad]

    def register_params(self):
        """``pyro.param`` for every deterministic parameter (so SVI's optimiser sees it). The module's own
        tensor is the parameter: a stale value under the same name in the param store is replaced."""
        # the list is fixed once the network is converted; walking the module tree on every call is
        # measurable on the SG-MCMC / SVI hot path
        if self._param_names is None:
            self._param_names = self.deterministic_params()
        for name, p in self._param_names:
            if pyro.param(name, p) is not p:
                store = pyro.get_param_store()
                del store[name]
                pyro.param(name, p)

    def _apply(self, fn, *args, **kwargs):
        self._param_names = None  # .to() may replace the parameters
        return super()._apply(fn, *args, **kwargs)

    def forward(self, *args, **kwargs):
        self.register_params()
        return self.net(*args, **kwargs)


def random_module(name: str, net: nn.Module, prior: Any = "gaussian", *, layers: Union[str, Sequence[str]] = "*",
                  params: Sequence[str] = (), local_reparameterization: bool = True) -> RandomModule:
    """A copy of ``net`` whose selected parameters are Pyro sample sites ``"{name}.{module path}.weight"``.

    :param name: prefix of the sample sites and of the deterministic parameters in Pyro's param store
        (a non-empty string, unique within the model).
    :param net: any ``torch.nn.Module``; copied, never modified.
    :param prior: as for :func:`pyrobnn.bayesian`: a prior object, a registered name, a
        ``{"name": ..., **kwargs}`` mapping, or a mapping from fnmatch patterns (matched against the path
        inside the network, ``"fc1.weight"``, and the module path, ``"fc1"``) to any of those.
    :param layers: fnmatch pattern(s) of the Linear/Conv modules to make Bayesian (default all).
    :param params: fnmatch patterns of other parameters to make Bayesian (``"bn*.weight"``).
    :param local_reparameterization: draw pre-activations instead of weights where a pyrobnn guide allows.
    :returns: a :class:`RandomModule`; call it like the network (``net(x)``, ``net(a, b)``, ``net(**kw)``).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"random_module needs a non-empty name for its sites, got {name!r}")
    return RandomModule(net, name, prior=prior, layers=layers, params=params,
                        local_reparameterization=local_reparameterization)
