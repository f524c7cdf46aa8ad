"""Sliding-window attention aggregation: the Stage II of ``ACmixLocal``, in three implementations and a default.

One table, ``LOCAL_ATTENTION_IMPLS``, names them all ('auto', 'unfold', 'lean', 'fused'), with one interface:
``LOCAL_ATTENTION_IMPLS[name](kernel_size, stride=1, dilation=1, device_target=None)`` builds a
``LocalAttention`` Cell mapping (query, key_pad, value_pad) to the output, whose ``backend`` names what runs
('unfold', 'lean' or the device target of a kernel) and ``uses_kernel`` says whether that is a device kernel.
All return ``sum_p softmax_p(q . k_p) v_p`` over the k*k neighbours p of every output pixel:

- ``UnfoldLocalAttention``: stacks the k*k shifted views (like torch's Unfold) and lets autodiff do the
  rest. Simple, and the reference, but forward and backward hold (B*N, d, k*k, H, W) tensors: k*k = 49
  copies of the keys and of the values (official issues #13/#28: out of memory at batch 1).
- ``LeanLocalAttention``: walks the k*k offsets one at a time, keeping only the (B*N, k*k, H, W)
  attention weights, and has its own backward (``bprop``) that walks the offsets again, so neither pass
  stores k*k copies of anything d channels wide (see ``_after`` and ``_scaled`` for what that takes on CPU).
- ``FusedLocalAttention``: the same algorithm as one fused kernel per pass where the device has one
  (registered in ``DEVICE_AGGREGATIONS``: the C++ kernels of ``acmix_ms.kernels`` on CPU), else the lean
  Cell. An Ascend/GPU kernel plugs in with ``register_device_aggregation`` without touching the models.
- ``'auto'`` (the default of ``ACmixLocal``): the device's fused kernel where one is registered and builds,
  else the unfold reference. The kernel wins on CPU on speed and memory at every measured shape
  (docs/local_attention.md); where no kernel exists nothing has been measured, so nothing changes there.

Choosing an implementation never changes parameters or results: a checkpoint trained with one loads into
any other, and ``acmix_ms.set_attention_impl(net, impl, only_kernels=True)`` swaps kernels out of a built
network before MINDIR export (``engine.export.make_exportable``).

Shapes: query (BN, d, H', W'); key_pad, value_pad (BN, d, Hp, Wp) with
Hp >= (H'-1)*stride + (k-1)*dilation + 1. Output (BN, d, H', W').
"""
import warnings
from typing import Callable, Optional, Sequence

import mindspore as ms
from mindspore import Tensor, nn, ops

from .constants import DEVICE_TARGETS, PORTABLE_IMPLS
from .spatial import neighbourhood_slices


class LocalAttention(nn.Cell):
    """The interface of every implementation in ``LOCAL_ATTENTION_IMPLS``.

    Args:
        kernel_size: k (odd), the attention window.
        stride: output pixel spacing.
        dilation: spacing of the neighbours.
        device_target: the device whose kernel to use (``FusedLocalAttention``); None: the context's. The
            portable implementations run anywhere and ignore it.

    Inputs: query (BN, d, H', W'), key_pad and value_pad (BN, d, Hp, Wp). Output: (BN, d, H', W').
    ``backend``: what runs ('unfold', 'lean' or a device target); ``uses_kernel``: a device kernel
    (``ops.Custom``) runs, so an exported MINDIR would refer to this machine's compiled library.
    """
    backend = None
    uses_kernel = False

    def __init__(self, kernel_size: int, stride: int = 1, dilation: int = 1, device_target: Optional[str] = None):
        super().__init__()
        self.kernel_size, self.stride, self.dilation = kernel_size, stride, dilation


class UnfoldLocalAttention(LocalAttention):
    """Reference implementation: all k*k neighbours stacked at once."""
    backend = "unfold"

    def construct(self, query: Tensor, key_pad: Tensor, value_pad: Tensor) -> Tensor:
        h_out, w_out = query.shape[2], query.shape[3]
        keys = ops.stack(neighbourhood_slices(key_pad, self.kernel_size, h_out, w_out, self.stride,
                                              self.dilation), 2)  # (BN, d, k*k, H', W')
        weights = ops.softmax((query.expand_dims(2) * keys).sum(1), 1)  # (BN, k*k, H', W')
        values = ops.stack(neighbourhood_slices(value_pad, self.kernel_size, h_out, w_out, self.stride,
                                                self.dilation), 2)
        return (weights.expand_dims(1) * values).sum(2)


class LeanLocalAttention(LocalAttention):
    """Offset-by-offset implementation with a hand-written backward; memory O(BN * k*k * H' * W')."""
    backend = "lean"

    def __init__(self, kernel_size: int, stride: int = 1, dilation: int = 1, device_target: Optional[str] = None):
        super().__init__(kernel_size, stride, dilation)
        self.aggregate = _LeanAggregation(kernel_size, stride, dilation)

    def construct(self, query: Tensor, key_pad: Tensor, value_pad: Tensor) -> Tensor:
        return self.aggregate(query, key_pad, value_pad)[0]


