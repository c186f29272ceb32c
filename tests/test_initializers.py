"""Initializers: shapes and dtypes (eager and jit), statistics, parity with jax, bad input."""

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from flax import nnx
from scipy import stats

import jaxinit as ji

KEY = jax.random.key(20261125)

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
    "orthogonal": lambda: ji.orthogonal(),
    "identity": lambda: ji.identity(),
    "constant": lambda: ji.constant(0.25),
    "zeros": lambda: ji.zeros,
    "ones": lambda: ji.ones,
    "sparse": lambda: ji.sparse(0.5, 0.1),
    "delta_orthogonal": lambda: ji.delta_orthogonal(),
}
# Initializers defined only for some layouts: sparse for matrices, delta_orthogonal for convs.
ONLY_SHAPES = {"sparse": ("dense",), "delta_orthogonal": ("conv",)}
REAL_ONLY = {"uniform", "truncated_normal", "sparse"}
SHAPES = {"dense": (48, 32), "conv": (3, 3, 8, 16), "batched": (4, 24, 40)}
DTYPES = {
    "f32": jnp.float32,
    "bf16": jnp.bfloat16,
    "f16": jnp.float16,
    "f64": jnp.float64,
    "c64": jnp.complex64,
}


def _table(dtype_name):
    """(name, shape, init) for every initializer x shape that is meaningful for the dtype."""
    for name in [*FAN_INITS, *OTHER_INITS]:
        if dtype_name == "c64" and name in REAL_ONLY:
            continue
        for shape_name in ONLY_SHAPES.get(name, SHAPES):
            shape = SHAPES[shape_name]
            if name in FAN_INITS:
                init = FAN_INITS[name](**({"batch_axis": 0} if shape_name == "batched" else {}))
            else:
                init = OTHER_INITS[name]()
            yield name, shape_name, shape, init


class ShapeDtypeTest(chex.TestCase):
    """Every initializer x shape (dense, conv, batched) x dtype, eagerly and under jit.

    One variant call per dtype draws the whole table (one compilation under jit), and every
    entry is checked with its name in the message.
    """

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*((name, name) for name in DTYPES))
    def test_shape_dtype_finite(self, dtype_name):
        dtype = DTYPES[dtype_name]
        table = list(_table(dtype_name))
        with jax.enable_x64(dtype == jnp.float64):
            outs = self.variant(lambda k: [init(k, shape, dtype) for _, _, shape, init in table])(
                KEY
            )
            for (name, shape_name, shape, _), out in zip(table, outs, strict=True):
                where = f"{name} on {shape_name} {shape} in {dtype_name}"
                self.assertEqual(out.shape, shape, where)
                self.assertEqual(out.dtype, dtype, where)
                host = np.asarray(out.astype(jnp.complex64 if dtype_name == "c64" else jnp.float32))
                self.assertTrue(np.isfinite(host).all(), where)
                if name not in {"zeros", "identity", "constant", "ones"}:
                    self.assertGreater(np.abs(host).std(), 0, where)


# ----------------------------------------------------------------------------- dtype rules


def test_dtype_none_is_float32_even_with_x64():
    with jax.enable_x64(True):
        for init in [ji.he_normal(), ji.normal(), ji.orthogonal(), ji.zeros, ji.constant(1.0)]:
            assert init(KEY, (8, 8)).dtype == jnp.float32
            assert init(KEY, (8, 8), jnp.float32).dtype == jnp.float32
            assert init(KEY, (8, 8), jnp.float64).dtype == jnp.float64


def test_builder_dtype_is_default_and_call_dtype_wins():
    init = ji.he_normal(dtype=jnp.bfloat16)
    assert init(KEY, (8, 8)).dtype == jnp.bfloat16
    assert init(KEY, (8, 8), jnp.float16).dtype == jnp.float16


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.int8, jnp.bool_, jnp.uint8])
def test_integer_and_bool_dtypes_are_type_errors(dtype):
    with pytest.raises(TypeError, match="not a floating"):
        ji.he_normal(dtype=dtype)
    with pytest.raises(TypeError, match="not a floating"):
        ji.he_normal()(KEY, (4, 4), dtype)
    with pytest.raises(TypeError, match="not a floating"):
        ji.orthogonal()(KEY, (4, 4), dtype)
    with pytest.raises(TypeError, match="not a floating"):
        ji.zeros(KEY, (4, 4), dtype)


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


