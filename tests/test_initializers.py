"""Initializers: shapes and dtypes (eager and jit), parity with jax, statistics, bad input.

Draws are batched: one jitted call per dtype computes the whole shape/dtype table and every
jax-parity pair, and the tests read from that cached result.
"""

import functools
import itertools
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers_init import KEY, KURTOSIS, TRUNC2_STD, check_variance, rel_se_of_variance
from jax.nn import initializers as jinit
from scipy import stats

import jaxinit as ji

FAN_INITS = {
    "variance_scaling": lambda **kw: ji.variance_scaling(0.5, "fan_avg", "truncated_normal", **kw),
    "he_normal": ji.he_normal,
    "he_uniform": ji.he_uniform,
    "glorot_normal": ji.glorot_normal,
    "glorot_uniform": ji.glorot_uniform,
    "lecun_normal": ji.lecun_normal,
    "lecun_uniform": ji.lecun_uniform,
    "kaiming_normal": ji.kaiming_normal,
    "kaiming_uniform": lambda **kw: ji.kaiming_uniform(a=math.sqrt(5), **kw),
    "xavier_normal": ji.xavier_normal,
    "xavier_uniform": ji.xavier_uniform,
}
OTHER_INITS = {
    "normal": lambda: ji.normal(0.1),
    "uniform": lambda: ji.uniform(0.1),
    "truncated_normal": lambda: ji.truncated_normal(0.1),
    "orthogonal": ji.orthogonal,
    "identity": ji.identity,
    "constant": lambda: ji.constant(0.25),
    "zeros": lambda: ji.zeros,
    "ones": lambda: ji.ones,
    "sparse": lambda: ji.sparse(0.5, 0.1),
    "delta_orthogonal": ji.delta_orthogonal,
}
# Initializers defined only for some layouts: sparse for matrices, delta_orthogonal for convs.
ONLY_SHAPES = {"sparse": ("dense",), "delta_orthogonal": ("conv",)}
REAL_ONLY = {"uniform", "truncated_normal", "sparse"}
DETERMINISTIC = {"zeros", "identity", "constant", "ones"}
SHAPES = {"dense": (48, 32), "conv": (3, 3, 8, 16), "batched": (4, 24, 40)}
DTYPES = {
    "f32": jnp.float32,
    "bf16": jnp.bfloat16,
    "f16": jnp.float16,
    "f64": jnp.float64,
    "c64": jnp.complex64,
}
SIXTEEN_BIT = {"bf16", "f16"}


# One initializer per code path: the variance-scaling family shares one sampler per
# distribution (he/glorot/lecun/kaiming/xavier differ only in scale, mode and fans).
REPRESENTATIVES = ("variance_scaling", "he_uniform", "kaiming_normal", *OTHER_INITS)


def _table(dtype_name, shape_names, names):
    """(name, shape_name, init) for every initializer x shape meaningful for the dtype."""
    for name in names:
        if dtype_name == "c64" and name in REAL_ONLY:
            continue
        for shape_name in ONLY_SHAPES.get(name, shape_names):
            if name in FAN_INITS:
                init = FAN_INITS[name](**({"batch_axis": 0} if shape_name == "batched" else {}))
            else:
                init = OTHER_INITS[name]()
            yield name, shape_name, init


JAX_NAMED = ["he_normal", "he_uniform", "glorot_normal", "glorot_uniform", "lecun_normal"]
JAX_NAMED += ["lecun_uniform"]


