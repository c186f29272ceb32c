"""Per-layer activation and gradient statistics of Flax models (Karpathy's diagnostics).

``diagnose`` runs one probe batch through a linen or nnx model and returns, per layer, the
activation mean, std, saturated and dead fractions and (given a loss) the gradient reaching the
layer; per parameter, the gradient statistics, the grad:data ratio and (given an optax optimizer)
the update:data ratio ``log10(std(update) / std(param))`` of one step. The result is a pytree,
so the whole call can sit under ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxinit.diagnostics.selection import Include, select
from jaxinit.diagnostics.tables import fmt, stats_table

__all__ = ["Diagnostics", "LayerStats", "ParamStats", "diagnose", "layer_outputs"]


def _static() -> Any:
    return dataclasses.field(metadata={"static": True})


def _array_fields(cls: type) -> tuple[str, ...]:
    """The names of a statistics dataclass's array fields, in order."""
    return tuple(f.name for f in dataclasses.fields(cls) if not f.metadata.get("static"))


def _label(value: Any) -> str:
    return str(tuple(value)) if isinstance(value, tuple | list) else str(value)


class _Table:
    """``table()`` and ``str()`` of a statistics class: its label columns, then its arrays.

    ``_LABELS`` maps the label columns' titles to their (static) fields. An array field's column
    title is its name with spaces, or ``_TITLES[name]``; ``_CELL`` is the width of those columns.
    """

    _LABELS: ClassVar[dict[str, str]] = {}
    _TITLES: ClassVar[dict[str, str]] = {}
    _CELL: ClassVar[int] = 11

    def table(self) -> str:
        """The statistics as a fixed-width text table."""
        labels = {t: [_label(v) for v in getattr(self, f)] for t, f in self._LABELS.items()}
        stats = {
            self._TITLES.get(name, name.replace("_", " ")): getattr(self, name)
            for name in _array_fields(type(self))
        }
        return stats_table(labels, stats, self._CELL)

    def __str__(self) -> str:
        """The table."""
        return self.table()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerStats(_Table):
    """Statistics of each layer's output on the probe batch; arrays have one entry per layer.

    Attributes:
        names: layer names (module paths, forward order); static pytree metadata.
        kinds: module class names; static.
        mean: mean of the (optionally activated) output.
        std: its standard deviation over all elements.
        saturated: fraction of elements with ``|value| > saturation``.
        dead: fraction of units (entries of the last axis) that are exactly zero for every
            example (and position) of the batch.
        grad_mean: mean of the loss gradient with respect to the layer's output (NaN without loss).
        grad_std: its standard deviation (NaN without loss).
    """

    _LABELS: ClassVar[dict[str, str]] = {"layer": "names", "kind": "kinds"}

    names: tuple[str, ...] = _static()
    kinds: tuple[str, ...] = _static()
    mean: jax.Array = None  # type: ignore[assignment]
    std: jax.Array = None  # type: ignore[assignment]
    saturated: jax.Array = None  # type: ignore[assignment]
    dead: jax.Array = None  # type: ignore[assignment]
    grad_mean: jax.Array = None  # type: ignore[assignment]
    grad_std: jax.Array = None  # type: ignore[assignment]


_LAYER_FIELDS = _array_fields(LayerStats)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ParamStats(_Table):
    """Statistics of each parameter array; arrays have one entry per parameter.

    Attributes:
        names: parameter names such as ``Dense_0/kernel``; static pytree metadata.
        shapes: parameter shapes; static.
        std: standard deviation of the parameter.
        grad_mean: mean of its gradient (NaN without loss).
        grad_std: std of its gradient (NaN without loss).
        grad_data: ``std(grad) / std(param)`` (NaN without loss).
        update_data: ``log10(std(update) / std(param))`` for one optimizer step (NaN without an
            optimizer); about -3 is healthy.
    """

    _LABELS: ClassVar[dict[str, str]] = {"parameter": "names", "shape": "shapes"}
    _TITLES: ClassVar[dict[str, str]] = {"grad_data": "grad:data", "update_data": "log10 upd:data"}
    _CELL: ClassVar[int] = 15

    names: tuple[str, ...] = _static()
    shapes: tuple[tuple[int, ...], ...] = _static()
    std: jax.Array = None  # type: ignore[assignment]
    grad_mean: jax.Array = None  # type: ignore[assignment]
    grad_std: jax.Array = None  # type: ignore[assignment]
    grad_data: jax.Array = None  # type: ignore[assignment]
    update_data: jax.Array = None  # type: ignore[assignment]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Diagnostics:
    """What :func:`diagnose` returns: a pytree; ``print(d)`` shows both tables.

    Attributes:
        layers: :class:`LayerStats`.
        params: :class:`ParamStats`.
        loss: the loss on the probe batch (NaN without a loss function).
    """

    layers: LayerStats
    params: ParamStats
    loss: jax.Array

    def __str__(self) -> str:
        """Both tables and the loss."""
        return f"{self.layers.table()}\n\n{self.params.table()}\n\nloss {fmt(self.loss, 0)}"