# ----------------------------------------------------------------------------- parity with jax

JAX_NAMED = ["he_normal", "he_uniform", "glorot_normal", "glorot_uniform", "lecun_normal"]
JAX_NAMED += ["lecun_uniform"]


@pytest.mark.parametrize("name", JAX_NAMED)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64])
def test_named_bit_identical_to_jax(name, dtype):
    shapes = [SHAPES["dense"], SHAPES["conv"]]
    with jax.enable_x64(dtype == jnp.float64):
        ours, theirs = getattr(ji, name)(), getattr(jax.nn.initializers, name)()
        a = [ours(KEY, shape, dtype) for shape in shapes]
        b = [theirs(KEY, shape, dtype) for shape in shapes]
        aj = jax.jit(lambda k: [ours(k, shape, dtype) for shape in shapes])(KEY)
        bj = jax.jit(lambda k: [theirs(k, shape, dtype) for shape in shapes])(KEY)
        for x, y in zip(a + aj, b + bj, strict=True):
            assert x.dtype == y.dtype == dtype
            np.testing.assert_array_equal(np.asarray(x, np.float64), np.asarray(y, np.float64))


@pytest.mark.parametrize("mode", ["fan_in", "fan_out", "fan_avg", "fan_geo_avg"])
@pytest.mark.parametrize("distribution", ["normal", "truncated_normal", "uniform"])
def test_variance_scaling_bit_identical_to_jax(mode, distribution):
    kw = {"in_axis": 1, "out_axis": 2, "batch_axis": 0}  # SHAPES["batched"]
    ours = ji.variance_scaling(1.7, mode, distribution, **kw)
    theirs = jax.nn.initializers.variance_scaling(1.7, mode, distribution, **kw)
    for dtype in [jnp.float32, jnp.bfloat16]:
        np.testing.assert_array_equal(
            np.asarray(ours(KEY, SHAPES["batched"], dtype), np.float32),
            np.asarray(theirs(KEY, SHAPES["batched"], dtype), np.float32),
        )


def test_plain_initializers_bit_identical_to_jax():
    pairs = [
        (ji.normal(0.3), jax.nn.initializers.normal(0.3)),
        (ji.uniform(0.3), jax.nn.initializers.uniform(0.3)),
        (
            ji.truncated_normal(0.3, -1.5, 2.5, correct_stddev=False),
            jax.nn.initializers.truncated_normal(0.3, lower=-1.5, upper=2.5),
        ),
        (ji.orthogonal(1.3), jax.nn.initializers.orthogonal(1.3)),
        (ji.orthogonal(column_axis=0), jax.nn.initializers.orthogonal(column_axis=0)),
        (ji.delta_orthogonal(), jax.nn.initializers.delta_orthogonal()),
        (ji.constant(0.7), jax.nn.initializers.constant(0.7)),
    ]
    for ours, theirs in pairs:
        shape = SHAPES["conv"]
        np.testing.assert_array_equal(ours(KEY, shape), theirs(KEY, shape))


# ----------------------------------------------------------------------------- statistics


def _rel_se_of_variance(kurtosis: float, n: int) -> float:
    """Relative standard error of the sample variance: sqrt((kurtosis - 1) / (n - 1))."""
    return math.sqrt((kurtosis - 1.0) / (n - 1))


KURTOSIS = {
    "normal": 3.0,
    "uniform": 9.0 / 5.0,
    "truncated_normal": float(stats.truncnorm(-2, 2).stats(moments="k")) + 3.0,
}


