"""A conditional VAE p(x | y, z), q(z | x, y) beside a VAE of x alone, at equal budget.

Two runs on dynamically binarized MNIST with the same networks (x -> 200 -> 200 -> z (50) and
back, tanh, Adam at 1e-3, minibatch 100): ``pyrovae train --model conditional``, whose
decoder and encoder also read the digit's one-hot label, and the plain VAE.  Each is
evaluated with K importance samples on the first ``--eval-size`` test images: the
conditional model's log p(x | y) and the VAE's log p(x).  Since

    log p(x | y) = log p(x) + log p(y | x) - log p(y),

a conditional model as good as the VAE gains at most log 10 = 2.30 nats on MNIST's balanced
digits (all of it when the digit is certain given the image).  ``samples.png`` holds one row
per digit, drawn by ``pyrovae sample`` from the conditional model.

Commands::

    python experiments/conditional.py              # the results table's budget
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from collections.abc import Sequence

import cli_runs

COMMON = ["--hidden-dims", "200", "200", "--latent-dim", "50", "--activation", "tanh",
          "--batch-size", "100", "--lr", "1e-3", "--binarize", "dynamic"]
RUNS = {"conditional": ["--model", "conditional"], "vae": []}
NUM_CLASSES = 10


def run(args: argparse.Namespace) -> int:
    rows = {}
    for name, flags in RUNS.items():
        run_dir = args.runs_dir / name
        seconds = cli_runs.train(run_dir, [*flags, *COMMON], args)
        evaluation = cli_runs.evaluate(run_dir, args)
        rows[name] = {
            "run": name, "flags": " ".join([*flags, *COMMON]),
            "epochs": cli_runs.epochs_done(run_dir), "train_seconds": seconds,
            "test_log_marginal_likelihood": evaluation["log_marginal_likelihood"],
            "test_log_marginal_likelihood_standard_error":
                evaluation["log_marginal_likelihood_standard_error"],
            "log_marginal_likelihood_of": evaluation.get("log_marginal_likelihood_of",
                                                         "log p(x)"),
            "test_elbo": evaluation["test_elbo"],
        }
    grid = args.runs_dir / "conditional" / "digits.png"
    cli_runs.sample(args.runs_dir / "conditional", grid, num_samples=10 * NUM_CLASSES,
                    seed=args.seed, threads=args.threads)
    shutil.copyfile(grid, args.out_dir / "samples.png")
    gain = (rows["conditional"]["test_log_marginal_likelihood"]
            - rows["vae"]["test_log_marginal_likelihood"])
    print(f"log p(x | y) - log p(x) = {gain:.2f} nats on {args.eval_size} test images "
          f"(at most log {NUM_CLASSES} = {math.log(NUM_CLASSES):.2f} for equally good models)")
    path = cli_runs.write_results(args.out_dir, "conditional", args, {
        "runs": list(rows.values()), "log_px_given_y_minus_log_px": gain,
        "gain_bound_for_equal_models": math.log(NUM_CLASSES),
        "figures": ["samples.png"]})
    print(f"written to {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="conditional.py", description=__doc__.split("\n\n")[0])
    cli_runs.add_arguments(parser, name="conditional", epochs=10, eval_samples=1000,
                           test_size=2000)
    return cli_runs.main(run, parser, argv)


if __name__ == "__main__":
    sys.exit(main())
