"""ACmix with (shifted) window attention, as in the official Swin-ACmix (Eq. 19).

The Cell takes the un-shifted token map after ``norm1`` and does the whole W-MSA / SW-MSA step itself:
pad to a multiple of the window, cyclic shift, fused qkv, windowed attention with the relative
position bias (and the shifted-window mask), ``proj``, reverse shift, crop. The conv path bypasses
``proj``, as in the official code.

``conv_on_shifted_map=True`` reproduces the official weights' behaviour: the conv path runs on the
cyclically shifted map, so in shifted blocks it wraps around the image border and sees a zero seam
inside the image. ``False`` runs it on the un-shifted map (plain zero padding), the cleaner choice
for training from scratch.
"""
import numpy as np
import mindspore as ms
from mindspore import nn, ops, Parameter, Tensor
from mindspore.common.initializer import initializer, TruncatedNormal

from .base import ACmixBase
from .spatial import cyclic_shift, zero_pad
from .validation import check_divisible, check_positive_int

MASK_VALUE = -100.0  # Swin's additive mask between tokens of different regions


def relative_position_index(window_size):
    """(w*w, w*w) int32 index into the ((2w-1)^2, N) bias table (Swin's relative coordinates)."""
    coords = np.stack(np.meshgrid(np.arange(window_size), np.arange(window_size), indexing="ij"))
    coords = coords.reshape(2, -1)
    rel = coords[:, :, None] - coords[:, None, :] + (window_size - 1)
    return (rel[0] * (2 * window_size - 1) + rel[1]).astype(np.int32)


