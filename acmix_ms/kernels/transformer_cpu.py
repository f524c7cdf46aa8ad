"""Fused CPU kernels of the transformer layers (``ops.Custom`` func_type 'aot', source ``transformer_cpu.cc``).

``CpuGelu``: the exact (erf) GELU in one pass, forward and backward. ``CpuBiasAdd``: x + bias over the last
axis (MindSpore's BiasAdd) and the bias gradient (a column sum), both threaded passes. ``CpuLayerNorm``:
LayerNorm over the last axis, one pass per row forward, one backward (dx, dgamma, dbeta). ``CpuSoftmax``: softmax
over the last axis and its gradient in one pass per row. Float32 only. Callers pick them through
``models.layers.GELU`` / ``models.layers.LayerNorm``, which fall back to MindSpore's ops on other devices, other
dtypes, or when the kernels cannot be built.
"""
import numpy as np
from mindspore import Tensor, nn, ops

from .build import compiled_library

SOURCE = "transformer_cpu.cc"


def _same_shape(*shapes):
    return list(shapes[-1])


def _same_dtype(*dtypes):
    return dtypes[-1]


def _custom(library, entry, out_shape, out_dtype, bprop=None):
    """``ops.Custom`` of the aot kernel ``entry``. The gradient, where there is one, is the ``bprop`` function given
    to the primitive rather than a ``bprop`` method of a wrapping Cell: MindSpore parses a Cell's bprop into every
    graph that calls it, inference included (~0.17 MiB of compiled graph per call site, ~0.4 MiB for a Dense),
    while a primitive's bprop is only expanded when a gradient is taken."""
    return ops.Custom(f"{library}:{entry}", out_shape=out_shape, out_dtype=out_dtype, func_type="aot", bprop=bprop)


class _ShapeKeepingPair(nn.Cell):
    """A forward kernel ``<name>Forward`` (x -> y, same shape) with its backward ``<name>Backward`` as the primitive's
    gradient; ``FROM_OUTPUT`` says whether the backward reads y (else x): backward(dy, x or y) -> dx."""

    FROM_OUTPUT = False

    def __init__(self, name):
        super().__init__()
        library = compiled_library(SOURCE)
        backward_kernel = _custom(library, f"{name}Backward", _same_shape, _same_dtype)
        from_output = self.FROM_OUTPUT

        def bprop(x, out, dout):
            return (backward_kernel(dout, out if from_output else x),)

        self.forward_kernel = _custom(library, f"{name}Forward", _same_shape, _same_dtype, bprop)

    def construct(self, x):
        return self.forward_kernel(x)


class CpuGelu(_ShapeKeepingPair):
    """y = x * Phi(x) (exact GELU, as torch's default) on float32 tensors of any shape; fused gradient (from x)."""

    def __init__(self):
        super().__init__("Gelu")


class CpuSoftmax(_ShapeKeepingPair):
    """Softmax over the last axis of a float32 tensor (``ops.softmax(x, -1)``); gradient: y * (dy - sum(dy * y)) in
    one pass per row (from y)."""

    FROM_OUTPUT = True

    def __init__(self):
        super().__init__("Softmax")


def _layer_norm_shapes(x, gamma, beta, config):
    rows = [int(np.prod(x[:-1]))]
    return list(x), rows, rows


def _layer_norm_dtypes(x, gamma, beta, config):
    return x, x, x


def _layer_norm_grad_shapes(dy, x, gamma, mean, rstd):
    return list(x), list(gamma), list(gamma)


def _layer_norm_grad_dtypes(dy, x, gamma, mean, rstd):
    return x, gamma, gamma


class CpuLayerNorm(nn.Cell):
    """(x (..., C), gamma (C,), beta (C,)) -> (LayerNorm of x over the last axis (biased variance, ``eps``),
    row means (R,), row 1/std (R,)), float32; callers use output 0, the others are kept for the backward.

    The Cell holds no parameters (the calling LayerNorm passes its own); the gradient is (dx, dgamma, dbeta).
    """

    def __init__(self, eps):
        super().__init__()
        library = compiled_library(SOURCE)
        backward_kernel = _custom(library, "LayerNormBackward", _layer_norm_grad_shapes, _layer_norm_grad_dtypes)

        def bprop(x, gamma, beta, config, out, dout):
            # dout[1], dout[2] (gradients w.r.t. the returned statistics) are zero: callers use only out[0]
            dx, dgamma, dbeta = backward_kernel(dout[0], x, gamma, out[1], out[2])
            return dx, dgamma, dbeta, ops.zeros_like(config)

        self.forward_kernel = _custom(library, "LayerNormForward", _layer_norm_shapes, _layer_norm_dtypes, bprop)
        self.config = Tensor(np.array([eps], np.float32))

    def construct(self, x, gamma, beta):
        return self.forward_kernel(x, gamma, beta, self.config)


class _PermutedShape:
    def __init__(self, dims):
        self.dims = dims

    def __call__(self, x, config):
        return [x[d] for d in self.dims]


class CpuPermute(nn.Cell):
    """x (float32, rank <= 8) -> ``numpy.transpose(x, dims)``; the gradient permutes back with the same kernel."""

    def __init__(self, dims):
        super().__init__()
        library = compiled_library(SOURCE)
        self.dims = tuple(int(d) for d in dims)
        inverse = tuple(int(i) for i in np.argsort(self.dims))
        self.forward_kernel = ops.Custom(f"{library}:PermuteForward", out_shape=_PermutedShape(self.dims),
                                         out_dtype=_same_dtype_first, func_type="aot")
        self.backward_kernel = ops.Custom(f"{library}:PermuteForward", out_shape=_PermutedShape(inverse),
                                          out_dtype=_same_dtype_first, func_type="aot")
        # PyNative caches shape inference per primitive attributes: one attribute per permutation
        self.forward_kernel.add_prim_attr("acmix_config", "x".join(map(str, self.dims)))
        self.backward_kernel.add_prim_attr("acmix_config", "x".join(map(str, inverse)))
        self.config = Tensor(np.array(self.dims, np.int32))
        self.inverse_config = Tensor(np.array(inverse, np.int32))

    def construct(self, x):
        return self.forward_kernel(x, self.config)

    def bprop(self, x, out, dout):
        return (self.backward_kernel(dout, self.inverse_config),)


def _same_dtype_first(first, *others):
    return first


def _bias_shape(dy):
    return [dy[-1]]


def _same_shape_first(first, *others):
    return list(first)


class CpuBiasAdd(nn.Cell):
    """(x (..., C), bias (C,)) -> x + bias on every row (MindSpore's BiasAdd) by the kernel ``BiasAddRows``;
    gradient: (dout, column sums of dout) by the kernel ``BiasGrad`` instead of MindSpore's BiasAddGrad. Float32."""

    def __init__(self):
        super().__init__()
        library = compiled_library(SOURCE)
        grad_kernel = _custom(library, "BiasGrad", _bias_shape, _same_dtype_first)

        def bprop(x, bias, out, dout):
            return dout, grad_kernel(dout)

        self.forward_kernel = _custom(library, "BiasAddRows", _same_shape_first, _same_dtype_first, bprop)

    def construct(self, x, bias):
        return self.forward_kernel(x, bias)
