"""Layer, RMS, group and instance normalization as pure functions, on the shared core.

Each function checks its arguments (at trace time, naming the argument and the value), works out
which axes the statistics run over and which axes the scale and bias vary along, and calls
:func:`jaxinit._src.normalize.normalize`. Statistics are float32 or wider whatever the input
dtype; the output has ``x``'s shape and dtype.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxinit._src import normalize as core
from jaxinit._src.axes import canonical_axes
from jaxinit._src.moments import Pool, check_float_input, prepare_mask, stat_dtype

__all__ = ["check_groups", "group_norm", "instance_norm", "layer_norm", "rms_norm"]

Axes = int | Sequence[int]
_WHAT = "x's sizes along the feature axes"


def _reduction_axes(x: jax.Array, reduction_axes: Axes) -> tuple[int, ...]:
    axes = canonical_axes(x.ndim, reduction_axes, "reduction_axes", x.shape)
    if not axes:
        raise ValueError(
            f"reduction_axes must name at least one axis of x (shape {x.shape}), got "
            f"{reduction_axes!r}."
        )
    return axes


def _broadcastable(
    p: Any, name: str, x: jax.Array, axes: tuple[int, ...], shape: tuple[int, ...] | None = None
) -> jax.Array | None:
    """``p`` checked against x's sizes along ``axes``, reshaped to broadcast against ``shape``."""
    if p is None:
        return None
    shape = x.shape if shape is None else shape
    p = core.check_param(p, name, tuple(x.shape[a] for a in axes), _WHAT)
    return p.reshape(tuple(s if i in axes else 1 for i, s in enumerate(shape)))


def _run(
    x: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    mask: jax.Array | None,
    reduce_axes: tuple[int, ...],
    param_axes: tuple[int, ...],
    *,
    centered: bool,
    epsilon: float,
    axis_name: Hashable | None,
    axis_index_groups: Any,
    fast_variance: bool,
    pool: Pool | None = None,
) -> jax.Array:
    p = core.plan(
        reduce_axes,
        param_axes,
        centered=centered,
        epsilon=epsilon,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        fast_variance=fast_variance,
        pool=pool,
    )
    return core.normalize(x, scale, bias, mask, p)[0]


def _prepared(x: Any, epsilon: Any, mask: Any) -> tuple[jax.Array, jax.Array | None]:
    x = jnp.asarray(x)
    check_float_input(x)
    core.check_epsilon(epsilon)
    return x, prepare_mask(mask, x.shape)


def layer_norm(
    x: jax.typing.ArrayLike,
    scale: jax.typing.ArrayLike | None = None,
    bias: jax.typing.ArrayLike | None = None,
    *,
    reduction_axes: Axes = -1,
    feature_axes: Axes = -1,
    epsilon: float = 1e-6,
    mask: jax.typing.ArrayLike | None = None,
    axis_name: Hashable | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    fast_variance: bool = False,
) -> jax.Array:
    """Layer normalization, ``(x - mean) / sqrt(var + epsilon) * scale + bias``.

    The mean and the biased variance run over ``reduction_axes`` (per example); ``scale`` and
    ``bias`` vary along ``feature_axes`` (Ba, Kiros and Hinton, 2016). flax's
    ``nn.LayerNorm(epsilon=e, reduction_axes=r, feature_axes=f, use_fast_variance=False)`` is
    ``layer_norm(x, scale, bias, epsilon=e, reduction_axes=r, feature_axes=f)``; torch's
    ``F.layer_norm(x, shape, w, b, eps)`` normalizes over the last ``len(shape)`` axes with
    ``eps=1e-5`` by default (see :func:`jaxinit.torch_layer_norm_kwargs`).

    Args:
        x: floating input.
        scale: None (1) or an array of x's sizes along ``feature_axes``.
        bias: None (0) or an array of the same shape.
        reduction_axes: the axes the statistics run over (at least one).
        feature_axes: the axes ``scale`` and ``bias`` vary along.
        epsilon: added to the variance, non-negative.
        mask: optional boolean array broadcastable to ``x``; the statistics use only the kept
            elements (every element is still normalized). A group with no kept element is
            normalized with mean 0 and variance 0: finite output and gradients.
        axis_name: a named axis (``shard_map``, ``pmap``) to combine statistics over, weighted by
            each device's count of kept elements (for ``x`` split along ``reduction_axes``, the
            tensor-parallel case).
        axis_index_groups: optional groups along ``axis_name``, as in ``lax.psum``.
        fast_variance: flax's unshifted ``E[x^2] - E[x]^2`` (loses the variance far from zero
            mean; parity only).

    Returns:
        An array of ``x``'s shape and dtype.

    Raises:
        TypeError: ``x`` is not floating, or ``mask`` not boolean.
        ValueError: empty or out-of-range axes, ``scale``/``bias`` of the wrong shape, negative
            ``epsilon``, or a ``mask`` that does not broadcast to ``x``.

    Example:
        >>> import jax.numpy as jnp, numpy as np, jaxinit as ji
        >>> x = jnp.array([[1.0, 2.0, 3.0, 4.0], [1e4, 1e4 + 1, 1e4 + 2, 1e4 + 3]])
        >>> print(np.round(np.asarray(ji.layer_norm(x)), 3))
        [[-1.342 -0.447  0.447  1.342]
         [-1.342 -0.447  0.447  1.342]]
    """
    x, mask = _prepared(x, epsilon, mask)
    reduce_axes = _reduction_axes(x, reduction_axes)
    param_axes = canonical_axes(x.ndim, feature_axes, "feature_axes", x.shape)
    return _run(
        x,
        _broadcastable(scale, "scale", x, param_axes),
        _broadcastable(bias, "bias", x, param_axes),
        mask,
        reduce_axes,
        param_axes,
        centered=True,
        epsilon=epsilon,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        fast_variance=fast_variance,
    )


