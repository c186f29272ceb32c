"""jaxinit: initializers, gains, normalization and diagnostics for JAX and Flax.

Import as ``import jaxinit as ji``. The core needs only JAX: flax is imported by ``jaxinit.linen``
and ``jaxinit.nnx`` (the Flax modules) and by ``jaxinit.diagnostics.flax_models``, which the
diagnostics load when they are given a Flax model.
"""

# --- gains, fans and initializers ---
from jaxinit._src.fans import compute_fans
from jaxinit._src.gains import calculate_gain, variance_gain
from jaxinit._src.initializers import (
    Initializer,
    constant,
    delta_orthogonal,
    glorot_normal,
    glorot_uniform,
    he_normal,
    he_uniform,
    identity,
    kaiming_normal,
    kaiming_uniform,
    lecun_normal,
    lecun_uniform,
    normal,
    ones,
    orthogonal,
    sparse,
    truncated_normal,
    uniform,
    variance_scaling,
    xavier_normal,
    xavier_uniform,
    zeros,
)

# --- batch norm ---
# isort: split
# --- torch porting ---
from jaxinit._src.batch_norm import (
    BatchNormState,
    batch_norm,
    batch_norm_state,
    update_running_stats,
)

# --- weight and spectral normalization, batch-norm folding ---
from jaxinit._src.folding import fold_batch_norm, fold_batch_norms
from jaxinit._src.moments import Moments, all_reduce_moments, batch_moments, merge_moments

# --- layer, RMS, group and instance norm ---
from jaxinit._src.normalization import group_norm, instance_norm, layer_norm, rms_norm
from jaxinit._src.reparam import (
    SpectralNormState,
    spectral_norm,
    spectral_norm_state,
    weight_norm,
    weight_norm_scale,
)

# --- diagnostics and LSUV ---
from jaxinit.diagnostics import (
    DepthReport,
    DepthRow,
    Diagnostics,
    LayerStats,
    LsuvReport,
    ParamStats,
    PropagationResult,
    UpdateRatios,
    assert_stable,
    depth_report,
    diagnose,
    layer_outputs,
    lsuv,
    plot_activations,
    plot_depth,
    plot_gradients,
    plot_histograms,
    plot_update_ratios,
    propagation,
    update_ratios,
)
from jaxinit.porting import (
    flax_to_torch_state_dict,
    torch_batch_norm_kwargs,
    torch_bias_init,
    torch_fan_in,
    torch_group_norm_kwargs,
    torch_init_params,
    torch_instance_norm_kwargs,
    torch_kernel_init,
    torch_layer_norm_kwargs,
    torch_rms_norm_kwargs,
    torch_state_dict_to_flax,
)

__version__ = "0.1.0"

__all__ = [
    "Initializer",
    "calculate_gain",
    "compute_fans",
    "constant",
    "delta_orthogonal",
    "glorot_normal",
    "glorot_uniform",
    "he_normal",
    "he_uniform",
    "identity",
    "kaiming_normal",
    "kaiming_uniform",
    "lecun_normal",
    "lecun_uniform",
    "normal",
    "ones",
    "orthogonal",
    "sparse",
    "truncated_normal",
    "uniform",
    "variance_gain",
    "variance_scaling",
    "xavier_normal",
    "xavier_uniform",
    "zeros",
    # batch norm
    "BatchNormState",
    "Moments",
    "all_reduce_moments",
    "batch_moments",
    "batch_norm",
    "batch_norm_state",
    "merge_moments",
    "update_running_stats",
    # layer, RMS, group and instance norm
    "group_norm",
    "instance_norm",
    "layer_norm",
    "rms_norm",
    # weight and spectral normalization, batch-norm folding
    "SpectralNormState",
    "fold_batch_norm",
    "fold_batch_norms",
    "spectral_norm",
    "spectral_norm_state",
    "weight_norm",
    "weight_norm_scale",
    # diagnostics and LSUV
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
    # torch porting
    "flax_to_torch_state_dict",
    "torch_batch_norm_kwargs",
    "torch_bias_init",
    "torch_fan_in",
    "torch_group_norm_kwargs",
    "torch_init_params",
    "torch_instance_norm_kwargs",
    "torch_kernel_init",
    "torch_layer_norm_kwargs",
    "torch_rms_norm_kwargs",
    "torch_state_dict_to_flax",
]
