"""Whole torch state dicts to Flax ``{"params", "batch_stats"}`` and back, with numpy only.

A torch state dict is flat (``"layer1.0.conv1.weight"``); Flax variables are nested by module.
Each module is converted by the entry of :data:`_KINDS` for its layer kind, which names the
tensors that kind may hold on either side and converts them (:mod:`jaxinit._src.torch_layers`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from jaxinit._src import torch_layers as layers
from jaxinit._src import torch_reparam as reparam

__all__ = ["flax_to_torch_state_dict", "torch_state_dict_to_flax"]

Arrays = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class _Kind:
    """How one layer kind converts.

    Attributes:
        torch_names: the torch tensor names (after the module prefix) the kind may hold.
        required: the torch tensor names it must hold.
        flax_names: the Flax ``params`` leaf names the kind may hold.
        from_torch: ``(prefix, tensors, keep_count) -> (params, batch_stats)``.
        to_torch: ``(params, batch_stats) -> tensors``.
    """

    torch_names: frozenset[str]
    required: frozenset[str]
    flax_names: frozenset[str]
    from_torch: Callable[[str, Mapping[str, np.ndarray], bool], tuple[Arrays, Arrays]]
    to_torch: Callable[[Mapping[str, Any], Mapping[str, Any]], Arrays]


def _batch_norm(
    prefix: str, tensors: Mapping[str, np.ndarray], keep_count: bool
) -> tuple[Arrays, Arrays]:
    names = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    return layers.batch_norm_from_torch(*(tensors.get(n) for n in names), keep_count=keep_count)


def _embed(
    prefix: str, tensors: Mapping[str, np.ndarray], keep_count: bool
) -> tuple[Arrays, Arrays]:
    w = tensors["weight"]
    if w.ndim != 2:
        raise ValueError(f"embedding {prefix!r} must be 2-D, got shape {w.shape}")
    return {"embedding": w}, {}


def _renamed(tensors: Mapping[str, Any], names: Mapping[str, str]) -> Arrays:
    return {names.get(k, k): np.asarray(v) for k, v in tensors.items()}


def _norm(
    prefix: str, tensors: Mapping[str, np.ndarray], keep_count: bool
) -> tuple[Arrays, Arrays]:
    """A LayerNorm/GroupNorm/RMSNorm: ``weight`` -> ``scale``, shapes kept (of any rank)."""
    w, b = tensors.get("weight"), tensors.get("bias")
    if w is not None and b is not None and w.shape != b.shape:
        raise ValueError(
            f"torch norm {prefix!r}: bias shape {b.shape} differs from weight shape {w.shape}"
        )
    return _renamed(tensors, {"weight": "scale"}), {}


_WEIGHT = frozenset({"weight"})
_AFFINE = frozenset({"weight", "bias"})
_SCALE = frozenset({"scale", "bias"})
_BN_STATS = frozenset({"running_mean", "running_var", "num_batches_tracked"})


def _kernel_kind(
    from_torch: Callable[[np.ndarray, np.ndarray | None], Arrays],
    to_torch: Callable[[Mapping[str, Any]], Arrays],
) -> _Kind:
    """A Linear or Conv: ``weight`` and ``bias`` in torch, ``kernel`` and ``bias`` in Flax."""
    return _Kind(
        _AFFINE,
        _WEIGHT,
        frozenset({"kernel", "bias"}),
        lambda prefix, t, keep_count: (from_torch(t["weight"], t.get("bias")), {}),
        lambda params, stats: to_torch(params),
    )


def _norm_kind(torch_names: frozenset[str], flax_names: frozenset[str]) -> _Kind:
    """A norm layer: ``weight`` (and ``bias``) in torch, ``scale`` (and ``bias``) in Flax."""
    return _Kind(
        torch_names,
        frozenset(),
        flax_names,
        _norm,
        lambda params, stats: _renamed(params, {"scale": "weight"}),
    )


_NORM = _norm_kind(_AFFINE, _SCALE)

_KINDS: dict[str, _Kind] = {
    "linear": _kernel_kind(layers.linear_from_torch, layers.linear_to_torch),
    "conv": _kernel_kind(layers.conv_from_torch, layers.conv_to_torch),
    "batch_norm": _Kind(
        _AFFINE | _BN_STATS, frozenset(), _SCALE, _batch_norm, layers.batch_norm_to_torch
    ),
    "norm": _NORM,
    "layer_norm": _NORM,
    "group_norm": _NORM,
    # torch's RMSNorm, like Flax's, has a weight (scale) only.
    "rms_norm": _norm_kind(_WEIGHT, frozenset({"scale"})),
    "embed": _Kind(
        _WEIGHT,
        _WEIGHT,
        frozenset({"embedding"}),
        _embed,
        lambda params, stats: _renamed(params, {"embedding": "weight"}),
    ),
}
_KIND_NAMES = tuple(_KINDS)
_TORCH_NAMES = frozenset().union(*(k.torch_names for k in _KINDS.values()))


# --------------------------------------------------------------------------- torch -> Flax


def _check_kinds(kinds: Mapping[str, str]) -> None:
    for prefix, kind in kinds.items():
        if kind not in _KINDS:
            raise ValueError(f"kinds[{prefix!r}] must be one of {_KIND_NAMES}, got {kind!r}")


def _group_by_module(state_dict: Mapping[str, Any]) -> dict[str, dict[str, np.ndarray]]:
    """Splits each name at its last dot: ``{module prefix: {tensor name: array}}``."""
    modules: dict[str, dict[str, np.ndarray]] = {}
    for name, value in state_dict.items():
        prefix, _, leaf = name.rpartition(".")
        modules.setdefault(prefix, {})[leaf] = layers.as_array(value, name)
    return modules


def _dotted(prefix: str, names: list[str]) -> list[str]:
    return [f"{prefix}.{n}" if prefix else n for n in names]


def _infer_kind(prefix: str, tensors: Mapping[str, np.ndarray]) -> str:
    """Checks the tensor names, then infers the kind.

    Running statistics make a batch norm; a bias of the weight's shape (a Linear's or a Conv's
    bias is 1-D) makes a norm; otherwise the weight's rank decides: 2 linear, 3-5 conv, 1 norm.
    """
    unknown = sorted(set(tensors) - _TORCH_NAMES)
    if unknown:
        raise ValueError(
            f"cannot convert torch tensors {_dotted(prefix, unknown)}"
            f": only {sorted(_TORCH_NAMES)} of Linear, Conv, BatchNorm, LayerNorm/GroupNorm/"
            f"RMSNorm and Embedding modules are supported"
        )
    if "running_mean" in tensors or "running_var" in tensors:
        return "batch_norm"
    if "weight" not in tensors:
        raise ValueError(
            f"cannot tell the layer type of torch module {prefix!r} (tensors {sorted(tensors)}); "
            f"name it in `kinds`, one of {_KIND_NAMES}"
        )
    w, b = tensors["weight"], tensors.get("bias")
    ndim = w.ndim
    if ndim == 1 or (b is not None and b.shape == w.shape):
        return "norm"
    if ndim == 2:
        return "linear"
    if 3 <= ndim <= 5:
        return "conv"
    raise ValueError(
        f"torch module {prefix!r} has a weight of unsupported rank {ndim}; name a norm's weight "
        f'in `kinds` ("layer_norm", "rms_norm")'
    )


def _check_tensors(prefix: str, kind: str, tensors: Mapping[str, np.ndarray]) -> None:
    unknown = sorted(set(tensors) - _KINDS[kind].torch_names)
    if unknown:
        raise ValueError(
            f"torch module {prefix!r} ({kind}) has tensors it cannot convert: "
            f"{_dotted(prefix, unknown)}"
        )
    missing = sorted(_KINDS[kind].required - set(tensors))
    if missing:
        raise ValueError(
            f"torch module {prefix!r} ({kind}) lacks tensors {_dotted(prefix, missing)}"
        )


def _flax_path(prefix: str, rename: Mapping[str, str]) -> tuple[str, ...]:
    path = rename.get(prefix, prefix.replace(".", "/"))
    return tuple(p for p in path.split("/") if p)


def _place(tree: dict[str, Any], path: tuple[str, ...], leaves: Mapping[str, Any]) -> None:
    """Puts ``leaves`` at ``path`` in the nested dict ``tree``, refusing to overwrite."""
    node = tree
    for name in path:
        node = node.setdefault(name, {})
    for k, v in leaves.items():
        if k in node:
            raise ValueError(f"two torch modules map to the same Flax path {'/'.join(path)!r}")
        node[k] = v


def torch_state_dict_to_flax(
    state_dict: Mapping[str, Any],
    *,
    rename: Mapping[str, str] | None = None,
    kinds: Mapping[str, str] | None = None,
    keep_count: bool = False,
    wrappers: Mapping[str, str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Converts a torch state dict (name -> array) to Flax ``{"params", "batch_stats"}``.

    Names are grouped by module prefix (everything before the last ``.``) and each module's kind
    is inferred: running statistics make a batch norm; a 1-D weight, or a bias of the weight's
    shape, a LayerNorm/GroupNorm/RMSNorm; otherwise a 2-D weight a Linear and a weight of rank
    3-5 a Conv. A norm's ``weight`` becomes ``scale``, shape kept. Name in ``kinds`` what that
    misreads: an ``nn.Embedding`` (a 2-D weight) as ``"embed"``, and an ``RMSNorm`` or a
    ``LayerNorm(bias=False)`` over several axes (a weight of rank >= 2 and no bias, read as a
    Linear or Conv) as ``"rms_norm"`` or ``"layer_norm"``. A module's Flax path is its prefix split at the dots
    (``"layer1.0.conv1"`` -> ``layer1/0/conv1``) unless ``rename`` gives a ``"/"``-separated one.

    Weight-normalized and spectral-normalized layers (torch's ``parametrizations.weight_norm``
    / ``spectral_norm`` tensors, or the older ``weight_g``/``weight_v`` and
    ``weight_orig``/``weight_u``/``weight_v``) become the variables of ``jaxinit.linen.WeightNorm``
    / ``SpectralNorm`` wrapping the layer: the layer keeps ``v`` (or the raw weight) as its
    kernel, and a sibling wrapper module (``WeightNorm_0``, ``SpectralNorm_0``, ... in the order
    met under each parent, or the name ``wrappers`` gives for the layer's prefix) holds
    ``{layer}/kernel/scale`` (``g``), or ``{layer}/kernel/u`` and ``{layer}/kernel/sigma`` in
    ``batch_stats``. jaxinit's eval then gives torch's eval output (for converged vectors).

    Flattening a conv feature map orders features (C, H, W) in torch and (H, W, C) in Flax: the
    rows of a Linear kernel after a flatten must be permuted by hand.

    Args:
        state_dict: torch tensor names to array-likes (``{k: v.numpy() for k, v in ...}``).
        rename: optional map from torch module prefix to Flax path.
        kinds: optional map from torch module prefix to one of ``"linear"``, ``"conv"``,
            ``"batch_norm"``, ``"norm"``, ``"layer_norm"``, ``"group_norm"``, ``"rms_norm"``,
            ``"embed"``. The norm kinds take a weight of any rank; ``"rms_norm"`` rejects a
            bias, as torch's RMSNorm has none.
        keep_count: keep batch-norm ``num_batches_tracked`` as ``batch_stats[...]["count"]``.
        wrappers: optional map from a weight- or spectral-normalized layer's torch prefix to
            the Flax name of its wrapper module.

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
        >>> v = torch_state_dict_to_flax({"rms.weight": np.ones((4, 8))}, kinds={"rms": "rms_norm"})
        >>> v["params"]["rms"]["scale"].shape
        (4, 8)
    """
    rename, kinds = dict(rename or {}), dict(kinds or {})
    _check_kinds(kinds)
    state_dict, wrapped = reparam.split_from_torch(state_dict)
    params: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    for prefix, tensors in _group_by_module(state_dict).items():
        kind = kinds.get(prefix) or _infer_kind(prefix, tensors)
        _check_tensors(prefix, kind, tensors)
        p, s = _KINDS[kind].from_torch(prefix, tensors, keep_count)
        path = _flax_path(prefix, rename)
        if p:
            _place(params, path, p)
        if s:
            _place(stats, path, s)
    counts: dict[tuple, int] = {}
    for prefix, item in wrapped.items():
        path = _flax_path(prefix, rename)
        cls, p, s = reparam.wrapper_leaves(item, path[-1])
        name = (wrappers or {}).get(prefix)
        if name is None:
            counts[(path[:-1], cls)] = counts.get((path[:-1], cls), -1) + 1
            name = f"{cls}_{counts[(path[:-1], cls)]}"
        if p:
            _place(params, (*path[:-1], name), p)
        if s:
            _place(stats, (*path[:-1], name), s)
    return {"params": params, "batch_stats": stats}


