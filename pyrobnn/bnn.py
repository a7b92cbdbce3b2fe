"""``bayesian(net, ...)``: any ``torch.nn.Module`` → a Bayesian network with Pyro ``model``/``guide``."""
from __future__ import annotations

import copy
import fnmatch
import itertools
import math
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Union

import pyro
import pyro.poutine as poutine
import torch
import torch.nn as nn
from pyro.infer.autoguide import AutoGuide
from pyro.infer.autoguide.initialization import init_to_median
from pyro.poutine.messenger import Messenger
from torch.utils.weak import WeakIdKeyDictionary

from . import priors as _priors  # noqa: F401  (registers the built-in priors)
from .layers import BayesianConv, BayesianLinear, BayesianModule, BayesianParams
from .likelihoods import Likelihood
from .registry import GUIDES, LIKELIHOODS, PRIORS, spec_of

__all__ = ["BNN", "bayesian"]

_uid = itertools.count()
_finite_inputs = WeakIdKeyDictionary()  # large inputs already checked finite: tensor -> its _version
_AFFINE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class _KLWeight(Messenger):
    """Multiplies the scale of every site in its context by ``weight`` (0 allowed, unlike poutine.scale)."""

    def __init__(self, weight: float):
        super().__init__()
        self.weight = weight

    def _process_message(self, msg):
        msg["scale"] = msg["scale"] * self.weight


def _build_prior(spec):
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


def _prior_spec(prior):
    try:
        return spec_of(prior)
    except ValueError:
        return None


def _release(names):
    store = pyro.get_param_store()
    for n in names:
        if n in store:
            del store[n]


