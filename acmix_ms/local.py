"""ACmix with sliding-window (SASA) attention, as in the official ResNet-ACmix.

Attention: every output pixel attends to its k_att x k_att neighbourhood of the reflection-padded
keys/values, with the official learned relative positional term.

The official logits are ``q . (k_nb + pe_centre - pe_nb)``. ``q . pe_centre`` is the same for all
neighbours of a pixel, so softmax cancels it; we compute ``q . (k - pe)_nb`` from one padded map.
"""
from typing import Optional, Sequence

from mindspore import Tensor, nn, ops

from .base import ACmixBase
from .local_attention import LOCAL_ATTENTION_IMPLS, qkv_aggregation
from .spatial import out_size, reflect_pad
from .validation import check_choice, check_divisible, check_odd, check_positive_int


class ACmixLocal(ACmixBase):
    """ACmix over sliding local windows (ResNet-ACmix's replacement of the 3x3 conv).

    Args:
        in_channels: Cin.
        out_channels: C (= N * d).
        kernel_att: k_att (odd), the attention window.
        num_heads: N.
        kernel_conv: k_c (odd).
        stride: 1 or more (both paths); the output is ceil(H/stride) x ceil(W/stride).
        dilation: spacing of the attention neighbours.
        qkv_bias: bias of the fused q/k/v 1x1 projection (official: True).
        fc_bias: bias of the conv-path fc (official ResNet: False).
        shift_impl, rate_mode, rates: see ``ACmixBase``.
        attention_impl: ``'auto'`` (the device's fused kernel where one is registered, else ``'unfold'``),
            ``'unfold'`` (stack the k*k neighbours: the reference), ``'lean'`` (offset by offset with a
            hand-written backward) or ``'fused'`` (the kernel, else lean); see ``acmix_ms.local_attention``.
            Results and parameters are the same for all; ``acmix_ms.set_attention_impl(layer_or_network, impl)``
            changes it after construction.

    Inputs: (B, Cin, H, W). Outputs: (B, C, ceil(H/s), ceil(W/s)).
    Channel o of the attention output is head o // d, channel o % d; of the conv output, group
    o // N (official layout, kept so the official weights load).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_att: int = 7, num_heads: int = 4,
                 kernel_conv: int = 3, stride: int = 1, dilation: int = 1, qkv_bias: bool = True,
                 fc_bias: bool = False, shift_impl: str = "learnable", rate_mode: str = "learnable",
                 rates: Sequence[float] = (0.5, 0.5), attention_impl: str = "auto"):
        check_positive_int("in_channels", in_channels)
        check_positive_int("num_heads", num_heads)
        head_dim = check_divisible("out_channels", out_channels, "num_heads", num_heads)
        super().__init__(3 * num_heads, head_dim, out_channels, kernel_conv, stride, shift_impl, rate_mode,
                         rates, fc_bias)
        check_odd("kernel_att", kernel_att)
        check_positive_int("dilation", dilation)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.kernel_att = kernel_att
        self.stride = stride
        self.dilation = dilation
        self.att_pad = dilation * (kernel_att - 1) // 2
        self.scale = head_dim ** -0.5
        self.qkv = nn.Conv2d(in_channels, 3 * out_channels, 1, has_bias=qkv_bias)
        if self.has_attention:
            self.conv_p = nn.Conv2d(2, head_dim, 1, has_bias=True)
        self._use_attention_impl(attention_impl)

    def _use_attention_impl(self, attention_impl):
        """Build the attention aggregation with ``attention_impl`` (a name in ``LOCAL_ATTENTION_IMPLS``).

        Called at construction and by ``set_attention_impl``: same parameters, same results.
        """
        check_choice("attention_impl", attention_impl, tuple(LOCAL_ATTENTION_IMPLS))
        if self.has_attention:
            self.aggregate = LOCAL_ATTENTION_IMPLS[attention_impl](self.kernel_att, self.stride, self.dilation)
        self.attention_impl = attention_impl
        self._select_kernel_path()

    def _select_kernel_path(self):
        """Where the attention runs a device kernel that also takes the projection directly (CPU), use it.

        Then ``construct`` is ``_kernel_forward``: the projection's output channels are permuted (the weights,
        not the activations) to the channel-major order (channel j*3N + g) when the fused conv path reads it,
        the kernel does the query scaling/striding, the positional subtraction and the reflection padding
        itself, and rate2 is folded into the conv path's weight. Same parameters and results as the separate
        steps (tests/test_fast_paths.py); elsewhere ``qkv_attention`` is None and nothing changes.
        """
        self.qkv_layout = 1 if self.has_conv and self.shift_impl != "tensor" else 0
        self.qkv_attention = None
        if self.has_attention:
            self.qkv_attention = qkv_aggregation(self.aggregate, self.num_heads, self.qkv_layout)

    @property
    def attention_backend(self) -> Optional[str]:
        """What computes the attention: 'unfold', 'lean', a device target (its kernel), or None (no attention)."""
        return self.aggregate.backend if self.has_attention else None

    def construct(self, x: Tensor) -> Tensor:
        if x.ndim != 4:
            raise ValueError(f"ACmixLocal expects a 4-D (B, C, H, W) input, got {x.ndim}-D")
        batch, _, height, width = x.shape
        if self.qkv_attention is not None and not self.use_reference_paths:
            return self._kernel_forward(x, height, width)
        return self.combine(self.qkv(x), batch, height, width)

    def _projection_weights(self, dtype):
        """qkv's (weight, bias) in dtype, rows permuted to channel-major order (j*3N + g) for layout 1."""
        weight = ops.cast(self.qkv.weight, dtype)
        bias = None if self.qkv.bias is None else ops.cast(self.qkv.bias, dtype)
        if self.qkv_layout == 1:
            groups, d = 3 * self.num_heads, self.head_dim
            weight = weight.reshape(groups, d, -1).transpose(1, 0, 2).reshape(weight.shape)
            if bias is not None:
                bias = bias.reshape(groups, d).transpose(1, 0).reshape(-1)
        return weight, bias

    def _kernel_forward(self, x, height, width):
        """``construct`` with the device's qkv attention kernel (see ``_select_kernel_path``)."""
        dtype = x.dtype
        weight, bias = self._projection_weights(dtype)
        qkv = ops.conv2d(x, weight, bias)  # (B, 3C, H, W) in layout self.qkv_layout
        att = self.qkv_attention(qkv, self._positional(height, width, dtype))[0]
        if self.rate_mode == "attention":
            return att
        if self.rate_mode == "learnable":
            rate1, rate2 = ops.cast(self.rate1, dtype), ops.cast(self.rate2, dtype)
        else:
            rate1, rate2 = self.fixed_rate1, self.fixed_rate2
        if self.qkv_layout == 1:
            return rate1 * att + self.fused_conv(qkv, height, width, rate2)
        return rate1 * att + rate2 * self.conv_path_of(qkv, x.shape[0], height, width)

    def conv_path_of(self, qkv, batch, height, width):
        return self.conv_path(qkv.reshape(batch, 3 * self.num_heads, self.head_dim, height * width),
                              height, width)

    def _positional(self, height, width, dtype):
        """conv_p applied to the normalised (x, y) grid: (1, d, H, W)."""
        xs = ops.linspace(-1.0, 1.0, width).reshape(1, 1, 1, width)
        ys = ops.linspace(-1.0, 1.0, height).reshape(1, 1, height, 1)
        grid = ops.concat((ops.broadcast_to(xs, (1, 1, height, width)),
                           ops.broadcast_to(ys, (1, 1, height, width))), 1)
        return self.conv_p(ops.cast(grid, dtype))

    def attention_path(self, qkv, batch, height, width):
        c, bn, d = self.out_channels, batch * self.num_heads, self.head_dim
        h_out, w_out = out_size(height, self.stride), out_size(width, self.stride)
        query = qkv[:, :c].reshape(bn, d, height, width) * self.scale
        query = query[:, :, ::self.stride, ::self.stride]
        key = qkv[:, c:2 * c].reshape(bn, d, height, width) - self._positional(height, width, qkv.dtype)
        value = qkv[:, 2 * c:].reshape(bn, d, height, width)
        out = self.aggregate(query, reflect_pad(key, self.att_pad), reflect_pad(value, self.att_pad))
        return out.reshape(batch, c, h_out, w_out)

    def aggregation_macs(self, height, width):
        """Multiply-accumulates of the parameter-free products (q.k and A.v) at input size H x W."""
        if not self.has_attention:
            return 0
        pixels = out_size(height, self.stride) * out_size(width, self.stride)
        return 2 * self.kernel_att ** 2 * self.out_channels * pixels


