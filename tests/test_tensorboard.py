"""``--tensorboard``: the event files hold what metrics.csv holds, and more."""

from __future__ import annotations

import csv

import pytest

from pyrovae.cli import main
from tests.conftest import SHARED_DATA, requires_mnist

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator",
    reason="the tensorboard package is not installed (pip install 'pyrovae[tensorboard]')")


@requires_mnist
def test_tensorboard_events_match_the_metrics(tmp_path):
    run_dir = tmp_path / "run"
    assert main(["train", "--data-dir", str(SHARED_DATA), "--train-size", "200", "--test-size",
                 "40", "--epochs", "2", "--hidden-dims", "16", "--latent-dim", "2",
                 "--batch-size", "50", "--eval-samples", "0", "--no-progress", "--tensorboard",
                 "--out-dir", str(run_dir)]) == 0
    events = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = events.Tags()
    for tag in ("elbo/train", "elbo/test", "terms/reconstruction", "terms/kl", "lr"):
        assert tag in tags["scalars"], tag
    assert "samples" in tags["images"]
    with open(run_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    written = events.Scalars("elbo/test")
    assert [event.step for event in written] == [1, 2]
    for event, row in zip(written, rows, strict=True):
        assert event.value == pytest.approx(float(row["test_elbo"]), rel=1e-6)
    # the terms of the one-draw ELBO: a positive KL and a reconstruction below the ELBO's size
    kl = events.Scalars("terms/kl")[-1].value
    reconstruction = events.Scalars("terms/reconstruction")[-1].value
    assert kl > 0 and reconstruction < 0
    assert reconstruction - kl == pytest.approx(float(rows[-1]["test_elbo"]), abs=15.0)
    assert events.Scalars("lr")[0].value == pytest.approx(1e-3)


@requires_mnist
def test_tensorboard_logs_the_activity_columns_when_measured(tmp_path):
    run_dir = tmp_path / "run"
    assert main(["train", "--data-dir", str(SHARED_DATA), "--train-size", "200", "--test-size",
                 "40", "--epochs", "3", "--hidden-dims", "16", "--latent-dims", "4", "2",
                 "--batch-size", "50", "--eval-samples", "0", "--no-progress", "--tensorboard",
                 "--activity-every", "2", "--log-px-size", "40",
                 "--out-dir", str(run_dir)]) == 0
    events = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    with open(run_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns = [name for name in rows[0] if name.startswith(("active_units", "mutual_information"))]
    assert len(columns) == 4  # the total, one per layer, I(x; z)
    for column in columns:
        written = events.Scalars(f"activity/{column}")
        # measured every 2 epochs and after the last: epochs 2 and 3, nan (not written) at 1
        assert [event.step for event in written] == [2, 3]
        for event in written:
            assert event.value == pytest.approx(float(rows[event.step - 1][column]), rel=1e-6)