# --------------------------------------------------------------------------- Flax -> torch


def _flax_modules(tree: Mapping[str, Any], path: tuple[str, ...] = ()) -> dict:
    """Maps each node path that holds arrays to ``{leaf name: array}``."""
    found: dict[tuple[str, ...], dict[str, Any]] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            found.update(_flax_modules(v, (*path, str(k))))
        else:
            found.setdefault(path, {})[str(k)] = v
    return found


def _flax_kind(params: Mapping[str, Any], has_stats: bool) -> str:
    if has_stats:
        return "batch_norm"
    if "kernel" in params:
        return "linear" if np.ndim(params["kernel"]) == 2 else "conv"
    return "embed" if "embedding" in params else "norm"


def flax_to_torch_state_dict(
    variables: Mapping[str, Any],
    *,
    rename: Mapping[str, str] | None = None,
) -> dict[str, np.ndarray]:
    """Converts Flax ``{"params", "batch_stats"}`` back to a flat torch state dict of numpy arrays.

    The inverse of :func:`torch_state_dict_to_flax`: a 2-D ``kernel`` becomes a Linear weight, a
    ``kernel`` of rank 3-5 a Conv weight, ``embedding`` an Embedding weight, a node with
    ``batch_stats`` a BatchNorm (``num_batches_tracked`` from ``count``, else 0) and ``scale``
    (and ``bias``) without statistics a LayerNorm/GroupNorm/RMSNorm ``weight`` (and ``bias``) of
    the same shape, of any rank. A layer wrapped by ``jaxinit.linen.WeightNorm`` /
    ``SpectralNorm`` gets torch's ``parametrizations.weight.*`` tensors (``original0``/``original1``,
    or ``original`` and ``0._u``/``0._v`` with ``v = normalize(W^T u)``).

    Args:
        variables: ``{"params": ..., "batch_stats": ...}`` (``batch_stats`` optional).
        rename: the torch-prefix -> Flax-path map given to :func:`torch_state_dict_to_flax`.

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
    params = _flax_modules(variables.get("params", {}))
    stats = _flax_modules(variables.get("batch_stats", {}))
    wrapped = reparam.from_flax(params, stats)
    out: dict[str, np.ndarray] = {}
    for path in list(params) + [p for p in stats if p not in params]:
        p, s = params.get(path, {}), stats.get(path)
        path_str = "/".join(path)
        kind = _KINDS[_flax_kind(p, s is not None)]
        unknown = sorted(set(p) - kind.flax_names)
        if unknown:
            raise ValueError(f"cannot convert Flax parameters {unknown} at {path_str!r} to torch")
        prefix = inverse.get(path_str, ".".join(path))
        tensors = kind.to_torch(p, s or {})
        if path in wrapped:
            tensors.update(reparam.to_torch(wrapped[path], tensors.pop("weight")))
        for name, value in tensors.items():
            out[f"{prefix}.{name}" if prefix else name] = value
    return out
