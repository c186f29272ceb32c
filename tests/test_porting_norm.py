"""Tests for torch's LayerNorm, GroupNorm, RMSNorm and InstanceNorm conventions in jaxinit.porting.

torch is not a dependency: its documented formulas (``F.layer_norm``, ``F.group_norm``,
``F.rms_norm``, ``F.instance_norm``) are written out here in float64 numpy. Every case of a
norm runs in one jit (one compile per test); inputs are numpy draws with fixed seeds.

Tolerances follow helpers_norm: the float32 statistics over n elements err by about
``sum_tol(n)`` relative, and subtracting a mean ``loc`` from data of spread ``scale`` amplifies
that by ``1 + |loc| / scale`` for the mean and its square for the variance; the result is doubled
for the normalisation, the scale and the bias, and compared with the largest output.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers_norm import F32_EPS, assert_close_to_scale, draws, f64, sum_tol

import jaxinit as ji
from jaxinit import porting

# ----------------------------------------------------------------- torch's formulas, in numpy


def _affine(y, weight, bias, shape):
    """``y * weight + bias``, each (if not None) reshaped to ``shape`` to broadcast."""
    if weight is not None:
        y = y * f64(weight).reshape(shape)
    if bias is not None:
        y = y + f64(bias).reshape(shape)
    return y


def torch_layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """F.layer_norm: biased variance over the trailing len(normalized_shape) axes."""
    x, shape = f64(x), tuple(np.atleast_1d(normalized_shape))
    axes = tuple(range(-len(shape), 0))
    mean = x.mean(axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axes, keepdims=True)
    return _affine((x - mean) / np.sqrt(var + eps), weight, bias, shape)


def torch_rms_norm(x, normalized_shape, weight=None, eps=None):
    """F.rms_norm: ``x / sqrt(mean(x^2) + eps) * weight``; eps None is float32's epsilon."""
    x, shape = f64(x), tuple(np.atleast_1d(normalized_shape))
    eps = float(np.finfo(np.float32).eps) if eps is None else eps
    ms = (x**2).mean(tuple(range(-len(shape), 0)), keepdims=True)
    return _affine(x / np.sqrt(ms + eps), weight, None, shape)


def torch_group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
    """F.group_norm on (N, C, *): (N, G, C/G * prod(*)) groups, biased variance over the last."""
    x = f64(x)
    n, c = x.shape[:2]
    g = x.reshape(n, num_groups, -1)
    y = ((g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + eps)).reshape(x.shape)
    return _affine(y, weight, bias, (1, c) + (1,) * (x.ndim - 2))


def torch_instance_norm(x, weight=None, bias=None, eps=1e-5):
    """F.instance_norm on (N, C, *): each (n, c) over the spatial axes, biased variance."""
    x = f64(x)
    axes = tuple(range(2, x.ndim))
    mean, var = x.mean(axes, keepdims=True), x.var(axes, keepdims=True)
    return _affine(
        (x - mean) / np.sqrt(var + eps), weight, bias, (1, x.shape[1]) + (1,) * len(axes)
    )


def channels_last(a):
    """(N, C, *) -> (N, *, C)."""
    return np.moveaxis(np.asarray(a), 1, -1)


def norm_tol(n, loc=0.0, scale=1.0):
    """The module docstring's bound for float32 statistics over n elements of N(loc, scale^2)."""
    return 2 * sum_tol(n) * (1 + abs(loc) / scale) ** 2


def weight_and_bias(shape, seed):
    """A float32 weight near 1 and bias near 0 of torch's shape, so that both matter."""
    rng = np.random.default_rng(seed)
    w = (1.0 + 0.3 * rng.standard_normal(shape)).astype(np.float32)
    return w, (0.5 * rng.standard_normal(shape)).astype(np.float32)


