"""Sphinx configuration of fastpool's documentation site (built in CI with -W)."""

import os
import sys

sys.path.insert(0, os.path.abspath("../.."))

project = "fastpool"
author = "fastpool developers"
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.intersphinx",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
myst_heading_anchors = 3
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_custom_sections = [("Shape", "notes_style")]
autodoc_typehints = "description"
autodoc_member_order = "bysource"
autosummary_generate = True
# Links into NumPy's, PyTorch's and Dask's docs need their inventories, fetched over
# the network; CI's machines reach only package registries, so they are opt-in.
intersphinx_mapping = {} if not os.environ.get("FASTPOOL_DOCS_INTERSPHINX") else {
    "python": ("https://docs.python.org/3", None),
    "numpy": ("https://numpy.org/doc/stable", None),
    "torch": ("https://pytorch.org/docs/stable", None),
    "dask": ("https://docs.dask.org/en/stable", None),
}
html_theme = "furo"
html_title = "fastpool"
exclude_patterns = ["_build"]
