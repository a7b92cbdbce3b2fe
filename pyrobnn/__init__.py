"""pyrobnn — Bayesian neural networks as ordinary Pyro objects.

The vocabulary lives here: priors, guides, layers, :func:`bayesian`, likelihoods, metrics, sparsity,
diagnostics (ArviZ), io, data, config. How a posterior is reached and used (SVI loop, SG-MCMC kernels,
distillation, ...) lives in :mod:`pyrobnn.inference`; architectures in :mod:`pyrobnn.models`.
"""
from . import guides, likelihoods, metrics, priors, registry
from .bnn import BNN, bayesian
from .io import load, save
from .randomize import RandomModule, random_module

__version__ = "0.1.0"
__all__ = ["BNN", "RandomModule", "bayesian", "random_module", "guides", "likelihoods", "load", "metrics", "priors", "registry", "save"]
from .relevance import relevance  # noqa: E402  (issue 4)

__all__ += ["relevance"]
from . import sparsity  # noqa: E402  (issue 3: sparse VD pruning and export)
__all__ += ["sparsity"]
from .diagnostics import to_inference_data  # noqa: E402  (issue 5: ArviZ bridge)
__all__ += ["to_inference_data"]
