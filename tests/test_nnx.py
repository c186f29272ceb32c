"""jaxinit.nnx.BatchNorm against flax.nnx.BatchNorm: variables, train and eval, switching."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers_norm import (
    BF16_EPS,
    BF16_ULP,
    EAGER_SHAPE,
    F32_EPS,
    assert_close_to_scale,
    f64,
    normal,
    row_mask,
    sum_tol,
)

import jaxinit.nnx as jnnx

X = normal(0, EAGER_SHAPE, loc=3.0, scale=2.0)  # the input of the eager tests
N_E, F = EAGER_SHAPE


def call(module, *args, **kwargs):
    # flax's own layer mixes bf16 inputs with f32 statistics implicitly.
    with jax.numpy_dtype_promotion("standard"):
        return module(*args, **kwargs)


def pair(num_features, **kwargs):
    """Our layer and flax's with the same options."""
    kwargs = {"use_fast_variance": False, **kwargs}
    return (
        jnnx.BatchNorm(num_features, **kwargs, rngs=nnx.Rngs(0)),
        nnx.BatchNorm(num_features, **kwargs, rngs=nnx.Rngs(0)),
    )


def randomize(*models, seed=5):
    """The same random scale and bias (so that they matter) and running statistics away from
    their initial values (so that the update's old term matters) in every model."""
    rng = np.random.default_rng(seed)
    (f,) = models[0].mean.shape
    values = {
        "scale": 1.0 + 0.3 * rng.standard_normal(f),
        "bias": 0.5 * rng.standard_normal(f),
        "mean": 0.5 * rng.standard_normal(f),
        "var": 1.0 + 0.2 * rng.standard_normal(f),
    }
    for m in models:
        for name, value in values.items():
            var = getattr(m, name)
            if var is not None:
                var[...] = jax.device_put(value.astype(var[...].dtype))


def step_and_eval(model, x, mask):
    """A train step, then eval; each output with the statistics after it."""
    y = call(model, x, mask=mask)
    stats = nnx.clone(nnx.state(model, nnx.BatchStat))
    y_eval = call(model, x, use_running_average=True)
    return (y, stats), (y_eval, nnx.clone(nnx.state(model, nnx.BatchStat)))


def bf16_eval_bound(x, stats, model):
    """Elementwise bound on |ours - flax| in eval mode with ``dtype=bfloat16``.

    Both round x, the statistics and the params to bfloat16 (flax's promote_dtype). flax then
    computes in bfloat16: x - mean, var + eps, rsqrt, * scale, * that, + bias, six roundings of
    up to BF16_EPS each, five on t = (x - mean) * rsqrt(var + eps) * scale and one on y = t + bias.
    Ours computes in float32 and rounds y once.
    """

    def bf16(a):
        return f64(np.asarray(a, np.float32).astype(jnp.bfloat16))

    t = (bf16(x) - bf16(stats["mean"][...])) / np.sqrt(bf16(stats["var"][...]) + 1e-5)
    t = t * bf16(model.scale[...])
    y = t + bf16(model.bias[...])
    return BF16_EPS * (5 * np.abs(t) + 2 * np.abs(y))


# (input shape, input dtype, kwargs, masked)
CASES = [
    pytest.param((32, 6), jnp.float32, {}, False, id="dense"),
    pytest.param((4, 5, 5, 3), jnp.float32, {"momentum": 0.7, "epsilon": 1e-3}, False, id="nhwc"),
    pytest.param((4, 3, 5, 5), jnp.float32, {"axis": 1}, False, id="nchw_axis1"),
    pytest.param(
        (16, 6), jnp.float32, {"use_scale": False, "use_bias": False}, False, id="no_scale_no_bias"
    ),
    pytest.param((16, 6), jnp.float32, {}, True, id="masked"),
    pytest.param((16, 6), jnp.bfloat16, {}, False, id="bf16_in_f32_out"),
    pytest.param((16, 6), jnp.float32, {"dtype": jnp.bfloat16}, False, id="f32_in_bf16_out"),
]


