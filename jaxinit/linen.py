"""Flax linen modules backed by jaxinit's pure functions.

``BatchNorm``, ``LayerNorm``, ``RMSNorm``, ``GroupNorm`` and ``InstanceNorm`` are drop-ins for
their ``flax.linen`` namesakes: the same fields, the same call signature and the same variables
(``params``: ``scale``, ``bias``; batch norm's ``batch_stats``: ``mean``, ``var``), so existing
checkpoints load unchanged. Underneath are :func:`jaxinit.batch_norm`, :func:`jaxinit.layer_norm`,
:func:`jaxinit.rms_norm`, :func:`jaxinit.group_norm` and :func:`jaxinit.instance_norm`: a stable
variance (``use_fast_variance`` defaults to False), an analytic backward pass, count-weighted
cross-device statistics and, for batch norm, a NaN guard on the running statistics. The modules
only fetch variables, call the function and store the new state.

Import it as a submodule: ``import jaxinit.linen as jil``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import meta
from flax.linen import initializers
from jax.sharding import PartitionSpec

from jaxinit._src import model_sharding
from jaxinit._src import reparam as _reparam
from jaxinit._src.axes import canonical_axes
from jaxinit._src.batch_norm import BatchNormState
from jaxinit._src.modules import (
    call_batch_norm,
    call_norm,
    check_float32_reductions,
    norm_param_shape,
    scale_init_of,
)
from jaxinit._src.modules import promote as _promote

__all__ = [
    "BatchNorm",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "RMSNorm",
    "SpectralNorm",
    "WeightNorm",
    "init_sharded",
]

Dtype = Any
Initializer = Any


def _out_dtype(x: jax.Array, params: Sequence[jax.Array | None], dtype: Dtype | None) -> Any:
    """Flax's output dtype: ``dtype`` if given, else the promotion of x and the params."""
    if dtype is not None:
        return jnp.dtype(dtype)
    out = x.dtype
    for p in params:
        if p is not None:
            out = _promote(out, p.dtype)
    return jnp.dtype(out)


