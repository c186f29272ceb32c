"""LSUV: layer-sequential unit-variance initialization (Mishkin and Matas, 2015)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxinit.diagnostics import _capture
from jaxinit.diagnostics._mlp import fmt
from jaxinit.diagnostics.stats import Include, _include_fn

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
        w = max([len("layer")] + [len(n) for n in self.names])
        k = max([len("kind")] + [len(n) for n in self.kinds])
        lines = [f"{'layer':<{w}}  {'kind':<{k}}  iters   variance       mean  converged"]
        for row in zip(
            self.names,
            self.kinds,
            self.iterations,
            self.variances,
            self.means,
            self.converged,
            strict=True,
        ):
            name, kind, it, var, mean, ok = row
            lines.append(
                f"{name:<{w}}  {kind:<{k}}  {it:5d}{fmt(var, 11)}{fmt(mean, 11)}  "
                f"{'yes' if ok else 'no'}"
            )
        return "\n".join(lines)


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
    parameter (``Dense``, ``Conv``, ``ConvTranspose``, ``nnx.Linear``, ``nnx.Conv``, ...) first
    gets an orthogonal kernel (``ji.orthogonal()``); then, layer by layer in forward order, the
    batch runs through the model and the layer's kernel is divided by the standard deviation of
    its output, until ``|Var(output) - 1| <= tol`` or ``max_iters`` rescalings. With ``center``,
    the bias also absorbs the output's mean (``b <- (b - mean) / std``, fastai's variant), so the
    output ends with mean 0 as well (layers without a bias are only rescaled). A layer used
    several times is rescaled at its first call.

    Models with batch norm work: the model runs as given (linen through
    ``apply(..., mutable=True)``, nnx on a fresh copy), and running statistics are left as they
    were; only kernels and biases change.

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
        linen: ``(new_variables, report)``; the variables dict has the same structure as
        ``variables``, with new kernels (and biases). nnx: ``report``; the model is updated in
        place. The report is an :class:`LsuvReport`.

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
    if not (isinstance(tol, int | float) and tol > 0):
        raise ValueError(f"tol must be a positive number; got {tol!r}.")
    if not isinstance(max_iters, int) or isinstance(max_iters, bool) or max_iters < 1:
        raise ValueError(f"max_iters must be an int >= 1; got {max_iters!r}.")
    if orthogonal_init and key is None:
        raise ValueError("key is required for the orthogonal pre-init (or orthogonal_init=False).")
    ad = _capture.adapter(model, variables, model_kwargs)
    params = dict(ad.params)

    # Which calls to rescale: leaf modules with a kernel, first call of each, forward order.
    meta: list[list[_capture.Record]] = []

    def shapes(p):
        _, records, _ = ad.run(p, x)
        meta.append(records)
        return [r.value for r in records]

    jax.eval_shape(shapes, params)
    keep = _include_fn(include)
    targets: list[tuple[int, _capture.Record]] = []
    seen: set[str] = set()
    for i, r in enumerate(meta[-1]):
        if r.leaf and r.kernel is not None and r.kernel not in seen and keep(r.name):
            seen.add(r.kernel)
            targets.append((i, r))
    if not targets:
        raise ValueError(
            "lsuv found no layer to rescale: no leaf module with a 'kernel' parameter"
            + (" matched include" if include is not None else "")
            + "."
        )

    if orthogonal_init:
        from jaxinit._src.initializers import orthogonal

        ortho = orthogonal()
        for k, (_, r) in zip(jax.random.split(key, len(targets)), targets, strict=True):
            kernel = params[r.kernel]
            params[r.kernel] = ortho(k, kernel.shape, kernel.dtype)

    @jax.jit
    def moments(p):
        _, records, _ = ad.run(p, x)
        vals = [records[i].value.astype(jnp.float32) for i, _ in targets]
        means = jnp.stack([jnp.mean(v) for v in vals])
        var = jnp.stack([jnp.var(v) for v in vals])
        return means, var

    means, var = jax.device_get(moments(params))
    iterations, final_var, final_mean, converged = [], [], [], []
    for t, (_, r) in enumerate(targets):
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
                break
            scale = 1.0 / math.sqrt(v)
            kernel = params[r.kernel]
            params[r.kernel] = kernel * jnp.asarray(scale, kernel.dtype)
            if center and r.bias is not None:
                bias = params[r.bias]
                params[r.bias] = (bias - jnp.asarray(m, bias.dtype)) * jnp.asarray(
                    scale, bias.dtype
                )
            it += 1
            means, var = jax.device_get(moments(params))
        iterations.append(it)
        final_var.append(v)
        final_mean.append(m)
        converged.append(ok)

    report = LsuvReport(
        names=tuple(r.name for _, r in targets),
        kinds=tuple(r.kind for _, r in targets),
        iterations=tuple(iterations),
        variances=tuple(final_var),
        means=tuple(final_mean),
        converged=tuple(converged),
        tol=float(tol),
    )
    if ad.framework == "linen":
        return ad.variables(params), report
    ad.update(params)
    return report
