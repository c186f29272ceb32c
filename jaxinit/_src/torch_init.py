"""torch's default ``nn.Linear`` / ``nn.ConvNd`` initialisation, for Flax kernel layouts.

torch's ``reset_parameters`` draws the weight with ``kaiming_uniform_(a=sqrt(5))``, which is
U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and the bias from the same range with the *weight's* fan-in
(zeros when the fan-in is 0).
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinit._src.initializers import (
    Initializer,
    _check_dtype,
    _resolve_dtype,
    kaiming_uniform,
    uniform,
    zeros,
)

__all__ = ["torch_bias_init", "torch_fan_in", "torch_init_params", "torch_kernel_init"]


def torch_fan_in(kernel_shape: Sequence[int], *, transposed: bool = False) -> int:
    """Returns the fan-in torch computes for a layer, given its Flax kernel shape.

    torch's fan-in is ``in/groups * prod(kernel_size)``. For a Flax kernel
    ``(*kernel_size, in/groups, out)`` that is ``shape[-2] * prod(shape[:-2])``, so grouped and
    depthwise convolutions need no extra argument. torch takes a ``ConvTransposeNd`` fan-in from
    its weight's dimension 1 (``out/groups``): for a Flax ``ConvTranspose`` kernel
    ``(*k, in, out)`` that is ``shape[-1] * prod(shape[:-2])``.

    Args:
        kernel_shape: the Flax kernel shape, rank >= 2.
        transposed: whether the layer is a transposed convolution.

    Returns:
        The fan-in as an int.

    Raises:
        ValueError: if the shape has rank < 2 or a negative dimension.

    Example:
        >>> from jaxinit.porting import torch_fan_in
        >>> torch_fan_in((3, 3, 16, 32))  # Conv2d(16, 32, 3)
        144
        >>> torch_fan_in((3, 3, 4, 32))  # Conv2d(16, 32, 3, groups=4): kernel in = 16 // 4
        36
        >>> torch_fan_in((128, 10))  # Linear(128, 10)
        128
    """
    shape = tuple(int(d) for d in kernel_shape)
    if len(shape) < 2:
        raise ValueError(
            f"kernel_shape must have rank >= 2 (Flax layout (*kernel_size, in, out)), got {shape!r}"
        )
    if any(d < 0 for d in shape):
        raise ValueError(f"kernel_shape must not have negative dimensions, got {shape!r}")
    return (shape[-1] if transposed else shape[-2]) * math.prod(shape[:-2])


def torch_kernel_init(*, transposed: bool = False, dtype: Any = None) -> Initializer:
    """Builds torch's default Linear/Conv weight init for a Flax kernel: U(+-1/sqrt(fan_in)).

    This is ``kaiming_uniform(a=math.sqrt(5))`` with the fan-in of :func:`torch_fan_in`. Pass it
    as ``kernel_init`` to ``nn.Dense`` / ``nn.Conv`` (linen) or ``nnx.Linear`` / ``nnx.Conv``.

    Args:
        transposed: use torch's ConvTranspose fan-in (see :func:`torch_fan_in`).
        dtype: default dtype of the draws (float32 when None); the dtype passed at call time wins.

    Returns:
        An initializer ``init(key, shape, dtype=None, out_sharding=None)``.

    Raises:
        TypeError: if ``dtype`` is not a floating or complex dtype.

    Example:
        >>> import jax
        >>> from jaxinit.porting import torch_kernel_init
        >>> w = torch_kernel_init()(jax.random.key(0), (64, 8))
        >>> bool(abs(w).max() <= 1 / 64**0.5)
        True
    """
    return kaiming_uniform(
        a=math.sqrt(5.0), mode="fan_out" if transposed else "fan_in", dtype=dtype
    )


def torch_bias_init(fan_in: int, dtype: Any = None) -> Initializer:
    """Builds torch's default Linear/Conv bias init: U(+-1/sqrt(fan_in)), the *kernel's* fan-in.

    Flax calls ``bias_init(key, shape, dtype)`` with the bias shape only, so the fan-in is given
    here: ``nn.Dense(10, bias_init=torch_bias_init(128))`` for a layer with 128 inputs. As in
    torch, a fan-in of 0 gives zeros. For float32 the draw equals
    ``jax.random.uniform(key, shape, dtype, -bound, bound)``.

    Args:
        fan_in: the layer's fan-in (:func:`torch_fan_in` of the kernel shape).
        dtype: default dtype of the draws (float32 when None); the dtype passed at call time wins.

    Returns:
        An initializer ``init(key, shape, dtype=None, out_sharding=None)``.

    Raises:
        ValueError: if ``fan_in`` is negative or not an integer.
        TypeError: if ``dtype`` is not a real floating dtype (also when the initializer is called).

    Example:
        >>> import jax
        >>> from jaxinit.porting import torch_bias_init
        >>> b = torch_bias_init(16)(jax.random.key(0), (1000,))
        >>> bool(abs(b).max() <= 0.25), b.dtype
        (True, dtype('float32'))
    """
    who = "torch_bias_init"
    if isinstance(fan_in, bool) or not isinstance(fan_in, int | np.integer) or fan_in < 0:
        raise ValueError(f"fan_in must be a non-negative int, got {fan_in!r}")
    default_dtype = _check_dtype(dtype, who, allow_complex=False)
    if fan_in > 0:
        bound = 1.0 / math.sqrt(fan_in)
        draw = uniform(low=-bound, high=bound)
    else:
        draw = zeros

    def init(
        key: jax.Array, shape: Sequence[int], dtype: Any = None, out_sharding: Any = None
    ) -> jax.Array:
        dt = _resolve_dtype(dtype, default_dtype, who, allow_complex=False)
        return draw(key, shape, dt, out_sharding)

    return init


def _key_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _names(path: tuple[Any, ...]) -> tuple[str, ...]:
    """The names along a pytree path; an nnx Variable's trailing ``value`` attribute is dropped."""
    last = path[-1] if path else None
    if isinstance(last, jax.tree_util.GetAttrKey) and last.name == "value":
        path = path[:-1]
    return tuple(_key_name(p) for p in path)


