"""LSUV: layer-sequential unit-variance initialization (Mishkin and Matas, 2015)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxinit._src.initializers import orthogonal
from jaxinit.diagnostics.selection import Include, include_fn
from jaxinit.diagnostics.tables import fmt, text_table

__all__ = ["LsuvReport", "lsuv"]


@dataclasses.dataclass(frozen=True)
class LsuvReport:
    """What :func:`lsuv` did, one entry per rescaled layer in forward order.

    Attributes:
        names: layer names (module paths).
        kinds: module class names.
        iterations: how many rescalings each layer needed (0: already within tolerance).
        variances: each layer's output variance on the batch after its last rescaling.
        means: each layer's output mean after its last rescaling.
        converged: whether each layer ended within tolerance.
        tol: the tolerance used.
    """

    names: tuple[str, ...]
    kinds: tuple[str, ...]
    iterations: tuple[int, ...]
    variances: tuple[float, ...]
    means: tuple[float, ...]
    converged: tuple[bool, ...]
    tol: float

    def __str__(self) -> str:
        """A table: iterations, final variance and mean, and convergence of each layer."""
        cells = [
            f"  {it:5d}{fmt(var, 11)}{fmt(mean, 11)}  {'yes' if ok else 'no'}"
            for it, var, mean, ok in zip(
                self.iterations, self.variances, self.means, self.converged, strict=True
            )
        ]
        header = "  iters   variance       mean  converged"
        return text_table({"layer": self.names, "kind": self.kinds}, header, cells)


@dataclasses.dataclass(frozen=True)
class _Layer:
    """The outcome of rescaling one layer."""

    iterations: int
    variance: float
    mean: float
    converged: bool


def _check_arguments(tol: Any, max_iters: Any, orthogonal_init: bool, key: Any) -> None:
    if not (isinstance(tol, int | float) and tol > 0):
        raise ValueError(f"tol must be a positive number; got {tol!r}.")
    if not isinstance(max_iters, int) or isinstance(max_iters, bool) or max_iters < 1:
        raise ValueError(f"max_iters must be an int >= 1; got {max_iters!r}.")
    if orthogonal_init and key is None:
        raise ValueError("key is required for the orthogonal pre-init (or orthogonal_init=False).")


def _targets(ad: Any, params: dict, x: Any, include: Include) -> list[Any]:
    """The records to rescale: leaf modules with a kernel, first call of each, forward order."""
    keep = include_fn(include)
    targets, seen = [], set()
    for r in ad.trace(params, x):
        if r.leaf and r.kernel is not None and r.kernel not in seen and keep(r.name):
            seen.add(r.kernel)
            targets.append(r)
    if not targets:
        raise ValueError(
            "lsuv found no layer to rescale: no leaf module with a 'kernel' parameter"
            + (" matched include" if include is not None else "")
            + "."
        )
    return targets


def _orthogonal_pre_init(params: dict, targets: list[Any], key: jax.Array) -> None:
    """Replaces every target kernel in ``params`` by an orthogonal one, one key per kernel."""
    ortho = orthogonal()
    for k, r in zip(jax.random.split(key, len(targets)), targets, strict=True):
        kernel = params[r.kernel]
        params[r.kernel] = ortho(k, kernel.shape, kernel.dtype)


def _moments_fn(ad: Any, x: Any, targets: list[Any]) -> Callable[[dict], tuple]:
    """A jitted ``params -> (means, variances)`` of the targets' outputs, fetched to the host."""
    names = {r.name for r in targets}

    @jax.jit
    def moments(p):
        _, records, _ = ad.run(p, x)
        vals = [r.value.astype(jnp.float32) for r in records if r.name in names]
        return jnp.stack([jnp.mean(v) for v in vals]), jnp.stack([jnp.var(v) for v in vals])

    return lambda p: jax.device_get(moments(p))


def _rescale_layer(
    params: dict,
    r: Any,
    t: int,
    moments: Callable,
    state: tuple,
    tol: float,
    max_iters: int,
    center: bool,
) -> tuple[_Layer, tuple]:
    """Rescales target ``r`` (number ``t``) until within ``tol``; returns its outcome and moments.

    ``state`` is the (means, variances) of all targets for the current ``params``, which are
    updated in place.
    """
    means, var = state
    it = 0
    while True:
        v, m = float(var[t]), float(means[t])
        if not math.isfinite(v) or v <= 0.0:
            raise ValueError(
                f"lsuv: layer {r.name!r} has output variance {v!r} on the batch; it cannot "
                "be rescaled to 1 (dead or overflowing inputs?)."
            )
        ok = abs(v - 1.0) <= tol and (not center or r.bias is None or abs(m) <= tol)
        if ok or it >= max_iters:
            return _Layer(it, v, m, ok), (means, var)
        scale = 1.0 / math.sqrt(v)
        kernel = params[r.kernel]
        params[r.kernel] = kernel * jnp.asarray(scale, kernel.dtype)
        if center and r.bias is not None:
            bias = params[r.bias]
            params[r.bias] = (bias - jnp.asarray(m, bias.dtype)) * jnp.asarray(scale, bias.dtype)
        it += 1
        means, var = moments(params)


