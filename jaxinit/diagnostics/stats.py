"""Per-layer activation and gradient statistics of Flax models (Karpathy's diagnostics).

``diagnose`` runs one probe batch through a linen or nnx model and returns, per layer, the
activation mean, std, saturated fraction and dead fraction, and (given a loss) the gradient that
reaches the layer; per parameter, the gradient mean and std, the grad:data ratio and (given an
optax optimizer) the update:data ratio ``log10(std(update) / std(param))`` of one step. The
result is a pytree, so the whole call can sit under ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinit.diagnostics import _capture
from jaxinit.diagnostics._mlp import fmt

__all__ = ["Diagnostics", "LayerStats", "ParamStats", "diagnose", "layer_outputs"]

Include = str | Sequence[str] | Callable[[str], bool] | None


def _static() -> Any:
    return dataclasses.field(metadata={"static": True})


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerStats:
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

    names: tuple[str, ...] = _static()
    kinds: tuple[str, ...] = _static()
    mean: jax.Array = None  # type: ignore[assignment]
    std: jax.Array = None  # type: ignore[assignment]
    saturated: jax.Array = None  # type: ignore[assignment]
    dead: jax.Array = None  # type: ignore[assignment]
    grad_mean: jax.Array = None  # type: ignore[assignment]
    grad_std: jax.Array = None  # type: ignore[assignment]

    def table(self) -> str:
        """The statistics as a fixed-width text table."""
        w = max([len("layer")] + [len(n) for n in self.names])
        k = max([len("kind")] + [len(n) for n in self.kinds])
        cols = ("mean", "std", "saturated", "dead", "grad mean", "grad std")
        lines = [f"{'layer':<{w}}  {'kind':<{k}}" + "".join(f"{c:>11}" for c in cols)]
        values = [np.asarray(getattr(self, f)) for f in _LAYER_FIELDS]
        for i, (name, kind) in enumerate(zip(self.names, self.kinds, strict=True)):
            cells = "".join(fmt(v[i], 11) for v in values)
            lines.append(f"{name:<{w}}  {kind:<{k}}{cells}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


_LAYER_FIELDS = ("mean", "std", "saturated", "dead", "grad_mean", "grad_std")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ParamStats:
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

    names: tuple[str, ...] = _static()
    shapes: tuple[tuple[int, ...], ...] = _static()
    std: jax.Array = None  # type: ignore[assignment]
    grad_mean: jax.Array = None  # type: ignore[assignment]
    grad_std: jax.Array = None  # type: ignore[assignment]
    grad_data: jax.Array = None  # type: ignore[assignment]
    update_data: jax.Array = None  # type: ignore[assignment]

    def table(self) -> str:
        """The statistics as a fixed-width text table."""
        w = max([len("parameter")] + [len(n) for n in self.names])
        shapes = [str(tuple(s)) for s in self.shapes]
        s = max([len("shape")] + [len(x) for x in shapes])
        cols = ("std", "grad mean", "grad std", "grad:data", "log10 upd:data")
        lines = [f"{'parameter':<{w}}  {'shape':<{s}}" + "".join(f"{c:>15}" for c in cols)]
        values = [np.asarray(getattr(self, f)) for f in _PARAM_FIELDS]
        for i, name in enumerate(self.names):
            cells = "".join(fmt(v[i], 15) for v in values)
            lines.append(f"{name:<{w}}  {shapes[i]:<{s}}{cells}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


_PARAM_FIELDS = ("std", "grad_mean", "grad_std", "grad_data", "update_data")


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
        return f"{self.layers.table()}\n\n{self.params.table()}\n\nloss {fmt(self.loss, 0)}"


def _include_fn(include: Include) -> Callable[[str], bool]:
    if include is None:
        return lambda name: True
    if isinstance(include, str):
        pattern = re.compile(include)
        return lambda name: pattern.search(name) is not None
    if callable(include):
        return include
    names = set(include)
    return lambda name: name in names


def _selected(records: list[_capture.Record], leaves_only: bool, include: Include):
    keep = _include_fn(include)
    return [r for r in records if (r.leaf or not leaves_only) and keep(r.name)]


def _float(x: jax.Array) -> jax.Array:
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _activation_stats(v: jax.Array, saturation: float) -> tuple[jax.Array, ...]:
    v = _float(v)
    flat = v.reshape(-1, v.shape[-1])
    dead = jnp.mean(jnp.all(flat == 0, axis=0).astype(v.dtype))
    sat = jnp.mean((jnp.abs(v) > saturation).astype(v.dtype))
    return jnp.mean(v), jnp.std(v), sat, dead


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


def _loss_value(loss_fn: Callable[..., Any], out: Any, y: Any) -> jax.Array:
    loss = loss_fn(out) if y is None else loss_fn(out, y)
    loss = jnp.asarray(loss)
    if loss.shape != ():
        raise ValueError(f"loss_fn must return a scalar; got shape {loss.shape}.")
    return loss


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

    Layers are module calls, recorded in forward order: for linen through
    ``flax.linen.intercept_methods``, for nnx by wrapping the modules' ``__call__`` on a fresh
    copy of the model (the model passed in is not modified, batch-norm statistics included). By
    default only leaf modules count (``Dense``, ``Conv``, ``BatchNorm``, ...; not containers).
    Activation functions applied as plain functions are not modules: pass ``activation`` to
    look at ``f(output)`` (e.g. ``jnp.tanh`` for a Dense-tanh stack), and ``include`` to pick
    layers.

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
    _check_common(saturation, loss_fn, optimizer)
    ad = _capture.adapter(model, variables, model_kwargs)
    params = ad.params

    if loss_fn is None:
        _, records, _ = ad.run(params, x)
        chosen = _selected(records, leaves_only, include)
        grads_act = [None] * len(chosen)
        grads = None
        loss = jnp.full((), jnp.nan, jnp.float32)
    else:
        shapes = jax.eval_shape(lambda p: [r.value for r in ad.run(p, x)[1]], params)
        eps = [jnp.zeros(s.shape, s.dtype) for s in shapes]

        meta: list[list[_capture.Record]] = []

        def objective(p, eps):
            out, records, _ = ad.run(p, x, eps)
            meta.append(records)
            return _loss_value(loss_fn, out, y), [r.value for r in records]

        (loss, values), (grads, geps) = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(
            params, eps
        )
        records = [dataclasses.replace(r, value=v) for r, v in zip(meta[-1], values, strict=True)]
        index = {id(r): i for i, r in enumerate(records)}
        chosen = _selected(records, leaves_only, include)
        grads_act = [geps[index[id(r)]] for r in chosen]
        loss = jnp.asarray(loss, jnp.float32)

    cols: dict[str, list[jax.Array]] = {f: [] for f in _LAYER_FIELDS}
    for r, g in zip(chosen, grads_act, strict=True):
        v = activation(r.value) if activation is not None else r.value
        mean, std, sat, dead = _activation_stats(v, float(saturation))
        cols["mean"].append(mean)
        cols["std"].append(std)
        cols["saturated"].append(sat)
        cols["dead"].append(dead)
        if g is None:
            cols["grad_mean"].append(jnp.float32(jnp.nan))
            cols["grad_std"].append(jnp.float32(jnp.nan))
        else:
            g = _float(g)
            cols["grad_mean"].append(jnp.mean(g))
            cols["grad_std"].append(jnp.std(g))
    layers = LayerStats(
        names=tuple(r.name for r in chosen),
        kinds=tuple(r.kind for r in chosen),
        **{f: _stack(cols[f]) for f in _LAYER_FIELDS},
    )
    return Diagnostics(
        layers=layers, params=_param_stats(params, grads, optimizer, weights_only), loss=loss
    )


def _param_stats(
    params: dict[str, jax.Array], grads: Any, optimizer: Any, weights_only: bool
) -> ParamStats:
    names = [n for n, p in params.items() if not weights_only or jnp.ndim(p) >= 2]
    n = len(names)
    stds = _stack([jnp.std(_float(params[k])) for k in names])
    if grads is None:
        return ParamStats(
            names=tuple(names),
            shapes=tuple(tuple(jnp.shape(params[k])) for k in names),
            std=stds,
            grad_mean=_nan(n),
            grad_std=_nan(n),
            grad_data=_nan(n),
            update_data=_nan(n),
        )
    gmean = _stack([jnp.mean(_float(grads[k])) for k in names])
    gstd = _stack([jnp.std(_float(grads[k])) for k in names])
    if optimizer is not None:
        updates, _ = optimizer.update(grads, optimizer.init(params), params)
        ustd = _stack([jnp.std(_float(updates[k])) for k in names])
        update_data = jnp.log10(ustd / stds)
    else:
        update_data = _nan(n)
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
    ad = _capture.adapter(model, variables, model_kwargs)
    _, records, _ = ad.run(ad.params, x)
    return {r.name: r.value for r in _selected(records, leaves_only, include)}
