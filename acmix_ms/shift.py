"""Stage II of the convolution path: shift-and-sum (paper Sec. 4.3, Fig. 3, Table 7).

The light fully connected layer produces, for every channel j of a head (j < d), k*k feature maps,
one per kernel position p = u*k + v. Shift-and-sum moves map p by (u - k//2, v - k//2) and adds the
k*k maps up (Eqs. 5-8). ``ShiftConv`` offers the four implementations of Table 7:

- ``'tensor'``: explicit shifted slices of the zero-padded map, summed (Fig. 3a);
- ``'fixed'``: one group convolution (groups = d) with frozen one-hot shift kernels (Fig. 3c.I);
- ``'learnable'``: the same group convolution, trainable, initialised with the shift kernels (Fig. 3c.II/III);
- ``'random'``: trainable, randomly initialised (Table 7 "w/o init").

Each group writes ``out_channels / d`` channels (multiple kernel groups, Fig. 3c.III); with the shift
kernels every channel of a group is the same shifted sum, so ``'tensor'`` repeats its result to match.
"""
import math

import numpy as np
import mindspore as ms
from mindspore import nn, ops, Parameter, Tensor
from mindspore.common.initializer import initializer, HeUniform

from .spatial import out_size
from .validation import check_choice, check_divisible, check_odd, check_positive_int

SHIFT_IMPLS = ("tensor", "fixed", "learnable", "random")


def shift_kernels(out_channels: int, kernel_size: int) -> np.ndarray:
    """One-hot shift kernels, (out_channels, k*k, k, k): kernel[o, p] picks position p = u*k + v."""
    k2 = kernel_size * kernel_size
    kernels = np.zeros((out_channels, k2, kernel_size, kernel_size), np.float32)
    for p in range(k2):
        kernels[:, p, p // kernel_size, p % kernel_size] = 1.0
    return kernels


class ShiftConv(nn.Cell):
    """Shift-and-sum over k*k maps per channel, as a group convolution or explicit tensor shifts.

    Args:
        head_dim: d, the number of groups (channels per head).
        kernel_size: k (odd).
        out_channels: output width; a multiple of head_dim.
        impl: one of ``SHIFT_IMPLS``.
        stride: output stride (zero 'same' padding, output ceil(H / stride)).

    Inputs: (B, d*k*k, H, W) with channel j*k*k + p.
    Outputs: (B, out_channels, ceil(H/stride), ceil(W/stride)) with channel o = j*(out_channels/d) + m.
    """

    def __init__(self, head_dim: int, kernel_size: int, out_channels: int, impl: str = "learnable", stride: int = 1):
        super().__init__()
        check_positive_int("head_dim", head_dim)
        check_odd("kernel_size", kernel_size)
        check_positive_int("stride", stride)
        self.impl = check_choice("shift_impl", impl, SHIFT_IMPLS)
        self.repeats = check_divisible("out_channels", out_channels, "head_dim", head_dim)
        self.head_dim = head_dim
        self.kernel_size = kernel_size
        self.out_channels = out_channels
        self.stride = stride
        self.pad = kernel_size // 2
        if impl == "tensor":
            # the Pad primitive, not ops.pad: ops.pad's gradient (PadV3Grad) hangs after a few calls on CPU (MS 2.8)
            self.zero_pad = ops.Pad(((0, 0), (0, 0), (self.pad, self.pad), (self.pad, self.pad)))
            return
        k2 = kernel_size * kernel_size
        shape = (out_channels, k2, kernel_size, kernel_size)
        if impl == "random":
            # PyTorch's default conv init (kaiming_uniform, a=sqrt(5)), as the official ablation used.
            init = initializer(HeUniform(negative_slope=math.sqrt(5)), shape, ms.float32)
        else:
            init = Tensor(shift_kernels(out_channels, kernel_size))
        self.weight = Parameter(init, name="weight", requires_grad=impl != "fixed")

    def construct(self, x: Tensor) -> Tensor:
        if x.ndim != 4:
            raise ValueError(f"ShiftConv expects a 4-D (B, d*k*k, H, W) input, got {x.ndim}-D")
        if self.impl == "tensor":
            return self._tensor_shift(x)
        weight = ops.cast(self.weight, x.dtype)
        return ops.conv2d(x, weight, None, self.stride, "pad", self.pad, 1, self.head_dim)

    def _tensor_shift(self, x):
        batch, _, height, width = x.shape
        k2 = self.kernel_size * self.kernel_size
        h_out, w_out = out_size(height, self.stride), out_size(width, self.stride)
        padded = self.zero_pad(x)
        padded = padded.reshape(batch * self.head_dim, k2, height + 2 * self.pad, width + 2 * self.pad)
        total = self._shifted(padded, 0, h_out, w_out)
        for p in range(1, k2):
            total = total + self._shifted(padded, p, h_out, w_out)
        total = total.reshape(batch, self.head_dim, 1, h_out, w_out)
        total = ops.broadcast_to(total, (batch, self.head_dim, self.repeats, h_out, w_out))
        return total.reshape(batch, self.out_channels, h_out, w_out)

    def _shifted(self, padded, p, h_out, w_out):
        """Map p of the zero-padded (B*d, k*k, Hp, Wp) stack, moved to kernel position p: (B*d, h_out, w_out)."""
        top, left = p // self.kernel_size, p % self.kernel_size
        return padded[:, p, top:top + (h_out - 1) * self.stride + 1:self.stride,
                      left:left + (w_out - 1) * self.stride + 1:self.stride]

    def extend_repr(self):
        return (f"head_dim={self.head_dim}, kernel_size={self.kernel_size}, out_channels={self.out_channels}, "
                f"impl={self.impl}, stride={self.stride}")
