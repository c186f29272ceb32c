"""Fan axes of einsum kernels, and the right fans for Flax's DenseGeneral with batch dims.

A kernel contracted by ``jnp.einsum`` (Flax's ``nn.Einsum``, attention projections written as
einsums, stacked expert weights) has no fixed ``(..., in, out)`` layout, so the default
``in_axis=-2, out_axis=-1`` of the variance-scaling builders gives it the wrong fans.
:func:`einsum_axes` reads the axes off the equation; :func:`dense_general_kernel_init` gives
``flax.linen.DenseGeneral`` with ``batch_dims`` (and ``flax.nnx.LinearGeneral`` with
``batch_axis``) the fans of the einsum it computes.
"""

from __future__ import annotations

import math
import operator
import string
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.nn.initializers import Initializer

from jaxinit._src import sharding as _sharding
from jaxinit._src.initializers import _check_shape

__all__ = ["dense_general_kernel_init", "einsum_axes"]

_LETTERS = frozenset(string.ascii_letters)
_ELLIPSIS = "..."


def _parse_term(term: str, what: str, who: str) -> tuple[str, bool]:
    """The letters of one subscript term and whether it has an ellipsis; raises if malformed."""
    has_ellipsis = _ELLIPSIS in term
    letters = term.replace(_ELLIPSIS, "", 1)
    if "." in letters:
        problem = "more than one '...'" if _ELLIPSIS in letters else "dots that are not '...'"
        raise ValueError(
            f"{who}: {what} {term!r} has {problem}; an ellipsis is exactly three dots, at most "
            "once per term."
        )
    bad = sorted({c for c in letters if c not in _LETTERS})
    if bad:
        raise ValueError(
            f"{who}: {what} {term!r} has invalid character(s) {', '.join(map(repr, bad))}; "
            "indices are ASCII letters (a-z, A-Z), with an optional '...'."
        )
    return letters, has_ellipsis


