"""Initializing a whole Flax model directly into its shardings.

A model bigger than one device cannot be initialized on one device and then split. These helpers
first trace the initialization abstractly (no memory) to read each parameter's sharding
annotation, then run the real initialization under ``jax.jit`` with those shardings as
``out_shardings``, so XLA partitions every initializer and each device creates only its shards.
jaxinit's initializers (and jax's, with ``jax_threefry_partitionable``, the default) give the same
values as an unsharded init with the same key.

* linen: annotate with ``nn.with_partitioning(init, ("data", "model"))`` (mesh axes) or
  ``nn.with_logical_partitioning(init, ("embed", "mlp"))`` plus ``rules`` mapping logical names to
  mesh axes, then call :func:`init_linen_sharded`.
* nnx: annotate with ``nnx.with_partitioning(init, ("data", "model"))`` or the ``out_sharding``
  metadata of ``nnx.Param`` (logical names with ``rules``), then call :func:`create_nnx_sharded`.

flax is imported inside the functions, so importing this module does not load flax.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

__all__ = ["create_nnx_sharded", "init_linen_sharded"]

LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]


def _check_mesh(mesh: Any, who: str) -> None:
    if not isinstance(mesh, jax.sharding.Mesh):
        raise TypeError(f"{who}: mesh must be a jax.sharding.Mesh, got {mesh!r}.")


def _check_rules(rules: Any, who: str) -> tuple[tuple[str, Any], ...]:
    if rules is None:
        return ()
    try:
        out = tuple((name, axes) for name, axes in rules)
    except (TypeError, ValueError):
        raise TypeError(
            f"{who}: rules must be a sequence of (logical_name, mesh_axes) pairs, got {rules!r}."
        ) from None
    return out


def _check_spec(spec: PartitionSpec, mesh: jax.sharding.Mesh, where: str, who: str) -> None:
    names = set(mesh.axis_names)
    for entry in spec:
        for axis in entry if isinstance(entry, tuple) else (entry,):
            if axis is not None and axis not in names:
                raise ValueError(
                    f"{who}: {where} is annotated with axis {axis!r}, which is not an axis of "
                    f"the mesh {tuple(mesh.axis_names)}; give `rules` mapping logical axis names "
                    "to mesh axes, or annotate with mesh axis names."
                )


def _auto(mesh: jax.sharding.Mesh) -> jax.sharding.Mesh:
    """The same devices and axis names with every axis Auto.

    Initialization runs on this mesh: flax applies ``with_sharding_constraint`` to annotated
    parameters, which on Explicit axes is an assertion that fails for a freshly drawn array.
    """
    auto = (jax.sharding.AxisType.Auto,) * len(mesh.axis_names)
    if tuple(mesh.axis_types) == auto:
        return mesh
    return jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=auto)


@contextlib.contextmanager
def _context(mesh: jax.sharding.Mesh, rules: tuple[tuple[str, Any], ...]) -> Iterator[None]:
    import flax.linen as nn

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def _run(fn: Callable[..., Any], specs: Any, mesh: jax.sharding.Mesh, *args: Any) -> Any:
    """``fn(*args)`` under jit on the Auto copy of ``mesh``, then typed with ``mesh``'s shardings."""
    auto = _auto(mesh)
    is_spec = lambda x: isinstance(x, PartitionSpec)
    to = lambda m: jax.tree_util.tree_map(lambda p: NamedSharding(m, p), specs, is_leaf=is_spec)
    with jax.set_mesh(auto):
        out = jax.jit(fn, out_shardings=to(auto))(*args)
    if auto is mesh:
        return out
    return jax.device_put(out, to(mesh))


