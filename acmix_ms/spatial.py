"""Spatial helpers built from slicing only, so they run on every backend (ops.roll and nn.Unfold
are missing on CPU) and export to MINDIR and ONNX."""
from mindspore import ops


def cyclic_shift(x, shift_h, shift_w, axis_h=1, axis_w=2):
    """Roll ``x`` by (shift_h, shift_w) along (axis_h, axis_w), like ``torch.roll``.

    Element i moves to (i + shift) mod size. Python-int shifts; implemented with slices + concat.
    """
    x = _roll_axis(x, shift_h, axis_h)
    return _roll_axis(x, shift_w, axis_w)


def _roll_axis(x, shift, axis):
    size = x.shape[axis]
    shift = shift % size
    if shift == 0:
        return x
    head = _slice_axis(x, axis, size - shift, size)
    tail = _slice_axis(x, axis, 0, size - shift)
    return ops.concat((head, tail), axis)


def _slice_axis(x, axis, start, stop, step=1):
    begin = [0] * x.ndim
    end = list(x.shape)
    strides = [1] * x.ndim
    begin[axis] = start
    end[axis] = stop
    strides[axis] = step
    return ops.strided_slice(x, tuple(begin), tuple(end), tuple(strides))


def zero_pad(x, paddings):
    """Zero padding with per-axis ``((before, after), ...)`` for every axis of ``x`` (Python ints).

    Uses the ``Pad`` primitive: the gradient of ``ops.pad``'s constant mode (PadV3Grad) hangs after a few
    calls on CPU in MindSpore 2.8.
    """
    return ops.Pad(tuple(tuple(p) for p in paddings))(x)


def out_size(size, stride):
    """Output length of a 'same'-padded window op with stride: ceil(size / stride)."""
    return (size + stride - 1) // stride


def neighbourhood_slices(padded, kernel_size, out_h, out_w, stride=1, dilation=1):
    """The kernel_size**2 shifted views of a padded (B, C, Hp, Wp) map, row-major over the kernel.

    View p = (u, v) holds padded[:, :, u*dilation + i*stride, v*dilation + j*stride] at (i, j), i.e. the
    neighbour at kernel position (u, v) of output pixel (i, j); each view is (B, C, out_h, out_w).
    This is torch's ``Unfold`` without materialising the (B, C*k*k, L) tensor.
    """
    views = []
    for u in range(kernel_size):
        for v in range(kernel_size):
            top = u * dilation
            left = v * dilation
            views.append(padded[:, :, top:top + (out_h - 1) * stride + 1:stride,
                                left:left + (out_w - 1) * stride + 1:stride])
    return views


def check_reflect_pad(name, size, pad):
    """Reflection padding by ``pad`` needs more than ``pad`` pixels along the axis."""
    if pad >= size:
        raise ValueError(f"input {name} {size} is too small for reflection padding {pad} of the attention window: "
                         f"it must be at least {pad + 1}")
