"""The fast paths of the transformer Cells (issue 13) against independent references.

- The shifted-window token order (one gather = cyclic shift + window partition) and the shifted-map order
  against an explicit NumPy roll / reshape / transpose, and the SW-MSA mask against Swin's slice-built mask.
- ``TokenPermutation``: forward and its hand-written gradient against NumPy indexing.
- ``acmix_ms.layout.Permute`` (the CPU kernel and ops.transpose): values and gradients against ``numpy.transpose``;
  exported graphs hold the plain Transpose, not the kernel.
- A narrow Swin-ACmix (shifted and plain blocks) against the PyTorch re-implementation of the official
  code with converted weights: the gradients of the input and of every parameter both frameworks name
  alike (the backward pass of the whole fast path; the forward is tests/test_convert_models.py).
"""
import os
import sys

import numpy as np
import pytest

import mindspore as ms

from acmix_ms.layout import Permute, set_permute_kernels
from acmix_ms.window import (MASK_VALUE, TokenPermutation, inverse_order, shift_token_order,
                             shifted_window_mask, window_token_order)


@pytest.fixture(scope="module", autouse=True)
def graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE)


def _roll_and_partition(grid, window, shift):
    """Explicit reference: np.roll by -shift, then (H/w, w, W/w, w) -> windows row-major."""
    height, width = grid.shape
    rolled = np.roll(grid, (-shift, -shift), (0, 1))
    blocks = rolled.reshape(height // window, window, width // window, window).transpose(0, 2, 1, 3)
    return blocks.reshape(-1)


@pytest.mark.parametrize("height,width,window,shift", [(8, 8, 4, 2), (6, 9, 3, 1), (7, 7, 7, 0), (8, 4, 4, 0)])
def test_window_token_order_is_roll_then_partition(height, width, window, shift):
    grid = np.arange(height * width).reshape(height, width)
    order = window_token_order(height, width, window, shift)
    np.testing.assert_array_equal(order, _roll_and_partition(grid, window, shift))
    np.testing.assert_array_equal(shift_token_order(height, width, shift),
                                  np.roll(grid, (-shift, -shift), (0, 1)).reshape(-1))
    np.testing.assert_array_equal(order[inverse_order(order)], np.arange(height * width))


def test_shifted_window_mask_matches_swin_slices():
    height, width, window, shift = 8, 12, 4, 2
    region = np.zeros((height, width))
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    count = 0
    for rows in cuts:
        for cols in cuts:
            region[rows, cols] = count
            count += 1
    ids = region.reshape(height // window, window, width // window, window).transpose(0, 2, 1, 3)
    ids = ids.reshape(-1, window * window)
    expected = np.where(ids[:, :, None] != ids[:, None, :], MASK_VALUE, 0.0)
    np.testing.assert_array_equal(shifted_window_mask(height, width, window, shift), expected)


def test_token_permutation_forward_and_gradient():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 12, 5)).astype(np.float32)
    order = rng.permutation(12).astype(np.int32)
    probe = rng.standard_normal((2, 12, 5)).astype(np.float32)
    cell = TokenPermutation()
    order_t, inverse_t = ms.Tensor(order), ms.Tensor(inverse_order(order))
    np.testing.assert_array_equal(cell(ms.Tensor(x), order_t, inverse_t).asnumpy(), x[:, order])

    def loss(inputs):
        return (cell(inputs, order_t, inverse_t) * ms.Tensor(probe)).sum()

    grad = ms.grad(loss)(ms.Tensor(x)).asnumpy()
    expected = np.zeros_like(x)
    expected[:, order] = probe  # d/dx[:, order[p]] of sum(x[:, order[p]] * probe[:, p])
    np.testing.assert_array_equal(grad, expected)


class _Permuted(ms.nn.Cell):
    """(x * scale) with its axes in ``dims`` order, through ``Permute``."""

    def __init__(self, dims):
        super().__init__()
        self.permute = Permute(dims)
        self.scale = ms.Parameter(ms.Tensor(np.float32(1.5)), name="scale")

    def construct(self, x):
        return self.permute(x * self.scale) + 1.0


