"""A hypernetwork guide over the KL weight λ (complexity control).

The generalised ELBO  L_λ(q) = E_q log p(D | w) − λ KL(q(w) ‖ p(w))  has one optimum q*_λ per λ;
small λ gives a data-fitting, dense posterior, large λ a prior-dominated, sparse one. Instead of
training one mean-field guide per λ, :class:`HyperMeanField` learns a map G: λ ↦ (μ, ρ) from the
KL weight to the mean-field variational parameters (σ = softplus(ρ)), trained with λ drawn per
batch over a range Λ (see :mod:`pyrobnn.inference.complexity`). Any λ ∈ Λ is then read off without
retraining by :meth:`HyperMeanField.at`, which returns an ordinary :class:`~pyrobnn.guides.MeanField`.

Three families of G, applied to the vector of every site's μ and, separately, of every site's ρ:

* ``"linear"``:    G(λ) = λ b₂ + b₃                                   (b₂, b₃ ∈ R^D)
* ``"lowrank"``:   per weight matrix W ∈ R^{m×n} (any site of ≥ 2 dims, read as [shape[0], rest]):
  G_W(λ) = (U₁ F(λ))(U₂ F(λ))ᵀ + B₁ with U₁ ∈ R^{m×r}, U₂ ∈ R^{n×r}, F(λ) = diag(a λ + c), a, c ∈ R^r;
  1-d sites (biases) use the linear form λ b₂ + b₃.
* ``"piecewise"``: K knots λ₁ < … < λ_K spanning Λ, one parameter vector P_k per knot, and
  G(λ) = (1 − t) P_k + t P_{k+1} for λ ∈ [λ_k, λ_{k+1}], t = (λ − λ_k)/(λ_{k+1} − λ_k).

How λ reaches the guide. A BNN calls ``autoguide(x, y, subsample_size)``, so λ cannot be an argument:
it is the attribute ``guide.lam`` (a float in Λ; ``default_lam`` until set), changed temporarily with
``with guide.conditioned(lam): ...``. The model side of λ is the BNN's ``kl_weight``, which scales
every weight site of model and guide; :func:`pyrobnn.inference.complexity.complexity_weight` sets
both together, so the λ the guide is conditioned on is always the λ weighting the KL.
"""
from __future__ import annotations

import bisect
import weakref
from contextlib import contextmanager
from typing import Dict, Optional, Sequence, Tuple

import pyro
import torch
from pyro.infer.autoguide.initialization import init_to_median

from ..registry import GUIDES
from ..validation import finite_float, integer, positive_float, positive_int
from .base import FlatGaussianGuide, _release
from ..fastpath import softplus
from .mean_field import MeanField, _softplus_inv

__all__ = ["HyperMeanField", "mean_field_like"]

KINDS = ("linear", "lowrank", "piecewise")


def _check_number(what, v):
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"{what} must be a single number, got a tensor of shape {tuple(v.shape)}")
        v = v.item()
    return finite_float(what, v)


def mean_field_like(source: FlatGaussianGuide, loc: torch.Tensor, rho: torch.Tensor, **kwargs) -> MeanField:
    """An ordinary :class:`MeanField` over the same model and sites as ``source`` (already set up),
    with flat parameters ``loc`` and ``rho`` (each ``[D]``, the sites' values concatenated in
    ``source.site_names()`` order; σ = softplus(ρ)).

    The prototype (sites, plates, layout) is shared with ``source`` rather than rebuilt, so no
    model run — and no example input — is needed.
    """
    if source.prototype_trace is None:
        raise ValueError("the source guide is not set up yet; run it once (e.g. bnn.initialize(x)) first")
    total = sum(source._sizes)
    for what, t in (("loc", loc), ("rho", rho)):
        if t.shape != (total,):
            raise ValueError(f"{what} must have shape [{total}] (all sites, flat), got {tuple(t.shape)}")
    # the user's model, unwrapped where the source kept it (a 1-tuple, so it is never a submodule)
    model = source._raw_model[0] if hasattr(source, "_raw_model") else source.model
    mf = MeanField(model, init_loc_fn=source.init_loc_fn,
                   local_reparameterization=source.local_reparameterization,
                   create_plates=source.create_plates, **kwargs)
    mf.prototype_trace = source.prototype_trace
    mf._prototype_frames = dict(source._prototype_frames)
    mf._layout = dict(source._layout)
    mf._sizes = list(source._sizes)
    mf._index = dict(source._index)
    mf.flat.loc = torch.nn.Parameter(loc.detach().clone())
    mf.flat.rho = torch.nn.Parameter(rho.detach().clone())
    mf._finalizer = weakref.finalize(mf, _release, [f"{mf._uname}.{p}" for p in mf.flat_names])
    return mf


