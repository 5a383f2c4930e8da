"""A peer at equal budget: pyrovae's VAE and pythae's VAE trained alike, each scored by both
libraries' log p(x) estimators.

Both models are the IWAE paper's 784-200-200-50 tanh VAE (Glorot-uniform bodies, Bernoulli
likelihood, N(0, I) prior, diagonal Gaussian q(z|x)) on dynamically binarized MNIST (each
training image redrawn x ~ Bernoulli(intensity) whenever it is used; the test images binarized
once with pyrovae's fixed seed), trained for the same epochs with the same batch size and the
same Adam (torch's, lr ``--lr``, betas 0.9/0.999, eps 1e-8).  pyrovae trains with
:func:`pyrovae.fit` on Pyro's ``Trace_ELBO`` (a Monte Carlo KL), or with ``--objective
meanfield_elbo`` on ``TraceMeanField_ELBO`` (the analytic KL, as pythae's loss has it);
pythae with its own ``BaseTrainer`` (``pythae.models.VAE``, BCE reconstruction loss plus the
analytic KL), fed by a dataset that redraws each image as it is loaded.  The two start
from the same weights except q's scale head: pyrovae's is ``softplus(W h + b) + 1e-4``,
pythae's ``exp(0.5 * (W h + b))`` (its log-variance convention), each at its own default start.

Each trained model is then scored on the same test images by pyrovae's
:func:`~pyrovae.log_marginal_likelihood` (the program: pythae's networks in a Pyro model and
guide) and by pythae's ``VAE.get_nll`` (pyrovae's networks behind pythae's encoder and decoder
interface); ``get_nll`` returns the mean log p(x) itself, in nats, despite its name.  With the
same K, the two estimators of one model differ only by their draws.

pythae is not a dependency of pyrovae: install it in a virtualenv of its own that can import
torch, pyro and pyrovae, e.g. one whose ``.pth`` file names this repository's virtualenv's
site-packages, with ``pip install --no-deps pythae imageio pydantic pydantic-core
annotated-types typing-inspection``.  Without pythae the script says so in one line and exits.

Writes ``--output`` (JSON: commit, seed, hardware, budget, both models' numbers).

Usage::

    /path/to/pythae-venv/bin/python experiments/compare_pythae.py --epochs 5

References:

1. Chadebec, Vincent, Allassonniere (2022). Pythae: Unifying Generative Autoencoders in
   Python. NeurIPS Datasets and Benchmarks.
2. Burda, Grosse, Salakhutdinov (2016). Importance Weighted Autoencoders. ICLR.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import logging
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))

import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from pyrovae import TrainConfig, build_vae, elbo, fit, load_dataset, log_marginal_likelihood  # noqa: E402
from pyrovae.data import DATA_DIR_ENV  # noqa: E402
from pyrovae.evaluation import mean_and_standard_error  # noqa: E402
from pyrovae.models import VAE  # noqa: E402
from pyrovae.provenance import provenance  # noqa: E402
from pyrovae.sites import DATA_PLATE, LATENT_SITE, OBSERVED_SITE  # noqa: E402

DEFAULT_OUTPUT = REPOSITORY / "experiments" / "results" / "compare_pythae" / "results.json"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compare_pythae.py", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    import os

    add("--data-dir", default=os.environ.get(DATA_DIR_ENV) or str(REPOSITORY.parent / "shared" / "data"),
        help="folder holding MNIST/raw (default: $%(prog)s's PYROVAE_DATA, else ../shared/data)")
    add("--output", default=str(DEFAULT_OUTPUT), help="results JSON (default: %(default)s)")
    add("--epochs", type=int, default=5, help="epochs of each library (default: %(default)s)")
    add("--batch-size", type=int, default=100, help="minibatch size (default: %(default)s)")
    add("--lr", type=float, default=1e-3, help="Adam learning rate (default: %(default)s)")
    add("--train-size", type=int, default=None, help="first N training images (default: all)")
    add("--test-size", type=int, default=1000,
        help="first N test images scored (default: %(default)s)")
    add("--eval-samples", type=int, default=1000,
        help="importance samples K of both estimators; a multiple of 100 above 100 "
             "(default: %(default)s)")
    add("--hidden-dims", type=int, nargs="+", default=[200, 200],
        help="hidden widths of the encoder; the decoder mirrors them (default: %(default)s)")
    add("--latent-dim", type=int, default=50, help="dimension of z (default: %(default)s)")
    add("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    add("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    add("--objective", default="trace_elbo", choices=("trace_elbo", "meanfield_elbo"),
        help="pyrovae's ELBO: trace_elbo, the Monte Carlo KL of Pyro's Trace_ELBO; "
             "meanfield_elbo, the analytic KL of TraceMeanField_ELBO, as pythae's VAE loss "
             "computes it (default: %(default)s)")
    return parser


def _pythae_networks(vae: VAE) -> tuple[nn.Module, nn.Module]:
    """pythae encoder and decoder with copies of ``vae``'s starting weights (bodies, decoder,
    the loc head) and a fresh log-variance head."""
    from pythae.models.base.base_utils import ModelOutput
    from pythae.models.nn import BaseDecoder, BaseEncoder

    class Encoder(BaseEncoder):
        def __init__(self) -> None:
            BaseEncoder.__init__(self)
            self.body = copy.deepcopy(vae.encoder)
            self.embedding = copy.deepcopy(vae.guide_family.loc_head)
            self.log_var = nn.Linear(vae.guide_family.loc_head.in_features, vae.latent_dim)

        def forward(self, x: torch.Tensor) -> ModelOutput:
            h = self.body(x.reshape(*x.shape[:-1], -1) if x.dim() > 1 else x)
            return ModelOutput(embedding=self.embedding(h), log_covariance=self.log_var(h))

    class Decoder(BaseDecoder):
        def __init__(self) -> None:
            BaseDecoder.__init__(self)
            self.body = copy.deepcopy(vae.decoder)

        def logits(self, z: torch.Tensor) -> torch.Tensor:
            return self.body(z)

        def forward(self, z: torch.Tensor) -> ModelOutput:
            return ModelOutput(reconstruction=torch.sigmoid(self.logits(z)))

    return Encoder(), Decoder()


def _pyrovae_behind_pythae(vae: VAE, model_config: Any) -> Any:
    """A ``pythae.models.VAE`` whose encoder and decoder are ``vae``'s networks, for
    ``get_nll``: q's log-variance is ``2 log z_scale``, the reconstruction the Bernoulli mean."""
    from pythae.models import VAE as PythaeVAE
    from pythae.models.base.base_utils import ModelOutput
    from pythae.models.nn import BaseDecoder, BaseEncoder

    class Encoder(BaseEncoder):
        def __init__(self) -> None:
            BaseEncoder.__init__(self)
            self.vae = vae

        def forward(self, x: torch.Tensor) -> ModelOutput:
            posterior = self.vae.untraced_posterior(x).base_dist
            return ModelOutput(embedding=posterior.loc,
                               log_covariance=2 * torch.log(posterior.scale))

    class Decoder(BaseDecoder):
        def __init__(self) -> None:
            BaseDecoder.__init__(self)
            self.vae = vae

        def forward(self, z: torch.Tensor) -> ModelOutput:
            return ModelOutput(reconstruction=torch.sigmoid(self.vae.decoder(z)))

    return PythaeVAE(model_config, encoder=Encoder(), decoder=Decoder())


