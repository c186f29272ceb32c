"""House style that no linter checks: Google docstring sections indented by 4 spaces."""

import ast
import inspect
import pathlib
import re

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "jaxinit"
SECTION = re.compile(r"^(\s*)(Args|Attributes|Raises|Returns|Yields|Example|Examples):\s*$")


def _docstrings(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                yield getattr(node, "name", path.name), inspect.cleandoc(doc)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: p.name)
def test_docstring_sections_are_indented_by_four(path):
    for name, doc in _docstrings(path):
        lines = doc.splitlines()
        for i, line in enumerate(lines):
            m = SECTION.match(line)
            entries = [e for e in lines[i + 1 : i + 2] if e.strip()]
            if m and entries:
                indent = len(entries[0]) - len(entries[0].lstrip()) - len(m.group(1))
                assert indent == 4, f"{path.name}:{name}: {m.group(2)} entries indented by {indent}"
