"""The one statistics-and-normalize core under every jaxinit norm, with its analytic backward.

Every norm is "reduce some axes, normalize, apply a per-feature affine":

=============  ==========================================  ===============================
norm           statistics over (``reduce_axes``)           scale and bias along
=============  ==========================================  ===============================
batch norm     every axis but the features                 the features
layer norm     ``reduction_axes`` (the features, usually)  ``feature_axes``
RMS norm       as layer norm, uncentred                    ``feature_axes``
group norm     spatial axes and the channels of a group    the channels (as ``(G, C/G)``)
instance norm  every axis but batch and features           the features
=============  ==========================================  ===============================

:func:`normalize` does all of them: float32 (or wider) statistics that stay exact far from zero
mean (:func:`jaxinit._src.moments.shifted_stats`), count-weighted cross-device combination,
masks, and one custom VJP. The backward saves only ``x``, the parameters and the per-group
statistics (no full-size float32 temporaries), and reads ``x`` and ``dy`` in as few passes as the
axes allow: when the statistics' axes and the parameters' broadcast axes overlap (batch, group
and instance norm) the full-size work is two reductions over the shared axes and the input
gradient; otherwise (layer and RMS norm) it is one pass of row sums, one of column sums and the
input gradient.

The output is computed in float32 and cast to ``x``'s dtype once, after the scale and bias: one
rounding of the final value (casting the normalized value first and then scaling in the input
dtype, as some PyTorch RMSNorm ports do, rounds twice).
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxinit._src.moments import (
    Pool,
    ShiftedStats,
    all_reduce_stats,
    pass_inputs,
    shifted_stats,
    stat_dtype,
)

__all__ = ["Plan", "Stats", "check_epsilon", "check_param", "normalize", "plan"]


class Plan(NamedTuple):
    """What to normalize: hashable, so it is a static argument of the custom VJP.

    Attributes:
        reduce_axes: the axes the statistics run over.
        param_axes: the axes along which ``scale`` and ``bias`` vary (they have size 1 on all
            others).
        centered: subtract the mean (False: RMS norm).
        epsilon: added to the variance (or the mean square).
        axis_name: named axis to combine statistics over, or None.
        axis_index_groups: groups along ``axis_name``, as in ``lax.psum``.
        fast_variance: the unshifted ``E[x^2] - E[x]^2``.
        pool: pools the statistics over groups of channels (group norm).
    """

    reduce_axes: tuple[int, ...]
    param_axes: tuple[int, ...]
    centered: bool
    epsilon: float
    axis_name: Hashable | None
    axis_index_groups: tuple[tuple[int, ...], ...] | None
    fast_variance: bool
    pool: Pool

    @property
    def folds_scale(self) -> bool:
        """Whether ``scale`` is constant over the reduced axes (so ``rsqrt * scale`` is small)."""
        return not set(self.param_axes) & set(self.reduce_axes)


def plan(
    reduce_axes: tuple[int, ...],
    param_axes: tuple[int, ...],
    *,
    centered: bool,
    epsilon: float,
    axis_name: Hashable | None,
    axis_index_groups: Sequence[Sequence[int]] | None,
    fast_variance: bool,
    pool: Pool | None = None,
) -> Plan:
    """A :class:`Plan`, with ``axis_index_groups`` made hashable."""
    groups = None
    if axis_index_groups is not None:
        groups = tuple(tuple(int(i) for i in g) for g in axis_index_groups)
    return Plan(
        tuple(reduce_axes),
        tuple(param_axes),
        bool(centered),
        float(epsilon),
        axis_name,
        groups,
        bool(fast_variance) and bool(centered),
        pool or Pool(None, 1),
    )


class Stats(NamedTuple):
    """What :func:`normalize` returns beside ``y``, with the reduced axes dropped.

    Attributes:
        count: number of kept elements per group (float32).
        mean: the mean (0 for RMS norm).
        var: the biased variance (the mean square for RMS norm).
    """

    count: jax.Array
    mean: jax.Array
    var: jax.Array


# --------------------------------------------------------------------------- checks


def check_epsilon(epsilon: Any) -> None:
    """ValueError for a negative (or NaN) Python-number ``epsilon``."""
    if isinstance(epsilon, numbers.Real) and not epsilon >= 0:
        raise ValueError(f"epsilon must be non-negative, got {epsilon!r}.")


def check_param(p: Any, name: str, shape: tuple[int, ...], what: str) -> jax.Array:
    """``p`` as a floating array of ``shape``; a clear error otherwise.

    Args:
        p: the parameter.
        name: its argument name, for the message.
        shape: the expected shape.
        what: what the shape is, for the message (e.g. "x's sizes along the feature axes").

    Returns:
        ``jnp.asarray(p)``.

    Raises:
        TypeError: ``p`` is not floating.
        ValueError: ``p`` has another shape.
    """
    p = jnp.asarray(p)
    if not jnp.issubdtype(p.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype, got {p.dtype}.")
    if p.shape != tuple(shape):
        raise ValueError(f"{name} has shape {p.shape}; expected {tuple(shape)} ({what}).")
    return p


# --------------------------------------------------------------------------- helpers


def _varying(a: Any) -> frozenset:
    aval = jax.typeof(a)
    mat = getattr(aval, "mat", None)
    return frozenset(getattr(mat, "varying", None) or getattr(aval, "vma", None) or ())


def vary_like(x: jax.Array, p: jax.Array | None) -> jax.Array | None:
    """``p`` marked as varying over the manual axes ``x`` varies over (inside ``shard_map``).

    The custom VJP needs its inputs to agree; the transpose of this cast sums ``p``'s cotangent
    over the devices, which is the gradient of a replicated parameter.
    """
    if p is None:
        return None
    missing = _varying(x) - _varying(p)
    if not missing:
        return p
    return lax.pcast(p, tuple(sorted(missing, key=str)), to="varying")


def _same_sharding(g: jax.Array, like: jax.Array) -> jax.Array:
    """Gives a cotangent its primal's sharding type (they differ under Explicit mesh axes)."""
    want = getattr(jax.typeof(like), "sharding", None)
    have = getattr(jax.typeof(g), "sharding", None)
    if want is None or have is None or getattr(want, "spec", None) == getattr(have, "spec", None):
        return g
    return jax.sharding.reshard(g, want.spec)


