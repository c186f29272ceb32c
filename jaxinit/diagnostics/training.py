"""A few training steps on one batch, recording each weight's update:data ratio per step."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinit.diagnostics.stats import optimizer_update

__all__ = ["UpdateRatios", "update_ratios"]


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
        >>> model = nn.Sequential([nn.Dense(32), nn.tanh, nn.Dense(1)])
        >>> x = jax.random.normal(jax.random.key(0), (64, 8))
        >>> v = model.init(jax.random.key(1), x)
        >>> r = ji.update_ratios(model, x, jnp.zeros((64, 1)), variables=v, steps=3,
        ...                      loss_fn=lambda o, y: jnp.mean((o - y) ** 2),
        ...                      optimizer=optax.sgd(1e-2))
        >>> r.names, r.ratios.shape
        (('layers_0/kernel', 'layers_2/kernel'), (3, 2))
    """
    from jaxinit.diagnostics.flax_models import adapter, loss_value

    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an int >= 1; got {steps!r}.")
    ad = adapter(model, variables, model_kwargs)
    names = tuple(n for n, p in ad.params.items() if not weights_only or jnp.ndim(p) >= 2)

    @jax.jit
    def step(params, other, opt_state):
        def objective(p):
            out, _, new_other = ad.run(p, x, None, other)
            return loss_value(loss_fn, out, y), new_other

        (loss, new_other), grads = jax.value_and_grad(objective, has_aux=True)(params)
        updates, opt_state = optimizer_update(optimizer, grads, opt_state, params)
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
