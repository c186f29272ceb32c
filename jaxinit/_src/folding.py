"""Folding an eval-mode batch norm into the layer before it.

A batch norm in eval mode is an affine map per output feature, ``y = a * z + c`` with
``a = scale / sqrt(var + epsilon)`` and ``c = bn_bias - a * mean``; after a layer
``z = x @ kernel + bias`` (or a convolution) it folds into that layer: ``kernel * a`` along the
output-feature axis and ``a * bias + c``. torch's ``torch.nn.utils.fusion.fuse_conv_bn_eval`` and
``fuse_linear_bn_eval`` do the same on torch's layouts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxinit._src.moments import check_float_input
from jaxinit._src.normalize import check_epsilon

__all__ = ["fold_batch_norm", "fold_batch_norms"]


def _vector(v: Any, name: str, n: int, default: float | None) -> jax.Array | None:
    if v is None:
        return None if default is None else jnp.full((n,), default, jnp.float32)
    v = jnp.asarray(v)
    if v.shape != (n,):
        raise ValueError(
            f"{name} has shape {v.shape}; expected ({n},), the kernel's output features (its "
            f"last axis)."
        )
    return v


def fold_batch_norm(
    kernel: jax.typing.ArrayLike,
    bias: jax.typing.ArrayLike | None,
    scale: jax.typing.ArrayLike | None,
    bn_bias: jax.typing.ArrayLike | None,
    mean: jax.typing.ArrayLike,
    var: jax.typing.ArrayLike,
    *,
    epsilon: float = 1e-5,
) -> tuple[jax.Array, jax.Array]:
    """The kernel and bias of one layer equal, in eval mode, to the layer then the batch norm.

    For flax layouts, whose output feature is the kernel's last axis: Dense ``(in, out)``, Conv
    ``(*k, in / groups, out)`` (grouped and depthwise included), ConvTranspose ``(*k, in, out)``.
    torch's ``fuse_conv_bn_eval`` / ``fuse_linear_bn_eval`` are this function on a converted
    state dict (:func:`jaxinit.torch_state_dict_to_flax`).

    Args:
        kernel: the layer's kernel, output features last.
        bias: the layer's bias, or None for a layer without one.
        scale: the batch norm's scale, or None for 1.
        bn_bias: the batch norm's bias, or None for 0.
        mean: the running mean.
        var: the running variance.
        epsilon: the batch norm's epsilon.

    Returns:
        ``(kernel, bias)``: the folded kernel (the kernel's shape and dtype) and a bias of the
        output features (always present), in the kernel's dtype.

    Raises:
        ValueError: a vector whose shape is not ``(kernel.shape[-1],)``, or negative ``epsilon``.
        TypeError: a non-floating kernel.

    Example:
        >>> import jax.numpy as jnp, jaxinit as ji
        >>> k, b = ji.fold_batch_norm(jnp.ones((2, 3)), None, None, None,
        ...                           jnp.array([1.0, 2.0, 3.0]), jnp.full(3, 4.0), epsilon=0.0)
        >>> print(k[0], b)
        [0.5 0.5 0.5] [-0.5 -1.  -1.5]
    """
    kernel = jnp.asarray(kernel)
    check_float_input(kernel, "kernel")
    check_epsilon(epsilon)
    if kernel.ndim < 1:
        raise ValueError(f"kernel must have an output-feature axis, got shape {kernel.shape}.")
    n = kernel.shape[-1]
    mean = _vector(mean, "mean", n, None)
    var = _vector(var, "var", n, None)
    scale = _vector(scale, "scale", n, 1.0)
    bn_bias = _vector(bn_bias, "bn_bias", n, 0.0)
    bias = _vector(bias, "bias", n, 0.0)
    f32 = jnp.promote_types(kernel.dtype, jnp.float32)
    a = scale.astype(f32) * jax.lax.rsqrt(var.astype(f32) + jnp.asarray(epsilon, f32))
    new_kernel = (kernel.astype(f32) * a).astype(kernel.dtype)
    new_bias = (a * (bias.astype(f32) - mean.astype(f32)) + bn_bias.astype(f32)).astype(
        kernel.dtype
    )
    return new_kernel, new_bias


def _path(p: Any, what: str) -> tuple[str, ...]:
    if isinstance(p, str):
        return tuple(s for s in p.split("/") if s)
    if isinstance(p, tuple) and all(isinstance(s, str) for s in p):
        return p
    raise TypeError(f"{what} must be a '/'-joined string or a tuple of strings, got {p!r}.")


def _get(tree: Mapping[str, Any], path: tuple[str, ...], collection: str) -> Any:
    node: Any = tree
    for i, key in enumerate(path):
        if not isinstance(node, Mapping) or key not in node:
            where = "/".join(path[: i + 1])
            raise KeyError(
                f"{'/'.join(path)!r} is not in variables[{collection!r}] (no {where!r})."
            )
        node = node[key]
    return node


def _without(tree: Mapping[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    out = dict(tree)
    if len(path) == 1:
        out.pop(path[0], None)
    elif path[0] in out:
        out[path[0]] = _without(out[path[0]], path[1:])
        if not out[path[0]]:
            del out[path[0]]
    return out


def _with(tree: Mapping[str, Any], path: tuple[str, ...], leaves: Mapping[str, Any]) -> dict:
    out = dict(tree)
    if len(path) == 1:
        out[path[0]] = {**out.get(path[0], {}), **leaves}
    else:
        out[path[0]] = _with(out.get(path[0], {}), path[1:], leaves)
    return out


def fold_batch_norms(
    variables: Mapping[str, Any],
    pairs: Mapping[Any, Any],
    *,
    epsilon: float = 1e-5,
) -> dict[str, Any]:
    """A linen variables tree with each ``{layer: batch_norm}`` pair folded into the layer.

    The result holds the variables of the same model built without those batch norms and with a
    bias on each folded layer: build it from the same module with the norms left out (for
    instance a ``use_bn`` flag, or ``lambda x: x`` in their place) and ``use_bias=True`` on the
    folded layers; the layers keep their names and paths. Everything else is copied unchanged.

    Args:
        variables: ``{"params": ..., "batch_stats": ...}`` of a linen model.
        pairs: ``{layer_path: batch_norm_path}``, each path a tuple of names or a "/"-joined
            string under ``params`` (and, for the norm's statistics, ``batch_stats``).
        epsilon: the batch norms' epsilon.

    Returns:
        The new variables: each layer with its folded ``kernel`` and a ``bias``, each batch norm
        gone from ``params`` and ``batch_stats`` (``batch_stats`` dropped when nothing is left).

    Raises:
        KeyError: a path that is not in the tree.
        TypeError: a path that is neither a string nor a tuple of strings.
        ValueError: shapes that do not fit (see :func:`fold_batch_norm`).

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxinit as ji
        >>> class Net(nn.Module):
        ...     use_bn: bool = True
        ...     @nn.compact
        ...     def __call__(self, x):
        ...         x = nn.Dense(4, use_bias=not self.use_bn, name="fc")(x)
        ...         return nn.BatchNorm(use_running_average=True, name="bn")(x) if self.use_bn else x
        >>> x = jnp.ones((2, 3))
        >>> v = Net().init(jax.random.key(0), x)
        >>> folded = ji.fold_batch_norms(v, {"fc": "bn"})
        >>> bool(jnp.allclose(Net(use_bn=False).apply(folded, x), Net().apply(v, x), atol=1e-5))
        True
    """
    params = variables.get("params", {})
    stats = variables.get("batch_stats", {})
    new_params, new_stats = dict(params), dict(stats)
    for layer, bn in pairs.items():
        lp, bp = _path(layer, "a layer path"), _path(bn, "a batch-norm path")
        layer_vars = _get(params, lp, "params")
        bn_params = _get(params, bp, "params") if bp and _has(params, bp) else {}
        bn_stats = _get(stats, bp, "batch_stats")
        if "kernel" not in layer_vars:
            raise KeyError(
                f"the layer at {'/'.join(lp)!r} has no 'kernel' (it has {sorted(layer_vars)})."
            )
        kernel, bias = fold_batch_norm(
            layer_vars["kernel"],
            layer_vars.get("bias"),
            bn_params.get("scale"),
            bn_params.get("bias"),
            bn_stats["mean"],
            bn_stats["var"],
            epsilon=epsilon,
        )
        new_params = _with(new_params, lp, {"kernel": kernel, "bias": bias})
        new_params = _without(new_params, bp)
        new_stats = _without(new_stats, bp)
    out = {k: v for k, v in variables.items() if k not in ("params", "batch_stats")}
    out["params"] = new_params
    if new_stats:
        out["batch_stats"] = new_stats
    return out


def _has(tree: Mapping[str, Any], path: tuple[str, ...]) -> bool:
    node: Any = tree
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return False
        node = node[key]
    return True
