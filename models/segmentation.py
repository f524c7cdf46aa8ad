"""Semantic segmentation on any registered backbone: Semantic FPN and UperNet (paper Table 2).

A segmentor is a backbone built with ``out_indices`` (``backbone.*`` parameters), a decode head
(``decode_head.*``) and, for UperNet, an optional auxiliary FCN head (``auxiliary_head.*``), named as in
mmsegmentation, which the paper's ADE20K recipes (PVT, Swin) use.

- **Semantic FPN** (Kirillov et al., Panoptic FPN's semantic branch; mmseg ``FPN`` + ``FPNHead``): an FPN
  neck (1x1 laterals with bias, nearest top-down additions, 3x3 output convs, 256 channels) on the four
  stages; each level goes through max(1, log2(stride / 4)) blocks of conv3x3-norm-ReLU (128 channels), each
  followed by a 2x bilinear upsampling for the coarser levels, so that all meet at 1/4 scale; their sum goes
  through dropout and a 1x1 classifier.
- **UperNet** (Xiao et al.; mmseg ``UPerHead`` as in the Swin segmentation recipe): a pyramid pooling
  module on the last stage (adaptive average pools 1, 2, 3, 6 -> 1x1 conv-norm-ReLU -> bilinear back, concat,
  3x3 bottleneck), 1x1 laterals on the other stages, top-down bilinear additions, 3x3 FPN convs, all levels
  resized to 1/4, concatenated, a 3x3 fusion conv (512 channels), dropout, a 1x1 classifier. The auxiliary
  head (``aux_head=True``): conv3x3-norm-ReLU (256) -> dropout -> 1x1 classifier on stage 3; it only runs in
  training (the loss weights it, 0.4 in the recipe); inference and export return the main logits only.

Input sizes. The input is zero-padded at the bottom/right to a multiple of ``size_divisor`` (the largest
backbone reduction among the used stages, 32 for the registered models), the logits are bilinearly
upsampled to the padded size and cropped back, so any size at least the backbone's ``min_input_size``
works and the output has the input's height and width. ``pad_input=False`` rejects sizes that are not
multiples of ``size_divisor`` with a ValueError instead.

Shapes: inputs (B, in_chans, H, W) -> logits (B, num_classes, H, W); in training with the auxiliary head,
the tuple (logits, aux_logits), both (B, num_classes, H, W).
"""
import math

from mindspore import nn, ops
from mindspore.common.initializer import initializer, Normal, Zero

from acmix_ms.spatial import zero_pad
from .layers import BatchNorm2d, build_model_with_cfg, class_options
from .registry import create_model, register_model

NORMS = ("bn", "gn")


def resize(x, size, mode="bilinear"):
    """(B, C, h, w) -> (B, C, size[0], size[1]): bilinear (half-pixel centres, as torch's
    ``align_corners=False``) or nearest; the input itself when the size already matches."""
    if x.shape[2] == size[0] and x.shape[3] == size[1]:
        return x
    if mode == "nearest":
        return ops.interpolate(x, size=(size[0], size[1]), mode="nearest")
    return ops.interpolate(x, size=(size[0], size[1]), mode="bilinear", align_corners=False)


def norm_layer(kind, channels):
    """'bn': BatchNorm2d (torch momentum 0.1); 'gn': GroupNorm with gcd(32, channels) groups."""
    if kind == "bn":
        return BatchNorm2d(channels, momentum=0.9)
    if kind == "gn":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


class ConvNormAct(nn.Cell):
    """k x k convolution (no bias) -> norm -> ReLU (mmcv's ``ConvModule``). (B, Cin, H, W) -> (B, Cout, H, W)."""

    def __init__(self, in_channels, out_channels, kernel_size=1, norm="bn"):
        super().__init__()
        if kernel_size == 1:
            self.conv = nn.Conv2d(in_channels, out_channels, 1, pad_mode="valid", has_bias=False)
        else:
            self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, pad_mode="pad", padding=kernel_size // 2,
                                  has_bias=False)
        self.norm = norm_layer(norm, out_channels)
        self.act = nn.ReLU()

    def construct(self, x):
        return self.act(self.norm(self.conv(x)))


class Upsample2x(nn.Cell):
    """Bilinear 2x upsampling (align_corners=False). (B, C, H, W) -> (B, C, 2H, 2W)."""

    def construct(self, x):
        return resize(x, (2 * x.shape[2], 2 * x.shape[3]))


