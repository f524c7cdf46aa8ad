"""Classification loss with label smoothing for hard (B,) or mixed soft (B, K) targets."""
import mindspore as ms
from mindspore import nn, ops


class SmoothedCrossEntropy(nn.Cell):
    """Mean cross entropy between softmax(logits) and smoothed targets.

    Targets are ``(1 - smoothing) * t + smoothing / K`` where ``t`` is the one-hot label (labels (B,) int)
    or the mixup/cutmix target (labels (B, K) float). Smoothing commutes with mixing, so both orders agree.

    Inputs: logits (B, K) of any float dtype (computed in float32), labels (B,) int or (B, K) float.
    Output: scalar float32.
    """

    def __init__(self, smoothing=0.0):
        super().__init__()
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        self.smoothing = float(smoothing)
        self.log_softmax = nn.LogSoftmax(axis=-1)

    def construct(self, logits, labels):
        logits = ops.cast(logits, ms.float32)
        num_classes = logits.shape[-1]
        if labels.ndim == 1:
            targets = ops.one_hot(labels, num_classes, ms.Tensor(1.0, ms.float32), ms.Tensor(0.0, ms.float32))
        else:
            targets = ops.cast(labels, ms.float32)
        targets = targets * (1.0 - self.smoothing) + self.smoothing / num_classes
        return -(targets * self.log_softmax(logits)).sum(axis=-1).mean()
