"""Cross-device batch norm on a mesh of 8 host devices (see conftest.py)."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxinit as ji

N_DEV = 8


def _mesh():
    return jax.make_mesh((N_DEV,), ("d",))


def _data(shape, seed=0, loc=3.0, scale=2.0):
    return loc + scale * jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _loss(x, scale, bias, state, mask, axis_name):
    y, new = ji.batch_norm(
        x, state, scale, bias, training=True, axis_name=axis_name, mask=mask, momentum=0.9
    )
    w = jnp.cos(jnp.arange(y.shape[-1], dtype=jnp.float32))
    local = jnp.sum(jnp.where(mask, jnp.sin(y) * w, 0.0)) if mask is not None else None
    if local is None:
        local = jnp.sum(jnp.sin(y) * w)
    total = jax.lax.psum(local, axis_name) if axis_name else local
    return total, (y, new)


def _sharded_value_and_grad(x, scale, bias, state, mask):
    mesh = _mesh()
    vg = jax.value_and_grad(_loss, argnums=(0, 1, 2), has_aux=True)

    def body(x, scale, bias, state, mask):
        return vg(x, scale, bias, state, mask, "d")

    mask_spec = None if mask is None else P("d")
    f = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(P("d"), P(), P(), P(), mask_spec),
        out_specs=((P(), (P("d"), P())), (P("d"), P(), P())),
    )
    put = functools.partial(jax.device_put)
    args = (
        put(x, NamedSharding(mesh, P("d"))),
        *put((scale, bias, state), NamedSharding(mesh, P())),
        None if mask is None else put(mask, NamedSharding(mesh, P("d"))),
    )
    return jax.jit(f)(*args)


class ShardedBatchNormTest(chex.TestCase):
    def _compare(self, x, mask, loc):
        scale = 1.0 + 0.2 * jnp.sin(jnp.arange(6, dtype=jnp.float32))
        bias = 0.1 * jnp.arange(6, dtype=jnp.float32)
        state = ji.batch_norm_state(6)
        (l1, (y1, s1)), g1 = _sharded_value_and_grad(x, scale, bias, state, mask)
        vg = jax.value_and_grad(_loss, argnums=(0, 1, 2), has_aux=True)
        (l0, (y0, s0)), g0 = jax.jit(vg, static_argnums=5)(x, scale, bias, state, mask, None)
        tol = dict(rtol=1e-5, atol=1e-5 if loc == 0 else 3e-3)
        np.testing.assert_allclose(l1, l0, rtol=1e-5)
        np.testing.assert_allclose(y1, y0, **tol)
        chex.assert_trees_all_close(s1, s0, rtol=1e-6)
        for a, b in zip(g1, g0, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))))

    def test_axis_name_equals_global_batch(self):
        self._compare(_data((64, 6), seed=1), None, 0)

    def test_axis_name_far_from_zero_mean(self):
        self._compare(_data((64, 6), seed=2, loc=1e4, scale=1.0), None, 1e4)

    def test_unequal_valid_counts_are_count_weighted(self):
        # 8 rows per device; device 0 keeps 2 rows, device 1 keeps 6, device 4 none.
        valid = np.array([2, 6, 8, 1, 0, 3, 8, 5])
        mask = jnp.asarray((np.arange(8)[None, :] < valid[:, None]).reshape(64, 1))
        x = _data((64, 6), seed=3) + jnp.repeat(jnp.arange(8.0), 8)[:, None]
        self._compare(x, mask, 0)
        # Exact against float64 on the kept rows.
        (_, (_, s)), _ = _sharded_value_and_grad(
            x, jnp.ones(6), jnp.zeros(6), ji.batch_norm_state(6), mask
        )
        kept = np.asarray(x, np.float64)[np.asarray(mask[:, 0])]
        np.testing.assert_allclose(s.mean, 0.1 * kept.mean(0), rtol=1e-5)
        np.testing.assert_allclose(s.var, 0.9 + 0.1 * kept.var(0), rtol=1e-5)

        # Contrast: flax averages per-device means with equal weight and gets it wrong.
        bn = nn.BatchNorm(
            use_running_average=False,
            axis_name="d",
            momentum=0.0,
            use_scale=False,
            use_bias=False,
            use_fast_variance=False,
        )
        stats = {"mean": jnp.zeros(6), "var": jnp.ones(6)}

        def flax_body(x, m):
            _, upd = bn.apply({"batch_stats": stats}, x, mask=m, mutable=["batch_stats"])
            return upd["batch_stats"]["mean"]

        # (flax returns NaN outright when a device has no valid rows; give each at least one.)
        valid = np.array([2, 6, 8, 1, 4, 3, 8, 5])
        mask = jnp.asarray((np.arange(8)[None, :] < valid[:, None]).reshape(64, 1))
        kept = np.asarray(x, np.float64)[np.asarray(mask[:, 0])]
        mesh = _mesh()
        f = jax.shard_map(
            flax_body, mesh=mesh, in_specs=(P("d"), P("d")), out_specs=P(), check_vma=False
        )
        sh = NamedSharding(mesh, P("d"))
        flax_mean = jax.jit(f)(jax.device_put(x, sh), jax.device_put(mask, sh))
        self.assertGreater(float(jnp.max(jnp.abs(flax_mean - kept.mean(0)))), 0.1)

    def test_jit_with_sharded_batch_equals_unsharded(self):
        x = _data((64, 6), seed=4, loc=100.0)
        state = ji.batch_norm_state(6)
        scale = jnp.linspace(0.5, 1.5, 6)

        def step(x, scale, state):
            def loss(x, scale):
                y, new = ji.batch_norm(x, state, scale, training=True)
                return jnp.sum(jnp.sin(y)), (y, new)

            return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, scale)

        mesh = _mesh()
        xs = jax.device_put(x, NamedSharding(mesh, P("d")))
        out_sharded = jax.jit(step)(xs, scale, state)
        out_single = jax.jit(step)(x, scale, state)
        self.assertEqual(len(out_sharded[1][0].sharding.device_set), N_DEV)
        chex.assert_trees_all_close(out_sharded, out_single, rtol=1e-5, atol=1e-5)

    def test_explicit_mesh_batch_and_feature_sharded(self):
        """Under jax.set_mesh with Explicit axes, batch- and feature-sharded x need no axis_name."""
        x = _data((64, 16), seed=6, loc=50.0)
        state = ji.batch_norm_state(16)
        scale = jnp.linspace(0.5, 1.5, 16)

        def step(x, scale):
            def loss(x, scale):
                y, new = ji.batch_norm(x, state, scale, training=True)
                return jnp.sum(jnp.sin(y)), (y, new)

            return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, scale)

        expected = jax.jit(step)(x, scale)
        mesh = jax.make_mesh((2, 4), ("b", "f"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
        for spec in [P("b", None), P(("b", "f"), None), P("b", "f")]:
            with jax.set_mesh(mesh):
                xs = jax.device_put(x, NamedSharding(mesh, spec))
                out = jax.jit(step)(xs, scale)
            chex.assert_trees_all_close(out, expected, rtol=1e-5, atol=1e-5)

    def test_axis_index_groups(self):
        x = _data((64, 6), seed=5)
        groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
        mesh = _mesh()

        def body(x):
            _, new = ji.batch_norm(
                x,
                ji.batch_norm_state(6),
                training=True,
                axis_name="d",
                axis_index_groups=groups,
                momentum=0.0,
            )
            return new.mean[None]

        f = jax.shard_map(body, mesh=mesh, in_specs=P("d"), out_specs=P("d"), check_vma=False)
        means = np.asarray(jax.jit(f)(jax.device_put(x, NamedSharding(mesh, P("d")))))
        xn = np.asarray(x, np.float64)
        np.testing.assert_allclose(means[0], xn[:32].mean(0), rtol=1e-5)
        np.testing.assert_allclose(means[7], xn[32:].mean(0), rtol=1e-5)
