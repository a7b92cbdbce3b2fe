"""Variational guides, as ``pyro.infer.autoguide.AutoGuide`` subclasses (one module per guide)."""
from .base import FlatGaussianGuide, GuideNormal, local_reparam_params
from .mean_field import MeanField
from .hyper import HyperMeanField, mean_field_like  # the λ-hypernetwork guide
from .additive_noise import AdditiveNoise, AdditiveNoiseNormal  # sparse variational dropout

__all__ = ["FlatGaussianGuide", "GuideNormal", "MeanField", "local_reparam_params",
           "HyperMeanField", "mean_field_like", "AdditiveNoise", "AdditiveNoiseNormal"]
