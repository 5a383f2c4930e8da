"""One dataclass that maps 1:1 to the ``pyrovae train`` flags, and the builder that turns it
into a :class:`~pyrovae.models.VAE` through the registries.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from pyrovae.argtypes import MAX_INT, check_device_name, init_gain
from pyrovae.compilation import COMPILE_MODES
from pyrovae.data import (
    BINARIZATIONS,
    DATASETS,
    OWN_VALIDATION_DATASETS,
    VALIDATION_SPLITS,
    DataSplits,
    check_dataset_name,
)
from pyrovae.errors import ConfigError
from pyrovae.free_bits import FREE_BITS_GROUPS
from pyrovae.guides import GUIDES, SCALE_LINKS
from pyrovae.labels import interleave_labels
from pyrovae.layers import ConditionalNormal, gaussian_chain
from pyrovae.likelihoods import LIKELIHOODS, logit_clip_of_probability_clip
from pyrovae.models import VAE, ConditionalVAE, HierarchicalVAE, SemiSupervisedVAE, paper_alpha
from pyrovae.nets import (
    ACTIVATION_GAIN,
    ACTIVATIONS,
    GLOROT_UNIFORM,
    INIT_SCHEMES,
    NETWORKS,
    MLPDecoder,
    check_init_gain,
    check_init_scheme,
    mlp,
)
from pyrovae.objectives import OBJECTIVES, REPARAMETERIZED_OBJECTIVES
from pyrovae.optim import OUTPUT_BIAS_INITS, AdamSettings
from pyrovae.priors import PRIORS, PSEUDO_INPUT_LINKS
from pyrovae.program_spec import ProgramSpec, canonical_spec, program_args_json
from pyrovae.rundir import write_json
from pyrovae.schedules import KL_SCHEDULES, LR_SCHEDULES, check_kl_cycles, check_plateau

logger = logging.getLogger(__name__)

#: the KL warm-up (epochs) of a learned prior when none is given: at the full KL weight
#: from the first step, a learned prior follows the encoder's early contraction of every
#: code to one point, and the posterior collapses (experiments/README.md)
LEARNED_PRIOR_WARMUP_EPOCHS = 10
#: the largest learning rate accepted: Adam's steps are about lr in size, so beyond this
#: every run diverges
MAX_LR = 1.0
#: the most importance samples K per point any estimate takes (published MNIST numbers use
#: 5000; the time grows in proportion)
MAX_IMPORTANCE_SAMPLES = 100_000


def _flag(help: str, **argparse_options: Any) -> dict[str, Any]:
    return {"help": help, **argparse_options}


def _float_or_none(text: str) -> float | None:
    """A flag's number, or ``none`` for ``None``: how a flag that a preset sets is turned off."""
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or none, got {text!r}") from None


#: published training protocols: the TrainConfig fields each one sets
PRESETS: dict[str, dict[str, Any]] = {
    # Burda, Grosse, Salakhutdinov (2016), section 5 and the authors' code (yburda/iwae):
    # 59,600 training images (the last 400 held out), minibatch 20, Adam(0.99, 0.999, 1e-4)
    # with the second moment started at 1, 3280 epochs in 8 stages, output bias at the logit
    # of the training mean, every weight Glorot-uniform with gain 1 (nnet.Linear.random),
    # test log p(x) with K = 5000
    "burda2016": {
        "dataset": "mnist", "binarize": "dynamic", "valid_size": 400, "net": "mlp",
        "hidden_dims": (200, 200), "activation": "tanh", "init_gain": 1.0, "latent_dim": 50,
        "prior": "normal",
        "guide": "diagonal", "likelihood": "bernoulli", "epochs": 3280, "batch_size": 20,
        "lr": 1e-3, "lr_schedule": "burda2016", "adam_beta1": 0.99, "adam_beta2": 0.999,
        "adam_eps": 1e-4, "adam_second_moment_init": 1.0, "output_bias_init": "data_mean",
        "eval_samples": 5000, "kl_warmup_epochs": 0, "beta": 1.0,
    },
    # Tomczak & Welling (2018) and the authors' code (jmtomczak/vae_vampprior: experiment.py,
    # models/VAE.py, utils/nn.py, utils/perform_experiment.py): static MNIST, two gated
    # 300-unit layers (no activation but the gate) each way, 40 latents, a VampPrior of 500
    # pseudo-inputs, Adam at lr 5e-4, batch 100, the KL weight raised linearly over 100
    # epochs, early stopping on the validation ELBO with a patience of 50 epochs (not
    # counted during the warm-up), at most 2000 epochs, test log p(x) with K = 5000; Adam on
    # gradients divided by their norms (utils/optimizer.py: AdamNormGrad), pseudo-inputs
    # free values clipped to [0, 1] and started at N(0.05, 0.01) (models/Model.py:
    # Hardtanh(0, 1); utils/load_data.py: load_static_mnist's start); trained
    # on all 50,000 training images and validated on the file's own 10,000; the guide's
    # scale a log-variance clipped to [-6, 2] (models/VAE.py: Hardtanh(-6, 2)); every Linear
    # weight He-normal, N(0, 2 / fan_in), with nn.Linear's own biases, the decoder's output
    # bias among them, which output_bias_init "zero" leaves as the networks start it
    # (utils/nn.py: he_init); the Bernoulli probability clamped to [1e-5, 1 - 1e-5] in
    # training and evaluation (utils/distributions.py: log_Bernoulli)
    "tomczak2018": {
        "dataset": "binarized_mnist", "binarize": "static", "valid_split": "dataset",
        "valid_size": 10_000,
        "net": "gated_mlp", "hidden_dims": (300, 300), "activation": "identity",
        "latent_dim": 40, "prior": "vamp", "num_components": 500, "guide": "diagonal",
        "likelihood": "bernoulli", "objective": "trace_elbo", "num_particles": 1,
        "epochs": 2000, "batch_size": 100, "lr": 5e-4, "lr_schedule": "constant",
        "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_eps": 1e-8,
        "adam_second_moment_init": 0.0, "output_bias_init": "zero", "eval_samples": 5000,
        "kl_warmup_epochs": 100, "beta": 1.0, "early_stopping_patience": 50,
        "pseudo_inputs_from_data": False, "pseudo_input_link": "hardtanh",
        "adam_normalize_gradients": True, "guide_scale": "clipped_log_variance",
        "init_scheme": "he_normal", "bernoulli_logit_clip": logit_clip_of_probability_clip(1e-5),
    },
    # Pyro's semi-supervised example (examples/vae/ss_vae_M2.py, its defaults with --aux-loss)
    # for Kingma et al. (2014)'s M2: the first 50,000 training images for training, the last
    # 10,000 for validation (the test error is reported at the best validation accuracy);
    # a class-balanced labelled set drawn by --seed; grey levels in [0, 1] scored by the
    # Bernoulli likelihood (--binarize dynamic --likelihood bernoulli: binarized instead);
    # one hidden layer of 500 softplus units in each network, 50 latents; y summed out by
    # parallel enumeration (TraceEnum_ELBO); the auxiliary loss alpha log q(y|x) at Pyro's
    # --aux-loss-multiplier 46 per labelled image (Kingma et al.: 0.1 N / N_labelled, --alpha
    # none); one batch of labelled images every 50000 / N_labelled batches (Kingma et al.'s
    # code mixes them into every minibatch: --label-batches mixed); Adam(lr 4.2e-4, betas
    # 0.9, 0.999), batch 200 (the example's batch for 100 labels is 100: --batch-size 100);
    # 50 epochs.  Not followed: Pyro's N(0, 0.001) start of the hidden layers (Glorot here),
    # exp of the scale head (softplus here), and the example's second Adam step on every
    # batch: its auxiliary loss is a second SVI on the same optimizer, run on every batch,
    # whose gradient is zero for every parameter on an unlabelled batch (and for all but the
    # classifier's on a labelled one), so Adam moves each parameter a second time by its
    # momentum alone (here: one step on the sum of the losses)
    "pyro_m2": {
        "dataset": "mnist", "model": "semi_supervised", "binarize": "none",
        "likelihood": "bernoulli_grey", "valid_size": 10_000, "valid_split": "last",
        "net": "mlp", "hidden_dims": (500,), "activation": "softplus", "latent_dim": 50,
        "prior": "normal", "guide": "diagonal", "objective": "trace_elbo", "num_particles": 1,
        "alpha": 46.0, "label_batches": "interleaved", "epochs": 50, "batch_size": 200,
        "lr": 4.2e-4, "lr_schedule": "constant", "adam_beta1": 0.9, "adam_beta2": 0.999,
        "adam_eps": 1e-8, "kl_warmup_epochs": 0, "beta": 1.0, "eval_samples": 1000,
    },
}
PRESET_HELP = {"burda2016": "the IWAE paper's one-layer MNIST VAE, 3280 epochs",
               "tomczak2018": "the VampPrior paper's static-MNIST VAE, gated MLPs, early "
                              "stopping",
               "pyro_m2": "Pyro's semi-supervised M2 example (ss_vae_M2.py): grey levels, "
                          "auxiliary loss 46, interleaved labelled batches, 10,000 "
                          "validation images, 50 epochs; with --labelled N"}


