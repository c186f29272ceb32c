"""muP: kinds from shapes (linen and nnx, MLP and transformer), init variances, lr factors."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import jaxinit as ji

KEY = jax.random.key(0)
IS_INFO = lambda x: isinstance(x, ji.MupInfo)


def kinds(infos):
    return {
        ji._src.mup.path_name(p): (i.kind, i.fan_in_mult, i.fan_out_mult)
        for p, i in jax.tree_util.tree_flatten_with_path(infos, is_leaf=IS_INFO)[0]
    }


# --------------------------------------------------------------------------- linen


class MLP(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.width, name="input")(x))
        x = nn.relu(nn.Dense(self.width, name="hidden")(x))
        return nn.Dense(10, name="readout")(x)


class Transformer(nn.Module):
    width: int

    @nn.compact
    def __call__(self, tokens):
        h = nn.Embed(32, self.width, name="embed")(tokens)
        u = nn.LayerNorm(name="ln_1")(h)
        attn = nn.MultiHeadDotProductAttention(
            num_heads=self.width // 8, qkv_features=self.width, name="attn"
        )
        h = h + attn(u)
        u = nn.gelu(nn.Dense(4 * self.width, name="mlp_in")(nn.LayerNorm(name="ln_2")(h)))
        h = h + nn.Dense(self.width, name="mlp_out")(u)
        return nn.Dense(32, name="unembed")(nn.LayerNorm(name="ln_f")(h))


ATTN_OVERRIDES = {
    "*embedding": {"batch_axis": 0, "out_axis": 1},
    "*attn/[kqv]*/bias": {"kind": "vector"},  # (heads, head_dim) biases
    "*attn/query/kernel": ji.einsum_axes("btd,dhk->bthk"),
    "*attn/key/kernel": ji.einsum_axes("btd,dhk->bthk"),
    "*attn/value/kernel": ji.einsum_axes("btd,dhk->bthk"),
    "*attn/out/kernel": ji.einsum_axes("bthk,hkd->btd"),
}

TRANSFORMER_KINDS = {  # (kind, fan_in_mult, fan_out_mult) at width 64 over base 16
    "params/embed/embedding": ("input", 1.0, 4.0),
    "params/attn/query/kernel": ("hidden", 4.0, 4.0),  # out axes (heads, head_dim): 4x heads
    "params/attn/query/bias": ("vector", 1.0, 4.0),
    "params/attn/out/kernel": ("hidden", 4.0, 4.0),
    "params/attn/out/bias": ("vector", 1.0, 4.0),
    "params/ln_1/scale": ("vector", 1.0, 4.0),
    "params/mlp_in/kernel": ("hidden", 4.0, 4.0),
    "params/mlp_out/kernel": ("hidden", 4.0, 4.0),
    "params/unembed/kernel": ("output", 4.0, 1.0),
    "params/unembed/bias": ("fixed", 1.0, 1.0),
}


def linen_shapes(module, width, x):
    return jax.eval_shape(module(width).init, KEY, x)


def test_linen_mlp_kinds_and_factors():
    x = jnp.zeros((1, 8))
    infos = ji.mup_infos(linen_shapes(MLP, 256, x), linen_shapes(MLP, 64, x))
    assert kinds(infos) == {
        "params/input/kernel": ("input", 1.0, 4.0),
        "params/input/bias": ("vector", 1.0, 4.0),
        "params/hidden/kernel": ("hidden", 4.0, 4.0),
        "params/hidden/bias": ("vector", 1.0, 4.0),
        "params/readout/kernel": ("output", 4.0, 1.0),
        "params/readout/bias": ("fixed", 1.0, 1.0),
    }
    # One leaf per parameter: a tree of infos maps like a tree of arrays.
    assert len(jax.tree.leaves(infos)) == 6


def test_linen_transformer_kinds_with_einsum_overrides():
    t = jnp.zeros((1, 4), jnp.int32)
    infos = ji.mup_infos(
        linen_shapes(Transformer, 64, t), linen_shapes(Transformer, 16, t), overrides=ATTN_OVERRIDES
    )
    got = kinds(infos)
    for path, want in TRANSFORMER_KINDS.items():
        assert got[path] == want, path
    # Without the overrides the (D, H, K) kernel has a width axis outside jax's in/out axes.
    with pytest.raises(ValueError, match=r"'params/attn/key/kernel'.*axis 0 changes with width"):
        ji.mup_infos(linen_shapes(Transformer, 64, t), linen_shapes(Transformer, 16, t))


def test_delta_params_find_widths_at_the_base_width():
    x = jnp.zeros((1, 8))
    base = linen_shapes(MLP, 64, x)
    plain = kinds(ji.mup_infos(base, base))
    assert {k for k, *_ in plain.values()} == {"fixed"}
    infos = kinds(ji.mup_infos(base, base, delta_params=linen_shapes(MLP, 128, x)))
    assert infos["params/hidden/kernel"] == ("hidden", 1.0, 1.0)
    assert infos["params/readout/kernel"] == ("output", 1.0, 1.0)
    assert infos["params/input/bias"] == ("vector", 1.0, 1.0)


# --------------------------------------------------------------------------- nnx


class NnxBlock(nnx.Module):
    def __init__(self, width: int, rngs: nnx.Rngs):
        self.embed = nnx.Embed(32, width, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=width // 8, in_features=width, decode=False, rngs=rngs
        )
        self.norm = nnx.RMSNorm(width, rngs=rngs)
        self.conv = nnx.Conv(width, width, (3,), rngs=rngs)
        self.readout = nnx.Linear(width, 32, rngs=rngs)

    def __call__(self, tokens):
        h = self.embed(tokens)
        h = h + self.attn(self.norm(h))
        return self.readout(self.conv(h))


def test_nnx_transformer_kinds():
    abstract = lambda width: nnx.state(
        nnx.eval_shape(lambda: NnxBlock(width, nnx.Rngs(0))), nnx.Param
    )
    got = kinds(ji.mup_infos(abstract(32), abstract(8), overrides=ATTN_OVERRIDES))
    assert got["embed/embedding"] == ("input", 1.0, 4.0)
    assert got["attn/query/kernel"] == ("hidden", 4.0, 4.0)
    assert got["attn/query/bias"] == ("vector", 1.0, 4.0)
    assert got["attn/out/kernel"] == ("hidden", 4.0, 4.0)
    assert got["norm/scale"] == ("vector", 1.0, 4.0)
    assert got["conv/kernel"] == ("hidden", 4.0, 4.0)  # (3, in, out): the window is receptive
    assert got["readout/kernel"] == ("output", 4.0, 1.0)
    assert got["readout/bias"] == ("fixed", 1.0, 1.0)


class NnxMLP(nnx.Module):
    def __init__(self, width: int, rngs: nnx.Rngs):
        self.input = nnx.Linear(8, width, rngs=rngs)
        self.hidden = nnx.Linear(width, width, rngs=rngs)
        self.readout = nnx.Linear(width, 4, rngs=rngs)

    def __call__(self, x):
        return self.readout(nnx.relu(self.hidden(nnx.relu(self.input(x)))))


def test_nnx_mlp_init_and_optimizer():
    model = NnxMLP(32, nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    infos = ji.mup_infos(
        params, nnx.state(nnx.eval_shape(lambda: NnxMLP(8, nnx.Rngs(0))), nnx.Param)
    )
    assert kinds(infos)["hidden/kernel"] == ("hidden", 4.0, 4.0)
    nnx.update(model, ji.mup_init(params, infos, KEY, zero_readout=True))
    assert not np.any(np.asarray(model.readout.kernel[...]))
    tx = optax.chain(optax.sgd(1.0), ji.mup_lr_scale(infos, optimizer="sgd"))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    before = {k: np.asarray(getattr(model, k).kernel[...]) for k in ("input", "hidden", "readout")}
    grads = nnx.grad(lambda m: m(jnp.ones((2, 8))).sum())(model)
    opt.update(model, grads)
    for name, factor in (("input", 4.0), ("hidden", 1.0), ("readout", 0.25)):
        step = getattr(model, name).kernel[...] - before[name]
        np.testing.assert_allclose(step, -factor * grads[name]["kernel"][...], rtol=1e-6)


# --------------------------------------------------------------------------- init


def test_mup_init_variances_follow_the_rule():
    width, base, n_out = 256, 32, 64
    shapes = lambda w: {
        "input": jnp.zeros((64, w)),
        "hidden": jnp.zeros((w, w)),
        "conv": jnp.zeros((3, 3, w, w // 8)),
        "readout": jnp.zeros((w, n_out)),
        "bias": jnp.full((w,), 0.5, jnp.bfloat16),
    }
    params = shapes(width)
    infos = ji.mup_infos(params, jax.eval_shape(lambda: shapes(base)))
    new = jax.jit(lambda p, k: ji.mup_init(p, infos, k))(params, KEY)
    mult = width / base
    want_var = {
        "input": 1 / 64,
        "hidden": 1 / width,
        "conv": 1 / (9 * width),
        "readout": 1 / (width * mult),
    }
    # Truncated-normal draws (at 2 std) have kurtosis 2.3655: the sample variance's relative std
    # is sqrt((kurtosis - 1) / n). Six of those bound each check.
    kurtosis = 2.3655  # scipy.stats.truncnorm(-2, 2): excess 0.3655 + 3
    for name, var in want_var.items():
        w = np.asarray(new[name], np.float64)
        tol = 6 * math.sqrt((kurtosis - 1) / w.size)
        assert abs(w.var() / var - 1) < tol, (name, w.var(), var)
        assert abs(w.mean()) < 6 * math.sqrt(var / w.size), name
    np.testing.assert_array_equal(new["bias"], params["bias"])
    assert new["bias"].dtype == jnp.bfloat16
    zero = ji.mup_init(params, infos, KEY, zero_readout=True)
    assert not np.any(np.asarray(zero["readout"]))
    np.testing.assert_array_equal(zero["hidden"], new["hidden"])


def test_mup_init_at_the_base_width_is_lecun_normal():
    shapes = lambda w: {"a_hidden": jnp.zeros((w, w)), "b_readout": jnp.zeros((w, 10))}
    params = shapes(64)
    infos = ji.mup_infos(params, params, delta_params=jax.eval_shape(lambda: shapes(128)))
    new = ji.mup_init(params, infos, KEY)
    keys = jax.random.split(KEY, 2)
    np.testing.assert_array_equal(new["a_hidden"], ji.lecun_normal()(keys[0], (64, 64)))
    np.testing.assert_array_equal(new["b_readout"], ji.lecun_normal()(keys[1], (64, 10)))


# --------------------------------------------------------------------------- learning rates


def test_lr_factors_of_both_columns():
    infos = {
        "input": ji.MupInfo("input", 1.0, 4.0),
        "hidden": ji.MupInfo("hidden", 4.0, 2.0),
        "output": ji.MupInfo("output", 8.0, 1.0),
        "vector": ji.MupInfo("vector", 1.0, 4.0),
        "fixed": ji.MupInfo("fixed"),
    }
    grads = {k: jnp.full((3,), 2.0) for k in infos}
    want = {
        "adam": {"input": 1, "hidden": 1 / 4, "output": 1 / 8, "vector": 1, "fixed": 1},
        "sgd": {"input": 4, "hidden": 1, "output": 1 / 8, "vector": 4, "fixed": 1},
    }
    for optimizer, factors in want.items():
        tx = optax.chain(optax.sgd(0.5), ji.mup_lr_scale(infos, optimizer=optimizer))
        updates, _ = tx.update(grads, tx.init(grads))
        for name, factor in factors.items():
            np.testing.assert_allclose(updates[name], -0.5 * 2.0 * factor, rtol=1e-7)
    half = {"w": jnp.ones(2, jnp.bfloat16)}
    tx = ji.mup_lr_scale({"w": ji.MupInfo("hidden", 4.0, 4.0)})
    assert tx.update(half, tx.init(half))[0]["w"].dtype == jnp.bfloat16


# --------------------------------------------------------------------------- errors


def test_errors_name_the_parameter():
    a = {"w": jnp.zeros((8, 8)), "b": jnp.zeros((8,))}
    with pytest.raises(
        ValueError, match="different tree structures: only in params: 'b'; only in base_params: 'c'"
    ):
        ji.mup_infos(a, {"w": jnp.zeros((4, 4)), "c": jnp.zeros((4,))})
    with pytest.raises(ValueError, match=r"'w' cannot be compared.*\(8, 8\).*\(4,\)"):
        ji.mup_infos(a, {"w": jnp.zeros((4,)), "b": jnp.zeros((4,))})
    with pytest.raises(ValueError, match="'w': axis 0 is 8 here and 4 in the base"):
        delta = {"w": jnp.zeros((4, 16)), "b": jnp.zeros((16,))}
        ji.mup_infos(a, {"w": jnp.zeros((4, 4)), "b": jnp.zeros((4,))}, delta_params=delta)
    with pytest.raises(ValueError, match="overrides key 'x/\\*' matches no parameter"):
        ji.mup_infos(a, a, overrides={"x/*": {"in_axis": 0}})
    with pytest.raises(ValueError, match="matches the overrides"):
        ji.mup_infos(a, a, overrides={"*": {"in_axis": 0}, "w*": {"in_axis": 1}})
    with pytest.raises(ValueError, match="keys from"):
        ji.mup_infos(a, a, overrides={"w": {"fan_in": 0}})
    with pytest.raises(ValueError, match=r"parameter 'w' \(shape \(8, 8\)\).*out of range"):
        ji.mup_infos(a, a, overrides={"w": {"in_axis": 0, "out_axis": 2}})
    with pytest.raises(TypeError, match="'w' of base_params is str"):
        ji.mup_infos(a, {"w": "x", "b": jnp.zeros((8,))})
    with pytest.raises(ValueError, match="unknown kind 'readout'"):
        ji.MupInfo("readout")
    with pytest.raises(ValueError, match="fan_in_mult must be finite and > 0"):
        ji.MupInfo("hidden", 0.0)
    with pytest.raises(ValueError, match="optimizer='lion' is not supported"):
        ji.mup_lr_scale({"w": ji.MupInfo("fixed")}, optimizer="lion")
    with pytest.raises(TypeError, match=r"the info at 'w' is 1\.0, not a ji\.MupInfo"):
        ji.mup_lr_scale({"w": 1.0})
    with pytest.raises(ValueError, match="params has 2 leaves but infos has 1"):
        ji.mup_init(a, {"w": ji.MupInfo("fixed")}, KEY)
