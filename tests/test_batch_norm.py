"""Tests for ji.batch_norm, ji.batch_norm_state and ji.update_running_stats."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

import jaxinit as ji

F32_TOL = dict(rtol=2e-5, atol=2e-5)


def _data(shape, seed=0, loc=3.0, scale=2.0, dtype=jnp.float32):
    k = jax.random.key(seed)
    return (loc + scale * jax.random.normal(k, shape, jnp.float32)).astype(dtype)


def _params(f, seed=1):
    k1, k2 = jax.random.split(jax.random.key(seed))
    shape = (f,) if isinstance(f, int) else f
    return (
        1.0 + 0.3 * jax.random.normal(k1, shape, jnp.float32),
        0.5 * jax.random.normal(k2, shape, jnp.float32),
    )


def _np_stats(x, red, mask=None):
    x = np.asarray(x, np.float64)
    if mask is None:
        mask = np.ones_like(x, bool)
    mask = np.broadcast_to(np.asarray(mask), x.shape)
    n = mask.sum(axis=red)
    mean = np.where(mask, x, 0).sum(axis=red) / n
    var = np.where(mask, (x - np.expand_dims(mean, red)) ** 2, 0).sum(axis=red) / n
    return n, mean, var


def _ref_loss64(x, scale, bias, w, red, eps=1e-5):
    """Float64 batch norm written directly, differentiated by autodiff (call under x64)."""
    mean = jnp.mean(x, axis=red, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=red, keepdims=True)
    fshape = [1 if i in red else s for i, s in enumerate(x.shape)]
    y = (x - mean) / jnp.sqrt(var + eps) * scale.reshape(fshape) + bias.reshape(fshape)
    return jnp.sum(jnp.sin(y) * w)


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


class BatchNormTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_train_matches_float64(self):
        x = _data((256, 16))
        scale, bias = _params(16)
        state = ji.batch_norm_state(16)
        f = self.variant(functools.partial(ji.batch_norm, training=True, momentum=0.9))
        y, new = f(x, state, scale, bias)
        _, mean, var = _np_stats(x, (0,))
        y_ref = (np.asarray(x, np.float64) - mean) / np.sqrt(var + 1e-5) * scale + bias
        chex.assert_type(y, jnp.float32)
        chex.assert_shape(new.mean, (16,))
        np.testing.assert_allclose(y, y_ref, **F32_TOL)
        np.testing.assert_allclose(new.mean, 0.1 * mean, rtol=1e-5)
        np.testing.assert_allclose(new.var, 0.9 + 0.1 * var, rtol=1e-5)
        self.assertEqual(int(new.count), 1)
        self.assertEqual(new.count.dtype, jnp.int32)

    @chex.variants(with_jit=True, without_jit=True)
    def test_eval_uses_running_stats(self):
        x = _data((64, 8))
        scale, bias = _params(8)
        state = ji.BatchNormState(
            jnp.linspace(-1.0, 1.0, 8), jnp.linspace(0.5, 2.0, 8), jnp.array(7, jnp.int32)
        )
        y, new = self.variant(functools.partial(ji.batch_norm, training=False))(
            x, state, scale, bias
        )
        y_ref = (np.asarray(x, np.float64) - np.asarray(state.mean)) / np.sqrt(
            np.asarray(state.var, np.float64) + 1e-5
        ) * scale + bias
        np.testing.assert_allclose(y, y_ref, **F32_TOL)
        chex.assert_trees_all_equal(new, state)

    @parameterized.named_parameters(
        ("last_axis", (128, 12), -1, False),
        ("nhwc", (8, 5, 5, 6), -1, False),
        ("nchw_axis1", (8, 6, 5, 5), 1, False),
        ("two_feature_axes", (16, 3, 4, 5), (1, 3), False),
        ("masked", (96, 12), -1, True),
    )
    def test_parity_with_flax_two_pass(self, shape, axis, masked):
        x = _data(shape, seed=2)
        feat = tuple(shape[a] for a in sorted(np.atleast_1d(axis) % len(shape)))
        scale, bias = _params(feat)
        mask = (jnp.arange(shape[0]) % 3 != 0)[:, None] if masked else None
        bn = nn.BatchNorm(use_running_average=False, axis=axis, use_fast_variance=False)
        stats = {"mean": jnp.zeros(feat), "var": jnp.ones(feat)}
        w = _data(shape, seed=3, loc=0.0, scale=1.0)

        def flax_loss(x, scale, bias):
            y, upd = bn.apply(
                {"params": {"scale": scale, "bias": bias}, "batch_stats": stats},
                x,
                mask=mask,
                mutable=["batch_stats"],
            )
            return jnp.sum(jnp.sin(y) * w), (y, upd["batch_stats"])

        def our_loss(x, scale, bias):
            y, s = ji.batch_norm(
                x, ji.batch_norm_state(feat), scale, bias, training=True, axis=axis, mask=mask
            )
            return jnp.sum(jnp.sin(y) * w), (y, {"mean": s.mean, "var": s.var})

        vg = functools.partial(jax.value_and_grad, argnums=(0, 1, 2), has_aux=True)
        (_, (y1, s1)), g1 = jax.jit(vg(our_loss))(x, scale, bias)
        (_, (y2, s2)), g2 = jax.jit(vg(flax_loss))(x, scale, bias)
        np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-5)
        chex.assert_trees_all_close(s1, s2, rtol=1e-5, atol=1e-6)
        for a, b in zip(g1, g2, strict=True):
            self.assertLess(_rel_err(a, b), 1e-5)

    def test_parity_with_flax_fast_variance(self):
        x = _data((64, 8), seed=4)
        bn = nn.BatchNorm(use_running_average=False, use_fast_variance=True, use_scale=False)
        bn = bn.copy(use_bias=False)
        y2, upd = bn.apply(
            {"batch_stats": {"mean": jnp.zeros(8), "var": jnp.ones(8)}},
            x,
            mutable=["batch_stats"],
        )
        y1, s1 = ji.batch_norm(x, ji.batch_norm_state(8), training=True, fast_variance=True)
        np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(s1.var, upd["batch_stats"]["var"], rtol=1e-5)

    @parameterized.named_parameters(
        ("2d", (96, 7), -1), ("nchw", (6, 4, 5, 3), 1), ("multi", (12, 3, 2, 4), (1, 3))
    )
    def test_gradients_match_float64(self, shape, axis):
        x = _data(shape, seed=5)
        ndim = len(shape)
        feat_axes = tuple(sorted(np.atleast_1d(axis) % ndim))
        red = tuple(i for i in range(ndim) if i not in feat_axes)
        feat = tuple(shape[a] for a in feat_axes)
        scale, bias = _params(feat)
        w = _data(shape, seed=6, loc=0.0, scale=1.0)
        state = ji.batch_norm_state(feat)

        def loss(x, scale, bias):
            y, _ = ji.batch_norm(x, state, scale, bias, training=True, axis=axis)
            return jnp.sum(jnp.sin(y) * w)

        g = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, scale, bias)
        with jax.enable_x64(True):
            args64 = [np.asarray(a, np.float64) for a in (x, scale, bias, w)]
            fn = functools.partial(_ref_loss64, red=red)
            g64 = jax.jit(jax.grad(fn, argnums=(0, 1, 2)))(*args64)
            g64 = [np.asarray(a) for a in g64]
        for a, b in zip(g, g64, strict=True):
            self.assertLess(_rel_err(a, b), 1e-4)

    def test_gradient_through_running_state(self):
        # The new state depends on the batch mean and variance; its gradient must be right too.
        x = _data((64, 5), seed=7)
        state = ji.batch_norm_state(5)

        def ours(x):
            _, s = ji.batch_norm(x, state, training=True, momentum=0.5)
            return jnp.sum(s.mean**2) + jnp.sum(jnp.sin(s.var))

        def ref(x):
            mean = jnp.mean(x, 0)
            var = jnp.mean(jnp.square(x - mean), 0)
            return jnp.sum((0.5 * mean) ** 2) + jnp.sum(jnp.sin(0.5 + 0.5 * var))

        self.assertLess(_rel_err(jax.jit(jax.grad(ours))(x), jax.jit(jax.grad(ref))(x)), 1e-5)

    def test_torch_conventions(self):
        # torch: running = (1 - p) * running + p * batch with the unbiased variance, and
        # normalization with the biased one; p = 0.1 is momentum = 0.9 here.
        x = _data((10, 3, 4, 4), seed=8)  # NCHW
        p = 0.1
        y, new = ji.batch_norm(
            x,
            ji.batch_norm_state(3),
            training=True,
            axis=1,
            momentum=1 - p,
            unbiased_running_var=True,
        )
        xn = np.asarray(x, np.float64)
        n = 10 * 4 * 4
        mean = xn.mean(axis=(0, 2, 3))
        var_b = xn.var(axis=(0, 2, 3))
        var_u = var_b * n / (n - 1)
        np.testing.assert_allclose(new.mean, (1 - p) * 0.0 + p * mean, rtol=1e-5)
        np.testing.assert_allclose(new.var, (1 - p) * 1.0 + p * var_u, rtol=1e-5)
        y_ref = (xn - mean[:, None, None]) / np.sqrt(var_b[:, None, None] + 1e-5)
        np.testing.assert_allclose(y, y_ref, rtol=2e-5, atol=2e-5)

    def test_far_from_zero_mean(self):
        # mean 1e4, std 1 in float32: the batch variance within 1e-3 of float64 on the same data.
        x = _data((4096, 8), seed=9, loc=1e4, scale=1.0)
        _, mean, var = _np_stats(x, (0,))
        _, s = ji.batch_norm(x, ji.batch_norm_state(8), training=True, momentum=0.0)
        np.testing.assert_allclose(s.var, var, rtol=1e-3)
        np.testing.assert_allclose(s.mean, mean, rtol=1e-7)
        # flax's default (fast) variance is far off on the same data.
        bn = nn.BatchNorm(use_running_average=False, momentum=0.0)
        v = bn.init(jax.random.key(0), x)
        _, upd = bn.apply(v, x, mutable=["batch_stats"])
        self.assertGreater(np.max(np.abs(upd["batch_stats"]["var"] / var - 1)), 1e-2)
        # Outputs: x carries ulp(1e4) ~ 1e-3 of rounding; y must not lose more than that.
        y, _ = ji.batch_norm(x, ji.batch_norm_state(8), training=True)
        y_ref = (np.asarray(x, np.float64) - mean) / np.sqrt(var + 1e-5)
        np.testing.assert_allclose(y, y_ref, atol=2e-3)

    def test_far_from_zero_mean_gradients(self):
        x = _data((512, 4), seed=10, loc=1e4, scale=1.0)
        w = _data((512, 4), seed=11, loc=0.0, scale=1.0)
        scale, bias = _params(4)
        state = ji.batch_norm_state(4)

        def loss(x, s, b):
            return jnp.sum(jnp.sin(ji.batch_norm(x, state, s, b, training=True)[0]) * w)

        g = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, scale, bias)
        with jax.enable_x64(True):
            args64 = [np.asarray(a, np.float64) for a in (x, scale, bias, w)]
            ref = jax.grad(functools.partial(_ref_loss64, red=(0,)), argnums=(0, 1, 2))
            g64 = jax.jit(ref)(*args64)
            g64 = [np.asarray(a) for a in g64]
        for a, b in zip(g, g64, strict=True):
            self.assertLess(_rel_err(a, b), 1e-4)

    @chex.variants(with_jit=True, without_jit=True)
    def test_bfloat16_input(self):
        x = _data((128, 8), seed=12, dtype=jnp.bfloat16)
        scale, bias = _params(8)
        y, s = self.variant(functools.partial(ji.batch_norm, training=True, momentum=0.0))(
            x, ji.batch_norm_state(8), scale, bias
        )
        chex.assert_type(y, jnp.bfloat16)
        chex.assert_type(s.mean, jnp.float32)
        _, mean, var = _np_stats(np.asarray(x, np.float32), (0,))
        np.testing.assert_allclose(s.mean, mean, rtol=1e-6)
        np.testing.assert_allclose(s.var, var, rtol=1e-5)
        y_ref = (np.asarray(x, np.float64) - mean) / np.sqrt(var + 1e-5) * scale + bias
        # bf16 output: half an ulp of 8 bits is 2**-9 relative.
        np.testing.assert_allclose(np.asarray(y, np.float64), y_ref, rtol=2**-8, atol=2**-8)
        gx = jax.jit(
            jax.grad(
                lambda x: jnp.sum(ji.batch_norm(x, ji.batch_norm_state(8), training=True)[0] ** 2)
            )
        )(x)
        chex.assert_type(gx, jnp.bfloat16)

    @chex.variants(with_jit=True, without_jit=True)
    def test_mask_uses_only_kept_elements(self):
        x = _data((40, 6), seed=13)
        # Padding rows hold garbage, including NaN, which must not reach the statistics.
        x = x.at[30:].set(jnp.nan).at[25:30].set(1e6)
        mask = (jnp.arange(40) < 25)[:, None]
        y, s = self.variant(functools.partial(ji.batch_norm, training=True, momentum=0.0))(
            x, ji.batch_norm_state(6), mask=mask
        )
        _, mean, var = _np_stats(x[:25], (0,))
        np.testing.assert_allclose(s.mean, mean, rtol=1e-5)
        np.testing.assert_allclose(s.var, var, rtol=1e-5)
        y_ref = (np.asarray(x[:25], np.float64) - mean) / np.sqrt(var + 1e-5)
        np.testing.assert_allclose(y[:25], y_ref, rtol=2e-5, atol=2e-5)

    def test_mask_per_element(self):
        x = _data((30, 4), seed=14)
        mask = jax.random.bernoulli(jax.random.key(15), 0.6, (30, 4))
        _, s = ji.batch_norm(x, ji.batch_norm_state(4), training=True, momentum=0.0, mask=mask)
        _, mean, var = _np_stats(x, (0,), mask)
        np.testing.assert_allclose(s.mean, mean, rtol=1e-5)
        np.testing.assert_allclose(s.var, var, rtol=1e-5)

    def test_masked_gradients_match_float64(self):
        x = _data((48, 5), seed=16)
        mask = (jnp.arange(48) % 4 != 1)[:, None]
        w = _data((48, 5), seed=17, loc=0.0, scale=1.0)
        scale, bias = _params(5)

        def loss(x, s, b):
            y, _ = ji.batch_norm(x, ji.batch_norm_state(5), s, b, training=True, mask=mask)
            return jnp.sum(jnp.sin(y) * w)

        def ref(x, s, b):
            m = np.asarray(mask)
            n = float(m.sum())
            mean = jnp.sum(jnp.where(m, x, 0), 0) / n
            var = jnp.sum(jnp.where(m, jnp.square(x - mean), 0), 0) / n
            return jnp.sum(jnp.sin((x - mean) / jnp.sqrt(var + 1e-5) * s + b) * w)

        g = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, scale, bias)
        with jax.enable_x64(True):
            args64 = [np.asarray(a, np.float64) for a in (x, scale, bias)]
            w = np.asarray(w, np.float64)
            g64 = [np.asarray(a) for a in jax.jit(jax.grad(ref, argnums=(0, 1, 2)))(*args64)]
        for a, b in zip(g, g64, strict=True):
            self.assertLess(_rel_err(a, b), 1e-4)

    def test_scan_matches_loop(self):
        xs = _data((5, 32, 4), seed=18)
        scale, bias = _params(4)

        def step(state, x):
            y, state = ji.batch_norm(x, state, scale, bias, training=True, momentum=0.8)
            return state, y

        s_scan, ys = jax.lax.scan(step, ji.batch_norm_state(4), xs)
        s_loop = ji.batch_norm_state(4)
        for i in range(5):
            s_loop, y = step(s_loop, xs[i])
            np.testing.assert_allclose(ys[i], y, rtol=1e-6, atol=1e-6)
        chex.assert_trees_all_close(s_scan, s_loop, rtol=1e-6)
        self.assertEqual(int(s_scan.count), 5)

        # Gradients through scan (and through remat) equal the unrolled ones.
        def total(scale, step_fn):
            def body(state, x):
                y, state = ji.batch_norm(x, state, scale, bias, training=True)
                return state, jnp.sum(jnp.sin(y))

            return jnp.sum(jax.lax.scan(step_fn(body), ji.batch_norm_state(4), xs)[1])

        g_scan = jax.jit(jax.grad(total), static_argnums=1)(scale, lambda f: f)
        g_remat = jax.jit(jax.grad(total), static_argnums=1)(scale, jax.checkpoint)
        g_unrolled = sum(
            jax.jit(
                jax.grad(
                    lambda s, x: jnp.sum(
                        jnp.sin(ji.batch_norm(x, ji.batch_norm_state(4), s, bias, training=True)[0])
                    )
                )
            )(scale, xs[i])
            for i in range(5)
        )
        np.testing.assert_allclose(g_scan, g_unrolled, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(g_remat, g_unrolled, rtol=1e-5, atol=1e-6)

    def test_vmap_matches_per_slice(self):
        xs = _data((3, 32, 4), seed=19)
        scale, bias = _params(4)

        def loss(x, s):
            y, st = ji.batch_norm(x, ji.batch_norm_state(4), s, bias, training=True)
            return jnp.sum(jnp.sin(y)), st

        vg = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
        (vals, states), grads = jax.jit(jax.vmap(vg, in_axes=(0, None)))(xs, scale)
        for i in range(3):
            (v, st), g = jax.jit(vg)(xs[i], scale)
            np.testing.assert_allclose(vals[i], v, rtol=1e-6)
            np.testing.assert_allclose(states.var[i], st.var, rtol=1e-6)
            np.testing.assert_allclose(grads[0][i], g[0], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(grads[1][i], g[1], rtol=1e-5, atol=1e-6)

    def test_no_retracing(self):
        @jax.jit
        @chex.assert_max_traces(n=1)
        def train(x, state, scale, bias):
            def loss(x, scale, bias):
                y, s = ji.batch_norm(x, state, scale, bias, training=True)
                return jnp.sum(y**2), s

            return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(x, scale, bias)

        state = ji.batch_norm_state(4)
        scale, bias = _params(4)
        for seed in range(3):
            _, state = train(_data((16, 4), seed=seed), state, scale, bias)
        self.assertEqual(int(state.count), 3)

    def test_nan_guard(self):
        x = _data((16, 3), seed=20).at[2, 1].set(jnp.nan)
        state = ji.BatchNormState(jnp.full(3, 0.5), jnp.full(3, 2.0), jnp.array(4, jnp.int32))
        y, new = ji.batch_norm(x, state, training=True, momentum=0.5)
        self.assertTrue(np.all(np.isnan(y[:, 1])))  # the output signals the bad channel
        self.assertEqual(float(new.mean[1]), 0.5)
        self.assertEqual(float(new.var[1]), 2.0)
        _, mean, var = _np_stats(x[:, ::2], (0,))
        np.testing.assert_allclose(new.mean[::2], 0.25 + 0.5 * mean, rtol=1e-5)
        np.testing.assert_allclose(new.var[::2], 1.0 + 0.5 * var, rtol=1e-5)
        self.assertEqual(int(new.count), 5)
        _, unguarded = ji.batch_norm(x, state, training=True, nan_guard=False)
        self.assertTrue(np.isnan(unguarded.mean[1]))
        # A feature with no kept elements (count 0) also keeps its running values.
        mask = jnp.zeros((16, 3), bool).at[:, 0].set(True)
        _, new = ji.batch_norm(x, state, training=True, mask=mask)
        np.testing.assert_array_equal(new.mean[1:], state.mean[1:])
        np.testing.assert_array_equal(new.var[1:], state.var[1:])

    def test_debias(self):
        state = ji.batch_norm_state(2)
        m = 0.9
        xs = [_data((64, 2), seed=30 + i) for i in range(3)]
        # Closed form: zero-initialised EMA h_t = m h + (1 - m) b_t, divided by 1 - m^t.
        h_mean, h_var = np.zeros(2), np.zeros(2)
        for t, x in enumerate(xs, start=1):
            _, state = ji.batch_norm(x, state, training=True, momentum=m, debias=True)
            _, mean, var = _np_stats(x, (0,))
            h_mean = m * h_mean + (1 - m) * mean
            h_var = m * h_var + (1 - m) * var
            np.testing.assert_allclose(state.mean, h_mean / (1 - m**t), rtol=1e-5)
            np.testing.assert_allclose(state.var, h_var / (1 - m**t), rtol=1e-5)
        self.assertEqual(int(state.count), 3)

    def test_batch_norm_state(self):
        s = ji.batch_norm_state((3, 4))
        chex.assert_shape([s.mean, s.var], (3, 4))
        chex.assert_type([s.mean, s.var, s.count], [jnp.float32, jnp.float32, jnp.int32])
        np.testing.assert_array_equal(s.var, 1.0)
        self.assertEqual(ji.batch_norm_state(2, jnp.bfloat16).mean.dtype, jnp.float32)
        with self.assertRaisesRegex(TypeError, "dtype"):
            ji.batch_norm_state(2, jnp.int32)
        with self.assertRaisesRegex(ValueError, "non-negative"):
            ji.batch_norm_state(-1)

    @parameterized.named_parameters(
        ("feature_size", dict(state=ji.batch_norm_state(5)), ValueError, r"feature shape \(4,\)"),
        ("momentum_1", dict(momentum=1.0), ValueError, r"momentum must be in \[0, 1\).*1.0"),
        ("momentum_neg", dict(momentum=-0.1), ValueError, r"momentum.*-0.1"),
        ("epsilon", dict(epsilon=-1e-5), ValueError, r"epsilon must be non-negative.*-1e-05"),
        ("axis", dict(axis=2), ValueError, r"axis=2 is out of range for an input of rank 2"),
        ("axis_dup", dict(axis=(1, -1)), ValueError, r"axis=\(1, -1\) names the same axis"),
        ("mask", dict(mask=jnp.ones((3, 4), bool)), ValueError, r"mask of shape \(3, 4\)"),
        ("mask_dtype", dict(mask=jnp.ones((8, 4))), TypeError, r"mask must be a boolean"),
        ("scale", dict(scale=jnp.ones(3)), ValueError, r"scale has shape \(3,\).*\(4,\)"),
        ("bias", dict(bias=jnp.ones((1, 4))), ValueError, r"bias has shape \(1, 4\)"),
        ("int_x", dict(x=jnp.ones((8, 4), jnp.int32)), TypeError, r"x must have a real floating"),
        ("bool_x", dict(x=jnp.ones((8, 4), bool)), TypeError, r"x must.*got bool"),
        ("training", dict(training=1), TypeError, r"training must be a Python bool"),
    )
    def test_bad_input(self, override, err, msg):
        kw = dict(x=jnp.ones((8, 4)), state=ji.batch_norm_state(4), training=True)
        kw.update(override)
        x, state = kw.pop("x"), kw.pop("state")
        with self.assertRaisesRegex(err, msg):
            ji.batch_norm(x, state, **kw)
        # ... and at trace time, under jit.
        with self.assertRaisesRegex(err, msg):
            jax.jit(lambda x, s: ji.batch_norm(x, s, **kw))(x, state)

    def test_update_running_stats_bad_input(self):
        m = ji.batch_moments(jnp.ones((4, 3)))
        with self.assertRaisesRegex(ValueError, r"moments of feature shape \(3,\)"):
            ji.update_running_stats(ji.batch_norm_state(2), m)
        with self.assertRaisesRegex(ValueError, "momentum"):
            ji.update_running_stats(ji.batch_norm_state(3), m, momentum=2.0)
