"""Porting PyTorch models to Flax: default initialisation, batch-norm conventions, state dicts.

torch and Flax disagree in three places that silently change a ported model:

* **Default init.** torch's ``nn.Linear`` and ``nn.ConvNd`` draw the weight from
  ``kaiming_uniform_(a=sqrt(5))``, which is U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and the bias from
  the same U(+-1/sqrt(fan_in)) with the *weight's* fan-in. Flax uses ``lecun_normal`` and a zero
  bias. :func:`torch_kernel_init`, :func:`torch_bias_init` and :func:`torch_init_params`
  reproduce torch's draws in Flax's layouts.
* **Batch-norm conventions.** torch's ``momentum=0.1`` is the weight on the *new* batch (Flax's
  momentum is the decay, ``1 - m``) and torch stores the unbiased (n/(n-1)) batch variance in its
  running variance. :func:`torch_batch_norm_kwargs` converts both in one call.
* **Layouts.** torch Linear weights are ``(out, in)`` and conv weights ``(out, in/groups, *k)``;
  Flax kernels are ``(in, out)`` and ``(*k, in/groups, out)``. :func:`torch_state_dict_to_flax`
  and :func:`flax_to_torch_state_dict` convert whole state dicts with numpy only, so torch is not
  needed (pass ``{k: v.numpy() for k, v in model.state_dict().items()}``).

This module needs only numpy and JAX; it never imports flax or torch.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinit._src.initializers import Initializer, kaiming_uniform

__all__ = [
    "batch_norm_from_torch",
    "batch_norm_to_torch",
    "conv_from_torch",
    "conv_to_torch",
    "flax_to_torch_state_dict",
    "linear_from_torch",
    "linear_to_torch",
    "torch_batch_norm_kwargs",
    "torch_bias_init",
    "torch_fan_in",
    "torch_init_params",
    "torch_kernel_init",
    "torch_state_dict_to_flax",
]

_KINDS = ("linear", "conv", "batch_norm", "norm", "embed")


# --------------------------------------------------------------------------- default init


def torch_fan_in(kernel_shape: Sequence[int], *, transposed: bool = False) -> int:
    """The fan-in torch computes for a layer, given the Flax kernel shape.

    Flax kernels are ``(*kernel_size, in_features // groups, out_features)``. torch's fan-in
    (``torch.nn.init._calculate_fan_in_and_fan_out`` on its ``(out, in/groups, *k)`` weight) is
    ``in/groups * prod(kernel_size)``, i.e. ``shape[-2] * prod(shape[:-2])`` here, so grouped and
    depthwise convolutions (``feature_group_count``) come out right with no extra argument. A
    torch ``ConvTransposeNd`` weight is ``(in, out/groups, *k)`` and torch takes its fan-in from
    dimension 1; with ``transposed=True`` the Flax ``ConvTranspose`` kernel ``(*k, in, out)``
    gives ``shape[-1] * prod(shape[:-2])`` (groups = 1, as in Flax).

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
    receptive = math.prod(shape[:-2])
    return (shape[-1] if transposed else shape[-2]) * receptive


def torch_kernel_init(*, transposed: bool = False, dtype: Any = None) -> Initializer:
    """torch's default Linear/Conv weight init, for a Flax kernel: U(+-1/sqrt(fan_in)).

    This is ``kaiming_uniform(a=math.sqrt(5))``: the gain ``sqrt(2 / (1 + a^2)) = sqrt(1/3)``
    times ``sqrt(3 / fan_in)`` gives the bound ``1/sqrt(fan_in)``, with fan-in as in
    :func:`torch_fan_in`. Pass it as ``kernel_init`` to ``nn.Dense`` / ``nn.Conv`` (linen) or
    ``nnx.Linear`` / ``nnx.Conv``.

    Args:
      transposed: use torch's ConvTranspose fan-in (see :func:`torch_fan_in`).
      dtype: default dtype of the draws (float32 when None); the dtype passed at call time wins.

    Returns:
      An initializer ``init(key, shape, dtype=None, out_sharding=None)``.

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
    """torch's default Linear/Conv bias init: U(+-1/sqrt(fan_in)) with the *kernel's* fan-in.

    Flax calls ``bias_init(key, shape, dtype)`` with the bias shape only, which does not contain
    the fan-in; give it here, e.g. ``nn.Dense(10, bias_init=torch_bias_init(128))`` for a layer
    with 128 inputs, or use :func:`torch_init_params` to re-initialise a whole tree. As in torch,
    a fan-in of 0 gives zeros.

    Args:
      fan_in: the layer's fan-in (:func:`torch_fan_in` of the kernel shape).
      dtype: default dtype of the draws (float32 when None); the dtype passed at call time wins.

    Returns:
      An initializer ``init(key, shape, dtype=None, out_sharding=None)``.

    Raises:
      ValueError: if ``fan_in`` is negative or not an integer.

    Example:
      >>> import jax
      >>> from jaxinit.porting import torch_bias_init
      >>> b = torch_bias_init(16)(jax.random.key(0), (1000,))
      >>> bool(abs(b).max() <= 0.25), b.dtype
      (True, dtype('float32'))
    """
    if isinstance(fan_in, bool) or not isinstance(fan_in, int | np.integer) or fan_in < 0:
        raise ValueError(f"fan_in must be a non-negative int, got {fan_in!r}")
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    default_dtype = dtype

    def init(
        key: jax.Array,
        shape: Sequence[int],
        dtype: Any = default_dtype,
        out_sharding: Any = None,
    ) -> jax.Array:
        dtype = jnp.dtype(jnp.float32 if dtype is None else dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"torch_bias_init needs a real floating dtype, got {dtype}")
        shape = tuple(int(d) for d in shape)
        kwargs = {} if out_sharding is None else {"out_sharding": out_sharding}
        return jax.random.uniform(key, shape, dtype, -bound, bound, **kwargs)

    return init


def _key_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _names(path: tuple[Any, ...]) -> tuple[str, ...]:
    # An nnx Variable is a pytree node whose array sits under the attribute `value`.
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
    """Re-initialise every Dense/Conv layer of a Flax params tree the way torch would.

    A layer is any node holding a ``kernel`` leaf of rank >= 2 (``nn.Dense``, ``nn.Conv``,
    ``nnx.Linear``, ``nnx.Conv``, ...). Its kernel and ``bias`` (if any) are drawn from
    U(+-1/sqrt(fan_in)) with the kernel's torch fan-in (:func:`torch_fan_in`), the distribution
    of :func:`torch_kernel_init` and :func:`torch_bias_init`, so grouped and depthwise
    convolutions are handled through the kernel shape. Every other leaf (batch-norm scale and
    bias, embeddings, ...) is returned unchanged; torch's defaults for batch norm (ones and
    zeros) already match Flax's. Each layer draws from ``fold_in(key, crc32(path))``, so its
    values do not depend on the other layers in the tree. The draws are compiled once per
    tree layout.

    Args:
      params: a pytree of arrays: linen ``variables['params']``, or an ``nnx.State`` such as
        ``nnx.state(model, nnx.Param)``.
      key: a PRNG key.
      transposed: optional predicate on a layer's path (a tuple of names) that marks transposed
        convolutions, which use torch's ConvTranspose fan-in (see :func:`torch_fan_in`).

    Returns:
      A tree of the same structure, dtypes and shapes, with Dense/Conv layers re-drawn.

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
        if "kernel" not in idx or np.ndim(leaves[idx["kernel"]][1]) < 2:
            continue
        is_transposed = bool(transposed(layer)) if transposed is not None else False
        kernel_shape = tuple(np.shape(leaves[idx["kernel"]][1]))
        fan_in = torch_fan_in(kernel_shape, transposed=is_transposed)
        parts = tuple(
            (i, tuple(np.shape(leaves[i][1])), jnp.asarray(leaves[i][1]).dtype.name)
            for i in (idx["kernel"], idx.get("bias"))
            if i is not None
        )
        plan.append((zlib.crc32("/".join(layer).encode()), fan_in, parts))
    new = _torch_draws(tuple(plan))(key)
    out = [leaf for _, leaf in leaves]
    for (_, _, parts), values in zip(plan, new, strict=True):
        for (i, _, _), value in zip(parts, values, strict=True):
            out[i] = value
    return jax.tree_util.tree_unflatten(treedef, out)


