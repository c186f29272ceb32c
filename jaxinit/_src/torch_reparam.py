"""torch's weight-norm and spectral-norm tensors in state dicts, and jaxinit's wrappers' variables.

torch keeps a weight-normalized layer's weight as ``g`` and ``v``:
``parametrizations.weight.original0`` (g, shape ``(out, 1, ...)``) and ``original1`` (v) with
``torch.nn.utils.parametrizations.weight_norm``, or ``weight_g`` / ``weight_v`` with the older
``torch.nn.utils.weight_norm``. A spectral-normalized layer keeps the raw weight and the power
iteration's vectors: ``parametrizations.weight.original``, ``parametrizations.weight.0._u``
(out) and ``._v`` (in), or ``weight_orig`` / ``weight_u`` / ``weight_v``. The older styles share
the name ``weight_v``; ``weight_g`` or ``weight_orig`` tells which it is.

In Flax (``jaxinit.linen.WeightNorm`` / ``SpectralNorm`` wrapping a Dense or Conv named
``layer``), the layer holds the raw kernel (v, or the unnormalized weight) and the wrapper, a
sibling module, holds ``{layer}/kernel/scale`` (params) or ``{layer}/kernel/u`` (shape
``(1, out)``) and ``{layer}/kernel/sigma`` (batch_stats).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["from_flax", "split_from_torch"]

_P = "parametrizations.weight."
WEIGHT_NORM = {f"{_P}original0": "g", f"{_P}original1": "v", "weight_g": "g", "weight_v": "v"}
SPECTRAL = {f"{_P}original": "w", f"{_P}0._u": "u", f"{_P}0._v": "v"}
SPECTRAL_OLD = {"weight_orig": "w", "weight_u": "u", "weight_v": "v"}


def _module_tensors(state_dict: Mapping[str, Any], names: Mapping[str, str]) -> dict:
    """``{prefix: {role: array}}`` for the tensors whose name ends in one of ``names``."""
    found: dict[str, dict[str, np.ndarray]] = {}
    for key, value in state_dict.items():
        for suffix, role in names.items():
            if key == suffix or key.endswith("." + suffix):
                prefix = key[: -len(suffix)].rstrip(".")
                found.setdefault(prefix, {})[role] = np.asarray(value)
    return found


def split_from_torch(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Rewrites weight-norm and spectral-norm tensors as plain weights.

    Returns:
        ``(plain, wrapped)``: the state dict with each such layer's tensors replaced by one
        ``{prefix}.weight`` (v, or the unnormalized weight, torch layout), and
        ``{prefix: ("weight_norm", g) or ("spectral_norm", u, sigma)}`` with ``g`` of shape
        ``(out,)``, ``u`` of shape ``(1, out)`` and torch's ``sigma = u . (W v)``.

    Raises:
        ValueError: a layer with only part of a parametrization's tensors.
    """
    plain = dict(state_dict)
    wrapped: dict[str, Any] = {}
    old_spectral = {
        p for p, t in _module_tensors(state_dict, {"weight_orig": "w"}).items() if "w" in t
    }
    weight_norm = {
        p: t for p, t in _module_tensors(state_dict, WEIGHT_NORM).items() if p not in old_spectral
    }
    spectral = _module_tensors(state_dict, SPECTRAL)
    for p, t in _module_tensors(state_dict, SPECTRAL_OLD).items():
        if p in old_spectral:
            spectral[p] = t
    for prefix, t in weight_norm.items():
        if set(t) != {"g", "v"}:
            raise ValueError(
                f"torch module {prefix!r} has weight-norm tensors {sorted(t)} but needs both g "
                f"and v (original0 and original1, or weight_g and weight_v)"
            )
        g, v = t["g"], t["v"]
        if g.shape != (v.shape[0],) + (1,) * (v.ndim - 1):
            raise ValueError(
                f"torch module {prefix!r}: weight-norm g has shape {g.shape}; expected "
                f"{(v.shape[0],) + (1,) * (v.ndim - 1)} for v of shape {v.shape} (dim=0)"
            )
        wrapped[prefix] = ("weight_norm", g.reshape(-1))
        _replace(plain, prefix, WEIGHT_NORM, v)
    for prefix, t in spectral.items():
        if set(t) != {"w", "u", "v"}:
            raise ValueError(
                f"torch module {prefix!r} has spectral-norm tensors {sorted(t)} but needs the "
                f"weight and both vectors"
            )
        w, u, v = t["w"], t["u"], t["v"]
        mat = w.reshape(w.shape[0], -1).astype(np.float64)
        if u.shape != (mat.shape[0],) or v.shape != (mat.shape[1],):
            raise ValueError(
                f"torch module {prefix!r}: spectral-norm u {u.shape} and v {v.shape} do not fit "
                f"the weight {w.shape} (expected {(mat.shape[0],)} and {(mat.shape[1],)})"
            )
        sigma = np.asarray(u.astype(np.float64) @ (mat @ v.astype(np.float64)), np.float32)
        wrapped[prefix] = ("spectral_norm", u.reshape(1, -1).astype(np.float32), sigma)
        _replace(plain, prefix, {**SPECTRAL, **SPECTRAL_OLD}, w)
    return plain, wrapped