def _parity_pairs(dtype_name):
    """(label, ours, jax's, shape) for every initializer that has a jax namesake.

    16-bit draws are jax's bits only with ``draw_dtype`` set to the output dtype.
    """
    kw = {"draw_dtype": DTYPES[dtype_name]} if dtype_name in SIXTEEN_BIT else {}
    for name in JAX_NAMED:
        yield f"{name} conv", getattr(ji, name)(**kw), getattr(jinit, name)(), SHAPES["conv"]
    axes = {"in_axis": 1, "out_axis": 2, "batch_axis": 0}  # SHAPES["batched"]
    modes = ("fan_in", "fan_out", "fan_avg", "fan_geo_avg")
    for mode, dist in itertools.product(modes, ("normal", "truncated_normal", "uniform")):
        ours = ji.variance_scaling(1.7, mode, dist, **axes, **kw)
        theirs = jinit.variance_scaling(1.7, mode, dist, **axes)
        yield f"variance_scaling {mode} {dist}", ours, theirs, SHAPES["batched"]
    plain = [
        ("normal", ji.normal(0.3, **kw), jinit.normal(0.3)),
        ("uniform", ji.uniform(0.3, **kw), jinit.uniform(0.3)),
        (
            "truncated_normal",
            ji.truncated_normal(0.3, lower=-1.5, upper=2.5, correct_stddev=False, **kw),
            jinit.truncated_normal(0.3, lower=-1.5, upper=2.5),
        ),
        ("constant", ji.constant(0.7), jinit.constant(0.7)),
    ]
    if dtype_name not in SIXTEEN_BIT:  # jax's QR has no 16-bit kernel
        plain += [
            ("orthogonal", ji.orthogonal(1.3), jinit.orthogonal(1.3)),
            ("orthogonal col 0", ji.orthogonal(column_axis=0), jinit.orthogonal(column_axis=0)),
            ("delta_orthogonal", ji.delta_orthogonal(), jinit.delta_orthogonal()),
        ]
    for label, ours, theirs in plain:
        yield label, ours, theirs, SHAPES["conv"]


@functools.cache
def _drawn(dtype_name, transform):
    """Every table entry and parity pair for a dtype, drawn in one call (jitted or eager).

    The float32 jitted table covers every initializer on the conv shape and one per code path
    on the other shapes; the other tables cover one initializer per code path on one shape (each new shape and each sampler is a compile of its
    own): fans, shape checks and the variance-scaling arithmetic do not depend on the dtype, and
    the eager path differs from the jitted one only in how results are placed.
    """
    table = list(_table(dtype_name, ("conv",), REPRESENTATIVES))
    everything = dtype_name == "f32" and transform == "jit"
    if everything:  # every initializer on the conv shape, one per code path on the others
        table = list(_table(dtype_name, ("conv",), [*FAN_INITS, *OTHER_INITS]))
        table += [e for e in _table(dtype_name, ("dense", "batched"), REPRESENTATIVES)]
    pairs = list(_parity_pairs(dtype_name)) if dtype_name != "c64" else []
    if not everything:  # the named builders and one variance_scaling mode per distribution
        pairs = [p for p in pairs if p[3] == SHAPES["conv"] or "fan_in " in p[0]]
    dtype = DTYPES[dtype_name]

    def draw(key):
        ours = [init(key, SHAPES[s], dtype) for _, s, init in table]
        parity = [(a(key, shape, dtype), b(key, shape, dtype)) for _, a, b, shape in pairs]
        return ours, parity

    with jax.enable_x64(dtype_name == "f64"):
        ours, parity = jax.device_get((jax.jit(draw) if transform == "jit" else draw)(KEY))
    return table, ours, [p[0] for p in pairs], parity


# Eager differs from jit only in how results are placed, whatever the dtype: float32 covers it.
VARIANTS = [*((d, "jit") for d in DTYPES), ("f32", "eager")]


@pytest.mark.parametrize(("dtype_name", "transform"), VARIANTS)
def test_shape_dtype_finite(dtype_name, transform):
    table, outs, _, _ = _drawn(dtype_name, transform)
    dtype = DTYPES[dtype_name]
    for (name, shape_name, _), out in zip(table, outs, strict=True):
        where = f"{name} on {shape_name} {SHAPES[shape_name]} in {dtype_name} ({transform})"
        assert out.shape == SHAPES[shape_name], where
        assert out.dtype == dtype, where
        host = np.asarray(out, np.complex128 if dtype_name == "c64" else np.float64)
        assert np.isfinite(host).all(), where
        if name not in DETERMINISTIC:
            assert np.abs(host).std() > 0, where


def test_eager_values_equal_jitted_values():
    eager_table, eager, _, _ = _drawn("f32", "eager")
    jit_table, jitted, _, _ = _drawn("f32", "jit")
    by_entry = {(n, s): out for (n, s, _), out in zip(jit_table, jitted, strict=True)}
    for (name, shape_name, _), out in zip(eager_table, eager, strict=True):
        # jax's op-by-op normal * std can differ from the fused jit by an ulp or two (jax's own
        # initializers too); rtol 3e-7 is 2.5 float32 ulps.
        np.testing.assert_allclose(out, by_entry[name, shape_name], rtol=3e-7, err_msg=name)


