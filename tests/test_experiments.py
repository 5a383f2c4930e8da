"""Every script in experiments/ runs end to end with tiny arguments."""

from __future__ import annotations

import csv
import functools
import importlib.util
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pyrovae import DataSplits, TrainConfig, build_vae
from pyrovae.errors import ConfigError
from tests.conftest import SHARED_DATA, requires_binarized_mnist, requires_mnist

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
#: a few hundred images, one epoch, K = 10, small networks
TINY = ("--train-size", "200", "--test-size", "100", "--epochs", "1", "--eval-samples", "10",
        "--hidden-dims", "16", "--latent-dim", "3", "--no-progress", "--seed", "0",
        "--log-px-samples", "10")


def run_script(name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, str(EXPERIMENTS / name), *args], capture_output=True,
                            text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def run_experiment(name: str, out_dir: Path, *args: str) -> dict:
    """Run ``name`` tinily into ``out_dir``; check results.json and every figure it lists."""
    run_script(name, "--data-dir", str(SHARED_DATA), "--out-dir", str(out_dir), *TINY, *args)
    results = json.loads((out_dir / "results.json").read_text())
    for key in ("commit", "seed", "device", "torch", "pyro", "epochs", "wall_seconds"):
        assert key in results, key
    assert results["figures"]
    for figure in results["figures"]:
        assert (out_dir / figure).stat().st_size > 0, figure
        assert (out_dir / figure).read_bytes()[:4] == b"\x89PNG"
    for run in results["runs"]:
        assert run["epochs"] == 1 and run["eval_samples"] == 10 and run["num_test_points"] == 100
        assert run["test_log_marginal_likelihood"] < 0
        assert run["test_log_marginal_likelihood_standard_error"] > 0
        assert run["test_elbo"] < run["test_log_marginal_likelihood"] + 5  # K=10, noisy
    return results


def test_benchmark_speed(tmp_path):
    output = tmp_path / "speed.json"
    result = run_script("benchmark_speed.py", "--batch-sizes", "20", "--steps", "3", "--repeats", "1",
                        "--num-samples", "10", "--num-points", "20", "--memory", "--scaling",
                        "--output", str(output))
    assert "ratio" in result.stdout
    record = json.loads(output.read_text())
    row = record["training_step"][0]
    assert row["batch_size"] == 20 and row["pyrovae_ms"] > 0 and row["plain_pytorch_ms"] > 0
    assert record["importance_sampling"][0]["peak_rss_mb"] > 0
    assert len(record["scaling"]) == 5 and record["commit"]


def test_benchmark_reference_computes_what_pyrovae_computes():
    """The plain-PyTorch reference is the same estimator: same draws, same numbers."""
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        from benchmark_speed import make_models
    finally:
        sys.path.remove(str(EXPERIMENTS))
    from pyro.infer import Trace_ELBO

    from pyrovae import log_marginal_likelihood

    vae, plain = make_models()
    x = torch.bernoulli(torch.full((30, 784), 0.2))
    torch.manual_seed(1)
    expected = Trace_ELBO().differentiable_loss(vae.model, vae.guide, x)
    torch.manual_seed(1)
    torch.testing.assert_close(plain.loss(x), expected, rtol=1e-5, atol=1e-3)
    torch.manual_seed(2)
    expected = log_marginal_likelihood(vae, x, 50, batch_size=10, chunk_size=20)
    torch.manual_seed(2)
    torch.testing.assert_close(plain.log_marginal_likelihood(x, 50, 10, 20), expected,
                               rtol=1e-5, atol=1e-3)


