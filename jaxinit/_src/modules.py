"""What the linen and nnx modules share; flax-free, so that both thin wrappers stay thin."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxinit._src.batch_norm import BatchNormState, batch_norm


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