def torch_init_params(
    params: Any,
    key: jax.Array,
    *,
    transposed: Callable[[tuple[str, ...]], bool] | None = None,
) -> Any:
    """Re-initialises every Dense/Conv layer of a Flax params tree the way torch would.

    A layer is any node holding a ``kernel`` leaf of rank >= 2 (``nn.Dense``, ``nn.Conv``,
    ``nnx.Linear``, ``nnx.Conv``, ...). Its kernel and ``bias`` are drawn from U(+-1/sqrt(fan_in))
    with the kernel's :func:`torch_fan_in`. Every other leaf is returned unchanged (torch's
    batch-norm defaults, ones and zeros, already match Flax's). Each layer draws from
    ``fold_in(key, crc32(path))``, so its values do not depend on the rest of the tree.

    Args:
        params: a pytree of arrays: linen ``variables['params']``, or an ``nnx.State`` such as
            ``nnx.state(model, nnx.Param)``.
        key: a PRNG key.
        transposed: optional predicate on a layer's path (a tuple of names) marking transposed
            convolutions, which use torch's ConvTranspose fan-in.

    Returns:
        A tree of the same structure, dtypes and shapes, with Dense/Conv layers re-drawn.

    Raises:
        TypeError: if a layer's kernel or bias is not a real floating array.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jaxinit.porting import torch_init_params
        >>> params = {"Dense_0": {"kernel": jnp.zeros((128, 10)), "bias": jnp.zeros((10,))}}
        >>> new = torch_init_params(params, jax.random.key(0))
        >>> bound = 1 / 128**0.5
        >>> bool(abs(new["Dense_0"]["kernel"]).max() <= bound)
        True
        >>> bool(abs(new["Dense_0"]["bias"]).max() <= bound), bool(new["Dense_0"]["bias"].any())
        (True, True)
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    layers: dict[tuple[str, ...], dict[str, int]] = {}
    for i, (path, _) in enumerate(leaves):
        names = _names(path)
        if names and names[-1] in ("kernel", "bias"):
            layers.setdefault(names[:-1], {})[names[-1]] = i
    plan = []
    for layer, idx in layers.items():
        kernel = leaves[idx["kernel"]][1] if "kernel" in idx else None
        if kernel is None or np.ndim(kernel) < 2:
            continue
        is_transposed = bool(transposed(layer)) if transposed is not None else False
        fan_in = torch_fan_in(np.shape(kernel), transposed=is_transposed)
        parts = []
        for i in (idx["kernel"], idx.get("bias")):
            if i is not None:
                dtype = jnp.asarray(leaves[i][1]).dtype
                if not jnp.issubdtype(dtype, jnp.floating):
                    raise TypeError(f"torch_init_params needs floating parameters, got {dtype}")
                parts.append((i, tuple(np.shape(leaves[i][1])), dtype.name))
        plan.append((zlib.crc32("/".join(layer).encode()), fan_in, tuple(parts)))
    new = _torch_draws(tuple(plan))(key)
    out = [leaf for _, leaf in leaves]
    for (_, _, parts), values in zip(plan, new, strict=True):
        for (i, _, _), value in zip(parts, values, strict=True):
            out[i] = value
    return jax.tree_util.tree_unflatten(treedef, out)


@functools.lru_cache(maxsize=64)
def _torch_draws(plan: tuple[Any, ...]) -> Callable[[jax.Array], list[list[jax.Array]]]:
    """One compiled function per tree layout, drawing each layer's kernel and bias at once.

    Kernel and bias share torch's bound 1/sqrt(fan_in), so one flat :func:`torch_bias_init` draw
    (in the widest of their dtypes) is split between them.
    """

    def draw(key: jax.Array) -> list[list[jax.Array]]:
        out = []
        for crc, fan_in, parts in plan:
            dtypes = [jnp.dtype(d) for _, _, d in parts]
            wide = jnp.float64 if any(d == jnp.float64 for d in dtypes) else jnp.float32
            sizes = [math.prod(shape) for _, shape, _ in parts]
            u = torch_bias_init(fan_in)(jax.random.fold_in(key, crc), (sum(sizes),), wide)
            values, start = [], 0
            for (_, shape, _), size, dtype in zip(parts, sizes, dtypes, strict=True):
                values.append(u[start : start + size].reshape(shape).astype(dtype))
                start += size
            out.append(values)
        return out

    return jax.jit(draw)