def check_all(cases):
    """Runs every case ``(call, args, reference, tol)`` in one jit and compares each output."""
    calls = [c[0] for c in cases]
    outs = jax.jit(lambda args: [f(*a) for f, a in zip(calls, args, strict=True)])(
        [c[1] for c in cases]
    )
    for i, ((_, args, ref, tol), y) in enumerate(zip(cases, outs, strict=True)):
        assert y.shape == ref.shape, (i, y.shape, ref.shape)
        assert y.dtype == args[0].dtype, (i, y.dtype)
        assert_close_to_scale(y, ref, tol)


# ----------------------------------------------------------------- the keyword arguments


@pytest.mark.parametrize(
    "fn, args, kwargs, expected",
    [
        (
            porting.torch_layer_norm_kwargs,
            (8,),
            {},
            {"reduction_axes": (-1,), "feature_axes": (-1,), "epsilon": 1e-5},
        ),
        (
            porting.torch_layer_norm_kwargs,
            ((4, 5), 1e-3),
            {},
            {"reduction_axes": (-2, -1), "feature_axes": (-2, -1), "epsilon": 1e-3},
        ),
        (
            porting.torch_layer_norm_kwargs,
            ([2, 3, 4],),
            {"elementwise_affine": False},
            {
                "reduction_axes": (-3, -2, -1),
                "feature_axes": (-3, -2, -1),
                "epsilon": 1e-5,
                "scale": None,
                "bias": None,
            },
        ),
        (
            porting.torch_layer_norm_kwargs,
            (np.int64(8),),
            {"bias": False},
            {"reduction_axes": (-1,), "feature_axes": (-1,), "epsilon": 1e-5, "bias": None},
        ),
        (
            porting.torch_layer_norm_kwargs,
            (8,),
            {"elementwise_affine": False, "bias": False},
            {
                "reduction_axes": (-1,),
                "feature_axes": (-1,),
                "epsilon": 1e-5,
                "scale": None,
                "bias": None,
            },
        ),
        (
            porting.torch_rms_norm_kwargs,
            (16,),
            {},
            {"reduction_axes": (-1,), "feature_axes": (-1,), "epsilon": F32_EPS},
        ),
        (
            porting.torch_rms_norm_kwargs,
            ((4, 5), 1e-6),
            {"dtype": jnp.bfloat16},
            {"reduction_axes": (-2, -1), "feature_axes": (-2, -1), "epsilon": 1e-6},
        ),
        (porting.torch_rms_norm_kwargs, (16,), {"dtype": jnp.bfloat16}, {"epsilon": 2.0**-7}),
        (porting.torch_rms_norm_kwargs, (16,), {"dtype": np.float16}, {"epsilon": 2.0**-10}),
        (porting.torch_rms_norm_kwargs, (16,), {"dtype": "float64"}, {"epsilon": 2.0**-52}),
        (porting.torch_rms_norm_kwargs, (16, 0.0), {}, {"epsilon": 0.0}),
        (
            porting.torch_group_norm_kwargs,
            (8,),
            {},
            {"num_groups": 8, "group_size": None, "feature_axis": 1, "epsilon": 1e-5},
        ),
        (
            porting.torch_group_norm_kwargs,
            (np.int32(2), 1e-6),
            {"channels_last": True},
            {"num_groups": 2, "group_size": None, "feature_axis": -1, "epsilon": 1e-6},
        ),
        (porting.torch_instance_norm_kwargs, (), {}, {"feature_axes": 1, "epsilon": 1e-5}),
        (
            porting.torch_instance_norm_kwargs,
            (1e-3,),
            {"channels_last": True},
            {"feature_axes": -1, "epsilon": 1e-3},
        ),
    ],
)
def test_kwargs(fn, args, kwargs, expected):
    """Each dict holds torch's axes as negative ints, its eps as a float, and nothing else."""
    kw = fn(*args, **kwargs)
    if len(expected) < len(kw):
        kw = {k: kw[k] for k in expected}
    assert kw == expected
    assert all(type(kw[k]) is float for k in ("epsilon",) if k in kw)
    assert all(type(kw[k]) is int for k in ("num_groups",) if k in kw)