class BNN(nn.Module):
    """A Bayesian network: ``model(x, y=None)`` and ``guide(x, y=None)`` are plain Pyro callables.

    Attributes a user touches:
      * ``net`` – the converted network (Bayesian layers in place of the selected modules);
      * ``autoguide`` – the ``AutoGuide`` instance; ``likelihood`` – the observation model;
      * ``dataset_size`` – N, so that a minibatch of M scales the likelihood by N/M;
      * ``kl_weight`` – multiplies every weight site (KL warm-up); ``subsample_size`` – when set,
        ``model`` draws its own minibatch of that size from full-data ``x, y`` through
        ``pyro.plate(..., subsample_size=M)`` (what SG-MCMC kernels use).
    """

    def __init__(self, net: nn.Module, *, prior: Any = "gaussian", guide: Any = "mean-field",
                 likelihood: Any = "categorical", dataset_size: Optional[int] = None,
                 layers: Union[str, Sequence[str]] = "*", params: Sequence[str] = (),
                 local_reparameterization: bool = True, subsample_size: Optional[int] = None):
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"bayesian() needs a torch.nn.Module, got {type(net).__name__}")
        self._check_dataset_size(dataset_size)
        self.dataset_size = dataset_size
        self.subsample_size = subsample_size
        self.kl_weight = 1.0
        self.local_reparameterization = bool(local_reparameterization)
        self._uname = f"pyrobnn.BNN{next(_uid)}"
        self._arch = getattr(net, "_pyrobnn_arch", None)
        self._layers = [layers] if isinstance(layers, str) else list(layers)
        self._extra_params = list(params)
        self._prior_arg = prior
        self.net = copy.deepcopy(net)
        self._init_values: Dict[str, torch.Tensor] = {}
        self.site_priors: Dict[str, Any] = {}
        self._convert(prior)
        if not self.site_priors:
            raise ValueError(f"no module of the network matched layers={self._layers!r}; nothing would be Bayesian")
        self.likelihood: Likelihood = LIKELIHOODS.build(likelihood)
        if not isinstance(self.likelihood, Likelihood):
            raise TypeError(f"likelihood must be a pyrobnn Likelihood, got {type(self.likelihood).__name__}")
        self._guide_arg = guide
        self.autoguide = self._build_guide(guide)
        self.input_shape: Optional[torch.Size] = None
        self._arange_cache: Dict[int, torch.Tensor] = {}
        self._param_names = None
        self._targets_cache = None
        names = [f"{self._uname}.{n}" for n, _ in self._deterministic_params()]
        self._finalizer = weakref.finalize(self, _release, names)

    # -- construction -------------------------------------------------------------------------------
    @staticmethod
    def _check_dataset_size(n):
        if n is None:
            return
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"dataset_size must be a positive integer, got {n!r}")

    def _selected(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pat) for pat in self._layers)

    def _prior_for(self, module_name: str, site: str, prior_arg):
        if isinstance(prior_arg, Mapping) and "name" not in prior_arg:
            for pattern, spec in prior_arg.items():
                if fnmatch.fnmatchcase(site, pattern) or fnmatch.fnmatchcase(module_name, pattern):
                    return _build_prior(spec)
            raise ValueError(f"no prior pattern in {list(prior_arg)} matches site {site!r}; add a '*' entry")
        return _build_prior(prior_arg)

    def _convert(self, prior_arg):
        cache: Dict[int, Any] = {}

        def prior_of(mname, site):
            p = self._prior_for(mname, site, prior_arg)
            return cache.setdefault(id(p), p) if not isinstance(prior_arg, Mapping) else p

        if not isinstance(prior_arg, Mapping) or "name" in prior_arg:
            shared = _build_prior(prior_arg)
            prior_of = lambda mname, site: shared  # noqa: E731  one object for every site

        replacements = []
        for mname, module in self.net.named_modules():
            if isinstance(module, BayesianModule):
                raise ValueError(f"module {mname!r} is already Bayesian; pass the original network")
            if isinstance(module, _AFFINE) and self._selected(mname):
                replacements.append((mname, module))
        for mname, module in replacements:
            prefix = mname
            priors = {p: prior_of(mname, f"{prefix}.{p}") for p, v in module.named_parameters(recurse=False)
                      if v is not None}
            for p, v in module.named_parameters(recurse=False):
                self._init_values[f"{prefix}.{p}"] = v.detach().clone()
            cls = BayesianLinear if isinstance(module, nn.Linear) else BayesianConv
            layer = cls(module, prefix, priors, self.local_reparameterization)
            self._set_module(mname, layer)
            for p in priors:
                self.site_priors[f"{prefix}.{p}"] = priors[p]
        # Other parameters the user asked for by name ("bn1.weight", "*.bias", ...).
        if self._extra_params:
            groups: Dict[str, list] = {}
            for full, v in list(self.net.named_parameters()):
                if any(fnmatch.fnmatchcase(full, pat) for pat in self._extra_params):
                    mname, _, pname = full.rpartition(".")
                    groups.setdefault(mname, []).append(pname)
            for mname, pnames in groups.items():
                module = self.net.get_submodule(mname) if mname else self.net
                priors = {p: prior_of(mname, f"{mname}.{p}") for p in pnames}
                for p in pnames:
                    self._init_values[f"{mname}.{p}"] = getattr(module, p).detach().clone()
                self._set_module(mname, BayesianParams(module, mname, priors, pnames))
                for p in pnames:
                    self.site_priors[f"{mname}.{p}"] = priors[p]

    def _set_module(self, mname, new):
        if not mname:
            raise ValueError("the network itself is a single layer; wrap it in nn.Sequential")
        parent_name, _, child = mname.rpartition(".")
        parent = self.net.get_submodule(parent_name) if parent_name else self.net
        setattr(parent, child, new)

    def _init_loc_fn(self, site):
        value = self._init_values.get(site["name"])
        if value is not None and value.shape == site["fn"].shape():
            return value.clone()
        return init_to_median(site)

    def _build_guide(self, guide):
        if isinstance(guide, AutoGuide):
            raise TypeError("pass the guide as a name, a {'name': ...} mapping or a class/factory taking the model "
                            "(the BNN's model does not exist before bayesian() returns)")
        if isinstance(guide, (str, Mapping)):
            return GUIDES.build(guide, model=self._model_for_guide, init_loc_fn=self._init_loc_fn)
        if callable(guide):
            try:
                return guide(self._model_for_guide, init_loc_fn=self._init_loc_fn)
            except TypeError:
                return guide(self._model_for_guide)
        raise TypeError(f"guide must be a name, a mapping or a factory, got {guide!r}")

    # -- boundary checks ----------------------------------------------------------------------------
    def _check_x(self, x):
        if not isinstance(x, torch.Tensor):
            try:
                x = torch.as_tensor(x, dtype=torch.get_default_dtype())
            except Exception:
                raise TypeError(f"x must be a tensor or array-like, got {type(x).__name__}") from None
        if x.is_complex():
            raise TypeError(f"x must be real-valued, got dtype {x.dtype}")
        if not x.is_floating_point() or x.dtype != torch.get_default_dtype():
            x = x.to(self._input_dtype())  # float64/float16 inputs would fail inside the layers' matmul
        if x.dim() < 1 or x.shape[0] == 0:
            raise ValueError(f"x must have a leading batch dimension with at least one example, got shape {tuple(x.shape)}")
        if self.input_shape is not None and x.shape[1:] != self.input_shape:
            raise ValueError(f"x has per-example shape {tuple(x.shape[1:])} but the network was built for "
                             f"{tuple(self.input_shape)}")
        # one reduction first (cheap on the hot path); the exact check only when it is not finite.
        # SG-MCMC passes the same full data every step: a large x is checked once per version.
        if _finite_inputs.get(x) != x._version:
            if not torch.isfinite(x.sum()) and not torch.isfinite(x).all():
                bad = (~torch.isfinite(x)).reshape(x.shape[0], -1).any(1).nonzero()[0, 0].item()
                raise ValueError(f"x contains NaN or inf (first in example {bad})")
            if x.numel() >= 1 << 20:  # full data sets, not minibatches
                _finite_inputs[x] = x._version
        return x

    def _input_dtype(self):
        for p in itertools.chain(self.parameters(), self.buffers()):
            if p.is_floating_point():
                return p.dtype
        return torch.get_default_dtype()

    def _run_net(self, x):
        if self.input_shape is None:
            try:
                out = self.net(x)
            except (RuntimeError, IndexError) as e:
                raise ValueError(f"the network cannot run on inputs of per-example shape {tuple(x.shape[1:])}: {e}") from None
            self.input_shape = x.shape[1:]
            return out
        return self.net(x)

    def _register_params(self):
        # the (name, parameter) list is fixed once the network is converted; walking the module tree
        # on every model call is measurable on the SG-MCMC / SVI hot path
        if self._param_names is None:
            self._param_names = [(f"{self._uname}.net.{n}", p, True) for n, p in self.net.named_parameters()]
            self._param_names += [(f"{self._uname}.likelihood.{n}", p, False)
                                  for n, p in self.likelihood.named_parameters()]
        for name, p, only_trainable in self._param_names:
            if p.requires_grad or not only_trainable:   # as _deterministic_params()
                pyro.param(name, p)

    def _apply(self, fn, *args, **kwargs):
        self._param_names = None  # parameters may be replaced (e.g. .to() with overwrite on conversion)
        self._targets_cache = None
        return super()._apply(fn, *args, **kwargs)

    def _deterministic_params(self):
        for n, p in self.net.named_parameters():
            if p.requires_grad:
                yield f"net.{n}", p
        for n, p in self.likelihood.named_parameters():
            yield f"likelihood.{n}", p

    def _arange(self, m):
        a = self._arange_cache.get(m)
        if a is None:
            a = self._arange_cache[m] = torch.arange(m)
        return a

    @contextmanager
    def _kl_scale(self):
        if self.kl_weight == 1.0:
            yield
        else:
            with _KLWeight(float(self.kl_weight)):
                yield

    # -- the Pyro program ---------------------------------------------------------------------------
    def model(self, x, y=None, subsample_size: Optional[int] = None):
        """p(w) p(y | f(x; w)). ``x`` is a minibatch of a dataset of ``dataset_size`` examples, or the
        full data when ``subsample_size`` (argument or attribute) is set."""
        x = self._check_x(x)
        m = subsample_size if subsample_size is not None else self.subsample_size
        if m is not None:
            if isinstance(m, bool) or not isinstance(m, int) or not (1 <= m <= x.shape[0]):
                raise ValueError(f"subsample_size must be an integer in [1, {x.shape[0]}], got {m!r}")
            n = self.dataset_size or x.shape[0]
            if n != x.shape[0]:
                raise ValueError(f"with subsample_size the model takes the full data: got {x.shape[0]} examples "
                                 f"but dataset_size is {n}")
            plate = pyro.plate("data", n, subsample_size=m)
            idx = plate._indices
            x = x[idx]
        else:
            n = self.dataset_size or x.shape[0]
            if n < x.shape[0]:
                raise ValueError(f"dataset_size ({n}) is smaller than the batch ({x.shape[0]} examples)")
            plate = pyro.plate("data", n, subsample=self._arange(x.shape[0]))
        self._register_params()
        with self._kl_scale():
            self.likelihood.sample_latents()
            out = self._run_net(x)
        if y is None:
            self.likelihood.check_output(out)
        elif m is not None:
            y = self._subsampled_targets(out, y, idx, n)
        else:
            y = self.likelihood.check_targets(out, y)
        self.likelihood.observe(out, y, plate)
        return out

    def _subsampled_targets(self, out, y, idx, n):
        """The minibatch ``y[idx]`` of full-data targets. The full ``y`` is checked (and converted) once
        per tensor and version — every minibatch of valid targets is valid — so SG-MCMC, which passes
        the same full data at every step, does not re-validate a minibatch per step."""
        y = torch.as_tensor(y)
        cached = self._targets_cache
        if cached is not None and cached[0]() is y and cached[1] == y._version and cached[2] == (n,) + out.shape[1:]:
            self.likelihood.check_output(out)
            return cached[3][idx]
        # the checks read only the output's shape: a full-size stand-in, no memory
        full_out = out.new_empty(()).expand((n,) + out.shape[1:])
        checked = self.likelihood.check_targets(full_out, y)
        self.likelihood.check_output(out)
        self._targets_cache = (weakref.ref(y), y._version, full_out.shape, checked)
        return checked[idx]

    def _model_for_guide(self, x, y=None, subsample_size=None):
        return self.model(x, y, subsample_size)

    def guide(self, x, y=None, subsample_size: Optional[int] = None):
        """q(w): the autoguide, with the same KL weight as the model."""
        with self._kl_scale():
            return self.autoguide(x, y, subsample_size)

    def initialize(self, x, y=None):
        """Build the guide's parameters (the prototype trace) from one batch; idempotent."""
        with poutine.block(), torch.no_grad():
            self.guide(self._check_x(x)[:2], None)
        return self

    # -- prediction ---------------------------------------------------------------------------------
    def _all_local(self):
        layout = getattr(self.autoguide, "_layout", None)
        if not layout:
            return False
        return all(layout[s][5] for s in self.site_priors if s in layout) and \
            all(s in self.site_priors for s in layout)

    def _net_only(self, x):
        self._register_params()
        self.likelihood.sample_latents()
        return self._run_net(x)

    @torch.no_grad()
    def sample_outputs(self, x, num_samples: int = 32, max_rows: int = 16384) -> torch.Tensor:
        """Network outputs under ``num_samples`` posterior draws: ``[S, B, ...]``.

        With local reparameterisation on every site, the S draws of one example are independent rows
        of a single batched forward (exact per-example marginals; no Python loop over draws).
        Otherwise each draw runs the guide and the network once.
        """
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        x = self._check_x(x)
        was_training = self.training
        self.eval()
        try:
            with poutine.block():
                if self.autoguide.prototype_trace is None:
                    self.initialize(x)
                if self._all_local():
                    chunk = max(1, max_rows // num_samples)
                    outs = []
                    for i in range(0, x.shape[0], chunk):
                        xb = x[i:i + chunk]
                        tr = poutine.trace(self.autoguide).get_trace(xb)
                        rep = xb.repeat((num_samples,) + (1,) * (xb.dim() - 1))
                        o = poutine.replay(self._net_only, tr)(rep)
                        outs.append(o.reshape((num_samples, xb.shape[0]) + o.shape[1:]))
                    return torch.cat(outs, 1)
                outs = []
                for _ in range(num_samples):
                    tr = poutine.trace(self.autoguide).get_trace(x)
                    outs.append(poutine.replay(self._net_only, tr)(x))
                return torch.stack(outs)
        finally:
            self.train(was_training)

    @torch.no_grad()
    def predict(self, x, num_samples: int = 32):
        """Posterior predictive summary: class probabilities (classification) or (mean, variance)."""
        return self.likelihood.aggregate(self.sample_outputs(x, num_samples))

    @torch.no_grad()
    def evaluate(self, x, y, num_samples: int = 32) -> Dict[str, float]:
        """Metrics of the posterior predictive on ``(x, y)`` (see :func:`pyrobnn.metrics.evaluate_outputs`)."""
        from .metrics import evaluate_outputs
        outs = self.sample_outputs(x, num_samples)
        y = self.likelihood.check_targets(outs[0], y)
        return evaluate_outputs(self.likelihood, outs, y)

    # -- description ----------------------------------------------------------------------------------
    def spec(self) -> Dict[str, Any]:
        """JSON-able description used by :func:`pyrobnn.save`."""
        if isinstance(self._prior_arg, Mapping) and "name" not in self._prior_arg:
            prior = {k: (_prior_spec(_build_prior(v)) if not isinstance(v, (str, Mapping)) else v)
                     for k, v in self._prior_arg.items()}
        elif isinstance(self._prior_arg, (str, Mapping)):
            prior = self._prior_arg
        else:
            prior = _prior_spec(self._prior_arg)
        if prior is None or (isinstance(prior, dict) and None in prior.values()):
            raise ValueError("this BNN uses a prior that is not registered by name; save needs registered priors")
        if isinstance(self._guide_arg, (str, Mapping)):
            guide = self._guide_arg if isinstance(self._guide_arg, Mapping) else {"name": self._guide_arg}
            guide = {**guide, **getattr(self.autoguide, "config", lambda: {})()}
        else:
            guide = spec_of(self.autoguide)
        return {
            "arch": self._arch,
            "prior": prior,
            "guide": guide,
            "likelihood": spec_of(self.likelihood),
            "dataset_size": self.dataset_size,
            "layers": self._layers,
            "params": self._extra_params,
            "local_reparameterization": self.local_reparameterization,
            "input_shape": None if self.input_shape is None else list(self.input_shape),
        }


def bayesian(net: nn.Module, prior: Any = "gaussian", guide: Any = "mean-field",
             likelihood: Any = "categorical", dataset_size: Optional[int] = None, **kwargs) -> BNN:
    """Turn any ``torch.nn.Module`` into a :class:`BNN`.

    :param net: the network; copied, never modified. Its Linear and Conv weights/biases become sample
        sites named ``"<module path>.weight"`` / ``".bias"``; everything else stays deterministic.
    :param prior: a prior object, a registered name (``"gaussian"``, ``"log-uniform"``, ...), a
        ``{"name": ..., **kwargs}`` mapping, or a mapping from name patterns to any of those, matched
        against site names (``"fc1.weight"``) and module names (``"conv1"``) in order, first match wins:
        ``{"conv*": "deep-weight", "*": "log-uniform"}``.
    :param guide: ``"mean-field"`` (default), ``"additive-noise"``, a mapping with kwargs, or a factory
        ``guide(model, init_loc_fn=...)`` such as a Pyro ``AutoGuide`` class.
    :param likelihood: ``"categorical"``, ``"bernoulli"``, ``"gaussian"`` or a mapping/object.
    :param dataset_size: N, the number of training examples (minibatch log-likelihoods scale by N/M).
    :param layers: fnmatch pattern(s) of module names to make Bayesian (default all Linear/Conv).
    :param params: fnmatch patterns of other parameters to make Bayesian (``"bn*.weight"``).
    :param local_reparameterization: sample pre-activations instead of weights where possible.
    """
    return BNN(net, prior=prior, guide=guide, likelihood=likelihood, dataset_size=dataset_size, **kwargs)
