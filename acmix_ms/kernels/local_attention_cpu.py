"""The sliding-window attention aggregation as two fused C++ kernels for the CPU backend (``ops.Custom``,
func_type 'aot'): one forward (output and attention weights), one backward (all three input gradients).

Memory beyond the inputs: the output and the (BN, k*k, H', W') attention weights kept for the backward pass;
no (BN, d, k*k, H', W') tensor is ever formed. Float32 only (``KernelLocalAttention`` casts other dtypes).
"""
import numpy as np
from mindspore import Tensor, nn, ops

from .build import compiled_library

SOURCE = "local_attention_cpu.cc"


class _ForwardShapes:
    """Output shapes of the forward kernel: out like the query, weights (BN, k*k, H', W')."""

    def __init__(self, offsets):
        self.offsets = offsets

    def __call__(self, query, key_pad, value_pad, config):
        return list(query), [query[0], self.offsets, query[2], query[3]]


def _forward_dtypes(query, key_pad, value_pad, config):
    return query, query


def _backward_shapes(grad_out, weights, query, key_pad, value_pad, config):
    return list(query), list(key_pad), list(value_pad)


def _backward_dtypes(grad_out, weights, query, key_pad, value_pad, config):
    return query, key_pad, value_pad


class CpuLocalAggregation(nn.Cell):
    """(query, key_pad, value_pad) -> (output, attention weights), float32, with the fused backward as bprop.

    Shapes as in ``acmix_ms.local_attention``; the kernels run one head (row of BN) per OpenMP thread.
    """

    def __init__(self, kernel_size, stride, dilation):
        super().__init__()
        library = compiled_library(SOURCE)
        self.forward_kernel = ops.Custom(f"{library}:LocalAttentionForward", out_shape=_ForwardShapes(kernel_size ** 2),
                                         out_dtype=_forward_dtypes, func_type="aot")
        self.backward_kernel = ops.Custom(f"{library}:LocalAttentionBackward", out_shape=_backward_shapes,
                                          out_dtype=_backward_dtypes, func_type="aot")
        self.config = Tensor(np.array([kernel_size, stride, dilation], np.int32))

    def construct(self, query, key_pad, value_pad):
        return self.forward_kernel(query, key_pad, value_pad, self.config)

    def bprop(self, query, key_pad, value_pad, out, dout):
        # dout[1] (gradient w.r.t. the returned weights) is zero: callers use only out[0].
        return self.backward_kernel(dout[0], out[1], query, key_pad, value_pad, self.config)
