"""The structured-model experiments (hierarchical, semi_supervised, conditional) run end to
end with tiny arguments, through the pyrovae command line, and continue where they stopped."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from pyrovae.plotting import display_scale
from tests.conftest import SHARED_DATA, requires_mnist
from tests.test_experiments import run_script

#: a few hundred images, one epoch, K = 5 on 40 test images
TINY = ("--epochs", "1", "--eval-samples", "5", "--eval-size", "40", "--train-size", "240",
        "--test-size", "100")


def _run(name: str, tmp_path: Path, *args: str) -> tuple[dict, str]:
    result = run_script(name, "--data-dir", str(SHARED_DATA), "--out-dir", str(tmp_path / "out"),
                        "--runs-dir", str(tmp_path / "runs"), *TINY, *args)
    return json.loads((tmp_path / "out" / "results.json").read_text()), result.stdout


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


@requires_mnist
def test_hierarchical_compares_two_layers_with_one(tmp_path):
    results, _ = _run("hierarchical.py", tmp_path, "--valid-size", "40", "--hidden-dims", "16")
    runs = {row["run"]: row for row in results["runs"]}
    assert set(runs) == {"one_layer_vae", "one_layer_iwae5", "two_layer_vae", "two_layer_iwae5"}
    for row in runs.values():
        assert row["epochs"] == 1 and -800 < row["test_log_marginal_likelihood"] < 0
        assert row["test_elbo"] <= row["test_log_marginal_likelihood"] + 1  # K=5 vs ELBO
    assert set(runs["two_layer_vae"]["active_units"]) == {"z1", "z2"}
    assert 0 <= runs["two_layer_vae"]["active_units"]["z2"] <= 50
    assert 0 <= runs["one_layer_vae"]["active_units"]["z"] <= 50
    assert runs["two_layer_iwae5"]["published_active_units"] == "21+5"
    assert set(results["two_layers_beat_one"]) == {"vae", "iwae5"}
    assert results["commit"] and results["seed"] == 0 and results["eval_samples"] == 5


@requires_mnist
def test_semi_supervised_reports_the_test_error_and_continues(tmp_path):
    args = ("--labelled", "20", "--classify-size", "100", "--hidden-dims", "16",
            "--latent-dim", "3")
    results, _ = _run("semi_supervised.py", tmp_path, *args)
    (row,) = results["runs"]
    assert row["labelled"] == 20 and row["num_classified"] == 100
    assert 0 <= row["test_classification_error_percent"] <= 100
    assert row["test_log_marginal_likelihood"] < 0
    (summary,) = results["summary"]
    assert summary["mean_error_percent"] == row["test_classification_error_percent"]
    # a second call trains and evaluates nothing again
    _, stdout = _run("semi_supervised.py", tmp_path, *args)
    assert "1 epochs already trained" in stdout and "$ pyrovae" not in stdout
    # more epochs: the run continues and its evaluations describe the new checkpoint
    results, stdout = _run("semi_supervised.py", tmp_path, *args, "--epochs", "2")
    assert "$ pyrovae train --resume" in stdout and stdout.count("$ pyrovae evaluate") == 2
    assert results["runs"][0]["epochs"] == 2


@requires_mnist
def test_conditional_draws_one_row_per_digit(tmp_path):
    results, _ = _run("conditional.py", tmp_path, "--hidden-dims", "16", "--latent-dim", "3")
    runs = {row["run"]: row for row in results["runs"]}
    assert runs["conditional"]["log_marginal_likelihood_of"] == "log p(x | y)"
    assert runs["vae"]["log_marginal_likelihood_of"] == "log p(x)"
    gain = results["log_px_given_y_minus_log_px"]
    expected = (runs["conditional"]["test_log_marginal_likelihood"]
                - runs["vae"]["test_log_marginal_likelihood"])
    assert abs(gain - expected) < 1e-9
    width, height = _png_size(tmp_path / "out" / "samples.png")
    # ten rows of ten 28-pixel digits, torchvision's 2-pixel padding around each, the whole
    # grid enlarged by the display factor (3 for a 28x28 digit)
    scale = display_scale((1, 28, 28))
    assert scale == 3
    assert (width, height) == ((10 * 30 + 2) * scale, (10 * 30 + 2) * scale)