#: the flags that build the built-in model; given beside ``--program`` they are refused
#: (the program takes its settings from ``--program-args``)
BUILT_IN_MODEL_FIELDS = frozenset({
    "model", "num_classes", "labelled", "alpha", "net", "hidden_dims", "activation",
    "init_gain", "init_scheme", "latent_dim", "latent_dims", "prior", "guide", "guide_scale",
    "num_components", "pseudo_inputs_from_data", "pseudo_input_link", "prior_flows",
    "num_flows", "rank", "likelihood", "sigma", "learn_sigma", "bernoulli_logit_clip",
    "output_bias_init", "preset"})


#: what ``--model`` builds: the VAE of x, or a model of x and its class label
#: (:data:`LABEL_MODELS`)
MODEL_KINDS = ("vae", "conditional", "semi_supervised")
#: how M2's labelled images enter the minibatches (``--label-batches``)
LABEL_BATCHES = ("mixed", "interleaved")


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved as ``config.json`` in the run directory.

    Each field is the CLI flag of the same name (``hidden_dims`` is ``--hidden-dims``).
    """

    dataset: str = field(default="mnist", metadata=_flag(
        f"a dataset ({', '.join(DATASETS)}), or your own files: npz:PATH (arrays train [, test, "
        f"valid]), npy:PATH (one array), folder:PATH (an image folder)", type=str))
    data_dir: str | None = field(default=None, metadata=_flag(
        "folder holding the named datasets (MNIST/raw, binarized_mnist.npz, ...; default: "
        "$PYROVAE_DATA, then ~/.cache/pyrovae/data, downloading there)", type=str))
    download: bool = field(default=True, metadata=_flag(
        "download a named dataset when it is not on disk"))
    binarize: str = field(default="dynamic", metadata=_flag(
        "dynamic: resample x ~ Bernoulli(intensity) each time an image is used; static: one "
        "fixed draw; none: grey levels", choices=BINARIZATIONS))
    test_fraction: float = field(default=0.1, metadata=_flag(
        "npz/npy/folder data without a test split: the share of points held out as the test "
        "set (a fixed random choice)", type=float))
    train_size: int | None = field(default=None, metadata=_flag(
        "use only the first N training images", type=int))
    test_size: int | None = field(default=None, metadata=_flag(
        "use only the first N test images", type=int))
    valid_size: int = field(default=0, metadata=_flag(
        "hold out the last N training images for validation; the best checkpoint is chosen on "
        "them (on the test set when 0); with --valid-split dataset, the first N images of the "
        "dataset's own validation split (all when 0)", type=int))
    valid_split: str = field(default="last", metadata=_flag(
        "where the validation images come from: last, the last --valid-size training images; "
        "dataset, the dataset's own validation split, the training set left whole (" +
        ", ".join(sorted(OWN_VALIDATION_DATASETS)) + ")", choices=VALIDATION_SPLITS))
    early_stopping_patience: int = field(default=0, metadata=_flag(
        "stop when the validation ELBO (the test ELBO without --valid-size) has not improved "
        "for N epochs, KL warm-up epochs not counted; the final evaluation then uses the best "
        "checkpoint (0: train all --epochs)", type=int))
    model: str = field(default="vae", metadata=_flag(
        "what to train: vae, a VAE of the images; conditional, a conditional VAE p(x | y) of "
        "the images given their class labels (sample --label draws a chosen class); "
        "semi_supervised, Kingma et al. 2014's M2, p(x, y) and a classifier q(y | x) from "
        "--labelled labels", choices=MODEL_KINDS))
    program: str | None = field(default=None, metadata=_flag(
        "train your own Pyro program instead of a built-in model: FILE.py:NAME or "
        "package.module:NAME, NAME an object with model and guide methods (a PyroModule), a "
        "class or factory returning one, or a function returning a (model, guide) pair; "
        "evaluate, sample and --resume need it named again", type=str))
    program_args: dict[str, Any] | None = field(default=None, metadata=_flag(
        "keyword arguments of --program's class or factory, a JSON object: "
        "'{\"z_dim\": 32}'", type=program_args_json))
    num_classes: int | None = field(default=None, metadata=_flag(
        "conditional, semi_supervised: the number of classes (default: the data's)", type=int))
    labelled: int | None = field(default=None, metadata=_flag(
        "semi_supervised: keep the labels of N training images, balanced over the classes "
        "and chosen by --seed, and hide the others (default: keep all)", type=int))
    alpha: float | None = field(default=None, metadata=_flag(
        "semi_supervised: weight of the classification term log q(y|x) per labelled image "
        "(default: Kingma et al. 2014's alpha = 0.1 N spread over the labelled images, "
        "0.1 x training images / labelled images; none: that default where a preset sets "
        "another)", type=_float_or_none))
    label_batches: str = field(default="mixed", metadata=_flag(
        "semi_supervised: how labelled and unlabelled images meet: mixed, shuffled together "
        "into every minibatch; interleaved, minibatches of labelled images only, one every "
        "training images / labelled images batches, the others unlabelled (Pyro's example)",
        choices=LABEL_BATCHES))
    net: str = field(default="mlp", metadata=_flag(
        "encoder/decoder architecture", choices=tuple(NETWORKS)))
    hidden_dims: tuple[int, ...] = field(default=(200, 200), metadata=_flag(
        "hidden layer widths of the encoder (the decoder mirrors them)", type=int, nargs="+"))
    activation: str = field(default="tanh", metadata=_flag(
        "hidden-layer nonlinearity", choices=tuple(ACTIVATIONS)))
    init_gain: float | str = field(default=ACTIVATION_GAIN, metadata=_flag(
        "gain of the Glorot-uniform start of the networks' weights: activation, each layer "
        "the gain of its activation (5/3 for tanh; 1 for heads and gated outputs, PyTorch's "
        "default for the guide's heads), or a number for every layer, heads included (1: "
        "the IWAE authors' code); convolutions keep PyTorch's default", type=init_gain))
    init_scheme: str = field(default=GLOROT_UNIFORM, metadata=_flag(
        "how the Linear layers of the networks and the guide's heads start: glorot_uniform, "
        "as --init-gain says; he_normal, weights N(0, 2 / fan_in) (He et al. 2015; Tomczak & "
        "Welling's code) and PyTorch's default biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)), the "
        "decoder's output bias included; convolutions and the flows' autoregressive networks "
        "keep their own start either way",
        choices=INIT_SCHEMES))
    latent_dim: int = field(default=50, metadata=_flag("dimension of z", type=int))
    latent_dims: tuple[int, ...] | None = field(default=None, metadata=_flag(
        "a hierarchical VAE: widths of its stochastic layers z1 (next to x), z2, ... (Burda "
        "et al. 2016's two-layer model: 100 50); latent_dim becomes the last one, the prior's. "
        "The networks between x and z1 have --hidden-dims; those between z(l-1) and z(l) as "
        "many hidden layers, each twice as wide as z(l) (100 100 for 100 50); default: one "
        "layer of --latent-dim (the VAE)", type=int, nargs="+"))
    prior: str = field(default="normal", metadata=_flag("prior p(z)", choices=tuple(PRIORS)))
    guide: str = field(default="diagonal", metadata=_flag(
        "variational family q(z|x)", choices=tuple(GUIDES)))
    guide_scale: str = field(default="softplus", metadata=_flag(
        "diagonal, iaf, lowrank guides: how the scale head gives the standard deviations: "
        "softplus, softplus(head) + 1e-4; clipped_log_variance, exp(clip(head, -6, 2) / 2), "
        "the head a log-variance (Tomczak & Welling's Hardtanh(-6, 2))",
        choices=tuple(SCALE_LINKS)))
    num_components: int = field(default=10, metadata=_flag(
        "mog prior: mixture components; vamp prior: pseudo-inputs", type=int))
    pseudo_inputs_from_data: bool = field(default=True, metadata=_flag(
        "vamp prior: start the pseudo-inputs at random training points"))
    pseudo_input_link: str = field(default="identity", metadata=_flag(
        "VampPrior: identity, the pseudo-inputs are free parameters; sigmoid, they are the "
        "sigmoid of free logits, inside (0, 1), started at logits N(-0.05, 0.01); hardtanh, "
        "free values clipped to [0, 1] (Tomczak & Welling's final code), started at "
        "N(0.05, 0.01); either starts off the data unless --pseudo-inputs-from-data",
        choices=PSEUDO_INPUT_LINKS))
    prior_flows: int = field(default=2, metadata=_flag(
        "flow prior: autoregressive flow steps", type=int))
    num_flows: int = field(default=2, metadata=_flag(
        "iaf guide: inverse autoregressive flow steps (0 is the diagonal guide)", type=int))
    rank: int = field(default=2, metadata=_flag(
        "lowrank guide: rank of the covariance factor", type=int))
    likelihood: str = field(default="bernoulli", metadata=_flag(
        "observation model p(x|z)", choices=tuple(LIKELIHOODS)))
    sigma: float = field(default=1.0, metadata=_flag(
        "Gaussian likelihoods: noise standard deviation (initial value if learned)", type=float))
    learn_sigma: bool = field(default=False, metadata=_flag(
        "Gaussian likelihood: learn sigma (one global scalar)"))
    bernoulli_logit_clip: float | None = field(default=None, metadata=_flag(
        "Bernoulli likelihood: clamp the decoder's logits to [-C, C] in training, evaluation "
        "and sampling, no gradient beyond (Tomczak & Welling's probabilities in [1e-5, "
        "1 - 1e-5]: C = log((1 - 1e-5) / 1e-5) = 11.5129); none (the default): no clamp",
        type=_float_or_none))
    logistic_components: int = field(default=10, metadata=_flag(
        "discretized_logistic_mixture likelihood: mixture components K per data value (the "
        "decoder gives 3K numbers per value; PixelCNN++: 10)", type=int))
    objective: str = field(default="trace_elbo", metadata=_flag(
        "training objective", choices=tuple(OBJECTIVES)))
    num_particles: int = field(default=1, metadata=_flag(
        "samples of z per data point in the objective (K of the iwae objective)", type=int))
    beta: float = field(default=1.0, metadata=_flag(
        "weight of the KL term after warm-up (1: the ELBO; other values: a beta-VAE)",
        type=float))
    kl_warmup_epochs: int | None = field(default=None, metadata=_flag(
        "raise the KL weight linearly from beta/N to beta over the first N epochs (0: none); "
        f"default: {LEARNED_PRIOR_WARMUP_EPOCHS} (at most --epochs) for a learned prior, whose "
        "posterior collapses without it, 0 for the standard normal one", type=int))
    kl_schedule: str = field(default="linear", metadata=_flag(
        "the KL weight per epoch: linear, the --kl-warmup-epochs warm-up; cyclical, Fu et al. "
        "2019's cyclical annealing: --kl-cycles cycles over --epochs, the weight rising "
        "linearly from beta/(R C) to beta over the first R = --kl-cycle-ratio of each cycle "
        "of C epochs, then held", choices=KL_SCHEDULES))
    kl_cycles: int = field(default=4, metadata=_flag(
        "--kl-schedule cyclical: the number of cycles", type=int))
    kl_cycle_ratio: float = field(default=0.5, metadata=_flag(
        "--kl-schedule cyclical: the share of each cycle spent rising", type=float))
    free_bits: float = field(default=0.0, metadata=_flag(
        "free bits (Kingma et al. 2016): a floor of this many nats under the minibatch-mean "
        "KL of each latent dimension (or site, --free-bits-group), which then gets no "
        "gradient below it (0: the plain ELBO); trace_elbo and meanfield_elbo (its analytic "
        "KL per dimension)", type=float))
    free_bits_group: str = field(default="dimension", metadata=_flag(
        "--free-bits: dimension, a floor per latent dimension (needs q(z|x) and p(z) that "
        "factorize over them: the diagonal guide, the normal or diagonal prior); site, one "
        "per latent site", choices=FREE_BITS_GROUPS))
    epochs: int = field(default=10, metadata=_flag("passes over the training set", type=int))
    batch_size: int = field(default=100, metadata=_flag("minibatch size", type=int))
    lr: float = field(default=1e-3, metadata=_flag("Adam learning rate", type=float))
    lr_schedule: str = field(default="constant", metadata=_flag(
        "constant: lr throughout; iwae: Burda et al. 2016's 3^i epochs at lr * 10^(-i/7) for "
        "i = 0..7 (3280 epochs, later ones at lr/10); burda2016: the same with the factors "
        "rounded to one decimal, as the authors' code has them; cosine: from lr down to "
        "--lr-min over --epochs, lr_min + (lr - lr_min) (1 + cos(pi (epoch - 1) / epochs)) / 2 "
        "(Loshchilov & Hutter 2017); plateau: lr times --lr-plateau-factor each time the "
        "validation ELBO (the test ELBO without --valid-size) has not improved on its best for "
        "--lr-plateau-patience evaluated epochs, never below --lr-min", choices=LR_SCHEDULES))
    lr_min: float = field(default=0.0, metadata=_flag(
        "--lr-schedule cosine: the rate it ends at; plateau: the rate it stops reducing at",
        type=float))
    lr_plateau_factor: float = field(default=0.5, metadata=_flag(
        "--lr-schedule plateau: the factor of each reduction", type=float))
    lr_plateau_patience: int = field(default=10, metadata=_flag(
        "--lr-schedule plateau: evaluated epochs without a new best held-out ELBO before a "
        "reduction", type=int))
    adam_beta1: float = field(default=0.9, metadata=_flag(
        "Adam's decay rate of the first moment", type=float))
    adam_beta2: float = field(default=0.999, metadata=_flag(
        "Adam's decay rate of the second moment", type=float))
    adam_eps: float = field(default=1e-8, metadata=_flag(
        "Adam's epsilon, added to the square root of the second moment", type=float))
    adam_second_moment_init: float = field(default=0.0, metadata=_flag(
        "the value Adam's second moment starts at (Burda et al. 2016: 1)", type=float))
    adam_normalize_gradients: bool = field(default=False, metadata=_flag(
        "divide each parameter tensor's gradient by its L2 norm before the Adam update "
        "(Tomczak & Welling 2018's AdamNormGrad)"))
    output_bias_init: str = field(default="zero", metadata=_flag(
        "start of the decoder's output bias: zero, as the networks start it (zero under "
        "--init-scheme glorot_uniform, PyTorch's default under he_normal); or data_mean (the "
        "logit of the training set's mean pixel for a Bernoulli likelihood, the mean itself "
        "for a Gaussian one)", choices=OUTPUT_BIAS_INITS))
    preset: str | None = field(default=None, metadata=_flag(
        "a published protocol whose settings become the defaults (flags given beside it "
        "override them): " + ", ".join(f"{name} ({text})" for name, text in PRESET_HELP.items()),
        type=str))
    device: str = field(default="auto", metadata=_flag(
        "cpu, cuda, cuda:N, or auto (cuda when available)", type=str))
    seed: int = field(default=0, metadata=_flag("random seed (torch, numpy, python, pyro)", type=int))
    out_dir: str = field(default="runs/vae", metadata=_flag(
        "run directory for config, metrics, checkpoint and results", type=str))
    overwrite: bool = field(default=False, metadata=_flag(
        "replace an existing run in out_dir (otherwise refuse, so nothing saved is lost)"))
    test_every: int = field(default=1, metadata=_flag(
        "compute the test ELBO every N epochs", type=int))
    log_px_every: int = field(default=0, metadata=_flag(
        "also estimate the test log p(x) every N epochs (and after the last) into "
        "metrics.csv, with --log-px-samples importance samples on the first --log-px-size "
        "test images (0: never)", type=int))
    log_px_samples: int = field(default=1000, metadata=_flag(
        "importance samples K of the --log-px-every estimates", type=int))
    log_px_size: int = field(default=1000, metadata=_flag(
        "test images of the --log-px-every estimates", type=int))
    activity_every: int = field(default=0, metadata=_flag(
        "also count the active latent units (per latent site too, for a hierarchy) and "
        "estimate the mutual information I(x; z) every N epochs (and after the last) into "
        "metrics.csv, on the first --log-px-size test images (0: never)", type=int))
    eval_samples: int = field(default=1000, metadata=_flag(
        "importance samples K for the final test log p(x); 0 skips it", type=int))
    max_minutes: float | None = field(default=None, metadata=_flag(
        "wall-clock budget: stop at the end of the first epoch after which another would "
        "overrun it (resume carries on); default: no budget", type=float))
    progress: bool = field(default=True, metadata=_flag("show a progress bar"))
    tensorboard: bool = field(default=False, metadata=_flag(
        "also write TensorBoard event files (ELBOs, their KL and reconstruction terms, the "
        "learning rate, log p(x), sample grids) into out_dir/tensorboard; needs the "
        "tensorboard package"))
    checkpoint_every: int = field(default=0, metadata=_flag(
        "also checkpoint every N steps within an epoch (0: only at epoch ends)", type=int))
    keep_last: int = field(default=0, metadata=_flag(
        "keep copies of the last N epoch checkpoints in out_dir/checkpoints", type=int))
    clip_norm: float | None = field(default=None, metadata=_flag(
        "clip each parameter's gradient to this norm", type=float))
    fused: bool = field(default=True, metadata=_flag(
        "use torch's fused Adam kernel (the same update in one call per step)"))
    compile: str = field(default="off", metadata=_flag(
        "torch.compile the networks (the Pyro program stays eager): off, or a torch.compile "
        "mode (default, reduce-overhead: CUDA graphs on a GPU, max-autotune); the same values "
        "up to float rounding, checkpoints unchanged", choices=("off", *COMPILE_MODES)))
    on_divergence: str = field(default="stop", metadata=_flag(
        "on a NaN/inf loss: stop, or roll back to the last checkpoint with half the lr",
        choices=("stop", "rollback")))

    def __post_init__(self) -> None:
        if isinstance(self.program, str):  # a file's path made absolute; nothing imported
            self.program = canonical_spec(self.program)
        self.hidden_dims = tuple(int(width) for width in self.hidden_dims)
        if isinstance(self.init_gain, int) and not isinstance(self.init_gain, bool):
            self.init_gain = float(self.init_gain)  # config.json records 1.0, not 1
        if isinstance(self.bernoulli_logit_clip, int) and \
                not isinstance(self.bernoulli_logit_clip, bool):
            self.bernoulli_logit_clip = float(self.bernoulli_logit_clip)
        if self.latent_dims is not None:
            self.latent_dims = tuple(self.latent_dims)
            if self.latent_dims and min(self.latent_dims) >= 1:  # else refused by validate
                self.latent_dim = self.latent_dims[-1]  # the prior's layer
        if self.kl_warmup_epochs is None and self.kl_schedule == "cyclical":
            self.kl_warmup_epochs = 0  # the cycles rise on their own
        if self.kl_warmup_epochs is None:  # resolved once, so config.json records the value
            learned = self.prior != "normal" and isinstance(self.epochs, int)
            self.kl_warmup_epochs = min(LEARNED_PRIOR_WARMUP_EPOCHS, self.epochs) if learned else 0
        self.validate()

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> TrainConfig:
        """The config of the published protocol ``name`` (a key of :data:`PRESETS`), with
        ``overrides`` (field names) replacing its values; ``preset`` records the name."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides, "preset": name})

    @property
    def adam(self) -> AdamSettings:
        """Adam's settings other than the learning rate."""
        return AdamSettings(betas=(self.adam_beta1, self.adam_beta2), eps=self.adam_eps,
                            second_moment_init=self.adam_second_moment_init,
                            normalize_gradients=self.adam_normalize_gradients)

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad value and the allowed ones."""
        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices is not None and value not in choices:
                raise ConfigError(
                    f"unknown {f.name} {value!r}; known: {', '.join(map(str, choices))}"
                )
        check_dataset_name(self.dataset)
        check_init_gain(self.init_gain)
        check_init_scheme(self.init_scheme, self.init_gain)
        if self.guide_scale not in GUIDES[self.guide].scale_links:
            takers = [name for name, family in GUIDES.items()
                      if self.guide_scale in family.scale_links]
            raise ConfigError(f"--guide-scale {self.guide_scale} is not available with --guide "
                              f"{self.guide}; the guides that take it: {', '.join(takers)} "
                              f"(the others: --guide-scale softplus)")
        if self.bernoulli_logit_clip is not None:
            if self.likelihood != "bernoulli":
                raise ConfigError(f"--bernoulli-logit-clip is for --likelihood bernoulli, not "
                                  f"--likelihood {self.likelihood} (--bernoulli-logit-clip none "
                                  f"turns it off)")
            if not (math.isfinite(self.bernoulli_logit_clip) and self.bernoulli_logit_clip > 0):
                raise ConfigError(f"bernoulli_logit_clip must be a positive number, got "
                                  f"{self.bernoulli_logit_clip}")
        if self.valid_split == "dataset" and self.dataset not in OWN_VALIDATION_DATASETS:
            raise ConfigError(f"--valid-split dataset: {self.dataset!r} has no validation split "
                              f"of its own (those that do: "
                              f"{', '.join(sorted(OWN_VALIDATION_DATASETS))}); use --valid-split "
                              f"last --valid-size N")
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        positive = ("latent_dim", "num_particles", "epochs", "batch_size", "test_every",
                    "num_components", "rank", "log_px_samples", "log_px_size",
                    "logistic_components")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("prior_flows", "num_flows", "kl_warmup_epochs", "log_px_every",
                     "activity_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.beta > 0:
            raise ConfigError(f"beta must be positive, got {self.beta}")
        self._validate_kl_controls()
        flows = {"prior_flows": self.prior_flows if self.prior == "flow" else 0,
                 "num_flows": self.num_flows if self.guide == "iaf" else 0}
        for name, steps in flows.items():
            if steps > 0 and self.latent_dim < 2:
                raise ConfigError(f"{name} > 0 needs latent_dim >= 2, got {self.latent_dim}")
        for name in ("train_size", "test_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be positive, got {value}")
        if any(width < 1 for width in self.hidden_dims):
            raise ConfigError(f"hidden_dims must be positive, got {list(self.hidden_dims)}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number, got {value}")
        check_plateau(self.lr_plateau_factor, self.lr_plateau_patience, self.lr_min)
        if self.lr_schedule in ("cosine", "plateau") and not self.lr_min < self.lr:
            raise ConfigError(f"--lr-min {self.lr_min:g} must be below --lr {self.lr:g}")
        if not self.lr <= MAX_LR:
            raise ConfigError(f"lr must be at most {MAX_LR} (Adam diverges long before), got "
                              f"{self.lr}; typical values are 1e-4 to 1e-2")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "seed":
                continue
            for item in value if isinstance(value, tuple) else (value,):
                if isinstance(item, int) and not isinstance(item, bool) and abs(item) > MAX_INT:
                    shown = list(value) if isinstance(value, tuple) else value
                    raise ConfigError(f"{f.name} {shown} is too large (at most {MAX_INT})")
        try:
            check_device_name(self.device)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be between 0 and 2**32 - 1 = {2**32 - 1}, got "
                              f"{self.seed}")
        if not self.sigma > 0:
            raise ConfigError(f"sigma must be positive, got {self.sigma}")
        if self.eval_samples < 0:
            raise ConfigError(f"eval_samples must be >= 0, got {self.eval_samples}")
        for name in ("eval_samples", "log_px_samples"):
            if getattr(self, name) > MAX_IMPORTANCE_SAMPLES:
                raise ConfigError(f"{name} {getattr(self, name)} is more than pyrovae runs "
                                  f"(at most {MAX_IMPORTANCE_SAMPLES} importance samples per "
                                  f"point; published MNIST numbers use 5000)")
        for name in ("checkpoint_every", "keep_last", "valid_size", "early_stopping_patience"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ConfigError(f"max_minutes must be positive, got {self.max_minutes}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ConfigError(f"clip_norm must be positive, got {self.clip_norm}")
        if self.preset is not None and self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; known: {', '.join(PRESETS)}")
        self.adam  # noqa: B018  (validates Adam's settings)
        self._validate_program()
        self._validate_label_model()
        self._validate_layers()

    def _validate_program(self) -> None:
        """A user's program (``program``): a spec that parses (nothing is imported here),
        keyword arguments as a JSON object, and none of the built-in model's kinds."""
        if self.program is None:
            if self.program_args is not None:
                raise ConfigError("--program-args are the arguments of --program; name the "
                                  "program too")
            return
        ProgramSpec.parse(self.program)
        if self.program_args is not None and not isinstance(self.program_args, dict):
            raise ConfigError(f"program_args should be a JSON object of keyword arguments, "
                              f"got {self.program_args!r}")
        for name, built_in in (("model", "vae"), ("latent_dims", None), ("preset", None)):
            if getattr(self, name) != built_in:
                raise ConfigError(f"--{name.replace('_', '-')} chooses a built-in model; with "
                                  f"--program the program is the model (its settings go in "
                                  f"--program-args)")

    def _validate_kl_controls(self) -> None:
        """The KL schedule and free bits, and what they cannot apply to."""
        if self.kl_schedule == "cyclical":
            if self.kl_warmup_epochs:
                raise ConfigError(f"--kl-warmup-epochs {self.kl_warmup_epochs} is the linear "
                                  f"schedule's; --kl-schedule cyclical rises within each of its "
                                  f"--kl-cycles cycles (--kl-warmup-epochs 0)")
            check_kl_cycles(self.kl_cycles, self.kl_cycle_ratio, self.epochs)
        if not self.free_bits >= 0:
            raise ConfigError(f"free_bits must be >= 0, got {self.free_bits}")
        if not self.free_bits:
            return
        if self.objective not in ("trace_elbo", "meanfield_elbo"):
            raise ConfigError(f"--free-bits floors the KL term of the ELBO, which the "
                              f"{self.objective} objective does not have: use trace_elbo or "
                              f"meanfield_elbo")
        if self.model == "semi_supervised":
            raise ConfigError("--free-bits needs every latent site drawn by the guide; "
                              "--model semi_supervised sums the label out")
        if self.free_bits_group == "dimension":
            for part, name, factorizing in (("guide", self.guide, ("diagonal",)),
                                            ("prior", self.prior, ("normal", "diagonal"))):
                if name not in factorizing:
                    raise ConfigError(f"--free-bits per dimension needs q(z|x) and p(z) that "
                                      f"factorize over the latent dimensions; --{part} {name} "
                                      f"does not: use --free-bits-group site")

    def _validate_layers(self) -> None:
        """The settings a hierarchical VAE (``latent_dims``) cannot take."""
        if self.latent_dims is None:
            return
        if not self.latent_dims or any(width < 1 for width in self.latent_dims):
            raise ConfigError(f"latent_dims must be one or more positive widths, got "
                              f"{list(self.latent_dims)}")
        refused = {"net": (self.net, "mlp"), "guide": (self.guide, "diagonal")}
        for name, (value, allowed) in refused.items():
            if value != allowed:
                raise ConfigError(f"latent_dims builds {allowed} layers; --{name} {value} is "
                                  f"not available with it")
        # its stochastic layers (pyrovae.layers) have Glorot-uniform heads and exp(head) scales
        if self.init_scheme != GLOROT_UNIFORM:
            raise ConfigError(f"latent_dims: the stochastic layers start Glorot-uniform; "
                              f"--init-scheme {self.init_scheme} is not available with them "
                              f"(--init-scheme {GLOROT_UNIFORM})")
        if self.guide_scale != "softplus":
            raise ConfigError(f"latent_dims: the stochastic layers' scales are exp(linear); "
                              f"--guide-scale {self.guide_scale} is not available with them "
                              f"(--guide-scale softplus)")
        if self.objective == "meanfield_elbo" and len(self.latent_dims) > 1:
            raise ConfigError("latent_dims: meanfield_elbo's analytic KL needs every layer's "
                              "prior parents drawn before it in the guide, and z2 ~ q(z2|z1) "
                              "is drawn after z1 of p(z1|z2): its expectation is not the "
                              "ELBO here; choose trace_elbo or iwae")
        if self.prior == "vamp":
            raise ConfigError("latent_dims: the vamp prior needs q(z|x) of its own layer, which "
                              "a hierarchical VAE's top layer has not in closed form; choose "
                              "another --prior")

    def _validate_label_model(self) -> None:
        """The settings of the models of labelled data (``model``)."""
        if self.num_classes is not None and self.num_classes < 1:
            raise ConfigError(f"num_classes must be positive, got {self.num_classes}")
        if self.model != "semi_supervised":
            for name in ("labelled", "alpha"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"--{name} is for --model semi_supervised, not "
                                      f"--model {self.model}")
        if self.model != "semi_supervised" and self.label_batches != "mixed":
            raise ConfigError(f"--label-batches {self.label_batches} is for --model "
                              f"semi_supervised, not --model {self.model}")
        if self.model == "vae":
            return
        if self.labelled is not None and self.labelled < 0:
            raise ConfigError(f"labelled must be >= 0, got {self.labelled}")
        if self.alpha is not None and not self.alpha >= 0:
            raise ConfigError(f"alpha must be >= 0, got {self.alpha}")
        if self.net in ("conv", "resnet"):
            raise ConfigError(f"--model {self.model} concatenates the one-hot label to flat "
                              f"inputs; --net {self.net} is not available with it")
        if getattr(self, "latent_dims", None) is not None:
            raise ConfigError(f"--model {self.model} has one latent layer; --latent-dims is not "
                              f"available with it")
        if self.prior == "vamp":
            raise ConfigError(f"--model {self.model}: the vamp prior needs q(z|x) without a "
                              f"label; choose another --prior")
        if self.model == "semi_supervised" and self.objective in REPARAMETERIZED_OBJECTIVES:
            raise ConfigError(f"--model semi_supervised sums the discrete label out of the "
                              f"ELBO; the {self.objective} objective needs reparameterised "
                              f"sites: use trace_elbo")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values (tuples become lists)."""
        values = asdict(self)
        values["hidden_dims"] = list(self.hidden_dims)
        if self.latent_dims is not None:
            values["latent_dims"] = list(self.latent_dims)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`.

        :raises ConfigError: ``values`` is not a dict, has unknown keys (all named), or a
            value of the wrong type (key and expected type named).
        """
        if not isinstance(values, dict):
            raise ConfigError(f"a config must be a JSON object of settings, got "
                              f"{type(values).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
        for f in fields(cls):
            if f.name in values:
                _check_field_type(f.name, str(f.type), values[f.name])
        return cls(**values)

    def save(self, path: str | Path) -> None:
        """Write ``config.json`` atomically (a kill leaves the old file or the new one).

        :raises ~pyrovae.rundir.RunFileError: it could not be written.
        """
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        """Read a :meth:`save` file.

        :raises ConfigError: unreadable, empty, not JSON, or not a valid config (one line
            naming the file and the problem).
        """
        path = Path(path)
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"cannot read {path}: {error}") from None
        if not text.strip():
            raise ConfigError(f"{path} is empty (a write was cut short?); restore it or start "
                              f"a new run")
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path} is not valid JSON ({error})") from None
        except RecursionError:  # the parser recurses once per level of nesting
            raise ConfigError(f"{path} nests lists or objects too deeply to be a config (a "
                              f"config is one object of plain values)") from None
        try:
            return cls.from_dict(values)
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from None

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, *, with_defaults: bool = True) -> None:
        """Add one ``--flag`` per field to ``parser``, with the field's default and help.

        :param with_defaults: ``False`` leaves flags that were not given out of the parsed
            namespace, to tell which ones the user set.
        """
        for f in fields(cls):
            options = dict(f.metadata)
            flag = "--" + f.name.replace("_", "-")
            default = f.default if f.default is not MISSING else None
            if not with_defaults:
                default = argparse.SUPPRESS
            if f.type == "bool":
                parser.add_argument(flag, action=argparse.BooleanOptionalAction,
                                    default=default, help=options["help"])
                continue
            help_text = options.pop("help") + " (default: %(default)s)"
            parser.add_argument(flag, default=default, help=help_text, **options)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainConfig:
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


