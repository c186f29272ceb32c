"""Fixed-width text tables of the diagnostics: number formatting and column layout."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def fmt(value: float, width: int = 9) -> str:
    """Formats a statistic for a table: 3 significant digits, ``inf``/``nan`` spelled out.

    Example:
        >>> from jaxinit.diagnostics.tables import fmt
        >>> fmt(0.123456), fmt(12345.0), fmt(float("-inf"), 0)
        ('    0.123', ' 1.23e+04', '-inf')
    """
    v = float(value)
    if math.isnan(v):
        return "nan".rjust(width)
    if math.isinf(v):
        return ("inf" if v > 0 else "-inf").rjust(width)
    if v == 0.0:
        return "0".rjust(width)
    if 1e-2 <= abs(v) < 1e4:
        return f"{v:.3g}".rjust(width)
    return f"{v:.2e}".rjust(width)


def text_table(labels: Mapping[str, Sequence[str]], header: str, cells: Sequence[str]) -> str:
    """Lays out label columns, left-aligned two spaces apart, each row followed by its cells.

    Args:
        labels: column title -> one label per row; each column is as wide as its widest entry.
        header: the text after the label titles on the first line.
        cells: the text after the labels of each row.

    Returns:
        The table, lines joined by newlines.
    """
    widths = [max([len(title), *map(len, column)]) for title, column in labels.items()]

    def left(row: Sequence[str]) -> str:
        return "  ".join(f"{s:<{w}}" for s, w in zip(row, widths, strict=True))

    rows = zip(*labels.values(), strict=True)
    lines = [left(list(labels)) + header]
    lines += [left(row) + cell for row, cell in zip(rows, cells, strict=True)]
    return "\n".join(lines)


def stats_table(
    labels: Mapping[str, Sequence[str]], stats: Mapping[str, object], width: int
) -> str:
    """A :func:`text_table` of statistics: one right-aligned column of ``width`` per entry.

    Args:
        labels: as in :func:`text_table`.
        stats: column title -> one value per row.
        width: the width of every statistic column.

    Returns:
        The table.
    """
    header = "".join(f"{title:>{width}}" for title in stats)
    values = [np.asarray(v) for v in stats.values()]
    rows = len(next(iter(labels.values())))
    cells = ["".join(fmt(v[i], width) for v in values) for i in range(rows)]
    return text_table(labels, header, cells)
