"""Initializers speaking jax's protocol ``init(key, shape, dtype=None, out_sharding=None)``.

Every builder validates its arguments when it is called, so a typo fails at model definition rather
than inside a jitted init. One wrapper, :func:`_initializer`, gives every initializer the same
call: the shape is checked, the requested dtype wins (``None`` means float32, also with x64
enabled), a zero-size shape gives an empty array, and the result is laid out on ``out_sharding``
(Auto and Explicit meshes alike) with a full-rank ``PartitionSpec``.

Random draws for float32 and float64 are jax's bits: the variance-scaling family equals
``jax.nn.initializers`` for the same key. For bfloat16 and float16 jax draws the uniform bits in the
16-bit dtype, so a bf16 normal takes only 128 distinct values; jaxinit draws in float32 and casts,
which fills the 16-bit grid. ``draw_dtype=`` names the dtype to draw in, e.g. ``jnp.bfloat16`` to
reproduce jax's 16-bit numbers exactly.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.nn.initializers import Initializer

from jaxinit._src import sharding as _sharding
from jaxinit._src.fans import AxisSpec, compute_fans, validate_axes
from jaxinit._src.gains import calculate_gain

Shape = Sequence[int]
DTypeLike = Any
Mode = Literal["fan_in", "fan_out", "fan_avg", "fan_geo_avg"]
Distribution = Literal["normal", "truncated_normal", "uniform"]
Sampler = Callable[[jax.Array, tuple[int, ...], np.dtype], jax.Array]

_MODES = ("fan_in", "fan_out", "fan_avg", "fan_geo_avg")
_DISTRIBUTIONS = ("normal", "truncated_normal", "uniform")

# jax's literal for the std of N(0, 1) truncated to (-2, 2), kept to the digit for bit-identity.
_TRUNC2_STD = 0.87962566103423978
# RMS of jax's complex normal whose modulus is truncated at 2 (|z|^2 ~ Exp(1) truncated at 4):
# sqrt((1 - 5 e^-4) / (1 - e^-4)). jax divides by sqrt(1 - e^-4) instead, 0.9% too small.
_COMPLEX_TRUNC2_STD = math.sqrt((1.0 - 5.0 * math.exp(-4.0)) / (1.0 - math.exp(-4.0)))


# --------------------------------------------------------------------------- argument checks


def _check_dtype(
    dtype: DTypeLike, who: str, allow_complex: bool = True, hint: str = "", name: str = "dtype"
) -> np.dtype | None:
    """Canonicalises a requested dtype; None stays None. Integer and bool dtypes are a TypeError."""
    if dtype is None:
        return None
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        raise TypeError(f"{who}: {name}={dtype!r} is not a dtype.{hint}") from None
    if not jnp.issubdtype(dt, jnp.inexact):
        raise TypeError(
            f"{who}: {name}={dt} is not a floating or complex dtype; initializers produce "
            "float16, bfloat16, float32, float64 (or complex64/complex128) arrays."
        )
    if not allow_complex and jnp.issubdtype(dt, jnp.complexfloating):
        raise TypeError(f"{who}: {name}={dt} is complex; this initializer supports real dtypes.")
    return dt


def _resolve_dtype(dtype: DTypeLike, default: np.dtype | None, who: str, **kw: bool) -> np.dtype:
    dt = _check_dtype(dtype, who, **kw) if dtype is not None else default
    return jnp.dtype(jnp.float32) if dt is None else dt


def _check_draw_dtype(draw_dtype: DTypeLike, who: str) -> np.dtype | None:
    return _check_dtype(draw_dtype, who, allow_complex=False, name="draw_dtype")


def _check_shape(shape: Shape, who: str) -> tuple[int, ...]:
    try:
        out = tuple(operator.index(d) for d in shape)
    except TypeError:
        raise ValueError(f"{who}: shape must be a sequence of ints, got {shape!r}.") from None
    if any(d < 0 for d in out):
        raise ValueError(f"{who}: shape {out} has a negative dimension.")
    return out


def _is_dtype_like(value: Any) -> bool:
    """Whether ``value`` names a dtype (a dtype, a scalar type or its name), not a number."""
    if isinstance(value, bool | int | float | np.number):
        return False
    try:
        jnp.dtype(value)
    except TypeError:
        return False
    return value is not None


def _check_number(value: Any, name: str, who: str) -> float:
    """``value`` as a float; a dtype passed here (jax's positional order) is a TypeError."""
    if _is_dtype_like(value):
        raise TypeError(
            f"{who}: {name}={value!r} is a dtype, not a number; pass the dtype as dtype= "
            f"(or in jax's position for {who})."
        )
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{who}: {name} must be a real number, got {value!r}.") from None


def _check_nonneg(value: Any, name: str, who: str) -> float:
    v = _check_number(value, name, who)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{who}: {name} must be finite and >= 0, got {value!r}.")
    return v


def _check_choice(value: str, choices: Sequence[str], name: str, who: str) -> None:
    if value not in choices:
        raise ValueError(
            f"{who}: unknown {name} {value!r}; expected one of {', '.join(map(repr, choices))}."
        )


def _check_rank(shape: tuple[int, ...], ranks: Sequence[int], who: str, expected: str) -> None:
    if len(shape) not in ranks:
        raise ValueError(f"{who}: shape {shape} has rank {len(shape)}; expected {expected}.")


def _is_complex(dtype: np.dtype) -> bool:
    return bool(jnp.issubdtype(dtype, jnp.complexfloating))


def _real_dtype(dtype: np.dtype) -> np.dtype:
    return jnp.dtype(jnp.finfo(dtype).dtype)


def _sample_dtype(dtype: np.dtype, draw_dtype: np.dtype | None) -> np.dtype:
    """The dtype random draws are made in: ``draw_dtype``, else float32 for 16-bit reals."""
    if _is_complex(dtype):
        return dtype
    if draw_dtype is not None:
        return draw_dtype
    return jnp.dtype(jnp.float32) if jnp.finfo(dtype).bits < 32 else dtype


# --------------------------------------------------------------------------- the one wrapper


def _initializer(
    who: str,
    *,
    dtype: DTypeLike,
    sample: Sampler | None = None,
    build: Callable[..., jax.Array] | None = None,
    real_only: bool = False,
    validate: Callable[[tuple[int, ...]], None] | None = None,
    draw_dtype: np.dtype | None = None,
) -> Initializer:
    """Wraps a sampler into jax's ``Initializer`` protocol.

    Args:
        who: the builder's name, for error messages.
        dtype: the builder's default dtype (None: float32), validated here.
        sample: ``sample(key, shape, dtype)`` for partitionable draws; it runs in the draw dtype
            (see :func:`_sample_dtype`), is cast to the output dtype, and each device computes
            only its own shard.
        build: ``build(key, shape, dtype, out_sharding)`` for everything else (constants, QR);
            its result is laid out on ``out_sharding`` afterwards. Exactly one of ``sample`` and
            ``build`` is given.
        real_only: reject complex dtypes.
        validate: ``validate(shape)`` raises for shapes the initializer does not support.
        draw_dtype: the dtype random draws are made in (None: see :func:`_sample_dtype`).

    Returns:
        ``init(key, shape, dtype=None, out_sharding=None)``.
    """
    default = _check_dtype(dtype, who, allow_complex=not real_only)

    def init(
        key: jax.Array,
        shape: Shape,
        dtype: DTypeLike = None,
        out_sharding: _sharding.OutSharding = None,
    ) -> jax.Array:
        shape = _check_shape(shape, who)
        dt = _resolve_dtype(dtype, default, who, allow_complex=not real_only)
        if validate is not None:
            validate(shape)
        out_sharding = _sharding.full_rank(out_sharding, len(shape))
        if math.prod(shape) == 0:
            return _sharding.place(jnp.zeros(shape, dt), out_sharding)
        if sample is None:
            return _sharding.place(build(key, shape, dt, out_sharding), out_sharding)
        sample_dt = _sample_dtype(dt, draw_dtype)
        return _sharding.sample_sharded(
            lambda k: sample(k, shape, sample_dt).astype(dt), key, out_sharding
        )

    init.__qualname__ = f"{who}.<locals>.init"
    return init


# --------------------------------------------------------------------------- variance scaling


def _complex_truncated_normal(key: jax.Array, shape: tuple[int, ...], dtype: np.dtype) -> jax.Array:
    """Complex normal with E|z|^2 = 1 before its modulus is truncated at 2 (jax's sampler)."""
    key_r, key_theta = jax.random.split(key)
    real = _real_dtype(dtype)
    t = jnp.asarray(1.0 - math.exp(-4.0), dtype) * jax.random.uniform(key_r, shape, real).astype(
        dtype
    )
    r = jnp.sqrt(-jnp.log(jnp.asarray(1.0, dtype) - t))
    theta = jnp.asarray(2 * np.pi, dtype) * jax.random.uniform(key_theta, shape, real).astype(dtype)
    return r * jnp.exp(jnp.asarray(1j, dtype) * theta)


def _complex_uniform(key: jax.Array, shape: tuple[int, ...], dtype: np.dtype) -> jax.Array:
    """Uniform on the disk of radius sqrt(2) (so E|z|^2 = 1), as jax draws it."""
    key_r, key_theta = jax.random.split(key)
    real = _real_dtype(dtype)
    r = jnp.sqrt(jnp.asarray(2.0, real) * jax.random.uniform(key_r, shape, real)).astype(dtype)
    theta = jnp.asarray(2 * np.pi, dtype) * jax.random.uniform(key_theta, shape, real).astype(dtype)
    return r * jnp.exp(jnp.asarray(1j, dtype) * theta)


# (distribution, complex) -> (draw, std multiplier from the variance): jax's operations in jax's
# order, so that real draws are bit-identical to jax.nn.initializers.variance_scaling.
_SCALED_DRAWS: dict[tuple[str, bool], tuple[Sampler, Callable[..., jax.Array]]] = {
    ("truncated_normal", False): (
        lambda k, s, d: jax.random.truncated_normal(k, -2, 2, s, d),
        lambda var, d: jnp.sqrt(var) / jnp.array(_TRUNC2_STD, d),
    ),
    ("truncated_normal", True): (
        _complex_truncated_normal,
        lambda var, d: jnp.sqrt(var) / jnp.array(_COMPLEX_TRUNC2_STD, d),
    ),
    ("normal", False): (jax.random.normal, lambda var, d: jnp.sqrt(var)),
    ("normal", True): (jax.random.normal, lambda var, d: jnp.sqrt(var)),
    ("uniform", False): (
        lambda k, s, d: jax.random.uniform(k, s, d, -1),
        lambda var, d: jnp.sqrt(jnp.array(3, d) * var),
    ),
    ("uniform", True): (_complex_uniform, lambda var, d: jnp.sqrt(var)),
}


def _fan_denominator(mode: str, fan_in: int, fan_out: int) -> float:
    if mode == "fan_in":
        return fan_in
    if mode == "fan_out":
        return fan_out
    if mode == "fan_avg":
        return (fan_in + fan_out) / 2
    return (fan_in * fan_out) ** 0.5


def variance_scaling(
    scale: float,
    mode: Mode,
    distribution: Distribution,
    in_axis: AxisSpec = -2,
    out_axis: AxisSpec = -1,
    batch_axis: AxisSpec = (),
    dtype: DTypeLike = None,
    *,
    draw_dtype: DTypeLike = None,
) -> Initializer:
    """Builds an initializer whose samples have variance ``scale / n``.

    ``n`` is ``fan_in``, ``fan_out``, ``(fan_in + fan_out) / 2`` or ``sqrt(fan_in * fan_out)`` for
    the four modes (fans from :func:`compute_fans`). ``"truncated_normal"`` is truncated at two
    standard deviations and rescaled so the *realised* variance is ``scale / n``; ``"uniform"`` is
    ``U(-sqrt(3 scale / n), sqrt(3 scale / n))`` (a disk for complex dtypes).

    float32 and float64 values are bit-identical to ``jax.nn.initializers.variance_scaling``
    (16-bit ones too with ``draw_dtype`` equal to the output dtype). For complex
    ``"truncated_normal"`` the variance is exact, where jax's is about 1.9% too large.

    Args:
        scale: the variance multiplier (a gain squared), >= 0.
        mode: which fan to divide by.
        distribution: the distribution to draw from.
        in_axis: axis or axes of the inputs.
        out_axis: axis or axes of the outputs.
        batch_axis: axis or axes to ignore when computing fans.
        dtype: default dtype of the result (None: float32).
        draw_dtype: dtype of the random draws, cast to the result's (None: float32 for 16-bit
            results, else the result's dtype).

    Returns:
        An initializer ``init(key, shape, dtype=None, out_sharding=None)``.

    Raises:
        ValueError: for an unknown mode or distribution, a negative scale, or invalid axes.
        TypeError: for an integer or bool dtype.

    Example:
        >>> import jax, jaxinit as ji
        >>> init = ji.variance_scaling(2.0, "fan_in", "normal")
        >>> w = init(jax.random.key(0), (256, 512))
        >>> w.shape, w.dtype
        ((256, 512), dtype('float32'))
    """
    who = "variance_scaling"
    scale = _check_nonneg(scale, "scale", who)
    _check_choice(mode, _MODES, "mode", who)
    _check_choice(distribution, _DISTRIBUTIONS, "distribution", who)
    validate_axes(in_axis, out_axis, batch_axis)

    def sample(key: jax.Array, shape: tuple[int, ...], dt: np.dtype) -> jax.Array:
        fan_in, fan_out = compute_fans(shape, in_axis, out_axis, batch_axis)
        variance = jnp.array(scale / _fan_denominator(mode, fan_in, fan_out), dtype=dt)
        draw, std = _SCALED_DRAWS[distribution, _is_complex(dt)]
        return draw(key, shape, dt) * std(variance, dt)

    return _initializer(
        who,
        dtype=dtype,
        sample=sample,
        validate=lambda shape: compute_fans(shape, in_axis, out_axis, batch_axis),
        draw_dtype=_check_draw_dtype(draw_dtype, who),
    )


_SCALING_ARGS = """in_axis: axis or axes of the inputs.
        out_axis: axis or axes of the outputs.
        batch_axis: axis or axes to ignore when computing fans.
        dtype: default dtype of the result (None: float32).
        draw_dtype: dtype of the random draws (see :func:`variance_scaling`)."""

_NAMED_DOC = """Builds jax's ``{name}`` initializer: ``variance_scaling({scale}, "{mode}", "{dist}")``.

    Bit-identical to ``jax.nn.initializers.{name}`` for float32 and float64. {extra}

    Args:
        {args}

    Returns:
        An initializer ``init(key, shape, dtype=None, out_sharding=None)``.

    Example:
        >>> import jax, jaxinit as ji
        >>> ji.{name}()(jax.random.key(0), (3, 3, 16, 32)).shape
        (3, 3, 16, 32)
    """


def _named_scaling(name: str, scale: float, mode: Mode, dist: Distribution, extra: str = ""):
    def builder(
        in_axis: AxisSpec = -2,
        out_axis: AxisSpec = -1,
        batch_axis: AxisSpec = (),
        dtype: DTypeLike = None,
        *,
        draw_dtype: DTypeLike = None,
    ) -> Initializer:
        return variance_scaling(
            scale, mode, dist, in_axis, out_axis, batch_axis, dtype, draw_dtype=draw_dtype
        )

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = _NAMED_DOC.format(
        name=name, scale=scale, mode=mode, dist=dist, extra=extra, args=_SCALING_ARGS
    )
    return builder


_UNTRUNCATED = "For torch's untruncated ``{}`` use :func:`{}`."
he_normal = _named_scaling(
    "he_normal",
    2.0,
    "fan_in",
    "truncated_normal",
    "The normal is truncated at 2 std and rescaled. "
    + _UNTRUNCATED.format("kaiming_normal_", "kaiming_normal"),
)
he_uniform = _named_scaling("he_uniform", 2.0, "fan_in", "uniform")
glorot_normal = _named_scaling(
    "glorot_normal",
    1.0,
    "fan_avg",
    "truncated_normal",
    _UNTRUNCATED.format("xavier_normal_", "xavier_normal"),
)
glorot_uniform = _named_scaling("glorot_uniform", 1.0, "fan_avg", "uniform")
lecun_normal = _named_scaling(
    "lecun_normal",
    1.0,
    "fan_in",
    "truncated_normal",
    "This is flax's default Dense and Conv kernel initializer.",
)
lecun_uniform = _named_scaling("lecun_uniform", 1.0, "fan_in", "uniform")


# --------------------------------------------------------------------------- torch semantics

_KAIMING_DOC = """Builds torch's ``kaiming_{dist}_``: {formula}.

    ``gain = calculate_gain(nonlinearity, a)``; with the defaults (``leaky_relu``, ``a=0``) that is
    ``sqrt(2)`` (He et al., 2015). Fans follow jax's kernel layout ``(..., in, out)``, so a Flax
    kernel gets the fan torch computes for the same layer. {extra}

    Args:
        a: the negative slope of the leaky ReLU that follows (only used for ``leaky_relu``).
        mode: ``"fan_in"`` preserves the forward variance, ``"fan_out"`` the backward.
        nonlinearity: a name from :func:`calculate_gain`'s table.
        {args}

    Returns:
        An initializer ``init(key, shape, dtype=None, out_sharding=None)``.

    Raises:
        ValueError: for an unknown mode or nonlinearity, or invalid axes.

    Example:
{example}
    """

_XAVIER_DOC = """Builds torch's ``xavier_{dist}_``: {formula} (Glorot and Bengio, 2010).

    Args:
        gain: multiplier of the standard deviation, >= 0.
        {args}

    Returns:
        An initializer ``init(key, shape, dtype=None, out_sharding=None)``.

    Raises:
        ValueError: for a negative gain or invalid axes.

    Example:
{example}
    """


def _kaiming(dist: Distribution, formula: str, extra: str, example: str):
    name = f"kaiming_{dist}"

    def builder(
        a: float = 0.0,
        mode: Literal["fan_in", "fan_out"] = "fan_in",
        nonlinearity: str = "leaky_relu",
        in_axis: AxisSpec = -2,
        out_axis: AxisSpec = -1,
        batch_axis: AxisSpec = (),
        dtype: DTypeLike = None,
        *,
        draw_dtype: DTypeLike = None,
    ) -> Initializer:
        _check_choice(mode, ("fan_in", "fan_out"), "mode", name)
        gain = calculate_gain(nonlinearity, a)
        return variance_scaling(
            gain**2, mode, dist, in_axis, out_axis, batch_axis, dtype, draw_dtype=draw_dtype
        )

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = _KAIMING_DOC.format(
        dist=dist, formula=formula, extra=extra, args=_SCALING_ARGS, example=example
    )
    return builder


def _xavier(dist: Distribution, formula: str, example: str):
    name = f"xavier_{dist}"

    def builder(
        gain: float = 1.0,
        in_axis: AxisSpec = -2,
        out_axis: AxisSpec = -1,
        batch_axis: AxisSpec = (),
        dtype: DTypeLike = None,
        *,
        draw_dtype: DTypeLike = None,
    ) -> Initializer:
        gain = _check_nonneg(gain, "gain", name)
        return variance_scaling(
            gain**2, "fan_avg", dist, in_axis, out_axis, batch_axis, dtype, draw_dtype=draw_dtype
        )

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = _XAVIER_DOC.format(
        dist=dist, formula=formula, args=_SCALING_ARGS, example=example
    )
    return builder


kaiming_normal = _kaiming(
    "normal",
    "an untruncated normal with ``std = gain / sqrt(fan)``",
    "",
    """        >>> import jax, jaxinit as ji
        >>> w = ji.kaiming_normal(nonlinearity="relu")(jax.random.key(0), (512, 256))
        >>> round(float(w.std() * 512**0.5), 1)
        1.4""",
)
kaiming_uniform = _kaiming(
    "uniform",
    "``U(-b, b)`` with ``b = gain * sqrt(3 / fan)``",
    "``kaiming_uniform(a=math.sqrt(5))`` is torch's default ``Linear``/``Conv`` kernel init: its "
    "gain is ``sqrt(1/3)``, so the bound is ``1 / sqrt(fan_in)``.",
    """        >>> import math, jax, jaxinit as ji
        >>> w = ji.kaiming_uniform(a=math.sqrt(5))(jax.random.key(0), (100, 10))
        >>> bool(abs(w).max() <= 1 / math.sqrt(100))
        True""",
)
xavier_normal = _xavier(
    "normal",
    "untruncated, ``std = gain * sqrt(2 / (fan_in + fan_out))``",
    """        >>> import jax, jaxinit as ji
        >>> ji.xavier_normal(gain=5 / 3)(jax.random.key(0), (64, 64)).dtype
        dtype('float32')""",
)
xavier_uniform = _xavier(
    "uniform",
    "``U(-b, b)``, ``b = gain * sqrt(6 / (fan_in + fan_out))``",
    """        >>> import jax, jaxinit as ji
        >>> w = ji.xavier_uniform()(jax.random.key(0), (300, 300))
        >>> bool(abs(w).max() <= (6 / 600) ** 0.5)
        True""",
)


# --------------------------------------------------------------------------- plain distributions


def normal(
    stddev: float = 1e-2, dtype: DTypeLike = None, *, draw_dtype: DTypeLike = None
) -> Initializer:
    """Builds an initializer drawing from ``N(0, stddev^2)`` (jax's ``normal(stddev, dtype)``).

    Args:
        stddev: the standard deviation, >= 0.
        dtype: default dtype of the result (None: float32).
        draw_dtype: dtype of the random draws (see :func:`variance_scaling`).

    Returns:
        An initializer ``init(key, shape, dtype=None, out_sharding=None)``.

    Raises:
        ValueError: for a negative or non-finite stddev.
        TypeError: for a dtype passed as ``stddev``.

    Example:
        >>> import jax, jaxinit as ji
        >>> ji.normal(1.0)(jax.random.key(0), (4,)).shape
        (4,)
    """
    who = "normal"
    stddev = _check_nonneg(stddev, "stddev", who)
    return _initializer(
        who,
        dtype=dtype,
        sample=lambda k, s, d: jax.random.normal(k, s, d) * jnp.array(stddev, d),
        draw_dtype=_check_draw_dtype(draw_dtype, who),
    )


def uniform(
    scale: float = 1e-2,
    dtype: DTypeLike = None,
    *,
    low: float | None = None,
    high: float | None = None,
    draw_dtype: DTypeLike = None,
) -> Initializer:
    """Builds a uniform initializer: jax's ``U[0, scale)``, or ``U[low, high)`` when both are given.

    ``uniform(scale, dtype)`` takes jax's arguments in jax's order; ``uniform(low=a, high=b)`` is
    torch's ``uniform_(a, b)``.

    Args:
        scale: the upper bound of ``U[0, scale)``, >= 0; ignored when ``low``/``high`` are given.
        dtype: default dtype of the result (None: float32); real dtypes only.
        low: lower bound (with ``high``).
        high: upper bound (with ``low``), > ``low``.
        draw_dtype: dtype of the random draws (see :func:`variance_scaling`).

    Returns:
        An initializer ``init(key, shape, dtype=None, out_sharding=None)``.

    Raises:
        ValueError: for a negative scale, only one of low/high, or ``low >= high``.
        TypeError: for a dtype passed as ``scale``, or a complex dtype.

    Example:
        >>> import jax, jaxinit as ji
        >>> w = ji.uniform(low=-0.5, high=0.5)(jax.random.key(0), (1000,))
        >>> bool((w >= -0.5).all() and (w < 0.5).all())
        True
    """
    who = "uniform"
    scale = _check_nonneg(scale, "scale", who)
    if (low is None) != (high is None):
        raise ValueError(f"{who}: give both low and high or neither, got low={low}, high={high}.")
    if low is None:
        sample = lambda k, s, d: jax.random.uniform(k, s, d) * jnp.array(scale, d)
    else:
        low, high = _check_number(low, "low", who), _check_number(high, "high", who)
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"{who}: expected finite low < high, got low={low}, high={high}.")
        sample = lambda k, s, d: jax.random.uniform(k, s, d, low, high)
    return _initializer(
        who,
        dtype=dtype,
        sample=sample,
        real_only=True,
        draw_dtype=_check_draw_dtype(draw_dtype, who),
    )


