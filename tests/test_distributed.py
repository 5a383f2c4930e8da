"""Data-parallel training and sharded evaluation on torch.distributed (gloo, 2 CPU processes).

One pair of processes (``torch.multiprocessing.spawn``) runs every multi-process case once
and rank 0 saves the results; the tests compare them with the same computations in this
process.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pyrovae import TrainConfig, build_vae, fit
from pyrovae.ais import ais_log_marginal_likelihood
from pyrovae.checkpoint import load_vae, read_checkpoint, save_checkpoint
from pyrovae.data import DataSplits, load_dataset
from pyrovae.distributed import (
    LostProcessError,
    batch_plan,
    check_batch_size,
    collective,
    is_lost_process,
    local_batches,
    shard_of,
    sharded,
)
from pyrovae.errors import ConfigError
from pyrovae.evaluation import elbo, log_marginal_likelihood
from pyrovae.train import read_metrics
from tests.conftest import SHARED_DATA, requires_mnist

WORLD_SIZE = 2
#: (guide, objective, num_particles): three guide families and the IWAE objective
TRAINING_CASES = {
    "diagonal": ("diagonal", "trace_elbo", 1),
    "lowrank_meanfield": ("lowrank", "meanfield_elbo", 1),
    "iaf_two_particles": ("iaf", "trace_elbo", 2),
    "iwae": ("diagonal", "iwae", 3),
}
#: 70 points in global batches of 15: shards of 8 and 7 rows, and a last batch of 10
TRAIN_POINTS, BATCH_SIZE, EPOCHS = 70, 15, 2
#: uneven evaluation: 23 points in batches of 5 are 5 batches, 3 on rank 0 and 2 on rank 1
EVAL_POINTS, EVAL_BATCH = 23, 5


def tiny_data() -> DataSplits:
    generator = torch.Generator().manual_seed(0)
    grey = torch.rand(TRAIN_POINTS, 10, generator=generator)
    return DataSplits.from_tensors(grey, grey[:EVAL_POINTS], binarize="dynamic")


def tiny_vae(guide: str = "diagonal", seed: int = 1):
    torch.manual_seed(seed)
    return build_vae(TrainConfig(hidden_dims=(8,), latent_dim=3, guide=guide), data_dim=10)


def train(case: str):
    guide, objective, num_particles = TRAINING_CASES[case]
    vae = tiny_vae(guide)
    history = fit(vae, tiny_data(), epochs=EPOCHS, batch_size=BATCH_SIZE, seed=5, progress=False,
                  objective=objective, num_particles=num_particles)
    return vae.state_dict(), [record.train_elbo for record in history]


def _ais(vae, x, **options) -> torch.Tensor:
    result = ais_log_marginal_likelihood(vae, x, num_temperatures=4, num_chains=3, **options)
    return torch.cat([result.log_marginal_likelihood[:, None], result.step_size[:, None],
                      result.samples.permute(1, 0, 2).flatten(1)], dim=1)


def evaluate(vae) -> dict[str, torch.Tensor]:
    """The estimators over the processes of the group (or in one process outside one)."""
    x = tiny_data().test
    ais = sharded(_ais, vae, x, batch_size=EVAL_BATCH, seed=11)
    return {
        "log_px": sharded(log_marginal_likelihood, vae, x, num_samples=8, batch_size=EVAL_BATCH,
                          chunk_size=3, seed=7),
        "elbo": sharded(elbo, vae, x, batch_size=EVAL_BATCH, seed=7),
        "ais": ais[:, 0],
        "ais_step_size": ais[:, 1],
        "ais_samples": ais[:, 2:],
    }


def _worker(rank: int, rendezvous: str, output: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=WORLD_SIZE)
    try:
        results = {case: train(case) for case in TRAINING_CASES}
        results["evaluation"] = evaluate(tiny_vae())
        if rank == 0:
            torch.save(results, output)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("distributed")
    output = folder / "results.pt"
    mp.spawn(_worker, args=(str(folder / "rendezvous"), str(output)), nprocs=WORLD_SIZE)
    return torch.load(output, weights_only=False)


@pytest.mark.parametrize("case", list(TRAINING_CASES))
def test_two_processes_train_in_distribution_like_one(two_processes, case):
    """Every objective goes through the program's traces: each process draws its own noise,
    so the run differs from one process but its bound is of the same size and it learned."""
    expected_state, expected_elbos = train(case)
    state, elbos = two_processes[case]
    initial = tiny_vae(TRAINING_CASES[case][0]).state_dict()
    assert all(math.isfinite(value) for value in elbos)
    assert elbos[-1] == pytest.approx(expected_elbos[-1], abs=2.0)
    moved = max(float((value - initial[name]).abs().max()) for name, value in state.items())
    assert moved > 1e-3  # the steps did change the parameters


def test_evaluation_gathers_the_values_of_one_process(two_processes):
    expected = evaluate(tiny_vae())
    for name, values in two_processes["evaluation"].items():
        assert values.shape == expected[name].shape, name
        torch.testing.assert_close(values, expected[name], rtol=1e-5, atol=1e-5, msg=name)
    assert expected["log_px"].shape == (EVAL_POINTS,)


def test_evaluation_with_a_seed_does_not_depend_on_the_global_rng():
    vae, x = tiny_vae(), tiny_data().test
    first = log_marginal_likelihood(vae, x, num_samples=8, batch_size=EVAL_BATCH, seed=3)
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    second = log_marginal_likelihood(vae, x, num_samples=8, batch_size=EVAL_BATCH, seed=3)
    assert torch.equal(first, second)
    assert torch.equal(torch.get_rng_state(), state)  # the global stream was left alone
    other = log_marginal_likelihood(vae, x, num_samples=8, batch_size=EVAL_BATCH, seed=4)
    assert not torch.equal(other, first)
    # each batch has its own stream: batch 0 of x[5:] is batch 1 of x, drawn differently
    tail = log_marginal_likelihood(vae, x[EVAL_BATCH:], num_samples=8, batch_size=EVAL_BATCH, seed=3)
    assert not torch.equal(tail, first[EVAL_BATCH:])
    # the batches a process is given are those batches of the whole pass, bit for bit
    last = log_marginal_likelihood(vae, x, num_samples=8, batch_size=EVAL_BATCH, seed=3,
                                   batches=[1])
    assert torch.equal(last, first[EVAL_BATCH:2 * EVAL_BATCH])
    with pytest.raises(ValueError, match="batch index 9"):
        log_marginal_likelihood(vae, x, num_samples=8, batch_size=EVAL_BATCH, batches=[9])


# --- pieces, in one process -------------------------------------------------------------------

def test_shards_are_contiguous_and_cover_the_batch():
    assert [shard_of(15, rank, 2).rows for rank in range(2)] == [slice(0, 8), slice(8, 15)]
    assert [shard_of(10, rank, 4).num_rows for rank in range(4)] == [3, 3, 2, 2]
    for rows, world in [(7, 3), (100, 2), (5, 5)]:
        covered = [i for r in range(world) for i in range(rows)[shard_of(rows, r, world).rows]]
        assert covered == list(range(rows))


def test_batch_plan_in_one_process_is_every_batch():
    indices, counts = batch_plan(23, 5)
    assert list(indices) == [0, 1, 2, 3, 4] and counts == [23]


@pytest.mark.parametrize("num_points, dim, batch_size", [(TRAIN_POINTS, 10, BATCH_SIZE), (300, 784, 256)])
def test_sharded_batches_put_together_are_the_batches_of_one_process(num_points, dim, batch_size):
    """Dynamic binarization: the slices of every process are bitwise the one-process batches."""
    grey = torch.rand(num_points, dim, generator=torch.Generator().manual_seed(0))
    data = DataSplits.from_tensors(grey, grey[:10], binarize="dynamic")
    parts = []
    for rank in range(WORLD_SIZE):
        torch.manual_seed(0)  # the binarization draws
        parts.append(list(local_batches(data, batch_size,
                                        generator=torch.Generator().manual_seed(3),
                                        rank=rank, world_size=WORLD_SIZE)))
    torch.manual_seed(0)
    whole = list(data.train_batches(batch_size, generator=torch.Generator().manual_seed(3)))
    assert [x.shape[0] for x in parts[0]] == [-(-len(x) // 2) for x in whole]
    for batch, first, second in zip(whole, *parts, strict=True):
        assert torch.equal(torch.cat([first, second]), batch)


def test_batches_smaller_than_the_number_of_processes_are_refused():
    with pytest.raises(ConfigError, match="batch size 1 is smaller than the 2 processes"):
        check_batch_size(1, 2)
    with pytest.raises(ConfigError, match="last batch of each epoch has 1 rows"):
        check_batch_size(10, 2, num_points=21)
    check_batch_size(10, 2, num_points=22)
    with pytest.raises(ConfigError, match="smaller than the 2 processes"):
        next(local_batches(tiny_data(), 1, rank=0, world_size=2))


# --- the command line ---------------------------------------------------------------------------

TINY_RUN = ("--data-dir", str(SHARED_DATA), "--train-size", "200", "--test-size", "100",
            "--eval-samples", "10", "--hidden-dims", "16", "--latent-dim", "3", "--no-progress",
            "--batch-size", "50", "--seed", "3")


def pyrovae(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyrovae", *args], capture_output=True, text=True,
                          timeout=180)


@requires_mnist
def test_nproc_trains_writes_once_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    first = pyrovae("train", "--nproc", "2", *TINY_RUN, "--epochs", "1", "--out-dir", str(run_dir))
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("run saved in") == 1  # rank 0 alone reports
    # the run's files, written once; the lock file is the run directory's own
    assert sorted(path.name for path in run_dir.iterdir() if path.name != ".pyrovae.lock") == [
        "checkpoint.pt", "checkpoint_best.pt", "config.json", "metrics.csv", "results.json",
        "samples.png"]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["num_processes"] == 2 and results["num_test_points"] == 100
    assert results["test_elbo"] <= results["log_marginal_likelihood"] + 5 < 0
    resumed = pyrovae("train", "--nproc", "2", "--resume", str(run_dir), "--epochs", "2")
    assert resumed.returncode == 0, resumed.stderr
    records = read_metrics(run_dir / "metrics.csv")
    assert [r.epoch for r in records] == [1, 2] and [r.step for r in records] == [4, 8]
    assert records[1].train_elbo > records[0].train_elbo
    assert read_checkpoint(run_dir)["epoch"] == 2


@requires_mnist
def test_log_px_during_training_under_two_processes_is_that_of_one(tmp_path):
    run_dir = tmp_path / "run"
    trained = pyrovae("train", "--nproc", "2", *TINY_RUN, "--epochs", "1", "--log-px-every", "1",
                      "--log-px-samples", "12", "--log-px-size", "60", "--out-dir", str(run_dir))
    assert trained.returncode == 0, trained.stderr
    (record,) = read_metrics(run_dir / "metrics.csv")
    # the last epoch's estimate uses the final parameters, which the checkpoint holds
    vae, config, _ = load_vae(run_dir)
    data = load_dataset("mnist", SHARED_DATA).subset(config.train_size, config.test_size)
    one_process = log_marginal_likelihood(vae, data.test[:60], num_samples=12, seed=config.seed)
    assert record.test_log_px == pytest.approx(one_process.mean().item(), abs=1e-4)
    assert record.test_elbo < record.test_log_px < 0


@requires_mnist
def test_evaluate_under_torchrun_splits_the_test_points(tmp_path):
    config = TrainConfig(data_dir=str(SHARED_DATA), hidden_dims=(16,), latent_dim=3)
    save_checkpoint(tmp_path / "checkpoint.pt", build_vae(config, data_dim=784), None, 0, config,
                    (1, 28, 28))
    evaluated = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "pyrovae", "evaluate", str(tmp_path), "--num-samples", "10", "--test-size", "30",
         "--batch-size", "8"], capture_output=True, text=True, timeout=180)
    assert evaluated.returncode == 0, evaluated.stderr
    assert evaluated.stdout.count("written to") == 1  # rank 0 alone reports and writes
    evaluation = json.loads((tmp_path / "evaluation.json").read_text())
    assert evaluation["num_processes"] == 2 and evaluation["num_test_points"] == 30
    assert evaluation["test_elbo"] <= evaluation["log_marginal_likelihood"] + 5 < 0


@pytest.mark.parametrize("flags, message", [
    (("--nproc", "0"), "--nproc: expected a positive integer, got 0"),
    (("--nproc", "2", "--batch-size", "1"), "batch size 1 is smaller than the 2 processes"),
])
def test_bad_launch_flags_fail_in_one_line(tmp_path, flags, message):
    result = pyrovae("train", *flags, "--out-dir", str(tmp_path / "run"), "--no-download")
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "run").exists()


@requires_mnist
def test_sigterm_stops_every_process_with_a_checkpoint(tmp_path):
    """The launcher forwards SIGTERM; the processes agree to stop at the same step, rank 0
    writes the checkpoint, and the run resumes from it."""
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "pyrovae", "train", "--nproc", "2", *TINY_RUN,
               "--epochs", "100000", "--eval-samples", "0", "--out-dir", str(run_dir)]
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "checkpoint.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        launcher.send_signal(signal.SIGTERM)
        _, stderr = launcher.communicate(timeout=120)
    finally:
        launcher.kill()
    assert launcher.returncode == 128 + signal.SIGTERM, stderr
    assert stderr.count("SIGTERM at epoch") == 1, stderr  # rank 0 alone reports it
    stopped = read_checkpoint(run_dir)["progress"]
    assert stopped["epoch"] < 100000
    resumed = pyrovae("train", "--nproc", "2", "--resume", str(run_dir),
                      "--epochs", str(stopped["epoch"]))
    assert resumed.returncode == 0, resumed.stderr
    assert read_metrics(run_dir / "metrics.csv")[-1].epoch == stopped["epoch"]


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@requires_mnist
def test_workers_stop_when_their_launcher_is_killed(tmp_path):
    """kill -9 of the --nproc launcher: its workers notice they were orphaned, write a
    checkpoint and exit instead of training on unsupervised."""
    run_dir = tmp_path / "orphans"
    command = [sys.executable, "-m", "pyrovae", "train", "--nproc", "2", *TINY_RUN,
               "--epochs", "100000", "--eval-samples", "0", "--out-dir", str(run_dir)]
    launcher = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "checkpoint.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(_processes_mentioning(str(run_dir))) >= 3  # the launcher and 2 workers
        launcher.kill()
        launcher.wait(timeout=30)
        deadline = time.monotonic() + 90
        while _processes_mentioning(str(run_dir)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _processes_mentioning(str(run_dir)) == []
    finally:
        launcher.kill()
        for pid in _processes_mentioning(str(run_dir)):
            os.kill(pid, signal.SIGKILL)
    assert read_checkpoint(run_dir)["progress"]["epoch"] >= 1


def _worker_of_rank(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of the ``--nproc`` launcher's worker whose ``RANK`` is ``rank``."""
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    for pid in children:
        variables = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in variables:
            return int(pid)
    raise AssertionError(f"no worker of rank {rank} among {children}")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads workers from /proc")
