"""The muP coordinate check: does the size of every layer's output stay put as the model widens?

At each width the model trains for a few Adam steps on generated data, once under the standard
parametrization (SP: every kernel at variance ``1/fan_in``, one learning rate) and once under muP
(:func:`jaxinit.mup_init` and :func:`jaxinit.mup_lr_scale`). The mean absolute value of each
layer's output is recorded after every update. Plotted against width on log-log axes, a correct
muP gives flat lines; under SP the hidden and output layers grow with width, because Adam's
entrywise updates add up coherently over ``fan_in`` terms (Tensor Programs V, Figure 5).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxinit._src.einsum import einsum_axes
from jaxinit._src.mup import MupInfo, lr_factors, mup_infos, mup_init, scale_by_tree
from jaxinit.diagnostics.plotting import pyplot, save_png
from jaxinit.diagnostics.stats import optimizer_update
from jaxinit.diagnostics.tables import fmt, text_table

__all__ = ["COORD_MODELS", "FLAT_SLOPE", "CoordCheckReport", "coord_check", "plot_coord_check"]

COORD_MODELS: tuple[str, ...] = ("mlp", "transformer")
PARAMETRIZATIONS: tuple[str, ...] = ("sp", "mup")
_LABELS = {"sp": "SP", "mup": "muP"}

# A log-log slope within +-FLAT_SLOPE is "flat": a quarter of the way from constant to growing
# like sqrt(width), and under a third of the slope 1 that Adam's coherent updates give SP.
FLAT_SLOPE = 0.25

# --------------------------------------------------------------------------- the models

_MLP_IN, _MLP_CLASSES, _MLP_HIDDEN, _MLP_BATCH = 32, 10, 2, 256
_MLP_LAYERS = ("input", *(f"hidden_{i}" for i in range(1, _MLP_HIDDEN + 1)), "output")
_TF_VOCAB, _TF_LEN, _TF_BLOCKS, _TF_HEAD, _TF_BATCH = 64, 16, 2, 16, 32


def _zeros(shape: tuple[int, ...]) -> np.ndarray:
    return np.zeros(shape, np.float32)


def _ones(shape: tuple[int, ...]) -> np.ndarray:
    return np.ones(shape, np.float32)


def _mlp_template(width: int) -> dict[str, Any]:
    """The MLP's parameters at ``width``: kernels as zeros (to be drawn), biases zero.

    Templates are numpy arrays: building them compiles nothing.
    """
    sizes = [_MLP_IN] + [width] * (_MLP_HIDDEN + 1) + [_MLP_CLASSES]
    return {
        name: {"kernel": np.zeros((n_in, n_out), np.float32), "bias": np.zeros(n_out, np.float32)}
        for name, n_in, n_out in zip(_MLP_LAYERS, sizes[:-1], sizes[1:], strict=True)
    }


def _mlp_forward(params: Any, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    outputs = {}
    h = x
    for name in _MLP_LAYERS:
        z = h @ params[name]["kernel"] + params[name]["bias"]
        outputs[name] = z
        h = jax.nn.relu(z)
    return z, outputs


def _mlp_data(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Gaussian inputs labelled by a random linear teacher."""
    kx, kt = jax.random.split(key)
    x = jax.random.normal(kx, (_MLP_BATCH, _MLP_IN))
    teacher = jax.random.normal(kt, (_MLP_IN, _MLP_CLASSES))
    return x, jnp.argmax(x @ teacher, axis=-1)


# The blocks are stacked on a leading axis and run by lax.scan; einsum_axes reads each stacked
# kernel's fans off the einsum the scan computes, the block axis being a batch axis.
_QKV_EQ, _PROJ_EQ, _MLP_EQ = "lbtd,ldshk->lsbthk", "lbthk,lhkd->lbtd", "lbtd,ldf->lbtf"
_TABLE = {"batch_axis": 0, "out_axis": 1}  # embedding tables: one-hot inputs, fan_in 1
_TF_OVERRIDES = {
    "embed": _TABLE,
    "pos": _TABLE,
    "blocks/qkv": einsum_axes(_QKV_EQ),
    "blocks/proj": einsum_axes(_PROJ_EQ),
    "blocks/mlp_in": einsum_axes(_MLP_EQ),
    "blocks/mlp_out": einsum_axes(_MLP_EQ),
    "blocks/ln_*": {"kind": "vector"},
}


