"""ji.diagnose and the plots: statistics against float64 numpy computed by hand."""

import subprocess
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxinit as ji
import jaxinit.linen as jl
import jaxinit.nnx as jn

PNG = b"\x89PNG\r\n\x1a\n"
LR = 0.05
N, D_IN, D_H, D_OUT = 32, 6, 12, 3


def _loss(out, y):
    return jnp.mean((out - y) ** 2)


def _data():
    kx, ky = jax.random.split(jax.random.key(7))
    x = jax.random.normal(kx, (N, D_IN), jnp.float32)
    y = jax.random.normal(ky, (N, D_OUT), jnp.float32)
    return x, y


def _weights():
    k = jax.random.split(jax.random.key(11), 4)
    return {
        "w1": jax.random.normal(k[0], (D_IN, D_H)) * 0.9,
        "b1": jax.random.normal(k[1], (D_H,)) * 0.1,
        "w2": jax.random.normal(k[2], (D_H, D_OUT)) * 0.4,
        "b2": jax.random.normal(k[3], (D_OUT,)) * 0.1,
    }


def _by_hand(x, y, w, saturation=0.97):
    """Forward, backward and the statistics of a Dense-tanh-Dense MLP in float64 numpy."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    w = {k: np.asarray(v, np.float64) for k, v in w.items()}
    z1 = x @ w["w1"] + w["b1"]
    h1 = np.tanh(z1)
    out = h1 @ w["w2"] + w["b2"]
    loss = np.mean((out - y) ** 2)
    g_out = 2.0 * (out - y) / out.size
    g_w2 = h1.T @ g_out
    g_h1 = g_out @ w["w2"].T
    g_z1 = g_h1 * (1.0 - h1**2)
    g_w1 = x.T @ g_z1

    def act(v):
        return [v.mean(), v.std(), np.mean(np.abs(v) > saturation), np.mean(np.all(v == 0, 0))]

    return {
        "loss": loss,
        "layers": np.array([act(z1), act(out)]),
        "layers_tanh": np.array([act(np.tanh(z1)), act(np.tanh(out))]),
        "layer_grads": np.array([[g_z1.mean(), g_z1.std()], [g_out.mean(), g_out.std()]]),
        "param_std": np.array([w["w1"].std(), w["w2"].std()]),
        "grad": np.array([[g_w1.mean(), g_w1.std()], [g_w2.mean(), g_w2.std()]]),
    }


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


def _linen_variables(w):
    return {
        "params": {
            "hidden": {"kernel": w["w1"], "bias": w["b1"]},
            "out": {"kernel": w["w2"], "bias": w["b2"]},
        }
    }


def _nnx_model(w):
    m = NnxMLP(nnx.Rngs(0))
    m.hidden.kernel[...] = w["w1"]
    m.hidden.bias[...] = w["b1"]
    m.out.kernel[...] = w["w2"]
    m.out.bias[...] = w["b2"]
    return m


def _check(d, ref, activation=False):
    # float32 forward/backward over a few dozen terms: 1e-5 relative, plus a tiny absolute
    # floor for means that are near zero.
    tol = {"rtol": 2e-5, "atol": 1e-7}
    layers = ref["layers_tanh" if activation else "layers"]
    assert d.layers.names == ("hidden", "out")
    np.testing.assert_allclose(d.layers.mean, layers[:, 0], **tol)
    np.testing.assert_allclose(d.layers.std, layers[:, 1], **tol)
    # Fractions of counts: equal up to float32 rounding of the division.
    np.testing.assert_allclose(d.layers.saturated, layers[:, 2], rtol=1e-6)
    np.testing.assert_allclose(d.layers.dead, layers[:, 3], rtol=1e-6)
    np.testing.assert_allclose(d.layers.grad_mean, ref["layer_grads"][:, 0], **tol)
    np.testing.assert_allclose(d.layers.grad_std, ref["layer_grads"][:, 1], **tol)
    assert d.params.names == ("hidden/kernel", "out/kernel")
    np.testing.assert_allclose(d.params.std, ref["param_std"], **tol)
    np.testing.assert_allclose(d.params.grad_mean, ref["grad"][:, 0], **tol)
    np.testing.assert_allclose(d.params.grad_std, ref["grad"][:, 1], **tol)
    np.testing.assert_allclose(d.params.grad_data, ref["grad"][:, 1] / ref["param_std"], **tol)
    # One SGD step moves each weight by -lr * grad.
    expected = np.log10(LR * ref["grad"][:, 1] / ref["param_std"])
    np.testing.assert_allclose(d.params.update_data, expected, rtol=1e-5)
    np.testing.assert_allclose(d.loss, ref["loss"], rtol=2e-5)


class LinenDiagnoseTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_against_numpy_by_hand(self):
        x, y = _data()
        w = _weights()

        @self.variant
        def run(variables, x, y):
            return ji.diagnose(
                LinenMLP(), x, y, variables=variables, loss_fn=_loss, optimizer=optax.sgd(LR)
            )

        _check(run(_linen_variables(w), x, y), _by_hand(x, y, w))

    @chex.variants(with_jit=True)
    def test_activation_applied_before_statistics(self):
        x, y = _data()
        w = _weights()

        @self.variant
        def run(variables, x, y):
            return ji.diagnose(
                LinenMLP(),
                x,
                y,
                variables=variables,
                loss_fn=_loss,
                optimizer=optax.sgd(LR),
                activation=jnp.tanh,
            )

        _check(run(_linen_variables(w), x, y), _by_hand(x, y, w), activation=True)


def test_nnx_against_numpy_by_hand_eager_and_nnx_jit():
    x, y = _data()
    w = _weights()
    ref = _by_hand(x, y, w)
    model = _nnx_model(w)
    kwargs = {"loss_fn": _loss, "optimizer": optax.sgd(LR)}
    _check(ji.diagnose(model, x, y, **kwargs), ref)
    _check(nnx.jit(lambda m, x, y: ji.diagnose(m, x, y, **kwargs))(model, x, y), ref)


def test_without_loss_gradients_are_nan_and_table_prints():
    x, _ = _data()
    w = _weights()
    d = ji.diagnose(LinenMLP(), x, variables=_linen_variables(w))
    assert np.all(np.isnan(d.layers.grad_std)) and np.all(np.isnan(d.params.update_data))
    assert np.isnan(d.loss)
    text = str(d)
    assert "hidden" in text and "out/kernel" in text and "grad:data" in text
    # weights_only=False adds the biases.
    d = ji.diagnose(LinenMLP(), x, variables=_linen_variables(w), weights_only=False)
    assert set(d.params.names) == {"hidden/kernel", "hidden/bias", "out/kernel", "out/bias"}


def test_result_is_a_pytree_with_static_names():
    x, _ = _data()
    d = ji.diagnose(LinenMLP(), x, variables=_linen_variables(_weights()))
    leaves, treedef = jax.tree.flatten(d)
    assert all(isinstance(leaf, jax.Array) for leaf in leaves)
    again = jax.tree.unflatten(treedef, leaves)
    assert again.layers.names == ("hidden", "out")


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
    d = ji.diagnose(Probe(), x, variables=variables, activation=jax.nn.relu)
    # relu(z): columns 0 (z = 0) and 1 (z = -x < 0) are zero for the whole batch; column 4 is
    # zero for half the batch only, so it is alive.
    assert float(d.layers.dead[0]) == pytest.approx(2 / 5)
    d = ji.diagnose(Probe(), x, variables=variables, activation=jnp.tanh)
    z = np.asarray(x, np.float64) * np.asarray(kernel, np.float64) + np.asarray(bias, np.float64)
    expected = np.mean(np.abs(np.tanh(z)) > 0.97)  # |z| > 2.09: column 2 always, 1 for x > 2.09
    assert 0 < expected < 1
    assert float(d.layers.saturated[0]) == pytest.approx(expected)
    assert float(d.layers.dead[0]) == pytest.approx(1 / 5)  # tanh(0) = 0 in column 0 only
    # A looser threshold counts more: |tanh(z)| > 0.5 needs |z| > 0.549.
    d = ji.diagnose(Probe(), x, variables=variables, activation=jnp.tanh, saturation=0.5)
    assert float(d.layers.saturated[0]) == pytest.approx(np.mean(np.abs(np.tanh(z)) > 0.5))


def test_dead_units_of_a_conv_count_channels_over_all_positions():
    model = nn.Conv(4, (3, 3), padding="SAME")
    x = jnp.abs(jax.random.normal(jax.random.key(0), (2, 5, 5, 2)))
    v = model.init(jax.random.key(1), x)
    kernel = v["params"]["kernel"].at[..., 0].set(-jnp.abs(v["params"]["kernel"][..., 0]))
    v = {"params": {"kernel": kernel, "bias": jnp.zeros(4)}}
    d = jax.jit(lambda v: ji.diagnose(model, x, variables=v, activation=jax.nn.relu))(v)
    assert d.layers.names == ("<root>",)
    out = np.maximum(np.asarray(jax.jit(model.apply)(v, x), np.float64), 0.0)
    expected = np.mean(np.all(out.reshape(-1, 4) == 0, axis=0))
    assert expected >= 0.25
    assert float(d.layers.dead[0]) == pytest.approx(expected)


def _bn_linen(bn_cls):
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(8)(x)
            x = bn_cls(use_running_average=False)(x)
            return nn.Dense(2)(jax.nn.relu(x))

    return Net()


@pytest.mark.parametrize("bn_cls", [nn.BatchNorm, jl.BatchNorm], ids=["flax", "jaxinit"])
def test_linen_batch_norm_model_and_leaf_selection(bn_cls):
    model = _bn_linen(bn_cls)
    x = jax.random.normal(jax.random.key(0), (16, 4)) * 3.0 + 1.0
    v = model.init(jax.random.key(1), x)
    d = jax.jit(lambda v, x: ji.diagnose(model, x, jnp.zeros((16, 2)), variables=v, loss_fn=_loss))(
        v, x
    )
    assert d.layers.names == ("Dense_0", "BatchNorm_0", "Dense_1")
    assert d.layers.kinds[1] == "BatchNorm"
    # Batch norm in training mode standardizes: mean 0, std 1 (up to epsilon).
    assert abs(float(d.layers.mean[1])) < 1e-5
    assert float(d.layers.std[1]) == pytest.approx(1.0, rel=1e-3)
    names = jax.eval_shape(lambda v: ji.diagnose(model, x, variables=v, include=r"^Dense"), v)
    assert names.layers.names == ("Dense_0", "Dense_1")
    outs = ji.layer_outputs(
        model, x, variables=v, leaves_only=False, include=["BatchNorm_0", "<root>"]
    )
    assert list(outs) == ["BatchNorm_0", "<root>"]


class NnxBN(nnx.Module):
    def __init__(self, bn_cls, rngs):
        self.lin = nnx.Linear(4, 8, rngs=rngs)
        self.bn = bn_cls(8, rngs=rngs)
        self.head = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(jax.nn.relu(self.bn(self.lin(x))))


@pytest.mark.parametrize("bn_cls", [nnx.BatchNorm, jn.BatchNorm], ids=["flax", "jaxinit"])
def test_nnx_model_is_not_mutated(bn_cls):
    model = NnxBN(bn_cls, nnx.Rngs(0))
    before = jax.tree.map(np.asarray, nnx.state(model))
    x = jax.random.normal(jax.random.key(0), (16, 4)) * 3.0 + 1.0
    d = ji.diagnose(model, x, jnp.zeros((16, 2)), loss_fn=_loss, optimizer=optax.sgd(0.1))
    # Attribute order in __init__ is lin, bn, head, but the calls decide the order.
    assert d.layers.names == ("lin", "bn", "head")
    assert float(d.layers.std[1]) == pytest.approx(1.0, rel=1e-3)
    chex.assert_trees_all_equal(before, jax.tree.map(np.asarray, nnx.state(model)))


def test_layer_outputs_are_the_module_outputs():
    x, _ = _data()
    w = _weights()
    outs = ji.layer_outputs(LinenMLP(), x, variables=_linen_variables(w))
    np.testing.assert_allclose(outs["hidden"], x @ w["w1"] + w["b1"], rtol=1e-6)
    y = LinenMLP().apply(_linen_variables(w), x)
    np.testing.assert_array_equal(outs["out"], y)


def test_shared_module_called_twice_gets_two_entries():
    class Twice(nn.Module):
        @nn.compact
        def __call__(self, x):
            dense = nn.Dense(3)
            return dense(dense(x))

    x = jnp.ones((2, 3))
    v = Twice().init(jax.random.key(0), x)
    assert list(ji.layer_outputs(Twice(), x, variables=v)) == ["Dense_0", "Dense_0#2"]


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda x: ji.diagnose(LinenMLP(), x), ValueError, "needs its variables"),
        (
            lambda x: ji.diagnose(NnxMLP(nnx.Rngs(0)), x, variables={"params": {}}),
            ValueError,
            "variables must be None for nnx",
        ),
        (lambda x: ji.diagnose(lambda x: x, x), TypeError, "model must be a flax"),
        (
            lambda x: ji.diagnose(LinenMLP(), x, variables={"batch_stats": {}}),
            ValueError,
            "'params' collection",
        ),
        (
            lambda x: ji.diagnose(NnxMLP(nnx.Rngs(0)), x, optimizer=optax.sgd(0.1)),
            ValueError,
            "optimizer needs loss_fn",
        ),
        (
            lambda x: ji.diagnose(NnxMLP(nnx.Rngs(0)), x, loss_fn=lambda out: out),
            ValueError,
            "loss_fn must return a scalar",
        ),
        (
            lambda x: ji.diagnose(NnxMLP(nnx.Rngs(0)), x, saturation=-1.0),
            ValueError,
            "saturation must be a non-negative",
        ),
        (
            lambda x: ji.diagnose(
                LinenMLP(),
                x,
                variables=_linen_variables(_weights()),
                model_kwargs={"mutable": ["batch_stats"]},
            ),
            ValueError,
            "must not set 'mutable'",
        ),
    ],
)
def test_bad_input(call, exc, match):
    x, _ = _data()
    with pytest.raises(exc, match=match):
        call(x)


# --- plots ---------------------------------------------------------------------------------


def _png(path):
    with open(path, "rb") as f:
        return f.read(8) == PNG


def test_plots_write_png_files(tmp_path):
    pytest.importorskip("matplotlib")
    x, y = _data()
    v = _linen_variables(_weights())
    kw = {"variables": v}
    assert _png(ji.plot_activations(LinenMLP(), x, str(tmp_path / "a.png"), **kw))
    assert _png(ji.plot_gradients(LinenMLP(), x, y, str(tmp_path / "g.png"), loss_fn=_loss, **kw))
    model = NnxMLP(nnx.Rngs(0))
    r = ji.update_ratios(model, x, y, loss_fn=_loss, optimizer=optax.sgd(LR), steps=3)
    assert _png(ji.plot_update_ratios(r, str(tmp_path / "u.png")))
    assert _png(ji.plot_histograms({"w": np.arange(10.0)}, str(tmp_path / "h.png")))
    with pytest.raises(ValueError, match="values is empty"):
        ji.plot_histograms({}, str(tmp_path / "e.png"))


def test_update_ratios_first_step_matches_diagnose_and_loss_falls():
    x, y = _data()
    w = _weights()
    v = _linen_variables(w)
    kw = {"loss_fn": _loss, "optimizer": optax.sgd(LR)}
    r = ji.update_ratios(LinenMLP(), x, y, variables=v, steps=5, **kw)
    d = ji.diagnose(LinenMLP(), x, y, variables=v, **kw)
    assert r.names == d.params.names and r.ratios.shape == (5, 2)
    np.testing.assert_allclose(r.ratios[0], d.params.update_data, rtol=1e-5)
    np.testing.assert_allclose(r.losses[0], d.loss, rtol=1e-6)
    assert np.all(np.diff(r.losses) < 0)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        ji.update_ratios(LinenMLP(), x, y, variables=v, steps=0, **kw)


def test_import_jaxinit_loads_neither_flax_nor_matplotlib():
    code = "import sys, jaxinit; print(sorted({'flax', 'matplotlib'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