def test_a_killed_worker_leaves_one_line_from_the_survivor(tmp_path, synthetic_dataset):
    """kill -9 of one worker: the other, waiting in the gradient all-reduce, says in one
    line that it stops because the other process is gone (no gloo traceback), and the
    launcher's summary names the killed one."""
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "pyrovae", "train", "--nproc", "2", "--dataset",
               synthetic_dataset, "--hidden-dims", "8", "--latent-dim", "2", "--batch-size", "20",
               "--epochs", "100000", "--eval-samples", "0", "--no-progress", "--out-dir",
               str(run_dir)]
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "checkpoint.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        os.kill(_worker_of_rank(launcher, 1), signal.SIGKILL)
        _, stderr = launcher.communicate(timeout=120)
    finally:
        launcher.kill()
    assert launcher.returncode == 1, stderr
    assert "Traceback" not in stderr, stderr
    lost = [line for line in stderr.splitlines() if "another process of this run stopped" in line]
    assert len(lost) == 1, stderr
    assert lost[0].startswith("pyrovae: error: another process of this run stopped during a "
                              "gradient all-reduce (")
    assert "Connection reset by peer" in lost[0] or "Connection closed by peer" in lost[0]
    assert stderr.strip().splitlines()[-1] == "pyrovae: training process 1 of 2 exited with status -9"
    assert read_checkpoint(run_dir)["progress"]["epoch"] >= 1  # what was saved stays


