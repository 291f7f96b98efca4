"""Sphinx configuration of the celery-forkguard documentation.

Build it with ``nox -s docs``: Sphinx, myst-parser and furo (versions pinned
in noxfile.py) turn the Markdown pages beside this file into
``docs/_build/html``, with every warning an error.  The pages stay plain
Markdown, readable on GitHub as well.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REPOSITORY = "https://github.com/celery-forkguard/celery-forkguard"


def _version() -> str:
    """``celery_forkguard.__version__``, read without importing the package."""
    text = (ROOT / "celery_forkguard" / "__init__.py").read_text(encoding="utf-8")
    match = re.search(r'^__version__ = "([^"]+)"', text, re.MULTILINE)
    if match is None:
        raise RuntimeError("celery_forkguard/__init__.py sets no __version__")
    return match.group(1)


project = "celery-forkguard"
author = "The celery-forkguard authors"
copyright = "The celery-forkguard authors"
release = version = _version()

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# -- MyST ----------------------------------------------------------------------------
# Anchors for headings down to ####, so that links such as
# deploy.md#pid-1-and-orphans resolve as they do on GitHub.
myst_heading_anchors = 4

# Files outside docs/ (the README, examples/, benchmarks/) are linked by
# their GitHub address, which works on GitHub and on the built site alike.

# -- autodoc (api.md) ------------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "description"

# -- HTML ----------------------------------------------------------------------------
html_theme = "furo"
html_title = f"celery-forkguard {release}"
html_theme_options = {
    "source_repository": REPOSITORY,
    "source_branch": "main",
    "source_directory": "docs/",
}
