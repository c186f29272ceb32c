"""Tests for ji.batch_norm, ji.batch_norm_state and ji.update_running_stats.

References are float64 numpy (helpers_norm). test_linen compares the same layouts with
flax.linen.BatchNorm through jaxinit.linen.BatchNorm, which calls this function.
"""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers_norm import (
    BF16_EPS,
    EAGER_SHAPE,
    F32_EPS,
    affine,
    assert_close_to_scale,
    central_differences,
    draws,
    f64,
    feature_axes,
    normal,
    np_batch_norm,
    np_batch_norm_grads,
    np_sin_loss,
    np_stats,
    row_mask,
    sum_tol,
)

import jaxinit as ji

# One jitted batch_norm for the tests of the running update: calls with the same shapes and
# options share its compiled code.
_STATIC = ("training", "momentum", "axis", "unbiased_running_var", "nan_guard", "debias")
bn_jit = jax.jit(ji.batch_norm, static_argnames=_STATIC)

N, F = EAGER_SHAPE  # the batch of the tests that also run eagerly


# --------------------------------------------------------------------------- eager and jit


class EagerAndJitTest(chex.TestCase):
    """Checks that run both eagerly and under jit.

    Eagerly, every op rounds its result to its dtype; under jit XLA fuses ops, may keep excess
    precision (bfloat16) and simplifies selects (the NaN padding of the mask test).
    """

    @chex.variants(with_jit=True, without_jit=True)
    def test_train_matches_float64(self):
        x = normal(0, (N, F), loc=3.0, scale=2.0)
        scale, bias = affine(F)
        f = self.variant(functools.partial(ji.batch_norm, training=True, momentum=0.9))
        y, new = f(x, ji.batch_norm_state(F), scale, bias)
        _, mean, var = np_stats(x, (0,))
        chex.assert_type([y, new.mean, new.var, new.count], [jnp.float32] * 3 + [jnp.int32])
        chex.assert_shape([new.mean, new.var], (F,))
        # y inherits the statistics' error, up to sum_tol(N) relative; the rest are a few roundings.
        tol = sum_tol(N)
        np.testing.assert_allclose(y, np_batch_norm(x, (0,), scale, bias), rtol=tol, atol=tol)
        np.testing.assert_allclose(new.mean, 0.1 * mean, rtol=tol)
        np.testing.assert_allclose(new.var, 0.9 + 0.1 * var, rtol=tol)
        assert int(new.count) == 1

    @chex.variants(with_jit=True, without_jit=True)
    def test_eval_uses_running_stats(self):
        x = normal(0, (N, F), loc=3.0, scale=2.0)
        scale, bias = affine(F)
        state = ji.BatchNormState(
            *jax.device_put(
                (
                    np.linspace(-1.0, 1.0, F, dtype=np.float32),
                    np.linspace(0.5, 2.0, F, dtype=np.float32),
                )
            ),
            jax.device_put(np.int32(7)),
        )
        y, new = self.variant(functools.partial(ji.batch_norm, training=False))(
            x, state, scale, bias
        )
        y_ref = (f64(x) - f64(state.mean)) / np.sqrt(f64(state.var) + 1e-5) * f64(scale) + f64(bias)
        # No reductions: a few float32 roundings of values up to |y| ~ 10.
        np.testing.assert_allclose(y, y_ref, rtol=8 * F32_EPS, atol=8 * F32_EPS)
        chex.assert_trees_all_equal(new, state)

    @chex.variants(with_jit=True, without_jit=True)
    def test_bfloat16_input(self):
        x = normal(12, (N, F), loc=3.0, scale=2.0, dtype=jnp.bfloat16)
        scale, bias = affine(F)
        f = self.variant(functools.partial(ji.batch_norm, training=True, momentum=0.0))
        y, s = f(x, ji.batch_norm_state(F), scale, bias)
        chex.assert_type([y, s.mean, s.var], [jnp.bfloat16, jnp.float32, jnp.float32])
        # Statistics are float32 sums of the bf16 values (exact in float32).
        _, mean, var = np_stats(x, (0,))
        np.testing.assert_allclose(s.mean, mean, rtol=sum_tol(N))
        np.testing.assert_allclose(s.var, var, rtol=sum_tol(N))
        # The output is rounded once to bfloat16: BF16_EPS relative.
        y_ref = np_batch_norm(x, (0,), scale, bias)
        np.testing.assert_allclose(f64(y), y_ref, rtol=BF16_EPS, atol=sum_tol(N))

    @chex.variants(with_jit=True, without_jit=True)
    def test_mask_uses_only_kept_elements(self):
        x = draws(13, (N, F), loc=3.0, scale=2.0)
        # Padding rows hold garbage, including NaN, which must not reach the statistics.
        x[48:] = np.nan
        x[40:48] = 1e6
        mask = np.arange(N)[:, None] < 40
        f = self.variant(functools.partial(ji.batch_norm, training=True, momentum=0.0))
        y, s = jax.device_get(
            f(*jax.device_put((x, ji.batch_norm_state(F))), mask=jax.device_put(mask))
        )
        _, mean, var = np_stats(x[:40], (0,))
        np.testing.assert_allclose(s.mean, mean, rtol=sum_tol(40))
        np.testing.assert_allclose(s.var, var, rtol=sum_tol(40))
        y_ref = np_batch_norm(x[:40], (0,))
        np.testing.assert_allclose(y[:40], y_ref, rtol=sum_tol(40), atol=sum_tol(40))