# (shape, dims): the inner-axes transpose with a partial tile of 8 rows, row copies, a gather, 5-D/6-D, rank 1
PERMUTATIONS = [((2, 5, 13), (0, 2, 1)), ((2, 3, 4, 5), (0, 2, 1, 3)), ((3, 4, 5, 2), (2, 0, 1, 3)),
                ((2, 3, 4, 5), (0, 3, 1, 2)), ((2, 6, 4, 9), (0, 2, 3, 1)), ((1, 2, 2, 3, 2, 4), (0, 1, 3, 4, 2, 5)),
                ((4, 3, 2, 5, 3), (4, 3, 2, 1, 0)), ((7,), (0,))]


@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize("shape,dims", PERMUTATIONS)
def test_permute_matches_numpy_transpose(shape, dims, use_kernel):
    rng = np.random.default_rng(4)
    x = rng.standard_normal(shape).astype(np.float32)
    probe = rng.standard_normal(np.transpose(x, dims).shape).astype(np.float32)
    cell = _Permuted(dims)
    assert cell.permute.kernel is not None  # the CPU kernel builds here (g++ is a test requirement)
    assert set_permute_kernels(cell, use_kernel) == 1
    np.testing.assert_array_equal(cell(ms.Tensor(x)).asnumpy(), np.transpose(x * np.float32(1.5), dims) + 1)

    def loss(inputs):
        return (cell(inputs) * ms.Tensor(probe)).sum()

    grad = ms.grad(loss)(ms.Tensor(x)).asnumpy()
    # d/dx of sum(transpose(1.5 x) * probe) = 1.5 * probe with the axes put back
    np.testing.assert_array_equal(grad, np.float32(1.5) * np.transpose(probe, np.argsort(dims)))


def test_permute_checks_dims_and_keeps_other_dtypes():
    with pytest.raises(ValueError, match="dims must be a permutation of 0 .. 2"):
        Permute((0, 2, 2))
    cell = Permute((1, 0))
    x = np.arange(6, dtype=np.int32).reshape(2, 3)  # not float32: ops.transpose
    np.testing.assert_array_equal(cell(ms.Tensor(x)).asnumpy(), x.T)


def test_exported_graph_holds_no_permute_kernel(tmp_path):
    """``make_exportable`` switches every Permute to ops.transpose; the file has no reference to the CPU library
    and reproduces the network."""
    from engine.export import make_exportable
    x = ms.Tensor(np.random.default_rng(5).standard_normal((2, 3, 4)).astype(np.float32))
    expected = _Permuted((0, 2, 1))(x).asnumpy()  # the kernel's graph
    cell = _Permuted((0, 2, 1))  # a twin switched before its first run
    assert make_exportable(cell) == 0 and not cell.permute.use_kernel  # switched, not counted as a layer
    base = str(tmp_path / "portable")
    ms.export(cell, x, file_name=base, file_format="MINDIR")
    data = open(base + ".mindir", "rb").read()
    assert b"PermuteForward" not in data and b"Transpose" in data
    np.testing.assert_array_equal(ms.nn.GraphCell(ms.load(base + ".mindir"))(x).asnumpy(), expected)


def _probe_loss(layer, probe):
    probe = ms.Tensor(probe)

    def loss(inputs):
        return (layer(inputs) * probe).sum()
    return loss


