"""SAN patchwise self-attention networks (Zhao et al., CVPR 2020) and SAN-ACmix.

Layout (hszhao/SAN ``model/san.py``, patchwise ``sa_type=1``; attribute names kept for its checkpoints):

- stem: ``conv_in`` 1x1 (in_chans -> c, no bias) + ``bn_in`` + ReLU, at full resolution;
- five stages i = 0..4, each: 2x2/2 max-pool, transition ``conv{i}`` 1x1 (no bias), the blocks ``layer{i}``,
  then ``bn{i}`` + ReLU. Widths c, 4c, 8c, 16c, 32c (c = ``base_width``, 64: 64/256/512/1024/2048);
  reductions 2, 4, 8, 16, 32 (112 .. 7 px at 224 px input); attention kernels ``kernels`` ([3, 7, 7, 7, 7]);
- pre-activation bottleneck ``x + conv(relu(bn2(sam(relu(bn1(x))))))``, where ``sam`` is
  ``acmix_ms.ACmixPatchwise(C, C // 16, C // 4, share_planes, kernel_att)`` and ``conv`` 1x1 (C/4 -> C, bias);
- head: global average pool + ``fc``.

The baselines ``san10/15/19`` use ``rate_mode='attention'``: exactly SAN's patchwise SAM, no conv-path
parameters. ``san*_acmix`` add the ACmix conv path (fc over the q, k and 4 value groups of width C/16,
shift group conv to C/4 channels, learnable rates); SAN-ACmix code was never released, so this follows the
proposal described in docs/operator.md ("PVT / SAN") and its parameter counts are that proposal's, not the
paper's.

Initialisation: MindSpore's defaults, which equal PyTorch's defaults that SAN uses (no explicit init);
the ACmix ``dep_conv`` keeps its shift init.

Input size: stage i runs at ``floor(H / 2**(i+1))`` px and the attention's reflection padding
``kernels[i] // 2`` must be smaller, so H, W >= ``max_i (kernels[i] // 2 + 1) * 2**(i+1)``
(``SAN.min_input_size``): 128 px for [3, 7, 7, 7, 7]; 64 px works with e.g. kernels (3, 7, 7, 7, 3).
Smaller inputs raise a ValueError that states the minimum.
"""
from mindspore import nn

from acmix_ms import ACmixPatchwise
from acmix_ms.validation import check_positive_int

from .registry import register_model
from .layers import (BatchNorm2d, DropPath, StagedBackbone, build_model_with_cfg, check_block_counts,
                     check_num_classes, check_out_indices, drop_path_rates)

__all__ = ["SAN", "SANBottleneck"]

NUM_STAGES = 5
STAGE_WIDTH_FACTORS = (1, 4, 8, 16, 32)

# ACmix options of the SAM, with the proposal's values (docs/operator.md, "PVT / SAN").
ACMIX_DEFAULTS = {"kernel_conv": 3, "fc_bias": True, "shift_impl": "learnable", "rate_mode": "learnable",
                  "rates": (0.5, 0.5)}
STRUCTURE_DEFAULTS = {"layers": (3, 3, 4, 6, 3), "kernels": (3, 7, 7, 7, 7), "base_width": 64, "share_planes": 8,
                      "drop_path_rate": 0.0, "out_indices": None}


class SANBottleneck(nn.Cell):
    """Pre-activation residual block around one patchwise SAM.

    Args:
        channels: C (input = output width); q/k get C // 16 channels, v and the SAM output C // 4.
        kernel_att: attention window (odd).
        share_planes: value channels sharing one attention weight map.
        sam_options: keyword options of ``ACmixPatchwise`` (rate_mode, shift_impl, ...).
        drop_path: stochastic-depth probability of the residual branch (0: none, as SAN).

    Inputs: (B, C, H, W). Outputs: (B, C, H, W).
    """

    def __init__(self, channels, kernel_att, share_planes=8, sam_options=None, drop_path=0.0):
        super().__init__()
        mid_channels = channels // 4
        self.bn1 = BatchNorm2d(channels)
        self.sam = ACmixPatchwise(channels, channels // 16, mid_channels, share_planes=share_planes,
                                  kernel_att=kernel_att, **(sam_options or {}))
        self.bn2 = BatchNorm2d(mid_channels)
        self.conv = nn.Conv2d(mid_channels, channels, 1, pad_mode="valid", has_bias=True)
        self.relu = nn.ReLU()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def construct(self, x):
        out = self.relu(self.bn1(x))
        out = self.relu(self.bn2(self.sam(out)))
        return x + self.drop_path(self.conv(out))