def test_bfloat16_gradient():
    x = normal(12, (N, F), loc=3.0, scale=2.0, dtype=jnp.bfloat16)
    w = normal(13, (N, F), dtype=jnp.bfloat16)  # the output cotangent, exact in bfloat16

    def loss(x):
        y, _ = ji.batch_norm(x, ji.batch_norm_state(F), training=True)
        return jnp.sum(y * w)

    g = jax.jit(jax.grad(loss))(x)
    chex.assert_type(g, jnp.bfloat16)
    # Float32 arithmetic on exact inputs, rounded once to bfloat16 (BF16_EPS relative); the
    # float32 part errs like a float32 gradient (see test_train_matches_float64).
    g64 = np_batch_norm_grads(x, np.ones(F), np.zeros(F), w, (0,), dloss=np.ones_like)[0]
    np.testing.assert_allclose(f64(g), g64, rtol=BF16_EPS, atol=3 * sum_tol(N) * np.abs(g64).max())


# --------------------------------------------------------------------------- against references

# (shape, feature axis, row mask, mean of x, fast variance, scale and bias)
LAYOUTS = [
    pytest.param((N, F), -1, False, 3.0, False, True, id="last_axis"),
    pytest.param((4, 3, 3, 6), -1, False, 3.0, False, True, id="nhwc"),
    pytest.param((4, 6, 3, 3), 1, False, 3.0, False, True, id="nchw_axis1"),
    pytest.param((8, 3, 2, 5), (1, 3), False, 3.0, False, True, id="two_feature_axes"),
    pytest.param((48, 5), -1, True, 3.0, False, True, id="masked"),
    pytest.param((N, F), -1, False, 3.0, True, False, id="fast_variance_no_affine"),
    pytest.param((256, 4), -1, False, 1e4, False, True, id="far_from_zero_mean"),
]


