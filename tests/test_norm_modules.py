"""jaxinit.linen / jaxinit.nnx LayerNorm, RMSNorm, GroupNorm and InstanceNorm against flax's.

Each module is compared with its flax namesake (``use_fast_variance=False`` on the flax side):
the variables ``init`` creates (names, shapes and values from the same key), outputs, and the
gradients with respect to the input and the parameters. All linen cases run in one jitted call,
all nnx cases in another.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers_norm import BF16_ULP, assert_close_to_scale, draws, random_variables, sum_tol

import jaxinit.linen as jil
import jaxinit.nnx as jnnx

BF16 = jnp.bfloat16
INITS = {"scale_init": nn.initializers.normal(0.5), "bias_init": nn.initializers.normal(0.5)}


def _mask(shape, seed=0):
    return np.random.default_rng(seed).random(shape) < 0.7


# (module name, keyword arguments for both, x shape, x dtype, mask or None)
LINEN = [
    ("LayerNorm", {}, (8, 16), jnp.float32, None),
    ("LayerNorm", {"reduction_axes": (1, 2), "feature_axes": -1}, (4, 6, 16), jnp.float32, None),
    (
        "LayerNorm",
        {"reduction_axes": (1, 2), "feature_axes": (1, 2)},
        (4, 6, 16),
        jnp.float32,
        None,
    ),
    ("LayerNorm", {"use_bias": False, "use_scale": False}, (8, 16), jnp.float32, None),
    ("LayerNorm", {"dtype": BF16}, (8, 16), jnp.float32, None),
    ("LayerNorm", {"param_dtype": BF16}, (8, 16), BF16, None),
    ("LayerNorm", {}, (8, 16), BF16, None),
    ("LayerNorm", {}, (8, 16), jnp.float32, _mask((8, 16))),
    ("RMSNorm", {}, (8, 16), jnp.float32, None),
    ("RMSNorm", {"reduction_axes": (1, 2)}, (4, 6, 16), jnp.float32, None),
    ("RMSNorm", {}, (8, 16), BF16, None),
    ("RMSNorm", {}, (8, 16), jnp.float32, _mask((8, 16), 1)),
    ("GroupNorm", {"num_groups": 4}, (4, 3, 5, 16), jnp.float32, None),
    ("GroupNorm", {"num_groups": None, "group_size": 2}, (4, 3, 5, 16), jnp.float32, None),
    ("GroupNorm", {"num_groups": 2, "reduction_axes": (2, 3)}, (4, 3, 5, 16), jnp.float32, None),
    ("GroupNorm", {"num_groups": 4, "dtype": BF16}, (4, 3, 5, 16), jnp.float32, None),
    ("GroupNorm", {"num_groups": 4}, (4, 3, 5, 16), jnp.float32, _mask((4, 3, 5, 16), 2)),
    ("InstanceNorm", {}, (4, 5, 6, 8), jnp.float32, None),
    ("InstanceNorm", {"feature_axes": (1, -1)}, (4, 5, 6, 8), jnp.float32, None),
    ("InstanceNorm", {}, (4, 5, 6, 8), BF16, None),
    ("InstanceNorm", {}, (4, 5, 6, 8), jnp.float32, _mask((4, 5, 6, 1), 3)),
]


def _ids(cases):
    return [f"{i}-{c[0]}" for i, c in enumerate(cases)]


def _linen_pair(name, kwargs):
    inits = INITS if name != "RMSNorm" else {"scale_init": INITS["scale_init"]}
    return (
        getattr(nn, name)(use_fast_variance=False, **inits, **kwargs),
        getattr(jil, name)(**inits, **kwargs),
    )


def _x(shape, dtype, seed):
    return jax.device_put(draws(seed, shape, loc=3.0, scale=2.0).astype(dtype))


# The gradients are the pure functions' (checked against float64 in test_normalization); here
# they are compared with flax's for the first case of each module.
WITH_GRADS = {min(i for i, c in enumerate(LINEN) if c[0] == name) for name, *_ in LINEN}


@jax.jit
def _linen_run(xs, ws, masks, params):
    out = []
    for i, (case, x, w, m, p) in enumerate(zip(LINEN, xs, ws, masks, params, strict=True)):
        results = []
        for mod, standard in zip(_linen_pair(*case[:2]), (True, False), strict=True):

            def loss(x, p, mod=mod, w=w, m=m):
                y = mod.apply({"params": p}, x, mask=m)
                return jnp.sum(y.astype(jnp.float32) * w), y

            # flax mixes bf16 and f32 in its arithmetic; jaxinit runs under strict promotion.
            with jax.numpy_dtype_promotion("standard" if standard else "strict"):
                if i in WITH_GRADS:
                    grads, y = jax.grad(loss, argnums=(0, 1), has_aux=True)(x, p)
                else:
                    grads, y = None, loss(x, p)[1]
            results.append((y, grads))
        out.append(results)
    return out


def _abstract_variables(case, x, m):
    pair = _linen_pair(*case[:2])
    with jax.numpy_dtype_promotion("standard"):
        return [
            jax.eval_shape(lambda mod=mod: mod.init(jax.random.key(0), x, mask=m)) for mod in pair
        ]


_LINEN = {}


def _linen_results():
    if not _LINEN:
        xs = [_x(c[2], c[3], i) for i, c in enumerate(LINEN)]
        ws = [jax.device_put(draws(100 + i, c[2])) for i, c in enumerate(LINEN)]
        masks = [c[4] for c in LINEN]
        abstract = [_abstract_variables(c, x, m) for c, x, m in zip(LINEN, xs, masks, strict=True)]
        params = [random_variables(a[0]).get("params", {}) for a in abstract]
        _LINEN["abstract"] = abstract
        _LINEN["out"] = jax.device_get(_linen_run(xs, ws, masks, params))
    return _LINEN["abstract"], _LINEN["out"]


def _group(shape, name, kwargs):
    """The number of elements in one normalization group (for the rounding tolerance)."""
    if name == "GroupNorm":
        axes = kwargs.get("reduction_axes") or range(1, len(shape))
        g = kwargs.get("num_groups") or shape[-1] // kwargs["group_size"]
        return int(np.prod([shape[a] for a in axes if a % len(shape) != len(shape) - 1])) * (
            shape[-1] // g
        )
    if name == "InstanceNorm":
        return int(np.prod(shape[1:-1]))
    axes = np.atleast_1d(kwargs.get("reduction_axes", -1))
    return int(np.prod([shape[a] for a in axes]))


@pytest.mark.parametrize("index", range(len(LINEN)), ids=_ids(LINEN))
def test_linen_matches_flax(index):
    name, kwargs, shape, dtype, _ = LINEN[index]
    abstract, out = _linen_results()
    (y_flax, g_flax), (y_ji, g_ji) = out[index]
    # The same variables (names, shapes, dtypes): a flax checkpoint loads unchanged.
    assert abstract[index][1] == abstract[index][0]
    # flax's output dtype rule (dtype, else the promotion of input and params).
    assert y_ji.dtype == y_flax.dtype and y_ji.shape == shape
    tol = 4 * sum_tol(_group(shape, name, kwargs))
    if jnp.dtype(y_flax.dtype).itemsize == 2 or jnp.dtype(dtype).itemsize == 2:
        tol = BF16_ULP  # one bfloat16 spacing: the two may round a float32 tie differently
    assert_close_to_scale(np.asarray(y_ji, np.float64), np.asarray(y_flax, np.float64), tol)
    assert (g_ji is None) == (index not in WITH_GRADS)
    for a, b in zip(jax.tree.leaves(g_ji), jax.tree.leaves(g_flax), strict=True):
        assert a.dtype == b.dtype
        assert_close_to_scale(np.asarray(a, np.float64), np.asarray(b, np.float64), 4 * tol)


def test_linen_init_draws_flax_values():
    # Same names, shapes and initializers: the same values from the same key.
    x = _x((4, 3, 5, 16), jnp.float32, 9)

    @jax.jit
    def inits(x):
        return [
            [mod.init(jax.random.key(1), x) for mod in _linen_pair(name, kw)]
            for name, kw in (("LayerNorm", {}), ("RMSNorm", {}), ("GroupNorm", {"num_groups": 4}))
        ]

    for v_flax, v_ji in inits(x):
        chex.assert_trees_all_equal(v_ji, v_flax)


def test_linen_extras():
    x = _x((4, 3, 5, 16), jnp.float32, 7)
    s = jax.device_put(draws(8, (16,), scale=0.3))

    @jax.jit
    def run(x, s):
        # zero_centered_scale: the scale starts at 0 and multiplies as 1 + s.
        rms = jil.RMSNorm(zero_centered_scale=True)
        v = rms.init(jax.random.key(0), x)
        plain = nn.RMSNorm().apply({"params": {"scale": 1.0 + s}}, x)
        shifted = rms.apply({"params": {"scale": s}}, x)
        # feature_axis=1: NCHW input equals flax's NHWC result, transposed.
        nchw = jnp.moveaxis(x, -1, 1)
        gn = jil.GroupNorm(num_groups=4, feature_axis=1)
        vg = gn.init(jax.random.key(0), nchw)
        y_nchw = gn.apply(vg, nchw)
        y_nhwc = nn.GroupNorm(num_groups=4, use_fast_variance=False).apply(vg, x)
        return v, plain, shifted, jnp.moveaxis(y_nchw, 1, -1), y_nhwc

    v, plain, shifted, y_nchw, y_nhwc = run(x, s)
    np.testing.assert_array_equal(v["params"]["scale"], np.zeros(16, np.float32))
    assert_close_to_scale(shifted, plain, 4 * sum_tol(16))
    assert_close_to_scale(y_nchw, y_nhwc, 4 * sum_tol(60))


# --------------------------------------------------------------------------- nnx

# (module name, positional args, keyword arguments, x shape, x dtype, mask or None)
NNX = [
    ("LayerNorm", (16,), {}, (8, 16), jnp.float32, None),
    ("LayerNorm", (16,), {"reduction_axes": (1, 2)}, (4, 6, 16), jnp.float32, None),
    ("LayerNorm", (16,), {"dtype": BF16}, (8, 16), jnp.float32, _mask((8, 16), 4)),
    ("RMSNorm", (16,), {}, (8, 16), jnp.float32, None),
    ("RMSNorm", (16,), {}, (8, 16), jnp.float32, _mask((8, 16), 5)),
    ("GroupNorm", (16, 4), {}, (4, 3, 5, 16), jnp.float32, None),
    ("GroupNorm", (16,), {"num_groups": None, "group_size": 2}, (4, 3, 5, 16), BF16, None),
    ("InstanceNorm", (8,), {}, (4, 5, 6, 8), jnp.float32, None),
    ("InstanceNorm", (8,), {}, (4, 5, 6, 8), jnp.float32, _mask((4, 5, 6, 1), 6)),
]
NNX_INITS = {"scale_init": nnx.initializers.normal(0.5), "bias_init": nnx.initializers.normal(0.5)}


@jax.jit
def _nnx_run(xs, masks):
    out = []
    for (name, args, kwargs, *_), x, m in zip(NNX, xs, masks, strict=True):
        inits = dict(NNX_INITS)
        if name == "RMSNorm":
            del inits["bias_init"]
        pair = []
        for module, extra, standard in (
            (getattr(nnx, name), {"use_fast_variance": False}, True),
            (getattr(jnnx, name), {}, False),
        ):
            with jax.numpy_dtype_promotion("standard" if standard else "strict"):
                layer = module(*args, **kwargs, **inits, **extra, rngs=nnx.Rngs(params=3))
                y = layer(x, mask=m)
            params = nnx.state(layer, nnx.Param)
            pair.append((nnx.to_pure_dict(params), y))
        out.append(pair)
    return out


@pytest.mark.parametrize("index", range(len(NNX)), ids=_ids(NNX))
def test_nnx_matches_flax(index):
    name, args, kwargs, shape, dtype, _ = NNX[index]
    kwargs = {"num_groups": args[1], **kwargs} if len(args) > 1 else kwargs
    if "nnx" not in _LINEN:
        xs = [_x(c[3], c[4], 50 + i) for i, c in enumerate(NNX)]
        _LINEN["nnx"] = jax.device_get(_nnx_run(xs, [c[5] for c in NNX]))
    (p_flax, y_flax), (p_ji, y_ji) = _LINEN["nnx"][index]
    # The same parameters from the same rngs stream, of the same shapes and dtypes.
    assert jax.tree.structure(p_ji) == jax.tree.structure(p_flax)
    for a, b in zip(jax.tree.leaves(p_ji), jax.tree.leaves(p_flax), strict=True):
        np.testing.assert_array_equal(a, b)
    assert y_ji.dtype == y_flax.dtype
    two_byte = jnp.dtype(y_flax.dtype).itemsize == 2 or jnp.dtype(dtype).itemsize == 2
    tol = BF16_ULP if two_byte else 4 * sum_tol(_group(shape, name, kwargs))
    assert_close_to_scale(np.asarray(y_ji, np.float64), np.asarray(y_flax, np.float64), tol)


def test_nnx_extras():
    rms = jnnx.RMSNorm(4, zero_centered_scale=True, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(rms.scale[...], np.zeros(4, np.float32))
    gn = jnnx.GroupNorm(8, num_groups=2, feature_axis=1, rngs=nnx.Rngs(0))
    assert (gn.num_groups, gn.group_size, gn.feature_axis) == (2, 4, 1)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "make, err, msg",
    [
        pytest.param(
            lambda x: jil.GroupNorm(num_groups=3).init(jax.random.key(0), x),
            ValueError,
            r"Number of groups \(3\) does not divide the number of channels \(8\)",
            id="linen_groups",
        ),
        pytest.param(
            lambda x: jil.GroupNorm(group_size=2).init(jax.random.key(0), x),
            ValueError,
            r"Either `num_groups` or `group_size` should be specified",
            id="linen_groups_both",
        ),
        pytest.param(
            lambda x: jil.InstanceNorm(feature_axes=0).init(jax.random.key(0), x),
            ValueError,
            r"The channel axes cannot include the leading dimension",
            id="linen_instance_batch",
        ),
        pytest.param(
            lambda x: jil.LayerNorm(force_float32_reductions=False).init(jax.random.key(0), x),
            ValueError,
            r"force_float32_reductions=False is not supported",
            id="linen_float32",
        ),
        pytest.param(
            lambda x: jil.LayerNorm(epsilon=-1.0).init(jax.random.key(0), x),
            ValueError,
            r"epsilon must be non-negative, got -1.0",
            id="linen_epsilon",
        ),
        pytest.param(
            lambda x: jnnx.GroupNorm(8, num_groups=3, rngs=nnx.Rngs(0)),
            ValueError,
            r"Number of groups \(3\) does not divide the number of channels \(8\)",
            id="nnx_groups",
        ),
        pytest.param(
            lambda x: jnnx.GroupNorm(8, num_groups=None, rngs=nnx.Rngs(0)),
            ValueError,
            r"Either `num_groups` or `group_size` should be specified",
            id="nnx_groups_neither",
        ),
        pytest.param(
            lambda x: jnnx.GroupNorm(8, None, 3, rngs=nnx.Rngs(0)),
            ValueError,
            r"Number of channels \(8\) is not multiple of the group size \(3\)",
            id="nnx_group_size",
        ),
        pytest.param(
            lambda x: jnnx.LayerNorm(6, rngs=nnx.Rngs(0))(x),
            ValueError,
            r"has sizes \(8,\) along the feature axes, but the module was built with "
            r"num_features=6",
            id="nnx_num_features",
        ),
    ],
)
def test_bad_input(make, err, msg):
    with pytest.raises(err, match=msg):
        make(np.ones((2, 3, 8), np.float32))
