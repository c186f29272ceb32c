"""Which recorded layers a diagnostic reports: the ``include`` filter and leaf selection."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jaxinit.diagnostics.flax_models import Record

Include = str | Sequence[str] | Callable[[str], bool] | None


def include_fn(include: Include) -> Callable[[str], bool]:
    """Turns an ``include`` argument into a predicate on layer names.

    Args:
        include: a regular expression searched in the name, a sequence of names, a predicate,
            or None (every name).

    Returns:
        The predicate.
    """
    if include is None:
        return lambda name: True
    if isinstance(include, str):
        pattern = re.compile(include)
        return lambda name: pattern.search(name) is not None
    if callable(include):
        return include
    names = set(include)
    return lambda name: name in names


def select(records: Sequence[Record], leaves_only: bool, include: Include) -> list[int]:
    """Returns the indices of the leaf records (any, without ``leaves_only``) ``include`` keeps."""
    keep = include_fn(include)
    return [i for i, r in enumerate(records) if (r.leaf or not leaves_only) and keep(r.name)]
