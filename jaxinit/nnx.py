"""Flax nnx modules backed by jaxinit's pure functions.

``BatchNorm``, ``LayerNorm``, ``RMSNorm``, ``GroupNorm`` and ``InstanceNorm`` are drop-ins for
their ``flax.nnx`` namesakes: the same constructor, call and variables (``nnx.Param`` ``scale``
and ``bias``; batch norm's ``nnx.BatchStat`` ``mean`` and ``var``, with ``.train()`` /
``.eval()`` switching), drawn from the same ``rngs`` streams. Underneath are jaxinit's pure
functions: a stable variance (``use_fast_variance`` defaults to False), an analytic backward
pass, count-weighted cross-device statistics and, for batch norm, a NaN guard on the running
statistics. The modules only hold variables, call the function and store the new state.

Import it as a submodule: ``import jaxinit.nnx as jnnx``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn import dtypes, initializers
from jax.sharding import PartitionSpec

from jaxinit._src import model_sharding
from jaxinit._src import reparam as _reparam
from jaxinit._src.axes import canonical_axes
from jaxinit._src.batch_norm import BatchNormState
from jaxinit._src.folding import fold_batch_norm as _fold
from jaxinit._src.modules import (
    call_batch_norm,
    call_norm,
    norm_param_shape,
    scale_init_of,
)
from jaxinit._src.modules import promote as _promote
from jaxinit._src.normalization import check_groups
from jaxinit.linen import logical_context

__all__ = [
    "BatchNorm",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "RMSNorm",
    "SpectralNorm",
    "WeightNorm",
    "create_sharded",
    "fold_batch_norm",
]

Dtype = Any
Initializer = Any
_ZEROS = initializers.zeros_init()
_KERNELS = nnx.PathContains("kernel")
_ONES = initializers.ones_init()


_NO_MODE = (
    "No `use_running_average` was given to jaxinit.nnx.BatchNorm. Pass it to the constructor "
    "or the call, or switch the model with `model.train()` / `model.eval()`."
)


class BatchNorm(nnx.Module):
    """Batch normalization for nnx, a drop-in for ``flax.nnx.BatchNorm``.

    Same constructor, call and variables as flax's module; the arithmetic is
    :func:`jaxinit.batch_norm`. ``model.train()`` sets ``use_running_average=False`` (normalise
    with the batch statistics and update ``mean``/``var``), ``model.eval()`` sets it True
    (normalise with the running statistics); ``nnx.view(model, use_running_average=...)`` works
    too. Differences from flax, all deliberate: ``use_fast_variance`` defaults to False (a stable
    variance); devices are weighted by their valid-element counts under ``axis_name`` with a
    mask; non-finite batch statistics leave the running statistics unchanged (``nan_guard``).
    Dtypes follow flax's ``promote_dtype`` rule: the input, the float32 statistics and the
    parameters are cast to ``dtype`` when given (so ``dtype=jnp.bfloat16`` rounds the input to
    bfloat16 first, as flax does), else to their promotion (bfloat16 input gives float32
    output). Statistics are always computed in float32 or wider.

    Args:
        num_features: the number of features (size of the feature axis).
        use_running_average: normalise with the running statistics (eval) instead of the batch's.
        axis: the feature axis.
        momentum: decay of the running averages (flax's convention; torch's ``m`` is ``1 - m``).
        epsilon: added to the variance.
        dtype: output dtype (default: promote input, statistics and params).
        param_dtype: dtype of ``scale`` and ``bias``.
        use_bias: learn a bias.
        use_scale: learn a scale.
        bias_init: bias initializer.
        scale_init: scale initializer.
        axis_name: named axis (``shard_map``/``pmap``) to combine statistics over.
        axis_index_groups: groups within ``axis_name``, as in ``lax.psum``.
        use_fast_variance: flax's unshifted ``E[x^2] - E[x]^2`` (parity only).
        promote_dtype: flax's hook that casts ``(x, mean, var, scale, bias)`` to a common dtype
          (``dtype`` when given) before normalising.
        unbiased_running_var: store the n/(n-1) batch variance in ``var`` (torch's convention).
        nan_guard: keep the running statistics of features whose batch statistics are not finite.
        debias: zero-debiased running averages; adds an ``nnx.BatchStat`` ``count``.
        rngs: the ``nnx.Rngs`` for the parameter initializers.
        bias_metadata: metadata for the bias ``nnx.Param``.
        scale_metadata: metadata for the scale ``nnx.Param``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> import jaxinit.nnx as jnnx
        >>> bn = jnnx.BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0))
        >>> x = 5.0 + jax.random.normal(jax.random.key(0), (64, 3))
        >>> y = bn(x)  # training mode by default: updates the running statistics
        >>> print(jnp.round(bn.mean[...], 1))
        [0.5 0.5 0.5]
        >>> bn.eval()
        >>> y_eval = bn(x)  # normalised with the running statistics
        >>> print(jnp.round(bn.mean[...], 1))
        [0.5 0.5 0.5]
    """

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool | None = False,
        axis: int = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-5,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = _ZEROS,
        scale_init: Initializer = _ONES,
        axis_name: Hashable | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = False,
        promote_dtype: Callable[..., Any] = dtypes.promote_dtype,
        unbiased_running_var: bool = False,
        nan_guard: bool = True,
        debias: bool = False,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        scale_metadata: Mapping[str, Any] = MappingProxyType({}),
    ):
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 0:
            raise ValueError(f"num_features must be a non-negative int, got {num_features!r}")
        feature_shape = (num_features,)
        self.mean = nnx.BatchStat(jnp.zeros(feature_shape, jnp.float32))
        self.var = nnx.BatchStat(jnp.ones(feature_shape, jnp.float32))
        self.count = nnx.BatchStat(jnp.zeros((), jnp.int32)) if debias else nnx.data(None)
        self.scale: nnx.Param[jax.Array] | None
        if use_scale:
            self.scale = nnx.Param(
                scale_init(rngs.params(), feature_shape, param_dtype), **scale_metadata
            )
        else:
            self.scale = nnx.data(None)
        self.bias: nnx.Param[jax.Array] | None
        if use_bias:
            self.bias = nnx.Param(
                bias_init(rngs.params(), feature_shape, param_dtype), **bias_metadata
            )
        else:
            self.bias = nnx.data(None)
        self.num_features = num_features
        self.use_running_average = use_running_average
        self.axis = axis
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype
        self.unbiased_running_var = unbiased_running_var
        self.nan_guard = nan_guard
        self.debias = debias

    def __call__(
        self,
        x: jax.typing.ArrayLike,
        use_running_average: bool | None = None,
        *,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """Normalise ``x`` with batch statistics (training) or the running ones (eval).

        Args:
            x: the input, of floating dtype, with ``num_features`` along ``axis``.
            use_running_average: overrides the attribute of the same name for this call.
            mask: boolean array broadcastable to ``x``; statistics use only the kept elements.

        Returns:
            The normalised input, of ``x``'s shape.

        Raises:
            ValueError: when neither the call nor the module sets ``use_running_average``; for bad
              input as :func:`jaxinit.batch_norm` does (axis, momentum, epsilon, mask, shapes).
            TypeError: for a non-floating ``x``.
        """
        if use_running_average is None:
            use_running_average = self.use_running_average
        if use_running_average is None:
            raise ValueError(_NO_MODE)
        training = not bool(use_running_average)
        x = jnp.asarray(x)
        feature_axes = canonical_axes(x.ndim, self.axis)
        scale = self.scale[...] if self.scale is not None else None
        bias = self.bias[...] if self.bias is not None else None
        # flax's dtype rule: x, the statistics and the parameters go through promote_dtype.
        with jax.numpy_dtype_promotion("standard"):
            x_p, mean_p, var_p, scale, bias = self.promote_dtype(
                (x, self.mean[...], self.var[...], scale, bias), dtype=self.dtype
            )
        out_dtype = jnp.dtype(self.dtype) if self.dtype is not None else x_p.dtype
        stat_dtype = _promote(x_p.dtype, jnp.float32)
        count = self.count[...] if self.count is not None else jnp.zeros((), jnp.int32)
        if training:  # the update starts from the stored statistics
            state = BatchNormState(self.mean[...], self.var[...], count)
        else:
            state = BatchNormState(mean_p.astype(stat_dtype), var_p.astype(stat_dtype), count)
        y, new_state = call_batch_norm(
            self,
            x_p,
            state,
            scale,
            bias,
            stat_dtype=stat_dtype,
            training=training,
            feature_axes=feature_axes,
            mask=mask,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
        )
        if training:
            new_state = jax.lax.stop_gradient(new_state)
            self.mean[...] = new_state.mean
            self.var[...] = new_state.var
            if self.count is not None:
                self.count[...] = new_state.count
        return y.astype(out_dtype)

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Used by ``nnx.view``: set ``use_running_average`` when given.

        Args:
            use_running_average: True for eval mode (running statistics), False for training.
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average


# --------------------------------------------------------------------------- the norm family


class _Norm(nnx.Module):
    """What the four nnx norms share: parameter creation and the call."""

    _kind = ""

    def _init_params(
        self,
        num_features: int,
        *,
        use_scale: bool,
        use_bias: bool,
        scale_init: Initializer,
        bias_init: Initializer,
        param_dtype: Dtype,
        rngs: nnx.Rngs,
        scale_metadata: Mapping[str, Any],
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
    ) -> None:
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 0:
            raise ValueError(f"num_features must be a non-negative int, got {num_features!r}")
        shape = (num_features,)
        # flax's order: the scale's key first, then the bias's.
        self.scale: nnx.Param[jax.Array] | None
        if use_scale:
            self.scale = nnx.Param(scale_init(rngs.params(), shape, param_dtype), **scale_metadata)
        else:
            self.scale = nnx.data(None)
        self.bias: nnx.Param[jax.Array] | None
        if use_bias:
            self.bias = nnx.Param(bias_init(rngs.params(), shape, param_dtype), **bias_metadata)
        else:
            self.bias = nnx.data(None)
        self.num_features = num_features

    def _normalize(self, x: Any, mask: Any) -> jax.Array:
        scale = self.scale[...] if self.scale is not None else None
        bias = self.bias[...] if self.bias is not None else None
        with jax.numpy_dtype_promotion("standard"):
            x, scale, bias = self.promote_dtype((jnp.asarray(x), scale, bias), dtype=self.dtype)
        shape = norm_param_shape(self._kind, self, x)
        if int(np.prod(shape)) != self.num_features:
            raise ValueError(
                f"x of shape {x.shape} has sizes {shape} along the feature axes, but the module "
                f"was built with num_features={self.num_features}."
            )
        scale = None if scale is None else scale.reshape(shape)
        bias = None if bias is None else bias.reshape(shape)
        # GroupNorm stores both group settings (as flax does); the group count decides.
        groups = (self.num_groups, None) if self._kind == "group_norm" else None
        y = call_norm(self._kind, self, x, scale, bias, mask, groups=groups)
        return y.astype(self.dtype) if self.dtype is not None else y


def _keep(module: nnx.Module, **fields: Any) -> None:
    for name, value in fields.items():
        setattr(module, name, value)


class LayerNorm(_Norm):
    """Layer normalization for nnx, a drop-in for ``flax.nnx.LayerNorm``.

    Same constructor, call and variables as flax's module (parameters of shape
    ``(num_features,)``, drawn from ``rngs.params()`` scale first); the arithmetic is
    :func:`jaxinit.layer_norm`. ``use_fast_variance`` defaults to False (flax: True). Dtypes
    follow flax's ``promote_dtype`` rule (``dtype`` when given, else the promotion of the input
    and the parameters).

    Args:
        num_features: the number of features (the product of x's sizes along ``feature_axes``).
        epsilon: added to the variance.
        dtype: output dtype (default: promote input and params).
        param_dtype: dtype of ``scale`` and ``bias``.
        use_bias: learn a bias.
        use_scale: learn a scale.
        bias_init: bias initializer.
        scale_init: scale initializer.
        reduction_axes: the axes the statistics run over.
        feature_axes: the axes ``scale`` and ``bias`` vary along.
        axis_name: named axis to combine statistics over, count-weighted.
        axis_index_groups: groups within ``axis_name``, as in ``lax.psum``.
        use_fast_variance: flax's unshifted ``E[x^2] - E[x]^2`` (parity only).
        promote_dtype: flax's hook casting ``(x, scale, bias)`` to a common dtype.
        rngs: the ``nnx.Rngs`` for the parameter initializers.
        bias_metadata: metadata for the bias ``nnx.Param``.
        scale_metadata: metadata for the scale ``nnx.Param``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> import jaxinit.nnx as jnnx
        >>> ln = jnnx.LayerNorm(4, rngs=nnx.Rngs(0))
        >>> y = ln(jnp.array([[1e4, 1e4 + 1, 1e4 + 2, 1e4 + 3]]))
        >>> print(jnp.round(y, 2))
        [[-1.34 -0.45  0.45  1.34]]
    """

    _kind = "layer_norm"

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = _ZEROS,
        scale_init: Initializer = _ONES,
        reduction_axes: Any = -1,
        feature_axes: Any = -1,
        axis_name: Hashable | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = False,
        promote_dtype: Callable[..., Any] = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        scale_metadata: Mapping[str, Any] = MappingProxyType({}),
    ):
        self._init_params(
            num_features,
            use_scale=use_scale,
            use_bias=use_bias,
            scale_init=scale_init,
            bias_init=bias_init,
            param_dtype=param_dtype,
            rngs=rngs,
            scale_metadata=scale_metadata,
            bias_metadata=bias_metadata,
        )
        _keep(
            self,
            epsilon=epsilon,
            dtype=dtype,
            param_dtype=param_dtype,
            use_bias=use_bias,
            use_scale=use_scale,
            reduction_axes=reduction_axes,
            feature_axes=feature_axes,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            use_fast_variance=use_fast_variance,
            promote_dtype=promote_dtype,
        )

    def __call__(self, x: jax.typing.ArrayLike, *, mask: jax.Array | None = None) -> jax.Array:
        """Normalise ``x`` over ``reduction_axes``.

        Args:
            x: the input, of floating dtype.
            mask: boolean array broadcastable to ``x``; statistics use only the kept elements.

        Returns:
            The normalised input, of ``x``'s shape.
        """
        return self._normalize(x, mask)


class RMSNorm(_Norm):
    """RMS normalization for nnx, a drop-in for ``flax.nnx.RMSNorm``.

    Same constructor, call and variables (``nnx.Param`` ``scale``) as flax's module; the
    arithmetic is :func:`jaxinit.rms_norm`. Extra: ``zero_centered_scale=True`` multiplies by
    ``1 + scale`` (Gemma's convention), and then the default ``scale_init`` (ones) becomes zeros.
    ``use_fast_variance`` is accepted and has no effect (there is no mean to subtract).

    Args:
        num_features: the number of features.
        epsilon: added to the mean square.
        dtype: output dtype (default: promote input and params).
        param_dtype: dtype of ``scale``.
        use_scale: learn a scale.
        scale_init: scale initializer (zeros instead of the default ones when
            ``zero_centered_scale``).
        reduction_axes: the axes the mean square runs over.
        feature_axes: the axes ``scale`` varies along.
        axis_name: named axis to combine the mean square over, count-weighted.
        axis_index_groups: groups within ``axis_name``.
        use_fast_variance: no effect (flax's argument, kept so configurations load).
        promote_dtype: flax's hook casting ``(x, scale)`` to a common dtype.
        rngs: the ``nnx.Rngs`` for the scale initializer.
        scale_metadata: metadata for the scale ``nnx.Param``.
        zero_centered_scale: multiply by ``1 + scale``.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> import jaxinit.nnx as jnnx
        >>> rms = jnnx.RMSNorm(2, zero_centered_scale=True, epsilon=0.0, rngs=nnx.Rngs(0))
        >>> print(rms.scale[...], rms(jnp.array([3.0, 4.0])) ** 2)
        [0. 0.] [0.72 1.28]
    """

    _kind = "rms_norm"

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_scale: bool = True,
        scale_init: Initializer = initializers.ones,
        reduction_axes: Any = -1,
        feature_axes: Any = -1,
        axis_name: Hashable | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = False,
        promote_dtype: Callable[..., Any] = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        scale_metadata: Mapping[str, Any] = MappingProxyType({}),
        zero_centered_scale: bool = False,
    ):
        self.zero_centered_scale = zero_centered_scale
        self.scale_init = scale_init
        self._init_params(
            num_features,
            use_scale=use_scale,
            use_bias=False,
            scale_init=scale_init_of(self, initializers.ones, initializers.zeros),
            bias_init=_ZEROS,
            param_dtype=param_dtype,
            rngs=rngs,
            scale_metadata=scale_metadata,
        )
        del self.scale_init
        _keep(
            self,
            epsilon=epsilon,
            dtype=dtype,
            param_dtype=param_dtype,
            use_scale=use_scale,
            reduction_axes=reduction_axes,
            feature_axes=feature_axes,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            use_fast_variance=use_fast_variance,
            promote_dtype=promote_dtype,
        )

    def __call__(self, x: jax.typing.ArrayLike, mask: jax.Array | None = None) -> jax.Array:
        """Normalise ``x`` by its root mean square over ``reduction_axes``.

        Args:
            x: the input, of floating dtype.
            mask: boolean array broadcastable to ``x``; the mean square uses the kept elements.

        Returns:
            The normalised input, of ``x``'s shape.
        """
        return self._normalize(x, mask)


class GroupNorm(_Norm):
    """Group normalization for nnx, a drop-in for ``flax.nnx.GroupNorm``.

    Same constructor (``num_features, num_groups=32, group_size=None``), call and variables as
    flax's module, with flax's errors for bad group settings at construction; the arithmetic is
    :func:`jaxinit.group_norm`. Extra: ``feature_axis`` (default -1; 1 for NCHW input).

    Args:
        num_features: the number of channels.
        num_groups: the number of groups (None when ``group_size`` is given).
        group_size: the channels per group; exactly one of the two is not None.
        epsilon: added to the variance.
        dtype: output dtype (default: promote input and params).
        param_dtype: dtype of ``scale`` and ``bias``.
        use_bias: learn a bias.
        use_scale: learn a scale.
        bias_init: bias initializer.
        scale_init: scale initializer.
        reduction_axes: the axes the statistics run over (None: all but the leading one); must
            include the feature axis.
        axis_name: named axis to combine statistics over, count-weighted.
        axis_index_groups: groups within ``axis_name``.
        use_fast_variance: flax's unshifted ``E[x^2] - E[x]^2`` (parity only).
        promote_dtype: flax's hook casting ``(x, scale, bias)`` to a common dtype.
        rngs: the ``nnx.Rngs`` for the parameter initializers.
        bias_metadata: metadata for the bias ``nnx.Param``.
        scale_metadata: metadata for the scale ``nnx.Param``.
        feature_axis: the channel axis.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> import jaxinit.nnx as jnnx
        >>> gn = jnnx.GroupNorm(8, num_groups=2, feature_axis=1, rngs=nnx.Rngs(0))
        >>> y = gn(jax.random.normal(jax.random.key(0), (2, 8, 4, 4)))  # NCHW
        >>> print(gn.num_groups, gn.group_size, y.shape)
        2 4 (2, 8, 4, 4)
    """

    _kind = "group_norm"

    def __init__(
        self,
        num_features: int,
        num_groups: int | None = 32,
        group_size: int | None = None,
        *,
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = _ZEROS,
        scale_init: Initializer = _ONES,
        reduction_axes: Any = None,
        axis_name: Hashable | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = False,
        promote_dtype: Callable[..., Any] = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        scale_metadata: Mapping[str, Any] = MappingProxyType({}),
        feature_axis: int = -1,
    ):
        groups = check_groups(num_features, num_groups, group_size)
        self._init_params(
            num_features,
            use_scale=use_scale,
            use_bias=use_bias,
            scale_init=scale_init,
            bias_init=bias_init,
            param_dtype=param_dtype,
            rngs=rngs,
            scale_metadata=scale_metadata,
            bias_metadata=bias_metadata,
        )
        _keep(
            self,
            num_groups=groups,
            group_size=num_features // groups if groups else None,
            epsilon=epsilon,
            dtype=dtype,
            param_dtype=param_dtype,
            use_bias=use_bias,
            use_scale=use_scale,
            reduction_axes=reduction_axes,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            use_fast_variance=use_fast_variance,
            promote_dtype=promote_dtype,
            feature_axis=feature_axis,
        )

    def __call__(self, x: jax.typing.ArrayLike, *, mask: jax.Array | None = None) -> jax.Array:
        """Normalise ``x`` per example over groups of channels.

        Args:
            x: the input, of floating dtype, ``num_features`` channels along ``feature_axis``.
            mask: boolean array broadcastable to ``x``; statistics use only the kept elements.

        Returns:
            The normalised input, of ``x``'s shape.
        """
        return self._normalize(x, mask)


class InstanceNorm(_Norm):
    """Instance normalization for nnx, a drop-in for ``flax.nnx.InstanceNorm``.

    Same constructor, call and variables as flax's module; the arithmetic is
    :func:`jaxinit.instance_norm` (statistics over every axis but the leading one and
    ``feature_axes``).

    Args:
        num_features: the number of channels (the product of x's sizes along
            ``feature_axes``).
        epsilon: added to the variance.
        dtype: output dtype (default: promote input and params).
        param_dtype: dtype of ``scale`` and ``bias``.
        use_bias: learn a bias.
        use_scale: learn a scale.
        bias_init: bias initializer.
        scale_init: scale initializer.
        feature_axes: the channel axes (not the leading, batch, axis).
        axis_name: named axis to combine statistics over, count-weighted.
        axis_index_groups: groups within ``axis_name``.
        use_fast_variance: flax's unshifted ``E[x^2] - E[x]^2`` (parity only).
        promote_dtype: flax's hook casting ``(x, scale, bias)`` to a common dtype.
        rngs: the ``nnx.Rngs`` for the parameter initializers.
        bias_metadata: metadata for the bias ``nnx.Param``.
        scale_metadata: metadata for the scale ``nnx.Param``.

    Example:
        >>> import jax
        >>> from flax import nnx
        >>> import jaxinit.nnx as jnnx
        >>> x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
        >>> jnnx.InstanceNorm(3, rngs=nnx.Rngs(0))(x).shape
        (2, 4, 4, 3)
    """

    _kind = "instance_norm"

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = initializers.zeros,
        scale_init: Initializer = initializers.ones,
        feature_axes: Any = -1,
        axis_name: Hashable | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = False,
        promote_dtype: Callable[..., Any] = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        scale_metadata: Mapping[str, Any] = MappingProxyType({}),
    ):
        self._init_params(
            num_features,
            use_scale=use_scale,
            use_bias=use_bias,
            scale_init=scale_init,
            bias_init=bias_init,
            param_dtype=param_dtype,
            rngs=rngs,
            scale_metadata=scale_metadata,
            bias_metadata=bias_metadata,
        )
        _keep(
            self,
            epsilon=epsilon,
            dtype=dtype,
            param_dtype=param_dtype,
            use_bias=use_bias,
            use_scale=use_scale,
            feature_axes=feature_axes,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            use_fast_variance=use_fast_variance,
            promote_dtype=promote_dtype,
        )

    def __call__(self, x: jax.typing.ArrayLike, *, mask: jax.Array | None = None) -> jax.Array:
        """Normalise ``x`` per example and per channel.

        Args:
            x: the input, of floating dtype, batch first.
            mask: boolean array broadcastable to ``x``; statistics use only the kept elements.

        Returns:
            The normalised input, of ``x``'s shape.
        """
        return self._normalize(x, mask)


# --------------------------------------------------------------------------- reparametrizations


def _call_with(layer: nnx.Module, transform: Callable[[tuple, Any], Any], *args, **kwargs) -> Any:
    """Calls a copy of ``layer`` whose parameters are ``transform(path, param)``.

    The copy is merged from ``layer``'s split state, so ``layer`` itself is never written to
    (flax's nnx wrappers overwrite the wrapped parameters on every call, google/flax#5576), and
    gradients flow through ``transform`` into ``layer``'s parameters.
    """
    graphdef, state = nnx.split(layer)
    flat = [
        (path, transform(path, var) if isinstance(var, nnx.Param) else var)
        for path, var in nnx.to_flat_state(state)
    ]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))(*args, **kwargs)


class WeightNorm(nnx.Module):
    """Weight normalization of a wrapped nnx layer, a drop-in for ``flax.nnx.WeightNorm``.

    Same constructor and call as flax's module; the arithmetic is :func:`jaxinit.weight_norm`.
    Deliberate differences (google/flax#5576, #5577, #4138):

    * The wrapped layer's parameters are never overwritten: the normalized weight exists only
      inside the call (flax writes it back into the layer on every call).
    * The scales are ``nnx.Param``, so they receive gradients (flax keeps plain arrays); as in
      flax, ``self.scales`` is keyed by the parameter's path tuple (``("kernel",)``).
    * The scale starts at the wrapped weight's norm, so the wrapped layer's output at
      construction equals the unwrapped layer's; ``scale_init=nnx.initializers.ones`` gives
      flax's start.

    Args:
        layer_instance: the wrapped module (e.g. ``nnx.Linear``).
        feature_axes: the feature axes of each parameter (None: one norm for the whole array).
        use_scale: learn a scale per feature.
        scale_init: the scales' initializer; None (default) means the wrapped weight's norm.
        epsilon: added to the sum of squares.
        dtype: output dtype of the normalized parameters (default: promote them).
        param_dtype: dtype of the scales.
        variable_filter: which parameters to normalize (an nnx filter on path and variable).
        promote_dtype: flax's dtype hook (kept for compatibility).
        rngs: the ``nnx.Rngs`` for ``scale_init``.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> import jaxinit.nnx as jnnx
        >>> layer = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
        >>> x = jnp.ones((2, 3))
        >>> y0 = layer(x)
        >>> wn = jnnx.WeightNorm(layer, rngs=nnx.Rngs(1))
        >>> bool(jnp.allclose(wn(x), y0, atol=1e-6)), bool(jnp.all(layer(x) == y0))
        (True, True)
    """

    def __init__(
        self,
        layer_instance: nnx.Module,
        *,
        feature_axes: Any = -1,
        use_scale: bool = True,
        scale_init: Initializer | None = None,
        epsilon: float = 1e-12,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        variable_filter: Any = _KERNELS,
        promote_dtype: Callable[..., Any] = dtypes.promote_dtype,
        rngs: nnx.Rngs,
    ):
        self.layer_instance = layer_instance
        self.feature_axes = feature_axes
        self.use_scale = use_scale
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.variable_filter = nnx.filterlib.to_predicate(variable_filter)
        self.promote_dtype = promote_dtype
        scales = {}
        if use_scale:
            for path, param in nnx.to_flat_state(nnx.state(layer_instance, nnx.Param)):
                if not self.variable_filter(path, param):
                    continue
                value = param[...]
                axes = self._axes(value)
                shape = tuple(value.shape[a] for a in axes)
                if scale_init is None:
                    init = _reparam.weight_norm_scale(value, feature_axes=axes)
                else:
                    init = scale_init(rngs.params(), shape, param_dtype)
                scales[path] = nnx.Param(jnp.asarray(init, param_dtype))
        self.scales = nnx.data(scales)

    def _axes(self, value: jax.Array) -> tuple[int, ...]:
        if self.feature_axes is None:
            return ()
        return canonical_axes(value.ndim, self.feature_axes, "feature_axes", value.shape)

    def _normalize(self, path: tuple, param: nnx.Param) -> nnx.Param:
        if not self.variable_filter(path, param):
            return param
        value = param[...]
        scale = self.scales[path][...] if self.use_scale else None
        w = _reparam.weight_norm(value, scale, feature_axes=self._axes(value), epsilon=self.epsilon)
        dtype = self.dtype or _promote(value.dtype, *(() if scale is None else (scale.dtype,)))
        return param.replace(w.astype(dtype))

    def __call__(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        """Calls the wrapped layer with its filtered parameters weight-normalized.

        Args:
            x: the wrapped layer's input.
            *args: further positional arguments of the wrapped layer's call.
            **kwargs: keyword arguments of the wrapped layer's call.

        Returns:
            The wrapped layer's output.
        """
        return _call_with(self.layer_instance, self._normalize, x, *args, **kwargs)


class SpectralNorm(nnx.Module):
    """Spectral normalization of a wrapped nnx layer, a drop-in for ``flax.nnx.SpectralNorm``.

    Same constructor and call (``update_stats=``, ``.train()`` / ``.eval()``) as flax's module,
    with ``u`` and ``sigma`` as ``nnx.BatchStat`` in ``self.batch_stats``, keyed as in flax by
    the parameter's path tuple plus ``"u"`` / ``"sigma"``; the arithmetic is
    :func:`jaxinit.spectral_norm`. Deliberate differences:

    * The wrapped layer's parameters are never overwritten (google/flax#5576): the normalized
      weight exists only inside the call; only ``u`` and ``sigma`` are updated.
    * ``u`` starts as a random unit vector refined by ``n_warmup`` power iterations on the
      kernel (torch's registration).
    * Eval (``update_stats=False``) runs no iteration and uses the stored ``u`` (torch's
      deterministic eval); ``iterate_at_eval=True`` gives flax's behaviour.

    Args:
        layer_instance: the wrapped module.
        n_steps: power iterations per training call.
        epsilon: added under the square roots of the vector normalizations.
        dtype: output dtype of the normalized parameters (default: promote them).
        param_dtype: dtype of ``u`` and ``sigma``.
        error_on_non_matrix: raise for parameters of rank > 2 instead of flattening them.
        update_stats: the default mode (True: training).
        rngs: the ``nnx.Rngs`` for the random start of ``u``.
        n_warmup: power iterations at construction.
        iterate_at_eval: flax's eval (iterate without storing) instead of torch's.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> import jaxinit.nnx as jnnx
        >>> sn = jnnx.SpectralNorm(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
        >>> y = sn(jnp.ones((2, 3)))  # training: one power iteration, u and sigma updated
        >>> sorted(sn.batch_stats)
        [('kernel', 'sigma'), ('kernel', 'u')]
    """

    def __init__(
        self,
        layer_instance: nnx.Module,
        *,
        n_steps: int = 1,
        epsilon: float = 1e-12,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        error_on_non_matrix: bool = False,
        update_stats: bool = True,
        rngs: nnx.Rngs,
        n_warmup: int = 15,
        iterate_at_eval: bool = False,
    ):
        self.layer_instance = layer_instance
        self.n_steps = n_steps
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.error_on_non_matrix = error_on_non_matrix
        self.use_running_average = not update_stats
        self.iterate_at_eval = iterate_at_eval
        stats = {}
        for path, param in nnx.to_flat_state(nnx.state(layer_instance, nnx.Param)):
            value = self._matrix(param[...])
            if value is None:
                continue
            state = _reparam.spectral_norm_state(rngs.params(), value, n_warmup=n_warmup)
            stats[(*path, "u")] = nnx.BatchStat(state.u.astype(param_dtype))
            stats[(*path, "sigma")] = nnx.BatchStat(state.sigma.astype(param_dtype))
        self.batch_stats = nnx.data(stats)

    def _matrix(self, value: jax.Array) -> jax.Array | None:
        if value.ndim <= 1 or self.n_steps < 1:
            return None
        if value.ndim > 2 and self.error_on_non_matrix:
            raise ValueError(
                f"Layer instance parameter is {value.ndim}D but error_on_non_matrix is True"
            )
        return value

    def __call__(self, x: Any, update_stats: bool | None = None) -> Any:
        """Calls the wrapped layer with its parameters divided by their largest singular value.

        Args:
            x: the wrapped layer's input.
            update_stats: overrides the mode for this call (True: iterate and store).

        Returns:
            The wrapped layer's output.

        Raises:
            ValueError: when neither the call nor the module sets the mode.
        """
        if update_stats is None:
            if self.use_running_average is None:
                raise ValueError(
                    "No `update_stats` argument was provided to SpectralNorm as either a "
                    "__call__ argument or __init__ argument."
                )
            update_stats = not self.use_running_average
        updates = {}

        def normalize(path: tuple, param: nnx.Param) -> nnx.Param:
            value = param[...]
            if self._matrix(value) is None:
                return param
            state = _reparam.SpectralNormState(
                self.batch_stats[(*path, "u")][...], self.batch_stats[(*path, "sigma")][...]
            )
            w, new = _reparam.spectral_norm(
                value,
                state,
                training=bool(update_stats) or self.iterate_at_eval,
                n_steps=self.n_steps,
                epsilon=self.epsilon,
            )
            updates[path] = new
            return param.replace(w.astype(self.dtype or _promote(value.dtype, state.u.dtype)))

        y = _call_with(self.layer_instance, normalize, x)
        if update_stats:
            for path, new in updates.items():
                self.batch_stats[(*path, "u")][...] = jax.lax.stop_gradient(new.u)
                self.batch_stats[(*path, "sigma")][...] = jax.lax.stop_gradient(new.sigma)
        return y

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Used by ``nnx.view`` / ``.train()`` / ``.eval()``: the mode, as batch norm's.

        Args:
            use_running_average: True for eval (no update), False for training.
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average


# --------------------------------------------------------------------------- folding


def fold_batch_norm(layer: nnx.Module, bn: nnx.Module, *, epsilon: float | None = None) -> Any:
    """A new layer equal, in eval mode, to ``layer`` followed by the batch norm ``bn``.

    ``layer`` is an ``nnx.Linear``, ``nnx.Conv`` (grouped and depthwise included) or
    ``nnx.ConvTranspose``, whose kernel has the output features last; ``bn`` is a
    ``flax.nnx.BatchNorm`` or a ``jaxinit.nnx.BatchNorm`` over those features. The result is a copy
    of ``layer`` with the folded kernel and a bias (``use_bias=True``), so ``bn`` can be dropped;
    neither argument is modified.

    Args:
        layer: the layer before the batch norm.
        bn: the batch norm.
        epsilon: the batch norm's epsilon; default ``bn.epsilon``.

    Returns:
        The folded layer, of ``layer``'s type.

    Raises:
        TypeError: ``layer`` has no ``kernel``.
        ValueError: the batch norm's feature size is not the layer's output size.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> import jaxinit.nnx as jnnx
        >>> fc, bn = nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.BatchNorm(4, rngs=nnx.Rngs(0))
        >>> bn.eval()
        >>> x = jnp.ones((2, 3))
        >>> bool(jnp.allclose(jnnx.fold_batch_norm(fc, bn)(x), bn(fc(x)), atol=1e-5))
        True
    """
    if not hasattr(layer, "kernel"):
        raise TypeError(
            f"layer must have a kernel (nnx.Linear, nnx.Conv), got {type(layer).__name__}."
        )

    def value(v: Any) -> Any:
        return None if v is None else v[...]

    kernel, bias = _fold(
        value(layer.kernel),
        value(getattr(layer, "bias", None)),
        value(getattr(bn, "scale", None)),
        value(getattr(bn, "bias", None)),
        value(bn.mean),
        value(bn.var),
        epsilon=bn.epsilon if epsilon is None else epsilon,
    )
    folded = nnx.clone(layer)
    folded.kernel = nnx.Param(kernel)
    folded.bias = nnx.Param(bias)
    folded.use_bias = True
    return folded


# --------------------------------------------------------------------------- sharded init


def create_sharded(
    model_factory: Callable[[], nnx.Module],
    mesh: jax.sharding.Mesh,
    rules: model_sharding.LogicalRules | None = None,
) -> nnx.Module:
    """Creates an nnx model with every variable created directly on its sharding.

    flax's recipe for sharded nnx models: ``nnx.eval_shape`` builds the model abstractly (no
    memory), ``nnx.get_partition_spec`` reads each variable's ``out_sharding`` metadata (set by
    ``nnx.with_partitioning`` or ``nnx.Param(..., out_sharding=...)``; logical names are mapped
    with ``rules``), and the factory then runs under ``jax.jit`` with those shardings as
    ``out_shardings``. Unannotated variables (including RNG state) are replicated. The values
    equal ``model_factory()`` run on one device.

    Args:
        model_factory: a function of no arguments returning an ``nnx.Module`` (e.g.
            ``lambda: MyModel(rngs=nnx.Rngs(0))``); it is traced twice, so it must be pure.
        mesh: the device mesh.
        rules: ``(logical_name, mesh_axes)`` pairs for logically named variables.

    Returns:
        The model, its arrays laid out on ``mesh``.

    Raises:
        TypeError: ``mesh`` is not a ``jax.sharding.Mesh``, ``rules`` is not a sequence of pairs,
            or the factory does not return an ``nnx.Module``.
        ValueError: an annotation names an axis that is not on the mesh (after the rules).

    Example:
        >>> import jax, jaxinit as ji
        >>> from flax import nnx
        >>> import jaxinit.nnx as jnnx
        >>> mesh = jax.make_mesh((2, 4), ("data", "model"))
        >>> init = nnx.with_partitioning(ji.he_normal(), (None, "model"))
        >>> model = jnnx.create_sharded(
        ...     lambda: nnx.Linear(16, 64, kernel_init=init, rngs=nnx.Rngs(0)), mesh)
        >>> model.kernel[...].sharding.spec == jax.P(None, "model")
        True
    """
    who = "create_sharded"
    model_sharding.check_mesh(mesh, who)
    rules_t = model_sharding.check_rules(rules, who)
    if not callable(model_factory):
        raise TypeError(f"{who}: model_factory must be callable, got {model_factory!r}.")

    def leaves_of_new_model() -> list[Any]:
        return jax.tree_util.tree_leaves(nnx.split(model_factory())[1])

    with logical_context(model_sharding.auto_mesh(mesh), rules_t), nnx.use_eager_sharding(False):
        abstract_model = nnx.eval_shape(model_factory)
        if not isinstance(abstract_model, nnx.Module):
            raise TypeError(
                f"{who}: model_factory returned {type(abstract_model).__name__}, expected an "
                "nnx.Module."
            )
        graphdef, abstract_state = nnx.split(abstract_model)
        specs = nnx.get_partition_spec(abstract_state)
        leaf_specs = []
        for path, spec in jax.tree_util.tree_leaves_with_path(
            specs, is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None
        ):
            spec = PartitionSpec() if spec is None else spec
            model_sharding.check_spec(spec, mesh, jax.tree_util.keystr(path), who)
            leaf_specs.append(spec)
        leaves, treedef = jax.tree_util.tree_flatten(abstract_state)
        if len(leaves) != len(leaf_specs):
            raise ValueError(
                f"{who}: found {len(leaf_specs)} partition specs for {len(leaves)} arrays."
            )
        new_leaves = model_sharding.run_sharded(leaves_of_new_model, leaf_specs, mesh)
    return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, new_leaves))
