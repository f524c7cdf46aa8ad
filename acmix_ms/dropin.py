"""ACmix as a drop-in replacement for the k x k convolutions of any MindSpore network.

``replace_convs(network, ...)`` walks an ``nn.Cell``, replaces the ``nn.Conv2d`` layers it selects by
``ACmixLocal`` layers with the same input/output channels and stride (so every output shape stays the same)
and returns a ``ReplacementReport`` that names every convolution it replaced or skipped, with the reason.

``init='conv'`` starts each ACmix layer from the convolution it replaces (``init_from_conv``). The conv path
of ACmix is a k x k convolution in factored form (paper Eqs. 1-8): for output channel o of head-channel
group j = o // N (N heads, d = C / N channels per head),

    K[o, :, u, v] = sum_p dep_conv[o, p, u, v] * M[j, p],   M[j, p] = sum_g fc[p, g] * qkv[g*d + j]  (Cin-vectors)

so within one group j the N * k^2 kernel rows K[o, :, u, v] lie in the span of at most
r = min(G, k_c^2, Cin) projection rows, where G is the number of q/k/v groups the conv path may use: all
3N when the attention path is switched off (rate1 = 0 or rate_mode 'conv'), else the 2N q and k groups,
because the value rows are set to a constant so that the attention path outputs exactly the convolution's
bias / rate1 (softmax weights sum to one) or zero. ``init_from_conv`` takes, per group, the best rank-r
factorisation of the convolution (SVD, Eckart-Young): exact when the group's rank is at most r (always
when Cin <= r), otherwise with the relative weight error sqrt(sum of the discarded squared singular values
/ sum of all) <= sqrt(1 - r / R), R = min(N * k^2, Cin). Above ``init_tolerance`` it keeps the paper's
initialisation and says why. docs/dropin.md lists measured errors.
"""
import math
from dataclasses import dataclass, field, asdict
from typing import Callable, Optional, Sequence

import numpy as np
import mindspore as ms
from mindspore import nn

from .local import ACmixLocal
from .local_attention import LOCAL_ATTENTION_IMPLS
from .base import RATE_MODES
from .shift import SHIFT_IMPLS
from .validation import check_choice, check_odd, check_positive_int, check_rates

INITS = ("paper", "conv")
EXACT_WEIGHT_ERROR = 1e-6  # relative weight error below which the factorisation counts as exact (float64 SVD)


@dataclass
class ConvInit:
    """What ``init_from_conv`` did (or would do) for one layer.

    applied: whether the layer now starts from the convolution (False: the paper's initialisation is kept,
    ``reason`` says why). rank: r, the projection rows per group the conv path got; max_rank: R, the
    largest rank a group of the convolution can have. weight_error: ||K - K_acmix|| / ||K|| (Frobenius,
    over the whole kernel); error_bound: sqrt(1 - r / R), which weight_error never exceeds (both None when
    the shapes rule the initialisation out before the factorisation). bias: 'none',
    'exact' (the attention path outputs it) or 'dropped' (no path can output a constant). alignment: a
    note when the output equals the convolution only at some input sizes.
    """
    applied: bool
    reason: str = ""
    rank: int = 0
    max_rank: int = 0
    weight_error: float = None
    error_bound: float = None
    bias: str = "none"
    alignment: str = ""

    @property
    def exact(self):
        return self.applied and self.weight_error <= EXACT_WEIGHT_ERROR and self.bias != "dropped"


@dataclass
class ReplacedConv:
    """One replaced convolution: its path in the network (``also_at``: further paths of the same Cell)."""
    name: str
    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    layer: str
    init: str = "paper"
    conv_init: ConvInit = None
    also_at: tuple = ()


@dataclass
class SkippedConv:
    name: str
    reason: str


