"""Test-time augmentation (TTA) for posterior ensembles, greedy policy search and mean embeddings.

Ashukha et al. (2020), "Pitfalls of in-domain uncertainty estimation and ensembling in deep learning":

* **per-draw TTA** — p(y|x) = 1/(S·A) Σ_s Σ_a p(y | x̂_{s,a}, θ_s), x̂_{s,a} ~ p_aug(·|x): every posterior
  draw θ_s (a guide sample, an SGLD draw or an ensemble member) sees its *own* A random augmentations;
  **classic TTA** gives all draws the same A augmentations. Both cost S·A forward passes.
* **greedy policy search** — a pool of random sub-policies (2–3 transforms with random magnitudes);
  starting from the empty policy, add (with replacement) the sub-policy whose inclusion most improves the
  *calibrated* log-likelihood on a validation split, and stop when no candidate improves it.
* **mean embeddings (MeTTA)** — a layer's activations averaged over augmentations of the input, read
  with a forward hook; a linear probe on them vs on central (un-augmented) embeddings.

Images are float tensors ``[B, C, H, W]`` in [0, 1]. Augmentations are applied to whole batches: the
geometric transforms of a sub-policy are composed into one per-image 2×3 matrix and applied with a
single ``affine_grid``/``grid_sample``; the photometric ones are ``torchvision.transforms.v2.functional``
ops run on the whole batch, selected per image with ``torch.where``. Nothing loops over images in Python;
the only Python loops are over posterior draws and over the (few) sub-policies of a policy.

Posterior draws plug in through :class:`Draws`: a list of callables ``x [N, ...] -> logits [N, K]``, one
per draw, built from any :class:`pyrobnn.posterior.Posterior` (``Draws.from_posterior``; the functions
here also take a posterior directly), ``Draws.from_bnn`` or ``Draws.from_ensemble``.

One module per idea: :mod:`~pyrobnn.inference.tta.augment` (transforms and policies),
:mod:`~pyrobnn.inference.tta.draws`, :mod:`~pyrobnn.inference.tta.predictive` (the TTA predictive),
:mod:`~pyrobnn.inference.tta.search` (greedy policy search), :mod:`~pyrobnn.inference.tta.embeddings`
(MeTTA and a linear probe) and :mod:`~pyrobnn.inference.tta.loader` (training-time augmentation).
"""
from .augment import OPS, POLICY_FORMAT, Policy, SubPolicy, Transform, default_policy
from .draws import Draws, as_draws
from .embeddings import embeddings, linear_probe
from .loader import AugmentedLoader
from .predictive import evaluate_tta, member_outputs, tta_predict
from .search import SearchResult, greedy_policy_search, sample_pool

__all__ = ["OPS", "Transform", "SubPolicy", "Policy", "Draws", "as_draws", "member_outputs", "tta_predict",
           "evaluate_tta", "sample_pool", "greedy_policy_search", "SearchResult", "embeddings",
           "linear_probe", "AugmentedLoader", "default_policy"]