@pytest.mark.parametrize("shape, axis, masked, loc, fast, use_affine", LAYOUTS)
def test_train_matches_float64(shape, axis, masked, loc, fast, use_affine):
    """Outputs, running statistics and gradients of a train step against float64.

    The float64 gradients are the chain rule written out, itself checked against central
    differences of the float64 loss. (test_linen compares the same layouts with flax's layer.)
    """
    x = normal(2, shape, loc=loc, scale=2.0 if loc == 3.0 else 1.0)
    w = normal(3, shape)
    feat_axes, red = feature_axes(len(shape), axis)
    feat = tuple(shape[a] for a in feat_axes)
    scale, bias = affine(feat) if use_affine else (np.ones(feat), np.zeros(feat))
    mask = row_mask(shape[0]) if masked else None

    @jax.jit
    @functools.partial(jax.value_and_grad, argnums=(0, 1, 2) if use_affine else (0,), has_aux=True)
    def run(x, scale, bias):
        y, s = ji.batch_norm(
            x,
            ji.batch_norm_state(feat),
            scale if use_affine else None,
            bias if use_affine else None,
            training=True,
            momentum=0.9,
            axis=axis,
            mask=mask,
            fast_variance=fast,
        )
        return jnp.sum(jnp.sin(y) * w), (y, s.mean, s.var)

    (loss, (y, mean, var)), grads = jax.device_get(run(x, scale, bias))

    n = int(np.sum(np.broadcast_to(True if mask is None else mask, shape))) // int(np.prod(feat))
    tol = sum_tol(n)
    _, mean64, var64 = np_stats(x, red, mask)
    np.testing.assert_allclose(y, np_batch_norm(x, red, scale, bias, mask), rtol=tol, atol=tol)
    np.testing.assert_allclose(mean, 0.1 * mean64, rtol=tol)
    np.testing.assert_allclose(var, 0.9 + 0.1 * var64, rtol=tol)
    loss64 = functools.partial(np_sin_loss, w=w, red=red, mask=mask)
    np.testing.assert_allclose(loss, loss64(x, scale, bias), rtol=sum_tol(int(np.prod(shape))))
    # The backward pass adds two n-term sums (of dy and of dy * xhat) to the statistics' error.
    grads64 = np_batch_norm_grads(x, scale, bias, w, red, mask)
    for g, g64 in zip(grads, grads64[: len(grads)], strict=True):
        assert_close_to_scale(g, g64, 3 * tol)
    # The float64 chain rule against central differences (step 1e-4: truncation error ~1e-8).
    fd = (
        central_differences(lambda a: loss64(a, scale, bias), x, 1e-4),
        central_differences(lambda a: loss64(x, a, bias), scale, 1e-4),
        central_differences(lambda a: loss64(x, scale, a), bias, 1e-4),
    )
    for g64, g_fd in zip(grads64, fd, strict=True):
        assert_close_to_scale(g64, g_fd, 1e-6)


def test_gradient_through_running_state():
    # The new state depends on the batch mean and variance; its gradient must be right too.
    x = normal(7, (N, 5), loc=3.0, scale=2.0)

    def loss(x):
        _, s = ji.batch_norm(x, ji.batch_norm_state(5), training=True, momentum=0.5)
        return jnp.sum(s.mean**2) + jnp.sum(jnp.sin(s.var))

    # L = sum((m/2)^2) + sum(sin(1/2 + v/2)); dm/dx = 1/N, dv/dx = 2 (x - m) / N.
    _, mean, var = np_stats(x, (0,))
    ref = (0.5 * mean + np.cos(0.5 + 0.5 * var) * (f64(x) - mean)) / N
    assert_close_to_scale(jax.jit(jax.grad(loss))(x), ref, sum_tol(N))


def test_torch_conventions():
    # torch: running = (1 - p) * running + p * batch with the unbiased variance, and
    # normalization with the biased one; p = 0.1 is momentum = 0.9 here.
    x = normal(8, (4, 3, 4, 4), loc=3.0, scale=2.0)  # NCHW
    p = 0.1
    y, new = bn_jit(
        x,
        ji.batch_norm_state(3),
        training=True,
        axis=1,
        momentum=1 - p,
        unbiased_running_var=True,
    )
    n, mean, var_b = np_stats(x, (0, 2, 3))
    var_u = var_b * n / (n - 1)
    tol = sum_tol(int(n[0]))
    np.testing.assert_allclose(new.mean, p * mean, rtol=tol)
    np.testing.assert_allclose(new.var, (1 - p) * 1.0 + p * var_u, rtol=tol)
    np.testing.assert_allclose(y, np_batch_norm(x, (0, 2, 3)), rtol=tol, atol=tol)