def test_two_layer_benchmark_reference_computes_what_pyrovae_computes():
    """The plain two-layer reference is Pyro's Trace_ELBO of the hierarchical VAE: same
    draws, same loss, same gradients."""
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        from benchmark_speed import make_hierarchical_models
    finally:
        sys.path.remove(str(EXPERIMENTS))
    from pyro.infer import Trace_ELBO

    vae, plain = make_hierarchical_models()
    x = torch.bernoulli(torch.full((30, 784), 0.2))
    torch.manual_seed(1)
    expected = Trace_ELBO().differentiable_loss(vae.model, vae.guide, x)
    torch.manual_seed(1)
    loss = plain.loss(x)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-3)
    expected.backward()
    loss.backward()
    torch.testing.assert_close(plain.p1[1].weight.grad, vae.prior_layers[0].loc_head.weight.grad,
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(plain.q2[2].weight.grad,
                               vae.guide_layers[1].log_scale_head.weight.grad, rtol=1e-4,
                               atol=1e-4)


@requires_mnist
def test_mnist_vae(tmp_path):
    results = run_experiment("mnist_vae.py", tmp_path, "--objectives", "trace_elbo", "iwae5")
    runs = {run["name"]: run for run in results["runs"]}
    assert runs["trace_elbo"]["published_log_marginal_likelihood"] == -86.76
    assert runs["iwae5"]["config"]["objective"] == "iwae"
    assert runs["iwae5"]["config"]["num_particles"] == 5
    assert 0 <= runs["trace_elbo"]["active_units"] <= 3  # TINY has 3 latent dimensions
    assert runs["iwae5"]["published_active_units"] == 22
    assert "elbo_curves.png" in results["figures"]


@requires_mnist
def test_mnist_vae_resumes(tmp_path):
    args = ("--data-dir", str(SHARED_DATA), "--out-dir", str(tmp_path), "--objectives", "trace_elbo",
            "--lr-schedule", "iwae")
    run_script("mnist_vae.py", *args, *TINY)
    longer = [*TINY[:5], "2", *TINY[6:]]
    assert longer[4:6] == ["--epochs", "2"]
    run_script("mnist_vae.py", *args, *longer, "--resume")
    with (tmp_path / "trace_elbo" / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["epoch"] for row in rows] == ["1", "2"]
    # each invocation's last epoch estimates the log p(x) curve (K=10 on the test images)
    assert all(-1000 < float(row["test_log_px"]) < 0 for row in rows)
    run = json.loads((tmp_path / "results.json").read_text())["runs"][0]
    assert run["epochs"] == 2 and run["config"]["lr_schedule"] == "iwae"
    assert [(s["first_epoch"], s["last_epoch"]) for s in run["training_sessions"]] == [(1, 1), (2, 2)]


@pytest.mark.slow  # about 30 s; the pieces it gathers are tested one by one
@requires_mnist
def test_settings_trained_apart_are_gathered_by_evaluate_only(tmp_path):
    """Two processes train one objective each into one folder (as on a GPU, side by side);
    --evaluate-only then writes one results.json holding both, trained no further."""
    args = ("--data-dir", str(SHARED_DATA), "--out-dir", str(tmp_path), *TINY)
    run_script("mnist_vae.py", *args, "--objectives", "trace_elbo")
    run_script("mnist_vae.py", *args, "--objectives", "iwae5", "--max-minutes", "5")
    single = {name: json.loads((tmp_path / name / "evaluation.json").read_text())
              for name in ("trace_elbo", "iwae5")}
    longer = [*TINY[:5], "3", *TINY[6:]]  # --epochs 3 must not train on
    run_script("mnist_vae.py", "--data-dir", str(SHARED_DATA), "--out-dir", str(tmp_path),
               *longer, "--objectives", "trace_elbo", "iwae5", "--evaluate-only")
    runs = {run["name"]: run for run in json.loads((tmp_path / "results.json").read_text())["runs"]}
    assert set(runs) == {"trace_elbo", "iwae5"}
    for name, evaluation in single.items():
        assert runs[name]["epochs"] == 1
        assert runs[name]["test_log_marginal_likelihood"] == evaluation["log_marginal_likelihood"]
    missing = run_script("mnist_vae.py", *args, "--objectives", "iwae50", "--evaluate-only",
                         check=False)
    assert missing.returncode == 2 and "holds no checkpoint" in missing.stderr


@functools.cache
def load_common():
    """experiments/common.py as a module (experiments/ is not a package)."""
    spec = importlib.util.spec_from_file_location("experiments_common", EXPERIMENTS / "common.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_train_refuses_to_overwrite_or_resume_other_settings(tmp_path):
    common = load_common()
    data = DataSplits.from_tensors(torch.bernoulli(torch.full((40, 6), 0.5)), binarize="none")
    config = TrainConfig(hidden_dims=(4,), latent_dim=2, epochs=1, batch_size=20,
                         progress=False, eval_samples=5)
    first = common.train("run", config, data, tmp_path, resume=False)
    evaluation = common.evaluate(first, data, num_samples=5)
    assert common.evaluate(first, data, num_samples=5) == evaluation  # cached
    with pytest.raises(ConfigError, match="--resume"):
        common.train("run", config, data, tmp_path, resume=False)
    with pytest.raises(ConfigError, match="lr"):
        common.train("run", replace(config, lr=0.01), data, tmp_path, resume=True)
    longer = common.train("run", replace(config, epochs=2), data, tmp_path, resume=True)
    assert [record.epoch for record in longer.history] == [1, 2]
    assert common.evaluate(longer, data, num_samples=5)["epochs_trained"] == 2
    # each call that trained says from which epoch; one that trained nothing drops out
    common.train("run", replace(config, epochs=2), data, tmp_path, resume=True)
    sessions = load_common().runs.training_sessions(tmp_path / "run", 2)
    assert [(s["first_epoch"], s["last_epoch"]) for s in sessions] == [(1, 1), (2, 2)]
    assert all(s["commit"] and s["hardware"] and s["device"] == "cpu" for s in sessions)
    # a fresh run with --overwrite starts the record again
    common.train("run", replace(config, overwrite=True), data, tmp_path, resume=False)
    assert len(load_common().runs.training_sessions(tmp_path / "run", 1)) == 1


def test_results_table_names_each_machine_of_a_run_resumed_across_machines():
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        from make_results_table import run_hardware
    finally:
        sys.path.remove(str(EXPERIMENTS))
    gpu, cpu = "NVIDIA H100 80GB HBM3", "Intel(R) Xeon(R) Processor (1 threads)"
    sessions = [{"hardware": gpu, "first_epoch": 1, "last_epoch": 30},
                {"hardware": cpu, "first_epoch": 31, "last_epoch": 57},
                {"hardware": cpu, "first_epoch": 58, "last_epoch": 60},
                {"hardware": gpu, "first_epoch": 61, "last_epoch": 100}]
    assert run_hardware({"training_sessions": sessions}, "writer") == (
        "NVIDIA H100 80GB HBM3 (epochs 1–30) + Intel(R) Xeon(R) Processor (1 thread) "
        "(epochs 31–60) + NVIDIA H100 80GB HBM3 (epochs 61–100)")
    # one machine, or no record (older files): the machine that wrote the file
    assert run_hardware({"training_sessions": sessions[1:3]}, "writer") == "writer"
    assert run_hardware({}, "writer") == "writer"
    # a run begun before the record existed says so for its first epochs
    assert run_hardware({"training_sessions": sessions[2:]}, "writer") == (
        "unrecorded (epochs 1–57) + Intel(R) Xeon(R) Processor (1 thread) (epochs 58–60) + "
        "NVIDIA H100 80GB HBM3 (epochs 61–100)")


@requires_binarized_mnist
def test_compare_priors(tmp_path):
    results = run_experiment("compare_priors.py", tmp_path, "--num-components", "5",
                             "--prior-flows", "1")
    assert [run["name"] for run in results["runs"]] == ["normal", "mog", "vamp", "flow"]
    assert {run["config"]["dataset"] for run in results["runs"]} == {"binarized_mnist"}


@requires_mnist
def test_compare_guides(tmp_path):
    results = run_experiment("compare_guides.py", tmp_path, "--num-flows", "1")
    assert [run["name"] for run in results["runs"]] == ["diagonal", "fullcov", "iaf"]
    for run in results["runs"]:
        assert run["gap"] == pytest.approx(run["test_log_marginal_likelihood"] - run["test_elbo"])


@requires_mnist
def test_gaussian_likelihood(tmp_path):
    results = run_experiment("gaussian_likelihood.py", tmp_path, "--sigmas", "1", "0.1",
                             "--term-samples", "2")
    runs = {run["name"]: run for run in results["runs"]}
    assert set(runs) == {"sigma_1", "sigma_0.1", "learned"}
    assert runs["sigma_0.1"]["sigma"] == pytest.approx(0.1)
    assert runs["learned"]["learn_sigma"] and runs["learned"]["sigma"] > 0
    for run in runs.values():
        assert run["kl"] > 0 and not run["comparable_to_binary"]
        # ELBO = reconstruction - KL, up to Monte Carlo noise of different draws
        assert run["reconstruction"] - run["kl"] == pytest.approx(run["test_elbo"], rel=0.2)
    assert "not comparable" in results["note"]


@requires_mnist
def test_latent_space(tmp_path):
    results = run_experiment("latent_space.py", tmp_path, "--latent-dim", "2", "--grid-size", "4",
                             "--interpolation-steps", "5")
    for figure in ("latent_means.png", "manifold.png", "interpolations.png"):
        assert figure in results["figures"]


def test_latent_space_needs_two_dimensions(tmp_path):
    result = run_script("latent_space.py", "--out-dir", str(tmp_path), "--latent-dim", "3",
                        check=False)
    assert result.returncode == 2 and "--latent-dim 2" in result.stderr


def test_make_results_table(tmp_path):
    run = {"name": "trace_elbo", "setting": "dynamic MNIST, trace_elbo", "epochs": 3,
           "train_seconds": 30.0, "evaluation_seconds": 5.0,
           "test_log_marginal_likelihood": -90.123, "test_log_marginal_likelihood_standard_error": 0.25,
           "eval_samples": 5000, "num_test_points": 10000, "test_elbo": -94.5,
           "published_log_marginal_likelihood": -86.76, "published_source": "Burda et al. 2016",
           "active_units": 17}
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"experiment": "mnist_vae", "hardware": "a CPU (1 threads)",
                                "runs": [run]}))
    readme = tmp_path / "README.md"
    readme.write_text("before\n<!-- results table: begin -->\nold\n<!-- results table: end -->\nafter\n")
    result = run_script("make_results_table.py", str(path), "--readme", str(readme))
    assert "-90.12 ± 0.25 (K=5000, N=10000)" in result.stdout
    text = readme.read_text()
    assert "old" not in text and "-86.76 (Burda et al. 2016)" in text and "35 s" in text
    assert "| a CPU (1 thread) |" in text
    assert "| 17 | — | a CPU" in text  # active units beside the published count (none here)
    assert text.startswith("before\n") and text.endswith("after\n")


