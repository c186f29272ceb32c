"""Diagnostics, variance propagation, LSUV and the depth experiment.

Nothing here imports flax or matplotlib at module level: the model functions import flax when
called, and the plot functions import matplotlib when called.
"""

from jaxinit.diagnostics.depth import DepthReport, DepthRow, depth_report, plot_depth
from jaxinit.diagnostics.lsuv import LsuvReport, lsuv
from jaxinit.diagnostics.plots import (
    UpdateRatios,
    plot_activations,
    plot_gradients,
    plot_histograms,
    plot_update_ratios,
    update_ratios,
)
from jaxinit.diagnostics.propagation import PropagationResult, assert_stable, propagation
from jaxinit.diagnostics.stats import Diagnostics, LayerStats, ParamStats, diagnose, layer_outputs

__all__ = [
    "DepthReport",
    "DepthRow",
    "Diagnostics",
    "LayerStats",
    "LsuvReport",
    "ParamStats",
    "PropagationResult",
    "UpdateRatios",
    "assert_stable",
    "depth_report",
    "diagnose",
    "layer_outputs",
    "lsuv",
    "plot_activations",
    "plot_depth",
    "plot_gradients",
    "plot_histograms",
    "plot_update_ratios",
    "propagation",
    "update_ratios",
]
