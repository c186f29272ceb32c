"""Tests for jaxinit.porting: torch default init, batch-norm conventions, state-dict conversion.

torch is not a dependency: its documented formulas are written out here in numpy.
"""

import functools
import itertools
import math
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxinit as ji
import jaxinit.linen as jil
from jaxinit import porting

# ----------------------------------------------------------------- shared data

KEY = jax.random.key(3)
# Statistical checks fail with probability about FALSE_ALARM for a correct sampler (fixed keys
# make them deterministic); Z is the matching two-sided normal quantile (about 6.1).
FALSE_ALARM = 1e-9
Z = float(scipy.stats.norm.isf(FALSE_ALARM / 2))
# Relative variance of u^2 for u ~ U(-1, 1): E[u^4] / E[u^2]^2 - 1 (= 4/5).
U = scipy.stats.uniform(-1, 2)
REL_VAR_U2 = float(U.moment(4) / U.moment(2) ** 2 - 1)
# Bounds are computed in float32: a draw may sit half an ulp past the float64 bound.
F32_ROUNDING = float(np.finfo(np.float32).eps)
N_DRAWS = 20000
SQRT5 = math.sqrt(5.0)  # torch's default Linear/Conv init is kaiming_uniform_(a=sqrt(5))

# Torch layers as (name, torch weight shape, transposed); groups are carried by the shape.
TORCH_LAYERS = {
    "linear": ((10, 128), False),
    "conv1d": ((32, 16, 5), False),
    "conv2d": ((32, 16, 3, 5), False),
    "conv2d_groups4": ((32, 4, 3, 3), False),
    "depthwise": ((8, 1, 3, 3), False),
    "conv3d": ((6, 4, 2, 3, 2), False),
    # ConvTranspose2d(in=16, out=32, k=3): torch weight (in, out/groups, *k).
    "conv_transpose2d": ((16, 32, 3, 3), True),
}

RENAME = {
    "features.0": "Conv_0",
    "features.1": "BatchNorm_0",
    "features.3": "Conv_1",
    "classifier": "Dense_0",
}


def _make_state_dict(rng):
    """A hand-built torch state dict: conv -> bn -> grouped conv -> linear, plus 1-D, 3-D, LN."""
    f = lambda *s: rng.normal(size=s).astype(np.float32)
    return {
        "features.0.weight": f(8, 3, 3, 3),
        "features.0.bias": f(8),
        "features.1.weight": f(8) + 1,
        "features.1.bias": f(8),
        "features.1.running_mean": f(8),
        "features.1.running_var": np.abs(f(8)) + 0.5,
        "features.1.num_batches_tracked": np.array(123, np.int64),
        "features.3.weight": f(16, 4, 3, 3),  # groups=2
        "classifier.weight": f(10, 16),
        "classifier.bias": f(10),
        "seq.conv.weight": f(6, 4, 5),  # Conv1d
        "vol.weight": f(3, 2, 2, 3, 2),  # Conv3d
        "vol.bias": f(3),
        "ln.weight": f(10),
        "ln.bias": f(10),
    }


STATE_DICT = _make_state_dict(np.random.default_rng(0))

# ----------------------------------------------------------------- torch's formulas, in numpy


def torch_fan_in_of_weight(weight_shape):
    """torch.nn.init._calculate_fan_in_and_fan_out on a torch weight: size(1) * receptive."""
    return weight_shape[1] * math.prod(weight_shape[2:])


def torch_kaiming_uniform_bound(fan_in, a=SQRT5):
    """torch.nn.init.kaiming_uniform_: gain = calculate_gain("leaky_relu", a), sqrt(3) * std."""
    gain = math.sqrt(2.0 / (1 + a**2))
    return math.sqrt(3.0) * gain / math.sqrt(fan_in)


def torch_bias_bound(fan_in):
    """torch.nn.Linear/ConvNd.reset_parameters: bound = 1/sqrt(fan_in) if fan_in > 0 else 0."""
    return 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0


def flax_kernel_shape(torch_shape, transposed):
    """Flax layout of a torch weight: (*k, in/groups, out), or (*k, in, out) for ConvTranspose."""
    if len(torch_shape) == 2:
        return (torch_shape[1], torch_shape[0])
    if transposed:
        return (*torch_shape[2:], torch_shape[0], torch_shape[1])
    return (*torch_shape[2:], torch_shape[1], torch_shape[0])