def local_attention_layers(network: nn.Cell) -> list:
    """(name, ACmixLocal) of every sliding-window ACmix layer in ``network`` that has an attention path."""
    return [(name, cell) for name, cell in network.cells_and_names()
            if isinstance(cell, ACmixLocal) and cell.has_attention]


def attention_backends(network: nn.Cell) -> dict:
    """{backend: number of layers} over the ACmixLocal layers of ``network``, e.g. {'CPU': 8}."""
    counts = {}
    for _, layer in local_attention_layers(network):
        counts[layer.attention_backend] = counts.get(layer.attention_backend, 0) + 1
    return counts


def set_attention_impl(network: nn.Cell, attention_impl: str, only_kernels: bool = False) -> int:
    """Switch the ACmixLocal layers of ``network`` (or the layer itself) to ``attention_impl``; returns how
    many were switched. The one way to change the implementation after construction.

    only_kernels: switch only the layers running a device kernel (``ops.Custom``), e.g. to export a MINDIR
    that does not refer to this machine's compiled library. Call it before the network's first run: a graph
    already compiled is not rebuilt.
    """
    check_choice("attention_impl", attention_impl, tuple(LOCAL_ATTENTION_IMPLS))
    switched = 0
    for _, layer in local_attention_layers(network):
        if only_kernels and not layer.aggregate.uses_kernel:
            continue
        layer._use_attention_impl(attention_impl)
        switched += 1
    return switched
