"""Every script in experiments/ runs end to end with tiny arguments."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def run_script(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, str(EXPERIMENTS / name), *args], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result


def test_benchmark_speed(tmp_path):
    output = tmp_path / "speed.json"
    result = run_script("benchmark_speed.py", "--batch-sizes", "20", "--steps", "3", "--repeats", "1",
                        "--output", str(output))
    assert "ratio" in result.stdout
    row = json.loads(output.read_text())["training_step"][0]
    assert row["batch_size"] == 20 and row["pyrovae_ms"] > 0 and row["plain_pytorch_ms"] > 0