def rms_norm(
    x: jax.typing.ArrayLike,
    scale: jax.typing.ArrayLike | None = None,
    *,
    reduction_axes: Axes = -1,
    feature_axes: Axes = -1,
    epsilon: float = 1e-6,
    zero_centered_scale: bool = False,
    mask: jax.typing.ArrayLike | None = None,
    axis_name: Hashable | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
) -> jax.Array:
    """RMS normalization, ``x * rsqrt(mean(x**2) + epsilon) * scale`` (Zhang and Sennrich, 2019).

    No centring and no bias. With ``zero_centered_scale=True`` the multiplier is ``1 + scale``
    (Gemma's convention: the stored scale starts at 0). flax's ``nn.RMSNorm`` is
    ``rms_norm(x, scale, epsilon=..., reduction_axes=..., feature_axes=...)``; torch's
    ``nn.RMSNorm(shape, eps=None)`` uses the input dtype's machine epsilon (float32: 1.19e-7;
    see :func:`jaxinit.torch_rms_norm_kwargs`).

    Args:
        x: floating input.
        scale: None (1) or an array of x's sizes along ``feature_axes``.
        reduction_axes: the axes the mean square runs over (at least one).
        feature_axes: the axes ``scale`` varies along.
        epsilon: added to the mean square, non-negative.
        zero_centered_scale: multiply by ``1 + scale`` instead of ``scale``.
        mask: optional boolean array broadcastable to ``x``; the mean square uses only the kept
            elements.
        axis_name: a named axis to combine the mean square over, count-weighted.
        axis_index_groups: optional groups along ``axis_name``.

    Returns:
        An array of ``x``'s shape and dtype.

    Raises:
        TypeError: ``x`` is not floating, or ``mask`` not boolean.
        ValueError: empty or out-of-range axes, ``scale`` of the wrong shape, negative
            ``epsilon``, or a ``mask`` that does not broadcast to ``x``.

    Example:
        >>> import jax.numpy as jnp, jaxinit as ji
        >>> print(ji.rms_norm(jnp.array([3.0, 4.0]), epsilon=0.0) ** 2)
        [0.72 1.28]
        >>> print(ji.rms_norm(jnp.array([3.0, 4.0]), jnp.zeros(2), zero_centered_scale=True,
        ...                   epsilon=0.0) ** 2)
        [0.72 1.28]
    """
    x, mask = _prepared(x, epsilon, mask)
    reduce_axes = _reduction_axes(x, reduction_axes)
    param_axes = canonical_axes(x.ndim, feature_axes, "feature_axes", x.shape)
    scale = _broadcastable(scale, "scale", x, param_axes)
    if scale is not None and zero_centered_scale:
        scale = 1.0 + scale.astype(stat_dtype(x.dtype))
    return _run(
        x,
        scale,
        None,
        mask,
        reduce_axes,
        param_axes,
        centered=False,
        epsilon=epsilon,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        fast_variance=False,
    )