def test_mixture_priors_lower_the_evaluation_chunk_only_where_memory_needs_it():
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        import common
    finally:
        sys.path.remove(str(EXPERIMENTS))
    from pyrovae import TrainConfig

    def chunk(**settings):
        config = TrainConfig(latent_dim=40, num_components=500, **settings)
        return common.evaluation_chunk_size(build_vae(config, data_dim=784), 500, batch_size=100)

    # diagonal components cost batch x components per sample (a matrix product)
    assert chunk(prior="vamp") == chunk(prior="mog") == chunk(prior="normal") == 500
    # other guides broadcast z against every component: 2 million floats per sample
    assert chunk(prior="vamp", guide="iaf") == common.MIXTURE_ELEMENTS // (100 * 500 * 40) == 25
    assert chunk(prior="vamp", guide="fullcov") == 25
    assert chunk(prior="flow") == 500  # not a mixture


@requires_mnist
def test_probe_guide_init_trains_every_scale_from_the_same_networks(tmp_path):
    output = tmp_path / "probe.json"
    run_script("probe_guide_init.py", "--data-dir", str(SHARED_DATA), "--train-size", "200",
               "--test-size", "100", "--epochs", "2", "--hidden-dims", "16", "--latent-dim", "3",
               "--fullcov-scales", "1", "0.1", "--lowrank-scales", "0.1", "--seeds", "0", "1",
               "--output", str(output))
    probe = json.loads(output.read_text())
    names = ["diagonal", "fullcov, scale 1", "fullcov, scale 0.1", "lowrank 2, scale 0.1"]
    assert [(s["name"], s["seed"]) for s in probe["settings"]] == [
        (name, seed) for seed in (0, 1) for name in names]
    for setting in probe["settings"]:
        assert len(setting["test_elbo"]) == 2 and all(-600 < e < 0 for e in setting["test_elbo"])
    assert probe["commit"] and probe["epochs"] == 2 and probe["train_size"] == 200

    sys.path.insert(0, str(EXPERIMENTS))
    try:
        from probe_guide_init import vae_with_guide
    finally:
        sys.path.remove(str(EXPERIMENTS))
    from pyrovae import TrainConfig
    from pyrovae.train import seed_everything

    config = TrainConfig(hidden_dims=(16,), latent_dim=3)
    built = {}
    for guide, scale in (("diagonal", None), ("fullcov", 0.3), ("lowrank", 0.3)):
        seed_everything(0)
        built[guide] = vae_with_guide(config, 784, guide, scale)
    assert built["fullcov"].guide_family.off_diagonal_scale == 0.3
    assert built["lowrank"].guide_family.factor_scale == 0.3
    for name in ("encoder", "decoder"):
        reference = getattr(built["diagonal"], name).state_dict()
        for guide in ("fullcov", "lowrank"):
            other = getattr(built[guide], name).state_dict()
            assert all(torch.equal(reference[key], other[key]) for key in reference), (guide, name)
    for guide in ("fullcov", "lowrank"):
        torch.testing.assert_close(built[guide].guide_family.loc_head.weight,
                                   built["diagonal"].guide_family.loc_head.weight)


