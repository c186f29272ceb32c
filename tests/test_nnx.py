"""jaxinit.nnx.BatchNorm against flax.nnx.BatchNorm: variables, train and eval, switching."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized
from flax import nnx

import jaxinit.nnx as jnnx


def data(shape, dtype=jnp.float32, seed=0, loc=3.0, scale=2.0):
    x = loc + scale * jax.random.normal(jax.random.key(seed), shape, jnp.float32)
    return x.astype(dtype)


def call(module, *args, **kwargs):
    # flax's own layer mixes bf16 inputs with f32 statistics implicitly.
    with jax.numpy_dtype_promotion("standard"):
        return module(*args, **kwargs)


def pair(num_features, **kwargs):
    kwargs = {"use_fast_variance": False, **kwargs}
    kwargs.update(scale_init=nnx.initializers.normal(1.0), bias_init=nnx.initializers.normal(1.0))
    return (
        jnnx.BatchNorm(num_features, **kwargs, rngs=nnx.Rngs(0)),
        nnx.BatchNorm(num_features, **kwargs, rngs=nnx.Rngs(0)),
    )


# (name, input shape, input dtype, kwargs, masked)
CASES = (
    ("dense", (32, 6), jnp.float32, {}, False),
    ("nhwc", (4, 5, 5, 3), jnp.float32, {"momentum": 0.7, "epsilon": 1e-3}, False),
    ("nchw_axis1", (4, 3, 5, 5), jnp.float32, {"axis": 1}, False),
    ("no_scale_no_bias", (16, 6), jnp.float32, {"use_scale": False, "use_bias": False}, False),
    ("masked", (16, 6), jnp.float32, {}, True),
    ("bf16_in_f32_out", (16, 6), jnp.bfloat16, {}, False),
    ("f32_in_bf16_out", (16, 6), jnp.float32, {"dtype": jnp.bfloat16}, False),
)


class NnxParityTest(chex.TestCase):
    @parameterized.named_parameters(*CASES)
    def test_train_and_eval_match_flax(self, shape, dtype, kwargs, masked):
        axis = kwargs.get("axis", -1)
        ours, ref = pair(shape[axis], **kwargs)
        chex.assert_trees_all_equal(nnx.state(ours), nnx.state(ref))
        self.assertEqual(jax.tree.structure(nnx.state(ours)), jax.tree.structure(nnx.state(ref)))
        x = data(shape, dtype)
        mask = (jnp.arange(shape[0])[:, None] % 3 != 0) if masked else None
        out_dtype = jnp.dtype(kwargs.get("dtype") or jnp.float32)
        tol = 1e-2 if out_dtype == jnp.bfloat16 else 1e-5

        @nnx.jit
        def step(model, x, mask):
            return call(model, x, mask=mask)

        for i in range(2):
            y, y_ref = step(ours, x + i, mask), step(ref, x + i, mask)
            self.assertEqual(y.dtype, out_dtype)
            self.assertEqual(y_ref.dtype, out_dtype)
            np.testing.assert_allclose(
                np.asarray(y, np.float32), np.asarray(y_ref, np.float32), rtol=tol, atol=tol
            )
            chex.assert_trees_all_close(
                nnx.state(ours, nnx.BatchStat), nnx.state(ref, nnx.BatchStat), rtol=1e-5, atol=1e-6
            )
        ours.eval()
        ref.eval()
        stats = nnx.clone(nnx.state(ours, nnx.BatchStat))
        y, y_ref = step(ours, x, None), step(ref, x, None)
        np.testing.assert_allclose(
            np.asarray(y, np.float32), np.asarray(y_ref, np.float32), rtol=tol, atol=tol
        )
        chex.assert_trees_all_equal(nnx.state(ours, nnx.BatchStat), stats)

    def test_eager_matches_jit(self):
        a, _ = pair(4)
        b, _ = pair(4)
        x = data((16, 4))
        y_eager = a(x)
        y_jit = nnx.jit(lambda m, x: m(x))(b, x)
        np.testing.assert_allclose(y_eager, y_jit, rtol=1e-6, atol=1e-6)
        chex.assert_trees_all_close(nnx.state(a), nnx.state(b), rtol=1e-6)

    def test_gradients_match_flax(self):
        ours, ref = pair(5)
        x = data((32, 5))

        def loss(model, x):
            return jnp.sum(jnp.sin(model(x)) * jnp.arange(5.0))

        g, gx = nnx.grad(loss, argnums=(0, 1))(ours, x)
        g_ref, gx_ref = nnx.grad(loss, argnums=(0, 1))(ref, x)
        chex.assert_trees_all_close(
            nnx.state(g, nnx.Param), nnx.state(g_ref, nnx.Param), rtol=1e-4, atol=1e-5
        )
        np.testing.assert_allclose(gx, gx_ref, rtol=1e-4, atol=1e-5)


class Block(nnx.Module):
    def __init__(self, bn_cls, rngs):
        self.linear = nnx.Linear(3, 4, rngs=rngs)
        self.bn = bn_cls(4, momentum=0.5, rngs=rngs)

    def __call__(self, x):
        return self.bn(self.linear(x))


class ModeSwitchingTest(chex.TestCase):
    def test_train_eval_and_view(self):
        model = Block(jnnx.BatchNorm, nnx.Rngs(0))
        x = data((64, 3))
        self.assertFalse(model.bn.use_running_average)
        y_train = model(x)
        np.testing.assert_allclose(y_train.mean(0), np.zeros(4), atol=1e-5)
        h = model.linear(x)
        np.testing.assert_allclose(model.bn.mean[...], 0.5 * h.mean(0), rtol=1e-5, atol=1e-6)
        model.eval()
        self.assertTrue(model.bn.use_running_average)
        stats = nnx.clone(nnx.state(model, nnx.BatchStat))
        y_eval = model(x)
        chex.assert_trees_all_equal(nnx.state(model, nnx.BatchStat), stats)
        # Eval normalises with the running statistics.
        ref = (h - model.bn.mean[...]) / jnp.sqrt(model.bn.var[...] + 1e-5)
        ref = ref * model.bn.scale[...] + model.bn.bias[...]
        np.testing.assert_allclose(y_eval, ref, rtol=1e-5, atol=1e-5)
        # A call-time flag wins over the attribute, as in flax.
        model.bn(h, use_running_average=False)
        self.assertFalse(bool(jnp.array_equal(model.bn.mean[...], stats["bn"]["mean"][...])))
        model.train()
        self.assertFalse(model.bn.use_running_average)
        view = nnx.view(model, use_running_average=True)
        self.assertTrue(view.bn.use_running_average)
        self.assertFalse(model.bn.use_running_average)

    def test_flax_state_loads_unchanged(self):
        flax_model = Block(nnx.BatchNorm, nnx.Rngs(0))
        x = data((16, 3))
        for i in range(3):
            flax_model(x * (i + 1))
        ours = Block(jnnx.BatchNorm, nnx.Rngs(1))
        nnx.update(ours, nnx.state(flax_model))
        chex.assert_trees_all_equal(nnx.state(ours), nnx.state(flax_model))
        flax_model.eval()
        ours.eval()
        np.testing.assert_allclose(ours(x), flax_model(x), rtol=1e-5, atol=1e-5)

    def test_missing_mode(self):
        bn = jnnx.BatchNorm(3, use_running_average=None, rngs=nnx.Rngs(0))
        with self.assertRaisesRegex(ValueError, "use_running_average"):
            bn(data((4, 3)))
        bn(data((4, 3)), use_running_average=True)

    def test_debias_count(self):
        bn = jnnx.BatchNorm(3, momentum=0.9, debias=True, rngs=nnx.Rngs(0))
        self.assertEqual(sorted(nnx.state(bn, nnx.BatchStat)), ["count", "mean", "var"])
        x = data((64, 3))
        bn(x)
        np.testing.assert_allclose(bn.mean[...], x.mean(0), rtol=1e-5)
        self.assertEqual(int(bn.count[...]), 1)

    def test_bad_input(self):
        with self.assertRaisesRegex(ValueError, "num_features"):
            jnnx.BatchNorm(-1, rngs=nnx.Rngs(0))
        bn = jnnx.BatchNorm(3, rngs=nnx.Rngs(0))
        with self.assertRaisesRegex(ValueError, "feature shape"):
            bn(data((4, 5)))
        with self.assertRaisesRegex(ValueError, "axis"):
            jnnx.BatchNorm(3, axis=2, rngs=nnx.Rngs(0))(data((4, 3)))
