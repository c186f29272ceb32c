"""jaxinit.linen.BatchNorm against flax.linen.BatchNorm: variables, outputs, statistics, errors."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized
from jax.sharding import PartitionSpec as P

import jaxinit.linen as jil


def flax_apply(module, variables, *args, **kwargs):
    # flax's own layer mixes bf16 inputs with f32 statistics implicitly.
    with jax.numpy_dtype_promotion("standard"):
        return module.apply(variables, *args, **kwargs)


def data(shape, dtype=jnp.float32, seed=0, loc=3.0, scale=2.0):
    x = loc + scale * jax.random.normal(jax.random.key(seed), shape, jnp.float32)
    return x.astype(dtype)


# (name, input shape, input dtype, module kwargs, use a mask)
CASES = (
    ("dense", (32, 6), jnp.float32, {}, False),
    ("nhwc_momentum", (4, 5, 5, 3), jnp.float32, {"momentum": 0.7, "epsilon": 1e-3}, False),
    ("nchw_axis1", (4, 3, 5, 5), jnp.float32, {"axis": 1}, False),
    ("two_feature_axes", (8, 3, 4), jnp.float32, {"axis": (1, 2)}, False),
    ("no_scale_no_bias", (16, 6), jnp.float32, {"use_scale": False, "use_bias": False}, False),
    ("masked", (16, 6), jnp.float32, {}, True),
    ("bf16_in_f32_out", (16, 6), jnp.bfloat16, {}, False),
    ("f32_in_bf16_out", (16, 6), jnp.float32, {"dtype": jnp.bfloat16}, False),
    ("bf16_params", (16, 6), jnp.float32, {"param_dtype": jnp.bfloat16}, False),
    ("fast_variance", (16, 6), jnp.float32, {"use_fast_variance": True}, False),
)


class LinenParityTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*CASES)
    def test_train_and_eval_match_flax(self, shape, dtype, kwargs, masked):
        kwargs = {"use_fast_variance": False, **kwargs}
        # Random scale and bias so that they matter; both modules draw them from the same rng.
        kwargs.update(scale_init=nn.initializers.normal(1.0), bias_init=nn.initializers.normal(1.0))
        ours, ref = jil.BatchNorm(**kwargs), nn.BatchNorm(**kwargs)
        x = data(shape, dtype)
        mask = None
        if masked:
            mask = jnp.arange(shape[0])[:, None] % 3 != 0
        v_ours = ours.init(jax.random.key(1), x, use_running_average=False)
        with jax.numpy_dtype_promotion("standard"):
            v_ref = ref.init(jax.random.key(1), x, use_running_average=False)
        chex.assert_trees_all_equal_shapes_and_dtypes(v_ours, v_ref)
        chex.assert_trees_all_equal(v_ours, v_ref)

        def train_fn(module):
            def f(variables, x, mask):
                return flax_apply(
                    module,
                    variables,
                    x,
                    use_running_average=False,
                    mask=mask,
                    mutable=["batch_stats"],
                )

            return self.variant(f)

        train, train_ref = train_fn(ours), train_fn(ref)
        out_dtype = jnp.dtype(kwargs.get("dtype") or jnp.float32)
        tol = 1e-2 if out_dtype == jnp.bfloat16 else 1e-5
        # Two steps, so the second starts from updated statistics.
        for step in range(2):
            y, upd = train(v_ours, x + step, mask)
            y_ref, upd_ref = train_ref(v_ref, x + step, mask)
            self.assertEqual(y.dtype, out_dtype)
            self.assertEqual(y_ref.dtype, out_dtype)
            np.testing.assert_allclose(
                np.asarray(y, np.float32), np.asarray(y_ref, np.float32), rtol=tol, atol=tol
            )
            chex.assert_trees_all_close(upd, upd_ref, rtol=1e-5, atol=1e-6)
            chex.assert_trees_all_equal_shapes_and_dtypes(upd, upd_ref)
            v_ours = {**v_ours, **upd}
            v_ref = {**v_ref, **upd_ref}

        y = self.variant(lambda v, x: ours.apply(v, x, use_running_average=True))(v_ours, x)
        y_ref = flax_apply(ref, v_ref, x, use_running_average=True)
        self.assertEqual(y.dtype, y_ref.dtype)
        np.testing.assert_allclose(
            np.asarray(y, np.float32), np.asarray(y_ref, np.float32), rtol=tol, atol=tol
        )

    def test_gradients_match_flax(self):
        x = data((32, 5))

        def loss(module, params, x):
            y, _ = module.apply(
                {"params": params, "batch_stats": v["batch_stats"]},
                x,
                use_running_average=False,
                mutable=["batch_stats"],
            )
            return jnp.sum(jnp.sin(y) * jnp.arange(5.0))

        ours = jil.BatchNorm()
        ref = nn.BatchNorm(use_fast_variance=False)
        v = ref.init(jax.random.key(0), x, use_running_average=False)
        g = jax.grad(functools.partial(loss, ours), argnums=(0, 1))(v["params"], x)
        g_ref = jax.grad(functools.partial(loss, ref), argnums=(0, 1))(v["params"], x)
        chex.assert_trees_all_close(g, g_ref, rtol=1e-4, atol=1e-5)


class Net(nn.Module):
    """A small model that uses whichever BatchNorm class it is given."""

    norm: type = nn.BatchNorm

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(8, (3, 3), kernel_init=nn.initializers.normal(0.3))(x)
        x = self.norm(use_running_average=not train, momentum=0.8)(x)
        x = nn.relu(x)
        x = nn.Dense(4, kernel_init=nn.initializers.normal(0.3))(x.mean((1, 2)))
        return self.norm(use_running_average=not train, momentum=0.8)(x)


class CheckpointTest(chex.TestCase):
    def test_flax_checkpoint_loads_unchanged(self):
        x = data((8, 6, 6, 2))
        flax_model, our_model = Net(nn.BatchNorm), Net(jil.BatchNorm)
        variables = flax_model.init(jax.random.key(0), x, train=False)
        chex.assert_trees_all_equal_shapes_and_dtypes(
            variables, our_model.init(jax.random.key(0), x, train=False)
        )
        # Train the flax model's statistics for a few steps, then hand its checkpoint over.
        for i in range(3):
            _, upd = flax_model.apply(variables, x * (i + 1), train=True, mutable=["batch_stats"])
            variables = {**variables, **upd}
        y_ref = flax_model.apply(variables, x, train=False)
        y = our_model.apply(variables, x, train=False)
        np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-5)
        # And training continues from it with the same updates (flax default: fast variance,
        # which on this data agrees with the stable one to float32 rounding).
        y, upd = our_model.apply(variables, x, train=True, mutable=["batch_stats"])
        y_ref, upd_ref = flax_model.apply(variables, x, train=True, mutable=["batch_stats"])
        np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
        chex.assert_trees_all_close(upd, upd_ref, rtol=1e-4, atol=1e-5)


class InitAndErrorsTest(chex.TestCase):
    def test_init_does_not_update_statistics(self):
        x = data((16, 3))
        for module in (jil.BatchNorm(), nn.BatchNorm()):
            v = module.init(jax.random.key(0), x, use_running_average=False)
            np.testing.assert_array_equal(v["batch_stats"]["mean"], np.zeros(3, np.float32))
            np.testing.assert_array_equal(v["batch_stats"]["var"], np.ones(3, np.float32))

    def test_init_ignores_axis_name(self):
        # Outside shard_map/pmap the named axis does not exist; init must still work, as in flax.
        v = jil.BatchNorm(axis_name="batch").init(
            jax.random.key(0), data((4, 3)), use_running_average=False
        )
        self.assertEqual(v["batch_stats"]["mean"].shape, (3,))

    def test_missing_mutable_names_the_fix(self):
        x = data((16, 3))
        bn = jil.BatchNorm()
        v = bn.init(jax.random.key(0), x, use_running_average=False)
        with self.assertRaisesRegex(ValueError, r"mutable=\['batch_stats'\]"):
            bn.apply(v, x, use_running_average=False)
        with self.assertRaisesRegex(ValueError, r"mutable=\['batch_stats'\]"):
            jax.jit(lambda v, x: bn.apply(v, x, use_running_average=False, mutable=["params"]))(
                v, x
            )
        # Evaluation needs nothing mutable.
        bn.apply(v, x, use_running_average=True)

    def test_use_running_average_required(self):
        # flax's own message for a mode given neither on the module nor on the call.
        with self.assertRaisesRegex(ValueError, "use_running_average"):
            jil.BatchNorm().init(jax.random.key(0), data((4, 3)))

    def test_bad_input(self):
        x = data((16, 3))
        with self.assertRaisesRegex(ValueError, "force_float32_reductions"):
            jil.BatchNorm(force_float32_reductions=False).init(
                jax.random.key(0), x, use_running_average=False
            )
        with self.assertRaisesRegex(ValueError, "axis"):
            jil.BatchNorm(axis=3).init(jax.random.key(0), x, use_running_average=False)
        with self.assertRaisesRegex(ValueError, "momentum"):
            bn = jil.BatchNorm(momentum=1.5)
            v = bn.init(jax.random.key(0), x, use_running_average=True)
            bn.apply(v, x, use_running_average=False, mutable=["batch_stats"])

    def test_nan_batch_keeps_running_statistics(self):
        bn = jil.BatchNorm(momentum=0.5)
        x = data((16, 3))
        v = bn.init(jax.random.key(0), x, use_running_average=False)
        bad = x.at[0, 1].set(jnp.nan)
        _, upd = bn.apply(v, bad, use_running_average=False, mutable=["batch_stats"])
        mean = np.asarray(upd["batch_stats"]["mean"])
        self.assertEqual(mean[1], 0.0)
        self.assertTrue(np.all(np.isfinite(mean)))
        np.testing.assert_allclose(mean[[0, 2]], 0.5 * np.asarray(x.mean(0))[[0, 2]], rtol=1e-5)

    def test_debias_adds_count(self):
        bn = jil.BatchNorm(momentum=0.9, debias=True)
        x = data((64, 3))
        v = bn.init(jax.random.key(0), x, use_running_average=False)
        self.assertEqual(sorted(v["batch_stats"]), ["count", "mean", "var"])
        _, upd = bn.apply(v, x, use_running_average=False, mutable=["batch_stats"])
        # The first debiased update takes the batch statistics whole.
        np.testing.assert_allclose(upd["batch_stats"]["mean"], x.mean(0), rtol=1e-5)
        np.testing.assert_allclose(upd["batch_stats"]["var"], x.var(0), rtol=1e-4)
        self.assertEqual(int(upd["batch_stats"]["count"]), 1)


class ShardedTest(chex.TestCase):
    def test_axis_name_matches_flax_and_the_global_batch(self):
        n = len(jax.devices())
        self.assertGreaterEqual(n, 2)
        mesh = jax.make_mesh((n,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
        x = data((4 * n, 5))
        single = jil.BatchNorm()
        v = single.init(jax.random.key(0), x, use_running_average=False)

        def step(module):
            def f(v, x):
                return module.apply(v, x, use_running_average=False, mutable=["batch_stats"])

            return jax.jit(
                jax.shard_map(f, mesh=mesh, in_specs=(P(), P("batch")), out_specs=(P("batch"), P()))
            )

        y, upd = step(jil.BatchNorm(axis_name="batch"))(v, x)
        y_ref, upd_ref = step(nn.BatchNorm(axis_name="batch", use_fast_variance=False))(v, x)
        y_one, upd_one = single.apply(v, x, use_running_average=False, mutable=["batch_stats"])
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(y, y_one, rtol=1e-5, atol=1e-5)
        chex.assert_trees_all_close(upd, upd_ref, rtol=1e-5)
        chex.assert_trees_all_close(upd, upd_one, rtol=1e-5)