@pytest.mark.parametrize(
    ("dtype_name", "transform"),
    [(d, "jit") for d in ("f32", "bf16", "f16", "f64")] + [("f32", "eager")],
)
def test_bit_identical_to_jax(dtype_name, transform):
    _, _, labels, parity = _drawn(dtype_name, transform)
    assert len(labels) >= 10
    for label, (ours, theirs) in zip(labels, parity, strict=True):
        assert ours.dtype == theirs.dtype == DTYPES[dtype_name], label
        np.testing.assert_array_equal(
            np.asarray(ours, np.float64), np.asarray(theirs, np.float64), err_msg=label
        )


# ----------------------------------------------------------------------------- dtype rules


def test_dtype_none_is_float32_even_with_x64():
    inits = [ji.he_normal(), ji.normal(), ji.orthogonal(), ji.zeros, ji.constant(1.0)]
    with jax.enable_x64(True):
        outs = jax.eval_shape(
            lambda k: [(i(k, (8, 8)), i(k, (8, 8), jnp.float64)) for i in inits], KEY
        )
    for default, wide in outs:
        assert default.dtype == jnp.float32 and wide.dtype == jnp.float64


def test_builder_dtype_is_default_and_call_dtype_wins():
    init = ji.he_normal(dtype=jnp.bfloat16)
    assert init(KEY, (8, 8)).dtype == jnp.bfloat16
    assert init(KEY, (8, 8), jnp.float16).dtype == jnp.float16


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.int8, jnp.bool_, jnp.uint8])
def test_integer_and_bool_dtypes_are_type_errors(dtype):
    for call in [
        lambda: ji.he_normal(dtype=dtype),
        lambda: ji.he_normal()(KEY, (4, 4), dtype),
        lambda: ji.orthogonal()(KEY, (4, 4), dtype),
        lambda: ji.zeros(KEY, (4, 4), dtype),
    ]:
        with pytest.raises(TypeError, match="not a floating"):
            call()


@pytest.mark.parametrize(
    "init",
    [
        ji.he_normal(),
        ji.kaiming_uniform(),
        ji.orthogonal(),
        ji.delta_orthogonal(),
        ji.normal(),
        ji.truncated_normal(),
        ji.sparse(0.5),
        ji.identity(),
    ],
)
def test_zero_size_shapes_return_empty(init):
    shape = (3, 3, 0, 4) if init.__qualname__.startswith("delta") else (0, 4)
    out = init(KEY, shape)
    assert out.shape == shape and out.dtype == jnp.float32


# ------------------------------------------------------------------ jax's argument order


def test_jax_positional_order():
    """jax's builders take the dtype second; so do jaxinit's namesakes."""
    shape = (64, 32)
    pairs = [
        (ji.uniform(0.1, jnp.float16), jinit.uniform(0.1, jnp.float16)),
        (ji.normal(0.1, jnp.float16), jinit.normal(0.1, jnp.float16)),
        (ji.constant(0.5, jnp.float16), jinit.constant(0.5, jnp.float16)),
        (
            ji.truncated_normal(0.1, jnp.float32, -1.0, 3.0, correct_stddev=False),
            jinit.truncated_normal(0.1, jnp.float32, -1.0, 3.0),
        ),
    ]
    for ours, theirs in pairs:
        a, b = ours(KEY, shape), theirs(KEY, shape)
        assert a.dtype == b.dtype
        if a.dtype == jnp.float32:
            np.testing.assert_array_equal(a, b)
    assert ji.truncated_normal(0.1, jnp.bfloat16)(KEY, shape).dtype == jnp.bfloat16


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: ji.normal(jnp.bfloat16), r"stddev=.*bfloat16.* is a dtype"),
        (lambda: ji.uniform(jnp.float16), r"scale=.* is a dtype"),
        (lambda: ji.constant(jnp.float32), r"value=.* is a dtype"),
        (lambda: ji.truncated_normal(0.05, -1.0, 3.0), r"pass lower= and upper= by keyword"),
        (lambda: ji.normal(0.1, draw_dtype=jnp.int32), r"draw_dtype=int32 is not a floating"),
        (lambda: ji.he_normal(draw_dtype=jnp.complex64), r"draw_dtype=complex64 is complex"),
    ],
)
def test_dtype_in_the_wrong_place_is_a_clear_type_error(build, match):
    with pytest.raises(TypeError, match=match):
        build()


# ----------------------------------------------------------------------------- 16-bit draws

N_16 = 1 << 20


