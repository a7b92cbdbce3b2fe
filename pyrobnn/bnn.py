"""``bayesian(net, ...)``: any ``torch.nn.Module`` → a Bayesian network with Pyro ``model``/``guide``."""
from __future__ import annotations

import itertools
import weakref
from contextlib import contextmanager
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import pyro
import pyro.poutine as poutine
import torch
import torch.nn as nn
from pyro.infer.autoguide import AutoGuide
from pyro.nn import PyroModule
from pyro.poutine.messenger import Messenger

from . import inputs
from . import priors as _priors  # noqa: F401  (registers the built-in priors)
from .guides.base import FlatGaussianGuide
from .guides.pyro_autoguides import PYRO_PREFIX, build_pyro_guide, is_pyro_autoguide, pyro_guide_spec
from .inputs import Signature
from .lrt import needs_placeholders
from .likelihoods import Likelihood
from .randomize import RandomModule, build_prior
from .registry import GUIDES, LIKELIHOODS, spec_of
from .validation import integer, positive_int

__all__ = ["BNN", "bayesian"]

_uid = itertools.count()


class _KLWeight(Messenger):
    """Multiplies the scale of every site in its context by ``weight`` (0 allowed, unlike poutine.scale)."""

    def __init__(self, weight: float):
        super().__init__()
        self.weight = weight

    def _process_message(self, msg):
        msg["scale"] = msg["scale"] * self.weight


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


def _release_prefix(prefix):
    store = pyro.get_param_store()
    for n in [n for n in store.keys() if n.startswith(prefix)]:
        del store[n]


