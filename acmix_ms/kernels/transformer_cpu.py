"""Fused CPU kernels of the transformer layers (``ops.Custom`` func_type 'aot', source ``transformer_cpu.cc``).

``CpuGelu``: the exact (erf) GELU in one pass, forward and backward; float32 only. Callers pick it through
``models.layers.GELU``, which falls back to ``nn.GELU(approximate=False)`` on other devices, other dtypes,
or when the kernel cannot be built.
"""
from mindspore import nn, ops

from .build import compiled_library

SOURCE = "transformer_cpu.cc"


def _same_shape(*shapes):
    return list(shapes[-1])


def _same_dtype(*dtypes):
    return dtypes[-1]


class CpuGelu(nn.Cell):
    """y = x * Phi(x) (exact GELU, as torch's default) on float32 tensors of any shape; fused bprop."""

    def __init__(self):
        super().__init__()
        library = compiled_library(SOURCE)
        self.forward_kernel = ops.Custom(f"{library}:GeluForward", out_shape=_same_shape, out_dtype=_same_dtype,
                                         func_type="aot")
        self.backward_kernel = ops.Custom(f"{library}:GeluBackward", out_shape=_same_shape,
                                          out_dtype=_same_dtype, func_type="aot")

    def construct(self, x):
        return self.forward_kernel(x)

    def bprop(self, x, out, dout):
        return (self.backward_kernel(dout, x),)
