"""The CPU kernels of the convolutional layers and of the training step (``acmix_ms/kernels/cnn_cpu.cc``) against
independent references.

- ``CpuMaxPool2d`` / ``models.layers.MaxPool2d``: values against an explicit NumPy loop over windows (-inf padding),
  gradients against a NumPy scatter to each window's maximum, in training and in eval mode; NaN propagation; the
  layer equals ``nn.MaxPool2d`` (values and gradients) and ``set_fused_kernels`` switches it; ResNet's stem uses it.
- ``CpuBatchNorm`` / ``models.layers.BatchNorm2d``: the training pass (output, running statistics over three steps)
  and its gradients, and the inference pass and its gradients, against NumPy formulas in float64; the layer equals
  ``nn.BatchNorm2d``, falls back for other modes, and ``set_fused_kernels`` switches it.
- ``CpuAllFinite``: finite tensors, an inf or a NaN anywhere (also past the first segment of a large tensor);
  ``TrainStep`` with it gives the same losses and parameters as with ``amp.all_finite``, and skips the update of
  a step whose gradients are not finite.
"""
import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor, nn, ops

from acmix_ms.kernels.cnn_cpu import CpuAllFinite, CpuMaxPool2d
from models import create_model
from models.layers import BatchNorm2d, MaxPool2d, set_fused_kernels


@pytest.fixture(scope="module", autouse=True)
def graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")


