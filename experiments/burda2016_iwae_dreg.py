"""The IWAE paper's one-layer model trained with ``iwae_dreg`` at K = 5, at the paper's own
protocol, banked in pieces.

The protocol is ``pyrovae train --preset burda2016`` (see ``burda2016.py``: 3280 epochs,
minibatch 20, about 9.8 million updates) with the objective swapped for the IWAE bound with
doubly reparameterised encoder gradients (Tucker, Lawson, Gu, Maddison 2019) at K = 5.  The
row to set it against is the paper's IWAE at K = 5, one stochastic layer: -85.54 nats.
Tucker et al. train for fewer updates than Burda et al.; this run follows Burda et al.'s
schedule, so the two differ only in the encoder's gradient estimator.

Commands::

    # train (or continue) for at most 60 minutes, into runs/burda2016_iwae_dreg_k5
    python experiments/burda2016_iwae_dreg.py train --data-dir ../shared/data --minutes 60
    # bank it: checkpoint, config, metrics and a results.json with the learning curve
    python experiments/burda2016_iwae_dreg.py bank
    # after epoch 3280: the paper's estimate, K = 5000 on all 10,000 test images
    python experiments/burda2016_iwae_dreg.py final

``train`` starts from the banked checkpoint (``experiments/results/burda2016_iwae_dreg_k5/``)
when the run directory has none.  The learning curve is the test log p(x) with K = 1000 on
the first 1000 test images every 20 epochs, as for ``burda2016.py``.
"""

from __future__ import annotations

import sys

from protocol_runs import Protocol, main

PROTOCOL = Protocol(
    preset="burda2016", run="burda2016_iwae_dreg_k5", epochs=3280, published=-85.54,
    published_source="Burda et al. 2016, Table 1, IWAE, one stochastic layer, k = 5 "
                     "(trained with IWAE's own gradient; this run with DReG's)",
    start_flags=("--objective", "iwae_dreg", "--num-particles", "5",
                 "--log-px-every", "20", "--log-px-samples", "1000", "--log-px-size", "1000"),
    script="burda2016_iwae_dreg.py",
    # the protocol reports the last checkpoint: one in the bank keeps it small
    bank_best=False)

if __name__ == "__main__":
    sys.exit(main(PROTOCOL, description=__doc__.split("\n\n")[0]))
