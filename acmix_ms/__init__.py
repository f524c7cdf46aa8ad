"""acmix_ms: the ACmix operator library for MindSpore (Pan et al., CVPR 2022).

Cells: ``ShiftConv`` (shift-and-sum, four implementations), ``ACmixLocal`` (sliding window, ResNet),
``ACmixWindow`` (shifted windows, Swin), ``ACmixGlobal`` (spatial-reduction global, PVT),
``ACmixPatchwise`` (patchwise, SAN). Per-stage costs of Table 1: ``acmix_ms.cost``.
"""
from .shift import ShiftConv, SHIFT_IMPLS, shift_kernels
from .base import ACmixBase, RATE_MODES, set_conv_path_kernels
from .local import ACmixLocal, attention_backends, set_attention_impl
from .window import ACmixWindow
from .global_attention import ACmixGlobal
from .patchwise import ACmixPatchwise
from .cost import stage_costs
from .dropin import replace_convs, init_from_conv, ReplacementReport  # drop-in use in any network: docs/dropin.md

__all__ = ["ShiftConv", "SHIFT_IMPLS", "shift_kernels", "ACmixBase", "RATE_MODES",
           "set_conv_path_kernels", "ACmixLocal", "attention_backends",
           "set_attention_impl", "ACmixWindow",
           "ACmixGlobal", "ACmixPatchwise", "stage_costs"]
__all__ += ["replace_convs", "init_from_conv", "ReplacementReport"]
__version__ = "0.1.0"