@dataclass
class ReplacementReport:
    """Every ``nn.Conv2d`` of the network, replaced or skipped (with the reason)."""
    replaced: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    dry_run: bool = False

    @property
    def replaced_names(self):
        return [item.name for item in self.replaced]

    @property
    def skipped_names(self):
        return [item.name for item in self.skipped]

    def to_dict(self):
        return asdict(self)

    def __str__(self):
        verb = "would replace" if self.dry_run else "replaced"
        lines = [f"{verb} {len(self.replaced)} convolution(s), skipped {len(self.skipped)}"]
        for item in self.replaced:
            line = (f"  + {item.name}: {item.in_channels}->{item.out_channels} k{item.kernel_size} "
                    f"s{item.stride} -> {item.layer}, init {item.init}")
            init = item.conv_init
            if init is not None and init.applied:
                line += (f" (rank {init.rank}/{init.max_rank}, weight error {init.weight_error:.2e} "
                         f"<= bound {init.error_bound:.2f}, bias {init.bias})")
                if init.alignment:
                    line += f"; {init.alignment}"
            elif init is not None:
                line += f" (conv init not used: {init.reason})"
            lines.append(line)
        lines.extend(f"  - {item.name}: {item.reason}" for item in self.skipped)
        return "\n".join(lines)


def _square(value, what):
    """(a, a) or a -> a; None for a non-square pair."""
    if isinstance(value, int):
        return value
    value = tuple(value)
    if len(value) == 2 and value[0] == value[1]:
        return value[0]
    raise _NotSquare(f"{what} {value} is not square")


class _NotSquare(ValueError):
    pass


def _pad_before(conv):
    """(top, left) padding of ``conv`` for a 'pad' convolution; None for 'same' / 'valid'."""
    if conv.pad_mode != "pad":
        return None
    padding = conv.padding
    if isinstance(padding, int):
        return padding, padding
    top, bottom, left, right = padding
    return top, left


def _pad_total_ok(conv, kernel):
    """Whether the output is ceil(H / stride) x ceil(W / stride) for every input size, as ACmixLocal's."""
    if conv.pad_mode == "same":
        return True
    if conv.pad_mode == "valid":
        return kernel == 1
    padding = conv.padding
    top, bottom, left, right = (padding,) * 4 if isinstance(padding, int) else padding
    return top + bottom == kernel - 1 and left + right == kernel - 1


def incompatibility(conv, kernel_sizes, strides, num_heads):
    """Why ``conv`` cannot become an ACmixLocal with the same output shape; '' when it can."""
    try:
        kernel = _square(conv.kernel_size, "kernel")
        stride = _square(conv.stride, "stride")
        dilation = _square(conv.dilation, "dilation")
    except _NotSquare as error:
        return f"{error}: ACmixLocal windows are square"
    if conv.data_format != "NCHW":
        return f"data_format {conv.data_format}: ACmixLocal takes NCHW"
    if kernel not in kernel_sizes:
        return f"kernel {kernel}x{kernel} not in kernel_sizes {tuple(kernel_sizes)}"
    if kernel % 2 == 0:
        return f"even kernel {kernel}x{kernel}: ACmix kernels have a centre"
    if stride not in strides:
        return f"stride {stride} not in strides {tuple(strides)}"
    if conv.group != 1:
        return f"grouped convolution (group={conv.group}): ACmix mixes all input channels"
    if dilation != 1:
        return f"dilation {dilation}: the ACmix convolution path is not dilated"
    if not _pad_total_ok(conv, kernel):
        return (f"pad_mode {conv.pad_mode!r} with padding {conv.padding} changes the output size; ACmixLocal "
                f"outputs ceil(size / stride)")
    if conv.out_channels % num_heads:
        return f"out_channels {conv.out_channels} is not divisible by num_heads {num_heads}"
    return ""


def _dense_kernel(qkv_weight, fc_weight, dep_weight, head_dim):
    """The one k_c x k_c kernel (C, Cin, k_c, k_c) the conv path computes (zero biases, Eqs. 1-8).

    qkv_weight (G*d, Cin), fc_weight (k_c^2, G), dep_weight (C, k_c^2, k_c, k_c); output o is in group
    j = o // (C / d).
    """
    out_channels = dep_weight.shape[0]
    per_group = out_channels // head_dim
    groups = qkv_weight.reshape(-1, head_dim, qkv_weight.shape[1])  # (G, d, Cin): row g*d + j
    maps = np.einsum("pg,gjc->jpc", fc_weight, groups)  # M[j, p] (d, k_c^2, Cin)
    maps_per_output = np.repeat(maps, per_group, axis=0)  # (C, k_c^2, Cin)
    return np.einsum("opuv,opc->ocuv", dep_weight, maps_per_output)