@functools.cache
def _sixteen_bit_draws():
    def draw(key):
        out = {}
        for name, dt in (("bf16", jnp.bfloat16), ("f16", jnp.float16)):
            out[f"ours {name}"] = ji.normal(1.0)(key, (N_16,), dt)
            out[f"jax {name}"] = jinit.normal(1.0)(key, (N_16,), dt)
            out[f"jax bits {name}"] = ji.normal(1.0, draw_dtype=dt)(key, (N_16,), dt)
        out["he f32"] = ji.he_normal()(key, (512, 256))
        out["he bf16"] = ji.he_normal()(key, (512, 256), jnp.bfloat16)
        return out

    return jax.device_get(jax.jit(draw)(KEY))


@pytest.mark.same_rounding
def test_16_bit_draws_fill_the_grid_and_reach_the_tails():
    d = _sixteen_bit_draws()
    # jax draws the uniform bits in the 16-bit dtype: 128 values in bf16 (7 mantissa bits).
    assert len(np.unique(d["jax bf16"])) <= 128
    assert len(np.unique(d["jax f16"])) <= 1024
    np.testing.assert_array_equal(d["jax bits bf16"], d["jax bf16"])
    np.testing.assert_array_equal(d["jax bits f16"], d["jax f16"])
    # Drawn in float32 and cast: the bf16 grid within 5 std holds about 2950 values.
    assert len(np.unique(d["ours bf16"])) > 2500
    assert len(np.unique(d["ours f16"])) > 10000
    # P(max |z| of 2^20 draws < 4) = (1 - 2 sf(4))^n ~ exp(-66): the tails must be reached.
    p_max_below_4 = (1 - 2 * stats.norm.sf(4.0)) ** N_16
    assert p_max_below_4 < 1e-20
    for name in ("bf16", "f16"):
        ours = np.asarray(d[f"ours {name}"], np.float64)
        assert np.abs(ours).max() > 4.0
        assert np.abs(np.asarray(d[f"jax {name}"], np.float64)).max() < 4.0
        assert abs(ours.var() - 1) < 5 * rel_se_of_variance(3.0, N_16)
    # The default 16-bit draw is the float32 draw, cast.
    np.testing.assert_array_equal(d["he bf16"], d["he f32"].astype(jnp.bfloat16))


# ----------------------------------------------------------------------------- statistics

SCALING_SHAPE = (3, 3, 64, 128)  # fan_in 576, fan_out 1152, n = 73728
FANS = {"fan_in": 576, "fan_out": 1152, "fan_avg": 864, "fan_geo_avg": math.sqrt(576 * 1152)}
SCALING_CASES = {
    "he_normal": (ji.he_normal(), 2.0, "fan_in", "truncated_normal"),
    "he_uniform": (ji.he_uniform(), 2.0, "fan_in", "uniform"),
    "glorot_normal": (ji.glorot_normal(), 1.0, "fan_avg", "truncated_normal"),
    "glorot_uniform": (ji.glorot_uniform(), 1.0, "fan_avg", "uniform"),
    "lecun_normal": (ji.lecun_normal(), 1.0, "fan_in", "truncated_normal"),
    "lecun_uniform": (ji.lecun_uniform(), 1.0, "fan_in", "uniform"),
    "kaiming_normal_relu": (ji.kaiming_normal(nonlinearity="relu"), 2.0, "fan_in", "normal"),
    "kaiming_normal_fan_out": (
        ji.kaiming_normal(a=0.2, mode="fan_out"),
        2 / 1.04,
        "fan_out",
        "normal",
    ),
    "kaiming_uniform_sqrt5": (ji.kaiming_uniform(a=math.sqrt(5)), 1 / 3, "fan_in", "uniform"),
    "xavier_normal_tanh": (ji.xavier_normal(gain=5 / 3), 25 / 9, "fan_avg", "normal"),
    "xavier_uniform": (ji.xavier_uniform(), 1.0, "fan_avg", "uniform"),
    "geo_avg": (ji.variance_scaling(3.0, "fan_geo_avg", "normal"), 3.0, "fan_geo_avg", "normal"),
}
TRUNC_BOUNDS = [(-2.0, 2.0), (-1.0, 3.0), (-0.5, 0.5), (0.0, 4.0)]
TRUNC_STD = 0.05