def _std_normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _std_normal_pdf(x: float) -> float:
    return math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi) if math.isfinite(x) else 0.0


def truncated_normal_moments(lower: float, upper: float) -> tuple[float, float]:
    """Mean and standard deviation of ``N(0, 1)`` truncated to ``[lower, upper]`` (closed form)."""
    z = _std_normal_cdf(upper) - _std_normal_cdf(lower)
    pa, pb = _std_normal_pdf(lower), _std_normal_pdf(upper)
    ta = lower * pa if math.isfinite(lower) else 0.0
    tb = upper * pb if math.isfinite(upper) else 0.0
    mean = (pa - pb) / z
    var = 1.0 + (ta - tb) / z - mean**2
    return mean, math.sqrt(var)


def truncated_normal(
    stddev: float = 1e-2,
    dtype: DTypeLike = None,
    lower: float = -2.0,
    upper: float = 2.0,
    *,
    correct_stddev: bool = True,
    draw_dtype: DTypeLike = None,
) -> Initializer:
    """Builds a truncated-normal initializer whose samples have standard deviation ``stddev``.

    The arguments are jax's, in jax's order. Samples are ``stddev / c * t`` with ``t ~ N(0, 1)``
    truncated to ``[lower, upper]`` (bounds in units of the untruncated std, like jax and keras;
    torch's ``trunc_normal_`` takes absolute bounds) and ``c`` the std of that truncated normal,
    from the closed form, so the *realised* std is ``stddev`` for any bounds (``c = 0.8796`` for
    ``±2``). With ``correct_stddev=False``, ``stddev`` is the std before truncation, jax's
    convention (bit-identical to ``jax.nn.initializers.truncated_normal``).

    Args:
        stddev: the standard deviation, >= 0.
        dtype: default dtype of the result (None: float32); real dtypes only.
        lower: lower bound in units of the untruncated std.
        upper: upper bound in units of the untruncated std, > ``lower``.
        correct_stddev: whether ``stddev`` is the realised std (True) or the untruncated one.
        draw_dtype: dtype of the random draws (see :func:`variance_scaling`).

    Returns:
        An initializer ``init(key, shape, dtype=None, out_sharding=None)``.

    Raises:
        ValueError: for a negative stddev or ``lower >= upper``.
        TypeError: for integer, bool or complex dtypes, a number passed as ``dtype``, or a dtype
            passed as a number.

    Example:
        >>> import jax, jaxinit as ji
        >>> w = ji.truncated_normal(0.02)(jax.random.key(0), (1000, 1000))
        >>> round(float(w.std()), 3), bool(abs(w).max() <= 2 * 0.02 / 0.8796)
        (0.02, True)
    """
    who = "truncated_normal"
    stddev = _check_nonneg(stddev, "stddev", who)
    _check_dtype(
        dtype,
        who,
        allow_complex=False,
        hint=" Its arguments are (stddev, dtype, lower, upper), as in jax; pass lower= and "
        "upper= by keyword.",
    )
    lower, upper = _check_number(lower, "lower", who), _check_number(upper, "upper", who)
    if math.isnan(lower) or math.isnan(upper) or not lower < upper:
        raise ValueError(f"{who}: expected lower < upper, got lower={lower}, upper={upper}.")
    if _std_normal_cdf(upper) - _std_normal_cdf(lower) <= 0.0:
        raise ValueError(
            f"{who}: the interval [{lower}, {upper}] (in std units) has no probability mass."
        )
    multiplier = stddev / truncated_normal_moments(lower, upper)[1] if correct_stddev else stddev
    return _initializer(
        who,
        dtype=dtype,
        sample=lambda k, s, d: (
            jax.random.truncated_normal(k, lower, upper, s, d) * jnp.array(multiplier, d)
        ),
        real_only=True,
        draw_dtype=_check_draw_dtype(draw_dtype, who),
    )