def check_groups(channels: int, num_groups: Any, group_size: Any) -> int:
    """The number of groups; flax's error sentences for the bad cases."""
    if (num_groups is None) == (group_size is None):
        raise ValueError(
            "Either `num_groups` or `group_size` should be specified. If `group_size` is to be "
            "specified, pass `num_groups=None` as argument to override the default `num_groups` "
            f"value of 32 (got num_groups={num_groups!r}, group_size={group_size!r})."
        )
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}.")
        if channels % group_size:
            raise ValueError(
                f"Number of channels ({channels}) is not multiple of the group size ({group_size})."
            )
        return channels // group_size
    if isinstance(num_groups, bool) or not isinstance(num_groups, int):
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}.")
    if num_groups <= 0 or channels % num_groups:
        raise ValueError(
            f"Number of groups ({num_groups}) does not divide the number of channels ({channels})."
        )
    return num_groups


def group_norm(
    x: jax.typing.ArrayLike,
    scale: jax.typing.ArrayLike | None = None,
    bias: jax.typing.ArrayLike | None = None,
    *,
    num_groups: int | None = 32,
    group_size: int | None = None,
    feature_axis: int = -1,
    reduction_axes: Axes | None = None,
    epsilon: float = 1e-6,
    mask: jax.typing.ArrayLike | None = None,
    axis_name: Hashable | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    fast_variance: bool = False,
) -> jax.Array:
    """Group normalization (Wu and He, 2018): statistics per example over groups of channels.

    The channels along ``feature_axis`` are split into ``num_groups`` groups of consecutive
    channels (or groups of ``group_size``); each group's statistics run over its channels and the
    other ``reduction_axes``. ``scale`` and ``bias`` are per channel. flax's
    ``nn.GroupNorm(num_groups=g)`` is ``group_norm(x, scale, bias, num_groups=g)``; torch's
    ``F.group_norm(x, g, w, b, eps=1e-5)`` on NCHW input is ``group_norm(x, w, b, num_groups=g,
    feature_axis=1, epsilon=1e-5)``, which flax cannot express.

    Args:
        x: floating input, with the channels along ``feature_axis``.
        scale: None (1) or an array of shape ``(C,)``.
        bias: None (0) or an array of shape ``(C,)``.
        num_groups: the number of groups; None when ``group_size`` is given.
        group_size: the channels per group; exactly one of the two is not None.
        feature_axis: the channel axis (-1 for NHWC, 1 for NCHW).
        reduction_axes: the axes the statistics run over, which must include ``feature_axis``;
            None means every axis except the leading (batch) one.
        epsilon: added to the variance, non-negative.
        mask: optional boolean array broadcastable to ``x``; statistics use the kept elements.
        axis_name: a named axis to combine statistics over, count-weighted.
        axis_index_groups: optional groups along ``axis_name``.
        fast_variance: flax's unshifted ``E[x^2] - E[x]^2`` (parity only).

    Returns:
        An array of ``x``'s shape and dtype.

    Raises:
        TypeError: ``x`` is not floating, or ``mask`` not boolean.
        ValueError: both or neither of ``num_groups``/``group_size``; a group count that does not
            divide the channels; ``reduction_axes`` empty, out of range or without the feature
            axis; ``scale``/``bias`` of the wrong shape; negative ``epsilon``; a bad ``mask``.

    Example:
        >>> import jax, jax.numpy as jnp, jaxinit as ji
        >>> x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))  # NHWC
        >>> y = ji.group_norm(x, num_groups=2)
        >>> groups = y.reshape(2, 16, 2, 4)
        >>> print(jnp.round(groups.mean((1, 3)), 4) + 0.0)
        [[0. 0.]
         [0. 0.]]
        >>> y_nchw = ji.group_norm(jnp.moveaxis(x, -1, 1), num_groups=2, feature_axis=1)
        >>> bool(jnp.allclose(jnp.moveaxis(y_nchw, 1, -1), y, atol=1e-5))
        True
    """
    x, mask = _prepared(x, epsilon, mask)
    (f,) = canonical_axes(x.ndim, feature_axis, "feature_axis", x.shape)
    if reduction_axes is None:
        axes = tuple(range(1, x.ndim)) if x.ndim > 1 else (0,)
    else:
        axes = _reduction_axes(x, reduction_axes)
    if f not in axes:
        if f == x.ndim - 1:
            reason = (
                "The reduction axes must include the final dimension as this is assumed to be "
                "the feature axis."
            )
        else:
            reason = "The reduction axes must include the feature axis."
        raise ValueError(f"{reason} Got reduction_axes={reduction_axes!r}, feature_axis={f}.")
    channels = x.shape[f]
    groups = check_groups(channels, num_groups, group_size)

    def per_channel(p: Any, name: str) -> jax.Array | None:
        if p is None:
            return None
        p = core.check_param(p, name, (channels,), "the number of channels along feature_axis")
        return p.reshape(tuple(s if i == f else 1 for i, s in enumerate(x.shape)))

    # The statistics run over the other reduced axes per channel, then pool over each group.
    return _run(
        x,
        per_channel(scale, "scale"),
        per_channel(bias, "bias"),
        mask,
        tuple(i for i in axes if i != f),
        (f,),
        centered=True,
        epsilon=epsilon,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        fast_variance=fast_variance,
        pool=Pool(f, groups),
    )