def torch_conv_nd(x, w, b, groups=1):
    """The ConvNd forward of torch (cross-correlation, stride 1, no padding), NC* layout, float64."""
    c_out, c_per_group = w.shape[:2]
    k = w.shape[2:]
    spatial = tuple(s - kk + 1 for s, kk in zip(x.shape[2:], k, strict=True))
    out = np.zeros((x.shape[0], c_out, *spatial))
    out_per_group = c_out // groups
    for o in range(c_out):
        g = o // out_per_group
        for i in range(c_per_group):
            for off in itertools.product(*(range(kk) for kk in k)):
                window = tuple(slice(d, d + s) for d, s in zip(off, spatial, strict=True))
                out[:, o] += x[(slice(None), g * c_per_group + i, *window)] * w[(o, i, *off)]
        if b is not None:
            out[:, o] += b[o]
    return out


def torch_bn_train_reference(batches, m, eps):
    """BatchNorm training as torch does it, in float64 (torch's BatchNorm2d documentation).

    Normalises with the biased batch variance and updates running_mean = (1 - m) * rm + m * mean,
    running_var = (1 - m) * rv + m * unbiased_var.
    """
    c = batches[0].shape[-1]
    rm, rv = np.zeros(c), np.ones(c)
    ys = []
    for x in batches:
        x = np.asarray(x, np.float64).reshape(-1, c)
        n = x.shape[0]
        mean, var = x.mean(0), x.var(0)
        ys.append((x - mean) / np.sqrt(var + eps))
        rm = (1 - m) * rm + m * mean
        rv = (1 - m) * rv + m * var * n / (n - 1)
    return ys, rm, rv


def assert_uniform(sample, bound):
    """Draws of U(-bound, bound): in range, reach the bound, right mean and variance, KS."""
    s = np.asarray(sample, np.float64).ravel()
    n = s.size
    assert np.abs(s).max() <= bound * (1 + F32_ROUNDING)
    # P(max |u| < bound (1 - t)) = (1 - t)^n < exp(-t n) = FALSE_ALARM.
    assert np.abs(s).max() > bound * (1 + math.log(FALSE_ALARM) / n)
    # E[u^2] = bound^2 / 3 with relative standard error sqrt(REL_VAR_U2 / n).
    assert abs(np.mean(s**2) / (bound**2 / 3) - 1) < Z * math.sqrt(REL_VAR_U2 / n)
    # The mean has standard error bound / sqrt(3 n).
    assert abs(s.mean()) < Z * bound / math.sqrt(3 * n)
    assert scipy.stats.kstest(s, scipy.stats.uniform(-bound, 2 * bound).cdf).pvalue > FALSE_ALARM


# ----------------------------------------------------------------- default init


