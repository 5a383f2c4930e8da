"""Where a run computes: device names this machine or this torch cannot serve are refused."""

from __future__ import annotations

import pytest
import torch

from pyrovae.cli import main
from pyrovae.devices import resolve_device
from pyrovae.errors import PyrovaeError


@pytest.fixture
def no_mps(monkeypatch):
    """A torch built without MPS, as on Linux and Windows."""
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_built", lambda: False)


def test_mps_without_mps_is_refused_in_one_line(no_mps):
    with pytest.raises(PyrovaeError, match="device 'mps' requested but MPS is not available "
                                           "here \\(this torch is built without it\\); use "
                                           "--device cpu"):
        resolve_device("mps")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("command", [
    ["train", "--out-dir", "{tmp}/run"],
    ["evaluate", "{tmp}/run"],
    ["sample", "{tmp}/run"],
])
def test_every_command_refuses_mps_without_mps_with_exit_2(no_mps, capsys, tmp_path, command):
    code = main([arg.format(tmp=tmp_path) for arg in command] + ["--device", "mps"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "MPS is not available here" in err[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="refused only where CUDA is absent")
def test_cuda_without_cuda_is_refused():
    with pytest.raises(PyrovaeError, match="CUDA is not available here"):
        resolve_device("cuda:0")
