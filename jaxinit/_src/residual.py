"""Depth-aware scaling for residual networks: GPT-2, DeepNet, Fixup, small_init and wang_init.

Deep residual stacks add one branch output per block to the residual stream, so its variance
grows with depth unless the branches are scaled down. The presets here return the published
factors; :func:`scaled` multiplies any initializer by one.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any

import jax
import jax.numpy as jnp

from jaxinit._src import sharding as _sharding
from jaxinit._src.initializers import Initializer, _check_dtype, _check_number, normal

__all__ = [
    "DeepNetScales",
    "deepnet_scales",
    "fixup_scale",
    "gpt2_residual_scale",
    "scaled",
    "small_init",
    "wang_init",
]


def _check_int(value: Any, name: str, who: str, minimum: int, why: str = "") -> int:
    """``value`` as an int >= ``minimum``; bools and non-integers are a TypeError."""
    if isinstance(value, bool):
        raise TypeError(f"{who}: {name} must be an int, got {value!r}.")
    try:
        out = operator.index(value)
    except TypeError:
        raise TypeError(f"{who}: {name} must be an int, got {value!r}.") from None
    if out < minimum:
        raise ValueError(f"{who}: {name} must be an int >= {minimum}, got {value!r}{why}.")
    return out


def scaled(init: Initializer, factor: float) -> Initializer:
    """Wraps an initializer so that its draws are multiplied by ``factor``.

    The wrapped initializer keeps the dtype and sharding of ``init``'s result. 16-bit floats are
    multiplied in float32 and rounded once, so ``scaled(init, c)`` in bfloat16 is the float32
    product rounded, not the product of two rounded numbers; float32, float64 and complex results
    are multiplied in their own precision.

    Args:
        init: any initializer ``init(key, shape, dtype=None, out_sharding=None)``, jaxinit's or
            jax's; one without ``out_sharding`` works as long as none is requested.
        factor: a finite real number, negative allowed.

    Returns:
        An initializer ``init(key, shape, dtype=None, out_sharding=None)``. ``dtype`` and
        ``out_sharding`` are passed to ``init`` only when they are not None, so its own defaults
        apply otherwise.

    Raises:
        TypeError: ``init`` is not callable, ``factor`` is a dtype, or (when called) ``init``
            returns an integer or bool array.
        ValueError: ``factor`` is not a finite real number.

    Example:
        >>> import jax, jaxinit as ji
        >>> init = ji.scaled(ji.he_normal(), ji.fixup_scale(16, 2))
        >>> w = init(jax.random.key(0), (64, 64))
        >>> bool((w == 0.25 * ji.he_normal()(jax.random.key(0), (64, 64))).all())
        True
    """
    who = "scaled"
    if not callable(init):
        raise TypeError(f"{who}: init must be an initializer (a callable), got {init!r}.")
    f = _check_number(factor, "factor", who)
    if isinstance(factor, str | bytes):
        raise ValueError(f"{who}: factor must be a real number, got {factor!r}.")
    if not math.isfinite(f):
        raise ValueError(f"{who}: factor must be a finite real number, got {factor!r}.")

    def wrapped(
        key: jax.Array,
        shape: Any,
        dtype: Any = None,
        out_sharding: _sharding.OutSharding = None,
    ) -> jax.Array:
        args = (key, shape) if dtype is None else (key, shape, dtype)
        kwargs = {} if out_sharding is None else {"out_sharding": out_sharding}
        w = jnp.asarray(init(*args, **kwargs))
        dt = w.dtype
        if not jnp.issubdtype(dt, jnp.inexact):
            raise TypeError(
                f"{who}: init returned an array of dtype {dt}; expected float or complex."
            )
        if jnp.issubdtype(dt, jnp.floating) and jnp.finfo(dt).bits < 32:
            w = (w.astype(jnp.float32) * jnp.float32(f)).astype(dt)
        else:
            w = w * jnp.asarray(f, dt)
        if out_sharding is None:
            return w
        return _sharding.place(w, _sharding.full_rank(out_sharding, w.ndim))

    wrapped.__qualname__ = f"{who}.<locals>.init"
    return wrapped


def gpt2_residual_scale(num_layers: int) -> float:
    """The GPT-2 / Megatron factor for residual output projections: ``1 / sqrt(2 * num_layers)``.

    Each of ``num_layers`` transformer blocks adds two branches (attention and MLP) to the
    residual stream; GPT-2 (Radford et al., 2019) and Megatron-LM scale the initialization of
    each branch's output projection (attention ``o``, MLP down-projection) by this factor so the
    stream's variance stays independent of depth. Other weights keep their initializer.

    Args:
        num_layers: the number of transformer blocks, >= 1.

    Returns:
        ``1 / sqrt(2 * num_layers)``.

    Raises:
        TypeError: ``num_layers`` is not an int (bools included).
        ValueError: ``num_layers < 1``.

    Example:
        >>> import jaxinit as ji
        >>> ji.gpt2_residual_scale(12)
        0.2041241452319315
        >>> out_proj_init = ji.scaled(ji.normal(0.02), ji.gpt2_residual_scale(12))
    """
    n = _check_int(num_layers, "num_layers", "gpt2_residual_scale", 1)
    return 1.0 / math.sqrt(2 * n)


@dataclasses.dataclass(frozen=True)
class DeepNetScales:
    """DeepNet's ``alpha`` (residual multiplier) and ``beta`` (init gain), see :func:`deepnet_scales`.

    Attributes:
        encoder_alpha: the encoder's residual multiplier, None without an encoder.
        encoder_beta: the encoder's xavier_normal gain, None without an encoder.
        decoder_alpha: the decoder's residual multiplier, None without a decoder.
        decoder_beta: the decoder's xavier_normal gain, None without a decoder.
    """

    encoder_alpha: float | None
    encoder_beta: float | None
    decoder_alpha: float | None
    decoder_beta: float | None


def deepnet_scales(*, num_encoder_layers: int = 0, num_decoder_layers: int = 0) -> DeepNetScales:
    """DeepNorm's residual multipliers and initialization gains (Wang et al., 2022, "DeepNet").

    With ``N`` encoder and ``M`` decoder layers:

    * decoder-only: ``alpha = (2M)^(1/4)``, ``beta = (8M)^(-1/4)``;
    * encoder-only: ``alpha = (2N)^(1/4)``, ``beta = (8N)^(-1/4)``;
    * encoder-decoder: encoder ``alpha = 0.81 (N^4 M)^(1/16)``, ``beta = 0.87 (N^4 M)^(-1/16)``;
      decoder ``alpha = (3M)^(1/4)``, ``beta = (12M)^(-1/4)``.

    ``alpha`` multiplies the residual before the post-LayerNorm of every sublayer, DeepNorm's
    ``x = LayerNorm(alpha * x + f(x))``. ``beta`` is the ``xavier_normal`` gain of the
    feed-forward weights and of the value and output projections of attention; the query and
    key projections keep gain 1: ``ji.xavier_normal(gain=s.decoder_beta)``.

    Args:
        num_encoder_layers: ``N``, the number of encoder layers, >= 0.
        num_decoder_layers: ``M``, the number of decoder layers, >= 0.

    Returns:
        A :class:`DeepNetScales`; the fields of a stack the model does not have are None.

    Raises:
        TypeError: a layer count is not an int (bools included).
        ValueError: a layer count is negative, or both are zero.

    Example:
        >>> import jaxinit as ji
        >>> s = ji.deepnet_scales(num_decoder_layers=32)
        >>> round(s.decoder_alpha, 4), round(s.decoder_beta, 4), s.encoder_alpha
        (2.8284, 0.25, None)
        >>> ffn_init = ji.xavier_normal(gain=s.decoder_beta)
    """
    who = "deepnet_scales"
    n = _check_int(num_encoder_layers, "num_encoder_layers", who, 0)
    m = _check_int(num_decoder_layers, "num_decoder_layers", who, 0)
    if n == 0 and m == 0:
        raise ValueError(
            f"{who}: num_encoder_layers and num_decoder_layers are both 0; give the depth of at "
            "least one stack."
        )
    if m == 0:
        return DeepNetScales((2 * n) ** 0.25, (8 * n) ** -0.25, None, None)
    if n == 0:
        return DeepNetScales(None, None, (2 * m) ** 0.25, (8 * m) ** -0.25)
    depth = float(n) ** 4 * m
    return DeepNetScales(
        0.81 * depth ** (1 / 16), 0.87 * depth ** (-1 / 16), (3 * m) ** 0.25, (12 * m) ** -0.25
    )


def fixup_scale(num_branches: int, branch_depth: int) -> float:
    """Fixup's factor for the He init of residual branches: ``L^(-1 / (2m - 2))``.

    Fixup (Zhang, Dauphin and Ma, 2019) trains deep residual networks without normalization.
    With ``L`` residual branches of ``m`` layers each, the recipe is:

    * the layers of each branch but the last get the standard He init times this factor,
      ``ji.scaled(ji.he_normal(), ji.fixup_scale(L, m))``;
    * the last layer of each branch, and the classifier, are zero-initialized (``ji.zeros``);
    * a scalar bias (initialized to 0) before each convolution, linear layer and activation, and
      a scalar multiplier (initialized to 1) per branch.

    Args:
        num_branches: ``L``, the number of residual branches, >= 1.
        branch_depth: ``m``, the number of layers per branch, >= 2.

    Returns:
        ``num_branches ** (-1 / (2 * branch_depth - 2))``.

    Raises:
        TypeError: an argument is not an int (bools included).
        ValueError: ``num_branches < 1`` or ``branch_depth < 2``.

    Example:
        >>> import jaxinit as ji
        >>> ji.fixup_scale(16, 2)  # 16 basic blocks of two convolutions
        0.25
        >>> first_conv_init = ji.scaled(ji.he_normal(), ji.fixup_scale(16, 2))
    """
    who = "fixup_scale"
    num_branches = _check_int(num_branches, "num_branches", who, 1)
    why = (
        "; with m = 1 layer per branch the exponent -1 / (2m - 2) is infinite (Fixup "
        "zero-initializes a branch's last layer, so a one-layer branch has nothing to scale)"
    )
    branch_depth = _check_int(branch_depth, "branch_depth", who, 2, why)
    return num_branches ** (-1.0 / (2 * branch_depth - 2))


def small_init(dim: int, dtype: Any = None) -> Initializer:
    """Builds ``small_init``: ``N(0, 2 / (5 * dim))`` (Nguyen and Salazar, 2019; GPT-NeoX).

    GPT-NeoX's default for every weight but the residual output projections (see
    :func:`wang_init`), with ``dim`` the model width.

    Args:
        dim: the model (hidden) dimension, >= 1.
        dtype: default dtype of the result (None: float32).

    Returns:
        An initializer ``init(key, shape, dtype=None, out_sharding=None)`` with std
        ``sqrt(2 / (5 * dim))``.

    Raises:
        TypeError: ``dim`` is not an int, or ``dtype`` is not a floating or complex dtype.
        ValueError: ``dim < 1``.

    Example:
        >>> import jax, jaxinit as ji
        >>> w = ji.small_init(1024)(jax.random.key(0), (512, 512))
        >>> round(float(w.std()) / (2 / (5 * 1024)) ** 0.5, 2)
        1.0
    """
    who = "small_init"
    dim = _check_int(dim, "dim", who, 1)
    _check_dtype(dtype, who)
    return normal(math.sqrt(2.0 / (5 * dim)), dtype)


def wang_init(dim: int, num_layers: int, dtype: Any = None) -> Initializer:
    """Builds ``wang_init``: ``N(0, (2 / (num_layers * sqrt(dim)))^2)`` (GPT-J, GPT-NeoX).

    GPT-J's and GPT-NeoX's init of the output layers of each block (attention output and MLP
    down-projection), whose std shrinks with depth; the other weights use :func:`small_init`.

    Args:
        dim: the model (hidden) dimension, >= 1.
        num_layers: the number of transformer blocks, >= 1.
        dtype: default dtype of the result (None: float32).

    Returns:
        An initializer ``init(key, shape, dtype=None, out_sharding=None)`` with std
        ``2 / (num_layers * sqrt(dim))``.

    Raises:
        TypeError: ``dim`` or ``num_layers`` is not an int, or ``dtype`` is not a floating or
            complex dtype.
        ValueError: ``dim < 1`` or ``num_layers < 1``.

    Example:
        >>> import jax, jaxinit as ji
        >>> w = ji.wang_init(1024, 16)(jax.random.key(0), (512, 512))
        >>> round(float(w.std()) / (2 / (16 * 1024**0.5)), 2)
        1.0
    """
    who = "wang_init"
    dim = _check_int(dim, "dim", who, 1)
    num_layers = _check_int(num_layers, "num_layers", who, 1)
    _check_dtype(dtype, who)
    return normal(2.0 / (num_layers * math.sqrt(dim)), dtype)