_PLAIN_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def _check_field_type(name: str, annotation: str, value: Any) -> None:
    """Raise :class:`ConfigError` unless ``value`` fits the field's annotation (a JSON value:
    a tuple may come as a list, a float as an integer)."""
    kinds = [kind.strip() for kind in annotation.split("|")]
    if value is None and "None" in kinds:
        return
    for kind in kinds:
        if kind.startswith("tuple[int"):
            if isinstance(value, list | tuple) and all(
                    isinstance(item, int) and not isinstance(item, bool) for item in value):
                return
        elif kind in _PLAIN_TYPES:
            if isinstance(value, bool) and kind != "bool":
                continue
            if isinstance(value, _PLAIN_TYPES[kind]):
                return
        elif kind != "None":
            return  # a type this check does not know: left to validate()
    expected = " or ".join("a list of integers" if kind.startswith("tuple") else
                           {"None": "null"}.get(kind, kind) for kind in kinds)
    raise ConfigError(f"config key {name!r} should be {expected}, got {value!r} "
                      f"({type(value).__name__})")


def build_vae(config: TrainConfig, *, data_dim: int,
              image_shape: tuple[int, ...] | None = None
              ) -> VAE | HierarchicalVAE | ConditionalVAE | SemiSupervisedVAE:
    """Compose a :class:`VAE` from the registries named in ``config``, or with
    ``config.latent_dims`` a :class:`HierarchicalVAE` (:func:`build_hierarchical_vae`)."""
    if config.latent_dims is not None:
        return build_hierarchical_vae(config, data_dim=data_dim)
    if config.model in LABEL_MODELS:  # a model of labelled data (--model)
        return LABEL_MODELS[config.model](config, data_dim=data_dim, image_shape=image_shape)
    options = {"latent_dim": config.latent_dim, "hidden_dims": config.hidden_dims,
               "activation": config.activation, "init_gain": config.init_gain,
               "init_scheme": config.init_scheme}
    encoder, decoder = NETWORKS[config.net](data_dim=data_dim, image_shape=image_shape,
                                            **options)
    per_value = params_per_value(config, data_dim)
    if per_value > 1:  # a decoder of P numbers per data value, P blocks of channels
        wide = None if image_shape is None else (per_value * _channels(image_shape),
                                                  *image_shape[-2:])
        _, decoder = NETWORKS[config.net](data_dim=per_value * data_dim, image_shape=wide,
                                          **options)
    feature_dim = encoder.feature_dim
    return VAE(
        encoder=encoder,
        decoder=decoder,
        prior=PRIORS[config.prior].from_config(config, data_dim=data_dim),
        likelihood=LIKELIHOODS[config.likelihood].from_config(config, data_dim=data_dim),
        guide=GUIDES[config.guide].from_config(config, feature_dim=feature_dim),
        data_dim=data_dim,
    )


