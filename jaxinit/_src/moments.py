"""Moments (count, mean, M2) of masked batches: compute, merge, and combine across devices.

A :class:`Moments` holds, per feature, the number of elements seen, their mean, and ``M2``, the
sum of squared deviations from that mean. Two of them merge exactly with Chan's parallel formula
(Chan, Golub and LeVeque, "Updating formulae and a pairwise algorithm for computing sample
variances", 1979), which is what gradient accumulation, ghost batch norm, precise batch norm and
cross-device statistics all need.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxinit._src.axes import canonical_axes

__all__ = [
    "Moments",
    "all_reduce_moments",
    "batch_moments",
    "merge_moments",
]

_F32 = jnp.float32


class Moments(NamedTuple):
    """Count, mean and M2 (sum of squared deviations from the mean) per feature.

    All three fields are float32 arrays of the feature shape. ``Moments`` with count 0, mean 0 and
    M2 0 is the identity of :func:`merge_moments`.

    Attributes:
        count: number of elements that went into each feature's statistics.
        mean: their mean.
        m2: the sum of their squared deviations from ``mean``.
    """

    count: jax.Array
    mean: jax.Array
    m2: jax.Array

    @property
    def var(self) -> jax.Array:
        """The biased (population) variance ``m2 / count``; NaN where ``count`` is 0."""
        return self.m2 / self.count

    @property
    def unbiased_var(self) -> jax.Array:
        """The unbiased (sample) variance ``m2 / (count - 1)``; inf or NaN where ``count <= 1``."""
        return self.m2 / (self.count - 1.0)

    @classmethod
    def zeros(cls, shape: int | Sequence[int]) -> Moments:
        """Empty moments (the identity of :func:`merge_moments`) of a feature shape.

        Args:
            shape: an int or a shape.

        Returns:
            ``Moments`` whose three fields are float32 zeros of ``shape``.

        Example:
            >>> import jaxinit as ji
            >>> ji.Moments.zeros(3).count
            Array([0., 0., 0.], dtype=float32)
        """
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        z = jnp.zeros(shape, _F32)
        return cls(z, z, z)


# --------------------------------------------------------------------------- validation helpers


def check_float_input(x: jax.Array, name: str = "x") -> None:
    """TypeError unless ``x`` has a real floating dtype."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{name} must have a real floating dtype (float16, bfloat16, float32, float64), "
            f"got {x.dtype}."
        )


def prepare_mask(mask: Any, shape: tuple[int, ...]) -> jax.Array | None:
    """The mask as a bool array of rank ``len(shape)`` that broadcasts to ``shape``, or None."""
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise TypeError(f"mask must be a boolean array, got dtype {mask.dtype}.")
    try:
        np.broadcast_shapes(mask.shape, shape)
        ok = mask.ndim <= len(shape) and np.broadcast_shapes(mask.shape, shape) == tuple(shape)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"mask of shape {mask.shape} does not broadcast to the input's shape {tuple(shape)}."
        )
    return mask.reshape((1,) * (len(shape) - mask.ndim) + mask.shape)


# --------------------------------------------------------------------------- core statistics


class ShiftedStats(NamedTuple):
    """Statistics with the mean split as ``shift + dmean`` (``shift`` exact, ``dmean`` small).

    Keeping the two parts apart lets ``x - mean`` be formed as ``(x - shift) - dmean``, which is
    exact to float32 rounding of a number of order one even when the mean is 1e4 standard
    deviations from zero. The fields keep the reduced axes (size 1), so they broadcast against
    ``x``. For uncentred statistics (RMS) ``shift`` and ``dmean`` are 0 and ``m2`` is the sum of
    squares.
    """

    count: jax.Array
    shift: jax.Array
    dmean: jax.Array
    m2: jax.Array

    def squeeze(self, axes: tuple[int, ...]) -> ShiftedStats:
        """The same statistics with the (size-1) reduced ``axes`` dropped."""
        return ShiftedStats(*(jnp.squeeze(v, axis=axes) for v in self))

    def to_moments(self) -> Moments:
        """As :class:`Moments` (count, mean, M2)."""
        return Moments(self.count, self.shift + self.dmean, self.m2)


def stat_dtype(dtype: Any) -> jnp.dtype:
    """The dtype statistics are computed in: float32, or float64 for float64 input."""
    dtype = jnp.dtype(dtype)
    return dtype if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize > 4 else jnp.dtype(_F32)


