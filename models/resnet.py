"""ResNet V1.5 bottleneck networks and ResNet-ACmix (the official LeapLabTHU/ACmix ResNet variant).

Layout (torchvision ResNet V1.5, kept so the official checkpoints map one to one):

- stem ``'imagenet'``: ``conv1`` 7x7/2 (in_chans -> w) + ``bn1`` + ReLU + ``maxpool`` 3x3/2 (reduction 4);
  stem ``'cifar'``: ``conv1`` 3x3/1 + ``bn1`` + ReLU, no max-pool (reduction 1), for small demo images;
- ``layer1``..``layer4``: Bottlenecks of width w, 2w, 4w, 8w (w = ``base_width``, 64 for ImageNet) and
  output 4x that; the first block of layers 2-4 has stride 2, in its 3x3 ``conv2`` (V1.5) and in the
  ``downsample`` (1x1/2 conv + BN);
- head: global average pool + ``fc``.

ResNet-ACmix replaces EVERY Bottleneck's ``conv2`` (layer1 included) by
``acmix_ms.ACmixLocal(width, width, kernel_att=7, num_heads=4, kernel_conv=3, stride=s, fc_bias=False)``.

Initialisation: Kaiming normal (fan_out, ReLU) for every ``nn.Conv2d`` (also the ACmix ``qkv``, ``conv_p``
and ``fc``), BatchNorm gamma 1 / beta 0. The ACmix group conv ``dep_conv`` keeps its shift-kernel init
(``shift_impl='learnable'``, the paper's default). The official code re-initialises ``dep_conv`` too,
because its init loop catches every ``nn.Conv2d`` (docs/operator.md, "Shift init kept in ResNet-ACmix": the
released ResNet models are the "random init" row of Table 7); ``official_init=True`` reproduces that re-init.
"""
from mindspore import nn
from mindspore.common.initializer import HeNormal, initializer

from acmix_ms import ACmixLocal, ShiftConv
from acmix_ms.spatial import out_size
from acmix_ms.validation import check_choice, check_positive_int

from .layers import (BatchNorm2d, DropPath, MaxPool2d, StagedBackbone, build_model_with_cfg, check_block_counts,
                     check_num_classes, check_out_indices, drop_path_rates)
from .registry import register_model

__all__ = ["ResNet", "Bottleneck"]

STEMS = ("imagenet", "cifar")
NUM_STAGES = 4
EXPANSION = 4

# Keyword options of the ACmix conv2, with the official ResNet-ACmix values.
ACMIX_DEFAULTS = {
    "kernel_att": 7, "num_heads": 4, "kernel_conv": 3, "dilation": 1, "qkv_bias": True, "fc_bias": False,
    "shift_impl": "learnable", "rate_mode": "learnable", "rates": (0.5, 0.5), "official_init": False,
    "attention_impl": "auto",
}
STRUCTURE_DEFAULTS = {"layers": (3, 4, 6, 3), "base_width": 64, "stem": "imagenet", "drop_path_rate": 0.0,
                      "out_indices": None}


def conv1x1(in_channels, out_channels, stride=1):
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, pad_mode="valid", has_bias=False)