def _tf_template(width: int) -> dict[str, Any]:
    n, heads = _TF_BLOCKS, width // _TF_HEAD
    return {
        "embed": _zeros((_TF_VOCAB, width)),
        "pos": _zeros((_TF_LEN, width)),
        "blocks": {
            "ln_1": _ones((n, width)),
            "qkv": _zeros((n, width, 3, heads, _TF_HEAD)),
            "proj": _zeros((n, heads, _TF_HEAD, width)),
            "ln_2": _ones((n, width)),
            "mlp_in": _zeros((n, width, 4 * width)),
            "mlp_out": _zeros((n, 4 * width, width)),
        },
        "ln_f": _ones((width,)),
        "unembed": _zeros((width, _TF_VOCAB)),
    }


def _rms_norm(x: jax.Array, scale: jax.Array) -> jax.Array:
    return x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale


def _tf_block(h: jax.Array, p: Any) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """One pre-norm causal block; returns the new stream and its two branch outputs."""
    u = _rms_norm(h, p["ln_1"])
    q, k, v = jnp.einsum("btd,dshk->sbthk", u, p["qkv"])
    causal = jnp.tril(jnp.ones((_TF_LEN, _TF_LEN), bool))
    logits = jnp.einsum("bqhk,bshk->bhqs", q, k) / math.sqrt(_TF_HEAD)
    weights = jax.nn.softmax(jnp.where(causal, logits, -1e9), axis=-1)
    a = jnp.einsum("bhqs,bshk,hkd->bqd", weights, v, p["proj"])
    h = h + a
    m = jax.nn.gelu(_rms_norm(h, p["ln_2"]) @ p["mlp_in"]) @ p["mlp_out"]
    return h + m, (a, m)


