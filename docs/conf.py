"""Sphinx configuration for the pyrobnn documentation (``make docs``; output in docs/_build/html)."""
import os
import sys

# The package is installed in editable mode by `make docs`; the path makes a plain sphinx-build work too.
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

project = "pyrobnn"
author = "pyrobnn authors"
copyright = "pyrobnn authors"
from pyrobnn import __version__ as release  # noqa: E402

version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# MyST: markdown with directives; headings get anchors so pages can link to sections.
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# Autodoc: members in source order, type hints in the description (signatures stay readable).
autodoc_member_order = "bysource"
autodoc_typehints = "description"
# Overridden torch/pyro methods keep their own (or no) docstring, not torch's reST with its doctests.
autodoc_inherit_docstrings = False
autodoc_default_options = {"show-inheritance": True}
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# Warnings are errors (make docs passes -W). A reference to one of pyrobnn's own names that does not
# resolve fails the build; third-party names (torch, pyro, numpy, ...) have no local inventory (the build
# must not need the network), so references into them are not checked.
nitpicky = True
_EXTERNAL = (r"(torch|nn|pyro|dist|numpy|np|arviz|az|xarray|matplotlib|scipy|sklearn|safetensors|typing|collections"
             r"|pathlib|argparse|os|abc|contextlib|enum|dataclasses)(\..*)?"
             r"|'.*|Tensor|Module|Size|Distribution|ExpandedDistribution|Path|.*\._\w+")
nitpick_ignore_regex = [(r"py:.*", _EXTERNAL)]

html_theme = "furo"
html_title = f"pyrobnn {release}"
html_static_path = []
html_show_sourcelink = False


# The API reference pages are generated from the packages' __all__ (docs/_api.py); a public class or
# function missing from it (no docstring) fails the build.
sys.path.insert(0, os.path.dirname(__file__))
import _api  # noqa: E402

_api.write_pages(os.path.join(os.path.dirname(__file__), "api"))


# Pages outside docs/ that the site shows: links to them from the Markdown sources (file links, which
# work when the repository is browsed) point at the site's page instead.
OUTSIDE = {"examples/README.md": "examples.md"}


def _rewrite_outside_links(app, docname, source):
    import posixpath
    import re

    here = posixpath.dirname(docname)

    def repl(m):
        target = posixpath.normpath(posixpath.join("docs", here, m.group(1)))
        page = OUTSIDE.get(target)
        if page is None:
            return m.group(0)
        return f"]({posixpath.relpath(page, here or '.')}{m.group(2) or ''})"

    source[0] = re.sub(r"\]\((\.\./[^)#\s]+)(#[^)\s]*)?\)", repl, source[0])


def setup(app):
    app.connect("source-read", _rewrite_outside_links)
    app.connect("env-check-consistency", _api.check_coverage)
    app.connect("missing-reference", _api.resolve_alias)
    app.connect("autodoc-process-docstring", _api.escape_bars)
