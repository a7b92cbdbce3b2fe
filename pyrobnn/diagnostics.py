"""ArviZ bridge: posterior draws of a BNN (or any Pyro model) → ArviZ's container.

The container is the installed ArviZ line's own: ``arviz.InferenceData`` on ArviZ 0.x, an
``xarray.DataTree`` on ArviZ 1.x (see :mod:`pyrobnn.arviz_compat`, the one module that knows the
difference), so that line's ``az.summary``, ``az.rhat``, ``az.ess``, ``az.loo`` and plots take it.

:func:`to_inference_data` accepts a finished ``pyro.infer.MCMC`` run, a
:class:`pyrobnn.inference.SamplePosterior`, or a :class:`pyrobnn.BNN` with a trained guide (draws from
the guide), and builds the groups with ``arviz.from_dict`` (on both lines, through
:func:`pyrobnn.arviz_compat.from_groups`):

* ``posterior`` — the latent sites by name. A site with more than ``max_coords`` numbers (any weight
  matrix) is stored as a seeded random subset of its coordinates, dimension ``"<site>_coord"`` whose
  coordinate values are the flat indices into the site (``numpy.unravel_index`` with the shape in
  ``attrs["pyrobnn_site_shapes"]`` recovers the tensor index), plus per-draw layer summaries
  ``"<site>_norm"`` (L2 norm), ``"<site>_mean"`` and ``"<site>_std"``;
* ``log_likelihood`` — log p(y_n | θ_s) per observation and draw (for ``az.loo`` / ``az.waic``);
* ``posterior_predictive`` — one replicated y per draw; ``observed_data`` — y;
* ``predictions`` / ``predictions_constant_data`` — function-space quantities on held-out inputs
  (class probabilities ``p_test`` or regression means ``f_test``) and their targets ``y_test``;
* ``sample_stats`` — ``lp`` (minus the minibatch potential), ``step_size``, ``diverging``.

Why function space. A neural network's posterior is invariant under weight symmetries: permuting the
hidden units of a layer, or flipping the signs of a unit's in- and outgoing weights for odd
activations (tanh), gives the same function. Independent chains settle in different, equivalent
copies of a mode, so weight-space R-hat is large (and ESS tiny) even when every chain has converged to
the same predictive distribution — weight-space R-hat of a network is not a meaningful convergence
check. Quantities that are invariant under the symmetries — the network's predictions on held-out
inputs — are: :func:`function_space_diagnostics` reports R-hat and ESS on them. The weight-space
columns of ``az.summary`` are kept for completeness (per-layer norms are invariant to permutations,
and are a useful second look).
"""
from __future__ import annotations

import json
import math
import warnings
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import pyro.poutine as poutine
import torch

from . import arviz_compat as compat
from . import inputs
from .arviz_compat import from_groups, group, group_names, is_inference_data
from .posterior import PRECISION_SITE, DrawSet, Posterior, outputs_under_draws
from .validation import positive_int

__all__ = ["to_inference_data", "function_space_diagnostics", "per_draw_precision", "per_draw_log_prob",
           "mcmc_sample_stats"]

class per_draw_precision:
    """Context in which a ``Gaussian(scale="latent")`` likelihood evaluates ``log_prob(outs [S, B, ...])``
    with one noise precision per draw (``precision`` ``[S]``) instead of the last one the model drew."""

    def __init__(self, likelihood, precision: Optional[torch.Tensor], outs: torch.Tensor):
        self.likelihood = likelihood
        self.value = None
        if precision is not None:
            mean_dim = likelihood._mean(outs).dim()
            self.value = precision.to(outs.dtype).reshape((-1,) + (1,) * (mean_dim - 1))

    def __enter__(self):
        if self.value is not None:
            self.saved = self.likelihood._precision
            self.likelihood._precision = self.value
        return self

    def __exit__(self, *exc):
        if self.value is not None:
            self.likelihood._precision = self.saved
        return False