def test_kwargs_are_exported():
    """The four functions are the same objects in jaxinit and jaxinit.porting."""
    for name in (
        "torch_group_norm_kwargs",
        "torch_instance_norm_kwargs",
        "torch_layer_norm_kwargs",
        "torch_rms_norm_kwargs",
    ):
        assert getattr(ji, name) is getattr(porting, name)
        assert name in ji.__all__ and name in porting.__all__


@pytest.mark.parametrize(
    "fn, args, kwargs, error, match",
    [
        (porting.torch_layer_norm_kwargs, (0,), {}, ValueError, r"normalized_shape.*got 0\b"),
        (
            porting.torch_layer_norm_kwargs,
            ((4, -1),),
            {},
            ValueError,
            r"normalized_shape.*\(4, -1\)",
        ),
        (porting.torch_layer_norm_kwargs, ((),), {}, ValueError, r"normalized_shape.*got \(\)"),
        (porting.torch_layer_norm_kwargs, ((4, True),), {}, ValueError, r"normalized_shape.*True"),
        (porting.torch_layer_norm_kwargs, ((4, 2.0),), {}, ValueError, r"normalized_shape.*2\.0"),
        (porting.torch_layer_norm_kwargs, ("ab",), {}, ValueError, r"normalized_shape.*'ab'"),
        (porting.torch_layer_norm_kwargs, (4.0,), {}, TypeError, r"normalized_shape.*float 4\.0"),
        (porting.torch_layer_norm_kwargs, (None,), {}, TypeError, r"normalized_shape.*None"),
        (porting.torch_layer_norm_kwargs, (4, -1e-5), {}, ValueError, r"eps must be >= 0.*-1e-05"),
        (porting.torch_layer_norm_kwargs, (4, float("nan")), {}, ValueError, r"eps.*nan"),
        (porting.torch_layer_norm_kwargs, (4, "1e-5"), {}, TypeError, r"eps.*str '1e-5'"),
        (porting.torch_layer_norm_kwargs, (4, None), {}, TypeError, r"eps.*None"),
        (porting.torch_layer_norm_kwargs, (4, True), {}, TypeError, r"eps.*bool True"),
        (
            porting.torch_layer_norm_kwargs,
            (4, 1e-5, np.ones(4)),
            {},
            TypeError,
            r"elementwise_affine must be a bool.*ndarray",
        ),
        (
            porting.torch_layer_norm_kwargs,
            (4,),
            {"bias": None},
            TypeError,
            r"bias must be a bool.*None",
        ),
        (porting.torch_rms_norm_kwargs, ([],), {}, ValueError, r"normalized_shape.*\[\]"),
        (porting.torch_rms_norm_kwargs, ((3, 0),), {}, ValueError, r"normalized_shape.*\(3, 0\)"),
        (porting.torch_rms_norm_kwargs, (4, -1.0), {}, ValueError, r"eps must be >= 0.*-1\.0"),
        (porting.torch_rms_norm_kwargs, (4,), {"dtype": jnp.int32}, ValueError, r"dtype.*int32"),
        (porting.torch_rms_norm_kwargs, (4,), {"dtype": bool}, ValueError, r"dtype.*bool"),
        (porting.torch_group_norm_kwargs, (0,), {}, ValueError, r"num_groups.*got 0\b"),
        (porting.torch_group_norm_kwargs, (-2,), {}, ValueError, r"num_groups.*-2"),
        (porting.torch_group_norm_kwargs, (2.0,), {}, ValueError, r"num_groups.*2\.0"),
        (porting.torch_group_norm_kwargs, (True,), {}, ValueError, r"num_groups.*True"),
        (porting.torch_group_norm_kwargs, ("4",), {}, ValueError, r"num_groups.*'4'"),
        (porting.torch_group_norm_kwargs, (None,), {}, ValueError, r"num_groups.*None"),
        (porting.torch_group_norm_kwargs, (4, -1e-5), {}, ValueError, r"eps must be >= 0.*-1e-05"),
        (
            porting.torch_group_norm_kwargs,
            (4,),
            {"channels_last": 1},
            TypeError,
            r"channels_last must be a bool.*int 1",
        ),
        (porting.torch_instance_norm_kwargs, (-0.1,), {}, ValueError, r"eps must be >= 0.*-0\.1"),
        (porting.torch_instance_norm_kwargs, (np.ones(2),), {}, TypeError, r"eps.*ndarray"),
        (
            porting.torch_instance_norm_kwargs,
            (),
            {"channels_last": "yes"},
            TypeError,
            r"channels_last must be a bool.*'yes'",
        ),
    ],
)
def test_kwargs_bad_input(fn, args, kwargs, error, match):
    """Each bad argument is rejected with an error that names it and its value."""
    with pytest.raises(error, match=match):
        fn(*args, **kwargs)