def _pythae_program(model: Any, latent_dim: int) -> tuple[Any, Any]:
    """pythae's trained VAE as a Pyro (model, guide) pair that pyrovae's estimators run."""

    def pyro_model(x: torch.Tensor) -> None:
        prior = dist.Normal(torch.zeros(latent_dim), torch.ones(latent_dim)).to_event(1)
        with pyro.plate(DATA_PLATE, x.shape[0], dim=-1):
            z = pyro.sample(LATENT_SITE, prior)
            pyro.sample(OBSERVED_SITE, dist.Bernoulli(logits=model.decoder.logits(z)).to_event(1),
                        obs=x)

    def pyro_guide(x: torch.Tensor) -> None:
        output = model.encoder(x)
        scale = torch.exp(0.5 * output.log_covariance)
        with pyro.plate(DATA_PLATE, x.shape[0], dim=-1):
            pyro.sample(LATENT_SITE, dist.Normal(output.embedding, scale).to_event(1))

    return pyro_model, pyro_guide


def _binarizing_dataset(grey: torch.Tensor) -> Any:
    """A pythae dataset that redraws each image x ~ Bernoulli(grey) as it is loaded."""
    from pythae.data.datasets import BaseDataset, DatasetOutput

    class DynamicallyBinarized(BaseDataset):
        def __getitem__(self, index: int) -> DatasetOutput:
            return DatasetOutput(data=torch.bernoulli(self.data[index]), labels=self.labels[index])

    return DynamicallyBinarized(grey, torch.zeros(grey.shape[0]))


