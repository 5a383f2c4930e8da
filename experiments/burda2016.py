"""The IWAE paper's one-layer VAE at the paper's own protocol, banked in pieces.

``pyrovae train --preset burda2016`` sets the protocol of Burda, Grosse & Salakhutdinov
(2016) as their code has it: 59,600 dynamically binarized MNIST training images, minibatch
20, Adam(0.99, 0.999, eps 1e-4) with the second moment started at 1, 3280 epochs in eight
stages at 1e-3 x (1.0, 0.72, 0.52, 0.37, 0.27, 0.19, 0.14, 0.1), the decoder's output bias
at the logit of the training mean, test log p(x) with K = 5000.  That is about 9.8 million
updates: many hours on a CPU, so the run is trained a budget at a time and its latest
checkpoint kept in the repository (``experiments/results/burda2016_vae/``), from which any
machine resumes it bit for bit.

Commands::

    # train (or continue) for at most 60 minutes, into runs/burda2016_vae; further flags go
    # to pyrovae train
    python experiments/burda2016.py train --data-dir ../shared/data --minutes 60
    # bank it: checkpoint, config, metrics and a results.json with the learning curve
    python experiments/burda2016.py bank

``train`` starts from the banked checkpoint when ``runs/burda2016_vae`` does not exist and
one is in the repository.  The learning curve is the test log p(x) with K = 1000 on the
first 1000 test images every 20 epochs (``--log-px-every``); the final K = 5000 estimate on
all 10,000 test images is computed once the 3280 epochs are done.
"""

from __future__ import annotations

import sys

from protocol_runs import Protocol, main

PROTOCOL = Protocol(
    preset="burda2016", run="burda2016_vae", epochs=3280,
    published=-86.76, published_source="Burda et al. 2016, Table 1, VAE, one stochastic layer, k = 1",
    # the learning curve: test log p(x), K = 1000 on the first 1000 test images, every 20 epochs
    start_flags=("--log-px-every", "20", "--log-px-samples", "1000", "--log-px-size", "1000"))

if __name__ == "__main__":
    sys.exit(main(PROTOCOL, description=__doc__.split("\n\n")[0]))