def _check_variance(w, expected_var, kurtosis, sigmas=5.0):
    x = np.asarray(w, np.float64).ravel()
    n = x.size
    var = x.var(ddof=1)
    tol = sigmas * _rel_se_of_variance(kurtosis, n)
    assert abs(var / expected_var - 1) < tol, (var, expected_var, tol)
    assert abs(x.mean()) < sigmas * math.sqrt(expected_var / n), x.mean()


SCALING_CASES = [
    ("he_normal", ji.he_normal(), 2.0, "fan_in", "truncated_normal"),
    ("he_uniform", ji.he_uniform(), 2.0, "fan_in", "uniform"),
    ("glorot_normal", ji.glorot_normal(), 1.0, "fan_avg", "truncated_normal"),
    ("glorot_uniform", ji.glorot_uniform(), 1.0, "fan_avg", "uniform"),
    ("lecun_normal", ji.lecun_normal(), 1.0, "fan_in", "truncated_normal"),
    ("lecun_uniform", ji.lecun_uniform(), 1.0, "fan_in", "uniform"),
    ("kaiming_normal_relu", ji.kaiming_normal(nonlinearity="relu"), 2.0, "fan_in", "normal"),
    (
        "kaiming_normal_fan_out",
        ji.kaiming_normal(a=0.2, mode="fan_out"),
        2 / 1.04,
        "fan_out",
        "normal",
    ),
    ("kaiming_uniform_sqrt5", ji.kaiming_uniform(a=math.sqrt(5)), 1 / 3, "fan_in", "uniform"),
    ("xavier_normal_tanh", ji.xavier_normal(gain=5 / 3), 25 / 9, "fan_avg", "normal"),
    ("xavier_uniform", ji.xavier_uniform(), 1.0, "fan_avg", "uniform"),
    ("geo_avg", ji.variance_scaling(3.0, "fan_geo_avg", "normal"), 3.0, "fan_geo_avg", "normal"),
]


@pytest.mark.parametrize(("name", "init", "scale", "mode", "dist"), SCALING_CASES)
def test_variance_matches_formula(name, init, scale, mode, dist):
    shape = (3, 3, 64, 128)  # fan_in 576, fan_out 1152, n = 73728
    fan_in, fan_out = 576, 1152
    n_fan = {
        "fan_in": fan_in,
        "fan_out": fan_out,
        "fan_avg": (fan_in + fan_out) / 2,
        "fan_geo_avg": math.sqrt(fan_in * fan_out),
    }[mode]
    w = init(KEY, shape)
    _check_variance(w, scale / n_fan, KURTOSIS[dist])
    std = math.sqrt(scale / n_fan)
    if dist == "uniform":
        assert float(jnp.max(jnp.abs(w))) <= math.sqrt(3) * std * (1 + 1e-6)
    if dist == "truncated_normal":
        assert float(jnp.max(jnp.abs(w))) <= 2 * std / 0.87962566103423978 * (1 + 1e-6)


def test_untruncated_normals_have_gaussian_tails():
    """kaiming/xavier normal are untruncated: about 4.55% of draws lie beyond 2 std."""
    n = 512 * 512
    p = 2 * stats.norm.sf(2.0)
    tol = 5 * math.sqrt(p * (1 - p) / n)
    for init in [ji.kaiming_normal(), ji.xavier_normal(), ji.normal(1.0)]:
        w = np.asarray(init(KEY, (512, 512)), np.float64)
        std = math.sqrt(np.mean(w**2))
        frac = np.mean(np.abs(w) > 2 * std)
        assert abs(frac - p) < tol, (frac, p, tol)


def test_kaiming_uniform_sqrt5_is_torch_default_bound():
    fan_in = 3 * 3 * 32
    w = np.asarray(ji.kaiming_uniform(a=math.sqrt(5))(KEY, (3, 3, 32, 64)))
    bound = 1 / math.sqrt(fan_in)
    assert np.abs(w).max() <= bound
    assert np.abs(w).max() > bound * (1 - 1e-3)  # the support really reaches the bound