def _after(tensor, anchor):
    """``tensor``, but computed only once ``anchor`` is: keeps the unrolled offsets in order.

    Why: the k*k shifted views (slices, pads) depend only on the inputs, so MindSpore's CPU scheduler runs
    them all before the accumulation that consumes them and holds k*k of them at once; chaining each to
    the running sum lets every one be freed before the next is made.
    """
    return ops.depend(tensor, anchor)


def _scaled(weight, tensor):
    """weight (BN, 1, H', W') * tensor (BN, C, H', W'), broadcast explicitly, after ``tensor`` exists.

    Why: on the MindSpore 2.8 CPU backend an implicitly broadcasting binary op keeps about four times its
    output size alive until the graph ends; ``broadcast_to`` then a same-shape product is freed at once.
    """
    return ops.broadcast_to(_after(weight, tensor), tensor.shape) * tensor


class _LeanAggregation(nn.Cell):
    """Returns (output, attention weights); the weights are returned so that ``bprop`` gets them for free.

    Every loop over the offsets is a chain (see ``_after``), so only O(1) tensors d channels wide are alive.
    """

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

    def _correlate(self, dense, padded, h_out, w_out):
        """(BN, k*k, H', W'): channel sums of ``dense`` (BN, C, H', W') times each view of ``padded``."""
        products = [(dense * self._view(padded, 0, h_out, w_out)).sum(1)]
        for p in range(1, self.kernel_size * self.kernel_size):
            products.append((dense * self._view(_after(padded, products[-1]), p, h_out, w_out)).sum(1))
        return ops.stack(products, 1)

    def _gather(self, weights, padded, h_out, w_out):
        """(BN, C, H', W'): sum over p of weights[:, p] times view p of ``padded``."""
        out = _scaled(weights[:, 0:1], self._view(padded, 0, h_out, w_out))
        for p in range(1, self.kernel_size * self.kernel_size):
            out = out + _scaled(weights[:, p:p + 1], self._view(_after(padded, out), p, h_out, w_out))
        return out

    def _scatter(self, weights, dense, padded_h, padded_w):
        """Adjoint of ``_gather`` w.r.t. ``padded``: (BN, C, Hp, Wp) = sum over p of place_p(weights[:, p] * dense)."""
        grad = self._place(_scaled(weights[:, 0:1], dense), 0, padded_h, padded_w)
        for p in range(1, self.kernel_size * self.kernel_size):
            grad = grad + self._place(_scaled(weights[:, p:p + 1], _after(dense, grad)), p, padded_h, padded_w)
        return grad

    def construct(self, query, key_pad, value_pad):
        h_out, w_out = query.shape[2], query.shape[3]
        weights = ops.softmax(self._correlate(query, key_pad, h_out, w_out), 1)  # (BN, k*k, H', W')
        return self._gather(weights, value_pad, h_out, w_out), weights

    def bprop(self, query, key_pad, value_pad, out, dout):
        weights, grad_out = out[1], dout[0]
        h_out, w_out = query.shape[2], query.shape[3]
        padded_h, padded_w = key_pad.shape[2], key_pad.shape[3]
        # d loss / d weights, then through the softmax: dL = A * (dA - sum_p A_p dA_p)
        grad_weights = self._correlate(grad_out, value_pad, h_out, w_out)
        total = ops.broadcast_to((weights * grad_weights).sum(1, keepdims=True), weights.shape)
        grad_logits = weights * (grad_weights - total)
        grad_query = self._gather(grad_logits, key_pad, h_out, w_out)
        grad_key = self._scatter(grad_logits, query, padded_h, padded_w)
        grad_value = self._scatter(weights, _after(grad_out, grad_key), padded_h, padded_w)
        return grad_query, grad_key, grad_value


def _cpu_aggregation(kernel_size, stride, dilation):
    from .kernels.local_attention_cpu import CpuLocalAggregation  # compiles the C++ at first use
    return CpuLocalAggregation(kernel_size, stride, dilation)


# device_target -> (factory(kernel_size, stride, dilation) -> Cell (q, k_pad, v_pad) -> (out, weights) with its
# own bprop, dtypes the kernel accepts (others are cast to the first one))
DEVICE_AGGREGATIONS = {"CPU": (_cpu_aggregation, (ms.float32,))}


def register_device_aggregation(device_target: str, factory: Callable[[int, int, int], nn.Cell],
                                dtypes: Sequence) -> None:
    """Use ``factory`` for ``FusedLocalAttention`` on ``device_target`` ('CPU', 'GPU' or 'Ascend').

    ``factory(kernel_size, stride, dilation)`` returns a Cell mapping (query, key_pad, value_pad) to
    (output, attention weights) like ``_LeanAggregation``; ``dtypes``: the tensor dtypes it accepts.
    """
    if device_target not in DEVICE_TARGETS:
        raise ValueError(f"device_target must be one of {DEVICE_TARGETS}, got {device_target!r}")
    if not callable(factory):
        raise ValueError(f"factory must be callable, got {factory!r}")
    if not dtypes:
        raise ValueError("dtypes must name at least one dtype the kernel accepts")
    DEVICE_AGGREGATIONS[device_target] = (factory, tuple(dtypes))


