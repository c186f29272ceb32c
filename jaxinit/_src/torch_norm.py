"""torch's LayerNorm, GroupNorm, RMSNorm and InstanceNorm conventions, as jaxinit keyword arguments.

torch's norm layers differ from jaxinit's (and Flax's) defaults in three ways:

* ``eps`` defaults to 1e-5 (jaxinit: 1e-6); ``RMSNorm(eps=None)`` uses a machine epsilon.
* ``LayerNorm(normalized_shape)`` and ``RMSNorm(normalized_shape)`` normalise over the trailing
  ``len(normalized_shape)`` axes and hold a weight (and bias) of shape ``normalized_shape``.
* ``GroupNorm`` and ``InstanceNormNd`` take channels at axis 1 (N, C, ...); jaxinit defaults to
  channels last.

Each function here returns the keyword arguments of one jaxinit call; torch's ``weight`` and
``bias`` (None where the module has none) are its ``scale`` and ``bias``.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp

__all__ = [
    "torch_group_norm_kwargs",
    "torch_instance_norm_kwargs",
    "torch_layer_norm_kwargs",
    "torch_rms_norm_kwargs",
]


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _epsilon(eps: Any) -> float:
    """``eps`` as a float, checked to be a number >= 0."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a real number, got {type(eps).__name__} {eps!r}")
    if not float(eps) >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    return float(eps)


def _trailing_axes(normalized_shape: Any) -> tuple[int, ...]:
    """The negative axes torch normalises over for ``normalized_shape``: ``(-k, ..., -1)``."""
    if _is_int(normalized_shape):
        shape: tuple[Any, ...] = (normalized_shape,)
    else:
        try:
            shape = tuple(normalized_shape)
        except TypeError:
            raise TypeError(
                "normalized_shape must be an int or a sequence of positive ints, "
                f"got {type(normalized_shape).__name__} {normalized_shape!r}"
            ) from None
    if not shape or not all(_is_int(s) and s > 0 for s in shape):
        raise ValueError(
            "normalized_shape must be an int or a non-empty sequence of positive ints, "
            f"got {normalized_shape!r}"
        )
    return tuple(range(-len(shape), 0))


def _check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def torch_layer_norm_kwargs(
    normalized_shape: int | Sequence[int],
    eps: float = 1e-5,
    elementwise_affine: bool = True,
    bias: bool = True,
) -> dict[str, Any]:
    """Returns keyword arguments that make ``ji.layer_norm`` compute torch's ``LayerNorm``.

    torch's ``F.layer_norm(x, normalized_shape, weight, bias, eps)`` is
    ``ji.layer_norm(x, weight, bias, **torch_layer_norm_kwargs(normalized_shape, eps))``: both
    take the biased variance over the trailing ``len(normalized_shape)`` axes, which are the
    reduction and the feature axes here, and the weight and bias have shape
    ``normalized_shape``. The arguments mirror ``nn.LayerNorm``'s: where the module has no weight
    (``elementwise_affine=False``) or no bias (``bias=False``), the dict pins ``scale=None`` or
    ``bias=None``, so call ``ji.layer_norm(x, **kw)`` or ``ji.layer_norm(x, weight, **kw)``
    (passing a tensor the module lacks is a TypeError for a repeated argument).

    Args:
        normalized_shape: torch's ``normalized_shape``: a positive int or a non-empty sequence of
            positive ints.
        eps: torch's ``eps``, >= 0.
        elementwise_affine: torch's ``elementwise_affine``: whether the module has a weight (and
            a bias).
        bias: torch's ``bias``: whether an affine module has a bias.

    Returns:
        A dict with ``reduction_axes`` and ``feature_axes`` (the same negative axes), ``epsilon``,
        and ``scale=None``/``bias=None`` where the module has no weight/bias.

    Raises:
        ValueError: if ``normalized_shape`` is empty or holds a non-positive size, or ``eps`` is
            negative.
        TypeError: if ``normalized_shape`` is not an int or a sequence of ints, ``eps`` is not a
            number, or ``elementwise_affine`` or ``bias`` is not a bool.

    Example:
        >>> from jaxinit.porting import torch_layer_norm_kwargs
        >>> torch_layer_norm_kwargs((4, 5))
        {'reduction_axes': (-2, -1), 'feature_axes': (-2, -1), 'epsilon': 1e-05}
        >>> torch_layer_norm_kwargs(8, bias=False)
        {'reduction_axes': (-1,), 'feature_axes': (-1,), 'epsilon': 1e-05, 'bias': None}
    """
    axes = _trailing_axes(normalized_shape)
    epsilon = _epsilon(eps)
    affine = _check_bool(elementwise_affine, "elementwise_affine")
    has_bias = _check_bool(bias, "bias")
    kw: dict[str, Any] = {"reduction_axes": axes, "feature_axes": axes, "epsilon": epsilon}
    if not affine:
        kw["scale"] = None
    if not (affine and has_bias):
        kw["bias"] = None
    return kw