@torch.no_grad()
def per_draw_log_prob(likelihood, outs: torch.Tensor, y: torch.Tensor, precision: Optional[torch.Tensor] = None,
                      sample: bool = False):
    """log p(y | out_s) per draw ``[S, B]`` (and one replicated y per draw when ``sample``), each draw
    through the likelihood's own ``distribution`` of that draw's outputs ``outs[s]`` (and noise
    precision ``precision[s]`` for a latent-precision Gaussian)."""
    lps, reps = [], []
    for i in range(outs.shape[0]):
        with per_draw_precision(likelihood, None if precision is None else precision[i:i + 1], outs[i]):
            d = likelihood.distribution(outs[i])
            lps.append(d.log_prob(y))
            if sample:
                reps.append(d.sample())
    return torch.stack(lps), (torch.stack(reps) if sample else None)


def mcmc_sample_stats(mcmc) -> Dict[str, torch.Tensor]:
    """Per-draw statistics ``{name: [C, S]}`` of a finished ``pyro.infer.MCMC`` run: ``diverging``
    always; ``potential_energy`` and ``step_size`` where the kernel records them (SGLD/pSGLD do)."""
    per_chain = getattr(mcmc, "_diagnostics", None)
    C, S = mcmc.num_chains, mcmc.num_samples
    if not per_chain or per_chain[0] is None:
        diag = mcmc.diagnostics()
        per_chain = [{k: v[f"chain {i}"] for k, v in diag.items() if isinstance(v, dict) and f"chain {i}" in v}
                     for i in range(C)]
    stats = {"diverging": torch.zeros(C, S, dtype=torch.bool)}
    for i, d in enumerate(per_chain):
        div = d.get("divergences", [])
        if isinstance(div, (list, tuple)) and len(div):
            stats["diverging"][i, torch.as_tensor(list(div), dtype=torch.long)] = True
    for key in ("potential_energy", "step_size"):
        vals = [d.get(key) for d in per_chain]
        if all(isinstance(v, (list, tuple)) and len(v) == S for v in vals):
            stats[key] = torch.tensor(vals, dtype=torch.float64)
    return stats


# ----------------------------------------------------------------------------------------------------
# gathering draws from the supported sources
# ----------------------------------------------------------------------------------------------------
def _is_bnn(obj) -> bool:
    from .bnn import BNN
    return isinstance(obj, BNN)


def _from_source(obj, bnn, data, num_samples, seed):
    """→ (draws {site: [C,S,...]}, stats {name: [C,S]}, bnn|None, data|None, model info, eval (x, outs)|None)."""
    from pyro.infer import MCMC
    if isinstance(obj, MCMC):
        if obj._samples is None:
            raise ValueError("this MCMC object has not been run")
        draws = obj.get_samples(group_by_chain=True)
        stats = mcmc_sample_stats(obj)
        owner = getattr(obj.kernel.model, "__self__", None)
        bnn = bnn if bnn is not None else (owner if _is_bnn(owner) else None)
        args, kwargs = tuple(obj._args or ()), dict(obj._kwargs or {})
        if data is None and bnn is not None and len(args) >= 2 and args[1] is not None:
            data = (args[0], args[1])
        return draws, stats, bnn, data, (obj.kernel.model, args, kwargs), None
    if isinstance(obj, DrawSet):  # stored draws (a SamplePosterior among them), chains kept apart
        outs = getattr(obj, "eval_outputs", None)
        ev = None if outs is None else (obj.eval_x, outs)
        return dict(obj.draws), dict(getattr(obj, "stats", {})), obj.bnn, data, None, ev
    if _is_bnn(obj):
        return _guide_draws(obj, data, num_samples, seed), {}, obj, data, None, None
    if isinstance(obj, Posterior):
        raise TypeError(f"to_inference_data needs draws of a BNN's latent sites; a {type(obj).__name__} has none "
                        "(function_space_diagnostics takes its outputs)")
    raise TypeError("to_inference_data takes a pyro.infer.MCMC run, a pyrobnn SamplePosterior or DrawSet, or a BNN "
                    f"with a trained guide; got {type(obj).__name__}")


