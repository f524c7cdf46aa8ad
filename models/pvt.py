"""Pyramid Vision Transformer v1 and PVT-ACmix (paper Fig. 4c).

Every block's attention is ``acmix_ms.ACmixGlobal`` (global attention over keys/values reduced by an
R x R / R convolution): ``rate_mode='attention'`` gives the PVT baseline, ``'learnable'`` PVT-ACmix
(no official code: proposal "P2" of the reference notes, reduced k/v nearest-upsampled for the conv path;
the cls token of stage 4 receives only the attention path).

Parameter names follow the official PVT v1 checkpoints: ``patch_embed{1-4}.{proj,norm}``,
``pos_embed{1-4}``, ``block{1-4}.{j}.{norm1,attn.{q,kv,sr,norm,proj},norm2,mlp.fc1,mlp.fc2}``, ``norm``,
``cls_token``, ``head`` (LayerNorm weight/bias appear as gamma/beta). The LayerNorms of the blocks and
the final norm use eps 1e-6; those of the patch embeddings and of the spatial reduction keep torch's
default 1e-5, as in the official code.

Input sizes. Position embeddings are learned for the map sizes given by ``img_size``; other input sizes
use them bilinearly resized to the actual map (the cls token's entry is kept). Patch embeddings drop the
remainder of sizes that are not multiples of the patch (as the official strided convolution does). Each
stage's map must be at least ``sr_ratio`` pixels wide (``min_input_size``: 32 px for the default
configuration); smaller inputs raise a ValueError.
"""
from mindspore import nn, ops, Parameter
from mindspore.common.initializer import initializer, TruncatedNormal

from acmix_ms import ACmixGlobal
from acmix_ms.constants import INIT_STD
from acmix_ms.layout import Permute
from acmix_ms.validation import check_positive_int
from .layers import (DropPath, Mlp, PatchEmbed, StagedBackbone, build_model_with_cfg, check_num_classes,
                     check_out_indices, check_stage_lists, class_options, drop_path_rates, init_transformer_weights,
                     layer_norm, to_2tuple)
from .registry import register_model

NUM_STAGES = 4
TORCH_LN_EPS = 1e-5  # LayerNorms the official code builds without its eps=1e-6 norm_layer