@GUIDES.register("hyper-mean-field")
class HyperMeanField(FlatGaussianGuide):
    """Mean-field Normal guide whose parameters are a learned function of the KL weight λ.

    :param model: any Pyro model (for a BNN, pass the class or a factory to ``pyrobnn.bayesian``).
    :param lam_range: Λ = (lo, hi), 0 ≤ lo < hi; λ outside it is rejected.
    :param kind: ``"linear"``, ``"lowrank"`` or ``"piecewise"`` (formulas in the module docstring).
    :param rank: r of the low-rank family (clipped per matrix to min(m, n)).
    :param num_knots: number of evenly spaced knots of the piecewise family (≥ 2), or
    :param knots: explicit increasing knots, first = lo and last = hi.
    :param init_scale: initial σ of every site (every λ).
    :param default_lam: the λ used until ``lam`` is set (default: hi).
    :param init_seed: seed of the low-rank factors' random initialisation (a private generator, so
        building the guide does not move the global RNG).

    At initialisation G(λ) is the same for every λ: the network's initial weights as μ and
    ``init_scale`` as σ (slopes and the low-rank factors U₂ start at 0, U₁ ~ N(0, 1), a = 1, c = ½).
    """

    def __init__(self, model, *, lam_range: Sequence[float] = (0.0, 1.0), kind: str = "linear", rank: int = 4,
                 num_knots: int = 5, knots: Optional[Sequence[float]] = None, init_scale: float = 1e-2,
                 default_lam: Optional[float] = None, init_seed: int = 0, init_loc_fn=init_to_median,
                 local_reparameterization: bool = True, create_plates=None):
        if kind not in KINDS:
            raise ValueError(f"HyperMeanField kind must be one of {KINDS}, got {kind!r}")
        if not isinstance(lam_range, (tuple, list)) or len(lam_range) != 2:
            raise ValueError(f"lam_range must be a pair (lo, hi), got {lam_range!r}")
        lo, hi = (_check_number("lam_range", v) for v in lam_range)
        if not (0 <= lo < hi):
            raise ValueError(f"lam_range must satisfy 0 ≤ lo < hi, got {(lo, hi)}")
        positive_int("rank", rank)
        if knots is None:
            integer("num_knots", num_knots, minimum=2)
            knots = torch.linspace(lo, hi, num_knots, dtype=torch.float64).tolist()
        else:
            knots = [_check_number("knots", k) for k in knots]
            if len(knots) < 2 or any(b <= a for a, b in zip(knots[:-1], knots[1:])):
                raise ValueError(f"knots must be ≥ 2 strictly increasing numbers, got {knots!r}")
            if abs(knots[0] - lo) > 1e-12 or abs(knots[-1] - hi) > 1e-12:
                raise ValueError(f"knots must start at lo={lo} and end at hi={hi}, got {knots!r}")
        positive_float("init_scale", init_scale)
        self.kind = kind
        self.lam_range = (lo, hi)
        self.rank = rank
        self.knots = [float(k) for k in knots]
        self.init_scale = float(init_scale)
        self.init_seed = int(init_seed)
        self._raw_model = (model,)   # a tuple, as AutoGuide keeps its model: never registered as a submodule
        self._lowrank_sites: Dict[str, Tuple[int, int, int]] = {}
        self.flat_names = ()
        super().__init__(model, init_loc_fn=init_loc_fn, local_reparameterization=local_reparameterization,
                         create_plates=create_plates)
        self.default_lam = hi if default_lam is None else self._check_lam(default_lam)
        self.lam = self.default_lam

    def config(self):
        return {"lam_range": list(self.lam_range), "kind": self.kind, "rank": self.rank, "knots": self.knots,
                "init_scale": self.init_scale, "default_lam": self.default_lam, "init_seed": self.init_seed,
                "local_reparameterization": self.local_reparameterization}

    # -- λ ----------------------------------------------------------------------------------------
    def _check_lam(self, lam) -> float:
        lam = _check_number("λ", lam)
        lo, hi = self.lam_range
        if not (lo <= lam <= hi):
            raise ValueError(f"λ = {lam} lies outside the guide's lam_range [{lo}, {hi}]")
        return lam

    @property
    def lam(self) -> float:
        """The KL weight the guide is currently conditioned on."""
        return self._lam

    @lam.setter
    def lam(self, value):
        self._lam = self._check_lam(value)

    @contextmanager
    def conditioned(self, lam):
        """``with guide.conditioned(λ):`` — the guide reads G(λ) inside the block."""
        old = self._lam
        self.lam = lam
        try:
            yield self
        finally:
            self._lam = old

    # -- parameters -------------------------------------------------------------------------------
    def _init_flat(self, init_loc, network=None):
        rho0 = torch.full_like(init_loc, _softplus_inv(self.init_scale))
        params: Dict[str, torch.Tensor] = {}
        if self.kind == "linear":
            params = {"loc_slope": torch.zeros_like(init_loc), "loc_bias": init_loc,
                      "rho_slope": torch.zeros_like(init_loc), "rho_bias": rho0}
        elif self.kind == "piecewise":
            k = len(self.knots)
            params = {"loc_knots": init_loc.expand(k, -1).clone(), "rho_knots": rho0.expand(k, -1).clone()}
        else:
            gen = torch.Generator().manual_seed(self.init_seed)
            params = {"loc_base": init_loc, "rho_base": rho0}
            for i, (name, (offset, n, shape, *_)) in enumerate(self._layout.items()):
                if len(shape) >= 2:
                    m, k = shape[0], n // shape[0]
                    r = min(self.rank, m, k)
                    self._lowrank_sites[name] = (i, m, k)
                    for p in ("loc", "rho"):
                        # As in LoRA: U₁ random, U₂ = 0, so the λ-term is exactly 0 at the start (every
                        # λ reads the same guide) while ∂/∂U₂ ∝ U₁ is not 0 and training can begin.
                        params[f"{p}_u1_{i}"] = torch.randn(m, r, generator=gen)
                        params[f"{p}_u2_{i}"] = torch.zeros(k, r)
                        params[f"{p}_a_{i}"] = torch.ones(r)
                        params[f"{p}_c_{i}"] = torch.full((r,), 0.5)
                else:
                    for p in ("loc", "rho"):
                        params[f"{p}_slope_{i}"] = torch.zeros(n)
        self.flat_names = tuple(params)
        return params

    def hyper_params(self, register: bool = False) -> Dict[str, torch.Tensor]:
        """The hypernetwork's own parameters by name (registered with Pyro when ``register``)."""
        return {p: (pyro.param(f"{self._uname}.{p}", getattr(self.flat, p)) if register else getattr(self.flat, p))
                for p in self.flat_names}

    def flat_at(self, lam, params: Optional[Dict[str, torch.Tensor]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(μ, ρ) of every site at λ, each a flat ``[D]`` tensor (differentiable in the parameters)."""
        if self.prototype_trace is None:
            raise ValueError("the guide is not set up yet; run it once (e.g. bnn.initialize(x)) first")
        lam = self._check_lam(lam)
        params = self.hyper_params() if params is None else params
        if self.kind == "linear":
            return (lam * params["loc_slope"] + params["loc_bias"],
                    lam * params["rho_slope"] + params["rho_bias"])
        if self.kind == "piecewise":
            j = max(0, min(len(self.knots) - 2, bisect.bisect_right(self.knots, lam) - 1))
            t = (lam - self.knots[j]) / (self.knots[j + 1] - self.knots[j])
            return tuple(torch.lerp(params[f"{p}_knots"][j], params[f"{p}_knots"][j + 1], t) for p in ("loc", "rho"))
        out = []
        for p in ("loc", "rho"):
            deltas = []
            for i, name in enumerate(self._layout):
                if name in self._lowrank_sites:
                    f = lam * params[f"{p}_a_{i}"] + params[f"{p}_c_{i}"]          # [r]
                    deltas.append(((params[f"{p}_u1_{i}"] * f) @ (params[f"{p}_u2_{i}"] * f).T).reshape(-1))
                else:
                    deltas.append(lam * params[f"{p}_slope_{i}"])
            out.append(params[f"{p}_base"] + torch.cat(deltas))
        return out[0], out[1]

    def _flat_params(self, register: bool = True):
        loc, rho = self.flat_at(self._lam, self.hyper_params(register))
        # σ = softplus(ρ) over the whole flat vector (one op and graph node, MeanField's fast CPU softplus)
        return {"loc": loc.split(self._sizes), "scale": softplus(rho).split(self._sizes)}

    def _site_params(self, flat, i, shape):
        return flat["loc"][i].view(shape), flat["scale"][i].view(shape), None

    # -- reading off a fixed guide ------------------------------------------------------------------
    @torch.no_grad()
    def at(self, lam) -> MeanField:
        """An ordinary :class:`MeanField` (softplus parameterisation) with parameters G(λ), detached.

        It is a plain ``AutoGuide`` over the same model: usable with ``pyro.infer.Predictive``, SVI
        fine-tuning, pruning and distillation; :func:`pyrobnn.inference.complexity.with_guide` puts
        it in a BNN for ``sample_outputs``/``evaluate``.
        """
        loc, rho = self.flat_at(lam)
        return mean_field_like(self, loc, rho, init_scale=self.init_scale)
