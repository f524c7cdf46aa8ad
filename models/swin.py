"""Swin Transformer v1 and Swin-ACmix (paper Fig. 4d, Table 6).

Every block's token mixer is ``acmix_ms.ACmixWindow`` (W-MSA in even blocks, SW-MSA with shift w/2 in odd
blocks): ``rate_mode='attention'`` gives the plain Swin baseline, ``'learnable'`` Swin-ACmix. Conv-Swin-T
(Table 6) replaces the mixer by a dense 3x3 convolution C -> C (``token_mixer='conv'``): 39.0M parameters
(Table 6: 39M) but 6.1 GMACs at 224 px, where Table 6 lists 4.5G (Swin-T's figure).

Parameter names follow the official checkpoints (``patch_embed.proj``, ``layers.{i}.blocks.{j}.attn.qkv``,
``layers.{i}.downsample.reduction``, ``norm``, ``head``; LayerNorm weight/bias appear as gamma/beta).

Input sizes. The window of each stage is fixed at construction from ``img_size``: a stage whose map is
not larger than the window (min(H, W) <= window_size) uses window = min(H, W) and no shift, as the
official Swin does (at 224 this is the 7x7 stage 4). At run time any input size works: the patch
embedding pads the image to a multiple of the patch, patch merging pads odd maps, and ``ACmixWindow``
pads each map to a multiple of its window (bottom/right zero padding, as Swin's detection backbone).

``conv_on_shifted_map`` (default True, the official weights' behaviour): in shifted blocks ACmix's conv
path runs on the cyclically shifted map (see ``acmix_ms.window``); False runs it on the un-shifted map.
"""
from mindspore import nn

from acmix_ms import ACmixWindow
from acmix_ms.layout import Permute
from acmix_ms.validation import check_choice, check_odd, check_positive_int
from .layers import (DropPath, Mlp, PatchEmbed, StagedBackbone, build_model_with_cfg, check_num_classes,
                     check_out_indices, check_stage_lists, class_options, drop_path_rates, init_transformer_weights,
                     layer_norm, pad_bottom_right, to_2tuple)
from .registry import register_model

TOKEN_MIXERS = ("window", "conv")


class PatchMerging(nn.Cell):
    """2x2 patch merging: concatenate each 2x2 neighbourhood (order (0,0), (1,0), (0,1), (1,1) as in the
    official code, so its ``reduction`` weights load), LayerNorm over 4C, Dense 4C -> 2C without bias.

    Inputs: (B, H, W, C); odd H or W are zero-padded. Outputs: (B, ceil(H/2), ceil(W/2), 2C).
    """

    def __init__(self, dim, norm_eps=1e-5):
        super().__init__()
        self.norm = layer_norm(4 * dim, norm_eps)
        self.reduction = nn.Dense(4 * dim, 2 * dim, has_bias=False)
        self.gather_quads = Permute((0, 1, 3, 4, 2, 5))

    def construct(self, x):
        batch, height, width, channels = x.shape
        x = pad_bottom_right(x, height % 2, width % 2, channels_last=True)
        rows, cols = (height + 1) // 2, (width + 1) // 2
        # reshape + transpose instead of x[:, r::2, c::2]: the gradient of step-2 slicing fails on CPU
        x = self.gather_quads(x.reshape(batch, rows, 2, cols, 2, channels))  # (B, h, w, col, row, C)
        return self.reduction(self.norm(x.reshape(batch, rows, cols, 4 * channels)))


