"""Sliding-window attention aggregation: the Stage II of ``ACmixLocal``, in two implementations.

Both take the strided queries and the reflection-padded keys and values of one head stack and return
``sum_p softmax_p(q . k_p) v_p`` over the k*k neighbours p of every output pixel:

- ``UnfoldLocalAttention``: stacks the k*k shifted views (like torch's Unfold) and lets autodiff do the
  rest. Simple, and the reference, but forward and backward hold (B*N, d, k*k, H, W) tensors: k*k = 49
  copies of the keys and of the values (official issues #13/#28: out of memory at batch 1).
- ``LeanLocalAttention``: walks the k*k offsets one at a time, keeping only the (B*N, k*k, H, W)
  attention weights, and has its own backward (``bprop``) that walks the offsets again, so neither pass
  stores k*k copies of anything d channels wide.

Shapes: query (BN, d, H', W'); key_pad, value_pad (BN, d, Hp, Wp) with
Hp >= (H'-1)*stride + (k-1)*dilation + 1. Output (BN, d, H', W').
"""
from mindspore import nn, ops

from .spatial import neighbourhood_slices


class UnfoldLocalAttention(nn.Cell):
    """Reference implementation: all k*k neighbours stacked at once."""

    def __init__(self, kernel_size, stride=1, dilation=1):
        super().__init__()
        self.kernel_size, self.stride, self.dilation = kernel_size, stride, dilation

    def construct(self, query, key_pad, value_pad):
        h_out, w_out = query.shape[2], query.shape[3]
        keys = ops.stack(neighbourhood_slices(key_pad, self.kernel_size, h_out, w_out, self.stride,
                                              self.dilation), 2)  # (BN, d, k*k, H', W')
        weights = ops.softmax((query.expand_dims(2) * keys).sum(1), 1)  # (BN, k*k, H', W')
        values = ops.stack(neighbourhood_slices(value_pad, self.kernel_size, h_out, w_out, self.stride,
                                                self.dilation), 2)
        return (weights.expand_dims(1) * values).sum(2)


class LeanLocalAttention(nn.Cell):
    """Offset-by-offset implementation with a hand-written backward; memory O(BN * k*k * H' * W')."""

    def __init__(self, kernel_size, stride=1, dilation=1):
        super().__init__()
        self.kernel_size, self.stride, self.dilation = kernel_size, stride, dilation
        self.aggregate = _LeanAggregation(kernel_size, stride, dilation)

    def construct(self, query, key_pad, value_pad):
        return self.aggregate(query, key_pad, value_pad)[0]


class _LeanAggregation(nn.Cell):
    """Returns (output, attention weights); the weights are returned so that ``bprop`` gets them for free."""

    def __init__(self, kernel_size, stride, dilation):
        super().__init__()
        self.kernel_size, self.stride, self.dilation = kernel_size, stride, dilation

    def _view(self, padded, p, h_out, w_out):
        """Neighbour p of every output pixel: (BN, C, H', W') view of the padded map."""
        top = (p // self.kernel_size) * self.dilation
        left = (p % self.kernel_size) * self.dilation
        return padded[:, :, top:top + (h_out - 1) * self.stride + 1:self.stride,
                      left:left + (w_out - 1) * self.stride + 1:self.stride]

    def _place(self, values, p, padded_h, padded_w):
        """Adjoint of ``_view``: (BN, C, H', W') -> zeros (BN, C, Hp, Wp) with ``values`` where view p reads."""
        batch, channels, h_out, w_out = values.shape
        s = self.stride
        if s > 1:  # spread the values s pixels apart
            values = ops.pad(values.reshape(batch, channels, h_out, 1, w_out, 1), (0, s - 1, 0, 0, 0, s - 1))
            values = values.reshape(batch, channels, h_out * s, w_out * s)
            values = values[:, :, :(h_out - 1) * s + 1, :(w_out - 1) * s + 1]
        top = (p // self.kernel_size) * self.dilation
        left = (p % self.kernel_size) * self.dilation
        span_h, span_w = values.shape[2], values.shape[3]
        return ops.pad(values, (left, padded_w - span_w - left, top, padded_h - span_h - top))

    def construct(self, query, key_pad, value_pad):
        h_out, w_out = query.shape[2], query.shape[3]
        k2 = self.kernel_size * self.kernel_size
        logits = ops.stack([(query * self._view(key_pad, p, h_out, w_out)).sum(1) for p in range(k2)], 1)
        weights = ops.softmax(logits, 1)  # (BN, k*k, H', W')
        out = weights[:, 0:1] * self._view(value_pad, 0, h_out, w_out)
        for p in range(1, k2):
            out = out + weights[:, p:p + 1] * self._view(value_pad, p, h_out, w_out)
        return out, weights

    def bprop(self, query, key_pad, value_pad, out, dout):
        weights, grad_out = out[1], dout[0]
        h_out, w_out = query.shape[2], query.shape[3]
        padded_h, padded_w = key_pad.shape[2], key_pad.shape[3]
        k2 = self.kernel_size * self.kernel_size
        # d loss / d weights, then through the softmax: dL = A * (dA - sum_p A_p dA_p)
        grad_weights = ops.stack([(grad_out * self._view(value_pad, p, h_out, w_out)).sum(1) for p in range(k2)], 1)
        grad_logits = weights * (grad_weights - (weights * grad_weights).sum(1, keepdims=True))
        grad_query = grad_logits[:, 0:1] * self._view(key_pad, 0, h_out, w_out)
        grad_key = self._place(grad_logits[:, 0:1] * query, 0, padded_h, padded_w)
        grad_value = self._place(weights[:, 0:1] * grad_out, 0, padded_h, padded_w)
        for p in range(1, k2):
            grad_query = grad_query + grad_logits[:, p:p + 1] * self._view(key_pad, p, h_out, w_out)
            grad_key = grad_key + self._place(grad_logits[:, p:p + 1] * query, p, padded_h, padded_w)
            grad_value = grad_value + self._place(weights[:, p:p + 1] * grad_out, p, padded_h, padded_w)
        return grad_query, grad_key, grad_value


LOCAL_ATTENTION_IMPLS = {"unfold": UnfoldLocalAttention, "lean": LeanLocalAttention}
