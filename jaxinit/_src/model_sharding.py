"""Checks and the jitted run behind ``jaxinit.linen.init_sharded`` and ``jaxinit.nnx.create_sharded``.

A model bigger than one device cannot be initialized on one device and then split. Both functions
first trace the initialization abstractly (no memory) to read each parameter's sharding
annotation, then run the real initialization under ``jax.jit`` with those shardings as
``out_shardings``, so XLA partitions every initializer and each device creates only its shards.
This module holds the parts that need only JAX.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]


def check_mesh(mesh: Any, who: str) -> None:
    """Raises TypeError unless ``mesh`` is a ``jax.sharding.Mesh``."""
    if not isinstance(mesh, jax.sharding.Mesh):
        raise TypeError(f"{who}: mesh must be a jax.sharding.Mesh, got {mesh!r}.")


def check_rules(rules: Any, who: str) -> tuple[tuple[str, Any], ...]:
    """``rules`` as a tuple of ``(logical_name, mesh_axes)`` pairs (None: no rules)."""
    if rules is None:
        return ()
    try:
        return tuple((name, axes) for name, axes in rules)
    except (TypeError, ValueError):
        raise TypeError(
            f"{who}: rules must be a sequence of (logical_name, mesh_axes) pairs, got {rules!r}."
        ) from None


def check_spec(spec: PartitionSpec, mesh: jax.sharding.Mesh, where: str, who: str) -> None:
    """Raises ValueError if ``spec`` names an axis that ``mesh`` does not have."""
    names = set(mesh.axis_names)
    for entry in spec:
        for axis in entry if isinstance(entry, tuple) else (entry,):
            if axis is not None and axis not in names:
                raise ValueError(
                    f"{who}: {where} is annotated with axis {axis!r}, which is not an axis of "
                    f"the mesh {tuple(mesh.axis_names)}; give `rules` mapping logical axis names "
                    "to mesh axes, or annotate with mesh axis names."
                )


def auto_mesh(mesh: jax.sharding.Mesh) -> jax.sharding.Mesh:
    """The same devices and axis names with every axis Auto.

    Initialization runs on this mesh: flax applies ``with_sharding_constraint`` to annotated
    parameters, which on Explicit axes is an assertion that fails for a freshly drawn array.
    """
    auto = (jax.sharding.AxisType.Auto,) * len(mesh.axis_names)
    if tuple(mesh.axis_types) == auto:
        return mesh
    return jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=auto)


def run_sharded(fn: Callable[..., Any], specs: Any, mesh: jax.sharding.Mesh, *args: Any) -> Any:
    """``fn(*args)`` under jit on the Auto copy of ``mesh``, then typed with ``mesh``'s shardings."""
    auto = auto_mesh(mesh)
    is_spec = lambda x: isinstance(x, PartitionSpec)
    to = lambda m: jax.tree_util.tree_map(lambda p: NamedSharding(m, p), specs, is_leaf=is_spec)
    with jax.set_mesh(auto):
        out = jax.jit(fn, out_shardings=to(auto))(*args)
    if auto is mesh:
        return out
    return jax.device_put(out, to(mesh))