class PVTBlock(nn.Cell):
    """x + DropPath(attn(norm1(x), H, W)), then x + DropPath(mlp(norm2(x))).

    Inputs: (B, P + H*W, C), H, W (P prefix tokens). Outputs: (B, P + H*W, C).
    """

    def __init__(self, dim, num_heads, mlp_ratio, sr_ratio, qkv_bias, drop, attn_drop, drop_path, norm_eps,
                 num_prefix_tokens, acmix_kwargs):
        super().__init__()
        self.norm1 = layer_norm(dim, norm_eps)
        self.attn = ACmixGlobal(dim, num_heads, sr_ratio, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop,
                                num_prefix_tokens=num_prefix_tokens, norm_eps=TORCH_LN_EPS, **acmix_kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = layer_norm(dim, norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def construct(self, x, height, width):
        x = x + self.drop_path(self.attn(self.norm1(x), height, width))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PyramidVisionTransformer(StagedBackbone):
    """PVT v1 with ACmixGlobal attention.

    Args:
        img_size: int or (H, W) the position embeddings are learned for; other sizes are interpolated.
        patch_size: stage-1 patch (stages 2-4 use 2). in_chans, num_classes (0: no head).
        embed_dims, num_heads, mlp_ratios, sr_ratios, depths: per stage (4 values each).
        qkv_bias, drop_rate, attn_drop_rate, drop_path_rate (linearly increasing over blocks), norm_eps.
        kernel_conv, shift_impl, rate_mode, rates, fc_bias: ACmix options (docs/design.md).
        out_indices: None (``construct`` returns logits) or stage indices: ``construct`` returns a tuple of
            NCHW stage outputs (patch tokens only; no final norm).

    Inputs: (B, in_chans, H, W).
    Outputs: logits (B, num_classes); ``forward_features``: normed tokens (B, 1 + (H/32)(W/32), C4) with the
    cls token first (PVT v1 classifies from it).
    """

    def __init__(self, img_size=224, patch_size=4, in_chans=3, num_classes=1000, embed_dims=(64, 128, 320, 512),
                 num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4), sr_ratios=(8, 4, 2, 1), depths=(2, 2, 2, 2),
                 qkv_bias=True, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.1, norm_eps=1e-6,
                 kernel_conv=3, shift_impl="learnable", rate_mode="learnable", rates=(0.5, 0.5), fc_bias=True,
                 out_indices=None):
        super().__init__()
        check_positive_int("patch_size", patch_size)
        check_num_classes(num_classes)
        embed_dims, num_heads, mlp_ratios, sr_ratios, depths = check_stage_lists(
            NUM_STAGES, embed_dims=embed_dims, num_heads=num_heads, mlp_ratios=mlp_ratios, sr_ratios=sr_ratios,
            depths=depths)
        if sr_ratios[-1] != 1:
            raise ValueError(f"sr_ratios[-1] must be 1: stage 4 carries the cls token, got sr_ratios={sr_ratios}")
        self.out_indices = check_out_indices(out_indices, NUM_STAGES)
        self.num_classes = num_classes
        self.num_features = embed_dims[-1]
        self.sr_ratios = sr_ratios
        # stage i sees the input divided by patch_size * 2^i and must keep at least sr_ratio pixels
        self.min_input_size = max(sr * patch_size * 2 ** i for i, sr in enumerate(sr_ratios))
        acmix_kwargs = dict(kernel_conv=kernel_conv, shift_impl=shift_impl, rate_mode=rate_mode, rates=rates,
                            fc_bias=fc_bias)
        height, width = to_2tuple(img_size, "img_size")
        rates_per_block = drop_path_rates(drop_path_rate, sum(depths))
        self.pos_grids = []  # (h, w) each stage's position embedding was learned for
        self.feature_info = []
        stride = 1
        for i in range(NUM_STAGES):
            patch = patch_size if i == 0 else 2
            stride *= patch
            height, width = height // patch, width // patch
            if height < 1 or width < 1:
                raise ValueError(f"img_size={img_size} is too small: stage {i + 1} would have an empty map")
            prefix = 1 if i == NUM_STAGES - 1 else 0
            first = sum(depths[:i])
            setattr(self, f"patch_embed{i + 1}", PatchEmbed(patch, in_chans if i == 0 else embed_dims[i - 1],
                                                            embed_dims[i], TORCH_LN_EPS, pad=False))
            pos = initializer(TruncatedNormal(INIT_STD), (1, prefix + height * width, embed_dims[i]))
            setattr(self, f"pos_embed{i + 1}", Parameter(pos, name=f"pos_embed{i + 1}"))
            setattr(self, f"pos_drop{i + 1}", nn.Dropout(p=drop_rate) if drop_rate > 0 else nn.Identity())
            setattr(self, f"block{i + 1}", nn.CellList([
                PVTBlock(embed_dims[i], num_heads[i], mlp_ratios[i], sr_ratios[i], qkv_bias, drop_rate,
                         attn_drop_rate, rates_per_block[first + j], norm_eps, prefix, acmix_kwargs)
                for j in range(depths[i])]))
            self.pos_grids.append((height, width))
            self.feature_info.append({"stage": i, "module": f"block{i + 1}", "channels": embed_dims[i],
                                      "reduction": stride})
        self.pos_grids = tuple(self.pos_grids)
        self.norm = layer_norm(self.num_features, norm_eps)
        self.to_channels_first = Permute((0, 3, 1, 2))  # (B, H, W, C) -> (B, C, H, W)
        self.cls_token = Parameter(initializer(TruncatedNormal(INIT_STD), (1, 1, self.num_features)), name="cls_token")
        self.head = nn.Dense(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        init_transformer_weights(self)

    def _resized_pos_embed(self, pos_embed, stage, height, width):
        """(1, h*w, C) learned embedding -> (1, H*W, C), bilinear (half-pixel, as torch) when the size differs."""
        grid_h, grid_w = self.pos_grids[stage]
        if grid_h == height and grid_w == width:
            return pos_embed
        channels = pos_embed.shape[-1]
        grid = pos_embed.reshape(1, grid_h, grid_w, channels).transpose(0, 3, 1, 2)
        grid = ops.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)
        return grid.reshape(1, channels, height * width).transpose(0, 2, 1)

    def _stage(self, x, stage, patch_embed, pos_embed, pos_drop, blocks):
        """One stage: (B, C_in, H_in, W_in) -> tokens (B, P + H*W, C) and (H, W)."""
        x = patch_embed(x)
        batch, height, width, channels = x.shape
        sr_ratio = self.sr_ratios[stage]
        if height < sr_ratio or width < sr_ratio:
            raise ValueError(f"PVT stage {stage + 1} map is {height}x{width}, smaller than its sr_ratio "
                             f"{sr_ratio}: inputs must be at least {self.min_input_size} px on each side")
        tokens = x.reshape(batch, height * width, channels)
        if stage == NUM_STAGES - 1:
            cls_token = ops.broadcast_to(self.cls_token, (batch, 1, channels)).astype(tokens.dtype)
            tokens = ops.concat((cls_token, tokens), 1)
            pos = ops.concat((pos_embed[:, :1], self._resized_pos_embed(pos_embed[:, 1:], stage, height, width)), 1)
        else:
            pos = self._resized_pos_embed(pos_embed, stage, height, width)
        tokens = pos_drop(tokens + ops.broadcast_to(pos.astype(tokens.dtype), tokens.shape))  # explicit: see layers.DropPath
        for block in blocks:
            tokens = block(tokens, height, width)
        return tokens, height, width

    def _to_map(self, tokens, height, width):
        """Patch tokens (B, H*W, C) -> (B, C, H, W)."""
        batch, _, channels = tokens.shape
        return self.to_channels_first(tokens.reshape(batch, height, width, channels))

    def _stages(self, x):
        """Token outputs of the four stages, as ((tokens, H, W), ...)."""
        out1 = self._stage(x, 0, self.patch_embed1, self.pos_embed1, self.pos_drop1, self.block1)
        out2 = self._stage(self._to_map(*out1), 1, self.patch_embed2, self.pos_embed2, self.pos_drop2, self.block2)
        out3 = self._stage(self._to_map(*out2), 2, self.patch_embed3, self.pos_embed3, self.pos_drop3, self.block3)
        out4 = self._stage(self._to_map(*out3), 3, self.patch_embed4, self.pos_embed4, self.pos_drop4, self.block4)
        return out1, out2, out3, out4

    def _stage_map(self, output):
        """A stage's (tokens, H, W) -> its NCHW map (stage 4 without its cls token)."""
        tokens, height, width = output
        return self._to_map(tokens[:, tokens.shape[1] - height * width:], height, width)

    def forward_features(self, x):
        """(B, Cin, H, W) -> normed stage-4 tokens (B, 1 + H4*W4, C4), cls token first."""
        tokens, _, _ = self._stages(x)[-1]
        return self.norm(tokens)

    def forward_head(self, x):
        """Tokens (B, L, C) -> the cls token (x[:, 0]) -> head -> (B, num_classes) ((B, C) if no head)."""
        return self.head(x[:, 0])


_TINY = dict(depths=(2, 2, 2, 2))
_SMALL = dict(depths=(3, 4, 6, 3))
_MEDIUM = dict(depths=(3, 4, 18, 3))
_LARGE = dict(depths=(3, 8, 27, 3))


def _pvt(config, num_classes, in_chans, overrides, rate_mode):
    options = class_options(PyramidVisionTransformer, **config, num_classes=num_classes, in_chans=in_chans,
                            rate_mode=rate_mode)
    return build_model_with_cfg(PyramidVisionTransformer, PyramidVisionTransformer.__name__, options, overrides)


@register_model(paper={"params_m": 13, "gmacs": 1.9, "top1": 75.1})
def pvt_tiny(num_classes=1000, in_chans=3, **overrides):
    """PVT-T (v1) baseline: spatial-reduction global attention only."""
    return _pvt(_TINY, num_classes, in_chans, overrides, "attention")


@register_model(paper={"params_m": 25, "gmacs": 3.8, "top1": 79.8})
def pvt_small(num_classes=1000, in_chans=3, **overrides):
    """PVT-S (v1) baseline."""
    return _pvt(_SMALL, num_classes, in_chans, overrides, "attention")


@register_model(paper={"params_m": 13, "gmacs": 2.0, "top1": 78.0})
def pvt_tiny_acmix(num_classes=1000, in_chans=3, **overrides):
    """PVT-ACmix-T (proposal P2: learnable rates, shift-initialised group conv)."""
    return _pvt(_TINY, num_classes, in_chans, overrides, "learnable")


@register_model(paper={"params_m": 25, "gmacs": 3.9, "top1": 81.7})
def pvt_small_acmix(num_classes=1000, in_chans=3, **overrides):
    """PVT-ACmix-S (proposal P2)."""
    return _pvt(_SMALL, num_classes, in_chans, overrides, "learnable")


@register_model(paper={"params_m": 44.2, "gmacs": 6.7, "top1": 81.2})
def pvt_medium(num_classes=1000, in_chans=3, **overrides):
    """PVT-M (v1) baseline."""
    return _pvt(_MEDIUM, num_classes, in_chans, overrides, "attention")


@register_model(paper={"params_m": 61.4, "gmacs": 9.8, "top1": 81.7})
def pvt_large(num_classes=1000, in_chans=3, **overrides):
    """PVT-L (v1) baseline."""
    return _pvt(_LARGE, num_classes, in_chans, overrides, "attention")


@register_model
def pvt_medium_acmix(num_classes=1000, in_chans=3, **overrides):
    """PVT-ACmix-M (proposal P2, placed as in PVT-ACmix-T/S; not in the paper's Table 1)."""
    return _pvt(_MEDIUM, num_classes, in_chans, overrides, "learnable")


@register_model
def pvt_large_acmix(num_classes=1000, in_chans=3, **overrides):
    """PVT-ACmix-L (proposal P2; the backbone of the paper's Table 5 RetinaNet)."""
    return _pvt(_LARGE, num_classes, in_chans, overrides, "learnable")
