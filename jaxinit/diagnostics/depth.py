"""The depth experiment: activation statistics of a deep MLP under many inits and activations."""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinit._src import initializers
from jaxinit._src.gains import calculate_gain, variance_gain
from jaxinit.diagnostics import mlp_scan
from jaxinit.diagnostics.plotting import pyplot, save_png
from jaxinit.diagnostics.tables import fmt, text_table

__all__ = [
    "DEPTH_ACTIVATIONS",
    "DEPTH_INITS",
    "DepthReport",
    "DepthRow",
    "depth_report",
    "verdict",
]

DEPTH_ACTIVATIONS: tuple[str, ...] = ("linear", "relu", "tanh", "gelu", "selu")
DEPTH_INITS: tuple[str, ...] = ("normal", "lecun_normal", "kaiming", "variance_gain", "lsuv")

# The torch calculate_gain entry of the "kaiming" arm, where it is not the activation's own name:
# torch's table has no gelu, silu or elu, and relu's gain is the customary stand-in for them.
KAIMING_NONLINEARITY: dict[str, str] = {"gelu": "relu", "silu": "relu", "elu": "relu"}

# Verdict thresholds, on r = std(layer L) / std(layer 1) of the activations h_l.
EXPLODE_RATIO = 2.0  # r > 2, or any non-finite std: "explodes"
VANISH_RATIO = 0.5  # r < 0.5: "vanishes"
SATURATE_FRACTION = 0.2  # bounded activation with > 20% of |h| past the threshold: "saturates"


def verdict(std: Sequence[float], saturated: float | None = None) -> str:
    """Classifies a std-by-depth curve as ``holds``, ``vanishes``, ``explodes`` or ``saturates``.

    With ``r = std[-1] / std[0]`` (last layer over layer 1): any non-finite std, or ``r > 2``, is
    ``explodes``; otherwise a saturated fraction above 0.2 at the last layer is ``saturates``;
    otherwise ``r < 0.5`` (or a zero std) is ``vanishes``; anything else ``holds``.

    Args:
        std: activation std per layer, layer 1 first.
        saturated: fraction of saturated units at the last layer, or None for activations that
            cannot saturate.

    Returns:
        The verdict string.

    Example:
        >>> from jaxinit.diagnostics.depth import verdict
        >>> verdict([1.0, 0.9, 0.8]), verdict([1.0, 0.3]), verdict([2.0, float("inf")])
        ('holds', 'vanishes', 'explodes')
        >>> verdict([0.9, 0.95], saturated=0.6)
        'saturates'
    """
    s = np.asarray(std, np.float64)
    if not np.all(np.isfinite(s)):
        return "explodes"
    first, last = float(s[0]), float(s[-1])
    if first > 0.0 and last / first > EXPLODE_RATIO:
        return "explodes"
    if saturated is not None and saturated > SATURATE_FRACTION:
        return "saturates"
    if first <= 0.0 or last / first < VANISH_RATIO:
        return "vanishes"
    return "holds"


@dataclasses.dataclass(frozen=True)
class DepthRow:
    """One configuration of the depth experiment.

    Attributes:
        activation: activation name.
        init: init name, one of ``DEPTH_INITS``: normal, lecun_normal, kaiming, variance_gain, lsuv.
        init_label: the initializer as shown in the table, e.g. ``kaiming(gain=1.41)``.
        batch_norm: whether train-mode batch norm (``ji.batch_norm``) sits before each activation.
        std: activation std at every layer, shape ``(depth,)``.
        mean: activation mean at every layer.
        saturated: saturated fraction at every layer (NaN for activations that cannot saturate).
        pre_second_moment: ``E[z^2]`` of the (normalized) pre-activations at every layer.
        verdict: ``holds``, ``vanishes``, ``explodes`` or ``saturates``.
        seconds: run time of this configuration (weights drawn beforehand), in seconds.
    """

    activation: str
    init: str
    init_label: str
    batch_norm: bool
    std: np.ndarray
    mean: np.ndarray
    saturated: np.ndarray
    pre_second_moment: np.ndarray
    verdict: str
    seconds: float


