"""The maximal update parametrization (muP), Tensor Programs V (Yang et al., 2022), Table 3.

Widths are measured against a base model: a width dimension's ``mult`` is its size here over its
size in the base model, and a leaf's ``fan_in_mult`` and ``fan_out_mult`` are the products of the
mults of its input and output axes. Every parameter gets a kind:

========  ==========================  ==================  =====================
kind      width dimensions            init variance       learning rate (Adam / SGD)
========  ==========================  ==================  =====================
input     outputs only                ``1/fan_in``        ``eta`` / ``eta*fan_out_mult``
hidden    inputs and outputs          ``1/fan_in``        ``eta/fan_in_mult`` / ``eta``
output    inputs only (the readout)   ``1/(fan_in*m)``    ``eta/fan_in_mult`` / ``eta/fan_in_mult``
vector    its one axis (bias, scale)  kept                ``eta`` / ``eta*fan_out_mult``
fixed     none                        kept                ``eta`` / ``eta``
========  ==========================  ==================  =====================

(``m`` is the output kernel's ``fan_in_mult``.) At the base width every factor is 1, so muP and the
standard parametrization coincide there: hyperparameters tuned on the base model transfer.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxinit._src.axes import canonical_axes
from jaxinit._src.fans import compute_fans
from jaxinit._src.initializers import variance_scaling, zeros

Kind = Literal["input", "hidden", "output", "vector", "fixed"]
KINDS: tuple[str, ...] = ("input", "hidden", "output", "vector", "fixed")
OPTIMIZERS: tuple[str, ...] = ("adam", "sgd")
_AXIS_KEYS = ("in_axis", "out_axis", "batch_axis")
_OVERRIDE_KEYS = (*_AXIS_KEYS, "kind")


@dataclasses.dataclass(frozen=True)
class MupInfo:
    """How one parameter scales with width under muP.

    A frozen dataclass, not a pytree node: ``jax.tree.map`` over a tree of infos sees one leaf per
    parameter.

    Attributes:
        kind: ``"input"``, ``"hidden"``, ``"output"``, ``"vector"`` or ``"fixed"``.
        fan_in_mult: the product of the width mults of the input axes (1 when none is a width).
        fan_out_mult: the product of the width mults of the output axes.
        in_axis: the leaf's input axes (non-negative), which :func:`mup_init` computes fans with.
        out_axis: its output axes.
        batch_axis: its batch axes (e.g. experts), ignored by the fans.

    Example:
        >>> import jaxinit as ji
        >>> info = ji.MupInfo("hidden", fan_in_mult=4.0, fan_out_mult=4.0)
        >>> info.kind, info.fan_in_mult
        ('hidden', 4.0)
    """

    kind: Kind
    fan_in_mult: float = 1.0
    fan_out_mult: float = 1.0
    in_axis: tuple[int, ...] = ()
    out_axis: tuple[int, ...] = ()
    batch_axis: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(
                f"MupInfo: unknown kind {self.kind!r}; expected one of {', '.join(map(repr, KINDS))}."
            )
        for name in ("fan_in_mult", "fan_out_mult"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float | np.number):
                raise TypeError(f"MupInfo: {name} must be a number, got {value!r}.")
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"MupInfo: {name} must be finite and > 0, got {value!r}.")
            object.__setattr__(self, name, float(value))
        for name in _AXIS_KEYS:
            object.__setattr__(self, name, tuple(int(a) for a in getattr(self, name)))

    def lr_factor(self, optimizer: str = "adam") -> float:
        """The learning-rate factor of this parameter for ``"adam"`` or ``"sgd"`` (Table 3).

        Example:
            >>> import jaxinit as ji
            >>> ji.MupInfo("output", 4.0, 1.0).lr_factor("sgd")
            0.25
        """
        _check_optimizer(optimizer, "MupInfo.lr_factor")
        if self.kind == "fixed":
            return 1.0
        if optimizer == "adam":
            return 1.0 / self.fan_in_mult if self.kind in ("hidden", "output") else 1.0
        if self.kind in ("input", "vector"):
            return self.fan_out_mult
        return 1.0 / self.fan_in_mult if self.kind == "output" else 1.0


def _check_optimizer(optimizer: Any, who: str) -> None:
    if optimizer not in OPTIMIZERS:
        raise ValueError(
            f"{who}: optimizer={optimizer!r} is not supported; expected 'adam' (also for "
            "AdamW, Adafactor-like and other entrywise-normalized updates) or 'sgd'."
        )


# --------------------------------------------------------------------------- paths and shapes


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_name(path: Sequence[Any]) -> str:
    """A tree path as ``"a/b/c"``; nnx's trailing ``.value`` of a Variable is dropped."""
    keys = list(path)
    if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
        keys = keys[:-1]
    return "/".join(_key_name(k) for k in keys)


