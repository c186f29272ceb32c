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

# --- fans for einsum kernels, depth-aware residual scaling ---
# isort: split
from jaxinit._src.einsum import dense_general_kernel_init, einsum_axes
from jaxinit._src.residual import (
    DeepNetScales,
    deepnet_scales,
    fixup_scale,
    gpt2_residual_scale,
    scaled,
    small_init,
    wang_init,
)

# --- muP ---
# isort: split
from jaxinit._src.mup import MupInfo, mup_infos, mup_init, mup_lr_scale

# --- normalization: batch, layer, RMS, group, instance; weight and spectral norm; folding ---
# isort: split
from jaxinit._src.batch_norm import (
    BatchNormState,
    batch_norm,
    batch_norm_state,
    update_running_stats,
)
from jaxinit._src.folding import fold_batch_norm, fold_batch_norms
from jaxinit._src.moments import Moments, all_reduce_moments, batch_moments, merge_moments
from jaxinit._src.normalization import group_norm, instance_norm, layer_norm, rms_norm
from jaxinit._src.reparam import (
    SpectralNormState,
    spectral_norm,
    spectral_norm_state,
    weight_norm,
    weight_norm_scale,
)

# --- diagnostics, LSUV, the depth experiment and the coordinate check ---
# isort: split
from jaxinit.diagnostics import (
    CoordCheckReport,
    DepthReport,
    DepthRow,
    Diagnostics,
    LayerStats,
    LsuvReport,
    ParamStats,
    PropagationResult,
    UpdateRatios,
    assert_stable,
    coord_check,
    depth_report,
    diagnose,
    layer_outputs,
    lsuv,
    plot_activations,
    plot_coord_check,
    plot_depth,
    plot_gradients,
    plot_histograms,
    plot_update_ratios,
    propagation,
    update_ratios,
)

# --- torch porting ---
# isort: split
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
    # fans for einsum kernels, depth-aware residual scaling
    "DeepNetScales",
    "deepnet_scales",
    "dense_general_kernel_init",
    "einsum_axes",
    "fixup_scale",
    "gpt2_residual_scale",
    "scaled",
    "small_init",
    "wang_init",
    # muP and the coordinate check
    "CoordCheckReport",
    "MupInfo",
    "coord_check",
    "mup_infos",
    "mup_init",
    "mup_lr_scale",
    "plot_coord_check",
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
