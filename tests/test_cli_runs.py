"""The run directory through the CLI: --overwrite starts afresh, the lock, resume edges,
foreign checkpoints, outputs that are kept, bad inputs in one line, signals in the final
evaluation (in process, tiny runs)."""

from __future__ import annotations

import json
import math
import os
import signal

import numpy as np
import pytest
import torch

from pyrovae import TrainConfig, build_vae
from pyrovae.activity import active_units
from pyrovae.checkpoint import read_checkpoint
from pyrovae.cli import main
from pyrovae.rundir import RunLock
from tests.conftest import SHARED_DATA, requires_mnist

TINY = ["--data-dir", str(SHARED_DATA), "--train-size", "100", "--test-size", "20",
        "--epochs", "1", "--hidden-dims", "16", "--latent-dim", "2", "--batch-size", "50",
        "--eval-samples", "30", "--no-progress"]


def one_line_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()  # what earlier commands of the test printed
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pyrovae: error:"), err
    return err[0]


@pytest.fixture
def run(tmp_path):
    run_dir = tmp_path / "run"
    assert main(["train", "--out-dir", str(run_dir), *TINY]) == 0
    return run_dir


@requires_mnist
def test_overwrite_starts_from_an_empty_run(run, capsys):
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "epoch-0007.pt").write_bytes((run / "checkpoint.pt").read_bytes())
    (run / "checkpoint.pt.x.tmp").write_bytes(b"orphan")
    (run / "notes.txt").write_text("mine")
    assert main(["train", "--out-dir", str(run), "--overwrite", "--seed", "3", "--keep-last",
                 "1", *TINY]) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch-0001.pt"]
    assert not list(run.glob("*.tmp")) and (run / "notes.txt").read_text() == "mine"
    for name in ("checkpoint.pt", "checkpoint_best.pt", "checkpoints/epoch-0001.pt"):
        assert read_checkpoint(run / name)["config"]["seed"] == 3, name


@requires_mnist
def test_a_second_process_is_refused_while_the_run_is_locked(run, capsys):
    before = (run / "config.json").read_bytes()
    with RunLock(run):
        for argv in (["train", "--resume", str(run)],
                     ["train", "--out-dir", str(run), "--overwrite", *TINY]):
            assert "is in use by another pyrovae process" in one_line_error(capsys, argv)
    assert (run / "config.json").read_bytes() == before
    assert (run / "checkpoint.pt").is_file()


@requires_mnist
def test_resume_with_fewer_epochs_is_refused_and_changes_nothing(run, capsys):
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 0
    before = (run / "config.json").read_bytes()
    line = one_line_error(capsys, ["train", "--resume", str(run), "--epochs", "1"])
    assert "has trained 2 epochs; --epochs 1 would drop some" in line
    assert (run / "config.json").read_bytes() == before


@requires_mnist
def test_a_broken_checkpoint_fails_resume_before_config_json_is_rewritten(run, capsys):
    checkpoint = read_checkpoint(run)
    del checkpoint["progress"]["lr"]
    torch.save(checkpoint, run / "checkpoint.pt")
    before = (run / "config.json").read_bytes()
    line = one_line_error(capsys, ["train", "--resume", str(run), "--epochs", "3"])
    assert "the training position has no 'lr'" in line
    assert (run / "config.json").read_bytes() == before