class BatchNorm(nn.Module):
    """Batch normalization for linen, a drop-in for ``flax.linen.BatchNorm``.

    Same fields, call and variables as flax's module; the arithmetic is
    :func:`jaxinit.batch_norm`. Differences, all deliberate:

    * ``use_fast_variance`` defaults to False: the variance is computed stably (flax's default
      ``E[x^2] - E[x]^2`` loses the variance far from zero mean). Set True for flax's formula.
    * With ``axis_name`` and a ``mask``, devices are weighted by their number of valid elements
      (exact), where flax averages per-device means with equal weights.
    * A batch whose statistics are not finite leaves the running statistics unchanged
      (``nan_guard``).
    * Real floating input only: complex input raises a ``TypeError`` (flax accepts it).
    * In training mode without a mutable ``batch_stats`` collection it raises a ``ValueError``
      that names the fix, ``mutable=['batch_stats']``.

    As in flax, nothing is updated while the module is initialising (``init``), and ``axis_name``
    is ignored then. Statistics and running averages are float32 (or wider); the output dtype is
    ``dtype`` if given, else the promotion of the input and parameter dtypes (flax's rule).

    Attributes:
        use_running_average: normalise with the stored running statistics instead of the batch's.
        axis: the feature axis or axes.
        momentum: decay of the running averages (flax's convention; torch's ``m`` is ``1 - m``).
        epsilon: added to the variance.
        dtype: output dtype (default: promote input and params).
        param_dtype: dtype of ``scale`` and ``bias``.
        use_bias: learn a bias.
        use_scale: learn a scale.
        bias_init: bias initializer.
        scale_init: scale initializer.
        axis_name: named axis (``shard_map``/``pmap``) to combine statistics over.
        axis_index_groups: groups within ``axis_name``, as in ``lax.psum``.
        use_fast_variance: flax's unshifted ``E[x^2] - E[x]^2`` (parity only).
        force_float32_reductions: must be True (statistics are always at least float32).
        unbiased_running_var: store the n/(n-1) batch variance in ``var`` (torch's convention).
        nan_guard: keep the running statistics of features whose batch statistics are not finite.
        debias: zero-debiased running averages; adds ``batch_stats['count']``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import jaxinit.linen as jil
        >>> bn = jil.BatchNorm(momentum=0.9)
        >>> x = 5.0 + jax.random.normal(jax.random.key(0), (64, 3))
        >>> variables = bn.init(jax.random.key(1), x, use_running_average=False)
        >>> jax.tree.map(jnp.shape, variables)
        {'batch_stats': {'mean': (3,), 'var': (3,)}, 'params': {'bias': (3,), 'scale': (3,)}}
        >>> y, updates = bn.apply(variables, x, use_running_average=False, mutable=['batch_stats'])
        >>> print(jnp.round(updates['batch_stats']['mean'], 1))
        [0.5 0.5 0.5]
        >>> y_eval = bn.apply({**variables, **updates}, x, use_running_average=True)
    """

    use_running_average: bool | None = None
    axis: int | Sequence[int] = -1
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    axis_name: Hashable | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = False
    force_float32_reductions: bool = True
    unbiased_running_var: bool = False
    nan_guard: bool = True
    debias: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.typing.ArrayLike,
        use_running_average: bool | None = None,
        *,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """Normalise ``x`` with batch statistics (training) or the running ones.

        Args:
            x: the input, of floating dtype.
            use_running_average: overrides the field of the same name.
            mask: boolean array broadcastable to ``x``; statistics use only the kept elements.

        Returns:
            The normalised input, of ``x``'s shape.

        Raises:
            ValueError: in training mode (not during ``init``) when ``batch_stats`` is not
              mutable; for ``force_float32_reductions=False``; for bad input as
              :func:`jaxinit.batch_norm` does (axis, momentum, epsilon, mask, shapes).
            TypeError: for a non-floating ``x``.
        """
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        if not self.force_float32_reductions:
            raise ValueError(
                "force_float32_reductions=False is not supported: jaxinit.linen.BatchNorm always "
                "computes statistics in float32 or wider"
            )
        x = jnp.asarray(x)
        training = not bool(use_running_average)
        initializing = self.is_initializing()
        if training and not initializing and not self.is_mutable_collection("batch_stats"):
            raise ValueError(
                f"jaxinit.linen.BatchNorm at {self.scope.path_text or '/'!r} is in training mode "
                "(use_running_average=False) and updates its running statistics, but the "
                "'batch_stats' collection is not mutable. Call "
                "`y, updates = model.apply(variables, x, mutable=['batch_stats'])` and keep "
                "`updates['batch_stats']`, or pass use_running_average=True to evaluate."
            )
        feature_axes = canonical_axes(x.ndim, self.axis)
        feature_shape = tuple(x.shape[a] for a in feature_axes)

        ra_mean = self.variable(
            "batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), feature_shape
        )
        ra_var = self.variable(
            "batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), feature_shape
        )
        ra_count = (
            self.variable("batch_stats", "count", lambda: jnp.zeros((), jnp.int32))
            if self.debias
            else None
        )
        scale = (
            self.param("scale", self.scale_init, feature_shape, self.param_dtype)
            if self.use_scale
            else None
        )
        bias = (
            self.param("bias", self.bias_init, feature_shape, self.param_dtype)
            if self.use_bias
            else None
        )

        out_dtype = _out_dtype(x, (scale, bias), self.dtype)
        x_c = x.astype(_promote(x.dtype, out_dtype))
        stat_dtype = _promote(self.param_dtype, jnp.float32)
        state = BatchNormState(
            ra_mean.value,
            ra_var.value,
            ra_count.value if ra_count is not None else jnp.zeros((), jnp.int32),
        )
        y, new_state = call_batch_norm(
            self,
            x_c,
            state,
            scale,
            bias,
            stat_dtype=stat_dtype,
            training=training,
            feature_axes=feature_axes,
            mask=mask,
            axis_name=None if initializing else self.axis_name,
            axis_index_groups=None if initializing else self.axis_index_groups,
        )
        if training and not initializing:
            ra_mean.value = new_state.mean
            ra_var.value = new_state.var
            if ra_count is not None:
                ra_count.value = new_state.count
        return y.astype(out_dtype)


# --------------------------------------------------------------------------- the norm family


def _normalize(module: nn.Module, kind: str, x: Any, mask: Any, use_bias: bool) -> jax.Array:
    """Creates ``scale``/``bias`` as flax does and calls the pure function ``kind``."""
    check_float32_reductions(module)
    x = jnp.asarray(x)
    shape = norm_param_shape(kind, module, x)
    scale_init = scale_init_of(module, initializers.ones, initializers.zeros)
    scale = (
        module.param("scale", scale_init, shape, module.param_dtype) if module.use_scale else None
    )
    bias = module.param("bias", module.bias_init, shape, module.param_dtype) if use_bias else None
    out_dtype = _out_dtype(x, (scale, bias), module.dtype)
    y = call_norm(kind, module, x.astype(_promote(x.dtype, out_dtype)), scale, bias, mask)
    return y.astype(out_dtype)