def params_per_value(config: TrainConfig, data_dim: int) -> int:
    """How many decoder outputs ``config``'s likelihood reads per data value
    (:attr:`~pyrovae.likelihoods.Likelihood.params_per_value`)."""
    return LIKELIHOODS[config.likelihood].from_config(config, data_dim=data_dim).params_per_value


def _channels(image_shape: tuple[int, ...]) -> int:
    return int(image_shape[0]) if len(image_shape) == 3 else 1


def hierarchical_hidden_dims(config: TrainConfig) -> list[tuple[int, ...]]:
    """Hidden widths of the networks between consecutive layers x, z1, ..., zL, bottom
    first: ``config.hidden_dims`` between x and z1, then, between z(l-1) and z(l), as many
    layers each twice as wide as z(l) (Burda et al. 2016: ``[(200, 200), (100, 100)]`` for
    ``latent_dims=(100, 50)``).  The model's networks use the same widths, mirrored."""
    assert config.latent_dims is not None
    depth = len(config.hidden_dims)
    return [tuple(config.hidden_dims)] + [(2 * width,) * depth for width in config.latent_dims[1:]]


def build_hierarchical_vae(config: TrainConfig, *, data_dim: int) -> HierarchicalVAE:
    """Compose the :class:`HierarchicalVAE` of ``config.latent_dims`` from diagonal Gaussian
    layers (:class:`~pyrovae.layers.ConditionalNormal`), an MLP decoder from z1, and the
    prior and likelihood named in ``config`` (the prior over the top layer)."""
    assert config.latent_dims is not None
    hidden = hierarchical_hidden_dims(config)
    widths = (data_dim, *config.latent_dims)
    gain = config.init_gain
    guide_layers = gaussian_chain(widths, hidden, config.activation, init_gain=gain)
    prior_layers = [ConditionalNormal(widths[i + 1], widths[i], tuple(reversed(hidden[i])),
                                      config.activation, init_gain=gain)
                    for i in range(1, len(widths) - 1)]
    return HierarchicalVAE(
        guide_layers=list(guide_layers),
        prior_layers=prior_layers,
        prior=PRIORS[config.prior].from_config(config, data_dim=data_dim),
        decoder=MLPDecoder(widths[1], params_per_value(config, data_dim) * data_dim,
                           tuple(reversed(hidden[0])), config.activation, init_gain=gain),
        likelihood=LIKELIHOODS[config.likelihood].from_config(config, data_dim=data_dim),
        data_dim=data_dim,
    )
