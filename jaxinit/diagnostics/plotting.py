"""matplotlib for the plot functions: imported by :func:`pyplot` only, when a plot is drawn."""

from __future__ import annotations

from typing import Any


def pyplot() -> Any:
    """Imports ``matplotlib.pyplot`` with the non-interactive Agg backend.

    Returns:
        The ``matplotlib.pyplot`` module.

    Raises:
        ImportError: when matplotlib is not installed, saying how to install it.
    """
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "jaxinit's plots need matplotlib: pip install 'jaxinit[plot]' (or matplotlib)."
        ) from err
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: str, dpi: int) -> str:
    """Lays out ``fig``, writes it to ``path`` as a PNG, closes it and returns ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, format="png")
    pyplot().close(fig)
    return path
