"""Shared data and helpers of the diagnostics, LSUV and depth-experiment tests.

Inputs and weights come from numpy's generator, not ``jax.random``: each new shape of a jax
sampler is a compile, which costs more than the checks themselves on a small CPU.
"""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

PNG = b"\x89PNG\r\n\x1a\n"

# The plot tests and the plot doctests (jaxinit/diagnostics/conftest.py) skip on one condition.
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
requires_matplotlib = pytest.mark.skipif(not HAS_MATPLOTLIB, reason="needs matplotlib")


def normal(seed, shape, scale=1.0, shift=0.0):
    """A float32 array of ``shift + scale * N(0, 1)`` draws from numpy's generator ``seed``."""
    draws = np.random.default_rng(seed).standard_normal(shape)
    return jnp.asarray(shift + scale * draws, jnp.float32)


def fill(tree, seed, scale=0.5):
    """Arrays of the shapes and dtypes of ``tree`` (e.g. ``jax.eval_shape(model.init, ...)``).

    Every leaf gets ``scale * N(0, 1)`` draws, so no value is a special one (zero bias, unit
    variance) that would hide a wrong update.
    """
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype), tree)


def linen_variables(model, x, seed=0):
    """Variables of a linen model without compiling its init: shapes by ``eval_shape``."""
    return fill(jax.eval_shape(model.init, jax.random.key(0), x), seed)


def nnx_model(make, seed=0):
    """The nnx model ``make()`` builds, without compiling its init: shapes by ``nnx.eval_shape``."""
    graphdef, state = nnx.split(nnx.eval_shape(make))
    return nnx.merge(graphdef, fill(state, seed))


def is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == PNG


def var64(a):
    return float(np.var(np.asarray(a, np.float64)))


def mean64(a):
    return float(np.mean(np.asarray(a, np.float64)))
