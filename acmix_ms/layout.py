"""Axis permutations of activations: the ``Permute`` Cell, one place that decides how a network transposes.

Why a Cell and a kernel: on CPU (MindSpore 2.8, graph mode) the memory of a ``Transpose`` is never returned to
the graph's pool while the graph runs: a stack of 6 stage-1-sized layers (batch 8, (3136, 288) tokens,
transposed there and back) rises by 821 MiB in inference with ``ops.transpose`` against 128 MiB with the C++
kernel ``acmix_ms.kernels.transformer_cpu.CpuPermute`` (same values, bit for bit, and no slower);
``mint.permute`` (a view) frees its memory too but made Swin-ACmix-T 1.6x slower. Numbers and commands:
docs/benchmarks.md, "Transposes that were never freed".

``Permute`` runs the kernel on the CPU backend for float32 inputs and ``ops.transpose`` elsewhere (GPU, Ascend:
not measured there), for other dtypes, when the kernel cannot be built (warning), and after
``set_permute_kernels(net, False)`` — which every export path calls, so files hold the plain ``Transpose``.
"""
import importlib
import warnings
from typing import Optional, Sequence

import mindspore as ms
from mindspore import nn, ops


def cpu_kernel(module: str, name: str, device_target: Optional[str], *args):
    """``acmix_ms.kernels.<module>.<name>(*args)`` on the CPU backend, None elsewhere or when the C++ cannot be
    built (with a warning)."""
    if (device_target or ms.get_context("device_target")) != "CPU":
        return None
    try:
        kernels = importlib.import_module(f"{__package__}.kernels.{module}")
        return getattr(kernels, name)(*args)  # compiles the C++ at first use
    except (RuntimeError, OSError) as error:  # KernelBuildError is a RuntimeError
        warnings.warn(f"{name}: the CPU kernel is not available ({error}); using MindSpore's ops")
        return None


def cpu_transformer_kernel(name: str, device_target: Optional[str], *args):
    """``cpu_kernel`` of ``acmix_ms.kernels.transformer_cpu``."""
    return cpu_kernel("transformer_cpu", name, device_target, *args)


def check_permutation(dims: Sequence[int]) -> tuple:
    """``dims`` as a tuple of ints, if it is a permutation of 0 .. len(dims) - 1 (else ValueError)."""
    dims = tuple(int(d) for d in dims)
    if sorted(dims) != list(range(len(dims))):
        raise ValueError(f"dims must be a permutation of 0 .. {len(dims) - 1}, got {dims}")
    return dims


class Permute(nn.Cell):
    """x -> ``numpy.transpose(x, dims)`` (``x.ndim == len(dims)``); gradient: the inverse permutation.

    Args:
        dims: the new order of the axes.
        device_target: the device whose kernel to use; None: the context's ``device_target``.
    """

    def __init__(self, dims: Sequence[int], device_target: Optional[str] = None):
        super().__init__()
        self.dims = check_permutation(dims)
        self.kernel = cpu_transformer_kernel("CpuPermute", device_target, self.dims) if len(self.dims) <= 8 else None
        self.use_kernel = self.kernel is not None

    def construct(self, x):
        if self.use_kernel and x.dtype == ms.float32:
            return self.kernel(x)
        return ops.transpose(x, self.dims)

    def extend_repr(self):
        return f"dims={self.dims}, kernel={self.use_kernel}"


def set_permute_kernels(network: nn.Cell, enabled: bool) -> int:
    """Switch the CPU kernel of every ``Permute`` in ``network`` on or off (off: ``ops.transpose``, e.g. for a
    portable MINDIR). Returns the number of layers that run the kernel afterwards (on) or were switched off
    (off); layers without a kernel are not counted."""
    count = 0
    for _, cell in network.cells_and_names():
        if isinstance(cell, Permute) and cell.kernel is not None:
            if cell.use_kernel or enabled:
                count += 1
            cell.use_kernel = bool(enabled)
    return count