def einsum_axes(equation: str, *, kernel: int = 1) -> dict[str, tuple[int, ...]]:
    """Fan axes of the kernel operand of a two-operand einsum, as jax's axis keywords.

    The kernel is operand ``kernel`` of ``equation``; the other operand is the activation. Each
    kernel index is classified by where else it appears:

    * in the activation but not in the output (summed away): ``in_axis``;
    * in the output but not in the activation: ``out_axis``;
    * in the activation and in the output: ``batch_axis``, e.g. the expert axis ``e`` of
      ``"ebd,edf->ebf"``, ignored by the fans.

    The result goes straight to any builder taking jax's axis keywords:
    ``ji.lecun_normal(**ji.einsum_axes("btd,dnh->btnh"))`` gives a ``(d, n, h)`` query kernel
    ``fan_in = d`` and ``fan_out = n * h``, where the default axes would give ``fan_in = n``.

    For a convolution written as an einsum on extracted patches, ``"bhwxyc,xyco->bhwo"`` with a
    ``(kh, kw, cin, cout)`` kernel, the spatial axes ``x, y`` are summed away, so they land in
    ``in_axis``: ``fan_in = kh * kw * cin``, as for ``Conv``, but ``fan_out = cout`` where
    ``Conv``'s (which counts the spatial axes as receptive field) is ``kh * kw * cout``. The two
    agree for the ``"fan_in"`` mode (lecun, he); for ``"fan_out"`` or ``"fan_avg"`` pass
    ``Conv``'s axes (``in_axis=-2, out_axis=-1``) instead if you want its fans.

    Spaces are ignored. An ellipsis ``...`` may appear in the activation (and then in the output),
    never in the kernel. Without ``->`` the output is numpy's implicit one: the indices that
    appear exactly once, in alphabetical (ASCII) order, after the ellipsis dimensions.

    Args:
        equation: a two-operand einsum equation such as ``"btd,dnh->btnh"``.
        kernel: which operand is the kernel, 0 or 1.

    Returns:
        ``{"in_axis": ..., "out_axis": ..., "batch_axis": ...}``, each a sorted tuple of
        non-negative axes of the kernel operand.

    Raises:
        TypeError: ``equation`` is not a str.
        ValueError: for a malformed equation (invalid characters, more than one ``->``, a
            misplaced or partial ellipsis, an output index absent from the inputs or repeated, an
            output ellipsis without an input one), a number of operands other than two, a
            ``kernel`` other than 0 or 1, a kernel index repeated or found in neither the output
            nor the activation, or a kernel with no index summed away.

    Example:
        >>> import jaxinit as ji
        >>> ji.einsum_axes("btd,dnh->btnh")
        {'in_axis': (0,), 'out_axis': (1, 2), 'batch_axis': ()}
        >>> ji.einsum_axes("ebd,edf->ebf")
        {'in_axis': (1,), 'out_axis': (2,), 'batch_axis': (0,)}
        >>> ji.compute_fans((64, 8, 16), **ji.einsum_axes("btd,dnh->btnh"))
        (64, 128)
    """
    who = "einsum_axes"
    if not isinstance(equation, str):
        raise TypeError(f"{who}: equation must be a str, got {equation!r}.")
    if isinstance(kernel, bool) or not isinstance(kernel, int | np.integer) or kernel not in (0, 1):
        raise ValueError(
            f"{who}: kernel={kernel!r} must be 0 or 1, the position of the kernel operand."
        )
    eq = "".join(equation.split())
    if eq.count("->") > 1:
        raise ValueError(f"{who}: equation {equation!r} has more than one '->'.")
    inputs, arrow, out_term = eq.partition("->")
    if not arrow and ("-" in eq or ">" in eq):
        raise ValueError(f"{who}: equation {equation!r} has a '-' or '>' that is not '->'.")
    terms = inputs.split(",")
    if len(terms) != 2:
        raise ValueError(
            f"{who}: equation {equation!r} has {len(terms)} operand(s); expected two, the "
            "activation and the kernel."
        )
    kernel_term, kernel_ellipsis = _parse_term(terms[kernel], "kernel operand", who)
    other_term, other_ellipsis = _parse_term(terms[1 - kernel], "activation operand", who)
    if kernel_ellipsis:
        raise ValueError(
            f"{who}: the kernel operand {terms[kernel]!r} of {equation!r} has an ellipsis; a "
            "kernel's axes must all be named (an ellipsis is allowed in the activation only)."
        )
    if arrow:
        out, out_ellipsis = _parse_term(out_term, "output", who)
        if out_ellipsis and not other_ellipsis:
            raise ValueError(
                f"{who}: the output {out_term!r} of {equation!r} has an ellipsis but no input does."
            )
        repeated = sorted(c for c, n in Counter(out).items() if n > 1)
        if repeated:
            raise ValueError(
                f"{who}: output index {repeated[0]!r} appears more than once in the output "
                f"{out_term!r} of {equation!r}."
            )
        absent = [c for c in out if c not in kernel_term and c not in other_term]
        if absent:
            raise ValueError(
                f"{who}: output index {absent[0]!r} of {equation!r} appears in neither input."
            )
    else:
        counts = Counter(kernel_term + other_term)
        out = "".join(sorted(c for c, n in counts.items() if n == 1))

    repeated = sorted(c for c, n in Counter(kernel_term).items() if n > 1)
    if repeated:
        raise ValueError(
            f"{who}: index {repeated[0]!r} is repeated in the kernel operand {kernel_term!r} of "
            f"{equation!r}; each kernel axis needs its own index."
        )
    in_axis, out_axis, batch_axis = [], [], []
    for axis, c in enumerate(kernel_term):
        in_other, in_out = c in other_term, c in out
        if in_other and in_out:
            batch_axis.append(axis)
        elif in_other:
            in_axis.append(axis)
        elif in_out:
            out_axis.append(axis)
        else:
            raise ValueError(
                f"{who}: kernel index {c!r} of {equation!r} appears in neither the output nor the "
                "activation; summing a kernel axis away on its own is not a linear layer (sum the "
                "kernel first)."
            )
    if not in_axis:
        raise ValueError(
            f"{who}: the kernel operand {kernel_term!r} of {equation!r} has no index summed "
            "against the activation, so it has no inputs (no in_axis) to compute a fan_in from."
        )
    return {"in_axis": tuple(in_axis), "out_axis": tuple(out_axis), "batch_axis": tuple(batch_axis)}


def _check_batch_shape(batch_shape: Any, who: str) -> tuple[int, ...]:
    error = f"{who}: batch_shape must be a positive int or a sequence of positive ints, got "
    items = (batch_shape,) if not isinstance(batch_shape, Sequence | np.ndarray) else batch_shape
    try:
        if any(isinstance(d, bool | np.bool_) for d in items):
            raise TypeError
        out = tuple(operator.index(d) for d in items)
    except TypeError:
        raise TypeError(f"{error}{batch_shape!r}.") from None
    if any(d < 1 for d in out):
        raise ValueError(f"{error}{batch_shape!r}.")
    return out


