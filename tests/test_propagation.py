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


# One shape for every propagation here and in the doctests: the samplers and the scan compile
# once. Width 512 keeps the statistical checks below within their bands.
DEEP = {"depth": 5, "width": 512, "batch": 64}


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
    r = ji.propagation(init, activation, **DEEP, key=key)
    fwd, bwd = _reference(init, activation, *DEEP.values(), key)
    assert r.activation == activation and r.depth == DEEP["depth"]
    # float32 rounding: a dot product of n terms is off by at most about n * eps relative to
    # its terms' magnitudes (Higham 2002, section 3.1), chained over the layers and back.
    rtol = 2 * DEEP["depth"] * DEEP["width"] * float(np.finfo(np.float32).eps)
    np.testing.assert_allclose(r.forward, fwd, rtol=rtol)
    np.testing.assert_allclose(r.backward, bwd, rtol=rtol)


@pytest.fixture(scope="module")
def std1_relu():
    return ji.propagation(ji.normal(1.0), "relu", **DEEP)


def test_first_layer_second_moment_closed_form(std1_relu):
    # Layer 1 sees the unit-normal inputs x through N(0, 1) weights W (n x n), whatever the
    # activation: E[z^2] = n. Its estimate averages B rows of x W W^T x^T / n, each with
    # relative variance about 4 / n, plus 2 / n^2 from the draw of W: 5 standard errors.
    n, b = DEEP["width"], DEEP["batch"]
    stderr = math.sqrt(4.0 / (n * b) + 2.0 / n**2)
    assert abs(std1_relu.forward[0] / n - 1.0) < 5 * stderr


def test_assert_stable_fails_on_std_one_init_at_depth(std1_relu):
    with pytest.raises(AssertionError, match=r"forward pre-activation .* at layer 2: "):
        ji.assert_stable(std1_relu)
    # The message names the band and counts the layers outside it.
    with pytest.raises(AssertionError, match=r"\[0.5, 2\].*4 of 5 layers outside"):
        ji.assert_stable(std1_relu, backward=False)


@pytest.mark.parametrize("activation", ["relu", "linear"])
def test_assert_stable_passes_for_kaiming(activation):
    # Through L random layers of width n the log of E[z^2] wanders with variance about 5L/n for
    # relu and 2L/n for linear (Hanin 2018): L=5, n=512 gives std <= 0.22, while the band
    # [0.5, 2] is +-0.69 in log, more than 3 std.
    init = ji.kaiming_normal(nonlinearity=activation)
    ji.assert_stable(ji.propagation(init, activation, **DEEP))


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
    r = ji.PropagationResult("tanh", np.array([1.0, 0.5]), np.array([2.0, np.inf]))
    lines = str(r).splitlines()
    assert lines[0].split()[-3:] == ["(tanh,", "depth", "2)"]
    assert [line.split() for line in lines[1:]] == [["1", "1", "2"], ["2", "0.5", "inf"]]