@functools.cache
def _statistics_draws():
    """Every draw the statistical tests need, in one jitted call."""

    def draw(key):
        out = {name: c[0](key, SCALING_SHAPE) for name, c in SCALING_CASES.items()}
        for lo, hi in TRUNC_BOUNDS:
            out[f"trunc {lo} {hi}"] = ji.truncated_normal(TRUNC_STD, lower=lo, upper=hi)(
                key, (512, 512)
            )
        out["trunc jax"] = ji.truncated_normal(TRUNC_STD, correct_stddev=False)(key, (512, 512))
        for name in ("kaiming_normal", "xavier_normal"):
            out[name] = getattr(ji, name)()(key, (512, 512))
        out["normal"] = ji.normal(1.0)(key, (512, 512))
        out["kaiming torch default"] = ji.kaiming_uniform(a=math.sqrt(5))(key, (3, 3, 32, 64))
        out["he c64"] = ji.he_normal()(key, (512, 512), jnp.complex64)
        out["he c64 jax"] = jinit.he_normal()(key, (512, 512), jnp.complex64)
        for dist in ("normal", "uniform"):
            init = ji.variance_scaling(1.0, "fan_in", dist)
            out[f"c64 {dist}"] = init(key, (512, 512), jnp.complex64)
        return out

    return jax.device_get(jax.jit(draw)(KEY))


@pytest.mark.parametrize("name", SCALING_CASES)
def test_variance_matches_formula(name):
    _, scale, mode, dist = SCALING_CASES[name]
    w = _statistics_draws()[name]
    check_variance(w, scale / FANS[mode], KURTOSIS[dist])
    std = math.sqrt(scale / FANS[mode])
    bound = {"uniform": math.sqrt(3) * std, "truncated_normal": 2 * std / TRUNC2_STD}
    if dist in bound:  # (1 + 1e-6): float32 rounding of the bound itself
        assert np.abs(w).max() <= bound[dist] * (1 + 1e-6)


def test_untruncated_normals_have_gaussian_tails():
    """kaiming/xavier normal are untruncated: about 4.55% of draws lie beyond 2 std."""
    n = 512 * 512
    p = 2 * stats.norm.sf(2.0)
    tol = 5 * math.sqrt(p * (1 - p) / n)
    for name in ("kaiming_normal", "xavier_normal", "normal"):
        w = np.asarray(_statistics_draws()[name], np.float64)
        frac = np.mean(np.abs(w) > 2 * math.sqrt(np.mean(w**2)))
        assert abs(frac - p) < tol, (name, frac, p, tol)


def test_kaiming_uniform_sqrt5_is_torch_default_bound():
    w = np.asarray(_statistics_draws()["kaiming torch default"])
    bound = 1 / math.sqrt(3 * 3 * 32)
    assert np.abs(w).max() <= bound
    # The support reaches the bound: P(max of 18432 U(0, 1) < 1 - 1e-3) = 0.999^18432 ~ 1e-8.
    assert np.abs(w).max() > bound * (1 - 1e-3)


@pytest.mark.parametrize(("lower", "upper"), TRUNC_BOUNDS)
def test_truncated_normal_realized_std(lower, upper):
    ref = stats.truncnorm(lower, upper)
    x = np.asarray(_statistics_draws()[f"trunc {lower} {upper}"], np.float64).ravel()
    n, c = x.size, ref.std()
    kurt = float(ref.stats(moments="k")) + 3.0
    assert abs(x.var(ddof=1) / TRUNC_STD**2 - 1) < 5 * rel_se_of_variance(kurt, n)
    assert abs(x.mean() - TRUNC_STD / c * ref.mean()) < 5 * TRUNC_STD / math.sqrt(n)
    # 1e-7: float32 rounding of the bounds.
    assert x.min() >= TRUNC_STD / c * lower - 1e-7 and x.max() <= TRUNC_STD / c * upper + 1e-7


def test_truncated_normal_untruncated_convention():
    w = np.asarray(_statistics_draws()["trunc jax"], np.float64).ravel()
    expected = TRUNC_STD**2 * TRUNC2_STD**2
    assert abs(w.var(ddof=1) / expected - 1) < 5 * rel_se_of_variance(
        KURTOSIS["truncated_normal"], w.size
    )


def _complex_trunc_kurtosis():
    """E|z|^4 / (E|z|^2)^2 for |z|^2 ~ Exp(1) truncated at 4 (jax's complex sampler)."""
    t = stats.truncexpon(4.0)
    return float(t.moment(2) / t.moment(1) ** 2)


