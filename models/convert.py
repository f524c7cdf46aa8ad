"""Map official PyTorch ACmix / Swin / ResNet state_dicts onto this project's models.

The rules (docs/converting_official_weights.md):
- Normalisation layers: ``weight/bias/running_mean/running_var`` -> ``gamma/beta/moving_mean/moving_variance``
  (decided by what the target model has, so a Conv's ``weight`` is never renamed); ``num_batches_tracked``
  dropped.
- Constant buffers recomputed by our Cells are dropped: ``relative_position_index``, ``attn_mask``.
- ResNet-ACmix's three q/k/v convs ``conv2.conv{1,2,3}`` are concatenated into our fused ``conv2.qkv``
  (output channels q | k | v, the layout ACmixLocal expects); SAN's ``sam.conv{1,2,3}`` likewise.
- Everything else keeps its name and shape. Strict: any official key left unmapped, any model
  parameter left unfilled, any shape mismatch is an error that counts them and names the first few.

``.pth`` files are read by ``models.pth_reader`` (NumPy only, no PyTorch, nothing from the file executed).
"""
import numpy as np

from .pth_reader import PthError, read_pth

DROPPED_SUFFIXES = ("num_batches_tracked", "relative_position_index", "attn_mask")
NORM_RENAMES = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}


class ConversionError(ValueError):
    """Raised when the official keys and the target model do not correspond one to one."""


def model_parameter_shapes(model):
    """{parameter name: shape} of a MindSpore Cell (trainable and not)."""
    return {name: tuple(param.shape) for name, param in model.parameters_and_names()}


def _fuse_qkv(source, target_shapes):
    """Concatenate ``<m>.conv1/.conv2/.conv3`` into ``<m>.qkv`` where the target has a fused ``qkv``."""
    fused = dict(source)
    for name in target_shapes:
        module, _, leaf = name.rpartition(".")
        if module != "qkv" and not module.endswith(".qkv"):
            continue
        parts = [f"{module[:-len('qkv')]}conv{i}.{leaf}" for i in (1, 2, 3)]
        if all(p in fused for p in parts):
            fused[name] = np.concatenate([fused.pop(p) for p in parts], 0)
    return fused


def convert_state_dict(source, target_shapes, drop_prefixes=()):
    """Official state_dict (name -> numpy array) -> {our parameter name: array}.

    Args:
        source: the official state_dict as numpy arrays.
        target_shapes: ``model_parameter_shapes(model)`` of the model to fill.
        drop_prefixes: official key prefixes to leave out on purpose (e.g. the classifier when fine-tuning
            on another number of classes); the matching model parameters keep their initial values.
    Raises:
        ConversionError listing every unmapped official key, missing model parameter and shape mismatch.
    """
    source = {k: np.asarray(v) for k, v in source.items() if not k.endswith(DROPPED_SUFFIXES)}
    source = {k: v for k, v in source.items() if not k.startswith(tuple(drop_prefixes))}
    source = _fuse_qkv(source, target_shapes)
    converted, unmapped, mismatched = {}, [], []
    for key, value in source.items():
        name = key
        if name not in target_shapes:
            module, _, leaf = key.rpartition(".")
            name = f"{module}.{NORM_RENAMES.get(leaf, leaf)}"
        if name not in target_shapes:
            unmapped.append(key)
            continue
        expected = target_shapes[name]
        if tuple(value.shape) != expected:
            if value.size == int(np.prod(expected)) and value.ndim == 0:
                value = value.reshape(expected)
            else:
                mismatched.append(f"{key} {tuple(value.shape)} -> {name} {expected}")
                continue
        converted[name] = value.astype(np.float32)
    left_out = tuple(drop_prefixes)
    missing = [n for n in target_shapes if n not in converted and not (left_out and n.startswith(left_out))]
    if unmapped or missing or mismatched:
        parts = [f"{len(items)} {title} ({_first(sorted(items))})"
                 for title, items in (("official keys with no place in the model", unmapped),
                                      ("model parameters not in the checkpoint", missing),
                                      ("shape mismatches", mismatched)) if items]
        raise ConversionError("the checkpoint does not match the model: " + "; ".join(parts))
    return converted


def load_torch_state_dict(path):
    """Read an official ``.pth`` (no PyTorch needed, no code from the file run: ``models.pth_reader``).

    Accepts a training checkpoint with a ``model`` (or ``state_dict``) entry, or a bare state_dict; a
    ``module.`` prefix (DataParallel) is removed. Returns {key: numpy array}.
    Raises:
        ConversionError: unreadable file, no state_dict in it, or entries that are not tensors.
    """
    try:
        blob = read_pth(path)
    except PthError as err:
        raise ConversionError(f"cannot read {path}: {err}") from None
    for entry in ("model", "state_dict"):
        if isinstance(blob, dict) and isinstance(blob.get(entry), dict):
            blob = blob[entry]
            break
    if not isinstance(blob, dict) or not blob:
        kind = getattr(blob, "pickled_name", type(blob).__name__)
        raise ConversionError(f"{path} holds no state_dict (found {kind}; expected a dict of tensors or a "
                              f"training checkpoint with a 'model' entry)")
    not_tensors = sorted(str(key) for key, value in blob.items() if not isinstance(value, np.ndarray))
    if not_tensors:
        raise ConversionError(f"{path}: {len(not_tensors)} state_dict entries are not tensors: "
                              f"{_first(not_tensors)}")
    return {key[len("module."):] if key.startswith("module.") else key: value for key, value in blob.items()}


def _first(names, limit=5):
    """'a, b, c, ... (N more)': a short listing for one-line messages."""
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