def _float(x: jax.Array) -> jax.Array:
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _stack(values: Sequence[jax.Array]) -> jax.Array:
    if not values:
        return jnp.zeros((0,), jnp.float32)
    return jnp.stack([jnp.asarray(v, jnp.float32) for v in values])


def _nan(n: int) -> jax.Array:
    return jnp.full((n,), jnp.nan, jnp.float32)


def _check_common(saturation: float, loss_fn: Any, optimizer: Any) -> None:
    if not isinstance(saturation, int | float) or not 0.0 <= saturation:
        raise ValueError(f"saturation must be a non-negative number; got {saturation!r}.")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable loss_fn(output, y); got {loss_fn!r}.")
    if optimizer is not None and loss_fn is None:
        raise ValueError("optimizer needs loss_fn: the update comes from the loss's gradient.")
    if optimizer is not None and not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(f"optimizer must be an optax GradientTransformation; got {optimizer!r}.")


def _layer_stats(records: Sequence[Any], grads: Sequence[Any], activation: Any, saturation: float):
    """The :class:`LayerStats` of the chosen records and the gradients reaching them (or None)."""
    cols: dict[str, list[jax.Array]] = {f: [] for f in _LAYER_FIELDS}
    for r, g in zip(records, grads, strict=True):
        v = _float(activation(r.value) if activation is not None else r.value)
        flat = v.reshape(-1, v.shape[-1])
        cols["mean"].append(jnp.mean(v))
        cols["std"].append(jnp.std(v))
        cols["saturated"].append(jnp.mean((jnp.abs(v) > saturation).astype(v.dtype)))
        cols["dead"].append(jnp.mean(jnp.all(flat == 0, axis=0).astype(v.dtype)))
        nan = jnp.float32(jnp.nan)
        cols["grad_mean"].append(nan if g is None else jnp.mean(_float(g)))
        cols["grad_std"].append(nan if g is None else jnp.std(_float(g)))
    return LayerStats(
        names=tuple(r.name for r in records),
        kinds=tuple(r.kind for r in records),
        **{f: _stack(cols[f]) for f in _LAYER_FIELDS},
    )


def diagnose(
    model: Any,
    x: Any,
    y: Any = None,
    *,
    variables: Mapping[str, Any] | None = None,
    loss_fn: Callable[..., jax.Array] | None = None,
    optimizer: Any = None,
    activation: Callable[[jax.Array], jax.Array] | None = None,
    saturation: float = 0.97,
    include: Include = None,
    leaves_only: bool = True,
    weights_only: bool = True,
    model_kwargs: Mapping[str, Any] | None = None,
) -> Diagnostics:
    """Per-layer and per-parameter statistics of a Flax model on one probe batch.

    Layers are module calls in forward order; by default only leaf modules count (``Dense``,
    ``Conv``, ``BatchNorm``, ...; not containers). nnx models run on a copy, so the model passed
    in is not modified. Activations applied as plain functions are not modules: pass
    ``activation`` to look at ``f(output)`` (e.g. ``jnp.tanh`` for a Dense-tanh stack).

    Args:
        model: a ``flax.linen.Module`` (then ``variables`` is required) or a ``flax.nnx.Module``.
        x: the probe batch.
        y: targets passed to ``loss_fn(output, y)``; if None, ``loss_fn(output)`` is called.
        variables: linen variables (``model.init(...)``); None for nnx.
        loss_fn: scalar loss of the model output; enables gradient statistics.
        optimizer: an optax ``GradientTransformation``; enables the update:data ratio of one
            step from a fresh optimizer state.
        activation: applied to each recorded output before the activation statistics (not to
            the gradients, which are always with respect to the module output).
        saturation: ``|value|`` above which an element counts as saturated (0.97 suits tanh).
        include: which layers to keep: a regular expression searched in the name, a sequence of
            names, or a predicate on the name. None keeps all.
        leaves_only: keep only modules that call no other module.
        weights_only: report only parameters with ``ndim >= 2`` (kernels), as Karpathy does;
            biases and scales are often constant at init, so their ratios are infinite.
        model_kwargs: extra keyword arguments for the model call (linen: for ``model.apply``,
            e.g. ``rngs`` or ``train``).

    Returns:
        A :class:`Diagnostics` pytree (jit-able: names are static metadata).

    Raises:
        ValueError: for missing or superfluous ``variables``, a non-scalar loss, an optimizer
            without a loss, or a negative ``saturation``.
        TypeError: for a model that is not a Flax module, or a non-callable loss.

    Example:
        >>> import jax, jax.numpy as jnp, optax, flax.linen as nn, jaxinit as ji
        >>> model = nn.Sequential([nn.Dense(32), nn.tanh, nn.Dense(1)])
        >>> x = jax.random.normal(jax.random.key(0), (64, 8))
        >>> variables = model.init(jax.random.key(1), x)
        >>> loss = lambda out, y: jnp.mean((out - y) ** 2)
        >>> d = jax.jit(lambda v, x: ji.diagnose(model, x, jnp.zeros((64, 1)), variables=v,
        ...             loss_fn=loss, optimizer=optax.sgd(0.1)))(variables, x)
        >>> d.layers.names, d.params.names
        (('layers_0', 'layers_2'), ('layers_0/kernel', 'layers_2/kernel'))
        >>> # plain SGD: std(update) = lr * std(grad), so update:data = log10(lr * grad:data)
        >>> bool(jnp.allclose(d.params.update_data, jnp.log10(0.1 * d.params.grad_data)))
        True
    """
    from jaxinit.diagnostics.flax_models import adapter

    _check_common(saturation, loss_fn, optimizer)
    ad = adapter(model, variables, model_kwargs)
    if loss_fn is None:
        _, records, _ = ad.run(ad.params, x)
        grads, record_grads = None, [None] * len(records)
        loss = jnp.full((), jnp.nan, jnp.float32)
    else:
        loss, grads, records, record_grads = ad.gradients(ad.params, x, y, loss_fn)
        loss = jnp.asarray(loss, jnp.float32)
    chosen = select(records, leaves_only, include)
    layers = _layer_stats(
        [records[i] for i in chosen],
        [record_grads[i] for i in chosen],
        activation,
        float(saturation),
    )
    return Diagnostics(
        layers=layers, params=_param_stats(ad.params, grads, optimizer, weights_only), loss=loss
    )


