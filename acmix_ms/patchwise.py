"""ACmix with patchwise attention, as in SAN (Zhao et al., 2020; ACmix Eq. 18).

Attention: the weights for a pixel's k_att x k_att neighbourhood are computed from the whole patch,
``w = conv_w([q ; k_nb for all nb])`` (BN-ReLU-1x1-BN-ReLU-1x1, no softmax), and aggregate the
reflection-padded values; value channel c uses weight channel c mod (mid / share_planes).
Conv path (no official code; proposal in docs/): q (rel channels), k (rel) and v (mid) form
2 + mid/rel groups of width d = rel for the fc; the group conv maps them to mid channels.
"""
from typing import Sequence

from mindspore import Tensor, nn, ops

from .base import ACmixBase
from .spatial import check_reflect_pad, neighbourhood_slices
from .validation import check_divisible, check_odd, check_positive_int


class ACmixPatchwise(ACmixBase):
    """SAN's patchwise self-attention module with the ACmix conv path.

    Args:
        in_channels: Cin. rel_channels: width of q and k (SAN: Cin/16). mid_channels: width of v and of
        the output (SAN: Cin/4); a multiple of rel_channels and of share_planes.
        share_planes: value channels that share one attention weight map (SAN: 8).
        kernel_att: k_att (odd). kernel_conv, fc_bias, shift_impl, rate_mode, rates: see ``ACmixBase``.

    Inputs: (B, Cin, H, W). Outputs: (B, mid, H, W) (stride 1: SAN downsamples by pooling).
    """

    def __init__(self, in_channels: int, rel_channels: int, mid_channels: int, share_planes: int = 8,
                 kernel_att: int = 7, kernel_conv: int = 3, fc_bias: bool = True, shift_impl: str = "learnable",
                 rate_mode: str = "learnable", rates: Sequence[float] = (0.5, 0.5)):
        check_positive_int("in_channels", in_channels)
        check_positive_int("rel_channels", rel_channels)
        check_positive_int("share_planes", share_planes)
        value_groups = check_divisible("mid_channels", mid_channels, "rel_channels", rel_channels)
        super().__init__(2 + value_groups, rel_channels, mid_channels, kernel_conv, 1, shift_impl, rate_mode, rates,
                         fc_bias)
        check_odd("kernel_att", kernel_att)
        self.weight_channels = check_divisible("mid_channels", mid_channels, "share_planes", share_planes)
        self.rel_channels = rel_channels
        self.mid_channels = mid_channels
        self.share_planes = share_planes
        self.kernel_att = kernel_att
        self.att_pad = kernel_att // 2
        self.qkv = nn.Conv2d(in_channels, 2 * rel_channels + mid_channels, 1, has_bias=True)
        if self.has_attention:
            k2 = kernel_att * kernel_att
            patch_channels = rel_channels * (k2 + 1)
            self.conv_w = nn.SequentialCell(
                nn.BatchNorm2d(patch_channels), nn.ReLU(),
                nn.Conv2d(patch_channels, self.weight_channels, 1, has_bias=False),
                nn.BatchNorm2d(self.weight_channels), nn.ReLU(),
                nn.Conv2d(self.weight_channels, k2 * self.weight_channels, 1, has_bias=True))

    def construct(self, x: Tensor) -> Tensor:
        if x.ndim != 4:
            raise ValueError(f"ACmixPatchwise expects a 4-D (B, C, H, W) input, got {x.ndim}-D")
        batch, _, height, width = x.shape
        return self.combine(self.qkv(x), batch, height, width)

    def conv_path_of(self, qkv, batch, height, width):
        groups = qkv.reshape(batch, -1, self.rel_channels, height * width)  # q | k | v groups, width rel
        return self.conv_path(groups, height, width)

    def attention_path(self, qkv, batch, height, width):
        check_reflect_pad("height", height, self.att_pad)
        check_reflect_pad("width", width, self.att_pad)
        rel, k2 = self.rel_channels, self.kernel_att * self.kernel_att
        pad = (self.att_pad,) * 4
        query = qkv[:, :rel]
        keys = neighbourhood_slices(ops.pad(qkv[:, rel:2 * rel], pad, mode="reflect"), self.kernel_att, height,
                                    width)
        keys = ops.stack(keys, 2).reshape(batch, rel * k2, height, width)  # channel c*k2 + p, as torch Unfold
        weights = self.conv_w(ops.concat((query, keys), 1))  # (B, k2 * mid/sp, H, W)
        weights = weights.reshape(batch, 1, self.weight_channels, k2, height, width)
        values = neighbourhood_slices(ops.pad(qkv[:, 2 * rel:], pad, mode="reflect"), self.kernel_att, height,
                                      width)
        values = ops.stack(values, 2).reshape(batch, self.share_planes, self.weight_channels, k2, height, width)
        return (weights * values).sum(3).reshape(batch, self.mid_channels, height, width)

    def aggregation_macs(self, height, width):
        """MACs of the weighted sum of values at H x W (conv_w is counted as ordinary convolutions)."""
        if not self.has_attention:
            return 0
        return self.kernel_att ** 2 * self.mid_channels * height * width
