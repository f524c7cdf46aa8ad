"""Semantic segmentation loss and metrics.

* ``SegmentationLoss``: per-pixel cross entropy averaged over the pixels whose label is not ``ignore_index``
  (torch's ``F.cross_entropy(..., ignore_index)``; mmseg's ``avg_non_ignore=True``), plus ``aux_weight``
  times the same loss of the auxiliary logits when the network returns (logits, aux_logits).
* ``confusion_matrix`` / ``SegmentationMeter``: a (K, K) confusion matrix (rows: ground truth, columns:
  prediction) accumulated over batches, without the ignored pixels; from it, per-class IoU
  TP / (TP + FP + FN), mIoU (mean over classes with a non-empty union: a class that is neither in the
  ground truth nor predicted has no IoU and is left out; a class only predicted has IoU 0), per-class
  accuracy, mean accuracy and pixel accuracy (as mmseg). ``all_reduce_confusion`` sums the matrices of
  the data-parallel ranks so every rank reports the metrics of the whole split.
"""
import numpy as np
import mindspore as ms
from mindspore import nn, ops

IGNORE_INDEX = 255


class SegmentationLoss(nn.Cell):
    """Inputs: logits (B, K, H, W) (any float dtype, computed in float32), or a tuple (logits, aux_logits);
    labels (B, H, W) int with values in [0, K) or ``ignore_index``. Output: scalar float32.

    With no valid pixel in the batch the loss is 0 (the denominator is clamped to 1).
    """

    def __init__(self, ignore_index=IGNORE_INDEX, aux_weight=0.4):
        super().__init__()
        self.ignore_index = int(ignore_index)
        self.aux_weight = float(aux_weight)
        self.log_softmax = nn.LogSoftmax(axis=1)

    def cross_entropy(self, logits, labels):
        logits = ops.cast(logits, ms.float32)
        labels = ops.cast(labels, ms.int32)
        valid = labels != self.ignore_index
        safe = ops.select(valid, labels, ops.zeros_like(labels))
        targets = ops.one_hot(safe, logits.shape[1], ms.Tensor(1.0, ms.float32), ms.Tensor(0.0, ms.float32))
        picked = (self.log_softmax(logits) * targets.transpose(0, 3, 1, 2)).sum(axis=1)  # (B, H, W)
        weight = ops.cast(valid, ms.float32)
        return -(picked * weight).sum() / ops.maximum(weight.sum(), 1.0)

    def construct(self, outputs, labels):
        if isinstance(outputs, tuple):
            return self.cross_entropy(outputs[0], labels) + self.aux_weight * self.cross_entropy(outputs[1], labels)
        return self.cross_entropy(outputs, labels)


def confusion_matrix(predictions, labels, num_classes, ignore_index=IGNORE_INDEX):
    """(K, K) int64 counts of (ground truth, prediction) pairs over the non-ignored pixels.

    Args:
        predictions: int array of class indices, any shape; labels: same shape.
    Raises:
        ValueError for mismatched shapes, a label outside [0, K) that is not ``ignore_index``, or a
        prediction outside [0, K).
    """
    predictions = np.asarray(predictions).astype(np.int64).reshape(-1)
    labels = np.asarray(labels)
    if labels.size != predictions.size:
        raise ValueError(f"predictions and labels differ in size: {predictions.size} vs {labels.size} pixels")
    labels = labels.astype(np.int64).reshape(-1)
    keep = labels != ignore_index
    labels, predictions = labels[keep], predictions[keep]
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        raise ValueError(f"labels hold values {sorted(set(labels[bad].tolist()))[:10]} outside [0, {num_classes}) "
                         f"that are not the ignore index {ignore_index}")
    if predictions.size and (predictions.min() < 0 or predictions.max() >= num_classes):
        raise ValueError(f"predictions must be class indices in [0, {num_classes})")
    return np.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)


