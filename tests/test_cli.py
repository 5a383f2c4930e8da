"""The pyrovae command end to end (subprocess), and its one-line errors (in process)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pyrovae import TrainConfig
from pyrovae.cli import build_parser, main
from tests.conftest import SHARED_DATA, requires_mnist, write_synthetic_dataset

TINY = ["--train-size", "300", "--test-size", "40", "--epochs", "2", "--hidden-dims", "32",
        "--latent-dim", "4", "--batch-size", "50", "--eval-samples", "20", "--no-progress"]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyrovae", *args], capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> list[str]:
    """``--dataset`` flags for synthetic 28x28 grey images, TINY's sizes (no MNIST needed)."""
    path = tmp_path_factory.mktemp("data") / "digits.npz"
    return ["--dataset", f"npz:{write_synthetic_dataset(path, num_train=300, num_test=40, side=28)}"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, digits):
    run_dir = tmp_path_factory.mktemp("run")
    result = run_cli("train", *digits, "--out-dir", str(run_dir), "--overwrite", *TINY)
    assert result.returncode == 0, result.stderr
    return run_dir, result


def test_train_writes_a_complete_run(trained_run):
    run_dir, result = trained_run
    for name in ("config.json", "metrics.csv", "checkpoint.pt", "samples.png", "results.json"):
        assert (run_dir / name).is_file(), name
    results = json.loads((run_dir / "results.json").read_text())
    assert results["num_samples"] == 20 and results["num_test_points"] == 40
    # the IWAE bound with 20 samples sits above the ELBO of the same model
    assert results["test_elbo"] < results["log_marginal_likelihood"] < 0
    assert results["commit"] is not None and results["torch"]
    assert "log p(x) (K=20)" in result.stdout


def test_evaluate_prints_and_writes_json(trained_run, tmp_path):
    run_dir, _ = trained_run
    output = tmp_path / "eval.json"
    result = run_cli("evaluate", str(run_dir / "checkpoint.pt"), "-k", "30", "--test-size", "25",
                     "--device", "cpu", "-o", str(output))
    assert result.returncode == 0, result.stderr
    values = json.loads(output.read_text())
    assert values["num_samples"] == 30 and values["num_test_points"] == 25
    assert values["log_marginal_likelihood_standard_error"] > 0
    assert "log p(x) (K=30)" in result.stdout


