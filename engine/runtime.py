"""Process setup shared by train.py, eval.py and export.py: context, device, distributed init, models."""
import os
import random
from typing import TYPE_CHECKING, Optional

import numpy as np

from .config import DEVICE_TARGETS

if TYPE_CHECKING:
    from mindspore import nn

MODES = ("graph", "pynative")


def setup_context(mode: str = "graph", device_target: Optional[str] = None, seed: Optional[int] = None) -> None:
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


def release_free_heap() -> bool:
    """Return the C heap's free pages to the operating system (glibc's ``malloc_trim``); False where there is no
    glibc. Why: compiling a graph allocates and frees hundreds of MiB on the host heap, which glibc keeps; Swin-T's
    inference graph (batch 8, 224 px) leaves ~50 MiB there after compiling and the process peaks ~75 MiB higher
    when it then runs (docs/benchmarks.md, "Memory after compilation")."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def compile_then_release(cell: "nn.Cell", *inputs) -> None:
    """Compile ``cell``'s graph for ``inputs`` (what its first call would do) and give the compiler's freed heap back
    (``release_free_heap``) before the graph first runs, so its activations do not stack on that memory. Later
    calls with inputs of the same shapes and types reuse the compiled graph."""
    cell.compile(*inputs)
    release_free_heap()


class ReleasingCaller:
    """``cell(*inputs)`` that, the first time it meets an input signature (shapes and dtypes), compiles with
    ``compile_then_release`` before running: an evaluation loop's graphs free the compiler's heap as the training
    step's do."""

    def __init__(self, cell: "nn.Cell"):
        self.cell = cell
        self.seen = set()

    def __call__(self, *inputs):
        import mindspore as ms
        key = tuple((tuple(x.shape), str(x.dtype)) for x in inputs)
        if key not in self.seen and ms.get_context("mode") == ms.GRAPH_MODE:
            compile_then_release(self.cell, *inputs)
            self.seen.add(key)
        return self.cell(*inputs)


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


def model_kwargs(model_overrides=None, drop_path_rate=None, in_chans=3):
    """Constructor keyword arguments of a run's model (only the non-default ones)."""
    kwargs = dict(model_overrides or {})
    if drop_path_rate is not None:
        kwargs["drop_path_rate"] = drop_path_rate
    if in_chans != 3:
        kwargs["in_chans"] = in_chans
    return kwargs


def build_model(name: str, num_classes: int, kwargs: Optional[dict] = None,
                image_size: Optional[int] = None) -> tuple["nn.Cell", dict]:
    """``models.create_model(name, num_classes, **kwargs)``; models that take ``img_size`` (Swin's windows,
    PVT's position embeddings) are built for ``image_size`` unless ``kwargs`` sets it.

    Returns:
        (model, the keyword arguments it was built with): what a checkpoint records to rebuild it.
    Raises:
        ModelBuildError naming the model and the offending argument.
    """
    import models  # noqa: F401  (importing the package registers the model families)
    from models.registry import create_model
    kwargs = dict(kwargs or {})
    if image_size is not None and "img_size" not in kwargs:
        sized = dict(kwargs, img_size=image_size)
        try:
            return create_model(name, num_classes=num_classes, **sized), sized
        except TypeError:  # the constructor takes no img_size (its error names it): build without
            pass
        except ValueError as err:
            raise ModelBuildError(f"cannot build model {name!r} with {sized}: {err}") from None
    try:
        return create_model(name, num_classes=num_classes, **kwargs), kwargs
    except (TypeError, ValueError) as err:
        extra = f" with {kwargs}" if kwargs else ""
        raise ModelBuildError(f"cannot build model {name!r}{extra}: {err}") from None


def check_input_size(model, name, image_size):
    """ConfigError when ``image_size`` is below the smallest input the model runs on (``min_input_size``)."""
    from .config import ConfigError
    smallest = int(getattr(model, "min_input_size", 1) or 1)
    if image_size < smallest:
        raise ConfigError(f"image_size {image_size} is too small for {name}: it needs at least {smallest} px per "
                          f"side (its attention padding and downsampling); use --image_size {smallest} or more")


def describe_attention_backends(model):
    """Which implementation computes each sliding-window ACmix layer of ``model``, e.g.
    ``'2 layer(s) cpu kernel, 1 layer(s) unfold'`` (a device kernel named as such); '' without such layers."""
    from acmix_ms.local import attention_backends
    from acmix_ms.constants import PORTABLE_IMPLS
    return ", ".join(f"{count} layer(s) {backend if backend in PORTABLE_IMPLS else backend + ' kernel'}"
                     for backend, count in sorted(attention_backends(model).items()))


MODEL_OPTIONS = ("model", "num_classes", "in_chans", "model_overrides")
RUN_OPTIONS = MODEL_OPTIONS + ("image_size", "crop_pct", "interpolation", "mean", "std")


def add_run_option_arguments(parser, image_size_help="input height and width"):
    """The ``RUN_OPTIONS`` as command-line arguments of eval.py / export.py (all default to None: not given)."""
    from .config import yaml_mapping
    group = parser.add_argument_group("model and preprocessing (taken from the checkpoint when it records them)")
    group.add_argument("--model", help="registered model name (a checkpoint's own model cannot be changed)")
    group.add_argument("--num_classes", type=int, help="classifier width")
    group.add_argument("--in_chans", type=int, help="input channels (1 or 3)")
    group.add_argument("--model_overrides", type=yaml_mapping, help="constructor arguments, e.g. '{embed_dim: 16}'")
    group.add_argument("--image_size", type=int, help=image_size_help)
    group.add_argument("--crop_pct", type=float, help="resize to image_size / crop_pct, then center crop")
    group.add_argument("--interpolation", choices=("bilinear", "bicubic", "nearest"), help="resize interpolation")
    group.add_argument("--mean", type=float, nargs="+", help="per-channel mean of pixels in [0, 1]")
    group.add_argument("--std", type=float, nargs="+", help="per-channel std of pixels in [0, 1]")