class LayerNorm(nn.Module):
    """Layer normalization for linen, a drop-in for ``flax.linen.LayerNorm``.

    Same fields, call and variables as flax's module; the arithmetic is
    :func:`jaxinit.layer_norm`. ``use_fast_variance`` defaults to False (flax: True), so the
    variance stays exact far from zero mean; with ``use_fast_variance=False`` on the flax side
    the outputs match flax's. Devices are weighted by their kept-element counts under
    ``axis_name`` with a mask; complex input raises a ``TypeError`` (flax accepts it).

    Attributes:
        epsilon: added to the variance (the mean square for RMSNorm).
        dtype: output dtype (default: promote the input and the params, flax's rule).
        param_dtype: dtype of ``scale`` and ``bias``.
        use_bias: learn a bias.
        use_scale: learn a scale.
        bias_init: bias initializer.
        scale_init: scale initializer.
        axis_name: named axis (``shard_map``/``pmap``) to combine statistics over, weighted by
            each device's count of kept elements.
        axis_index_groups: groups within ``axis_name``, as in ``lax.psum``.
        use_fast_variance: flax's unshifted ``E[x^2] - E[x]^2`` (parity only; default False).
        force_float32_reductions: must be True (statistics are always at least float32).
        reduction_axes: the axes the statistics run over.
        feature_axes: the axes ``scale`` and ``bias`` vary along.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import jaxinit.linen as jil
        >>> x = jax.random.normal(jax.random.key(0), (2, 5))
        >>> v = jil.LayerNorm().init(jax.random.key(1), x)
        >>> jax.tree.map(jnp.shape, v)
        {'params': {'bias': (5,), 'scale': (5,)}}
    """

    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    reduction_axes: int | Sequence[int] = -1
    feature_axes: int | Sequence[int] = -1
    axis_name: Hashable | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = False
    force_float32_reductions: bool = True

    @nn.compact
    def __call__(self, x: jax.typing.ArrayLike, *, mask: jax.Array | None = None) -> jax.Array:
        """Normalise ``x`` over ``reduction_axes``.

        Args:
            x: the input, of floating dtype.
            mask: boolean array broadcastable to ``x``; statistics use only the kept elements.

        Returns:
            The normalised input, of ``x``'s shape.
        """
        return _normalize(self, "layer_norm", x, mask, self.use_bias)


class RMSNorm(nn.Module):
    """RMS normalization for linen, a drop-in for ``flax.linen.RMSNorm``.

    Same fields, call and variables (``params``: ``scale``) as flax's module; the arithmetic is
    :func:`jaxinit.rms_norm`. Extra: ``zero_centered_scale=True`` multiplies by ``1 + scale``
    (Gemma's convention), and then the default ``scale_init`` (ones) becomes zeros, so the layer
    starts as the plain normalization. ``use_fast_variance`` is accepted for compatibility and
    has no effect (there is no mean to subtract).

    Attributes:
        epsilon: added to the mean square.
        dtype: output dtype (default: promote the input and the params, flax's rule).
        param_dtype: dtype of ``scale``.
        use_scale: learn a scale.
        scale_init: scale initializer (zeros instead of the default ones when
            ``zero_centered_scale``).
        reduction_axes: the axes the mean square runs over.
        feature_axes: the axes ``scale`` varies along.
        axis_name: named axis to combine the mean square over, count-weighted.
        axis_index_groups: groups within ``axis_name``.
        use_fast_variance: no effect (flax's field, kept so configurations load).
        force_float32_reductions: must be True.
        zero_centered_scale: multiply by ``1 + scale``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import jaxinit.linen as jil
        >>> x = jax.random.normal(jax.random.key(0), (2, 5))
        >>> v = jil.RMSNorm(zero_centered_scale=True).init(jax.random.key(1), x)
        >>> print(v["params"]["scale"])
        [0. 0. 0. 0. 0.]
    """

    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_scale: bool = True
    scale_init: Initializer = initializers.ones
    reduction_axes: int | Sequence[int] = -1
    feature_axes: int | Sequence[int] = -1
    axis_name: Hashable | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = False
    force_float32_reductions: bool = True
    zero_centered_scale: bool = False

    @nn.compact
    def __call__(self, x: jax.typing.ArrayLike, *, mask: jax.Array | None = None) -> jax.Array:
        """Normalise ``x`` by its root mean square over ``reduction_axes``.

        Args:
            x: the input, of floating dtype.
            mask: boolean array broadcastable to ``x``; the mean square uses the kept elements.

        Returns:
            The normalised input, of ``x``'s shape.
        """
        return _normalize(self, "rms_norm", x, mask, False)