@functools.lru_cache(maxsize=64)
def _torch_draws(plan: tuple[Any, ...]) -> Callable[[jax.Array], list[list[jax.Array]]]:
    # One compiled function per tree layout, and one uniform draw per layer: kernel and bias
    # share torch's bound 1/sqrt(fan_in).
    def draw(key: jax.Array) -> list[list[jax.Array]]:
        out = []
        for crc, fan_in, parts in plan:
            dtypes = [jnp.dtype(d) for _, _, d in parts]
            for d in dtypes:
                if not jnp.issubdtype(d, jnp.floating):
                    raise TypeError(f"torch_init_params needs floating parameters, got {d}")
            wide = jnp.float64 if any(d == jnp.float64 for d in dtypes) else jnp.float32
            sizes = [math.prod(shape) for _, shape, _ in parts]
            bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            u = jax.random.uniform(jax.random.fold_in(key, crc), (sum(sizes),), wide, -bound, bound)
            values, start = [], 0
            for (_, shape, _), size, dtype in zip(parts, sizes, dtypes, strict=True):
                values.append(u[start : start + size].reshape(shape).astype(dtype))
                start += size
            out.append(values)
        return out

    return jax.jit(draw)


# --------------------------------------------------------------------------- batch norm


def torch_batch_norm_kwargs(
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    channels_last: bool = True,
) -> dict[str, Any]:
    """Keyword arguments that make jaxinit's batch norm behave like a torch ``BatchNormNd``.

    torch updates ``running = (1 - m) * running + m * batch`` with ``m = momentum`` (default 0.1),
    stores the *unbiased* batch variance ``n/(n-1) * var`` in ``running_var`` and normalises the
    batch with the biased one. jaxinit (like Flax) keeps ``momentum`` as the decay, so
    ``momentum = 1 - m``, and ``unbiased_running_var=True`` stores what torch stores. The result
    works for ``ji.batch_norm(x, state, **kw, training=...)``, ``jaxinit.linen.BatchNorm(**kw)``
    and ``jaxinit.nnx.BatchNorm(num_features, **kw, rngs=...)``.

    Args:
      momentum: torch's momentum, in (0, 1]. torch's ``None`` (a cumulative average over all
        batches) is not an exponential average and is rejected; re-estimate the statistics after
        training instead.
      eps: torch's ``eps``, >= 0.
      channels_last: True for NHWC / (N, ..., C) data as Flax uses (``axis=-1``); False keeps
        torch's NCHW layout (``axis=1``).

    Returns:
      A dict with ``momentum``, ``epsilon``, ``unbiased_running_var`` and ``axis``.

    Raises:
      ValueError: if ``momentum`` is None or outside (0, 1], or ``eps`` is negative.

    Example:
      >>> from jaxinit.porting import torch_batch_norm_kwargs
      >>> torch_batch_norm_kwargs(momentum=0.1, eps=1e-5)
      {'momentum': 0.9, 'epsilon': 1e-05, 'unbiased_running_var': True, 'axis': -1}
    """
    if momentum is None:
        raise ValueError(
            "momentum=None (torch's cumulative moving average) has no exponential-average "
            "equivalent; pass the momentum the torch model was trained with, or re-estimate the "
            "running statistics after training"
        )
    if isinstance(momentum, bool) or not 0.0 < float(momentum) <= 1.0:
        raise ValueError(f"torch momentum must be in (0, 1], got {momentum!r}")
    if not float(eps) >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    return {
        "momentum": 1.0 - float(momentum),
        "epsilon": float(eps),
        "unbiased_running_var": True,
        "axis": -1 if channels_last else 1,
    }