def _leaves_with_paths(tree: Any, what: str) -> tuple[list[str], list[Any], Any]:
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    if not flat:
        raise ValueError(f"mup_infos: {what} has no leaves.")
    return [path_name(p) for p, _ in flat], [leaf for _, leaf in flat], treedef


def _shape(leaf: Any, path: str, what: str) -> tuple[int, ...]:
    shape = getattr(leaf, "shape", None)
    if shape is None:
        raise TypeError(
            f"mup_infos: leaf {path!r} of {what} is {type(leaf).__name__}, not an array "
            "(arrays and jax.ShapeDtypeStruct leaves are compared by shape)."
        )
    return tuple(int(d) for d in shape)


def _match_overrides(
    paths: Sequence[str], overrides: Mapping[Any, Mapping[str, Any]] | None
) -> dict[str, dict[str, Any]]:
    """Maps each overridden path to its axes: exact paths first, then ``fnmatch`` patterns.

    A key matching no path, or a path matched by two patterns, is an error.
    """
    if not overrides:
        return {}
    found: dict[str, dict[str, Any]] = {}
    patterns: dict[str, str] = {}
    items = sorted(
        ((k if isinstance(k, str) else "/".join(map(str, k)), v) for k, v in overrides.items()),
        key=lambda item: item[0] not in paths,
    )
    for name, axes in items:
        if not isinstance(axes, Mapping) or not axes or not set(axes) <= set(_OVERRIDE_KEYS):
            raise ValueError(
                f"mup_infos: overrides[{name!r}] must be a dict with keys from {_AXIS_KEYS} "
                f"(what ji.einsum_axes returns) or kind='vector', got {axes!r}."
            )
        if "kind" in axes and (axes["kind"] != "vector" or len(axes) > 1):
            raise ValueError(
                f"mup_infos: overrides[{name!r}] = {dict(axes)!r}: the only kind an override may "
                "set is 'vector' (a bias or scale of any rank), and without axes."
            )
        if name in paths:
            found[name] = dict(axes)
            continue
        hits = [p for p in paths if fnmatch.fnmatchcase(p, name)]
        if not hits:
            shown = ", ".join(map(repr, paths[:4])) + (", ..." if len(paths) > 4 else "")
            raise ValueError(
                f"mup_infos: overrides key {name!r} matches no parameter path; paths look like "
                f"{shown}."
            )
        for p in hits:
            if p in patterns:
                raise ValueError(
                    f"mup_infos: parameter {p!r} matches the overrides {patterns[p]!r} and "
                    f"{name!r}; make the patterns disjoint or name the path exactly."
                )
            if p not in found:
                found[p], patterns[p] = dict(axes), name
    return found