def init_from_conv(layer: ACmixLocal, conv: nn.Conv2d, tolerance: float = 0.1, apply: bool = True) -> ConvInit:
    """Set ``layer`` (an ACmixLocal) so that it computes ``conv`` (an nn.Conv2d) as closely as its shapes allow.

    Exact where possible, else the best rank-r approximation per head-channel group (module docstring).
    Parameters changed: qkv (weight, bias), fc, the first r kernels of dep_conv; with the attention path on,
    the value rows become the constant conv bias / rate1 (zero weights), so that path outputs the bias.
    The layer's rates, conv_p and the unused rows keep their values. Nothing changes when the result is
    not applied (``apply=False``, or a weight error above ``tolerance``: then ``reason`` says why).
    Returns a ``ConvInit``.
    """
    kernel = _square(conv.kernel_size, "kernel")
    stride = _square(conv.stride, "stride")
    if not isinstance(layer, ACmixLocal):
        return ConvInit(False, f"{type(layer).__name__} has no conv-initialisation")
    if not layer.has_conv:
        return ConvInit(False, "rate_mode 'attention' has no convolution path")
    if layer.shift_impl not in ("learnable", "random"):
        return ConvInit(False, f"shift_impl {layer.shift_impl!r} keeps one-hot shift kernels, so the N outputs "
                               f"of a group are equal; use 'learnable'")
    if layer.kernel_conv < kernel:
        return ConvInit(False, f"kernel_conv {layer.kernel_conv} is smaller than the convolution's {kernel}")
    if (conv.in_channels, conv.out_channels, stride) != (layer.in_channels, layer.out_channels, layer.stride):
        return ConvInit(False, "channels or stride differ from the convolution's")
    if _square(conv.dilation, "dilation") != 1 or conv.group != 1:
        return ConvInit(False, "only ungrouped, undilated convolutions are reproduced")
    rate1, rate2 = layer.rate_values()
    if rate2 == 0:
        return ConvInit(False, "rate2 is 0: the convolution path does not reach the output")
    pad_before = _pad_before(conv)
    alignment = ""
    if pad_before is None:  # 'same': centred at stride 1; MindSpore pads bottom/right first at stride > 1
        pad_before = (kernel // 2, kernel // 2)
        if stride > 1:
            alignment = (f"exact only where {stride} divides size - 1 (e.g. odd sizes at stride 2): elsewhere "
                         f"'same' padding pads bottom/right only and the convolution's windows sit one pixel "
                         f"lower/righter than ACmix's")
    kc = layer.kernel_conv
    top, left = (kc // 2 - pad_before[0], kc // 2 - pad_before[1])
    if not (0 <= top <= kc - kernel and 0 <= left <= kc - kernel):
        return ConvInit(False, f"padding {conv.padding} puts the kernel off the centre by more than "
                               f"kernel_conv {kc} can hold")

    heads, head_dim, in_channels = layer.num_heads, layer.head_dim, layer.in_channels
    attention_on = layer.has_attention and rate1 != 0
    basis_groups = list(range(2 * heads if attention_on else 3 * heads))  # q (and k) groups, then v
    max_rank = min(heads * kernel * kernel, in_channels)
    rank = min(len(basis_groups), kc * kc, max_rank)

    weight = conv.weight.asnumpy().astype(np.float64)
    target = np.zeros((layer.out_channels, in_channels, kc, kc))
    target[:, :, top:top + kernel, left:left + kernel] = weight / rate2  # the conv path is scaled by rate2
    qkv_weight = layer.qkv.weight.asnumpy().astype(np.float64).reshape(3 * layer.out_channels, in_channels)
    # basis rows get the typical norm of the layer's own q/k rows, so the attention logits keep their scale
    row_norm = float(np.sqrt((qkv_weight[:2 * layer.out_channels] ** 2).sum(1).mean())) or 1.0
    dep_weight = layer.dep_conv.weight.asnumpy().astype(np.float64)
    total = float((target ** 2).sum())
    for j in range(head_dim):
        outputs = slice(j * heads, (j + 1) * heads)
        rows = target[outputs].transpose(0, 2, 3, 1).reshape(heads * kc * kc, in_channels)  # (m, u, v) x Cin
        left_vectors, singular, right_vectors = np.linalg.svd(rows, full_matrices=False)
        for p in range(rank):
            qkv_weight[basis_groups[p] * head_dim + j] = right_vectors[p] * row_norm
        coefficients = left_vectors[:, :rank] * (singular[:rank] / row_norm)
        dep_weight[outputs, :rank] = coefficients.reshape(heads, kc, kc, rank).transpose(0, 3, 1, 2)
    fc_weight = np.zeros((kc * kc, 3 * heads))
    fc_weight[np.arange(rank), basis_groups[:rank]] = 1.0
    value_rows = slice(2 * layer.out_channels, 3 * layer.out_channels)
    has_bias = conv.has_bias and conv.bias is not None
    bias = "none"
    if attention_on:
        qkv_weight[value_rows] = 0.0
        bias = "exact" if has_bias else "none"
    elif has_bias:
        bias = "dropped"

    rebuilt = _dense_kernel(qkv_weight, fc_weight, dep_weight, head_dim)
    weight_error = float(np.sqrt(((rebuilt - target) ** 2).sum() / total)) if total > 0 else 0.0
    error_bound = math.sqrt(1.0 - rank / max_rank)
    result = ConvInit(True, "", rank, max_rank, weight_error, error_bound, bias, alignment)
    if weight_error > tolerance:
        result.applied = False
        result.reason = (f"the best rank-{rank} form leaves a relative weight error {weight_error:.3f} > "
                         f"init_tolerance {tolerance}; paper initialisation kept")
        return result
    if not apply:
        return result
    _set(layer.qkv.weight, qkv_weight.reshape(layer.qkv.weight.shape))
    if layer.qkv.bias is not None:
        qkv_bias = layer.qkv.bias.asnumpy().astype(np.float64)
        for g in basis_groups[:rank]:
            qkv_bias[g * head_dim:(g + 1) * head_dim] = 0.0  # a bias would be zero-filled at the borders
        if attention_on:
            qkv_bias[value_rows] = conv.bias.asnumpy() / rate1 if has_bias else 0.0
        _set(layer.qkv.bias, qkv_bias)
    _set(layer.fc.weight, fc_weight.reshape(layer.fc.weight.shape))
    if layer.fc.bias is not None:
        _set(layer.fc.bias, np.zeros(layer.fc.bias.shape))
    _set(layer.dep_conv.weight, dep_weight)
    return result


def _set(parameter, values):
    parameter.set_data(ms.Tensor(np.asarray(values, np.float64).astype(parameter.asnumpy().dtype)))


def _child_links(network):
    """(parent, key, child, path) for every parent -> child link, depth first; shared Cells are entered once."""
    links, entered = [], set()

    def visit(cell, prefix):
        if id(cell) in entered:
            return
        entered.add(id(cell))
        for key, child in cell._cells.items():  # not name_cells(): it lists a Cell held twice only once
            if child is None:
                continue
            path = f"{prefix}.{key}" if prefix else key
            links.append((cell, key, child, path))
            visit(child, path)

    visit(network, "")
    return links


def _put_child(parent, key, child):
    """Replace the child ``key`` of ``parent``: through the container's indexing or as an attribute."""
    if isinstance(parent, (nn.SequentialCell, nn.CellList)):
        parent[list(parent._cells).index(key)] = child
    else:
        setattr(parent, key, child)


def _rename_parameters(layer, path):
    """Give ``layer``'s parameters their full names (``path.qkv.weight``): MindSpore only prefixes the
    attribute name of the direct parent, and duplicate names break checkpoints and optimizers."""
    for relative, parameter in layer.parameters_and_names():
        parameter.name = f"{path}.{relative}"


def _forget_compiled_graphs(network):
    """Make the next call of ``network`` (or of any Cell inside it) compile again: MindSpore reuses a Cell's
    compiled graph, which still holds the replaced convolutions, as long as the Cell's compile cache has it."""
    for _, cell in network.cells_and_names():
        cell.compile_cache.clear()


def replace_convs(network: nn.Cell, kernel_sizes: Sequence[int] = (3,), strides: Sequence[int] = (1, 2),
                  num_heads: int = 4, kernel_att: int = 7, kernel_conv: Optional[int] = None,
                  shift_impl: str = "learnable", rate_mode: str = "learnable", rates: Sequence[float] = (0.5, 0.5),
                  attention_impl: str = "auto", select: Optional[Callable[[str, nn.Conv2d], bool]] = None,
                  init: str = "paper", init_tolerance: float = 0.1, dry_run: bool = False) -> ReplacementReport:
    """Replace the selected k x k ``nn.Conv2d`` layers of ``network`` by ``ACmixLocal``; returns a report.

    Args:
        network: any ``nn.Cell``; changed in place (not with ``dry_run``). Its compiled graphs are dropped;
            Cells built around it before (``TrainOneStepCell``, an AMP wrapper) keep theirs: wrap afterwards.
        kernel_sizes: kernel sizes to replace (odd, square).
        strides: strides to replace; the ACmix layer gets the convolution's stride.
        num_heads, kernel_att, shift_impl, rate_mode, rates, attention_impl: passed to ``ACmixLocal``.
        kernel_conv: the ACmix convolution kernel; None: the replaced convolution's kernel size.
        select: optional ``select(name, conv) -> bool`` choosing among the compatible convolutions.
        init: 'paper' (ACmixLocal's own initialisation) or 'conv' (``init_from_conv`` where the error is at
            most ``init_tolerance``, the paper's initialisation elsewhere, with the reason in the report).
        dry_run: only report what would be replaced (and, with init='conv', the errors it would give).

    A convolution is replaced when it is square, NCHW, ungrouped and undilated, has a kernel in
    ``kernel_sizes`` and a stride in ``strides``, pads so that its output is ceil(size / stride) like
    ACmixLocal's, has out_channels divisible by ``num_heads``, and ``select`` accepts it. Every other
    ``nn.Conv2d`` is listed in ``report.skipped`` with the first reason that applies.
    A convolution Cell used at several places is replaced by one ACmix Cell at all of them.
    """
    kernel_sizes = tuple(kernel_sizes) if not isinstance(kernel_sizes, int) else (kernel_sizes,)
    strides = tuple(strides) if not isinstance(strides, int) else (strides,)
    for value in kernel_sizes:
        check_odd("kernel_sizes", value)
    for value in strides:
        check_positive_int("strides", value)
    check_positive_int("num_heads", num_heads)
    check_odd("kernel_att", kernel_att)
    if kernel_conv is not None:
        check_odd("kernel_conv", kernel_conv)
    check_choice("shift_impl", shift_impl, SHIFT_IMPLS)
    check_choice("rate_mode", rate_mode, RATE_MODES)
    check_rates(rates)
    check_choice("attention_impl", attention_impl, tuple(LOCAL_ATTENTION_IMPLS))
    check_choice("init", init, INITS)
    if select is not None and not callable(select):
        raise ValueError(f"select must be a callable select(name, conv) -> bool, got {select!r}")
    if not isinstance(network, nn.Cell):
        raise ValueError(f"network must be a mindspore.nn.Cell, got {type(network).__name__}")

    report = ReplacementReport(dry_run=dry_run)
    decisions = {}  # id(conv) -> ReplacedConv or SkippedConv (first path wins)
    layers = {}  # id(conv) -> its ACmixLocal
    for parent, key, child, path in _child_links(network):
        if not isinstance(child, nn.Conv2d):
            continue
        if id(child) in decisions:
            decided = decisions[id(child)]
            if isinstance(decided, ReplacedConv):
                decided.also_at += (path,)
                if not dry_run:
                    _put_child(parent, key, layers[id(child)])
            continue
        reason = incompatibility(child, kernel_sizes, strides, num_heads)
        if not reason and select is not None and not select(path, child):
            reason = "not selected (select returned False)"
        if reason:
            decisions[id(child)] = SkippedConv(path, reason)
            report.skipped.append(decisions[id(child)])
            continue
        kernel, stride = _square(child.kernel_size, "kernel"), _square(child.stride, "stride")
        layer = ACmixLocal(child.in_channels, child.out_channels, kernel_att=kernel_att, num_heads=num_heads,
                           kernel_conv=kernel_conv or kernel, stride=stride, shift_impl=shift_impl,
                           rate_mode=rate_mode, rates=rates, attention_impl=attention_impl)
        entry = ReplacedConv(path, child.in_channels, child.out_channels, kernel, stride,
                             f"ACmixLocal(num_heads={num_heads}, kernel_att={kernel_att}, "
                             f"kernel_conv={layer.kernel_conv}, rate_mode={rate_mode})")
        if init == "conv":
            entry.conv_init = init_from_conv(layer, child, init_tolerance, apply=not dry_run)
            entry.init = "conv" if entry.conv_init.applied else "paper"
        layers[id(child)] = layer
        decisions[id(child)] = entry
        report.replaced.append(entry)
        if not dry_run:
            _put_child(parent, key, layer)
            _rename_parameters(layer, path)
    if report.replaced and not dry_run:
        _forget_compiled_graphs(network)
    return report