@pytest.mark.parametrize(("lower", "upper"), [(-2.0, 2.0), (-1.0, 3.0), (-0.5, 0.5), (0.0, 4.0)])
def test_truncated_normal_realized_std(lower, upper):
    stddev = 0.05
    ref = stats.truncnorm(lower, upper)
    w = ji.truncated_normal(stddev, lower, upper)(KEY, (512, 512))
    x = np.asarray(w, np.float64).ravel()
    n = x.size
    c = ref.std()
    kurt = float(ref.stats(moments="k")) + 3.0
    assert abs(x.var(ddof=1) / stddev**2 - 1) < 5 * _rel_se_of_variance(kurt, n)
    assert abs(x.mean() - stddev / c * ref.mean()) < 5 * stddev / math.sqrt(n)
    assert x.min() >= stddev / c * lower - 1e-7 and x.max() <= stddev / c * upper + 1e-7


def test_truncated_normal_untruncated_convention():
    w = np.asarray(
        ji.truncated_normal(0.05, correct_stddev=False)(KEY, (512, 512)), np.float64
    ).ravel()
    expected = 0.05**2 * stats.truncnorm(-2, 2).var()
    kurt = KURTOSIS["truncated_normal"]
    assert abs(w.var(ddof=1) / expected - 1) < 5 * _rel_se_of_variance(kurt, w.size)


def _complex_trunc_kurtosis():
    """E|z|^4 / (E|z|^2)^2 for |z|^2 ~ Exp(1) truncated at 4 (jax's complex sampler)."""
    e = math.exp(-4.0)
    m1 = (1 - 5 * e) / (1 - e)
    m2 = (2 - 26 * e) / (1 - e)  # ∫_0^4 t^2 e^-t dt = 2 - 26 e^-4
    return m2 / m1**2


def test_complex_truncated_normal_has_exact_variance_where_jax_does_not():
    shape = (512, 512)
    fan_in = 512
    expected = 2.0 / fan_in
    n = math.prod(shape)
    # Relative SE of mean(|z|^2): sqrt((E|z|^4 / E|z|^2^2 - 1) / n).
    tol = 5 * math.sqrt((_complex_trunc_kurtosis() - 1) / n)
    ours = ji.he_normal()(KEY, shape, jnp.complex64)
    theirs = jax.nn.initializers.he_normal()(KEY, shape, jnp.complex64)
    ours_ratio = float(jnp.mean(jnp.abs(ours) ** 2)) / expected
    theirs_ratio = float(jnp.mean(jnp.abs(theirs) ** 2)) / expected
    assert abs(ours_ratio - 1) < tol, (ours_ratio, tol)
    assert abs(theirs_ratio - 1) > tol, (theirs_ratio, tol)  # jax's documented 1.9% excess
    assert float(jnp.max(jnp.abs(ours))) <= 2 * math.sqrt(expected) / 0.96196 * (1 + 1e-5)


@pytest.mark.parametrize("distribution", ["normal", "uniform"])
def test_complex_normal_and_uniform_variance(distribution):
    shape = (512, 512)
    w = ji.variance_scaling(1.0, "fan_in", distribution)(KEY, shape, jnp.complex64)
    m2 = np.abs(np.asarray(w, np.complex128)) ** 2
    # |z|^2 is Exp(1)-distributed (normal) or uniform on [0, 2] (disk) times 1/fan_in.
    rel_sd = 1.0 if distribution == "normal" else math.sqrt(1 / 3)
    assert abs(m2.mean() * 512 - 1) < 5 * rel_sd / math.sqrt(m2.size)


# ----------------------------------------------------------------------------- orthogonal family


@pytest.mark.parametrize("shape", [(64, 64), (96, 32), (32, 96), (2, 3, 16, 48)])
def test_orthogonal_is_orthogonal(shape):
    w = np.asarray(ji.orthogonal(scale=2.0)(KEY, shape), np.float64)
    m = w.reshape(-1, shape[-1])
    gram = m.T @ m if m.shape[0] >= m.shape[1] else m @ m.T
    np.testing.assert_allclose(gram, 4.0 * np.eye(gram.shape[0]), atol=2e-5)


