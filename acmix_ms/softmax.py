"""``Softmax``: softmax over the last axis whose forward and gradient run one CPU kernel, for the attention weights of
the window and global modes (Swin, PVT and their ACmix versions).

Why: MindSpore 2.8 computes the softmax gradient on CPU as Mul, ReduceSum, Sub and Mul over the whole
(B, N, L, L') tensor: ~110 ms of a Swin-T training step (batch 8, 224 px, MindSpore profiler), its ReduceSum alone
69 ms; ``acmix_ms.kernels.transformer_cpu.CpuSoftmax`` does forward and backward in one pass per row.
"""
from typing import Optional

import mindspore as ms
from mindspore import nn, ops

from .layout import cpu_transformer_kernel


class Softmax(nn.Cell):
    """``ops.softmax(x, -1)``: on the CPU backend for float32 inputs the kernel ``CpuSoftmax`` (the same values to a
    few float32 ulps: its exp is a polynomial); elsewhere, for other dtypes, when the kernel cannot be built (warning),
    or after ``models.layers.set_fused_kernels(net, False)`` (every export path): ``ops.softmax``.

    Inputs: (..., L). Outputs: same shape, each row summing to one.
    """

    def __init__(self, device_target: Optional[str] = None):
        super().__init__()
        self.kernel = cpu_transformer_kernel("CpuSoftmax", device_target)
        self.use_kernel = self.kernel is not None

    def construct(self, x):
        if self.use_kernel and x.dtype == ms.float32:
            return self.kernel(x)
        return ops.softmax(x, -1)