# ----------------------------------------------------------------- against torch's formulas


def test_layer_norm_matches_torch():
    """ji.layer_norm with the kwargs computes F.layer_norm, also over several trailing axes.

    The small-variance case (var 1e-6 < eps 1e-5) fails unless eps reaches the call.
    """
    cases = []
    for i, (shape, ns, loc, scale, eps, affine, has_bias) in enumerate(
        [
            ((3, 5, 8), 8, 2.0, 3.0, 1e-5, True, True),
            ((2, 3, 4, 5), (4, 5), -1.0, 2.0, 1e-5, True, True),
            ((6, 16), (16,), 0.0, 1e-3, 1e-5, True, True),  # eps dominates the variance
            ((4, 2, 3, 4), (2, 3, 4), 0.5, 1.0, 1e-3, False, True),
            ((5, 12), 12, 0.0, 1.0, 1e-6, True, False),
        ]
    ):
        x = draws(10 + i, shape, loc, scale)
        w, b = weight_and_bias(np.atleast_1d(ns), seed=i)
        kw = porting.torch_layer_norm_kwargs(ns, eps, elementwise_affine=affine, bias=has_bias)
        w, b = (w if affine else None), (b if affine and has_bias else None)
        args = tuple(a for a in (x, w, b) if a is not None)
        ref = torch_layer_norm(x, ns, w, b, eps)
        n = int(np.prod(ns))
        cases.append(
            (lambda *a, kw=kw: ji.layer_norm(*a, **kw), args, ref, norm_tol(n, loc, scale))
        )
    check_all(cases)


def test_layer_norm_kwargs_pin_missing_tensors():
    """A weight or bias the torch module lacks is a repeated-argument TypeError."""
    x, w = draws(0, (2, 8)), np.ones(8, np.float32)
    with pytest.raises(TypeError, match="scale"):
        ji.layer_norm(x, w, **porting.torch_layer_norm_kwargs(8, elementwise_affine=False))
    with pytest.raises(TypeError, match="bias"):
        ji.layer_norm(x, w, w, **porting.torch_layer_norm_kwargs(8, bias=False))


def test_rms_norm_matches_torch():
    """ji.rms_norm with the kwargs computes F.rms_norm; eps=None is float32's epsilon.

    Inputs of rms 1e-4 (mean square 1e-8 < 1.2e-7) fail unless the machine epsilon is used.
    """
    cases = []
    for i, (shape, ns, scale, eps, affine) in enumerate(
        [
            ((4, 16), 16, 1.0, None, True),
            ((2, 3, 4, 5), (3, 4, 5), 2.0, 1e-6, True),
            ((6, 32), (32,), 1e-4, None, True),  # eps=None dominates the mean square
            ((3, 8), 8, 1e-3, 1e-5, False),
        ]
    ):
        x = draws(20 + i, shape, 0.0, scale)
        w = weight_and_bias(np.atleast_1d(ns), seed=i)[0] if affine else None
        kw = porting.torch_rms_norm_kwargs(ns, eps)
        args = (x, w) if affine else (x,)
        ref = torch_rms_norm(x, ns, w, eps)
        n = int(np.prod(ns))
        cases.append((lambda *a, kw=kw: ji.rms_norm(*a, **kw), args, ref, 2 * sum_tol(n)))
    check_all(cases)


