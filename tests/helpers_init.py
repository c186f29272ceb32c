"""Shared data and helpers for the initializer and sharding tests."""

import functools
import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh
from scipy import stats

KEY = jax.random.key(20261125)
N_DEV = 8

# Standard deviation and kurtosis of N(0, 1) truncated to (-2, 2), from scipy.
TRUNC2 = stats.truncnorm(-2, 2)
TRUNC2_STD = float(TRUNC2.std())
KURTOSIS = {
    "normal": 3.0,
    "uniform": 9.0 / 5.0,
    "truncated_normal": float(TRUNC2.stats(moments="k")) + 3.0,
}


def rel_se_of_variance(kurtosis: float, n: int) -> float:
    """Relative standard error of the sample variance of n draws: sqrt((kurtosis - 1) / (n - 1))."""
    return math.sqrt((kurtosis - 1.0) / (n - 1))


def check_variance(w, expected_var: float, kurtosis: float, sigmas: float = 5.0) -> None:
    """Sample variance and mean of ``w`` against the closed form, within ``sigmas`` SEs."""
    x = np.asarray(w, np.float64).ravel()
    n = x.size
    tol = sigmas * rel_se_of_variance(kurtosis, n)
    assert abs(x.var(ddof=1) / expected_var - 1) < tol, (x.var(ddof=1), expected_var, tol)
    assert abs(x.mean()) < sigmas * math.sqrt(expected_var / n), x.mean()


@functools.cache
def auto_mesh() -> Mesh:
    return Mesh(np.array(jax.devices()[:N_DEV]).reshape(4, 2), ("a", "b"))


@functools.cache
def explicit_mesh() -> Mesh:
    return jax.make_mesh((4, 2), ("a", "b"), axis_types=(AxisType.Explicit,) * 2)


MESHES = {"auto": auto_mesh, "explicit": explicit_mesh}
