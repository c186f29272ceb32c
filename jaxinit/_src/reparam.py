"""Weight reparametrizations: weight normalization and spectral normalization, as pure functions.

Weight normalization (Salimans and Kingma, "Weight Normalization: A Simple Reparameterization to
Accelerate Training of Deep Neural Networks", 2016) writes a kernel as ``scale * v / ||v||`` per
output unit. Spectral normalization (Miyato et al., "Spectral Normalization for Generative
Adversarial Networks", 2018) divides a kernel by an estimate of its largest singular value, kept
in a small explicit state (:class:`SpectralNormState`) and refined by power iteration.

A kernel is viewed as a matrix ``(prod(other axes), prod(feature axes))``: for flax's Dense
``(in, out)`` and Conv ``(*k, in, out)`` kernels with ``feature_axes=-1``, one column per output
unit.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxinit._src.axes import canonical_axes
from jaxinit._src.moments import check_float_input, stat_dtype
from jaxinit._src.normalize import check_epsilon, check_param

__all__ = [
    "SpectralNormState",
    "spectral_norm",
    "spectral_norm_state",
    "weight_norm",
    "weight_norm_scale",
]

Axes = int | Sequence[int]


def _float_kernel(kernel: Any, name: str) -> jax.Array:
    kernel = jnp.asarray(kernel)
    check_float_input(kernel, name)
    return kernel


def _norm_axes(v: jax.Array, feature_axes: Axes) -> tuple[tuple[int, ...], tuple[int, ...]]:
    feat = canonical_axes(v.ndim, feature_axes, "feature_axes", v.shape)
    return feat, tuple(i for i in range(v.ndim) if i not in feat)


def weight_norm(
    v: jax.typing.ArrayLike,
    scale: jax.typing.ArrayLike | None = None,
    *,
    feature_axes: Axes = -1,
    epsilon: float = 1e-12,
) -> jax.Array:
    """Weight normalization, ``scale * v / ||v||`` with the norm per feature.

    The norm runs over every axis of ``v`` except ``feature_axes``, so a Dense kernel ``(in, out)``
    or a Conv kernel ``(*k, in, out)`` is normalized per output unit (torch's
    ``weight_norm(dim=0)`` on its ``(out, in, *k)`` layout). Computed as
    ``v * rsqrt(sum(v**2) + epsilon)``, flax's formula, in float32 or wider.

    Args:
        v: the direction, a floating array.
        scale: None (1) or the per-feature length, of v's sizes along ``feature_axes``.
        feature_axes: the axes that index the features (kept by the norm).
        epsilon: added to the sum of squares, non-negative.

    Returns:
        The kernel, of ``v``'s shape and dtype.

    Raises:
        TypeError: ``v`` or ``scale`` is not floating.
        ValueError: ``feature_axes`` out of range, ``scale`` of the wrong shape, negative
            ``epsilon``.

    Example:
        >>> import jax.numpy as jnp, jaxinit as ji
        >>> v = jnp.array([[3.0, 0.0], [4.0, 2.0]])  # (in, out)
        >>> print(ji.weight_norm(v, jnp.array([10.0, 1.0])))
        [[6. 0.]
         [8. 1.]]
    """
    v = _float_kernel(v, "v")
    check_epsilon(epsilon)
    feat, other = _norm_axes(v, feature_axes)
    dtype = stat_dtype(v.dtype)
    vf = v.astype(dtype)
    w = vf * lax.rsqrt(jnp.sum(vf * vf, axis=other, keepdims=True) + jnp.asarray(epsilon, dtype))
    if scale is not None:
        want = tuple(v.shape[a] for a in feat)
        scale = check_param(scale, "scale", want, "v's sizes along feature_axes")
        w = w * jnp.expand_dims(scale.astype(dtype), other)
    return w.astype(v.dtype)


def weight_norm_scale(kernel: jax.typing.ArrayLike, *, feature_axes: Axes = -1) -> jax.Array:
    """The scale that reproduces ``kernel`` under :func:`weight_norm`: ``||kernel||`` per feature.

    torch's and equinox's initialization of a weight-normalized layer: with this scale and
    ``v = kernel``, the wrapped layer starts exactly where the unwrapped one would.

    Args:
        kernel: a floating array.
        feature_axes: the feature axes (kept).

    Returns:
        The norms, of kernel's sizes along ``feature_axes``, in kernel's dtype.

    Raises:
        TypeError: ``kernel`` is not floating.
        ValueError: ``feature_axes`` out of range.

    Example:
        >>> import jax.numpy as jnp, jaxinit as ji
        >>> k = jnp.array([[3.0, 0.0], [4.0, 2.0]])
        >>> print(ji.weight_norm_scale(k))
        [5. 2.]
    """
    kernel = _float_kernel(kernel, "kernel")
    _, other = _norm_axes(kernel, feature_axes)
    kf = kernel.astype(stat_dtype(kernel.dtype))
    return jnp.sqrt(jnp.sum(kf * kf, axis=other)).astype(kernel.dtype)


# --------------------------------------------------------------------------- spectral norm


class SpectralNormState(NamedTuple):
    """The power-iteration state of spectral normalization (a pytree; never mutated).

    Attributes:
        u: the estimate of the top singular vector in the features' space, shape
            ``(1, prod(feature sizes))``, laid out as flax's ``u`` variable.
        sigma: the last estimate of the largest singular value, a scalar.
    """

    u: jax.Array
    sigma: jax.Array


def _as_matrix(kernel: jax.Array, feature_axes: Axes, who: str) -> jax.Array:
    if kernel.ndim < 2:
        raise ValueError(
            f"{who}: kernel must have at least 2 dimensions (a matrix, or a kernel viewed as "
            f"one), got shape {kernel.shape}."
        )
    feat, other = _norm_axes(kernel, feature_axes)
    if not feat or not other:
        raise ValueError(
            f"{who}: feature_axes={feature_axes!r} must leave both features and other axes of a "
            f"kernel of shape {kernel.shape}."
        )
    m = jnp.transpose(kernel, other + feat)
    n_out = 1
    for a in feat:
        n_out *= kernel.shape[a]
    return m.reshape(-1, n_out)


def _l2_normalize(x: jax.Array, epsilon: float) -> jax.Array:
    return x * lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + epsilon)


def _power_iterations(w: jax.Array, u: jax.Array, n: int, epsilon: float):
    """``n`` steps of ``v = normalize(u W^T)``, ``u = normalize(v W)``, as flax does."""

    def step(_, uv):
        u, _ = uv
        v = _l2_normalize(u @ w.T, epsilon)
        return _l2_normalize(v @ w, epsilon), v

    v0 = jnp.zeros((1, w.shape[0]), w.dtype)
    return lax.fori_loop(0, n, step, (u, v0))


def _check_steps(n: Any, name: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"{name} must be a non-negative int, got {n!r}.")
    return n


def spectral_norm_state(
    key: jax.Array,
    kernel: jax.typing.ArrayLike,
    *,
    n_warmup: int = 15,
    feature_axes: Axes = -1,
) -> SpectralNormState:
    """A fresh spectral-norm state: a random unit ``u``, then ``n_warmup`` power iterations.

    torch's ``parametrizations.spectral_norm`` runs 15 iterations when it is registered, so the
    first training step already divides by a good estimate (flax starts from an unnormalized
    random ``u`` and no warm-up).

    Args:
        key: a PRNG key for the random start.
        kernel: the kernel to be normalized (rank >= 2).
        n_warmup: power iterations on ``kernel`` before the first use.
        feature_axes: the kernel's feature axes (the matrix's columns).

    Returns:
        A :class:`SpectralNormState` with ``sigma`` the warm-up's estimate (or ``||W u||`` of
        the random start when ``n_warmup=0``).

    Raises:
        ValueError: a kernel of rank < 2, ``feature_axes`` out of range, negative ``n_warmup``.
        TypeError: a non-floating kernel.

    Example:
        >>> import jax, jax.numpy as jnp, jaxinit as ji
        >>> k = jnp.diag(jnp.array([3.0, 1.0, 0.5]))
        >>> s = ji.spectral_norm_state(jax.random.key(0), k)
        >>> print(jnp.round(s.sigma, 4))
        3.0
    """
    kernel = _float_kernel(kernel, "kernel")
    n_warmup = _check_steps(n_warmup, "n_warmup")
    w = _as_matrix(kernel, feature_axes, "spectral_norm_state").astype(stat_dtype(kernel.dtype))
    return _warm_start(key, w, n_warmup)


@functools.partial(jax.jit, static_argnums=2)
def _warm_start(key: jax.Array, w: jax.Array, n_warmup: int) -> SpectralNormState:
    """The random unit start and its warm-up, compiled once per shape when called eagerly."""
    u = _l2_normalize(jax.random.normal(key, (1, w.shape[1]), w.dtype), 0.0)
    u, v = _power_iterations(w, u, n_warmup, 1e-12)
    if n_warmup == 0:
        sigma = jnp.sqrt(jnp.sum(jnp.square(u @ w.T)))
    else:
        sigma = (v @ w @ u.T)[0, 0]
    return SpectralNormState(u, sigma)


def spectral_norm(
    kernel: jax.typing.ArrayLike,
    state: SpectralNormState,
    *,
    training: bool,
    n_steps: int = 1,
    epsilon: float = 1e-12,
    feature_axes: Axes = -1,
) -> tuple[jax.Array, SpectralNormState]:
    """Spectral normalization, ``kernel / sigma``, with ``sigma`` the largest singular value.

    ``training=True`` runs ``n_steps`` power iterations from ``state.u`` and returns the updated
    state; ``training=False`` runs none and divides by the ``sigma`` that the stored ``u`` gives
    for the current kernel, ``||W u||`` (one matrix-vector product, torch's deterministic eval),
    returning the state unchanged. Gradients flow into ``kernel`` through ``sigma = v^T W u`` with
    the singular vectors held constant, as in the paper; ``u`` receives none.

    Args:
        kernel: the kernel (rank >= 2), viewed as ``(prod(other axes), prod(feature axes))``.
        state: the :class:`SpectralNormState` (from :func:`spectral_norm_state`).
        training: refine the estimate and return the new state (True), or use it as it is.
        n_steps: power iterations per training call.
        epsilon: added under the square roots of the vector normalizations.
        feature_axes: the kernel's feature axes.

    Returns:
        ``(kernel / sigma, new_state)``, the kernel in its own shape and dtype.

    Raises:
        TypeError: ``training`` is not a bool, or a non-floating kernel.
        ValueError: a kernel of rank < 2; ``feature_axes`` out of range; ``state.u`` not of shape
            ``(1, prod(feature sizes))``; negative ``n_steps`` or ``epsilon``.

    Example:
        >>> import jax, jax.numpy as jnp, jaxinit as ji
        >>> k = jnp.diag(jnp.array([3.0, 1.0, 0.5]))
        >>> s = ji.spectral_norm_state(jax.random.key(0), k)
        >>> w, s = ji.spectral_norm(k, s, training=True)
        >>> print(jnp.round(jnp.linalg.norm(w, 2), 4))
        1.0
    """
    if not isinstance(training, bool):
        raise TypeError(f"training must be a Python bool, got {training!r}.")
    kernel = _float_kernel(kernel, "kernel")
    n_steps = _check_steps(n_steps, "n_steps")
    check_epsilon(epsilon)
    w = _as_matrix(kernel, feature_axes, "spectral_norm")
    if tuple(state.u.shape) != (1, w.shape[1]):
        raise ValueError(
            f"state.u has shape {tuple(state.u.shape)}; expected {(1, w.shape[1])} for a kernel "
            f"of shape {kernel.shape} with feature_axes={feature_axes!r}."
        )
    out, u, sigma = _divided(kernel, w, state.u, training and n_steps > 0, n_steps, epsilon)
    if not training:
        return out, state
    sigma_dtype = jnp.asarray(state.sigma).dtype
    return out, SpectralNormState(u.astype(state.u.dtype), sigma.astype(sigma_dtype))


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _divided(kernel, w, u, iterate: bool, n_steps: int, epsilon: float):
    """``kernel / sigma`` and the new ``u``, ``sigma``: one program per shape and setting."""
    dtype = stat_dtype(kernel.dtype)
    wf = w.astype(dtype)
    u = lax.stop_gradient(u.astype(dtype))
    w_const = lax.stop_gradient(wf)
    if iterate:
        u, v = _power_iterations(w_const, u, n_steps, epsilon)
    else:
        v = _l2_normalize(u @ w_const.T, epsilon)
    u, v = lax.stop_gradient(u), lax.stop_gradient(v)
    sigma = (v @ wf @ u.T)[0, 0]
    safe = jnp.where(sigma != 0, sigma, 1.0)
    out = (kernel.astype(dtype) / safe).astype(kernel.dtype)
    return out, u, lax.stop_gradient(sigma)