def _python_with_pythae() -> str | None:
    """An interpreter that imports pythae: this one, else ``$PYTHAE_PYTHON``."""
    import os

    if importlib.util.find_spec("pythae") is not None:
        return sys.executable
    return os.environ.get("PYTHAE_PYTHON")


@requires_mnist
@pytest.mark.skipif(_python_with_pythae() is None,
                    reason="pythae is not importable here and $PYTHAE_PYTHON names no "
                           "interpreter that has it (it is not a pyrovae dependency)")
def test_compare_pythae(tmp_path):
    output = tmp_path / "results.json"
    result = subprocess.run(
        [_python_with_pythae(), str(EXPERIMENTS / "compare_pythae.py"), "--data-dir",
         str(SHARED_DATA), "--epochs", "1", "--train-size", "300", "--test-size", "20",
         "--eval-samples", "10", "--hidden-dims", "16", "--latent-dim", "3",
         "--objective", "meanfield_elbo", "--output",
         str(output)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    results = json.loads(output.read_text())
    assert results["budget"]["updates"] == 3 and results["budget"]["num_test_points"] == 20
    assert results["commit"] and results["seed"] == 0 and results["hardware"]
    assert results["budget"]["pyrovae_objective"] == "meanfield_elbo"
    means = [results[name]["log_px_pyrovae_estimator"] for name in ("pyrovae", "pythae")]
    assert results["pyrovae_minus_pythae_log_px"] == pytest.approx(means[0] - means[1], abs=1e-3)
    assert 0 < results["pyrovae_minus_pythae_log_px_standard_error"] < 5
    for name in ("pyrovae", "pythae"):
        row = results[name]
        # one model, two estimators with K = 10 on 20 images: within a few nats
        assert abs(row["log_px_pyrovae_estimator"] - row["log_px_pythae_get_nll"]) < 5, row
        assert row["test_elbo"] < row["log_px_pyrovae_estimator"] + 3, row
        assert -600 < row["log_px_pyrovae_estimator"] < 0, row


@pytest.mark.skipif(importlib.util.find_spec("pythae") is not None,
                    reason="pythae is installed here, so the script does not skip")
def test_compare_pythae_without_pythae_says_why_in_one_line():
    result = run_script("compare_pythae.py", "--epochs", "1")
    assert result.stdout.startswith("skipped: pythae is not installed")
    assert len(result.stdout.strip().splitlines()) == 1


@requires_binarized_mnist
def test_tomczak2018_trains_banks_and_says_how_far_its_early_stopping_has_got(tmp_path):
    run_dir, bank_dir = tmp_path / "run", tmp_path / "bank"
    paths = ["--run-dir", str(run_dir), "--bank-dir", str(bank_dir)]
    tiny = ["--train-size", "200", "--test-size", "50", "--valid-size", "50", "--epochs", "3",
            "--kl-warmup-epochs", "1", "--early-stopping-patience", "1", "--hidden-dims", "16",
            "16", "--num-components", "5", "--log-px-every", "1", "--log-px-samples", "5",
            "--log-px-size", "20"]
    run_script("tomczak2018.py", "train", "--data-dir", str(SHARED_DATA), "--minutes", "5",
               *paths, *tiny)
    if run_script("tomczak2018.py", "final", "--run-dir", str(run_dir), "--num-samples", "5",
                  "--test-size", "20", check=False).returncode == 2:  # not stopped yet
        run_script("tomczak2018.py", "final", "--run-dir", str(run_dir), "--num-samples", "5",
                   "--test-size", "20", "--before-the-end")
    run_script("tomczak2018.py", "bank", *paths)
    results = json.loads((bank_dir / "results.json").read_text())
    # the reported checkpoint is the best validation ELBO's, not the last
    assert results["final_evaluation"]["checkpoint_epoch"] == results["best_valid_epoch"]
    assert results["final_evaluation"]["run_finished"] == results["finished"]
    config = results["config"]
    assert config["preset"] == "tomczak2018" and config["adam_normalize_gradients"]
    assert config["pseudo_input_link"] == "hardtanh" and not config["pseudo_inputs_from_data"]
    assert results["epochs_of_protocol"] == 2000 and results["epochs_done"] >= 2
    assert results["best_valid_epoch"] >= 2  # the warm-up epoch does not count
    # stopped early (patience 1 here) or still going
    assert results["finished"] == (results["epochs_since_best"] >= 1)
    assert all(point["test_log_px"] < 0 for point in results["learning_curve"])
    assert (bank_dir / "checkpoint.pt").is_file()
    # the best checkpoint is banked where it differs from the latest, and restored from it
    assert (bank_dir / "checkpoint_best.pt").is_file() != results["best_is_latest"]
    import shutil

    shutil.rmtree(run_dir)
    run_script("tomczak2018.py", "train", "--data-dir", str(SHARED_DATA), "--minutes", "5",
               *paths, "--epochs", "4")
    assert (run_dir / "checkpoint_best.pt").is_file()


@requires_mnist
def test_burda2016_trains_banks_and_resumes_from_the_bank(tmp_path):
    run_dir, bank_dir = tmp_path / "run", tmp_path / "bank"
    paths = ["--run-dir", str(run_dir), "--bank-dir", str(bank_dir)]
    tiny = ["--train-size", "440", "--test-size", "100", "--epochs", "1", "--batch-size", "40",
            "--log-px-samples", "5", "--log-px-size", "20"]
    run_script("burda2016.py", "train", "--data-dir", str(SHARED_DATA), "--minutes", "5",
               *paths, *tiny)
    run_script("burda2016.py", "bank", *paths)
    results = json.loads((bank_dir / "results.json").read_text())
    assert results["epochs_done"] == 1 and results["updates_done"] == 1  # 40 images left
    assert results["config"]["preset"] == "burda2016" and not results["finished"]
    assert results["learning_curve"][0]["test_log_px"] < 0
    assert (bank_dir / "checkpoint.pt").is_file() and results["commit"]
    assert results["final_evaluation"] is None
    # the final evaluation waits for the end of the protocol, unless told otherwise
    refused = run_script("burda2016.py", "final", "--run-dir", str(run_dir), check=False)
    assert refused.returncode == 2 and not (run_dir / "final_evaluation.json").exists()
    assert refused.stderr.count("\n") == 1 and "epoch 1 of 3280" in refused.stderr
    done = run_script("burda2016.py", "final", "--run-dir", str(run_dir), "--before-the-end",
                      "--num-samples", "5", "--test-size", "20")
    assert done.stdout.splitlines()[-1].startswith(
        f"burda2016.py: final evaluation in {run_dir / 'final_evaluation.json'}")
    kept = (run_dir / "final_evaluation.json").read_text()
    failed = run_script("burda2016.py", "final", "--run-dir", str(run_dir), "--before-the-end",
                        "--num-samples", "5", "--test-size", "-3", check=False)
    assert failed.returncode == 2 and (run_dir / "final_evaluation.json").read_text() == kept
    run_script("burda2016.py", "bank", *paths)
    final = json.loads((bank_dir / "results.json").read_text())["final_evaluation"]
    assert final["num_samples"] == 5 and final["num_test_points"] == 20
    assert final["checkpoint_epoch"] == 1 and not final["run_finished"] and not final["stale"]
    # the IWAE bound with K = 5 is above the ELBO of the same model on the same images
    assert final["test_elbo"] < final["log_marginal_likelihood"] < 0
    assert (bank_dir / "final_evaluation.json").is_file()
    # a fresh machine: no run directory, the bank only
    import shutil

    shutil.rmtree(run_dir)
    run_script("burda2016.py", "train", "--data-dir", str(SHARED_DATA), "--minutes", "5",
               *paths, "--epochs", "2")
    assert (run_dir / "metrics.csv").read_text().count("\n") == 3  # header and 2 epochs
    # the evaluation of epoch 1 is not restored into the run; the bank marks it stale
    run_script("burda2016.py", "bank", *paths)
    assert json.loads((bank_dir / "results.json").read_text())["final_evaluation"]["stale"]


@requires_mnist
def test_burda2016_iwae_dreg_trains_the_protocol_with_its_own_objective(tmp_path):
    run_dir, bank_dir = tmp_path / "run", tmp_path / "bank"
    paths = ["--run-dir", str(run_dir), "--bank-dir", str(bank_dir)]
    tiny = ["--train-size", "440", "--test-size", "100", "--epochs", "1", "--batch-size", "40",
            "--log-px-samples", "5", "--log-px-size", "20"]
    run_script("burda2016_iwae_dreg.py", "train", "--data-dir", str(SHARED_DATA), "--minutes",
               "5", *paths, *tiny)
    run_script("burda2016_iwae_dreg.py", "bank", *paths)
    results = json.loads((bank_dir / "results.json").read_text())
    config = results["config"]
    assert config["preset"] == "burda2016" and config["batch_size"] == 40
    assert config["objective"] == "iwae_dreg" and config["num_particles"] == 5
    assert results["published_log_marginal_likelihood"] == -85.54
    assert results["epochs_done"] == 1 and results["learning_curve"][0]["test_log_px"] < 0
    # the protocol reports the last checkpoint: the bank holds that one only
    assert (bank_dir / "checkpoint.pt").is_file() and not (bank_dir / "checkpoint_best.pt").exists()
    refused = run_script("burda2016_iwae_dreg.py", "final", "--run-dir", str(run_dir),
                         check=False)
    assert refused.returncode == 2
    assert refused.stderr.startswith("burda2016_iwae_dreg.py: error: the run is at epoch 1")


@requires_mnist
def test_gradient_snr_measures_both_estimators_on_the_banked_model(tmp_path):
    run_script("gradient_snr.py", "--data-dir", str(SHARED_DATA), "--out-dir", str(tmp_path),
               "--ks", "1", "3", "--draws", "3", "--num-points", "4")
    results = json.loads((tmp_path / "results.json").read_text())
    assert [(row["objective"], row["num_particles"]) for row in results["rows"]] == [
        ("iwae", 1), ("iwae", 3), ("iwae_dreg", 1), ("iwae_dreg", 3)]
    assert all(row["encoder_snr"] > 0 and row["decoder_snr"] > 0 for row in results["rows"])
    assert results["checkpoint_epoch"] == 3280 and (tmp_path / "gradient_snr.png").is_file()


@requires_mnist
def test_discretized_mnist(tmp_path):
    results = run_experiment("discretized_mnist.py", tmp_path)
    runs = {run["name"]: run for run in results["runs"]}
    assert set(runs) == {"discretized_logistic", "discretized_gaussian", "gaussian_pixel"}
    for run in runs.values():
        # bits/dim = -log p(x) / (784 ln 2), of a probability: positive, at most about 8
        assert 0 < run["log_px_bits_per_dim"] < 9
    for name in ("discretized_logistic", "discretized_gaussian"):
        assert runs[name]["log_px_bits_per_dim"] == pytest.approx(
            -runs[name]["test_log_marginal_likelihood"] / (784 * 0.6931471805599453))
    # the Gaussian's density in nats is another number than its binned probability
    binned = runs["gaussian_pixel"]["binned_log_marginal_likelihood"]
    assert runs["gaussian_pixel"]["log_px_bits_per_dim"] == pytest.approx(
        -binned / (784 * 0.6931471805599453))
    assert binned != pytest.approx(runs["gaussian_pixel"]["test_log_marginal_likelihood"])
