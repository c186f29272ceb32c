"""scaled and the depth-aware presets against their published formulas."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers_init import KEY, KURTOSIS, auto_mesh, check_variance
from jax.nn import initializers as jinit
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxinit as ji

SHAPE = (16, 8)

# ----------------------------------------------------------------------------- scaled


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_scaled_is_factor_times_the_draw(dtype):
    with jax.enable_x64(dtype == jnp.float64):
        base = ji.normal(1.0)
        w = ji.scaled(base, -0.37)(KEY, SHAPE, dtype)
        want = -0.37 * base(KEY, SHAPE, dtype)
        assert w.dtype == dtype
        np.testing.assert_array_equal(w, want)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.complex64])
def test_scaled_keeps_the_dtype_and_rounds_once(dtype):
    base = ji.normal(1.0)
    w = ji.scaled(base, 0.3)(KEY, SHAPE, dtype)
    assert w.dtype == dtype
    raw = np.asarray(base(KEY, SHAPE, dtype))
    if dtype == jnp.complex64:
        want = raw * np.complex64(0.3)
    else:  # the float32 product, rounded once to the 16-bit dtype
        want = (raw.astype(np.float32) * np.float32(0.3)).astype(dtype)
    np.testing.assert_array_equal(np.asarray(w), want)


def test_scaled_keeps_the_default_dtype_of_the_init():
    init = ji.scaled(ji.normal(1.0, dtype=jnp.bfloat16), 2.0)
    assert init(KEY, SHAPE).dtype == jnp.bfloat16
    assert init(KEY, SHAPE, jnp.float32).dtype == jnp.float32


def test_scaled_under_jit():
    init = ji.scaled(ji.normal(1.0), 0.5)
    w = jax.jit(lambda k: init(k, SHAPE))(KEY)
    np.testing.assert_allclose(w, init(KEY, SHAPE), rtol=1e-6)


def test_scaled_keeps_the_sharding():
    init = ji.scaled(ji.normal(1.0), 0.5)
    sharding = NamedSharding(auto_mesh(), P("a"))
    full = NamedSharding(auto_mesh(), P("a", None))
    w = init(KEY, SHAPE, out_sharding=sharding)
    assert w.sharding == full
    np.testing.assert_array_equal(w, init(KEY, SHAPE))
    w_jit = jax.jit(lambda k: init(k, SHAPE, out_sharding=sharding))(KEY)
    # An Auto-mesh jit's output sharding is the outer jit's to canonicalise.
    assert w_jit.sharding.is_equivalent_to(full, 2)
    # An init that ignores out_sharding still comes back laid out on it.
    ignores = ji.scaled(lambda key, shape, dtype=None, out_sharding=None: jnp.ones(shape), 2.0)
    assert ignores(KEY, SHAPE, out_sharding=sharding).sharding == full


def test_scaled_wraps_jax_and_plain_initializers():
    w = ji.scaled(jinit.lecun_normal(), 0.5)(KEY, SHAPE)
    np.testing.assert_array_equal(w, 0.5 * jinit.lecun_normal()(KEY, SHAPE))

    def no_sharding_arg(key, shape, dtype=jnp.float32):
        return jnp.ones(shape, dtype)

    np.testing.assert_array_equal(ji.scaled(no_sharding_arg, 3.0)(KEY, (2,)), [3.0, 3.0])
    assert ji.scaled(ji.zeros, np.float32(4.0))(KEY, (2,)).dtype == jnp.float32


@pytest.mark.parametrize(
    ("init", "factor", "error", "match"),
    [
        ("normal", 1.0, TypeError, "scaled: init must be an initializer"),
        (ji.zeros, jnp.float32, TypeError, "factor=.*is a dtype"),
        (ji.zeros, "0.5", ValueError, "factor must be a real number, got '0.5'"),
        (ji.zeros, "half", TypeError, "factor='half' is a dtype"),
        (ji.zeros, "abc", ValueError, "factor must be a real number, got 'abc'"),
        (ji.zeros, 1j, ValueError, "factor must be a real number"),
        (ji.zeros, math.inf, ValueError, "factor must be a finite real number, got inf"),
        (ji.zeros, math.nan, ValueError, "factor must be a finite real number, got nan"),
    ],
)
def test_scaled_errors(init, factor, error, match):
    with pytest.raises(error, match=match):
        ji.scaled(init, factor)


def test_scaled_rejects_an_integer_result():
    init = ji.scaled(lambda key, shape, dtype=None: jnp.ones(shape, jnp.int32), 2.0)
    with pytest.raises(TypeError, match="dtype int32; expected float or complex"):
        init(KEY, (2,))


# ----------------------------------------------------------------------------- presets


@pytest.mark.parametrize("n", [1, 12, 48, np.int64(24)])
def test_gpt2_residual_scale(n):
    assert math.isclose(ji.gpt2_residual_scale(n), 1 / math.sqrt(2 * int(n)), rel_tol=1e-15)


def _fourth_root(x):
    return float(np.float64(x) ** 0.25)


@pytest.mark.parametrize(("n", "m"), [(0, 32), (18, 0), (6, 6), (100, 200)])
def test_deepnet_scales_against_the_paper(n, m):
    s = ji.deepnet_scales(num_encoder_layers=n, num_decoder_layers=m)
    if n and m:
        depth = np.float64(n) ** 4 * m
        want = (
            0.81 * depth ** (1 / 16),
            0.87 * depth ** (-1 / 16),
            _fourth_root(3 * m),
            1 / _fourth_root(12 * m),
        )
    elif m:
        want = (None, None, _fourth_root(2 * m), 1 / _fourth_root(8 * m))
    else:
        want = (_fourth_root(2 * n), 1 / _fourth_root(8 * n), None, None)
    got = dataclasses.astuple(s)
    for field, g, w in zip(dataclasses.fields(s), got, want, strict=True):
        if w is None:
            assert g is None, field.name
        else:
            assert math.isclose(g, w, rel_tol=1e-14), (field.name, g, w)


def test_deepnet_scales_paper_values_and_frozen():
    # Decoder-only, M = 32: alpha = 64^(1/4), beta = 256^(-1/4) = 1/4.
    s = ji.deepnet_scales(num_decoder_layers=32)
    assert math.isclose(s.decoder_alpha, 2 * math.sqrt(2)) and s.decoder_beta == 0.25
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.decoder_beta = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        ji.deepnet_scales(6, 6)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, ValueError, "both 0"),
        ({"num_encoder_layers": -1, "num_decoder_layers": 6}, ValueError, "num_encoder_layers"),
        ({"num_decoder_layers": -2}, ValueError, "num_decoder_layers must be an int >= 0"),
        ({"num_decoder_layers": 6.0}, TypeError, "num_decoder_layers must be an int, got 6.0"),
        ({"num_encoder_layers": True}, TypeError, "num_encoder_layers must be an int, got True"),
    ],
)
def test_deepnet_scales_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        ji.deepnet_scales(**kwargs)


@pytest.mark.parametrize(("num_branches", "m"), [(1, 2), (16, 2), (8, 3), (54, 3), (100, 5)])
def test_fixup_scale(num_branches, m):
    want = float(np.float64(num_branches) ** (-1 / (2 * m - 2)))
    assert math.isclose(ji.fixup_scale(num_branches, m), want, rel_tol=1e-15)


@pytest.mark.parametrize(
    ("fn", "args", "error", "match"),
    [
        (ji.fixup_scale, (16, 1), ValueError, "branch_depth must be an int >= 2.*infinite"),
        (ji.fixup_scale, (16, 0), ValueError, "branch_depth must be an int >= 2"),
        (ji.fixup_scale, (0, 2), ValueError, "num_branches must be an int >= 1, got 0"),
        (ji.fixup_scale, (16, True), TypeError, "branch_depth must be an int"),
        (ji.fixup_scale, (16.0, 2), TypeError, "num_branches must be an int"),
        (ji.gpt2_residual_scale, (0,), ValueError, "num_layers must be an int >= 1, got 0"),
        (ji.gpt2_residual_scale, (-3,), ValueError, "num_layers must be an int >= 1"),
        (ji.gpt2_residual_scale, (True,), TypeError, "num_layers must be an int, got True"),
        (ji.gpt2_residual_scale, (12.0,), TypeError, "num_layers must be an int"),
        (ji.gpt2_residual_scale, ("12",), TypeError, "num_layers must be an int"),
        (ji.small_init, (0,), ValueError, "small_init: dim must be an int >= 1"),
        (ji.small_init, (True,), TypeError, "small_init: dim must be an int"),
        (ji.small_init, (64, jnp.int32), TypeError, "small_init: dtype=int32 is not a floating"),
        (ji.wang_init, (64, 0), ValueError, "wang_init: num_layers must be an int >= 1"),
        (ji.wang_init, (-1, 4), ValueError, "wang_init: dim must be an int >= 1"),
        (ji.wang_init, (64, 4, "f32"), TypeError, "wang_init: dtype='f32' is not a dtype"),
    ],
)
def test_preset_errors(fn, args, error, match):
    with pytest.raises(error, match=match):
        fn(*args)


# ----------------------------------------------------------------------------- small and wang


@pytest.mark.parametrize(
    ("name", "init", "std"),
    [
        ("small_init", ji.small_init(512), math.sqrt(2 / (5 * 512))),
        ("wang_init", ji.wang_init(512, 24), 2 / (24 * math.sqrt(512))),
    ],
)
def test_small_and_wang_init_std(name, init, std):
    w = init(KEY, (256, 256))
    assert w.dtype == jnp.float32, name
    # 6 standard errors of the sample variance (and of the mean) of 65536 normal draws.
    check_variance(w, std**2, KURTOSIS["normal"], sigmas=6.0)


def test_small_and_wang_init_dtype():
    assert ji.small_init(64, jnp.bfloat16)(KEY, SHAPE).dtype == jnp.bfloat16
    assert ji.wang_init(64, 4, dtype=jnp.float16)(KEY, SHAPE).dtype == jnp.float16
    assert ji.wang_init(64, 4)(KEY, SHAPE, jnp.bfloat16).dtype == jnp.bfloat16
