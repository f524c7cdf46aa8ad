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


def reflect_pad(x, pad):
    """Reflection padding of the last two axes of ``x`` (B, C, H, W) by ``pad`` on every side, for any map size.

    Where ``pad < H`` and ``pad < W`` this is ``ops.pad(x, (pad,) * 4, mode='reflect')`` (edge not repeated).
    Plain reflection cannot reach further than ``size - 1`` pixels, so along an axis with ``pad >= size`` the
    map is reflected again and again (the extension that is mirror-symmetric about its first and last pixel,
    period ``2 * (size - 1)``: NumPy's ``np.pad(mode='reflect')`` for any pad); an axis of size 1 is repeated.
    Why this and not zero or edge padding: it equals plain reflection wherever that exists, so a layer's
    output does not jump when a map shrinks below the window, and every neighbour is a pixel of the map. For
    attention over a window larger than the map, each map pixel appears in the window several times and its
    softmax weight is multiplied by that count (ordinary reflection already doubles the mirrored pixels at a
    border); on a 1 x 1 map every neighbour is the pixel itself and attention returns its value.
    Returns (B, C, H + 2 * pad, W + 2 * pad).
    """
    height, width = x.shape[2], x.shape[3]
    if pad == 0:
        return x
    if pad < height and pad < width:
        return ops.pad(x, (pad,) * 4, mode="reflect")
    return _reflect_pad_axis(_reflect_pad_axis(x, pad, 2), pad, 3)


def _reflect_pad_axis(x, pad, axis):
    """Reflection padding of one axis (2 or 3) of a 4-D tensor by any ``pad``, in steps plain reflection can do.

    Each step pads by at most the current length - 1; every edge reached is a multiple of ``size - 1`` away
    from the map, i.e. a mirror axis of the periodic extension, so reflecting the padded map there continues it.
    """
    size = x.shape[axis]
    if size == 1:
        shape = list(x.shape)
        shape[axis] = 2 * pad + 1
        return ops.broadcast_to(x, tuple(shape))
    done = 0
    while done < pad:
        step = min(pad - done, x.shape[axis] - 1)
        widths = (0, 0, step, step) if axis == 2 else (step, step, 0, 0)
        x = ops.pad(x, widths, mode="reflect")
        done += step
    return x


def check_reflect_pad(name, size, pad):
    """Reflection padding by ``pad`` needs more than ``pad`` pixels along the axis."""
    if pad >= size:
        raise ValueError(f"input {name} {size} is too small for reflection padding {pad} of the attention window: "
                         f"it must be at least {pad + 1}")