def sparse(
    sparsity: float, stddev: float = 0.01, dtype: DTypeLike = None, *, draw_dtype: DTypeLike = None
) -> Initializer:
    """Builds a sparse initializer: each output unit keeps a fixed number of non-zero inputs.

    For a 2-D kernel ``(in, out)``, each column (one output unit's incoming weights) has exactly
    ``ceil(sparsity * in)`` zeros at random rows; the rest are ``N(0, stddev^2)`` (Martens, 2010).
    torch's ``sparse_`` takes an ``(out, in)`` weight and zeroes along its columns instead, i.e. a
    fixed number of zeros per *input*; transpose if you need that exactly.

    Args:
        sparsity: fraction of zeros in each column, in [0, 1].
        stddev: std of the non-zero entries, >= 0.
        dtype: default dtype of the result (None: float32).
        draw_dtype: dtype of the random draws (see :func:`variance_scaling`).

    Returns:
        An initializer for 2-D shapes.

    Raises:
        ValueError: for sparsity outside [0, 1], a negative stddev, or (when called) a non-2-D shape.

    Example:
        >>> import jax, jaxinit as ji
        >>> w = ji.sparse(0.75)(jax.random.key(0), (8, 4))
        >>> [int(c) for c in (w == 0).sum(axis=0)]
        [6, 6, 6, 6]
    """
    who = "sparse"
    sparsity = _check_number(sparsity, "sparsity", who)
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"{who}: sparsity must be in [0, 1], got {sparsity!r}.")
    stddev = _check_nonneg(stddev, "stddev", who)

    def sample(key: jax.Array, shape: tuple[int, ...], dt: np.dtype) -> jax.Array:
        k_val, k_perm = jax.random.split(key)
        values = jax.random.normal(k_val, shape, dt) * jnp.array(stddev, dt)
        ranks = jnp.argsort(jnp.argsort(jax.random.uniform(k_perm, shape), axis=0), axis=0)
        return jnp.where(ranks < math.ceil(sparsity * shape[0]), jnp.zeros((), dt), values)

    return _initializer(
        who,
        dtype=dtype,
        sample=sample,
        real_only=True,
        validate=lambda shape: _check_rank(shape, (2,), who, "(in, out)"),
        draw_dtype=_check_draw_dtype(draw_dtype, who),
    )