class SAN(StagedBackbone):
    """SAN with patchwise attention; SAN-ACmix when ``sam_options`` enables the conv path.

    Args:
        layers: five block counts, e.g. (2, 1, 2, 4, 1) for SAN-10.
        kernels: five attention kernels (odd), one per stage.
        num_classes: classifier width; 0 gives no classifier.
        in_chans: input channels.
        base_width: c, the stage-0 width (a multiple of 16 with c/4 divisible by ``share_planes``).
        share_planes: value channels sharing one attention weight map.
        sam_options: keyword options of every ``ACmixPatchwise`` (kernel_conv, fc_bias, shift_impl,
            rate_mode, rates); ``{'rate_mode': 'attention'}`` is plain SAN.
        drop_path_rate: stochastic depth of the last block; rises linearly from 0 over the blocks.
        out_indices: None (``construct`` returns logits) or a tuple of stage indices in 0..4 (``construct``
            returns those stages' (B, C_i, H/r_i, W/r_i) maps, see ``feature_info``).

    Inputs: (B, in_chans, H, W), H and W >= ``min_input_size``. Outputs: (B, num_classes) logits, or the
    stage maps with ``out_indices``.
    """

    def __init__(self, layers, kernels, num_classes=1000, in_chans=3, base_width=64, share_planes=8,
                 sam_options=None, drop_path_rate=0.0, out_indices=None):
        super().__init__()
        layers, kernels = check_block_counts(layers, NUM_STAGES), tuple(kernels)
        if len(kernels) != NUM_STAGES:
            raise ValueError(f"kernels must give {NUM_STAGES} attention kernels, got {kernels!r}")
        check_num_classes(num_classes)
        check_positive_int("in_chans", in_chans)
        check_positive_int("base_width", base_width)
        check_positive_int("share_planes", share_planes)
        if base_width % 16 or (base_width // 4) % share_planes:
            raise ValueError(f"base_width={base_width} must be a multiple of 16 whose quarter (the value width) "
                             f"is divisible by share_planes={share_planes}")
        self.out_indices = check_out_indices(out_indices, NUM_STAGES)
        sam_options = dict(sam_options or {})

        self.conv_in = nn.Conv2d(in_chans, base_width, 1, pad_mode="valid", has_bias=False)
        self.bn_in = BatchNorm2d(base_width)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2, 2)
        in_channels = base_width
        block_drop_paths = iter(drop_path_rates(drop_path_rate, sum(layers)))
        self.feature_info = []
        for index, (blocks, kernel) in enumerate(zip(layers, kernels)):
            channels = base_width * STAGE_WIDTH_FACTORS[index]
            setattr(self, f"conv{index}", nn.Conv2d(in_channels, channels, 1, pad_mode="valid", has_bias=False))
            setattr(self, f"bn{index}", BatchNorm2d(channels))
            setattr(self, f"layer{index}", nn.SequentialCell(
                [SANBottleneck(channels, kernel, share_planes, sam_options, next(block_drop_paths))
                 for _ in range(blocks)]))
            self.feature_info.append({"stage": index, "module": f"layer{index}", "channels": channels,
                                      "reduction": 2 ** (index + 1)})
            in_channels = channels
        self.num_features = in_channels
        self.fc = nn.Dense(in_channels, num_classes) if num_classes > 0 else nn.Identity()

        self.layers = layers
        self.kernels = kernels
        has_attention = sam_options.get("rate_mode", "learnable") != "conv"
        # Stage i works on floor(H / 2**(i+1)) px and its reflection pad kernel//2 must be smaller.
        self.min_input_size = max((kernel // 2 + 1) * 2 ** (index + 1) for index, kernel in enumerate(kernels)) \
            if has_attention else 2 ** NUM_STAGES

    def _check_input_size(self, x):
        if x.shape[2] < self.min_input_size or x.shape[3] < self.min_input_size:
            raise ValueError(f"input of {x.shape[2]}x{x.shape[3]} px is too small for SAN with kernels "
                             f"{self.kernels}: stage i runs at size // 2**(i+1) and its reflection padding "
                             f"kernel // 2 must be smaller, so at least {self.min_input_size} px per side are "
                             f"needed (use smaller late-stage kernels or a larger image)")

    def _stages(self, x):
        """The five stage outputs (B, C_i, H/r_i, W/r_i) of a (B, in_chans, H, W) input."""
        self._check_input_size(x)
        x = self.relu(self.bn_in(self.conv_in(x)))
        x0 = self.relu(self.bn0(self.layer0(self.conv0(self.pool(x)))))
        x1 = self.relu(self.bn1(self.layer1(self.conv1(self.pool(x0)))))
        x2 = self.relu(self.bn2(self.layer2(self.conv2(self.pool(x1)))))
        x3 = self.relu(self.bn3(self.layer3(self.conv3(self.pool(x2)))))
        x4 = self.relu(self.bn4(self.layer4(self.conv4(self.pool(x3)))))
        return x0, x1, x2, x3, x4


def _create_san(name, num_classes, in_chans, overrides, use_acmix, **defaults):
    """A registered configuration with user overrides (``build_model_with_cfg``): the structure options, and
    for SAN-ACmix the ``ACmixPatchwise`` options (gathered into ``sam_options``); the baseline's SAMs are
    attention only."""
    options = {**STRUCTURE_DEFAULTS, **defaults, "num_classes": num_classes, "in_chans": in_chans}
    if use_acmix:
        return build_model_with_cfg(SAN, name, options, overrides, groups={"sam_options": ACMIX_DEFAULTS})
    return build_model_with_cfg(SAN, name, options, overrides, fixed={"sam_options": {"rate_mode": "attention"}})


@register_model(paper={"params_m": 11.8, "gmacs": 1.9, "top1": 77.1})
def san10(num_classes=1000, in_chans=3, **overrides):
    """SAN-10 (patchwise): layers [2, 1, 2, 4, 1], kernels [3, 7, 7, 7, 7]."""
    return _create_san("san10", num_classes, in_chans, overrides, False, layers=(2, 1, 2, 4, 1))


@register_model(paper={"params_m": 16.2, "gmacs": 2.6, "top1": 78.0})
def san15(num_classes=1000, in_chans=3, **overrides):
    """SAN-15 (patchwise): layers [3, 2, 3, 5, 2], kernels [3, 7, 7, 7, 7]."""
    return _create_san("san15", num_classes, in_chans, overrides, False, layers=(3, 2, 3, 5, 2))


@register_model(paper={"params_m": 20.5, "gmacs": 3.3, "top1": 78.2})
def san19(num_classes=1000, in_chans=3, **overrides):
    """SAN-19 (patchwise): layers [3, 3, 4, 6, 3], kernels [3, 7, 7, 7, 7]."""
    return _create_san("san19", num_classes, in_chans, overrides, False, layers=(3, 3, 4, 6, 3))


@register_model(paper={"params_m": 12.1, "gmacs": 1.9, "top1": 77.6})
def san10_acmix(num_classes=1000, in_chans=3, **overrides):
    """SAN-ACmix-10: SAN-10 with the ACmix conv path in every SAM (the proposal of docs/operator.md)."""
    return _create_san("san10_acmix", num_classes, in_chans, overrides, True, layers=(2, 1, 2, 4, 1))


@register_model(paper={"params_m": 16.6, "gmacs": 2.7, "top1": 78.4})
def san15_acmix(num_classes=1000, in_chans=3, **overrides):
    """SAN-ACmix-15: SAN-15 with the ACmix conv path in every SAM."""
    return _create_san("san15_acmix", num_classes, in_chans, overrides, True, layers=(3, 2, 3, 5, 2))


@register_model(paper={"params_m": 21.2, "gmacs": 3.4, "top1": 78.7})
def san19_acmix(num_classes=1000, in_chans=3, **overrides):
    """SAN-ACmix-19: SAN-19 with the ACmix conv path in every SAM."""
    return _create_san("san19_acmix", num_classes, in_chans, overrides, True, layers=(3, 3, 4, 6, 3))