@functools.cache
def _layer_draws():
    """For every torch layer, a widened kernel and a bias, drawn in one jit.

    torch's fan-in does not see the out axis (the in axis of a transposed conv), so widening
    that axis gives N_DRAWS draws of the same distribution.
    """
    plan = {}
    for name, (torch_shape, transposed) in TORCH_LAYERS.items():
        shape = flax_kernel_shape(torch_shape, transposed)
        big = list(shape)
        big[-2 if transposed else -1] *= -(-N_DRAWS // math.prod(shape))
        plan[name] = (tuple(big), transposed, torch_fan_in_of_weight(torch_shape))

    def draw(key):
        out = {}
        for i, (name, (big, transposed, fan_in)) in enumerate(plan.items()):
            k = jax.random.fold_in(key, i)
            kernel = porting.torch_kernel_init(transposed=transposed)(k, big)
            out[name] = (kernel, porting.torch_bias_init(fan_in)(k, (N_DRAWS,)))
        return out

    return jax.tree.map(np.asarray, jax.jit(draw)(KEY))


@pytest.mark.parametrize("name", TORCH_LAYERS)
def test_fan_in_matches_torch(name):
    """torch_fan_in of the Flax kernel equals torch's fan-in of the weight."""
    torch_shape, transposed = TORCH_LAYERS[name]
    shape = flax_kernel_shape(torch_shape, transposed)
    assert porting.torch_fan_in(shape, transposed=transposed) == torch_fan_in_of_weight(torch_shape)


@pytest.mark.parametrize("name", TORCH_LAYERS)
def test_kernel_and_bias_distribution(name):
    """Kernel and bias are U(+-1/sqrt(fan_in)) with the weight's fan-in."""
    torch_shape, transposed = TORCH_LAYERS[name]
    fan_in = torch_fan_in_of_weight(torch_shape)
    w, b = _layer_draws()[name]
    assert w.dtype == b.dtype == np.float32
    # The layer's own shape goes through the same code; tracing it (no compile) checks the shape.
    shape = flax_kernel_shape(torch_shape, transposed)
    init = porting.torch_kernel_init(transposed=transposed)
    assert jax.eval_shape(lambda k: init(k, shape), KEY) == jax.ShapeDtypeStruct(shape, jnp.float32)
    assert_uniform(w, torch_kaiming_uniform_bound(fan_in))
    assert_uniform(b, torch_bias_bound(fan_in))
    # kaiming_uniform(a=sqrt(5)) is U(+-1/sqrt(fan_in)), torch's documented Linear init; the two
    # formulas differ by float64 rounding only (pytest.approx's default relative 1e-6).
    assert torch_kaiming_uniform_bound(fan_in) == pytest.approx(1 / math.sqrt(fan_in))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_bias_equals_jax_uniform(jit):
    """The float32 bias is jax.random.uniform's draw, eager and under jit."""
    init = lambda k: porting.torch_bias_init(36)(k, (8,))
    b = (jax.jit(init) if jit else init)(KEY)
    ref = jax.random.uniform(KEY, (8,), jnp.float32, -1 / 6, 1 / 6)
    np.testing.assert_array_equal(b, ref)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_dtypes(dtype):
    """16- and 32-bit dtypes come out as asked; the call's dtype overrides the builder's."""
    w = porting.torch_kernel_init()(KEY, (64, 32), dtype)
    b = porting.torch_bias_init(64)(KEY, (32,), dtype)
    assert w.dtype == b.dtype == dtype
    # 1/8 is exact in every float format, so rounding cannot carry a draw past it.
    assert float(jnp.abs(b).max()) <= 1 / math.sqrt(64)
    # The builder's dtype is the default; the call's dtype wins.
    assert porting.torch_bias_init(64, dtype)(KEY, (2,)).dtype == dtype
    assert porting.torch_bias_init(64, dtype)(KEY, (2,), jnp.float32).dtype == jnp.float32


@pytest.mark.parametrize("shape", [(5,), (0,), (2, 3)])
def test_zero_fan_in_bias_is_zero(shape):
    """A fan-in of 0 gives a zero bias, as in torch."""
    np.testing.assert_array_equal(
        porting.torch_bias_init(0)(KEY, shape), np.zeros(shape, np.float32)
    )


def _auto_mesh():
    return Mesh(np.array(jax.devices()).reshape(2, 4), ("x", "y"))


def _explicit_mesh():
    return jax.make_mesh((2, 4), ("x", "y"), axis_types=(AxisType.Explicit,) * 2)


@pytest.mark.parametrize("fan_in", [0, 9])
@pytest.mark.parametrize(
    "mesh_fn, bare_spec, jit",
    [
        (_auto_mesh, False, False),
        (_auto_mesh, False, True),
        (_explicit_mesh, False, False),
        (_explicit_mesh, True, False),
    ],
    ids=["auto", "auto_jit", "explicit", "explicit_spec_under_set_mesh"],
)
def test_bias_out_sharding(mesh_fn, bare_spec, jit, fan_in):
    """out_sharding on Auto and Explicit meshes: the unsharded values, laid out as asked."""
    mesh, spec, shape = mesh_fn(), P("x", "y"), (4, 8)
    want = NamedSharding(mesh, spec)
    init = lambda k: porting.torch_bias_init(fan_in)(
        k, shape, out_sharding=spec if bare_spec else want
    )
    if bare_spec:
        with jax.set_mesh(mesh):
            b = init(KEY)
    else:
        b = (jax.jit(init) if jit else init)(KEY)
    assert b.sharding == want
    np.testing.assert_array_equal(b, porting.torch_bias_init(fan_in)(KEY, shape))


def test_bad_input():
    """Bad fan-ins, dtypes and kernel shapes are rejected at the right time."""
    with pytest.raises(ValueError, match=r"fan_in.*-1"):
        porting.torch_bias_init(-1)
    for fan_in in (2.5, True):
        with pytest.raises(ValueError, match="fan_in"):
            porting.torch_bias_init(fan_in)
    for dtype in (jnp.int32, jnp.complex64):
        with pytest.raises(TypeError, match="torch_bias_init"):
            porting.torch_bias_init(4)(KEY, (3,), dtype)
        with pytest.raises(TypeError, match="torch_bias_init"):
            porting.torch_bias_init(4, dtype)
    with pytest.raises(ValueError, match="rank >= 2"):
        porting.torch_fan_in((5,))
    with pytest.raises(ValueError, match="negative"):
        porting.torch_fan_in((3, -1))
    with pytest.raises(TypeError, match="floating"):
        porting.torch_init_params({"fc": {"kernel": jnp.zeros((2, 2), jnp.int32)}}, KEY)


# ----------------------------------------------------------------- torch_init_params


class CNN(nn.Module):
    """Dense, Conv, grouped Conv, ConvTranspose and BatchNorm."""

    @nn.compact
    def __call__(self, x):
        """Applies the layers."""
        x = nn.Conv(16, (3, 3), padding="VALID", name="conv")(x)
        x = nn.Conv(16, (3, 3), feature_group_count=4, name="grouped")(x)
        x = nn.BatchNorm(use_running_average=True, name="bn")(x)
        x = nn.ConvTranspose(8, (2, 2), name="up")(x)
        return nn.Dense(300, name="head")(x.mean((1, 2)))


# The torch weight each CNN layer stands for.
CNN_TORCH_SHAPES = {
    "conv": (16, 8, 3, 3),
    "grouped": (16, 4, 3, 3),
    "up": (16, 8, 2, 2),
    "head": (300, 8),
}


def test_linen_tree():
    """A linen tree: every Dense/Conv layer re-drawn with its torch bound, the rest kept."""
    model, x = CNN(), jnp.ones((2, 12, 12, 8))
    variables = jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(model.init, KEY, x)
    )
    params = variables["params"]
    new = porting.torch_init_params(params, KEY, transposed=lambda path: path[-1] == "up")
    chex.assert_trees_all_equal_shapes_and_dtypes(new, params)
    # Batch-norm parameters are left alone (torch's defaults, ones and zeros, match Flax's).
    chex.assert_trees_all_equal(new["bn"], params["bn"])
    for name, torch_shape in CNN_TORCH_SHAPES.items():
        fan_in = torch_fan_in_of_weight(torch_shape)
        kernel, bias = np.asarray(new[name]["kernel"]), np.asarray(new[name]["bias"])
        bound = torch_kaiming_uniform_bound(fan_in)
        assert np.abs(kernel).max() <= bound * (1 + F32_ROUNDING), name
        assert np.abs(bias).max() <= torch_bias_bound(fan_in) * (1 + F32_ROUNDING), name
        assert np.any(bias != 0), name
        # The bound is reached, so the kernel is not drawn with a larger fan-in either:
        # P(max |u| < bound (1 - t)) < exp(-t n) = FALSE_ALARM.
        assert np.abs(kernel).max() > bound * (1 + math.log(FALSE_ALARM) / kernel.size), name
    # The largest layer's second moment, against torch's bound^2 / 3.
    kernel = np.asarray(new["head"]["kernel"], np.float64)
    ratio = np.mean(kernel**2) / (torch_kaiming_uniform_bound(8) ** 2 / 3)
    assert abs(ratio - 1) < Z * math.sqrt(REL_VAR_U2 / kernel.size)
    # The model still runs.
    jax.jit(model.apply)({**variables, "params": new}, x)


