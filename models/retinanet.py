"""RetinaNet (Lin et al., "Focal Loss for Dense Object Detection") on any registered backbone.

The backbone is a registered classifier built with ``num_classes=0`` and ``out_indices`` picking its stages
of stride 8, 16 and 32 (C3-C5, from its ``feature_info``). On top, as in the paper and mmdetection:

* ``FPN``: 1x1 lateral convolutions to 256 channels, top-down nearest upsampling and addition, 3x3 output
  convolutions -> P3-P5; P6 = 3x3/2 convolution of C5, P7 = 3x3/2 convolution of ReLU(P6).
* ``RetinaHead``: shared over the levels, a class and a box tower of 4 (3x3 conv 256 + ReLU) each, then a
  3x3 convolution to A x K class logits (bias log(p / (1 - p)), prior p = 0.01) and A x 4 box deltas;
  weights N(0, 0.01).
* anchors: per level of stride s, sides 4s x 2^(0, 1/3, 2/3) at aspect ratios 0.5, 1, 2 (A = 9), centred
  on the cells (``models.boxes.generate_anchors``).
* ``RetinaNetLoss``: anchors with IoU >= 0.5 to their best ground-truth box are positive, < 0.4 negative,
  the rest ignored; each ground-truth box's best anchors are also positive (low-quality matches, as in
  mmdetection and torchvision); sigmoid focal loss (alpha 0.25, gamma 2) over positive and negative anchors
  and L1 loss of the box deltas of the positives, both divided by the number of positives.
* ``RetinaNetDetect``: per level the top ``pre_nms_top_k`` (anchor, class) scores, box decoding, score
  threshold, class-wise NMS (``ops.NMSWithMask``, in the graph on CPU, GPU and Ascend), the best
  ``max_detections`` per image.

Inputs: (B, in_chans, S, S) with S = ``img_size`` (a multiple of 32; anchors are built for it).
``RetinaNet`` outputs: class logits (B, N, K) and box deltas (B, N, 4) for the N anchors.
"""
import math

import numpy as np
import mindspore as ms
from mindspore import nn, ops
from mindspore.common.initializer import Normal, XavierUniform, initializer

from acmix_ms.layout import Permute

from .boxes import as_hw, box_iou, decode_boxes, encode_boxes, generate_anchors
from .registry import create_model, register_model

STRIDE_MULTIPLE = 32
BACKBONE_REDUCTIONS = (8, 16, 32)
LEVEL_STRIDES = (8, 16, 32, 64, 128)


def _conv(in_channels, out_channels, kernel, stride=1, weight_init=None, bias_init="zeros"):
    return nn.Conv2d(in_channels, out_channels, kernel, stride=stride, pad_mode="pad", padding=kernel // 2,
                     has_bias=True, weight_init=weight_init or XavierUniform(), bias_init=bias_init)


class FPN(nn.Cell):
    """(C3, C4, C5) -> (P3, P4, P5, P6, P7), each (B, out_channels, ceil(S / stride), ...)."""

    def __init__(self, in_channels, out_channels=256):
        super().__init__()
        self.lateral = nn.CellList([_conv(c, out_channels, 1) for c in in_channels])
        self.output = nn.CellList([_conv(out_channels, out_channels, 3) for _ in in_channels])
        self.p6 = _conv(in_channels[-1], out_channels, 3, stride=2)
        self.p7 = _conv(out_channels, out_channels, 3, stride=2)
        self.relu = nn.ReLU()

    def construct(self, c3, c4, c5):
        l5 = self.lateral[2](c5)
        l4 = self.lateral[1](c4) + ops.interpolate(l5, size=c4.shape[2:], mode="nearest")
        l3 = self.lateral[0](c3) + ops.interpolate(l4, size=c3.shape[2:], mode="nearest")
        p6 = self.p6(c5)
        p7 = self.p7(self.relu(p6))
        return self.output[0](l3), self.output[1](l4), self.output[2](l5), p6, p7