class ConvTokenMixer(nn.Cell):
    """Conv-Swin's token mixer (Table 6): one k x k convolution C -> C with bias over the whole map.

    Inputs: (B, H, W, C). Outputs: (B, H, W, C).
    """

    def __init__(self, dim, kernel_size=3, proj_drop=0.0):
        super().__init__()
        check_odd("kernel_conv", kernel_size)
        self.conv = nn.Conv2d(dim, dim, kernel_size, pad_mode="pad", padding=kernel_size // 2, has_bias=True)
        self.proj_drop = nn.Dropout(p=proj_drop) if proj_drop > 0 else nn.Identity()
        self.to_channels_first, self.to_channels_last = Permute((0, 3, 1, 2)), Permute((0, 2, 3, 1))

    def construct(self, x):
        return self.proj_drop(self.to_channels_last(self.conv(self.to_channels_first(x))))


class SwinBlock(nn.Cell):
    """x + DropPath(mixer(norm1(x))), then x + DropPath(mlp(norm2(x))).

    Inputs/outputs: (B, H, W, C).
    """

    def __init__(self, dim, num_heads, window_size, shift_size, mlp_ratio, qkv_bias, drop, attn_drop, drop_path,
                 norm_eps, token_mixer, acmix_kwargs):
        super().__init__()
        self.norm1 = layer_norm(dim, norm_eps)
        if token_mixer == "conv":
            self.attn = ConvTokenMixer(dim, acmix_kwargs["kernel_conv"], proj_drop=drop)
        else:
            self.attn = ACmixWindow(dim, num_heads, window_size, shift_size, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                    proj_drop=drop, **acmix_kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = layer_norm(dim, norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def construct(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class SwinStage(nn.Cell):
    """``depth`` SwinBlocks (shift 0, w/2, 0, ...) and an optional PatchMerging (``downsample``).

    ``resolution`` is the map size expected at construction: if min(resolution) <= window_size, the
    window shrinks to min(resolution) and no block is shifted (official Swin rule).

    ``construct`` runs the blocks only: (B, H, W, C) -> (B, H, W, C). The network applies ``downsample``
    (when ``has_downsample``) after reading the stage output, so the features of every stage are available.
    """

    def __init__(self, dim, depth, num_heads, window_size, resolution, mlp_ratio, qkv_bias, drop, attn_drop,
                 drop_paths, norm_eps, downsample, token_mixer, acmix_kwargs):
        super().__init__()
        if min(resolution) <= window_size:
            window_size, shift = min(resolution), 0
        else:
            shift = window_size // 2
        self.window_size = window_size
        self.blocks = nn.CellList([
            SwinBlock(dim, num_heads, window_size, shift if j % 2 == 1 else 0, mlp_ratio, qkv_bias, drop, attn_drop,
                      drop_paths[j], norm_eps, token_mixer, acmix_kwargs)
            for j in range(depth)])
        self.has_downsample = downsample
        if downsample:
            self.downsample = PatchMerging(dim, norm_eps)

    def construct(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class SwinTransformer(StagedBackbone):
    """Swin Transformer v1 with ACmixWindow (or a 3x3 conv) as the token mixer.

    Args:
        img_size: int or (H, W) the windows are sized for (see the module docstring); other sizes still run.
        patch_size, in_chans, num_classes (0: no head), embed_dim, depths, num_heads, window_size, mlp_ratio,
        qkv_bias, drop_rate, attn_drop_rate, drop_path_rate (linearly increasing over blocks), norm_eps,
        patch_norm: as in the official Swin.
        token_mixer: 'window' (ACmixWindow, whose mode is ``rate_mode``) or 'conv' (Conv-Swin: a
            ``kernel_conv`` x ``kernel_conv`` convolution; the other ACmix options are then unused).
        kernel_conv, shift_impl, rate_mode, rates, fc_bias, conv_on_shifted_map: ACmix options (docs/design.md).
        out_indices: None (``construct`` returns logits) or stage indices: ``construct`` returns a tuple of
            NCHW block outputs of those stages (before patch merging, without the final norm).

    Inputs: (B, in_chans, H, W).
    Outputs: logits (B, num_classes); ``forward_features``: (B, 8C, ceil(H/32), ceil(W/32)) after the final norm.
    """

    def __init__(self, img_size=224, patch_size=4, in_chans=3, num_classes=1000, embed_dim=96, depths=(2, 2, 6, 2),
                 num_heads=(3, 6, 12, 24), window_size=7, mlp_ratio=4.0, qkv_bias=True, drop_rate=0.0,
                 attn_drop_rate=0.0, drop_path_rate=0.2, norm_eps=1e-5, patch_norm=True, token_mixer="window",
                 kernel_conv=3, shift_impl="learnable", rate_mode="learnable", rates=(0.5, 0.5), fc_bias=True,
                 conv_on_shifted_map=True, out_indices=None):
        super().__init__()
        check_choice("token_mixer", token_mixer, TOKEN_MIXERS)
        check_positive_int("embed_dim", embed_dim)
        check_positive_int("window_size", window_size)
        check_num_classes(num_classes)
        if mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {mlp_ratio}")
        depths, num_heads = check_stage_lists(len(depths), depths=depths, num_heads=num_heads)
        num_stages = len(depths)
        self.out_indices = check_out_indices(out_indices, num_stages)
        self.num_classes = num_classes
        self.num_features = embed_dim * 2 ** (num_stages - 1)
        self.min_input_size = 1  # every size runs: patch embedding, merging and windows pad
        acmix_kwargs = dict(kernel_conv=kernel_conv, shift_impl=shift_impl, rate_mode=rate_mode, rates=rates,
                            fc_bias=fc_bias, conv_on_shifted_map=conv_on_shifted_map)
        if token_mixer == "conv":
            acmix_kwargs = dict(kernel_conv=kernel_conv)

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, norm_eps, patch_norm)
        self.pos_drop = nn.Dropout(p=drop_rate) if drop_rate > 0 else nn.Identity()
        height, width = to_2tuple(img_size, "img_size")
        resolution = (-(-height // patch_size), -(-width // patch_size))  # ceil: the input is padded
        rates_per_block = drop_path_rates(drop_path_rate, sum(depths))
        stages = []
        self.feature_info = []
        for i in range(num_stages):
            dim = embed_dim * 2 ** i
            first = sum(depths[:i])
            stages.append(SwinStage(dim, depths[i], num_heads[i], window_size, resolution, mlp_ratio, qkv_bias,
                                    drop_rate, attn_drop_rate, rates_per_block[first:first + depths[i]], norm_eps,
                                    i < num_stages - 1, token_mixer, acmix_kwargs))
            self.feature_info.append({"stage": i, "module": f"layers.{i}", "channels": dim,
                                      "reduction": patch_size * 2 ** i})
            resolution = (-(-resolution[0] // 2), -(-resolution[1] // 2))
        self.layers = nn.CellList(stages)
        self.norm = layer_norm(self.num_features, norm_eps)
        self.to_channels_first = Permute((0, 3, 1, 2))  # (B, H, W, C) -> (B, C, H, W)
        self.head = nn.Dense(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        init_transformer_weights(self)

    def _stages(self, x):
        """The block outputs (B, H_i, W_i, C_i) of every stage (before its patch merging)."""
        x = self.pos_drop(self.patch_embed(x))
        outputs = ()
        for stage in self.layers:
            x = stage(x)
            outputs = outputs + (x,)
            if stage.has_downsample:
                x = stage.downsample(x)
        return outputs

    def _stage_map(self, output):
        return self.to_channels_first(output)

    def forward_features(self, x):
        """(B, Cin, H, W) -> (B, num_features, ceil(H/32), ceil(W/32)), after the final LayerNorm."""
        return self.to_channels_first(self.norm(self._stages(x)[-1]))

    def forward_head(self, x):
        """(B, C, H, W) -> global average pool -> head -> (B, num_classes) (pooled (B, C) if no head)."""
        return self.head(x.mean(axis=(2, 3)))


_TINY = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7, drop_path_rate=0.2)
_SMALL = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7, drop_path_rate=0.3)


def _swin(config, num_classes, in_chans, overrides, **mode):
    options = class_options(SwinTransformer, **config, num_classes=num_classes, in_chans=in_chans, **mode)
    return build_model_with_cfg(SwinTransformer, SwinTransformer.__name__, options, overrides)


@register_model(paper={"params_m": 29, "gmacs": 4.5, "top1": 81.3})
def swin_tiny(num_classes=1000, in_chans=3, **overrides):
    """Swin-T baseline (window attention only)."""
    return _swin(_TINY, num_classes, in_chans, overrides, rate_mode="attention")


@register_model(paper={"params_m": 50, "gmacs": 8.7, "top1": 83.0})
def swin_small(num_classes=1000, in_chans=3, **overrides):
    """Swin-S baseline (window attention only)."""
    return _swin(_SMALL, num_classes, in_chans, overrides, rate_mode="attention")


@register_model(paper={"params_m": 30, "gmacs": 4.6, "top1": 81.9})
def swin_tiny_acmix(num_classes=1000, in_chans=3, **overrides):
    """Swin-ACmix-T: every block mixes window attention and the shift convolution (learnable rates)."""
    return _swin(_TINY, num_classes, in_chans, overrides, rate_mode="learnable")


@register_model(paper={"params_m": 51, "gmacs": 9.0, "top1": 83.5})
def swin_small_acmix(num_classes=1000, in_chans=3, **overrides):
    """Swin-ACmix-S."""
    return _swin(_SMALL, num_classes, in_chans, overrides, rate_mode="learnable")


@register_model(paper={"params_m": 39, "gmacs": 4.5, "top1": 80.5})
def swin_tiny_conv(num_classes=1000, in_chans=3, **overrides):
    """Conv-Swin-T (Table 6): Swin-T with every window attention replaced by a 3x3 convolution."""
    return _swin(_TINY, num_classes, in_chans, overrides, token_mixer="conv")