def test_far_from_zero_mean():
    # mean 1e4, std 1 in float32: the statistics within float32 rounding of float64 on the
    # same data, where the unshifted E[x^2] - E[x]^2 loses everything.
    x = normal(9, (N, F), loc=1e4, scale=1.0)
    _, mean, var = np_stats(x, (0,))
    y, s = bn_jit(x, ji.batch_norm_state(F), training=True, momentum=0.0)
    # The mean ~1e4 is one float32 rounding from float64; the variance is a sum of
    # deviations from a sample of the data, O(1) each.
    np.testing.assert_allclose(s.mean, mean, rtol=F32_EPS)
    np.testing.assert_allclose(s.var, var, rtol=sum_tol(N))
    np.testing.assert_allclose(y, np_batch_norm(x, (0,)), rtol=sum_tol(N), atol=sum_tol(N))
    # flax's default (fast) variance is far off on the same data.
    bn = nn.BatchNorm(use_running_average=False, momentum=0.0)
    stats = {"mean": jnp.zeros(F), "var": jnp.ones(F)}
    apply = jax.jit(lambda v, x: bn.apply(v, x, mutable=["batch_stats"])[1])
    upd = apply({"batch_stats": stats, "params": {"scale": jnp.ones(F), "bias": jnp.zeros(F)}}, x)
    assert np.max(np.abs(f64(upd["batch_stats"]["var"]) / var - 1)) > 1e-2


def test_mask_per_element():
    x = normal(14, (N, F), loc=3.0, scale=2.0)
    mask = np.random.default_rng(15).random((N, F)) < 0.6
    _, s = bn_jit(x, ji.batch_norm_state(F), training=True, momentum=0.0, mask=mask)
    n, mean, var = np_stats(x, (0,), mask)
    assert n.min() < n.max() < N  # features keep different numbers of elements
    np.testing.assert_allclose(s.mean, mean, rtol=sum_tol(N))
    np.testing.assert_allclose(s.var, var, rtol=sum_tol(N))


def test_scan_and_remat_match_unrolled():
    xs = normal(18, (2, 16, 4), loc=3.0, scale=2.0)
    scale, bias = affine(4)

    def step(state, x, s=scale):
        y, state = ji.batch_norm(x, state, s, bias, training=True, momentum=0.8)
        return state, y

    def scan_loss(s, wrap):
        def body(state, x):
            state, y = step(state, x, s)
            return state, jnp.sum(jnp.sin(y))

        return jnp.sum(jax.lax.scan(wrap(body), ji.batch_norm_state(4), xs)[1])

    @jax.jit
    def run():
        s_scan, ys = jax.lax.scan(step, ji.batch_norm_state(4), xs)
        s_loop, ys_loop = ji.batch_norm_state(4), []
        for x in xs:
            s_loop, y = step(s_loop, x)
            ys_loop.append(y)
        # A fresh state per step: the unrolled gradient is the sum of per-step gradients.
        per_step = jax.grad(lambda s, x: jnp.sum(jnp.sin(step(ji.batch_norm_state(4), x, s)[1])))
        g_unrolled = sum(per_step(scale, x) for x in xs)
        g_scan = jax.grad(scan_loss)(scale, lambda f: f)
        g_remat = jax.grad(scan_loss)(scale, jax.checkpoint)
        return s_scan, ys, s_loop, jnp.stack(ys_loop), g_scan, g_remat, g_unrolled

    s_scan, ys, s_loop, ys_loop, g_scan, g_remat, g_unrolled = run()
    # The same statistics, their sums ordered as XLA chooses inside and outside a loop body.
    tol = sum_tol(16)
    np.testing.assert_allclose(ys, ys_loop, rtol=tol, atol=tol)
    chex.assert_trees_all_close(s_scan, s_loop, rtol=tol)
    assert int(s_scan.count) == 2
    np.testing.assert_allclose(g_scan, g_unrolled, rtol=sum_tol(16))
    np.testing.assert_allclose(g_remat, g_unrolled, rtol=sum_tol(16))


