"""What every ACmix Cell shares: the convolution path and the mixing of the two paths.

Stage I (the shared projection) and the attention aggregation differ per mode and live in the
subclasses; the convolution path (light fc over the head groups, then shift-and-sum) and the output
``rate1 * F_att + rate2 * F_conv`` (Eq. 13, Table 6 modes) are the same everywhere.
"""
import mindspore as ms
from mindspore import nn, ops, Parameter, Tensor

from .shift import ShiftConv, SHIFT_IMPLS
from .validation import check_choice, check_odd, check_rates

RATE_MODES = ("learnable", "fixed", "attention", "conv")


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

    def __init__(self, num_groups, head_dim, out_channels, kernel_conv=3, stride=1, shift_impl="learnable",
                 rate_mode="learnable", rates=(0.5, 0.5), fc_bias=True):
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
        if rate_mode == "learnable":
            self.rate1 = Parameter(Tensor([rate1], ms.float32), name="rate1")
            self.rate2 = Parameter(Tensor([rate2], ms.float32), name="rate2")
        else:
            self.fixed_rate1, self.fixed_rate2 = rate1, rate2

    def conv_path(self, groups, height, width):
        """Convolution path of ACmix.

        Args:
            groups: (B, G, d, H*W) — the projected features split into G groups of width d.
        Returns:
            (B, out_channels, ceil(H/s), ceil(W/s)).
        """
        batch, _, head_dim, _ = groups.shape
        maps = self.fc(groups)  # (B, k*k, d, HW): one fc per pixel and channel over the G groups
        maps = maps.transpose(0, 2, 1, 3).reshape(batch, head_dim * self.kernel_conv ** 2, height, width)
        return self.dep_conv(maps)

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