@pytest.mark.parametrize("shape, dtype, kwargs, masked", CASES)
def test_train_and_eval_match_flax(shape, dtype, kwargs, masked):
    axis = kwargs.get("axis", -1)
    ours, ref = pair(shape[axis], **kwargs)
    chex.assert_trees_all_equal(nnx.state(ours), nnx.state(ref))
    assert jax.tree.structure(nnx.state(ours)) == jax.tree.structure(nnx.state(ref))
    randomize(ours, ref)
    x = normal(0, shape, loc=3.0, scale=2.0, dtype=dtype)
    mask = row_mask(shape[0]) if masked else None
    stats0 = nnx.clone(nnx.state(ours, nnx.BatchStat))

    run = nnx.jit(lambda a, b, x: (step_and_eval(a, x, mask), step_and_eval(b, x, mask)))
    ((y, stats), (y_eval, stats_eval)), ((y_ref, stats_ref), (y_eval_ref, _)) = run(ours, ref, x)

    n = int(np.prod(shape)) // shape[axis]  # the reduction size
    if masked:
        n = int(row_mask(shape[0]).sum()) * n // shape[0]
    # Both compute in float32, each within sum_tol(n); a bfloat16 output then rounds values that
    # close to the same or to adjacent bfloat16 numbers, BF16_ULP apart.
    tol = 2 * sum_tol(n)
    out_dtype = jnp.dtype(kwargs.get("dtype") or jnp.float32)
    assert y.dtype == y_ref.dtype == y_eval.dtype == y_eval_ref.dtype == out_dtype
    rtol = BF16_ULP if out_dtype == jnp.bfloat16 else tol
    np.testing.assert_allclose(f64(y), f64(y_ref), rtol=rtol, atol=tol)
    chex.assert_trees_all_close(stats, stats_ref, rtol=tol)
    assert not np.allclose(stats["mean"][...], stats0["mean"][...])  # they moved
    # Eval normalises with the statistics of the step and leaves them alone.
    chex.assert_trees_all_equal(stats_eval, stats)
    if out_dtype == jnp.bfloat16:
        bound = bf16_eval_bound(x, stats_eval, ours) + tol
        assert np.all(np.abs(f64(y_eval) - f64(y_eval_ref)) <= bound)
    else:
        np.testing.assert_allclose(f64(y_eval), f64(y_eval_ref), rtol=rtol, atol=tol)
    # The modules themselves hold the final statistics.
    chex.assert_trees_all_equal(nnx.state(ours, nnx.BatchStat), stats_eval)


def test_init_matches_flax():
    # Custom initializers draw the same values from the same rng as flax's.
    inits = dict(scale_init=nnx.initializers.normal(1.0), bias_init=nnx.initializers.normal(1.0))
    ours, ref = pair(F, **inits)
    chex.assert_trees_all_equal(nnx.state(ours), nnx.state(ref))
    assert not np.allclose(ours.scale[...], 1.0)  # not the default ones


def test_eager_matches_jit():
    a, _ = pair(F)
    b, _ = pair(F)
    randomize(a, b)
    y_eager = a(X)
    y_jit = nnx.jit(lambda m, x: m(x))(b, X)
    # The same float32 arithmetic; XLA may fuse and order the sums over the rows differently.
    tol = 2 * sum_tol(N_E)
    np.testing.assert_allclose(y_eager, y_jit, rtol=tol, atol=tol)
    chex.assert_trees_all_close(nnx.state(a), nnx.state(b), rtol=tol)


def test_gradients_match_flax():
    ours, ref = pair(5)
    randomize(ours, ref)
    x = normal(1, (32, 5), loc=3.0, scale=2.0)

    def loss(model, x):
        return jnp.sum(jnp.sin(model(x)) * jnp.arange(5.0))

    grad = nnx.grad(loss, argnums=(0, 1))
    (g, gx), (g_ref, gx_ref) = nnx.jit(lambda a, b, x: (grad(a, x), grad(b, x)))(ours, ref, x)
    # Each side errs by the statistics' sum_tol(32) plus two more 32-term sums (dy, dy * xhat).
    tol = 6 * sum_tol(32)
    for name in ("scale", "bias"):
        assert_close_to_scale(getattr(g, name)[...], getattr(g_ref, name)[...], tol)
    assert_close_to_scale(gx, gx_ref, tol)


