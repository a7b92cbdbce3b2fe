"""Step-size schedules for the SG-MCMC kernels (:class:`pyrobnn.inference.SGLD`, :class:`pyrobnn.inference.PSGLD`):
η_t as a function of the update count t."""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Union

from pyrobnn.validation import positive_float, positive_int, probability, real

__all__ = ["StepSize", "ConstantStepSize", "PolynomialDecay", "CyclicalStepSize", "as_schedule"]


class StepSize:
    """A step-size schedule: ``schedule(t)`` is η at update ``t = 0, 1, ...`` (warm-up included)."""

    def __call__(self, t: int) -> float:
        raise NotImplementedError

    def is_exploring(self, t: int) -> bool:
        """True where the schedule asks for an optimisation (noise-free) update; see
        :class:`CyclicalStepSize`."""
        return False

    def config(self) -> Dict[str, Any]:
        return {}

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


class ConstantStepSize(StepSize):
    """η_t = ``step_size``."""

    def __init__(self, step_size: float):
        self.step_size = positive_float("step_size", step_size)

    def __call__(self, t):
        return self.step_size

    def config(self):
        return {"step_size": self.step_size}


class PolynomialDecay(StepSize):
    """η_t = a (b + t)^(−γ) (Welling & Teh 2011). γ ∈ (0.5, 1] satisfies the Robbins–Monro conditions
    Σ η_t = ∞, Σ η_t² < ∞; γ ≈ 0.55 is the usual choice."""

    def __init__(self, a: float, b: float = 1.0, gamma: float = 0.55):
        self.a = positive_float("a", a)
        self.b = positive_float("b", b)
        self.gamma = probability("gamma", gamma)

    def __call__(self, t):
        return self.a * (self.b + t) ** (-self.gamma)

    def config(self):
        return {"a": self.a, "b": self.b, "gamma": self.gamma}


class CyclicalStepSize(StepSize):
    """Cyclical SG-MCMC (Zhang et al. 2020): ``num_cycles`` cosine cycles over ``num_steps`` updates,

        η_t = (η₀/2) [cos(π · mod(t, ⌈K/C⌉) / ⌈K/C⌉) + 1],

    so each cycle starts with large steps (escaping to a new mode) and ends with small ones (sampling
    it). With ``exploration > 0`` the first fraction of each cycle is an exploration stage:
    :meth:`is_exploring` is true there and the kernels take noise-free (SGD) steps; draws from that
    stage should be discarded (:func:`pyrobnn.inference.sample` does; ``pyro.infer.MCMC`` keeps
    every draw, so leave ``exploration=0`` there).
    """

    def __init__(self, step_size: float, num_steps: int, num_cycles: int = 4, exploration: float = 0.0):
        self.step_size = positive_float("step_size", step_size)
        positive_int("num_steps", num_steps)
        positive_int("num_cycles", num_cycles)
        if num_cycles > num_steps:
            raise ValueError(f"num_cycles ({num_cycles}) cannot exceed num_steps ({num_steps})")
        real("exploration", exploration, minimum=0.0, maximum=1.0, exclusive_maximum=True)
        self.num_steps, self.num_cycles, self.exploration = num_steps, num_cycles, float(exploration)
        self.cycle_length = math.ceil(num_steps / num_cycles)

    def _phase(self, t):
        return (t % self.cycle_length) / self.cycle_length

    def __call__(self, t):
        return 0.5 * self.step_size * (math.cos(math.pi * self._phase(t)) + 1.0)

    def is_exploring(self, t):
        return self._phase(t) < self.exploration

    def config(self):
        return {"step_size": self.step_size, "num_steps": self.num_steps, "num_cycles": self.num_cycles,
                "exploration": self.exploration}


class _CallableStepSize(StepSize):
    def __init__(self, fn):
        self.fn = fn

    def __call__(self, t):
        return float(self.fn(t))


def as_schedule(step_size: Union[float, StepSize, Callable[[int], float]]) -> StepSize:
    """A float → :class:`ConstantStepSize`; a schedule passes through; any callable ``t -> η`` is wrapped."""
    if isinstance(step_size, StepSize):
        return step_size
    if isinstance(step_size, (int, float)) and not isinstance(step_size, bool):
        return ConstantStepSize(step_size)
    if callable(step_size):
        return _CallableStepSize(step_size)
    raise TypeError(f"step_size must be a positive float, a StepSize or a callable t -> float, got {step_size!r}")