def _scores(program: Any, pythae_view: Any, x: torch.Tensor, num_samples: int,
            seed: int) -> tuple[dict[str, float], torch.Tensor]:
    """Test ELBO and both estimators' log p(x) of one model, nats per image, and pyrovae's
    estimate for each image ``(N,)``."""
    pyro.set_rng_seed(seed)
    started = time.perf_counter()
    per_image = log_marginal_likelihood(program, x, num_samples=num_samples, seed=seed)
    log_px = mean_and_standard_error(per_image)
    pyrovae_seconds = time.perf_counter() - started
    test_elbo = mean_and_standard_error(elbo(program, x))
    torch.manual_seed(seed)
    started = time.perf_counter()
    with torch.no_grad():
        # get_nll draws batch_size samples per pass, so K must be a multiple of it
        pythae_log_px = float(pythae_view.get_nll(x, n_samples=num_samples,
                                                  batch_size=min(num_samples, 100)))
    return {"test_elbo": test_elbo.mean, "test_elbo_standard_error": test_elbo.standard_error,
            "log_px_pyrovae_estimator": log_px.mean,
            "log_px_pyrovae_estimator_standard_error": log_px.standard_error,
            "log_px_pythae_get_nll": pythae_log_px,
            "pyrovae_estimator_seconds": pyrovae_seconds,
            "pythae_get_nll_seconds": time.perf_counter() - started}, per_image


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from pythae.models import VAE as PythaeVAE
        from pythae.models import VAEConfig
        from pythae.trainers import BaseTrainer, BaseTrainerConfig
    except ImportError as error:
        print(f"skipped: pythae is not installed here ({error}); install it in its own "
              f"virtualenv and run this script with that interpreter (see the docstring)")
        return 0
    if args.eval_samples > 100 and args.eval_samples % 100:
        print("error: --eval-samples above 100 must be a multiple of 100 (pythae's get_nll "
              "draws 100 samples per pass)", file=sys.stderr)
        return 2
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("pythae"):
            logging.getLogger(name).setLevel(logging.WARNING)  # its trainer logs every epoch
    torch.set_num_threads(args.threads)
    data = load_dataset("mnist", args.data_dir, binarize="dynamic", download=False)
    data = data.subset(args.train_size, args.test_size)
    x_test = data.test

    config = TrainConfig(dataset="mnist", binarize="dynamic", hidden_dims=tuple(args.hidden_dims),
                         latent_dim=args.latent_dim, epochs=args.epochs, objective=args.objective,
                         batch_size=args.batch_size, lr=args.lr, seed=args.seed, device="cpu",
                         progress=False)
    torch.manual_seed(args.seed)
    vae = build_vae(config, data_dim=data.data_dim)
    encoder, decoder = _pythae_networks(vae)  # same starting weights, before either trains

    started = time.perf_counter()
    history = fit(vae, data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                  seed=args.seed, test_every=args.epochs, progress=False, config=config,
                  fused=False, objective=args.objective)
    pyrovae_seconds = time.perf_counter() - started
    vae.train(False)

    model_config = VAEConfig(input_dim=(data.data_dim,), latent_dim=args.latent_dim,
                             reconstruction_loss="bce")
    model = PythaeVAE(model_config, encoder=encoder, decoder=decoder)
    with tempfile.TemporaryDirectory() as output_dir:
        trainer_config = BaseTrainerConfig(
            output_dir=output_dir, num_epochs=args.epochs, learning_rate=args.lr,
            per_device_train_batch_size=args.batch_size, optimizer_cls="Adam", no_cuda=True,
            seed=args.seed, steps_saving=None)
        trainer = BaseTrainer(model, _binarizing_dataset(data.train), training_config=trainer_config)
        started = time.perf_counter()
        trainer.train()
        pythae_seconds = time.perf_counter() - started
    model = trainer.model.eval()  # the last epoch's parameters, as for pyrovae

    updates = args.epochs * math.ceil(data.train.shape[0] / args.batch_size)
    pyrovae_scores, pyrovae_per_image = _scores(
        vae, _pyrovae_behind_pythae(vae, model_config), x_test, args.eval_samples, args.seed)
    pythae_scores, pythae_per_image = _scores(
        _pythae_program(model, args.latent_dim), model, x_test, args.eval_samples, args.seed)
    # the same images under both models: the paired difference has a far smaller error
    difference = mean_and_standard_error(pyrovae_per_image - pythae_per_image)
    results = {
        "what": "pyrovae vs pythae VAE at equal budget, each scored by both estimators",
        "model": f"{data.data_dim}-{'-'.join(map(str, args.hidden_dims))}-{args.latent_dim} tanh "
                 f"MLP VAE, Bernoulli likelihood, N(0, I) prior, diagonal Gaussian q(z|x)",
        "data": "MNIST, dynamically binarized training images; test images binarized once",
        "budget": {"epochs": args.epochs, "updates": updates, "batch_size": args.batch_size,
                   "optimizer": f"Adam lr {args.lr} betas (0.9, 0.999) eps 1e-8",
                   "pyrovae_objective": args.objective,
                   "pythae_objective": "BCE reconstruction + analytic KL (pythae VAE loss)",
                   "num_train": int(data.train.shape[0]), "num_test_points": int(x_test.shape[0]),
                   "eval_samples": args.eval_samples},
        "seed": args.seed,
        "pythae_version": importlib.metadata.version("pythae"),
        "threads": args.threads,
        "pyrovae": {"train_seconds": pyrovae_seconds, "final_train_elbo": history[-1].train_elbo,
                    **pyrovae_scores},
        "pythae": {"train_seconds": pythae_seconds, **pythae_scores},
        "pyrovae_minus_pythae_log_px": difference.mean,
        "pyrovae_minus_pythae_log_px_standard_error": difference.standard_error,
        **provenance("cpu"),
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    for name in ("pyrovae", "pythae"):
        row = results[name]
        print(f"{name}: trained {row['train_seconds']:.0f} s; test ELBO {row['test_elbo']:.2f}; "
              f"log p(x) by pyrovae's estimator {row['log_px_pyrovae_estimator']:.2f} ± "
              f"{row['log_px_pyrovae_estimator_standard_error']:.2f}, by pythae's get_nll "
              f"{row['log_px_pythae_get_nll']:.2f} nats (K={args.eval_samples})")
    print(f"pyrovae minus pythae, paired over the test images: {difference.mean:+.2f} ± "
          f"{difference.standard_error:.2f} nats (pyrovae's estimator)")
    print(f"results in {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
