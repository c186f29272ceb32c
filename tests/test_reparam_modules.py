"""jaxinit.linen / jaxinit.nnx WeightNorm and SpectralNorm: flax's regressions, and parity.

The regressions, as tests of jaxinit's modules: flax's nnx wrappers overwrite the wrapped
layer's parameters on every call (google/flax#5576); nnx WeightNorm's scales get no gradient
(#5577); linen WeightNorm's ones-initialized scale changes the wrapped layer's initialization
(#4138), and linen's wrappers store the normalized kernel at init.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from helpers_norm import draws, f64, sum_tol

import jaxinit as ji
import jaxinit.linen as jil
import jaxinit.nnx as jnnx

X = draws(0, (4, 6))


class _Parent(nn.Module):
    """One Dense, wrapped (``wrap``: "weight", "spectral") or not."""

    wrap: str = ""

    @nn.compact
    def __call__(self, x, train=False):
        fc = nn.Dense(5, name="fc")
        if self.wrap == "weight":
            return jil.WeightNorm(fc)(x)
        if self.wrap == "spectral":
            return jil.SpectralNorm(fc)(x, update_stats=train)
        return fc(x)


@jax.jit
def _linen_run(x):
    key = jax.random.key(0)
    plain = _Parent().init(key, x)
    wn = _Parent("weight").init(key, x)
    sn = _Parent("spectral").init(key, x)
    y_sn, upd = _Parent("spectral").apply(sn, x, train=True, mutable=["batch_stats"])
    return {
        "plain": plain,
        "wn": wn,
        "sn": sn,
        "y_plain": _Parent().apply(plain, x),
        "y_wn": _Parent("weight").apply(wn, x),
        "y_sn_eval": _Parent("spectral").apply(sn, x),
        "y_sn_train": y_sn,
        "sn_updated": upd,
    }


def test_linen_wrappers_store_the_raw_kernel_and_start_where_the_layer_does():
    r = jax.device_get(_linen_run(jax.device_put(X)))
    kernel = r["plain"]["params"]["fc"]["kernel"]
    # The wrapped layer's stored parameters are the raw ones (same key, same path).
    np.testing.assert_array_equal(r["wn"]["params"]["fc"]["kernel"], kernel)
    np.testing.assert_array_equal(r["sn"]["params"]["fc"]["kernel"], kernel)
    # WeightNorm's scale is the kernel's column norms: the output at init is the layer's.
    scale = r["wn"]["params"]["WeightNorm_0"]["fc/kernel/scale"]
    np.testing.assert_allclose(scale, np.linalg.norm(f64(kernel), axis=0), rtol=4 * sum_tol(6))
    np.testing.assert_allclose(r["y_wn"], r["y_plain"], rtol=1e-5, atol=1e-6)
    # SpectralNorm: u and sigma in batch_stats under flax's names; u a unit vector after warm-up.
    stats = r["sn"]["batch_stats"]["SpectralNorm_0"]
    assert set(stats) == {"fc/kernel/u", "fc/kernel/sigma"}
    assert stats["fc/kernel/u"].shape == (1, 5)
    np.testing.assert_allclose(np.linalg.norm(stats["fc/kernel/u"]), 1.0, rtol=1e-6)
    top = np.linalg.svd(f64(kernel), compute_uv=False)[0]
    np.testing.assert_allclose(stats["fc/kernel/sigma"], top, rtol=1e-2)  # 15 iterations
    # Eval divides by ||W u|| of the stored u; training iterates once and stores u, sigma.
    u = f64(stats["fc/kernel/u"])
    bias = f64(r["sn"]["params"]["fc"]["bias"])
    want_eval = f64(X) @ (f64(kernel) / np.linalg.norm(f64(kernel) @ u.T)) + bias
    np.testing.assert_allclose(r["y_sn_eval"], want_eval, rtol=1e-5, atol=1e-5)
    new = r["sn_updated"]["batch_stats"]["SpectralNorm_0"]
    assert not np.array_equal(new["fc/kernel/u"], stats["fc/kernel/u"])


def test_linen_weight_norm_with_ones_matches_flax():
    # flax's start (scale_init=ones), from flax's own variables: the same outputs.
    x = jax.device_put(X)
    ones = nn.initializers.ones

    class Flax(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.WeightNorm(nn.Dense(5, name="fc"))(x)

    class Ours(nn.Module):
        @nn.compact
        def __call__(self, x):
            return jil.WeightNorm(nn.Dense(5, name="fc"), scale_init=ones)(x)

    v = Flax().init(jax.random.key(0), x)
    assert jax.tree.structure(Ours().init(jax.random.key(0), x)) == jax.tree.structure(v)
    np.testing.assert_allclose(Ours().apply(v, x), Flax().apply(v, x), rtol=1e-6, atol=1e-6)


def test_linen_spectral_norm_training_step_matches_flax():
    # From the same u, one training-mode power iteration: flax's output and new u.
    x = jax.device_put(X)

    class Flax(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.SpectralNorm(nn.Dense(5, name="fc"))(x, update_stats=True)

    class Ours(nn.Module):
        @nn.compact
        def __call__(self, x):
            return jil.SpectralNorm(nn.Dense(5, name="fc"))(x, update_stats=True)

    v = Ours().init(jax.random.key(0), x)
    y_f, upd_f = Flax().apply(v, x, mutable=["batch_stats"])
    y_o, upd_o = Ours().apply(v, x, mutable=["batch_stats"])
    np.testing.assert_allclose(y_o, y_f, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(upd_o), jax.tree.leaves(upd_f), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_nnx_wrappers_never_write_the_layer_and_scales_get_gradients():
    layer = nnx.Linear(6, 5, rngs=nnx.Rngs(0))
    kernel = np.asarray(layer.kernel[...])
    x = jax.device_put(X)
    y0 = layer(x)
    wn = jnnx.WeightNorm(layer, rngs=nnx.Rngs(1))
    sn = jnnx.SpectralNorm(nnx.Linear(6, 5, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(2))
    for _ in range(2):
        y_wn = wn(x)
        sn(x)  # training: updates u and sigma only
    sn.eval()
    y_eval = sn(x)
    np.testing.assert_array_equal(layer.kernel[...], kernel)  # google/flax#5576
    np.testing.assert_array_equal(sn.layer_instance.kernel[...], kernel)
    np.testing.assert_allclose(y_wn, y0, rtol=1e-5, atol=1e-6)  # google/flax#4138
    u = f64(sn.batch_stats[("kernel", "u")][...])
    want = f64(X) @ (f64(kernel) / np.linalg.norm(f64(kernel) @ u.T)) + f64(layer.bias[...])
    np.testing.assert_allclose(y_eval, want, rtol=1e-5, atol=1e-5)

    # google/flax#5577: the scales are nnx.Param and receive gradients.
    assert isinstance(wn.scales[("kernel",)], nnx.Param)
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(wn)
    g_scale = grads["scales"][("kernel",)][...]
    assert g_scale.shape == (5,) and np.abs(np.asarray(g_scale)).max() > 0
    g_kernel = np.asarray(grads["layer_instance"]["kernel"][...])
    # The gradient with respect to v is orthogonal to v per output unit.
    dots = (f64(g_kernel) * f64(kernel)).sum(axis=0)
    assert np.all(np.abs(dots) <= 1e-5 * np.abs(f64(g_kernel) * f64(kernel)).sum(axis=0) + 1e-7)


def test_nnx_spectral_norm_normalizes_the_top_singular_value():
    sn = jnnx.SpectralNorm(nnx.Linear(16, 8, rngs=nnx.Rngs(0)), n_steps=50, rngs=nnx.Rngs(1))
    sn(jnp.ones((1, 16)))
    w = np.asarray(sn.layer_instance.kernel[...])
    sigma = float(sn.batch_stats[("kernel", "sigma")][...])
    np.testing.assert_allclose(sigma, np.linalg.svd(f64(w), compute_uv=False)[0], rtol=1e-4)
    state = ji.SpectralNormState(
        sn.batch_stats[("kernel", "u")][...], sn.batch_stats[("kernel", "sigma")][...]
    )
    normalized, _ = ji.spectral_norm(w, state, training=False)
    np.testing.assert_allclose(np.linalg.svd(f64(normalized), compute_uv=False)[0], 1.0, rtol=1e-4)


def test_linen_wrapped_batch_norm_still_updates_its_statistics():
    # Only the parameters are mapped: a batch norm inside the wrapped layer keeps the caller's
    # mutable batch_stats (as in flax's SpectralNorm).
    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            seq = nn.Sequential([nn.Dense(4), nn.BatchNorm(use_running_average=False)])
            return jil.SpectralNorm(seq)(x, update_stats=True)

    x = jax.device_put(draws(5, (10, 5), loc=2.0))
    v = M().init(jax.random.key(1), x)
    _, upd = jax.jit(lambda v, x: M().apply(v, x, mutable=["batch_stats"]))(v, x)
    old = v["batch_stats"]["BatchNorm_0"]["mean"]
    new = upd["batch_stats"]["BatchNorm_0"]["mean"]
    assert np.abs(np.asarray(new) - np.asarray(old)).max() > 1e-3
    np.testing.assert_array_equal(upd["params"] if "params" in upd else v["params"], v["params"])