@dataclasses.dataclass(frozen=True)
class DepthReport:
    """The result of :func:`depth_report`; ``str(report)`` is the table the CLI prints.

    Attributes:
        rows: one :class:`DepthRow` per (activation, init, batch norm) configuration.
        depth: layers.
        width: features per layer.
        batch: rows of the input batch.
        seed: PRNG seed.
        layers: the 1-based layers shown in the table.
        compile_s: seconds spent compiling the shared forward function (0 when this process
            has already compiled it for the same shapes).
        init_s: seconds spent drawing weights (including their compilation).
        run_s: seconds spent running the configurations.
    """

    rows: tuple[DepthRow, ...]
    depth: int
    width: int
    batch: int
    seed: int
    layers: tuple[int, ...]
    compile_s: float
    init_s: float
    run_s: float

    def table(self) -> str:
        """Formats the report as a fixed-width text table."""
        labels = {
            "activation": [r.activation for r in self.rows],
            "init": [r.init_label for r in self.rows],
            "bn": [f"{'yes' if r.batch_norm else 'no':<3}" for r in self.rows],  # 3 wide always
        }
        titles = [f"std@{layer}" for layer in self.layers] + [f"sat@{self.depth}"]
        header = "".join(f"{t:>10}" for t in titles) + "  verdict"
        cells = []
        for r in self.rows:
            sat = r.saturated[-1]
            sat_cell = f"{sat:10.3f}" if np.isfinite(sat) else f"{'-':>10}"
            stds = "".join(fmt(r.std[layer - 1], 10) for layer in self.layers)
            cells.append(f"{stds}{sat_cell}  {r.verdict}")
        return text_table(labels, header, cells)

    def __str__(self) -> str:
        """The table."""
        return self.table()


@functools.lru_cache(maxsize=8)
def _compiled_forward(depth: int, width: int, batch: int, saturation: float) -> Any:
    """The compiled depth-experiment scan for one shape (compiled once per process)."""
    f32, i32, b = jnp.float32, jnp.int32, jnp.bool_
    return mlp_scan.depth_forward.lower(
        jax.ShapeDtypeStruct((depth, width, width), f32),
        jax.ShapeDtypeStruct((batch, width), f32),
        jax.ShapeDtypeStruct((), i32),
        jax.ShapeDtypeStruct((), b),
        jax.ShapeDtypeStruct((), b),
        jax.ShapeDtypeStruct((), f32),
        jax.ShapeDtypeStruct((), i32),
        saturation=saturation,
    ).compile()


def _layers_shown(depth: int) -> tuple[int, ...]:
    return tuple(sorted({1, max(1, round(depth / 5)), max(1, round(depth / 2)), depth}))


def init_for(init: str, activation: str) -> tuple[Callable[..., jax.Array], str, tuple]:
    """Returns (initializer, table label, weight-cache key) for a named init and activation.

    The variance-scaling inits get ``batch_axis=0``, so one call draws the whole
    ``(depth, width, width)`` stack with per-layer fans; orthogonal is drawn layer by layer.
    """
    if init == "normal":
        return initializers.normal(1.0), "normal(1.0)", ("normal",)
    if init == "lecun_normal":
        return initializers.lecun_normal(batch_axis=0), "lecun_normal", ("lecun_normal",)
    if init == "kaiming":
        name = KAIMING_NONLINEARITY.get(activation, activation)
        init_fn = initializers.kaiming_normal(nonlinearity=name, batch_axis=0)
        return init_fn, f"kaiming(gain={calculate_gain(name):.3g})", ("kaiming", name)
    if init == "variance_gain":
        gain = variance_gain(activation)
        init_fn = initializers.variance_scaling(gain * gain, "fan_in", "normal", batch_axis=0)
        return init_fn, f"variance_gain({gain:.3g})", ("variance_gain", round(gain, 12))
    if init == "lsuv":
        return initializers.orthogonal(), "lsuv(orthogonal)", ("orthogonal",)
    raise ValueError(f"init must be one of {', '.join(DEPTH_INITS)}; got {init!r}.")