def init_linen_sharded(
    module: Any,
    rngs: Any,
    *args: Any,
    mesh: jax.sharding.Mesh,
    rules: LogicalRules | None = None,
    **kwargs: Any,
) -> Any:
    """Runs ``module.init(rngs, *args, **kwargs)`` with every variable created on its sharding.

    Each variable's sharding comes from its annotation: ``nn.with_partitioning`` names mesh axes;
    ``nn.with_logical_partitioning`` names logical axes that ``rules`` (or the box's own rules, or
    an enclosing ``nn.logical_axis_rules``) map to mesh axes; unannotated variables are
    replicated. The shapes are found with ``jax.eval_shape`` (no memory), then ``module.init``
    runs under ``jax.jit`` with those shardings as ``out_shardings``, so no device holds more
    than its shards of a partitionable initializer. The values equal an unsharded
    ``module.init`` with the same rngs.

    Args:
      module: a ``flax.linen.Module``.
      rngs: a PRNG key or a dict of keys, as for ``module.init``.
      *args: example inputs, as for ``module.init`` (arrays or ``jax.ShapeDtypeStruct`` are not
        accepted in place of arrays: init runs for real).
      mesh: the device mesh.
      rules: ``(logical_name, mesh_axes)`` pairs for logically partitioned variables.
      **kwargs: keyword arguments of ``module.init`` (e.g. ``train=False``, ``method=...``).

    Returns:
      The variables, as ``module.init`` returns them (annotated leaves stay boxed in
      ``nn.Partitioned``; ``flax.linen.meta.unbox`` strips the boxes), laid out on ``mesh``.

    Raises:
      TypeError: ``mesh`` is not a ``jax.sharding.Mesh`` or ``rules`` is not a sequence of pairs.
      ValueError: an annotation names an axis that is not on the mesh (after the rules).

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxinit as ji
      >>> from jaxinit.flax_sharding import init_linen_sharded
      >>> mesh = jax.make_mesh((2, 4), ("data", "model"))
      >>> dense = nn.Dense(64, kernel_init=nn.with_partitioning(ji.he_normal(), (None, "model")))
      >>> v = init_linen_sharded(dense, jax.random.key(0), jnp.ones((1, 16)), mesh=mesh)
      >>> v["params"]["kernel"].value.sharding.spec == jax.P(None, "model")
      True
    """
    import flax.linen as nn
    from flax.core import meta

    who = "init_linen_sharded"
    _check_mesh(mesh, who)
    rules_t = _check_rules(rules, who)
    init = functools.partial(module.init, **kwargs)

    with _context(_auto(mesh), rules_t):
        abstract = jax.eval_shape(init, rngs, *args)

        def leaf_spec(path: Any, x: Any) -> PartitionSpec:
            where = jax.tree_util.keystr(path)
            if isinstance(x, nn.LogicallyPartitioned):
                box_rules = x.rules if x.rules is not None else ()
                composite = tuple(rules_t) + tuple(box_rules) or nn.get_logical_axis_rules()
                spec = nn.logical_to_mesh_axes(x.names, composite)
            elif isinstance(x, meta.Partitioned):
                spec = x.get_partition_spec()
            else:
                spec = PartitionSpec()
            _check_spec(spec, mesh, where, who)
            return spec

        specs = jax.tree_util.tree_map_with_path(
            leaf_spec, abstract, is_leaf=lambda x: isinstance(x, meta.AxisMetadata)
        )
        return _run(init, specs, mesh, rngs, *args)


def create_nnx_sharded(
    model_factory: Callable[[], Any],
    mesh: jax.sharding.Mesh,
    rules: LogicalRules | None = None,
) -> Any:
    """Creates an nnx model with every variable created directly on its sharding.

    flax's recipe for sharded nnx models: ``nnx.eval_shape`` builds the model abstractly (no
    memory), ``nnx.get_partition_spec`` reads each variable's ``out_sharding`` metadata (set by
    ``nnx.with_partitioning`` or ``nnx.Param(..., out_sharding=...)``; logical names are mapped
    with ``rules``), and the factory then runs under ``jax.jit`` with those shardings as
    ``out_shardings``. Unannotated variables (including RNG state) are replicated. The values
    equal ``model_factory()`` run on one device.

    Args:
      model_factory: a function of no arguments returning an ``nnx.Module`` (e.g.
        ``lambda: MyModel(rngs=nnx.Rngs(0))``); it is traced twice, so it must be pure.
      mesh: the device mesh.
      rules: ``(logical_name, mesh_axes)`` pairs for logically named variables.

    Returns:
      The model, its arrays laid out on ``mesh``.

    Raises:
      TypeError: ``mesh`` is not a ``jax.sharding.Mesh``, ``rules`` is not a sequence of pairs,
        or the factory does not return an ``nnx.Module``.
      ValueError: an annotation names an axis that is not on the mesh (after the rules).

    Example:
      >>> import jax, jaxinit as ji
      >>> from flax import nnx
      >>> from jaxinit.flax_sharding import create_nnx_sharded
      >>> mesh = jax.make_mesh((2, 4), ("data", "model"))
      >>> init = nnx.with_partitioning(ji.he_normal(), (None, "model"))
      >>> model = create_nnx_sharded(
      ...     lambda: nnx.Linear(16, 64, kernel_init=init, rngs=nnx.Rngs(0)), mesh)
      >>> model.kernel[...].sharding.spec == jax.P(None, "model")
      True
    """
    from flax import nnx

    who = "create_nnx_sharded"
    _check_mesh(mesh, who)
    rules_t = _check_rules(rules, who)
    if not callable(model_factory):
        raise TypeError(f"{who}: model_factory must be callable, got {model_factory!r}.")

    def leaves_of_new_model() -> list[Any]:
        return jax.tree_util.tree_leaves(nnx.split(model_factory())[1])

    with _context(_auto(mesh), rules_t), nnx.use_eager_sharding(False):
        abstract_model = nnx.eval_shape(model_factory)
        if not isinstance(abstract_model, nnx.Module):
            raise TypeError(
                f"{who}: model_factory returned {type(abstract_model).__name__}, expected an "
                "nnx.Module."
            )
        graphdef, abstract_state = nnx.split(abstract_model)
        specs = nnx.get_partition_spec(abstract_state)

        paths_specs = jax.tree_util.tree_leaves_with_path(
            specs, is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None
        )
        leaf_specs = []
        for path, spec in paths_specs:
            spec = PartitionSpec() if spec is None else spec
            _check_spec(spec, mesh, jax.tree_util.keystr(path), who)
            leaf_specs.append(spec)
        leaves, treedef = jax.tree_util.tree_flatten(abstract_state)
        if len(leaves) != len(leaf_specs):
            raise ValueError(
                f"{who}: found {len(leaf_specs)} partition specs for {len(leaves)} arrays."
            )
        new_leaves = _run(leaves_of_new_model, leaf_specs, mesh)
        state = jax.tree_util.tree_unflatten(treedef, new_leaves)
    return nnx.merge(graphdef, state)