def _label_count(config: TrainConfig) -> int:
    if config.num_classes is None:
        raise ConfigError(f"--model {config.model} needs num_classes; apply_label_settings("
                          f"config, data) takes it from the data")
    return config.num_classes


def _label_networks(config: TrainConfig, data_dim: int, num_classes: int) -> tuple[Any, Any]:
    """The encoder of ``[x, onehot(y)]`` and the decoder of ``[z, onehot(y)]`` of
    ``config.net``, the hidden widths of a VAE's."""
    options = {"hidden_dims": config.hidden_dims, "activation": config.activation,
               "image_shape": None, "init_gain": config.init_gain,
               "init_scheme": config.init_scheme}
    encoder, _ = NETWORKS[config.net](data_dim=data_dim + num_classes,
                                      latent_dim=config.latent_dim, **options)
    _, decoder = NETWORKS[config.net](data_dim=params_per_value(config, data_dim) * data_dim,
                                      latent_dim=config.latent_dim + num_classes, **options)
    return encoder, decoder


def build_conditional_vae(config: TrainConfig, *, data_dim: int,
                          image_shape: tuple[int, ...] | None = None) -> ConditionalVAE:
    """Compose a :class:`~pyrovae.models.ConditionalVAE` from the registries named in
    ``config`` (``config.num_classes`` set, e.g. by :func:`apply_label_settings`)."""
    num_classes = _label_count(config)
    encoder, decoder = _label_networks(config, data_dim, num_classes)
    return ConditionalVAE(
        encoder=encoder, decoder=decoder,
        prior=PRIORS[config.prior].from_config(config, data_dim=data_dim),
        likelihood=LIKELIHOODS[config.likelihood].from_config(config, data_dim=data_dim),
        guide=GUIDES[config.guide].from_config(config, feature_dim=encoder.feature_dim),
        num_classes=num_classes, data_dim=data_dim)