def draw_weights(
    init: str, init_fn: Callable[..., jax.Array], key: jax.Array, depth: int, width: int
) -> jax.Array:
    """The stacked ``(depth, width, width)`` kernels of one init."""
    if init == "lsuv":
        # Orthogonality is per layer: one jitted QR per layer (batched QR is slow on CPU).
        return mlp_scan.stacked_weights(init_fn, key, depth, width, jit=True)
    return init_fn(key, (depth, width, width), jnp.float32)


def _check_names(values: Sequence[str], known: Sequence[str], argname: str) -> tuple[str, ...]:
    if isinstance(values, str):
        raise TypeError(f"{argname} must be a sequence of names, not the string {values!r}.")
    values = tuple(values)
    if not values:
        raise ValueError(f"{argname} must name at least one of {', '.join(known)}.")
    for v in values:
        if v not in known:
            raise ValueError(f"{argname} must be chosen from {', '.join(known)}; got {v!r}.")
    return values


def _check_arguments(
    depth: int,
    width: int,
    batch: int,
    activations: Sequence[str],
    inits: Sequence[str],
    batch_norm: Sequence[bool],
    saturation: float,
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[bool, ...]]:
    """Validates the arguments of :func:`depth_report`; returns activations, inits, bn settings."""
    mlp_scan.check_sizes(depth, width, batch)
    activations = _check_names(activations, mlp_scan.ACTIVATION_NAMES, "activations")
    inits = _check_names(inits, DEPTH_INITS, "inits")
    bn_settings = tuple(bool(b) for b in batch_norm)
    if not bn_settings:
        raise ValueError("batch_norm must list at least one setting, e.g. (False, True).")
    if not 0.0 < saturation < 1.0:
        raise ValueError(f"saturation must be in (0, 1); got {saturation!r}.")
    return activations, inits, bn_settings


@dataclasses.dataclass(frozen=True)
class _Config:
    """One configuration to run: activation, init and batch-norm setting."""

    activation: str
    init: str
    batch_norm: bool
    init_fn: Callable[..., jax.Array]
    label: str
    weights_key: tuple


def _configs(
    activations: Sequence[str], inits: Sequence[str], bn_settings: Sequence[bool]
) -> list[_Config]:
    """Every (activation, init, batch norm) configuration, in table order."""
    configs = []
    for activation in activations:
        for init in inits:
            init_fn, label, weights_key = init_for(init, activation)
            configs += [
                _Config(activation, init, bn, init_fn, label, weights_key) for bn in bn_settings
            ]
    return configs


class _Weights:
    """The drawn weights of the configurations, timed, drawn once per cache key."""

    def __init__(self, key: jax.Array, depth: int, width: int):
        self.key, self.depth, self.width = key, depth, width
        self.cache: dict[tuple, jax.Array] = {}
        self.seconds = 0.0

    def get(self, config: _Config) -> jax.Array:
        """The weights of ``config``, drawn on first use."""
        if config.weights_key not in self.cache:
            t0 = time.perf_counter()
            # Keep only the inits shared by every activation, to bound memory.
            for k in [k for k in self.cache if len(k) > 1]:
                del self.cache[k]
            weights = draw_weights(config.init, config.init_fn, self.key, self.depth, self.width)
            self.cache[config.weights_key] = weights.block_until_ready()
            self.seconds += time.perf_counter() - t0
        return self.cache[config.weights_key]


