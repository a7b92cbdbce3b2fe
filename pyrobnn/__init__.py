"""pyrobnn — Bayesian neural networks as ordinary Pyro objects.

The vocabulary lives here: priors, guides, layers, :func:`bayesian`, likelihoods, metrics, sparsity,
diagnostics (ArviZ), io, data, config. How a posterior is reached and used (SVI loop, SG-MCMC kernels,
distillation, ...) lives in :mod:`pyrobnn.inference`; architectures in :mod:`pyrobnn.models`.
"""
from . import guides, likelihoods, metrics, priors, registry
from .bnn import BNN, bayesian
from .io import load, save
from .relevance import relevance
from . import sparsity  # pruning and export of sparse networks
from .diagnostics import to_inference_data  # the ArviZ bridge

__version__ = "0.1.0"
__all__ = ["BNN", "bayesian", "guides", "likelihoods", "load", "metrics", "priors", "registry", "save",
           "relevance", "sparsity", "to_inference_data"]
