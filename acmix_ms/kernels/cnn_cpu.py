"""CPU kernels of the convolutional layers and of the training step (``ops.Custom`` func_type 'aot', source
``cnn_cpu.cc``).

``CpuMaxPool2d``: max pooling with implicit -inf padding (``nn.MaxPool2d(..., pad_mode="pad")``), NaN-propagating;
while training the forward also records where each maximum is, and the backward scatters the gradient there.
``CpuBatchNorm``: ``nn.BatchNorm2d``'s training and inference passes, one kernel each, the backward in two passes
over the data; ``CpuBatchNormAdd`` the same plus a residual addition (y = BN(x) + r, then the optional ReLU). ``CpuAllFinite``: whether every element of many float32 tensors is finite, one pass. Callers pick
them through ``models.layers`` (``MaxPool2d``, ``BatchNorm2d``) and ``engine.step``, which fall back to
MindSpore's ops on other devices, other dtypes, or when the kernels cannot be built.
"""
import numpy as np
from mindspore import Tensor, nn, ops
from mindspore.common import dtype as mstype

from .build import compiled_library

SOURCE = "cnn_cpu.cc"


def pooled_size(size, kernel, stride, padding):
    """Output length of a max pooling (floor mode): (size + 2 padding - kernel) // stride + 1."""
    return (size + 2 * padding - kernel) // stride + 1


class _PooledShape:
    def __init__(self, kernel, stride, padding):
        self.kernel, self.stride, self.padding = kernel, stride, padding

    def __call__(self, x, config):
        return [x[0], x[1], *(pooled_size(x[2 + a], self.kernel[a], self.stride[a], self.padding[a]) for a in (0, 1))]

    def with_index(self, x, config):
        return self(x, config), self(x, config)


def _first_dtype(first, *others):
    return first


def _pooled_dtypes(x, config):
    return x, mstype.int32


def _shape_of_third(dy, index, x):
    return list(x)


class CpuMaxPool2d(nn.Cell):
    """x (B, C, H, W) float32 -> (y, index): y the max over (kh, kw) windows at strides (sh, sw) with -inf padding
    (ph, pw) each side, (B, C, (H + 2 ph - kh) // sh + 1, (W + 2 pw - kw) // sw + 1); index (int32, like y): where
    each maximum is in its plane (h W + w), computed only while training (else a (1,) placeholder). bprop:
    dx[index] += dy (outside training the index is found again). Arguments are pairs (height, width); 2 p <= k.
    Callers use output 0."""

    def __init__(self, kernel, stride, padding):
        super().__init__()
        library = compiled_library(SOURCE)
        self.kernel, self.stride, self.padding = tuple(kernel), tuple(stride), tuple(padding)
        shape = _PooledShape(self.kernel, self.stride, self.padding)
        self.forward_kernel = ops.Custom(f"{library}:MaxPool2dForward", out_shape=shape, out_dtype=_first_dtype,
                                         func_type="aot")
        self.index_kernel = ops.Custom(f"{library}:MaxPool2dForwardIndex", out_shape=shape.with_index,
                                       out_dtype=_pooled_dtypes, func_type="aot")
        self.backward_kernel = ops.Custom(f"{library}:MaxPool2dBackward", out_shape=_shape_of_third,
                                          out_dtype=_first_dtype, func_type="aot")
        # PyNative caches shape inference per primitive attributes: one attribute per geometry
        geometry = "x".join(map(str, self.kernel + self.stride + self.padding))
        for kernel_op in (self.forward_kernel, self.index_kernel, self.backward_kernel):
            kernel_op.add_prim_attr("acmix_config", geometry)
        self.config = Tensor(np.array(self.kernel + self.stride + self.padding, np.int32))
        self.no_index = Tensor(np.zeros(1, np.int32))

    def construct(self, x):
        if self.training:
            return self.index_kernel(x, self.config)
        return self.forward_kernel(x, self.config), self.no_index

    def bprop(self, x, out, dout):
        # a gradient outside training (e.g. a saliency map of an eval-mode network) finds the maxima again
        index = out[1] if self.training else self.index_kernel(x, self.config)[1]
        return (self.backward_kernel(dout[0], index, x),)


