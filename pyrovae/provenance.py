"""What a published number needs beside it: commit, versions, hardware, time."""

from __future__ import annotations

import functools
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyro
import torch


@functools.cache
def git_commit() -> str | None:
    """The commit of the pyrovae source tree, with ``-dirty`` if it has local changes, as it
    stood at the first call in this process.

    Asked once and kept: a results file names the code the process imported, not a commit
    the checkout moved on to while a long run or evaluation was going (entry points call this
    as they start, to pin it)."""
    source = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"],
                                capture_output=True, text=True, timeout=10, check=True)
        status = subprocess.run(["git", "-C", str(source), "status", "--porcelain",
                                 "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return commit.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo where there is one."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_device(device: torch.device | str) -> str:
    """The GPU's name, or the CPU's model with the number of torch threads."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"{cpu_model()} ({threads} thread{'' if threads == 1 else 's'})"


def provenance(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Commit, library versions, device, and the time, for results files."""
    return {
        "commit": git_commit(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": str(device),
        "hardware": describe_device(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
    }