def given_run_options(args):
    """{option: value} of the RUN_OPTIONS given on the command line (``add_run_option_arguments``)."""
    return {name: getattr(args, name) for name in RUN_OPTIONS if getattr(args, name, None) is not None}


def check_positive_arguments(args, *names):
    """ConfigError for a given integer argument below 1 (e.g. --batch_size -1)."""
    from .config import ConfigError
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ConfigError(f"--{name} must be >= 1, got {value}")


def check_writable_folder(folder, what):
    """ConfigError naming ``what`` unless ``folder`` can be created and written (checked with a probe file)."""
    import tempfile
    from .config import ConfigError
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"{what}: cannot write to {folder} (a file is in the way of that folder)") from None
    except OSError as err:
        raise ConfigError(f"{what}: cannot write to {folder} ({err.strerror or err})") from None


def _classifier_width(tensors):
    for key in ("head.weight", "fc.weight"):
        if key in tensors and tensors[key].ndim >= 1:
            return int(tensors[key].shape[0])
    return None


def checkpoint_run_config(path, tensors, meta, given=None, config_file=None):
    """The run configuration to rebuild and evaluate a checkpoint's model.

    Sources, in increasing priority: ``config_file`` (only for a checkpoint without a run configuration),
    the checkpoint's own configuration (train.py and tools/convert_official.py write one), then ``given``
    (command-line values of ``RUN_OPTIONS``; None = not given). A given model option (``MODEL_OPTIONS``) that
    contradicts the checkpoint is an error; given preprocessing options replace the stored ones.
    Returns:
        (Config, num_classes, stored model kwargs or None)
    """
    import yaml
    from .config import ConfigError, TRAIN_OPTIONS, build_config, read_yaml
    given = {key: value for key, value in (given or {}).items() if value is not None}
    stored = (yaml.safe_load(meta["config"]) or {}) if "config" in meta else {}
    stored.update({key: meta[key] for key in ("model", "num_classes") if meta.get(key) is not None})
    for name in MODEL_OPTIONS:
        if name in given and stored.get(name) is not None:
            have, want = stored[name], given[name]
            if (dict(have) != dict(want)) if name == "model_overrides" else (have != want):
                raise ConfigError(f"--{name} {want!r} contradicts the checkpoint {path}, which holds {name} "
                                  f"{have!r}: leave --{name} out (the checkpoint says it)")
    source = path
    if "config" not in meta and config_file:
        stored, source = dict(read_yaml(config_file), **stored), config_file
    values = dict(stored, **given)
    if values.get("model") is None:
        raise ConfigError(f"{path} does not say which model it holds (no run configuration): pass --model NAME "
                          f"(and --num_classes, --image_size, --mean, --std as it was trained)")
    if values.get("num_classes") is None:
        values["num_classes"] = _classifier_width(tensors)
        if values["num_classes"] is None:
            raise ConfigError(f"{path} does not say how many classes its model has: pass --num_classes N")
    cfg = build_config(TRAIN_OPTIONS, values, file_source=source)
    return cfg, cfg.num_classes, meta.get("model_kwargs")


WEIGHT_CHOICES = ("auto", "raw", "ema")


def model_from_checkpoint(path: str, weights: str = "auto", given: Optional[dict] = None,
                          config_file: Optional[str] = None) -> tuple:
    """Rebuild the model a checkpoint holds and load its weights (strictly; non-finite values refused); the
    run's image_size is checked against the model's smallest input first.

    Args:
        weights: 'raw' (the optimised weights), 'ema' (the EMA weights), or 'auto': the ones training
            validated (EMA when the run kept an EMA and had eval_ema on).
        given, config_file: run options for checkpoints that lack them (see ``checkpoint_run_config``).
    Returns:
        (model, run Config, meta, use_ema); ``meta["num_classes"]`` is set.
    """
    from models.weights import read_checkpoint, load_tensors_into
    if weights not in WEIGHT_CHOICES:
        raise ValueError(f"weights={weights!r} is not supported; allowed values: {WEIGHT_CHOICES}")
    tensors, meta = read_checkpoint(path)
    cfg, num_classes, stored_kwargs = checkpoint_run_config(path, tensors, meta, given, config_file)
    meta = dict(meta, num_classes=num_classes)
    use_ema = weights == "ema" or (weights == "auto" and bool(meta.get("has_ema")) and cfg.eval_ema)
    if stored_kwargs is not None:  # exactly how the model was built (newer checkpoints)
        model, _ = build_model(cfg.model, num_classes, stored_kwargs)
    else:  # older checkpoints: built from the run options, without img_size
        model, _ = build_model(cfg.model, num_classes, model_kwargs(cfg.model_overrides, cfg.drop_path_rate,
                                                                    cfg.in_chans))
    check_input_size(model, cfg.model, cfg.image_size)
    load_tensors_into(model, tensors, meta, path, strict=True, use_ema=use_ema)
    return model, cfg, meta, use_ema