def test_orthogonal_column_axis():
    w = np.asarray(ji.orthogonal(column_axis=0)(KEY, (24, 3, 4)), np.float64)
    m = np.moveaxis(w, 0, -1).reshape(-1, 24)  # 12 rows, 24 columns: orthonormal rows
    np.testing.assert_allclose(m @ m.T, np.eye(12), atol=2e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_orthogonal_16_bit_is_cast_from_float32(dtype):
    w = ji.orthogonal()(KEY, (128, 128), dtype)
    ref = jax.nn.initializers.orthogonal()(KEY, (128, 128), jnp.float32)
    assert w.dtype == dtype
    np.testing.assert_array_equal(np.asarray(w), np.asarray(ref.astype(dtype)))


def test_orthogonal_is_haar_no_sign_bias():
    """The diagonal-sign correction makes Q Haar: the diagonal has mean ~0 over many draws."""
    keys = jax.random.split(KEY, 400)
    diag = jax.vmap(lambda k: jnp.diag(ji.orthogonal()(k, (16, 16))))(keys)
    d = np.asarray(diag, np.float64).ravel()
    # Entries of a Haar 16x16 matrix have variance 1/16.
    assert abs(d.mean()) < 5 * math.sqrt(1 / 16 / d.size)


def test_delta_orthogonal_centre_and_orthogonality():
    w = np.asarray(ji.delta_orthogonal()(KEY, (4, 3, 8, 16)), np.float64)
    centre = w[1, 1]  # (k - 1) // 2 for k = 4 and 3
    np.testing.assert_allclose(centre @ centre.T, np.eye(8), atol=2e-5)
    w[1, 1] = 0
    assert not w.any()


def test_identity_matrix_and_dirac():
    np.testing.assert_array_equal(ji.identity(2.0)(KEY, (3, 5)), 2.0 * np.eye(3, 5))
    w = np.asarray(ji.identity()(KEY, (3, 4, 6)))
    assert w.sum() == 4 and all(w[1, i, i] == 1 for i in range(4))


@pytest.mark.parametrize("kernel", [(3, 3), (4, 4), (2, 5)])
def test_identity_conv_is_identity_map_with_same_padding(kernel):
    """The centre convention (k - 1) // 2 makes SAME-padded convs exact identities."""
    conv = nn.Conv(6, kernel, padding="SAME", kernel_init=ji.identity(), use_bias=False)
    x = jax.random.normal(KEY, (2, 9, 10, 6))
    params = conv.init(KEY, x)
    np.testing.assert_allclose(conv.apply(params, x), x, rtol=1e-6, atol=1e-6)


def test_sparse_zeros_per_column_and_values():
    sparsity, stddev = 0.3, 0.1
    w = np.asarray(ji.sparse(sparsity, stddev)(KEY, (200, 300)), np.float64)
    zeros = (w == 0).sum(axis=0)
    assert (zeros == math.ceil(sparsity * 200)).all()
    nz = w[w != 0]
    assert abs(nz.var(ddof=1) / stddev**2 - 1) < 5 * _rel_se_of_variance(3.0, nz.size)
    # The zero pattern differs between columns.
    assert len({tuple(np.flatnonzero(w[:, j] == 0)) for j in range(10)}) == 10


def test_constants():
    np.testing.assert_array_equal(ji.zeros(KEY, (2, 3)), np.zeros((2, 3)))
    np.testing.assert_array_equal(ji.ones()(KEY, (2, 3), jnp.bfloat16), np.ones((2, 3)))
    np.testing.assert_array_equal(ji.constant([1.0, 2.0])(KEY, (3, 2)), [[1, 2]] * 3)
    with pytest.raises(ValueError, match="does not broadcast"):
        ji.constant([1.0, 2.0])(KEY, (3, 3))


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
        (lambda: ji.truncated_normal(0.1, 2.0, -2.0), r"lower < upper"),
        (lambda: ji.xavier_normal(gain=-1.0), r"gain"),
        (lambda: ji.orthogonal(scale=-1.0), r"scale"),
        (lambda: ji.sparse(1.5), r"sparsity"),
        (lambda: ji.uniform(low=1.0), r"both low and high"),
        (lambda: ji.he_normal(in_axis=-2, out_axis=-2), r"Overlapping.*-2"),
        (lambda: ji.he_normal(in_axis=0, out_axis=1, batch_axis=0), r"Overlapping"),
        (lambda: ji.he_normal(in_axis=1.5), r"in_axis"),
    ],
)
def test_bad_arguments_fail_when_the_builder_is_called(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_rank_one_shape_explains_axes():
    with pytest.raises(ValueError, match=r"in_axis.*out_axis"):
        ji.he_normal()(KEY, (16,))
    with pytest.raises(ValueError, match="rank"):
        ji.orthogonal()(KEY, (16,))


def test_out_of_range_axes_fail_at_trace_time():
    init = ji.he_normal(in_axis=3)
    with pytest.raises(ValueError, match=r"in_axis=3 is out of range"):
        jax.jit(init, static_argnums=1)(KEY, (4, 4))
    with pytest.raises(ValueError, match="Overlapping"):
        ji.he_normal(in_axis=0, out_axis=-2)(KEY, (4, 4))


# ----------------------------------------------------------------------------- sharding


def test_out_sharding_gives_same_values():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("x", "y"))
    s = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x", "y"))
    for init in [ji.he_normal(), ji.kaiming_uniform(), ji.normal(1.0), ji.orthogonal()]:
        ref = init(KEY, (64, 32))
        out = init(KEY, (64, 32), out_sharding=s)
        assert out.sharding == s
        np.testing.assert_array_equal(out, ref)


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