def test_group_norm_matches_torch():
    """ji.group_norm with the kwargs computes F.group_norm on NCHW and on channels-last data."""
    cases = []
    for i, (shape, groups, eps, last, affine) in enumerate(
        [
            ((2, 6, 3, 4), 3, 1e-5, False, True),
            ((2, 6, 3, 4), 3, 1e-5, True, True),
            ((3, 8, 5), 1, 1e-5, False, True),  # one group: a layer norm over (C, L)
            ((2, 4, 2, 3, 2), 4, 1e-3, False, False),  # a group per channel, 3-D spatial
            ((4, 6, 2, 2), 2, 1e-5, True, True),
        ]
    ):
        x = draws(30 + i, shape, 1.0, 2.0)  # torch's NC* layout
        c = shape[1]
        w, b = weight_and_bias(c, seed=i) if affine else (None, None)
        kw = porting.torch_group_norm_kwargs(groups, eps, channels_last=last)
        ref = torch_group_norm(x, groups, w, b, eps)
        if last:
            x, ref = np.ascontiguousarray(channels_last(x)), channels_last(ref)
        n = c // groups * int(np.prod(shape[2:]))
        args = (x, w, b) if affine else (x,)
        cases.append((lambda *a, kw=kw: ji.group_norm(*a, **kw), args, ref, norm_tol(n, 1.0, 2.0)))
    check_all(cases)


def test_instance_norm_matches_torch():
    """ji.instance_norm with the kwargs computes F.instance_norm, with and without affine."""
    cases = []
    for i, (shape, eps, last, affine) in enumerate(
        [
            ((2, 3, 4, 5), 1e-5, False, False),  # InstanceNorm2d's default affine=False
            ((2, 3, 4, 5), 1e-5, False, True),
            ((2, 3, 4, 5), 1e-5, True, True),
            ((3, 4, 7), 1e-3, False, True),  # InstanceNorm1d
            ((2, 2, 3, 2, 3), 1e-5, True, False),  # InstanceNorm3d
        ]
    ):
        x = draws(40 + i, shape, -0.5, 1.5)
        w, b = weight_and_bias(shape[1], seed=i) if affine else (None, None)
        kw = porting.torch_instance_norm_kwargs(eps, channels_last=last)
        ref = torch_instance_norm(x, w, b, eps)
        if last:
            x, ref = np.ascontiguousarray(channels_last(x)), channels_last(ref)
        n = int(np.prod(shape[2:]))
        args = (x, w, b) if affine else (x,)
        cases.append(
            (lambda *a, kw=kw: ji.instance_norm(*a, **kw), args, ref, norm_tol(n, 0.5, 1.5))
        )
    check_all(cases)


# ----------------------------------------------------------------- state dicts


def _norm_state_dict(rng):
    """A torch state dict with a Linear and the norm layers whose weights rank inference misses."""
    f = lambda *s: rng.normal(size=s).astype(np.float32)
    return {
        "fc.weight": f(20, 6),
        "fc.bias": f(20),
        "ln.weight": f(4, 5) + 1,  # LayerNorm((4, 5))
        "ln.bias": f(4, 5),
        "ln_nobias.weight": f(4, 5) + 1,  # LayerNorm((4, 5), bias=False)
        "rms.weight": f(16) + 1,  # RMSNorm(16)
        "rms2.weight": f(4, 5) + 1,  # RMSNorm((4, 5))
        "gn.weight": f(6) + 1,  # GroupNorm(3, 6)
        "gn.bias": f(6),
        "ln3.weight": f(2, 3, 4).astype(np.float16),  # LayerNorm((2, 3, 4)), half precision
        "ln3.bias": f(2, 3, 4).astype(np.float16),
    }