def _norm_train_shapes(x, *inputs):
    channels = list(inputs[-2])  # the moving variance; the inputs before it are (residual,) gamma, beta, mean
    return list(x), channels, channels, channels, channels


def _norm_train_dtypes(x, *dtypes):
    return x, x, x, x, x


def _norm_grad_shapes(dy, x, gamma, mean, rstd, y, config):
    return list(x), list(gamma), list(gamma)


def _norm_grad_dtypes(dy, x, gamma, mean, rstd, y, config):
    return x, x, x


def _norm_add_grad_shapes(dy, x, gamma, mean, rstd, y, config):
    return list(x), list(x), list(gamma), list(gamma)


def _norm_add_grad_dtypes(dy, x, gamma, mean, rstd, y, config):
    return x, x, x, x


def _shape_of_first(x, *inputs):
    return list(x)


class CpuBatchNorm(nn.Cell):
    """Batch normalisation of (B, C, H, W) float32 over (B, H, W) per channel, as ``nn.BatchNorm2d``, optionally
    followed by a ReLU in the same pass; no parameters (the calling layer passes its own).

    ``construct(x, gamma, beta, moving_mean, moving_var)`` (training): (y, batch mean (C), 1/sqrt(biased var + eps)
    (C), updated moving mean (C), updated moving variance (C)) where updated = (1 - momentum) old + momentum batch
    (the batch variance unbiased); the caller assigns the last two. bprop: (dx, dgamma, dbeta, 0, 0); the statistics
    outputs carry no gradient. ``infer(x, gamma, beta, mean, var)``: y with the given statistics, one pass; its
    bprop is written with MindSpore's ops (rarely needed: gradients of an eval-mode network).
    ``CpuBatchNormAdd`` takes a residual (like x) as a second input: y = BN(x) + residual, then the ReLU.

    Args:
        eps: added to the variance. momentum: the weight of the batch statistics (torch's convention; MindSpore's
            ``nn.BatchNorm2d(momentum=m)`` stores ``1 - m`` as its ``momentum`` attribute: pass that).
        relu: y = max(normalised x, 0).
    """

    ENTRY = "BatchNorm"  # the kernels' name prefix: BatchNormTrain, BatchNormBackward, BatchNormInfer

    def __init__(self, eps, momentum, relu=False):
        super().__init__()
        library = compiled_library(SOURCE)
        adds = self.ENTRY.endswith("Add")
        self.train_kernel = ops.Custom(f"{library}:{self.ENTRY}Train", out_shape=_norm_train_shapes,
                                       out_dtype=_norm_train_dtypes, func_type="aot")
        self.backward_kernel = ops.Custom(f"{library}:{self.ENTRY}Backward",
                                          out_shape=_norm_add_grad_shapes if adds else _norm_grad_shapes,
                                          out_dtype=_norm_add_grad_dtypes if adds else _norm_grad_dtypes,
                                          func_type="aot")
        flag = 1.0 if relu else 0.0
        self.config = Tensor(np.array([eps, momentum, flag], np.float32))
        self.backward_config = Tensor(np.array([flag], np.float32))
        infer_class = _CpuBatchNormAddInfer if adds else _CpuBatchNormInfer
        self.infer = infer_class(library, self.ENTRY, Tensor(np.array([eps, flag], np.float32)), eps, relu)

    def construct(self, x, gamma, beta, moving_mean, moving_var):
        return self.train_kernel(x, gamma, beta, moving_mean, moving_var, self.config)

    def bprop(self, x, gamma, beta, moving_mean, moving_var, out, dout):
        dx, dgamma, dbeta = self.backward_kernel(dout[0], x, gamma, out[1], out[2], out[0], self.backward_config)
        return dx, dgamma, dbeta, ops.zeros_like(moving_mean), ops.zeros_like(moving_var)


