"""The sliding-window attention aggregation as fused C++ kernels for the CPU backend (``ops.Custom``,
func_type 'aot'): one forward (output and attention weights), one backward (all input gradients), each in two
interfaces:

- ``CpuLocalAggregation``: (query, key_pad, value_pad) like the pure-MindSpore implementations of
  ``acmix_ms.local_attention``;
- ``CpuQKVAggregation``: straight from ``ACmixLocal``'s projection qkv and positional map (query scaling and
  striding, positional subtraction and reflection padding inside the kernel; see ``ACmixLocal``).

Memory beyond the inputs: the output and the (BN, k*k, H', W') attention weights kept for the backward pass;
no (BN, d, k*k, H', W') tensor is ever formed. The kernels compute in float32: other dtypes (float16 under
AMP O2/O3) are cast to float32 at the kernel boundary, in ``construct`` and in ``bprop``, and the results cast
back, so a mixed-precision network runs (issue 11, item 7) with the kernel's accuracy.
"""
import numpy as np
import mindspore as ms
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


def _f32(tensor):
    return ops.cast(tensor, ms.float32)


class CpuLocalAggregation(nn.Cell):
    """(query, key_pad, value_pad) -> (output, attention weights), with the fused backward as bprop.

    Shapes as in ``acmix_ms.local_attention``; the kernels run one head (row of BN) per worker thread.
    Any float dtype in, the same dtype out (the kernel itself runs in float32); weights are float32.
    """

    def __init__(self, kernel_size, stride, dilation):
        super().__init__()
        library = compiled_library(SOURCE)
        self.forward_kernel = ops.Custom(f"{library}:LocalAttentionForward", out_shape=_ForwardShapes(kernel_size ** 2),
                                         out_dtype=_forward_dtypes, func_type="aot")
        self.forward_kernel.add_prim_attr("acmix_config", f"k{kernel_size}")  # see LocalAttentionQKV: PyNative
        self.backward_kernel = ops.Custom(f"{library}:LocalAttentionBackward", out_shape=_backward_shapes,
                                          out_dtype=_backward_dtypes, func_type="aot")
        self.config = Tensor(np.array([kernel_size, stride, dilation], np.int32))

    def construct(self, query, key_pad, value_pad):
        out, weights = self.forward_kernel(_f32(query), _f32(key_pad), _f32(value_pad), self.config)
        return ops.cast(out, query.dtype), weights

    def bprop(self, query, key_pad, value_pad, out, dout):
        # dout[1] (gradient w.r.t. the returned weights) is zero: callers use only out[0].
        grad_query, grad_key, grad_value = self.backward_kernel(_f32(dout[0]), _f32(out[1]), _f32(query), _f32(key_pad),
                                                                _f32(value_pad), self.config)
        return ops.cast(grad_query, query.dtype), ops.cast(grad_key, key_pad.dtype), ops.cast(grad_value,
                                                                                              value_pad.dtype)


class _QKVForwardShapes:
    """out (B, C, H', W') and the weights kept for the backward, (B*N, k*k, H' * ph_w) (the kernel's extended
    layout: ph_w = ceil((W + 2 * pad) / stride), pad = dilation * (k - 1) / 2), from qkv (B, 3C, H, W)."""

    def __init__(self, kernel_size, stride, dilation, num_heads):
        self.offsets, self.stride, self.num_heads = kernel_size ** 2, stride, num_heads
        self.pad = dilation * (kernel_size - 1) // 2

    def __call__(self, qkv, pe, config):
        h_out, w_out = -(-qkv[2] // self.stride), -(-qkv[3] // self.stride)
        phase_width = -(-(qkv[3] + 2 * self.pad) // self.stride)
        return [qkv[0], qkv[1] // 3, h_out, w_out], [qkv[0] * self.num_heads, self.offsets, h_out * phase_width]


def _qkv_forward_dtypes(qkv, pe, config):
    return qkv, qkv


def _qkv_backward_shapes(grad_out, weights, qkv, pe, config):
    return list(qkv), list(pe)


def _qkv_backward_dtypes(grad_out, weights, qkv, pe, config):
    return qkv, pe


class CpuQKVAggregation(nn.Cell):
    """(qkv (B, 3C, H, W), pe (1, d, H, W)) -> (out (B, C, H', W'), the attention weights kept for the backward,
    (B*N, k*k, H' * ph_w): see ``_QKVForwardShapes``).

    Computes what ``ACmixLocal.attention_path`` computes from its projection: head n's query (group n,
    scaled by d**-0.5, strided), keys (group N + n) minus ``pe``, values (group 2N + n), both reflection-padded
    by dilation * (k - 1) / 2 (``acmix_ms.spatial.reflect_pad``, any map size), softmax attention over the k*k
    window; output channel n*d + j. ``layout``: where group g of channel j sits in qkv: 0: channel g*d + j (the
    official layout), 1: channel j*3N + g (channel-major, what ``ACmixBase.fused_conv`` reads).
    Any float dtype in, the same dtype out (kernel in float32); the bprop returns d qkv and d pe.
    """

    def __init__(self, kernel_size, stride, dilation, num_heads, layout):
        super().__init__()
        if layout not in (0, 1):
            raise ValueError(f"layout must be 0 (group-major) or 1 (channel-major), got {layout!r}")
        library = compiled_library(SOURCE)
        self.forward_kernel = ops.Custom(f"{library}:LocalAttentionQKVForward",
                                         out_shape=_QKVForwardShapes(kernel_size, stride, dilation, num_heads),
                                         out_dtype=_qkv_forward_dtypes, func_type="aot")
        # the output shape depends on the configuration: PyNative caches a Custom op's shape inference per
        # primitive attributes, so name the configuration there (else a second layer reuses the first's shapes)
        self.forward_kernel.add_prim_attr("acmix_config", f"k{kernel_size}_s{stride}_d{dilation}_n{num_heads}")
        self.backward_kernel = ops.Custom(f"{library}:LocalAttentionQKVBackward", out_shape=_qkv_backward_shapes,
                                          out_dtype=_qkv_backward_dtypes, func_type="aot")
        self.config = Tensor(np.array([kernel_size, stride, dilation, num_heads, layout], np.int32))

    def construct(self, qkv, pe):
        out, weights = self.forward_kernel(_f32(qkv), _f32(pe), self.config)
        return ops.cast(out, qkv.dtype), weights

    def bprop(self, qkv, pe, out, dout):
        grad_qkv, grad_pe = self.backward_kernel(_f32(dout[0]), _f32(out[1]), _f32(qkv), _f32(pe), self.config)
        return ops.cast(grad_qkv, qkv.dtype), ops.cast(grad_pe, pe.dtype)
