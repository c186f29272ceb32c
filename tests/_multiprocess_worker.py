"""One process of tests/test_multiprocess.py: ``python _multiprocess_worker.py PORT PID OUT_DIR``.

Joins a 2-process JAX cluster on 127.0.0.1 (4 host CPU devices each, gloo collectives), runs
sharded initialization and cross-process batch norm over the 8 global devices, and saves every
addressable shard with np.save as ``{name}__{start0}_{start1}.npy`` for the parent to assemble.
"""

import os
import sys

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxinit as ji

SHAPE = (64, 48)


def batch_norm_inputs():
    """The global batch (64, 6) and mask (unequal valid counts per device), as numpy."""
    rng = np.random.default_rng(0)
    x = (3.0 + 2.0 * rng.standard_normal((64, 6)) + np.repeat(np.arange(8.0), 8)[:, None]).astype(
        np.float32
    )
    valid = np.array([2, 6, 8, 1, 0, 3, 8, 5])
    mask = (np.arange(8)[None, :] < valid[:, None]).reshape(64, 1)
    return x, mask


def batch_norm_step(x, mask, axis_name):
    """Train-mode batch norm: output and new running mean and var."""
    y, new = ji.batch_norm(
        x, ji.batch_norm_state(6), training=True, axis_name=axis_name, mask=mask, momentum=0.5
    )
    return y, new.mean, new.var


def _save(out_dir, name, arr):
    for shard in arr.addressable_shards:
        starts = "_".join(str(s.start or 0) for s in shard.index)
        np.save(os.path.join(out_dir, f"{name}__{starts}.npy"), np.asarray(shard.data))


def main():
    port, pid, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=2,
        process_id=pid,
        initialization_timeout=30,
        shutdown_timeout_seconds=10,
        heartbeat_timeout_seconds=10,
    )
    assert jax.device_count() == 8 and jax.local_device_count() == 4, jax.devices()
    mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    row = NamedSharding(mesh, P("d"))
    key = jax.random.key(7)

    _save(out_dir, "he_normal", ji.he_normal()(key, SHAPE, out_sharding=row))
    _save(out_dir, "orthogonal", ji.orthogonal()(key, SHAPE, out_sharding=row))
    jitted = jax.jit(lambda k: ji.orthogonal()(k, SHAPE, out_sharding=row))(key)
    _save(out_dir, "orthogonal_jit", jitted)

    x_np, mask_np = batch_norm_inputs()
    x = jax.make_array_from_callback(x_np.shape, row, lambda i: x_np[i])
    mask = jax.make_array_from_callback(mask_np.shape, row, lambda i: mask_np[i])
    f = jax.shard_map(
        lambda x, m: batch_norm_step(x, m, "d"),
        mesh=mesh,
        in_specs=(P("d"), P("d")),
        out_specs=(P("d"), P(), P()),
    )
    y, mean, var = jax.jit(f)(x, mask)
    _save(out_dir, "bn_y", y)
    if pid == 0:
        _save(out_dir, "bn_mean", mean)
        _save(out_dir, "bn_var", var)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