def test_deterministic_and_independent_per_layer():
    """Draws depend on the key and the layer's path only."""
    dense = {"kernel": jnp.zeros((4, 3))}
    params = {"x": dense, "y": dense}
    a = porting.torch_init_params(params, KEY)
    chex.assert_trees_all_equal(porting.torch_init_params(params, KEY), a)
    # A layer's draws depend on its path and the key, not on the rest of the tree.
    chex.assert_trees_all_equal(porting.torch_init_params({"x": dense}, KEY)["x"], a["x"])
    # Layers of the same shape get different draws, and another key gives other values.
    assert not np.array_equal(a["x"]["kernel"], a["y"]["kernel"])
    other = porting.torch_init_params(params, jax.random.key(4))
    assert not np.array_equal(a["x"]["kernel"], other["x"]["kernel"])


def test_nnx_state():
    """An nnx.State goes through and back into the model."""

    class Net(nnx.Module):
        def __init__(self, rngs):
            z = nnx.initializers.zeros
            self.conv = nnx.Conv(8, 16, (3, 3), feature_group_count=2, kernel_init=z, rngs=rngs)
            self.fc = nnx.Linear(16, 400, kernel_init=z, rngs=rngs)

    model = Net(nnx.Rngs(0))
    nnx.update(model, porting.torch_init_params(nnx.state(model, nnx.Param), KEY))
    for layer, torch_shape in ((model.conv, (16, 4, 3, 3)), (model.fc, (400, 16))):
        fan_in = torch_fan_in_of_weight(torch_shape)
        kernel, bias = np.asarray(layer.kernel[...]), np.asarray(layer.bias[...])
        bound = torch_kaiming_uniform_bound(fan_in)
        assert np.abs(kernel).max() <= bound * (1 + F32_ROUNDING)
        # P(max |u| < bound (1 - t)) < exp(-t n) = FALSE_ALARM.
        assert np.abs(kernel).max() > bound * (1 + math.log(FALSE_ALARM) / kernel.size)
        assert np.any(bias != 0)
        assert np.abs(bias).max() <= torch_bias_bound(fan_in) * (1 + F32_ROUNDING)


