"""How a posterior is reached and used: the SVI loop, SG-MCMC kernels, distillation, TTA, ...

The names here are the entry points. The parts each idea is made of stay in its module or subpackage:
the training loop and its steps in :mod:`pyrobnn.inference.loop`, the λ-sweep's helpers in
:mod:`pyrobnn.inference.complexity`, teachers and the adversary in :mod:`pyrobnn.inference.distill`,
augmentations, policies and draws in :mod:`pyrobnn.inference.tta`, step-size schedules in
:mod:`pyrobnn.inference.step_size`.
"""
from .complexity import fit_complexity, prune
from .distill import MCDropout, SGLDChain, distill, distillation_loss, evaluate_distillation, load_student, save_student
from .distributed import DataParallel, chain_seed, fit_distributed, sample_chains
from .elbo import MeanFieldELBO
from .fit import History, TrainingDiverged, fit, latest_checkpoint, load_checkpoint
from .sampling import SamplePosterior, sample
from .sgld import PSGLD, SGLD
from .step_size import ConstantStepSize, CyclicalStepSize, PolynomialDecay, StepSize
from .supervised import train_deterministic
from .tta import evaluate_tta, tta_predict

__all__ = [
    # variational inference
    "fit", "MeanFieldELBO", "History", "TrainingDiverged", "latest_checkpoint", "load_checkpoint",
    "train_deterministic",
    # the λ-sweep (one hypernetwork guide for a range of KL weights)
    "fit_complexity", "prune",
    # SG-MCMC
    "SGLD", "PSGLD", "sample", "SamplePosterior", "StepSize", "ConstantStepSize", "PolynomialDecay", "CyclicalStepSize",
    # many processes
    "fit_distributed", "sample_chains", "DataParallel", "chain_seed",
    # distillation
    "distill", "distillation_loss", "evaluate_distillation", "save_student", "load_student", "SGLDChain", "MCDropout",
    # test-time augmentation
    "tta_predict", "evaluate_tta",
]