def _guide_draws(bnn, data, num_samples, seed) -> Dict[str, torch.Tensor]:
    """One chain of ``num_samples`` guide draws (:meth:`pyrobnn.BNN.parameter_draws`), seeded by ``seed``."""
    positive_int("num_samples", num_samples)
    if hasattr(bnn.autoguide, "sample_latents"):
        draws = bnn.parameter_draws(num_samples, generator=torch.Generator().manual_seed(seed))
    else:
        torch.manual_seed(seed)
        draws = bnn.parameter_draws(num_samples)
    return {k: torch.stack([d[k] for d in draws])[None] for k in draws[0]}


def _thin(arrays: Dict[str, torch.Tensor], max_draws: Optional[int]) -> Dict[str, torch.Tensor]:
    if max_draws is None or not arrays:
        return arrays
    S = next(iter(arrays.values())).shape[1]
    if S <= max_draws:
        return arrays
    idx = torch.linspace(0, S - 1, max_draws).round().long()
    return {k: v[:, idx] for k, v in arrays.items()}


# ----------------------------------------------------------------------------------------------------
# the builder
# ----------------------------------------------------------------------------------------------------
def to_inference_data(obj, *, bnn=None, data: Optional[Tuple[Any, Any]] = None,
                      test: Optional[Any] = None, num_samples: int = 200, max_coords: int = 16,
                      max_draws: Optional[int] = None, seed: int = 0, log_likelihood: bool = True,
                      posterior_predictive: bool = True, summaries: bool = True, chunk: int = 32,
                      attrs: Optional[Dict[str, Any]] = None):
    """Build the ArviZ container (``InferenceData`` on 0.x, ``DataTree`` on 1.x) from posterior draws (see
    the module docstring for the groups).

    :param obj: a finished ``pyro.infer.MCMC``, a ``SamplePosterior`` or a ``BNN`` (draws from its guide).
    :param bnn: the BNN the draws belong to (found automatically for ``bnn.model`` runs and posteriors).
    :param data: ``(x, y)`` training data for ``log_likelihood`` / ``posterior_predictive`` /
        ``observed_data`` (default: the data an MCMC run was given).
    :param test: held-out ``(x, y)`` or ``x`` for the function-space ``predictions`` group (a
        SamplePosterior's recorded ``eval_outputs`` are used when omitted).
    :param num_samples: draws from the guide when ``obj`` is a BNN.
    :param max_coords: sites larger than this are stored as that many random coordinates + summaries.
    :param max_draws: keep at most this many evenly spaced draws per chain.
    :param seed: seeds the coordinate subset (and guide draws), so repeated calls agree.
    :param chunk: draws per batched forward pass.
    :param attrs: extra attributes of the posterior group (``pyrobnn report`` shows a dict stored
        under ``"pyrobnn_metrics"`` as a table).
    """
    positive_int("max_coords", max_coords)
    if max_draws is not None:
        positive_int("max_draws", max_draws)
    draws, stats, bnn, data, model_info, evaluated = _from_source(obj, bnn, data, num_samples, seed)
    if bnn is not None and not _is_bnn(bnn):
        raise TypeError(f"bnn must be a pyrobnn BNN, got {type(bnn).__name__}")
    draws = _thin({k: torch.as_tensor(v) for k, v in draws.items()}, max_draws)
    stats = _thin(stats, max_draws)
    C, S = next(iter(draws.values())).shape[:2]
    coords: Dict[str, Any] = {}
    dims: Dict[str, Sequence[str]] = {}
    pred_dims: Dict[str, Sequence[str]] = {}
    extra = {k: (json.dumps(v) if isinstance(v, (dict, list, tuple)) else v) for k, v in (attrs or {}).items()}
    attrs = {"inference_library": "pyrobnn", **extra}
    generator = torch.Generator().manual_seed(seed)

    # -- posterior ---------------------------------------------------------------------------------
    posterior, shapes, subsampled = {}, {}, []
    for name, v in draws.items():
        v = v.detach().to(torch.float64 if v.dtype == torch.float64 else torch.float32)
        site_shape = tuple(v.shape[2:])
        shapes[name] = list(site_shape)
        numel = math.prod(site_shape)
        if numel <= max_coords:
            posterior[name] = v.numpy()
            continue
        subsampled.append(name)
        flat = v.reshape(C, S, numel)
        idx = torch.randperm(numel, generator=generator)[:max_coords].sort().values
        posterior[name] = flat[:, :, idx].numpy()
        dims[name] = [f"{name}_coord"]
        coords[f"{name}_coord"] = idx.numpy()
        if summaries:
            posterior[f"{name}_norm"] = flat.norm(dim=-1).numpy()
            posterior[f"{name}_mean"] = flat.mean(-1).numpy()
            posterior[f"{name}_std"] = flat.std(-1).numpy()
    attrs["pyrobnn_site_shapes"] = json.dumps(shapes)
    attrs["pyrobnn_subsampled_sites"] = json.dumps(subsampled)

    # -- sample stats ------------------------------------------------------------------------------
    sample_stats = {}
    if "potential_energy" in stats:
        sample_stats["lp"] = (-stats["potential_energy"]).numpy()
    if "step_size" in stats:
        sample_stats["step_size"] = stats["step_size"].numpy()
    if "diverging" in stats:
        sample_stats["diverging"] = stats["diverging"].numpy().astype(bool)

    groups: Dict[str, Dict[str, np.ndarray]] = {"posterior": posterior, "sample_stats": sample_stats}
    flat_draws = {k: v.reshape((C * S,) + v.shape[2:]) for k, v in draws.items()}
    if bnn is not None:
        attrs["pyrobnn_likelihood"] = getattr(type(bnn.likelihood), "registry_name", type(bnn.likelihood).__name__)
        attrs["pyrobnn_task"] = bnn.likelihood.task
        missing = [s for s in bnn.site_priors if s not in draws]
        if data is not None and (log_likelihood or posterior_predictive):
            if missing:
                warnings.warn(f"draws of sites {missing} were not kept; log_likelihood and posterior_predictive "
                              "are left out")
            else:
                ll, ppc, y = _bnn_observations(bnn, flat_draws, data, C, S, chunk)
                if log_likelihood:
                    groups["log_likelihood"] = {"obs": ll}
                if posterior_predictive:
                    groups["posterior_predictive"] = {"obs": ppc}
                groups["observed_data"] = {"obs": y}
                obs_dims = ["observation"] + [f"obs_dim_{i}" for i in range(1, y.ndim)]
                dims["obs"] = obs_dims
        if test is not None or evaluated is not None:
            if test is not None and missing:
                warnings.warn(f"draws of sites {missing} were not kept; no predictions group")
            else:
                preds, const = _bnn_predictions(bnn, flat_draws, test, evaluated, C, S, chunk)
                groups["predictions"] = preds
                if const:
                    groups["predictions_constant_data"] = const
                for k, arr in {**preds, **const}.items():
                    lead = 0 if k in const else 2
                    pred_dims[k] = ["test_point"] + [f"{k}_dim_{i}" for i in range(1, arr.ndim - lead)]
    elif model_info is not None and (log_likelihood or posterior_predictive):
        groups.update(_model_observations(model_info, flat_draws, C, S, log_likelihood, posterior_predictive))

    # attrs on the posterior group, so that they survive a netCDF round trip
    return from_groups(groups, coords=coords, dims=dims, pred_dims=pred_dims, attrs={"posterior": attrs})