class Block(nnx.Module):
    def __init__(self, bn_cls, rngs):
        self.linear = nnx.Linear(F, F, rngs=rngs)
        self.bn = bn_cls(F, momentum=0.5, rngs=rngs)

    def __call__(self, x):
        return self.bn(self.linear(x))


def test_train_eval_and_view():
    model = Block(jnnx.BatchNorm, nnx.Rngs(0))
    assert not model.bn.use_running_average
    y_train = model(X)
    h = f64(model.linear(X))
    # Train mode normalises with the batch statistics: zero mean per feature (bias 0 at init).
    np.testing.assert_allclose(f64(y_train).mean(0), np.zeros(F), atol=2 * sum_tol(N_E))
    np.testing.assert_allclose(model.bn.mean[...], 0.5 * h.mean(0), rtol=sum_tol(N_E))
    model.eval()
    assert model.bn.use_running_average
    stats = nnx.clone(nnx.state(model, nnx.BatchStat))
    y_eval = model(X)
    chex.assert_trees_all_equal(nnx.state(model, nnx.BatchStat), stats)
    # Eval normalises with the running statistics (no reductions: a few roundings).
    mean, var = f64(model.bn.mean[...]), f64(model.bn.var[...])
    ref = (h - mean) / np.sqrt(var + 1e-5) * f64(model.bn.scale[...]) + f64(model.bn.bias[...])
    np.testing.assert_allclose(y_eval, ref, rtol=8 * F32_EPS, atol=8 * F32_EPS)
    # A call-time flag wins over the attribute, as in flax.
    model.bn(jax.device_put(h.astype(np.float32)), use_running_average=False)
    assert not np.array_equal(model.bn.mean[...], stats["bn"]["mean"][...])
    model.train()
    assert not model.bn.use_running_average
    view = nnx.view(model, use_running_average=True)
    assert view.bn.use_running_average
    assert not model.bn.use_running_average


def test_flax_state_loads_unchanged():
    flax_model = Block(nnx.BatchNorm, nnx.Rngs(0))
    for i in range(3):
        flax_model(X * (i + 1))
    ours = Block(jnnx.BatchNorm, nnx.Rngs(1))
    # Before the update the kernel (other rngs) and the statistics (no training) differ.
    assert not np.array_equal(ours.linear.kernel[...], flax_model.linear.kernel[...])
    assert not np.array_equal(ours.bn.mean[...], flax_model.bn.mean[...])
    nnx.update(ours, nnx.state(flax_model))
    chex.assert_trees_all_equal(nnx.state(ours), nnx.state(flax_model))
    flax_model.eval()
    ours.eval()
    # Eval on the same variables: the two formulas round differently, by a few float32 units.
    np.testing.assert_allclose(ours(X), flax_model(X), rtol=8 * F32_EPS, atol=8 * F32_EPS)


def test_missing_mode():
    bn = jnnx.BatchNorm(F, use_running_average=None, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="use_running_average"):
        bn(X)
    # With the initial statistics eval is x / sqrt(1 + eps): a rsqrt and two multiplies.
    y = bn(X, use_running_average=True)
    np.testing.assert_allclose(y, f64(X) / np.sqrt(1 + 1e-5), rtol=4 * F32_EPS)


def test_debias_count():
    bn = jnnx.BatchNorm(F, momentum=0.9, debias=True, rngs=nnx.Rngs(0))
    assert sorted(nnx.state(bn, nnx.BatchStat)) == ["count", "mean", "var"]
    bn(X)
    # The first debiased update takes the batch statistics whole.
    np.testing.assert_allclose(bn.mean[...], f64(X).mean(0), rtol=sum_tol(N_E))
    assert int(bn.count[...]) == 1


def test_bad_input():
    with pytest.raises(ValueError, match="num_features"):
        jnnx.BatchNorm(-1, rngs=nnx.Rngs(0))
    bn = jnnx.BatchNorm(F + 1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="feature shape"):
        bn(X)
    with pytest.raises(ValueError, match="axis"):
        jnnx.BatchNorm(F, axis=2, rngs=nnx.Rngs(0))(X)
