"""The documentation: every public name has one API entry; the version lives in one place.

The guides' code runs in ``docs/test_guides.py`` (``pytest docs/test_guides.py``, a CI step of its
own), so that the test suite stays fast.
"""

import importlib
import re
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"
PUBLIC_MODULES = ("jaxinit", "jaxinit.linen", "jaxinit.nnx")


def api_entries() -> list[str]:
    """Full names of the autofunction/autoclass entries of docs/api/*.rst."""
    entries = []
    for page in sorted((DOCS / "api").glob("*.rst")):
        module = None
        for line in page.read_text().splitlines():
            if m := re.match(r"\.\. currentmodule:: (\S+)", line):
                module = m.group(1)
            elif m := re.match(r"\.\. auto(?:function|class):: (\S+)", line):
                name = m.group(1)
                entries.append(name if module is None or "." in name else f"{module}.{name}")
    return entries


def test_every_public_name_has_one_api_entry():
    entries = api_entries()
    public = [f"{m}.{n}" for m in PUBLIC_MODULES for n in importlib.import_module(m).__all__]
    assert sorted(set(public) - set(entries)) == []  # a public name with no entry
    assert sorted(set(entries) - set(public)) == []  # an entry for a name that is not public
    assert len(entries) == len(set(entries))


def test_the_version_lives_in_one_place():
    import tomllib
    from importlib.metadata import version

    import jaxinit

    root = DOCS.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert "version" not in project and project["dynamic"] == ["version"]
    assert version("jaxinit") == jaxinit.__version__
    changelog = (root / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in changelog
    assert f"## [{jaxinit.__version__}] - " in changelog
