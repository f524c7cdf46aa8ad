"""Box operations of the detectors, in MindSpore (graph mode, any device) with anchors built in NumPy.

Boxes are (x1, y1, x2, y2) in input pixels, width = x2 - x1 (no +1). The box coder is the standard
delta coder of R-CNN / RetinaNet (mmdetection's ``DeltaXYWHBBoxCoder`` with means 0 and stds 1):
dx = (gx - ax) / aw, dy = (gy - ay) / ah, dw = log(gw / aw), dh = log(gh / ah), with (x, y) box centres.
"""
import math

import numpy as np
import mindspore as ms
from mindspore import ops

# decoded widths/heights are at most exp(MAX_LOG_RATIO) = 62.5 times their anchor's (as in mmdetection)
MAX_LOG_RATIO = abs(math.log(16.0 / 1000.0))


def as_hw(image_size):
    """int or (H, W) -> (H, W) ints."""
    if isinstance(image_size, (tuple, list)):
        height, width = image_size
        return int(height), int(width)
    return int(image_size), int(image_size)


def level_sizes(image_size, strides):
    """(H_l, W_l) of each level: ceil(size / stride); ``image_size`` int or (H, W)."""
    height, width = as_hw(image_size)
    return [(-(-height // int(stride)), -(-width // int(stride))) for stride in strides]


def base_anchors(base_size, scales, ratios):
    """(len(ratios) * len(scales), 4) anchors centred on 0, ratio-major (ratio = height / width)."""
    rows = []
    for ratio in ratios:
        for scale in scales:
            width = base_size * scale / math.sqrt(ratio)
            height = base_size * scale * math.sqrt(ratio)
            rows.append((-width / 2, -height / 2, width / 2, height / 2))
    return np.asarray(rows, np.float64)


def generate_anchors(image_size, strides=(8, 16, 32, 64, 128), octave_base_scale=4, scales_per_octave=3,
                     ratios=(0.5, 1.0, 2.0)):
    """RetinaNet anchors of an input of ``image_size`` (int or (H, W)), in head output order (level, y, x, anchor).

    Level l (stride s) has anchors of side ``octave_base_scale * s * 2^(i / scales_per_octave)`` for
    i < scales_per_octave, at every aspect ratio, centred on the cells ((x + 0.5) s, (y + 0.5) s).
    Returns:
        anchors (N, 4) float32, and the number of anchors of each level.
    """
    scales = [2.0 ** (i / scales_per_octave) for i in range(scales_per_octave)]
    out, counts = [], []
    for stride, (rows, cols) in zip(strides, level_sizes(image_size, strides)):
        base = base_anchors(octave_base_scale * stride, scales, ratios)
        cy, cx = np.meshgrid((np.arange(rows, dtype=np.float64) + 0.5) * stride,
                             (np.arange(cols, dtype=np.float64) + 0.5) * stride, indexing="ij")
        shifts = np.stack([cx, cy, cx, cy], axis=-1).reshape(-1, 1, 4)
        level = (shifts + base[None]).reshape(-1, 4)
        out.append(level)
        counts.append(len(level))
    return np.concatenate(out).astype(np.float32), counts


def box_area(boxes):
    return ops.clamp(boxes[..., 2] - boxes[..., 0], min=0.0) * ops.clamp(boxes[..., 3] - boxes[..., 1], min=0.0)


def box_iou(boxes1, boxes2):
    """IoU of every pair: boxes1 (..., N, 4), boxes2 (..., M, 4) -> (..., N, M) float32 (0 for empty unions)."""
    top_left = ops.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    bottom_right = ops.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = ops.clamp(bottom_right - top_left, min=0.0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(boxes1)[..., :, None] + box_area(boxes2)[..., None, :] - inter
    return inter / ops.clamp(union, min=1e-6)


def _centre_size(boxes):
    width = boxes[..., 2] - boxes[..., 0]
    height = boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + 0.5 * width, boxes[..., 1] + 0.5 * height, width, height


def encode_boxes(boxes, anchors):
    """Regression targets (..., 4) of ``boxes`` relative to ``anchors`` (broadcastable, both (..., 4))."""
    gx, gy, gw, gh = _centre_size(boxes)
    ax, ay, aw, ah = _centre_size(anchors)
    gw = ops.clamp(gw, min=1e-6)
    gh = ops.clamp(gh, min=1e-6)
    return ops.stack([(gx - ax) / aw, (gy - ay) / ah, ops.log(gw / aw), ops.log(gh / ah)], axis=-1)


def decode_boxes(deltas, anchors, max_size=None):
    """Inverse of ``encode_boxes`` (dw, dh clamped to +-MAX_LOG_RATIO); clipped to the image when ``max_size``
    (a number, or a (4,) Tensor (W, H, W, H)) is given."""
    ax, ay, aw, ah = _centre_size(anchors)
    dw = ops.clamp(deltas[..., 2], -MAX_LOG_RATIO, MAX_LOG_RATIO)
    dh = ops.clamp(deltas[..., 3], -MAX_LOG_RATIO, MAX_LOG_RATIO)
    cx = ax + deltas[..., 0] * aw
    cy = ay + deltas[..., 1] * ah
    half_w = 0.5 * aw * ops.exp(dw)
    half_h = 0.5 * ah * ops.exp(dh)
    boxes = ops.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=-1)
    if max_size is not None:
        boxes = ops.clamp(boxes, ops.zeros_like(boxes), ops.zeros_like(boxes) + max_size)
    return boxes


def tensor(array):
    return ms.Tensor(np.asarray(array, np.float32))
