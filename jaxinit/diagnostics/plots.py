"""PNG plots of diagnostics (matplotlib, imported when a plot is drawn).

Karpathy's three pictures: histograms of each layer's activations, histograms of the gradients
that reach each layer, and the update:data ratio of each weight over a few training steps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from jaxinit.diagnostics.plotting import pyplot, save_png
from jaxinit.diagnostics.selection import Include, select
from jaxinit.diagnostics.stats import layer_outputs
from jaxinit.diagnostics.training import UpdateRatios

__all__ = ["plot_activations", "plot_gradients", "plot_histograms", "plot_update_ratios"]


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
        values: name -> array, drawn in order; the legend shows mean and std.
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
    fig, ax = pyplot().subplots(figsize=(10, 4))
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
    return save_png(fig, path, dpi)


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
    r"""Histograms of every layer's output on a batch, as a PNG file.

    Args:
        model: a ``flax.linen.Module`` (with ``variables``) or a ``flax.nnx.Module``.
        x: the batch.
        path: the PNG file to write.
        variables: linen variables; None for nnx.
        activation: applied to each output first (e.g. ``jnp.tanh``), as in ``ji.diagnose``.
        saturation: the legend reports the fraction with ``|value|`` above it.
        include: which layers to draw, as in ``ji.diagnose``.
        leaves_only: draw only modules that call no other module.
        model_kwargs: extra keyword arguments for the model call.

    Returns:
        ``path``.

    Raises:
        ValueError: when no layer is selected.
        ImportError: when matplotlib is not installed.

    Example:
        >>> import os, tempfile, jax, jax.numpy as jnp, flax.linen as nn, jaxinit as ji
        >>> model = nn.Sequential([nn.Dense(32), nn.tanh, nn.Dense(1)])
        >>> x = jax.random.normal(jax.random.key(0), (64, 8))
        >>> v = model.init(jax.random.key(1), x)
        >>> p = ji.plot_activations(model, x, os.path.join(tempfile.mkdtemp(), "a.png"),
        ...                         variables=v, activation=jnp.tanh)
        >>> with open(p, "rb") as f:
        ...     f.read(4)
        b'\x89PNG'
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
        include: whose gradients to draw: layer selection as in ``ji.diagnose``.
        leaves_only: only the gradients reaching modules that call no other module.
        model_kwargs: extra keyword arguments for the model call.

    Returns:
        ``path``.

    Raises:
        ValueError: when no layer is selected or the loss is not a scalar.
        ImportError: when matplotlib is not installed.

    Example:
        >>> import os, tempfile, jax, jax.numpy as jnp, flax.linen as nn, jaxinit as ji
        >>> model = nn.Sequential([nn.Dense(32), nn.tanh, nn.Dense(1)])
        >>> x = jax.random.normal(jax.random.key(0), (64, 8))
        >>> loss = lambda out, y: jnp.mean((out - y) ** 2)
        >>> path = os.path.join(tempfile.mkdtemp(), "g.png")
        >>> ji.plot_gradients(model, x, jnp.zeros((64, 1)), path, loss_fn=loss,
        ...                   variables=model.init(jax.random.key(1), x)) == path
        True
    """
    from jaxinit.diagnostics.flax_models import adapter

    ad = adapter(model, variables, model_kwargs)
    _, _, records, record_grads = ad.gradients(ad.params, x, y, loss_fn)
    grads = {records[i].name: record_grads[i] for i in select(records, leaves_only, include)}
    return plot_histograms(grads, path, title="gradient distribution", xlabel="gradient")


def plot_update_ratios(ratios: UpdateRatios, path: str, *, dpi: int = 100) -> str:
    """Plots update:data ratios over training steps as a PNG, with the healthy -3 marked.

    Args:
        ratios: the output of ``ji.update_ratios``.
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
    fig, ax = pyplot().subplots(figsize=(10, 4))
    steps = np.arange(1, ratios.ratios.shape[0] + 1)
    for i, name in enumerate(ratios.names):
        ax.plot(steps, ratios.ratios[:, i], marker=".", label=name)
    ax.axhline(-3.0, color="k", linestyle="--", linewidth=1, label="-3 (healthy)")
    ax.set_xlabel("step")
    ax.set_ylabel("log10(std(update) / std(param))")
    ax.set_title("update:data ratio")
    ax.legend(fontsize=7)
    return save_png(fig, path, dpi)