def _tf_forward(params: Any, tokens: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """A pre-norm causal transformer; records the embedding, every branch and the logits."""
    h = params["embed"][tokens] + params["pos"]
    outputs = {"embed": h}
    h, (attn, mlp) = lax.scan(_tf_block, h, params["blocks"])
    for i in range(_TF_BLOCKS):
        outputs[f"attn_{i}"], outputs[f"mlp_{i}"] = attn[i], mlp[i]
    z = _rms_norm(h, params["ln_f"]) @ params["unembed"]
    outputs["logits"] = z
    return z, outputs


def _tf_data(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Random tokens; the target is the sum of the current and previous token, mod the vocab."""
    tokens = jax.random.randint(key, (_TF_BATCH, _TF_LEN), 0, _TF_VOCAB)
    previous = jnp.pad(tokens[:, :-1], ((0, 0), (1, 0)))
    return tokens, (tokens + previous) % _TF_VOCAB


@dataclasses.dataclass(frozen=True)
class _Model:
    template: Callable[[int], Any]
    forward: Callable[[Any, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]
    data: Callable[[jax.Array], tuple[jax.Array, jax.Array]]
    overrides: Mapping[str, Mapping[str, Any]] | None
    layers: tuple[str, ...]
    width_multiple: int


_MODELS = {
    "mlp": _Model(
        _mlp_template,
        _mlp_forward,
        _mlp_data,
        None,
        _MLP_LAYERS,
        1,
    ),
    "transformer": _Model(
        _tf_template,
        _tf_forward,
        _tf_data,
        _TF_OVERRIDES,
        ("embed", *(f"{b}_{i}" for i in range(_TF_BLOCKS) for b in ("attn", "mlp")), "logits"),
        _TF_HEAD,
    ),
}


@functools.partial(jax.jit, static_argnames=("model", "steps"))
def _train(
    params: Any,
    factors: Any,
    x: jax.Array,
    y: jax.Array,
    learning_rate: jax.Array,
    *,
    model: str,
    steps: int,
) -> jax.Array:
    """Mean |output| of every layer before the first and after each of ``steps`` Adam steps.

    ``factors`` (the learning-rate factors, as arrays) is an argument, so SP and muP share one
    compiled program per width.
    """
    import optax

    spec = _MODELS[model]
    tx = optax.chain(optax.adam(learning_rate), scale_by_tree(factors))

    def loss_and_sizes(p: Any) -> tuple[jax.Array, jax.Array]:
        logits, outputs = spec.forward(p, x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, jnp.stack([jnp.mean(jnp.abs(outputs[name])) for name in spec.layers])

    def step(carry: Any, _: Any) -> tuple[Any, jax.Array]:
        p, state = carry
        (_, sizes), grads = jax.value_and_grad(loss_and_sizes, has_aux=True)(p)
        updates, state = optimizer_update(tx, grads, state, p)
        return (optax.apply_updates(p, updates), state), sizes

    (params, _), sizes = lax.scan(step, (params, tx.init(params)), None, length=steps)
    return jnp.concatenate([sizes, loss_and_sizes(params)[1][None]])


# --------------------------------------------------------------------------- the report


def _slope(widths: Sequence[int], sizes: np.ndarray) -> float:
    """Least-squares slope of log(size) against log(width); NaN when a size is not positive."""
    if not np.all(np.isfinite(sizes)) or np.any(sizes <= 0):
        return float("nan")
    return float(np.polyfit(np.log(widths), np.log(sizes), 1)[0])


def _verdict(slopes: Sequence[float]) -> str:
    """``flat``, ``grows`` or ``shrinks`` from the mean slope over the steps after the first.

    A NaN slope (a size that overflowed to inf or nan at some width) counts as ``grows``.
    """
    s = float(np.mean(slopes[1:]))
    if not math.isfinite(s) or s > FLAT_SLOPE:
        return "grows"
    if s < -FLAT_SLOPE:
        return "shrinks"
    return "flat"


@dataclasses.dataclass(frozen=True)
class CoordCheckReport:
    """The result of :func:`coord_check`; ``str(report)`` is the table the CLI prints.

    Attributes:
        model: ``"mlp"`` or ``"transformer"``.
        widths: the widths trained, the first being the base width.
        steps: Adam steps per run.
        layers: the recorded layers, input to output.
        sizes: ``sizes[param][layer]``, an array ``(steps + 1, len(widths))`` of mean absolute
            outputs: row 0 at init, row t after t updates; ``param`` is ``"sp"`` or ``"mup"``.
        slopes: ``slopes[param][layer][step]``, the log-log slope of that size against width.
        verdicts: ``verdicts[param][layer]``: ``"flat"`` when the mean slope over steps 1 to
            ``steps`` is within ``FLAT_SLOPE`` of 0, else ``"grows"`` or ``"shrinks"``.
        learning_rate: Adam's learning rate (the base model's).
        seed: the PRNG seed of data and weights.
        seconds: wall time of the whole check.
    """

    model: str
    widths: tuple[int, ...]
    steps: int
    layers: tuple[str, ...]
    sizes: dict[str, dict[str, np.ndarray]]
    slopes: dict[str, dict[str, tuple[float, ...]]]
    verdicts: dict[str, dict[str, str]]
    learning_rate: float
    seed: int
    seconds: float

    def table(self) -> str:
        """Slopes by step, the sizes at the last step by width, and the verdicts."""
        rows = [(p, layer) for p in PARAMETRIZATIONS for layer in self.layers]
        labels = {
            "param": [_LABELS[p] for p, _ in rows],
            "layer": [layer for _, layer in rows],
        }
        header = "".join(f"{f'slope@{t}':>10}" for t in range(self.steps + 1))
        header += "".join(f"{f'w={w}':>9}" for w in self.widths) + "  verdict"
        cells = []
        for p, layer in rows:
            slopes = "".join(
                fmt(s, 10) if math.isfinite(s) else f"{'-':>10}" for s in self.slopes[p][layer]
            )
            sizes = "".join(fmt(v, 9) for v in self.sizes[p][layer][-1])
            cells.append(f"{slopes}{sizes}  {self.verdicts[p][layer]}")
        return text_table(labels, header, cells)

    def __str__(self) -> str:
        """The table."""
        return self.table()


def _draw_both(template: Any, infos: dict[str, Any], key: jax.Array) -> dict[str, Any]:
    """``mup_init`` under both parametrizations in one program, compiled once per width."""
    flat = {p: jax.tree_util.tree_flatten(i, is_leaf=_is_info) for p, i in infos.items()}
    static = tuple((p, tuple(leaves), treedef) for p, (leaves, treedef) in flat.items())
    return _draw_compiled(template, key, static)


def _is_info(x: Any) -> bool:
    return isinstance(x, MupInfo)


@functools.partial(jax.jit, static_argnums=2)
def _draw_compiled(template: Any, key: jax.Array, static: tuple) -> dict[str, Any]:
    return {
        p: mup_init(template, jax.tree_util.tree_unflatten(treedef, leaves), key)
        for p, leaves, treedef in static
    }


def _check_widths(widths: Any, multiple: int, model: str) -> tuple[int, ...]:
    try:
        out = tuple(int(w) for w in widths)
    except (TypeError, ValueError):
        raise ValueError(
            f"coord_check: widths must be a sequence of ints, got {widths!r}."
        ) from None
    if len(out) < 2 or any(b <= a for a, b in itertools.pairwise(out)) or out[0] < 1:
        raise ValueError(
            f"coord_check: widths={out} must be at least two positive, strictly increasing widths "
            "(the first is the base width)."
        )
    if any(w % multiple for w in out):
        raise ValueError(
            f"coord_check: model={model!r} needs widths divisible by its head size {multiple}; "
            f"got widths={out}."
        )
    return out


def coord_check(
    *,
    widths: Sequence[int] = (64, 128, 256, 512, 1024),
    steps: int = 5,
    model: str = "mlp",
    learning_rate: float = 1e-2,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> CoordCheckReport:
    """Trains a model at several widths under SP and muP and measures every layer's output size.

    The first width is the base: there SP and muP are the same model. ``model="mlp"`` is a
    ReLU MLP (32 inputs; layers ``input``, ``hidden_1``, ``hidden_2`` of width units and an
    ``output`` of 10 classes; batch 256) on Gaussian inputs labelled by a random teacher; ``"transformer"`` a two-block pre-norm causal transformer (head size 16,
    heads = width / 16) learning ``(token + previous token) mod 64``. Both train with Adam at
    ``learning_rate`` on one fixed batch, SP with one learning rate and the kernels at variance
    ``1/fan_in``, muP through :func:`jaxinit.mup_infos`, :func:`jaxinit.mup_init` and
    :func:`jaxinit.mup_lr_scale`'s factors. Under muP every verdict is ``"flat"``; under SP with
    Adam the hidden and output layers grow with width.

    Args:
        widths: at least two increasing widths, the first being the base.
        steps: Adam steps per run, >= 1.
        model: ``"mlp"`` or ``"transformer"``.
        learning_rate: Adam's learning rate.
        seed: the PRNG seed for data and weights (the same at every width).
        progress: called with one line per width, e.g. ``print`` to stderr.

    Returns:
        A :class:`CoordCheckReport`.

    Raises:
        ValueError: bad widths, steps, model or learning rate.

    Example:
        >>> import jaxinit as ji
        >>> report = ji.coord_check(widths=(32, 64), steps=1)
        >>> report.layers
        ('input', 'hidden_1', 'hidden_2', 'output')
        >>> len(report.slopes["mup"]["hidden_1"]), report.sizes["sp"]["output"].shape
        (2, (2, 2))
    """
    if model not in _MODELS:
        raise ValueError(
            f"coord_check: unknown model {model!r}; expected one of {', '.join(map(repr, COORD_MODELS))}."
        )
    spec = _MODELS[model]
    widths = _check_widths(widths, spec.width_multiple, model)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"coord_check: steps must be an int >= 1, got {steps!r}.")
    if not (
        isinstance(learning_rate, int | float)
        and math.isfinite(learning_rate)
        and learning_rate > 0
    ):
        raise ValueError(
            f"coord_check: learning_rate must be finite and > 0, got {learning_rate!r}."
        )
    start = time.perf_counter()
    data_key, init_key = jax.random.split(jax.random.key(seed))
    x, y = spec.data(data_key)
    base = jax.eval_shape(lambda: spec.template(widths[0]))
    lr = jnp.asarray(learning_rate, jnp.float32)
    runs: dict[str, list[np.ndarray]] = {p: [] for p in PARAMETRIZATIONS}
    for width in widths:
        template = spec.template(width)
        delta = jax.eval_shape(lambda: spec.template(widths[1])) if width == widths[0] else None
        infos = mup_infos(template, base, delta_params=delta, overrides=spec.overrides)
        sp_infos = jax.tree.map(
            lambda i: dataclasses.replace(i, fan_in_mult=1.0, fan_out_mult=1.0),
            infos,
            is_leaf=_is_info,
        )
        # One compiled program draws both: the kernels SP and muP share are computed once.
        drawn = _draw_both(template, {"sp": sp_infos, "mup": infos}, init_key)
        for param, param_infos in (("sp", sp_infos), ("mup", infos)):
            factors = jax.tree.map(lambda f: jnp.asarray(f, jnp.float32), lr_factors(param_infos))
            sizes = _train(drawn[param], factors, x, y, lr, model=model, steps=steps)
            runs[param].append(np.asarray(sizes, np.float64))
        if progress is not None:
            progress(f"width {width}: done ({time.perf_counter() - start:.1f} s)")
    sizes_by = {
        p: {
            layer: np.stack([r[:, j] for r in runs[p]], axis=1)
            for j, layer in enumerate(spec.layers)
        }
        for p in PARAMETRIZATIONS
    }
    slopes = {
        p: {
            layer: tuple(_slope(widths, sizes_by[p][layer][t]) for t in range(steps + 1))
            for layer in spec.layers
        }
        for p in PARAMETRIZATIONS
    }
    verdicts = {
        p: {layer: _verdict(slopes[p][layer]) for layer in spec.layers} for p in PARAMETRIZATIONS
    }
    return CoordCheckReport(
        model=model,
        widths=widths,
        steps=steps,
        layers=spec.layers,
        sizes=sizes_by,
        slopes=slopes,
        verdicts=verdicts,
        learning_rate=float(learning_rate),
        seed=seed,
        seconds=time.perf_counter() - start,
    )


def plot_coord_check(report: CoordCheckReport, path: str, *, dpi: int = 100) -> str:
    r"""Draws the coordinate check as the muP paper does: size against width, one curve per layer.

    Two rows (SP, muP), one panel per step, log-log axes. Needs matplotlib (the ``plot`` extra).

    Args:
        report: the result of :func:`coord_check`.
        path: where the PNG goes.
        dpi: its resolution.

    Returns:
        ``path``.

    Raises:
        ImportError: when matplotlib is not installed.

    Example:
        >>> import os, tempfile, jaxinit as ji
        >>> r = ji.coord_check(widths=(32, 64), steps=1)
        >>> path = ji.plot_coord_check(r, os.path.join(tempfile.mkdtemp(), "coord.png"))
        >>> with open(path, "rb") as f:
        ...     f.read(8)
        b'\x89PNG\r\n\x1a\n'
    """
    plt = pyplot()
    ncols = report.steps + 1
    fig, axes = plt.subplots(
        2, ncols, figsize=(2.4 * ncols, 4.8), squeeze=False, sharex=True, sharey="row"
    )
    for row, param in enumerate(PARAMETRIZATIONS):
        for t in range(ncols):
            ax = axes[row, t]
            for layer in report.layers:
                ax.plot(report.widths, report.sizes[param][layer][t], marker="o", ms=3, label=layer)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{_LABELS[param]}, t={t}", fontsize=9)
            ax.tick_params(labelsize=7)
            if t == 0:
                ax.set_ylabel("mean |output|", fontsize=8)
            if row == 1:
                ax.set_xlabel("width", fontsize=8)
    axes[0, -1].legend(fontsize=6)
    fig.suptitle(f"coordinate check: {report.model}, Adam lr {report.learning_rate:g}", fontsize=10)
    return save_png(fig, path, dpi)