def test_gelu_kernel_matches_numpy_and_mindspore_gelu():
    """Fused CPU GELU: forward and gradient against float64 NumPy (math.erf) and MindSpore's exact GELU."""
    import math
    from mindspore import nn
    from models.layers import GELU
    cell = GELU()
    if ms.get_context("device_target") == "CPU":
        assert cell.use_kernel, "the CPU kernel should be selected on CPU"
    rng = np.random.default_rng(2)
    x = np.concatenate([np.linspace(-12, 12, 2401), rng.standard_normal(2999) * 3]).astype(np.float32)
    x = x.reshape(4, 1350)
    probe = rng.standard_normal(x.shape).astype(np.float32)
    x64 = x.astype(np.float64)
    cdf = 0.5 * (1.0 + np.vectorize(math.erf)(x64 / math.sqrt(2.0)))
    expected = x64 * cdf
    expected_grad = probe * (cdf + x64 * np.exp(-0.5 * x64 ** 2) / math.sqrt(2.0 * math.pi))

    reference = nn.GELU(approximate=False)
    for layer in (cell, reference):
        out = layer(ms.Tensor(x)).asnumpy()
        np.testing.assert_allclose(out, expected, rtol=0, atol=2e-6 * np.maximum(1.0, np.abs(x64)).max())
        grad = ms.grad(_probe_loss(layer, probe))(ms.Tensor(x)).asnumpy()
        np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-6)
    # non-finite inputs as MindSpore's GELU (the vectorised clamp inside erf must keep NaN; GELU(-inf) is NaN)
    special = np.array([[np.nan, np.inf, -np.inf, 0.0, 100.0, -100.0, 4.5, -4.5, 1.0]], np.float32)
    np.testing.assert_allclose(cell(ms.Tensor(special)).asnumpy(), reference(ms.Tensor(special)).asnumpy(),
                               rtol=1e-5, atol=1e-5, equal_nan=True)
    # switched off (e.g. for a portable MINDIR) it runs MindSpore's GELU
    from models.layers import set_fused_kernels
    net = nn.SequentialCell([GELU()])
    assert set_fused_kernels(net, False) == (1 if cell.kernel is not None else 0)
    assert not net[0].use_kernel
    np.testing.assert_array_equal(net(ms.Tensor(x)).asnumpy(), reference(ms.Tensor(x)).asnumpy())


@pytest.mark.parametrize("shape,out_features", [((2, 9, 24), 40), ((5, 16), 7)])
def test_dense_bias_kernel_matches_numpy_and_nn_dense(shape, out_features):
    """``acmix_ms.linear.Dense`` (bias addition and its gradient by the CPU kernels): output and the gradients of the
    input, weight and bias against float64 NumPy and ``nn.Dense``; switched off it is ``nn.Dense``."""
    from mindspore import nn
    from acmix_ms.linear import Dense
    from models.layers import set_fused_kernels
    rng = np.random.default_rng(5)
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape[:-1] + (out_features,)).astype(np.float32)
    weight = rng.standard_normal((out_features, shape[-1])).astype(np.float32)
    bias = rng.standard_normal(out_features).astype(np.float32)
    x64, dy64, w64 = x.astype(np.float64), dy.astype(np.float64), weight.astype(np.float64)
    rows = tuple(range(x.ndim - 1))
    expected = (x64 @ w64.T + bias, dy64 @ w64, np.tensordot(dy64, x64, (rows, rows)), dy64.sum(rows))
    fast = Dense(shape[-1], out_features)
    if ms.get_context("device_target") == "CPU":
        assert fast.use_kernel
    reference = nn.Dense(shape[-1], out_features)
    for layer in (fast, reference):
        layer.weight.set_data(ms.Tensor(weight))
        layer.bias.set_data(ms.Tensor(bias))
        np.testing.assert_allclose(layer(ms.Tensor(x)).asnumpy(), expected[0], rtol=1e-5, atol=1e-5)
        grad_x, (grad_w, grad_b) = ms.grad(_probe_loss(layer, dy), grad_position=0,
                                          weights=[layer.weight, layer.bias])(ms.Tensor(x))
        for got, want in zip((grad_x, grad_w, grad_b), expected[1:]):
            np.testing.assert_allclose(got.asnumpy(), want, rtol=1e-4, atol=1e-4)
    net = nn.SequentialCell([Dense(shape[-1], out_features)])
    assert set_fused_kernels(net, False) == (1 if fast.kernel is not None else 0)
    assert not net[0].use_kernel
    assert Dense(4, 3, has_bias=False).kernel is None  # no bias: nothing to replace