def optimizer_update(optimizer: Any, grads: Any, state: Any, params: Any) -> tuple[Any, Any]:
    """``optimizer.update(grads, state, params)`` under jax's standard dtype promotion.

    optax's bias corrections (Adam and its family) multiply an int32 step count with floats, which
    ``jax_numpy_dtype_promotion="strict"`` refuses; the diagnostics work under either setting.
    """
    with jax.numpy_dtype_promotion("standard"):
        return optimizer.update(grads, state, params)


def _param_stats(
    params: dict[str, jax.Array], grads: Any, optimizer: Any, weights_only: bool
) -> ParamStats:
    names = [n for n, p in params.items() if not weights_only or jnp.ndim(p) >= 2]
    n = len(names)
    stds = _stack([jnp.std(_float(params[k])) for k in names])
    gmean = gstd = update_data = _nan(n)
    if grads is not None:
        gmean = _stack([jnp.mean(_float(grads[k])) for k in names])
        gstd = _stack([jnp.std(_float(grads[k])) for k in names])
    if optimizer is not None:
        updates, _ = optimizer_update(optimizer, grads, optimizer.init(params), params)
        ustd = _stack([jnp.std(_float(updates[k])) for k in names])
        update_data = jnp.log10(ustd / stds)
    return ParamStats(
        names=tuple(names),
        shapes=tuple(tuple(jnp.shape(params[k])) for k in names),
        std=stds,
        grad_mean=gmean,
        grad_std=gstd,
        grad_data=gstd / stds,
        update_data=update_data,
    )


def layer_outputs(
    model: Any,
    x: Any,
    *,
    variables: Mapping[str, Any] | None = None,
    include: Include = None,
    leaves_only: bool = True,
    model_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, jax.Array]:
    """The output of every layer on a batch, in forward order (what :func:`diagnose` sees).

    Args:
        model: a ``flax.linen.Module`` (with ``variables``) or a ``flax.nnx.Module``.
        x: the batch.
        variables: linen variables; None for nnx.
        include: layer selection, as in :func:`diagnose`.
        leaves_only: keep only modules that call no other module.
        model_kwargs: extra keyword arguments for the model call.

    Returns:
        A dict from layer name to output array, in forward order.

    Raises:
        ValueError: for missing or superfluous ``variables``.
        TypeError: for a model that is not a Flax module.

    Example:
        >>> import jax, jax.numpy as jnp, jaxinit as ji
        >>> from flax import nnx
        >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu,
        ...                        nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
        >>> {k: v.shape for k, v in ji.layer_outputs(model, jnp.ones((3, 4))).items()}
        {'layers/0': (3, 8), 'layers/2': (3, 2)}
    """
    from jaxinit.diagnostics.flax_models import adapter

    ad = adapter(model, variables, model_kwargs)
    _, records, _ = ad.run(ad.params, x)
    return {records[i].name: records[i].value for i in select(records, leaves_only, include)}