def test_sample_writes_a_png_grid(trained_run, tmp_path):
    run_dir, _ = trained_run
    output = tmp_path / "grid.png"
    result = run_cli("sample", str(run_dir), "-n", "9", "-o", str(output), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    from PIL import Image

    # 3 x 3 grid of 28-pixel digits with 2-pixel padding, enlarged three times
    with Image.open(output) as image:
        assert image.size == (3 * (3 * 28 + 4 * 2), 3 * (3 * 28 + 4 * 2))


def test_help_reads_well():
    result = run_cli("train", "--help")
    assert result.returncode == 0
    for flag in ("--prior", "--guide", "--likelihood", "--objective", "--data-dir", "--binarize"):
        assert flag in result.stdout


def one_line_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        raise SystemExit(main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pyrovae: error:"), err
    return err[0]


def test_missing_data_dir_is_one_clear_line(capsys, tmp_path):
    message = one_line_error(capsys, ["train", "--data-dir", str(tmp_path / "absent"), "--out-dir",
                                      str(tmp_path / "run"), "--no-progress"])
    assert "absent does not exist" in message and "--data-dir" in message


def test_grey_levels_with_bernoulli_is_one_clear_line(capsys, tmp_path, digits):
    message = one_line_error(capsys, ["train", *digits, "--binarize", "none",
                                      "--out-dir", str(tmp_path / "run"), *TINY])
    assert "Bernoulli likelihood needs binary data" in message
    assert not (tmp_path / "run" / "config.json").exists()  # nothing half-written


def test_an_existing_run_is_not_overwritten(capsys, trained_run, digits):
    run_dir, _ = trained_run
    before = (run_dir / "checkpoint.pt").read_bytes()
    message = one_line_error(capsys, ["train", *digits, "--out-dir", str(run_dir), *TINY])
    assert "already holds a run" in message and "--overwrite" in message
    assert (run_dir / "checkpoint.pt").read_bytes() == before


def test_missing_checkpoint_is_one_clear_line(capsys, tmp_path):
    message = one_line_error(capsys, ["evaluate", str(tmp_path / "nope.pt")])
    assert "checkpoint not found" in message


def test_unknown_prior_lists_the_known_ones(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--prior", "nope"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "epochs must be positive, got 0"),
    (["--batch-size", "-3"], "batch_size must be positive"),
    (["--train-size", "0"], "train_size must be positive"),
    (["--lr", "-1"], "lr must be positive"),
    (["--latent-dim", "0"], "latent_dim must be positive"),
    (["--clip-norm", "0"], "clip_norm must be positive"),
    (["--sigma", "0", "--likelihood", "gaussian"], "sigma must be positive"),
    (["--init-scheme", "he_normal", "--init-gain", "1"],
     "init_gain 1.0 is the gain of the Glorot-uniform start"),
    (["--guide", "fullcov", "--guide-scale", "clipped_log_variance"],
     "--guide-scale clipped_log_variance is not available with --guide fullcov"),
    (["--bernoulli-logit-clip", "-1"], "bernoulli_logit_clip must be a positive number"),
    (["--likelihood", "gaussian", "--bernoulli-logit-clip", "5"],
     "--bernoulli-logit-clip is for --likelihood bernoulli"),
    (["--preset", "tomczak2018", "--init-gain", "1"],
     "init_gain 1.0 is the gain of the Glorot-uniform start"),
    (["--preset", "tomczak2018", "--likelihood", "gaussian"],
     "--bernoulli-logit-clip none turns it off"),
])
def test_bad_values_are_one_clear_line(capsys, tmp_path, flags, message):
    line = one_line_error(capsys, ["train", "--out-dir", str(tmp_path / "run"), *flags])
    assert message in line


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "two"], "argument --epochs: invalid int value: 'two'"),
    (["--guide", "nope"], "argument --guide: invalid choice: 'nope' (choose from"),
    (["--likelihood", "poisson"], "argument --likelihood: invalid choice: 'poisson'"),
    (["--init-scheme", "lecun"], "argument --init-scheme: invalid choice: 'lecun'"),
    (["--guide-scale", "exp"], "argument --guide-scale: invalid choice: 'exp'"),
    (["--bernoulli-logit-clip", "big"],
     "argument --bernoulli-logit-clip: expected a number or none, got 'big'"),
])
def test_unparseable_flags_are_one_line(capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_lr_schedule_takes_iwae_and_names_the_choices_otherwise(capsys):
    args = build_parser().parse_args(["train", "--lr-schedule", "iwae"])
    assert TrainConfig.from_args(args).lr_schedule == "iwae"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--lr-schedule", "step"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --lr-schedule: invalid choice: 'step'" in err
    assert "constant" in err and "iwae" in err and "cosine" in err and "plateau" in err


def test_the_lr_schedule_cannot_change_on_resume(capsys, tmp_path):
    TrainConfig(out_dir=str(tmp_path)).save(tmp_path / "config.json")
    (tmp_path / "checkpoint.pt").touch()  # refused before it is read
    line = one_line_error(capsys, ["train", "--resume", str(tmp_path), "--lr-schedule", "iwae"])
    assert "--lr-schedule cannot change when resuming" in line


@pytest.mark.parametrize("flags", [["--init-scheme", "he_normal"],
                                   ["--guide-scale", "clipped_log_variance"],
                                   ["--bernoulli-logit-clip", "11.5"]])
def test_the_start_scale_and_clip_cannot_change_on_resume(capsys, tmp_path, flags):
    # a run saved before these fields existed: its config.json has none of them
    values = TrainConfig(out_dir=str(tmp_path)).to_dict()
    for name in ("init_scheme", "guide_scale", "bernoulli_logit_clip"):
        del values[name]
    (tmp_path / "config.json").write_text(json.dumps(values))
    (tmp_path / "checkpoint.pt").touch()  # refused before it is read
    line = one_line_error(capsys, ["train", "--resume", str(tmp_path), *flags])
    assert f"{flags[0]} cannot change when resuming" in line


@requires_mnist
def test_a_batch_larger_than_the_data_is_reduced_to_it_with_a_warning(capsys, tmp_path):
    run_dir = tmp_path / "run"
    assert main(["train", "--data-dir", str(SHARED_DATA), "--out-dir", str(run_dir),
                 "--train-size", "30", "--test-size", "10", "--batch-size", "100",
                 "--epochs", "1", "--hidden-dims", "8", "--latent-dim", "2",
                 "--eval-samples", "2", "--no-progress"]) == 0
    assert ("batch size 100 is larger than the training set (30 points): training with "
            "batches of 30") in capsys.readouterr().err
    assert json.loads((run_dir / "config.json").read_text())["batch_size"] == 30
    assert json.loads((run_dir / "results.json").read_text())["config"]["batch_size"] == 30

