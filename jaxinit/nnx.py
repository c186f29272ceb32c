"""Flax nnx modules backed by jaxinit's pure functions.

``jaxinit.nnx.BatchNorm`` is a drop-in for ``flax.nnx.BatchNorm``: the same constructor, call,
``.train()`` / ``.eval()`` switching and variables (``nnx.Param`` ``scale`` and ``bias``,
``nnx.BatchStat`` ``mean`` and ``var``). Underneath it is :func:`jaxinit.batch_norm`: a stable
variance, an analytic backward pass, count-weighted cross-device statistics and a NaN guard on the
running statistics. The module only holds variables, calls the function and stores the new state.

Import it as a submodule: ``import jaxinit.nnx as jnnx``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes, initializers
from jax.sharding import PartitionSpec

from jaxinit._src import model_sharding
from jaxinit._src.axes import canonical_axes
from jaxinit._src.batch_norm import BatchNormState
from jaxinit._src.modules import call_batch_norm
from jaxinit._src.modules import promote as _promote
from jaxinit.linen import logical_context

__all__ = ["BatchNorm", "create_sharded"]

Dtype = Any
Initializer = Any
_ZEROS = initializers.zeros_init()
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
