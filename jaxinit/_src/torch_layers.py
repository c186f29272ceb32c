"""Tensors of one torch layer to Flax parameters and back, with numpy only.

torch stores a Linear weight as ``(out, in)`` and a ConvNd weight as ``(out, in/groups, *k)``;
Flax kernels are ``(in, out)`` and ``(*k, in/groups, out)``. A BatchNorm's tensors keep their
values and change names: ``weight``/``bias`` become ``scale``/``bias`` and
``running_mean``/``running_var`` become ``mean``/``var``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "as_array",
    "batch_norm_from_torch",
    "batch_norm_to_torch",
    "conv_from_torch",
    "conv_to_torch",
    "linear_from_torch",
    "linear_to_torch",
]


def as_array(x: Any, what: str) -> np.ndarray:
    """Returns ``x`` as a numpy array, naming ``what`` in the TypeError for a non-array."""
    arr = np.asarray(x)
    if arr.dtype == object:
        raise TypeError(f"{what} must be array-like, got {type(x).__name__}")
    return arr


def _check_vector(x: Any, n: int, what: str = "bias", match: str = "the weight") -> np.ndarray:
    b = as_array(x, what)
    if b.shape != (n,):
        raise ValueError(f"{what} must have shape ({n},) to match {match}, got {b.shape}")
    return b


def _kernel_from(weight: np.ndarray, bias: Any, perm: Sequence[int]) -> dict[str, np.ndarray]:
    out = {"kernel": np.ascontiguousarray(np.transpose(weight, perm))}
    if bias is not None:
        out["bias"] = _check_vector(bias, weight.shape[0])
    return out


def _weight_from(
    kernel: np.ndarray, params: Mapping[str, Any], perm: Sequence[int]
) -> dict[str, np.ndarray]:
    out = {"weight": np.ascontiguousarray(np.transpose(kernel, perm))}
    if "bias" in params:
        out["bias"] = np.asarray(params["bias"])
    return out


def linear_from_torch(weight: Any, bias: Any = None) -> dict[str, np.ndarray]:
    """Converts a torch ``nn.Linear`` weight ``(out, in)`` (and bias) to a Flax ``kernel (in, out)``.

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
    w = as_array(weight, "weight")
    if w.ndim != 2:
        raise ValueError(f"a Linear weight must be 2-D (out, in), got shape {w.shape}")
    return _kernel_from(w, bias, (1, 0))


def linear_to_torch(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Converts Flax Dense params ``{"kernel": (in, out), "bias"}`` to torch ``weight (out, in)``.

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
    k = as_array(params["kernel"], "kernel")
    if k.ndim != 2:
        raise ValueError(f"a Dense kernel must be 2-D (in, out), got shape {k.shape}")
    return _weight_from(k, params, (1, 0))


def conv_from_torch(weight: Any, bias: Any = None) -> dict[str, np.ndarray]:
    """Converts a torch ``ConvNd`` weight ``(out, in/groups, *k)`` to a Flax ``(*k, in/groups, out)``.

    Conv1d OIL becomes LIO, Conv2d OIHW becomes HWIO, Conv3d OIDHW becomes DHWIO. A torch
    ``groups=g`` conv is a Flax ``nn.Conv(..., feature_group_count=g)`` with this kernel.

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
    w = as_array(weight, "weight")
    if not 3 <= w.ndim <= 5:
        raise ValueError(
            f"a Conv weight must have rank 3 to 5 (out, in/groups, *kernel_size), got shape "
            f"{w.shape}"
        )
    return _kernel_from(w, bias, (*range(2, w.ndim), 1, 0))


def conv_to_torch(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Converts Flax Conv params ``{"kernel": (*k, in/groups, out), "bias"}`` to torch layout.

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
    k = as_array(params["kernel"], "kernel")
    if not 3 <= k.ndim <= 5:
        raise ValueError(
            f"a Conv kernel must have rank 3 to 5 (*kernel_size, in, out), got shape {k.shape}"
        )
    return _weight_from(k, params, (k.ndim - 1, k.ndim - 2, *range(k.ndim - 2)))


def batch_norm_from_torch(
    weight: Any = None,
    bias: Any = None,
    running_mean: Any = None,
    running_var: Any = None,
    num_batches_tracked: Any = None,
    *,
    keep_count: bool = False,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Converts torch ``BatchNormNd`` tensors to Flax ``params`` and ``batch_stats``.

    The values are unchanged: torch normalises with its (unbiased) running variance in eval mode,
    and so will the Flax layer. ``num_batches_tracked`` is dropped unless ``keep_count``.

    Args:
        weight: the affine scale ``(C,)``, or None for ``affine=False``.
        bias: the affine shift ``(C,)``, or None.
        running_mean: ``(C,)``.
        running_var: ``(C,)``.
        num_batches_tracked: torch's scalar update counter, or None.
        keep_count: keep ``num_batches_tracked`` as ``batch_stats["count"]`` (int32).

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
    mean = as_array(running_mean, "running_mean")
    var = as_array(running_var, "running_var")
    if mean.ndim != 1 or var.shape != mean.shape:
        raise ValueError(
            f"running_mean and running_var must be 1-D of the same shape, got {mean.shape} and "
            f"{var.shape}"
        )
    params: dict[str, np.ndarray] = {}
    if weight is not None:
        params["scale"] = _check_vector(weight, mean.shape[0], "weight", "running_mean")
    if bias is not None:
        params["bias"] = _check_vector(bias, mean.shape[0], "bias", "running_mean")
    stats = {"mean": mean, "var": var}
    if keep_count:
        count = 0 if num_batches_tracked is None else int(np.asarray(num_batches_tracked))
        stats["count"] = np.asarray(count, dtype=np.int32)
    return params, stats


def batch_norm_to_torch(
    params: Mapping[str, Any], batch_stats: Mapping[str, Any]
) -> dict[str, np.ndarray]:
    """Converts Flax batch-norm ``params`` and ``batch_stats`` to torch ``BatchNormNd`` tensors.

    ``num_batches_tracked`` (int64, as torch stores it) is ``batch_stats["count"]`` when present
    and 0 otherwise; torch reads it only when its ``momentum`` is None.

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
