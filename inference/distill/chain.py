"""The online teacher of Bayesian dark knowledge (Korattikara et al. 2015): a running SGLD / pSGLD chain
over a BNN, advanced between student steps, whose current state is its one posterior draw."""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Tuple

import pyro
import pyro.poutine as poutine
import torch

from pyrobnn import inputs as _inputs
from pyrobnn.bnn import BNN
from pyrobnn.posterior import PRECISION_SITE as _PRECISION
from pyrobnn.posterior import stacked_outputs
from pyrobnn.validation import non_negative_int, positive_int

from ..sgld import PSGLD, SGLD
from .teachers import Teacher, _bnn_draws, _bnn_task, _capture, _submodule

__all__ = ["SGLDChain"]


class SGLDChain(Teacher):
    """A running SGLD / pSGLD chain over a BNN: the online teacher of Bayesian dark knowledge.

    :meth:`advance` makes one kernel update on the next minibatch of ``data`` (the model sees a batch
    of ``batch_size`` rows and scales its log-likelihood by N/M, as :func:`pyrobnn.inference.sample`
    drives the kernel); :meth:`draws` gives the network's outputs at the chain's *current* state
    (S = 1). Only the current state (and the kernel's own constant-size state: the last finite state,
    pSGLD's second moments) is held, so memory is flat in the number of updates.

    :param bnn: a :class:`pyrobnn.BNN` (its ``dataset_size`` defaults to ``len(data)``).
    :param data: ``(x, y)`` training tensors.
    :param kernel: ``"sgld"``, ``"psgld"`` or an :class:`~pyrobnn.inference.SGLD` / ``PSGLD`` instance on
        ``bnn.model``.
    :param step_size: a float, schedule or callable (kernel name only).
    :param burn_in: updates made before the first draw is used (run at the first :meth:`draws`, or by
        :meth:`burn`).
    :param seed: seeds the minibatch order (Pyro's RNG drives the noise; ``distill(seed=...)`` sets it).
    """
    online = True

    def __init__(self, bnn: BNN, data: Tuple[torch.Tensor, torch.Tensor], kernel="sgld", *, step_size=None,
                 batch_size: int = 32, burn_in: int = 0, seed: Optional[int] = None, **kernel_kwargs):
        if not isinstance(bnn, BNN):
            raise TypeError(f"SGLDChain needs a pyrobnn BNN, got {type(bnn).__name__}")
        if not (isinstance(data, (tuple, list)) and len(data) == 2 and _inputs.is_inputs(data[0])
                and isinstance(data[1], torch.Tensor)):
            raise TypeError("data must be an (x, y) pair of tensors (x: a tensor, a tuple or a dict of tensors)")
        x, y = bnn._check_x(data[0]), data[1]
        if _inputs.batch_size(x) != y.shape[0]:
            raise ValueError(f"x has {_inputs.batch_size(x)} examples but y has {y.shape[0]}")
        positive_int("batch_size", batch_size)
        non_negative_int("burn_in", burn_in)
        self.bnn, self.x, self.y = bnn, x, y
        self.task = _bnn_task(bnn)
        self.batch_size = min(batch_size, _inputs.batch_size(x))
        self.burn_in = burn_in
        if bnn.dataset_size is None:
            bnn.dataset_size = _inputs.batch_size(x)
        if isinstance(kernel, SGLD):
            if step_size is not None or kernel_kwargs:
                raise ValueError("pass step_size and kernel options to the kernel instance")
            if getattr(kernel.model, "__self__", None) is not bnn:
                raise ValueError("the kernel must be built on this BNN's model (SGLD(bnn.model, ...))")
            self.kernel = kernel
        elif isinstance(kernel, str) and kernel.lower() in ("sgld", "psgld"):
            cls = SGLD if kernel.lower() == "sgld" else PSGLD
            default = 1e-5 if cls is SGLD else 1e-3
            self.kernel = cls(bnn.model, default if step_size is None else step_size, **kernel_kwargs)
        else:
            raise ValueError(f"kernel must be 'sgld', 'psgld' or an SGLD/PSGLD instance, got {kernel!r}")
        self.generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())) if seed is None else seed)
        self._perm = torch.empty(0, dtype=torch.long)
        self._pos = 0
        self.params: Optional[Dict[str, torch.Tensor]] = None
        self.updates = 0
        self.posterior = self

    # -- the posterior protocol: the chain's current state is its one draw ----------------------------
    def parameter_draws(self, num_samples=None, *, generator=None) -> List[Dict[str, torch.Tensor]]:
        """``[the current state]`` (a running chain holds one draw)."""
        return [self.current()]

    def run(self, draw, x) -> torch.Tensor:
        return self.bnn.run({k: v for k, v in draw.items() if k != _PRECISION}, x)

    def outputs(self, x, num_samples=None, *, batch_size=None) -> torch.Tensor:
        """Outputs ``[1, B, ...]`` at the current state."""
        return stacked_outputs(self, self.parameter_draws(), x, batch_size)

    def network(self, draw=None):
        return self.bnn.net

    def _batch(self):
        if self._pos + self.batch_size > self._perm.shape[0]:
            self._perm = torch.randperm(_inputs.batch_size(self.x), generator=self.generator)
            self._pos = 0
        idx = self._perm[self._pos:self._pos + self.batch_size]
        self._pos += self.batch_size
        return _inputs.index(self.x, idx), self.y[idx]

    @contextlib.contextmanager
    def _stepping(self):
        saved = self.bnn.subsample_size
        self.bnn.subsample_size = None     # this chain supplies the minibatch
        try:
            with pyro.validation_enabled(False), poutine.block():
                yield
        finally:
            self.bnn.subsample_size = saved

    def _start(self):
        xb, yb = self._batch()
        with self._stepping():
            self.kernel.setup(0, xb, yb)
        self.params = self.kernel.initial_params

    def advance(self):
        if self.params is None:
            self._start()
        xb, yb = self._batch()
        with self._stepping():
            self.params = self.kernel.step(self.params, xb, yb)
        self.updates += 1

    def burn(self):
        """Run the remaining burn-in updates."""
        while self.updates < self.burn_in:
            self.advance()

    def current(self) -> Dict[str, torch.Tensor]:
        """The current state in constrained space ``{site: tensor}`` (a view, not a copy)."""
        if self.params is None:
            self._start()
        out = {}
        for name, transform in self.kernel._sites:
            v = self.params[name].detach()
            out[name] = v if transform is None else transform(v)
        return out

    def state_bytes(self):
        seen, total = set(), 0
        tensors = list((self.params or {}).values()) + self.kernel.kept_tensors()
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total

    def draws(self, x, num_samples=None, hidden=None):
        self.burn()
        state = self.current()
        precision = state.pop(_PRECISION, None)
        module = None if hidden is None else _submodule(self.bnn.net, hidden, "teacher")
        with _capture(module) as store:
            out = self.bnn.run(state, x)
        return _bnn_draws(self.bnn, out[None], None if precision is None else precision.reshape(1),
                          store[0] if store else None)