class Bottleneck(nn.Cell):
    """ResNet V1.5 bottleneck: 1x1 -> 3x3 (or ACmix) with the stride -> 1x1 (x4), plus the shortcut.

    Args:
        in_channels: Cin.
        width: channels of the inner 1x1/3x3 convs; the block outputs ``4 * width``.
        stride: 1 or 2, applied by ``conv2`` and the downsample.
        acmix: None for a plain 3x3 conv2, else the keyword options of ``ACmixLocal``.
        drop_path: stochastic-depth probability of the residual branch (0: none, as the official models).

    Inputs: (B, Cin, H, W). Outputs: (B, 4*width, ceil(H/stride), ceil(W/stride)).
    """

    def __init__(self, in_channels, width, stride=1, acmix=None, drop_path=0.0):
        super().__init__()
        out_channels = width * EXPANSION
        self.conv1 = conv1x1(in_channels, width)
        self.bn1 = BatchNorm2d(width, relu=True)  # BN then ReLU (one CPU kernel)
        if acmix is None:
            self.conv2 = nn.Conv2d(width, width, 3, stride=stride, pad_mode="pad", padding=1, has_bias=False)
        else:
            self.conv2 = ACmixLocal(width, width, stride=stride, **acmix)
        self.bn2 = BatchNorm2d(width, relu=True)
        self.conv3 = conv1x1(width, out_channels)
        # bn3, the shortcut addition and the ReLU as one layer (one CPU kernel pass), unless stochastic depth must
        # act on the branch between the batch norm and the addition
        self.fuse_shortcut = drop_path <= 0
        self.bn3 = BatchNorm2d(out_channels, relu=self.fuse_shortcut, residual=self.fuse_shortcut)
        self.relu = nn.ReLU()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.SequentialCell(conv1x1(in_channels, out_channels, stride),
                                                BatchNorm2d(out_channels))

    def construct(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.bn1(self.conv1(x))
        out = self.bn2(self.conv2(out))
        if self.fuse_shortcut:
            return self.bn3(self.conv3(out), shortcut)
        out = self.bn3(self.conv3(out))
        return self.relu(self.drop_path(out) + shortcut)


class ResNet(StagedBackbone):
    """ResNet V1.5 with Bottleneck blocks; ResNet-ACmix when ``acmix`` is given.

    Args:
        layers: four block counts, e.g. (3, 4, 6, 3) for ResNet-50.
        num_classes: classifier width; 0 gives no classifier (``forward_head`` returns pooled features).
        in_chans: input channels.
        base_width: stem width and width of layer1 (stage i has ``base_width * 2**i`` inner channels).
        stem: ``'imagenet'`` (7x7/2 conv + 3x3/2 max-pool) or ``'cifar'`` (3x3/1 conv, no pool).
        acmix: None (plain 3x3 conv2) or a dict of ``ACmixLocal`` options (kernel_att, num_heads,
            kernel_conv, dilation, qkv_bias, fc_bias, shift_impl, rate_mode, rates, attention_impl) for every conv2.
        drop_path_rate: stochastic depth of the last block; rises linearly from 0 over the blocks.
        official_init: re-initialise the ACmix ``dep_conv`` with Kaiming normal like the official code
            (losing the shift init); only with ``shift_impl`` 'learnable' or 'random'.
        out_indices: None (``construct`` returns logits) or a tuple of stage indices in 0..3 (``construct``
            returns the tuple of those stages' (B, C_i, H/r_i, W/r_i) maps, see ``feature_info``).

    Inputs: (B, in_chans, H, W). Outputs: (B, num_classes) logits, or the stage maps with ``out_indices``.
    """

    def __init__(self, layers, num_classes=1000, in_chans=3, base_width=64, stem="imagenet", acmix=None,
                 drop_path_rate=0.0, official_init=False, out_indices=None):
        super().__init__()
        layers = check_block_counts(layers, NUM_STAGES)
        check_num_classes(num_classes)
        check_positive_int("in_chans", in_chans)
        check_positive_int("base_width", base_width)
        self.stem_type = check_choice("stem", stem, STEMS)
        self.out_indices = check_out_indices(out_indices, NUM_STAGES)
        self.uses_acmix = acmix is not None
        if official_init and not self.uses_acmix:
            raise ValueError("official_init=True only applies to ResNet-ACmix (it re-initialises dep_conv)")
        if official_init and acmix.get("shift_impl", "learnable") not in ("learnable", "random"):
            raise ValueError(f"official_init=True re-initialises a trainable dep_conv; it needs shift_impl "
                             f"'learnable' or 'random', got {acmix['shift_impl']!r}")

        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_chans, base_width, 7, stride=2, pad_mode="pad", padding=3, has_bias=False)
            self.maxpool = MaxPool2d(3, 2, padding=1)
            stem_reduction = 4
        else:
            self.conv1 = nn.Conv2d(in_chans, base_width, 3, stride=1, pad_mode="pad", padding=1, has_bias=False)
            stem_reduction = 1
        self.bn1 = BatchNorm2d(base_width, relu=True)

        in_channels = base_width
        block_drop_paths = iter(drop_path_rates(drop_path_rate, sum(layers)))
        self.feature_info = []
        for index, blocks in enumerate(layers):
            width = base_width * 2 ** index
            stage = []
            for block in range(blocks):
                stride = 2 if index > 0 and block == 0 else 1
                stage.append(Bottleneck(in_channels, width, stride, acmix, next(block_drop_paths)))
                in_channels = width * EXPANSION
            setattr(self, f"layer{index + 1}", nn.SequentialCell(stage))
            self.feature_info.append({"stage": index, "module": f"layer{index + 1}", "channels": in_channels,
                                      "reduction": stem_reduction * 2 ** index})
        self.num_features = in_channels
        self.fc = nn.Dense(in_channels, num_classes) if num_classes > 0 else nn.Identity()

        self.layers = layers
        self.min_input_size = _min_input_size(layers, stem, acmix)
        self._init_weights(official_init)

    def _init_weights(self, official_init):
        kaiming = HeNormal(mode="fan_out", nonlinearity="relu")
        for _, cell in self.cells_and_names():
            if isinstance(cell, nn.Conv2d):
                cell.weight.set_data(initializer(kaiming, cell.weight.shape, cell.weight.dtype))
            elif isinstance(cell, nn.BatchNorm2d):
                cell.gamma.set_data(initializer("ones", cell.gamma.shape, cell.gamma.dtype))
                cell.beta.set_data(initializer("zeros", cell.beta.shape, cell.beta.dtype))
            elif official_init and isinstance(cell, ShiftConv):
                # ShiftConv is not an nn.Conv2d, so only this flag reaches it (the official loop did).
                cell.weight.set_data(initializer(kaiming, cell.weight.shape, cell.weight.dtype))

    def _check_input_size(self, x):
        if x.shape[2] < self.min_input_size or x.shape[3] < self.min_input_size:
            raise ValueError(f"input of {x.shape[2]}x{x.shape[3]} px is too small for this ResNet-ACmix: the "
                             f"attention's reflection padding needs at least {self.min_input_size} px per side "
                             f"(lower kernel_att or use a larger image)")

    def _stem(self, x):
        x = self.bn1(self.conv1(x))
        if self.stem_type == "imagenet":
            x = self.maxpool(x)
        return x

    def _stages(self, x):
        """The four stage outputs (B, C_i, H/r_i, W/r_i) of a (B, in_chans, H, W) input."""
        self._check_input_size(x)
        x1 = self.layer1(self._stem(x))
        x2 = self.layer2(x1)
        x3 = self.layer3(x2)
        x4 = self.layer4(x3)
        return x1, x2, x3, x4