class Classifier(nn.Cell):
    """Dropout -> 1x1 conv to the classes (mmseg's ``cls_seg``; weight N(0, 0.01), bias 0).
    (B, C, H, W) -> (B, num_classes, H, W)."""

    def __init__(self, in_channels, num_classes, dropout=0.1):
        super().__init__()
        self.dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(in_channels, num_classes, 1, pad_mode="valid", has_bias=True)
        self.conv_seg.weight.set_data(initializer(Normal(0.01), self.conv_seg.weight.shape))
        self.conv_seg.bias.set_data(initializer(Zero(), self.conv_seg.bias.shape))

    def construct(self, x):
        return self.conv_seg(self.dropout(x))


class FPN(nn.Cell):
    """Feature pyramid neck (mmseg/mmdet ``FPN`` without extra levels).

    Inputs: tuple of n maps (B, C_i, H_i, W_i), finest first. Outputs: tuple of n maps (B, out_channels, H_i, W_i):
    fpn_conv_i(lateral_i(x_i) + nearest-upsampled merged map of level i+1).
    """

    def __init__(self, in_channels, out_channels=256):
        super().__init__()
        self.num_levels = len(in_channels)
        self.lateral_convs = nn.CellList([nn.Conv2d(c, out_channels, 1, pad_mode="valid", has_bias=True)
                                          for c in in_channels])
        self.fpn_convs = nn.CellList([nn.Conv2d(out_channels, out_channels, 3, pad_mode="pad", padding=1,
                                                has_bias=True) for _ in in_channels])

    def construct(self, features):
        last = self.num_levels - 1
        merged = self.lateral_convs[last](features[last])
        outs = (self.fpn_convs[last](merged),)
        for i in range(last - 1, -1, -1):
            lateral = self.lateral_convs[i](features[i])
            merged = lateral + resize(merged, lateral.shape[2:], "nearest")
            outs = (self.fpn_convs[i](merged),) + outs
        return outs


class SemanticFPNHead(nn.Cell):
    """Panoptic FPN's semantic branch (mmseg ``FPNHead``).

    Inputs: tuple of FPN maps (B, C, H/s_i, W/s_i) for strides s_0 < s_1 < ... (each twice the previous).
    Outputs: (B, num_classes, H/s_0, W/s_0).
    """

    def __init__(self, in_channels, strides, num_classes, channels=128, dropout=0.1, norm="bn"):
        super().__init__()
        heads = []
        for i, stride in enumerate(strides):
            length = max(1, int(round(math.log2(stride / strides[0]))))
            layers = []
            for k in range(length):
                layers.append(ConvNormAct(in_channels[i] if k == 0 else channels, channels, 3, norm))
                if stride != strides[0]:
                    layers.append(Upsample2x())
            heads.append(nn.SequentialCell(layers))
        self.scale_heads = nn.CellList(heads)
        self.num_levels = len(strides)
        self.cls = Classifier(channels, num_classes, dropout)

    def construct(self, features):
        out = self.scale_heads[0](features[0])
        for i in range(1, self.num_levels):
            out = out + resize(self.scale_heads[i](features[i]), out.shape[2:])
        return self.cls(out)


class PPM(nn.Cell):
    """Pyramid pooling module: for each scale s, adaptive average pool to s x s -> 1x1 conv-norm-ReLU ->
    bilinear back to the input size. (B, C, H, W) -> tuple of len(scales) maps (B, channels, H, W)."""

    def __init__(self, in_channels, channels, pool_scales=(1, 2, 3, 6), norm="bn"):
        super().__init__()
        self.branches = nn.CellList([nn.SequentialCell([nn.AdaptiveAvgPool2d(scale),
                                                        ConvNormAct(in_channels, channels, 1, norm)])
                                     for scale in pool_scales])

    def construct(self, x):
        outs = ()
        for branch in self.branches:
            outs = outs + (resize(branch(x), x.shape[2:]),)
        return outs