class FusedLocalAttention(LocalAttention):
    """The device's fused kernel when one is registered for it, else a portable implementation.

    Args:
        kernel_size, stride, dilation, device_target: as ``LocalAttention``.
        fallback: the portable implementation (a name in ``PORTABLE_IMPLS``) that runs without a kernel:
            ``'lean'`` (``attention_impl='fused'``) or ``'unfold'`` (``attention_impl='auto'``).

    ``self.backend`` names what runs: the device target of the kernel, or the fallback's name. A kernel that
    fails to build (e.g. no C++ compiler) gives the fallback with a warning.
    """

    def __init__(self, kernel_size: int, stride: int = 1, dilation: int = 1, device_target: Optional[str] = None,
                 fallback: str = "lean"):
        super().__init__(kernel_size, stride, dilation)
        if fallback not in PORTABLE_IMPLS:
            raise ValueError(f"fallback must be one of {PORTABLE_IMPLS}, got {fallback!r}")
        device_target = device_target or ms.get_context("device_target")
        self.backend, self.dtypes, self.aggregate = fallback, (), None
        if device_target in DEVICE_AGGREGATIONS:
            factory, dtypes = DEVICE_AGGREGATIONS[device_target]
            try:
                self.aggregate = factory(kernel_size, stride, dilation)  # returns (output, weights)
                self.backend, self.dtypes = device_target, dtypes
            except (RuntimeError, OSError) as error:  # KernelBuildError is a RuntimeError
                warnings.warn(f"FusedLocalAttention: no {device_target} kernel ({error}); using the "
                              f"{fallback} implementation")
        self.uses_kernel = self.aggregate is not None
        if not self.uses_kernel:
            self.aggregate = LOCAL_ATTENTION_IMPLS[fallback](kernel_size, stride, dilation)  # returns the output

    def construct(self, query: Tensor, key_pad: Tensor, value_pad: Tensor) -> Tensor:
        if not self.uses_kernel:
            return self.aggregate(query, key_pad, value_pad)
        dtype = query.dtype
        if self.dtypes and dtype not in self.dtypes:
            kernel_dtype = self.dtypes[0]
            out = self.aggregate(query.astype(kernel_dtype), key_pad.astype(kernel_dtype),
                                 value_pad.astype(kernel_dtype))[0]
            return out.astype(dtype)
        return self.aggregate(query, key_pad, value_pad)[0]


def _cpu_qkv_aggregation(kernel_size, stride, dilation, num_heads, layout):
    from .kernels.local_attention_cpu import CpuQKVAggregation
    return CpuQKVAggregation(kernel_size, stride, dilation, num_heads, layout)


# device_target -> factory(kernel_size, stride, dilation, num_heads, layout) -> Cell (qkv, pe) -> (out, weights)
# with its own bprop: the whole attention path of ACmixLocal from its projection (see CpuQKVAggregation)
DEVICE_QKV_AGGREGATIONS = {"CPU": _cpu_qkv_aggregation}


def qkv_aggregation(aggregation: LocalAttention, num_heads: int, layout: int) -> Optional[nn.Cell]:
    """The kernel computing ``ACmixLocal``'s whole attention path from its projection, or None.

    Given only where ``aggregation`` (the layer's Stage-II Cell) runs a device kernel and that device has a
    qkv kernel registered in ``DEVICE_QKV_AGGREGATIONS``; so a portable implementation (unfold, lean, or no
    kernel for the device) keeps the pure-MindSpore path.
    """
    if not aggregation.uses_kernel:
        return None
    factory = DEVICE_QKV_AGGREGATIONS.get(aggregation.backend)
    if factory is None:
        return None
    try:
        return factory(aggregation.kernel_size, aggregation.stride, aggregation.dilation, num_heads, layout)
    except (RuntimeError, OSError) as error:
        warnings.warn(f"no {aggregation.backend} qkv attention kernel ({error}); using the separate steps")
        return None


def auto_local_attention(kernel_size: int, stride: int = 1, dilation: int = 1,
                         device_target: Optional[str] = None) -> FusedLocalAttention:
    """``attention_impl='auto'``: the device's kernel where one is registered and builds, else unfold."""
    return FusedLocalAttention(kernel_size, stride, dilation, device_target=device_target, fallback="unfold")


# name -> factory(kernel_size, stride=1, dilation=1, device_target=None) -> LocalAttention: the one table of
# implementations (``attention_impl`` of ACmixLocal, replace_convs and the models); the portable ones
# (PORTABLE_IMPLS) use standard MindSpore operators only, so they are also what an exported MINDIR may contain
LOCAL_ATTENTION_IMPLS = {"auto": auto_local_attention, "unfold": UnfoldLocalAttention, "lean": LeanLocalAttention,
                         "fused": FusedLocalAttention}