def _bnn_observations(bnn, flat_draws, data, C, S, chunk):
    x, y = data
    x = bnn._check_x(x)
    lik = bnn.likelihood
    precision = flat_draws.get(PRECISION_SITE)
    lls, ppcs = [], []
    y_checked = None
    for s0 in range(0, C * S, chunk):
        part = {k: v[s0:s0 + chunk] for k, v in flat_draws.items()}
        outs = outputs_under_draws(bnn, part, x, chunk=chunk)
        if y_checked is None:
            y_checked = lik.check_targets(outs[0], y)
        prec = None if precision is None else precision[s0:s0 + chunk]
        lp, rep = per_draw_log_prob(lik, outs, y_checked, prec, sample=True)
        lls.append(lp)
        ppcs.append(rep)
    ll = torch.cat(lls).reshape((C, S) + lls[0].shape[1:])
    ppc = torch.cat(ppcs).reshape((C, S) + ppcs[0].shape[1:])
    return ll.double().numpy(), ppc.numpy(), y_checked.numpy()


def _is_input_tuple(bnn, test) -> bool:
    """Whether ``test`` is the network's own two-tensor input rather than an ``(x, y)`` pair."""
    sig = bnn.input_signature
    return sig is not None and sig.kind == "tuple" and len(sig.shapes) == 2 and isinstance(test[0], torch.Tensor)


