"""COCO box mAP: a NumPy implementation of COCOeval's bbox protocol, and pycocotools when it is installed.

``coco_map`` follows ``pycocotools.cocoeval.COCOeval`` for iouType 'bbox', area 'all', no crowd regions:
per (image, category) the ``max_detections`` best detections are matched greedily in score order to the
unmatched ground-truth box of highest IoU >= t (t in 0.50:0.05:0.95); per category and t, precision is
made non-increasing and read at the 101 recall points 0:0.01:1 (0 past the last recall); AP is the mean
over recall points, mAP the mean over categories that have ground truth and over t. mAP50 / mAP75 are
t = 0.5 / 0.75. Results are fractions in [0, 1]; categories without ground truth get -1 (as COCOeval).
"""
import numpy as np

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)


def iou_matrix(boxes1, boxes2):
    """(N, 4) x (M, 4) xyxy -> (N, M) IoU (float64)."""
    boxes1 = np.asarray(boxes1, np.float64).reshape(-1, 4)
    boxes2 = np.asarray(boxes2, np.float64).reshape(-1, 4)
    lt = np.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = np.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    union = area1[:, None] + area2[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def coco_map(gt_boxes, gt_labels, det_boxes, det_scores, det_labels, num_classes, max_detections=100):
    """COCO bbox mAP of per-image detections.

    Args:
        gt_boxes, gt_labels: per image, (n, 4) xyxy and (n,) class indices.
        det_boxes, det_scores, det_labels: per image, (d, 4), (d,), (d,) (entries with label < 0 are ignored).
    Returns:
        {"mAP", "mAP50", "mAP75", "per_class_AP" (list, -1 where a class has no ground truth)}.
    """
    num_t = len(IOU_THRESHOLDS)
    ap = -np.ones((num_t, num_classes))
    for cls in range(num_classes):
        scores_all, matches_all, npos = [], [], 0
        for image in range(len(gt_boxes)):
            gts = np.asarray(gt_boxes[image]).reshape(-1, 4)[np.asarray(gt_labels[image]) == cls]
            keep = np.asarray(det_labels[image]) == cls
            dets = np.asarray(det_boxes[image]).reshape(-1, 4)[keep]
            scores = np.asarray(det_scores[image], np.float64)[keep]
            order = np.argsort(-scores, kind="mergesort")[:max_detections]
            dets, scores = dets[order], scores[order]
            npos += len(gts)
            ious = iou_matrix(dets, gts)
            matched = np.zeros((num_t, len(dets)), bool)
            for t, threshold in enumerate(IOU_THRESHOLDS):
                taken = np.zeros(len(gts), bool)
                for d in range(len(dets)):
                    best, best_iou = -1, min(threshold, 1 - 1e-10)
                    for g in range(len(gts)):
                        if taken[g] or ious[d, g] < best_iou:
                            continue
                        best, best_iou = g, ious[d, g]
                    if best >= 0:
                        taken[best] = True
                        matched[t, d] = True
            scores_all.append(scores)
            matches_all.append(matched)
        if npos == 0:
            continue
        scores = np.concatenate(scores_all) if scores_all else np.zeros(0)
        matches = np.concatenate(matches_all, axis=1) if matches_all else np.zeros((num_t, 0), bool)
        order = np.argsort(-scores, kind="mergesort")
        matches = matches[:, order]
        tp = np.cumsum(matches, axis=1, dtype=np.float64)
        fp = np.cumsum(~matches, axis=1, dtype=np.float64)
        for t in range(num_t):
            recall = tp[t] / npos
            precision = tp[t] / np.maximum(tp[t] + fp[t], np.spacing(1))
            precision = np.maximum.accumulate(precision[::-1])[::-1] if len(precision) else precision
            positions = np.searchsorted(recall, RECALL_POINTS, side="left")
            sampled = np.array([precision[p] if p < len(precision) else 0.0 for p in positions])
            ap[t, cls] = sampled.mean()
    present = ap[0] >= 0

    def mean(values):
        return float(values.mean()) if values.size else 0.0
    return {"mAP": mean(ap[:, present]), "mAP50": mean(ap[0, present]), "mAP75": mean(ap[5, present]),
            "per_class_AP": [float(ap[:, c].mean()) if present[c] else -1.0 for c in range(num_classes)]}


def have_pycocotools():
    try:
        import pycocotools.cocoeval  # noqa: F401
    except ImportError:
        return False
    return True


def pycocotools_map(gt_boxes, gt_labels, det_boxes, det_scores, det_labels, num_classes, max_detections=100):
    """The same figures from pycocotools' COCOeval (needs ``pip install pycocotools``)."""
    import contextlib
    import io
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    images, annotations, results = [], [], []
    for image, (boxes, labels) in enumerate(zip(gt_boxes, gt_labels)):
        images.append({"id": image + 1})
        for box, label in zip(np.asarray(boxes).reshape(-1, 4), labels):
            x1, y1, x2, y2 = (float(v) for v in box)
            annotations.append({"id": len(annotations) + 1, "image_id": image + 1, "category_id": int(label) + 1,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
        for box, score, label in zip(np.asarray(det_boxes[image]).reshape(-1, 4), det_scores[image],
                                     det_labels[image]):
            if label < 0:
                continue
            x1, y1, x2, y2 = (float(v) for v in box)
            results.append({"image_id": image + 1, "category_id": int(label) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "score": float(score)})
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO()
        truth.dataset = {"images": images, "annotations": annotations,
                         "categories": [{"id": c + 1, "name": str(c)} for c in range(num_classes)]}
        truth.createIndex()
        if not results:
            return {"mAP": 0.0, "mAP50": 0.0, "mAP75": 0.0, "per_class_AP": [
                0.0 if any((np.asarray(l) == c).any() for l in gt_labels) else -1.0 for c in range(num_classes)]}
        detections = truth.loadRes(results)
        evaluator = COCOeval(truth, detections, "bbox")
        evaluator.params.maxDets = [1, 10, max_detections]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    precision = evaluator.eval["precision"][:, :, :, 0, -1]  # (T, R, K) at area 'all', maxDets[-1]
    per_class = []
    for c in range(num_classes):
        values = precision[:, :, c]
        per_class.append(float(values[values > -1].mean()) if (values > -1).any() else -1.0)
    return {"mAP": float(evaluator.stats[0]), "mAP50": float(evaluator.stats[1]), "mAP75": float(evaluator.stats[2]),
            "per_class_AP": per_class}