def instance_norm(
    x: jax.typing.ArrayLike,
    scale: jax.typing.ArrayLike | None = None,
    bias: jax.typing.ArrayLike | None = None,
    *,
    feature_axes: Axes = -1,
    epsilon: float = 1e-6,
    mask: jax.typing.ArrayLike | None = None,
    axis_name: Hashable | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    fast_variance: bool = False,
) -> jax.Array:
    """Instance normalization (Ulyanov et al., 2016): statistics per example and per feature.

    The statistics run over every axis except the leading (batch) axis and ``feature_axes`` (the
    spatial axes of an image); when that leaves none, as for an ``(N, C)`` input, each element
    is its own group (output ``bias``), as in flax. torch's ``F.instance_norm(x, eps=1e-5)`` on
    NCHW input is ``instance_norm(x, feature_axes=1, epsilon=1e-5)``.

    Args:
        x: floating input, batch first.
        scale: None (1) or an array of x's sizes along ``feature_axes``.
        bias: None (0) or an array of the same shape.
        feature_axes: the feature (channel) axes; not the leading axis.
        epsilon: added to the variance, non-negative.
        mask: optional boolean array broadcastable to ``x``; statistics use the kept elements.
        axis_name: a named axis to combine statistics over, count-weighted.
        axis_index_groups: optional groups along ``axis_name``.
        fast_variance: flax's unshifted ``E[x^2] - E[x]^2`` (parity only).

    Returns:
        An array of ``x``'s shape and dtype.

    Raises:
        TypeError: ``x`` is not floating, or ``mask`` not boolean.
        ValueError: ``feature_axes`` includes the leading axis or is out of range;
            ``scale``/``bias`` of the wrong shape; negative ``epsilon``; a bad ``mask``.

    Example:
        >>> import jax, jax.numpy as jnp, jaxinit as ji
        >>> x = 5.0 + jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
        >>> y = ji.instance_norm(x)
        >>> print(jnp.round(y.mean((1, 2)), 4) + 0.0)
        [[0. 0. 0.]
         [0. 0. 0.]]
    """
    x, mask = _prepared(x, epsilon, mask)
    param_axes = canonical_axes(x.ndim, feature_axes, "feature_axes", x.shape)
    if 0 in param_axes:
        raise ValueError(
            "The channel axes cannot include the leading dimension as this is assumed to be the "
            f"batch axis (feature_axes={feature_axes!r} for an input of rank {x.ndim})."
        )
    reduce_axes = tuple(i for i in range(1, x.ndim) if i not in param_axes)
    if not reduce_axes:
        # Each element is its own group: x - mean is exactly 0, the output is the bias.
        dtype = stat_dtype(x.dtype)
        y = jnp.zeros(x.shape, dtype) + lax.stop_gradient(x).astype(dtype) * 0.0
        if bias is not None:
            y = y + _broadcastable(bias, "bias", x, param_axes).astype(dtype)
        if scale is not None:
            _broadcastable(scale, "scale", x, param_axes)
        return y.astype(x.dtype)
    return _run(
        x,
        _broadcastable(scale, "scale", x, param_axes),
        _broadcastable(bias, "bias", x, param_axes),
        mask,
        reduce_axes,
        param_axes,
        centered=True,
        epsilon=epsilon,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        fast_variance=fast_variance,
    )