def _run(
    compiled: Any, config: _Config, weights: jax.Array, x: jax.Array, lsuv_args: tuple
) -> DepthRow:
    """Runs one configuration and builds its table row."""
    act_index = mlp_scan.activation_index(config.activation)
    t0 = time.perf_counter()
    out = compiled(
        weights,
        x,
        act_index,
        jnp.asarray(config.batch_norm),
        jnp.asarray(config.init == "lsuv"),
        *lsuv_args,
    )
    out.pop("weights")
    stats = mlp_scan.as_numpy(out)
    seconds = time.perf_counter() - t0
    bounded = config.activation in mlp_scan.SATURATION_MEASURES
    sat = stats["saturated"] if bounded else np.full(len(stats["std"]), np.nan, np.float32)
    return DepthRow(
        activation=config.activation,
        init=config.init,
        init_label=config.label,
        batch_norm=config.batch_norm,
        std=stats["std"],
        mean=stats["mean"],
        saturated=sat,
        pre_second_moment=stats["pre_second_moment"],
        verdict=verdict(stats["std"], float(sat[-1]) if bounded else None),
        seconds=seconds,
    )


def _progress_line(done: int, total: int, row: DepthRow, depth: int) -> str:
    return (
        f"[{done:{len(str(total))}d}/{total}] {row.activation:<8} {row.init_label:<28} "
        f"bn={'yes' if row.batch_norm else 'no ':<3} std@{depth}={fmt(row.std[-1], 0)} "
        f"{row.verdict} ({row.seconds:.2f} s)"
    )


def depth_report(
    *,
    depth: int = 50,
    width: int = 512,
    batch: int = 1024,
    activations: Sequence[str] = DEPTH_ACTIVATIONS,
    inits: Sequence[str] = DEPTH_INITS,
    batch_norm: Sequence[bool] = (False, True),
    seed: int = 0,
    saturation: float = 0.97,
    lsuv_tol: float = 0.1,
    lsuv_max_iters: int = 10,
    progress: Callable[[str], None] | None = None,
) -> DepthReport:
    """Runs the depth experiment: how activation statistics evolve through a deep MLP.

    A bias-free MLP ``h_l = f(BN?(h_{l-1} @ W_l))`` of ``depth`` square layers of ``width`` gets a
    batch of unit-normal inputs, for every activation, init and batch-norm setting:

    - ``normal``: ``ji.normal(1.0)``, the naive std-1 init;
    - ``lecun_normal``: ``ji.lecun_normal()``, flax's default (truncated, variance 1/fan_in);
    - ``kaiming``: ``ji.kaiming_normal(nonlinearity=...)`` with torch's ``calculate_gain`` (relu's
      gain for gelu, silu and elu, which torch's table lacks);
    - ``variance_gain``: ``ji.variance_scaling(g**2, "fan_in", "normal")`` with
      ``g = ji.variance_gain(f)``, the gain that keeps ``E[z^2] = 1`` exactly;
    - ``lsuv``: ``ji.orthogonal()`` kernels, then LSUV (Mishkin and Matas, 2015) rescales each
      layer in forward order until its pre-activation variance on this batch is within
      ``lsuv_tol`` of 1.

    With batch norm, train-mode ``ji.batch_norm`` (batch statistics, no scale or bias) normalizes
    every pre-activation. One jitted ``lax.scan`` serves every configuration: it compiles once.

    Args:
        depth: number of layers.
        width: features per layer.
        batch: rows of the input batch.
        activations: names from ``linear, relu, leaky_relu, tanh, sigmoid, gelu, silu, elu, selu``.
        inits: names from ``DEPTH_INITS`` (normal, lecun_normal, kaiming, variance_gain, lsuv).
        batch_norm: the batch-norm settings to run, e.g. ``(False, True)``.
        seed: seeds the inputs and the weights (every init gets the same weight key).
        saturation: ``|h|`` above which a tanh unit counts as saturated (sigmoid: ``|2h-1|``).
        lsuv_tol: LSUV's tolerance on ``|Var - 1|``.
        lsuv_max_iters: LSUV's maximum rescalings per layer.
        progress: called with one line per finished configuration, e.g. ``print``.

    Returns:
        A :class:`DepthReport`; ``print(report)`` shows the table.

    Raises:
        ValueError: for unknown names or non-positive sizes.
        TypeError: when ``activations`` or ``inits`` is a bare string.

    Example:
        >>> import jaxinit as ji
        >>> r = ji.depth_report(depth=6, width=32, batch=64, activations=["relu"],
        ...                     inits=["normal", "kaiming"], batch_norm=[False])
        >>> [(row.init, row.verdict) for row in r.rows]
        [('normal', 'explodes'), ('kaiming', 'holds')]
    """
    activations, inits, bn_settings = _check_arguments(
        depth, width, batch, activations, inits, batch_norm, saturation
    )
    say = progress or (lambda line: None)
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (batch, width), jnp.float32)
    lsuv_args = (jnp.asarray(lsuv_tol, jnp.float32), jnp.asarray(lsuv_max_iters, jnp.int32))

    t0 = time.perf_counter()
    compiled = _compiled_forward(depth, width, batch, float(saturation))
    compile_s = time.perf_counter() - t0
    say(f"compiled the {depth}-layer scan in {compile_s:.2f} s")

    configs = _configs(activations, inits, bn_settings)
    weights = _Weights(kw, depth, width)
    rows: list[DepthRow] = []
    for config in configs:
        rows.append(_run(compiled, config, weights.get(config), x, lsuv_args))
        say(_progress_line(len(rows), len(configs), rows[-1], depth))
    return DepthReport(
        rows=tuple(rows),
        depth=depth,
        width=width,
        batch=batch,
        seed=seed,
        layers=_layers_shown(depth),
        compile_s=compile_s,
        init_s=weights.seconds,
        run_s=sum(r.seconds for r in rows),
    )


