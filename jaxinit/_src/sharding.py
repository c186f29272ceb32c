"""Placing an initializer's output on a requested sharding, for Auto and Explicit meshes.

jax's samplers accept ``out_sharding`` only for meshes with Explicit axes. jaxinit instead runs the
sampler under ``jax.jit(..., out_shardings=...)``, which works for Auto and Explicit meshes, inside
and outside an outer jit; with ``jax_threefry_partitionable`` (jax's default) each device draws only
its own shard and the values are bit-identical to the unsharded draw.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

OutSharding = NamedSharding | PartitionSpec | None


def check_out_sharding(out_sharding: Any) -> None:
    """Raises TypeError unless ``out_sharding`` is None, a NamedSharding or a PartitionSpec."""
    if out_sharding is not None and not isinstance(
        out_sharding, NamedSharding | PartitionSpec | jax.sharding.Sharding
    ):
        raise TypeError(
            "out_sharding must be None, a jax.sharding.NamedSharding or a PartitionSpec (under "
            f"jax.set_mesh), got {out_sharding!r}."
        )


def is_tracer(x: Any) -> bool:
    """Whether ``x`` is a tracer (we are inside a jit, grad or vmap trace)."""
    return isinstance(x, jax.core.Tracer)


def sample_sharded(
    fn: Callable[[jax.Array], jax.Array], key: jax.Array, out_sharding: OutSharding
) -> jax.Array:
    """Returns ``fn(key)`` laid out with ``out_sharding``, each device computing only its shard.

    ``fn`` must be a pure function of the key whose ops XLA can partition (random bits,
    elementwise maths). For a computation that cannot be partitioned, such as a QR decomposition,
    use :func:`place` on its result instead.
    """
    check_out_sharding(out_sharding)
    if out_sharding is None:
        return fn(key)
    return jax.jit(fn, out_shardings=out_sharding)(key)


def place(x: jax.Array, out_sharding: OutSharding) -> jax.Array:
    """Lays out an already computed array with ``out_sharding`` (device_put, or a constraint)."""
    check_out_sharding(out_sharding)
    if out_sharding is None:
        return x
    if is_tracer(x):
        return jax.jit(lambda y: y, out_shardings=out_sharding)(x)
    return jax.device_put(x, out_sharding)
