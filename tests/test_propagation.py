"""Variance propagation checker: float64 numpy reference, assertion helper, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinit as ji


def _reference(init, activation, depth, width, batch, key):
    """The same MLP in float64 numpy, with a hand-written backward pass."""
    kw, kx, kg = jax.random.split(key, 3)
    ws = [
        np.asarray(init(k, (width, width), jnp.float32), np.float64)
        for k in jax.random.split(kw, depth)
    ]
    x = np.asarray(jax.random.normal(kx, (batch, width), jnp.float32), np.float64)
    cot = np.asarray(jax.random.normal(kg, (batch, width), jnp.float32), np.float64)
    f, df = {
        "linear": (lambda z: z, lambda z: np.ones_like(z)),
        "relu": (lambda z: np.maximum(z, 0.0), lambda z: (z > 0).astype(np.float64)),
        "tanh": (np.tanh, lambda z: 1.0 - np.tanh(z) ** 2),
    }[activation]
    zs, h = [], x
    for w in ws:
        z = h @ w
        zs.append(z)
        h = f(z)
    grads = [None] * depth
    g = cot
    for i in range(depth - 1, -1, -1):
        grads[i] = g
        if i:
            g = (g @ ws[i].T) * df(zs[i - 1])
    fwd = np.array([np.mean(z * z) for z in zs])
    bwd = np.array([np.mean(g * g) for g in grads])
    return fwd, bwd


@pytest.mark.parametrize(
    "activation,init",
    [
        ("relu", ji.kaiming_normal(nonlinearity="relu")),
        ("tanh", ji.kaiming_normal(nonlinearity="tanh")),
        ("linear", ji.lecun_normal()),
    ],
)
def test_matches_float64_reference(activation, init):
    key = jax.random.key(3)
    r = ji.propagation(init, activation, 6, width=48, batch=40, key=key)
    fwd, bwd = _reference(init, activation, 6, 48, 40, key)
    assert r.activation == activation and r.depth == 6
    # float32 matmuls over 48 terms and 6 layers: relative error far below 1e-4.
    np.testing.assert_allclose(r.forward, fwd, rtol=1e-4)
    np.testing.assert_allclose(r.backward, bwd, rtol=1e-4)


def test_first_layer_second_moment_closed_form():
    # Linear layer with N(0, s^2) weights on unit-normal inputs: E[z^2] = s^2 * width. The
    # estimate averages batch*width = 65536 products; its relative std error is about
    # sqrt(2 / width) from the weights' column norms (width 1024): use 6 of those.
    width, s = 1024, 0.1
    r = ji.propagation(ji.normal(s), "linear", 10, width=width, batch=64)
    expected = s * s * width
    assert abs(r.forward[0] / expected - 1.0) < 6 * math.sqrt(2.0 / width)


def test_assert_stable_fails_on_std_one_init_at_depth():
    r = ji.propagation(ji.normal(1.0), "relu", 10, width=1024, batch=64)
    with pytest.raises(AssertionError, match=r"forward pre-activation .* at layer 2: "):
        ji.assert_stable(r)
    # The message names the band and counts the layers outside it.
    with pytest.raises(AssertionError, match=r"\[0.5, 2\].*9 of 10 layers outside"):
        ji.assert_stable(r, backward=False)


def test_assert_stable_passes_for_kaiming_relu_and_linear():
    # Through L random layers of width n the log of E[z^2] wanders with variance about 5L/n for
    # relu and 2L/n for linear (Hanin 2018): L=10, n=1024 gives std <= 0.22, while the band
    # [0.5, 2] is +-0.69 in log, more than 3 std.
    for activation in ("relu", "linear"):
        init = ji.kaiming_normal(nonlinearity=activation)
        r = ji.propagation(init, activation, 10, width=1024, batch=64, key=jax.random.key(1))
        ji.assert_stable(r)


def test_assert_stable_backward_reference_is_last_layer():
    fwd = np.ones(4)
    r = ji.PropagationResult("linear", fwd, np.array([0.1, 1.0, 1.0, 1.0]))
    with pytest.raises(AssertionError, match=r"backward gradient .* layer 4's .* at layer 1: "):
        ji.assert_stable(r)
    ji.assert_stable(r, backward=False)
    ji.assert_stable(r, low=0.05)


def test_assert_stable_non_finite_fails():
    r = ji.PropagationResult("linear", np.array([1.0, np.inf, np.nan]), np.ones(3))
    with pytest.raises(AssertionError, match="at layer 2: inf"):
        ji.assert_stable(r)
    r = ji.PropagationResult("linear", np.array([0.0, 1.0]), np.ones(2))
    with pytest.raises(AssertionError, match=r"reference second moment at layer 1 is 0\.0"):
        ji.assert_stable(r)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"low": 0.0}, "0 < low <= high"),
        ({"low": 2.0, "high": 1.0}, "0 < low <= high"),
    ],
)
def test_assert_stable_bad_band(kwargs, match):
    r = ji.PropagationResult("linear", np.ones(2), np.ones(2))
    with pytest.raises(ValueError, match=match):
        ji.assert_stable(r, **kwargs)


@pytest.mark.parametrize(
    "args,kwargs,exc,match",
    [
        (("swish", 3), {}, ValueError, "activation must be one of .* got 'swish'"),
        (("relu", 0), {}, ValueError, "depth must be an int >= 1; got 0"),
        (("relu", 2), {"width": 0}, ValueError, "width must be an int >= 1"),
        (("relu", 2), {"batch": 1}, ValueError, "batch must be an int >= 2"),
    ],
)
def test_propagation_bad_input(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ji.propagation(ji.lecun_normal(), *args, **kwargs)


def test_propagation_rejects_non_callable_init():
    with pytest.raises(TypeError, match="init must be an initializer"):
        ji.propagation("kaiming", "relu", 2)


def test_str_lists_every_layer():
    r = ji.propagation(ji.lecun_normal(), "tanh", 6, width=48, batch=40)
    lines = str(r).splitlines()
    assert len(lines) == 7 and "tanh, depth 6" in lines[0]
