"""Skips the plot doctests when matplotlib is absent, as the plot tests are skipped."""

import importlib.util
from pathlib import Path

import pytest

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    """Marks this package's ``plot_*`` doctests to skip without matplotlib (the ``plot`` extra)."""
    if importlib.util.find_spec("matplotlib") is not None:
        return
    skip = pytest.mark.skip(reason="needs matplotlib")
    for item in items:
        is_doctest = type(item).__name__ == "DoctestItem"
        if is_doctest and item.path.parent == _HERE and item.name.split(".")[-1].startswith("plot"):
            item.add_marker(skip)
