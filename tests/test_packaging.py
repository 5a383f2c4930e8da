"""The version in one place, and ``pyrovae --version`` (.ci/run installs the built wheel)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

import pyrovae
from pyrovae.cli import main


def test_the_version_is_read_from_the_package():
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert "version" not in project["project"] and project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "pyrovae.__version__"}


def test_pyrovae_version_prints_it(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"pyrovae {pyrovae.__version__}\n"