def _pool_reference(x, kernel, stride, padding):
    """(y, argmax) by an explicit loop: -inf padding, floor output size, the first maximum in row-major order."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    batch, channels, height, width = x.shape
    out_h, out_w = (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1
    y = np.empty((batch, channels, out_h, out_w), np.float32)
    where = np.empty((batch, channels, out_h, out_w), np.int64)
    for b in range(batch):
        for c in range(channels):
            for i in range(out_h):
                for j in range(out_w):
                    best, at = -np.inf, -1
                    for u in range(kh):
                        for v in range(kw):
                            r, s = i * sh - ph + u, j * sw - pw + v
                            if 0 <= r < height and 0 <= s < width and (at < 0 or x[b, c, r, s] > best):
                                best, at = x[b, c, r, s], r * width + s
                    y[b, c, i, j], where[b, c, i, j] = best, at
    return y, where


def _scatter(dy, where, shape):
    dx = np.zeros(shape, np.float64)
    batch, channels = shape[:2]
    for b in range(batch):
        for c in range(channels):
            np.add.at(dx[b, c].reshape(-1), where[b, c].reshape(-1), dy[b, c].reshape(-1))
    return dx


class _InputGrad(nn.Cell):
    def __init__(self, network):
        super().__init__()
        self.network = network
        self.grad = ops.GradOperation(sens_param=True)

    def construct(self, x, sens):
        return self.grad(self.network)(x, sens)


class _FirstOutput(nn.Cell):
    def __init__(self, kernel):
        super().__init__()
        self.kernel = kernel

    def construct(self, x):
        return self.kernel(x)[0]


GEOMETRIES = [  # (input shape, kernel, stride, padding)
    ((2, 3, 9, 10), (3, 3), (2, 2), (1, 1)),   # ResNet's stem pooling, odd and even sides
    ((1, 2, 8, 8), (2, 2), (2, 2), (0, 0)),    # SAN's transition pooling
    ((2, 2, 7, 5), (3, 3), (1, 1), (1, 1)),    # stride 1: overlapping windows
    ((1, 3, 6, 11), (3, 2), (2, 1), (1, 0)),   # rectangular window, per-axis stride and padding
    ((1, 1, 5, 5), (5, 5), (3, 3), (2, 2)),    # windows mostly padding
]


@pytest.mark.parametrize("shape,kernel,stride,padding", GEOMETRIES)
@pytest.mark.parametrize("training", [True, False])
def test_max_pool_kernel_matches_numpy_loop(shape, kernel, stride, padding, training):
    rng = np.random.default_rng(sum(shape))
    x = rng.permutation(np.prod(shape)).reshape(shape).astype(np.float32) / 7.0 - 3.0  # distinct: no ties
    y_ref, where = _pool_reference(x, kernel, stride, padding)
    net = _FirstOutput(CpuMaxPool2d(kernel, stride, padding))
    net.set_train(training)
    y = net(Tensor(x)).asnumpy()
    np.testing.assert_array_equal(y, y_ref)
    dy = rng.standard_normal(y_ref.shape).astype(np.float32)
    dx = _InputGrad(net)(Tensor(x), Tensor(dy)).asnumpy()
    np.testing.assert_allclose(dx, _scatter(dy, where, shape), rtol=1e-6, atol=1e-6)


def test_max_pool_kernel_propagates_nan():
    x = np.arange(2 * 6 * 6, dtype=np.float32).reshape(1, 2, 6, 6)
    x[0, 0, 3, 3] = np.nan  # in four windows (rows and columns 1-3 and 3-5)
    net = _FirstOutput(CpuMaxPool2d((3, 3), (2, 2), (1, 1)))
    y = net(Tensor(x)).asnumpy()
    y_ref, _ = _pool_reference(np.nan_to_num(x, nan=1e9), (3, 3), (2, 2), (1, 1))
    nan_windows = y_ref == 1e9  # the windows that hold the NaN
    assert nan_windows.sum() == 4
    assert np.isnan(y[nan_windows]).all()
    np.testing.assert_array_equal(y[~nan_windows], y_ref[~nan_windows])


@pytest.mark.parametrize("training", [True, False])
def test_max_pool_layer_equals_nn_max_pool(training):
    rng = np.random.default_rng(3)
    x = Tensor(rng.standard_normal((2, 4, 15, 16)).astype(np.float32))
    fast, reference = MaxPool2d(3, 2, padding=1), nn.MaxPool2d(3, 2, pad_mode="pad", padding=1)
    assert fast.use_kernel
    fast.set_train(training)
    reference.set_train(training)
    y = fast(x)
    np.testing.assert_array_equal(y.asnumpy(), reference(x).asnumpy())
    dy = Tensor(rng.standard_normal(y.shape).astype(np.float32))
    np.testing.assert_allclose(_InputGrad(fast)(x, dy).asnumpy(), _InputGrad(reference)(x, dy).asnumpy(),
                               rtol=1e-6, atol=1e-6)


def test_max_pool_layer_rejects_bad_geometry():
    with pytest.raises(ValueError, match="padding <= kernel_size / 2"):
        MaxPool2d(3, 2, padding=2)
    with pytest.raises(ValueError, match="stride >= 1"):
        MaxPool2d(3, 0)


def test_resnet_stem_pools_with_the_kernel_and_switches_off():
    net = create_model("resnet26", num_classes=10)
    assert isinstance(net.maxpool, MaxPool2d) and net.maxpool.use_kernel
    x = Tensor(np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32))
    net.set_train(False)
    with_kernel = net.maxpool(x).asnumpy()
    norms = sum(isinstance(cell, BatchNorm2d) for _, cell in net.cells_and_names())
    assert set_fused_kernels(net, False) == 1 + norms and not net.maxpool.use_kernel
    np.testing.assert_array_equal(net.maxpool(x).asnumpy(), with_kernel)


# ---- BatchNorm -----------------------------------------------------------------------------------------------
def _bn_reference(x, gamma, beta, dy, eps=1e-5, relu=False, residual=None):
    """Training-mode batch norm (plus the residual, then ReLU) in float64: (y, batch mean, unbiased batch var, dx,
    dgamma, dbeta); with a residual also its gradient."""
    x, dy = x.astype(np.float64), dy.astype(np.float64)
    axes, count = (0, 2, 3), x.shape[0] * x.shape[2] * x.shape[3]
    mean, var = x.mean(axes), x.var(axes)
    xhat = (x - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + eps)
    y = xhat * gamma[None, :, None, None] + beta[None, :, None, None]
    if residual is not None:
        y = y + residual
    if relu:
        dy = dy * (y > 0)
        y = np.maximum(y, 0.0)
    dbeta, dgamma = dy.sum(axes), (dy * xhat).sum(axes)
    dx = (gamma / np.sqrt(var + eps))[None, :, None, None] * (
        dy - dbeta[None, :, None, None] / count - xhat * dgamma[None, :, None, None] / count)
    outputs = (y, mean, var * count / (count - 1), dx, dgamma, dbeta)
    return outputs if residual is None else outputs + (dy,)


class _AllGrads(nn.Cell):
    def __init__(self, network):
        super().__init__()
        self.network = network
        self.weights = ms.ParameterTuple(network.trainable_params())
        self.grad = ops.GradOperation(get_all=True, get_by_list=True, sens_param=True)

    def construct(self, *inputs_and_sens):
        return self.grad(self.network, self.weights)(*inputs_and_sens)


def _batch_norm_pair(channels, rng, relu=False):
    fast, reference = BatchNorm2d(channels, relu=relu), nn.BatchNorm2d(channels)
    gamma = rng.standard_normal(channels).astype(np.float32)
    beta = rng.standard_normal(channels).astype(np.float32)
    for layer in (fast, reference):
        layer.gamma.set_data(Tensor(gamma))
        layer.beta.set_data(Tensor(beta))
    return fast, reference, gamma, beta


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("shape", [(4, 3, 5, 7), (2, 16, 9, 9), (3, 5, 1, 1)])
def test_batch_norm_training_matches_numpy(shape, relu):
    rng = np.random.default_rng(sum(shape))
    fast, reference, gamma, beta = _batch_norm_pair(shape[1], rng, relu)
    assert fast.use_kernel
    fast.set_train(True)
    reference.set_train(True)
    moving_mean, moving_var = np.zeros(shape[1]), np.ones(shape[1])
    for step in range(3):  # running statistics: torch's momentum 0.1 (nn.BatchNorm2d's default 0.9 kept)
        x = (rng.standard_normal(shape) * (step + 1) + step - 1).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        y_ref, mean, var_unbiased, dx_ref, dgamma_ref, dbeta_ref = _bn_reference(x, gamma, beta, dy, relu=relu)
        y = fast(Tensor(x)).asnumpy()
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
        moving_mean, moving_var = 0.9 * moving_mean + 0.1 * mean, 0.9 * moving_var + 0.1 * var_unbiased
        np.testing.assert_allclose(fast.moving_mean.asnumpy(), moving_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(fast.moving_variance.asnumpy(), moving_var, rtol=1e-5, atol=1e-6)
        reference(Tensor(x))  # the same statistics in MindSpore's layer
        np.testing.assert_allclose(fast.moving_variance.asnumpy(), reference.moving_variance.asnumpy(), rtol=1e-5)
    (dx,), (dgamma, dbeta) = _AllGrads(fast)(Tensor(x), Tensor(dy))
    np.testing.assert_allclose(dx.asnumpy(), dx_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dgamma.asnumpy(), dgamma_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dbeta.asnumpy(), dbeta_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("relu", [False, True])
def test_batch_norm_inference_matches_numpy_and_nn_batch_norm(relu):
    rng = np.random.default_rng(5)
    shape = (3, 6, 8, 5)
    fast, reference, gamma, beta = _batch_norm_pair(shape[1], rng, relu)
    mean = rng.standard_normal(shape[1]).astype(np.float32)
    var = rng.uniform(0.5, 2.0, shape[1]).astype(np.float32)
    for layer in (fast, reference):
        layer.moving_mean.set_data(Tensor(mean))
        layer.moving_variance.set_data(Tensor(var))
        layer.set_train(False)
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    scale = (gamma / np.sqrt(var.astype(np.float64) + 1e-5))[None, :, None, None]
    xhat = (x - mean[None, :, None, None]) * scale / gamma[None, :, None, None]
    y = fast(Tensor(x)).asnumpy()
    y_ref = xhat * gamma[None, :, None, None] + beta[None, :, None, None]
    if relu:
        dy = (dy * (y_ref > 0)).astype(np.float32)
        y_ref = np.maximum(y_ref, 0.0)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    expected = reference(Tensor(x)).asnumpy()
    np.testing.assert_allclose(y, np.maximum(expected, 0.0) if relu else expected, rtol=1e-5, atol=1e-5)
    fast.use_kernel = False  # MindSpore's layer (then ops.relu): the same values
    np.testing.assert_allclose(fast(Tensor(x)).asnumpy(), y_ref, rtol=1e-5, atol=1e-5)
    fast.use_kernel = True
    (dx,), (dgamma, dbeta) = _AllGrads(fast)(Tensor(x), Tensor(dy))
    np.testing.assert_allclose(dx.asnumpy(), dy * scale, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dgamma.asnumpy(), (dy * xhat).sum((0, 2, 3)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dbeta.asnumpy(), dy.sum((0, 2, 3)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_with_residual_matches_numpy(relu, training):
    """BatchNorm2d(residual=True): y = relu?(BN(x) + r), kernel and MindSpore-ops fallback, values and gradients."""
    rng = np.random.default_rng(11 + relu + 2 * training)
    shape = (4, 6, 5, 7)
    layer = BatchNorm2d(shape[1], relu=relu, residual=True)
    assert layer.use_kernel and "residual=True" in repr(layer)
    gamma = rng.standard_normal(shape[1]).astype(np.float32)
    beta = rng.standard_normal(shape[1]).astype(np.float32)
    mean = rng.standard_normal(shape[1]).astype(np.float32)
    var = rng.uniform(0.5, 2.0, shape[1]).astype(np.float32)
    for name, value in (("gamma", gamma), ("beta", beta), ("moving_mean", mean), ("moving_variance", var)):
        getattr(layer, name).set_data(Tensor(value))
    x = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
    residual = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    if training:
        y_ref, batch_mean, var_unbiased, dx_ref, dgamma_ref, dbeta_ref, dr_ref = _bn_reference(
            x, gamma, beta, dy, relu=relu, residual=residual)
        moving = (0.9 * mean + 0.1 * batch_mean, 0.9 * var + 0.1 * var_unbiased)
    else:  # fixed statistics: an affine map per channel
        scale = (gamma / np.sqrt(var.astype(np.float64) + 1e-5))[None, :, None, None]
        xhat = (x - mean[None, :, None, None]) * scale / gamma[None, :, None, None]
        y_ref = xhat * gamma[None, :, None, None] + beta[None, :, None, None] + residual
        dr_ref = dy * (y_ref > 0) if relu else dy.astype(np.float64)
        y_ref = np.maximum(y_ref, 0.0) if relu else y_ref
        dx_ref, dgamma_ref, dbeta_ref = dr_ref * scale, (dr_ref * xhat).sum((0, 2, 3)), dr_ref.sum((0, 2, 3))
        moving = (mean, var)
    for use_kernel in (True, False):
        layer.use_kernel = use_kernel
        layer.set_train(training)
        for name, value in (("moving_mean", mean), ("moving_variance", var)):
            getattr(layer, name).set_data(Tensor(value))
        y = layer(Tensor(x), Tensor(residual)).asnumpy()
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5, err_msg=f"kernel={use_kernel}")
        np.testing.assert_allclose(layer.moving_mean.asnumpy(), moving[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(layer.moving_variance.asnumpy(), moving[1], rtol=1e-5, atol=1e-6)
        (dx, dr), (dgamma, dbeta) = _AllGrads(layer)(Tensor(x), Tensor(residual), Tensor(dy))
        np.testing.assert_allclose(dx.asnumpy(), dx_ref, rtol=1e-4, atol=1e-5, err_msg=f"kernel={use_kernel}")
        np.testing.assert_allclose(dr.asnumpy(), dr_ref, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(dgamma.asnumpy(), dgamma_ref, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(dbeta.asnumpy(), dbeta_ref, rtol=1e-4, atol=1e-4)


def test_resnet_block_fuses_the_shortcut_unless_drop_path():
    plain, dropping = create_model("resnet_tiny", num_classes=10), create_model("resnet_tiny", num_classes=10,
                                                                               drop_path_rate=0.1)
    plain_blocks = [cell for _, cell in plain.cells_and_names() if hasattr(cell, "fuse_shortcut")]
    assert plain_blocks and all(block.fuse_shortcut and block.bn3.add_residual for block in plain_blocks)
    # drop path acts between bn3 and the sum: the first block (rate 0) fuses, later ones do not
    fused = [block.fuse_shortcut for _, block in dropping.cells_and_names() if hasattr(block, "fuse_shortcut")]
    assert fused[0] and not fused[-1]


def test_batch_norm_layer_falls_back_and_switches():
    assert not BatchNorm2d(4, use_batch_statistics=True).use_kernel  # a mode the kernel does not cover
    net = create_model("resnet_tiny", num_classes=10)
    norms = [cell for _, cell in net.cells_and_names() if isinstance(cell, BatchNorm2d)]
    assert norms and all(cell.use_kernel for cell in norms)
    assert set_fused_kernels(net, False) == len(norms)
    assert not any(cell.use_kernel for cell in norms)


# ---- AllFinite ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [None, np.inf, -np.inf, np.nan])
def test_all_finite_kernel(bad):
    rng = np.random.default_rng(0)
    tensors = [rng.standard_normal(shape).astype(np.float32) for shape in ((3, 4), (7,), (1,), (70000,))]
    tensors[0] *= 1e30  # large but finite
    if bad is not None:
        tensors[3][-1] = bad  # in the last segment of the largest tensor
    flag = CpuAllFinite()(*[Tensor(t) for t in tensors]).asnumpy()
    assert flag.shape == (1,) and flag[0] == (1.0 if bad is None else 0.0)
    if bad is not None:
        tensors[3][-1] = 0.0
        tensors[1][0] = bad  # in a small tensor
        assert CpuAllFinite()(*[Tensor(t) for t in tensors]).asnumpy()[0] == 0.0


class _Scaled(nn.Cell):
    """logits = x * w (w (4,) in [1.5, 2]); an input of 3e38 makes the logits overflow, the gradients NaN."""

    def __init__(self):
        super().__init__()
        self.weight = ms.Parameter(Tensor(np.linspace(1.5, 2.0, 4).astype(np.float32)), name="weight")

    def construct(self, x):
        return x * self.weight


def _run_steps(use_kernel, batches):
    from engine.config import build_config
    from engine.losses import SmoothedCrossEntropy
    from engine.optim import create_optimizer
    from engine.step import NetWithLoss, NoLossScaler, TrainStep
    net = _Scaled()
    cfg = build_config(file_values={"opt": "sgd", "lr": 0.1, "epochs": 1, "warmup_epochs": 0})
    optimizer, _, _ = create_optimizer(cfg, net, list(net.parameters_and_names()), steps_per_epoch=10,
                                       global_batch=1)
    step = TrainStep(NetWithLoss(net, SmoothedCrossEntropy(0.0)), optimizer, NoLossScaler())
    assert step.use_finite_kernel
    step.use_finite_kernel = use_kernel
    outputs = []
    for x, y in batches:
        loss, _, finite = step(Tensor(x), Tensor(y))
        outputs.append((float(loss.asnumpy()), bool(finite.asnumpy()), net.weight.asnumpy().copy()))
    return outputs


def test_train_step_finite_check_kernel_equals_amp_and_skips_bad_steps():
    labels = np.array([1, 2], np.int32)
    good = np.array([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]], np.float32)
    huge = np.full((2, 4), 3e38, np.float32)  # finite input whose gradients are not
    batches = [(good, labels), (huge, labels), (good, labels)]
    with_kernel, with_amp = _run_steps(True, batches), _run_steps(False, batches)
    assert [finite for _, finite, _ in with_kernel] == [True, False, True]
    np.testing.assert_array_equal(with_kernel[1][2], with_kernel[0][2])  # the bad step changed nothing
    for (loss_k, finite_k, weight_k), (loss_a, finite_a, weight_a) in zip(with_kernel, with_amp):
        assert finite_k == finite_a
        np.testing.assert_array_equal(weight_k, weight_a)
        assert loss_k == loss_a or (np.isnan(loss_k) and np.isnan(loss_a))