def test_presets_in_a_flax_layer():
    """kernel_init and bias_init presets work in nn.Dense."""
    layer = nn.Dense(
        400, kernel_init=porting.torch_kernel_init(), bias_init=porting.torch_bias_init(64)
    )
    p = jax.jit(layer.init)(KEY, jnp.ones((1, 64)))["params"]
    assert_uniform(p["kernel"], 1 / math.sqrt(64))
    assert float(jnp.abs(p["bias"]).max()) <= 1 / math.sqrt(64)


# ----------------------------------------------------------------- batch norm


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (
            {"momentum": 0.1, "eps": 1e-3},
            {"momentum": 0.9, "epsilon": 1e-3, "unbiased_running_var": True, "axis": -1},
        ),
        ({"channels_last": False}, {"axis": 1}),
        ({"momentum": 1.0}, {"momentum": 0.0}),
    ],
)
def test_batch_norm_kwargs(kwargs, expected):
    """The kwargs turn torch's momentum into Flax's decay; eps and layout carry over."""
    kw = porting.torch_batch_norm_kwargs(**kwargs)
    assert {k: kw[k] for k in expected} == expected


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"momentum": None}, "cumulative"),
        ({"momentum": 0.0}, "momentum"),
        ({"momentum": -0.1}, "momentum"),
        ({"momentum": 1.5}, "momentum"),
        ({"momentum": True}, "momentum"),
        ({"eps": -1.0}, "eps"),
    ],
)
def test_batch_norm_kwargs_bad_input(kwargs, match):
    """Momentum None, outside (0, 1] or a bool, and a negative eps, are rejected."""
    with pytest.raises(ValueError, match=match):
        porting.torch_batch_norm_kwargs(**kwargs)


# float32 normalisation against a float64 reference of unit-scale outputs.
BN_TOL = {"rtol": 1e-4, "atol": 1e-4}
# float32 running statistics against float64: a few ulps of accumulated rounding.
STATS_TOL = {"rtol": 1e-5, "atol": 1e-6}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_pure_batch_norm_matches_torch(jit):
    """ji.batch_norm with the kwargs trains like torch's BatchNorm."""
    m, eps = 0.3, 1e-3
    rng = np.random.default_rng(0)
    batches = [rng.normal(2.0, 3.0, (6, 4, 5)).astype(np.float32) for _ in range(4)]
    ys_ref, rm, rv = torch_bn_train_reference(batches, m, eps)
    kw = porting.torch_batch_norm_kwargs(momentum=m, eps=eps)
    step = lambda x, s: ji.batch_norm(x, s, training=True, **kw)
    step = jax.jit(step) if jit else step
    state = ji.batch_norm_state(5)
    for x, y_ref in zip(batches, ys_ref, strict=True):
        y, state = step(jnp.asarray(x), state)
        np.testing.assert_allclose(np.asarray(y).reshape(-1, 5), y_ref, **BN_TOL)
    np.testing.assert_allclose(state.mean, rm, **STATS_TOL)
    np.testing.assert_allclose(state.var, rv, **STATS_TOL)


