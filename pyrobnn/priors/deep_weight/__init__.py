"""The deep weight prior (Atanov et al., 2019): an implicit prior over convolution kernels given by a VAE.

* :mod:`.vae` — the kernel VAE and its files;
* :mod:`.density` — :class:`DeepWeightPrior`, the distribution whose ``log_prob`` is the VAE's bound;
* :mod:`.pipeline` — making a prior: train source networks, collect and augment their kernels, fit the
  VAEs, save them; start a network at the prior's draws. It trains networks, so it sits above the
  BNN in the layer order and is not imported here.
"""
from .density import DeepWeightPrior
from .vae import KernelVAE, load_kernel_vaes, save_kernel_vaes, unit_kernels

__all__ = ["KernelVAE", "DeepWeightPrior", "save_kernel_vaes", "load_kernel_vaes", "unit_kernels"]
