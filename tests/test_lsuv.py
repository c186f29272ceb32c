"""LSUV on linen and nnx models: unit output variance per layer, checked by independent means.

linen layers are read back with flax's own ``capture_intermediates``; nnx layers are recomputed
by calling the model's sub-modules one by one. Variances are computed in float64 numpy.
"""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxinit as ji
import jaxinit.linen as jl
import jaxinit.nnx as jn

TOL = 0.1


def _var(a):
    return float(np.var(np.asarray(a, np.float64)))


def _mean(a):
    return float(np.mean(np.asarray(a, np.float64)))


# --- linen models -------------------------------------------------------------------------


class DeepMLP(nn.Module):
    act: str
    depth: int = 6
    width: int = 32
    bn: type | None = None

    @nn.compact
    def __call__(self, x):
        f = {"tanh": jnp.tanh, "relu": jax.nn.relu}[self.act]
        for _ in range(self.depth):
            x = nn.Dense(self.width)(x)
            if self.bn is not None:
                x = self.bn(use_running_average=False)(x)
            x = f(x)
        return nn.Dense(1)(x)


class SmallCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jax.nn.relu(nn.Conv(8, (3, 3))(x))
        x = jax.nn.relu(nn.Conv(8, (3, 3), strides=2)(x))
        return nn.Dense(3)(x.mean(axis=(1, 2)))


def _linen_layer_vars(model, variables, x):
    """Output variance of every Dense/Conv, read with flax's capture_intermediates."""
    _, state = jax.jit(
        lambda v, x: model.apply(
            v,
            x,
            capture_intermediates=lambda m, name: isinstance(m, nn.Dense | nn.Conv),
            mutable=["intermediates", "batch_stats"],
        )
    )(variables, x)
    inter = state["intermediates"]
    return {k: (_var(v["__call__"][0]), _mean(v["__call__"][0])) for k, v in inter.items()}


LINEN_CASES = {
    "tanh_mlp": (DeepMLP("tanh"), (256, 16)),
    "relu_mlp": (DeepMLP("relu"), (256, 16)),
    "relu_mlp_flax_bn": (DeepMLP("relu", depth=3, bn=nn.BatchNorm), (256, 16)),
    "relu_mlp_jaxinit_bn": (DeepMLP("relu", depth=3, bn=jl.BatchNorm), (256, 16)),
    "cnn": (SmallCNN(), (16, 8, 8, 3)),
}


@pytest.mark.parametrize("case", list(LINEN_CASES))
def test_linen_unit_variance_per_layer(case):
    model, shape = LINEN_CASES[case]
    x = jax.random.normal(jax.random.key(0), shape, jnp.float32) * 2.0 + 0.5
    variables = jax.jit(model.init)(jax.random.key(1), x)
    new, report = ji.lsuv(model, x, variables=variables, key=jax.random.key(2))
    measured = _linen_layer_vars(model, new, x)
    assert list(measured) == list(report.names)  # every Dense/Conv, in forward order
    for name, (var, _) in measured.items():
        assert abs(var - 1.0) <= TOL, (case, name, var)
    np.testing.assert_allclose(report.variances, [v for v, _ in measured.values()], rtol=1e-4)
    assert all(report.converged) and all(i >= 0 for i in report.iterations)
    # Running statistics are left alone; only kernels change (biases only with center=True).
    jax.tree.map(
        np.testing.assert_array_equal, new.get("batch_stats"), variables.get("batch_stats")
    )
    flat_old = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
    flat_new = dict(jax.tree_util.tree_flatten_with_path(new["params"])[0])
    changed = {jax.tree_util.keystr(p) for p, v in flat_old if not np.array_equal(v, flat_new[p])}
    assert changed and all(s.endswith("['kernel']") for s in changed)


def test_linen_center_gives_zero_mean_and_unit_variance():
    model, shape = LINEN_CASES["relu_mlp"]
    x = jax.random.normal(jax.random.key(0), shape, jnp.float32)
    variables = model.init(jax.random.key(1), x)
    new, report = ji.lsuv(model, x, variables=variables, key=jax.random.key(2), center=True)
    for name, (var, mean) in _linen_layer_vars(model, new, x).items():
        assert abs(var - 1.0) <= TOL and abs(mean) <= TOL, (name, var, mean)
    # relu outputs feed every hidden layer after the first: their mean is far from zero, so
    # centring had work to do.
    assert max(abs(m) for m in report.means) <= TOL


def test_orthogonal_pre_init():
    model = DeepMLP("tanh", depth=2)
    x = jax.random.normal(jax.random.key(0), (64, 32))
    variables = model.init(jax.random.key(1), x)
    # A huge tolerance: no rescaling at all, so the kernels are the orthogonal pre-init.
    new, report = ji.lsuv(model, x, variables=variables, key=jax.random.key(2), tol=1e9)
    assert report.iterations == (0, 0, 0)
    for i in range(2):
        k = np.asarray(new["params"][f"Dense_{i}"]["kernel"], np.float64)
        np.testing.assert_allclose(k.T @ k, np.eye(k.shape[1]), atol=1e-5)
    # Without the pre-init and with no rescaling the kernels stay as they were.
    new, _ = ji.lsuv(model, x, variables=variables, tol=1e9, orthogonal_init=False)
    jax.tree.map(np.testing.assert_array_equal, new, variables)


