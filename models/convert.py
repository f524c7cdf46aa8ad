"""Map official PyTorch ACmix / Swin / ResNet state_dicts onto this project's models.

The rules (docs/converting_official_weights.md):
- Normalisation layers: ``weight/bias/running_mean/running_var`` -> ``gamma/beta/moving_mean/moving_variance``
  (decided by what the target model has, so a Conv's ``weight`` is never renamed); ``num_batches_tracked``
  dropped.
- Constant buffers recomputed by our Cells are dropped: ``relative_position_index``, ``attn_mask``.
- ResNet-ACmix's three q/k/v convs ``conv2.conv{1,2,3}`` are concatenated into our fused ``conv2.qkv``
  (output channels q | k | v, the layout ACmixLocal expects); SAN's ``sam.conv{1,2,3}`` likewise.
- Everything else keeps its name and shape. Strict: any official key left unmapped, any model
  parameter left unfilled, any shape mismatch is an error that lists them all.
"""
import numpy as np

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
        lines = []
        for title, items in (("official keys with no place in the model", unmapped),
                             ("model parameters not in the checkpoint", missing),
                             ("shape mismatches", mismatched)):
            if items:
                lines.append(f"{title} ({len(items)}): " + ", ".join(sorted(items)))
        raise ConversionError("the checkpoint does not match the model:\n  " + "\n  ".join(lines))
    return converted


def load_torch_state_dict(path):
    """Read an official ``.pth``: a training checkpoint with a ``model`` entry, or a bare state_dict."""
    try:
        import torch
    except ImportError as err:
        raise ImportError("reading .pth files needs PyTorch: pip install -e .[convert] "
                          "(installs the CPU build torch==2.13.0)") from err
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # official training checkpoints pickle a yacs config: needs the full unpickler
        blob = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(blob, dict) and "model" in blob and isinstance(blob["model"], dict):
        blob = blob["model"]
    elif isinstance(blob, dict) and "state_dict" in blob and isinstance(blob["state_dict"], dict):
        blob = blob["state_dict"]
    if not isinstance(blob, dict) or not blob:
        raise ConversionError(f"{path} holds no state_dict (expected a dict of tensors or a dict with 'model')")
    state = {}
    for key, value in blob.items():
        key = key[len("module."):] if key.startswith("module.") else key  # DataParallel prefix
        state[key] = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
    return state