def _min_input_size(layers, stem, acmix):
    """Smallest square input whose every attention input satisfies the reflection padding (pad < size)."""
    if acmix is None or acmix.get("rate_mode") == "conv":
        return 1
    options = {**ACMIX_DEFAULTS, **acmix}
    pad = options["dilation"] * (options["kernel_att"] - 1) // 2

    def fits(size):
        if stem == "imagenet":
            size = out_size(out_size(size, 2), 2)  # 7x7/2 conv pad 3, then 3x3/2 max-pool pad 1: ceil(H/4)
        for index, blocks in enumerate(layers):
            if size <= pad:  # first block sees the stage input
                return False
            size = out_size(size, 1 if index == 0 else 2)
            if blocks > 1 and size <= pad:  # later blocks see the strided map
                return False
        return True

    size = 1
    while not fits(size):
        size += 1
    return size


def _create_resnet(name, num_classes, in_chans, overrides, use_acmix, **defaults):
    """A registered configuration with user overrides (``build_model_with_cfg``): the structure options,
    and for ResNet-ACmix the ``ACmixLocal`` options (gathered into ``acmix``) and ``official_init``."""
    options = {**STRUCTURE_DEFAULTS, **{k: v for k, v in defaults.items() if k in STRUCTURE_DEFAULTS},
               "num_classes": num_classes, "in_chans": in_chans}
    groups = None
    if use_acmix:
        acmix = {**ACMIX_DEFAULTS, **{k: v for k, v in defaults.items() if k in ACMIX_DEFAULTS}}
        options["official_init"] = acmix.pop("official_init")
        groups = {"acmix": acmix}
    return build_model_with_cfg(ResNet, name, options, overrides, groups)