def _report(targets: list[Any], layers: list[_Layer], tol: float) -> LsuvReport:
    return LsuvReport(
        names=tuple(r.name for r in targets),
        kinds=tuple(r.kind for r in targets),
        iterations=tuple(layer.iterations for layer in layers),
        variances=tuple(layer.variance for layer in layers),
        means=tuple(layer.mean for layer in layers),
        converged=tuple(layer.converged for layer in layers),
        tol=float(tol),
    )


def lsuv(
    model: Any,
    x: Any,
    *,
    variables: Mapping[str, Any] | None = None,
    key: jax.Array | None = None,
    tol: float = 0.1,
    max_iters: int = 10,
    center: bool = False,
    orthogonal_init: bool = True,
    include: Include = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> Any:
    """Data-dependent init: rescale each layer until its output variance on a batch is 1.

    LSUV (Mishkin and Matas, "All you need is a good init", 2015): every layer with a ``kernel``
    parameter (``Dense``, ``Conv``, ``nnx.Linear``, ...) first gets an orthogonal kernel; then,
    layer by layer in forward order, its kernel is divided by the standard deviation of its
    output on the batch until ``|Var(output) - 1| <= tol`` or ``max_iters`` rescalings. With
    ``center`` the bias also absorbs the output's mean (``b <- (b - mean) / std``, fastai's
    variant). A layer used several times is rescaled at its first call. Models with batch norm
    work; running statistics are left as they were, only kernels and biases change.

    Args:
        model: a ``flax.linen.Module`` (then ``variables`` is required) or a ``flax.nnx.Module``.
        x: the batch (LSUV uses one batch; a few hundred examples is typical).
        variables: linen variables (``model.init(...)``); None for nnx.
        key: PRNG key for the orthogonal pre-init; required when ``orthogonal_init``.
        tol: tolerance on ``|Var - 1|`` (and on ``|mean|`` with ``center``); the paper uses 0.1.
        max_iters: most rescalings per layer (the paper's T_max is 10).
        center: also centre each output through the layer's bias.
        orthogonal_init: replace kernels by orthogonal matrices first, as the paper does.
        include: restrict the layers: a regular expression searched in the name, a sequence of
            names, or a predicate; None takes every layer with a kernel.
        model_kwargs: extra keyword arguments for the model call (linen: for ``model.apply``).

    Returns:
        linen: ``(new_variables, report)``, the variables with new kernels (and biases). nnx:
        ``report``; the model is updated in place. The report is an :class:`LsuvReport`.

    Raises:
        ValueError: for missing or superfluous ``variables``, a missing ``key``, ``tol <= 0``,
            ``max_iters < 1``, a model with no layer to rescale, or a layer whose output has zero
            or non-finite variance on the batch (it cannot be rescaled).
        TypeError: for a model that is not a Flax module.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxinit as ji
        >>> model = nn.Sequential([nn.Dense(64), nn.tanh, nn.Dense(64), nn.tanh, nn.Dense(1)])
        >>> x = jax.random.normal(jax.random.key(0), (256, 16))
        >>> variables = model.init(jax.random.key(1), x)
        >>> variables, report = ji.lsuv(model, x, variables=variables, key=jax.random.key(2))
        >>> [round(v, 3) for v in report.variances]
        [1.0, 1.0, 1.0]
    """
    from jaxinit.diagnostics.flax_models import adapter

    _check_arguments(tol, max_iters, orthogonal_init, key)
    ad = adapter(model, variables, model_kwargs)
    params = dict(ad.params)
    targets = _targets(ad, params, x, include)
    if orthogonal_init:
        _orthogonal_pre_init(params, targets, key)
    moments = _moments_fn(ad, x, targets)
    state = moments(params)
    layers = []
    for t, r in enumerate(targets):
        layer, state = _rescale_layer(params, r, t, moments, state, tol, max_iters, center)
        layers.append(layer)
    report = _report(targets, layers, tol)
    if ad.framework == "linen":
        return ad.variables(params), report
    ad.update(params)
    return report
