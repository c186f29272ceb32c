"""LSUV on linen and nnx models: unit output variance per layer, checked by independent means.

linen layers are read back with flax's own ``capture_intermediates``; nnx layers are recomputed
by calling the model's sub-modules one by one; the constructed Dense stack is recomputed in
float64 numpy.
"""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers_diagnostics import linen_variables, mean64, nnx_model, normal, var64

import jaxinit as ji
import jaxinit.linen as jl
import jaxinit.nnx as jn

TOL = 0.1  # lsuv's default tolerance on |Var - 1|
WIDTH = 64
# float32 variance of a layer's output, in the report and in float64 numpy of the same model: a
# sum of up to 256 * 64 float32 terms per reduction, about sqrt(16384) * 2**-24 = 1e-5 relative;
# ten times that.
VAR_RTOL = 1e-4
MLP_X = normal(0, (256, 16), scale=2.0, shift=0.5)
CNN_X = normal(1, (16, 8, 8, 3), scale=2.0, shift=0.5)


# --- linen models -------------------------------------------------------------------------


class MLP(nn.Module):
    """Dense(64) and an activation, twice (optionally batch norm between), then Dense(1)."""

    act: str
    bn: type | None = None

    @nn.compact
    def __call__(self, x):
        f = {"tanh": jnp.tanh, "relu": jax.nn.relu}[self.act]
        for _ in range(2):
            x = nn.Dense(WIDTH)(x)
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


def _linen_layer_stats(model, variables, x):
    """(variance, mean) of every Dense/Conv output, read with flax's capture_intermediates."""
    _, state = jax.jit(
        lambda v, x: model.apply(
            v,
            x,
            capture_intermediates=lambda m, name: isinstance(m, nn.Dense | nn.Conv),
            mutable=["intermediates", "batch_stats"],
        )
    )(variables, x)
    inter = state["intermediates"]
    return {k: (var64(v["__call__"][0]), mean64(v["__call__"][0])) for k, v in inter.items()}


LINEN_CASES = {
    "tanh_mlp": (MLP("tanh"), MLP_X),
    "relu_mlp_flax_bn": (MLP("relu", bn=nn.BatchNorm), MLP_X),
    "relu_mlp_jaxinit_bn": (MLP("relu", bn=jl.BatchNorm), MLP_X),
    "cnn": (SmallCNN(), CNN_X),
}


@pytest.mark.parametrize("case", list(LINEN_CASES))
def test_linen_unit_variance_per_layer(case):
    model, x = LINEN_CASES[case]
    variables = linen_variables(model, x)
    new, report = ji.lsuv(model, x, variables=variables, key=jax.random.key(2))
    measured = _linen_layer_stats(model, new, x)
    assert list(measured) == list(report.names)  # every Dense/Conv, in forward order
    for name, (var, _) in measured.items():
        assert abs(var - 1.0) <= TOL, (case, name, var)
    np.testing.assert_allclose(report.variances, [v for v, _ in measured.values()], VAR_RTOL)
    assert all(report.converged)
    # Running statistics are left alone; only kernels change (biases only with center=True).
    jax.tree.map(
        np.testing.assert_array_equal, new.get("batch_stats"), variables.get("batch_stats")
    )
    flat_old = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
    flat_new = dict(jax.tree_util.tree_flatten_with_path(new["params"])[0])
    changed = {jax.tree_util.keystr(p) for p, v in flat_old if not np.array_equal(v, flat_new[p])}
    assert changed and all(s.endswith("['kernel']") for s in changed)


# --- nnx models ---------------------------------------------------------------------------


class NnxMLP(nnx.Module):
    def __init__(self, act, rngs, bn=None):
        self.act = {"tanh": jnp.tanh, "relu": jax.nn.relu}[act]
        dims = [16, WIDTH, WIDTH]
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in itertools.pairwise(dims)])
        self.norms = nnx.List([bn(WIDTH, rngs=rngs) for _ in range(2)] if bn else [])
        self.head = nnx.Linear(WIDTH, 1, rngs=rngs)

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
    "tanh_mlp": (lambda r: NnxMLP("tanh", r), MLP_X),
    "relu_mlp_flax_bn": (lambda r: NnxMLP("relu", r, bn=nnx.BatchNorm), MLP_X),
    "relu_mlp_jaxinit_bn": (lambda r: NnxMLP("relu", r, bn=jn.BatchNorm), MLP_X),
    "cnn": (NnxCNN, CNN_X),
}


@pytest.mark.parametrize("case", list(NNX_CASES))
def test_nnx_unit_variance_per_layer_in_place(case):
    make, x = NNX_CASES[case]
    model = nnx_model(lambda: make(nnx.Rngs(0)))
    stats_before = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
    report = ji.lsuv(model, x, key=jax.random.key(2))
    assert isinstance(report, ji.LsuvReport)
    # lsuv's forward passes ran on a copy: the running statistics did not move.
    after = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
    jax.tree.map(np.testing.assert_array_equal, after, stats_before)
    # The model was updated in place: its own sub-modules now give unit variance.
    measured = [var64(o) for o in model.layer_outputs(x)]
    assert len(measured) == len(report.names)
    for name, var in zip(report.names, measured, strict=True):
        assert abs(var - 1.0) <= TOL, (case, name, var)
    np.testing.assert_allclose(report.variances, measured, VAR_RTOL)