NORM_STATE_DICT = _norm_state_dict(np.random.default_rng(7))
NORM_KINDS = {"ln_nobias": "layer_norm", "rms2": "rms_norm", "rms": "rms_norm", "gn": "group_norm"}


@pytest.mark.parametrize("kinds", [NORM_KINDS, {**NORM_KINDS, "ln": "norm", "ln3": "layer_norm"}])
def test_norm_state_dict_round_trip(kinds):
    """Norm weights keep their shape as ``scale``, and come back exactly, dtypes included."""
    sd = NORM_STATE_DICT
    rename = {"rms2": "block/RMSNorm_0"}
    v = porting.torch_state_dict_to_flax(sd, kinds=kinds, rename=rename)
    p = v["params"]
    assert v["batch_stats"] == {}
    assert p["fc"]["kernel"].shape == (6, 20)
    assert sorted(p["ln"]) == ["bias", "scale"]
    assert sorted(p["ln_nobias"]) == ["scale"]
    assert sorted(p["rms"]) == ["scale"]
    assert sorted(p["block"]["RMSNorm_0"]) == ["scale"]
    np.testing.assert_array_equal(p["ln"]["scale"], sd["ln.weight"])
    np.testing.assert_array_equal(p["ln"]["bias"], sd["ln.bias"])
    np.testing.assert_array_equal(p["block"]["RMSNorm_0"]["scale"], sd["rms2.weight"])
    np.testing.assert_array_equal(p["gn"]["scale"], sd["gn.weight"])
    assert p["ln3"]["scale"].dtype == np.float16
    back = porting.flax_to_torch_state_dict(v, rename=rename)
    assert sorted(back) == sorted(sd)
    for name, arr in sd.items():
        assert back[name].dtype == arr.dtype, name
        np.testing.assert_array_equal(back[name], arr, err_msg=name)


def test_norm_state_dict_inference():
    """A bias of the weight's shape makes a norm; a bias-less weight of rank 2 reads as a Linear."""
    sd = {k: v for k, v in NORM_STATE_DICT.items() if k.split(".")[0] in ("ln", "rms2", "ln3")}
    p = porting.torch_state_dict_to_flax(sd)["params"]
    assert p["ln"]["scale"].shape == (4, 5)
    assert p["ln3"]["scale"].shape == (2, 3, 4)
    assert p["rms2"]["kernel"].shape == (5, 4)  # hence kinds={"rms2": "rms_norm"}
    p = porting.torch_state_dict_to_flax(
        {"ln6.weight": np.ones((1, 2, 1, 2, 1, 2))}, kinds={"ln6": "layer_norm"}
    )
    assert p["params"]["ln6"]["scale"].shape == (1, 2, 1, 2, 1, 2)


def test_norm_state_dict_matches_flax_modules():
    """The converted trees have the shapes of flax's LayerNorm, RMSNorm and GroupNorm params."""
    import flax.linen as nn

    axes = {"reduction_axes": (-2, -1), "feature_axes": (-2, -1)}
    modules = {
        "ln": (nn.LayerNorm(**axes), (3, 4, 5)),
        "ln_nobias": (nn.LayerNorm(use_bias=False, **axes), (3, 4, 5)),
        "rms": (nn.RMSNorm(), (3, 16)),
        "rms2": (nn.RMSNorm(**axes), (3, 4, 5)),
        "gn": (nn.GroupNorm(num_groups=3), (2, 3, 3, 6)),
    }
    sd = {k: v for k, v in NORM_STATE_DICT.items() if k.split(".")[0] in modules}
    p = porting.torch_state_dict_to_flax(sd, kinds=NORM_KINDS)["params"]
    for name, (module, shape) in modules.items():
        x = jax.ShapeDtypeStruct(shape, jnp.float32)
        expected = jax.eval_shape(module.init, jax.random.key(0), x)["params"]
        assert {k: a.shape for k, a in p[name].items()} == {k: a.shape for k, a in expected.items()}