class UPerHead(nn.Cell):
    """UperNet decode head (mmseg ``UPerHead``).

    Inputs: tuple of n backbone maps (B, C_i, H_i, W_i), finest first. Outputs: (B, num_classes, H_0, W_0).
    """

    def __init__(self, in_channels, num_classes, channels=512, pool_scales=(1, 2, 3, 6), dropout=0.1, norm="bn"):
        super().__init__()
        self.num_levels = len(in_channels)
        self.psp_modules = PPM(in_channels[-1], channels, pool_scales, norm)
        self.bottleneck = ConvNormAct(in_channels[-1] + len(pool_scales) * channels, channels, 3, norm)
        self.lateral_convs = nn.CellList([ConvNormAct(c, channels, 1, norm) for c in in_channels[:-1]])
        self.fpn_convs = nn.CellList([ConvNormAct(channels, channels, 3, norm) for _ in in_channels[:-1]])
        self.fpn_bottleneck = ConvNormAct(len(in_channels) * channels, channels, 3, norm)
        self.cls = Classifier(channels, num_classes, dropout)

    def construct(self, features):
        last = self.num_levels - 1
        top = features[last]
        merged = self.bottleneck(ops.concat((top,) + self.psp_modules(top), 1))
        outs = (merged,)
        for i in range(last - 1, -1, -1):
            lateral = self.lateral_convs[i](features[i])
            merged = lateral + resize(merged, lateral.shape[2:])
            outs = (self.fpn_convs[i](merged),) + outs
        size = outs[0].shape[2:]
        fused = outs[0]
        for i in range(1, self.num_levels):
            fused = ops.concat((fused, resize(outs[i], size)), 1)
        return self.cls(self.fpn_bottleneck(fused))


class FCNHead(nn.Cell):
    """Auxiliary FCN head (mmseg ``FCNHead``, one conv, no input concat): conv3x3-norm-ReLU -> dropout -> 1x1.
    (B, C, H, W) -> (B, num_classes, H, W)."""

    def __init__(self, in_channels, num_classes, channels=256, dropout=0.1, norm="bn"):
        super().__init__()
        self.convs = ConvNormAct(in_channels, channels, 3, norm)
        self.cls = Classifier(channels, num_classes, dropout)

    def construct(self, x):
        return self.cls(self.convs(x))


def _build_backbone(backbone, out_indices, in_chans, img_size, drop_path_rate, backbone_kwargs):
    """A registered classification network built headless with ``out_indices``; returns (cell, channels, strides)."""
    kwargs = dict(backbone_kwargs or {})
    for name in ("num_classes", "out_indices"):
        if name in kwargs:
            raise ValueError(f"backbone_kwargs must not set {name!r} (the segmentor sets it)")
    if img_size is not None:
        kwargs["img_size"] = img_size
    if drop_path_rate is not None:
        kwargs["drop_path_rate"] = drop_path_rate
    if in_chans != 3:
        kwargs["in_chans"] = in_chans
    net = create_model(backbone, num_classes=0, out_indices=tuple(out_indices), **kwargs)
    info = getattr(net, "feature_info", None)
    if not info:
        raise ValueError(f"backbone {backbone!r} has no feature_info: it cannot feed a segmentation head")
    channels = [int(info[i]["channels"]) for i in net.out_indices]
    strides = [int(info[i]["reduction"]) for i in net.out_indices]
    return net, channels, strides


