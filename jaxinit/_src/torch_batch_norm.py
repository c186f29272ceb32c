"""torch's ``BatchNormNd`` conventions, as keyword arguments for jaxinit's batch norm.

torch updates ``running = (1 - m) * running + m * batch`` with ``m = momentum`` and stores the
unbiased (n/(n-1)) batch variance in ``running_var``, while normalising the batch with the
biased one (torch's ``BatchNorm2d`` documentation).
"""

from __future__ import annotations

from typing import Any

__all__ = ["torch_batch_norm_kwargs"]


def torch_batch_norm_kwargs(
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    channels_last: bool = True,
) -> dict[str, Any]:
    """Returns keyword arguments that make jaxinit's batch norm behave like a torch BatchNormNd.

    jaxinit (like Flax) keeps ``momentum`` as the decay, so torch's ``m`` becomes ``1 - m``, and
    ``unbiased_running_var=True`` stores the running variance torch stores. The result works for
    ``ji.batch_norm(x, state, **kw, training=...)``, ``jaxinit.linen.BatchNorm(**kw)`` and
    ``jaxinit.nnx.BatchNorm(num_features, **kw, rngs=...)``.

    Args:
        momentum: torch's momentum, in (0, 1]. torch's ``None`` (a cumulative average) has no
            exponential-average equivalent and is rejected.
        eps: torch's ``eps``, >= 0.
        channels_last: True for (N, ..., C) data as Flax uses (``axis=-1``); False keeps torch's
            (N, C, ...) layout (``axis=1``).

    Returns:
        A dict with ``momentum``, ``epsilon``, ``unbiased_running_var`` and ``axis``.

    Raises:
        ValueError: if ``momentum`` is None or outside (0, 1], or ``eps`` is negative.

    Example:
        >>> from jaxinit.porting import torch_batch_norm_kwargs
        >>> torch_batch_norm_kwargs(momentum=0.1, eps=1e-5)
        {'momentum': 0.9, 'epsilon': 1e-05, 'unbiased_running_var': True, 'axis': -1}
    """
    if momentum is None:
        raise ValueError(
            "momentum=None (torch's cumulative moving average) has no exponential-average "
            "equivalent; pass the momentum the torch model was trained with, or re-estimate the "
            "running statistics after training"
        )
    if isinstance(momentum, bool) or not 0.0 < float(momentum) <= 1.0:
        raise ValueError(f"torch momentum must be in (0, 1], got {momentum!r}")
    if not float(eps) >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    return {
        "momentum": 1.0 - float(momentum),
        "epsilon": float(eps),
        "unbiased_running_var": True,
        "axis": -1 if channels_last else 1,
    }
