"""Training checkpoints: atomic writes of the full training state (reading and loading: ``models.weights``).

A training checkpoint is one MindSpore ``.ckpt`` holding
  * the model's parameters under their structural names (``model.parameters_and_names()``), so
    ``load_checkpoint_into(model, path)`` and ``create_model(name, checkpoint=path)`` load it directly;
  * ``ema.<name>``: the EMA weights (when EMA is on);
  * ``optimizer.<name>``: the optimizer's own state (moments, step counter, Adam powers);
  * ``loss_scaler.<name>``: the dynamic loss scale and its counter;
  * ``meta.<key>``: epoch, step, best accuracy, model name, class names and the run config (YAML text).
"""
import json
import os
import tempfile

# reading and loading live beside the models; named here too, for the engine's and the scripts' callers
from models.weights import (STATE_PREFIXES, CheckpointError, describe_names, to_numpy, assign_tensors,  # noqa: F401
                            key_report, load_checkpoint_into, load_tensors_into, match_state, non_finite_names,
                            read_checkpoint, read_meta)


class NonFiniteStateError(CheckpointError):
    """A state to be saved holds NaN or inf; ``names`` lists the tensors."""

    def __init__(self, path, names):
        self.names = names
        super().__init__(f"not writing {path}: {len(names)} tensor(s) hold NaN or inf ({describe_names(names, 5)})")


TEMP_PREFIX = ".tmp-"


class SaveSchedule:
    """When a run writes ``last.ckpt`` and when it stops early (options ``save_every_steps``,
    ``save_every_epochs``, ``epochs``, ``stop_at_step``; 0 / None turns a rule off)."""

    def __init__(self, save_every_steps, save_every_epochs, epochs, stop_at_step):
        self.every_steps, self.every_epochs = save_every_steps, save_every_epochs
        self.epochs, self.stop_at_step = epochs, stop_at_step

    def step_due(self, global_step):
        """A save after this step (every ``save_every_steps``)."""
        return bool(self.every_steps) and global_step % self.every_steps == 0

    def epoch_due(self, epochs_done, global_step):
        """A save at this epoch end: every ``save_every_epochs``, after the last epoch, or a step save due."""
        return epochs_done % self.every_epochs == 0 or epochs_done == self.epochs or self.step_due(global_step)

    def stops(self, global_step):
        """``stop_at_step`` is reached."""
        return bool(self.stop_at_step) and global_step >= self.stop_at_step


def remove_temp_files(folder):
    """Delete the ``.tmp-*.ckpt`` files an interrupted ``save_checkpoint`` left in ``folder``; returns them."""
    if not os.path.isdir(folder):
        return []
    stale = sorted(entry.path for entry in os.scandir(folder)
                   if entry.is_file() and entry.name.startswith(TEMP_PREFIX) and entry.name.endswith(".ckpt"))
    for path in stale:
        os.remove(path)
    return stale


def save_checkpoint(path, tensors, meta=None, require_finite=True):
    """Write ``tensors`` (iterable of (name, Tensor/Parameter/array)) and ``meta`` atomically to ``path``.

    The file is written under a temporary name in the same folder and renamed over ``path``, so a crash
    while writing leaves the previous checkpoint intact. ``meta`` values: int, float, bool or str
    (stored as ``meta.<key>``; dicts/lists are stored as JSON text).
    Raises:
        NonFiniteStateError (nothing written) when ``require_finite`` and a tensor holds NaN or inf.
    """
    import mindspore as ms
    arrays = [(name, to_numpy(value)) for name, value in tensors]
    if require_finite:
        broken = non_finite_names(dict(arrays))
        if broken:
            raise NonFiniteStateError(path, broken)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    entries = [{"name": name, "data": ms.Tensor(array)} for name, array in arrays]
    append = {}
    for key, value in (meta or {}).items():
        if isinstance(value, (dict, list, tuple)):
            value = "json:" + json.dumps(value)
        elif value is None:
            value = "none:"
        elif not isinstance(value, (bool, int, float, str)):
            raise TypeError(f"meta value {key!r} has unsupported type {type(value).__name__}")
        append[f"meta.{key}"] = value
    handle, temp_path = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".ckpt", dir=folder)
    os.close(handle)
    try:
        ms.save_checkpoint(entries, temp_path, append_dict=append or None)
        os.replace(temp_path, path)
    finally:
        if os.path.exists(temp_path):
            os.remove(temp_path)
    return path


