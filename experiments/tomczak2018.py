"""The VampPrior paper's static-MNIST VAE at the paper's own protocol, banked in pieces.

``pyrovae train --preset tomczak2018`` sets the protocol of Tomczak & Welling (2018) as
their code (jmtomczak/vae_vampprior) has it: statically binarized MNIST, 50,000 training
images validated on the file's own 10,000, two gated 300-unit layers each way, 40 latents,
a VampPrior of 500 pseudo-inputs (free values clipped to [0, 1], started at
N(0.05, 0.01)), Adam at lr 5e-4 on gradients divided by their norms (AdamNormGrad), batch
100, the KL weight raised linearly over 100 epochs, early stopping once 50 epochs after the
warm-up bring no better validation ELBO, at most 2000 epochs, test log p(x) with K = 5000.
Hours on a CPU, so it is trained a budget at a time and banked in
``experiments/results/tomczak2018_vamp/``, from which any machine resumes it.

Commands::

    python experiments/tomczak2018.py train --data-dir ../shared/data --minutes 60
    python experiments/tomczak2018.py bank

The learning curve is the test log p(x) with K = 1000 on the first 1000 test images every
50 epochs; the final K = 5000 estimate on all 10,000 test images (``pyrovae evaluate RUN
--num-samples 5000`` on the best checkpoint) comes once the run has stopped.
"""

from __future__ import annotations

import sys

from protocol_runs import Protocol, main

PROTOCOL = Protocol(
    preset="tomczak2018", run="tomczak2018_vamp", epochs=2000,
    published=-85.57, published_source="Tomczak & Welling 2018, Table 2, VAE + VampPrior, "
                                       "static MNIST",
    start_flags=("--log-px-every", "50", "--log-px-samples", "1000", "--log-px-size", "1000"))

if __name__ == "__main__":
    sys.exit(main(PROTOCOL, description=__doc__.split("\n\n")[0]))
