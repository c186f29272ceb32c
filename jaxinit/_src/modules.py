"""What the linen and nnx modules share; flax-free, so that both thin wrappers stay thin."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxinit._src.axes import canonical_axes
from jaxinit._src.batch_norm import BatchNormState, batch_norm
from jaxinit._src.normalization import group_norm, instance_norm, layer_norm, rms_norm


def promote(*dtypes: Any) -> jnp.dtype:
    """Standard JAX type promotion, whatever the ``jax_numpy_dtype_promotion`` setting."""
    with jax.numpy_dtype_promotion("standard"):
        return jnp.dtype(functools.reduce(jnp.promote_types, dtypes))


def call_batch_norm(
    module: Any,
    x: jax.Array,
    state: BatchNormState,
    scale: jax.Array | None,
    bias: jax.Array | None,
    *,
    stat_dtype: Any,
    training: bool,
    feature_axes: tuple[int, ...],
    mask: jax.Array | None,
    axis_name: Any,
    axis_index_groups: Any,
) -> tuple[jax.Array, BatchNormState]:
    """:func:`jaxinit.batch_norm` with the options a BatchNorm module holds as attributes.

    ``module`` has flax's fields (``momentum``, ``epsilon``, ``use_fast_variance``) and
    jaxinit's (``unbiased_running_var``, ``nan_guard``, ``debias``); ``scale`` and ``bias`` are
    cast to ``stat_dtype``, the statistics' dtype.
    """
    return batch_norm(
        x,
        state,
        None if scale is None else jnp.asarray(scale, stat_dtype),
        None if bias is None else jnp.asarray(bias, stat_dtype),
        training=training,
        momentum=module.momentum,
        epsilon=module.epsilon,
        axis=feature_axes,
        axis_name=axis_name,
        mask=mask,
        unbiased_running_var=module.unbiased_running_var,
        axis_index_groups=axis_index_groups,
        nan_guard=module.nan_guard,
        debias=module.debias,
        fast_variance=module.use_fast_variance,
    )


# --------------------------------------------------------------------------- the norm family


def check_float32_reductions(module: Any) -> None:
    """ValueError for ``force_float32_reductions=False`` (statistics are always float32+)."""
    if not getattr(module, "force_float32_reductions", True):
        raise ValueError(
            f"force_float32_reductions=False is not supported: jaxinit.{type(module).__name__} "
            "always computes statistics in float32 or wider"
        )


def norm_param_shape(kind: str, module: Any, x: jax.Array) -> tuple[int, ...]:
    """The shape of ``scale`` and ``bias`` for an input ``x`` (flax linen's layout)."""
    if kind == "group_norm":
        (axis,) = canonical_axes(x.ndim, module.feature_axis, "feature_axis", x.shape)
        return (x.shape[axis],)
    axes = canonical_axes(x.ndim, module.feature_axes, "feature_axes", x.shape)
    return tuple(x.shape[a] for a in axes)


def scale_init_of(module: Any, default_ones: Any, zeros: Any) -> Any:
    """``module.scale_init``, or ``zeros`` for a zero-centred RMSNorm left at the default ones."""
    if getattr(module, "zero_centered_scale", False) and module.scale_init is default_ones:
        return zeros
    return module.scale_init


def call_norm(
    kind: str,
    module: Any,
    x: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    mask: jax.Array | None,
    *,
    groups: tuple[int | None, int | None] | None = None,
) -> jax.Array:
    """The pure function ``kind`` with the options a norm module holds as attributes.

    ``module`` has flax's fields of the matching module (``epsilon``, ``reduction_axes``,
    ``feature_axes``, ``axis_name``, ``use_fast_variance``, ...) and jaxinit's extras
    (``zero_centered_scale``, ``feature_axis``). ``groups`` overrides the module's
    ``(num_groups, group_size)``.
    """
    common = {
        "epsilon": module.epsilon,
        "mask": mask,
        "axis_name": module.axis_name,
        "axis_index_groups": module.axis_index_groups,
    }
    if kind == "layer_norm":
        return layer_norm(
            x,
            scale,
            bias,
            reduction_axes=module.reduction_axes,
            feature_axes=module.feature_axes,
            fast_variance=module.use_fast_variance,
            **common,
        )
    if kind == "rms_norm":
        return rms_norm(
            x,
            scale,
            reduction_axes=module.reduction_axes,
            feature_axes=module.feature_axes,
            zero_centered_scale=module.zero_centered_scale,
            **common,
        )
    if kind == "group_norm":
        return group_norm(
            x,
            scale,
            bias,
            num_groups=groups[0] if groups else module.num_groups,
            group_size=groups[1] if groups else module.group_size,
            feature_axis=module.feature_axis,
            reduction_axes=module.reduction_axes,
            fast_variance=module.use_fast_variance,
            **common,
        )
    return instance_norm(
        x,
        scale,
        bias,
        feature_axes=module.feature_axes,
        fast_variance=module.use_fast_variance,
        **common,
    )