def _bnn_predictions(bnn, flat_draws, test, evaluated, C, S, chunk):
    lik = bnn.likelihood
    y_test = None
    if test is not None:
        if isinstance(test, (tuple, list)) and len(test) == 2 and inputs.is_inputs(test[0]) and \
                isinstance(test[1], torch.Tensor) and not _is_input_tuple(bnn, test):
            x_test, y_test = test
        else:
            x_test = test
        outs = outputs_under_draws(bnn, flat_draws, bnn._check_x(x_test), chunk=chunk)
    else:
        _, outs = evaluated
        outs = outs.reshape((-1,) + outs.shape[2:])
        if outs.shape[0] != C * S:
            raise ValueError("the recorded eval_outputs do not match the draws (thinned differently?)")
    outs = outs.reshape((C, S) + outs.shape[1:])
    preds, const = {}, {}
    from .likelihoods import Bernoulli, Categorical
    if isinstance(lik, Categorical):
        preds["p_test"] = outs.softmax(-1).numpy()
    elif isinstance(lik, Bernoulli):
        logit = outs.squeeze(-1) if outs.shape[-1] == 1 else outs
        preds["p_test"] = torch.sigmoid(logit).numpy()
    else:
        preds["f_test"] = lik._mean(outs).numpy()
    if y_test is not None:
        yt = lik.check_targets(outs[0, 0], y_test)
        const["y_test"] = yt.numpy()
    return preds, const


def _windows(plate):
    """Index windows that walk a subsampled plate's full data set: ``(indices, keep)`` pairs, each
    ``indices`` as long as the plate's own subsample (Pyro checks that length), ``keep`` the positions
    in it not covered by an earlier window (the last window is shifted back to fit and overlaps)."""
    if plate is None:
        return [(None, None)]
    N, M = plate.full_size, plate.size
    out = []
    for k in range(0, N, M):
        start = min(k, N - M)
        idx = torch.arange(start, start + M)
        out.append((idx, torch.nonzero(idx >= k).squeeze(-1)))
    return out


