"""Loading weights into a model: reading MindSpore ``.ckpt`` files, matching keys, strict loading.

Beside the models (as in timm and MindCV), so ``create_model(name, checkpoint=path)`` needs nothing from the
engine; the engine's ``engine.checkpoint`` writes training checkpoints (model weights, EMA, optimizer and
loss-scaler state, ``meta.`` entries), and this module reads them: the state entries are not model keys.
"""
import json
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mindspore import nn

import numpy as np

STATE_PREFIXES = ("ema.", "optimizer.", "loss_scaler.", "meta.")


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or does not fit the model."""


def to_numpy(value):
    """A Tensor, Parameter or array as a numpy array."""
    return value.asnumpy() if hasattr(value, "asnumpy") else np.asarray(value)


def _decode_meta(value):
    if isinstance(value, str):
        if value.startswith("json:"):
            return json.loads(value[5:])
        if value == "none:":
            return None
        return value
    array = to_numpy(value)
    if array.dtype == np.bool_:
        return bool(array)
    return array.item() if array.size == 1 else array


def read_checkpoint(path: str) -> tuple[dict, dict]:
    """``(tensors, meta)``: {name: numpy array} for every tensor, {key: value} for the ``meta.`` entries."""
    import mindspore as ms
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        raw = ms.load_checkpoint(path)
    except Exception as err:  # MindSpore raises ValueError/RuntimeError for truncated or foreign files
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from None
    tensors, meta = {}, {}
    for name, value in raw.items():
        if name.startswith("meta."):
            meta[name[5:]] = _decode_meta(value)
        else:
            tensors[name] = to_numpy(value)
    return tensors, meta


def read_meta(path):
    return read_checkpoint(path)[1]


def describe_names(names, limit=20):
    """The sorted ``names``, comma separated, the first ``limit`` of them (for error messages)."""
    names = sorted(names)
    text = ", ".join(names[:limit])
    return text + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def match_state(named_params, tensors):
    """Compare model parameters with checkpoint tensors.

    Returns:
        (missing, unexpected, mismatched): names in the model only, names in the checkpoint only, and
        ``[(name, checkpoint shape, model shape)]``.
    """
    params = dict(named_params)
    missing = [name for name in params if name not in tensors]
    unexpected = [name for name in tensors if name not in params]
    mismatched = [(name, tuple(tensors[name].shape), tuple(param.shape)) for name, param in params.items()
                  if name in tensors and tuple(tensors[name].shape) != tuple(param.shape)]
    return missing, unexpected, mismatched


def key_report(missing, unexpected, mismatched):
    lines = []
    if missing:
        lines.append(f"{len(missing)} missing key(s) (in the model, not in the checkpoint): {describe_names(missing)}")
    if unexpected:
        lines.append(f"{len(unexpected)} unexpected key(s) (in the checkpoint, not in the model): "
                     f"{describe_names(unexpected)}")
    if mismatched:
        shown = "; ".join(f"{name}: checkpoint {ckpt} vs model {model}" for name, ckpt, model in mismatched[:20])
        lines.append(f"{len(mismatched)} shape mismatch(es): {shown}")
    return "; ".join(lines)


def assign_tensors(named_params, tensors):
    """Copy arrays into Parameters (cast to each Parameter's dtype)."""
    import mindspore as ms
    for name, param in named_params:
        param.set_data(ms.Tensor(tensors[name], dtype=param.dtype))


def non_finite_names(tensors):
    """Names of the arrays in ``tensors`` ({name: array}) holding NaN or +-inf (floating types only)."""
    bad = []
    for name, value in tensors.items():
        array = np.asarray(value)
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            bad.append(name)
    return bad


def load_checkpoint_into(model: "nn.Cell", path: str, strict: bool = True, use_ema: bool = False) -> tuple:
    """Load the weights of a checkpoint file into ``model``.

    Args:
        model: an ``nn.Cell``; its keys are ``model.parameters_and_names()``.
        path: a ``.ckpt`` written by this project (training states are recognised: their optimizer,
            EMA and meta entries are not model keys) or any MindSpore checkpoint of the same network.
        strict: raise ``CheckpointError`` listing missing, unexpected and shape-mismatched keys; with
            ``strict=False`` the matching keys are loaded and the report is returned.
        use_ema: load the ``ema.`` weights of a training checkpoint instead of the raw ones.
    Returns:
        (missing, unexpected, mismatched) as in ``match_state``.
    Raises:
        CheckpointError also when a weight holds NaN or inf (a diverged run's state is never loaded).
    """
    tensors, meta = read_checkpoint(path)
    return load_tensors_into(model, tensors, meta, path, strict, use_ema)


def load_tensors_into(model, tensors, meta, path, strict=True, use_ema=False):
    """``load_checkpoint_into`` for a checkpoint already read with ``read_checkpoint``."""
    if use_ema:
        ema = {name[4:]: value for name, value in tensors.items() if name.startswith("ema.")}
        if not ema:
            raise CheckpointError(f"checkpoint {path} holds no EMA weights (train with --ema_decay to keep them)")
        weights = ema
    else:
        weights = {name: value for name, value in tensors.items()
                   if not name.startswith(STATE_PREFIXES)}
    named = list(model.parameters_and_names())
    missing, unexpected, mismatched = match_state(named, weights)
    if strict and (missing or unexpected or mismatched):
        who = f" (trained as {meta['model']!r})" if "model" in meta else ""
        raise CheckpointError(f"checkpoint {path}{who} does not fit the model {type(model).__name__}: "
                              + key_report(missing, unexpected, mismatched))
    bad = set(missing) | {name for name, _, _ in mismatched}
    loaded = [(name, param) for name, param in named if name not in bad]
    broken = non_finite_names({name: weights[name] for name, _ in loaded})
    if broken:
        raise CheckpointError(f"checkpoint {path} holds NaN or inf in {len(broken)} tensor(s) "
                              f"({describe_names(broken, 5)}): it comes from a diverged run and is not loaded")
    assign_tensors(loaded, weights)
    return missing, unexpected, mismatched