class GroupNorm(nn.Module):
    """Group normalization for linen, a drop-in for ``flax.linen.GroupNorm``.

    Same fields, call and variables as flax's module; the arithmetic is
    :func:`jaxinit.group_norm`. Extra: ``feature_axis`` (default -1; 1 for NCHW input, which
    flax cannot normalize). ``reduction_axes=None`` means every axis except the leading one.

    Attributes:
        num_groups: the number of groups (None when ``group_size`` is given).
        group_size: the channels per group; exactly one of the two is not None.
        epsilon: added to the variance (the mean square for RMSNorm).
        dtype: output dtype (default: promote the input and the params, flax's rule).
        param_dtype: dtype of ``scale`` and ``bias``.
        use_bias: learn a bias.
        use_scale: learn a scale.
        bias_init: bias initializer.
        scale_init: scale initializer.
        axis_name: named axis (``shard_map``/``pmap``) to combine statistics over, weighted by
            each device's count of kept elements.
        axis_index_groups: groups within ``axis_name``, as in ``lax.psum``.
        use_fast_variance: flax's unshifted ``E[x^2] - E[x]^2`` (parity only; default False).
        force_float32_reductions: must be True (statistics are always at least float32).
        reduction_axes: the axes the statistics run over; must include the feature axis.
        feature_axis: the channel axis.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import jaxinit.linen as jil
        >>> x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
        >>> v = jil.GroupNorm(num_groups=4).init(jax.random.key(1), x)
        >>> jax.tree.map(jnp.shape, v)
        {'params': {'bias': (8,), 'scale': (8,)}}
    """

    num_groups: int | None = 32
    group_size: int | None = None
    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    reduction_axes: int | Sequence[int] | None = None
    axis_name: Hashable | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = False
    force_float32_reductions: bool = True
    feature_axis: int = -1

    @nn.compact
    def __call__(self, x: jax.typing.ArrayLike, *, mask: jax.Array | None = None) -> jax.Array:
        """Normalise ``x`` per example over groups of channels.

        Args:
            x: the input, of floating dtype, channels along ``feature_axis``.
            mask: boolean array broadcastable to ``x``; statistics use only the kept elements.

        Returns:
            The normalised input, of ``x``'s shape.
        """
        return _normalize(self, "group_norm", x, mask, self.use_bias)


class InstanceNorm(nn.Module):
    """Instance normalization for linen, a drop-in for ``flax.linen.InstanceNorm``.

    Same fields, call and variables as flax's module; the arithmetic is
    :func:`jaxinit.instance_norm` (statistics over every axis but the leading one and
    ``feature_axes``).

    Attributes:
        epsilon: added to the variance (the mean square for RMSNorm).
        dtype: output dtype (default: promote the input and the params, flax's rule).
        param_dtype: dtype of ``scale`` and ``bias``.
        use_bias: learn a bias.
        use_scale: learn a scale.
        bias_init: bias initializer.
        scale_init: scale initializer.
        axis_name: named axis (``shard_map``/``pmap``) to combine statistics over, weighted by
            each device's count of kept elements.
        axis_index_groups: groups within ``axis_name``, as in ``lax.psum``.
        use_fast_variance: flax's unshifted ``E[x^2] - E[x]^2`` (parity only; default False).
        force_float32_reductions: must be True (statistics are always at least float32).
        feature_axes: the channel axes (not the leading, batch, axis).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import jaxinit.linen as jil
        >>> x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
        >>> v = jil.InstanceNorm().init(jax.random.key(1), x)
        >>> jax.tree.map(jnp.shape, v)
        {'params': {'bias': (3,), 'scale': (3,)}}
    """

    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    feature_axes: int | Sequence[int] = -1
    axis_name: Hashable | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = False
    force_float32_reductions: bool = True

    @nn.compact
    def __call__(self, x: jax.typing.ArrayLike, *, mask: jax.Array | None = None) -> jax.Array:
        """Normalise ``x`` per example and per channel.

        Args:
            x: the input, of floating dtype, batch first.
            mask: boolean array broadcastable to ``x``; statistics use only the kept elements.

        Returns:
            The normalised input, of ``x``'s shape.
        """
        return _normalize(self, "instance_norm", x, mask, self.use_bias)