def _model_observations(model_info, flat_draws, C, S, want_ll, want_ppc):
    """log-likelihood / replicated data of a generic Pyro model, one conditioned run per draw.

    Observed sites in a subsampled plate (``pyro.plate("data", N, subsample_size=M)``) are replayed on
    the full data set: each draw's run is repeated with the plate's subsample site conditioned on
    consecutive windows of M indices, so every observation gets its own log p(y_n | θ_s) — what
    ``az.loo`` needs. That takes one subsampled plate, a model that indexes its data with the indices
    the plate returns, and no latent site inside that plate (its draws cover only one minibatch);
    otherwise the observed sites in subsampled plates are left out with a warning saying why.
    """
    from pyro.poutine.subsample_messenger import _Subsample

    model, args, kwargs = model_info

    def run(draw, idx=None, plate_name=None):
        data = draw if idx is None else {**draw, plate_name: idx}
        return poutine.trace(poutine.condition(model, data=data)).get_trace(*args, **kwargs)

    def subsampled(site):
        return [f for f in site["cond_indep_stack"] if f.full_size is not None and f.full_size != f.size]

    draw_at = [{k: v[i] for k, v in flat_draws.items()} for i in range(C * S)]
    with torch.no_grad(), poutine.block():
        first = run(draw_at[0])
        observed = [name for name, site in first.nodes.items()
                    if site["type"] == "sample" and site["is_observed"] and name not in flat_draws
                    and not isinstance(site["fn"], _Subsample)]
        plates = {f.name: f for name in observed for f in subsampled(first.nodes[name])}
        plate, skipped, why = None, set(), ""
        if plates:
            name, frame = next(iter(plates.items()))
            local = [k for k in flat_draws if k in first.nodes and any(f.name == name for f in first.nodes[k]["cond_indep_stack"])]
            node = first.nodes.get(name)
            if len(plates) > 1:
                why = f"they lie in several subsampled plates ({sorted(plates)})"
            elif node is None or not isinstance(node["fn"], _Subsample):
                why = f"plate {name!r} has no subsample site to replay"
            elif local:
                why = f"latent sites {local} lie in subsampled plate {name!r} (their draws cover one minibatch)"
            else:
                plate = frame
            if plate is None:
                skipped = {k for k in observed if subsampled(first.nodes[k])}
        windows = _windows(plate)
        ll, ppc, obs = {}, {}, {}
        changed = set()
        for i, draw in enumerate(draw_at):
            pieces: Dict[str, list] = {}
            for w, (idx, keep) in enumerate(windows):
                tr = first if (i == 0 and idx is None) else run(draw, idx, None if plate is None else plate.name)
                for name in observed:
                    if name in skipped:
                        continue
                    site = tr.nodes[name]
                    fn, value = site["fn"], site["value"]
                    lp, rep = fn.log_prob(value), fn.sample()
                    dim = next((f.dim for f in site["cond_indep_stack"] if plate is not None and f.name == plate.name), None)
                    if dim is None:
                        if w == 0:
                            pieces[name] = [(lp, rep, value, None)]
                        continue
                    if lp.dim() < -dim:
                        raise ValueError(f"observed site {name!r}: its log_prob has no dimension {dim} for plate "
                                         f"{plate.name!r}")
                    event = value.dim() - lp.dim()
                    pieces.setdefault(name, []).append((lp.index_select(dim, keep), rep.index_select(dim - event, keep),
                                                        value.index_select(dim - event, keep), (dim, event)))
            for name, parts in pieces.items():
                dims = parts[0][3]
                if dims is None:
                    lp, rep, value = parts[0][:3]
                else:
                    dim, event = dims
                    lp = torch.cat([p[0] for p in parts], dim)
                    rep = torch.cat([p[1] for p in parts], dim - event)
                    value = torch.cat([p[2] for p in parts], dim - event)
                if name in obs and not torch.equal(obs[name], value):
                    changed.add(name)
                ll.setdefault(name, []).append(lp)
                ppc.setdefault(name, []).append(rep)
                obs[name] = value
    if changed:  # the data do not depend on the draw: the model indexes its data with indices of its own
        warnings.warn(f"observed sites {sorted(changed)} are left out of log_likelihood and posterior_predictive: "
                      "their observed values change from one replay to the next (does the model index its data "
                      "with minibatch indices of its own rather than those the plate returns?)")
        for d in (ll, ppc, obs):
            for name in changed:
                d.pop(name, None)
    if skipped:
        warnings.warn(f"observed sites {sorted(skipped)} are left out of log_likelihood and posterior_predictive: "
                      f"{why}; run the model on full data, or use a BNN")
    out = {}
    if want_ll and ll:
        out["log_likelihood"] = {k: torch.stack(v).reshape((C, S) + v[0].shape).double().numpy() for k, v in ll.items()}
    if want_ppc and ppc:
        out["posterior_predictive"] = {k: torch.stack(v).reshape((C, S) + v[0].shape).numpy() for k, v in ppc.items()}
    if obs and ll:
        out["observed_data"] = {k: v.numpy() for k, v in obs.items()}
    return out


