"""Independent NumPy references of the RetinaNet pieces, written from the RetinaNet paper and mmdetection's
documented conventions (anchors, delta coder, max-IoU assignment, focal loss, greedy NMS), with explicit loops.
Never imports ``models`` or ``engine``. float64, tiny shapes.
"""
import math

import numpy as np


def anchors(image_size, strides=(8, 16, 32, 64, 128), octave_base_scale=4, scales_per_octave=3,
            ratios=(0.5, 1.0, 2.0)):
    rows = []
    for stride in strides:
        cells = math.ceil(image_size / stride)
        for y in range(cells):
            for x in range(cells):
                cx, cy = (x + 0.5) * stride, (y + 0.5) * stride
                for ratio in ratios:
                    for i in range(scales_per_octave):
                        side = octave_base_scale * stride * 2 ** (i / scales_per_octave)
                        w, h = side / math.sqrt(ratio), side * math.sqrt(ratio)
                        rows.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    return np.array(rows)


def iou(a, b):
    out = np.zeros((len(a), len(b)))
    for i, (ax1, ay1, ax2, ay2) in enumerate(a):
        for j, (bx1, by1, bx2, by2) in enumerate(b):
            iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
            ih = max(0.0, min(ay2, by2) - max(ay1, by1))
            inter = iw * ih
            union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
            out[i, j] = inter / union if union > 0 else 0.0
    return out


def encode(box, anchor):
    bw, bh = box[2] - box[0], box[3] - box[1]
    aw, ah = anchor[2] - anchor[0], anchor[3] - anchor[1]
    bx, by = box[0] + bw / 2, box[1] + bh / 2
    ax, ay = anchor[0] + aw / 2, anchor[1] + ah / 2
    return np.array([(bx - ax) / aw, (by - ay) / ah, math.log(bw / aw), math.log(bh / ah)])


def decode(delta, anchor, limit=abs(math.log(16 / 1000))):
    aw, ah = anchor[2] - anchor[0], anchor[3] - anchor[1]
    ax, ay = anchor[0] + aw / 2, anchor[1] + ah / 2
    cx, cy = ax + delta[0] * aw, ay + delta[1] * ah
    w = aw * math.exp(min(max(delta[2], -limit), limit))
    h = ah * math.exp(min(max(delta[3], -limit), limit))
    return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])


def assign(anchor_boxes, gt_boxes, pos_iou=0.5, neg_iou=0.4, low_quality=True, tie=1e-6):
    """Per anchor: (matched gt index, state) with state 1 positive, 0 negative, -1 ignored.

    Low-quality matches: every anchor whose IoU with a box is within a relative ``tie`` of that box's best is
    positive (float32 rounding may split such near-ties, so callers compare them apart).
    """
    n = len(anchor_boxes)
    if len(gt_boxes) == 0:
        return np.zeros(n, int), np.zeros(n, int)
    ious = iou(anchor_boxes, gt_boxes)
    matched = np.zeros(n, int)
    state = np.full(n, -1)
    for a in range(n):
        best = 0
        for g in range(len(gt_boxes)):
            if ious[a, g] > ious[a, best]:
                best = g
        matched[a] = best
        if ious[a, best] >= pos_iou:
            state[a] = 1
        elif ious[a, best] < neg_iou:
            state[a] = 0
    if low_quality:
        for g in range(len(gt_boxes)):
            top = ious[:, g].max()
            if top <= 0:
                continue
            for a in range(n):
                if ious[a, g] >= top * (1 - tie):
                    state[a] = 1
    return matched, state


def focal(logit, target, alpha=0.25, gamma=2.0):
    p = 1.0 / (1.0 + math.exp(-logit))
    if target == 1:
        return -alpha * (1 - p) ** gamma * math.log(p)
    return -(1 - alpha) * p ** gamma * math.log(1 - p)


def retinanet_loss(logits, deltas, anchor_boxes, gt_boxes, gt_labels, alpha=0.25, gamma=2.0):
    """Batch loss: (sum of focal over pos+neg anchors and classes + sum of L1 over positives) / #positives."""
    total_cls, total_box, positives = 0.0, 0.0, 0
    for b in range(len(logits)):
        matched, state = assign(anchor_boxes, gt_boxes[b])
        for a in range(len(anchor_boxes)):
            if state[a] < 0:
                continue
            for k in range(logits.shape[2]):
                target = 1 if state[a] == 1 and gt_labels[b][matched[a]] == k else 0
                total_cls += focal(logits[b, a, k], target, alpha, gamma)
            if state[a] == 1:
                positives += 1
                total_box += np.abs(deltas[b, a] - encode(gt_boxes[b][matched[a]], anchor_boxes[a])).sum()
    return (total_cls + total_box) / max(1, positives)


def greedy_nms(boxes, scores, threshold):
    """Indices kept by greedy NMS (highest score first; suppress IoU > threshold)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    keep = []
    for i in order:
        if all(iou(boxes[i:i + 1], boxes[j:j + 1])[0, 0] <= threshold for j in keep):
            keep.append(i)
    return keep


def detect(logits, deltas, anchor_boxes, level_counts, image_size, score_threshold, nms_iou, top_k, max_dets):
    """One image: per-level top-k (anchor, class), decode + clip, threshold, class-wise NMS, best max_dets.
    Returns a list of (score, label, box)."""
    num_classes = logits.shape[1]
    candidates, start = [], 0
    for count in level_counts:
        probs = 1.0 / (1.0 + np.exp(-logits[start:start + count]))
        flat = probs.reshape(-1)
        best = np.argsort(-flat, kind="stable")[:top_k]
        for index in best:
            anchor, label = divmod(int(index), num_classes)
            if flat[index] <= score_threshold:
                continue
            box = np.clip(decode(deltas[start + anchor], anchor_boxes[start + anchor]), 0, image_size)
            candidates.append((float(flat[index]), label, box))
        start += count
    kept = []
    for label in range(num_classes):
        same = [c for c in candidates if c[1] == label]
        if same:
            keep = greedy_nms(np.array([c[2] for c in same]), [c[0] for c in same], nms_iou)
            kept += [same[i] for i in keep]
    kept.sort(key=lambda c: -c[0])
    return kept[:max_dets]