def _sum(v: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    return jnp.sum(v, axis=axes, keepdims=True) if axes else v


def _as(v: jax.Array | None, dtype: Any) -> jax.Array | None:
    return None if v is None else v.astype(dtype)


# --------------------------------------------------------------------------- the core


def _statistics(x: jax.Array, mask: jax.Array | None, p: Plan) -> ShiftedStats:
    st = shifted_stats(
        x, p.reduce_axes, mask, centered=p.centered, fast_variance=p.fast_variance, pool=p.pool
    )
    if p.axis_name is not None:
        st = all_reduce_stats(st, p.axis_name, p.axis_index_groups)
    return st


def _centred(x: jax.Array, shift: jax.Array, dtype: Any) -> jax.Array:
    """``x - shift`` in the statistics' dtype (``x`` itself for uncentred statistics)."""
    return x.astype(dtype) - shift


def _forward(x, scale, bias, mask, p: Plan):
    dtype = stat_dtype(x.dtype)
    st = _statistics(x, mask, p)
    n = jnp.maximum(st.count, 1.0)
    var = st.m2 / n
    rstd = lax.rsqrt(var + jnp.asarray(p.epsilon, dtype))
    x_, shift, dmean, rstd_, scale_, bias_ = pass_inputs(
        x, st.shift, st.dmean, rstd, _as(scale, dtype), _as(bias, dtype)
    )
    xc = _centred(x_, shift, dtype) - dmean
    if scale_ is None:
        y = xc * rstd_
    elif p.folds_scale:
        y = xc * (rstd_ * scale_)
    else:
        y = (xc * rstd_) * scale_
    if bias_ is not None:
        y = y + bias_
    stats = Stats(st.count, st.shift + st.dmean, var)
    stats = Stats(*(jnp.squeeze(v, axis=p.reduce_axes) for v in stats))
    residuals = (x, scale, bias, mask, st.shift, st.dmean, rstd, n)
    return (y.astype(x.dtype), stats), residuals


def _shared_sums(x, dy, shift, axes, dtype):
    """``sum(dy)`` and ``sum(dy * (x - shift))`` over ``axes`` (two full-size reductions)."""
    (dy_a,) = pass_inputs(dy)
    sum_dy = _sum(dy_a.astype(dtype), axes)
    x_b, dy_b, shift_b = pass_inputs(x, dy, shift)
    sum_dyx = _sum(dy_b.astype(dtype) * _centred(x_b, shift_b, dtype), axes)
    return sum_dy, sum_dyx


def _backward(p: Plan, residuals, cotangents):
    x, scale, bias, mask, shift, dmean, rstd, n = residuals
    dy, (_, g_mean, g_var) = cotangents
    dtype = stat_dtype(x.dtype)
    ndim = x.ndim
    reduce_axes = p.reduce_axes
    other_axes = tuple(i for i in range(ndim) if i not in p.param_axes)
    shared = tuple(i for i in reduce_axes if i in other_axes)
    scale_f = _as(scale, dtype)
    g_mean = jnp.expand_dims(g_mean, reduce_axes).astype(dtype)
    g_var = jnp.expand_dims(g_var, reduce_axes).astype(dtype)

    if shared:
        # Batch, group and instance norm: reduce the full-size arrays over the shared axes once;
        # every other sum runs on the (small) result.
        sum_dy, sum_dyx = _shared_sums(x, dy, shift, shared, dtype)
        sum_dy_xhat = (sum_dyx - dmean * sum_dy) * rstd  # sum over `shared` of dy * xhat
        rest_r = tuple(i for i in reduce_axes if i not in shared)
        rest_o = tuple(i for i in other_axes if i not in shared)
        weighted_dy = sum_dy if scale_f is None else scale_f * sum_dy
        weighted_dy_xhat = sum_dy_xhat if scale_f is None else scale_f * sum_dy_xhat
        sums = [_sum(weighted_dy, rest_r), _sum(weighted_dy_xhat, rest_r)]
        d_bias = _sum(sum_dy, rest_o)
        d_scale = _sum(sum_dy_xhat, rest_o)
    else:
        # Layer and RMS norm: sums over the reduced axes and over the others, each reduction
        # with its own copy of its inputs (a 16-bit x or dy converted once for two reductions
        # would be written out as a full-size float32 temporary).
        def weighted(dy_: jax.Array, scale_: jax.Array | None) -> jax.Array:
            g = dy_.astype(dtype)
            return g if scale_ is None else g * scale_

        def xhat(x_, shift_, dmean_, rstd_):
            return (_centred(x_, shift_, dtype) - dmean_) * rstd_

        dy_a, scale_a = pass_inputs(dy, scale_f)
        sum_g = _sum(weighted(dy_a, scale_a), reduce_axes)
        x_b, dy_b, shift_b, dmean_b, rstd_b, scale_b = pass_inputs(
            x, dy, shift, dmean, rstd, scale_f
        )
        sum_g_xhat = _sum(
            weighted(dy_b, scale_b) * xhat(x_b, shift_b, dmean_b, rstd_b), reduce_axes
        )
        sums = [sum_g, sum_g_xhat]
        (dy_c,) = pass_inputs(dy)
        d_bias = _sum(dy_c.astype(dtype), other_axes)
        x_d, dy_d, shift_d, dmean_d, rstd_d = pass_inputs(x, dy, shift, dmean, rstd)
        d_scale = _sum(dy_d.astype(dtype) * xhat(x_d, shift_d, dmean_d, rstd_d), other_axes)
    sums = [p.pool.sum(v) for v in sums]
    if p.axis_name is not None:
        # Every output depends on the statistics of all devices: sum the statistics' cotangent
        # terms over them (the parameter sums stay local; `vary_like` sums those).
        sums = list(lax.psum(jnp.stack(sums), p.axis_name, axis_index_groups=p.axis_index_groups))
    sum_g, sum_g_xhat = sums

    # dx = rstd * scale * dy + [b + c * (x - mean)] on the kept elements, where the bracket is
    # the path through the mean and the variance (both only over the kept elements).
    c = (2.0 * g_var - rstd * rstd * sum_g_xhat) / n
    b = ((g_mean - rstd * sum_g) / n - c * dmean) if p.centered else -c * dmean
    folds = scale_f is None or p.folds_scale
    a = rstd if scale_f is None else (rstd * scale_f if folds else rstd)
    x_c, dy_c, shift_c, a_c, b_c, c_c, scale_c, mask_c = pass_inputs(
        x, dy, shift, a, b, c, None if folds else scale_f, mask
    )
    g_c = dy_c.astype(dtype) if scale_c is None else dy_c.astype(dtype) * scale_c
    through_stats = b_c + c_c * _centred(x_c, shift_c, dtype)
    if mask_c is not None:
        through_stats = jnp.where(mask_c, through_stats, 0.0)
    dx = (a_c * g_c + through_stats).astype(x.dtype)
    d_scale = None if scale is None else _same_sharding(d_scale.astype(scale.dtype), scale)
    d_bias = None if bias is None else _same_sharding(d_bias.astype(bias.dtype), bias)
    return _same_sharding(dx, x), d_scale, d_bias, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _core(x, scale, bias, mask, p: Plan):
    return _forward(x, scale, bias, mask, p)[0]


_core.defvjp(_forward, _backward)
# One compiled program per shape and plan when called eagerly (inside jit it is inlined), rather
# than one small program per operation.
_compiled_core = jax.jit(_core, static_argnums=4)


def normalize(
    x: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    mask: jax.Array | None,
    p: Plan,
) -> tuple[jax.Array, Stats]:
    """``(x - mean) * rsqrt(var + epsilon) * scale + bias`` with statistics over ``p.reduce_axes``.

    Args:
        x: a floating array (checked by the caller).
        scale: None, or an array of ``x``'s rank with size 1 off ``p.param_axes``.
        bias: likewise.
        mask: None, or a boolean array of ``x``'s rank that broadcasts to it.
        p: the :class:`Plan`.

    Returns:
        ``(y, stats)``: ``y`` of ``x``'s shape and dtype, and the :class:`Stats` of each group.
        Gradients flow through ``y`` and through ``stats.mean`` and ``stats.var``.
    """
    return _compiled_core(x, vary_like(x, scale), vary_like(x, bias), mask, p)
