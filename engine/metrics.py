"""Classification metrics (top-1/top-5, loss, per-class accuracy) and the evaluation loop."""
import numpy as np


def _log_softmax(logits):
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


class ClassificationMeter:
    """Accumulates logits (B, K) and integer labels (B,) over batches.

    ``result()``: {'top1', 'top5' (percent), 'loss' (mean cross entropy, no smoothing), 'count'};
    top-5 becomes top-K when K < 5. ``confusion[true, predicted]`` counts the top-1 predictions.
    Meters of disjoint shards (data-parallel ranks) combine exactly through ``counts`` / ``add_counts``.
    """

    def __init__(self, num_classes):
        self.num_classes = int(num_classes)
        self.correct1 = 0
        self.correct5 = 0
        self.loss_sum = 0.0
        self.count = 0
        self.confusion = np.zeros((self.num_classes, self.num_classes), np.int64)

    @property
    def class_total(self):
        return self.confusion.sum(axis=1)

    @property
    def class_correct(self):
        return np.diagonal(self.confusion).copy()

    def counts(self):
        """Every accumulated count as one float64 vector: [top-1 hits, top-5 hits, samples, loss sum, confusion
        (K*K)]; sums of these vectors over shards give the meter of the union (see ``add_counts``)."""
        return np.concatenate([[self.correct1, self.correct5, self.count, self.loss_sum],
                               self.confusion.reshape(-1)]).astype(np.float64)

    def add_counts(self, vector):
        """Add a ``counts()`` vector (e.g. the sum over the other ranks)."""
        vector = np.asarray(vector, np.float64).reshape(-1)
        if vector.size != 4 + self.num_classes ** 2:
            raise ValueError(f"a counts vector of {self.num_classes} classes has {4 + self.num_classes ** 2} "
                             f"values, got {vector.size}")
        self.correct1 += int(round(vector[0]))
        self.correct5 += int(round(vector[1]))
        self.count += int(round(vector[2]))
        self.loss_sum += float(vector[3])
        self.confusion += np.rint(vector[4:]).astype(np.int64).reshape(self.confusion.shape)

    def update(self, logits, labels):
        logits = np.asarray(logits, np.float64)
        labels = np.asarray(labels).astype(np.int64).reshape(-1)
        if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
            raise ValueError(f"logits must be (B, K) and labels (B,), got {logits.shape} and {labels.shape}")
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"logits have {logits.shape[1]} classes, the meter expects {self.num_classes}")
        k = min(5, self.num_classes)
        top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
        hit1 = top[:, 0] == labels
        self.correct1 += int(hit1.sum())
        self.correct5 += int((top == labels[:, None]).any(axis=1).sum())
        self.loss_sum += float(-_log_softmax(logits)[np.arange(len(labels)), labels].sum())
        self.count += len(labels)
        np.add.at(self.confusion, (labels, top[:, 0]), 1)

    def result(self):
        if self.count == 0:
            raise ValueError("no samples were evaluated")
        return {"top1": 100.0 * self.correct1 / self.count, "top5": 100.0 * self.correct5 / self.count,
                "loss": self.loss_sum / self.count, "count": self.count}

    def per_class(self):
        """[(class index, accuracy percent or None when the class had no samples, samples)]."""
        return [(index, (100.0 * correct / total) if total else None, int(total))
                for index, (correct, total) in enumerate(zip(self.class_correct, self.class_total))]


def evaluate(predict, dataset, num_classes, fixed_batch=None, progress=None):
    """Run ``predict`` over a batched dataset of (images, labels).

    Args:
        predict: callable, float32 images (B, C, H, W) numpy -> logits (B, K) numpy.
        fixed_batch: if set (e.g. a MINDIR exported for one batch size), smaller batches are zero-padded to it
            and the padding rows are dropped from the logits.
        progress: an ``engine.logger.RateProgress`` over the images, or None.
    Returns:
        ClassificationMeter.
    """
    meter = ClassificationMeter(num_classes)
    for images, labels in dataset.create_tuple_iterator(num_epochs=1, output_numpy=True):
        size = images.shape[0]
        if fixed_batch is not None and size != fixed_batch:
            if size > fixed_batch:
                raise ValueError(f"batch of {size} is larger than the fixed batch size {fixed_batch}")
            padding = np.zeros((fixed_batch - size,) + images.shape[1:], images.dtype)
            images = np.concatenate([images, padding])
        logits = np.asarray(predict(images))[:size]
        meter.update(logits, labels)
        if progress is not None:
            progress.update(size)
    if progress is not None:
        progress.finish()
    return meter