def test_report_prints_and_iterations_bounded():
    model, shape = LINEN_CASES["tanh_mlp"]
    x = jax.random.normal(jax.random.key(0), shape)
    variables = model.init(jax.random.key(1), x)
    _, report = ji.lsuv(model, x, variables=variables, key=jax.random.key(2), max_iters=1)
    assert all(i <= 1 for i in report.iterations)
    text = str(report)
    assert "Dense_0" in text and "variance" in text and text.count("\n") == len(report.names)


# --- nnx models ---------------------------------------------------------------------------


class NnxMLP(nnx.Module):
    def __init__(self, act, rngs, depth=6, width=32, bn=None):
        self.act = {"tanh": jnp.tanh, "relu": jax.nn.relu}[act]
        dims = [16] + [width] * depth
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in itertools.pairwise(dims)])
        self.norms = nnx.List([bn(width, rngs=rngs) for _ in range(depth)] if bn else [])
        self.head = nnx.Linear(width, 1, rngs=rngs)

    def layer_outputs(self, x):
        outs = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            outs.append(x)
            if len(self.norms):
                x = self.norms[i](x)
            x = self.act(x)
        outs.append(self.head(x))
        return outs

    def __call__(self, x):
        return self.layer_outputs(x)[-1]


class NnxCNN(nnx.Module):
    def __init__(self, rngs):
        self.c1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.c2 = nnx.Conv(8, 8, (3, 3), strides=2, rngs=rngs)
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def layer_outputs(self, x):
        a = self.c1(x)
        b = self.c2(jax.nn.relu(a))
        return [a, b, self.head(jax.nn.relu(b).mean(axis=(1, 2)))]

    def __call__(self, x):
        return self.layer_outputs(x)[-1]


NNX_CASES = {
    "tanh_mlp": (lambda r: NnxMLP("tanh", r), (256, 16)),
    "relu_mlp": (lambda r: NnxMLP("relu", r), (256, 16)),
    "relu_mlp_flax_bn": (lambda r: NnxMLP("relu", r, depth=3, bn=nnx.BatchNorm), (256, 16)),
    "relu_mlp_jaxinit_bn": (lambda r: NnxMLP("relu", r, depth=3, bn=jn.BatchNorm), (256, 16)),
    "cnn": (NnxCNN, (16, 8, 8, 3)),
}


@pytest.mark.parametrize("case", list(NNX_CASES))
def test_nnx_unit_variance_per_layer_in_place(case):
    make, shape = NNX_CASES[case]
    model = make(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), shape, jnp.float32) * 2.0 + 0.5
    stats_before = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
    report = ji.lsuv(model, x, key=jax.random.key(2))
    assert isinstance(report, ji.LsuvReport)
    # lsuv's forward passes ran on a copy: the running statistics did not move.
    after = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
    jax.tree.map(np.testing.assert_array_equal, after, stats_before)
    # The model was updated in place: its own sub-modules now give unit variance.
    measured = [_var(o) for o in model.layer_outputs(x)]
    assert len(measured) == len(report.names)
    for name, var in zip(report.names, measured, strict=True):
        assert abs(var - 1.0) <= TOL, (case, name, var)
    np.testing.assert_allclose(report.variances, measured, rtol=1e-4)


# --- bad input ----------------------------------------------------------------------------


def _linen_mlp():
    model = DeepMLP("tanh", depth=2)
    x = jnp.ones((8, 16))
    return model, x, model.init(jax.random.key(0), x)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({}, "key is required"),
        ({"key": jax.random.key(0), "tol": 0.0}, "tol must be a positive number"),
        ({"key": jax.random.key(0), "max_iters": 0}, "max_iters must be an int >= 1"),
        ({"key": jax.random.key(0), "include": "nothing"}, "no layer to rescale"),
    ],
)
def test_bad_input(kwargs, match):
    model, x, variables = _linen_mlp()
    with pytest.raises(ValueError, match=match):
        ji.lsuv(model, x, variables=variables, **kwargs)


def test_dead_layer_cannot_be_rescaled():
    class Dead(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4)(jax.nn.relu(-jnp.abs(x)))  # its input is all zeros

    x = jax.random.normal(jax.random.key(0), (8, 4))
    v = Dead().init(jax.random.key(1), x)
    with pytest.raises(ValueError, match=r"layer 'Dense_0' has output variance 0\.0"):
        ji.lsuv(Dead(), x, variables=v, key=jax.random.key(2))
