"""Priors over network weights, as ``pyro.distributions`` distributions.

Each prior lives in its own module (one idea per file); all are importable from here and buildable
by name through :data:`pyrobnn.registry.PRIORS`.

A prior is either a scalar distribution that is expanded to each weight shape (``Gaussian``,
``LogUniform``, ...) or, when it needs latent hyper-parameters or works per kernel, an object with a
``sample_site(name, shape, infer)`` method that issues the Pyro sample sites itself (hierarchical ARD,
deep weight prior).
"""
from .gaussian import Gaussian
from .ard import ARD, EmpiricalARD, HierarchicalARD
from .log_uniform import LogUniform
from .deep_weight import DeepWeightPrior, KernelVAE

__all__ = ["Gaussian", "ARD", "EmpiricalARD", "HierarchicalARD", "LogUniform", "DeepWeightPrior", "KernelVAE"]
