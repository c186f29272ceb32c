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

from jaxinit._src.axes import canonical_axes
from jaxinit._src.moments import (
    Moments,
    all_reduce_stats,
    check_float_input,
    fresh,
    prepare_mask,
    shifted_stats,
)

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


# --------------------------------------------------------------------------- train-mode core


class _Config(NamedTuple):
    red: tuple[int, ...]
    axis_name: Hashable | None
    groups: tuple[tuple[int, ...], ...] | None
    epsilon: float
    fast_variance: bool


def _stats(x, mask, cfg: _Config):
    st = shifted_stats(x, cfg.red, mask, fast_variance=cfg.fast_variance)
    if cfg.axis_name is not None:
        st = all_reduce_stats(st, cfg.axis_name, cfg.groups)
    return st


def _bcast(v, red):
    return jnp.expand_dims(v, red)


def _train_fwd(x, scale, bias, mask, cfg: _Config):
    red = cfg.red
    st = _stats(x, mask, cfg)
    safe_n = jnp.maximum(st.count, 1.0)
    var = st.m2 / safe_n
    r = lax.rsqrt(var + jnp.asarray(cfg.epsilon, _F32))
    a = r * scale.astype(_F32)
    xa, sa, da, aa, ba = fresh(x, st.shift, st.dmean, a, bias.astype(_F32))
    y = ((xa.astype(_F32) - _bcast(sa, red)) - _bcast(da, red)) * _bcast(aa, red) + _bcast(ba, red)
    out = (y.astype(x.dtype), st.count, st.shift + st.dmean, var)
    return out, (x, scale, bias, mask, st.shift, st.dmean, r, safe_n)


def _train_bwd(cfg: _Config, res, cts):
    x, scale, bias, mask, shift, dmean, r, n = res
    dy, _, g_mean, g_var = cts
    red = cfg.red

    # Two reductions (each one fused read, at most one broadcast) and one elementwise pass.
    (dya,) = fresh(dy)
    sum_dy = jnp.sum(dya.astype(_F32), axis=red)
    xb, dyb, sb = fresh(x, dy, shift)
    sum_dys = jnp.sum(dyb.astype(_F32) * (xb.astype(_F32) - _bcast(sb, red)), axis=red)
    sum_dyx = (sum_dys - dmean * sum_dy) * r  # sum(dy * xhat)
    # Every output (masked or not) depends on the statistics, so these sums run over all
    # elements; only the statistics' own dependence on x is restricted to the mask.
    ms = jnp.stack([sum_dy, sum_dyx])
    if cfg.axis_name is not None:
        ms = lax.psum(ms, cfg.axis_name, axis_index_groups=cfg.groups)
    a = scale.astype(_F32) * r
    b = (g_mean - a * ms[0]) / n
    c = (2.0 * g_var - a * r * ms[1]) / n  # multiplies x - mean
    # dx = a*dy + b + c*(x - mean), with x - mean = (x - shift) - dmean.
    xc_, dyc, sc, ac, bcf, cc, mc = fresh(x, dy, shift, a, b - c * dmean, c, mask)
    corr = _bcast(bcf, red) + _bcast(cc, red) * (xc_.astype(_F32) - _bcast(sc, red))
    if mc is not None:
        corr = jnp.where(mc, corr, 0.0)
    dx = (_bcast(ac, red) * dyc.astype(_F32) + corr).astype(x.dtype)
    d_scale = _same_sharding(sum_dyx.astype(scale.dtype), scale)
    d_bias = _same_sharding(sum_dy.astype(bias.dtype), bias)
    return _same_sharding(dx, x), d_scale, d_bias, None


def _same_sharding(g: jax.Array, like: jax.Array) -> jax.Array:
    """Gives a cotangent its primal's sharding type (they differ under Explicit mesh axes)."""
    want = getattr(jax.typeof(like), "sharding", None)
    have = getattr(jax.typeof(g), "sharding", None)
    if want is None or have is None or getattr(want, "spec", None) == getattr(have, "spec", None):
        return g
    return jax.sharding.reshard(g, want.spec)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _train_core(x, scale, bias, mask, cfg: _Config):
    return _train_fwd(x, scale, bias, mask, cfg)[0]


_train_core.defvjp(_train_fwd, _train_bwd)


# --------------------------------------------------------------------------- public function


def _varying(a: Any) -> frozenset:
    aval = jax.typeof(a)
    mat = getattr(aval, "mat", None)
    return frozenset(getattr(mat, "varying", None) or getattr(aval, "vma", None) or ())


def _vary_like(x: jax.Array, p: jax.Array) -> jax.Array:
    missing = _varying(x) - _varying(p)
    if not missing:
        return p
    return lax.pcast(p, tuple(sorted(missing, key=str)), to="varying")


def _check_param(p: Any, name: str, feat_shape: tuple[int, ...]) -> jax.Array:
    p = jnp.asarray(p)
    if not jnp.issubdtype(p.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype, got {p.dtype}.")
    if p.shape != feat_shape:
        raise ValueError(
            f"{name} has shape {p.shape}; expected the feature shape {feat_shape} "
            f"(x's sizes along the feature axes)."
        )
    return p


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
            keeps (every element is still normalized).
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
    feat = canonical_axes(x.ndim, axis)
    red = tuple(i for i in range(x.ndim) if i not in feat)
    feat_shape = tuple(x.shape[i] for i in feat)
    if tuple(state.mean.shape) != feat_shape or tuple(state.var.shape) != feat_shape:
        raise ValueError(
            f"x's feature shape {feat_shape} (x.shape={x.shape}, axis={axis!r}) does not match "
            f"the state's mean {tuple(state.mean.shape)} / var {tuple(state.var.shape)}."
        )
    _check_momentum(momentum)
    if isinstance(epsilon, numbers.Real) and not epsilon >= 0:
        raise ValueError(f"epsilon must be non-negative, got {epsilon!r}.")
    scale = (
        jnp.ones(feat_shape, _F32) if scale is None else _check_param(scale, "scale", feat_shape)
    )
    bias = jnp.zeros(feat_shape, _F32) if bias is None else _check_param(bias, "bias", feat_shape)
    m = prepare_mask(mask, x.shape)
    groups = None
    if axis_index_groups is not None:
        groups = tuple(tuple(int(i) for i in g) for g in axis_index_groups)

    if not training:
        sdt = state.mean.dtype if jnp.dtype(state.mean.dtype).itemsize >= 4 else _F32
        a = lax.rsqrt(state.var.astype(sdt) + jnp.asarray(epsilon, sdt)) * scale.astype(sdt)
        y = (x.astype(sdt) - _bcast(state.mean.astype(sdt), red)) * _bcast(a, red) + _bcast(
            bias.astype(sdt), red
        )
        return y.astype(x.dtype), state

    cfg = _Config(red, axis_name, groups, float(epsilon), bool(fast_variance))
    # Inside shard_map, scale and bias (replicated) must vary like x for the custom VJP; the
    # transpose of this cast sums their cotangents over the devices.
    scale, bias = _vary_like(x, scale), _vary_like(x, bias)
    y, count, mean, var = _train_core(x, scale, bias, m, cfg)
    new_state = _update(
        state,
        count,
        mean,
        var,
        momentum=momentum,
        unbiased_running_var=unbiased_running_var,
        nan_guard=nan_guard,
        debias=debias,
    )
    return y, new_state