# ----------------------------------------------------------------------------------------------------
# function-space convergence
# ----------------------------------------------------------------------------------------------------
def function_space_diagnostics(source, *, x=None, var_name: Optional[str] = None) -> Dict[str, float]:
    """R-hat and ESS of the network's predictions on held-out inputs — the convergence check that is
    invariant to weight-space symmetries (see the module docstring).

    :param source: ArviZ data (``InferenceData`` or ``DataTree``) with a ``predictions`` group (``p_test``/``f_test``), a
        ``SamplePosterior`` (its ``eval_outputs``, or outputs on ``x``), any other
        :class:`pyrobnn.posterior.Posterior` (its outputs on ``x``, one chain; a BNN's likelihood turns
        them into predictions, other posteriors' outputs are used as they are), or an array
        ``[C, S, ...]`` of per-draw predictions.
    :returns: ``rhat_max``, ``rhat_median``, ``ess_bulk_min``, ``ess_bulk_median``, ``ess_tail_min``,
        ``num_quantities`` (rank-normalised split R-hat and ESS of ArviZ, over every predicted number).
    """
    if is_inference_data(source):
        if "predictions" not in group_names(source):
            raise ValueError("this InferenceData has no predictions group; pass test=... to to_inference_data")
        ds = group(source, "predictions")
        name = var_name or next(iter(ds.data_vars))
        arr = np.asarray(ds[name].values)
    elif isinstance(source, Posterior):
        if x is not None:
            outs = source.outputs(x)
            C = source.num_chains if isinstance(source, DrawSet) else 1
            arr = outs.reshape((C, outs.shape[0] // C) + outs.shape[1:])
        elif getattr(source, "eval_outputs", None) is not None:
            arr = source.eval_outputs
        else:
            raise ValueError("this posterior recorded no eval_outputs; pass x=held-out inputs")
        bnn = source if _is_bnn(source) else getattr(source, "bnn", None)
        arr = torch.as_tensor(arr).float()
        if bnn is not None:
            lik = bnn.likelihood
            arr = arr.softmax(-1) if lik.task == "classification" and arr.shape[-1] > 1 else lik._mean(arr) \
                if lik.task == "regression" else torch.sigmoid(arr)
        arr = arr.numpy()
    else:
        arr = np.asarray(source.detach().cpu() if isinstance(source, torch.Tensor) else source)
    if arr.ndim < 2:
        raise ValueError(f"predictions must have shape [chains, draws, ...], got {arr.shape}")
    arr = arr.reshape(arr.shape[0], arr.shape[1], -1).astype(np.float64)
    # quantities that never vary (e.g. a probability saturated at 1) have undefined R-hat; skip them
    varying = arr.reshape(-1, arr.shape[-1]).std(0) > 1e-12
    if not varying.any():
        raise ValueError("every predicted quantity is constant across draws")
    arr = arr[:, :, varying]
    rhat = compat.rhat(arr)
    ess_bulk = compat.ess(arr, method="bulk")
    ess_tail = compat.ess(arr, method="tail")
    def stat(f, a):  # NaN (not a warning) where no value is defined, e.g. R-hat of a single chain
        return float(f(a)) if np.isfinite(a).any() else math.nan

    return {"rhat_max": stat(np.nanmax, rhat), "rhat_median": stat(np.nanmedian, rhat),
            "ess_bulk_min": stat(np.nanmin, ess_bulk), "ess_bulk_median": stat(np.nanmedian, ess_bulk),
            "ess_tail_min": stat(np.nanmin, ess_tail), "num_quantities": int(arr.shape[-1])}