@requires_mnist
def test_evaluate_reports_khat_records_the_epoch_and_keeps_the_previous_file(run, capsys):
    results = json.loads((run / "results.json").read_text())
    assert 0 <= results["fraction_khat_above_threshold"] <= 1
    assert isinstance(results["active_units"], int) and "posterior_collapsed" in results
    capsys.readouterr()
    for _ in range(2):
        assert main(["evaluate", str(run), "-k", "30", "--no-progress", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "k-hat > 0.7 for" in out and "previous one is kept as" in out
    values = json.loads((run / "evaluation.json").read_text())
    assert values["checkpoint_epoch"] == 1 and values["fraction_khat_above_threshold"] is not None
    assert json.loads((run / "evaluation-1.json").read_text())["checkpoint_epoch"] == 1


@requires_mnist
def test_evaluate_refuses_a_checkpoint_its_config_json_does_not_describe(run, capsys):
    config = json.loads((run / "config.json").read_text())
    config["latent_dim"] = 8
    (run / "config.json").write_text(json.dumps(config))
    for command in ("evaluate", "sample"):
        line = one_line_error(capsys, [command, str(run), "--device", "cpu"])
        assert "was not trained with" in line and "latent_dim 2 vs 8" in line
    assert not (run / "evaluation.json").exists()


@requires_mnist
def test_sample_keeps_the_training_grid_and_names_a_missing_folder(run, capsys, tmp_path):
    before = (run / "samples.png").read_bytes()
    assert main(["sample", str(run), "-n", "4", "--device", "cpu"]) == 0
    assert (run / "samples.png").read_bytes() == before and (run / "samples-1.png").is_file()
    line = one_line_error(capsys, ["sample", str(run), "-o", str(tmp_path / "no" / "s.png")])
    assert "folder" in line and "does not exist" in line


@requires_mnist
def test_a_signal_in_the_final_evaluation_stops_it_and_resume_finishes(tmp_path, capsys,
                                                                       monkeypatch):
    import pyrovae.runs

    run_dir = tmp_path / "run"
    original = pyrovae.runs.evaluate_vae

    def killed_during(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(pyrovae.runs, "evaluate_vae", killed_during)
    assert main(["train", "--out-dir", str(run_dir), *TINY]) == 128 + signal.SIGTERM
    assert "during the final evaluation" in capsys.readouterr().err
    assert not (run_dir / "results.json").exists()
    monkeypatch.undo()
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert json.loads((run_dir / "results.json").read_text())["epochs"] == 1


@requires_mnist
@pytest.mark.parametrize("argv, message", [
    (["train", "--seed", "-1"], "seed must be between 0 and"),
    (["train", "--device", "foo"], "unknown device 'foo'"),
    (["train", "--device", "meta"], "device 'meta' cannot hold"),
    (["train", "--lr", "inf"], "lr must be a finite number"),
    (["train", "--lr", "1e38"], "lr must be at most"),
    (["train", "--latent-dim", "99999999999"], "latent_dim 99999999999 is too large"),
    (["train", "--out-dir", "{file}"], "is a file, not a folder"),
    (["train", "--out-dir", "{tmp}/" + "x" * 300], "unusable: file name too long"),
    (["train", "--data-dir", "{file}", "--out-dir", "{tmp}/r"], "is a file, not a folder"),
])
def test_bad_train_inputs_are_one_line(capsys, tmp_path, argv, message):
    (tmp_path / "file").write_text("x")
    argv = [arg.format(file=tmp_path / "file", tmp=tmp_path) for arg in argv]
    if "--out-dir" not in argv:
        argv += ["--out-dir", str(tmp_path / "r")]
    assert message in one_line_error(capsys, argv)
    assert not (tmp_path / "r").exists()  # no empty run folder left behind


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "{file}", "--seed", "-3"], "expected a non-negative integer"),
    (["sample", "{file}", "--device", "meta"], "device 'meta' cannot hold"),
])
def test_bad_evaluate_and_sample_flags_are_one_line(capsys, tmp_path, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main([arg.format(file=tmp_path / "x.pt") for arg in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_a_text_file_and_a_broken_config_json_are_one_line(capsys, tmp_path):
    (tmp_path / "notes.pt").write_text("not a checkpoint\n")
    assert "is not a checkpoint" in one_line_error(capsys, ["evaluate",
                                                            str(tmp_path / "notes.pt")])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text("")
    (run_dir / "checkpoint.pt").touch()
    assert "config.json is empty" in one_line_error(capsys, ["train", "--resume", str(run_dir)])


def test_active_units_count_what_the_encoder_uses():
    vae = build_vae(TrainConfig(hidden_dims=(8,), latent_dim=3), data_dim=5)
    x = torch.bernoulli(torch.rand(50, 5, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        for parameter in vae.guide_family.parameters():
            parameter.zero_()
    assert active_units(vae, x) == 0  # every E[z|x] is the same point: collapsed
    with torch.no_grad():
        for parameter in vae.guide_family.parameters():
            parameter.normal_(0, 3)
    assert active_units(vae, x) > 0


def test_a_vamp_prior_over_flow_posteriors_is_costed_up_front(monkeypatch, caplog):
    import pyrovae.priors as priors_module
    import pyrovae.runs as runs_module
    from pyrovae import TrainConfig, build_vae
    from pyrovae.errors import ConfigError

    config = TrainConfig(prior="vamp", guide="iaf", num_components=20, hidden_dims=(16,),
                         latent_dim=4, batch_size=50)
    vae = build_vae(config, data_dim=784)
    monkeypatch.setattr(runs_module, "EXPENSIVE_PRIOR_GFLOP", 0.0)
    with caplog.at_level("WARNING", logger="pyrovae"):
        runs_module.check_prior_cost(vae, config)
    assert "expensive prior: log p(z) under 20" in caplog.text
    monkeypatch.setattr(priors_module, "available_memory_bytes", lambda device: 1000)
    with pytest.raises(ConfigError, match="cannot score a batch of 50 z in memory"):
        runs_module.check_prior_cost(vae, config)


def test_corrupt_dataset_files_are_one_line(capsys, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(b"\x00\x00\x08\x03garbage")
    error = one_line_error(capsys, ["train", "--data-dir", str(tmp_path), "--no-download",
                                    "--out-dir", str(tmp_path / "r")])
    assert "MNIST" in error and not (tmp_path / "r").exists()
    (tmp_path / "binarized_mnist.npz").write_bytes(b"PK\x03\x04 not really a zip")
    error = one_line_error(capsys, ["train", "--dataset", "binarized_mnist", "--data-dir",
                                    str(tmp_path), "--out-dir", str(tmp_path / "r")])
    assert "cannot read" in error and "binarized_mnist.npz" in error


def test_an_image_shape_that_does_not_fit_the_data_is_refused_at_once():
    from pyrovae import DataSplits
    from pyrovae.errors import PyrovaeError

    with pytest.raises(PyrovaeError, match="image_shape must be"):
        DataSplits.from_tensors(torch.rand(10, 64), torch.rand(4, 64), image_shape=(8, 9))


def test_verbose_raises_pyrovaes_loggers_only(tmp_path):
    import logging

    try:
        main(["-v", "evaluate", str(tmp_path / "missing.pt")])
    except SystemExit:
        pass
    assert logging.getLogger("pyrovae").level == logging.DEBUG
    assert logging.getLogger().level >= logging.WARNING
    logging.getLogger("pyrovae").setLevel(logging.NOTSET)


def test_a_non_finite_gradient_says_no_checkpoint_was_written():
    from pyrovae import DataSplits, TrainConfig, build_vae, fit
    from pyrovae.train import TrainingDivergedError

    vae = build_vae(TrainConfig(hidden_dims=(8,), latent_dim=2), data_dim=10)
    with torch.no_grad():
        vae.decoder.body[0].weight[0, 0] = float("inf")
    data = DataSplits.from_tensors(torch.bernoulli(torch.full((20, 10), 0.3)),
                                   torch.bernoulli(torch.full((5, 10), 0.3)))
    with pytest.raises(TrainingDivergedError, match="no checkpoint was written"):
        fit(vae, data, epochs=1, batch_size=5, progress=False, clip_norm=1.0)


@requires_mnist
def test_activity_every_writes_latent_usage_columns_and_may_change_on_resume(tmp_path):
    from pyrovae.train import read_metrics

    run_dir = tmp_path / "run"
    assert main(["train", "--out-dir", str(run_dir), *TINY, "--activity-every", "1"]) == 0
    header = (run_dir / "metrics.csv").read_text().splitlines()[0]
    assert header.endswith(",test_log_px,active_units,mutual_information")
    assert main(["train", "--resume", str(run_dir), "--epochs", "3",
                 "--activity-every", "2"]) == 0
    records = read_metrics(run_dir / "metrics.csv")
    # epoch 1 of the first session; epoch 2 by every 2, epoch 3 as the last; all counted
    assert all(0 <= record.active_units <= 2 for record in records)
    # a Monte Carlo estimate: near 0 it may fall a little below
    assert all(math.isfinite(record.mutual_information) for record in records)


def test_a_run_saved_before_the_scheme_scale_and_clip_existed_resumes_as_it_would_have(
        tmp_path):
    np.savez(tmp_path / "binary.npz", train=(np.random.default_rng(0).random((120, 10))
                                             < 0.3).astype(np.float32))
    flags = ["--dataset", f"npz:{tmp_path / 'binary.npz'}", "--binarize", "none",
             "--hidden-dims", "8", "--latent-dim", "2", "--batch-size", "40",
             "--eval-samples", "0", "--no-progress"]
    assert main(["train", *flags, "--epochs", "2", "--out-dir", str(tmp_path / "a")]) == 0
    old = tmp_path / "old"
    assert main(["train", *flags, "--epochs", "1", "--out-dir", str(old)]) == 0
    # what an earlier pyrovae wrote: none of the three fields in config.json or the checkpoint
    new_fields = ("init_scheme", "guide_scale", "bernoulli_logit_clip")
    saved = json.loads((old / "config.json").read_text())
    assert [saved.pop(name) for name in new_fields] == ["glorot_uniform", "softplus", None]
    (old / "config.json").write_text(json.dumps(saved))
    checkpoint = torch.load(old / "checkpoint.pt", weights_only=False)
    for name in new_fields:
        del checkpoint["config"][name]
    torch.save(checkpoint, old / "checkpoint.pt")

    assert main(["train", "--resume", str(old), "--epochs", "2"]) == 0
    reference = read_checkpoint(tmp_path / "a" / "checkpoint.pt")["model"]
    resumed = read_checkpoint(old / "checkpoint.pt")["model"]
    for (name, value), other in zip(reference.items(), resumed.values(), strict=True):
        assert torch.equal(value, other), name
    saved = json.loads((old / "config.json").read_text())
    assert [saved[name] for name in new_fields] == ["glorot_uniform", "softplus", None]


# --- issue 39: results lost or written where they do not belong -----------------------------

@requires_mnist
def test_a_run_being_evaluated_is_not_overwritten_under_the_evaluation(run, capsys,
                                                                      monkeypatch):
    import pyrovae.runs

    original, codes = pyrovae.runs.evaluate_vae, []

    def overwrite_meanwhile(*args, **kwargs):
        codes.append(main(["train", "--out-dir", str(run), "--overwrite", "--seed", "5",
                           *TINY]))
        return original(*args, **kwargs)

    monkeypatch.setattr(pyrovae.runs, "evaluate_vae", overwrite_meanwhile)
    capsys.readouterr()
    assert main(["evaluate", str(run), "-k", "5", "--no-progress", "--device", "cpu"]) == 0
    assert codes == [2]
    assert "is being read by pyrovae evaluate or sample" in capsys.readouterr().err
    assert read_checkpoint(run)["config"]["seed"] == 0
    assert json.loads((run / "evaluation.json").read_text())["checkpoint_epoch"] == 1


@requires_mnist
def test_a_run_being_trained_is_evaluated_only_into_another_folder(run, capsys, tmp_path):
    with RunLock(run):  # as a training process holds it
        for argv in (["evaluate", str(run), "-k", "5"], ["sample", str(run)],
                     ["evaluate", str(run), "--report", "--ks", "2"]):
            line = one_line_error(capsys, [*argv, "--device", "cpu"])
            assert "is being trained by another pyrovae process (pid" in line, line
        assert main(["evaluate", str(run), "-k", "5", "--no-progress", "--device", "cpu",
                     "-o", str(tmp_path / "live.json")]) == 0
    assert not (run / "evaluation.json").exists() and not (run / "bounds.csv").exists()
    assert json.loads((tmp_path / "live.json").read_text())["checkpoint_epoch"] == 1


@requires_mnist
def test_a_run_stopped_before_its_first_checkpoint_resumes_from_its_config(run, capsys):
    for path in run.iterdir():
        if path.name != "config.json":
            path.unlink()
    assert main(["train", "--out-dir", str(run), *TINY]) == 2  # it still holds a run
    assert main(["train", "--resume", str(run)]) == 0
    assert read_checkpoint(run)["progress"]["epoch"] == 2
    assert json.loads((run / "results.json").read_text())["epochs"] == 1


@requires_mnist
def test_resuming_a_finished_run_keeps_its_results_unless_asked(run, capsys, caplog):
    before = (run / "results.json").read_bytes()
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--eval-samples", "5"]) == 0
    out = capsys.readouterr().out
    assert f"{run} is finished (1 of 1 epochs trained) and evaluated in results.json" in out
    assert "(K=30, 20 test points), which is kept" in out and "--reevaluate" in out
    assert (run / "results.json").read_bytes() == before
    # asked to: the weaker K=5 estimate replaces it, the K=30 one is kept beside it
    assert main(["train", "--resume", str(run), "--eval-samples", "5", "--reevaluate"]) == 0
    assert json.loads((run / "results.json").read_text())["num_samples"] == 5
    assert (run / "results-1.json").read_bytes() == before
    assert "weaker than the one in" in caplog.text and "K 30 -> 5" in caplog.text
    assert "--reevaluate goes with --resume" in one_line_error(
        capsys, ["train", "--out-dir", str(run.parent / "other"), "--reevaluate", *TINY])


@requires_mnist
def test_an_explicit_output_that_is_not_ours_is_refused_unless_forced(run, capsys, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    line = one_line_error(capsys, ["sample", str(run), "-o", str(notes), "--device", "cpu"])
    assert line == (f"pyrovae: error: {notes} exists and is not a PNG image; choose another "
                    f"--output, or pass --force to replace it")
    line = one_line_error(capsys, ["evaluate", str(run), "-o", str(notes), "-k", "5"])
    assert f"{notes} exists and is not a pyrovae evaluation (JSON)" in line
    assert notes.read_text() == "my notes\n" and sorted(os.listdir(tmp_path)) == ["notes.txt",
                                                                                    "run"]
    # an earlier output of the same kind is fine; --force replaces anything
    image = tmp_path / "grid.png"
    image.write_bytes((run / "samples.png").read_bytes())
    assert main(["sample", str(run), "-o", str(image), "-n", "4", "--device", "cpu"]) == 0
    assert main(["sample", str(run), "-o", str(notes), "-n", "4", "--force"]) == 0
    assert notes.read_bytes().startswith(b"\x89PNG") and (notes.stat().st_mode & 0o777) != 0o600
    evaluation = tmp_path / "e.json"
    for _ in range(2):
        assert main(["evaluate", str(run), "-o", str(evaluation), "-k", "5", "--no-progress"]) == 0
    assert (tmp_path / "e-1.json").is_file()


@requires_mnist
def test_finite_divergence_is_reported_and_recorded(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", "--out-dir", str(run_dir), *TINY, "--lr", "1.0",
                 "--on-divergence", "rollback"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("pyrovae: error: training diverged: the trained model's ELBO ")
    assert line.endswith("on the same 20 test points; results.json records it; try a lower "
                         "learning rate (--lr) or --clip-norm")
    results = json.loads((run_dir / "results.json").read_text())
    check = results["divergence_check"]
    assert results["diverged"] is True and check["num_points"] == 20
    assert check["elbo"] < 1.1 * check["untrained_elbo"] - 1


@requires_mnist
def test_a_healthy_run_is_not_diverged(run):
    results = json.loads((run / "results.json").read_text())
    check = results["divergence_check"]
    assert results["diverged"] is False and check["num_points"] == 20
    # after 2 steps the model is about where it started
    assert abs(check["elbo"] - check["untrained_elbo"]) < 0.05 * abs(check["untrained_elbo"])


# --- issue 39: cost a user does not expect, smaller things ----------------------------------

@pytest.mark.parametrize("argv, message", [
    (["evaluate", "{file}", "-k", "9999999"],
     "9999999 is more than pyrovae runs (100000 importance samples K per point)"),
    (["evaluate", "{file}", "--report", "--ks", "1,9999999"],
     "is more than pyrovae runs (100000 importance samples K per point)"),
    (["evaluate", "{file}", "--report", "--ais-leapfrog-steps", "100000"],
     "100000 is more than pyrovae runs (1000 leapfrog steps per transition)"),
])
def test_work_beyond_a_sane_maximum_is_refused_in_one_line(capsys, tmp_path, argv, message):
    test_bad_evaluate_and_sample_flags_are_one_line(capsys, tmp_path, argv, message)


def test_eval_samples_beyond_the_maximum_and_an_empty_out_dir_are_refused(capsys, tmp_path,
                                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "eval_samples 200000 is more than pyrovae runs" in one_line_error(
        capsys, ["train", "--eval-samples", "200000", "--out-dir", "r"])
    line = one_line_error(capsys, ["train", "--out-dir", "", "--data-dir", str(SHARED_DATA)])
    assert line == ("pyrovae: error: --out-dir is empty; name the folder to write the run into "
                    "(e.g. --out-dir runs/vae)")
    assert os.listdir(tmp_path) == []


@requires_mnist
def test_a_relative_data_dir_is_recorded_resolved(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    relative = os.path.relpath(SHARED_DATA, tmp_path)
    argv = ["train", "--out-dir", "run", *TINY]
    argv[argv.index("--data-dir") + 1] = relative
    assert main(argv) == 0
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())["data_dir"]
    assert recorded == os.path.abspath(relative) and os.path.isabs(recorded)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["evaluate", "../run", "-k", "2", "--no-progress", "--device", "cpu"]) == 0


@requires_mnist
def test_the_report_takes_a_bounded_test_set_and_shows_each_stage(run, capsys, tmp_path):
    assert main(["evaluate", str(run), "--report", "--ks", "1,3", "--ais-temperatures", "3",
                 "--ais-chains", "2", "--device", "cpu", "-o", str(tmp_path / "r")]) == 0
    captured = capsys.readouterr()
    assert "IWAE bounds, K up to 3" in captured.err and "AIS, T=3" in captured.err
    table = captured.out.index("| IWAE (K=3) |")
    assert table < captured.out.index(f"report written to {tmp_path / 'r'}")
    assert json.loads((tmp_path / "r" / "report.json").read_text())["num_points"] == 20
    assert not list((tmp_path / "r").glob("*.tmp"))
    help_text = build_parser_help(capsys)
    assert "first 500 test points unless --test-size" in help_text


def build_parser_help(capsys) -> str:
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    return " ".join(capsys.readouterr().out.split())
