"""einsum_axes against hand-derived fans, and dense_general_kernel_init against Flax."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers_init import auto_mesh
from jax.nn import initializers as jinit
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxinit as ji

KEY = jax.random.key(7)
D, N, H, F, E, B = 16, 4, 8, 64, 3, 5

# ----------------------------------------------------------------------------- einsum_axes

# (equation, kernel operand, kernel shape, expected axes, expected (fan_in, fan_out)).
CASES = {
    "attention qkv": ("btd,dnh->btnh", 1, (D, N, H), ((0,), (1, 2), ()), (D, N * H)),
    "attention out": ("btnh,nhd->btd", 1, (N, H, D), ((0, 1), (2,), ()), (N * H, D)),
    "mlp": ("btd,df->btf", 1, (D, F), ((0,), (1,), ()), (D, F)),
    "experts": ("ebd,edf->ebf", 1, (E, D, F), ((1,), (2,), (0,)), (D, F)),
    "kernel first": ("dnh,btd->btnh", 0, (D, N, H), ((0,), (1, 2), ()), (D, N * H)),
    "ellipsis": ("...d,dnh->...nh", 1, (D, N, H), ((0,), (1, 2), ()), (D, N * H)),
    "spaces": (" btd , dnh -> btnh ", 1, (D, N, H), ((0,), (1, 2), ()), (D, N * H)),
    "kernel's order": ("btd,hnd->bthn", 1, (H, N, D), ((2,), (0, 1), ()), (D, H * N)),
    "implicit": ("btd,dh", 1, (D, H), ((0,), (1,), ()), (D, H)),
    "implicit ellipsis": ("...d,dh", 1, (D, H), ((0,), (1,), ()), (D, H)),
    "implicit experts": ("ebd,edf", 1, (E, D, F), ((0, 1), (2,), ()), (E * D, F)),
    # Patches (b, h, w, kh, kw, cin): the spatial axes are summed away, so they are inputs.
    "conv patches": ("bhwxyc,xyco->bhwo", 1, (3, 3, 8, 16), ((0, 1, 2), (3,), ()), (72, 16)),
}


@pytest.mark.parametrize("name", CASES)
def test_einsum_axes_gives_hand_derived_fans(name):
    eq, kernel, shape, (in_axis, out_axis, batch_axis), fans = CASES[name]
    axes = ji.einsum_axes(eq, kernel=kernel)
    assert axes == {"in_axis": in_axis, "out_axis": out_axis, "batch_axis": batch_axis}
    assert ji.compute_fans(shape, **axes) == fans


def test_implicit_output_is_numpys():
    # numpy's implicit output: indices appearing once, sorted (uppercase first), ellipsis first.
    for implicit, explicit, shapes in [
        ("btd,dh", "btd,dh->bht", ((2, 3, 5), (5, 7))),
        ("bZ,Za", "bZ,Za->ab", ((2, 3), (3, 4))),
        ("bD,DC", "bD,DC->Cb", ((2, 3), (3, 4))),
        ("...d,dh", "...d,dh->...h", ((2, 3, 5), (5, 7))),
        ("ebd,edf", "ebd,edf->bf", ((2, 3, 5), (2, 5, 7))),
    ]:
        ops = [np.zeros(s) for s in shapes]
        assert np.einsum(implicit, *ops).shape == np.einsum(explicit, *ops).shape, implicit
        assert ji.einsum_axes(implicit) == ji.einsum_axes(explicit), implicit


def test_conv_as_einsum_matches_conv_fan_in_not_fan_out():
    shape = (3, 3, 8, 16)
    fan_in, fan_out = ji.compute_fans(shape, **ji.einsum_axes("bhwxyc,xyco->bhwo"))
    conv_in, conv_out = ji.compute_fans(shape)
    assert fan_in == conv_in == 3 * 3 * 8
    assert (fan_out, conv_out) == (16, 3 * 3 * 16)


def test_raw_shape_fans_of_an_einsum_kernel_are_wrong():
    # A (D, N, H) query kernel under the default axes: inputs N, receptive field D.
    assert ji.compute_fans((D, N, H)) == (N * D, H * D)
    assert ji.compute_fans((D, N, H), **ji.einsum_axes("btd,dnh->btnh")) == (D, N * H)


BAD_EQUATIONS = [
    ("btd,dnh->btnh->x", {}, "more than one '->'"),
    ("bt1,dnh->btnh", {}, "invalid character.*'1'"),
    ("btd,dn_h->btnh", {}, "invalid character.*'_'"),
    ("btd,dh-bth", {}, "'-' or '>'"),
    ("b.td,dh->bth", {}, "dots that are not '...'"),
    ("....d,dh->...h", {}, "dots that are not '...'"),
    ("...d...,dh->h", {}, "more than one '...'"),
    ("btd,dh->bt..h", {}, "output 'bt..h' has dots"),
    ("btd,dnh->btnz", {}, "output index 'z'.*neither input"),
    ("btd,dnh->btnn", {}, "output index 'n' appears more than once"),
    ("btd,dnh->...nh", {}, "ellipsis but no input does"),
    ("btd->bt", {}, "1 operand"),
    ("a,b,c->abc", {}, "3 operand"),
    ("", {}, "1 operand"),
    ("btd,...dh->bth", {}, "kernel operand '...dh'.*has an ellipsis"),
    ("...dh,btd->bth", {"kernel": 0}, "kernel operand '...dh'.*has an ellipsis"),
    ("btd,dnh->btnh", {"kernel": 2}, "kernel=2 must be 0 or 1"),
    ("btd,dnh->btnh", {"kernel": -1}, "kernel=-1 must be 0 or 1"),
    ("btd,dnh->btnh", {"kernel": True}, "kernel=True must be 0 or 1"),
    ("btd,dnh->btnh", {"kernel": 1.0}, "kernel=1.0 must be 0 or 1"),
    ("btd,ddh->bth", {}, "index 'd' is repeated in the kernel"),
    ("btd,dzh->bth", {}, "kernel index 'z'.*neither the output nor the activation"),
    ("btd,nh->btnh", {}, "no index summed"),
    ("btd,bth->bth", {}, "no index summed"),
]


@pytest.mark.parametrize(("eq", "kwargs", "match"), BAD_EQUATIONS, ids=lambda x: str(x))
def test_einsum_axes_errors(eq, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ji.einsum_axes(eq, **kwargs)


def test_einsum_axes_type_error():
    with pytest.raises(TypeError, match="equation must be a str"):
        ji.einsum_axes(b"btd,dh->bth")


# ----------------------------------------------------------------------------- Flax layers

# Every draw below has one of two shapes, (B, D, F) or the two-batch kernel and its flat view, so
# the eagerly compiled sampler ops are shared between tests.
BATCH2, IN2, OUT2 = (2, 3), (4, 5), (6, 7)
KERNEL2 = (*BATCH2, *IN2, *OUT2)
FLAT_DRAW2 = (6, 20, 42)


def _recording(init, log):
    """``init``, appending ``(key, shape)`` of every call to ``log``."""

    def rec(key, shape, dtype=None, out_sharding=None):
        log.append((key, tuple(shape)))
        return init(key, shape, dtype)

    return rec


def _recording_builder(builder, log):
    """``builder``, whose initializers record their calls in ``log``."""
    return lambda **kw: _recording(builder(**kw), log)


def _zeros(key, shape, dtype=None):
    return jnp.zeros(shape, dtype)


def test_flax_einsum_gets_the_raw_kernel_shape():
    eq = "ebd,edf->ebf"
    axes = ji.einsum_axes(eq)
    log = []
    layer = nn.Einsum(
        (B, D, F), eq, use_bias=False, kernel_init=_recording(ji.lecun_normal(**axes), log)
    )
    kernel = layer.init(KEY, jnp.ones((B, 2, D)))["params"]["kernel"]
    [(key, shape)] = log
    # The raw shape: the default axes would count the expert axis as receptive field.
    assert shape == (B, D, F) and ji.compute_fans(shape) == (B * D, B * F)
    assert ji.compute_fans(shape, **axes) == (D, F)
    np.testing.assert_array_equal(kernel, ji.lecun_normal(**axes)(key, shape))


def test_linen_dense_general_kernel_equals_the_einsum_draw():
    # DenseGeneral(features=F, axis=-1, batch_dims=(0,)) on (B, N, I) is "bni,bif->bnf".
    x = jnp.ones((B, 2, D))
    log = []
    init = ji.dense_general_kernel_init(_recording_builder(ji.lecun_normal, log), B)
    layer = nn.DenseGeneral(features=F, axis=-1, batch_dims=(0,), kernel_init=init)
    kernel = layer.init(KEY, x)["params"]["kernel"]
    [(key, shape)] = log
    assert shape == kernel.shape == (B, D, F)
    want = ji.lecun_normal(**ji.einsum_axes("bni,bif->bnf"))(key, kernel.shape)
    np.testing.assert_array_equal(kernel, want)


def test_linen_dense_general_default_folds_the_batch_into_fan_in():
    log = []
    layer = nn.DenseGeneral(
        features=F, axis=-1, batch_dims=(0,), kernel_init=_recording(_zeros, log)
    )
    layer.init(KEY, jnp.ones((B, 2, D)))
    [(_, shape)] = log
    assert shape == (B * D, F) and ji.compute_fans(shape) == (B * D, F)


def test_linen_dense_general_two_batch_two_contracted_two_feature_axes():
    x = jnp.ones((*BATCH2, 1, *IN2))  # (b, c, n, i, j)
    log = []
    init = ji.dense_general_kernel_init(_recording_builder(ji.lecun_normal, log), BATCH2)
    layer = nn.DenseGeneral(
        features=OUT2, axis=(-2, -1), batch_dims=(0, 1), kernel_init=init, use_bias=False
    )
    kernel = layer.init(KEY, x)["params"]["kernel"]
    [(key, shape)] = log
    assert kernel.shape == KERNEL2 and shape == FLAT_DRAW2
    axes = ji.einsum_axes("bcnij,bcijfg->bcnfg")
    assert ji.compute_fans(KERNEL2, **axes) == (20, 42)
    np.testing.assert_array_equal(kernel, ji.lecun_normal(**axes)(key, KERNEL2))


def test_nnx_linear_general_kernel_equals_the_einsum_draw():
    log = []
    init = ji.dense_general_kernel_init(_recording_builder(ji.he_normal, log), BATCH2)
    batch_axis = dict(enumerate(BATCH2))
    layer = nnx.LinearGeneral(
        IN2, OUT2, axis=(-2, -1), batch_axis=batch_axis, kernel_init=init, rngs=nnx.Rngs(3)
    )
    kernel = layer.kernel[...]
    [(key, shape)] = log
    assert kernel.shape == KERNEL2 and shape == FLAT_DRAW2
    want = ji.he_normal(**ji.einsum_axes("bcnij,bcijfg->bcnfg"))(key, KERNEL2)
    np.testing.assert_array_equal(kernel, want)

    default_log = []
    nnx.LinearGeneral(
        IN2,
        OUT2,
        axis=(-2, -1),
        batch_axis=batch_axis,
        kernel_init=_recording(_zeros, default_log),
        use_bias=False,
        rngs=nnx.Rngs(3),
    )
    [(_, default_shape)] = default_log
    assert default_shape == (6 * 20, 42)


@pytest.mark.parametrize(
    "builder",
    [
        jinit.lecun_normal,
        functools.partial(ji.variance_scaling, 2.0, "fan_in", "truncated_normal"),
    ],
    ids=["jax lecun_normal", "partial variance_scaling"],
)
def test_dense_general_kernel_init_accepts_any_axis_builder(builder):
    init = ji.dense_general_kernel_init(builder, (B,))
    w = init(KEY, (B * D, F), jnp.float32)
    want = builder(in_axis=1, out_axis=2, batch_axis=0)(KEY, (B, D, F), jnp.float32)
    assert w.shape == (B * D, F) and w.dtype == jnp.float32
    np.testing.assert_array_equal(w, np.asarray(want).reshape(B * D, F))


def test_dense_general_kernel_init_dtype_kwargs_and_sharding():
    init = ji.dense_general_kernel_init(ji.lecun_normal, B, dtype=jnp.bfloat16)
    assert init(KEY, (B * D, F)).dtype == jnp.bfloat16  # the builder's default dtype
    w32 = init(KEY, (B * D, F), jnp.float32)
    assert w32.dtype == jnp.float32
    sharding = NamedSharding(auto_mesh(), P("a"))
    w = init(KEY, (B * D, F), jnp.float32, out_sharding=sharding)
    assert w.sharding == NamedSharding(auto_mesh(), P("a", None))
    np.testing.assert_array_equal(w, w32)


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (("lecun", 2), {}, TypeError, "builder must be a callable"),
        ((ji.lecun_normal, 0), {}, ValueError, "batch_shape .*got 0"),
        ((ji.lecun_normal, (2, -1)), {}, ValueError, r"batch_shape .*got \(2, -1\)"),
        ((ji.lecun_normal, 2.0), {}, TypeError, "batch_shape .*got 2.0"),
        ((ji.lecun_normal, True), {}, TypeError, "batch_shape .*got True"),
        ((ji.lecun_normal, (2, True)), {}, TypeError, "batch_shape"),
        ((ji.lecun_normal, "ab"), {}, TypeError, "batch_shape"),
        ((ji.xavier_normal, 2), {"gain": -1.0}, ValueError, "gain must be finite and >= 0"),
        ((ji.lecun_normal, 2), {"scale": 2.0}, TypeError, "scale"),
        ((lambda **kw: None, 2), {}, TypeError, "builder returned None"),
    ],
)
def test_dense_general_kernel_init_build_errors(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        ji.dense_general_kernel_init(*args, **kwargs)


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((6, 4, 2), r"batch_shape=\(3,\), got \(6, 4, 2\).*rank 2"),
        ((7, 4), r"batch_shape=\(3,\), got \(7, 4\).*divisible by 3"),
        ((6.0, 4), "shape must be a sequence of ints"),
    ],
)
def test_dense_general_kernel_init_call_errors(shape, match):
    init = ji.dense_general_kernel_init(ji.lecun_normal, 3)
    with pytest.raises(ValueError, match=match):
        init(KEY, shape)