class CpuBatchNormAdd(CpuBatchNorm):
    """``CpuBatchNorm`` plus a residual: ``construct(x, residual, gamma, beta, moving_mean, moving_var)``, y =
    BN(x) + residual (then the ReLU): a ResNet block's last batch norm, shortcut addition and ReLU in one pass.
    bprop: (dx, dresidual, dgamma, dbeta, 0, 0)."""

    ENTRY = "BatchNormAdd"

    def construct(self, x, residual, gamma, beta, moving_mean, moving_var):
        return self.train_kernel(x, residual, gamma, beta, moving_mean, moving_var, self.config)

    def bprop(self, x, residual, gamma, beta, moving_mean, moving_var, out, dout):
        dx, dresidual, dgamma, dbeta = self.backward_kernel(dout[0], x, gamma, out[1], out[2], out[0],
                                                            self.backward_config)
        return dx, dresidual, dgamma, dbeta, ops.zeros_like(moving_mean), ops.zeros_like(moving_var)


def _inference_norm_grads(x, gamma, mean, var, out, dout, eps, relu):
    """(dx, dgamma, dbeta, dsum) of y = relu?(BN(x) [+ r]) with fixed statistics; dsum = the gradient at the sum."""
    if relu:
        dout = dout * ops.cast(out > 0, dout.dtype)
    rstd = ops.rsqrt(var + eps)
    scale = (gamma * rstd).reshape(1, -1, 1, 1)
    xhat = (x - mean.reshape(1, -1, 1, 1)) * rstd.reshape(1, -1, 1, 1)
    return dout * scale, (dout * xhat).sum((0, 2, 3)), dout.sum((0, 2, 3)), dout


class _CpuBatchNormInfer(nn.Cell):
    def __init__(self, library, entry, config, eps, relu):
        super().__init__()
        self.kernel = ops.Custom(f"{library}:{entry}Infer", out_shape=_shape_of_first, out_dtype=_first_dtype,
                                 func_type="aot")
        self.config = config
        self.eps = float(eps)
        self.relu = bool(relu)

    def construct(self, x, gamma, beta, mean, var):
        return self.kernel(x, gamma, beta, mean, var, self.config)

    def bprop(self, x, gamma, beta, mean, var, out, dout):
        dx, dgamma, dbeta, _ = _inference_norm_grads(x, gamma, mean, var, out, dout, self.eps, self.relu)
        return dx, dgamma, dbeta, ops.zeros_like(mean), ops.zeros_like(var)


class _CpuBatchNormAddInfer(_CpuBatchNormInfer):
    def construct(self, x, residual, gamma, beta, mean, var):
        return self.kernel(x, residual, gamma, beta, mean, var, self.config)

    def bprop(self, x, residual, gamma, beta, mean, var, out, dout):
        dx, dgamma, dbeta, dsum = _inference_norm_grads(x, gamma, mean, var, out, dout, self.eps, self.relu)
        return dx, dsum, dgamma, dbeta, ops.zeros_like(mean), ops.zeros_like(var)


def _flag_shape(*shapes):
    return [1]


def _flag_dtype(*dtypes):
    return dtypes[0]


class CpuAllFinite(nn.Cell):
    """(t_1, ..., t_n) float32 tensors -> (1,) float32: 1.0 if every element of every tensor is finite, else 0.0.
    No gradient (a check, not part of a loss)."""

    def __init__(self):
        super().__init__()
        library = compiled_library(SOURCE)
        self.kernel = ops.Custom(f"{library}:AllFinite", out_shape=_flag_shape, out_dtype=_flag_dtype,
                                 func_type="aot")

    def construct(self, *tensors):
        return self.kernel(*tensors)
