"""Tests for ji.layer_norm, ji.rms_norm, ji.group_norm and ji.instance_norm.

References are float64 numpy (helpers_norm.np_norm, np_norm_grads), the gradients' reference is
itself checked against central differences, and flax's modules are compared in
test_norm_modules. Each table runs in one jitted call per dtype: a compile costs more than the
checks on this machine.
"""

import contextlib
import functools
import io
import re

import chex
import flax.linen as nn
import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest
from helpers_norm import (
    BF16_EPS,
    assert_close_to_scale,
    central_differences,
    draws,
    f64,
    np_norm,
    np_norm_grads,
    sum_tol,
)
from jax.sharding import PartitionSpec as P

import jaxinit as ji


def _mask(seed, shape, keep=0.7, empty_rows=1):
    """A random boolean mask of ``shape`` whose first ``empty_rows`` rows keep nothing."""
    m = np.random.default_rng(seed).random(shape) < keep
    m[:empty_rows] = False
    return m


def _grouped(shape, axis, groups):
    """``shape`` with the ``axis`` split into ``(groups, size // groups)``."""
    return (*shape[:axis], groups, shape[axis] // groups, *shape[axis + 1 :])


# Each case: (name, function of (x, scale, bias, mask), x shape, mask or None, and the float64
# reference's view: a reshape of x, the reduced axes of that view, the parameters' broadcast
# shape in that view, centred or not). Parameters are per feature, of the view's feature sizes.
def _ln(**kw):
    return lambda x, s, b, m: ji.layer_norm(x, s, b, mask=m, **kw)


def _rms(**kw):
    return lambda x, s, b, m: ji.rms_norm(x, s, mask=m, **kw)


def _gn(**kw):
    return lambda x, s, b, m: ji.group_norm(x, s, b, mask=m, **kw)


def _in(**kw):
    return lambda x, s, b, m: ji.instance_norm(x, s, b, mask=m, **kw)


def _case(name, fn, shape, view, red, pshape, centered=True, mask=None, zero_centered=False):
    return dict(
        name=name,
        fn=fn,
        shape=shape,
        view=view,
        red=red,
        pshape=pshape,
        centered=centered,
        mask=mask,
        zero_centered=zero_centered,
    )


CASES = [
    _case("layer_norm", _ln(), (16, 32), (16, 32), (1,), (1, 32)),
    _case(
        "layer_norm over (1, 2)",
        _ln(reduction_axes=(1, 2)),
        (4, 6, 16),
        (4, 6, 16),
        (1, 2),
        (1, 1, 16),
    ),
    _case(
        "layer_norm 2-D features",
        _ln(reduction_axes=(-2, -1), feature_axes=(-2, -1)),
        (4, 6, 16),
        (4, 6, 16),
        (1, 2),
        (1, 6, 16),
    ),
    _case("layer_norm masked", _ln(), (16, 32), (16, 32), (1,), (1, 32), mask=_mask(1, (16, 32))),
    _case("rms_norm", _rms(), (16, 32), (16, 32), (1,), (1, 32), centered=False),
    _case(
        "rms_norm zero-centred",
        _rms(zero_centered_scale=True),
        (16, 32),
        (16, 32),
        (1,),
        (1, 32),
        centered=False,
        zero_centered=True,
    ),
    _case(
        "rms_norm masked",
        _rms(),
        (16, 32),
        (16, 32),
        (1,),
        (1, 32),
        centered=False,
        mask=_mask(2, (16, 32)),
    ),
    _case(
        "group_norm",
        _gn(num_groups=4),
        (4, 3, 5, 16),
        _grouped((4, 3, 5, 16), 3, 4),
        (1, 2, 4),
        (1, 1, 1, 4, 4),
    ),
    _case(
        "group_norm NCHW",
        _gn(num_groups=None, group_size=4, feature_axis=1),
        (4, 16, 3, 5),
        _grouped((4, 16, 3, 5), 1, 4),
        (2, 3, 4),
        (1, 4, 4, 1, 1),
    ),
    _case(
        "group_norm over (2, 3)",
        _gn(num_groups=2, reduction_axes=(2, 3)),
        (4, 3, 5, 16),
        _grouped((4, 3, 5, 16), 3, 2),
        (2, 4),
        (1, 1, 1, 2, 8),
    ),
    _case(
        "group_norm masked",
        _gn(num_groups=4),
        (4, 3, 5, 16),
        _grouped((4, 3, 5, 16), 3, 4),
        (1, 2, 4),
        (1, 1, 1, 4, 4),
        mask=_mask(3, (4, 3, 5, 1)),
    ),
    _case("instance_norm", _in(), (4, 5, 6, 8), (4, 5, 6, 8), (1, 2), (1, 1, 1, 8)),
    _case(
        "instance_norm NCHW",
        _in(feature_axes=1),
        (4, 8, 5, 6),
        (4, 8, 5, 6),
        (2, 3),
        (1, 8, 1, 1),
    ),
    _case(
        "instance_norm masked",
        _in(),
        (4, 5, 6, 8),
        (4, 5, 6, 8),
        (1, 2),
        (1, 1, 1, 8),
        mask=_mask(4, (4, 5, 6, 1)),
    ),
    _case("instance_norm (N, C)", _in(), (8, 4), (8, 4), (), (1, 4)),
]
IDS = [c["name"] for c in CASES]


def _params(case, seed):
    n = int(np.prod(case["pshape"]))
    scale = draws(seed, (n,), loc=0.0 if case["zero_centered"] else 1.0, scale=0.3)
    bias = draws(seed + 1, (n,), scale=0.5)
    return scale, bias


def _feature_shape(case):
    """The shape ``scale``/``bias`` take in the jaxinit call (x's sizes along the feature axes)."""
    if case["name"].startswith("group_norm"):
        return (int(np.prod(case["pshape"])),)
    return tuple(s for s, p in zip(case["view"], case["pshape"], strict=True) if p != 1)


def _inputs(loc, scale, dtype):
    out = []
    for i, case in enumerate(CASES):
        x = draws(10 + i, case["shape"], loc=loc, scale=scale).astype(dtype)
        w = draws(40 + i, case["shape"])
        s, b = _params(case, 70 + 2 * i)
        fs = _feature_shape(case)
        out.append((x, s.reshape(fs), b.reshape(fs), w, case["mask"]))
    return out


@functools.partial(jax.jit, static_argnums=0)
def _run(n_cases, inputs):
    """Outputs and gradients of ``sum(y * w)`` of every case, in one program."""
    results = []
    for case, (x, s, b, w, m) in zip(CASES[:n_cases], inputs, strict=True):
        fn = functools.partial(case["fn"], m=m)
        bias = None if not case["centered"] else b
        y, vjp = jax.vjp(lambda x, s, b, fn=fn: fn(x, s, b), x, s, bias)
        results.append((y, vjp(w.astype(y.dtype))))
    return results


def _reference(case, x, s, b, w, eps=1e-6):
    view, ps = case["view"], case["pshape"]
    scale = f64(s).reshape(ps) + (1.0 if case["zero_centered"] else 0.0)
    bias = f64(b).reshape(ps) if case["centered"] else None
    mask = case["mask"]
    if mask is not None and case["name"].startswith("group_norm"):
        mask = mask[..., None]  # (..., 1) -> (..., 1, 1) in the grouped view
    args = (f64(x).reshape(view), case["red"], scale, bias)
    y = np_norm(*args, mask=mask, eps=eps, centered=case["centered"])
    dx, ds, db = np_norm_grads(
        *args, f64(w).reshape(view), mask=mask, eps=eps, centered=case["centered"]
    )
    grads = (
        dx.reshape(x.shape),
        ds.reshape(np.shape(s)),
        None if db is None else db.reshape(np.shape(b)),
    )
    return y.reshape(x.shape), grads


def _group_size(case):
    """The number of elements in one normalization group."""
    return max(1, int(np.prod([case["view"][a] for a in case["red"]])))


_F32_RESULTS = {}


def _f32_results():
    if not _F32_RESULTS:
        inputs = _inputs(3.0, 2.0, np.float32)
        _F32_RESULTS["inputs"] = inputs
        _F32_RESULTS["out"] = jax.device_get(_run(len(CASES), jax.device_put(inputs)))
    return _F32_RESULTS["inputs"], _F32_RESULTS["out"]


@pytest.mark.parametrize("index", range(len(CASES)), ids=IDS)
def test_matches_float64(index):
    """Output and gradients (x, scale, bias) of each case against float64, masks included."""
    case = CASES[index]
    inputs, out = _f32_results()
    x, s, b, w, _ = inputs[index]
    y, (dx, ds, db) = out[index]
    y64, (dx64, ds64, db64) = _reference(case, x, s, b, w)
    n = _group_size(case)
    assert y.shape == x.shape and y.dtype == jnp.float32
    # Statistics of n terms err by ~n*eps relative (helpers_norm.sum_tol); y = xhat*s + b.
    tol = sum_tol(n) * max(1.0, float(np.max(np.abs(s))))
    np.testing.assert_allclose(y, y64, rtol=tol, atol=tol)
    # Gradients: the contract is 1e-4 of the reference's scale; the derived bound is tighter.
    for got, want in ((dx, dx64), (ds, ds64), (db, db64)):
        if want is None:
            continue
        assert np.all(np.isfinite(got))
        assert_close_to_scale(got, want, min(1e-4, 4 * sum_tol(n)))


def test_float64_gradient_reference_matches_central_differences():
    # The chain rule in np_norm_grads against differences of np_norm, centred and RMS, with a
    # mask and a fully masked row.
    x = draws(0, (3, 5), loc=1.0)
    w = draws(1, (3, 5))
    s = draws(2, (1, 5), loc=1.0, scale=0.3)
    b = draws(3, (1, 5), scale=0.5)
    mask = _mask(4, (3, 5))
    for centered in (True, False):
        bias = b if centered else None
        dx, ds, db = np_norm_grads(x, (1,), s, bias, w, mask=mask, eps=1e-3, centered=centered)

        def loss(xs, which, centered=centered, bias=bias):
            args = {"x": x, "s": s, "b": bias}
            out = []
            for v in xs:
                args[which] = v
                y = np_norm(args["x"], (1,), args["s"], args["b"], mask, 1e-3, centered)
                out.append(np.sum(y * f64(w)))
            return np.array(out)

        np.testing.assert_allclose(
            dx, central_differences(lambda v: loss(v, "x"), x, 1e-5), atol=1e-6
        )
        np.testing.assert_allclose(
            ds, central_differences(lambda v: loss(v, "s"), s, 1e-5), atol=1e-6
        )
        if centered:
            np.testing.assert_allclose(
                db, central_differences(lambda v: loss(v, "b"), b, 1e-5), atol=1e-6
            )


def test_fully_masked_groups_are_finite():
    # Every case with a mask has groups that keep nothing: output and gradients stay finite.
    _, out = _f32_results()
    checked = 0
    for case, (y, grads) in zip(CASES, out, strict=True):
        if case["mask"] is None:
            continue
        checked += 1
        for a in (y, *grads):
            if a is not None:
                assert np.all(np.isfinite(a)), case["name"]
    assert checked == 4


# --------------------------------------------------------------------------- far from zero


FAR = [i for i, c in enumerate(CASES) if c["centered"] and c["mask"] is None][:5]


def test_far_from_zero_mean():
    """Mean 1e4, std 1, float32: within float32 rounding of float64 (flax's default is not).

    ``y = (x - mean) * rsqrt(var)``, so a relative error d in the variance moves y by d/2
    relative: the bound below keeps the variance within ``8 * sum_tol(n)`` (< 1e-3) of float64.
    """
    cases = [CASES[i] for i in FAR]
    inputs = [_inputs(1e4, 1.0, np.float32)[i] for i in FAR]
    run = jax.jit(
        lambda xs: [c["fn"](x, s, b, None) for c, (x, s, b) in zip(cases, xs, strict=True)]
    )
    outs = run(jax.device_put([i[:3] for i in inputs]))
    for case, (x, s, b, w, _), y in zip(cases, inputs, outs, strict=True):
        y64, _ = _reference(case, x, s, b, w)
        n = _group_size(case)
        tol = 4 * sum_tol(n) * max(1.0, float(np.max(np.abs(s))))
        assert tol < 1e-3
        np.testing.assert_allclose(y, y64, rtol=tol, atol=tol, err_msg=case["name"])
    # flax's default (E[x^2] - E[x]^2) on the first case loses the variance entirely.
    x, s, b = inputs[0][:3]
    flax_y = nn.LayerNorm().apply({"params": {"scale": s, "bias": b}}, x)
    y64, _ = _reference(cases[0], x, s, b, inputs[0][3])
    assert np.max(np.abs(f64(flax_y) - y64)) > 1e-2


# --------------------------------------------------------------------------- 16-bit inputs


HALF = [i for i, c in enumerate(CASES) if c["mask"] is None][:8]


@pytest.mark.parametrize(
    "dtype, unit", [(jnp.bfloat16, BF16_EPS), (jnp.float16, 2.0**-11)], ids=["bf16", "f16"]
)
def test_16_bit_inputs(dtype, unit):
    """float32 statistics, output in the input dtype, one rounding of the float32 result."""
    inputs = [_inputs(3.0, 2.0, dtype)[i] for i in HALF]
    cases = [CASES[i] for i in HALF]
    run = jax.jit(
        lambda xs: [c["fn"](x, s, b, None) for c, (x, s, b) in zip(cases, xs, strict=True)]
    )
    outs = run(jax.device_put([i[:3] for i in inputs]))
    for case, (x, s, b, w, _), y in zip(cases, inputs, outs, strict=True):
        assert y.dtype == dtype, case["name"]
        # The reference from the same 16-bit inputs: the statistics are float32 (a 16-bit mean
        # alone would be off by ~unit * |loc| / std), then one rounding of y to the dtype.
        y64, _ = _reference(case, f64(x), s, b, w)
        tol = 4 * sum_tol(_group_size(case)) * 4
        np.testing.assert_allclose(f64(y), y64, rtol=unit + tol, atol=unit + tol)


# --------------------------------------------------------------------------- residuals


def _residual_bytes(f, *args):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        jax.ad_checkpoint.print_saved_residuals(f, *args)
    total = 0
    sizes = {"f32": 4, "bf16": 2, "f16": 2, "bool": 1, "i32": 4}
    for line in buf.getvalue().splitlines():
        m = re.match(r"(\w+)\[([\d,]*)\]", line.strip())
        if m:
            dims = [int(d) for d in m.group(2).split(",") if d]
            total += sizes[m.group(1)] * int(np.prod(dims))
    return total


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_backward_saves_x_and_per_row_statistics(dtype):
    # What a deep network keeps per layer: x itself, per-row statistics and the parameters,
    # no full-size float32 temporary (flax saves several).
    rows, d = 64, 128
    x = jnp.zeros((rows, d), dtype)
    s, b = jnp.ones(d), jnp.zeros(d)
    budget = x.nbytes + 4 * rows * 4 + 2 * 4 * d
    assert _residual_bytes(lambda x, s, b: ji.layer_norm(x, s, b), x, s, b) <= budget
    assert _residual_bytes(lambda x, s: ji.rms_norm(x, s), x, s) <= budget
    with jax.numpy_dtype_promotion("standard"):  # flax mixes bf16 and f32
        flax = _residual_bytes(
            lambda x, s, b: nn.LayerNorm().apply({"params": {"scale": s, "bias": b}}, x), x, s, b
        )
    assert flax > 2 * x.nbytes  # the comparison means something


# --------------------------------------------------------------------------- devices


def test_feature_sharded_layer_norm_equals_unsharded():
    """Tensor parallelism: x split along its features over 8 devices, statistics over them.

    Layer norm and RMS norm, values and gradients, with a mask whose kept counts differ from
    device to device (so only a count-weighted combination is exact).
    """
    mesh = jax.make_mesh((8,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
    x = draws(0, (6, 64), loc=3.0, scale=2.0)
    s = draws(1, (64,), loc=1.0, scale=0.3)
    b = draws(2, (64,), scale=0.5)
    w = draws(3, (6, 64))
    mask = np.random.default_rng(4).random((6, 64)) < np.linspace(0.2, 1.0, 64)

    def loss(x, s, b, m, w, axis_name=None):
        ln = ji.layer_norm(x, s, b, mask=m, axis_name=axis_name)
        rms = ji.rms_norm(x, s, mask=m, axis_name=axis_name)
        total = jnp.sum((ln + rms) * w)
        return (jax.lax.psum(total, axis_name) if axis_name else total), (ln, rms)

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
    cols, vec = P(None, "model"), P("model")
    sharded = jax.jit(
        jax.shard_map(
            functools.partial(grad, axis_name="model"),
            mesh=mesh,
            in_specs=(cols, vec, vec, cols, cols),
            out_specs=((P(), (cols, cols)), (cols, vec, vec)),
        )
    )
    put = [jax.device_put(a) for a in (x, s, b, mask, w)]
    got = jax.device_get(sharded(*put))
    want = jax.device_get(jax.jit(grad)(*put))
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert_close_to_scale(g, e, 8 * sum_tol(64))
    # The per-device statistics alone (no axis_name) differ: the check can fail.
    local = jax.jit(
        jax.shard_map(
            lambda x, s, b: ji.layer_norm(x, s, b),
            mesh=mesh,
            in_specs=(cols, vec, vec),
            out_specs=cols,
        )
    )(*put[:3])
    assert np.max(np.abs(np.asarray(local) - want[0][1][0])) > 0.1


# --------------------------------------------------------------------------- transformations


def test_vmap_scan_remat_compose_without_retracing():
    x = jax.device_put(draws(0, (4, 3, 5, 16), loc=1.0))
    ws = jax.device_put(draws(1, (3, 16), loc=1.0, scale=0.2))

    def block(h, w):  # both backward paths of the core: row norms and pooled reductions
        h = ji.layer_norm(h, w)
        return jnp.tanh(ji.group_norm(h, None, w, num_groups=4)), None

    def scanned(x, ws):
        return jnp.sum(jax.lax.scan(jax.checkpoint(block), x, ws)[0] ** 2)

    def unrolled(x, ws):
        for w in ws:
            x, _ = block(x, w)
        return jnp.sum(x**2)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def both(x, ws):
        g1 = jax.grad(scanned, argnums=(0, 1))(x, ws)
        g2 = jax.grad(unrolled, argnums=(0, 1))(x, ws)
        # vmap over the batch axis equals the batched call (every norm is per example).
        per = jax.vmap(lambda xi: block(xi[None], ws[0])[0][0])(x)
        return g1, g2, per, block(x, ws[0])[0]

    chex.clear_trace_counter()
    for seed in range(2):  # a second call with new values reuses the trace
        g1, g2, per, batched = both(x + seed, ws)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        assert_close_to_scale(np.asarray(a), np.asarray(b), 16 * sum_tol(240))
    np.testing.assert_allclose(per, batched, rtol=0, atol=16 * sum_tol(240))


# --------------------------------------------------------------------------- bad input


X4 = np.ones((2, 3, 3, 8), np.float32)


@pytest.mark.parametrize(
    "call, err, msg",
    [
        pytest.param(
            lambda: ji.group_norm(X4, num_groups=3),
            ValueError,
            r"Number of groups \(3\) does not divide the number of channels \(8\)",
            id="groups_divide",
        ),
        pytest.param(
            lambda: ji.group_norm(X4, num_groups=4, group_size=2),
            ValueError,
            r"Either `num_groups` or `group_size` should be specified.*group_size=2",
            id="groups_both",
        ),
        pytest.param(
            lambda: ji.group_norm(X4, num_groups=None),
            ValueError,
            r"Either `num_groups` or `group_size`",
            id="groups_neither",
        ),
        pytest.param(
            lambda: ji.group_norm(X4, num_groups=None, group_size=3),
            ValueError,
            r"Number of channels \(8\) is not multiple of the group size \(3\)",
            id="group_size",
        ),
        pytest.param(
            lambda: ji.group_norm(X4, num_groups=2, reduction_axes=(1, 2)),
            ValueError,
            r"must include the final dimension.*reduction_axes=\(1, 2\)",
            id="groups_reduction",
        ),
        pytest.param(
            lambda: ji.group_norm(
                X4.transpose(0, 3, 1, 2), num_groups=2, feature_axis=1, reduction_axes=(2, 3)
            ),
            ValueError,
            r"must include the feature axis",
            id="groups_reduction_nchw",
        ),
        pytest.param(
            lambda: ji.instance_norm(X4, feature_axes=(0, 3)),
            ValueError,
            r"cannot include the leading dimension.*feature_axes=\(0, 3\)",
            id="instance_batch_axis",
        ),
        pytest.param(
            lambda: ji.layer_norm(X4, reduction_axes=()),
            ValueError,
            r"reduction_axes must name at least one axis.*got \(\)",
            id="empty_axes",
        ),
        pytest.param(
            lambda: ji.rms_norm(X4, reduction_axes=4),
            ValueError,
            r"reduction_axes=4 is out of range for an input of rank 4",
            id="axes_range",
        ),
        pytest.param(
            lambda: ji.layer_norm(X4, feature_axes=(1, -3)),
            ValueError,
            r"feature_axes=\(1, -3\) names the same axis twice",
            id="axes_twice",
        ),
        pytest.param(
            lambda: ji.layer_norm(X4, np.ones(3, np.float32)),
            ValueError,
            r"scale has shape \(3,\); expected \(8,\)",
            id="scale_shape",
        ),
        pytest.param(
            lambda: ji.group_norm(X4, None, np.ones((1, 8), np.float32), num_groups=2),
            ValueError,
            r"bias has shape \(1, 8\); expected \(8,\)",
            id="bias_shape",
        ),
        pytest.param(
            lambda: ji.instance_norm(X4, np.ones(8, np.int32)),
            TypeError,
            r"scale must have a floating dtype, got int32",
            id="scale_dtype",
        ),
        pytest.param(
            lambda: ji.layer_norm(X4.astype(np.int32)),
            TypeError,
            r"x must have a real floating dtype.*got int32",
            id="int_x",
        ),
        pytest.param(
            lambda: ji.rms_norm(X4, mask=np.ones((4, 8), bool)),
            ValueError,
            r"mask of shape \(4, 8\) does not broadcast to the input's shape \(2, 3, 3, 8\)",
            id="mask_shape",
        ),
        pytest.param(
            lambda: ji.instance_norm(X4, mask=np.ones((2, 3, 3, 8))),
            TypeError,
            r"mask must be a boolean array, got dtype float",
            id="mask_dtype",
        ),
        pytest.param(
            lambda: ji.layer_norm(X4, epsilon=-1e-5),
            ValueError,
            r"epsilon must be non-negative, got -1e-05",
            id="epsilon",
        ),
    ],
)
def test_bad_input(call, err, msg):
    with pytest.raises(err, match=msg):
        call()
    # ... and at trace time, under jit.
    with pytest.raises(err, match=msg):
        jax.jit(lambda: call())()


def test_float64_input_keeps_float64_statistics():
    # At 1e8 the spread (arange * 1e-3) is below float32's spacing there (8): only float64
    # statistics see it. The reference subtracts each row's first element first (exact in
    # float64), as a plain float64 mean at 1e8 would itself round by 1.5e-8.
    with jax.enable_x64(True):
        x = np.full((4, 32), 1e8) + np.arange(32) * 1e-3 + np.arange(4)[:, None]
        y = ji.layer_norm(x)
        assert y.dtype == jnp.float64
        np.testing.assert_allclose(y, np_norm(x - x[:, :1], (1,)), rtol=1e-9, atol=1e-9)