def _kernel_axes(
    path: str, shape: tuple[int, ...], axes: Mapping[str, Any] | None
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Canonical (in, out, batch) axes of a kernel: jax's convention or the override."""
    ndim = len(shape)
    spec = {"in_axis": -2, "out_axis": -1, "batch_axis": ()}
    if axes is not None:
        spec.update({"in_axis": (), "out_axis": ()})
        spec.update(axes)
    try:
        compute_fans(shape, **spec)
        return tuple(canonical_axes(ndim, spec[k], k, shape) for k in _AXIS_KEYS)  # type: ignore[return-value]
    except ValueError as err:
        raise ValueError(f"mup_infos: parameter {path!r} (shape {shape}): {err}") from None


def _info(
    path: str,
    shape: tuple[int, ...],
    base: tuple[int, ...],
    delta: tuple[int, ...] | None,
    axes: Mapping[str, Any] | None,
) -> MupInfo:
    if len(shape) != len(base) or (delta is not None and len(delta) != len(shape)):
        shapes = f"shape {shape}, base {base}" + (f", delta {delta}" if delta is not None else "")
        raise ValueError(
            f"mup_infos: parameter {path!r} cannot be compared: {shapes} differ in rank."
        )
    if delta is None:
        width = [s != b for s, b in zip(shape, base, strict=True)]
    else:
        width = [d != b for d, b in zip(delta, base, strict=True)]
        for a, (s, b) in enumerate(zip(shape, base, strict=True)):
            if not width[a] and s != b:
                raise ValueError(
                    f"mup_infos: parameter {path!r}: axis {a} is {s} here and {b} in the base but "
                    f"the same in delta_params ({delta}), so it is not a width dimension; "
                    "expected equal sizes."
                )
    if any(w and b == 0 for w, b in zip(width, base, strict=True)):
        raise ValueError(
            f"mup_infos: parameter {path!r}: a width axis has size 0 in the base {base}."
        )
    mult = [s / b if w else 1.0 for s, b, w in zip(shape, base, width, strict=True)]
    if axes is not None and "kind" in axes:
        every = tuple(range(len(shape)))
        if any(width):
            return MupInfo("vector", 1.0, math.prod(mult), (), every, ())
        return MupInfo("fixed", 1.0, 1.0, (), every, ())
    if len(shape) == 0 or (len(shape) == 1 and axes is None):
        if width and width[0]:
            return MupInfo("vector", 1.0, mult[0], (), (0,), ())
        return MupInfo("fixed", 1.0, 1.0, (), tuple(range(len(shape))), ())
    in_axes, out_axes, batch_axes = _kernel_axes(path, shape, axes)
    stray = [a for a in range(len(shape)) if width[a] and a not in in_axes + out_axes]
    if stray:
        raise ValueError(
            f"mup_infos: parameter {path!r} (shape {shape}, base {base}): axis {stray[0]} changes "
            f"with width but is not an input or output axis (in_axis={in_axes}, "
            f"out_axis={out_axes}); give this path its axes in overrides, e.g. "
            "overrides={path: ji.einsum_axes(equation)}."
        )
    in_w = any(width[a] for a in in_axes)
    out_w = any(width[a] for a in out_axes)
    kind = {(True, True): "hidden", (False, True): "input", (True, False): "output"}.get(
        (in_w, out_w), "fixed"
    )
    return MupInfo(
        kind,  # type: ignore[arg-type]
        math.prod(mult[a] for a in in_axes),
        math.prod(mult[a] for a in out_axes),
        in_axes,
        out_axes,
        batch_axes,
    )


def mup_infos(
    params: Any,
    base_params: Any,
    *,
    delta_params: Any = None,
    overrides: Mapping[Any, Mapping[str, Any]] | None = None,
) -> Any:
    """Classifies every parameter for muP by comparing its shape with the base model's.

    Only shapes are compared, so ``jax.eval_shape`` output (or ``nnx.eval_shape``) serves as the
    base. Kernels follow jax's convention (inputs on axis -2, outputs on -1, other axes receptive
    field, as in a conv kernel); 1-D leaves are biases and scales ("vector" when their axis is a
    width, else "fixed"). A width dimension is one whose size differs from the base; when
    ``params`` is itself at the base width, pass ``delta_params`` (the model at a third width) to
    say which dimensions are widths, as the mup package's ``set_base_shapes(model, base, delta)``
    does.

    Multi-head and expert kernels need their axes: ``overrides`` maps a parameter path ("a/b/c",
    the keys joined by "/"; nnx's trailing ``.value`` dropped) or an ``fnmatch`` pattern of paths
    (``"*/query/kernel"``) to ``dict(in_axis=..., out_axis=..., batch_axis=...)``, which is what
    :func:`jaxinit.einsum_axes` returns. An exact path wins over patterns. For an embedding table
    ``(vocab, width)`` (one-hot inputs, so fan_in 1) pass ``dict(batch_axis=0, out_axis=1)``; for
    a bias or scale of rank 2 or more (an attention bias ``(heads, head_dim)``) pass
    ``dict(kind="vector")``, which makes every axis an output axis.

    Args:
        params: the model's parameters (a linen params dict, an ``nnx.State``, any pytree).
        base_params: the base model's, of the same tree structure.
        delta_params: optionally, the model at another width than the base, same structure.
        overrides: path or pattern to fan axes, for kernels outside jax's convention.

    Returns:
        A pytree of :class:`MupInfo`, of ``params``' structure.

    Raises:
        ValueError: trees of different structure, a leaf whose shape cannot be compared with the
          base (naming its path), a width axis that is neither an input nor an output axis, or an
          override matching no path.
        TypeError: a leaf without a shape.

    Example:
        >>> import jax, jax.numpy as jnp, jaxinit as ji
        >>> def mlp(width):
        ...     return {"in": jnp.zeros((8, width)), "hidden": jnp.zeros((width, width)),
        ...             "bias": jnp.zeros((width,)), "out": jnp.zeros((width, 10))}
        >>> infos = ji.mup_infos(mlp(256), jax.eval_shape(lambda: mlp(64)))
        >>> {k: (i.kind, i.fan_in_mult) for k, i in infos.items()}
        {'bias': ('vector', 1.0), 'hidden': ('hidden', 4.0), 'in': ('input', 1.0), 'out': ('output', 4.0)}
    """
    paths, leaves, treedef = _leaves_with_paths(params, "params")
    trees = {"base_params": base_params}
    if delta_params is not None:
        trees["delta_params"] = delta_params
    shapes: dict[str, list[tuple[int, ...]]] = {}
    for what, tree in trees.items():
        other_paths, other_leaves, _ = _leaves_with_paths(tree, what)
        if other_paths != paths:
            mine = [p for p in paths if p not in other_paths]
            theirs = [p for p in other_paths if p not in paths]
            where = (
                f"only in params: {', '.join(map(repr, mine)) or '-'}; only in {what}: "
                f"{', '.join(map(repr, theirs)) or '-'}"
                if mine or theirs
                else "the same paths in another order"
            )
            raise ValueError(
                f"mup_infos: params and {what} have different tree structures: {where}."
            )
        shapes[what] = [_shape(x, p, what) for p, x in zip(paths, other_leaves, strict=True)]
    axes = _match_overrides(paths, overrides)
    infos = [
        _info(
            p,
            _shape(x, p, "params"),
            shapes["base_params"][i],
            shapes["delta_params"][i] if delta_params is not None else None,
            axes.get(p),
        )
        for i, (p, x) in enumerate(zip(paths, leaves, strict=True))
    ]
    return jax.tree_util.tree_unflatten(treedef, infos)


# --------------------------------------------------------------------------- init and lr


def _flat_infos(
    params: Any, infos: Any, who: str
) -> tuple[list[str], list[Any], list[MupInfo], Any]:
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    info_leaves = jax.tree_util.tree_leaves(infos, is_leaf=lambda x: isinstance(x, MupInfo))
    paths = [path_name(p) for p, _ in flat]
    if len(info_leaves) != len(flat):
        raise ValueError(
            f"{who}: params has {len(flat)} leaves but infos has {len(info_leaves)}; pass the "
            "tree ji.mup_infos returned for these params."
        )
    for p, info in zip(paths, info_leaves, strict=True):
        if not isinstance(info, MupInfo):
            raise TypeError(f"{who}: the info of {p!r} is {info!r}, not a ji.MupInfo.")
    return [x for _, x in flat], info_leaves, treedef


def mup_init(
    params: Any,
    infos: Any,
    key: jax.Array,
    *,
    zero_readout: bool = False,
    distribution: str = "truncated_normal",
) -> Any:
    """Re-initializes every kernel by its muP rule; vector and fixed leaves are kept as they are.

    Input and hidden kernels get variance ``1/fan_in``, output kernels ``1/(fan_in *
    fan_in_mult)`` (zero with ``zero_readout=True``, which the muP paper recommends), fans from
    each info's axes. The draws are :func:`jaxinit.variance_scaling`'s, so at the base width (every
    mult 1) they are the standard parametrization's ``lecun_normal``. Each re-initialized leaf
    keeps its dtype and gets its own key, split from ``key`` in the order of the tree's leaves.

    Args:
        params: the parameters to re-initialize.
        infos: :func:`mup_infos` of ``params``.
        key: a PRNG key.
        zero_readout: zero the output kernels instead of drawing them.
        distribution: ``"truncated_normal"`` (jax's and flax's default), ``"normal"`` or
            ``"uniform"``.

    Returns:
        New parameters of ``params``' structure.

    Raises:
        ValueError: ``infos`` does not fit ``params``, or an unknown distribution.

    Example:
        >>> import jax, jax.numpy as jnp, jaxinit as ji
        >>> p = {"hidden": jnp.zeros((512, 512)), "out": jnp.zeros((512, 10))}
        >>> infos = ji.mup_infos(p, jax.eval_shape(lambda: {"hidden": jnp.zeros((64, 64)),
        ...                                                  "out": jnp.zeros((64, 10))}))
        >>> new = ji.mup_init(p, infos, jax.random.key(0))
        >>> round(float(new["hidden"].std() * 512**0.5), 1), round(float(new["out"].std() * (512 * 8) ** 0.5), 1)
        (1.0, 1.0)
    """
    who = "mup_init"
    leaves, info_leaves, treedef = _flat_infos(params, infos, who)
    if distribution not in ("truncated_normal", "normal", "uniform"):
        raise ValueError(
            f"{who}: unknown distribution {distribution!r}; expected 'truncated_normal', "
            "'normal' or 'uniform'."
        )
    keys = jax.random.split(key, len(leaves))
    out = []
    for i, (leaf, info) in enumerate(zip(leaves, info_leaves, strict=True)):
        if info.kind in ("vector", "fixed"):
            out.append(leaf)
            continue
        if info.kind == "output" and zero_readout:
            init = zeros
        else:
            scale = 1.0 / info.fan_in_mult if info.kind == "output" else 1.0
            init = variance_scaling(
                scale,
                "fan_in",
                distribution,
                info.in_axis,
                info.out_axis,
                info.batch_axis,  # type: ignore[arg-type]
            )
        out.append(init(keys[i], leaf.shape, leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def lr_factors(infos: Any, *, optimizer: str = "adam") -> Any:
    """Each leaf's learning-rate factor (a Python float), as a tree of ``infos``' structure.

    Example:
        >>> import jaxinit as ji
        >>> from jaxinit._src.mup import lr_factors
        >>> lr_factors({"w": ji.MupInfo("hidden", 4.0, 4.0)})
        {'w': 0.25}
    """
    _check_optimizer(optimizer, "mup_lr_scale")
    return jax.tree.map(
        lambda info: info.lr_factor(optimizer), infos, is_leaf=lambda x: isinstance(x, MupInfo)
    )


def scale_by_tree(factors: Any) -> Any:
    """An optax transformation multiplying each update leaf by the matching leaf of ``factors``."""
    import optax

    def init_fn(params: Any) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update_fn(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        scaled = jax.tree.map(
            lambda u, f: None if u is None else u * jnp.asarray(f, u.dtype),
            updates,
            factors,
            is_leaf=lambda x: x is None,
        )
        return scaled, state

    return optax.GradientTransformation(init_fn, update_fn)


def mup_lr_scale(infos: Any, *, optimizer: str = "adam") -> Any:
    """An optax transformation giving each parameter its muP learning rate.

    Chain it after the optimizer: ``optax.chain(optax.adam(lr), ji.mup_lr_scale(infos))``. It
    multiplies each leaf's update by its factor from Tensor Programs V, Table 3: with ``"adam"``
    (any entrywise-normalized update, AdamW's decoupled weight decay included) hidden and output
    weights get ``1/fan_in_mult``; with ``"sgd"`` input weights and vectors get ``fan_out_mult``
    and output weights ``1/fan_in_mult``. Every other factor is 1; at the base width all are.

    Args:
        infos: :func:`mup_infos` of the parameters being optimized.
        optimizer: which column of the table: ``"adam"`` or ``"sgd"``.

    Returns:
        An ``optax.GradientTransformation`` without state.

    Raises:
        ValueError: for another optimizer.
        TypeError: a leaf of ``infos`` that is not a :class:`MupInfo`.

    Example:
        >>> import jax.numpy as jnp, optax, jaxinit as ji
        >>> infos = {"w": ji.MupInfo("hidden", 4.0, 4.0), "b": ji.MupInfo("vector", 1.0, 4.0)}
        >>> tx = ji.mup_lr_scale(infos)
        >>> updates, _ = tx.update({"w": jnp.ones(2), "b": jnp.ones(2)}, tx.init(None))
        >>> float(updates["w"][0]), float(updates["b"][0])
        (0.25, 1.0)
    """
    for path, info in jax.tree_util.tree_flatten_with_path(
        infos, is_leaf=lambda x: isinstance(x, MupInfo)
    )[0]:
        if not isinstance(info, MupInfo):
            raise TypeError(
                f"mup_lr_scale: the info at {path_name(path)!r} is {info!r}, not a ji.MupInfo; "
                "pass the tree ji.mup_infos returned."
            )
    return scale_by_tree(lr_factors(infos, optimizer=optimizer))
