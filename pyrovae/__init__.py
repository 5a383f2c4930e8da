"""pyrovae: variational autoencoders written as Pyro programs.

A :class:`VAE` composes an encoder, a decoder, a prior, a likelihood and a guide family;
``vae.model`` and ``vae.guide`` are a Pyro model and guide trained with SVI, and
:func:`log_marginal_likelihood` estimates log p(x) per data point by importance sampling.
"""

from pyrovae.activity import latent_usage, mutual_information
from pyrovae.ais import ais_log_marginal_likelihood
from pyrovae.checkpoint import load_program_state, load_vae
from pyrovae.config import TrainConfig, build_vae
from pyrovae.data import DataSplits, load_dataset
from pyrovae.diagnostics import importance_summary
from pyrovae.evaluation import (
    elbo,
    importance_log_weights,
    log_marginal_likelihood,
    mean_and_standard_error,
)
from pyrovae.guides import (
    GUIDES,
    DiagonalNormalGuide,
    FullCovarianceNormalGuide,
    GuideFamily,
    IAFGuide,
    LowRankNormalGuide,
)
from pyrovae.layers import ConditionalNormal
from pyrovae.likelihoods import (
    LIKELIHOODS,
    BernoulliLikelihood,
    ContinuousBernoulliLikelihood,
    GaussianLikelihood,
    Likelihood,
    PixelGaussianLikelihood,
)
from pyrovae.models import VAE, ConditionalVAE, HierarchicalVAE, SemiSupervisedVAE
from pyrovae.nets import (
    NETWORKS,
    ConvDecoder,
    ConvEncoder,
    GatedLinear,
    GatedMLPDecoder,
    GatedMLPEncoder,
    MLPDecoder,
    MLPEncoder,
)
from pyrovae.objectives import (
    OBJECTIVES,
    AuxiliaryLoss,
    DoublyReparameterizedIWAE,
    ImportanceWeightedELBO,
    PathDerivativeELBO,
)
from pyrovae.priors import (
    PRIORS,
    DiagonalNormalPrior,
    FlowPrior,
    MixtureOfGaussiansPrior,
    Prior,
    StandardNormalPrior,
    VampPrior,
)
from pyrovae.programs import Program, ProgramError, as_program
from pyrovae.report import write_report
from pyrovae.sandwich import bidirectional_monte_carlo
from pyrovae.train import FitOptions, fit

__version__ = "0.1.0"

# what a user builds, trains and evaluates with; training internals (the KL schedule, the
# latent scaling of objectives, the loop) stay importable from their own modules
__all__ = [
    # parts and their registries
    "NETWORKS",
    "MLPEncoder",
    "MLPDecoder",
    "GatedLinear",
    "GatedMLPEncoder",
    "GatedMLPDecoder",
    "ConvEncoder",
    "ConvDecoder",
    "ConditionalNormal",
    "PRIORS",
    "Prior",
    "StandardNormalPrior",
    "DiagonalNormalPrior",
    "MixtureOfGaussiansPrior",
    "VampPrior",
    "FlowPrior",
    "LIKELIHOODS",
    "Likelihood",
    "BernoulliLikelihood",
    "ContinuousBernoulliLikelihood",
    "GaussianLikelihood",
    "PixelGaussianLikelihood",
    "GUIDES",
    "GuideFamily",
    "DiagonalNormalGuide",
    "LowRankNormalGuide",
    "FullCovarianceNormalGuide",
    "IAFGuide",
    # models and programs
    "VAE",
    "ConditionalVAE",
    "HierarchicalVAE",
    "SemiSupervisedVAE",
    "Program",
    "ProgramError",
    "as_program",
    # data
    "DataSplits",
    "load_dataset",
    # training
    "OBJECTIVES",
    "AuxiliaryLoss",
    "ImportanceWeightedELBO",
    "PathDerivativeELBO",
    "DoublyReparameterizedIWAE",
    "FitOptions",
    "fit",
    "TrainConfig",
    "build_vae",
    "load_vae",
    "load_program_state",
    # estimators, diagnostics and the report
    "elbo",
    "log_marginal_likelihood",
    "importance_log_weights",
    "mean_and_standard_error",
    "importance_summary",
    "ais_log_marginal_likelihood",
    "bidirectional_monte_carlo",
    "latent_usage",
    "mutual_information",
    "write_report",
]