def dense_general_kernel_init(
    builder: Callable[..., Initializer], batch_shape: int | Sequence[int], **builder_kwargs: Any
) -> Initializer:
    """A ``kernel_init`` giving a batched ``DenseGeneral`` kernel the fans of its einsum.

    ``flax.linen.DenseGeneral(..., batch_dims=...)`` and ``flax.nnx.LinearGeneral(...,
    batch_axis=...)`` call ``kernel_init(rng, flat_shape, dtype)`` with ``flat_shape =
    (prod(batch_shape) * prod(in_shape), prod(features))`` and reshape the result to
    ``batch_shape + in_shape + features``. The batch axes are thus folded into ``fan_in``: each of
    ``B`` independent ``(I, O)`` kernels is drawn as if it had ``B * I`` inputs, its std
    ``sqrt(B)`` times too small for lecun/he. This wrapper draws a ``(B, I, O)`` array with the
    batch axis ignored by the fans (``in_axis=1, out_axis=2, batch_axis=0``) and hands Flax the
    flat view, so the full kernel equals ``builder(**einsum_axes(eq))(key, kernel_shape)`` for the
    einsum ``eq`` the layer computes. ``DenseGeneral(features=F, axis=-1, batch_dims=(0,))`` on an
    input ``(B, N, I)`` is ``"bni,bif->bnf"``, its kernel ``(B, I, F)``.

    Args:
        builder: a builder taking jax's axis keywords (``in_axis``, ``out_axis``,
            ``batch_axis``): ``ji.lecun_normal``, ``ji.he_normal``, ``jax.nn.initializers
            .lecun_normal``, ``functools.partial(ji.variance_scaling, 2.0, "fan_in", "normal")``.
        batch_shape: the sizes of the batch dims (``batch_dims``' sizes in the input, or
            ``batch_axis``' values); a positive int or a sequence of them (empty: no batch).
        **builder_kwargs: further keyword arguments for ``builder`` (``dtype``, ``gain``, ...).

    Returns:
        ``init(key, flat_shape, dtype=None, out_sharding=None)`` for a flat ``(B * I, O)`` shape.
        ``builder`` runs once, here, so its argument errors surface at model definition.

    Raises:
        TypeError: ``builder`` is not callable, or ``batch_shape`` is not an int or a sequence of
            ints.
        ValueError: ``batch_shape`` has a size < 1, or (when called) the shape is not of rank 2
            or its first dimension is not divisible by ``prod(batch_shape)``.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxinit as ji
        >>> x = jnp.ones((4, 3, 64))  # (B, N, I)
        >>> init = ji.dense_general_kernel_init(ji.lecun_normal, batch_shape=4)
        >>> layer = nn.DenseGeneral(features=32, axis=-1, batch_dims=(0,), kernel_init=init)
        >>> kernel = jax.eval_shape(layer.init, jax.random.key(0), x)["params"]["kernel"]
        >>> kernel.shape, ji.compute_fans(kernel.shape, **ji.einsum_axes("bni,bif->bnf"))
        ((4, 64, 32), (64, 32))
    """
    who = "dense_general_kernel_init"
    if not callable(builder):
        raise TypeError(
            f"{who}: builder must be a callable returning an initializer, got {builder!r}."
        )
    batch = _check_batch_shape(batch_shape, who)
    n_batch = math.prod(batch)
    inner = builder(in_axis=1, out_axis=2, batch_axis=0, **builder_kwargs)
    if not callable(inner):
        raise TypeError(f"{who}: builder returned {inner!r}, not an initializer.")

    def init(
        key: jax.Array,
        shape: Sequence[int],
        dtype: Any = None,
        out_sharding: _sharding.OutSharding = None,
    ) -> jax.Array:
        flat = _check_shape(shape, who)
        if len(flat) != 2 or flat[0] % n_batch:
            raise ValueError(
                f"{who}: expected Flax's flat kernel shape (prod(batch_shape) * prod(in_shape), "
                f"prod(features)) with batch_shape={batch}, got {flat}; the shape must be of "
                f"rank 2 with a first dimension divisible by {n_batch}."
            )
        full = (n_batch, flat[0] // n_batch, flat[1])
        w = inner(key, full) if dtype is None else inner(key, full, dtype)
        w = w.reshape(flat)
        if out_sharding is None:
            return w
        return _sharding.place(w, _sharding.full_rank(out_sharding, 2))

    init.__qualname__ = f"{who}.<locals>.init"
    return init
