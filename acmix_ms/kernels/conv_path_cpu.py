"""The group convolution of ACmix's conv path (``ACmixBase.fused_conv``) with a faster backward on CPU.

Forward: MindSpore's Conv2D (zero 'same' padding, groups = d). Backward: the input gradient as a forward
convolution with the flipped, group-transposed weight (stride 1; MindSpore's Conv2DBackpropInput for larger
strides) and the weight gradient by the C++ kernel ``GroupConvFilterGrad`` (local_attention_cpu.cc), instead of
MindSpore's CPU Conv2DBackpropFilter for group convolutions, the slowest op of an ACmix training step here.
Same results to float32 round-off (tests/test_fast_paths.py). The kernel computes in float32 (other dtypes are
cast at its boundary).
"""
import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops
from mindspore.ops.operations import _grad_ops

from .build import compiled_library

SOURCE = "local_attention_cpu.cc"


class _WeightShape:
    def __init__(self, shape):
        self.shape = list(shape)

    def __call__(self, grad_out, x, config):
        return self.shape


def _filter_grad_dtype(grad_out, x, config):
    return grad_out


class CpuGroupConv(nn.Cell):
    """(x (B, d*G, H, W), weight (C, G, k, k)) -> (B, C, ceil(H/s), ceil(W/s)): ``ops.conv2d(x, weight, None,
    stride, 'pad', k // 2, 1, d)`` with the backward described in the module docstring."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, groups):
        super().__init__()
        library = compiled_library(SOURCE)
        pad = kernel_size // 2
        self.groups, self.stride, self.kernel_size = groups, stride, kernel_size
        self.weight_shape = (out_channels, in_channels // groups, kernel_size, kernel_size)
        self.conv = ops.Conv2D(out_channels, kernel_size, pad_mode="pad", pad=pad, stride=stride, group=groups)
        if stride == 1:
            self.input_grad = ops.Conv2D(in_channels, kernel_size, pad_mode="pad", pad=pad, group=groups)
        else:
            self.input_grad = ops.Conv2DBackpropInput(out_channels, kernel_size, pad_mode="pad", pad=pad,
                                                      pad_list=(pad,) * 4, stride=stride, group=groups)
        self.filter_grad = ops.Custom(f"{library}:GroupConvFilterGrad", out_shape=_WeightShape(self.weight_shape),
                                      out_dtype=_filter_grad_dtype, func_type="aot")
        # the output shape is this layer's weight shape: PyNative caches shape inference per primitive attributes
        self.filter_grad.add_prim_attr("acmix_config", "x".join(map(str, self.weight_shape)))
        self.config = Tensor(np.array([kernel_size, stride, groups], np.int32))

    def construct(self, x, weight):
        return self.conv(x, weight)

    def bprop(self, x, weight, out, dout):
        if self.stride == 1:
            out_channels, per_group, k = self.weight_shape[0], self.weight_shape[1], self.kernel_size
            flipped = weight.reshape(self.groups, out_channels // self.groups, per_group, k, k).transpose(0, 2, 1, 3, 4)
            flipped = ops.reverse(flipped, (3, 4)).reshape(self.groups * per_group, out_channels // self.groups, k, k)
            grad_x = self.input_grad(dout, flipped)
        else:
            grad_x = self.input_grad(dout, weight, x.shape)
        grad_w = self.filter_grad(ops.cast(dout, ms.float32), ops.cast(x, ms.float32), self.config)
        return grad_x, ops.cast(grad_w, weight.dtype)
