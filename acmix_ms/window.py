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
from typing import Sequence

import numpy as np
import mindspore as ms
from mindspore import nn, ops, Parameter, Tensor
from mindspore.ops import constexpr
from mindspore.common.initializer import initializer, TruncatedNormal

from .base import ACmixBase
from .constants import INIT_STD
from .layout import Permute
from .linear import Dense
from .softmax import Softmax
from .spatial import zero_pad
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


def window_token_order(height, width, window_size, shift_size):
    """Token order of SW-MSA as one permutation (NumPy int32, length H*W; H, W multiples of the window).

    ``order[p]`` is the row-major map index (i * W + j) of the token at position p of
    ``window_partition(cyclic_shift(map, -shift, -shift))`` flattened: windows row-major, then the
    w*w tokens of each window row-major. Gathering the tokens with it does the shift and the partition
    in one copy; gathering the result with ``inverse_order(order)`` undoes both.
    """
    rows = np.arange(height).reshape(height // window_size, 1, window_size, 1)
    cols = np.arange(width).reshape(1, width // window_size, 1, window_size)
    rows = (rows + shift_size) % height
    cols = (cols + shift_size) % width
    return (rows * width + cols).reshape(-1).astype(np.int32)


def shift_token_order(height, width, shift_size):
    """Row-major map index of each token of ``cyclic_shift(map, -shift, -shift)`` (NumPy int32, H*W)."""
    rows = (np.arange(height) + shift_size) % height
    cols = (np.arange(width) + shift_size) % width
    return (rows[:, None] * width + cols[None, :]).reshape(-1).astype(np.int32)


def inverse_order(order):
    """The permutation that undoes ``order``."""
    inverse = np.empty_like(order)
    inverse[order] = np.arange(order.size, dtype=order.dtype)
    return inverse


def shifted_window_mask(height, width, window_size, shift_size):
    """Additive mask (nW, w*w, w*w) of SW-MSA for an (H, W) map (multiples of the window), NumPy float32.

    Tokens of the shifted map belong to 3 x 3 regions (Swin's slices (0, -w), (-w, -s), (-s, None) per axis);
    pairs from different regions get ``MASK_VALUE``.
    """
    rows, cols = np.arange(height), np.arange(width)
    row_region = (rows >= height - window_size).astype(np.int32) + (rows >= height - shift_size)
    col_region = (cols >= width - window_size).astype(np.int32) + (cols >= width - shift_size)
    region = (row_region[:, None] * 3 + col_region[None, :])
    region = region.reshape(height // window_size, window_size, width // window_size, window_size)
    region = region.transpose(0, 2, 1, 3).reshape(-1, window_size * window_size)
    return ((region[:, :, None] != region[:, None, :]) * MASK_VALUE).astype(np.float32)


@constexpr
def _layout(height, width, window_size, shift_size):
    """Compile-time constants for an (H, W) map: (window order, its inverse, shifted-map order, its inverse,
    mask or None). The orders are None where they are the identity."""
    order = window_token_order(height, width, window_size, shift_size)
    shift = shift_token_order(height, width, shift_size)

    def pair(perm):
        if np.array_equal(perm, np.arange(perm.size)):
            return None, None
        return Tensor(perm), Tensor(inverse_order(perm))

    mask = Tensor(shifted_window_mask(height, width, window_size, shift_size)) if shift_size > 0 else None
    return pair(order) + pair(shift) + (mask,)


class TokenPermutation(nn.Cell):
    """Reorder the tokens of a (B, L, C) tensor: ``out[:, p] = x[:, order[p]]``.

    The gradient is the gather with the inverse permutation (exact, and cheaper than Gather's
    scatter-add gradient). Inputs: x (B, L, C), order (L,) int32, inverse (L,) int32. Outputs: (B, L, C).
    """

    def __init__(self):
        super().__init__()
        # one Gather primitive for both passes: the functional ops.gather inside a bprop failed to compile
        # ("func graph is empty") next to another custom-bprop Cell (Dense's bias gradient) in MindSpore 2.8
        self.gather = ops.Gather()

    def construct(self, x, order, inverse):
        return self.gather(x, order, 1)

    def bprop(self, x, order, inverse, out, dout):
        return self.gather(dout, inverse, 1), ops.zeros_like(order), ops.zeros_like(inverse)


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
    tokens_layout = "tokens"  # the conv path runs on the projected tokens (one CPU kernel where it builds)

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, shift_size: int = 0, kernel_conv: int = 3,
                 qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 conv_on_shifted_map: bool = True, fc_bias: bool = True, shift_impl: str = "learnable",
                 rate_mode: str = "learnable", rates: Sequence[float] = (0.5, 0.5)):
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
        self.qkv = Dense(dim, 3 * dim, has_bias=qkv_bias)
        if self.has_attention:
            table = initializer(TruncatedNormal(INIT_STD), ((2 * window_size - 1) ** 2, num_heads), ms.float32)
            self.relative_position_bias_table = Parameter(table, name="relative_position_bias_table")
            self.relative_position_index = Tensor(relative_position_index(window_size).reshape(-1))
            self.proj = Dense(dim, dim)
            self.attn_drop = nn.Dropout(p=attn_drop) if attn_drop > 0 else nn.Identity()
            self.softmax = Softmax()  # a one-pass CPU kernel (forward and gradient) on CPU
        self.proj_drop = nn.Dropout(p=proj_drop) if proj_drop > 0 else nn.Identity()
        self.token_gather = TokenPermutation()  # cyclic shift + window partition as one gather
        self.swap_tokens = Permute((0, 2, 1))  # (B, L, C) <-> (B, C, L)
        self.swap_heads = Permute((0, 2, 1, 3))  # (B*nW, w*w, N, d) <-> (B*nW, N, w*w, d)
        self.matmul_qk = ops.BatchMatMul(transpose_b=True)

    def construct(self, x: Tensor) -> Tensor:
        if x.ndim != 4:
            raise ValueError(f"ACmixWindow expects a 4-D (B, H, W, C) input, got {x.ndim}-D")
        batch, height, width, _ = x.shape
        w = self.window_size
        pad_h, pad_w = (w - height % w) % w, (w - width % w) % w
        if pad_h > 0 or pad_w > 0:
            x = zero_pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
        padded_h, padded_w = height + pad_h, width + pad_w
        # (B, Hp*Wp, 3C) in map order; pointwise, so shifting before or after the projection is the same
        tokens = self.qkv(x).reshape(batch, padded_h * padded_w, 3 * self.dim)
        order, order_inv, shift, shift_inv, mask = _layout(padded_h, padded_w, w, self.shift_size)
        # The cyclic shift and the window partition are one token permutation (a gather), and so is their
        # inverse; every path returns (B, Hp*Wp, C) in map order, so mixing commutes with un-shifting.
        if self.rate_mode == "conv":
            out = self._conv(tokens, shift, shift_inv, batch, padded_h, padded_w)
        elif self.rate_mode == "attention":
            out = self._attention(tokens, order, order_inv, mask, batch)
        else:
            out = self.mix(self._attention(tokens, order, order_inv, mask, batch),
                           self._conv(tokens, shift, shift_inv, batch, padded_h, padded_w))
        out = self.proj_drop(out.reshape(batch, padded_h, padded_w, self.dim))
        if pad_h > 0 or pad_w > 0:
            out = out[:, :height, :width]
        return out

    def _conv(self, tokens, shift, shift_inv, batch, height, width):
        """Conv path -> (B, H*W, C) in map order; on the cyclically shifted map if ``conv_on_shifted_map``."""
        if self.uses_token_conv(tokens.dtype):  # one kernel on the tokens: no transposes, the shift as indices
            return self.conv_path_tokens(tokens, height, width, self.shift_size if self.conv_on_shifted_map else 0)
        if self.conv_on_shifted_map and shift is not None:
            shifted = self.token_gather(tokens, shift, shift_inv)
            return self.token_gather(self._conv_map(shifted, batch, height, width), shift_inv, shift)
        return self._conv_map(tokens, batch, height, width)

    def _conv_map(self, tokens, batch, height, width):
        """(B, H*W, 3C) -> conv path -> (B, H*W, C)."""
        groups = self.swap_tokens(tokens).reshape(batch, 3 * self.num_heads, self.head_dim, height * width)
        out = self.conv_path(groups, height, width)  # (B, C, H, W)
        return self.swap_tokens(out.reshape(batch, self.dim, height * width))

    def _attention(self, tokens, order, order_inv, mask, batch):
        """Windowed multi-head attention of (B, H*W, 3C) map-order tokens -> (B, H*W, C) in map order.

        ``order`` gathers the tokens into (shifted-)window order (None: already in it), ``mask`` is the
        (nW, w*w, w*w) SW-MSA mask or None.
        """
        w2 = self.window_size * self.window_size
        length = tokens.shape[1]
        if order is not None:
            tokens = self.token_gather(tokens, order, order_inv)
        query, key, value = ops.split(tokens.reshape(-1, w2, 3 * self.dim), self.dim, -1)  # (B*nW, w*w, C) each
        query = self._heads(query) * self.scale  # (B*nW, N, w*w, d)
        logits = self.matmul_qk(query, self._heads(key))
        bias = ops.gather(self.relative_position_bias_table, self.relative_position_index, 0)
        bias = ops.cast(bias.reshape(w2, w2, self.num_heads).transpose(2, 0, 1), logits.dtype)  # (N, w*w, w*w)
        # explicit broadcasts: an implicitly broadcasting Add keeps ~4x its output alive on CPU (docs/benchmarks.md)
        if mask is not None:
            num_windows = mask.shape[0]
            bias = bias.expand_dims(0) + ops.cast(mask, logits.dtype).expand_dims(1)  # (nW, N, w*w, w*w)
            logits = logits.reshape(-1, num_windows, self.num_heads, w2, w2)
            logits = (logits + ops.broadcast_to(bias, logits.shape)).reshape(-1, self.num_heads, w2, w2)
        else:
            logits = logits + ops.broadcast_to(bias, logits.shape)
        weights = self.attn_drop(self.softmax(logits))
        out = self.swap_heads(ops.matmul(weights, self._heads(value))).reshape(batch, length, self.dim)
        out = self.proj(out)
        if order is not None:
            out = self.token_gather(out, order_inv, order)
        return out

    def _heads(self, x):
        """(B*nW, w*w, C) -> (B*nW, N, w*w, d)."""
        return self.swap_heads(x.reshape(x.shape[0], x.shape[1], self.num_heads, self.head_dim))

    def aggregation_macs(self, height, width):
        """MACs of q.k and A.v at input size H x W (padded to the window)."""
        if not self.has_attention:
            return 0
        w = self.window_size
        tokens = (height + (w - height % w) % w) * (width + (w - width % w) % w)
        return 2 * w * w * self.dim * tokens