def test_vmap_matches_per_slice():
    xs = normal(19, (2, 16, 4), loc=3.0, scale=2.0)
    scale, bias = affine(4)

    def loss(x, s):
        y, st = ji.batch_norm(x, ji.batch_norm_state(4), s, bias, training=True)
        return jnp.sum(jnp.sin(y)), st

    vg = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)

    @jax.jit
    def run(xs, s):
        return jax.vmap(vg, in_axes=(0, None))(xs, s), [vg(x, s) for x in xs]

    ((vals, states), (gx, gs)), per_slice = jax.device_get(run(xs, scale))
    tol = sum_tol(16)
    for i, ((v, st), (gx_i, gs_i)) in enumerate(per_slice):
        np.testing.assert_allclose(vals[i], v, rtol=tol)
        np.testing.assert_allclose(states.var[i], st.var, rtol=tol)
        np.testing.assert_allclose(gx[i], gx_i, rtol=tol, atol=tol)
        np.testing.assert_allclose(gs[i], gs_i, rtol=tol, atol=tol)


def test_no_retracing():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def train(x, state, scale, bias):
        def loss(x, scale, bias):
            y, s = ji.batch_norm(x, state, scale, bias, training=True)
            return jnp.sum(y**2), s

        return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(x, scale, bias)

    chex.clear_trace_counter()
    state = ji.batch_norm_state(4)
    scale, bias = affine(4)
    for seed in range(3):
        _, state = train(normal(seed, (16, 4)), state, scale, bias)
    assert int(state.count) == 3


def test_nan_guard():
    x = draws(20, (16, 3), loc=3.0, scale=2.0)
    x[2, 1] = np.nan
    state = ji.BatchNormState(np.full(3, 0.5, np.float32), np.full(3, 2.0, np.float32), np.int32(4))
    # A feature with no kept elements (count 0) also keeps its running values.
    only_first = np.zeros((16, 3), bool)
    only_first[:, 0] = True

    @jax.jit
    def run(x, state):
        guarded = ji.batch_norm(x, state, training=True, momentum=0.5)
        _, unguarded = ji.batch_norm(x, state, training=True, nan_guard=False)
        _, empty = ji.batch_norm(x, state, training=True, mask=only_first)
        return guarded, unguarded, empty

    (y, new), unguarded, empty = jax.device_get(run(x, state))
    assert np.all(np.isnan(y[:, 1]))  # the output signals the bad channel
    assert float(new.mean[1]) == 0.5
    assert float(new.var[1]) == 2.0
    _, mean, var = np_stats(x[:, ::2], (0,))
    np.testing.assert_allclose(new.mean[::2], 0.25 + 0.5 * mean, rtol=sum_tol(16))
    np.testing.assert_allclose(new.var[::2], 1.0 + 0.5 * var, rtol=sum_tol(16))
    assert int(new.count) == 5
    assert np.isnan(unguarded.mean[1])
    np.testing.assert_array_equal(empty.mean[1:], state.mean[1:])
    np.testing.assert_array_equal(empty.var[1:], state.var[1:])
    assert float(empty.mean[0]) != 0.5  # the feature with kept elements is updated


def test_debias():
    state = ji.batch_norm_state(2)
    m = 0.9
    # Closed form: zero-initialised EMA h_t = m h + (1 - m) b_t, divided by 1 - m^t.
    h_mean, h_var = np.zeros(2), np.zeros(2)
    for t in range(1, 4):
        x = normal(30 + t, (N, 2), loc=3.0, scale=2.0)
        _, state = bn_jit(x, state, training=True, momentum=m, debias=True)
        _, mean, var = np_stats(x, (0,))
        h_mean = m * h_mean + (1 - m) * mean
        h_var = m * h_var + (1 - m) * var
        np.testing.assert_allclose(state.mean, h_mean / (1 - m**t), rtol=sum_tol(N))
        np.testing.assert_allclose(state.var, h_var / (1 - m**t), rtol=sum_tol(N))
    assert int(state.count) == 3