class RetinaHead(nn.Cell):
    """Shared class and box towers. Input: tuple of (B, C, H_l, W_l); outputs (B, N, K) and (B, N, 4), anchors
    ordered (level, y, x, anchor)."""

    def __init__(self, num_classes, num_anchors=9, in_channels=256, feat_channels=256, stacked_convs=4,
                 prior_prob=0.01):
        super().__init__()
        self.num_classes = num_classes
        self.num_anchors = num_anchors

        def tower():
            layers = []
            for i in range(stacked_convs):
                layers += [_conv(in_channels if i == 0 else feat_channels, feat_channels, 3, weight_init=Normal(0.01)),
                           nn.ReLU()]
            return nn.SequentialCell(layers) if layers else nn.Identity()

        self.cls_tower = tower()
        self.box_tower = tower()
        channels = feat_channels if stacked_convs else in_channels
        prior_bias = -math.log((1.0 - prior_prob) / prior_prob)
        self.cls_out = _conv(channels, num_anchors * num_classes, 3, weight_init=Normal(0.01),
                             bias_init=initializer(prior_bias, [num_anchors * num_classes]))
        self.box_out = _conv(channels, num_anchors * 4, 3, weight_init=Normal(0.01))
        self.to_channels_last = Permute((0, 2, 3, 1))  # (B, A*K, H, W) -> (B, H, W, A*K)

    def _flatten(self, x, width):
        batch = x.shape[0]
        return self.to_channels_last(x).reshape(batch, -1, width)

    def construct(self, features):
        logits, deltas = (), ()
        for feature in features:
            logits = logits + (self._flatten(self.cls_out(self.cls_tower(feature)), self.num_classes),)
            deltas = deltas + (self._flatten(self.box_out(self.box_tower(feature)), 4),)
        return ops.cat(logits, axis=1), ops.cat(deltas, axis=1)


def build_backbone(name, in_chans=3, img_size=None, out_indices=(1, 2, 3), **kwargs):
    """Registered classifier ``name`` without head, returning its stage maps ``out_indices``, which must be the
    stride-8/16/32 stages (C3-C5; stages 1-3 of the 4-stage families). Built for ``img_size`` when its
    constructor takes one (position embeddings, windows). Returns (network, channels of C3-C5)."""
    common = dict(kwargs, num_classes=0, in_chans=in_chans, out_indices=tuple(out_indices))
    try:
        net = create_model(name, **dict(common, img_size=img_size)) if img_size else create_model(name, **common)
    except TypeError as err:
        if "img_size" not in str(err):
            raise
        net = create_model(name, **common)
    info = getattr(net, "feature_info", None)
    if not info:
        raise ValueError(f"backbone {name!r} has no feature_info: it cannot feed an FPN")
    reductions = tuple(info[i]["reduction"] for i in net.out_indices)
    if reductions != BACKBONE_REDUCTIONS:
        raise ValueError(f"backbone {name!r} stages {tuple(out_indices)} have strides {reductions}; an FPN needs "
                         f"{BACKBONE_REDUCTIONS} (its strides: {[stage['reduction'] for stage in info]})")
    return net, [info[i]["channels"] for i in net.out_indices]


