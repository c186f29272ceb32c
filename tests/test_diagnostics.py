"""ji.diagnose, ji.layer_outputs and the plots: statistics against float64 numpy by hand."""

import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers_diagnostics import is_png, linen_variables, nnx_model, normal, requires_matplotlib

import jaxinit as ji
import jaxinit.linen as jl
import jaxinit.nnx as jn

LR = 0.05
N, D_IN, D_H, D_OUT = 32, 6, 12, 3
X = normal(7, (N, D_IN))
Y = normal(8, (N, D_OUT))
W = {
    "w1": normal(11, (D_IN, D_H), 0.9),
    "b1": normal(12, (D_H,), 0.1),
    "w2": normal(13, (D_H, D_OUT), 0.4),
    "b2": normal(14, (D_OUT,), 0.1),
}
# float32 sums of at most N * D_H = 384 products, against float64: about sqrt(384) * 2**-24 =
# 1.2e-6 relative, 2e-5 leaves room; the absolute floor is for means that are nearly zero.
TOL = {"rtol": 2e-5, "atol": 1e-7}


def _loss(out, y):
    return jnp.mean((out - y) ** 2)


def _by_hand(saturation=0.97):
    """Forward, backward and the statistics of the Dense-tanh-Dense MLP in float64 numpy."""
    x, y = np.asarray(X, np.float64), np.asarray(Y, np.float64)
    w = {k: np.asarray(v, np.float64) for k, v in W.items()}
    z1 = x @ w["w1"] + w["b1"]
    h1 = np.tanh(z1)
    out = h1 @ w["w2"] + w["b2"]
    g_out = 2.0 * (out - y) / out.size
    g_w2 = h1.T @ g_out
    g_z1 = (g_out @ w["w2"].T) * (1.0 - h1**2)
    g_w1 = x.T @ g_z1

    def act(v):
        return [v.mean(), v.std(), np.mean(np.abs(v) > saturation), np.mean(np.all(v == 0, 0))]

    return {
        "loss": np.mean((out - y) ** 2),
        "layers": np.array([act(z1), act(out)]),
        "layers_tanh": np.array([act(np.tanh(z1)), act(np.tanh(out))]),
        "layer_grads": np.array([[g_z1.mean(), g_z1.std()], [g_out.mean(), g_out.std()]]),
        "param_std": np.array([w["w1"].std(), w["w2"].std()]),
        "grad": np.array([[g_w1.mean(), g_w1.std()], [g_w2.mean(), g_w2.std()]]),
    }


REF = _by_hand()


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(D_H, name="hidden")(x)
        return nn.Dense(D_OUT, name="out")(jnp.tanh(x))


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(D_IN, D_H, rngs=rngs)
        self.out = nnx.Linear(D_H, D_OUT, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))


VARIABLES = {
    "params": {
        "hidden": {"kernel": W["w1"], "bias": W["b1"]},
        "out": {"kernel": W["w2"], "bias": W["b2"]},
    }
}


def _nnx_model():
    m = nnx_model(lambda: NnxMLP(nnx.Rngs(0)))
    m.hidden.kernel[...] = W["w1"]
    m.hidden.bias[...] = W["b1"]
    m.out.kernel[...] = W["w2"]
    m.out.bias[...] = W["b2"]
    return m


def _bn_output_std(scale, bias):
    """Std over features and batch of train-mode batch norm's output.

    Each feature is standardized, then gets std ``scale`` and mean ``bias``.
    """
    scale, bias = np.asarray(scale, np.float64), np.asarray(bias, np.float64)
    return np.sqrt(np.mean(scale**2 + bias**2) - bias.mean() ** 2)


# Batch norm's epsilon 1e-5 against feature variances of order 1 or more: under 1e-5 relative.
BN_RTOL = 1e-4


def _bn_linen(bn_cls):
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(8)(x)
            x = bn_cls(use_running_average=False)(x)
            return nn.Dense(2)(jax.nn.relu(x))

    return Net()


BN_X = normal(0, (16, 4), scale=3.0, shift=1.0)


class NnxBN(nnx.Module):
    def __init__(self, bn_cls, rngs):
        self.lin = nnx.Linear(4, 8, rngs=rngs)
        self.bn = bn_cls(8, rngs=rngs)
        self.head = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(jax.nn.relu(self.bn(self.lin(x))))