def plot_depth(report: DepthReport, path: str, *, dpi: int = 100) -> str:
    r"""Writes the std-by-depth curves of a :class:`DepthReport` as a PNG file.

    One panel per activation (and batch-norm setting), one curve per init, log-scaled std.
    Needs matplotlib (the ``plot`` extra), imported when called.

    Args:
        report: the result of :func:`depth_report`.
        path: where the PNG goes.
        dpi: its resolution.

    Returns:
        ``path``.

    Raises:
        ImportError: when matplotlib is not installed.

    Example:
        >>> import os, tempfile, jaxinit as ji
        >>> r = ji.depth_report(depth=6, width=32, batch=64, activations=["tanh"],
        ...                     inits=["kaiming"], batch_norm=[False])
        >>> path = ji.plot_depth(r, os.path.join(tempfile.mkdtemp(), "depth.png"))
        >>> with open(path, "rb") as f:
        ...     f.read(8)
        b'\x89PNG\r\n\x1a\n'
    """
    plt = pyplot()
    panels = sorted({(r.activation, r.batch_norm) for r in report.rows}, key=_panel_order(report))
    ncols = min(5, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.8 * nrows), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        _plot_panel(ax, report, panel)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(f"std by depth (width {report.width}, batch {report.batch})", fontsize=10)
    return save_png(fig, path, dpi)


def _plot_panel(ax: Any, report: DepthReport, panel: tuple[str, bool]) -> None:
    """One activation and batch-norm setting: a log-scaled std curve per init."""
    activation, bn = panel
    layer = np.arange(1, report.depth + 1)
    tiny = np.finfo(np.float32).tiny
    for r in report.rows:
        if (r.activation, r.batch_norm) == panel:
            std = np.where(np.isfinite(r.std), np.maximum(r.std, tiny), np.nan)
            ax.plot(layer, std, label=f"{r.init} ({r.verdict})")
    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    ax.set_ylim(min(lo, 0.1), max(hi, 10.0))  # at least two decades: flat curves look flat
    ax.set_title(f"{activation}{' + BN' if bn else ''}", fontsize=9)
    ax.set_xlabel("layer", fontsize=8)
    ax.set_ylabel("activation std", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6)


def _panel_order(report: DepthReport) -> Callable[[tuple[str, bool]], tuple[int, bool]]:
    order = {a: i for i, a in enumerate(dict.fromkeys(r.activation for r in report.rows))}
    return lambda panel: (panel[1], order[panel[0]])