class RetinaNet(nn.Cell):
    """RetinaNet detector.

    Args:
        backbone: registered classifier name (any family with ``feature_info`` and ``out_indices``).
        num_classes: object classes K (no background class: sigmoid scores).
        img_size: input side (or (H, W)) the anchors are built for, multiples of 32.
        in_chans, backbone_kwargs: passed to the backbone (e.g. ``{"embed_dims": [...]}``).
        fpn_channels, head_convs, head_channels, prior_prob: FPN width, tower depth/width, class-bias prior.
        octave_base_scale, scales_per_octave, ratios: anchors (see ``models.boxes.generate_anchors``).
    Inputs: (B, in_chans, H, W) = img_size. Outputs: logits (B, N, K), deltas (B, N, 4).
    """

    def __init__(self, backbone, num_classes=80, img_size=512, in_chans=3, backbone_kwargs=None, fpn_channels=256,
                 head_convs=4, head_channels=256, prior_prob=0.01, octave_base_scale=4, scales_per_octave=3,
                 ratios=(0.5, 1.0, 2.0)):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 for a detector, got {num_classes}")
        height, width = as_hw(img_size)
        if min(height, width) < STRIDE_MULTIPLE or height % STRIDE_MULTIPLE or width % STRIDE_MULTIPLE:
            raise ValueError(f"img_size must be a multiple of {STRIDE_MULTIPLE} (the backbone's C3-C5 maps are "
                             f"1/8 to 1/32 of the input), got {img_size}")
        self.backbone_name = backbone
        self.backbone, channels = build_backbone(backbone, in_chans, img_size, **dict(backbone_kwargs or {}))
        self.fpn = FPN(channels, fpn_channels)
        self.num_anchors = len(ratios) * scales_per_octave
        self.head = RetinaHead(num_classes, self.num_anchors, fpn_channels, head_channels, head_convs, prior_prob)
        self.num_classes = num_classes
        self.img_size = img_size
        self.input_hw = (height, width)
        anchors, counts = generate_anchors(img_size, LEVEL_STRIDES, octave_base_scale, scales_per_octave, ratios)
        self.anchors_np = anchors
        self.level_counts = tuple(counts)
        self.anchors = ms.Tensor(anchors)
        self.min_input_size = max(STRIDE_MULTIPLE, int(getattr(self.backbone, "min_input_size", 1) or 1))

    def construct(self, x):
        if x.shape[2] != self.input_hw[0] or x.shape[3] != self.input_hw[1]:
            raise ValueError(f"RetinaNet was built for {self.input_hw[0]}x{self.input_hw[1]} inputs (its anchors), "
                             f"got {x.shape[2]}x{x.shape[3]}")
        c3, c4, c5 = self.backbone(x)
        return self.head(self.fpn(c3, c4, c5))


def sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0):
    """Element-wise focal loss: -alpha_t (1 - p_t)^gamma log(p_t), p = sigmoid(logits); float32 like inputs."""
    prob = ops.sigmoid(logits)
    ce = ops.relu(logits) - logits * targets + ops.log1p(ops.exp(-ops.abs(logits)))
    p_t = prob * targets + (1.0 - prob) * (1.0 - targets)
    alpha_t = alpha * targets + (1.0 - alpha) * (1.0 - targets)
    return alpha_t * ops.pow(1.0 - p_t, gamma) * ce


def assign_anchors(anchors, gt_boxes, gt_valid, pos_iou=0.5, neg_iou=0.4, low_quality=True):
    """Match anchors (N, 4) to ground-truth boxes (B, M, 4) with validity (B, M) bool.

    Returns:
        matched (B, N) int32 index of each anchor's best box, positive (B, N) bool, negative (B, N) bool.
    """
    iou = box_iou(anchors[None], gt_boxes)  # (B, N, M)
    iou = ops.where(gt_valid[:, None, :], iou, ops.full_like(iou, -1.0))
    max_iou = iou.max(axis=2)
    matched = iou.argmax(axis=2).astype(ms.int32)
    positive = max_iou >= pos_iou
    if low_quality:
        best = iou.max(axis=1, keepdims=True)  # (B, 1, M): each box's best IoU over the anchors
        is_best = ops.logical_and(iou == best, ops.logical_and(gt_valid[:, None, :], best > 0.0))
        positive = ops.logical_or(positive, is_best.any(axis=2))
    negative = ops.logical_and(max_iou < neg_iou, ops.logical_not(positive))
    return matched, positive, negative