def metrics_from_confusion(matrix):
    """{'miou', 'pixel_acc', 'mean_acc' (percent), 'iou', 'acc' (per class, percent or None), 'pixels'}."""
    matrix = np.asarray(matrix, np.float64)
    total = matrix.sum()
    if total == 0:
        raise ValueError("no labelled pixels were evaluated")
    tp = np.diag(matrix)
    gt = matrix.sum(axis=1)
    union = gt + matrix.sum(axis=0) - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(gt > 0, tp / gt, np.nan)
    return {"miou": 100.0 * float(np.nanmean(iou)), "pixel_acc": 100.0 * float(tp.sum() / total),
            "mean_acc": 100.0 * float(np.nanmean(acc)),
            "iou": [None if np.isnan(v) else 100.0 * float(v) for v in iou],
            "acc": [None if np.isnan(v) else 100.0 * float(v) for v in acc], "pixels": int(total)}


class SegmentationMeter:
    """Accumulates the confusion matrix of (logits or predicted indices, labels) batches.

    ``update(outputs, labels)``: outputs (B, K, H, W) logits (argmax over K) or (B, H, W) class indices;
    labels (B, H, W). ``result()``: ``metrics_from_confusion`` of the accumulated matrix plus the mean loss
    when losses were given.
    """

    def __init__(self, num_classes, ignore_index=IGNORE_INDEX):
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.matrix = np.zeros((self.num_classes, self.num_classes), np.int64)
        self.loss_sum, self.loss_count = 0.0, 0

    def update(self, outputs, labels, loss=None):
        outputs = np.asarray(outputs)
        labels = np.asarray(labels)
        if outputs.ndim == labels.ndim + 1:
            if outputs.shape[1] != self.num_classes:
                raise ValueError(f"logits have {outputs.shape[1]} classes, the meter expects {self.num_classes}")
            outputs = outputs.argmax(axis=1)
        if outputs.shape != labels.shape:
            raise ValueError(f"predictions {outputs.shape} and labels {labels.shape} differ in shape")
        self.matrix += confusion_matrix(outputs, labels, self.num_classes, self.ignore_index)
        if loss is not None:
            self.loss_sum += float(loss) * labels.shape[0]
            self.loss_count += labels.shape[0]

    def all_reduce(self, group_size):
        """Sum the matrix (and loss totals) over the data-parallel ranks (no-op for one rank)."""
        if group_size > 1:
            self.matrix = all_reduce_confusion(self.matrix)
            totals = _AllReduceSum()(ms.Tensor(np.array([self.loss_sum, self.loss_count], np.float32))).asnumpy()
            self.loss_sum, self.loss_count = float(totals[0]), int(round(float(totals[1])))
        return self

    def result(self):
        out = metrics_from_confusion(self.matrix)
        if self.loss_count:
            out["loss"] = self.loss_sum / self.loss_count
        return out


class _AllReduceSum(nn.Cell):
    def __init__(self):
        super().__init__()
        self.all_reduce = ops.AllReduce()

    def construct(self, x):
        return self.all_reduce(x)


DIGIT_BITS = 16  # float32 holds integers exactly up to 2**24: sums of 16-bit digits over up to 256 ranks


def all_reduce_confusion(matrix):
    """Element-wise sum of an int64 array over all ranks (collective communication must be initialised).

    AllReduce takes float32 on every backend (the CPU one only float32/float16), which is exact for
    integers below 2**24 only: the non-negative counts are split into 16-bit digits, each summed exactly
    in float32 (up to 256 ranks), and recombined in int64.
    """
    matrix = np.asarray(matrix, np.int64)
    if (matrix < 0).any():
        raise ValueError("all_reduce_confusion sums non-negative counts only")
    digits = []
    rest = matrix.copy()
    for _ in range(4):  # 64 bits
        digits.append(rest & ((1 << DIGIT_BITS) - 1))
        rest >>= DIGIT_BITS
    stacked = ms.Tensor(np.stack(digits).astype(np.float32))
    summed = np.rint(_AllReduceSum()(stacked).asnumpy()).astype(np.int64)
    total = np.zeros_like(matrix)
    for index in range(len(digits) - 1, -1, -1):
        total = (total << DIGIT_BITS) + summed[index]
    return total
