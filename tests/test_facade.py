"""``pyrovae/__init__.py`` is the facade of what a user needs, and nothing of the internals."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pyrovae

ROOT = Path(__file__).resolve().parents[1]


def _python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def test_every_public_name_is_the_object_of_its_home_module():
    for name in pyrovae.__all__:
        value = getattr(pyrovae, name)
        home = getattr(value, "__module__", None)
        if home is not None and home.startswith("pyrovae."):  # classes and functions
            assert getattr(importlib.import_module(home), name) is value, name
    assert len(pyrovae.__all__) == len(set(pyrovae.__all__))
    star: dict[str, object] = {}
    exec("from pyrovae import *", star)
    assert sorted(set(star) - {"__builtins__"}) == sorted(pyrovae.__all__)


def test_what_a_user_needs_is_at_the_top():
    for name in ("write_report", "importance_summary", "OBJECTIVES", "GatedLinear",
                 "GatedMLPEncoder", "GatedMLPDecoder", "load_vae", "mutual_information"):
        assert name in pyrovae.__all__, name
    assert set(pyrovae.OBJECTIVES) == {"trace_elbo", "meanfield_elbo", "iwae", "stl_elbo",
                                       "iwae_dreg"}
    assert pyrovae.NETWORKS["gated_mlp"].__module__ == pyrovae.GatedMLPEncoder.__module__


def test_training_internals_live_in_their_modules_only():
    for name, home in (("kl_weight", "pyrovae.objectives"), ("LatentScale", "pyrovae.objectives")):
        assert name not in pyrovae.__all__ and not hasattr(pyrovae, name), name
        assert hasattr(importlib.import_module(home), name), name


def test_the_readmes_python_imports_only_from_the_facade():
    """Each ``from pyrovae... import`` of the README's Python examples names the package
    itself, and only names it exports."""
    imported = []
    for block in _python_blocks((ROOT / "README.md").read_text()):
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pyrovae"):
                assert node.module == "pyrovae", f"README.md: from {node.module} import ..."
                imported += [alias.name for alias in node.names]
    assert "write_report" in imported and "VAE" in imported
    assert set(imported) <= set(pyrovae.__all__), set(imported) - set(pyrovae.__all__)