# --------------------------------------------------------------------------- state and errors


def test_batch_norm_state():
    s = ji.batch_norm_state((3, 4))
    chex.assert_shape([s.mean, s.var], (3, 4))
    chex.assert_type([s.mean, s.var, s.count], [jnp.float32, jnp.float32, jnp.int32])
    np.testing.assert_array_equal(s.mean, 0.0)
    np.testing.assert_array_equal(s.var, 1.0)
    assert int(s.count) == 0
    assert ji.batch_norm_state(2, jnp.bfloat16).mean.dtype == jnp.float32
    with pytest.raises(TypeError, match="dtype"):
        ji.batch_norm_state(2, jnp.int32)
    with pytest.raises(ValueError, match="non-negative"):
        ji.batch_norm_state(-1)


@pytest.mark.parametrize(
    "override, err, msg",
    [
        pytest.param(
            dict(state=ji.batch_norm_state(5)), ValueError, r"feature shape \(4,\)", id="features"
        ),
        pytest.param(
            dict(momentum=1.0), ValueError, r"momentum must be in \[0, 1\).*1.0", id="momentum_1"
        ),
        pytest.param(dict(momentum=-0.1), ValueError, r"momentum.*-0.1", id="momentum_neg"),
        pytest.param(
            dict(epsilon=-1e-5), ValueError, r"epsilon must be non-negative.*-1e-05", id="epsilon"
        ),
        pytest.param(
            dict(axis=2), ValueError, r"axis=2 is out of range for an input of rank 2", id="axis"
        ),
        pytest.param(
            dict(axis=(1, -1)), ValueError, r"axis=\(1, -1\) names the same axis", id="axis_dup"
        ),
        pytest.param(
            dict(mask=np.ones((3, 4), bool)), ValueError, r"mask of shape \(3, 4\)", id="mask"
        ),
        pytest.param(
            dict(mask=np.ones((8, 4))), TypeError, r"mask must be a boolean", id="mask_dtype"
        ),
        pytest.param(
            dict(scale=np.ones(3, np.float32)),
            ValueError,
            r"scale has shape \(3,\).*\(4,\)",
            id="scale",
        ),
        pytest.param(
            dict(bias=np.ones((1, 4), np.float32)),
            ValueError,
            r"bias has shape \(1, 4\)",
            id="bias",
        ),
        pytest.param(
            dict(x=np.ones((8, 4), np.int32)),
            TypeError,
            r"x must have a real floating",
            id="int_x",
        ),
        pytest.param(dict(x=np.ones((8, 4), bool)), TypeError, r"x must.*got bool", id="bool_x"),
        pytest.param(dict(training=1), TypeError, r"training must be a Python bool", id="training"),
    ],
)
def test_bad_input(override, err, msg):
    kw = dict(x=np.ones((8, 4), np.float32), state=ji.batch_norm_state(4), training=True)
    kw.update(override)
    x, state = kw.pop("x"), kw.pop("state")
    with pytest.raises(err, match=msg):
        ji.batch_norm(x, state, **kw)
    # ... and at trace time, under jit.
    with pytest.raises(err, match=msg):
        jax.jit(lambda x, s: ji.batch_norm(x, s, **kw))(x, state)


def test_update_running_stats_bad_input():
    m = ji.Moments.zeros(3)
    with pytest.raises(ValueError, match=r"moments of feature shape \(3,\)"):
        ji.update_running_stats(ji.batch_norm_state(2), m)
    with pytest.raises(ValueError, match="momentum"):
        ji.update_running_stats(ji.batch_norm_state(3), m, momentum=2.0)
