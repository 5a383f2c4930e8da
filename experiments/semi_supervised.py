"""Kingma et al. (2014)'s M2 with 100 and 3000 labels: test error of q(y | x) and log p(x).

Each run is ``pyrovae train --model semi_supervised --labelled N`` on dynamically binarized
MNIST: N training labels kept (balanced over the ten digits, chosen by the seed), the rest
hidden and summed out by enumeration in the ELBO; the classification term alpha log q(y | x)
at the paper's alpha = 0.1 N_train / N_labelled per labelled image; networks as in the paper
(one hidden layer of 500 softplus units in q(y | x), q(z | x, y) and p(x | y, z), 50 latents);
Adam at 3e-4, minibatch 200.  The test classification error is that of argmax q(y | x) on
all 10,000 test images; log p(x) sums y exactly (K importance samples per class) on the
first ``--eval-size`` test images.

Published (Kingma et al. 2014, Table 1, M2): 11.97% (+- 1.71) test error with 100 labels and
3.92% with 3000, after training to convergence.

Commands::

    python experiments/semi_supervised.py                        # the results table's budget
    python experiments/semi_supervised.py --seeds 0 1 2 --epochs 100
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence

import cli_runs

#: Kingma et al. (2014), Table 1: M2's MNIST test error (%) by the number of labels
PUBLISHED_ERROR = {100: 11.97, 3000: 3.92}
FLAGS = ["--model", "semi_supervised", "--hidden-dims", "500", "--latent-dim", "50",
         "--activation", "softplus", "--lr", "3e-4", "--batch-size", "200",
         "--binarize", "dynamic"]
TEST_IMAGES = 10_000


def run(args: argparse.Namespace) -> int:
    rows, summaries = [], []
    for labelled in args.labelled:
        errors = []
        for seed in args.seeds:
            name = f"m2_{labelled}_labels_seed{seed}"
            run_dir = args.runs_dir / name
            seconds = cli_runs.train(run_dir, [*FLAGS, "--labelled", str(labelled)],
                                     args, seed=seed)
            # K = 1 on every test image gives the classification error cheaply
            classified = cli_runs.evaluate(run_dir, args, num_samples=1,
                                           test_size=min(TEST_IMAGES, args.classify_size),
                                           name="classification.json")
            evaluation = cli_runs.evaluate(run_dir, args)
            error = 100 * classified["test_classification_error"]
            errors.append(error)
            rows.append({
                "run": name, "labelled": labelled, "seed": seed,
                "epochs": cli_runs.epochs_done(run_dir), "train_seconds": seconds,
                "test_classification_error_percent": error,
                "num_classified": classified["num_test_points"],
                "test_log_marginal_likelihood": evaluation["log_marginal_likelihood"],
                "test_log_marginal_likelihood_standard_error":
                    evaluation["log_marginal_likelihood_standard_error"],
                "test_elbo_of_x_and_y": evaluation["test_elbo"],
                "published_error_percent": PUBLISHED_ERROR.get(labelled),
            })
            print(f"{name}: test error {error:.2f}% ({classified['num_test_points']} images), "
                  f"log p(x) {evaluation['log_marginal_likelihood']:.2f} ± "
                  f"{evaluation['log_marginal_likelihood_standard_error']:.2f} nats after "
                  f"{rows[-1]['epochs']} epochs", flush=True)
        spread = statistics.stdev(errors) if len(errors) > 1 else None
        summaries.append({"labelled": labelled, "seeds": list(args.seeds),
                     "mean_error_percent": statistics.fmean(errors),
                     "std_error_percent": spread,
                     "published_error_percent": PUBLISHED_ERROR.get(labelled)})
    path = cli_runs.write_results(args.out_dir, "semi_supervised", args,
                                  {"flags": " ".join(FLAGS), "runs": rows,
                                   "summary": summaries})
    for summary in summaries:
        spread = summary["std_error_percent"]
        print(f"{summary['labelled']} labels: test error {summary['mean_error_percent']:.2f}%"
              + (f" ± {spread:.2f}" if spread is not None else "")
              + f" over seeds {summary['seeds']}; published {summary['published_error_percent']}%")
    print(f"written to {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="semi_supervised.py",
                                     description=__doc__.split("\n\n")[0])
    cli_runs.add_arguments(parser, name="semi_supervised", epochs=10, eval_samples=100,
                           test_size=1000)
    parser.add_argument("--labelled", type=int, nargs="+", default=[100, 3000],
                        help="numbers of labelled training images (default: 100 3000)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="seeds per number of labels (default: 0)")
    parser.add_argument("--classify-size", type=int, default=TEST_IMAGES,
                        help="test images for the classification error (default: all 10000)")
    return cli_runs.main(run, parser, argv)


if __name__ == "__main__":
    sys.exit(main())
