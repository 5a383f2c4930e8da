import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from pyrovae.provenance import cpu_model, describe_device, provenance


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
    assert provenance("cpu")["commit"] == head + ("-dirty" if changed else "")