def _replace(sd: dict[str, Any], prefix: str, names: Mapping[str, str], weight: Any) -> None:
    for suffix in names:
        sd.pop(f"{prefix}.{suffix}" if prefix else suffix, None)
    sd[f"{prefix}.weight" if prefix else "weight"] = weight


def wrapper_leaves(kind_and_arrays: tuple, layer: str) -> tuple[str, dict, dict]:
    """The wrapper's class name, params and batch_stats for the layer named ``layer``."""
    if kind_and_arrays[0] == "weight_norm":
        return "WeightNorm", {f"{layer}/kernel/scale": kind_and_arrays[1]}, {}
    _, u, sigma = kind_and_arrays
    return "SpectralNorm", {}, {f"{layer}/kernel/u": u, f"{layer}/kernel/sigma": sigma}


def from_flax(
    params: dict[tuple[str, ...], dict[str, Any]], stats: dict[tuple[str, ...], dict[str, Any]]
) -> dict[tuple[str, ...], tuple]:
    """Finds jaxinit's wrapper nodes and removes them from ``params`` / ``stats`` (in place).

    Returns:
        ``{layer path: ("weight_norm", scale) or ("spectral_norm", u)}`` for each wrapped layer.
    """
    found: dict[tuple[str, ...], tuple] = {}
    for path in list(params):
        leaves = params[path]
        if leaves and all(k.endswith("/kernel/scale") for k in leaves):
            for k, scale in leaves.items():
                found[(*path[:-1], k[: -len("/kernel/scale")])] = ("weight_norm", np.asarray(scale))
            del params[path]
    for path in list(stats):
        leaves = stats[path]
        if leaves and all(k.endswith(("/kernel/u", "/kernel/sigma")) for k in leaves):
            for k, u in leaves.items():
                if k.endswith("/kernel/u"):
                    found[(*path[:-1], k[: -len("/kernel/u")])] = ("spectral_norm", np.asarray(u))
            del stats[path]
    return found


def to_torch(kind_and_array: tuple, weight: np.ndarray) -> dict[str, np.ndarray]:
    """Torch's parametrization tensors (the current style) for a converted torch ``weight``."""
    if kind_and_array[0] == "weight_norm":
        g = np.asarray(kind_and_array[1]).reshape((weight.shape[0],) + (1,) * (weight.ndim - 1))
        return {f"{_P}original0": g.astype(weight.dtype), f"{_P}original1": weight}
    u = np.asarray(kind_and_array[1]).reshape(-1)
    mat = weight.reshape(weight.shape[0], -1).astype(np.float64)
    v = mat.T @ u.astype(np.float64)
    v = v / max(np.linalg.norm(v), 1e-12)
    return {
        f"{_P}original": weight,
        f"{_P}0._u": u.astype(weight.dtype),
        f"{_P}0._v": v.astype(weight.dtype),
    }