def _layer_norm_numpy(x, gamma, beta, eps, dy):
    """float64 LayerNorm over the last axis and its gradients (explicit formulas)."""
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    xhat = (x - mean) / np.sqrt(var + eps)
    g = dy * gamma
    dx = (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True)) / np.sqrt(var + eps)
    rows = tuple(range(x.ndim - 1))
    return xhat * gamma + beta, dx, (dy * xhat).sum(rows), dy.sum(rows)


@pytest.mark.parametrize("shape", [(2, 3, 49, 49), (5, 17), (4, 1)])
def test_softmax_kernel_matches_numpy_and_mindspore(shape):
    """``acmix_ms.softmax.Softmax`` (the CPU kernel): values and the input gradient against float64 NumPy, with
    large and masked (-100, -inf) logits; NaN rows stay NaN; switched off it is ``ops.softmax``."""
    from mindspore import nn, ops
    from acmix_ms.softmax import Softmax
    from models.layers import set_fused_kernels
    rng = np.random.default_rng(9)
    x = (rng.standard_normal(shape) * 4).astype(np.float32)
    x.reshape(-1, shape[-1])[0, 0] = 80.0  # a large logit: the max is subtracted
    if shape[-1] > 2:
        x.reshape(-1, shape[-1])[1, :2] = (-100.0, -np.inf)  # the SW-MSA mask value, and an exact zero weight
    probe = rng.standard_normal(shape).astype(np.float32)
    x64 = x.astype(np.float64)
    e = np.exp(x64 - x64.max(-1, keepdims=True))
    expected = e / e.sum(-1, keepdims=True)
    expected_grad = expected * (probe - (probe * expected).sum(-1, keepdims=True))
    cell = Softmax()
    if ms.get_context("device_target") == "CPU":
        assert cell.use_kernel
    for layer in (cell, lambda t: ops.softmax(t, -1)):
        np.testing.assert_allclose(layer(ms.Tensor(x)).asnumpy(), expected, rtol=1e-5, atol=1e-7)
    grad = ms.grad(_probe_loss(cell, probe))(ms.Tensor(x)).asnumpy()
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-6)
    bad = x.copy()
    bad.reshape(-1, shape[-1])[-1, -1] = np.nan
    out = cell(ms.Tensor(bad)).asnumpy().reshape(-1, shape[-1])
    assert np.isnan(out[-1]).all() and np.isfinite(out[:-1]).all()
    net = nn.SequentialCell([Softmax()])
    assert set_fused_kernels(net, False) == (1 if cell.kernel is not None else 0) and not net[0].use_kernel
    np.testing.assert_allclose(net(ms.Tensor(x)).asnumpy(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape", [(2, 7, 5, 24), (37, 96)])
def test_layer_norm_kernel_matches_numpy_and_mindspore(shape):
    """Fused CPU LayerNorm: output and the gradients of input, gamma and beta against float64 NumPy and
    nn.LayerNorm (which must pass the same checks)."""
    from mindspore import nn
    from models.layers import LayerNorm
    rng = np.random.default_rng(4)
    x = (rng.standard_normal(shape) * 3 + 1.5).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    gamma = (1 + 0.3 * rng.standard_normal(shape[-1])).astype(np.float32)
    beta = (0.2 * rng.standard_normal(shape[-1])).astype(np.float32)
    eps = 1e-5
    expected = _layer_norm_numpy(*(a.astype(np.float64) for a in (x, gamma, beta)), eps, dy.astype(np.float64))
    fast = LayerNorm(shape[-1], eps)
    if ms.get_context("device_target") == "CPU":
        assert fast.use_kernel
    reference = nn.LayerNorm((shape[-1],), epsilon=eps)
    for layer in (fast, reference):
        layer.gamma.set_data(ms.Tensor(gamma))
        layer.beta.set_data(ms.Tensor(beta))
        out = layer(ms.Tensor(x)).asnumpy()
        np.testing.assert_allclose(out, expected[0], rtol=1e-5, atol=1e-5)
        grad_x, (grad_gamma, grad_beta) = ms.grad(_probe_loss(layer, dy), grad_position=0,
                                                  weights=[layer.gamma, layer.beta])(ms.Tensor(x))
        np.testing.assert_allclose(grad_x.asnumpy(), expected[1], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(grad_gamma.asnumpy(), expected[2], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(grad_beta.asnumpy(), expected[3], rtol=1e-4, atol=1e-4)


def test_bench_vs_torch_report_and_arguments():
    """The comparison script's ratios (ours / PyTorch per round, median) from given timings, and its argument
    checks (the measurements themselves are benchmarks, not tests)."""
    from benchmarks import bench_vs_torch as bench
    args = bench.parse_args(["--models", "swin_tiny", "--modes", "inference", "--rounds", "2", "--batch", "4"])
    results = {("swin_tiny", "inference", 0, "ours"): {"stats": {"median": 1.0}, "peak_rss_mib": 1500.0},
               ("swin_tiny", "inference", 0, "torch"): {"stats": {"median": 2.0}, "peak_rss_mib": 1000.0},
               ("swin_tiny", "inference", 1, "ours"): {"stats": {"median": 1.0}, "peak_rss_mib": 1500.0},
               ("swin_tiny", "inference", 1, "torch"): {"error": "timed out after 9 s"}}
    env = {"date": "d", "cpu": "c", "machine": "m", "cores": 2, "ram_gib": 1.0, "load_average": (1.0, 1.0, 1.0),
           "python": "p", "mindspore": "m", "numpy": "n", "device_target": "CPU", "command": "x"}
    text = bench.report(args, results, env)
    assert "| swin_tiny | inference | 1 | 4.00 | 2.00 | 2.00x | 1500 | 1000 | 1.50x |" in text
    assert "error: timed out after 9 s" in text
    assert "| swin_tiny | inference | 2.00x | 1.50x |" in text  # the failed round does not count
    with pytest.raises(SystemExit):
        bench.parse_args(["--rounds", "0"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--models", "vit"])


torch = pytest.importorskip("torch", reason="needs torch: the `torch-tests` extra (its CPU build)")


def test_swin_acmix_gradients_match_official(tmp_path):
    import models
    from tests.torch_official import OfficialSwinACmix, randomize_
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    import convert_official

    arch = dict(img_size=32, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4)
    official = randomize_(OfficialSwinACmix(num_classes=5, **arch), seed=11).train()
    src, dst = str(tmp_path / "official.pth"), str(tmp_path / "converted.ckpt")
    torch.save({"model": official.state_dict()}, src)
    ours = dict(arch, drop_path_rate=0.0)
    convert_official.convert("swin_tiny_acmix", src, dst, model_kwargs=ours)
    net = models.create_model("swin_tiny_acmix", num_classes=5, checkpoint=dst, **ours)
    net.set_train(True)

    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    probe = rng.standard_normal((2, 5)).astype(np.float32)

    x_t = torch.from_numpy(x).requires_grad_(True)
    loss_t = (official(x_t) * torch.from_numpy(probe)).sum()
    loss_t.backward()
    official_grads = {name: p.grad.numpy() for name, p in official.named_parameters()}

    params = [p for p in net.trainable_params() if p.name in official_grads]
    assert len(params) >= 20

    def loss(inputs):
        return (net(inputs) * ms.Tensor(probe)).sum()

    grad_x, grads = ms.value_and_grad(loss, grad_position=0, weights=params)(ms.Tensor(x))[1]
    scale = np.abs(x_t.grad.numpy()).max()
    assert np.abs(grad_x.asnumpy() - x_t.grad.numpy()).max() / scale < 1e-4
    for param, grad in zip(params, grads):
        expected = official_grads[param.name]
        tol = 1e-4 * max(np.abs(expected).max(), 1e-3)
        assert np.abs(grad.asnumpy() - expected).max() < tol, param.name
