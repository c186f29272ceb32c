"""compute_fans, calculate_gain and variance_gain against independent references."""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, special

import jaxinit as ji

# ----------------------------------------------------------------------------- fans


@pytest.mark.parametrize(
    ("shape", "kwargs", "expected"),
    [
        ((128, 64), {}, (128, 64)),
        ((3, 3, 16, 32), {}, (144, 288)),
        ((5, 7, 9, 2, 4), {}, (315 * 2, 315 * 4)),
        ((4, 8, 16), {"batch_axis": 0}, (8, 16)),
        ((2, 3, 4, 5), {"in_axis": (0, 1), "out_axis": 2}, (6 * 5, 4 * 5)),
        ((10, 20), {"in_axis": 1, "out_axis": 0}, (20, 10)),
        ((6,), {"in_axis": (), "out_axis": 0}, (1, 6)),
        ((0, 4), {}, (0, 4)),
    ],
)
def test_compute_fans_matches_jax_convention(shape, kwargs, expected):
    assert ji.compute_fans(shape, **kwargs) == expected
    fan_in, fan_out = ji.compute_fans(shape, **kwargs)
    assert isinstance(fan_in, int) and isinstance(fan_out, int)


def test_compute_fans_matches_jax_private_helper():
    from jax._src.nn.initializers import _compute_fans

    for shape in [(128, 64), (3, 3, 16, 32), (3, 5, 7, 11)]:
        assert ji.compute_fans(shape) == tuple(int(f) for f in _compute_fans(shape))


def test_compute_fans_errors():
    with pytest.raises(ValueError, match="in_axis"):
        ji.compute_fans((5,))
    with pytest.raises(ValueError, match="out of range"):
        ji.compute_fans((4, 4), in_axis=2)
    with pytest.raises(ValueError, match="Overlapping"):
        ji.compute_fans((4, 4), in_axis=-2, out_axis=-2)
    with pytest.raises(ValueError, match="Overlapping"):
        ji.compute_fans((4, 4), in_axis=0, out_axis=-2)
    with pytest.raises(ValueError, match="int or a sequence"):
        ji.compute_fans((4, 4), in_axis="0")


# ----------------------------------------------------------------------------- calculate_gain

# torch.nn.init.calculate_gain's published table.
TORCH_TABLE = {
    "linear": 1.0,
    "conv1d": 1.0,
    "conv2d": 1.0,
    "conv3d": 1.0,
    "conv_transpose1d": 1.0,
    "conv_transpose2d": 1.0,
    "conv_transpose3d": 1.0,
    "sigmoid": 1.0,
    "tanh": 5.0 / 3.0,
    "relu": math.sqrt(2.0),
    "leaky_relu": math.sqrt(2.0 / (1 + 0.01**2)),
    "selu": 3.0 / 4.0,
}


@pytest.mark.parametrize("name", sorted(TORCH_TABLE))
def test_calculate_gain_matches_torch_table(name):
    assert ji.calculate_gain(name) == TORCH_TABLE[name]


def test_calculate_gain_leaky_relu_param():
    assert ji.calculate_gain("leaky_relu", 0.2) == math.sqrt(2.0 / (1 + 0.2**2))
    assert ji.calculate_gain("leaky_relu", 0) == math.sqrt(2.0)
    assert ji.calculate_gain("leaky_relu", math.sqrt(5)) == math.sqrt(1.0 / 3.0)
    with pytest.raises(ValueError, match="negative slope"):
        ji.calculate_gain("leaky_relu", "0.1")


def test_calculate_gain_unknown_name_lists_valid():
    with pytest.raises(ValueError, match=r"'gelu'.*linear.*selu"):
        ji.calculate_gain("gelu")


# ----------------------------------------------------------------------------- variance_gain


def _scipy_second_moment(f, kinks):
    """E[f(z)^2] by scipy's adaptive quadrature, split at the kinks, in float64 numpy."""
    pts = [-np.inf, *sorted(kinks), np.inf]
    total = 0.0
    for lo, hi in itertools.pairwise(pts):
        val, _ = integrate.quad(
            lambda z: f(z) ** 2 * math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi),
            lo,
            hi,
            epsabs=0.0,
            epsrel=1e-12,
            limit=200,
        )
        total += val
    return total


def _softplus(z):
    return math.log1p(math.exp(-abs(z))) + max(z, 0.0)