# ------------------------------------------------------------------ the seeds' experiment


def _depth_stds(init, act, depth=50, width=256, batch=256, nets=8):
    """Pre-activation std per layer of `nets` independent MLPs, and the saturated fraction."""

    def one_net(key):
        k_x, k_w = jax.random.split(key)
        ws = jax.vmap(lambda k: init(k, (width, width)))(jax.random.split(k_w, depth))
        x = jax.random.normal(k_x, (batch, width))

        def layer(h, w):
            pre = h @ w
            return act(pre), (jnp.std(pre), jnp.mean(jnp.abs(act(pre)) > 0.97))

        return jax.lax.scan(layer, x, ws)[1]

    stds, sat = jax.jit(jax.vmap(one_net))(jax.random.split(jax.random.key(0), nets))
    return np.asarray(stds, np.float64), np.asarray(sat, np.float64)


def _geometric_mean_ratio(stds):
    """exp(mean over nets of log(std_l / std_1)): one network's weights make log(std) drift like a
    random walk (sd about sqrt(depth / width) at width 256, 50 layers), the mean over nets does not.
    """
    return np.exp(np.mean(np.log(stds / stds[:, :1]), axis=0))


def test_seeds_depth_experiment():
    identity = lambda x: x
    for act, nonlin in [(jax.nn.relu, "relu"), (identity, "linear")]:
        ratio = _geometric_mean_ratio(_depth_stds(ji.kaiming_normal(nonlinearity=nonlin), act)[0])
        assert (ratio > 0.5).all() and (ratio < 2.0).all(), (nonlin, ratio.min(), ratio.max())

    # Without the gain (flax's lecun_normal) relu halves the variance at every layer: 2^-24.5.
    ratio = _geometric_mean_ratio(_depth_stds(ji.lecun_normal(), jax.nn.relu)[0])
    assert ratio[-1] < 1e-6, ratio[-1]

    stds, sat = _depth_stds(ji.kaiming_normal(nonlinearity="tanh"), jnp.tanh)
    assert (stds[:, -1] > 0.5).all(), stds[:, -1]  # does not vanish
    assert (sat[:, -1] < 0.1).all(), sat[:, -1]  # does not saturate

    stds, _ = _depth_stds(ji.normal(1.0), identity)
    assert (~np.isfinite(stds[:, -1]) | (stds[:, -1] > 1e30)).all()  # std 1 explodes: 16^50