@register_model(paper={"params_m": 13.7, "gmacs": 2.4, "top1": 73.6})
def resnet26(num_classes=1000, in_chans=3, **overrides):
    """ResNet-26: Bottleneck ResNet V1.5 with layers [1, 2, 4, 1] (the baseline of ResNet-ACmix-26)."""
    return _create_resnet("resnet26", num_classes, in_chans, overrides, False, layers=(1, 2, 4, 1))


@register_model(paper={"params_m": 19.6, "gmacs": 3.2, "top1": 76.0})
def resnet38(num_classes=1000, in_chans=3, **overrides):
    """ResNet-38: layers [2, 3, 5, 2] (the baseline of ResNet-ACmix-38)."""
    return _create_resnet("resnet38", num_classes, in_chans, overrides, False, layers=(2, 3, 5, 2))


@register_model(paper={"params_m": 25.6, "gmacs": 4.1, "top1": 76.9})
def resnet50(num_classes=1000, in_chans=3, **overrides):
    """ResNet-50: layers [3, 4, 6, 3] (torchvision resnet50, the baseline of ResNet-ACmix-50)."""
    return _create_resnet("resnet50", num_classes, in_chans, overrides, False, layers=(3, 4, 6, 3))


@register_model(paper={"params_m": 10.6, "gmacs": 2.3, "top1": 76.1})
def resnet26_acmix(num_classes=1000, in_chans=3, **overrides):
    """ResNet-ACmix-26: ResNet-26 with every conv2 an ACmixLocal (k_att 7, 4 heads, k_conv 3)."""
    return _create_resnet("resnet26_acmix", num_classes, in_chans, overrides, True, layers=(1, 2, 4, 1))


@register_model(paper={"params_m": 14.6, "gmacs": 2.9, "top1": 77.4})
def resnet38_acmix(num_classes=1000, in_chans=3, **overrides):
    """ResNet-ACmix-38: ResNet-38 with every conv2 an ACmixLocal (k_att 7, 4 heads, k_conv 3)."""
    return _create_resnet("resnet38_acmix", num_classes, in_chans, overrides, True, layers=(2, 3, 5, 2))


@register_model(paper={"params_m": 18.6, "gmacs": 3.6, "top1": 77.8})
def resnet50_acmix(num_classes=1000, in_chans=3, **overrides):
    """ResNet-ACmix-50: ResNet-50 with every conv2 an ACmixLocal (k_att 7, 4 heads, k_conv 3)."""
    return _create_resnet("resnet50_acmix", num_classes, in_chans, overrides, True, layers=(3, 4, 6, 3))


@register_model
def resnet_tiny(num_classes=1000, in_chans=3, **overrides):
    """Demo ResNet for 28-32 px images (Fashion-MNIST, CIFAR; not in the paper).

    CIFAR-style stem (3x3/1 conv, 16 channels, no max-pool), layers [1, 1, 1, 1], inner widths
    16/32/64/128, outputs 64/128/256/512 at reductions 1/2/4/8 (a 32 px input ends at 4 px).
    """
    return _create_resnet("resnet_tiny", num_classes, in_chans, overrides, False, layers=(1, 1, 1, 1),
                          base_width=16, stem="cifar")


@register_model
def resnet_tiny_acmix(num_classes=1000, in_chans=3, **overrides):
    """ACmix version of ``resnet_tiny``: every conv2 an ACmixLocal with k_att 5, 4 heads (d = 4/8/16/32), k_conv 3.

    k_att 5 (reflection pad 2) keeps the 4 px last stage of a 32 px input valid; inputs need at least
    9 px per side (``min_input_size``).
    """
    return _create_resnet("resnet_tiny_acmix", num_classes, in_chans, overrides, True, layers=(1, 1, 1, 1),
                          base_width=16, stem="cifar", kernel_att=5)