def build_semi_supervised_vae(config: TrainConfig, *, data_dim: int,
                              image_shape: tuple[int, ...] | None = None) -> SemiSupervisedVAE:
    """Compose a :class:`~pyrovae.models.SemiSupervisedVAE` (M2) from the registries named
    in ``config``, with a classifier q(y|x) of ``config.hidden_dims`` (``config.num_classes``
    and ``config.alpha`` set, e.g. by :func:`apply_label_settings`)."""
    num_classes = _label_count(config)
    if config.alpha is None:
        raise ConfigError("--model semi_supervised needs alpha; apply_label_settings(config, "
                          "data) sets Kingma et al.'s from the data")
    encoder, decoder = _label_networks(config, data_dim, num_classes)
    return SemiSupervisedVAE(
        encoder=encoder, decoder=decoder,
        classifier=mlp((data_dim, *config.hidden_dims, num_classes), config.activation,
                       init_gain=config.init_gain, init_scheme=config.init_scheme),
        prior=PRIORS[config.prior].from_config(config, data_dim=data_dim),
        likelihood=LIKELIHOODS[config.likelihood].from_config(config, data_dim=data_dim),
        guide=GUIDES[config.guide].from_config(config, feature_dim=encoder.feature_dim),
        num_classes=num_classes, alpha=config.alpha, data_dim=data_dim)


