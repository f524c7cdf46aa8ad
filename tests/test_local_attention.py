"""The lean (offset-by-offset, hand-written backward) local attention equals the unfold reference,
forward and gradients, for strides, dilations and odd sizes (issue 7)."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn, ops

from acmix_ms.local_attention import LeanLocalAttention, UnfoldLocalAttention


class _Objective(nn.Cell):
    """A non-trivial scalar of the attention output, so every gradient entry is exercised."""

    def __init__(self, attention, pad, probe):
        super().__init__()
        self.attention, self.pad, self.probe = attention, pad, probe

    def construct(self, query, key, value):
        pad = (self.pad,) * 4
        out = self.attention(query, ops.pad(key, pad, mode="reflect"), ops.pad(value, pad, mode="reflect"))
        return (out * self.probe).sum()


@pytest.mark.parametrize("kernel,stride,dilation,size", [(3, 1, 1, 7), (5, 2, 1, 11), (3, 2, 2, 10)])
def test_lean_matches_unfold_forward_and_gradients(kernel, stride, dilation, size):
    rng = np.random.RandomState(kernel * 10 + stride)
    out_h = (size + stride - 1) // stride
    query = Tensor(rng.randn(3, 4, out_h, out_h).astype(np.float32))
    key, value = (Tensor(rng.randn(3, 4, size, size).astype(np.float32)) for _ in range(2))
    probe = Tensor(rng.randn(3, 4, out_h, out_h).astype(np.float32))
    pad = dilation * (kernel - 1) // 2
    results = []
    for impl in (UnfoldLocalAttention, LeanLocalAttention):
        objective = _Objective(impl(kernel, stride, dilation), pad, probe)
        value_and_grad = ms.value_and_grad(objective, grad_position=(0, 1, 2))
        loss, grads = value_and_grad(query, key, value)
        results.append([loss.asnumpy()] + [g.asnumpy() for g in grads])
    for reference, lean in zip(*results):
        np.testing.assert_allclose(lean, reference, rtol=1e-4, atol=1e-5)
    assert np.abs(results[0][2]).max() > 0  # the key gradient is not trivially zero