def _check(d, activation=False):
    layers = REF["layers_tanh" if activation else "layers"]
    assert d.layers.names == ("hidden", "out")
    np.testing.assert_allclose(d.layers.mean, layers[:, 0], **TOL)
    np.testing.assert_allclose(d.layers.std, layers[:, 1], **TOL)
    # Fractions of counts: equal up to float32 rounding of the division.
    np.testing.assert_allclose(d.layers.saturated, layers[:, 2], rtol=1e-6)
    np.testing.assert_allclose(d.layers.dead, layers[:, 3], rtol=1e-6)
    np.testing.assert_allclose(d.layers.grad_mean, REF["layer_grads"][:, 0], **TOL)
    np.testing.assert_allclose(d.layers.grad_std, REF["layer_grads"][:, 1], **TOL)
    assert d.params.names == ("hidden/kernel", "out/kernel")
    np.testing.assert_allclose(d.params.std, REF["param_std"], **TOL)
    np.testing.assert_allclose(d.params.grad_mean, REF["grad"][:, 0], **TOL)
    np.testing.assert_allclose(d.params.grad_std, REF["grad"][:, 1], **TOL)
    np.testing.assert_allclose(d.params.grad_data, REF["grad"][:, 1] / REF["param_std"], **TOL)
    # One SGD step moves each weight by -lr * grad.
    expected = np.log10(LR * REF["grad"][:, 1] / REF["param_std"])
    np.testing.assert_allclose(d.params.update_data, expected, **TOL)
    np.testing.assert_allclose(d.loss, REF["loss"], **TOL)


@pytest.fixture(scope="module")
def linen_jitted():
    """Jitted diagnose of the linen MLP with loss and SGD: plain, and with tanh applied."""

    def run(variables, x, y):
        kwargs = {"variables": variables, "loss_fn": _loss, "optimizer": optax.sgd(LR)}
        plain = ji.diagnose(LinenMLP(), x, y, **kwargs)
        return plain, ji.diagnose(LinenMLP(), x, y, activation=jnp.tanh, **kwargs)

    return jax.jit(run)(VARIABLES, X, Y)


@pytest.mark.parametrize("activation", [False, True], ids=["output", "tanh_of_output"])
def test_linen_against_numpy_by_hand(linen_jitted, activation):
    _check(linen_jitted[activation], activation=activation)


def test_nnx_against_numpy_by_hand_under_nnx_jit():
    # (test_nnx_model_is_not_mutated runs nnx models eagerly.)
    kwargs = {"loss_fn": _loss, "optimizer": optax.sgd(LR)}
    _check(nnx.jit(lambda m, x, y: ji.diagnose(m, x, y, **kwargs))(_nnx_model(), X, Y))


def test_without_loss_gradients_are_nan_and_tables_print():
    d = ji.diagnose(LinenMLP(), X, variables=VARIABLES)
    np.testing.assert_allclose(d.layers.std, REF["layers"][:, 1], **TOL)
    assert np.all(np.isnan(d.layers.grad_std)) and np.all(np.isnan(d.params.update_data))
    assert np.isnan(d.loss)
    layers, params, loss = str(d).split("\n\n")
    assert (
        layers.splitlines()[0].split()
        == "layer kind mean std saturated dead grad mean grad std".split()
    )
    assert [line.split()[:2] for line in layers.splitlines()[1:]] == [
        ["hidden", "Dense"],
        ["out", "Dense"],
    ]
    assert params.splitlines()[1].split()[:3] == ["hidden/kernel", "(6,", "12)"]
    assert params.splitlines()[0].endswith("grad:data log10 upd:data")
    assert loss == "loss nan"
    # A pytree whose names are static metadata: they survive flattening.
    leaves, treedef = jax.tree.flatten(d)
    assert all(isinstance(leaf, jax.Array) for leaf in leaves)
    assert jax.tree.unflatten(treedef, leaves).layers.names == ("hidden", "out")
    # weights_only=False adds the biases (names only: no need to run it).
    shapes = jax.eval_shape(
        lambda: ji.diagnose(LinenMLP(), X, variables=VARIABLES, weights_only=False)
    )
    assert set(shapes.params.names) == {"hidden/kernel", "hidden/bias", "out/kernel", "out/bias"}


