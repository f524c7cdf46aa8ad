"""Parameter and multiply-accumulate (MAC) counts read off a network's own structure.

``count_params`` sums the network's Parameters. ``count_macs`` runs one forward pass in PyNative mode
with forward hooks and adds up, per call of each Cell:

- ``nn.Conv1d/2d/3d``: output elements x (in_channels / groups) x kernel volume;
- ``nn.Dense``: output elements x in_features;
- ``acmix_ms.ShiftConv``: output elements x k^2 x k^2 for the group-convolution implementations,
  0 for ``'tensor'`` (explicit shifts are additions only);
- every Cell with an ``aggregation_macs(height, width)`` method (the ACmix Cells): the parameter-free
  products (q.k, A.v, weighted sums) that no Conv2d/Dense hook sees. H, W are read from the call's
  inputs: NCHW for ``ACmixLocal``/``ACmixPatchwise`` (and any other Cell, unless it sets
  ``channels_last = True``), (B, H, W, C) for ``ACmixWindow``, the H, W arguments of ``ACmixGlobal(x, H, W)``;
- every Cell with an ``extra_macs`` method, ``extra_macs(*args) -> int``: MACs per image that the Cell
  performs beyond its sub-Cells, given the call's positional inputs (the hook for model-level
  products that are neither a Conv/Dense nor an ACmix aggregation).

A Conv2d/Dense inside a counted Cell is counted by its own hook only (``aggregation_macs`` and
``extra_macs`` must exclude it), so nothing is counted twice. Normalisation, activations, softmax,
pooling and element-wise additions are not counted (MACs of products only; fvcore, which the paper's
figures resemble, adds about one operation per element for normalisation and pooling: ~1% of a ResNet).
"""
import numpy as np
import mindspore as ms
from mindspore import nn, Tensor

from acmix_ms import ACmixGlobal, ACmixWindow, ShiftConv
from acmix_ms.base import reference_paths

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _buffer_ids(cell):
    """ids of BatchNorm running statistics: Parameters in MindSpore, buffers (not parameters) in PyTorch."""
    ids = set()
    for _, sub in cell.cells_and_names():
        for attr in ("moving_mean", "moving_variance"):
            value = getattr(sub, attr, None)
            if isinstance(value, ms.Parameter):
                ids.add(id(value))
    return ids


def count_params(cell, trainable_only=False):
    """Number of parameter values of ``cell``, counted as PyTorch's ``model.parameters()`` would.

    Args:
        cell: an ``nn.Cell``.
        trainable_only: count only Parameters with ``requires_grad`` (e.g. leaves out the frozen
            kernels of ``shift_impl='fixed'``).

    BatchNorm running mean/variance are never counted: they are buffers in PyTorch and in the paper.
    Shared Parameters are counted once.
    """
    if not isinstance(cell, nn.Cell):
        raise ValueError(f"cell must be a mindspore.nn.Cell, got {type(cell).__name__}")
    buffers = _buffer_ids(cell)
    seen = set()
    total = 0
    for param in cell.get_parameters():
        if id(param) in seen or id(param) in buffers:
            continue
        seen.add(id(param))
        if trainable_only and not param.requires_grad:
            continue
        total += int(np.prod(param.shape))
    return total


def _size(tensor):
    return int(np.prod(tensor.shape))


def _first_output(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _spatial_size(cell, args):
    """(H, W) of an ACmix Cell's call, from its positional inputs."""
    if isinstance(cell, ACmixGlobal):
        return int(args[1]), int(args[2])  # (x, H, W)
    shape = args[0].shape
    if len(shape) != 4:
        raise ValueError(f"cannot read H, W of {type(cell).__name__} from an input of shape {shape}")
    if isinstance(cell, ACmixWindow) or getattr(cell, "channels_last", False):
        return shape[1], shape[2]  # (B, H, W, C)
    return shape[2], shape[3]  # (B, C, H, W)


def _call_macs(cell, args, output, batch):
    """MACs of one call of ``cell`` (whole batch), excluding its sub-Cells."""
    out = _first_output(output)
    if isinstance(cell, _CONVS):
        groups = getattr(cell, "group", getattr(cell, "groups", 1))
        kernel = cell.kernel_size if isinstance(cell.kernel_size, (tuple, list)) else (cell.kernel_size,)
        return _size(out) * (cell.in_channels // groups) * int(np.prod(kernel))
    if isinstance(cell, nn.Dense):
        return _size(out) * cell.in_channels
    if isinstance(cell, ShiftConv):
        k2 = cell.kernel_size ** 2
        return 0 if cell.impl == "tensor" else _size(out) * k2 * k2
    macs = 0
    if hasattr(cell, "aggregation_macs"):
        height, width = _spatial_size(cell, args)
        macs += batch * int(cell.aggregation_macs(height, width))
    if callable(getattr(cell, "extra_macs", None)):
        macs += batch * int(cell.extra_macs(*args))
    return macs


def _check_shape(input_shape):
    shape = tuple(input_shape)
    if len(shape) < 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise ValueError(f"input_shape must be a tuple of positive ints starting with the batch size, e.g. "
                         f"(1, 3, 224, 224), got {input_shape!r}")
    return shape


def count_macs(cell, input_shape, extra_args=(), dtype=ms.float32):
    """Multiply-accumulates per image of one forward pass of ``cell``.

    Args:
        cell: an ``nn.Cell``.
        input_shape: full input shape including the batch, e.g. ``(1, 3, 224, 224)``. Use batch 1 to
            count batch-independent work (e.g. ACmixLocal's positional conv on the coordinate grid)
            once per image; with batch B such work is shared by B images.
        extra_args: further positional inputs after the tensor (e.g. ``(H, W)`` for ``ACmixGlobal``).
        dtype: input dtype.

    The forward runs once in PyNative mode in inference mode; the context mode and the cell's
    training flag are restored afterwards, and the hooks removed. Returns an int.
    """
    if not isinstance(cell, nn.Cell):
        raise ValueError(f"cell must be a mindspore.nn.Cell, got {type(cell).__name__}")
    shape = _check_shape(input_shape)
    batch = shape[0]
    totals = []

    def hook(sub, args, output):
        totals.append(_call_macs(sub, args, output, batch))

    previous_mode = ms.get_context("mode")
    was_training = cell.training
    handles = []
    try:
        ms.set_context(mode=ms.PYNATIVE_MODE)
        cell.set_train(False)
        handles = [sub.register_forward_hook(hook) for _, sub in cell.cells_and_names()]
        data = Tensor(np.random.default_rng(0).standard_normal(shape).astype(np.float32)).astype(dtype)
        with reference_paths():  # count the structure's steps, not the fused fast paths' internals
            cell(data, *extra_args)
    finally:
        for handle in handles:
            handle.remove()
        cell.set_train(was_training)
        ms.set_context(mode=previous_mode)
    total = sum(totals)
    if total % batch:
        # Batch-independent work does not split evenly over the images; report the share per image.
        return total / batch
    return total // batch


def profile(cell, input_shape, extra_args=()):
    """``{"params": count_params(cell), "macs": count_macs(cell, input_shape, extra_args)}``."""
    return {"params": count_params(cell), "macs": count_macs(cell, input_shape, extra_args)}