class RetinaNetLoss(nn.Cell):
    """(images, targets) -> scalar loss of a RetinaNet (or its mixed-precision wrapper).

    ``targets`` (B, M, 5) float32: M boxes (x1, y1, x2, y2) in input pixels and the class index 0..K-1 in
    column 4; rows with class -1 are padding.
    """

    def __init__(self, network, anchors, num_classes, pos_iou=0.5, neg_iou=0.4, alpha=0.25, gamma=2.0,
                 box_weight=1.0, low_quality=True):
        super().__init__()
        self.network = network
        self.anchors = ms.Tensor(np.asarray(anchors, np.float32))
        self.num_classes = num_classes
        self.pos_iou, self.neg_iou, self.low_quality = float(pos_iou), float(neg_iou), bool(low_quality)
        self.alpha, self.gamma, self.box_weight = float(alpha), float(gamma), float(box_weight)

    def construct(self, images, targets):
        logits, deltas = self.network(images)
        logits = logits.astype(ms.float32)
        deltas = deltas.astype(ms.float32)
        gt_boxes = targets[:, :, :4]
        gt_labels = targets[:, :, 4]
        valid = gt_labels >= 0
        matched, positive, negative = assign_anchors(self.anchors, gt_boxes, valid, self.pos_iou, self.neg_iou,
                                                     self.low_quality)
        choose = ops.one_hot(matched, gt_boxes.shape[1], ms.Tensor(1.0, ms.float32), ms.Tensor(0.0, ms.float32))
        matched_boxes = ops.bmm(choose, gt_boxes)  # (B, N, 4)
        matched_labels = (choose * gt_labels[:, None, :]).sum(axis=2).astype(ms.int32)
        pos = positive.astype(ms.float32)
        num_pos = ops.clamp(pos.sum(), min=1.0)
        cls_targets = ops.one_hot(ops.clamp(matched_labels, min=0), self.num_classes, ms.Tensor(1.0, ms.float32),
                                  ms.Tensor(0.0, ms.float32)) * pos[..., None]
        weights = ops.logical_or(positive, negative).astype(ms.float32)
        cls_loss = (sigmoid_focal_loss(logits, cls_targets, self.alpha, self.gamma) * weights[..., None]).sum()
        box_targets = encode_boxes(matched_boxes, self.anchors[None])
        box_loss = (ops.abs(deltas - box_targets).sum(axis=2) * pos).sum()
        return (cls_loss + self.box_weight * box_loss) / num_pos