# --------------------------------------------------------------------------- state dicts


def _np(x: Any, what: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype == object:
        raise TypeError(f"{what} must be array-like, got {type(x).__name__}")
    return arr


def linear_from_torch(weight: Any, bias: Any = None) -> dict[str, np.ndarray]:
    """Convert a torch ``nn.Linear`` weight ``(out, in)`` (and bias) to Flax ``kernel (in, out)``.

    Args:
      weight: array-like of shape ``(out, in)``.
      bias: optional array-like of shape ``(out,)``.

    Returns:
      ``{"kernel": ..., "bias": ...}`` (no ``bias`` when it is None), numpy arrays.

    Raises:
      ValueError: if the weight is not 2-D or the bias does not match.

    Example:
      >>> import numpy as np
      >>> from jaxinit.porting import linear_from_torch
      >>> linear_from_torch(np.zeros((10, 128)), np.zeros(10))["kernel"].shape
      (128, 10)
    """
    w = _np(weight, "weight")
    if w.ndim != 2:
        raise ValueError(f"a Linear weight must be 2-D (out, in), got shape {w.shape}")
    out = {"kernel": np.ascontiguousarray(w.T)}
    if bias is not None:
        out["bias"] = _check_bias(bias, w.shape[0])
    return out


def linear_to_torch(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Convert Flax Dense params ``{"kernel": (in, out), "bias"}`` to torch ``weight (out, in)``.

    Args:
      params: a mapping with ``kernel`` and optionally ``bias``.

    Returns:
      ``{"weight": ..., "bias": ...}`` as numpy arrays.

    Raises:
      ValueError: if the kernel is not 2-D.

    Example:
      >>> import numpy as np
      >>> from jaxinit.porting import linear_to_torch
      >>> linear_to_torch({"kernel": np.zeros((128, 10))})["weight"].shape
      (10, 128)
    """
    k = _np(params["kernel"], "kernel")
    if k.ndim != 2:
        raise ValueError(f"a Dense kernel must be 2-D (in, out), got shape {k.shape}")
    out = {"weight": np.ascontiguousarray(k.T)}
    if "bias" in params:
        out["bias"] = np.asarray(params["bias"])
    return out


def conv_from_torch(weight: Any, bias: Any = None) -> dict[str, np.ndarray]:
    """Convert a torch ``ConvNd`` weight ``(out, in/groups, *k)`` to a Flax kernel.

    The Flax layout is ``(*k, in/groups, out)``.

    Works for Conv1d (OIL -> LIO), Conv2d (OIHW -> HWIO) and Conv3d (OIDHW -> DHWIO). With
    ``groups=g`` in torch use ``nn.Conv(..., feature_group_count=g)`` in Flax; the kernel layout
    is then already the one Flax expects.

    Args:
      weight: array-like of rank 3 to 5.
      bias: optional array-like of shape ``(out,)``.

    Returns:
      ``{"kernel": ..., "bias": ...}`` (no ``bias`` when it is None), numpy arrays.

    Raises:
      ValueError: if the weight rank is not 3 to 5 or the bias does not match.

    Example:
      >>> import numpy as np
      >>> from jaxinit.porting import conv_from_torch
      >>> conv_from_torch(np.zeros((32, 16, 3, 5)))["kernel"].shape
      (3, 5, 16, 32)
    """
    w = _np(weight, "weight")
    if not 3 <= w.ndim <= 5:
        raise ValueError(
            f"a Conv weight must have rank 3 to 5 (out, in/groups, *kernel_size), got shape "
            f"{w.shape}"
        )
    perm = (*range(2, w.ndim), 1, 0)
    out = {"kernel": np.ascontiguousarray(np.transpose(w, perm))}
    if bias is not None:
        out["bias"] = _check_bias(bias, w.shape[0])
    return out


def conv_to_torch(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Convert Flax Conv params ``{"kernel": (*k, in/groups, out), "bias"}`` to torch layout.

    Args:
      params: a mapping with ``kernel`` (rank 3 to 5) and optionally ``bias``.

    Returns:
      ``{"weight": (out, in/groups, *k), "bias": ...}`` as numpy arrays.

    Raises:
      ValueError: if the kernel rank is not 3 to 5.

    Example:
      >>> import numpy as np
      >>> from jaxinit.porting import conv_to_torch
      >>> conv_to_torch({"kernel": np.zeros((3, 5, 16, 32))})["weight"].shape
      (32, 16, 3, 5)
    """
    k = _np(params["kernel"], "kernel")
    if not 3 <= k.ndim <= 5:
        raise ValueError(
            f"a Conv kernel must have rank 3 to 5 (*kernel_size, in, out), got shape {k.shape}"
        )
    perm = (k.ndim - 1, k.ndim - 2, *range(k.ndim - 2))
    out = {"weight": np.ascontiguousarray(np.transpose(k, perm))}
    if "bias" in params:
        out["bias"] = np.asarray(params["bias"])
    return out


def _check_bias(bias: Any, n: int) -> np.ndarray:
    b = _np(bias, "bias")
    if b.shape != (n,):
        raise ValueError(f"bias must have shape ({n},) to match the weight, got {b.shape}")
    return b


def batch_norm_from_torch(
    weight: Any = None,
    bias: Any = None,
    running_mean: Any = None,
    running_var: Any = None,
    num_batches_tracked: Any = None,
    *,
    keep_count: bool = False,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Convert torch ``BatchNormNd`` tensors to Flax ``params`` and ``batch_stats``.

    ``weight``/``bias`` become ``scale``/``bias`` and ``running_mean``/``running_var`` become
    ``mean``/``var``, unchanged: torch normalises with its (unbiased) running variance in eval
    mode, and so will the Flax layer. ``num_batches_tracked`` is dropped, unless ``keep_count``
    stores it as ``batch_stats["count"]`` (int32) for jaxinit options that use the count.

    Args:
      weight: the affine scale ``(C,)``, or None for ``affine=False``.
      bias: the affine shift ``(C,)``, or None.
      running_mean: ``(C,)``.
      running_var: ``(C,)``.
      num_batches_tracked: torch's scalar update counter, or None.
      keep_count: keep ``num_batches_tracked`` as ``count``.

    Returns:
      ``(params, batch_stats)``: ``{"scale", "bias"}`` (those present) and ``{"mean", "var"}``.

    Raises:
      ValueError: if running statistics are missing or shapes disagree.

    Example:
      >>> import numpy as np
      >>> from jaxinit.porting import batch_norm_from_torch
      >>> p, s = batch_norm_from_torch(np.ones(4), np.zeros(4), np.zeros(4), np.ones(4))
      >>> sorted(p), sorted(s)
      (['bias', 'scale'], ['mean', 'var'])
    """
    if running_mean is None or running_var is None:
        raise ValueError(
            "running_mean and running_var are required (a torch BatchNorm with "
            "track_running_stats=False has no running statistics to convert)"
        )
    mean = _np(running_mean, "running_mean")
    var = _np(running_var, "running_var")
    if mean.ndim != 1 or var.shape != mean.shape:
        raise ValueError(
            f"running_mean and running_var must be 1-D of the same shape, got {mean.shape} and "
            f"{var.shape}"
        )
    params: dict[str, np.ndarray] = {}
    if weight is not None:
        params["scale"] = _check_bias(weight, mean.shape[0])
    if bias is not None:
        params["bias"] = _check_bias(bias, mean.shape[0])
    stats = {"mean": mean, "var": var}
    if keep_count:
        count = 0 if num_batches_tracked is None else int(np.asarray(num_batches_tracked))
        stats["count"] = np.asarray(count, dtype=np.int32)
    return params, stats


def batch_norm_to_torch(
    params: Mapping[str, Any], batch_stats: Mapping[str, Any]
) -> dict[str, np.ndarray]:
    """Convert Flax batch-norm ``params`` and ``batch_stats`` to torch ``BatchNormNd`` tensors.

    ``num_batches_tracked`` (int64, as torch stores it) comes from ``batch_stats["count"]`` when
    present and is 0 otherwise; torch only reads it when its ``momentum`` is None.

    Args:
      params: ``{"scale", "bias"}`` (either may be absent).
      batch_stats: ``{"mean", "var"}`` and optionally ``count``.

    Returns:
      ``{"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}`` (weight and
      bias only when present) as numpy arrays.

    Example:
      >>> import numpy as np
      >>> from jaxinit.porting import batch_norm_to_torch
      >>> stats = {"mean": np.zeros(4), "var": np.ones(4)}
      >>> sorted(batch_norm_to_torch({"scale": np.ones(4)}, stats))
      ['num_batches_tracked', 'running_mean', 'running_var', 'weight']
    """
    out: dict[str, np.ndarray] = {}
    if "scale" in params:
        out["weight"] = np.asarray(params["scale"])
    if "bias" in params:
        out["bias"] = np.asarray(params["bias"])
    out["running_mean"] = np.asarray(batch_stats["mean"])
    out["running_var"] = np.asarray(batch_stats["var"])
    count = batch_stats.get("count", 0)
    out["num_batches_tracked"] = np.asarray(int(np.asarray(count)), dtype=np.int64)
    return out


def _set_path(tree: dict[str, Any], path: tuple[str, ...], value: dict[str, Any]) -> None:
    node = tree
    for name in path:
        node = node.setdefault(name, {})
    for k, v in value.items():
        if k in node:
            raise ValueError(f"two torch modules map to the same Flax path {'/'.join(path)!r}")
        node[k] = v


def _infer_kind(prefix: str, tensors: Mapping[str, np.ndarray]) -> str:
    if "running_mean" in tensors or "running_var" in tensors:
        return "batch_norm"
    if "weight" not in tensors:
        raise ValueError(
            f"cannot tell the layer type of torch module {prefix!r} (tensors {sorted(tensors)}); "
            f"name it in `kinds`, one of {_KINDS}"
        )
    ndim = tensors["weight"].ndim
    if ndim == 2:
        return "linear"
    if 3 <= ndim <= 5:
        return "conv"
    if ndim == 1:
        return "norm"
    raise ValueError(f"torch module {prefix!r} has a weight of unsupported rank {ndim}")


def torch_state_dict_to_flax(
    state_dict: Mapping[str, Any],
    *,
    rename: Mapping[str, str] | None = None,
    kinds: Mapping[str, str] | None = None,
    keep_count: bool = False,
) -> dict[str, dict[str, Any]]:
    """Convert a torch state dict (name -> numpy array) to Flax ``{"params", "batch_stats"}``.

    Keys are grouped by module prefix (everything before the last ``.``). Each module's type is
    inferred: running statistics make it a batch norm, a 2-D weight a Linear (transposed to a
    ``kernel``), a weight of rank 3-5 a Conv (to HWIO), a 1-D weight a LayerNorm/GroupNorm
    (``scale``, ``bias``). ``nn.Embedding`` also has a 2-D weight: name it in ``kinds`` as
    ``"embed"`` (it becomes ``embedding``, not transposed). The Flax path of a module is its
    torch prefix split at the dots (``"layer1.0.conv1"`` -> ``layer1/0/conv1``) unless
    ``rename`` maps the prefix to a ``"/"``-separated Flax path (``{"features.0": "Conv_0"}``).

    Note that flattening a conv feature map before a Linear orders features (C, H, W) in torch
    and (H, W, C) in Flax; that Linear's kernel rows must be permuted accordingly.

    Args:
      state_dict: torch parameter names to array-likes (torch tensors on CPU work via numpy).
      rename: optional map from torch module prefix to Flax path.
      kinds: optional map from torch module prefix to one of ``"linear"``, ``"conv"``,
        ``"batch_norm"``, ``"norm"``, ``"embed"``.
      keep_count: keep batch-norm ``num_batches_tracked`` as ``batch_stats[...]["count"]``.

    Returns:
      ``{"params": ..., "batch_stats": ...}`` nested dicts of numpy arrays (``batch_stats``
      empty when there is no batch norm), ready for ``model.apply``.

    Raises:
      ValueError: for a tensor name or layer it cannot convert, naming it.

    Example:
      >>> import numpy as np
      >>> from jaxinit.porting import torch_state_dict_to_flax
      >>> sd = {"fc.weight": np.zeros((10, 128)), "fc.bias": np.zeros(10),
      ...       "bn.weight": np.ones(10), "bn.bias": np.zeros(10),
      ...       "bn.running_mean": np.zeros(10), "bn.running_var": np.ones(10),
      ...       "bn.num_batches_tracked": np.array(7)}
      >>> v = torch_state_dict_to_flax(sd, rename={"fc": "Dense_0", "bn": "BatchNorm_0"})
      >>> v["params"]["Dense_0"]["kernel"].shape, sorted(v["batch_stats"]["BatchNorm_0"])
      ((128, 10), ['mean', 'var'])
    """
    rename = dict(rename or {})
    kinds = dict(kinds or {})
    for prefix, kind in kinds.items():
        if kind not in _KINDS:
            raise ValueError(f"kinds[{prefix!r}] must be one of {_KINDS}, got {kind!r}")
    modules: dict[str, dict[str, np.ndarray]] = {}
    for name, value in state_dict.items():
        prefix, _, leaf = name.rpartition(".")
        modules.setdefault(prefix, {})[leaf] = _np(value, name)

    params: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    known = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    for prefix, tensors in modules.items():
        unknown = sorted(set(tensors) - known)
        if unknown and prefix not in kinds:
            names = [f"{prefix}.{u}" if prefix else u for u in unknown]
            raise ValueError(
                f"cannot convert torch tensors {names}"
                f": only {sorted(known)} of Linear, Conv, BatchNorm, LayerNorm/GroupNorm and "
                f"Embedding modules are supported"
            )
        kind = kinds.get(prefix) or _infer_kind(prefix, tensors)
        allowed = {
            "batch_norm": {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"},
            "embed": {"weight"},
        }.get(kind, {"weight", "bias"})
        unknown = sorted(set(tensors) - allowed)
        if unknown:
            raise ValueError(
                f"torch module {prefix!r} ({kind}) has tensors it cannot convert: "
                f"{[f'{prefix}.{u}' if prefix else u for u in unknown]}"
            )
        path_str = rename.get(prefix, prefix.replace(".", "/"))
        path = tuple(p for p in path_str.split("/") if p)
        if kind == "batch_norm":
            p, s = batch_norm_from_torch(
                tensors.get("weight"),
                tensors.get("bias"),
                tensors.get("running_mean"),
                tensors.get("running_var"),
                tensors.get("num_batches_tracked"),
                keep_count=keep_count,
            )
            _set_path(stats, path, s)
        elif kind == "linear":
            p = linear_from_torch(tensors["weight"], tensors.get("bias"))
        elif kind == "conv":
            p = conv_from_torch(tensors["weight"], tensors.get("bias"))
        elif kind == "embed":
            w = tensors["weight"]
            if w.ndim != 2:
                raise ValueError(f"embedding {prefix!r} must be 2-D, got shape {w.shape}")
            p = {"embedding": w}
        else:  # norm
            p = {"scale": tensors["weight"]} if "weight" in tensors else {}
            if "bias" in tensors:
                p["bias"] = tensors["bias"]
        if p:
            _set_path(params, path, p)
    return {"params": params, "batch_stats": stats}


def _modules(tree: Mapping[str, Any], path: tuple[str, ...] = ()) -> dict:
    """Map module path -> {leaf name: array} for every node that holds arrays."""
    found: dict[tuple[str, ...], dict[str, Any]] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            found.update(_modules(v, (*path, str(k))))
        else:
            found.setdefault(path, {})[str(k)] = v
    return found


def flax_to_torch_state_dict(
    variables: Mapping[str, Any],
    *,
    rename: Mapping[str, str] | None = None,
) -> dict[str, np.ndarray]:
    """Convert Flax ``{"params", "batch_stats"}`` back to a flat torch state dict of numpy arrays.

    The inverse of :func:`torch_state_dict_to_flax`: ``kernel`` of rank 2 becomes a Linear
    ``weight (out, in)``, of rank 3-5 a Conv weight ``(out, in/groups, *k)``; ``embedding`` an
    Embedding weight; a node with ``batch_stats`` a BatchNorm (``num_batches_tracked`` from
    ``count`` or 0); ``scale``/``bias`` without statistics a LayerNorm/GroupNorm.

    Args:
      variables: ``{"params": ..., "batch_stats": ...}`` (``batch_stats`` optional).
      rename: the same torch-prefix -> Flax-path map given to :func:`torch_state_dict_to_flax`;
        it is inverted here.

    Returns:
      A flat dict from dotted torch names to numpy arrays.

    Raises:
      ValueError: for a parameter name it cannot convert, naming its path.

    Example:
      >>> import numpy as np
      >>> from jaxinit.porting import flax_to_torch_state_dict
      >>> v = {"params": {"fc": {"kernel": np.zeros((128, 10)), "bias": np.zeros(10)}}}
      >>> {k: a.shape for k, a in flax_to_torch_state_dict(v).items()}
      {'fc.weight': (10, 128), 'fc.bias': (10,)}
    """
    inverse = {v.strip("/"): k for k, v in (rename or {}).items()}
    params = _modules(variables.get("params", {}))
    stats = _modules(variables.get("batch_stats", {}))
    out: dict[str, np.ndarray] = {}
    for path in list(params) + [p for p in stats if p not in params]:
        p = params.get(path, {})
        path_str = "/".join(path)
        prefix = inverse.get(path_str, ".".join(path))
        if path in stats:
            unknown = sorted(set(p) - {"scale", "bias"})
            tensors = batch_norm_to_torch(p, stats[path])
        elif "kernel" in p:
            unknown = sorted(set(p) - {"kernel", "bias"})
            ndim = np.ndim(p["kernel"])
            tensors = linear_to_torch(p) if ndim == 2 else conv_to_torch(p)
        elif "embedding" in p:
            unknown = sorted(set(p) - {"embedding"})
            tensors = {"weight": np.asarray(p["embedding"])}
        else:
            unknown = sorted(set(p) - {"scale", "bias"})
            tensors = {"weight" if k == "scale" else k: np.asarray(v) for k, v in p.items()}
        if unknown:
            raise ValueError(f"cannot convert Flax parameters {unknown} at {path_str!r} to torch")
        for k, v in tensors.items():
            out[f"{prefix}.{k}" if prefix else k] = v
    return out
