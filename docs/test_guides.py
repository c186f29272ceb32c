"""Every guide's code runs: ``pytest docs/test_guides.py`` (a CI step; not part of ``pytest``).

The root ``conftest.py`` applies: 8 host CPU devices, strict dtype promotion, warnings as errors.
Each guide's ``python`` blocks run in order, in one namespace per guide.
"""

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent
GUIDES = sorted((DOCS / "guides").glob("*.md"))


def test_every_guide_is_in_the_index():
    index = (DOCS / "index.md").read_text()
    assert len(GUIDES) == 7
    for guide in GUIDES:
        assert f"guides/{guide.stem}\n" in index, guide.name


@pytest.mark.parametrize("guide", GUIDES, ids=lambda p: p.stem)
def test_guide_code_runs(guide):
    blocks = re.findall(r"```python\n(.*?)```", guide.read_text(), flags=re.S)
    assert blocks, f"{guide.name} has no python code"
    namespace: dict = {"__name__": f"guide_{guide.stem}"}
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"{guide.name} block {i}", "exec"), namespace)
        except Exception as e:  # pragma: no cover - the message is the point
            raise AssertionError(f"{guide.name} python block {i} failed:\n{code}") from e
