"""Tests for the moments building blocks and the recipes built on them."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers_norm import (
    EAGER_SHAPE,
    F32_EPS,
    draws,
    f64,
    normal,
    np_batch_norm,
    np_batch_norm_grads,
    np_stats,
    sum_tol,
)

import jaxinit as ji


def np_moments(x, axis=0, mask=None):
    """Float64 count, mean and M2 (the sum of squared deviations) over ``axis``."""
    n, mean, var = np_stats(x, (axis,), mask)
    return n, mean, var * n


def chain_moments(parts):
    """Moments of the parts merged left to right."""
    m = ji.batch_moments(parts[0])
    for p in parts[1:]:
        m = ji.merge_moments(m, ji.batch_moments(p))
    return m


chain_moments_jit = jax.jit(chain_moments)


def merged_m2_tol(n, loc, std):
    """Relative error bound of a merged M2: each part's float32 mean errs by up to |loc| eps/2,
    and the merge term delta**2 * n_a * n_b / n inherits that error through delta, the
    difference of two means: relative to M2 = n std**2 it is below |loc|/std * eps."""
    return sum_tol(n) + abs(loc) / std * F32_EPS


class EagerAndJitTest(chex.TestCase):
    """Far from zero mean, the shifted sums must survive XLA's simplifications under jit."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_batch_moments_float64(self):
        x = normal(0, EAGER_SHAPE, loc=1e4, scale=1.0)
        m = self.variant(ji.batch_moments)(x)
        n, mean, m2 = np_moments(x)
        chex.assert_type([m.count, m.mean, m.m2], [jnp.float32] * 3)
        np.testing.assert_array_equal(m.count, n)
        # The mean ~1e4 is one float32 rounding away; M2 sums deviations from a data sample.
        np.testing.assert_allclose(m.mean, mean, rtol=F32_EPS)
        np.testing.assert_allclose(m.m2, m2, rtol=sum_tol(EAGER_SHAPE[0]))
        np.testing.assert_allclose(m.var, m2 / n, rtol=sum_tol(EAGER_SHAPE[0]))
        np.testing.assert_allclose(m.unbiased_var, m2 / (n - 1), rtol=sum_tol(EAGER_SHAPE[0]))


def test_masked_and_empty():
    x = normal(0, (10, 3), loc=3.0, scale=2.0)
    mask = np.zeros((10, 3), bool)
    mask[:4, 0] = mask[:, 1] = True

    @jax.jit
    def run(x, mask):
        m = ji.batch_moments(x, mask=mask)
        empty = ji.Moments.zeros(3)
        return m, ji.merge_moments(m, empty), ji.merge_moments(empty, m)

    m, merged_right, merged_left = jax.device_get(run(x, mask))
    np.testing.assert_array_equal(m.count, [4, 10, 0])
    _, mean, m2 = np_moments(x[:, :2], mask=mask[:, :2])
    np.testing.assert_allclose(m.mean[:2], mean[:2], rtol=sum_tol(10))
    np.testing.assert_allclose(m.m2[:2], m2[:2], rtol=sum_tol(10))
    assert (float(m.mean[2]), float(m.m2[2])) == (0.0, 0.0)
    # Empty moments are the identity of the merge, on either side.
    chex.assert_trees_all_equal(merged_right, m)
    chex.assert_trees_all_equal(merged_left, m)


@pytest.mark.parametrize("loc", [pytest.param(0.0, id="near_zero"), pytest.param(1e4, id="far")])
def test_merge_equals_concatenation(loc):
    x = draws(1, (300, 4), loc=loc, scale=1.0)
    m = chain_moments_jit(jax.device_put([x[:7], x[7:150], x[150:]]))
    n, mean, m2 = np_moments(x)
    np.testing.assert_array_equal(m.count, n)
    # The mean: three roundings (the first part's, one per merge) and the parts' own sums.
    np.testing.assert_allclose(m.mean, mean, rtol=1.5 * F32_EPS, atol=sum_tol(300))
    np.testing.assert_allclose(m.m2, m2, rtol=merged_m2_tol(300, loc, 1.0))


