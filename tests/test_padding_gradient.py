"""``acmix_ms.spatial.zero_pad`` (the ``Pad`` primitive) equals NumPy zero padding, forward and gradient.

It replaces ``ops.pad``'s constant mode in ShiftConv('tensor'), ACmixWindow and the Swin patch
embedding/merging: that mode's gradient (PadV3Grad) was seen to hang after a few calls on CPU in
MindSpore 2.8 (ShiftConv's case is guarded by tests/test_analysis_tools.py). A repeated-backward check of a
padded Swin did not reproduce the hang, so no such test is kept here.
"""
import numpy as np
import mindspore as ms
from mindspore import nn

from acmix_ms.spatial import zero_pad

class _Padded(nn.Cell):
    def construct(self, x):
        return zero_pad(x, ((0, 0), (1, 2), (0, 3)))


class _PadLoss(nn.Cell):
    def __init__(self):
        super().__init__()
        self.pad = _Padded()

    def construct(self, x):
        padded = self.pad(x)
        return (padded * padded).sum()


def test_zero_pad_values_and_gradient():
    x = np.random.default_rng(1).standard_normal((2, 3, 4)).astype(np.float32)
    np.testing.assert_array_equal(_Padded()(ms.Tensor(x)).asnumpy(), np.pad(x, ((0, 0), (1, 2), (0, 3))))
    grad = ms.grad(_PadLoss())(ms.Tensor(x)).asnumpy()
    np.testing.assert_allclose(grad, 2 * x, rtol=1e-6)
