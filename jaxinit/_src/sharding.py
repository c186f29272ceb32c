"""Placing an initializer's output on a requested sharding, for Auto and Explicit meshes.

jax's samplers accept ``out_sharding`` only for meshes with Explicit axes, and its orthogonal
sampler runs its QR on every device when asked to shard. jaxinit handles every case with three
helpers:

* :func:`sample_sharded` for partitionable computations (random bits, elementwise maths): the
  sampler runs under ``jax.jit(..., out_shardings=...)`` (Auto axes) or ``jax.sharding.auto_axes``
  (Explicit axes), inside or outside an outer jit. With ``jax_threefry_partitionable`` (jax's
  default) each device draws only its own shard, without collectives, and the values are
  bit-identical to the unsharded draw.
* :func:`compute_once` for computations that cannot be partitioned (a QR decomposition): outside
  a trace it simply runs once, on one device; inside a trace it runs once, on the first device
  of the mesh, and is broadcast to the others with one all-reduce, instead of being run by every
  device (which is what a sharding constraint on a QR result gives).
* :func:`place` lays out an already computed array: ``device_put`` outside a trace, a sharding
  constraint (Auto axes) or ``jax.sharding.reshard`` (Explicit axes) inside one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

OutSharding = NamedSharding | PartitionSpec | None

__all__ = [
    "OutSharding",
    "check_out_sharding",
    "full_rank",
    "compute_once",
    "is_tracer",
    "mesh_of",
    "place",
    "sample_sharded",
]


def check_out_sharding(out_sharding: Any) -> None:
    """Raises unless ``out_sharding`` is None, a Sharding, or a PartitionSpec with a mesh set.

    Raises:
        TypeError: ``out_sharding`` is of another type.
        ValueError: ``out_sharding`` is a bare PartitionSpec and no mesh is set with
          ``jax.set_mesh``.
    """
    if out_sharding is None or isinstance(out_sharding, jax.sharding.Sharding):
        return
    if isinstance(out_sharding, PartitionSpec):
        if jax.sharding.get_abstract_mesh().empty:
            raise ValueError(
                f"out_sharding={out_sharding!r} is a bare PartitionSpec but no mesh is set; "
                "call the initializer under `with jax.set_mesh(mesh):` or pass "
                "NamedSharding(mesh, spec)."
            )
        return
    raise TypeError(
        "out_sharding must be None, a jax.sharding.NamedSharding or a PartitionSpec (under "
        f"jax.set_mesh), got {out_sharding!r}."
    )


def is_tracer(x: Any) -> bool:
    """Whether ``x`` is a tracer (we are inside a jit, grad or vmap trace)."""
    return isinstance(x, jax.core.Tracer)


def mesh_of(out_sharding: Any) -> jax.sharding.Mesh | jax.sharding.AbstractMesh | None:
    """The mesh ``out_sharding`` refers to: its own, the context mesh for a PartitionSpec, or None."""
    if isinstance(out_sharding, NamedSharding):
        return out_sharding.mesh
    if isinstance(out_sharding, PartitionSpec):
        mesh = jax.sharding.get_abstract_mesh()
        return None if mesh.empty else mesh
    return None


def _explicit_axes(out_sharding: Any) -> tuple[str, ...]:
    mesh = mesh_of(out_sharding)
    return () if mesh is None else tuple(mesh.explicit_axes)


def sample_sharded(
    fn: Callable[[jax.Array], jax.Array], key: jax.Array, out_sharding: OutSharding
) -> jax.Array:
    """Returns ``fn(key)`` laid out with ``out_sharding``, each device computing only its shard.

    ``fn`` must be a pure function of the key whose ops XLA can partition (random bits,
    elementwise maths). For a computation that cannot be partitioned, such as a QR decomposition,
    use :func:`compute_once`.

    Args:
        fn: the sampler, a function of the key.
        key: a PRNG key.
        out_sharding: None, a Sharding, or a PartitionSpec of the mesh set with ``jax.set_mesh``.

    Returns:
        ``fn(key)`` with sharding ``out_sharding``.

    Raises:
        TypeError, ValueError: see :func:`check_out_sharding`.

    Example:
        >>> import jax
        >>> from jax.sharding import NamedSharding, PartitionSpec as P
        >>> mesh = jax.sharding.Mesh(jax.devices(), ("d",))
        >>> s = NamedSharding(mesh, P("d"))
        >>> x = sample_sharded(lambda k: jax.random.normal(k, (16,)), jax.random.key(0), s)
        >>> x.sharding == s, bool((x == jax.random.normal(jax.random.key(0), (16,))).all())
        (True, True)
    """
    check_out_sharding(out_sharding)
    if out_sharding is None:
        return fn(key)
    explicit = _explicit_axes(out_sharding)
    if explicit:
        # Explicit axes: an inner jit's out_shardings would not change the type of its result
        # inside a trace; auto_axes computes under Auto axes and reshards, as jax.random does.
        auto = jax.sharding.auto_axes(fn, axes=explicit, out_sharding=out_sharding)
        if (
            isinstance(out_sharding, NamedSharding)
            and jax.sharding.get_abstract_mesh().empty
            and not is_tracer(key)
        ):
            # An Explicit mesh outside jax.set_mesh (jax.make_mesh's default): enter it here.
            with jax.set_mesh(out_sharding.mesh):
                return jax.jit(auto)(key)
        return jax.jit(auto)(key)
    return jax.jit(fn, out_shardings=out_sharding)(key)


def place(x: jax.Array, out_sharding: OutSharding) -> jax.Array:
    """Lays out an already computed array with ``out_sharding``.

    Outside a trace this is ``jax.device_put``. Inside one it is a sharding constraint (Auto
    axes) or ``jax.sharding.reshard`` (Explicit axes); the partitioner propagates it back into the
    computation of ``x``, so cheap partitionable work (zeros, an identity) is done shard by shard.

    Args:
        x: the array.
        out_sharding: None, a Sharding, or a PartitionSpec of the mesh set with ``jax.set_mesh``.

    Returns:
        ``x`` with sharding ``out_sharding`` (``x`` itself when it is None).

    Raises:
        TypeError, ValueError: see :func:`check_out_sharding`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jax.sharding import NamedSharding, PartitionSpec as P
        >>> mesh = jax.sharding.Mesh(jax.devices(), ("d",))
        >>> place(jnp.ones((8, 2)), NamedSharding(mesh, P("d"))).sharding.spec == P("d")
        True
    """
    check_out_sharding(out_sharding)
    if out_sharding is None:
        return x
    if not is_tracer(x):
        return jax.device_put(x, out_sharding)
    if _explicit_axes(out_sharding):
        return jax.sharding.reshard(x, out_sharding)
    return lax.with_sharding_constraint(x, out_sharding)


def compute_once(
    fn: Callable[[jax.Array], jax.Array], key: jax.Array, out_sharding: OutSharding
) -> jax.Array:
    """Returns ``fn(key)``, computed by one device even inside a sharded trace.

    For computations XLA cannot partition (a QR decomposition is a library call on one device).
    Outside a trace, or with ``out_sharding`` None, this is ``fn(key)``: it runs once on the
    default device, and :func:`place` then lays the result out. Inside a trace with a sharding on
    a mesh of several devices, ``fn`` runs under ``jax.shard_map`` on the mesh's first device
    only (``lax.cond`` on the device index; the others produce zeros), and a ``psum`` over the
    mesh hands every device the result, replicated. Without this, a sharding constraint on the
    result propagates back into ``fn`` and every device runs the full computation: on host CPU
    devices that share cores, that is the mesh size times slower. The cost instead is one
    all-reduce of the result, and a full-size buffer on every device (which the computation needs
    on its device anyway). Follow with :func:`place` to take each device's shard.

    Args:
        fn: a function of the key returning one array.
        key: a PRNG key.
        out_sharding: the sharding the result will be placed on; only its mesh is used here.

    Returns:
        ``fn(key)``, replicated over the mesh of ``out_sharding`` inside a trace.

    Raises:
        TypeError, ValueError: see :func:`check_out_sharding`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jax.sharding import NamedSharding, PartitionSpec as P
        >>> mesh = jax.sharding.Mesh(jax.devices(), ("d",))
        >>> s = NamedSharding(mesh, P("d"))
        >>> qr = lambda k: jnp.linalg.qr(jax.random.normal(k, (8, 8)))[0]
        >>> q = jax.jit(lambda k: place(compute_once(qr, k, s), s))(jax.random.key(0))
        >>> q.sharding == s, bool(jnp.allclose(q.T @ q, jnp.eye(8), atol=1e-5))
        (True, True)
    """
    check_out_sharding(out_sharding)
    mesh = mesh_of(out_sharding)
    if not is_tracer(key) or mesh is None or mesh.size == 1:
        return fn(key)
    axes = tuple(mesh.axis_names)
    out = jax.eval_shape(fn, key)

    def body(k: jax.Array) -> jax.Array:
        first = lax.axis_index(axes) == 0
        zeros = lambda _: jnp.zeros(out.shape, out.dtype)
        return lax.psum(lax.cond(first, fn, zeros, k), axes)

    spec = PartitionSpec()
    in_mesh = mesh if isinstance(out_sharding, NamedSharding) else None
    return jax.shard_map(body, mesh=in_mesh, in_specs=spec, out_specs=spec)(key)


def full_rank(out_sharding: OutSharding, ndim: int) -> OutSharding:
    """``out_sharding`` with its ``PartitionSpec`` padded with None to ``ndim`` entries.

    ``P('x')`` and ``P('x', None)`` lay a matrix out the same way but are unequal shardings, so a
    jitted consumer would compile once for each; every initializer returns the full-rank form.

    Args:
        out_sharding: None, a NamedSharding, or a PartitionSpec.
        ndim: the rank of the array.

    Returns:
        The same kind of object, its spec of length ``ndim`` (other shardings unchanged).

    Example:
        >>> import jax
        >>> from jax.sharding import NamedSharding, PartitionSpec as P
        >>> mesh = jax.sharding.Mesh(jax.devices(), ("d",))
        >>> full_rank(NamedSharding(mesh, P("d")), 2).spec
        P('d', None)
    """
    if isinstance(out_sharding, NamedSharding):
        spec = out_sharding.spec
        if len(spec) < ndim:
            padded = PartitionSpec(*spec, *(None,) * (ndim - len(spec)))
            return NamedSharding(out_sharding.mesh, padded, memory_kind=out_sharding.memory_kind)
    elif isinstance(out_sharding, PartitionSpec) and len(out_sharding) < ndim:
        return PartitionSpec(*out_sharding, *(None,) * (ndim - len(out_sharding)))
    return out_sharding