@pytest.mark.parametrize(
    "shift", [pytest.param(None, id="gather"), pytest.param(1e4, id="psum_with_shift")]
)
def test_all_reduce_moments_unequal_counts(shift):
    x = normal(2, (4, 16, 3), loc=1e4, scale=1.0)
    valid = np.array([2, 16, 5, 9])
    mask = (np.arange(16)[None, :] < valid[:, None])[..., None]

    def device(xi, mi):
        m = ji.batch_moments(xi, mask=mi)
        sh = None if shift is None else jnp.full((3,), shift, jnp.float32)
        return ji.all_reduce_moments(m, "d", shift=sh)

    m = jax.device_get(jax.jit(jax.vmap(device, axis_name="d"))(x, mask))
    kept = np.concatenate([f64(x)[i, :v] for i, v in enumerate(valid)])
    n, mean, m2 = np_moments(kept)
    for i in range(4):  # the same on every device
        np.testing.assert_array_equal(m.count[i], n)
        np.testing.assert_allclose(m.mean[i], mean, rtol=F32_EPS)
        np.testing.assert_allclose(m.m2[i], m2, rtol=merged_m2_tol(int(n[0]), 1e4, 1.0))


def test_gradient_accumulation_one_update_per_step():
    # Recipe: normalize each micro-batch with its own statistics, accumulate their moments,
    # and make one running update per optimizer step from the merged moments.
    x = normal(3, (4, 16, 6), loc=3.0, scale=2.0)
    state = ji.batch_norm_state(6)

    @jax.jit
    def run(x, scale):
        def micro(carry, xb):
            grads, moments = carry
            loss = lambda s: jnp.sum(jnp.sin(ji.batch_norm(xb, state, s, training=True)[0]))
            merged = ji.merge_moments(moments, ji.batch_moments(xb))
            return (grads + jax.grad(loss)(scale), merged), None

        (grads, moments), _ = jax.lax.scan(micro, (jnp.zeros(6), ji.Moments.zeros(6)), x)
        new = ji.update_running_stats(state, moments, momentum=0.9)
        _, direct = ji.batch_norm(x.reshape(64, 6), state, training=True, momentum=0.9)
        return grads, new, direct

    grads, new, direct = run(x, jnp.ones(6))
    chex.assert_trees_all_close(new, direct, rtol=sum_tol(64))
    assert int(new.count) == 1
    # The accumulated scale gradient is the sum of the micro-batches' own (float64) gradients.
    ones, zeros = np.ones(6), np.zeros(6)
    grads_ref = sum(np_batch_norm_grads(xb, ones, zeros, np.ones((16, 6)), (0,))[1] for xb in x)
    np.testing.assert_allclose(grads, grads_ref, rtol=3 * sum_tol(16), atol=3 * sum_tol(16))


def test_ghost_batch_norm():
    # Recipe: normalize each virtual sub-batch with its own statistics (vmap), and update
    # the running state once from the whole batch's moments.
    x = normal(4, (64, 5), loc=3.0, scale=2.0)
    state = ji.batch_norm_state(5)

    @jax.jit
    def run(x):
        ghosts = x.reshape(4, 16, 5)
        y = jax.vmap(lambda g: ji.batch_norm(g, state, training=True)[0])(ghosts)
        new = ji.update_running_stats(state, ji.batch_moments(x))
        return y, new, ji.batch_norm(x, state, training=True)[1]

    y, new, direct = run(x)
    y_ref = np.stack([np_batch_norm(g, (0,)) for g in f64(x).reshape(4, 16, 5)])
    np.testing.assert_allclose(y, y_ref, rtol=sum_tol(16), atol=sum_tol(16))
    chex.assert_trees_all_close(new, direct, rtol=sum_tol(64))


def test_precise_batch_norm():
    # Recipe: after training, re-estimate exact population statistics over N batches.
    batches = normal(5, (6, 50, 3), loc=-2.0, scale=3.0)

    @jax.jit
    def run(batches):
        def body(m, xb):
            return ji.merge_moments(m, ji.batch_moments(xb)), None

        m, _ = jax.lax.scan(body, ji.Moments.zeros(3), batches)
        return ji.BatchNormState(m.mean, m.var, jnp.asarray(len(batches), jnp.int32))

    state = run(batches)
    _, mean, var = np_stats(f64(batches).reshape(300, 3), (0,))
    np.testing.assert_allclose(state.mean, mean, rtol=sum_tol(300))
    np.testing.assert_allclose(state.var, var, rtol=sum_tol(300))


def test_bad_input():
    with pytest.raises(TypeError, match="x must have a real floating dtype"):
        ji.batch_moments(np.ones((3, 2), np.int32))
    with pytest.raises(ValueError, match=r"axis=3 is out of range"):
        ji.batch_moments(np.ones((3, 2), np.float32), axis=3)
    with pytest.raises(ValueError, match=r"mask of shape \(2, 2\)"):
        ji.batch_moments(np.ones((3, 2), np.float32), mask=np.ones((2, 2), bool))