def test_a_collective_failing_for_a_lost_process_is_one_line():
    """Only the backend's words for a process that is gone become a LostProcessError; other
    failures of a collective are bugs and keep their traceback."""
    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error "
                        "[127.0.0.1]:52362: Connection reset by peer. This is typically caused by "
                        "a remote worker hanging or bugs in the application. GLHF!")
    with pytest.raises(LostProcessError) as caught, collective("a gradient all-reduce"):
        raise gloo
    assert str(caught.value) == (
        "another process of this run stopped during a gradient all-reduce (Read error "
        "[127.0.0.1]:52362: Connection reset by peer); this process 0 of 1 stops too, the "
        "launcher reports the other's exit")
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    with pytest.raises(RuntimeError, match="size mismatch"), collective("a gather"):
        raise RuntimeError("Gloo all_gather: size mismatch")
    assert is_lost_process(dist.DistNetworkError("anything"))


@pytest.mark.slow  # about 30 s; the pieces it gathers are tested one by one
@requires_mnist
def test_benchmark_distributed_runs_tinily(tmp_path):
    output = tmp_path / "distributed.json"
    script = Path(__file__).resolve().parents[1] / "experiments" / "benchmark_distributed.py"
    result = subprocess.run([sys.executable, str(script), "--data-dir", str(SHARED_DATA), "--steps", "2",
                             "--repeats", "1", "--rounds", "1", "--warmup", "1", "--batch-sizes", "20",
                             "--train-size", "100", "--output", str(output)],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    record = json.loads(output.read_text())
    assert [(row["nproc"], row["batch_size"]) for row in record["rows"]] == [(1, 20), (2, 20)]
    assert all(row["images_per_second"] > 0 for row in record["rows"])
    assert record["rows"][0]["speedup"] == 1.0
    for key in ("commit", "torch", "pyro", "cpu", "cores"):
        assert key in record, key
