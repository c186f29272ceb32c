"""Sphinx configuration: the API reference from the docstrings, the guides from docs/guides."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from sphinx.util import logging

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jaxinit  # noqa: E402

project = "jaxinit"
author = "the jaxinit authors"
copyright = "2026, the jaxinit authors"
release = version = jaxinit.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
html_theme = "furo"
html_static_path = ["_static"]
html_title = f"jaxinit {release}"

# Google-style docstrings, as the package writes them.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_typehints = "signature"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": False}
myst_heading_anchors = 3

# Every cross-reference into jaxinit must resolve; types of other packages (and the standard
# library's abstract collections) have no inventory here, since the build runs offline.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(jax|jnp|np|numpy|optax|flax|nn|nnx|chex|matplotlib|torch)(\..*)?"),
    (r"py:class", r"collections\.abc\..*"),
]

PUBLIC_MODULES = ("jaxinit", "jaxinit.linen", "jaxinit.nnx")


def _check_every_public_name(app, env) -> None:
    """Warns (an error under -W) for a public name without an API entry."""
    documented = set(env.domains["py"].objects)
    log = logging.getLogger(__name__)
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            if f"{module_name}.{name}" not in documented:
                log.warning(f"{module_name}.{name} is public but has no API entry in docs/api/")


def setup(app):
    """Registers the public-name check."""
    app.connect("env-check-consistency", _check_every_public_name)
    return {"parallel_read_safe": True}
