"""Fan computation and axis validation, in jax's convention.

A kernel's axes are split into ``in_axis``, ``out_axis`` and ``batch_axis``; every other axis is the
receptive field (the spatial axes of a convolution kernel). ``fan_in = in_size * receptive_field`` and
``fan_out = out_size * receptive_field``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from jaxinit._src.axes import axis_tuple, canonical_axes

AxisSpec = int | Sequence[int]


def validate_axes(in_axis: AxisSpec, out_axis: AxisSpec, batch_axis: AxisSpec) -> None:
    """Checks what can be checked about fan axes before a shape is known.

    Raises ValueError for non-integer axes and for an axis named twice with the same sign (which
    overlaps whatever the rank). Out-of-range and mixed-sign overlaps are checked with the shape.
    """
    named = {
        "in_axis": axis_tuple(in_axis, "in_axis"),
        "out_axis": axis_tuple(out_axis, "out_axis"),
        "batch_axis": axis_tuple(batch_axis, "batch_axis"),
    }
    seen: dict[int, str] = {}
    for name, axes in named.items():
        for a in axes:
            if a in seen:
                raise ValueError(
                    f"Overlapping axes: axis {a} appears in {seen[a]} and in {name} "
                    f"(in_axis={in_axis!r}, out_axis={out_axis!r}, batch_axis={batch_axis!r}); "
                    "each axis may be named at most once."
                )
            seen[a] = name


def compute_fans(
    shape: Sequence[int],
    in_axis: AxisSpec = -2,
    out_axis: AxisSpec = -1,
    batch_axis: AxisSpec = (),
) -> tuple[int, int]:
    """Computes ``(fan_in, fan_out)`` of a kernel, in jax's convention.

    Every axis not named in ``in_axis``, ``out_axis`` or ``batch_axis`` is part of the receptive
    field, so a Flax ``Conv`` kernel ``(kh, kw, in, out)`` has ``fan_in = kh * kw * in``. Batch axes
    (e.g. stacked layers) are ignored.

    Args:
        shape: the kernel shape.
        in_axis: axis or axes holding the inputs.
        out_axis: axis or axes holding the outputs.
        batch_axis: axis or axes to ignore.

    Returns:
        ``(fan_in, fan_out)`` as Python ints.

    Raises:
        ValueError: if an axis is out of range, named twice, or the shape has rank < 2 while the
          default ``in_axis=-2`` is used.

    Example:
        >>> import jaxinit as ji
        >>> ji.compute_fans((3, 3, 16, 32))
        (144, 288)
        >>> ji.compute_fans((4, 8, 16), batch_axis=0)
        (8, 16)
    """
    shape = tuple(int(d) for d in shape)
    ndim = len(shape)
    validate_axes(in_axis, out_axis, batch_axis)
    if ndim < 2 and in_axis == -2:
        raise ValueError(
            f"Cannot compute fans of a rank-{ndim} shape {shape} with the default in_axis=-2, "
            "out_axis=-1: kernels have at least 2 axes (inputs, outputs). For a bias or another "
            "1-D parameter use an initializer without fans (zeros, constant, normal, uniform), or "
            "pass in_axis/out_axis explicitly (e.g. in_axis=(), out_axis=0)."
        )
    groups = {
        name: canonical_axes(ndim, axes, name, shape)
        for name, axes in (("in_axis", in_axis), ("out_axis", out_axis), ("batch_axis", batch_axis))
    }
    owner: dict[int, str] = {}
    for name, axes in groups.items():
        for a in axes:
            if a in owner:
                raise ValueError(
                    f"Overlapping axes for shape {shape}: axis {a} is in both {owner[a]} and {name} "
                    f"(in_axis={in_axis!r}, out_axis={out_axis!r}, batch_axis={batch_axis!r})."
                )
            owner[a] = name
    in_size = math.prod(shape[a] for a in groups["in_axis"])
    out_size = math.prod(shape[a] for a in groups["out_axis"])
    receptive = math.prod(d for a, d in enumerate(shape) if a not in owner)
    return in_size * receptive, out_size * receptive
