"""Porting PyTorch models to Flax: default init, normalization conventions and state dicts.

torch and Flax disagree in four places that silently change a ported model:

* **Default init.** torch draws Linear/Conv weights and biases from U(+-1/sqrt(fan_in)) with the
  weight's fan-in; Flax uses ``lecun_normal`` and zero biases.
* **Batch norm.** torch's ``momentum=0.1`` weighs the new batch (Flax's momentum is the decay,
  ``1 - m``), and torch's running variance is the unbiased one.
* **Other norms.** torch's LayerNorm, GroupNorm and InstanceNorm default to ``eps=1e-5`` (Flax:
  1e-6), GroupNorm and InstanceNorm take channels at axis 1, and ``RMSNorm(eps=None)`` adds a
  machine epsilon.
* **Layouts.** torch weights are ``(out, in)`` and ``(out, in/groups, *k)``; Flax kernels are
  ``(in, out)`` and ``(*k, in/groups, out)``.

Everything here needs only numpy and JAX, neither flax nor torch: pass a state dict as
``{k: v.numpy() for k, v in model.state_dict().items()}``.
"""

from jaxinit._src.torch_batch_norm import torch_batch_norm_kwargs
from jaxinit._src.torch_init import (
    torch_bias_init,
    torch_fan_in,
    torch_init_params,
    torch_kernel_init,
)
from jaxinit._src.torch_layers import (
    batch_norm_from_torch,
    batch_norm_to_torch,
    conv_from_torch,
    conv_to_torch,
    linear_from_torch,
    linear_to_torch,
)
from jaxinit._src.torch_norm import (
    torch_group_norm_kwargs,
    torch_instance_norm_kwargs,
    torch_layer_norm_kwargs,
    torch_rms_norm_kwargs,
)
from jaxinit._src.torch_state_dict import flax_to_torch_state_dict, torch_state_dict_to_flax

__all__ = [
    "batch_norm_from_torch",
    "batch_norm_to_torch",
    "conv_from_torch",
    "conv_to_torch",
    "flax_to_torch_state_dict",
    "linear_from_torch",
    "linear_to_torch",
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