def masked_count(
    mask: jax.Array | None, shape: tuple[int, ...], axes: tuple[int, ...], dtype: Any = _F32
) -> jax.Array:
    """Count of kept elements over ``axes`` (``dtype``, ``shape`` with ``axes`` of size 1)."""
    stat_shape = tuple(1 if i in axes else s for i, s in enumerate(shape))
    if mask is None:
        return jnp.full(stat_shape, float(math.prod(shape[i] for i in axes)), dtype)
    # Sum over the mask's own extent; broadcast axes contribute their size as a factor.
    own = tuple(i for i in axes if mask.shape[i] != 1)
    factor = float(math.prod(shape[i] for i in axes if mask.shape[i] == 1))
    count = jnp.sum(mask, axis=own, dtype=dtype, keepdims=True) * factor
    return jnp.broadcast_to(count, stat_shape)


def pass_inputs(*arrays: Any) -> tuple[Any, ...]:
    """An identity that XLA cannot see through, applied at the start of every full-size pass.

    XLA:CPU does not fuse an expression (a broadcast of a per-feature vector, a dtype
    conversion of ``x``) into two consumers; it materializes it as a full-size temporary
    instead. Giving each pass its own copy of its (small or aliased) inputs keeps every pass a
    single fused read of ``x``.
    """
    return lax.optimization_barrier(arrays)


def _explicitly_sharded(x: jax.Array, axes: tuple[int, ...]) -> bool:
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
    return bool(spec) and any(i < len(spec) and spec[i] is not None for i in axes)


