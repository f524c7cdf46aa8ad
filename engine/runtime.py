"""Process setup shared by train.py, eval.py and export.py: context, device, distributed init, models."""
import os
import random

import numpy as np

MODES = ("graph", "pynative")
DEVICE_TARGETS = ("CPU", "GPU", "Ascend")


def setup_context(mode="graph", device_target=None, seed=None):
    """Graph or PyNative mode on the chosen device (None: MindSpore's default); seeds every RNG."""
    import mindspore as ms
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not supported; allowed values: {MODES}")
    if device_target is not None:
        if device_target not in DEVICE_TARGETS:
            raise ValueError(f"device_target={device_target!r} is not supported; allowed values: {DEVICE_TARGETS}")
        ms.set_device(device_target)
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    if seed is not None:
        ms.set_seed(seed)
        np.random.seed(seed)
        random.seed(seed)


def launched_by_msrun():
    """Number of workers msrun started (1 when run directly)."""
    return int(os.environ.get("MS_WORKER_NUM", "1") or 1)


def init_distributed(enabled):
    """Initialise collective communication for data parallel.

    Args:
        enabled: True / False, or None to follow the launcher (msrun with more than one worker).
    Returns:
        (rank, group_size); (0, 1) when not distributed.
    """
    if enabled is None:
        enabled = launched_by_msrun() > 1
    if not enabled:
        return 0, 1
    import mindspore as ms
    from mindspore.communication import init, get_rank, get_group_size
    if "MS_ROLE" not in os.environ and "RANK_TABLE_FILE" not in os.environ:
        from .config import ConfigError
        raise ConfigError("option 'distributed' is true but no launcher started this process: run through msrun, "
                          "e.g. msrun --worker_num=2 --local_worker_num=2 --master_addr=127.0.0.1 train.py ...")
    init()
    rank, group_size = get_rank(), get_group_size()
    ms.reset_auto_parallel_context()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True,
                                 device_num=group_size)
    return rank, group_size


class ModelBuildError(ValueError):
    """The configured model cannot be built (unknown name, bad constructor argument)."""


def build_model(name, num_classes, model_overrides=None, drop_path_rate=None, in_chans=3):
    """``models.create_model`` with the run's options (only non-default ones are passed to the constructor)."""
    import models  # noqa: F401  (importing the package registers the model families)
    from models.registry import create_model
    kwargs = dict(model_overrides or {})
    if drop_path_rate is not None:
        kwargs["drop_path_rate"] = drop_path_rate
    if in_chans != 3:
        kwargs["in_chans"] = in_chans
    try:
        return create_model(name, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError) as err:
        extra = f" with {kwargs}" if kwargs else ""
        raise ModelBuildError(f"cannot build model {name!r}{extra}: {err}") from None


def config_from_checkpoint(path):
    """(run Config, meta) of a training checkpoint written by train.py."""
    import yaml
    from .checkpoint import CheckpointError, read_meta
    from .config import TRAIN_OPTIONS, build_config
    meta = read_meta(path)
    if "config" not in meta or "model" not in meta:
        raise CheckpointError(f"{path} has no run configuration (not written by train.py): pass the model "
                              f"name and preprocessing options explicitly")
    return build_config(TRAIN_OPTIONS, yaml.safe_load(meta["config"]), file_source=path), meta


WEIGHT_CHOICES = ("auto", "raw", "ema")


def model_from_checkpoint(path, weights="auto"):
    """Rebuild the model a training checkpoint was trained as and load its weights (strictly).

    Args:
        weights: 'raw' (the optimised weights), 'ema' (the EMA weights), or 'auto': the ones training
            validated (EMA when the run kept an EMA and had eval_ema on).
    Returns:
        (model, run Config, meta, use_ema).
    """
    from .checkpoint import load_checkpoint_into
    if weights not in WEIGHT_CHOICES:
        raise ValueError(f"weights={weights!r} is not supported; allowed values: {WEIGHT_CHOICES}")
    cfg, meta = config_from_checkpoint(path)
    use_ema = weights == "ema" or (weights == "auto" and bool(meta.get("has_ema")) and cfg.eval_ema)
    model = build_model(cfg.model, meta["num_classes"], cfg.model_overrides, cfg.drop_path_rate, cfg.in_chans)
    load_checkpoint_into(model, path, strict=True, use_ema=use_ema)
    return model, cfg, meta, use_ema