def test_converted_norms_match_torch_forward():
    """Converted LayerNorm((4, 5)), RMSNorm((4, 5)) and GroupNorm(3, 6) compute torch's forward."""
    sd = NORM_STATE_DICT
    p = porting.torch_state_dict_to_flax(sd, kinds=NORM_KINDS)["params"]
    x = draws(50, (3, 4, 5), 1.0, 2.0)
    xg = draws(51, (2, 6, 3, 2), 1.0, 2.0)
    ln = porting.torch_layer_norm_kwargs((4, 5))
    rms = porting.torch_rms_norm_kwargs((4, 5))
    gn = porting.torch_group_norm_kwargs(3)
    check_all(
        [
            (
                lambda x, s, b: ji.layer_norm(x, s, b, **ln),
                (x, p["ln"]["scale"], p["ln"]["bias"]),
                torch_layer_norm(x, (4, 5), sd["ln.weight"], sd["ln.bias"]),
                norm_tol(20, 1.0, 2.0),
            ),
            (
                lambda x, s: ji.rms_norm(x, s, **rms),
                (x, p["rms2"]["scale"]),
                torch_rms_norm(x, (4, 5), sd["rms2.weight"]),
                2 * sum_tol(20),
            ),
            (
                lambda x, s, b: ji.group_norm(x, s, b, **gn),
                (xg, p["gn"]["scale"], p["gn"]["bias"]),
                torch_group_norm(xg, 3, sd["gn.weight"], sd["gn.bias"]),
                norm_tol(12, 1.0, 2.0),
            ),
        ]
    )


@pytest.mark.parametrize(
    "sd, kinds, match",
    [
        (
            {"ln.weight": np.ones((4, 5))},
            {"ln": "layernorm"},
            r"kinds\['ln'\] must be one of .*'layer_norm'.*'rms_norm'.*got 'layernorm'",
        ),
        (
            {"rms.weight": np.ones(4), "rms.bias": np.zeros(4)},
            {"rms": "rms_norm"},
            r"'rms' \(rms_norm\) has tensors it cannot convert: \['rms\.bias'\]",
        ),
        (
            {"ln.weight": np.ones(5), "ln.bias": np.zeros(4)},
            {},
            r"norm 'ln': bias shape \(4,\) differs from weight shape \(5,\)",
        ),
        (
            {"ln.weight": np.ones((4, 5)), "ln.bias": np.zeros(5)},
            {"ln": "layer_norm"},
            r"norm 'ln': bias shape \(5,\) differs from weight shape \(4, 5\)",
        ),
        (
            {"gn.weight": np.ones(6), "gn.running_mean": np.zeros(6)},
            {"gn": "group_norm"},
            r"'gn' \(group_norm\) has tensors it cannot convert: \['gn\.running_mean'\]",
        ),
        (
            {"m.weight": np.ones((1,) * 6)},
            {},
            r"unsupported rank 6; name a norm's weight in `kinds`",
        ),
    ],
)
def test_norm_state_dict_bad_input(sd, kinds, match):
    """Unknown kinds, a bias on an RMSNorm and mismatched shapes are named."""
    with pytest.raises(ValueError, match=match):
        porting.torch_state_dict_to_flax(sd, kinds=kinds)


def test_flax_rms_norm_to_torch():
    """A Flax node with ``scale`` only is a torch RMSNorm (or bias-less LayerNorm) weight."""
    scale = np.arange(20.0, dtype=np.float32).reshape(4, 5)
    back = porting.flax_to_torch_state_dict({"params": {"norm": {"scale": scale}}})
    assert list(back) == ["norm.weight"]
    np.testing.assert_array_equal(back["norm.weight"], scale)