class Pool(NamedTuple):
    """Pools per-channel statistics over groups of consecutive channels (group norm).

    Statistics stay in ``x``'s layout (one value per channel, equal within a group), so every
    full-size pass broadcasts a plain per-channel vector: XLA:CPU runs a reduction over
    ``(N, H, W, G, C/G)`` with a broadcast along the minor ``C/G`` axis some ten times slower than
    the same work on ``(N, H, W, C)``.

    Attributes:
        axis: the channel axis, or None for no pooling.
        groups: the number of groups along it.
    """

    axis: int | None
    groups: int

    def _grouped(self, v: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
        a, c = self.axis, v.shape[self.axis]
        shape = (*v.shape[:a], self.groups, c // self.groups, *v.shape[a + 1 :])
        return v.reshape(shape), v.shape

    def sum(self, v: jax.Array) -> jax.Array:
        """The sum over each group, repeated for each of its channels."""
        if self.axis is None or v.shape[self.axis] == self.groups:
            return v
        g, shape = self._grouped(v)
        s = jnp.sum(g, axis=self.axis + 1, keepdims=True)
        return jnp.broadcast_to(s, g.shape).reshape(shape)

    def first(self, v: jax.Array) -> jax.Array:
        """Each group's first channel, repeated for each of its channels."""
        if self.axis is None or v.shape[self.axis] == self.groups:
            return v
        g, shape = self._grouped(v)
        head = lax.slice_in_dim(g, 0, 1, axis=self.axis + 1)
        return jnp.broadcast_to(head, g.shape).reshape(shape)


def staged_sum(v: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """``jnp.sum(v, axes, keepdims=True)``, the trailing reduced axes last when others are kept.

    Group norm reduces ``(H, W, C/G)`` of ``(N, H, W, G, C/G)``; XLA:CPU emits that as a slow
    strided loop, but summing over ``(H, W)`` first is a fast reduction over leading axes (the
    kept minor axes stay contiguous), and the rest runs on a small array.
    """
    trailing = []
    for i in range(v.ndim - 1, -1, -1):
        if i not in axes:
            break
        trailing.append(i)
    leading = tuple(i for i in axes if i not in trailing)
    if trailing and leading:
        v = jnp.sum(v, axis=leading, keepdims=True)
        axes = tuple(trailing)
    return jnp.sum(v, axis=axes, keepdims=True)


def _kept(v: jax.Array, mask: jax.Array | None) -> jax.Array:
    return v if mask is None else jnp.where(mask, v, 0.0)


def shifted_stats(
    x: jax.Array,
    axes: tuple[int, ...],
    mask: jax.Array | None = None,
    *,
    centered: bool = True,
    fast_variance: bool = False,
    pool: Pool | None = None,
) -> ShiftedStats:
    """Statistics of ``x`` over ``axes`` (kept as size-1 axes), in float32 or wider.

    Shifted sums ``s1 = sum(x - s)`` and ``s2 = sum((x - s)**2)``, with ``s`` the first element
    along the reduced axes (a sample of the data, so the summed values are of the order of the
    data's spread and nothing large cancels, even at mean 1e4 and std 1); ``dmean = s1 / n`` and
    ``m2 = s2 - s1 * dmean``. With a mask the shift is the plain masked mean (one more pass),
    since the first element may be padding.
    ``fast_variance=True`` is the textbook ``E[x^2] - E[x]^2`` (two independent sums, unstable
    away from zero mean; clamped at 0). ``centered=False`` gives the sum of squares (RMS).
    ``pool`` further pools the statistics over groups of one kept axis (group norm's channels).
    """
    dtype = stat_dtype(x.dtype)
    pool = pool or Pool(None, 1)
    count = pool.sum(masked_count(mask, x.shape, axes, dtype))
    safe_n = jnp.maximum(count, 1.0)

    def total(v: jax.Array, m: jax.Array | None) -> jax.Array:
        return pool.sum(staged_sum(_kept(v, m), axes))

    zeros = jnp.zeros(count.shape, dtype)
    if not centered:
        return ShiftedStats(count, zeros, zeros, total(jnp.square(x.astype(dtype)), mask))
    if fast_variance:
        s1 = total(x.astype(dtype), mask)
        x2, m2 = pass_inputs(x, mask)
        s2 = total(jnp.square(x2.astype(dtype)), m2)
        dmean = s1 / safe_n
        return ShiftedStats(count, zeros, dmean, jnp.maximum(s2 - s1 * dmean, 0.0))
    if mask is None and not _explicitly_sharded(x, axes):
        # The slice reads its own copy of x: sharing s1's conversion of a 16-bit x would give
        # that conversion two consumers, and XLA would write it out as a full-size float32 copy.
        first = tuple(slice(0, 1) if i in axes else slice(None) for i in range(x.ndim))
        (x0,) = pass_inputs(x)
        shift = pool.first(x0[first].astype(dtype))
    else:
        # Masked (the first element may be padding) or split over an Explicit mesh axis (no
        # cheap slice): the shift is the plain mean, one more pass.
        x0, m0 = pass_inputs(x, mask)
        shift = total(x0.astype(dtype), m0) / safe_n
    shift = lax.stop_gradient(shift)
    # Two independent shifted sums (each one fused read of x with a single broadcast); the
    # cancellation in s2 - s1 * dmean is of the order of ((mean - shift) / std)**2, small
    # because the shift is a sample of the data (or, with a mask, its mean).
    # Only the second pass goes through the barrier: two identical barriers would be merged by
    # CSE, and the shared `x - shift` would then be written out as a full-size temporary.
    s1 = total(x.astype(dtype) - shift, mask)
    x2, m2, shift2 = pass_inputs(x, mask, shift)
    s2 = total(jnp.square(x2.astype(dtype) - shift2), m2)
    dmean = s1 / safe_n
    return ShiftedStats(count, shift, dmean, jnp.maximum(s2 - s1 * dmean, 0.0))


def _combine_gathered(g: ShiftedStats) -> ShiftedStats:
    """Exact merge of shifted statistics stacked along axis 0 (one entry per device)."""
    n = jnp.sum(g.count, axis=0)
    # Shift by the best-populated device's shift (exact), then deviations from the global mean.
    best = jnp.argmax(g.count, axis=0)
    shift = jnp.take_along_axis(g.shift, best[None], axis=0)[0]
    rel = (g.shift - shift) + g.dmean
    dmean = jnp.sum(g.count * rel, axis=0) / jnp.maximum(n, 1.0)
    dev = rel - dmean
    m2 = jnp.sum(g.m2, axis=0) + jnp.sum(g.count * dev * dev, axis=0)
    return ShiftedStats(n, shift, dmean, m2)


def all_reduce_stats(
    s: ShiftedStats, axis_name: Hashable, axis_index_groups: Sequence[Sequence[int]] | None = None
) -> ShiftedStats:
    """Count-weighted, exact combination of per-device statistics with one all-gather."""
    stacked = jnp.stack([s.count.astype(s.m2.dtype), s.shift, s.dmean, s.m2])
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    aval = jax.typeof(stacked)
    vma = getattr(getattr(aval, "mat", None), "varying", None) or getattr(aval, "vma", ())
    if axis_index_groups is None and set(names) <= set(vma):
        # shard_map with vma checks: the result is the same on every device; say so.
        g = lax.all_gather(stacked, axis_name, to="invarying")
    else:
        g = lax.all_gather(stacked, axis_name, axis_index_groups=axis_index_groups)
    merged = _combine_gathered(ShiftedStats(g[:, 0], g[:, 1], g[:, 2], g[:, 3]))
    return merged._replace(count=merged.count.astype(s.count.dtype))


# --------------------------------------------------------------------------- public API


def batch_moments(
    x: jax.typing.ArrayLike,
    *,
    axis: int | Sequence[int] = -1,
    mask: jax.typing.ArrayLike | None = None,
) -> Moments:
    """The moments of ``x`` over all axes except the feature ``axis``, in float32.

    Args:
        x: a floating array.
        axis: the feature axis or axes (flax's meaning); statistics run over all the others.
        mask: optional boolean array broadcastable to ``x``; only the elements it keeps count.

    Returns:
        :class:`Moments` of the feature shape. A feature with no kept elements gets count 0,
        mean 0 and M2 0 (so it merges as the identity).

    Raises:
        TypeError: ``x`` is not floating, or ``mask`` is not boolean.
        ValueError: ``axis`` is out of range, or ``mask`` does not broadcast to ``x``.

    Example:
        >>> import jax.numpy as jnp, jaxinit as ji
        >>> m = ji.batch_moments(jnp.array([[1.0, 10.0], [3.0, 10.0], [5.0, 40.0]]))
        >>> print(m.count, m.mean, m.m2)
        [3. 3.] [ 3. 20.] [  8. 600.]
    """
    x = jnp.asarray(x)
    check_float_input(x)
    feat = canonical_axes(x.ndim, axis)
    reduce_axes = tuple(i for i in range(x.ndim) if i not in feat)
    m = prepare_mask(mask, x.shape)
    if m is None:
        # A two-pass form here: this is the reference building block, not the hot path.
        m = jnp.ones((1,) * x.ndim, bool)
    return shifted_stats(x, reduce_axes, m).squeeze(reduce_axes).to_moments()


def merge_moments(a: Moments, b: Moments) -> Moments:
    """Merge two :class:`Moments` exactly (Chan et al., 1979).

    ``merge_moments(batch_moments(x1), batch_moments(x2))`` equals the moments of the
    concatenation of ``x1`` and ``x2`` along a reduced axis, up to float32 rounding.

    Args:
        a: moments of one set of elements.
        b: moments of another, disjoint set (same feature shape, or broadcastable).

    Returns:
        The moments of their union. Empty inputs (count 0) are the identity.

    Example:
        >>> import jax.numpy as jnp, jaxinit as ji
        >>> x = jnp.arange(10.0).reshape(5, 2)
        >>> m = ji.merge_moments(ji.batch_moments(x[:2]), ji.batch_moments(x[2:]))
        >>> m.mean, m.var
        (Array([4., 5.], dtype=float32), Array([8., 8.], dtype=float32))
    """
    n = a.count + b.count
    delta = b.mean - a.mean
    wb = b.count / jnp.maximum(n, 1.0)
    mean = a.mean + delta * wb
    m2 = a.m2 + b.m2 + delta * delta * a.count * wb
    return Moments(n, mean, m2)


def all_reduce_moments(
    m: Moments,
    axis_name: Hashable,
    *,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    shift: jax.typing.ArrayLike | None = None,
) -> Moments:
    """Combine per-device :class:`Moments` over a named axis with one collective.

    Weighted by each device's count, so it is exact when devices hold different numbers of valid
    elements (averaging per-device means with equal weight is not).

    * ``shift=None`` (default): one ``all_gather`` of the per-device (count, mean, M2), then the
      exact merge on every device (two-pass over the device means; no cancellation). Payload:
      ``3 * num_features`` floats per device.
    * ``shift`` given (an array of the feature shape, identical on every device, e.g. the running
      mean): one ``psum`` of ``[count, count*(mean - shift), M2 + count*(mean - shift)**2]``.
      Its cancellation grows with ``((mean - shift) / std)**2``, so it is exact only if the shift
      is within a few standard deviations of the global mean.

    Args:
        m: this device's moments.
        axis_name: the named axis (``shard_map``, ``pmap``, ``vmap(axis_name=...)``).
        axis_index_groups: optional groups of indices along the axis, as in ``lax.psum``.
        shift: optional shared shift; see above.

    Returns:
        The moments of all devices' elements together, the same on every device.

    Example:
        >>> import jax, jax.numpy as jnp, jaxinit as ji
        >>> x = jnp.arange(12.0).reshape(3, 4, 1)  # 3 "devices", 4 rows each
        >>> f = lambda xi: ji.all_reduce_moments(ji.batch_moments(xi), "d")
        >>> m = jax.vmap(f, axis_name="d")(x)
        >>> m.mean[0], m.var[0]
        (Array([5.5], dtype=float32), Array([11.916667], dtype=float32))
    """
    if shift is None:
        stats = ShiftedStats(m.count, m.mean, jnp.zeros_like(m.mean), m.m2)
        return all_reduce_stats(stats, axis_name, axis_index_groups).to_moments()
    shift = jnp.asarray(shift, _F32)
    d = m.mean - shift
    stacked = jnp.stack(jnp.broadcast_arrays(m.count, m.count * d, m.m2 + m.count * d * d))
    n, s1, s2 = lax.psum(stacked, axis_name, axis_index_groups=axis_index_groups)
    dmean = s1 / jnp.maximum(n, 1.0)
    return Moments(n, shift + dmean, jnp.maximum(s2 - s1 * dmean, 0.0))
