"""Sphinx configuration for the adaptx documentation.

Offline, at build time and in the reader's browser: no intersphinx, no theme or extension
that fetches anything, and MathJax is served from docs/_static/mathjax/ (MathJax 3.2.2's
``tex-chtml.js`` and its fonts, Apache-2.0, copied from the ``mathjax`` npm package), not
from a CDN. docs/_ext/adaptx_docs.py fails the build if a page loads a script or a
stylesheet from another host.

Build (what ``make docs`` and CI run)::

    sphinx-build -W --keep-going -b html docs docs/_build/html
    sphinx-build -W -b doctest docs docs/_build/doctest
"""

from __future__ import annotations

import doctest
import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(DOCS / "_ext"))
sys.path.insert(0, str(ROOT))  # adaptx itself, also when it is not installed

# The guides' examples are small and run on the CPU in a few seconds.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import adaptx  # noqa: E402

project = "adaptx"
author = "the adaptx authors"
copyright = "the adaptx authors, Apache-2.0"  # noqa: A001 - Sphinx's name for it
release = adaptx.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.doctest",
    "sphinx.ext.viewcode",  # [source] links: the code of each object, as pages of the site
    "adaptx_docs",  # docs/_ext/adaptx_docs.py: the API pages, measured tables, code checks
    "adaptx_signatures",  # docs/_ext/adaptx_signatures.py: ArrayLike, not its expansion
]

root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
templates_path: list[str] = []

# -- HTML ------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"adaptx {release}"
html_static_path = ["_static"]
html_css_files = ["adaptx.css"]
html_show_sourcelink = False
pygments_style = "sphinx"

# -- math ---------------------------------------------------------------------------------
# A path relative to _static: the pages load MathJax from the built site itself. To update
# it: ``npm pack mathjax@3``, then copy es5/tex-chtml.js, es5/output/chtml/fonts/woff-v2/
# and LICENSE into docs/_static/mathjax/ (the fonts are found relative to the script).
mathjax_path = "mathjax/tex-chtml.js"

# -- autodoc and napoleon ------------------------------------------------------------
# The docstrings are Google style (Args:, Returns:, Examples:, References:) with reST
# inside (``.. math::``). Only what adaptx.__all__ lists is documented (see api.rst).
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autodoc_default_options: dict[str, object] = {}
python_maximum_signature_line_length = 88
add_module_names = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# A state's fields ("Attributes:") as a field list of its class, not as separate objects:
# the page's contents then list transforms and states, not every field of every state.
napoleon_use_ivar = True
# The docstrings give each field's dtype in words; the annotation (jax.Array) adds nothing.
napoleon_attr_annotations = False
napoleon_include_init_with_doc = False
autosummary_generate = False

# -- doctest ---------------------------------------------------------------------------
# The docstrings' own ``>>>`` examples already run under pytest (--doctest-modules, with
# pyproject.toml's doctest_optionflags). NUMBER is set neither there nor here, so a printed
# float must match exactly: an example rounds it or prints a comparison. The doctest
# builder runs only the guides' explicit ``.. doctest::`` and ``.. testcode::`` blocks,
# not the plain ``>>>`` blocks that autodoc copies into the API page. A plain ``>>>``
# block anywhere else is an error (docs/_ext/adaptx_docs.py), so nothing goes unrun.
doctest_test_doctest_blocks = ""
doctest_default_flags = (
    doctest.ELLIPSIS
    | doctest.NORMALIZE_WHITESPACE
    | doctest.IGNORE_EXCEPTION_DETAIL
    | doctest.DONT_ACCEPT_TRUE_FOR_1
)
doctest_global_setup = """
import jax
import jax.numpy as jnp
import numpy as np
import optax
import adaptx
"""