# --------------------------------------------------------------------------- orthogonal family


def _check_column_axis(column_axis: Any, who: str) -> int:
    try:
        return operator.index(column_axis)
    except TypeError:
        raise ValueError(f"{who}: column_axis must be an int, got {column_axis!r}.") from None


def _orthogonal_matrix(
    key: jax.Array, n_rows: int, n_cols: int, dtype: np.dtype, scale: float
) -> jax.Array:
    """A Haar-random ``(n_rows, n_cols)`` matrix with orthonormal rows or columns, times scale.

    16-bit dtypes have no QR kernel: the QR runs in float32 and the result is cast.
    """
    compute = jnp.dtype(jnp.float32) if jnp.finfo(dtype).bits < 32 else dtype
    q = jax.random.orthogonal(key, n_rows, (), compute, n_cols)
    return (jnp.array(scale, compute) * q).astype(dtype)


def orthogonal(scale: float = 1.0, column_axis: int = -1, dtype: DTypeLike = None) -> Initializer:
    """Builds an initializer of uniformly (Haar) distributed orthogonal matrices (Saxe et al., 2014).

    The array is viewed as a matrix whose columns lie along ``column_axis`` and whose rows are all
    other axes flattened; the rows or columns, whichever are fewer, are orthonormal, then scaled.
    For float32 the values equal ``jax.nn.initializers.orthogonal``. Unlike jax's, it supports
    bfloat16 and float16 (QR in float32, then cast) and ``out_sharding``: the QR runs once and the
    result is laid out on the requested sharding.

    Args:
        scale: multiplier of the orthogonal matrix, >= 0.
        column_axis: the axis holding the columns.
        dtype: default dtype of the result (None: float32).

    Returns:
        An initializer ``init(key, shape, dtype=None, out_sharding=None)``; shapes need rank >= 2.

    Raises:
        ValueError: for a negative scale, a non-int column_axis, or (when called) rank < 2 or an
            out-of-range column_axis.

    Example:
        >>> import jax, jax.numpy as jnp, jaxinit as ji
        >>> w = ji.orthogonal()(jax.random.key(0), (64, 64), jnp.bfloat16)
        >>> w.dtype, bool(jnp.allclose((w.astype(jnp.float32).T @ w.astype(jnp.float32)),
        ...                             jnp.eye(64), atol=3e-2))
        (dtype(bfloat16), True)
    """
    who = "orthogonal"
    scale = _check_nonneg(scale, "scale", who)
    column_axis = _check_column_axis(column_axis, who)

    def validate(shape: tuple[int, ...]) -> None:
        if len(shape) < 2:
            raise ValueError(f"{who}: shape {shape} has rank {len(shape)}; expected rank >= 2.")
        if not -len(shape) <= column_axis < len(shape):
            raise ValueError(f"{who}: column_axis={column_axis} is out of range for shape {shape}.")

    def build(key: jax.Array, shape: tuple[int, ...], dt: np.dtype, out_sharding: Any):
        n_cols = shape[column_axis]
        n_rows = math.prod(shape) // n_cols
        q = _sharding.compute_once(
            lambda k: _orthogonal_matrix(k, n_rows, n_cols, dt, scale), key, out_sharding
        )
        rest = tuple(d for i, d in enumerate(shape) if i != column_axis % len(shape))
        return jnp.moveaxis(q.reshape((*rest, n_cols)), -1, column_axis)

    return _initializer(who, dtype=dtype, build=build, validate=validate)


