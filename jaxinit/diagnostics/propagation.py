"""Variance propagation through a deep MLP: a checker for init code, with an assertion helper."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxinit.diagnostics import mlp_scan
from jaxinit.diagnostics.tables import fmt

__all__ = ["PropagationResult", "assert_stable", "propagation"]


@dataclasses.dataclass(frozen=True)
class PropagationResult:
    """Per-layer second moments of a deep MLP at initialization.

    Attributes:
        activation: the activation's name.
        forward: ``E[z_l^2]`` of the pre-activations ``z_l = h_{l-1} @ W_l``, layers 1..depth.
        backward: ``E[(dL/dz_l)^2]`` of the gradients back-propagated from a unit-normal
            cotangent at the last layer, layers 1..depth (the signal enters at layer ``depth``).
    """

    activation: str
    forward: np.ndarray
    backward: np.ndarray

    @property
    def depth(self) -> int:
        """Number of layers."""
        return int(self.forward.shape[0])

    def __str__(self) -> str:
        """A table of both second moments, one line per layer."""
        lines = [f"layer  E[z^2] fwd  E[g^2] bwd   ({self.activation}, depth {self.depth})"]
        for i, (f, b) in enumerate(zip(self.forward, self.backward, strict=True)):
            lines.append(f"{i + 1:5d}  {fmt(f, 10)}  {fmt(b, 10)}")
        return "\n".join(lines)


def propagation(
    init: Callable[..., jax.Array],
    activation: str,
    depth: int,
    *,
    width: int = 256,
    batch: int = 256,
    key: jax.Array | None = None,
) -> PropagationResult:
    """Measures how an init scheme propagates variance forward and backward through depth.

    Builds the bias-free MLP ``h_l = f(h_{l-1} @ W_l)`` of ``depth`` square layers, every kernel
    drawn by ``init(key, (width, width))``, feeds a unit-normal batch, and records the second
    moment of every pre-activation and of the gradient that reaches it from a unit-normal
    cotangent at the top. A scheme that preserves variance keeps both roughly constant.

    Args:
        init: an initializer ``init(key, shape, dtype)``, e.g. ``ji.kaiming_normal(...)``.
        activation: one of ``linear``, ``relu``, ``leaky_relu``, ``tanh``, ``sigmoid``, ``gelu``,
            ``silu``, ``elu``, ``selu``.
        depth: number of layers (>= 1).
        width: features per layer (>= 1).
        batch: rows of the probe batch (>= 2).
        key: PRNG key for weights, inputs and cotangent; ``jax.random.key(0)`` if None.

    Returns:
        A :class:`PropagationResult` with numpy arrays of length ``depth``.

    Raises:
        ValueError: for an unknown activation or a non-positive size.

    Example:
        >>> import jaxinit as ji
        >>> init = ji.kaiming_normal(nonlinearity="relu")
        >>> r = ji.propagation(init, "relu", 5, width=512, batch=64)
        >>> r.forward.shape
        (5,)
        >>> ji.assert_stable(r)
    """
    name = mlp_scan.check_activation(activation)
    mlp_scan.check_sizes(depth, width, batch)
    if not callable(init):
        raise TypeError(f"init must be an initializer init(key, shape, dtype); got {init!r}.")
    key = jax.random.key(0) if key is None else key
    kw, kx, kg = jax.random.split(key, 3)
    weights = mlp_scan.stacked_weights(init, kw, depth, width, jit=False)
    x = jax.random.normal(kx, (batch, width), jnp.float32)
    cot = jax.random.normal(kg, (batch, width), jnp.float32)
    act_index = mlp_scan.activation_index(name)
    fwd, bwd = mlp_scan.as_numpy(mlp_scan.propagate(weights, x, cot, act_index))
    return PropagationResult(activation=name, forward=fwd, backward=bwd)


def _check_band(values: np.ndarray, ref_layer: int, low: float, high: float, what: str) -> None:
    ref = float(values[ref_layer - 1])
    if not np.isfinite(ref) or ref <= 0.0:
        raise AssertionError(
            f"{what}: the reference second moment at layer {ref_layer} is {ref!r}; "
            "it must be finite and positive."
        )
    ratios = values / ref
    ok = np.isfinite(ratios) & (ratios > 0.0)
    bad = ~(ok & (ratios >= low) & (ratios <= high))
    if bad.any():
        first = int(np.argmax(bad))
        with np.errstate(divide="ignore", invalid="ignore"):
            score = np.where(ok, np.abs(np.log(np.where(ok, ratios, 1.0))), np.inf)
        worst = int(np.argmax(score))
        raise AssertionError(
            f"{what} leaves [{low:g}, {high:g}] x layer {ref_layer}'s ({ref:.4g}) at layer "
            f"{first + 1}: {values[first]:.4g} (ratio {ratios[first]:.4g}); worst at layer "
            f"{worst + 1}: ratio {ratios[worst]:.4g}; {int(bad.sum())} of {len(values)} layers "
            "outside."
        )


def assert_stable(
    result: PropagationResult,
    low: float = 0.5,
    high: float = 2.0,
    *,
    forward: bool = True,
    backward: bool = True,
) -> None:
    """Asserts that second moments stay within ``[low, high]`` times their entry value.

    The forward pass is compared with layer 1 (where the input enters), the backward pass with
    layer ``depth`` (where the gradient enters). Non-finite values always fail.

    Args:
        result: the output of :func:`propagation`.
        low: smallest allowed ratio to the reference layer (> 0).
        high: largest allowed ratio (>= low).
        forward: check the pre-activations.
        backward: check the back-propagated gradients.

    Raises:
        AssertionError: naming the pass, the first layer outside the band, its value and ratio.
        ValueError: for a band with ``low <= 0`` or ``high < low``.

    Example:
        >>> import jaxinit as ji
        >>> r = ji.propagation(ji.normal(1.0), "linear", 5, width=512, batch=64)
        >>> ji.assert_stable(r)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        AssertionError: forward pre-activation E[z^2] leaves [0.5, 2] x layer 1's ...
    """
    if not (low > 0.0 and high >= low):
        raise ValueError(f"need 0 < low <= high; got low={low!r}, high={high!r}.")
    if forward:
        _check_band(result.forward, 1, low, high, "forward pre-activation E[z^2]")
    if backward:
        _check_band(result.backward, result.depth, low, high, "backward gradient E[g^2]")