class Segmentor(nn.Cell):
    """Backbone + decode head (+ auxiliary head): pads the input, upsamples the logits, crops them back.

    Subclasses build ``decode_head`` (and optionally ``auxiliary_head`` over backbone stage ``aux_index``)
    from ``self.channels`` / ``self.strides`` after calling ``_setup``.

    Inputs: (B, in_chans, H, W). Outputs: logits (B, num_classes, H, W), or (logits, aux_logits) while
    training with an auxiliary head.
    """

    def _setup(self, backbone, num_classes, out_indices, in_chans, img_size, drop_path_rate, backbone_kwargs,
               pad_input):
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer for segmentation, got {num_classes!r}")
        self.num_classes = num_classes
        self.backbone_name = backbone
        self.backbone, self.channels, self.strides = _build_backbone(
            backbone, out_indices, in_chans, img_size, drop_path_rate, backbone_kwargs)
        if any(b != 2 * a for a, b in zip(self.strides, self.strides[1:])):
            raise ValueError(f"the backbone stages {tuple(out_indices)} of {backbone!r} have strides {self.strides}: "
                             f"each must be twice the previous")
        self.size_divisor = max(self.strides)
        self.min_input_size = max(int(getattr(self.backbone, "min_input_size", 1) or 1), 1)
        self.pad_input = bool(pad_input)
        self.has_aux = False

    def _add_aux_head(self, aux_index, aux_channels, dropout, norm):
        if aux_index not in range(len(self.channels)):
            raise ValueError(f"aux_index must index the used stages (0..{len(self.channels) - 1}), got {aux_index}")
        self.aux_index = aux_index
        self.auxiliary_head = FCNHead(self.channels[aux_index], self.num_classes, aux_channels, dropout, norm)
        self.has_aux = True

    def forward_features(self, x):
        """Padded images (B, C, H, W) -> tuple of backbone maps (B, C_i, H/s_i, W/s_i)."""
        return self.backbone(x)

    def forward_head(self, features):
        """Backbone maps -> decode-head logits (B, num_classes, H/s_0, W/s_0)."""
        return self.decode_head(features)

    def _pad(self, x):
        height, width = x.shape[2], x.shape[3]
        pad_h = (self.size_divisor - height % self.size_divisor) % self.size_divisor
        pad_w = (self.size_divisor - width % self.size_divisor) % self.size_divisor
        if pad_h == 0 and pad_w == 0:
            return x
        if not self.pad_input:
            raise ValueError(f"input size {height}x{width} is not a multiple of {self.size_divisor} (the backbone's "
                             f"stride); resize or pad the images, or build the model with pad_input=True")
        return zero_pad(x, ((0, 0), (0, 0), (0, pad_h), (0, pad_w)))

    def _to_input_size(self, logits, padded, height, width):
        return resize(logits, padded.shape[2:])[:, :, :height, :width]

    def construct(self, x):
        height, width = x.shape[2], x.shape[3]
        if height < self.min_input_size or width < self.min_input_size:
            raise ValueError(f"input size {height}x{width} is smaller than {self.min_input_size} px, the smallest "
                             f"the backbone {self.backbone_name} takes")
        padded = self._pad(x)
        features = self.forward_features(padded)
        logits = self._to_input_size(self.forward_head(features), padded, height, width)
        if self.training and self.has_aux:
            aux = self.auxiliary_head(features[self.aux_index])
            return logits, self._to_input_size(aux, padded, height, width)
        return logits


class SemanticFPN(Segmentor):
    """Semantic FPN on a registered backbone.

    Args:
        backbone: registered classification model name (built headless with ``out_indices``).
        num_classes: segmentation classes (150 for ADE20K). in_chans, img_size (passed to the backbone;
            None: the backbone's default), drop_path_rate (None: the backbone's default).
        out_indices: backbone stages feeding the FPN, strides doubling (default the four stages).
        fpn_channels, head_channels: FPN and semantic-branch widths (256, 128). dropout before the classifier.
        norm: 'bn' or 'gn' in the semantic branch. backbone_kwargs: further backbone constructor arguments.
        pad_input: pad inputs to a multiple of the stride (True) or reject them (False).
    """

    def __init__(self, backbone="pvt_tiny", num_classes=150, in_chans=3, img_size=None, drop_path_rate=None,
                 out_indices=(0, 1, 2, 3), fpn_channels=256, head_channels=128, dropout=0.1, norm="bn",
                 backbone_kwargs=None, pad_input=True):
        super().__init__()
        self._setup(backbone, num_classes, out_indices, in_chans, img_size, drop_path_rate, backbone_kwargs,
                    pad_input)
        self.neck = FPN(self.channels, fpn_channels)
        self.decode_head = SemanticFPNHead([fpn_channels] * len(self.channels), self.strides, num_classes,
                                           head_channels, dropout, norm)

    def forward_features(self, x):
        """Padded images -> tuple of FPN maps (B, fpn_channels, H/s_i, W/s_i)."""
        return self.neck(self.backbone(x))


class UperNet(Segmentor):
    """UperNet on a registered backbone.

    Args:
        backbone, num_classes, in_chans, img_size, drop_path_rate, out_indices, backbone_kwargs, pad_input:
            as ``SemanticFPN``.
        channels: decode-head width (512). pool_scales: PPM scales. dropout, norm ('bn' | 'gn').
        aux_head: add the auxiliary FCN head (training only) on used stage ``aux_index`` (2: stage 3) with
            ``aux_channels`` (256).
    """

    def __init__(self, backbone="swin_tiny", num_classes=150, in_chans=3, img_size=None, drop_path_rate=None,
                 out_indices=(0, 1, 2, 3), channels=512, pool_scales=(1, 2, 3, 6), dropout=0.1, norm="bn",
                 aux_head=True, aux_index=2, aux_channels=256, backbone_kwargs=None, pad_input=True):
        super().__init__()
        self._setup(backbone, num_classes, out_indices, in_chans, img_size, drop_path_rate, backbone_kwargs,
                    pad_input)
        self.decode_head = UPerHead(self.channels, num_classes, channels, tuple(pool_scales), dropout, norm)
        if aux_head:
            self._add_aux_head(aux_index, aux_channels, dropout, norm)


