"""Tasks: what train.py, eval.py and export.py do for the config's ``task`` (classification, detection, ...).

A task is a module ``engine/tasks/<name>.py``; adding one needs no change elsewhere. The config option
``task`` names it (null: the task the model was registered with, ``models.model_task``), and
``task_options`` (a mapping) holds its own settings, checked against the module's ``OPTIONS``.

Module interface (``data`` is whatever ``scan`` returns for a split; it must support ``len()``):

    NAME = "<name>"
    PRIMARY_METRIC = "top1"      # key of validate()'s result that picks best.ckpt (higher is better)
    OPTIONS = {key: default}     # accepted task_options and their defaults

    scan(cfg) -> (train data, val data or None, class names)
        lists and checks the files of cfg.data_dir (cfg.train_split / cfg.val_split) before anything is
        compiled; raises engine.data.DataError naming the file and entry.
    train_dataset(cfg, data, num_classes, seed, num_shards, shard_id) -> batched mindspore dataset
        yielding (inputs, targets) with drop_remainder=True (``seed``: order and augmentation draws).
    loss_network(network, cfg, num_classes) -> nn.Cell: (inputs, targets) -> scalar float32 loss
        (``network``: the model, possibly wrapped by mixed precision). TrainStep differentiates it.
    validate(network, cfg, data, num_classes) -> dict of metrics (holds PRIMARY_METRIC)
    record(result) -> {metrics.jsonl key: value} of a validation result (e.g. val_top1)
    describe(result) -> one log line of a validation result
    inference_network(model, cfg) -> nn.Cell run by eval.py and exported by export.py:
        images (B, C, H, W) float32 -> a Tensor or a tuple of Tensors
    eval_data(cfg, data_dir, split) -> (data, class names) of one split, for eval.py
    evaluate(predict, cfg, data, num_classes, batch_size, fixed_batch=None) -> result dict
        ``predict``: images numpy -> output numpy (or tuple) of inference_network (a checkpoint or a MINDIR).
    summary(result) -> text printed by eval.py
"""
import importlib
import os
import pkgutil

DEFAULT_TASK = "classification"


def available():
    """Names of the task modules in this package, sorted."""
    folder = os.path.dirname(os.path.abspath(__file__))
    return sorted(info.name for info in pkgutil.iter_modules([folder]) if not info.name.startswith("_"))


def get_task(name):
    """The task module ``name`` (ConfigError for an unknown one)."""
    from ..config import ConfigError
    if name not in available():
        raise ConfigError(f"option 'task' must be one of {', '.join(available())}; got {name!r}")
    return importlib.import_module(f"{__name__}.{name}")


def task_name(cfg):
    """The config's task: ``cfg.task``, else the registered model's task, else classification.

    A ``task`` that contradicts the registered model's is a ConfigError.
    """
    from ..config import ConfigError
    registered = None
    if getattr(cfg, "model", None):
        import models  # noqa: F401  (registers the families)
        from models.registry import is_model, model_task
        if is_model(cfg.model):
            registered = model_task(cfg.model)
    if cfg.task is not None and registered is not None and cfg.task != registered:
        raise ConfigError(f"option 'task' is {cfg.task!r} but model {cfg.model!r} is a {registered} model: "
                          f"leave 'task' out or set it to {registered!r}")
    return cfg.task or registered or DEFAULT_TASK


def resolve(cfg):
    """The task module of a config."""
    return get_task(task_name(cfg))


def task_options(cfg, task=None):
    """``cfg.task_options`` completed with the task's defaults; unknown keys raise ConfigError."""
    from ..config import ConfigError
    task = task or resolve(cfg)
    given = dict(cfg.task_options or {})
    unknown = sorted(set(given) - set(task.OPTIONS))
    if unknown:
        allowed = ", ".join(sorted(task.OPTIONS)) or "none"
        raise ConfigError(f"option 'task_options' has unknown key(s) for task {task.NAME!r}: {', '.join(unknown)} "
                          f"(allowed: {allowed})")
    return dict(task.OPTIONS, **given)
