"""The bound curve and the saved report: ordering, exactness, files, reproducibility, CLI."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyrovae.cli import build_parser, main
from pyrovae.evaluation import mean_and_standard_error
from pyrovae.report import (
    NETCDF_NAME,
    PLOT_NAME,
    SUMMARY_NAME,
    TABLE_CSV,
    TABLE_MARKDOWN,
    USAGE_PLOT_NAME,
    bound_curve,
    write_report,
)
from pyrovae.runs import SANDWICH_NAME
from tests.conftest import SHARED_DATA, requires_mnist
from tests.linear_gaussian import exact_log_marginal, sample_data
from tests.test_evaluation import mismatched_vae

REPOSITORY = Path(__file__).resolve().parents[1]
SMALL_AIS = {"num_temperatures": 20, "num_chains": 8, "num_leapfrog_steps": 3}


def test_bound_curve_orders_and_converges_to_the_exact_value():
    vae = mismatched_vae(inflate=2.5)
    x = sample_data(vae, 200)
    exact = exact_log_marginal(vae, x)
    curve = bound_curve(vae, x, ks=(1, 5, 50, 500), ais_kwargs=SMALL_AIS, seed=0)
    summary = curve.importance
    per_point = {"elbo": summary.elbo, **{k: summary.iwae[i]
                                          for i, k in enumerate(summary.num_samples)}}
    per_point["exact"] = exact
    # ELBO <= IWAE_5 <= IWAE_50 <= exact, each on average up to three paired standard errors
    for lower, upper in (("elbo", 5), (5, 50), (50, "exact")):
        gap = mean_and_standard_error(per_point[upper] - per_point[lower])
        assert gap.mean > -3 * gap.standard_error, (lower, upper, gap)
    assert curve.row("IWAE", 5).mean > curve.row("ELBO").mean
    # the tightest bound and AIS agree with log p(x) within their reported errors
    for row in (curve.row("IWAE", 500), curve.row("AIS")):
        assert abs(row.mean - float(exact.mean())) < 3 * row.monte_carlo_error + 0.01, row
    assert [row.estimator for row in curve.rows] == ["ELBO"] + ["IWAE"] * 4 + ["AIS"]


def test_report_files_reload_with_arviz_and_hold_provenance(tmp_path):
    import arviz

    vae = mismatched_vae()
    x = sample_data(vae, 15)
    summary = write_report(vae, x, tmp_path, ks=(1, 30), ais_kwargs=SMALL_AIS, seed=3,
                           extra={"checkpoint": "none"})
    for name in (TABLE_CSV, TABLE_MARKDOWN, PLOT_NAME, NETCDF_NAME, SUMMARY_NAME):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / SUMMARY_NAME).read_text())
    assert saved == json.loads(json.dumps(summary))
    for key in ("commit", "device", "seed", "ks", "elapsed_seconds", "torch", "arviz"):
        assert key in saved, key
    assert saved["seed"] == 3 and saved["ks"] == [1, 30]
    assert saved["diagnostics"]["num_unreliable"] == 0
    with open(tmp_path / TABLE_CSV) as handle:
        rows = list(csv.DictReader(handle))
    assert [row["estimator"] for row in rows] == ["ELBO", "IWAE", "IWAE", "AIS"]

    data = arviz.from_netcdf(tmp_path / NETCDF_NAME)
    stats = data.sample_stats
    assert stats["iwae"].shape == (2, 15) and stats["ais_log_weights"].shape == (8, 15)
    assert float(stats["iwae"].sel(num_samples=30).mean()) == pytest.approx(float(rows[2]["mean"]))
    assert stats.attrs["seed"] == 3
    arviz.plot_dist(stats["ais"])
    arviz.plot_khat(stats["pareto_k"].values)
    from matplotlib import pyplot

    pyplot.close("all")


def test_same_seed_gives_the_same_numbers(tmp_path):
    vae = mismatched_vae()
    x = sample_data(vae, 10)
    first = write_report(vae, x, tmp_path / "a", ks=(1, 20), ais_kwargs=SMALL_AIS, seed=5)
    torch.manual_seed(123)  # the report seeds itself: the RNG state before must not matter
    second = write_report(vae, x, tmp_path / "b", ks=(1, 20), ais_kwargs=SMALL_AIS, seed=5)
    for row_a, row_b in zip(first["bounds"], second["bounds"], strict=True):
        assert row_a["mean"] == pytest.approx(row_b["mean"], abs=1e-6, rel=0)


def test_report_without_ais_still_writes_everything(tmp_path):
    vae = mismatched_vae()
    summary = write_report(vae, sample_data(vae, 5), tmp_path, ks=(1, 25), ais=False)
    assert "ais" not in summary
    assert (tmp_path / PLOT_NAME).is_file() and (tmp_path / NETCDF_NAME).is_file()


def test_report_with_the_sandwich_and_latent_usage(tmp_path):
    import arviz

    vae = mismatched_vae(inflate=2.5)
    x = sample_data(vae, 30)
    summary = write_report(vae, x, tmp_path, ks=(1, 20), ais_kwargs=SMALL_AIS, seed=2,
                           sandwich_points=25)
    with open(tmp_path / TABLE_CSV) as handle:
        rows = {row["estimator"]: row for row in csv.DictReader(handle)}
    assert list(rows) == ["ELBO", "IWAE", "AIS", "BDMC lower", "BDMC upper"]
    sandwich = summary["sandwich"]
    assert sandwich["num_points"] == 25 and sandwich["num_temperatures"] == 20
    assert float(rows["BDMC lower"]["mean"]) == pytest.approx(sandwich["lower_mean"])
    assert sandwich["gap_mean"] == pytest.approx(sandwich["upper_mean"] - sandwich["lower_mean"])
    stats = arviz.from_netcdf(tmp_path / NETCDF_NAME).sample_stats
    assert stats["bdmc_upper"].shape == (25,) and stats["bdmc_reverse_log_weights"].shape == (8, 25)
    # upper >= lower on average up to noise; T = 20 leaves about 0.1 nats on this model
    assert -3 * sandwich["gap_standard_error"] < sandwich["gap_mean"] < 1.0
    assert "simulated from the model" in (tmp_path / TABLE_MARKDOWN).read_text()
    # latent usage: both units of the linear-Gaussian latent are used; I(x; z) <= log 30
    usage = summary["latent_usage"]
    assert usage["active_units"] == 2 and usage["latent_dim"] == 2
    assert 0 < usage["mutual_information"] <= usage["mutual_information_max"] == pytest.approx(
        math.log(30))
    assert len(usage["sites"]["z"]["kl_per_dimension_sorted"]) == 2
    assert (tmp_path / USAGE_PLOT_NAME).stat().st_size > 0
    assert json.loads((tmp_path / SUMMARY_NAME).read_text())["sandwich"] == sandwich


def test_sandwich_needs_ais():
    vae = mismatched_vae()
    with pytest.raises(ValueError, match="AIS settings"):
        bound_curve(vae, sample_data(vae, 4), ks=(1,), ais=False, sandwich_points=2)


def test_report_flags_parse():
    args = build_parser().parse_args(["evaluate", "run", "--report", "--ks", "1,10,100",
                                      "--ais-temperatures", "0", "--ais-init", "prior"])
    assert args.report and args.ks == (1, 10, 100)
    assert args.ais_temperatures == 0 and args.ais_init == "prior"
    assert not args.sandwich and args.sandwich_points == 100
    args = build_parser().parse_args(["evaluate", "run", "--sandwich", "--sandwich-points", "7"])
    assert args.sandwich and args.sandwich_points == 7
    with pytest.raises(SystemExit):
        build_parser().parse_args(["evaluate", "run", "--ks", "1,zero"])


def _run(*arguments: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
    return subprocess.run([sys.executable, "-m", "pyrovae", *arguments], capture_output=True,
                          text=True, timeout=300, env=environment, cwd=REPOSITORY)


@requires_mnist
def test_evaluate_report_on_a_tiny_trained_run(tmp_path):
    run_dir = tmp_path / "run"
    trained = _run("train", "--data-dir", str(SHARED_DATA), "--train-size", "200",
                   "--test-size", "20", "--epochs", "1", "--eval-samples", "0",
                   "--hidden-dims", "16", "--latent-dim", "4", "--out-dir", str(run_dir),
                   "--no-progress")
    assert trained.returncode == 0, trained.stderr
    flags = ["--report", "--ks", "1,5,50", "--ais-temperatures", "10", "--ais-chains", "4",
             "--ais-leapfrog-steps", "2", "--device", "cpu", "--seed", "1"]
    first = _run("evaluate", str(run_dir), *flags)
    assert first.returncode == 0, first.stderr
    assert "IWAE (K=50)" in first.stdout
    for name in (TABLE_CSV, TABLE_MARKDOWN, PLOT_NAME, NETCDF_NAME, SUMMARY_NAME):
        assert (run_dir / name).is_file(), name
    # same checkpoint, seed and K on the same device: the same numbers (in-process, into
    # --output, to spare a second interpreter start)
    assert main(["evaluate", str(run_dir / "checkpoint.pt"), *flags, "--output",
                 str(tmp_path / "again")]) == 0
    one = json.loads((run_dir / SUMMARY_NAME).read_text())
    two = json.loads((tmp_path / "again" / SUMMARY_NAME).read_text())
    assert one["num_points"] == 20 and one["checkpoint"] == str(run_dir)
    for row_a, row_b in zip(one["bounds"], two["bounds"], strict=True):
        # the same draws; float32 sums in another order where the two processes run on
        # different numbers of threads differ by about 1e-8 of the value
        assert row_a["mean"] == pytest.approx(row_b["mean"], abs=1e-4, rel=0), row_a
    assert one["latent_usage"]["latent_dim"] == 4
    assert (run_dir / USAGE_PLOT_NAME).is_file()
    # --sandwich alone: printed, and written to sandwich.json with the per-point bounds
    assert main(["evaluate", str(run_dir), "--sandwich", "--sandwich-points", "30",
                 "--ais-temperatures", "3", "--ais-chains", "2", "--ais-leapfrog-steps", "1",
                 "--device", "cpu"]) == 0
    saved = json.loads((run_dir / SANDWICH_NAME).read_text())
    assert saved["num_points"] == 20  # at most the 20 test points
    assert len(saved["points"]["upper"]) == 20 and saved["num_temperatures"] == 3
    assert saved["gap_mean"] == pytest.approx(saved["upper_mean"] - saved["lower_mean"])


def test_a_failed_report_write_leaves_the_earlier_report_whole(tmp_path, monkeypatch):
    from pyrovae.report import build_report, save_report
    from pyrovae.rundir import RunFileError

    vae = mismatched_vae()
    x = sample_data(vae, 6)
    curve, summary = build_report(vae, x, ks=(1, 5), ais=False, seed=1)
    save_report(curve, summary, tmp_path)
    (tmp_path / USAGE_PLOT_NAME).write_bytes(b"an earlier report's")  # not written below
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    curve, summary = build_report(vae, x, ks=(1, 7), ais=False, seed=1, usage=False)
    calls = []
    real_fsync = os.fsync

    def disk_full_at_the_third(fd):
        calls.append(fd)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", disk_full_at_the_third)
    with pytest.raises(RunFileError, match="cannot write the report into .*: no space left on "
                                           "device \\(disk full\\); an earlier report there is "
                                           "unchanged"):
        save_report(curve, summary, tmp_path)
    monkeypatch.undo()
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before
    save_report(curve, summary, tmp_path)  # all of it, and nothing of the earlier one
    assert not (tmp_path / USAGE_PLOT_NAME).exists()
    assert json.loads((tmp_path / SUMMARY_NAME).read_text())["ks"] == [1, 7]


@requires_mnist
def test_report_refuses_a_file_as_its_folder_before_the_work(tmp_path, capsys, monkeypatch):
    import pyrovae.report

    run_dir = tmp_path / "run"
    assert main(["train", "--out-dir", str(run_dir), "--data-dir", str(SHARED_DATA),
                 "--train-size", "50", "--test-size", "10", "--epochs", "1", "--hidden-dims",
                 "8", "--latent-dim", "2", "--batch-size", "50", "--eval-samples", "0",
                 "--no-progress"]) == 0
    monkeypatch.setattr(pyrovae.report, "bound_curve", lambda *a, **k: pytest.fail("worked"))
    (tmp_path / "a-file").write_text("mine")
    capsys.readouterr()
    assert main(["evaluate", str(run_dir), "--report", "-o", str(tmp_path / "a-file")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"pyrovae: error: --output {tmp_path / 'a-file'} is a file; with --report, name a "
        f"folder")
