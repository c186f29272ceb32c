"""Tests for the moments building blocks and the recipes built on them."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

import jaxinit as ji


def _data(shape, seed=0, loc=3.0, scale=2.0):
    return loc + scale * jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _np_moments(x, axis=0):
    x = np.asarray(x, np.float64)
    mean = x.mean(axis)
    return x.shape[axis], mean, ((x - mean) ** 2).sum(axis)


class MomentsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_batch_moments_float64(self):
        x = _data((100, 5), loc=1e4, scale=1.0)
        m = self.variant(ji.batch_moments)(x)
        n, mean, m2 = _np_moments(x)
        np.testing.assert_array_equal(m.count, n)
        np.testing.assert_allclose(m.mean, mean, rtol=1e-7)
        np.testing.assert_allclose(m.m2, m2, rtol=1e-4)
        np.testing.assert_allclose(m.var, m2 / n, rtol=1e-4)
        np.testing.assert_allclose(m.unbiased_var, m2 / (n - 1), rtol=1e-4)

    def test_masked_and_empty(self):
        x = _data((10, 3))
        mask = jnp.zeros((10, 3), bool).at[:4, 0].set(True).at[:, 1].set(True)
        m = ji.batch_moments(x, mask=mask)
        np.testing.assert_array_equal(m.count, [4, 10, 0])
        _, mean0, m20 = _np_moments(x[:4, 0])
        np.testing.assert_allclose([m.mean[0], m.m2[0]], [mean0, m20], rtol=1e-5)
        self.assertEqual((float(m.mean[2]), float(m.m2[2])), (0.0, 0.0))
        # Empty moments are the identity of the merge.
        merged = ji.merge_moments(m, ji.Moments.zeros(3))
        chex.assert_trees_all_close(merged, m)
        merged = ji.merge_moments(ji.Moments.zeros(3), m)
        chex.assert_trees_all_close(merged, m)

    @parameterized.named_parameters(("near_zero", 0.0), ("far", 1e4))
    def test_merge_equals_concatenation(self, loc):
        x = _data((300, 4), seed=1, loc=loc, scale=1.0)
        parts = [x[:7], x[7:150], x[150:]]
        m = ji.batch_moments(parts[0])
        for p in parts[1:]:
            m = ji.merge_moments(m, ji.batch_moments(p))
        n, mean, m2 = _np_moments(x)
        np.testing.assert_array_equal(m.count, n)
        np.testing.assert_allclose(m.mean, mean, rtol=1e-7, atol=1e-6)
        np.testing.assert_allclose(m.m2, m2, rtol=1e-4)

    @parameterized.named_parameters(("gather", None), ("psum_with_shift", 1e4))
    def test_all_reduce_moments_unequal_counts(self, shift):
        x = _data((4, 16, 3), seed=2, loc=1e4, scale=1.0)
        valid = jnp.array([2, 16, 5, 9])
        mask = (jnp.arange(16)[None, :] < valid[:, None])[..., None]

        def f(xi, mi):
            m = ji.batch_moments(xi, mask=mi)
            sh = None if shift is None else jnp.full((3,), shift, jnp.float32)
            return ji.all_reduce_moments(m, "d", shift=sh)

        m = jax.vmap(f, axis_name="d")(x, mask)
        kept = np.concatenate([np.asarray(x[i, : int(valid[i])]) for i in range(4)])
        n, mean, m2 = _np_moments(kept)
        for i in range(4):  # the same on every device
            np.testing.assert_array_equal(m.count[i], n)
            np.testing.assert_allclose(m.mean[i], mean, rtol=1e-7)
            np.testing.assert_allclose(m.m2[i], m2, rtol=1e-4)

    def test_gradient_accumulation_one_update_per_step(self):
        # Recipe: normalize each micro-batch with its own statistics, accumulate their moments,
        # and make one running update per optimizer step from the merged moments.
        x = _data((4, 32, 6), seed=3)
        state = ji.batch_norm_state(6)
        scale = jnp.ones(6)

        def micro(carry, xb):
            grads, moments = carry
            g = jax.grad(lambda s: jnp.sum(jnp.sin(ji.batch_norm(xb, state, s, training=True)[0])))(
                scale
            )
            return (grads + g, ji.merge_moments(moments, ji.batch_moments(xb))), None

        (grads, moments), _ = jax.lax.scan(micro, (jnp.zeros(6), ji.Moments.zeros(6)), x)
        new = ji.update_running_stats(state, moments, momentum=0.9)
        _, direct = ji.batch_norm(x.reshape(128, 6), state, training=True, momentum=0.9)
        chex.assert_trees_all_close(new, direct, rtol=1e-5)
        self.assertEqual(int(new.count), 1)
        self.assertTrue(np.all(np.isfinite(grads)))

    def test_ghost_batch_norm(self):
        # Recipe: normalize each virtual sub-batch with its own statistics (vmap), and update
        # the running state once from the whole batch's moments.
        x = _data((64, 5), seed=4)
        ghosts = x.reshape(4, 16, 5)
        state = ji.batch_norm_state(5)
        y = jax.vmap(lambda g: ji.batch_norm(g, state, training=True)[0])(ghosts)
        new = ji.update_running_stats(state, ji.batch_moments(x))
        g64 = np.asarray(ghosts, np.float64)
        y_ref = (g64 - g64.mean(1, keepdims=True)) / np.sqrt(g64.var(1, keepdims=True) + 1e-5)
        np.testing.assert_allclose(y, y_ref, rtol=2e-5, atol=2e-5)
        _, direct = ji.batch_norm(x, state, training=True)
        chex.assert_trees_all_close(new, direct, rtol=1e-6)

    def test_precise_batch_norm(self):
        # Recipe: after training, re-estimate exact population statistics over N batches.
        batches = _data((6, 50, 3), seed=5, loc=-2.0, scale=3.0)

        def body(m, xb):
            return ji.merge_moments(m, ji.batch_moments(xb)), None

        m, _ = jax.lax.scan(body, ji.Moments.zeros(3), batches)
        state = ji.BatchNormState(m.mean, m.var, jnp.array(len(batches), jnp.int32))
        n, mean, m2 = _np_moments(batches.reshape(300, 3))
        np.testing.assert_allclose(state.mean, mean, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(state.var, m2 / n, rtol=1e-5)

    def test_bad_input(self):
        with self.assertRaisesRegex(TypeError, "x must have a real floating dtype"):
            ji.batch_moments(jnp.ones((3, 2), jnp.int32))
        with self.assertRaisesRegex(ValueError, r"axis=3 is out of range"):
            ji.batch_moments(jnp.ones((3, 2)), axis=3)
        with self.assertRaisesRegex(ValueError, r"mask of shape \(2, 2\)"):
            ji.batch_moments(jnp.ones((3, 2)), mask=jnp.ones((2, 2), bool))
