"""Cross-device batch norm on a mesh of 8 host devices (see conftest.py)."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers_norm import (
    F32_EPS,
    assert_close_to_scale,
    draws,
    f64,
    normal,
    np_batch_norm,
    np_batch_norm_grads,
    np_sin_loss,
    np_stats,
    sum_tol,
)
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxinit as ji

N_DEV, N, F = 8, 64, 6
W = np.cos(np.arange(F, dtype=np.float32))  # per-feature weights of the loss


def mesh():
    return jax.make_mesh((N_DEV,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))


def loss(x, scale, bias, state, mask, axis_name):
    y, new = ji.batch_norm(
        x, state, scale, bias, training=True, axis_name=axis_name, mask=mask, momentum=0.9
    )
    terms = jnp.sin(y) * W
    local = jnp.sum(terms if mask is None else jnp.where(mask, terms, 0.0))
    total = jax.lax.psum(local, axis_name) if axis_name else local
    return total, (y, new)


value_and_grad = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)


@functools.cache
def sharded(masked):
    """value_and_grad of the loss under shard_map, the batch split over the 8 devices."""

    def body(x, scale, bias, state, mask):
        return value_and_grad(x, scale, bias, state, mask, "d")

    f = jax.shard_map(
        body,
        mesh=mesh(),
        in_specs=(P("d"), P(), P(), P(), P("d") if masked else None),
        out_specs=((P(), (P("d"), P())), (P("d"), P(), P())),
    )
    return jax.jit(f)


def run_sharded(x, scale, bias, state, mask):
    m = mesh()
    rows, rep = NamedSharding(m, P("d")), NamedSharding(m, P())
    args = (
        jax.device_put(x, rows),
        *jax.device_put((scale, bias, state), rep),
        None if mask is None else jax.device_put(mask, rows),
    )
    return jax.device_get(sharded(mask is not None)(*args))


def shifted_per_device(seed):
    """Rows of device i have mean 3 + i, so that how devices are weighted matters."""
    return (
        draws(seed, (N, F), loc=3.0, scale=2.0)
        + np.repeat(np.arange(8, dtype=np.float32), 8)[:, None]
    )


def compare_with_float64(x, mask):
    """The sharded train step equals float64 batch norm of the whole (kept) batch."""
    scale = np.float32(1.0) + np.float32(0.2) * np.sin(np.arange(F, dtype=np.float32))
    bias = np.float32(0.1) * np.arange(F, dtype=np.float32)
    (loss, (y, s)), grads = run_sharded(x, scale, bias, ji.batch_norm_state(F), mask)
    n, mean, var = np_stats(x, (0,), mask)
    w = np.broadcast_to(W if mask is None else np.where(mask, W, 0.0), (N, F))
    # The statistics over the n kept rows err by sum_tol(n); y inherits that.
    tol = sum_tol(int(n[0]))
    np.testing.assert_allclose(
        loss, np_sin_loss(x, scale, bias, w, (0,), mask), rtol=sum_tol(N * F)
    )
    np.testing.assert_allclose(y, np_batch_norm(x, (0,), scale, bias, mask), rtol=tol, atol=tol)
    np.testing.assert_allclose(s.mean, 0.1 * mean, rtol=tol)
    np.testing.assert_allclose(s.var, 0.9 + 0.1 * var, rtol=tol)
    assert int(s.count) == 1
    # The backward pass adds two n-term sums (of dy and of dy * xhat) to the statistics' error.
    for g, g64 in zip(grads, np_batch_norm_grads(x, scale, bias, w, (0,), mask), strict=True):
        assert_close_to_scale(g, g64, 3 * tol)


def test_axis_name_equals_global_batch():
    compare_with_float64(normal(1, (N, F), loc=3.0, scale=2.0), None)


def test_axis_name_far_from_zero_mean():
    # Each device shifts by a sample of its own rows, so that nothing large cancels.
    compare_with_float64(normal(2, (N, F), loc=1e4, scale=1.0), None)


def test_unequal_valid_counts_are_count_weighted():
    # 8 rows per device; device 0 keeps 2 rows, device 1 keeps 6, device 4 none. Against
    # float64 on the kept rows: each device weighted by its count.
    valid = np.array([2, 6, 8, 1, 0, 3, 8, 5])
    mask = (np.arange(8)[None, :] < valid[:, None]).reshape(N, 1)
    compare_with_float64(shifted_per_device(3), mask)


def test_flax_weights_devices_equally():
    # Contrast: flax averages per-device means with equal weight and gets them wrong.
    bn = nn.BatchNorm(
        use_running_average=False,
        axis_name="d",
        momentum=0.0,
        use_scale=False,
        use_bias=False,
        use_fast_variance=False,
    )
    stats = {"mean": jnp.zeros(F), "var": jnp.ones(F)}

    def flax_body(x, m):
        _, upd = bn.apply({"batch_stats": stats}, x, mask=m, mutable=["batch_stats"])
        return upd["batch_stats"]["mean"]

    # (flax returns NaN outright when a device has no valid rows; give each at least one.)
    valid = np.array([2, 6, 8, 1, 4, 3, 8, 5])
    mask = (np.arange(8)[None, :] < valid[:, None]).reshape(N, 1)
    x = shifted_per_device(3)
    m = mesh()
    f = jax.shard_map(flax_body, mesh=m, in_specs=(P("d"), P("d")), out_specs=P(), check_vma=False)
    sh = NamedSharding(m, P("d"))
    flax_mean = jax.device_get(jax.jit(f)(jax.device_put(x, sh), jax.device_put(mask, sh)))
    _, mean, _ = np_stats(x, (0,), mask)
    # The per-device means range over 0..7 plus noise; equal weights are off by > 0.1.
    assert np.max(np.abs(flax_mean - mean)) > 0.1
    # ... and equal to the unweighted mean of the per-device means.
    per_device = [
        np_stats(x[i * 8 : (i + 1) * 8], (0,), mask[i * 8 : (i + 1) * 8])[1] for i in range(8)
    ]
    np.testing.assert_allclose(flax_mean, np.mean(per_device, axis=0), rtol=sum_tol(8))


def step(x, scale, state):
    def loss(x, scale):
        y, new = ji.batch_norm(x, state, scale, training=True)
        return jnp.sum(jnp.sin(y)), (y, new)

    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, scale)


step_jit = jax.jit(step)


def assert_step_close(out, expected):
    """Loss, outputs, statistics and gradients of ``step`` on a split batch equal the unsplit.

    The loss sums N * 16 terms; every other result errs by 2 sum_tol(N) (the same reductions
    in another order, on each side), its gradients by three times that (two more sums).
    """
    (loss, (y, new)), grads = jax.device_get(out)
    (loss0, (y0, new0)), grads0 = jax.device_get(expected)
    np.testing.assert_allclose(loss, loss0, rtol=sum_tol(N * 16))
    tol = 2 * sum_tol(N)
    np.testing.assert_allclose(y, y0, rtol=tol, atol=tol)
    chex.assert_trees_all_close(new, new0, rtol=tol)
    for g, g0 in zip(grads, grads0, strict=True):
        assert_close_to_scale(g, g0, 3 * tol)


X16 = normal(6, (N, 16), loc=50.0, scale=2.0)
SCALE16 = jax.device_put(np.linspace(0.5, 1.5, 16, dtype=np.float32))


def test_jit_with_sharded_batch_equals_unsharded():
    state = ji.batch_norm_state(16)
    xs = jax.device_put(X16, NamedSharding(mesh(), P("d")))
    out_sharded = step_jit(xs, SCALE16, state)
    out_single = step_jit(X16, SCALE16, state)
    assert len(out_sharded[1][0].sharding.device_set) == N_DEV
    assert_step_close(out_sharded, out_single)


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param(P("b", None), id="batch"),
        pytest.param(P(("b", "f"), None), id="batch_over_both_axes"),
        pytest.param(P("b", "f"), id="batch_and_features"),
    ],
)
def test_explicit_mesh_needs_no_axis_name(spec):
    """Under jax.set_mesh with Explicit axes, batch- and feature-sharded x need no axis_name."""
    state = ji.batch_norm_state(16)
    expected = step_jit(X16, SCALE16, state)
    m = jax.make_mesh((2, 4), ("b", "f"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    with jax.set_mesh(m):
        xs = jax.device_put(X16, NamedSharding(m, spec))
        out = step_jit(xs, SCALE16, state)
    assert out[1][0].sharding.spec == spec  # the gradient keeps x's sharding
    assert_step_close(out, expected)


def test_axis_index_groups():
    x = normal(5, (N, F), loc=3.0, scale=2.0)
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
    m = mesh()

    def body(x):
        _, new = ji.batch_norm(
            x,
            ji.batch_norm_state(F),
            training=True,
            axis_name="d",
            axis_index_groups=groups,
            momentum=0.0,
        )
        return new.mean[None]

    f = jax.shard_map(body, mesh=m, in_specs=P("d"), out_specs=P("d"), check_vma=False)
    means = jax.device_get(jax.jit(f)(jax.device_put(x, NamedSharding(m, P("d")))))
    x64 = f64(x)
    for i in range(N_DEV):  # each device holds its group's mean
        group = x64[:32] if i < 4 else x64[32:]
        np.testing.assert_allclose(means[i], group.mean(0), rtol=sum_tol(32))
    assert np.max(np.abs(means[0] - means[7])) > 100 * F32_EPS  # the groups differ
