"""Sphinx configuration: the user guide (MyST markdown) and the API reference (autodoc)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyrovae  # noqa: E402

project = "pyrovae"
author = "the pyrovae developers"
release = version = pyrovae.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
# signatures stay readable: the types are in the docstrings' prose and the source
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"

intersphinx_mapping = {}  # no network in CI: references to torch/pyro stay plain text

html_theme = "alabaster"
html_static_path: list[str] = []