def _semfpn(backbone, num_classes, in_chans, overrides):
    options = class_options(SemanticFPN, backbone=backbone, num_classes=num_classes, in_chans=in_chans)
    return build_model_with_cfg(SemanticFPN, SemanticFPN.__name__, options, overrides)


def _upernet(backbone, num_classes, in_chans, overrides):
    options = class_options(UperNet, backbone=backbone, num_classes=num_classes, in_chans=in_chans)
    return build_model_with_cfg(UperNet, UperNet.__name__, options, overrides)


# Paper Table 2 (ADE20K, 150 classes): params, FLOPs (MACs), mIoU. Its FLOPs of both Semantic FPN and UperNet are
# those of a 512x2048 input (measured: docs/segmentation_table.md; at 512x512 Semantic FPN PVT-T/S has 33/45 GMACs,
# PVT's own figures).
@register_model(paper={"params_m": 17, "gmacs": 158, "miou": 37.1, "input_size": (512, 2048), "num_classes": 150},
                task="segmentation")
def semfpn_pvt_tiny(num_classes=150, in_chans=3, **overrides):
    """Semantic FPN with a PVT-T backbone."""
    return _semfpn("pvt_tiny", num_classes, in_chans, overrides)


@register_model(paper={"params_m": 17, "gmacs": 160, "miou": 42.7, "input_size": (512, 2048), "num_classes": 150},
                task="segmentation")
def semfpn_pvt_tiny_acmix(num_classes=150, in_chans=3, **overrides):
    """Semantic FPN with a PVT-ACmix-T backbone."""
    return _semfpn("pvt_tiny_acmix", num_classes, in_chans, overrides)


@register_model(paper={"params_m": 28, "gmacs": 225, "miou": 42.4, "input_size": (512, 2048), "num_classes": 150},
                task="segmentation")
def semfpn_pvt_small(num_classes=150, in_chans=3, **overrides):
    """Semantic FPN with a PVT-S backbone."""
    return _semfpn("pvt_small", num_classes, in_chans, overrides)


@register_model(paper={"params_m": 29, "gmacs": 228, "miou": 46.4, "input_size": (512, 2048), "num_classes": 150},
                task="segmentation")
def semfpn_pvt_small_acmix(num_classes=150, in_chans=3, **overrides):
    """Semantic FPN with a PVT-ACmix-S backbone."""
    return _semfpn("pvt_small_acmix", num_classes, in_chans, overrides)


@register_model(paper={"params_m": 60, "gmacs": 945, "miou": 44.5, "input_size": (512, 2048), "num_classes": 150},
                task="segmentation")
def upernet_swin_tiny(num_classes=150, in_chans=3, **overrides):
    """UperNet (+ auxiliary FCN head) with a Swin-T backbone."""
    return _upernet("swin_tiny", num_classes, in_chans, overrides)


@register_model(paper={"params_m": 60, "gmacs": 950, "miou": 45.3, "input_size": (512, 2048), "num_classes": 150},
                task="segmentation")
def upernet_swin_tiny_acmix(num_classes=150, in_chans=3, **overrides):
    """UperNet (+ auxiliary FCN head) with a Swin-ACmix-T backbone."""
    return _upernet("swin_tiny_acmix", num_classes, in_chans, overrides)


@register_model(paper={"params_m": 81, "gmacs": 1038, "miou": 47.6, "input_size": (512, 2048), "num_classes": 150},
                task="segmentation")
def upernet_swin_small(num_classes=150, in_chans=3, **overrides):
    """UperNet (+ auxiliary FCN head) with a Swin-S backbone."""
    return _upernet("swin_small", num_classes, in_chans, overrides)


@register_model(paper={"params_m": 81, "gmacs": 1043, "miou": 48.7, "input_size": (512, 2048), "num_classes": 150},
                task="segmentation")
def upernet_swin_small_acmix(num_classes=150, in_chans=3, **overrides):
    """UperNet (+ auxiliary FCN head) with a Swin-ACmix-S backbone."""
    return _upernet("swin_small_acmix", num_classes, in_chans, overrides)