def window_partition(x, window_size):
    """(B, H, W, C) -> (B * H/w * W/w, w*w, C)."""
    batch, height, width, channels = x.shape
    x = x.reshape(batch, height // window_size, window_size, width // window_size, window_size, channels)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window_size * window_size, channels)


def window_reverse(windows, window_size, batch, height, width):
    """(B * H/w * W/w, w*w, C) -> (B, H, W, C)."""
    channels = windows.shape[-1]
    x = windows.reshape(batch, height // window_size, width // window_size, window_size, window_size, channels)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, height, width, channels)


def shifted_window_mask(height, width, window_size, shift_size, dtype):
    """Additive mask (nW, w*w, w*w) of SW-MSA for an (H, W) map (multiples of the window).

    Built from ops on shapes known at compile time, so any input size works in graph mode.
    """
    rows = ops.arange(height)
    cols = ops.arange(width)
    row_region = (rows >= height - window_size).astype(ms.int32) + (rows >= height - shift_size).astype(ms.int32)
    col_region = (cols >= width - window_size).astype(ms.int32) + (cols >= width - shift_size).astype(ms.int32)
    region = row_region.reshape(1, height, 1, 1) * 3 + col_region.reshape(1, 1, width, 1)
    region = window_partition(region, window_size).squeeze(-1)  # (nW, w*w)
    different = region.expand_dims(2) != region.expand_dims(1)
    return ops.cast(different, dtype) * MASK_VALUE


class ACmixWindow(ACmixBase):
    """ACmix over (shifted) windows: Swin's attention block with the ACmix conv path.

    Args:
        dim: C.
        num_heads: N (d = C / N).
        window_size: w.
        shift_size: cyclic shift of SW-MSA (0 for W-MSA); less than ``window_size``.
        kernel_conv: k_c (odd).
        qkv_bias: bias of the fused qkv projection.
        attn_drop, proj_drop: dropout rates on the attention weights and on the output.
        conv_on_shifted_map: see the module docstring (official behaviour: True).
        fc_bias: official Swin-ACmix: True.
        shift_impl, rate_mode, rates: see ``ACmixBase``.

    Inputs: (B, H, W, C), any H, W (padded bottom/right to multiples of w internally).
    Outputs: (B, H, W, C).
    """

    def __init__(self, dim, num_heads, window_size=7, shift_size=0, kernel_conv=3, qkv_bias=True, attn_drop=0.0,
                 proj_drop=0.0, conv_on_shifted_map=True, fc_bias=True, shift_impl="learnable",
                 rate_mode="learnable", rates=(0.5, 0.5)):
        check_positive_int("dim", dim)
        check_positive_int("num_heads", num_heads)
        head_dim = check_divisible("dim", dim, "num_heads", num_heads)
        super().__init__(3 * num_heads, head_dim, dim, kernel_conv, 1, shift_impl, rate_mode, rates, fc_bias)
        check_positive_int("window_size", window_size)
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size must be in [0, window_size={window_size}), got {shift_size}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.window_size = window_size
        self.shift_size = shift_size
        self.conv_on_shifted_map = conv_on_shifted_map
        self.scale = head_dim ** -0.5
        self.qkv = nn.Dense(dim, 3 * dim, has_bias=qkv_bias)
        if self.has_attention:
            table = initializer(TruncatedNormal(0.02), ((2 * window_size - 1) ** 2, num_heads), ms.float32)
            self.relative_position_bias_table = Parameter(table, name="relative_position_bias_table")
            self.relative_position_index = Tensor(relative_position_index(window_size).reshape(-1))
            self.proj = nn.Dense(dim, dim)
            self.attn_drop = nn.Dropout(p=attn_drop) if attn_drop > 0 else nn.Identity()
        self.proj_drop = nn.Dropout(p=proj_drop) if proj_drop > 0 else nn.Identity()

    def construct(self, x):
        if x.ndim != 4:
            raise ValueError(f"ACmixWindow expects a 4-D (B, H, W, C) input, got {x.ndim}-D")
        batch, height, width, _ = x.shape
        w = self.window_size
        pad_h, pad_w = (w - height % w) % w, (w - width % w) % w
        if pad_h > 0 or pad_w > 0:
            x = zero_pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
        qkv = self.qkv(x)  # (B, Hp, Wp, 3C); pointwise, so shifting before or after is the same
        shifted = cyclic_shift(qkv, -self.shift_size, -self.shift_size) if self.shift_size > 0 else qkv
        if self.rate_mode == "conv":
            out = self._conv(qkv, shifted)
        elif self.rate_mode == "attention":
            out = self._unshift(self._attention(shifted))
        elif self.conv_on_shifted_map:
            out = self._unshift(self.mix(self._attention(shifted), self._conv_map(shifted)))
        else:
            out = self.mix(self._unshift(self._attention(shifted)), self._conv_map(qkv))
        out = self.proj_drop(out)
        if pad_h > 0 or pad_w > 0:
            out = out[:, :height, :width]
        return out

    def _unshift(self, x):
        if self.shift_size > 0:
            return cyclic_shift(x, self.shift_size, self.shift_size)
        return x

    def _conv(self, qkv, shifted):
        """Conv-only output in un-shifted coordinates."""
        if self.conv_on_shifted_map:
            return self._unshift(self._conv_map(shifted))
        return self._conv_map(qkv)

    def _conv_map(self, qkv):
        """(B, H, W, 3C) -> conv path -> (B, H, W, C)."""
        batch, height, width, _ = qkv.shape
        groups = qkv.reshape(batch, height * width, 3 * self.num_heads, self.head_dim).transpose(0, 2, 3, 1)
        return self.conv_path(groups, height, width).transpose(0, 2, 3, 1)

    def _attention(self, qkv):
        """Windowed multi-head attention on the (already shifted) (B, H, W, 3C) map -> (B, H, W, C)."""
        batch, height, width, _ = qkv.shape
        w2 = self.window_size * self.window_size
        windows = window_partition(qkv, self.window_size)  # (B*nW, w*w, 3C)
        windows = windows.reshape(-1, w2, 3, self.num_heads, self.head_dim).transpose(2, 0, 3, 1, 4)
        query, key, value = windows[0] * self.scale, windows[1], windows[2]  # (B*nW, N, w*w, d)
        logits = ops.matmul(query, key.swapaxes(-2, -1))
        bias = ops.gather(self.relative_position_bias_table, self.relative_position_index, 0)
        bias = bias.reshape(w2, w2, self.num_heads).transpose(2, 0, 1)
        logits = logits + ops.cast(bias, logits.dtype).expand_dims(0)
        if self.shift_size > 0:
            mask = shifted_window_mask(height, width, self.window_size, self.shift_size, logits.dtype)
            num_windows = mask.shape[0]
            logits = logits.reshape(-1, num_windows, self.num_heads, w2, w2) + mask.expand_dims(1).expand_dims(0)
            logits = logits.reshape(-1, self.num_heads, w2, w2)
        weights = self.attn_drop(ops.softmax(logits, -1))
        out = ops.matmul(weights, value).transpose(0, 2, 1, 3).reshape(-1, w2, self.dim)
        out = self.proj(out)
        return window_reverse(out, self.window_size, batch, height, width)

    def aggregation_macs(self, height, width):
        """MACs of q.k and A.v at input size H x W (padded to the window)."""
        if not self.has_attention:
            return 0
        w = self.window_size
        tokens = (height + (w - height % w) % w) * (width + (w - width % w) % w)
        return 2 * w * w * self.dim * tokens