class RetinaNetDetect(nn.Cell):
    """images (B, C, S, S) -> boxes (B, D, 4) float32 (input pixels, clipped), scores (B, D) float32,
    labels (B, D) int32 (-1 and score 0 in unused slots), D = min(max_detections, candidates).

    Per level the ``pre_nms_top_k`` best (anchor, class) scores are decoded; scores <= ``score_threshold`` are
    dropped; class-wise NMS at ``nms_iou`` (boxes of different classes are offset apart, then one
    ``ops.NMSWithMask`` per image); the best ``max_detections`` remain, by score. ``network``: what computes
    the raw outputs (default ``model``; e.g. its mixed-precision wrapper).
    """

    def __init__(self, model, score_threshold=0.05, nms_iou=0.5, pre_nms_top_k=1000, max_detections=100,
                 network=None):
        super().__init__()
        self.model = network if network is not None else model
        self.anchors = ms.Tensor(model.anchors_np)
        self.num_classes = model.num_classes
        height, width = as_hw(getattr(model, "input_hw", model.img_size))
        self.bounds_wh = ms.Tensor(np.array([width, height, width, height], np.float32))
        self.class_offset = float(max(height, width) + 1)
        self.score_threshold = float(score_threshold)
        bounds, start = [], 0
        for count in model.level_counts:
            bounds.append((start, start + count, min(pre_nms_top_k, count * model.num_classes)))
            start += count
        self.bounds = tuple(bounds)
        self.candidates = sum(k for _, _, k in bounds)
        self.max_detections = min(int(max_detections), self.candidates)
        self.nms = ops.NMSWithMask(float(nms_iou))

    def construct(self, images):
        logits, deltas = self.model(images)
        logits = logits.astype(ms.float32)
        deltas = deltas.astype(ms.float32)
        batch = logits.shape[0]
        boxes, scores, labels = (), (), ()
        for start, end, top_k in self.bounds:
            level_scores = ops.sigmoid(logits[:, start:end]).reshape(batch, -1)
            values, index = ops.topk(level_scores, top_k)
            anchor = index // self.num_classes
            gather_index = ops.broadcast_to(anchor[..., None], (batch, top_k, 4))
            level_deltas = ops.gather_elements(deltas[:, start:end], 1, gather_index)
            level_anchors = ops.gather(self.anchors[start:end], anchor, 0)
            boxes = boxes + (decode_boxes(level_deltas, level_anchors, self.bounds_wh),)
            scores = scores + (values,)
            labels = labels + ((index % self.num_classes).astype(ms.int32),)
        boxes = ops.cat(boxes, axis=1)
        scores = ops.cat(scores, axis=1)
        labels = ops.cat(labels, axis=1)
        scores = ops.where(scores > self.score_threshold, scores, ops.zeros_like(scores))
        out_boxes, out_scores, out_labels = (), (), ()
        for b in range(batch):
            # NMSWithMask's mask follows its score-sorted output (its index output differs between devices), so
            # the candidates go in sorted already and the mask is read by position
            sorted_scores, order = ops.topk(scores[b], self.candidates)
            sorted_boxes = ops.gather(boxes[b], order, 0)
            offset = (ops.gather(labels[b], order, 0).astype(ms.float32) * self.class_offset)[:, None]
            _, _, keep = self.nms(ops.cat([sorted_boxes + offset, sorted_scores[:, None]], axis=1))
            kept = ops.where(keep, sorted_scores, ops.zeros_like(sorted_scores))
            best, position = ops.topk(kept, self.max_detections)
            chosen = ops.gather(order, position, 0)
            out_boxes = out_boxes + (ops.gather(boxes[b], chosen, 0),)
            out_scores = out_scores + (best,)
            out_labels = out_labels + (ops.where(best > 0, ops.gather(labels[b], chosen, 0),
                                                 ops.full_like(chosen, -1)),)
        return ops.stack(out_boxes), ops.stack(out_scores), ops.stack(out_labels)


def _retinanet(backbone, num_classes, in_chans, overrides):
    return RetinaNet(backbone, num_classes=num_classes, in_chans=in_chans, **overrides)


def _register(name, backbone, paper):
    def constructor(num_classes=80, in_chans=3, **overrides):
        return _retinanet(backbone, num_classes, in_chans, overrides)
    constructor.__name__ = name
    constructor.__doc__ = f"RetinaNet (FPN P3-P7) on {backbone}; inputs (B, 3, img_size, img_size)."
    return register_model(constructor, paper=paper, task="detection")


# the paper's detection FLOPs (Tables 3/4, at 1280x800) and Table 5 (mAP, FPS at 3x576x576 on Ascend 910)
DETECTORS = {
    "retinanet_resnet50": ("resnet50", {"gflops": 250, "map": 36.7}),
    "retinanet_resnet50_acmix": ("resnet50_acmix", {"gflops": 230, "map": 38.3}),
    "retinanet_pvt_tiny": ("pvt_tiny", {"gflops": 230, "map": 36.7}),
    "retinanet_pvt_tiny_acmix": ("pvt_tiny_acmix", {"gflops": 232, "map": 40.5}),
    "retinanet_pvt_small": ("pvt_small", {"map": 42.2, "fps": 50.3}),
    "retinanet_pvt_small_acmix": ("pvt_small_acmix", {"map": 42.0, "fps": 67.7}),
    "retinanet_pvt_large": ("pvt_large", {"map": 43.4, "fps": 24.3}),
    "retinanet_pvt_large_acmix": ("pvt_large_acmix", {"map": 45.3, "fps": 43.9}),
    "retinanet_swin_tiny": ("swin_tiny", {}),
    "retinanet_swin_tiny_acmix": ("swin_tiny_acmix", {}),
}
for _name, (_backbone, _paper) in DETECTORS.items():
    globals()[_name] = _register(_name, _backbone, _paper)
