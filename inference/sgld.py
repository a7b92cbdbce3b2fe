"""Stochastic-gradient Langevin dynamics (SGLD) and preconditioned SGLD (pSGLD) as Pyro MCMC kernels.

Both are ``pyro.infer.mcmc.MCMCKernel`` subclasses, so they run under ``pyro.infer.MCMC`` like HMC/NUTS::

    bnn.subsample_size = 128                       # the model draws its own minibatch
    mcmc = pyro.infer.MCMC(SGLD(bnn.model, step_size=1e-5), num_samples=200, warmup_steps=500)
    mcmc.run(x_train, y_train)                     # full data; the plate picks M rows per step

Minibatches. The model takes the full data and subsamples it with ``pyro.plate(..., subsample_size=M)``;
Pyro then scales the minibatch log-likelihood by N/M itself. Pyro's ``initialize_model`` (used by
HMC/NUTS) refuses such models, so these kernels build their own potential: each step re-runs the model
with the latent sites fixed to the current state (a fresh minibatch each time), skips the plate's
subsample site, and sums every site's scaled, masked log-density.

The state lives in unconstrained space: a site with support S is reached through ``biject_to(S)`` and
the log |det Jacobian| is added to the log-density. Real-support sites (every weight of a BNN) skip the
transform entirely, so a network's hot path is one model run, one backward, one update.

Update rules (Welling & Teh 2011; Li et al. 2016), with U(θ) = −log p(θ) − (N/M) Σ_batch log p(y|x,θ)
and η_t the step size at update t, T the temperature (1 = the posterior)::

    SGLD:   θ ← θ − (η_t/2) ∇U + N(0, η_t T)
    pSGLD:  V ← βV + (1−β) (∇U)²,   P = 1 / (λ + √V)
            θ ← θ − (η_t/2) P ∇U + N(0, η_t T P)          (the small Γ correction term is dropped)

Counting. One call of :meth:`SGLD.sample` is one update during warm-up and ``thin`` updates afterwards,
so ``MCMC(num_samples=S, warmup_steps=W)`` performs W + S·thin updates and keeps S draws.

Memory. ``pyro.infer.MCMC`` keeps every draw of every site it saves (and copies them once more when
it stacks them at the end). For a 266k-weight LeNet-300-100 that is ≈1 MB per draw, ≈2 GB for 1000
draws. Trade-offs, from cheapest to most expensive in information: ``thin`` (fewer, less correlated
draws — almost free, since consecutive SGLD draws are strongly autocorrelated anyway),
``MCMC(..., save_params=[...])`` (keep only the listed sites; the others cannot be used for
prediction afterwards), or :func:`pyrobnn.inference.sample` (a cap on kept draws that thins adaptively,
optional half-precision storage, and function-space outputs recorded on the fly).

State. SGLD updates the state tensors in place (kernel-owned copies: the tensors a caller passes in,
``initial_params`` included, are never written): a state dict returned by :meth:`SGLD.step` /
:meth:`SGLD.sample` is overwritten by the next update that is given it — clone what you keep
(``pyro.infer.MCMC`` copies every kept draw; :func:`pyrobnn.inference.sample` does too).

Divergences. An update whose starting state has a NaN/inf potential is not taken: the chain returns
to its last state with a finite potential (for SGLD by subtracting the last increment, exact up to
rounding). A kept draw is such a state only until the next update
evaluates it, so ``diagnostics()["divergences"]`` lists the indices of the kept draws found divergent
that way (as ``arviz.from_pyro`` reads them: those draws are flagged ``diverging``);
``"divergent updates"`` counts all rejected updates, warm-up and thinned-away states included.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Union

import pyro.poutine as poutine
import torch
from pyro.infer.autoguide.initialization import InitMessenger, init_to_sample
from pyro.infer.mcmc.mcmc_kernel import MCMCKernel
from pyro.poutine.subsample_messenger import _Subsample
from torch.distributions import biject_to

from pyrobnn.site_dist import is_real_support as _is_real
from pyrobnn.validation import non_negative_float, positive_float, positive_int

from .log_joint import _LogJoint, add_prior_gradients
from .step_size import (ConstantStepSize, CyclicalStepSize, PolynomialDecay, StepSize,  # noqa: F401 (public here too)
                        as_schedule)

__all__ = ["StepSize", "ConstantStepSize", "PolynomialDecay", "CyclicalStepSize", "as_schedule",
           "SGLD", "PSGLD", "init_to_network_default"]


# ----------------------------------------------------------------------------------------------------
# initialisation
# ----------------------------------------------------------------------------------------------------
def init_to_network_default(site=None):
    """Initial values the way PyTorch initialises Linear/Conv layers: U(−1/√fan_in, 1/√fan_in) for a
    weight ``[out, in, *k]`` (fan_in = in·Πk); a bias ``[out]`` gets the bound of its sibling weight when
    the site is named ``"<prefix>.bias"`` and the weight ``"<prefix>.weight"`` has been seen, else 1.
    Other sites (e.g. a noise precision) start at a prior draw. A fresh draw at every call, so chains
    start at different points (unlike the network's own fixed initial weights)."""
    if site is None:
        return init_to_network_default
    return _NetworkInit()(site)


class _NetworkInit:
    def __init__(self, dtype: Optional[torch.dtype] = None):
        self.fan_in: Dict[str, int] = {}
        self.dtype = dtype  # a BNN's: its network's (a float32 prior must not make a float64 network's weights float32)

    def __call__(self, site):
        name, fn = site["name"], site["fn"]
        shape = fn.batch_shape + fn.event_shape
        support = fn.support
        if _is_real(support) and len(shape) >= 1:
            prefix, _, leaf = name.rpartition(".")
            if len(shape) >= 2:
                fan_in = math.prod(shape[1:])
                self.fan_in[prefix] = fan_in
            else:
                fan_in = self.fan_in.get(prefix, 1) if leaf == "bias" else 1
            bound = 1.0 / math.sqrt(fan_in)
            like = fn.mean  # the site's dtype and device
            return torch.empty(shape, dtype=self.dtype or like.dtype, device=like.device).uniform_(-bound, bound)
        return init_to_sample(site)


# ----------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------
class SGLD(MCMCKernel):
    """Stochastic-gradient Langevin dynamics for any Pyro model with continuous latent sites.

    :param model: a Pyro model; give it the full data and let a ``pyro.plate(..., subsample_size=M)``
        choose the minibatch (for a :class:`pyrobnn.BNN`: ``bnn.model`` with ``bnn.subsample_size = M``,
        or ``mcmc.run(x, y, subsample_size=M)``).
    :param step_size: η — a float, a :class:`StepSize` schedule (constant, :class:`PolynomialDecay`,
        :class:`CyclicalStepSize`) or a callable ``t -> η``; ``t`` counts updates, warm-up included.
    :param thin: updates per kept draw after warm-up (warm-up calls do one update each).
    :param temperature: T; the injected noise has variance η·T (T < 1: a "cold" posterior).
    :param init_strategy: a Pyro init function (site → constrained value). Default: for a BNN's model
        :func:`init_to_network_default` (PyTorch-style fan-in init, a fresh draw per chain), else
        ``init_to_sample`` (a prior draw).
    :param transforms: optional ``{site: transform}`` from constrained to unconstrained space; by
        default ``biject_to(support).inv``.

    ``initial_params`` (property) are unconstrained values ``{site: tensor}``, as for HMC.
    """

    def __init__(self, model: Callable, step_size: Union[float, StepSize, Callable] = 1e-4, *,
                 thin: int = 1, temperature: float = 1.0, init_strategy: Optional[Callable] = None,
                 transforms: Optional[Dict[str, Any]] = None):
        if not callable(model):
            raise TypeError(f"model must be a callable Pyro model, got {type(model).__name__}")
        positive_int("thin", thin)
        non_negative_float("temperature", temperature)
        self.model = model
        self.schedule = as_schedule(step_size)
        self.thin = thin
        self.temperature = float(temperature)
        self._init_strategy = init_strategy
        self._user_transforms = transforms
        self.transforms = None
        self._initial_params = None
        self._reset()

    # -- protocol: state ---------------------------------------------------------------------------
    def _reset(self):
        self._t = 0                      # updates performed (drives the schedule)
        self._calls = 0                  # sample() calls (warm-up + draws)
        self._warmup_steps = 0
        self._warmup = True
        self._divergences: List[int] = []
        self._num_divergent_updates = 0
        self._potential_trace: List[float] = []
        self._step_size_trace: List[float] = []
        self._last_potential = float("nan")
        self._last_step_size = float("nan")
        self._last_good = None
        self._owned: Optional[List[torch.Tensor]] = None   # state tensors updated in place (SGLD)
        self._undo = None                                   # (increments, scale) of the last update
        self._increments: Optional[List[torch.Tensor]] = None
        self._increments_for = None                         # the state list they were last checked against
        self._diverged = False
        self._args, self._kwargs = (), {}
        self._sites: List[tuple] = []    # (name, transform or None)
        self._reset_state()

    def _reset_state(self):
        """Per-chain optimiser state of subclasses (pSGLD's second-moment estimate)."""

    @property
    def initial_params(self):
        return self._initial_params

    @initial_params.setter
    def initial_params(self, params):
        if params is not None:
            if not isinstance(params, dict) or not all(isinstance(v, torch.Tensor) for v in params.values()):
                raise TypeError("initial_params must be a dict {site name: unconstrained tensor}")
            params = {k: v.detach() for k, v in params.items()}
        self._initial_params = params

    @property
    def step_size(self) -> float:
        """The step size of the most recent update."""
        return self._last_step_size

    # -- protocol: set-up --------------------------------------------------------------------------
    def _default_init(self):
        from pyrobnn.bnn import BNN
        bnn = getattr(self.model, "__self__", None)
        if isinstance(bnn, BNN):
            return _NetworkInit(bnn._input_dtype())
        return init_to_sample

    def setup(self, warmup_steps, *args, **kwargs):
        """Trace the model once (initial values from ``init_strategy``), find its latent sites and their
        transforms, and set ``initial_params`` if none were given."""
        keep_initial = self._initial_params
        self._reset()
        self._initial_params = keep_initial
        self._warmup_steps = int(warmup_steps)
        self._warmup = self._warmup_steps > 0
        self._args, self._kwargs = args, kwargs
        init_fn = self._init_strategy or self._default_init()
        with poutine.block(), torch.no_grad():
            trace = poutine.trace(InitMessenger(init_fn)(self.model)).get_trace(*args, **kwargs)
        sites, transforms, init = [], {}, {}
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site["is_observed"] or isinstance(site["fn"], _Subsample):
                continue
            fn = site["fn"]
            if fn.support.is_discrete:
                raise ValueError(f"{type(self).__name__} needs continuous latent sites; site {name!r} is discrete")
            for frame in site["cond_indep_stack"]:
                if frame.full_size is not None and frame.full_size != frame.size:
                    raise ValueError(f"latent site {name!r} lies inside the subsampled plate {frame.name!r}; "
                                     "local latent variables are not supported by SG-MCMC kernels")
            if self._user_transforms is not None and name in self._user_transforms:
                to_unconstrained = self._user_transforms[name]
                transform = to_unconstrained.inv
            elif _is_real(fn.support):
                to_unconstrained, transform = None, None
            else:
                transform = biject_to(fn.support)
                to_unconstrained = transform.inv
            if to_unconstrained is not None:
                transforms[name] = to_unconstrained
            sites.append((name, transform))
            value = site["value"].detach()
            init[name] = value if to_unconstrained is None else to_unconstrained(value).detach()
        if not sites:
            raise ValueError("the model has no latent sample sites to sample")
        self._sites = sites
        self.transforms = transforms
        if self._initial_params is None:
            self._initial_params = init
        else:
            missing = [n for n, _ in sites if n not in self._initial_params]
            if missing:
                raise ValueError(f"initial_params lack sites {missing}")
            for n, _ in sites:
                want = init[n].shape
                if self._initial_params[n].shape != want:
                    raise ValueError(f"initial_params[{n!r}] has shape {tuple(self._initial_params[n].shape)}, "
                                     f"the site has {tuple(want)}")
        self._last_good = self._initial_params

    def cleanup(self):
        # as HMC: the next chain (sequential chain method) starts from a fresh init unless MCMC sets one
        self._initial_params = None

    def end_warmup(self):
        """Leave warm-up: later calls of :meth:`sample` do ``thin`` updates and record their statistics.
        Called automatically after ``warmup_steps`` calls (``pyro.infer.MCMC`` does not call it)."""
        self._warmup = False

    # -- the step ----------------------------------------------------------------------------------
    def potential_and_grad(self, params: Dict[str, torch.Tensor], *args, **kwargs):
        """U(θ) = −log p(θ, minibatch) − log|det J| at unconstrained ``params``, and ∇U (a list in site
        order). Runs the model once (a fresh minibatch from its subsample plate)."""
        leaves, values, direct = [], {}, {}
        logdet = 0.0
        for name, transform in self._sites:
            u = params[name].detach().requires_grad_()
            if transform is None:
                values[name] = u
                direct[id(u)] = len(leaves)
            else:
                v = transform(u)
                values[name] = v
                logdet = logdet + transform.log_abs_det_jacobian(u, v).sum()
            leaves.append(u)
        joint = _LogJoint(values)
        with joint:
            self.model(*args, **kwargs)
        # the Gaussian prior of real sites has its gradient in closed form: no backward node for it
        total, differentiable, prior_grads = joint.log_joint_split(direct)
        if isinstance(logdet, torch.Tensor):
            total = total + logdet.detach()
            differentiable = logdet if differentiable is None else differentiable + logdet
        potential = -total
        if differentiable is not None and differentiable.requires_grad:
            grads = list(torch.autograd.grad(-differentiable, leaves, allow_unused=bool(prior_grads)))
        elif prior_grads:
            grads = [None] * len(leaves)
        else:
            raise ValueError("the model's log-density does not depend on its latent sites")
        if prior_grads:
            add_prior_gradients(grads, prior_grads)  # ∂U/∂v of U = −c‖v − loc‖² is −2c(v − loc)
            for i, g in enumerate(grads):
                if g is None:
                    grads[i] = torch.zeros_like(leaves[i])
        return potential.detach(), tuple(grads)

    def _update(self, zs: List[torch.Tensor], grads, eta: float, explore: bool) -> List[torch.Tensor]:
        """θ ← θ − (η/2)∇U + √(ηT)·ξ, in place on kernel-owned state tensors (an update that writes the
        state where it already is, hot in cache, measures ≈5 % of a LeNet-300-100 step faster than
        writing a fresh copy). The increment is kept until the next update, so a divergent next state
        can be undone (:meth:`_return_to_last_good`)."""
        zs = self._own(zs)
        noise = math.sqrt(eta * self.temperature) if not explore and self.temperature > 0 else 0.0
        if noise > 0:
            # one buffer per site, reused every update (keeping a fresh tensor alive for the undo
            # measured ≈5 % of a step; the reused buffer ≈1.5 %)
            increments = self._increment_buffers(zs)
            for z, g, d in zip(zs, grads, increments):
                d.normal_()                               # ξ: the numbers torch.randn_like(z) would give
                d.add_(g, alpha=-0.5 * eta / noise)       # ξ − (η/2)∇U/√(ηT)
                z.add_(d, alpha=noise)                    # θ − (η/2)∇U + √(ηT)ξ
            self._undo = (increments, noise)
        else:
            grads = list(grads)
            torch._foreach_add_(zs, grads, alpha=-0.5 * eta)
            self._undo = (grads, -0.5 * eta)
        return zs

    def step(self, params: Dict[str, torch.Tensor], *args, **kwargs) -> Dict[str, torch.Tensor]:
        """One update from unconstrained ``params`` with the model run on ``(*args, **kwargs)`` — the
        streaming entry point (:func:`pyrobnn.inference.sample` passes one data batch per step).
        SGLD returns its own state tensors, which the next call given them updates in place."""
        eta = self.schedule(self._t)
        explore = self.schedule.is_exploring(self._t)
        potential, grads = self.potential_and_grad(params, *args, **kwargs)
        pe = potential.item()
        self._t += 1
        self._last_step_size = eta
        if not math.isfinite(pe):
            # a divergent state: do not move from it; go back to the last state with a finite potential
            self._last_potential = pe
            self._diverged = True
            return self._return_to_last_good()
        self._last_potential = pe
        self._last_good = params
        new = self._update([params[n] for n, _ in self._sites], grads, eta, explore)
        return {n: v for (n, _), v in zip(self._sites, new)}

    def _own(self, zs: List[torch.Tensor]) -> List[torch.Tensor]:
        """The state tensors to update in place: ``zs`` if they are the ones this kernel returned last,
        else kernel-owned copies (a caller's tensors — ``initial_params`` included — are never written)."""
        owned = self._owned
        if owned is not None and len(owned) == len(zs) and all(a is b for a, b in zip(owned, zs)):
            return owned
        self._owned = [z.detach().clone(memory_format=torch.contiguous_format) for z in zs]
        self._undo = None
        return self._owned

    def _increment_buffers(self, zs: List[torch.Tensor]) -> List[torch.Tensor]:
        bufs = self._increments
        if bufs is not None and zs is self._owned and self._increments_for is zs:
            return bufs  # the kernel's own state, for which these buffers were checked
        if bufs is None or len(bufs) != len(zs) or any(
                b.shape != z.shape or b.dtype != z.dtype or b.device != z.device for b, z in zip(bufs, zs)):
            bufs = self._increments = [torch.empty_like(z, memory_format=torch.contiguous_format) for z in zs]
        self._increments_for = zs if zs is self._owned else None
        return bufs

    def kept_tensors(self) -> List[torch.Tensor]:
        """Every tensor the kernel holds between updates: the state it updates in place (or the last
        state given), the last increment (for undoing a divergent update) and optimiser state."""
        state = self._owned if self._owned is not None else list((self._last_good or {}).values())
        return list(state) + list(self._increments or []) + self._optimizer_state()

    def _optimizer_state(self) -> List[torch.Tensor]:
        return []

    def _return_to_last_good(self) -> Dict[str, torch.Tensor]:
        """After a divergent state: subtract the increment that led there from the kernel's state (the
        previous state, up to rounding), or — before any update — the last state given."""
        if self._undo is not None:
            increments, scale = self._undo
            self._undo = None
            for z, d in zip(self._owned, increments):
                z.sub_(d, alpha=scale)
        if self._owned is not None:
            return {n: v for (n, _), v in zip(self._sites, self._owned)}
        return self._last_good

    def sample(self, params):
        """One call of the MCMC driver: one update in warm-up, ``thin`` updates afterwards."""
        if self._warmup and self._calls >= self._warmup_steps:
            self.end_warmup()
        n = 1 if self._warmup else self.thin
        for i in range(n):
            self._diverged = False
            params = self.step(params, *self._args, **self._kwargs)
            if self._diverged:
                self._num_divergent_updates += 1
                # the state this update started from is the previous call's draw when i == 0
                draw = self._calls - 1 - self._warmup_steps
                if i == 0 and draw >= 0:
                    self._divergences.append(draw)
        if not self._warmup:
            self._potential_trace.append(self._last_potential)
            self._step_size_trace.append(self._last_step_size)
        self._calls += 1
        return params

    # -- protocol: reporting -----------------------------------------------------------------------
    def logging(self):
        return OrderedDict([("step size", f"{self._last_step_size:.2e}"),
                            ("potential", f"{self._last_potential:.4g}")])

    def diagnostics(self):
        """``divergences`` (draw indices, as ``arviz.from_pyro`` reads them), and per draw the minibatch
        ``potential_energy`` U (at the state the draw's last update started from) and ``step_size``."""
        return {"divergences": list(self._divergences),
                "divergent updates": self._num_divergent_updates,
                "potential_energy": list(self._potential_trace),
                "step_size": list(self._step_size_trace)}

    def config(self) -> Dict[str, Any]:
        return {"kernel": type(self).__name__.lower(), "schedule": type(self.schedule).__name__,
                "schedule_config": self.schedule.config(), "thin": self.thin, "temperature": self.temperature}


class PSGLD(SGLD):
    """Preconditioned SGLD (Li et al. 2016): an RMSProp-style diagonal preconditioner
    P = 1/(λ + √V), V ← βV + (1−β)(∇U)², scales both the drift and the noise. V starts at the first
    squared gradient (not at 0, which would make the first steps huge). The Γ(θ) correction term is
    dropped, as in the paper's experiments; it is O(1−β) small when V changes slowly.

    :param alpha: β, the moving-average decay of the squared gradient.
    :param eps: λ, the diagonal bias of the preconditioner.

    Other arguments as :class:`SGLD`. Step sizes are on a different scale than SGLD's: P ≈ 1/|∇U|.
    """

    def __init__(self, model, step_size=1e-3, *, alpha: float = 0.99, eps: float = 1e-5, **kwargs):
        if not (isinstance(alpha, (int, float)) and 0 <= alpha < 1):
            raise ValueError(f"alpha must lie in [0, 1), got {alpha!r}")
        self.alpha = float(alpha)
        self.eps = positive_float("eps", eps)
        super().__init__(model, step_size, **kwargs)

    def _reset_state(self):
        self._square_avg: Optional[List[torch.Tensor]] = None

    def _optimizer_state(self):
        return list(self._square_avg or [])

    def _update(self, zs, grads, eta, explore):
        grads = list(grads)
        if self._square_avg is None:
            self._square_avg = [g * g for g in grads]
        else:
            torch._foreach_mul_(self._square_avg, self.alpha)
            torch._foreach_addcmul_(self._square_avg, grads, grads, value=1.0 - self.alpha)
        precond = torch._foreach_sqrt(self._square_avg)
        torch._foreach_add_(precond, self.eps)
        torch._foreach_reciprocal_(precond)
        drift = torch._foreach_mul(grads, precond)
        new = torch._foreach_add(zs, drift, alpha=-0.5 * eta)
        if not explore and self.temperature > 0:
            scale = eta * self.temperature
            for p, pc in zip(new, precond):
                p.addcmul_(torch.randn_like(p), pc.mul_(scale).sqrt_())
        return new

    def config(self):
        return {**super().config(), "alpha": self.alpha, "eps": self.eps}