def _hide_observation(msg):
    return bool(msg["infer"].get("pyrobnn_observation"))


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
        self._prior_arg = prior
        # the network with its sample sites: BNN.model is a user of it, like any hand-written Pyro model.
        # Held outside the module tree (its only submodule is self.net) so state_dict keys stay "net.*".
        self.__dict__["random"] = RandomModule(net, "", prior=prior, layers=layers, params=params,
                                               local_reparameterization=local_reparameterization,
                                               param_prefix=f"{self._uname}.net")
        self.net = self.random.net
        self._layers, self._extra_params = self.random.layers, self.random.params
        self._init_values = self.random.init_values
        self.site_priors = self.random.site_priors
        self.likelihood: Likelihood = LIKELIHOODS.build(likelihood)
        if not isinstance(self.likelihood, Likelihood):
            raise TypeError(f"likelihood must be a pyrobnn Likelihood, got {type(self.likelihood).__name__}")
        self._guide_arg = guide
        self.autoguide = self._build_guide(guide)
        self.input_signature: Optional[Signature] = None  # what one example looks like, from the first run
        self._arange_cache: Dict[int, torch.Tensor] = {}
        self._param_names = None
        self._targets_cache = None
        names = [f"{self._uname}.{n}" for n, _ in self._deterministic_params()]
        self._finalizer = weakref.finalize(self, _release, names)

    # -- construction -------------------------------------------------------------------------------
    @staticmethod
    def _check_dataset_size(n):
        if n is not None:
            positive_int("dataset_size", n)

    def _init_loc_fn(self, site):
        return self.random.init_loc_fn(site)

    def _build_guide(self, guide):
        if isinstance(guide, AutoGuide):
            raise TypeError("pass the guide as a name, a {'name': ...} mapping or a class/factory taking the model "
                            "(the BNN's model does not exist before bayesian() returns)")
        if isinstance(guide, Mapping) and str(guide.get("name", "")).startswith(PYRO_PREFIX):
            built = build_pyro_guide(guide, self._model_for_guide, self._init_loc_fn)
        elif isinstance(guide, (str, Mapping)):
            return GUIDES.build(guide, model=self._model_for_guide, init_loc_fn=self._init_loc_fn)
        elif callable(guide):
            try:
                built = guide(self._model_for_guide, init_loc_fn=self._init_loc_fn)
            except TypeError:
                built = guide(self._model_for_guide)
        else:
            raise TypeError(f"guide must be a name, a mapping or a factory, got {guide!r}")
        if not isinstance(built, FlatGaussianGuide):
            for site, prior in self.site_priors.items():
                if needs_placeholders(prior):
                    raise ValueError(f"site {site!r}: its prior ({type(prior).__name__}, empirical-Bayes ARD) has a "
                                     f"density only with pyrobnn's guides; {type(built).__name__} cannot use it. "
                                     "Use guide='mean-field' or 'additive-noise', or prior={'name': 'ard', "
                                     "'mode': 'hierarchical'}")
        if isinstance(built, PyroModule) and not isinstance(built, FlatGaussianGuide):
            # Pyro's AutoGuides name their parameters "<class name>.<site>" in the global param store, and a
            # PyroModule prefers the store's tensor over its own: two BNNs (or a BNN and its saved-and-loaded
            # copy) would share one guide's parameters. An instance-unique prefix keeps them apart.
            built._pyro_name = f"{self._uname}.guide"
            weakref.finalize(self, _release_prefix, built._pyro_name + ".")
        return built

    # -- boundary checks ----------------------------------------------------------------------------
    @property
    def input_shape(self) -> Optional[torch.Size]:
        """Per-example shape of a single-tensor input (None before the first run, or for tuple/dict inputs)."""
        sig = self.input_signature
        return torch.Size(sig.shapes[0]) if sig is not None and sig.kind == "tensor" else None

    @input_shape.setter
    def input_shape(self, shape):
        self.input_signature = None if shape is None else \
            Signature("tensor", (tuple(shape),), (str(torch.get_default_dtype()).replace("torch.", ""),))

    def _check_x(self, x):
        """``x`` (a tensor, tuple or dict of tensors; see :mod:`pyrobnn.inputs`) checked and converted."""
        x = inputs.as_inputs(x, self._input_dtype())
        if self.input_signature is not None:
            x = self.input_signature.check(x)
        inputs.check_finite(x)
        return x

    def _input_dtype(self):
        # the dtype floating inputs are cast to: the first floating parameter's or buffer's, else (a network
        # whose weights are all sample sites, as under SG-MCMC) the network's own initial weights', else
        # torch's default. Remembered once found (a walk of the module tree per step is measurable on the
        # hot path); .to() / .double() go through _apply, which forgets it.
        dtype = self.__dict__.get("_float_dtype")
        if dtype is not None:
            return dtype
        for p in itertools.chain(self.parameters(), self.buffers(), self._init_values.values()):
            if p.is_floating_point():
                dtype = p.dtype
                break
        else:
            return torch.get_default_dtype()
        self.__dict__["_float_dtype"] = dtype
        return dtype

    def _run_net(self, x):
        if self.input_signature is None:
            return self._first_run(x)
        return inputs.call(self.random, x)

    def _first_run(self, x):
        """The first run records the input signature. Integer inputs stay integer when the network takes
        them (token ids for an ``nn.Embedding``); a network that cannot (its first layer is a Linear, say)
        gets them as floating point, as every later call will. Which one is decided by a probe on two
        examples, outside any trace, with the sites held at the network's initial values."""
        if any(not v.is_floating_point() for v in inputs.leaves(x)):
            probe = inputs.rows(x, 0, 2)
            try:
                self._probe(probe)
            except (RuntimeError, IndexError, TypeError):
                x = inputs.map_leaves(x, lambda v: v if v.is_floating_point() else v.to(self._input_dtype()))
        try:
            out = inputs.call(self.random, x)
        except (RuntimeError, IndexError, TypeError) as e:
            what = f"of per-example shape {tuple(x.shape[1:])}" if isinstance(x, torch.Tensor) else \
                f"({inputs.describe(x)})"
            raise ValueError(f"the network cannot run on inputs {what}: {e}") from None
        self.input_signature = Signature.of(x)
        return out

    def _probe(self, x):
        was_training = self.training
        self.eval()
        try:
            with poutine.block(), poutine.condition(data=self._init_values), torch.no_grad():
                inputs.call(self.random, x)
        finally:
            self.train(was_training)

    def _register_params(self):
        # the likelihood's parameters (the network's are registered by self.random when it runs); the
        # list is fixed once built: walking the module tree on every call is measurable on the hot path
        if self._param_names is None:
            self._param_names = [(f"{self._uname}.likelihood.{n}", p) for n, p in self.likelihood.named_parameters()]
        for name, p in self._param_names:
            pyro.param(name, p)

    def _apply(self, fn, *args, **kwargs):
        self._param_names = None  # parameters may be replaced (e.g. .to() with overwrite on conversion)
        self.random._param_names = None
        self._targets_cache = None
        self.__dict__.pop("_float_dtype", None)
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
            b = inputs.batch_size(x)
            integer("subsample_size", m, minimum=1, maximum=b)
            n = self.dataset_size or b
            if n != b:
                raise ValueError(f"with subsample_size the model takes the full data: got {b} examples "
                                 f"but dataset_size is {n}")
            plate = pyro.plate("data", n, subsample_size=m)
            idx = plate._indices
            x = inputs.index(x, idx)
        else:
            b = inputs.batch_size(x)
            n = self.dataset_size or b
            if n < b:
                raise ValueError(f"dataset_size ({n}) is smaller than the batch ({b} examples)")
            plate = pyro.plate("data", n, subsample=self._arange(b))
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
        # what a guide sees of the model: the latent sites. The observation site is hidden, so a guide that
        # traces the model without targets (bnn.initialize(x), prediction) does not mistake it for a latent
        # (Pyro's AutoGuides would: a discrete site for a classifier, one of the wrong size for regression).
        with poutine.block(hide_fn=_hide_observation):
            return self.model(x, y, subsample_size)

    def guide(self, x, y=None, subsample_size: Optional[int] = None):
        """q(w): the autoguide, with the same KL weight as the model."""
        with self._kl_scale():
            return self.autoguide(x, y, subsample_size)

    def initialize(self, x, y=None):
        """Build the guide's parameters (the prototype trace) from one batch; idempotent."""
        with poutine.block(), torch.no_grad():
            self.guide(inputs.rows(self._check_x(x), 0, 2), None)
        return self

    # -- prediction ---------------------------------------------------------------------------------
    def _all_local(self):
        layout = getattr(self.autoguide, "_layout", None)
        if not layout:
            return False
        return all(layout[s].local for s in self.site_priors if s in layout) and \
            all(s in self.site_priors for s in layout)

    def _net_only(self, x):
        self._register_params()
        self.likelihood.sample_latents()
        return self._run_net(x)

    @contextmanager
    def _predicting(self):
        """Eval mode, no trace escaping, and a latent noise precision set by a draw restored afterwards."""
        saved = getattr(self.likelihood, "_precision", None)
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad(), poutine.block():
                yield
        finally:
            self.train(was_training)
            if hasattr(self.likelihood, "_precision"):
                self.likelihood._precision = saved

    @staticmethod
    def _check_num_samples(num_samples):
        positive_int("num_samples", num_samples)

    # -- the posterior protocol (pyrobnn.posterior.Posterior): the BNN with its guide -----------------
    def parameter_draws(self, num_samples: Optional[int] = 32, *,
                        generator: Optional[torch.Generator] = None) -> List[Dict[str, torch.Tensor]]:
        """``num_samples`` (None: 32) joint draws of the latent sites from the guide, each ``{site: tensor}``
        (constrained values). pyrobnn's guides draw with ``generator``; other guides draw from Pyro's
        global random state and refuse a generator."""
        num_samples = 32 if num_samples is None else num_samples
        self._check_num_samples(num_samples)
        guide = self.autoguide
        if getattr(guide, "prototype_trace", None) is None:
            raise ValueError("the BNN's guide has not been initialised; train it (or call bnn.initialize(x)) first")
        if hasattr(guide, "sample_latents"):
            stacked = guide.sample_latents(num_samples, generator=generator)
        else:
            if generator is not None:
                raise ValueError(f"{type(guide).__name__} draws from Pyro's global random state; pass generator=None "
                                 "(and seed with pyro.set_rng_seed)")
            if self.input_signature is None:
                raise ValueError("the BNN has never run on data; run it once (bnn.initialize(x)) first")
            x = self.input_signature.example(2)
            with torch.no_grad(), poutine.block():
                traces = [poutine.trace(guide).get_trace(x) for _ in range(num_samples)]
            names = [n for n, site in traces[0].nodes.items() if site["type"] == "sample"]
            stacked = {n: torch.stack([t.nodes[n]["fn"].sample() for t in traces]) for n in names}
        return [{k: v[s].detach() for k, v in stacked.items()} for s in range(num_samples)]

    def run(self, draw: Mapping[str, torch.Tensor], x) -> torch.Tensor:
        """The network's output on ``x`` ``[B, ...]`` with every latent site fixed to ``draw``
        (``{site: tensor}``, as :meth:`parameter_draws` or a sampler gives): ``[B, ...]``, in eval mode,
        without gradients. Works under ``torch.func.vmap`` over the draw's tensors."""
        if not isinstance(draw, Mapping):
            raise TypeError(f"a draw of a BNN is a mapping {{site: tensor}}, got {type(draw).__name__}")
        missing = [s for s in self.site_priors if s not in draw]
        if missing:
            raise ValueError(f"the draw has no value for sites {missing}")
        x = self._check_x(x)
        with self._predicting():
            return poutine.condition(self._net_only, data=draw)(x)

    def outputs(self, x, num_samples: Optional[int] = 32, *, batch_size: Optional[int] = None) -> torch.Tensor:
        """Network outputs ``[S, B, ...]`` under ``num_samples`` (None: 32) draws of the guide (what :meth:`predict`
        summarises), ``batch_size`` rows of ``x`` at a time (default: 16384 / S rows with local
        reparameterisation, all rows otherwise). Without local reparameterisation each draw is one
        weight sample used for every batch, so ``batch_size`` does not change the numbers; with it the
        activations are sampled per row, and the batching changes which random numbers a row sees."""
        if batch_size is not None:
            positive_int("batch_size", batch_size)
        return self._sample_outputs(x, 32 if num_samples is None else num_samples, batch_size, batch_size)

    def network(self, draw=None) -> nn.Module:
        """The module whose layers run every draw (``bnn.net``; where forward hooks attach)."""
        return self.net

    # -- prediction ---------------------------------------------------------------------------------
    def sample_outputs(self, x, num_samples: int = 32, max_rows: int = 16384) -> torch.Tensor:
        """Network outputs under ``num_samples`` posterior draws: ``[S, B, ...]``.

        With local reparameterisation on every site, the S draws of one example are independent rows
        of a single batched forward (exact per-example marginals; no Python loop over draws), at most
        ``max_rows`` rows at a time. Otherwise each draw runs the guide and the network once.
        """
        self._check_num_samples(num_samples)
        return self._sample_outputs(x, num_samples, max(1, max_rows // num_samples), None)

    @torch.no_grad()
    def _sample_outputs(self, x, num_samples, local_rows, rows):
        self._check_num_samples(num_samples)
        x = self._check_x(x)
        was_training = self.training
        self.eval()
        try:
            with poutine.block():
                if self.autoguide.prototype_trace is None:
                    self.initialize(x)
                    x = self._check_x(x)  # as the first run decided (integer inputs to a float network)
                B = inputs.batch_size(x)
                if self._all_local():
                    chunk = local_rows or max(1, 16384 // num_samples)
                    outs = []
                    for i in range(0, B, chunk):
                        xb = inputs.rows(x, i, i + chunk)
                        tr = poutine.trace(self.autoguide).get_trace(xb)
                        o = poutine.replay(self._net_only, tr)(inputs.repeat(xb, num_samples))
                        outs.append(o.reshape((num_samples, inputs.batch_size(xb)) + o.shape[1:]))
                    return torch.cat(outs, 1)
                outs = []
                for _ in range(num_samples):
                    tr = poutine.trace(self.autoguide).get_trace(x)
                    net = poutine.replay(self._net_only, tr)
                    if rows is None or rows >= B:
                        outs.append(net(x))
                    else:
                        outs.append(torch.cat([net(inputs.rows(x, i, i + rows)) for i in range(0, B, rows)]))
                return torch.stack(outs)
        finally:
            self.train(was_training)

    @torch.no_grad()
    def predict(self, x, num_samples: int = 32):
        """Posterior predictive summary: class probabilities (classification) or (mean, variance)."""
        return self.likelihood.aggregate(self.outputs(x, num_samples))

    @torch.no_grad()
    def evaluate(self, x, y, num_samples: int = 32) -> Dict[str, float]:
        """Metrics of the posterior predictive on ``(x, y)`` (see :func:`pyrobnn.metrics.evaluate_outputs`)."""
        from .metrics import evaluate_outputs
        outs = self.outputs(x, num_samples)
        y = self.likelihood.check_targets(outs[0], y)
        return evaluate_outputs(self.likelihood, outs, y)

    # -- description ----------------------------------------------------------------------------------
    def spec(self) -> Dict[str, Any]:
        """JSON-able description used by :func:`pyrobnn.save`."""
        if isinstance(self._prior_arg, Mapping) and "name" not in self._prior_arg:
            prior = {k: (_prior_spec(build_prior(v)) if not isinstance(v, (str, Mapping)) else v)
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
        elif is_pyro_autoguide(self.autoguide):
            guide = pyro_guide_spec(self.autoguide, self._guide_arg)
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
            "inputs": None if self.input_signature is None else self.input_signature.to_json(),
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
