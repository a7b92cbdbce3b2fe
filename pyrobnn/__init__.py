"""pyrobnn — Bayesian neural networks as ordinary Pyro objects.

The vocabulary lives here: priors, guides, layers, :func:`bayesian`, likelihoods, metrics, sparsity,
diagnostics (ArviZ), io, data, config. How a posterior is reached and used (SVI loop, SG-MCMC kernels,
distillation, ...) lives in :mod:`pyrobnn.inference`; architectures in :mod:`pyrobnn.models`.

The names below are imported on first use (PEP 562), so ``import pyrobnn`` — and ``pyrobnn --help`` —
does not pay for importing torch and Pyro until something needs them.
"""
import importlib
import sys
import types

__version__ = "0.1.0"

# attribute -> (submodule, name in it or None for the submodule itself)
_LAZY = {
    "BNN": (".bnn", "BNN"), "bayesian": (".bnn", "bayesian"),
    "RandomModule": (".randomize", "RandomModule"), "random_module": (".randomize", "random_module"),
    "load": (".io", "load"), "save": (".io", "save"),
    "to_inference_data": (".diagnostics", "to_inference_data"),
    "guides": (".guides", None), "likelihoods": (".likelihoods", None), "metrics": (".metrics", None),
    "posterior": (".posterior", None), "priors": (".priors", None), "registry": (".registry", None),
    "sparsity": (".sparsity", None),
}
__all__ = ["BNN", "RandomModule", "bayesian", "random_module", "guides", "likelihoods", "load", "metrics", "posterior", "priors", "registry", "save",
           "relevance", "sparsity", "to_inference_data"]


def __getattr__(name):
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = importlib.import_module(module, __name__)
        value = value if attr is None else getattr(value, attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pyrobnn' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """``pyrobnn.relevance`` is the function :func:`pyrobnn.relevance.relevance`, although a submodule of
    that name exists: importing the submodule (which binds it on the package) must not hide the function."""

    @property
    def relevance(self):
        from .relevance import relevance
        return relevance

    @relevance.setter
    def relevance(self, value):
        pass


sys.modules[__name__].__class__ = _Package
