"""Axis arguments: one parser for every function that takes ``axis``-like arguments."""

from __future__ import annotations

import operator
from typing import Any


class AxisError(ValueError, TypeError):
    """An axis argument that is not an int or a sequence of ints.

    Both a ValueError (a bad argument value, the convention of the initializers' fan axes) and a
    TypeError (the convention of the normalization ``axis``), as numpy's ``AxisError`` is both a
    ValueError and an IndexError.
    """


def axis_tuple(axes: Any, name: str) -> tuple[int, ...]:
    """``axes`` (an int or a sequence of ints) as a tuple of ints.

    Raises:
        AxisError: for anything else, bools included.
    """
    error = AxisError(f"{name} must be an int or a sequence of ints, got {axes!r}.")
    if isinstance(axes, bool):
        raise error
    try:
        return (operator.index(axes),)
    except TypeError:
        pass
    try:
        items = tuple(axes)
        out = tuple(operator.index(a) for a in items)
    except TypeError:
        raise error from None
    if any(isinstance(a, bool) for a in items):
        raise error
    return out


def canonical_axes(ndim: int, axis: Any, name: str = "axis", shape: Any = None) -> tuple[int, ...]:
    """Sorted, non-negative, unique axes of an array of rank ``ndim``.

    Args:
        ndim: the rank.
        axis: an int or a sequence of ints, each in ``[-ndim, ndim)``.
        name: the argument's name, for the error messages.
        shape: the array's shape, named in the out-of-range message when given.

    Returns:
        The axes, each in ``[0, ndim)``, sorted.

    Raises:
        AxisError: ``axis`` is not an int or a sequence of ints.
        ValueError: an axis is out of range or named twice.

    Example:
        >>> canonical_axes(4, (-1, 1))
        (1, 3)
    """
    out = []
    for a in axis_tuple(axis, name):
        if not -ndim <= a < ndim:
            where = f" (shape {tuple(shape)})" if shape is not None else ""
            raise ValueError(
                f"{name}={a} is out of range for an input of rank {ndim}{where}; expected an axis "
                f"in [{-ndim}, {ndim - 1}]."
            )
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{name}={axis!r} names the same axis twice.")
    return tuple(sorted(out))