# --- exact iteration counts on a constructed Dense stack -----------------------------------


class Stack(nn.Module):
    """Dense layers a, b, c of width 8 with relu between them."""

    @nn.compact
    def __call__(self, x):
        x = jax.nn.relu(nn.Dense(8, name="a")(x))
        x = jax.nn.relu(nn.Dense(8, name="b")(x))
        return nn.Dense(8, name="c")(x)


def _stack_case():
    """Inputs and weights for which LSUV's work per layer is known exactly.

    a: identity kernel on standardized inputs, so its output already has mean 0 and variance 1;
    b: three times the identity on relu outputs (variance about 0.34 * 9, mean about 1.2): one
    rescaling gives variance 1, as Var(z / s) = Var(z) / s^2, and with centring also mean 0;
    c: its bias alone has variance 2 across the columns, which rescaling the kernel cannot lower,
    so without centring c never gets within tolerance; centring scales the bias too.
    """
    x = np.random.default_rng(0).standard_normal((64, 8))
    x = jnp.asarray((x - x.mean()) / x.std(), jnp.float32)
    eye = np.eye(8, dtype=np.float32)
    bias_c = np.sqrt(2.0) * np.array([1, -1] * 4, np.float32)
    params = {
        "a": {"kernel": eye, "bias": np.zeros(8, np.float32)},
        "b": {"kernel": 3.0 * eye, "bias": np.zeros(8, np.float32)},
        "c": {"kernel": 0.1 * eye, "bias": bias_c},
    }
    return x, jax.tree.map(jnp.asarray, {"params": params})


def _stack_outputs(params, x):
    """Outputs of a, b and c in float64 numpy."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    h, outs = np.asarray(x, np.float64), []
    for name in ("a", "b", "c"):
        z = h @ p[name]["kernel"] + p[name]["bias"]
        outs.append(z)
        h = np.maximum(z, 0.0)
    return outs


@pytest.mark.parametrize("center", [False, True], ids=["rescale", "center"])
def test_iterations_on_a_constructed_stack(center):
    x, variables = _stack_case()
    new, report = ji.lsuv(
        Stack(), x, variables=variables, orthogonal_init=False, max_iters=3, center=center
    )
    outs = _stack_outputs(new["params"], x)
    np.testing.assert_allclose(report.variances, [np.var(z) for z in outs], VAR_RTOL)
    # Means of order 1 and means that centring made 0: float32 rounding is below 1e-6 absolute.
    np.testing.assert_allclose(report.means, [np.mean(z) for z in outs], atol=1e-6)
    changed = {
        (name, kind)
        for name in ("a", "b", "c")
        for kind in ("kernel", "bias")
        if not np.array_equal(new["params"][name][kind], variables["params"][name][kind])
    }
    if center:
        assert report.iterations == (0, 1, 1) and report.converged == (True, True, True)
        assert all(abs(m) <= TOL for m in report.means[1:])
        assert changed == {("b", "kernel"), ("b", "bias"), ("c", "kernel"), ("c", "bias")}
    else:
        # c stops at max_iters, not converged: its variance is the bias's 2, up to the kernel's
        # shrunken part and its covariance with the bias (both below 0.01 here).
        assert report.iterations == (0, 1, 3) and report.converged == (True, True, False)
        assert report.variances[2] == pytest.approx(2.0, abs=0.01)
        assert abs(report.means[1]) > TOL  # b was rescaled, not centred
        assert changed == {("b", "kernel"), ("c", "kernel")}
    lines = str(report).splitlines()
    assert lines[0].split() == ["layer", "kind", "iters", "variance", "mean", "converged"]
    assert [line.split()[-1] for line in lines[1:]] == ["yes", "yes", "yes" if center else "no"]


def test_orthogonal_pre_init():
    model, x = LINEN_CASES["tanh_mlp"]
    variables = linen_variables(model, x)
    # A huge tolerance: no rescaling at all, so the kernels are the orthogonal pre-init.
    new, report = ji.lsuv(model, x, variables=variables, key=jax.random.key(2), tol=1e9)
    assert report.iterations == (0, 0, 0)
    for i in range(3):
        k = np.asarray(new["params"][f"Dense_{i}"]["kernel"], np.float64)
        small = min(k.shape)
        gram = k.T @ k if k.shape[0] >= k.shape[1] else k @ k.T
        # float32 QR: orthonormal to a few float32 ulps.
        np.testing.assert_allclose(gram, np.eye(small), atol=1e-5)
    # Without the pre-init and with no rescaling the kernels stay as they were.
    new, _ = ji.lsuv(model, x, variables=variables, tol=1e9, orthogonal_init=False)
    jax.tree.map(np.testing.assert_array_equal, new, variables)


# --- bad input ----------------------------------------------------------------------------


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
    model, x = LINEN_CASES["tanh_mlp"]
    with pytest.raises(ValueError, match=match):
        ji.lsuv(model, x, variables=linen_variables(model, x), **kwargs)


def test_dead_layer_cannot_be_rescaled():
    class Dead(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4)(jax.nn.relu(-jnp.abs(x)))  # its input is all zeros

    x = normal(0, (8, 4))
    v = {"params": {"Dense_0": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}}}
    with pytest.raises(ValueError, match=r"layer 'Dense_0' has output variance 0\.0"):
        ji.lsuv(Dead(), x, variables=v, orthogonal_init=False)
