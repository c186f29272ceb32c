"""jaxinit.linen.BatchNorm against flax.linen.BatchNorm: variables, outputs, statistics, errors."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers_norm import (
    BF16_ULP,
    EAGER_SHAPE,
    F32_EPS,
    assert_close_to_scale,
    f64,
    normal,
    random_variables,
    row_mask,
    sum_tol,
)
from jax.sharding import PartitionSpec as P

import jaxinit.linen as jil

KEY = jax.random.key(1)
X = normal(0, EAGER_SHAPE, loc=3.0, scale=2.0)  # the input of the eager tests
N_E, F = EAGER_SHAPE


def flax_apply(module, variables, *args, **kwargs):
    # flax's own layer mixes bf16 inputs with f32 statistics implicitly.
    with jax.numpy_dtype_promotion("standard"):
        return module.apply(variables, *args, **kwargs)


def flax_init(module, *args, **kwargs):
    with jax.numpy_dtype_promotion("standard"):
        return module.init(*args, **kwargs)


def step_and_eval(module, apply, v, x, mask):
    """A train step, then eval with the updated statistics."""
    y, upd = apply(module, v, x, use_running_average=False, mask=mask, mutable=["batch_stats"])
    return y, upd, apply(module, {**v, **upd}, x, use_running_average=True)


# (input shape, input dtype, module kwargs, use a mask)
CASES = [
    pytest.param((32, 6), jnp.float32, {}, False, id="dense"),
    pytest.param(
        (4, 5, 5, 3), jnp.float32, {"momentum": 0.7, "epsilon": 1e-3}, False, id="nhwc_momentum"
    ),
    pytest.param((4, 3, 5, 5), jnp.float32, {"axis": 1}, False, id="nchw_axis1"),
    pytest.param((8, 3, 4), jnp.float32, {"axis": (1, 2)}, False, id="two_feature_axes"),
    pytest.param(
        (16, 6), jnp.float32, {"use_scale": False, "use_bias": False}, False, id="no_scale_no_bias"
    ),
    pytest.param((16, 6), jnp.float32, {}, True, id="masked"),
    pytest.param((16, 6), jnp.bfloat16, {}, False, id="bf16_in_f32_out"),
    pytest.param((16, 6), jnp.float32, {"dtype": jnp.bfloat16}, False, id="f32_in_bf16_out"),
    pytest.param((16, 6), jnp.float32, {"param_dtype": jnp.bfloat16}, False, id="bf16_params"),
    pytest.param((16, 6), jnp.float32, {"use_fast_variance": True}, False, id="fast_variance"),
]


@pytest.mark.parametrize("shape, dtype, kwargs, masked", CASES)
def test_train_and_eval_match_flax(shape, dtype, kwargs, masked):
    kwargs = {"use_fast_variance": False, **kwargs}
    ours, ref = jil.BatchNorm(**kwargs), nn.BatchNorm(**kwargs)
    x = normal(0, shape, loc=3.0, scale=2.0, dtype=dtype)
    mask = row_mask(shape[0]) if masked else None
    init_kw = dict(use_running_average=False)
    # The same variables for both, with a random scale and bias and running statistics away
    # from their initial values (test_init_matches_flax checks the initializers).
    v = random_variables(jax.eval_shape(functools.partial(ours.init, **init_kw), KEY, x))

    @jax.jit
    def run(x, v):
        return (
            (ours.init(KEY, x, **init_kw), flax_init(ref, KEY, x, **init_kw)),
            step_and_eval(ours, nn.Module.apply, v, x, mask),
            step_and_eval(ref, flax_apply, v, x, mask),
        )

    (v_ours, v_ref), (y, upd, y_eval), (y_ref, upd_ref, y_eval_ref) = jax.device_get(run(x, v))
    chex.assert_trees_all_equal_shapes_and_dtypes(v_ours, v_ref)
    chex.assert_trees_all_equal(v_ours, v_ref)

    axis = kwargs.get("axis", -1)
    n = int(np.prod(shape)) // int(np.prod(np.take(shape, axis)))  # the reduction size
    if masked:
        n = int(row_mask(shape[0]).sum()) * n // shape[0]
    # Both sides compute in float32 and err by up to sum_tol(n) each; a bfloat16 output then
    # rounds values that close to the same or to adjacent bfloat16 numbers, BF16_ULP apart.
    tol = 2 * sum_tol(n)
    out_dtype = jnp.dtype(kwargs.get("dtype") or jnp.float32)
    rtol = BF16_ULP if out_dtype == jnp.bfloat16 else tol
    for a, b in [(y, y_ref), (y_eval, y_eval_ref)]:
        assert a.dtype == b.dtype == out_dtype
        np.testing.assert_allclose(f64(a), f64(b), rtol=rtol, atol=tol)
    chex.assert_trees_all_equal_shapes_and_dtypes(upd, upd_ref)
    chex.assert_trees_all_close(upd, upd_ref, rtol=tol)
    assert not np.allclose(upd["batch_stats"]["mean"], v["batch_stats"]["mean"])  # it moved


def test_init_matches_flax():
    # Custom initializers draw the same values from the same rng as flax's, with bf16 params
    # and several feature axes too.
    x = normal(0, (8, 3, 4), loc=3.0, scale=2.0)
    inits = dict(scale_init=nn.initializers.normal(1.0), bias_init=nn.initializers.normal(1.0))
    configs = [inits, {**inits, "axis": (1, 2), "param_dtype": jnp.bfloat16}]
    pairs = [(jil.BatchNorm(**c), nn.BatchNorm(**c)) for c in configs]

    @jax.jit
    def run(x):
        kw = dict(use_running_average=False)
        return [(a.init(KEY, x, **kw), flax_init(b, KEY, x, **kw)) for a, b in pairs]

    for v, v_ref in jax.device_get(run(x)):
        chex.assert_trees_all_equal_shapes_and_dtypes(v, v_ref)
        chex.assert_trees_all_equal(v, v_ref)
        assert not np.allclose(f64(v["params"]["scale"]), 1.0)  # not the default ones


def test_eager_matches_jit():
    bn = jil.BatchNorm(momentum=0.9)

    def run(v, x):
        return step_and_eval(bn, nn.Module.apply, v, x, None)

    v = random_variables(
        jax.eval_shape(functools.partial(bn.init, use_running_average=False), KEY, X)
    )
    eager, jitted = run(v, X), jax.jit(run)(v, X)
    # The same float32 arithmetic; XLA may fuse and order the reductions differently.
    tol = 2 * sum_tol(EAGER_SHAPE[0])
    chex.assert_trees_all_close(eager, jitted, rtol=tol, atol=tol)


def test_gradients_match_flax():
    x = normal(1, (32, 5), loc=3.0, scale=2.0)
    ours, ref = jil.BatchNorm(), nn.BatchNorm(use_fast_variance=False)
    v = jax.eval_shape(functools.partial(ref.init, use_running_average=False), KEY, x)
    params = {"scale": normal(2, (5,), loc=1.0, scale=0.3), "bias": normal(3, (5,), scale=0.5)}
    stats = {"mean": jnp.zeros(5), "var": jnp.ones(5)}
    assert jax.tree.structure(v["params"]) == jax.tree.structure(params)

    def loss(module, params, x):
        y, _ = module.apply(
            {"params": params, "batch_stats": stats},
            x,
            use_running_average=False,
            mutable=["batch_stats"],
        )
        return jnp.sum(jnp.sin(y) * jnp.arange(5.0))

    grad = jax.grad(loss, argnums=(1, 2))
    g, g_ref = jax.device_get(jax.jit(lambda p, x: (grad(ours, p, x), grad(ref, p, x)))(params, x))
    # Each side errs by the statistics' sum_tol(32) plus two more 32-term sums (dy, dy * xhat).
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
        assert_close_to_scale(a, b, 6 * sum_tol(32))


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


def test_flax_checkpoint_loads_unchanged():
    x = normal(4, (8, 4, 4, 2))
    flax_model, our_model = Net(nn.BatchNorm), Net(jil.BatchNorm)
    train = dict(train=True, mutable=["batch_stats"])
    abstract = jax.eval_shape(functools.partial(flax_model.init, train=False), KEY, x)
    ours_init = jax.eval_shape(functools.partial(our_model.init, train=False), KEY, x)
    checkpoint = random_variables(abstract)

    @jax.jit
    def run(variables, x):
        # A train step of the flax model updates its statistics; then hand its checkpoint over.
        _, upd = flax_model.apply(variables, x, **train)
        variables = {**variables, **upd}
        return (
            variables,
            (
                our_model.apply(variables, x, train=False),
                flax_model.apply(variables, x, train=False),
            ),
            (our_model.apply(variables, x, **train), flax_model.apply(variables, x, **train)),
        )

    variables, (y, y_ref), ((y_t, upd), (y_t_ref, upd_ref)) = jax.device_get(run(checkpoint, x))
    chex.assert_trees_all_equal_shapes_and_dtypes(variables, ours_init)
    # Eval reads the same variables: the two normalization formulas round differently, by a
    # few float32 units, which the layers after carry on.
    assert_close_to_scale(y, y_ref, 2 * sum_tol(8))
    # Training continues from the checkpoint with the same updates: the statistics over the
    # 8 * 4 * 4 = 128 conv positions err by sum_tol(128) on each side. (flax's default here is
    # the fast variance E[x^2] - E[x]^2, which on these O(1)-mean activations cancels little.)
    tol = 2 * sum_tol(128)
    assert_close_to_scale(y_t, y_t_ref, tol)
    for a, b in zip(jax.tree.leaves(upd), jax.tree.leaves(upd_ref), strict=True):
        assert_close_to_scale(a, b, tol)


# --------------------------------------------------------------------------- init and errors


def test_init_does_not_update_statistics():
    for module in (jil.BatchNorm(), nn.BatchNorm()):
        v = module.init(KEY, X, use_running_average=False)
        np.testing.assert_array_equal(v["batch_stats"]["mean"], np.zeros(F, np.float32))
        np.testing.assert_array_equal(v["batch_stats"]["var"], np.ones(F, np.float32))


def test_init_ignores_axis_name():
    # Outside shard_map/pmap the named axis does not exist; init must still work, as in flax.
    v = jil.BatchNorm(axis_name="batch").init(KEY, X, use_running_average=False)
    assert v["batch_stats"]["mean"].shape == (F,)


def test_missing_mutable_names_the_fix():
    bn = jil.BatchNorm()
    v = bn.init(KEY, X, use_running_average=False)
    with pytest.raises(ValueError, match=r"mutable=\['batch_stats'\]"):
        bn.apply(v, X, use_running_average=False)
    with pytest.raises(ValueError, match=r"mutable=\['batch_stats'\]"):
        jax.jit(lambda v, x: bn.apply(v, x, use_running_average=False, mutable=["params"]))(v, X)
    # Evaluation needs nothing mutable: with the initial statistics it is (x - 0) / sqrt(1 + eps).
    y = bn.apply(v, X, use_running_average=True)
    np.testing.assert_allclose(y, np.asarray(X) / np.sqrt(1 + 1e-5), rtol=4 * F32_EPS)  # 3 ops


def test_use_running_average_required():
    # flax's own message for a mode given neither on the module nor on the call.
    with pytest.raises(ValueError, match="use_running_average"):
        jil.BatchNorm().init(KEY, X)


def test_bad_input():
    with pytest.raises(ValueError, match="force_float32_reductions"):
        jil.BatchNorm(force_float32_reductions=False).init(KEY, X, use_running_average=False)
    with pytest.raises(ValueError, match="axis"):
        jil.BatchNorm(axis=3).init(KEY, X, use_running_average=False)
    with pytest.raises(ValueError, match="momentum"):
        jil.BatchNorm(momentum=1.5).init(KEY, X, use_running_average=True)


def test_nan_batch_keeps_running_statistics():
    bn = jil.BatchNorm(momentum=0.5)
    v = bn.init(KEY, X, use_running_average=False)
    bad = np.array(X)
    bad[0, 1] = np.nan
    _, upd = bn.apply(v, jax.device_put(bad), use_running_average=False, mutable=["batch_stats"])
    mean = np.asarray(upd["batch_stats"]["mean"])
    assert mean[1] == 0.0
    x64 = np.delete(f64(X), 1, axis=1)
    np.testing.assert_allclose(np.delete(mean, 1), 0.5 * x64.mean(0), rtol=sum_tol(N_E))


def test_debias_adds_count():
    bn = jil.BatchNorm(momentum=0.9, debias=True)
    v = bn.init(KEY, X, use_running_average=False)
    assert sorted(v["batch_stats"]) == ["count", "mean", "var"]
    _, upd = bn.apply(v, X, use_running_average=False, mutable=["batch_stats"])
    # The first debiased update takes the batch statistics whole.
    np.testing.assert_allclose(upd["batch_stats"]["mean"], f64(X).mean(0), rtol=sum_tol(N_E))
    np.testing.assert_allclose(upd["batch_stats"]["var"], f64(X).var(0), rtol=sum_tol(N_E))
    assert int(upd["batch_stats"]["count"]) == 1


def test_axis_name_matches_flax_and_the_global_batch():
    n = len(jax.devices())
    assert n == 8  # conftest.py's host devices
    mesh = jax.make_mesh((n,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
    single = jil.BatchNorm()
    v = single.init(KEY, X, use_running_average=False)

    def step(module):
        def f(v, x):
            return module.apply(v, x, use_running_average=False, mutable=["batch_stats"])

        return jax.shard_map(f, mesh=mesh, in_specs=(P(), P("batch")), out_specs=(P("batch"), P()))

    @jax.jit
    def run(v, x):
        return (
            step(jil.BatchNorm(axis_name="batch"))(v, x),
            step(nn.BatchNorm(axis_name="batch", use_fast_variance=False))(v, x),
            single.apply(v, x, use_running_average=False, mutable=["batch_stats"]),
        )

    (y, upd), (y_ref, upd_ref), (y_one, upd_one) = jax.device_get(run(v, X))
    # Each of the three orders the sums over the rows its own way.
    tol = 2 * sum_tol(N_E)
    np.testing.assert_allclose(y, y_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(y, y_one, rtol=tol, atol=tol)
    chex.assert_trees_all_close(upd, upd_ref, rtol=tol)
    chex.assert_trees_all_close(upd, upd_one, rtol=tol)