#: the models of labelled data by ``--model`` name (the VAE is ``"vae"``)
LABEL_MODELS = {
    "conditional": build_conditional_vae,
    "semi_supervised": build_semi_supervised_vae,
}
assert set(LABEL_MODELS) == set(MODEL_KINDS) - {"vae"}


def apply_label_settings(config: TrainConfig, data: DataSplits) -> tuple[TrainConfig, DataSplits]:
    """The config and data a model of labelled data trains on: with ``config.labelled``, the
    labels of all but that many training points hidden (balanced per class, seeded by
    ``config.seed``: :meth:`~pyrovae.data.DataSplits.with_labelled`); ``num_classes`` from
    the data; M2's ``alpha`` where unset, Kingma et al. (2014)'s alpha = 0.1 N on the mean
    over the N_l labelled points, i.e. 0.1 N / N_l per labelled point (0 without labels);
    with ``label_batches`` interleaved, the data's training batches labelled or unlabelled
    only (:func:`~pyrovae.labels.interleave_labels`).
    A config of the plain VAE passes through.

    :raises ConfigError: data without labels, another number of classes than
        ``config.num_classes``, or ``labelled`` larger than the training set.
    """
    if config.model not in LABEL_MODELS:
        return config, data
    if not data.has_labels:
        raise ConfigError(f"--model {config.model} needs class labels and the data have none")
    if config.num_classes is not None and config.num_classes != data.num_classes:
        raise ConfigError(f"num_classes is {config.num_classes} but the data have "
                          f"{data.num_classes} classes")
    if config.labelled is not None:
        data = data.with_labelled(config.labelled, seed=config.seed)
    values: dict[str, Any] = {"num_classes": data.num_classes}
    if config.model == "semi_supervised" and config.alpha is None:
        values["alpha"] = paper_alpha(data.train.shape[0], data.num_labelled) \
            if data.num_labelled else 0.0
    if config.label_batches == "interleaved":
        data = interleave_labels(data)
    return replace(config, **values), data


def fit_batch_to_data(config: TrainConfig, num_train: int) -> TrainConfig:
    """``config`` with ``batch_size`` at most ``num_train``: a batch larger than a small
    training set becomes the whole set (one step per epoch), with a warning that says so;
    ``config.json`` then records the batch size that ran."""
    if config.batch_size <= num_train:
        return config
    logger.warning("batch size %d is larger than the training set (%d points): training with "
                   "batches of %d", config.batch_size, num_train, num_train)
    return replace(config, batch_size=num_train)
