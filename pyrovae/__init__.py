"""pyrovae: variational autoencoders written as Pyro programs.

A :class:`VAE` composes an encoder, a decoder, a prior, a likelihood and a guide family;
``vae.model`` and ``vae.guide`` are a Pyro model and guide trained with SVI, and
:func:`log_marginal_likelihood` estimates log p(x) per data point by importance sampling.
"""

from pyrovae.activity import latent_usage
from pyrovae.ais import ais_log_marginal_likelihood
from pyrovae.checkpoint import load_program_state
from pyrovae.config import TrainConfig, build_vae
from pyrovae.data import DataSplits, load_dataset
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
from pyrovae.nets import NETWORKS, ConvDecoder, ConvEncoder, MLPDecoder, MLPEncoder
from pyrovae.objectives import ImportanceWeightedELBO, LatentScale, kl_weight
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
from pyrovae.sandwich import bidirectional_monte_carlo
from pyrovae.train import FitOptions, fit

__version__ = "0.1.0"

__all__ = [
    "GUIDES",
    "LIKELIHOODS",
    "NETWORKS",
    "PRIORS",
    "VAE",
    "BernoulliLikelihood",
    "ContinuousBernoulliLikelihood",
    "ConvDecoder",
    "ConvEncoder",
    "DataSplits",
    "DiagonalNormalGuide",
    "DiagonalNormalPrior",
    "FlowPrior",
    "FullCovarianceNormalGuide",
    "GaussianLikelihood",
    "GuideFamily",
    "IAFGuide",
    "ImportanceWeightedELBO",
    "LatentScale",
    "Likelihood",
    "LowRankNormalGuide",
    "MLPDecoder",
    "MLPEncoder",
    "MixtureOfGaussiansPrior",
    "PixelGaussianLikelihood",
    "Prior",
    "StandardNormalPrior",
    "VampPrior",
    "TrainConfig",
    "build_vae",
    "elbo",
    "fit",
    "FitOptions",
    "importance_log_weights",
    "Program",
    "ProgramError",
    "as_program",
    "kl_weight",
    "load_dataset",
    "load_program_state",
    "log_marginal_likelihood",
    "mean_and_standard_error",
    "ConditionalNormal",
    "ConditionalVAE",
    "HierarchicalVAE",
    "SemiSupervisedVAE",
    "ais_log_marginal_likelihood",
    "bidirectional_monte_carlo",
    "latent_usage",
]
