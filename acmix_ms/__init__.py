"""acmix_ms: the ACmix operator library for MindSpore (Pan et al., CVPR 2022).

Cells: ``ShiftConv`` (shift-and-sum, four implementations), ``ACmixLocal`` (sliding window, ResNet),
``ACmixWindow`` (shifted windows, Swin), ``ACmixGlobal`` (spatial-reduction global, PVT),
``ACmixPatchwise`` (patchwise, SAN). Per-stage costs of Table 1: ``acmix_ms.cost``.

The public names load their module (and MindSpore) at first use, so ``acmix_ms.constants`` stays a plain
Python import: the scripts read it before parsing their arguments, and ``--help`` stays fast.
"""
import importlib

# public name -> the module defining it
_EXPORTS = {
    "ShiftConv": "shift", "SHIFT_IMPLS": "shift", "shift_kernels": "shift",
    "ACmixBase": "base", "RATE_MODES": "base", "set_conv_path_kernels": "base",
    "ACmixLocal": "local", "attention_backends": "local", "set_attention_impl": "local",
    "ACmixWindow": "window",
    "ACmixGlobal": "global_attention",
    "ACmixPatchwise": "patchwise",
    "stage_costs": "cost",
    "replace_convs": "dropin", "init_from_conv": "dropin", "ReplacementReport": "dropin",  # docs/dropin.md
}
_SUBMODULES = ("base", "constants", "cost", "dropin", "global_attention", "kernels", "local", "local_attention",
               "patchwise", "shift", "spatial", "validation", "window")

__all__ = ["ShiftConv", "SHIFT_IMPLS", "shift_kernels", "ACmixBase", "RATE_MODES",
           "set_conv_path_kernels", "ACmixLocal", "attention_backends",
           "set_attention_impl", "ACmixWindow",
           "ACmixGlobal", "ACmixPatchwise", "stage_costs"]
__all__ += ["replace_convs", "init_from_conv", "ReplacementReport"]
__version__ = "0.1.0"


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # later look-ups do not come back here
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))
