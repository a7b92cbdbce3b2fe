"""Variational guides, as ``pyro.infer.autoguide.AutoGuide`` subclasses (one module per guide)."""
from .base import FlatGaussianGuide, GuideNormal, local_reparam_params
from .mean_field import MeanField

__all__ = ["FlatGaussianGuide", "GuideNormal", "MeanField", "local_reparam_params"]
from .hyper import HyperMeanField, mean_field_like  # noqa: E402  (issue 8: λ-hypernetwork guide)
__all__ += ["HyperMeanField", "mean_field_like"]
from .additive_noise import AdditiveNoise, AdditiveNoiseNormal  # noqa: E402  (issue 3: sparse VD)
__all__ += ["AdditiveNoise", "AdditiveNoiseNormal"]