def torch_rms_norm_kwargs(
    normalized_shape: int | Sequence[int],
    eps: float | None = None,
    *,
    dtype: Any = jnp.float32,
) -> dict[str, Any]:
    """Returns keyword arguments that make ``ji.rms_norm`` compute torch's ``RMSNorm``.

    torch's ``F.rms_norm(x, normalized_shape, weight, eps)``, ``x / sqrt(mean(x^2) + eps) *
    weight`` over the trailing ``len(normalized_shape)`` axes, is
    ``ji.rms_norm(x, weight, **torch_rms_norm_kwargs(normalized_shape, eps))``; torch's RMSNorm
    has no bias, and its weight is None when ``elementwise_affine=False``.

    torch's ``eps=None`` is a machine epsilon, ``float(jnp.finfo(dtype).eps)`` here. torch
    documents ``torch.finfo(x.dtype).eps``; versions whose kernel computes float16 and bfloat16
    inputs in float32 take float32's epsilon for them, which is the default ``dtype``. For a
    torch that takes the input dtype's, pass that dtype.

    Args:
        normalized_shape: torch's ``normalized_shape``: a positive int or a non-empty sequence of
            positive ints.
        eps: torch's ``eps``, >= 0, or None for the machine epsilon of ``dtype``.
        dtype: a floating dtype whose machine epsilon replaces ``eps=None``; ignored otherwise.

    Returns:
        A dict with ``reduction_axes`` and ``feature_axes`` (the same negative axes) and
        ``epsilon``.

    Raises:
        ValueError: if ``normalized_shape`` is empty or holds a non-positive size, ``eps`` is
            negative, or ``dtype`` is not a floating dtype.
        TypeError: if ``normalized_shape`` is not an int or a sequence of ints, or ``eps`` is
            neither None nor a number.

    Example:
        >>> from jaxinit.porting import torch_rms_norm_kwargs
        >>> torch_rms_norm_kwargs(16)
        {'reduction_axes': (-1,), 'feature_axes': (-1,), 'epsilon': 1.1920928955078125e-07}
        >>> torch_rms_norm_kwargs((4, 5), eps=1e-6)["reduction_axes"]
        (-2, -1)
    """
    axes = _trailing_axes(normalized_shape)
    if eps is None:
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"dtype must be a floating dtype, got {dtype!r}")
        epsilon = float(jnp.finfo(dtype).eps)
    else:
        epsilon = _epsilon(eps)
    return {"reduction_axes": axes, "feature_axes": axes, "epsilon": epsilon}


def torch_group_norm_kwargs(
    num_groups: int,
    eps: float = 1e-5,
    *,
    channels_last: bool = False,
) -> dict[str, Any]:
    """Returns keyword arguments that make ``ji.group_norm`` compute torch's ``GroupNorm``.

    torch's ``F.group_norm(x, num_groups, weight, bias, eps)`` on (N, C, ...) data, which splits
    the C channels into ``num_groups`` groups and normalises each group of each sample over its
    channels and every spatial position with the biased variance, is
    ``ji.group_norm(x, weight, bias, **torch_group_norm_kwargs(num_groups, eps))``. The weight and
    bias have shape (C,), and are None when ``affine=False``; ``ji.group_norm`` checks that C
    divides into the groups.

    Args:
        num_groups: torch's ``num_groups``, a positive int.
        eps: torch's ``eps``, >= 0.
        channels_last: True for (N, ..., C) data (``feature_axis=-1``); False keeps torch's
            (N, C, ...) layout (``feature_axis=1``).

    Returns:
        A dict with ``num_groups``, ``group_size=None``, ``feature_axis`` and ``epsilon``.

    Raises:
        ValueError: if ``num_groups`` is not a positive int or ``eps`` is negative.
        TypeError: if ``eps`` is not a number or ``channels_last`` is not a bool.

    Example:
        >>> from jaxinit.porting import torch_group_norm_kwargs
        >>> torch_group_norm_kwargs(8)
        {'num_groups': 8, 'group_size': None, 'feature_axis': 1, 'epsilon': 1e-05}
    """
    if not _is_int(num_groups) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    return {
        "num_groups": int(num_groups),
        "group_size": None,
        "feature_axis": -1 if _check_bool(channels_last, "channels_last") else 1,
        "epsilon": _epsilon(eps),
    }


def torch_instance_norm_kwargs(
    eps: float = 1e-5,
    *,
    channels_last: bool = False,
) -> dict[str, Any]:
    """Returns keyword arguments that make ``ji.instance_norm`` compute torch's ``InstanceNormNd``.

    torch's ``F.instance_norm(x, weight=weight, bias=bias, eps=eps)`` on (N, C, ...) data,
    which normalises each channel of each sample over the spatial axes with the biased variance,
    is ``ji.instance_norm(x, weight, bias, **torch_instance_norm_kwargs(eps))``. torch's
    ``InstanceNormNd`` defaults to ``affine=False`` (weight and bias None, so
    ``ji.instance_norm(x, **kw)``) and ``track_running_stats=False``; running statistics, used by
    a module that tracks them in eval mode, have no counterpart here.

    Args:
        eps: torch's ``eps``, >= 0.
        channels_last: True for (N, ..., C) data (``feature_axes=-1``); False keeps torch's
            (N, C, ...) layout (``feature_axes=1``).

    Returns:
        A dict with ``feature_axes`` and ``epsilon``.

    Raises:
        ValueError: if ``eps`` is negative.
        TypeError: if ``eps`` is not a number or ``channels_last`` is not a bool.

    Example:
        >>> from jaxinit.porting import torch_instance_norm_kwargs
        >>> torch_instance_norm_kwargs()
        {'feature_axes': 1, 'epsilon': 1e-05}
    """
    axis = -1 if _check_bool(channels_last, "channels_last") else 1
    return {"feature_axes": axis, "epsilon": _epsilon(eps)}
