"""How a posterior is reached and used: the SVI loop, SG-MCMC kernels, distillation, TTA, ..."""
from .elbo import MeanFieldELBO
from .fit import History, TrainingDiverged, fit, latest_checkpoint, load_checkpoint

__all__ = ["MeanFieldELBO", "History", "TrainingDiverged", "fit", "latest_checkpoint", "load_checkpoint"]
from .complexity import (complexity_loss, complexity_weight, fit_complexity, prune, pruning_curve,  # noqa: E402
                         removable_fraction, sample_lams, with_guide)
__all__ += ["complexity_loss", "complexity_weight", "fit_complexity", "prune", "pruning_curve",
            "removable_fraction", "sample_lams", "with_guide"]
from .sampling import SamplePosterior, sample  # noqa: E402
from .sgld import PSGLD, SGLD, ConstantStepSize, CyclicalStepSize, PolynomialDecay, StepSize  # noqa: E402

__all__ += ["SGLD", "PSGLD", "StepSize", "ConstantStepSize", "PolynomialDecay", "CyclicalStepSize", "sample",
            "SamplePosterior"]
from .distill import (Adversarial, Deterministic, DistillRecord, MCDropout, SGLDChain, distill,  # noqa: E402
                      distillation_loss, evaluate_distillation, load_student, save_student)
from .supervised import train_deterministic  # noqa: E402

__all__ += ["distill", "distillation_loss", "DistillRecord", "SGLDChain", "MCDropout", "Deterministic", "Adversarial",
            "evaluate_distillation", "train_deterministic", "save_student", "load_student"]
from .distributed import DataParallel, chain_seed, fit_distributed, sample_chains  # noqa: E402

__all__ += ["DataParallel", "fit_distributed", "sample_chains", "chain_seed"]
from .tta import (AugmentedLoader, Draws, Policy, SearchResult, SubPolicy, Transform, default_policy,  # noqa: E402
                  embeddings, evaluate_tta, greedy_policy_search, linear_probe, member_outputs, sample_pool,
                  tta_predict)

__all__ += ["Draws", "Policy", "SubPolicy", "Transform", "default_policy", "member_outputs", "tta_predict",
            "evaluate_tta", "sample_pool", "greedy_policy_search", "SearchResult", "embeddings", "linear_probe",
            "AugmentedLoader"]