def test_complex_truncated_normal_has_exact_variance_where_jax_does_not():
    fan_in, n = 512, 512 * 512
    expected = 2.0 / fan_in
    tol = 5 * math.sqrt((_complex_trunc_kurtosis() - 1) / n)  # relative SE of mean(|z|^2)
    d = _statistics_draws()
    ours = np.mean(np.abs(np.asarray(d["he c64"], np.complex128)) ** 2) / expected
    theirs = np.mean(np.abs(np.asarray(d["he c64 jax"], np.complex128)) ** 2) / expected
    assert abs(ours - 1) < tol, (ours, tol)
    assert abs(theirs - 1) > tol, (theirs, tol)  # jax's 1.9% excess
    rms = math.sqrt(stats.truncexpon(4.0).mean())  # RMS of the truncated modulus
    assert np.abs(d["he c64"]).max() <= 2 * math.sqrt(expected) / rms * (1 + 1e-5)


@pytest.mark.parametrize("distribution", ["normal", "uniform"])
def test_complex_normal_and_uniform_variance(distribution):
    m2 = np.abs(np.asarray(_statistics_draws()[f"c64 {distribution}"], np.complex128)) ** 2
    # |z|^2 is Exp(1)-distributed (normal) or uniform on [0, 2] (disk), times 1/fan_in.
    rel_sd = 1.0 if distribution == "normal" else math.sqrt(1 / 3)
    assert abs(m2.mean() * 512 - 1) < 5 * rel_sd / math.sqrt(m2.size)


# ----------------------------------------------------------------------------- orthogonal family


@functools.cache
def _orthogonal_draws():
    shapes = [(64, 64), (96, 32), (32, 96), (2, 3, 16, 48)]

    def draw(key):
        out = {str(shape): ji.orthogonal(scale=2.0)(key, shape) for shape in shapes}
        out["column 0"] = ji.orthogonal(column_axis=0)(key, (24, 3, 4))
        for dt in (jnp.bfloat16, jnp.float16):
            out[jnp.dtype(dt).name] = ji.orthogonal()(key, (128, 128), dt)
        out["f32"] = jinit.orthogonal()(key, (128, 128), jnp.float32)
        keys = jax.random.split(key, 400)
        out["haar"] = jax.vmap(lambda k: jnp.diag(ji.orthogonal()(k, (16, 16))))(keys)
        out["delta"] = ji.delta_orthogonal()(key, (4, 3, 8, 16))
        return out

    return shapes, jax.device_get(jax.jit(draw)(KEY))


def test_orthogonal_is_orthogonal():
    shapes, d = _orthogonal_draws()
    for shape in shapes:
        m = np.asarray(d[str(shape)], np.float64).reshape(-1, shape[-1])
        gram = m.T @ m if m.shape[0] >= m.shape[1] else m @ m.T
        # 2e-5: float32 QR, orthonormal to a few ulps times the size.
        np.testing.assert_allclose(gram, 4.0 * np.eye(gram.shape[0]), atol=2e-5, err_msg=shape)
    m = np.moveaxis(np.asarray(d["column 0"], np.float64), 0, -1).reshape(-1, 24)
    np.testing.assert_allclose(m @ m.T, np.eye(12), atol=2e-5)  # 12 orthonormal rows


def test_orthogonal_16_bit_is_cast_from_float32():
    _, d = _orthogonal_draws()
    for dt in (jnp.bfloat16, jnp.float16):
        w = d[jnp.dtype(dt).name]
        assert w.dtype == dt
        np.testing.assert_array_equal(np.asarray(w), np.asarray(d["f32"].astype(dt)))


def test_orthogonal_is_haar_no_sign_bias():
    """The diagonal-sign correction makes Q Haar: the diagonal has mean ~0 over many draws."""
    d = np.asarray(_orthogonal_draws()[1]["haar"], np.float64).ravel()
    # Entries of a Haar 16x16 matrix have variance 1/16.
    assert abs(d.mean()) < 5 * math.sqrt(1 / 16 / d.size)


def test_delta_orthogonal_centre_and_orthogonality():
    w = np.array(_orthogonal_draws()[1]["delta"], np.float64)
    centre = w[1, 1]  # (k - 1) // 2 for k = 4 and 3
    np.testing.assert_allclose(centre @ centre.T, np.eye(8), atol=2e-5)
    w[1, 1] = 0
    assert not w.any()


def test_identity_matrix_and_dirac():
    np.testing.assert_array_equal(ji.identity(2.0)(KEY, (3, 5)), 2.0 * np.eye(3, 5))
    w = np.asarray(ji.identity()(KEY, (3, 4, 6)))
    assert w.sum() == 4 and all(w[1, i, i] == 1 for i in range(4))