def test_linen_batch_norm_matches_torch_channels_first():
    """jaxinit.linen.BatchNorm on NCHW data trains like torch's."""
    m, eps = 0.1, 1e-5
    rng = np.random.default_rng(1)
    batches = [rng.normal(-1.0, 0.5, (4, 3, 5, 5)).astype(np.float32) for _ in range(3)]
    # torch's NCHW batches; the reference works channels-last.
    ys_ref, rm, rv = torch_bn_train_reference([b.transpose(0, 2, 3, 1) for b in batches], m, eps)
    bn = jil.BatchNorm(
        use_running_average=False, **porting.torch_batch_norm_kwargs(m, eps, channels_last=False)
    )
    variables = bn.init(KEY, jnp.asarray(batches[0]))
    step = jax.jit(lambda v, x: bn.apply(v, x, mutable=["batch_stats"]))
    for x, y_ref in zip(batches, ys_ref, strict=True):
        y, upd = step(variables, jnp.asarray(x))
        variables = {**variables, **upd}
        y_nhwc = np.asarray(y).transpose(0, 2, 3, 1).reshape(-1, 3)
        np.testing.assert_allclose(y_nhwc, y_ref, **BN_TOL)
    np.testing.assert_allclose(variables["batch_stats"]["mean"], rm, **STATS_TOL)
    np.testing.assert_allclose(variables["batch_stats"]["var"], rv, **STATS_TOL)


# ----------------------------------------------------------------- state dicts


class TorchNet(nn.Module):
    """The Flax twin of STATE_DICT's conv/bn/conv/linear part (NHWC)."""

    @nn.compact
    def __call__(self, x):
        """Applies the layers."""
        x = nn.Conv(8, (3, 3), padding="VALID", name="Conv_0")(x)
        x = nn.BatchNorm(use_running_average=True, name="BatchNorm_0")(x)
        x = nn.Conv(
            16, (3, 3), padding="VALID", feature_group_count=2, use_bias=False, name="Conv_1"
        )(x)
        return nn.Dense(10, name="Dense_0")(x.mean((1, 2)))


def test_layouts_elementwise():
    """Every kind of tensor lands at the right index of the right Flax leaf."""
    sd = STATE_DICT
    v = porting.torch_state_dict_to_flax(sd)
    p = v["params"]
    k, w = p["features"]["0"]["kernel"], sd["features.0.weight"]
    assert k.shape == (3, 3, 3, 8)
    for o, i, h, ww in itertools.product(range(8), range(3), range(3), range(3)):
        assert k[h, ww, i, o] == w[o, i, h, ww]
    k = p["classifier"]["kernel"]
    for o, i in itertools.product(range(10), range(16)):
        assert k[i, o] == sd["classifier.weight"][o, i]
    assert p["seq"]["conv"]["kernel"].shape == (5, 4, 6)
    k3, w3 = p["vol"]["kernel"], sd["vol.weight"]
    assert k3.shape == (2, 3, 2, 2, 3)
    assert k3[1, 2, 0, 1, 2] == w3[2, 1, 1, 2, 0]
    np.testing.assert_array_equal(p["ln"]["scale"], sd["ln.weight"])
    bn_p, bn_s = p["features"]["1"], v["batch_stats"]["features"]["1"]
    np.testing.assert_array_equal(bn_p["scale"], sd["features.1.weight"])
    np.testing.assert_array_equal(bn_p["bias"], sd["features.1.bias"])
    np.testing.assert_array_equal(bn_s["mean"], sd["features.1.running_mean"])
    np.testing.assert_array_equal(bn_s["var"], sd["features.1.running_var"])
    assert sorted(bn_s) == ["mean", "var"]


