"""PNG plots of diagnostics; matplotlib is imported lazily, only by these functions.

Karpathy's three pictures: histograms of each layer's activations, histograms of the gradients
that reach each layer, and the update:data ratio of each weight over a few training steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinit.diagnostics import _capture
from jaxinit.diagnostics.stats import Include, _loss_value, _selected, layer_outputs

__all__ = [
    "UpdateRatios",
    "plot_activations",
    "plot_gradients",
    "plot_histograms",
    "plot_update_ratios",
    "update_ratios",
]


def _pyplot():
    """Imports matplotlib with the non-interactive Agg backend, or explains how to get it."""
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "jaxinit's plots need matplotlib: pip install 'jaxinit[plot]' (or matplotlib)."
        ) from err
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_histograms(
    values: Mapping[str, Any],
    path: str,
    *,
    title: str = "",
    xlabel: str = "value",
    bins: int = 60,
    saturation: float | None = None,
    dpi: int = 100,
) -> str:
    """Writes one density curve per named array (Karpathy's histogram plot) as a PNG file.

    Args:
        values: name -> array, drawn in order; the legend shows mean and std (and the fraction
            beyond ``saturation`` if given).
        path: the PNG file to write.
        title: figure title.
        xlabel: x-axis label.
        bins: histogram bins per curve.
        saturation: if given, the legend also shows the fraction with ``|value| > saturation``.
        dpi: resolution.

    Returns:
        ``path``.

    Raises:
        ValueError: when ``values`` is empty.
        ImportError: when matplotlib is not installed.

    Example:
        >>> import os, tempfile, numpy as np, jaxinit as ji
        >>> rng = np.random.default_rng(0)
        >>> path = os.path.join(tempfile.mkdtemp(), "h.png")
        >>> ji.plot_histograms({"a": rng.normal(size=100), "b": rng.normal(size=100)}, path)[-5:]
        'h.png'
    """
    if not values:
        raise ValueError("values is empty: nothing to plot.")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 4))
    for name, v in values.items():
        a = np.asarray(jax.device_get(v), np.float64).ravel()
        a = a[np.isfinite(a)]
        if a.size == 0:
            continue
        hy, hx = np.histogram(a, bins=bins, density=True)
        label = f"{name}: mean {a.mean():+.3g}, std {a.std():.3g}"
        if saturation is not None:
            label += f", saturated {np.mean(np.abs(a) > saturation):.1%}"
        ax.plot((hx[:-1] + hx[1:]) / 2, hy, label=label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, format="png")
    plt.close(fig)
    return path


def plot_activations(
    model: Any,
    x: Any,
    path: str,
    *,
    variables: Mapping[str, Any] | None = None,
    activation: Callable[[jax.Array], jax.Array] | None = None,
    saturation: float = 0.97,
    include: Include = None,
    leaves_only: bool = True,
    model_kwargs: Mapping[str, Any] | None = None,
) -> str:
    """Histograms of every layer's output on a batch, as a PNG file.

    Args:
        model: a ``flax.linen.Module`` (with ``variables``) or a ``flax.nnx.Module``.
        x: the batch.
        path: the PNG file to write.
        variables: linen variables; None for nnx.
        activation: applied to each output first (e.g. ``jnp.tanh``), as in ``ji.diagnose``.
        saturation: the legend reports the fraction with ``|value|`` above it.
        include: layer selection, as in ``ji.diagnose``.
        leaves_only: keep only modules that call no other module.
        model_kwargs: extra keyword arguments for the model call.

    Returns:
        ``path``.

    Raises:
        ValueError: when no layer is selected.
        ImportError: when matplotlib is not installed.

    Example:
        >>> import os, tempfile, jax, jax.numpy as jnp, flax.linen as nn, jaxinit as ji
        >>> model = nn.Sequential([nn.Dense(16), nn.tanh, nn.Dense(16)])
        >>> x = jax.random.normal(jax.random.key(0), (32, 4))
        >>> v = model.init(jax.random.key(1), x)
        >>> p = ji.plot_activations(model, x, os.path.join(tempfile.mkdtemp(), "a.png"),
        ...                         variables=v, activation=jnp.tanh)
        >>> with open(p, "rb") as f:
        ...     f.read(4)
        b'\\x89PNG'
    """
    outs = layer_outputs(
        model,
        x,
        variables=variables,
        include=include,
        leaves_only=leaves_only,
        model_kwargs=model_kwargs,
    )
    if activation is not None:
        outs = {k: activation(v) for k, v in outs.items()}
    return plot_histograms(
        outs, path, title="activation distribution", xlabel="activation", saturation=saturation
    )


def plot_gradients(
    model: Any,
    x: Any,
    y: Any,
    path: str,
    *,
    loss_fn: Callable[..., jax.Array],
    variables: Mapping[str, Any] | None = None,
    include: Include = None,
    leaves_only: bool = True,
    model_kwargs: Mapping[str, Any] | None = None,
) -> str:
    """Histograms of the loss gradient reaching every layer's output, as a PNG file.

    Args:
        model: a ``flax.linen.Module`` (with ``variables``) or a ``flax.nnx.Module``.
        x: the batch.
        y: targets for ``loss_fn(output, y)`` (None: ``loss_fn(output)``).
        path: the PNG file to write.
        loss_fn: scalar loss of the model output.
        variables: linen variables; None for nnx.
        include: layer selection, as in ``ji.diagnose``.
        leaves_only: keep only modules that call no other module.
        model_kwargs: extra keyword arguments for the model call.

    Returns:
        ``path``.

    Raises:
        ValueError: when no layer is selected.
        ImportError: when matplotlib is not installed.

    Example:
        >>> import os, tempfile, jax, jax.numpy as jnp, flax.linen as nn, jaxinit as ji
        >>> model = nn.Sequential([nn.Dense(16), nn.tanh, nn.Dense(1)])
        >>> x = jax.random.normal(jax.random.key(0), (32, 4))
        >>> v = model.init(jax.random.key(1), x)
        >>> p = ji.plot_gradients(model, x, jnp.zeros((32, 1)),
        ...                       os.path.join(tempfile.mkdtemp(), "g.png"), variables=v,
        ...                       loss_fn=lambda o, y: jnp.mean((o - y) ** 2))
        >>> with open(p, "rb") as f:
        ...     f.read(4)
        b'\\x89PNG'
    """
    ad = _capture.adapter(model, variables, model_kwargs)
    shapes = jax.eval_shape(lambda p: [r.value for r in ad.run(p, x)[1]], ad.params)
    eps = [jnp.zeros(s.shape, s.dtype) for s in shapes]
    meta: list[list[_capture.Record]] = []

    def objective(eps):
        out, records, _ = ad.run(ad.params, x, eps)
        meta.append(records)
        return _loss_value(loss_fn, out, y)

    geps = jax.grad(objective)(eps)
    records = [dataclasses.replace(r, value=g) for r, g in zip(meta[-1], geps, strict=True)]
    grads = {r.name: r.value for r in _selected(records, leaves_only, include)}
    return plot_histograms(grads, path, title="gradient distribution", xlabel="gradient")


@dataclasses.dataclass(frozen=True)
class UpdateRatios:
    """``log10(std(update) / std(param))`` per training step and weight.

    Attributes:
        names: parameter names.
        ratios: array of shape ``(steps, len(names))``.
        losses: the loss before each step, shape ``(steps,)``.
    """

    names: tuple[str, ...]
    ratios: np.ndarray
    losses: np.ndarray


def update_ratios(
    model: Any,
    x: Any,
    y: Any,
    *,
    loss_fn: Callable[..., jax.Array],
    optimizer: Any,
    steps: int = 10,
    variables: Mapping[str, Any] | None = None,
    weights_only: bool = True,
    model_kwargs: Mapping[str, Any] | None = None,
) -> UpdateRatios:
    """Trains a copy of the model for a few steps on one batch, recording update:data ratios.

    The model (or variables) passed in is not changed. Non-parameter state (batch-norm
    statistics) is carried from step to step. One jitted step serves every iteration.

    Args:
        model: a ``flax.linen.Module`` (with ``variables``) or a ``flax.nnx.Module``.
        x: the batch.
        y: targets for ``loss_fn(output, y)`` (None: ``loss_fn(output)``).
        loss_fn: scalar loss of the model output.
        optimizer: an optax ``GradientTransformation``.
        steps: number of steps (>= 1).
        variables: linen variables; None for nnx.
        weights_only: only parameters with ``ndim >= 2``.
        model_kwargs: extra keyword arguments for the model call.

    Returns:
        An :class:`UpdateRatios`.

    Raises:
        ValueError: for ``steps < 1``.

    Example:
        >>> import jax, jax.numpy as jnp, optax, flax.linen as nn, jaxinit as ji
        >>> model = nn.Sequential([nn.Dense(16), nn.tanh, nn.Dense(1)])
        >>> x = jax.random.normal(jax.random.key(0), (32, 4))
        >>> v = model.init(jax.random.key(1), x)
        >>> r = ji.update_ratios(model, x, jnp.zeros((32, 1)), variables=v, steps=3,
        ...                      loss_fn=lambda o, y: jnp.mean((o - y) ** 2),
        ...                      optimizer=optax.sgd(1e-2))
        >>> r.names, r.ratios.shape
        (('layers_0/kernel', 'layers_2/kernel'), (3, 2))
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an int >= 1; got {steps!r}.")
    ad = _capture.adapter(model, variables, model_kwargs)
    names = tuple(n for n, p in ad.params.items() if not weights_only or jnp.ndim(p) >= 2)

    @jax.jit
    def step(params, other, opt_state):
        def objective(p):
            out, _, new_other = ad.run(p, x, None, other)
            return _loss_value(loss_fn, out, y), new_other

        (loss, new_other), grads = jax.value_and_grad(objective, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        ratio = jnp.stack(
            [
                jnp.log10(jnp.std(updates[n].astype(jnp.float32)))
                - jnp.log10(jnp.std(params[n].astype(jnp.float32)))
                for n in names
            ]
        )
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        return params, new_other, opt_state, ratio, loss

    params, other = ad.params, ad.other
    opt_state = optimizer.init(params)
    ratios, losses = [], []
    for _ in range(steps):
        params, other, opt_state, ratio, loss = step(params, other, opt_state)
        ratios.append(ratio)
        losses.append(loss)
    return UpdateRatios(
        names=names,
        ratios=np.asarray(jax.device_get(jnp.stack(ratios))),
        losses=np.asarray(jax.device_get(jnp.stack(losses))),
    )


def plot_update_ratios(ratios: UpdateRatios, path: str, *, dpi: int = 100) -> str:
    """Plots update:data ratios over training steps as a PNG, with the healthy -3 marked.

    Args:
        ratios: the output of :func:`update_ratios`.
        path: the PNG file to write.
        dpi: resolution.

    Returns:
        ``path``.

    Raises:
        ImportError: when matplotlib is not installed.

    Example:
        >>> import os, tempfile, numpy as np, jaxinit as ji
        >>> r = ji.UpdateRatios(("w",), np.full((4, 1), -3.0), np.zeros(4))
        >>> ji.plot_update_ratios(r, os.path.join(tempfile.mkdtemp(), "u.png"))[-5:]
        'u.png'
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 4))
    steps = np.arange(1, ratios.ratios.shape[0] + 1)
    for i, name in enumerate(ratios.names):
        ax.plot(steps, ratios.ratios[:, i], marker=".", label=name)
    ax.axhline(-3.0, color="k", linestyle="--", linewidth=1, label="-3 (healthy)")
    ax.set_xlabel("step")
    ax.set_ylabel("log10(std(update) / std(param))")
    ax.set_title("update:data ratio")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, format="png")
    plt.close(fig)
    return path
