"""The group convolution of ACmix's conv path (``ACmixBase.fused_conv``) as C++ kernels on CPU.

MindSpore's CPU Conv2D, Conv2DBackpropInput and Conv2DBackpropFilter for this group convolution (groups = d,
3N inputs and N outputs per group) were the slowest ops of an ACmix training step here (2026-12-02 profile of
resnet_tiny_acmix: 166 of the 305 ms an ACmix step adds to its baseline's, batch 128, 28 px). The forward
(``GroupConvForward``), the input gradient (``GroupConvInputGrad``) and the weight gradient
(``GroupConvFilterGrad``) are the kernels of local_attention_cpu.cc: same results as ``ops.conv2d`` and its
gradients to float32 round-off (tests/test_fast_paths.py). They compute in float32 (other dtypes are cast at
the boundary).
"""
import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from .build import compiled_library

SOURCE = "local_attention_cpu.cc"


class _WeightShape:
    def __init__(self, shape):
        self.shape = list(shape)

    def __call__(self, grad_out, x, config):
        return self.shape


def _filter_grad_dtype(grad_out, x, config):
    return grad_out


class _OutputShape:
    def __init__(self, out_channels, stride):
        self.out_channels, self.stride = out_channels, stride

    def __call__(self, x, weight, config):
        return [x[0], self.out_channels, -(-x[2] // self.stride), -(-x[3] // self.stride)]


def _first_dtype(first, *others):
    return first


def _input_grad_shape(grad_out, weight, x, config):
    return list(x)


class CpuGroupConv(nn.Cell):
    """(x (B, d*G, H, W), weight (C, G, k, k)) -> (B, C, ceil(H/s), ceil(W/s)): ``ops.conv2d(x, weight, None,
    stride, 'pad', k // 2, 1, d)`` computed by the kernels described in the module docstring."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, groups):
        super().__init__()
        library = compiled_library(SOURCE)
        self.groups, self.stride, self.kernel_size = groups, stride, kernel_size
        self.weight_shape = (out_channels, in_channels // groups, kernel_size, kernel_size)
        self.forward_kernel = ops.Custom(f"{library}:GroupConvForward", out_shape=_OutputShape(out_channels, stride),
                                         out_dtype=_first_dtype, func_type="aot")
        self.input_grad = ops.Custom(f"{library}:GroupConvInputGrad", out_shape=_input_grad_shape,
                                     out_dtype=_first_dtype, func_type="aot")
        self.filter_grad = ops.Custom(f"{library}:GroupConvFilterGrad", out_shape=_WeightShape(self.weight_shape),
                                      out_dtype=_filter_grad_dtype, func_type="aot")
        # the output shape is this layer's weight shape: PyNative caches shape inference per primitive attributes
        config = "x".join(map(str, self.weight_shape + (stride, groups)))
        for kernel in (self.forward_kernel, self.input_grad, self.filter_grad):
            kernel.add_prim_attr("acmix_config", config)
        self.config = Tensor(np.array([kernel_size, stride, groups], np.int32))

    def construct(self, x, weight):
        dtype = x.dtype
        out = self.forward_kernel(ops.cast(x, ms.float32), ops.cast(weight, ms.float32), self.config)
        return ops.cast(out, dtype)

    def bprop(self, x, weight, out, dout):
        dout32, x32 = ops.cast(dout, ms.float32), ops.cast(x, ms.float32)
        grad_x = self.input_grad(dout32, ops.cast(weight, ms.float32), x32, self.config)
        grad_w = self.filter_grad(dout32, x32, self.config)
        return ops.cast(grad_x, x.dtype), ops.cast(grad_w, weight.dtype)


TOKEN_SOURCE = "token_conv_cpu.cc"


def _token_conv_shape(*inputs):  # (tokens.., fc, fc_bias, dep, config) -> (B, H*W, C)
    return [inputs[0][0], inputs[0][1], inputs[-2][0]]


def _token_conv_grad_shapes(*inputs):  # (dout, tokens.., fc, fc_bias, dep, config) -> like tokens.., fc, ..., dep
    return tuple(list(shape) for shape in inputs[1:-1])


def _token_conv_grad_dtypes(*inputs):
    return tuple(inputs[1:-1])


class _TokenConvKernels(nn.Cell):
    """The forward and backward ``ops.Custom`` of one token conv-path kernel pair of token_conv_cpu.cc."""

    def __init__(self, name):
        super().__init__()
        library = compiled_library(TOKEN_SOURCE)
        self.forward_kernel = ops.Custom(f"{library}:{name}Forward", out_shape=_token_conv_shape,
                                         out_dtype=_first_dtype, func_type="aot")
        self.backward_kernel = ops.Custom(f"{library}:{name}Backward", out_shape=_token_conv_grad_shapes,
                                          out_dtype=_token_conv_grad_dtypes, func_type="aot")


class CpuTokenConv(_TokenConvKernels):
    """The whole conv path on channels-last tokens, optionally on the cyclically shifted map (Swin-ACmix):

    (tokens (B, H*W, G*d) in map order, fc (K2, G), fc_bias (K2,), dep (C, K2, k, k), config int32 (4,) =
    (H, W, shift, k)) -> (B, H*W, C) in map order: the official fc (G -> K2 maps, with bias), permute and
    dep_conv (groups = d, zero padding k // 2) on the map rolled by (-shift, -shift), rolled back. Kernels
    ``TokenConvForward`` / ``TokenConvBackward`` of token_conv_cpu.cc (float32; the backward returns the
    gradients of tokens, fc, fc_bias and dep).
    """

    def __init__(self):
        super().__init__("TokenConv")

    def construct(self, tokens, fc, fc_bias, dep, config):
        return self.forward_kernel(tokens, fc, fc_bias, dep, config)

    def bprop(self, tokens, fc, fc_bias, dep, config, out, dout):
        grads = self.backward_kernel(dout, tokens, fc, fc_bias, dep, config)
        return grads[0], grads[1], grads[2], grads[3], ops.zeros_like(config)


class CpuSplitTokenConv(_TokenConvKernels):
    """``CpuTokenConv`` with the groups in two inputs: (tokens_a (B, H*W, Ga*d), tokens_b (B, H_b*W_b, Gb*d), fc,
    fc_bias, dep, config int32 (6,) = (H, W, shift, k, H_b, W_b)) -> (B, H*W, C); pixel (y, x) reads b's token at
    (floor(y * H_b / H), floor(x * W_b / W)) (nearest upsampling), i.e. the conv path of
    ``concat(tokens_a, upsample(tokens_b))`` without building it (PVT-ACmix: q and the reduced k, v).
    Kernels ``TokenConvSplitForward`` / ``TokenConvSplitBackward`` of token_conv_cpu.cc."""

    def __init__(self):
        super().__init__("TokenConvSplit")

    def construct(self, tokens_a, tokens_b, fc, fc_bias, dep, config):
        return self.forward_kernel(tokens_a, tokens_b, fc, fc_bias, dep, config)

    def bprop(self, tokens_a, tokens_b, fc, fc_bias, dep, config, out, dout):
        grads = self.backward_kernel(dout, tokens_a, tokens_b, fc, fc_bias, dep, config)
        return grads[0], grads[1], grads[2], grads[3], grads[4], ops.zeros_like(config)