# --------------------------------------------------------------------------- reparametrizations


def _key_path(layer: nn.Module, path: Any) -> str:
    """Flax's variable name for a wrapped parameter: ``{layer name}/{key path}``."""
    return f"{layer.name}/" + jax.tree_util.keystr(path[1:], simple=True, separator="/")


def _wrapped_call(module: nn.Module, transform: Any, args: Any, kwargs: Any) -> Any:
    """Calls ``module.layer_instance`` with its parameters seen through ``transform``.

    The wrapped layer's stored parameters stay the raw ones: at ``init`` the layer first runs
    as it is, creating them untransformed (flax's ``map_variables(init=True)`` stores the
    transformed kernel instead), and the transformed view exists only inside the call.
    """
    if module.is_initializing():
        module.layer_instance(*args, **kwargs)
    return nn.map_variables(
        lambda layer: layer(*args, **kwargs),
        # Only the parameters are seen through `transform`; other collections (a wrapped batch
        # norm's statistics) keep the caller's mutability.
        mapped_collections="params",
        trans_in_fn=lambda vs: jax.tree_util.tree_map_with_path(transform, vs),
        init=False,
    )(module.layer_instance)


class WeightNorm(nn.Module):
    """Weight normalization of a wrapped layer, a drop-in for ``flax.linen.WeightNorm``.

    Same fields, call and variables as flax's module (each normalized parameter's scale is the
    param ``{layer}/{path}/scale`` of this module); the arithmetic is :func:`jaxinit.weight_norm`.
    Deliberate differences (google/flax#4138 and the ``map_variables(init=True)`` behaviour):

    * The scale starts at the wrapped weight's norm (:func:`jaxinit.weight_norm_scale`, torch's
      and equinox's choice), so a wrapped layer's output at init equals the unwrapped layer's
      with the same key. ``scale_init=nn.initializers.ones`` gives flax's start.
    * The wrapped layer's stored parameters are the raw ones, at init and after: the normalized
      weight exists only inside the call.

    Attributes:
        layer_instance: the wrapped module (e.g. ``nn.Dense(8)``).
        epsilon: added to the sum of squares.
        dtype: output dtype of the normalized parameters (default: promote them).
        param_dtype: dtype of the scales.
        use_scale: learn a scale per feature.
        scale_init: the scales' initializer; None (default) means the wrapped weight's norm.
        feature_axes: the feature axes of each parameter (None: one norm for the whole array).
        variable_filter: normalize only parameters whose ``/``-joined path contains one of these.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn
        >>> import jaxinit.linen as jil
        >>> x = jnp.ones((2, 3))
        >>> wn = jil.WeightNorm(nn.Dense(4))
        >>> v = wn.init(jax.random.key(0), x)
        >>> raw = {"params": v["params"]["layer_instance"]}  # the Dense's own, raw, parameters
        >>> bool(jnp.allclose(wn.apply(v, x), nn.Dense(4).apply(raw, x), atol=1e-6))
        True
    """

    layer_instance: nn.Module
    epsilon: float = 1e-12
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_scale: bool = True
    scale_init: Initializer | None = None
    feature_axes: int | Sequence[int] | None = -1
    variable_filter: Any = dataclasses.field(default_factory=lambda: {"kernel"})

    @nn.compact
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Calls the wrapped layer with its filtered parameters weight-normalized.

        Args:
            *args: positional arguments of the wrapped layer's call.
            **kwargs: keyword arguments of the wrapped layer's call.

        Returns:
            The wrapped layer's output.
        """
        return _wrapped_call(self, self._normalize, args, kwargs)

    def _normalize(self, path: Any, value: Any) -> Any:
        value = jnp.asarray(value)
        name = _key_path(self.layer_instance, path)
        if self.variable_filter and not any(f in name for f in self.variable_filter):
            return value
        feature_axes = (
            () if self.feature_axes is None else canonical_axes(value.ndim, self.feature_axes)
        )
        shape = tuple(value.shape[a] for a in feature_axes)
        scale = None
        if self.use_scale:
            init = self.scale_init
            if init is None:

                def init(key: Any, shape: Any, dtype: Any, value: Any = value) -> jax.Array:
                    del key, shape
                    return _reparam.weight_norm_scale(value, feature_axes=feature_axes).astype(
                        dtype
                    )

            scale = self.param(name + "/scale", init, shape, self.param_dtype)
        w = _reparam.weight_norm(value, scale, feature_axes=feature_axes, epsilon=self.epsilon)
        out = self.dtype or _promote(value.dtype, *(() if scale is None else (scale.dtype,)))
        return w.astype(out)


class SpectralNorm(nn.Module):
    """Spectral normalization of a wrapped layer, a drop-in for ``flax.linen.SpectralNorm``.

    Same fields, call (``update_stats=``) and variables as flax's module: each normalized
    parameter's ``u`` and ``sigma`` live in the ``collection_name`` collection (``batch_stats``)
    as ``{layer}/{path}/u`` of shape ``(1, features)`` and ``{layer}/{path}/sigma``. The
    arithmetic is :func:`jaxinit.spectral_norm`. Deliberate differences:

    * At init, ``u`` is a random unit vector refined by ``n_warmup`` power iterations (torch's
      registration; flax starts from an unnormalized random ``u``).
    * ``update_stats=False`` (eval) runs no iteration: sigma comes from the stored ``u``
      (deterministic, as torch's eval). ``iterate_at_eval=True`` restores flax's behaviour
      (``n_steps`` iterations that are not stored).
    * The wrapped layer's stored parameters are the raw ones, at init and after.

    Parameters of rank <= 1 (biases) are left as they are, as in flax; higher-rank ones are
    viewed as ``(-1, last axis)`` matrices (or refused with ``error_on_non_matrix``).

    Attributes:
        layer_instance: the wrapped module.
        n_steps: power iterations per training call.
        epsilon: added under the square roots of the vector normalizations.
        dtype: output dtype of the normalized parameters (default: promote them).
        param_dtype: dtype of ``u`` and ``sigma``.
        error_on_non_matrix: raise for parameters of rank > 2 instead of flattening them.
        collection_name: the collection of ``u`` and ``sigma``.
        n_warmup: power iterations at init.
        iterate_at_eval: flax's eval (iterate without storing) instead of torch's.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn
        >>> import jaxinit.linen as jil
        >>> sn = jil.SpectralNorm(nn.Dense(4))
        >>> x = jnp.ones((2, 3))
        >>> v = sn.init(jax.random.key(0), x, update_stats=False)
        >>> sorted(v["batch_stats"])
        ['layer_instance/kernel/sigma', 'layer_instance/kernel/u']
        >>> y, upd = sn.apply(v, x, update_stats=True, mutable=["batch_stats"])
    """

    layer_instance: nn.Module
    n_steps: int = 1
    epsilon: float = 1e-12
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    error_on_non_matrix: bool = False
    collection_name: str = "batch_stats"
    n_warmup: int = 15
    iterate_at_eval: bool = False

    @nn.compact
    def __call__(self, *args: Any, update_stats: bool, **kwargs: Any) -> Any:
        """Calls the wrapped layer with its parameters divided by their largest singular value.

        Args:
            *args: positional arguments of the wrapped layer's call.
            update_stats: run ``n_steps`` power iterations and store ``u`` and ``sigma``
                (training), or use the stored ``u`` (eval).
            **kwargs: keyword arguments of the wrapped layer's call.

        Returns:
            The wrapped layer's output.
        """
        return _wrapped_call(
            self, functools.partial(self._normalize, update_stats=update_stats), args, kwargs
        )

    def _normalize(self, path: Any, value: Any, *, update_stats: bool) -> Any:
        value = jnp.asarray(value)
        if value.ndim <= 1 or self.n_steps < 1:
            return value
        if value.ndim > 2 and self.error_on_non_matrix:
            raise ValueError(f"Input is {value.ndim}D but error_on_non_matrix is True")
        name = _key_path(self.layer_instance, path)

        def fresh_state() -> _reparam.SpectralNormState:
            key = self.make_rng("params")
            return _reparam.spectral_norm_state(key, value, n_warmup=self.n_warmup)

        initial = (
            fresh_state() if not self.has_variable(self.collection_name, name + "/u") else None
        )
        u_var = self.variable(
            self.collection_name, name + "/u", lambda: initial.u.astype(self.param_dtype)
        )
        sigma_var = self.variable(
            self.collection_name, name + "/sigma", lambda: initial.sigma.astype(self.param_dtype)
        )
        state = _reparam.SpectralNormState(u_var.value, sigma_var.value)
        training = bool(update_stats) or self.iterate_at_eval
        w, new = _reparam.spectral_norm(
            value, state, training=training, n_steps=self.n_steps, epsilon=self.epsilon
        )
        if update_stats and not self.is_initializing():
            u_var.value = new.u
            sigma_var.value = new.sigma
        out = self.dtype or _promote(value.dtype, u_var.value.dtype)
        return w.astype(out)


# --------------------------------------------------------------------------- sharded init


@contextlib.contextmanager
def logical_context(mesh: jax.sharding.Mesh, rules: tuple[tuple[str, Any], ...]) -> Iterator[None]:
    """``mesh`` set and ``rules`` in force, as sharded initialization traces the model."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def init_sharded(
    module: nn.Module,
    rngs: Any,
    *args: Any,
    mesh: jax.sharding.Mesh,
    rules: model_sharding.LogicalRules | None = None,
    **kwargs: Any,
) -> Any:
    """Runs ``module.init(rngs, *args, **kwargs)`` with every variable created on its sharding.

    Each variable's sharding comes from its annotation: ``nn.with_partitioning`` names mesh axes;
    ``nn.with_logical_partitioning`` names logical axes that ``rules`` (or the box's own rules, or
    an enclosing ``nn.logical_axis_rules``) map to mesh axes; unannotated variables are
    replicated. The shapes are found with ``jax.eval_shape`` (no memory), then ``module.init``
    runs under ``jax.jit`` with those shardings as ``out_shardings``, so no device holds more
    than its shards of a partitionable initializer. The values equal an unsharded
    ``module.init`` with the same rngs.

    Args:
        module: a ``flax.linen.Module``.
        rngs: a PRNG key or a dict of keys, as for ``module.init``.
        *args: example inputs, as for ``module.init`` (init runs for real, so arrays, not
            ``jax.ShapeDtypeStruct``).
        mesh: the device mesh.
        rules: ``(logical_name, mesh_axes)`` pairs for logically partitioned variables.
        **kwargs: keyword arguments of ``module.init`` (e.g. ``train=False``, ``method=...``).

    Returns:
        The variables, as ``module.init`` returns them (annotated leaves stay boxed in
        ``nn.Partitioned``; ``flax.linen.meta.unbox`` strips the boxes), laid out on ``mesh``.

    Raises:
        TypeError: ``mesh`` is not a ``jax.sharding.Mesh`` or ``rules`` is not a sequence of pairs.
        ValueError: an annotation names an axis that is not on the mesh (after the rules).

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxinit as ji
        >>> import jaxinit.linen as jil
        >>> mesh = jax.make_mesh((2, 4), ("data", "model"))
        >>> dense = nn.Dense(64, kernel_init=nn.with_partitioning(ji.he_normal(), (None, "model")))
        >>> v = jil.init_sharded(dense, jax.random.key(0), jnp.ones((1, 16)), mesh=mesh)
        >>> v["params"]["kernel"].value.sharding.spec == jax.P(None, "model")
        True
    """
    who = "init_sharded"
    model_sharding.check_mesh(mesh, who)
    rules_t = model_sharding.check_rules(rules, who)
    init = functools.partial(module.init, **kwargs)

    def leaf_spec(path: Any, x: Any) -> PartitionSpec:
        if isinstance(x, nn.LogicallyPartitioned):
            box_rules = x.rules if x.rules is not None else ()
            composite = tuple(rules_t) + tuple(box_rules) or nn.get_logical_axis_rules()
            spec = nn.logical_to_mesh_axes(x.names, composite)
        elif isinstance(x, meta.Partitioned):
            spec = x.get_partition_spec()
        else:
            spec = PartitionSpec()
        model_sharding.check_spec(spec, mesh, jax.tree_util.keystr(path), who)
        return spec

    with logical_context(model_sharding.auto_mesh(mesh), rules_t):
        abstract = jax.eval_shape(init, rngs, *args)
        specs = jax.tree_util.tree_map_with_path(
            leaf_spec, abstract, is_leaf=lambda x: isinstance(x, meta.AxisMetadata)
        )
        return model_sharding.run_sharded(init, specs, mesh, rngs, *args)
