"""ACmix with global attention and spatial reduction, as in PVT v1 (Eq. 20).

Attention: every token attends to all tokens, keys and values taken from the map reduced by an
R x R / R convolution + LayerNorm (R = ``sr_ratio``). Conv path (no official code; proposal "P2" of
docs/): q is full resolution; the reduced k and v are nearest-upsampled back to H x W, so the conv path
adds only the light fc and the group conv. Prefix tokens (PVT's cls token) receive only
``rate1 * attention``.
"""
from typing import Sequence

from mindspore import Tensor, nn, ops

from .base import ACmixBase
from .layout import Permute
from .linear import Dense
from .softmax import Softmax
from .validation import check_divisible, check_positive_int


class ACmixGlobal(ACmixBase):
    """ACmix over the whole map with spatial-reduction attention (PVT-ACmix).

    Args:
        dim: C. num_heads: N (d = C / N). sr_ratio: R (1 = no reduction).
        num_prefix_tokens: tokens before the H*W patch tokens (PVT's cls token in the last stage).
        qkv_bias, attn_drop, proj_drop, kernel_conv, fc_bias, shift_impl, rate_mode, rates: as ``ACmixWindow``.

    Inputs: x (B, P + H*W, C), H, W. Outputs: (B, P + H*W, C).
    """
    tokens_layout = "split"  # the conv path runs on q and the reduced k, v tokens (one CPU kernel where it builds)

    def __init__(self, dim: int, num_heads: int, sr_ratio: int = 1, kernel_conv: int = 3, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, num_prefix_tokens: int = 0, fc_bias: bool = True,
                 shift_impl: str = "learnable", rate_mode: str = "learnable", rates: Sequence[float] = (0.5, 0.5),
                 norm_eps: float = 1e-6):
        check_positive_int("dim", dim)
        check_positive_int("num_heads", num_heads)
        head_dim = check_divisible("dim", dim, "num_heads", num_heads)
        super().__init__(3 * num_heads, head_dim, dim, kernel_conv, 1, shift_impl, rate_mode, rates, fc_bias)
        check_positive_int("sr_ratio", sr_ratio)
        if num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
        if num_prefix_tokens > 0 and sr_ratio > 1:
            raise ValueError("prefix (cls) tokens cannot be combined with sr_ratio > 1: the reduction "
                             "convolution needs a pure H x W token map (PVT uses sr_ratio=1 where it has a cls token)")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.sr_ratio = sr_ratio
        self.num_prefix_tokens = num_prefix_tokens
        self.scale = head_dim ** -0.5
        self.q = Dense(dim, dim, has_bias=qkv_bias)
        self.kv = Dense(dim, 2 * dim, has_bias=qkv_bias)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio, pad_mode="valid", has_bias=True)
            self.norm = nn.LayerNorm((dim,), epsilon=norm_eps)
        if self.has_attention:
            self.proj = Dense(dim, dim)
            self.attn_drop = nn.Dropout(p=attn_drop) if attn_drop > 0 else nn.Identity()
            self.softmax = Softmax()  # a one-pass CPU kernel (forward and gradient) on CPU
        self.proj_drop = nn.Dropout(p=proj_drop) if proj_drop > 0 else nn.Identity()
        self.matmul_qk = ops.BatchMatMul(transpose_b=True)
        self.swap_tokens = Permute((0, 2, 1))  # (B, L, C) <-> (B, C, L)
        self.swap_heads = Permute((0, 2, 1, 3))  # (B, L, N, d) <-> (B, N, L, d)

    def construct(self, x: Tensor, height: int, width: int) -> Tensor:
        if x.ndim != 3:
            raise ValueError(f"ACmixGlobal expects a 3-D (B, L, C) input, got {x.ndim}-D")
        batch, length, _ = x.shape
        if length != self.num_prefix_tokens + height * width:
            raise ValueError(f"ACmixGlobal got {length} tokens, expected num_prefix_tokens + H*W = "
                             f"{self.num_prefix_tokens} + {height}*{width}")
        query = self.q(x)  # (B, L, C)
        key_value = self.kv(self._reduce(x, batch, height, width))  # (B, L', 2C)
        if self.rate_mode == "conv":
            return self.proj_drop(self._conv(query, key_value, batch, height, width))
        att = self._attention(query, key_value, batch, length)
        if self.rate_mode == "attention":
            return self.proj_drop(att)
        return self.proj_drop(self.mix(att, self._conv(query, key_value, batch, height, width)))

    def _reduce(self, x, batch, height, width):
        """Tokens for keys/values: (B, L', C), L' = (H/R)(W/R) after reduction, else all L tokens."""
        if self.sr_ratio == 1:
            return x
        grid = self.swap_tokens(x).reshape(batch, self.dim, height, width)
        reduced = self.sr(grid)
        return self.norm(self.swap_tokens(reduced.reshape(batch, self.dim, -1)))

    def _attention(self, query, key_value, batch, length):
        key, value = ops.split(key_value, self.dim, -1)  # (B, L', C) each; no slicing of a transposed tensor
        query = self._heads(query) * self.scale  # (B, N, L, d)
        logits = self.matmul_qk(query, self._heads(key))  # (B, N, L, L')
        weights = self.attn_drop(self.softmax(logits))
        out = self.swap_heads(ops.matmul(weights, self._heads(value))).reshape(batch, length, self.dim)
        return self.proj(out)

    def _heads(self, x):
        """(B, L, C) -> (B, N, L, d)."""
        return self.swap_heads(x.reshape(x.shape[0], x.shape[1], self.num_heads, self.head_dim))

    def _conv(self, query, key_value, batch, height, width):
        """Conv path on the H*W patch tokens -> (B, L, C); prefix tokens get zeros."""
        prefix = self.num_prefix_tokens
        if prefix > 0:
            query, key_value = query[:, prefix:], key_value[:, prefix:]
        if self.uses_token_conv(query.dtype):  # one kernel reads q and the reduced k, v: no upsampling, no concat
            reduced_size = (height // self.sr_ratio, width // self.sr_ratio)
            out = self.conv_path_tokens(query, height, width, reduced=key_value, reduced_size=reduced_size)
        else:
            out = self._conv_channel_major(query, key_value, batch, height, width)
        if prefix > 0:
            out = ops.concat((ops.zeros((batch, prefix, self.dim), out.dtype), out), 1)
        return out

    def _conv_channel_major(self, query, key_value, batch, height, width):
        """The conv path through channel-major groups (``conv_path``) -> (B, H*W, C)."""
        # channel-major (B, 3C, H*W) directly: channel t*C + n*d + j = group g (t*N + n), width j
        if self.sr_ratio > 1:
            reduced_h, reduced_w = height // self.sr_ratio, width // self.sr_ratio
            grid = self.swap_tokens(key_value).reshape(batch, 2 * self.dim, reduced_h, reduced_w)
            grid = ops.interpolate(grid, size=(height, width), mode="nearest")
            stacked = ops.concat((self.swap_tokens(query), grid.reshape(batch, 2 * self.dim, height * width)), 1)
        else:
            stacked = self.swap_tokens(ops.concat((query, key_value), -1))
        groups = stacked.reshape(batch, 3 * self.num_heads, self.head_dim, height * width)
        out = self.conv_path(groups, height, width)  # (B, C, H, W)
        return self.swap_tokens(out.reshape(batch, self.dim, height * width))

    def aggregation_macs(self, height, width):
        """MACs of q.k and A.v at an H x W token map."""
        if not self.has_attention:
            return 0
        tokens = self.num_prefix_tokens + height * width
        keys = tokens if self.sr_ratio == 1 else (height // self.sr_ratio) * (width // self.sr_ratio)
        return 2 * tokens * keys * self.dim
