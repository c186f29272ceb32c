"""The deep bias-free MLP of the depth experiment and the propagation checker, as a ``lax.scan``.

Everything that changes between configurations (weights, activation, batch norm, LSUV) is an
argument of the jitted functions here, never a closure, so one compilation serves every
configuration of a given shape. The activation functions come from the registry of
``jaxinit._src.gains`` (the one ``variance_gain`` uses).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxinit._src.batch_norm import batch_norm, batch_norm_state
from jaxinit._src.gains import activation_fn

# The activations these MLPs take, in the order of their ``lax.switch`` index.
ACTIVATION_NAMES: tuple[str, ...] = (
    "linear",
    "relu",
    "leaky_relu",
    "tanh",
    "sigmoid",
    "gelu",
    "silu",
    "elu",
    "selu",
)

# The bounded activations' saturation measure: a unit is saturated when it exceeds the threshold.
SATURATION_MEASURES: dict[str, Callable[[jax.Array], jax.Array]] = {
    "tanh": jnp.abs,
    "sigmoid": lambda h: jnp.abs(2.0 * h - 1.0),
}


def check_activation(name: object, argname: str = "activation") -> str:
    """Returns ``name`` if it is one of :data:`ACTIVATION_NAMES`, else raises ValueError."""
    if not isinstance(name, str) or name not in ACTIVATION_NAMES:
        raise ValueError(f"{argname} must be one of {', '.join(ACTIVATION_NAMES)}; got {name!r}.")
    return name


def check_sizes(depth: object, width: object, batch: object) -> None:
    """Raises ValueError unless depth >= 1, width >= 1 and batch >= 2 are ints."""
    for arg, value, least in (("depth", depth, 1), ("width", width, 1), ("batch", batch, 2)):
        if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < least:
            raise ValueError(f"{arg} must be an int >= {least}; got {value!r}.")


def activation_index(name: str) -> jax.Array:
    """The ``act_index`` argument of :func:`depth_forward` and :func:`propagate` for ``name``."""
    return jnp.asarray(ACTIVATION_NAMES.index(name), jnp.int32)


def _branch(name: str) -> Callable[[jax.Array], tuple[jax.Array, jax.Array]]:
    fn = activation_fn(name)
    saturation = SATURATION_MEASURES.get(name)

    def run(z):
        h = fn(z)
        return h, saturation(h) if saturation is not None else jnp.zeros_like(h)

    return run


def _apply(act_index: jax.Array, z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Applies activation number ``act_index``; returns (h, saturation measure of h)."""
    return jax.lax.switch(act_index, [_branch(name) for name in ACTIVATION_NAMES], z)


def _standardize(z: jax.Array) -> jax.Array:
    """Train-mode batch norm over the batch axis (no scale or bias): ``ji.batch_norm``."""
    y, _ = batch_norm(z, batch_norm_state(z.shape[-1]), training=True)
    return y


def _lsuv_layer(
    h: jax.Array, w: jax.Array, tol: jax.Array, max_iters: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Rescales ``w`` until Var(h @ w) is within ``tol`` of 1 (at most ``max_iters`` times)."""
    z0 = h @ w

    def cond(c):
        _, z, it = c
        var = jnp.var(z)
        return (jnp.abs(var - 1.0) > tol) & (it < max_iters) & (var > 0) & jnp.isfinite(var)

    def body(c):
        # h @ (w / s) is (h @ w) / s: the rescaled output needs no second matmul.
        w, z, it = c
        s = jnp.sqrt(jnp.var(z))
        return w / s, z / s, it + 1

    w, z, it = jax.lax.while_loop(cond, body, (w, z0, jnp.zeros((), jnp.int32)))
    return w, z, it, jnp.var(z)


@functools.partial(jax.jit, static_argnames=("saturation",))
def depth_forward(
    weights: jax.Array,
    x: jax.Array,
    act_index: jax.Array,
    use_bn: jax.Array,
    use_lsuv: jax.Array,
    tol: jax.Array,
    max_iters: jax.Array,
    *,
    saturation: float = 0.97,
) -> dict[str, jax.Array]:
    """Runs the MLP ``h_l = f(BN?(h_{l-1} @ W_l))`` and returns per-layer statistics.

    With ``use_lsuv`` each layer's weights are first rescaled, in forward order, to unit output
    variance on this batch (LSUV); the rescaled weights are returned too.
    """

    def layer(h, w):
        w, z, iters, var = jax.lax.cond(
            use_lsuv,
            lambda: _lsuv_layer(h, w, tol, max_iters),
            lambda: (w, h @ w, jnp.zeros((), jnp.int32), jnp.full((), jnp.nan, h.dtype)),
        )
        z = jax.lax.cond(use_bn, _standardize, lambda z: z, z)
        h, s = _apply(act_index, z)
        stats = {
            "std": jnp.std(h),
            "mean": jnp.mean(h),
            "saturated": jnp.mean((s > saturation).astype(h.dtype)),
            "pre_second_moment": jnp.mean(z * z),
            "lsuv_iters": iters,
            "lsuv_var": var,
        }
        return h, (stats, w)

    _, (stats, new_weights) = jax.lax.scan(layer, x, weights)
    stats["weights"] = new_weights
    return stats


@jax.jit
def propagate(
    weights: jax.Array, x: jax.Array, cotangent: jax.Array, act_index: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Second moments of pre-activations and of the gradients that reach them, per layer.

    The backward pass starts from ``cotangent`` at the last layer's pre-activation and records
    ``mean((dL/dz_l)**2)`` for every layer.
    """
    depth = weights.shape[0]
    eps = jnp.zeros((depth, *x.shape[:-1], weights.shape[-1]), x.dtype)

    def forward(eps):
        def layer(h, we):
            w, e = we
            z = h @ w + e
            h, _ = _apply(act_index, z)
            return h, z

        _, zs = jax.lax.scan(layer, x, (weights, eps))
        return zs

    zs, vjp = jax.vjp(forward, eps)
    top = jnp.zeros_like(zs).at[-1].set(cotangent)
    (grads,) = vjp(top)
    axes = tuple(range(1, zs.ndim))
    return jnp.mean(zs * zs, axis=axes), jnp.mean(grads * grads, axis=axes)


def stacked_weights(
    init: Callable[..., jax.Array], key: jax.Array, depth: int, width: int, *, jit: bool = True
) -> jax.Array:
    """Draws ``depth`` square ``(width, width)`` float32 kernels with ``init``, one key per layer.

    A loop over one draw rather than ``vmap``: batched QR (orthogonal) is far slower on CPU. With
    ``jit=False`` the draws run eagerly, reusing jax's cached samplers instead of compiling anew.
    """
    draw = (
        jax.jit(lambda k: init(k, (width, width), jnp.float32))
        if jit
        else (lambda k: init(k, (width, width), jnp.float32))
    )
    return jnp.stack([draw(k) for k in jax.random.split(key, depth)])


def as_numpy(tree):
    """Fetches a pytree of arrays to numpy."""
    return jax.tree.map(np.asarray, jax.device_get(tree))
