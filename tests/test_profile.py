"""models/profile.py: structural parameter and MAC counts against hand formulas and Table 1."""
import pytest
import mindspore as ms
from mindspore import nn, ops

import acmix_ms
from acmix_ms.cost import stage_costs
from acmix_ms.local_attention import LOCAL_ATTENTION_IMPLS
from models.profile import count_macs, count_params, profile


class ConvDenseNet(nn.Cell):
    """conv 3->8 (3x3, bias) -> BN -> grouped conv 8->8 (3x3, stride 2, 2 groups) -> mean -> Dense 8->10."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, pad_mode="same", has_bias=True)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, pad_mode="same", group=2)
        self.head = nn.Dense(8, 10)

    def construct(self, x):
        x = self.conv2(ops.relu(self.bn(self.conv1(x))))
        return self.head(x.mean((2, 3)))


class SquareTokens(nn.Cell):
    """x @ x^T per image: a parameter-free product reported through ``extra_macs``."""

    def construct(self, x):
        return ops.matmul(x, x.swapaxes(-2, -1))

    def extra_macs(self, x):
        _, length, channels = x.shape
        return length * length * channels


@pytest.fixture(autouse=True)
def graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE)
    yield


@pytest.fixture(scope="module")
def conv_dense_net():
    return ConvDenseNet()


CONV_DENSE_MACS = 8 * 16 * 16 * 3 * 9 + 8 * 8 * 8 * 4 * 9 + 10 * 8
CONV_DENSE_PARAMS = (8 * 3 * 9 + 8) + 2 * 8 + 8 * 4 * 9 + (8 * 10 + 10)


def test_conv_dense_counts(conv_dense_net):
    assert count_params(conv_dense_net) == CONV_DENSE_PARAMS  # BN running stats excluded
    assert count_macs(conv_dense_net, (1, 3, 16, 16)) == CONV_DENSE_MACS
    assert count_macs(conv_dense_net, (2, 3, 16, 16)) == CONV_DENSE_MACS  # per image
    assert profile(conv_dense_net, (1, 3, 16, 16)) == {"params": CONV_DENSE_PARAMS, "macs": CONV_DENSE_MACS}


def test_context_training_flag_and_hooks_restored(conv_dense_net):
    conv_dense_net.set_train(True)
    count_macs(conv_dense_net, (1, 3, 16, 16))
    assert ms.get_context("mode") == ms.GRAPH_MODE
    assert conv_dense_net.training
    assert all(len(cell._forward_hook) == 0 for _, cell in conv_dense_net.cells_and_names())
    conv_dense_net.set_train(False)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    count_macs(conv_dense_net, (1, 3, 16, 16))
    assert ms.get_context("mode") == ms.PYNATIVE_MODE
    assert not conv_dense_net.training


def test_context_restored_after_failing_forward(conv_dense_net):
    with pytest.raises(Exception):
        count_macs(conv_dense_net, (1, 5, 16, 16))  # conv1 expects 3 channels
    assert ms.get_context("mode") == ms.GRAPH_MODE


def test_extra_macs_hook():
    assert count_macs(SquareTokens(), (2, 5, 4)) == 5 * 5 * 4


@pytest.mark.parametrize("bad", [(1,), (0, 3, 8, 8), (1, 3, 8.0, 8), "1x3x8x8"])
def test_bad_input_shape(conv_dense_net, bad):
    with pytest.raises(ValueError, match="input_shape"):
        count_macs(conv_dense_net, bad)


def test_not_a_cell():
    with pytest.raises(ValueError, match="cell"):
        count_params(object())
    with pytest.raises(ValueError, match="cell"):
        count_macs(object(), (1, 3, 8, 8))


def test_shift_conv_and_trainable_only():
    d, k, c_out, hw = 4, 3, 8, 6 * 6
    shape = (1, d * k * k, 6, 6)
    learnable = acmix_ms.ShiftConv(d, k, c_out, "learnable")
    fixed = acmix_ms.ShiftConv(d, k, c_out, "fixed")
    tensor = acmix_ms.ShiftConv(d, k, c_out, "tensor")
    assert count_macs(learnable, shape) == count_macs(fixed, shape) == c_out * hw * k ** 4
    assert count_macs(tensor, shape) == 0
    assert count_params(fixed) == count_params(learnable) == c_out * k ** 4
    assert count_params(fixed, trainable_only=True) == 0
    assert count_params(learnable, trainable_only=True) == c_out * k ** 4
    assert count_params(tensor) == 0


# ACmixLocal: C=16, N=4 (d=4), k_a=3, k_c=3 on 8x8.
C, N, KA, KC, H, W = 16, 4, 3, 3, 8, 8
D = C // N


def _table1_total(module, **kw):
    costs = stage_costs(C, KC, KA, N, H, W, **kw)[module]
    return sum(v[0] for v in costs.values()), sum(v[1] for v in costs.values())


@pytest.fixture(scope="module")
def local_cells():
    return {mode: acmix_ms.ACmixLocal(C, C, KA, N, KC, rate_mode=mode) for mode in ("learnable", "attention")}


def test_local_matches_table1(local_cells):
    macs, params = _table1_total("acmix")
    hw = H * W
    positional = 2 * D * hw  # conv_p on the (1, 2, H, W) grid: batch 1
    # Table 1 counts the shift-and-sum as k_c^2 C additions; here the group conv (k_c^4 C, in Table 1 too) does it.
    assert count_macs(local_cells["learnable"], (1, C, H, W)) == macs - KC ** 2 * C * hw + positional
    # Table 1 leaves out biases, the positional conv (2->d, bias) and the two rates.
    assert count_params(local_cells["learnable"]) == params + 3 * C + (2 * D + D) + 2


def test_local_attention_only_matches_table1(local_cells):
    macs, params = _table1_total("self_attention")
    assert count_macs(local_cells["attention"], (1, C, H, W)) == macs + 2 * D * H * W
    assert count_params(local_cells["attention"]) == params + 3 * C + 3 * D


@pytest.mark.parametrize("impl", sorted(LOCAL_ATTENTION_IMPLS))
def test_local_counts_do_not_depend_on_attention_impl(impl, local_cells):
    # The lean implementation has its own bprop (a Cell whose hooks MindSpore ignores): counts stay structural.
    cell = acmix_ms.ACmixLocal(C, C, KA, N, KC, attention_impl=impl)
    assert count_macs(cell, (1, C, H, W)) == count_macs(local_cells["learnable"], (1, C, H, W))


def test_local_tensor_shift_and_stride():
    hw, out_hw = H * W, (H // 2) * (W // 2)
    cell = acmix_ms.ACmixLocal(C, C, KA, N, KC, stride=2, shift_impl="tensor")
    # qkv, conv_p and fc run at full resolution; attention and the (tensor, MAC-free) shift at the output's.
    expected = 3 * C * C * hw + 2 * D * hw + 2 * KA ** 2 * C * out_hw + 3 * KC ** 2 * C * hw
    assert count_macs(cell, (1, C, H, W)) == expected


def test_window_layer():
    dim, heads, window, k = 16, 2, 4, 3
    cell = acmix_ms.ACmixWindow(dim, heads, window_size=window, shift_size=2, kernel_conv=k)
    tokens = 8 * 8  # a 6x6 map is padded to 8x8, a multiple of the window
    expected = (3 * dim * dim + dim * dim + 2 * window ** 2 * dim + 3 * k ** 2 * dim + k ** 4 * dim) * tokens
    assert count_macs(cell, (1, 6, 6, dim)) == expected
    params = ((3 * dim * dim + 3 * dim) + (dim * dim + dim) + (2 * window - 1) ** 2 * heads
              + (3 * heads * k ** 2 + k ** 2) + k ** 4 * dim + 2)
    assert count_params(cell) == params


def test_global_layer():
    dim, heads, ratio, k, height, width = 16, 2, 2, 3, 8, 8
    cell = acmix_ms.ACmixGlobal(dim, heads, sr_ratio=ratio, kernel_conv=k)
    tokens, reduced = height * width, (height // ratio) * (width // ratio)
    expected = (dim * dim * tokens  # q
                + reduced * dim * dim * ratio ** 2  # spatial-reduction conv
                + 2 * dim * dim * reduced  # kv
                + 2 * tokens * reduced * dim  # q.k and A.v
                + dim * dim * tokens  # proj
                + (3 * k ** 2 * dim + k ** 4 * dim) * tokens)  # fc + group conv
    assert count_macs(cell, (1, tokens, dim), extra_args=(height, width)) == expected
    params = ((dim * dim + dim) + (2 * dim * dim + 2 * dim) + (dim * dim * ratio ** 2 + dim) + 2 * dim
              + (dim * dim + dim) + (3 * heads * k ** 2 + k ** 2) + k ** 4 * dim + 2)
    assert count_params(cell) == params


def test_patchwise_layer():
    cin, rel, mid, share, ka, k, height, width = 32, 4, 8, 4, 3, 3, 8, 8
    cell = acmix_ms.ACmixPatchwise(cin, rel, mid, share_planes=share, kernel_att=ka, kernel_conv=k)
    hw, weights, patch, groups = height * width, mid // share, rel * (ka * ka + 1), 2 + mid // rel
    expected = (cin * (2 * rel + mid) * hw  # qkv
                + patch * weights * hw + weights * ka * ka * weights * hw  # conv_w's two 1x1 convs
                + ka * ka * mid * hw  # weighted sum of the values
                + groups * k * k * rel * hw + k ** 4 * mid * hw)  # fc + group conv
    assert count_macs(cell, (1, cin, height, width)) == expected
    params = ((cin + 1) * (2 * rel + mid) + 2 * patch + patch * weights + 2 * weights
              + weights * ka * ka * weights + ka * ka * weights + (groups * k * k + k * k) + k ** 4 * mid + 2)
    assert count_params(cell) == params
    assert count_params(cell, trainable_only=True) == params  # BN gamma/beta train, running stats not counted



def test_table1_resnet50_sums():
    from tools.table1 import PAPER_RESNET50, resnet50_layers, resnet50_sums
    layers = resnet50_layers()
    assert len(layers) == 16
    assert [layer for layer in layers if layer[2] == 2] == [(128, 56, 2), (256, 28, 2), (512, 14, 2)]
    sums = resnet50_sums()
    per_layer_conv = 9 * 64 * 64 * 56 * 56  # 9 C^2 HW is the same at every stage of ResNet-50
    assert sums[("convolution", "stage1")][0] == 16 * per_layer_conv
    # q/k/v at the input resolution: the three strided layers project 4x as many pixels.
    assert sums[("self_attention", "stage1")][0] == (16 + 3 * 3) * per_layer_conv // 3
    for key, (_, _, paper_params, _) in PAPER_RESNET50.items():
        assert round(sums[key][1] / 1e6, 1) == paper_params, key


def test_reference_paths_give_the_fast_paths_results():
    """count_macs runs the layers under ``reference_paths()``: separate Cell steps, the same outputs."""
    import numpy as np
    from mindspore import Tensor
    from acmix_ms.base import reference_paths
    previous_mode = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        x = Tensor(np.random.default_rng(1).standard_normal((2, C, H, W)).astype(np.float32))
        for cell in (acmix_ms.ACmixLocal(C, C, KA, N, KC), acmix_ms.ACmixLocal(C, C, KA, N, KC, rate_mode="fixed")):
            fast = cell(x).asnumpy()
            with reference_paths():
                reference = cell(x).asnumpy()
            np.testing.assert_allclose(reference, fast, rtol=1e-4, atol=1e-5)
            assert not acmix_ms.ACmixLocal.use_reference_paths  # restored after the block
    finally:
        ms.set_context(mode=previous_mode)


def test_kernel_layers_of_different_strides_in_pynative():
    """PyNative caches a Custom op's shape inference per primitive attributes: a stride-2 kernel layer after a
    stride-1 one once reused the stride-1 output shape (a broadcast error); forward and gradients now match."""
    import numpy as np
    from mindspore import Tensor
    previous_mode = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        x = Tensor(np.random.default_rng(2).standard_normal((1, C, H, W)).astype(np.float32))
        for stride in (1, 2, 1):
            cell = acmix_ms.ACmixLocal(C, C, KA, N, KC, stride=stride)
            assert cell(x).shape == (1, C, H // stride, W // stride)
            grads = ms.grad(lambda t, c=cell: c(t).sum(), grad_position=None, weights=cell.trainable_params())(x)
            assert [g.shape for g in grads] == [p.shape for p in cell.trainable_params()]
    finally:
        ms.set_context(mode=previous_mode)