@pytest.mark.parametrize("keep_count", [False, True])
def test_round_trip(keep_count):
    """Converting to Flax and back gives the torch state dict back, dtypes included."""
    v = porting.torch_state_dict_to_flax(STATE_DICT, keep_count=keep_count)
    back = porting.flax_to_torch_state_dict(v)
    expected = dict(STATE_DICT)
    if not keep_count:
        expected["features.1.num_batches_tracked"] = np.array(0, np.int64)
    assert sorted(back) == sorted(expected)
    for name, arr in expected.items():
        assert back[name].dtype == arr.dtype, name
        np.testing.assert_array_equal(back[name], arr, err_msg=name)


def test_round_trip_with_rename_and_embedding():
    """A rename map and kinds={'emb': 'embed'} round-trip."""
    sd = {"emb.weight": np.arange(12.0).reshape(4, 3), **STATE_DICT}
    rename = {**RENAME, "emb": "encoder/Embed_0"}
    v = porting.torch_state_dict_to_flax(sd, rename=rename, kinds={"emb": "embed"})
    np.testing.assert_array_equal(v["params"]["encoder"]["Embed_0"]["embedding"], sd["emb.weight"])
    back = porting.flax_to_torch_state_dict(v, rename=rename)
    assert sorted(back) == sorted(sd)
    for name in sd:
        if name != "features.1.num_batches_tracked":
            np.testing.assert_array_equal(back[name], sd[name], err_msg=name)


def test_batch_norm_without_affine_round_trip():
    """A BatchNorm with affine=False has statistics only."""
    sd = {"bn.running_mean": np.zeros(3), "bn.running_var": np.ones(3)}
    v = porting.torch_state_dict_to_flax(sd)
    assert v["params"] == {}
    assert sorted(porting.flax_to_torch_state_dict(v)) == [
        "bn.num_batches_tracked",
        "bn.running_mean",
        "bn.running_var",
    ]


# float32 Flax convolutions against a float64 reference of O(10) outputs.
FORWARD_TOL = {"rtol": 1e-4, "atol": 1e-4}


def test_converted_model_matches_torch_forward():
    """The converted Flax model computes torch's forward pass."""
    sd = {k: v for k, v in STATE_DICT.items() if k.split(".")[0] in ("features", "classifier")}
    v = porting.torch_state_dict_to_flax(sd, rename=RENAME)
    model = TorchNet()
    x_nchw = np.random.default_rng(1).normal(size=(2, 3, 9, 9)).astype(np.float32)
    x = jnp.asarray(x_nchw.transpose(0, 2, 3, 1))
    ref_tree = jax.eval_shape(model.init, KEY, x)
    chex.assert_trees_all_equal_shapes_and_dtypes(
        jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), v),
        {k: ref_tree[k] for k in ("params", "batch_stats")},
    )
    y = jax.jit(model.apply)(v, x)
    # torch's forward in float64 on NCHW: conv -> eval BN -> grouped conv -> mean -> linear.
    h = torch_conv_nd(x_nchw.astype(np.float64), sd["features.0.weight"], sd["features.0.bias"])
    rm, rv = sd["features.1.running_mean"], sd["features.1.running_var"]
    g, b = sd["features.1.weight"], sd["features.1.bias"]
    s = (slice(None), None, None)
    h = (h - rm[s]) / np.sqrt(rv[s] + 1e-5) * g[s] + b[s]  # eps: torch's and Flax's default
    h = torch_conv_nd(h, sd["features.3.weight"], None, groups=2).mean((2, 3))
    ref = h @ sd["classifier.weight"].T.astype(np.float64) + sd["classifier.bias"]
    np.testing.assert_allclose(y, ref, **FORWARD_TOL)


