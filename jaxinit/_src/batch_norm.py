"""Batch normalization as a pure function with explicit state.

``y, new_state = batch_norm(x, state, scale, bias, training=...)``: nothing is mutated, the state
is a NamedTuple pytree, and the train-mode gradient is a custom VJP with the analytic formula (two
reductions and one elementwise pass). Ioffe and Szegedy, "Batch Normalization: Accelerating Deep
Network Training by Reducing Internal Covariate Shift", 2015.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxinit._src import normalize as core
from jaxinit._src.axes import canonical_axes
from jaxinit._src.moments import Moments, check_float_input, prepare_mask

__all__ = [
    "BatchNormState",
    "batch_norm",
    "batch_norm_state",
    "update_running_stats",
]

_F32 = jnp.float32


class BatchNormState(NamedTuple):
    """Running statistics of a batch-norm layer (a pytree; never mutated).

    Attributes:
        mean: running mean, float32 (or wider) array of the feature shape.
        var: running variance, same shape and dtype.
        count: int32 scalar, the number of running updates made so far.
    """

    mean: jax.Array
    var: jax.Array
    count: jax.Array


def batch_norm_state(
    num_features: int | Sequence[int], dtype: jax.typing.DTypeLike = jnp.float32
) -> BatchNormState:
    """A fresh running state: mean 0, var 1, count 0.

    Args:
        num_features: the number of features (an int) or the feature shape (a tuple, for several
            feature axes, in the order the axes appear in ``x``).
        dtype: dtype of ``mean`` and ``var``; 16-bit floats are promoted to float32 (statistics
            are kept at least in float32).

    Returns:
        A :class:`BatchNormState`.

    Raises:
        TypeError: ``dtype`` is not a floating dtype, or ``num_features`` is not an int or a
            sequence of ints.
        ValueError: a negative feature size.

    Example:
        >>> import jaxinit as ji
        >>> s = ji.batch_norm_state(3)
        >>> print(s.mean, s.var, s.count)
        [0. 0. 0.] [1. 1. 1.] 0
    """
    if isinstance(num_features, int | np.integer) and not isinstance(num_features, bool):
        shape = (int(num_features),)
    else:
        try:
            shape = tuple(num_features)
        except TypeError:
            raise TypeError(
                f"num_features must be an int or a sequence of ints, got {num_features!r}."
            ) from None
        if any(isinstance(s, bool) or not isinstance(s, int | np.integer) for s in shape):
            raise TypeError(
                f"num_features must be an int or a sequence of ints, got {num_features!r}."
            )
    if any(s < 0 for s in shape):
        raise ValueError(f"num_features must be non-negative, got {num_features!r}.")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype must be a floating dtype, got {dtype!r}.")
    dtype = jnp.dtype(dtype)
    if dtype.itemsize < 4:
        dtype = jnp.dtype(_F32)
    return BatchNormState(
        mean=jnp.zeros(shape, dtype), var=jnp.ones(shape, dtype), count=jnp.zeros((), jnp.int32)
    )


# --------------------------------------------------------------------------- running update


def _check_momentum(momentum: Any) -> None:
    if isinstance(momentum, numbers.Real) or (
        isinstance(momentum, np.ndarray | np.generic) and np.ndim(momentum) == 0
    ):
        if not 0.0 <= float(momentum) < 1.0:
            raise ValueError(
                f"momentum must be in [0, 1) (it is the decay, the weight on the old running "
                f"value; torch's momentum=m is momentum=1-m here), got {momentum!r}."
            )


@functools.partial(jax.jit, static_argnames=("unbiased_running_var", "nan_guard", "debias"))
def _update(
    state: BatchNormState,
    count: jax.Array,
    mean: jax.Array,
    var: jax.Array,
    *,
    momentum: Any,
    unbiased_running_var: bool,
    nan_guard: bool,
    debias: bool,
) -> BatchNormState:
    dtype = state.mean.dtype
    mean = mean.astype(dtype)
    var = var.astype(dtype)
    count = count.astype(dtype)
    if unbiased_running_var:
        var = var * (count / (count - 1.0))
    if debias:
        # Debiased EMA written on the estimate itself: weight (1-m)/(1-m^(t+1)); the first
        # update (count 0) takes the batch statistics whole.
        m = jnp.asarray(momentum, dtype)
        t = (state.count + 1).astype(dtype)
        w = (1.0 - m) / (1.0 - m**t)
        new_mean = (1.0 - w) * state.mean + w * mean
        new_var = (1.0 - w) * state.var + w * var
    else:
        new_mean = momentum * state.mean + (1 - momentum) * mean
        new_var = momentum * state.var + (1 - momentum) * var
    new_mean = new_mean.astype(dtype)
    new_var = new_var.astype(dtype)
    if nan_guard:
        ok = jnp.isfinite(mean) & jnp.isfinite(var) & (count > (1.0 if unbiased_running_var else 0))
        # `old + zeros_like(new)` gives the old values the new ones' sharding, so the select
        # also type-checks when the features are split over an Explicit mesh axis.
        new_mean = jnp.where(ok, new_mean, state.mean + jnp.zeros_like(new_mean))
        new_var = jnp.where(ok, new_var, state.var + jnp.zeros_like(new_var))
    return BatchNormState(new_mean, new_var, state.count + jnp.ones((), state.count.dtype))


def update_running_stats(
    state: BatchNormState,
    moments: Moments,
    *,
    momentum: float | jax.Array = 0.99,
    unbiased_running_var: bool = False,
    nan_guard: bool = True,
    debias: bool = False,
) -> BatchNormState:
    """One running-statistics update from batch :class:`Moments` (what ``training=True`` does).

    ``new = momentum * old + (1 - momentum) * batch`` per feature, for the mean and the biased
    variance ``m2 / count`` (or the unbiased ``m2 / (count - 1)`` with
    ``unbiased_running_var=True``); ``count`` goes up by one.

    Args:
        state: the running state.
        moments: batch moments of the state's feature shape (from :func:`batch_moments`, merged
            with :func:`merge_moments`, or combined with :func:`all_reduce_moments`).
        momentum: the decay, in [0, 1).
        unbiased_running_var: store the n/(n-1)-corrected variance, as torch does.
        nan_guard: features whose batch statistics are not finite (or have no elements) keep
            their running values.
        debias: zero-debiased update (the first update takes the batch statistics whole, then
            weight ``(1-m)/(1-m^(t+1))``), so the running statistics are usable from step one.

    Returns:
        The new :class:`BatchNormState`.

    Raises:
        ValueError: ``momentum`` outside [0, 1), or moments of another shape than the state.

    Example:
        >>> import jax.numpy as jnp, jaxinit as ji
        >>> m = ji.batch_moments(jnp.array([[1.0], [3.0]]))
        >>> s = ji.update_running_stats(ji.batch_norm_state(1), m, momentum=0.9)
        >>> s.mean, s.var, s.count
        (Array([0.2], dtype=float32), Array([1.], dtype=float32), Array(1, dtype=int32))
    """
    _check_momentum(momentum)
    if jnp.shape(moments.mean) != state.mean.shape:
        raise ValueError(
            f"moments of feature shape {jnp.shape(moments.mean)} do not match the state's "
            f"feature shape {state.mean.shape}."
        )
    count = jnp.broadcast_to(jnp.asarray(moments.count, _F32), state.mean.shape)
    return _update(
        state,
        count,
        jnp.asarray(moments.mean),
        jnp.asarray(moments.var),
        momentum=momentum,
        unbiased_running_var=unbiased_running_var,
        nan_guard=nan_guard,
        debias=debias,
    )


# --------------------------------------------------------------------------- public function


@functools.partial(jax.jit, static_argnums=6)
def _eval_mode(x, mean, var, scale, bias, epsilon, reduce_axes):
    """Normalization with the running statistics (one program per shape, called eagerly)."""

    def broadcastable(v: jax.Array, dtype: Any) -> jax.Array:
        return jnp.expand_dims(v.astype(dtype), reduce_axes)

    sdt = mean.dtype if jnp.dtype(mean.dtype).itemsize >= 4 else _F32
    mul = lax.rsqrt(var.astype(sdt) + jnp.asarray(epsilon, sdt))
    if scale is not None:
        mul = mul * scale.astype(sdt)
    y = (x.astype(sdt) - broadcastable(mean, sdt)) * broadcastable(mul, sdt)
    if bias is not None:
        y = y + broadcastable(bias, sdt)
    return y.astype(x.dtype)


def batch_norm(
    x: jax.typing.ArrayLike,
    state: BatchNormState,
    scale: jax.typing.ArrayLike | None = None,
    bias: jax.typing.ArrayLike | None = None,
    *,
    training: bool,
    momentum: float | jax.Array = 0.99,
    epsilon: float = 1e-5,
    axis: int | Sequence[int] = -1,
    axis_name: Hashable | None = None,
    mask: jax.typing.ArrayLike | None = None,
    unbiased_running_var: bool = False,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    nan_guard: bool = True,
    debias: bool = False,
    fast_variance: bool = False,
) -> tuple[jax.Array, BatchNormState]:
    """Batch normalization, ``y = (x - mean) / sqrt(var + epsilon) * scale + bias``.

    ``training=True`` normalizes with the statistics of this batch (over every axis except the
    feature ``axis``) and returns the running state updated with them; ``training=False``
    normalizes with the running statistics and returns the state unchanged. Train mode has a
    custom VJP with the analytic gradient (with respect to ``x``, ``scale`` and ``bias``, and
    through the batch mean and variance into the new state).

    Statistics are computed in float32 (or wider) whatever ``x``'s dtype; the output has ``x``'s
    dtype. The variance is stable: sums of ``x - s`` and ``(x - s)**2`` with ``s`` a sample of
    the data (the first element; the masked mean when a mask is given), so nothing large
    cancels even at mean 1e4 and std 1 in float32.

    Conventions and how to port:

    * flax ``nn.BatchNorm(momentum=m, epsilon=e, axis=a, axis_name=n)`` is
      ``batch_norm(..., momentum=m, epsilon=e, axis=a, axis_name=n)``; its
      ``use_running_average=True`` is ``training=False``; ``use_fast_variance=True`` (its
      default, unstable far from zero mean) is ``fast_variance=True``. flax weights devices
      equally under ``axis_name`` with a mask; this function weights them by their counts.
    * torch ``nn.BatchNorm2d(C, eps=e, momentum=p)`` on NCHW input is
      ``batch_norm(..., axis=1, epsilon=e, momentum=1 - p, unbiased_running_var=True)``
      (torch's momentum is the weight on the new batch and it stores the unbiased variance; its
      default 0.1 is 0.9 here). ``momentum=None`` (torch's cumulative average) is
      ``debias=True`` with ``momentum`` near 1, or precise BN with the moments functions.
    * keras ``BatchNormalization(momentum=m, epsilon=e)`` is
      ``batch_norm(..., momentum=m, epsilon=e)`` (keras's default epsilon is 1e-3).

    Args:
        x: floating input.
        state: the running :class:`BatchNormState` of the feature shape.
        scale: optional learned scale (``gamma``) of the feature shape; None means 1.
        bias: optional learned bias (``beta``) of the feature shape; None means 0.
        training: use batch statistics and update the state (True), or use the running ones.
        momentum: the decay of the running average, in [0, 1) (flax's and keras's meaning).
        epsilon: added to the variance, non-negative.
        axis: the feature axis or axes; statistics run over all the others.
        axis_name: a named axis (``shard_map``, ``pmap``) to combine statistics over, with one
            all-gather, weighted by each device's count of valid elements.
        mask: optional boolean array broadcastable to ``x``; statistics use only the elements it
            keeps (every element is still normalized). A feature with no kept element is
            normalized with mean 0 and variance 0 (finite, ``x * rsqrt(epsilon)``, where flax
            gives NaN) and keeps its running statistics.
        unbiased_running_var: store the n/(n-1)-corrected batch variance in the state (torch);
            normalization always uses the biased one.
        axis_index_groups: optional groups along ``axis_name``, as in ``lax.psum``.
        nan_guard: features whose batch statistics are not finite (or have no valid elements)
            keep their running statistics. The output may still be NaN.
        debias: zero-debiased running statistics (see :func:`update_running_stats`).
        fast_variance: use ``E[x^2] - E[x]^2`` without a shift (flax's default; breaks far from
            zero mean). Same speed here; for parity only.

    Returns:
        ``(y, new_state)``: ``y`` of ``x``'s shape and dtype, and the new state.

    Raises:
        TypeError: ``x`` is not a real floating array; ``training`` is not a bool; ``mask`` is not
            boolean; ``scale``/``bias`` are not floating.
        ValueError: ``axis`` out of range; x's feature shape differs from the state's;
            ``momentum`` outside [0, 1); negative ``epsilon``; ``mask`` does not broadcast to
            ``x``; ``scale`` or ``bias`` of the wrong shape.

    Example:
        >>> import jax, jax.numpy as jnp, jaxinit as ji
        >>> x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (256, 4))
        >>> state = ji.batch_norm_state(4)
        >>> y, state = ji.batch_norm(x, state, training=True, momentum=0.9)
        >>> print(jnp.round(y.mean(0), 4) + 0.0, jnp.round(y.std(0), 3))
        [0. 0. 0. 0.] [1. 1. 1. 1.]
        >>> print(jnp.round(state.mean, 1), state.count)
        [0.3 0.3 0.3 0.3] 1
        >>> y_eval, _ = ji.batch_norm(x, state, training=False)
    """
    if not isinstance(training, bool | np.bool_):
        raise TypeError(
            f"training must be a Python bool (it selects the computation at trace time), "
            f"got {training!r}."
        )
    x = jnp.asarray(x)
    check_float_input(x)
    feature_axes = canonical_axes(x.ndim, axis)
    reduce_axes = tuple(i for i in range(x.ndim) if i not in feature_axes)
    feature_shape = tuple(x.shape[i] for i in feature_axes)
    if tuple(state.mean.shape) != feature_shape or tuple(state.var.shape) != feature_shape:
        raise ValueError(
            f"x's feature shape {feature_shape} (x.shape={x.shape}, axis={axis!r}) does not "
            f"match the state's mean {tuple(state.mean.shape)} / var {tuple(state.var.shape)}."
        )
    _check_momentum(momentum)
    core.check_epsilon(epsilon)
    what = "x's sizes along the feature axes"
    if scale is not None:
        scale = core.check_param(scale, "scale", feature_shape, what)
    if bias is not None:
        bias = core.check_param(bias, "bias", feature_shape, what)
    m = prepare_mask(mask, x.shape)

    if not training:
        return _eval_mode(x, state.mean, state.var, scale, bias, epsilon, reduce_axes), state

    plan = core.plan(
        reduce_axes,
        feature_axes,
        centered=True,
        epsilon=epsilon,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        fast_variance=fast_variance,
    )
    y, stats = core.normalize(
        x,
        None if scale is None else jnp.expand_dims(scale, reduce_axes),
        None if bias is None else jnp.expand_dims(bias, reduce_axes),
        m,
        plan,
    )
    new_state = _update(
        state,
        stats.count,
        stats.mean,
        stats.var,
        momentum=momentum,
        unbiased_running_var=unbiased_running_var,
        nan_guard=nan_guard,
        debias=debias,
    )
    return y, new_state