def test_identity_conv_is_identity_map_with_same_padding():
    """The centre convention (k - 1) // 2 makes SAME-padded convs exact identities."""
    x = jax.random.normal(KEY, (2, 9, 10, 6))

    @jax.jit
    def run(x):
        outs = []
        for kernel in [(3, 3), (4, 4), (2, 5)]:
            conv = nn.Conv(6, kernel, padding="SAME", kernel_init=ji.identity(), use_bias=False)
            outs.append(conv.apply(conv.init(KEY, x), x))
        return outs

    for y in run(x):  # exact: one product by 1.0 and sums of zeros
        np.testing.assert_array_equal(y, x)


def test_sparse_zeros_per_column_and_values():
    sparsity, stddev = 0.3, 0.1
    w = np.asarray(ji.sparse(sparsity, stddev)(KEY, (200, 300)), np.float64)
    assert ((w == 0).sum(axis=0) == math.ceil(sparsity * 200)).all()
    nz = w[w != 0]
    assert abs(nz.var(ddof=1) / stddev**2 - 1) < 5 * rel_se_of_variance(3.0, nz.size)
    # The zero pattern differs between columns.
    assert len({tuple(np.flatnonzero(w[:, j] == 0)) for j in range(10)}) == 10


def test_constants():
    np.testing.assert_array_equal(ji.zeros(KEY, (2, 3)), np.zeros((2, 3)))
    np.testing.assert_array_equal(ji.ones()(KEY, (2, 3), jnp.bfloat16), np.ones((2, 3)))
    np.testing.assert_array_equal(ji.constant([1.0, 2.0])(KEY, (3, 2)), [[1, 2]] * 3)
    with pytest.raises(ValueError, match="does not broadcast"):
        ji.constant([1.0, 2.0])(KEY, (3, 3))
    with pytest.raises(ValueError, match="zeros: called with a key but no shape"):
        ji.zeros(KEY)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: ji.variance_scaling(1.0, "fan_inn", "normal"), r"mode 'fan_inn'"),
        (lambda: ji.variance_scaling(1.0, "fan_in", "gauss"), r"distribution 'gauss'"),
        (lambda: ji.variance_scaling(-1.0, "fan_in", "normal"), r"scale.*-1.0"),
        (lambda: ji.variance_scaling(float("nan"), "fan_in", "normal"), r"scale"),
        (lambda: ji.kaiming_normal(nonlinearity="gelu"), r"'gelu'"),
        (lambda: ji.kaiming_uniform(mode="fan_avg"), r"mode 'fan_avg'"),
        (lambda: ji.normal(-0.1), r"stddev.*-0.1"),
        (lambda: ji.truncated_normal(-0.1), r"stddev"),
        (lambda: ji.truncated_normal(0.1, lower=2.0, upper=-2.0), r"lower < upper"),
        (lambda: ji.truncated_normal(0.1, lower=9.0, upper=40.0), r"no probability mass"),
        (lambda: ji.xavier_normal(gain=-1.0), r"gain"),
        (lambda: ji.orthogonal(scale=-1.0), r"scale"),
        (lambda: ji.sparse(1.5), r"sparsity"),
        (lambda: ji.uniform(low=1.0), r"both low and high"),
        (lambda: ji.uniform(low=1.0, high=1.0), r"low < high"),
        (lambda: ji.he_normal(in_axis=-2, out_axis=-2), r"Overlapping.*-2"),
        (lambda: ji.he_normal(in_axis=0, out_axis=1, batch_axis=0), r"Overlapping"),
        (lambda: ji.he_normal(in_axis=1.5), r"in_axis"),
    ],
)
def test_bad_arguments_fail_when_the_builder_is_called(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_bad_shapes_fail_when_called():
    for init, shape, match in [
        (ji.he_normal(), (16,), r"in_axis.*out_axis"),
        (ji.orthogonal(), (16,), "rank"),
        (ji.orthogonal(column_axis=2), (4, 4), "column_axis=2 is out of range"),
        (ji.delta_orthogonal(), (3, 3, 16, 8), "in=16 > out=8"),
        (ji.delta_orthogonal(), (16, 8), "3-D, 4-D or 5-D"),
        (ji.sparse(0.5), (3, 4, 5), r"expected \(in, out\)"),
        (ji.identity(), (4,), "rank 1"),
        (ji.normal(), (4, -1), "negative dimension"),
    ]:
        with pytest.raises(ValueError, match=match):
            init(KEY, shape)


def test_out_of_range_axes_fail_at_trace_time():
    init = ji.he_normal(in_axis=3)
    with pytest.raises(ValueError, match=r"in_axis=3 is out of range"):
        jax.jit(init, static_argnums=1)(KEY, (4, 4))
    with pytest.raises(ValueError, match="Overlapping"):
        ji.he_normal(in_axis=0, out_axis=-2)(KEY, (4, 4))


# ----------------------------------------------------------------------------- flax integration


def test_drop_into_flax_linen_and_nnx():
    x = jnp.ones((2, 16))
    dense = nn.Dense(64, kernel_init=ji.kaiming_normal(nonlinearity="relu"), bias_init=ji.zeros)
    params = dense.init(KEY, x)
    assert params["params"]["kernel"].shape == (16, 64)
    conv = nn.Conv(8, (3, 3), kernel_init=ji.orthogonal(), dtype=jnp.bfloat16)
    assert conv.init(KEY, jnp.ones((1, 5, 5, 4)))["params"]["kernel"].shape == (3, 3, 4, 8)
    lin = nnx.Linear(16, 32, kernel_init=ji.glorot_uniform(), rngs=nnx.Rngs(0))
    assert lin.kernel[...].shape == (16, 32)
    # he_normal in a Flax layer draws exactly what flax's own he_normal draws.
    ours = nn.Dense(8, kernel_init=ji.he_normal()).init(KEY, x)
    theirs = nn.Dense(8, kernel_init=nn.initializers.he_normal()).init(KEY, x)
    chex.assert_trees_all_equal(ours, theirs)


# ------------------------------------------------------------------ depth: He et al. (2015)


DEPTH_CASES = {  # name: (initializer, activation)
    "relu": (ji.kaiming_normal(nonlinearity="relu"), jax.nn.relu),
    "linear": (ji.kaiming_normal(nonlinearity="linear"), lambda x: x),
    "tanh": (ji.kaiming_normal(nonlinearity="tanh"), jnp.tanh),
}


@functools.cache
def _depth_stds(depth=50, width=256, batch=64, nets=8):
    """Pre-activation std per layer of ``nets`` independent MLPs, and the saturated fraction."""

    def one_net(key, init, act):
        k_x, k_w = jax.random.split(key)
        ws = jax.vmap(lambda k: init(k, (width, width)))(jax.random.split(k_w, depth))
        x = jax.random.normal(k_x, (batch, width))

        def layer(h, w):
            pre = h @ w
            return act(pre), (jnp.std(pre), jnp.mean(jnp.abs(act(pre)) > 0.97))

        return jax.lax.scan(layer, x, ws)[1]

    keys = jax.random.split(jax.random.key(0), nets)
    # 50 layers of matmuls: running dominates compiling here, so optimize (conftest.py compiles
    # at -O0 by default).
    run = jax.jit(
        lambda keys: {
            name: jax.vmap(lambda k, i=init, a=act: one_net(k, i, a))(keys)
            for name, (init, act) in DEPTH_CASES.items()
        },
        compiler_options={"xla_backend_optimization_level": 2},
    )
    return {name: tuple(np.asarray(v, np.float64) for v in out) for name, out in run(keys).items()}


def _geometric_mean_ratio(stds):
    """exp(mean over nets of log(std_l / std_1)).

    One network's weights make log(std) drift like a random walk (sd about sqrt(depth / width),
    0.44 at width 256 and 50 layers); the mean over 8 nets has sd 0.16, so 2x (log 0.69) is over
    4 sd away.
    """
    return np.exp(np.mean(np.log(stds / stds[:, :1]), axis=0))


def test_kaiming_gain_keeps_the_variance_through_50_layers():
    """The library's own depth check is ``ji.depth_report``, tested in test_cli."""
    for name in ("relu", "linear"):
        ratio = _geometric_mean_ratio(_depth_stds()[name][0])
        assert (ratio > 0.5).all() and (ratio < 2.0).all(), (name, ratio.min(), ratio.max())
    stds, sat = _depth_stds()["tanh"]
    assert (stds[:, -1] > 0.5).all(), stds[:, -1]  # does not vanish
    assert (sat[:, -1] < 0.1).all(), sat[:, -1]  # does not saturate
