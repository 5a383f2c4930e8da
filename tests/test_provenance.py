import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from pyrovae import provenance as provenance_module
from pyrovae.provenance import cpu_model, describe_device, git_commit, provenance


def test_cpu_description_counts_torch_threads_in_words():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert describe_device("cpu") == f"{cpu_model()} (1 thread)"
        torch.set_num_threads(2)
        assert describe_device("cpu") == f"{cpu_model()} (2 threads)"
    finally:
        torch.set_num_threads(threads)


def test_provenance_names_commit_versions_and_hardware():
    record = provenance("cpu")
    assert record["device"] == "cpu"
    assert record["hardware"] == describe_device("cpu")
    assert record["torch"] == torch.__version__


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_commit_is_the_checkout_head_marked_dirty_when_tracked_files_changed():
    repository = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "-C", str(repository), "rev-parse", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()
    changed = subprocess.run(["git", "-C", str(repository), "status", "--porcelain",
                              "--untracked-files=no"],
                             capture_output=True, text=True, check=True).stdout.strip()
    git_commit.cache_clear()
    assert provenance("cpu")["commit"] == head + ("-dirty" if changed else "")


def test_commit_is_the_one_the_process_started_with_when_the_checkout_moves_on(monkeypatch):
    heads = iter(["a" * 40, "b" * 40])

    def fake_git(command, **kwargs):
        output = next(heads) if "rev-parse" in command else ""
        return subprocess.CompletedProcess(command, 0, stdout=output + "\n", stderr="")

    monkeypatch.setattr(provenance_module.subprocess, "run", fake_git)
    git_commit.cache_clear()
    try:
        assert git_commit() == "a" * 40  # pinned as the entry point starts
        # a commit lands while a long evaluation runs: its results still name the first
        assert provenance("cpu")["commit"] == "a" * 40
    finally:
        git_commit.cache_clear()
