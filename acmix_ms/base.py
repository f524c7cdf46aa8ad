"""What every ACmix Cell shares: the convolution path and the mixing of the two paths.

Stage I (the shared projection) and the attention aggregation differ per mode and live in the
subclasses; the convolution path (light fc over the head groups, then shift-and-sum) and the output
``rate1 * F_att + rate2 * F_conv`` (Eq. 13, Table 6 modes) are the same everywhere.
"""
import contextlib
from typing import Sequence

import mindspore as ms
import numpy as np
from mindspore import nn, ops, Parameter, Tensor
from mindspore.ops import constexpr

from .layout import Permute
from .shift import ShiftConv, SHIFT_IMPLS
from .validation import check_choice, check_odd, check_rates

RATE_MODES = ("learnable", "fixed", "attention", "conv")


class GroupConv(nn.Cell):
    """(x (B, d*G, H, W), weight (C, G, k, k)) -> zero-padded 'same' group convolution (groups = d), stride s.

    The portable implementation (every backend, MindSpore's own gradients); ``group_conv`` picks the CPU one.
    """

    def __init__(self, kernel_size, stride, groups):
        super().__init__()
        self.kernel_size, self.stride, self.groups = kernel_size, stride, groups

    def construct(self, x, weight):
        return ops.conv2d(x, weight, None, self.stride, "pad", self.kernel_size // 2, 1, self.groups)


def group_conv(in_channels, out_channels, kernel_size, stride, groups, device_target=None, use_kernel=True):
    """The conv path's group convolution: ``acmix_ms.kernels.conv_path_cpu.CpuGroupConv`` (C++ kernels, same
    results) on CPU where they build, else (GPU, Ascend, no compiler, ``use_kernel=False``) ``GroupConv``."""
    if use_kernel and (device_target or ms.get_context("device_target")) == "CPU":
        try:
            from .kernels.conv_path_cpu import CpuGroupConv  # compiles the C++ at first use
            return CpuGroupConv(in_channels, out_channels, kernel_size, stride, groups)
        except (RuntimeError, OSError):  # KernelBuildError (no compiler) is a RuntimeError
            pass
    return GroupConv(kernel_size, stride, groups)


TOKEN_LAYOUTS = ("tokens", "split")


def token_conv(layout="tokens", device_target=None, use_kernel=True):
    """The conv path on channels-last tokens in one CPU kernel where it builds: ``CpuTokenConv`` (``layout``
    'tokens': q, k, v in one (B, H*W, 3C) tensor) or ``CpuSplitTokenConv`` ('split': full-resolution q and a
    reduced k, v) of ``acmix_ms.kernels.conv_path_cpu``; else None (GPU, Ascend, no compiler,
    ``use_kernel=False``: the layer transposes to channel-major and runs ``conv_path``)."""
    check_choice("layout", layout, TOKEN_LAYOUTS)
    if use_kernel and (device_target or ms.get_context("device_target")) == "CPU":
        try:
            from .kernels import conv_path_cpu  # compiles the C++ at first use
            return conv_path_cpu.CpuTokenConv() if layout == "tokens" else conv_path_cpu.CpuSplitTokenConv()
        except (RuntimeError, OSError):  # KernelBuildError (no compiler) is a RuntimeError
            pass
    return None


@constexpr
def _token_conv_config(*values):
    return Tensor(np.array(values, np.int32))


def set_conv_path_kernels(network: nn.Cell, enabled: bool) -> int:
    """``set_conv_kernel(enabled)`` on every ACmix layer of ``network``; returns how many layers ran a kernel
    before (``enabled=False``: how many were switched to standard operators) or run one after (``True``)."""
    count = 0
    for _, cell in network.cells_and_names():
        if isinstance(cell, ACmixBase):
            before = cell.conv_kernel
            cell.set_conv_kernel(enabled)
            count += int(cell.conv_kernel if enabled else before)
    return count


@contextlib.contextmanager
def reference_paths():
    """Within the block every ACmix layer runs its separate reference steps (projection Cell, 1x1 fc, shift conv)
    instead of the fused fast paths (composed conv weight, projection inside the CPU kernel): the same results,
    and every step is a Cell call, so ``models.profile.count_macs`` (forward hooks, PyNative) sees it."""
    previous = ACmixBase.use_reference_paths
    ACmixBase.use_reference_paths = True
    try:
        yield
    finally:
        ACmixBase.use_reference_paths = previous


class ACmixBase(nn.Cell):
    """Holds ``fc``, ``dep_conv`` and the rates; subclasses call ``conv_path`` and ``mix``.

    Args:
        num_groups: G, the number of width-d feature groups fed to the fc (3N for q, k, v of N heads).
        head_dim: d.
        out_channels: width of the conv-path output.
        kernel_conv: k_c (odd).
        stride: conv-path stride.
        shift_impl: one of ``SHIFT_IMPLS``.
        rate_mode: one of ``RATE_MODES`` (see docs/design.md).
        rates: initial (learnable) or constant (fixed) (rate1, rate2).
        fc_bias: bias of the fc layer.
    """
    use_reference_paths = False  # class-wide switch, set only by ``reference_paths()``
    tokens_layout = None  # subclasses holding q, k, v as tokens set 'tokens' or 'split': see ``conv_path_tokens``

    def __init__(self, num_groups: int, head_dim: int, out_channels: int, kernel_conv: int = 3, stride: int = 1,
                 shift_impl: str = "learnable", rate_mode: str = "learnable", rates: Sequence[float] = (0.5, 0.5),
                 fc_bias: bool = True):
        super().__init__()
        self.rate_mode = check_choice("rate_mode", rate_mode, RATE_MODES)
        check_choice("shift_impl", shift_impl, SHIFT_IMPLS)
        check_odd("kernel_conv", kernel_conv)
        rate1, rate2 = check_rates(rates)
        self.kernel_conv = kernel_conv
        self.shift_impl = shift_impl
        self.has_attention = rate_mode != "conv"
        self.has_conv = rate_mode != "attention"
        if self.has_conv:
            k2 = kernel_conv * kernel_conv
            self.fc = nn.Conv2d(num_groups, k2, 1, has_bias=fc_bias)
            self.dep_conv = ShiftConv(head_dim, kernel_conv, out_channels, shift_impl, stride)
            self.swap_groups = Permute((0, 2, 1, 3))  # (B, G, d, HW) <-> (B, d, G, HW)
            if shift_impl != "tensor":  # the fc and the shift conv run as one group conv (fused_conv)
                self._group_conv_args = (head_dim * num_groups, out_channels, kernel_conv, stride, head_dim)
                self.group_conv = group_conv(*self._group_conv_args)
        # the whole conv path as one kernel on tokens (stride 1, a group-convolution shift)
        self._token_conv_possible = (self.tokens_layout is not None and self.has_conv and shift_impl != "tensor"
                                     and stride == 1)
        self.token_conv = token_conv(self.tokens_layout) if self._token_conv_possible else None
        if rate_mode == "learnable":
            self.rate1 = Parameter(Tensor([rate1], ms.float32), name="rate1")
            self.rate2 = Parameter(Tensor([rate2], ms.float32), name="rate2")
        else:
            self.fixed_rate1, self.fixed_rate2 = rate1, rate2

    @property
    def conv_kernel(self):
        """True when the conv path runs a device kernel (``ops.Custom``): its group convolution or, on tokens,
        the whole path."""
        return self.token_conv is not None or (hasattr(self, "group_conv")
                                               and not isinstance(self.group_conv, GroupConv))

    def set_conv_kernel(self, enabled):
        """Run the conv path's group convolution with the device kernel (where one builds) or with standard
        operators (``enabled=False``, e.g. for a portable MINDIR); same parameters and results. Call it before
        the network's first run: a compiled graph is not rebuilt."""
        if hasattr(self, "group_conv"):  # a conv path with a group-convolution shift
            self.group_conv = group_conv(*self._group_conv_args, use_kernel=enabled)
        if self._token_conv_possible:
            self.token_conv = token_conv(self.tokens_layout, use_kernel=enabled)

    def uses_token_conv(self, dtype):
        """Whether ``conv_path_tokens`` can run on ``dtype`` tokens here (constant at graph compilation)."""
        return self.token_conv is not None and dtype == ms.float32 and not self.use_reference_paths

    def conv_path_tokens(self, tokens, height, width, shift=0, reduced=None, reduced_size=(0, 0)):
        """The conv path on channels-last tokens, in one kernel (only where ``uses_token_conv``).

        Args:
            tokens: (B, H*W, G*d) float32 in map order, channel g*d + j = group g, width j (q, k, v of N heads:
                channel t*C + n*d + j, as the fused qkv projection writes them). With ``reduced`` (layout
                'split'): the first groups only (q, (B, H*W, C)).
            shift: run on the map rolled by (-shift, -shift) and roll the result back (Swin-ACmix's conv on the
                cyclically shifted map); 0: the map itself.
            reduced: layout 'split': the remaining groups (k, v) on a reduced (H_b, W_b) = ``reduced_size`` map,
                (B, H_b*W_b, 2C), read as if nearest-upsampled to H x W.
        Returns:
            (B, H*W, out_channels) in map order; the same values as ``conv_path`` on the channel-major groups.
        """
        k2, num_groups = self.fc.weight.shape[0], self.fc.weight.shape[1]
        fc = self.fc.weight.reshape(k2, num_groups)
        fc_bias = self.fc.bias if self.fc.bias is not None else ops.zeros((k2,), tokens.dtype)
        if self.tokens_layout == "split":
            config = _token_conv_config(height, width, shift, self.kernel_conv, reduced_size[0], reduced_size[1])
            return self.token_conv(tokens, reduced, fc, fc_bias, self.dep_conv.weight, config)
        config = _token_conv_config(height, width, shift, self.kernel_conv)
        return self.token_conv(tokens, fc, fc_bias, self.dep_conv.weight, config)

    def conv_path(self, groups, height, width):
        """Convolution path of ACmix.

        Args:
            groups: (B, G, d, H*W) — the projected features split into G groups of width d.
        Returns:
            (B, out_channels, ceil(H/s), ceil(W/s)).

        With a group-convolution shift (every ``shift_impl`` but ``'tensor'``) the fc and the shift conv are
        applied as ONE group convolution whose weight ``fused_conv_weight`` is composed from both every call:
        the same linear map (see ``fused_conv_weight``), one convolution instead of a 1x1 conv on a
        (d, H*W) "image", a transpose and the shift conv. ``'tensor'`` keeps the explicit two steps.
        """
        batch, num_groups, head_dim, _ = groups.shape
        if self.shift_impl == "tensor" or self.use_reference_paths:
            maps = self.fc(groups)  # (B, k*k, d, HW): one fc per pixel and channel over the G groups
            maps = self.swap_groups(maps).reshape(batch, head_dim * self.kernel_conv ** 2, height, width)
            return self.dep_conv(maps)
        # channel j * G + g holds group g of channel j: group j of the convolution sees its G inputs together
        stacked = self.swap_groups(groups).reshape(batch, head_dim * num_groups, height, width)
        return self.fused_conv(stacked, height, width)

    def fused_conv_weight(self, dtype, scale=None):
        """The fc followed by the shift conv as one group-conv weight (out_channels, G, k, k), groups = d.

        fc: maps[p, j] = sum_g fc[p, g] * group g of channel j (+ bias[p]); shift conv (groups = d): output
        o = j * (out_channels / d) + m sums dep[o, p, u, v] * maps[p, j] over p and the k x k window. So
        output o sums K[o, g, u, v] * (group g of channel j) with K[o, g, u, v] = sum_p dep[o, p, u, v] * fc[p, g].
        ``scale`` (a (1,) tensor of ``dtype`` or a Python float, e.g. rate2) multiplies the weight (and the bias term).
        """
        k2, num_groups = self.fc.weight.shape[0], self.fc.weight.shape[1]
        kernel = self.kernel_conv
        fc = ops.cast(self.fc.weight, dtype).reshape(k2, num_groups)
        dep = ops.cast(self.dep_conv.weight, dtype).reshape(-1, k2, kernel * kernel)  # (C, k*k, k*k)
        if scale is not None:
            fc = fc * scale
        return ops.matmul(fc.transpose(1, 0), dep).reshape(-1, num_groups, kernel, kernel)  # (C, G, k, k)

    def fused_conv(self, stacked, height, width, scale=None):
        """The conv path on channel-major groups: stacked (B, d*G, H, W), channel j*G + g -> (B, C, H', W').

        ``scale``: optional (1,) factor (rate2) folded into the weight instead of multiplying the output.
        """
        dtype = stacked.dtype
        weight = self.fused_conv_weight(dtype, scale)
        pad, stride = self.kernel_conv // 2, self.dep_conv.stride
        out = self.group_conv(stacked, weight)
        if self.fc.bias is None:
            return out
        # the fc bias is a constant map per kernel position; the shift conv's zero padding makes its
        # contribution position dependent at the borders: the shift conv of the constant maps
        k2, kernel = self.fc.weight.shape[0], self.kernel_conv
        bias = ops.cast(self.fc.bias, dtype).reshape(1, k2)
        if scale is not None:
            bias = bias * scale
        dep = ops.cast(self.dep_conv.weight, dtype).reshape(-1, k2, kernel * kernel)
        bias_weight = ops.matmul(bias, dep).reshape(-1, 1, kernel, kernel)  # (C, 1, k, k)
        ones = ops.ones((1, 1, height, width), dtype)
        bias_map = ops.conv2d(ones, bias_weight, None, stride, "pad", pad)  # (1, C, H', W')
        return out + ops.broadcast_to(bias_map, out.shape)

    def combine(self, projected, batch, height, width):
        """Run the paths the rate mode asks for on the Stage-I output and mix them.

        Subclasses that use it define ``attention_path`` and ``conv_path_of`` with the signature
        ``(projected, batch, height, width)``.
        """
        if self.rate_mode == "conv":
            return self.conv_path_of(projected, batch, height, width)
        att = self.attention_path(projected, batch, height, width)
        if self.rate_mode == "attention":
            return att
        return self.mix(att, self.conv_path_of(projected, batch, height, width))

    def mix(self, attention_out, conv_out):
        """rate1 * F_att + rate2 * F_conv (for 'learnable' and 'fixed')."""
        if self.rate_mode == "learnable":
            return (ops.cast(self.rate1, attention_out.dtype) * attention_out
                    + ops.cast(self.rate2, conv_out.dtype) * conv_out)
        return self.fixed_rate1 * attention_out + self.fixed_rate2 * conv_out

    def rate_values(self):
        """(rate1, rate2) as Python floats (None where the path is absent); for analysis tools."""
        if self.rate_mode == "learnable":
            return float(self.rate1.asnumpy()[0]), float(self.rate2.asnumpy()[0])
        if self.rate_mode == "fixed":
            return self.fixed_rate1, self.fixed_rate2
        if self.rate_mode == "attention":
            return 1.0, None
        return None, 1.0
