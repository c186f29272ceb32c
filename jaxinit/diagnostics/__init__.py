"""Diagnostics, variance propagation, LSUV and the depth experiment.

Only ``flax_models`` imports flax, and only ``plotting.pyplot`` imports matplotlib; the functions
that need them import them when called, so importing this package loads neither.
"""

from jaxinit.diagnostics.coord_check import CoordCheckReport, coord_check, plot_coord_check
from jaxinit.diagnostics.depth import DepthReport, DepthRow, depth_report, plot_depth
from jaxinit.diagnostics.lsuv import LsuvReport, lsuv
from jaxinit.diagnostics.plots import (
    plot_activations,
    plot_gradients,
    plot_histograms,
    plot_update_ratios,
)
from jaxinit.diagnostics.propagation import PropagationResult, assert_stable, propagation
from jaxinit.diagnostics.stats import Diagnostics, LayerStats, ParamStats, diagnose, layer_outputs
from jaxinit.diagnostics.training import UpdateRatios, update_ratios

__all__ = [
    # statistics
    "Diagnostics",
    "LayerStats",
    "ParamStats",
    "diagnose",
    "layer_outputs",
    # plots and training ratios
    "UpdateRatios",
    "plot_activations",
    "plot_gradients",
    "plot_histograms",
    "plot_update_ratios",
    "update_ratios",
    # propagation, LSUV, the depth experiment
    "PropagationResult",
    "assert_stable",
    "propagation",
    "LsuvReport",
    "lsuv",
    "DepthReport",
    "DepthRow",
    "depth_report",
    "plot_depth",
    # the muP coordinate check
    "CoordCheckReport",
    "coord_check",
    "plot_coord_check",
]