class Probe(nn.Module):
    """One Dense layer with a hand-set kernel: columns chosen to be dead or saturated."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(5, name="probe")(x)


def test_dead_and_saturated_fractions_on_constructed_inputs():
    x = jnp.linspace(1.0, 3.0, 8, dtype=jnp.float32)[:, None]  # all inputs positive
    kernel = jnp.array([[0.0, -1.0, 5.0, 0.1, 1.0]], jnp.float32)
    bias = jnp.array([0.0, 0.0, 0.0, 0.0, -2.0], jnp.float32)  # column 4: zero only for x <= 2
    variables = {"params": {"probe": {"kernel": kernel, "bias": bias}}}

    @jax.jit
    def run(v):
        relu = ji.diagnose(Probe(), x, variables=v, activation=jax.nn.relu)
        tanh = ji.diagnose(Probe(), x, variables=v, activation=jnp.tanh)
        loose = ji.diagnose(Probe(), x, variables=v, activation=jnp.tanh, saturation=0.5)
        return relu.layers, tanh.layers, loose.layers

    relu, tanh, loose = run(variables)
    # relu(z): columns 0 (z = 0) and 1 (z = -x < 0) are zero for the whole batch; column 4 is
    # zero for half the batch only, so it is alive.
    assert float(relu.dead[0]) == pytest.approx(2 / 5)
    z = np.asarray(x, np.float64) * np.asarray(kernel, np.float64) + np.asarray(bias, np.float64)
    expected = np.mean(np.abs(np.tanh(z)) > 0.97)  # |z| > 2.09: column 2 always, 1 for x > 2.09
    assert 0 < expected < 1
    assert float(tanh.saturated[0]) == pytest.approx(expected)
    assert float(tanh.dead[0]) == pytest.approx(1 / 5)  # tanh(0) = 0 in column 0 only
    # A looser threshold counts more: |tanh(z)| > 0.5 needs |z| > 0.549.
    assert float(loose.saturated[0]) == pytest.approx(np.mean(np.abs(np.tanh(z)) > 0.5))
    assert float(loose.saturated[0]) > float(tanh.saturated[0])


def test_dead_units_of_a_conv_count_channels_over_all_positions():
    x = jnp.abs(normal(0, (2, 5, 5, 2)))  # positive inputs
    kernel = np.zeros((3, 3, 2, 4), np.float32)
    kernel[..., 0] = -1.0  # negative everywhere: dead
    kernel[0, 0, :, 1] = 1.0  # top-left tap only: zero on the first row and column, alive
    kernel[..., 2] = 1.0  # positive everywhere: alive
    # channel 3: zero kernel, zero output: dead
    v = {"params": {"kernel": jnp.asarray(kernel), "bias": jnp.zeros(4)}}
    d = ji.diagnose(nn.Conv(4, (3, 3), padding="SAME"), x, variables=v, activation=jax.nn.relu)
    assert d.layers.names == ("<root>",)
    assert float(d.layers.dead[0]) == 2 / 4


@pytest.mark.parametrize("bn_cls", [nn.BatchNorm, jl.BatchNorm], ids=["flax", "jaxinit"])
def test_linen_batch_norm_model_and_leaf_selection(bn_cls):
    model = _bn_linen(bn_cls)
    v = linen_variables(model, BN_X)
    d = jax.jit(lambda v: ji.diagnose(model, BN_X, jnp.zeros((16, 2)), variables=v, loss_fn=_loss))(
        v
    )
    assert d.layers.names == ("Dense_0", "BatchNorm_0", "Dense_1")
    assert d.layers.kinds[1] == "BatchNorm"
    bn = v["params"]["BatchNorm_0"]
    # Standardized features have mean 0 up to float32 rounding of values of order 1.
    assert float(d.layers.mean[1]) == pytest.approx(float(np.mean(bn["bias"])), abs=1e-6)
    expected = _bn_output_std(bn["scale"], bn["bias"])
    assert float(d.layers.std[1]) == pytest.approx(expected, rel=BN_RTOL)
    names = jax.eval_shape(lambda v: ji.diagnose(model, BN_X, variables=v, include=r"^Dense"), v)
    assert names.layers.names == ("Dense_0", "Dense_1")
    names = []  # traced only: eval_shape would sort a returned dict's keys

    def outputs(v):
        include = ["BatchNorm_0", "<root>"]
        outs = ji.layer_outputs(model, BN_X, variables=v, leaves_only=False, include=include)
        names.extend(outs)
        return list(outs.values())

    jax.eval_shape(outputs, v)
    assert names == ["BatchNorm_0", "<root>"]


@pytest.mark.parametrize(
    "bn_cls,transform",
    [(nnx.BatchNorm, lambda f: f), (jn.BatchNorm, nnx.jit)],
    ids=["flax-eager", "jaxinit-nnx_jit"],  # nnx.jit would write a mutation back, too
)
def test_nnx_model_is_not_mutated(bn_cls, transform):
    model = nnx_model(lambda: NnxBN(bn_cls, nnx.Rngs(0)))
    before = jax.tree.map(np.asarray, nnx.state(model))
    kwargs = {"loss_fn": _loss, "optimizer": optax.sgd(0.1)}
    d = transform(lambda m: ji.diagnose(m, BN_X, jnp.zeros((16, 2)), **kwargs))(model)
    # Attribute order in __init__ is lin, bn, head, but the calls decide the order.
    assert d.layers.names == ("lin", "bn", "head")
    expected = _bn_output_std(model.bn.scale[...], model.bn.bias[...])
    assert float(d.layers.std[1]) == pytest.approx(expected, rel=BN_RTOL)
    after = jax.tree.map(np.asarray, nnx.state(model))
    jax.tree.map(np.testing.assert_array_equal, before, after)


def test_layer_outputs_are_the_module_outputs():
    outs = ji.layer_outputs(LinenMLP(), X, variables=VARIABLES)
    hidden = np.asarray(X, np.float64) @ np.asarray(W["w1"], np.float64) + np.asarray(W["b1"])
    np.testing.assert_allclose(outs["hidden"], hidden, **TOL)
    np.testing.assert_array_equal(outs["out"], LinenMLP().apply(VARIABLES, X))


def test_shared_module_called_twice_gets_two_entries():
    class Twice(nn.Module):
        @nn.compact
        def __call__(self, x):
            dense = nn.Dense(3)
            return dense(dense(x))

    x = jnp.ones((2, 3))
    v = linen_variables(Twice(), x)
    assert list(ji.layer_outputs(Twice(), x, variables=v)) == ["Dense_0", "Dense_0#2"]


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: ji.diagnose(LinenMLP(), X), ValueError, "needs its variables"),
        (
            lambda: ji.diagnose(_nnx_model(), X, variables={"params": {}}),
            ValueError,
            "variables must be None for nnx",
        ),
        (lambda: ji.diagnose(lambda x: x, X), TypeError, "model must be a flax"),
        (
            lambda: ji.diagnose(LinenMLP(), X, variables={"batch_stats": {}}),
            ValueError,
            "'params' collection",
        ),
        (
            lambda: ji.diagnose(_nnx_model(), X, optimizer=optax.sgd(0.1)),
            ValueError,
            "optimizer needs loss_fn",
        ),
        (
            lambda: ji.diagnose(_nnx_model(), X, loss_fn=lambda out: out),
            ValueError,
            "loss_fn must return a scalar",
        ),
        (
            lambda: ji.diagnose(_nnx_model(), X, saturation=-1.0),
            ValueError,
            "saturation must be a non-negative",
        ),
        (
            lambda: ji.diagnose(
                LinenMLP(), X, variables=VARIABLES, model_kwargs={"mutable": ["batch_stats"]}
            ),
            ValueError,
            "must not set 'mutable'",
        ),
        (
            lambda: ji.update_ratios(
                LinenMLP(), X, Y, variables=VARIABLES, loss_fn=_loss, optimizer=None, steps=0
            ),
            ValueError,
            "steps must be an int >= 1",
        ),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_update_ratios_first_step_matches_diagnose_and_loss_falls(linen_jitted):
    kw = {"loss_fn": _loss, "optimizer": optax.sgd(LR)}
    r = ji.update_ratios(LinenMLP(), X, Y, variables=VARIABLES, steps=5, **kw)
    d = linen_jitted[0]
    assert r.names == d.params.names and r.ratios.shape == (5, 2)
    np.testing.assert_allclose(r.ratios[0], d.params.update_data, **TOL)
    np.testing.assert_allclose(r.losses[0], d.loss, **TOL)
    assert np.all(np.diff(r.losses) < 0)


@requires_matplotlib
def test_plots_write_png_files(tmp_path):
    # An nnx model with batch norm (the doctests plot linen ones), as in the eager
    # test_nnx_model_is_not_mutated: its operations are compiled already.
    model = nnx_model(lambda: NnxBN(nnx.BatchNorm, nnx.Rngs(0)))
    before = jax.tree.map(np.asarray, nnx.state(model))
    y = jnp.zeros((16, 2))
    assert is_png(ji.plot_gradients(model, BN_X, y, str(tmp_path / "g.png"), loss_fn=_loss))
    # Adam: optax's bias correction mixes int and float, which the suite's strict promotion
    # refuses; the diagnostics run the optimizer under standard promotion.
    r = ji.update_ratios(model, BN_X, y, loss_fn=_loss, optimizer=optax.adam(LR), steps=3)
    assert r.names == ("head/kernel", "lin/kernel") and np.all(np.isfinite(r.ratios))
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, nnx.state(model)))
    assert is_png(ji.plot_update_ratios(r, str(tmp_path / "u.png")))
    # Non-finite values are left out; an array with nothing finite draws no curve.
    values = {"w": np.array([0.0, 1.0, np.inf, np.nan]), "none": np.array([np.nan])}
    assert is_png(ji.plot_histograms(values, str(tmp_path / "h.png"), saturation=0.5))
    with pytest.raises(ValueError, match="values is empty"):
        ji.plot_histograms({}, str(tmp_path / "e.png"))


def test_import_jaxinit_loads_neither_flax_nor_matplotlib():
    code = "import sys, jaxinit; print(sorted({'flax', 'matplotlib'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