@pytest.mark.parametrize("nd", [1, 3])
def test_conv_nd_forward(nd):
    """Converted Conv1d/Conv3d weights (groups=2) compute torch's convolution."""
    rng = np.random.default_rng(nd)
    w = rng.normal(size=(6, 2, *(2,) * nd)).astype(np.float32)  # groups=2, in=4
    b = rng.normal(size=6).astype(np.float32)
    x = rng.normal(size=(2, 4, *(5,) * nd)).astype(np.float32)
    p = porting.conv_from_torch(w, b)
    conv = nn.Conv(6, (2,) * nd, padding="VALID", feature_group_count=2)
    perm = (0, *range(2, nd + 2), 1)
    y = jax.jit(conv.apply)({"params": p}, jnp.asarray(x.transpose(perm)))
    ref = torch_conv_nd(x.astype(np.float64), w, b, groups=2)
    np.testing.assert_allclose(y, ref.transpose(perm), **FORWARD_TOL)
    np.testing.assert_array_equal(porting.conv_to_torch(p)["weight"], w)
    np.testing.assert_array_equal(porting.conv_to_torch(p)["bias"], b)


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: porting.torch_state_dict_to_flax({"attn.in_proj_weight": np.zeros((6, 2))}),
            r"attn\.in_proj_weight",
        ),
        (
            lambda: porting.torch_state_dict_to_flax(
                {"fc.weight": np.zeros((2, 2))}, kinds={"fc": "dense"}
            ),
            r"kinds\['fc'\].*'dense'",
        ),
        (
            lambda: porting.torch_state_dict_to_flax(
                {"a.weight": np.zeros((2, 2)), "b.weight": np.zeros((2, 2))},
                rename={"a": "x", "b": "x"},
            ),
            "same Flax path",
        ),
        (
            lambda: porting.torch_state_dict_to_flax({"m.bias": np.zeros(2)}),
            r"layer type of torch module 'm'",
        ),
        (
            lambda: porting.torch_state_dict_to_flax({"m.weight": np.zeros((1,) * 6)}),
            "unsupported rank 6",
        ),
        (
            lambda: porting.torch_state_dict_to_flax(
                {"e.weight": np.zeros(3), "e.bias": np.zeros(3)}, kinds={"e": "embed"}
            ),
            r"'e' \(embed\).*\['e\.bias'\]",
        ),
        (
            lambda: porting.torch_state_dict_to_flax(
                {"e.weight": np.zeros(3)}, kinds={"e": "embed"}
            ),
            "embedding 'e' must be 2-D",
        ),
        (
            lambda: porting.torch_state_dict_to_flax(
                {"fc.bias": np.zeros(3)}, kinds={"fc": "linear"}
            ),
            r"'fc' \(linear\) lacks tensors \['fc\.weight'\]",
        ),
        (
            lambda: porting.linear_from_torch(np.zeros((10, 4)), np.zeros(3)),
            r"bias must have shape \(10,\)",
        ),
        (lambda: porting.linear_from_torch(np.zeros((10, 4, 1))), "2-D"),
        (lambda: porting.linear_to_torch({"kernel": np.zeros(3)}), "2-D"),
        (lambda: porting.conv_from_torch(np.zeros((10, 4))), "rank 3 to 5"),
        (lambda: porting.conv_to_torch({"kernel": np.zeros((10, 4))}), "rank 3 to 5"),
        (
            lambda: porting.batch_norm_from_torch(np.ones(3), np.zeros(3)),
            "running_mean and running_var",
        ),
        (
            lambda: porting.batch_norm_from_torch(np.ones(2), None, np.zeros(3), np.ones(3)),
            r"weight must have shape \(3,\)",
        ),
        (
            lambda: porting.batch_norm_from_torch(None, None, np.zeros(3), np.ones(2)),
            "same shape",
        ),
        (
            lambda: porting.flax_to_torch_state_dict({"params": {"m": {"w": np.zeros(3)}}}),
            r"cannot convert Flax parameters \['w'\] at 'm'",
        ),
    ],
)
def test_state_dict_bad_input(call, match):
    """Each conversion error names what it cannot convert."""
    with pytest.raises(ValueError, match=match):
        call()


def test_non_array_tensor_is_a_type_error():
    """A non-array tensor is a TypeError naming the tensor."""
    with pytest.raises(TypeError, match=r"fc\.weight must be array-like"):
        porting.torch_state_dict_to_flax({"fc.weight": object()})


def test_import_needs_no_flax():
    """Importing jaxinit.porting does not import flax."""
    code = (
        "import sys, jaxinit, jaxinit.porting; "
        "assert not [m for m in sys.modules if m == 'flax' or m.startswith('flax.')]"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