def delta_orthogonal(
    scale: float = 1.0, column_axis: int = -1, dtype: DTypeLike = None
) -> Initializer:
    """Builds the delta-orthogonal initializer for conv kernels (Xiao et al., 2018).

    The kernel ``(*spatial, in, out)`` is zero except at the spatial centre ``(k - 1) // 2`` along
    each spatial axis (jax's convention), which holds an orthogonal ``(in, out)`` matrix. A conv
    with such a kernel and ``padding="SAME"`` is an orthogonal map at initialisation.

    Args:
        scale: multiplier of the orthogonal matrix, >= 0.
        column_axis: the axis holding the columns of the centre matrix.
        dtype: default dtype of the result (None: float32).

    Returns:
        An initializer for 3-D, 4-D or 5-D shapes with ``in <= out``.

    Raises:
        ValueError: for a negative scale, or (when called) a shape that is not 3-D to 5-D or has
            more inputs than outputs.

    Example:
        >>> import jax, jaxinit as ji
        >>> w = ji.delta_orthogonal()(jax.random.key(0), (3, 3, 8, 8))
        >>> float(abs(w[0, 0]).max()), w[1, 1].shape
        (0.0, (8, 8))
    """
    who = "delta_orthogonal"
    ortho = orthogonal(scale, _check_column_axis(column_axis, who))

    def validate(shape: tuple[int, ...]) -> None:
        _check_rank(shape, (3, 4, 5), who, "a 3-D, 4-D or 5-D conv kernel (*spatial, in, out)")
        if shape[-1] < shape[-2]:
            raise ValueError(
                f"{who}: shape {shape} has in={shape[-2]} > out={shape[-1]}; expected in <= out."
            )

    def build(key: jax.Array, shape: tuple[int, ...], dt: np.dtype, out_sharding: Any):
        centre = tuple((k - 1) // 2 for k in shape[:-2])
        q = _sharding.compute_once(lambda k: ortho(k, shape[-2:], dt), key, out_sharding)
        return jnp.zeros(shape, dt).at[centre].set(q)

    return _initializer(who, dtype=dtype, build=build, validate=validate)


def identity(scale: float = 1.0, dtype: DTypeLike = None) -> Initializer:
    """Builds an identity initializer: ``eye`` for matrices, a Dirac delta for conv kernels.

    A matrix ``(in, out)`` gets ``scale * eye(in, out)``. A conv kernel ``(*spatial, in, out)``
    gets ``scale`` at ``[centre, i, i]`` for ``i < min(in, out)`` and zeros elsewhere, with the
    centre at ``(k - 1) // 2`` on each spatial axis: the offset that XLA's ``"SAME"`` padding (and
    torch's ``padding="same"``) treats as zero shift, so the conv is the identity map for odd and
    even kernel sizes alike. torch's ``dirac_`` uses ``k // 2``, which differs for even ``k``.

    Args:
        scale: the value on the diagonal.
        dtype: default dtype of the result (None: float32).

    Returns:
        An initializer ``init(key, shape, dtype=None, out_sharding=None)``; the key is unused.

    Raises:
        ValueError: (when called) for a shape of rank < 2.

    Example:
        >>> import jax, jaxinit as ji
        >>> ji.identity()(jax.random.key(0), (2, 3))
        Array([[1., 0., 0.],
               [0., 1., 0.]], dtype=float32)
    """
    who = "identity"
    scale = _check_number(scale, "scale", who)

    def validate(shape: tuple[int, ...]) -> None:
        if len(shape) < 2:
            raise ValueError(
                f"{who}: shape {shape} has rank {len(shape)}; expected a matrix (in, out) or a "
                "conv kernel (*spatial, in, out)."
            )

    def build(key: jax.Array, shape: tuple[int, ...], dt: np.dtype, out_sharding: Any):
        idx = jnp.arange(min(shape[-2], shape[-1]))
        centre = tuple((k - 1) // 2 for k in shape[:-2])
        return jnp.zeros(shape, dt).at[(*centre, idx, idx)].set(jnp.array(scale, dt))

    return _initializer(who, dtype=dtype, build=build, validate=validate)


# --------------------------------------------------------------------------- constants


def constant(value: Any, dtype: DTypeLike = None) -> Initializer:
    """Builds an initializer filling the array with ``value`` (jax's ``constant(value, dtype)``).

    Args:
        value: a scalar, or an array broadcastable to the requested shape.
        dtype: default dtype of the result (None: float32).

    Returns:
        An initializer ``init(key, shape, dtype=None, out_sharding=None)``; the key is unused.

    Raises:
        ValueError: for a value that is not a number or an array, or (when called) one that does
            not broadcast to the shape.

    Example:
        >>> import jax, jaxinit as ji
        >>> ji.constant(0.5)(jax.random.key(0), (2,))
        Array([0.5, 0.5], dtype=float32)
    """
    who = "constant"
    if _is_dtype_like(value):
        raise TypeError(f"{who}: value={value!r} is a dtype, not a number; pass it as dtype=.")
    value_np = np.asarray(value)
    if value_np.dtype == object:
        raise ValueError(f"{who}: value must be a number or an array, got {value!r}.")

    def validate(shape: tuple[int, ...]) -> None:
        try:
            np.broadcast_shapes(value_np.shape, shape)
        except ValueError:
            raise ValueError(
                f"{who}: value of shape {value_np.shape} does not broadcast to shape {shape}."
            ) from None

    def build(key: jax.Array, shape: tuple[int, ...], dt: np.dtype, out_sharding: Any):
        return jnp.broadcast_to(jnp.asarray(value_np, dtype=dt), shape)

    return _initializer(who, dtype=dtype, build=build, validate=validate)


def _filled(fill: float, who: str):
    fill_init = _initializer(who, dtype=None, build=lambda k, s, d, o: jnp.full(s, fill, d))

    def init(
        key: jax.Array | None = None,
        shape: Shape | None = None,
        dtype: DTypeLike = None,
        out_sharding: _sharding.OutSharding = None,
    ) -> Any:
        if key is None and shape is None:
            return init
        if shape is None:
            raise ValueError(f"{who}: called with a key but no shape; expected init(key, shape).")
        return fill_init(key, shape, dtype, out_sharding)

    init.__name__ = init.__qualname__ = who
    init.__doc__ = f"""Initializer returning an array of {who} (``init(key, shape, dtype, out_sharding)``).

    It is both the initializer and its own builder: ``bias_init=ji.{who}`` and
    ``bias_init=ji.{who}()`` are the same thing.

    Example:
        >>> import jax, jaxinit as ji
        >>> ji.{who}(jax.random.key(0), (3,))
        Array([{fill:.0f}., {fill:.0f}., {fill:.0f}.], dtype=float32)
        >>> ji.{who}() is ji.{who}
        True
    """
    return init


zeros = _filled(0.0, "zeros")
ones = _filled(1.0, "ones")