# SELU's constants from their closed forms (Klambauer et al., 2017, eqs. 14 and 15).
_E = math.e
_ERFC = special.erfc(1.0 / math.sqrt(2.0))
SELU_ALPHA = -math.sqrt(2.0 / math.pi) / (_ERFC * math.sqrt(_E) - 1.0)
SELU_SCALE = (1.0 - _ERFC * math.sqrt(_E)) * math.sqrt(
    2.0
    * math.pi
    / (
        2.0 * special.erfc(math.sqrt(2.0)) * _E**2
        + math.pi * _ERFC**2 * _E
        - 2.0 * (2.0 + math.pi) * _ERFC * math.sqrt(_E)
        + math.pi
        + 2.0
    )
)

NUMPY_ACTIVATIONS = {
    "linear": (lambda z: z, ()),
    "relu": (lambda z: max(z, 0.0), (0.0,)),
    "leaky_relu": (lambda z: z if z > 0 else 0.01 * z, (0.0,)),
    "tanh": (math.tanh, ()),
    "sigmoid": (special.expit, ()),
    "gelu": (
        lambda z: 0.5 * z * (1 + math.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3))),
        (),
    ),
    "gelu_exact": (lambda z: 0.5 * z * (1 + special.erf(z / math.sqrt(2))), ()),
    "silu": (lambda z: z * special.expit(z), ()),
    "elu": (lambda z: z if z > 0 else math.expm1(z), (0.0,)),
    "selu": (
        lambda z: SELU_SCALE * (z if z > 0 else SELU_ALPHA * math.expm1(z)),
        (0.0,),
    ),
    "softplus": (_softplus, ()),
    "mish": (lambda z: z * math.tanh(_softplus(z)), ()),
    "relu6": (lambda z: min(max(z, 0.0), 6.0), (0.0, 6.0)),
    "hard_tanh": (lambda z: min(max(z, -1.0), 1.0), (-1.0, 1.0)),
}


@functools.cache
def _scipy_gain(name):
    return 1.0 / math.sqrt(_scipy_second_moment(*NUMPY_ACTIVATIONS[name]))


# variance_gain's documented accuracy: relative error below 1e-6.
GAIN_RTOL = 1e-6


@pytest.mark.parametrize("name", sorted(NUMPY_ACTIVATIONS))
def test_variance_gain_matches_scipy_quad(name):
    assert ji.variance_gain(name) == pytest.approx(_scipy_gain(name), rel=GAIN_RTOL)


CALLABLES = [
    (jax.nn.gelu, "gelu"),
    (lambda x: jax.nn.gelu(x, approximate=False), "gelu_exact"),
    (jax.nn.silu, "silu"),
    (jax.nn.elu, "elu"),
    (jnp.tanh, "tanh"),
    (jax.nn.softplus, "softplus"),
    (jax.nn.mish, "mish"),
]


@pytest.mark.parametrize(("fn", "name"), CALLABLES, ids=[name for _, name in CALLABLES])
def test_variance_gain_takes_callables(fn, name):
    # The registry's functions are not used for callables: jax.nn.mish is not its _mish.
    assert ji.variance_gain(fn) == pytest.approx(_scipy_gain(name), rel=GAIN_RTOL)


def test_variance_gain_closed_forms():
    # z^2 times the normal density, on a half or the whole line: smooth on every panel, so the
    # 24-point Gauss-Legendre panels reach float64 rounding (1e-16 measured); 1e-12 with room.
    assert ji.variance_gain("relu") == pytest.approx(math.sqrt(2.0), rel=1e-12)
    assert ji.variance_gain("linear") == pytest.approx(1.0, rel=1e-12)
    # SELU's fixed point: E[selu(z)^2] = 1.
    assert ji.variance_gain("selu") == pytest.approx(1.0, rel=GAIN_RTOL)
    # The documented difference from torch's heuristic 5/3 for tanh.
    assert ji.calculate_gain("tanh") - _scipy_gain("tanh") > 0.07


def test_variance_gain_errors():
    with pytest.raises(ValueError, match=r"'swoosh'.*gelu"):
        ji.variance_gain("swoosh")
    with pytest.raises(ValueError, match="name or a callable"):
        ji.variance_gain(3)
    with pytest.raises(ValueError, match="elementwise"):
        ji.variance_gain(lambda x: x.sum())
    with pytest.raises(ValueError, match="zero almost everywhere"):
        ji.variance_gain(lambda x: 0.0 * x)
