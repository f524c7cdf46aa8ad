"""Run configuration: a declared schema, YAML files and command-line overrides.

Every option of ``train.py`` is declared once in ``TRAIN_OPTIONS`` (name, type, default, help, allowed
values). A run's configuration is built from, in increasing priority:

1. the schema defaults,
2. the YAML file given with ``--config path.yaml`` (a flat mapping of option names),
3. ``--name value`` / ``--name=value`` pairs on the command line (values are read as YAML scalars, so
   ``--lr 0.01``, ``--mixup 0``, ``--val_split null``, ``--mean "[0.5, 0.5, 0.5]"`` all work).

Unknown option names and values of the wrong type raise ``ConfigError`` naming the option.
"""
import difflib
import math
import os
from dataclasses import dataclass
from typing import Optional

import yaml

from acmix_ms.constants import DEVICE_TARGETS  # noqa: F401  (re-exported: the scripts' --device_target choices)
DEFAULT_LOSS_SCALE = 65536.0  # static loss scale, or the initial dynamic one (option loss_scale_value)


class ConfigError(ValueError):
    """A configuration file or command-line option is invalid; the message names the option."""


@dataclass(frozen=True)
class Option:
    """One declared option.

    ``kind`` is one of ``KINDS``; ``optional`` allows ``null``; ``choices`` restricts the values.
    """
    name: str
    kind: str
    default: object
    help: str
    choices: tuple = None
    optional: bool = False
    section: str = ""


KINDS = ("int", "float", "str", "bool", "float_list", "str_list", "dict")


def _coerce(option, value, source):
    """Return ``value`` converted to ``option``'s kind, or raise ConfigError naming the option."""
    where = f" (from {source})" if source else ""

    def fail(expected):
        raise ConfigError(f"option '{option.name}'{where} must be {expected}, got {value!r}")

    if value is None:
        if option.optional:
            return None
        fail(f"a {option.kind} (null is not allowed)")
    kind = option.kind
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            fail("an integer")
    elif kind == "float":
        if isinstance(value, bool):
            fail("a number")
        if isinstance(value, str):  # YAML 1.1 reads '5e-4' as a string
            try:
                value = float(value)
            except ValueError:
                fail("a number")
        if not isinstance(value, (int, float)):
            fail("a number")
        value = float(value)
        if not math.isfinite(value):
            fail("a finite number")
    elif kind == "str":
        if not isinstance(value, str):
            fail("a string")
    elif kind == "bool":
        if not isinstance(value, bool):
            fail("true or false")
    elif kind == "float_list":
        if not isinstance(value, (list, tuple)):
            fail("a list of numbers")
        items = []
        for item in value:
            try:
                if isinstance(item, bool):
                    raise ValueError
                items.append(float(item))
            except (TypeError, ValueError):
                fail("a list of numbers")
            if not math.isfinite(items[-1]):
                fail("a list of finite numbers")
        value = items
    elif kind == "str_list":
        if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
            fail("a list of strings")
        value = list(value)
    elif kind == "dict":
        if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
            fail("a mapping with string keys")
        value = dict(value)
    if option.choices is not None and value not in option.choices:
        raise ConfigError(f"option '{option.name}'{where} must be one of "
                          f"{', '.join(map(repr, option.choices))}; got {value!r}")
    return value


def _options(section, *specs):
    return [Option(*spec[:4], **dict(spec[4] if len(spec) > 4 else {}), section=section) for spec in specs]


# Learning-rate note: with ``lr_base_batch`` set, the effective lr is lr * global_batch / lr_base_batch
# (the papers' "0.1 per 256 images" / "5e-4 per 512 images").
TRAIN_OPTIONS = (
    _options(
        "model",
        ("model", "str", None, "registered model name (models.list_models())", {"optional": True}),
        ("task", "str", None, "what the model learns: a module of engine/tasks (classification, detection, ...); "
                              "null: the task the model is registered for", {"optional": True}),
        ("task_options", "dict", {}, "settings of the task (engine/tasks/<task>.py OPTIONS), e.g. "
                                     "{score_threshold: 0.05}"),
        ("num_classes", "int", None, "classifier width; null = number of class folders", {"optional": True}),
        ("model_overrides", "dict", {}, "extra constructor keyword arguments, e.g. {shift_impl: fixed}"),
        ("drop_path_rate", "float", None, "stochastic depth rate passed to the model (null: its default)",
         {"optional": True}),
        ("init_checkpoint", "str", None, "weights to start from (strictly matching keys)", {"optional": True}),
        ("in_chans", "int", 3, "image channels fed to the model (grey images are expanded to 3)",
         {"choices": (1, 3)}),
    )
    + _options(
        "data",
        ("data_dir", "str", None, "ImageFolder root holding <train_split>/<class>/* and <val_split>/<class>/*",
         {"optional": True}),
        ("train_split", "str", "train", "training sub-folder of data_dir"),
        ("val_split", "str", "val", "validation sub-folder (null: no validation)", {"optional": True}),
        ("image_size", "int", 224, "training crop and evaluation crop size (pixels)"),
        ("crop_pct", "float", 0.875, "evaluation: resize to image_size / crop_pct, then center crop"),
        ("interpolation", "str", "bilinear", "resize interpolation",
         {"choices": ("bilinear", "bicubic", "nearest")}),
        ("mean", "float_list", [0.485, 0.456, 0.406], "per-channel mean of pixels scaled to [0, 1]"),
        ("std", "float_list", [0.229, 0.224, 0.225], "per-channel std of pixels scaled to [0, 1]"),
        ("batch_size", "int", 128, "training batch size per device"),
        ("eval_batch_size", "int", None, "validation batch size (null: batch_size)", {"optional": True}),
        ("num_workers", "int", None, "parallel decoding/augmentation workers per device (null: from the machine: "
                                     "its available cores / processes on it, at most 8)", {"optional": True}),
        ("verify_images", "bool", True, "fully decode every image before training to find unreadable or "
                                          "truncated files (on rank 0, once per dataset: the result is cached)"),
        ("bad_images", "str", "fail", "unreadable images: fail, or skip them with a counted warning",
         {"choices": ("fail", "skip")}),
    )
    + _options(
        "augmentation",
        ("scale", "float_list", [0.08, 1.0], "RandomResizedCrop area range"),
        ("ratio", "float_list", [0.75, 1.3333333], "RandomResizedCrop aspect-ratio range"),
        ("hflip", "float", 0.5, "horizontal flip probability"),
        ("randaugment_ops", "int", 0, "RandAugment: operations per image (0: off)"),
        ("randaugment_magnitude", "int", 9, "RandAugment magnitude (0-30)"),
        ("random_erasing", "float", 0.0, "random erasing probability"),
        ("mixup", "float", 0.0, "mixup Beta(alpha, alpha) parameter (0: off)"),
        ("cutmix", "float", 0.0, "cutmix Beta(alpha, alpha) parameter (0: off)"),
        ("mixup_prob", "float", 1.0, "probability of mixing a batch when mixup or cutmix is on"),
        ("label_smoothing", "float", 0.1, "label smoothing of the training loss"),
    )
    + _options(
        "optimisation",
        ("opt", "str", "sgd", "optimizer", {"choices": ("sgd", "adamw")}),
        ("lr", "float", 0.1, "peak learning rate (scaled by lr_base_batch when set)"),
        ("lr_base_batch", "int", None, "if set, lr applies per this many images: lr * global_batch / it",
         {"optional": True}),
        ("min_lr", "float", 0.0, "learning rate at the end of the schedule"),
        ("lr_schedule", "str", "cosine", "decay after the warm-up: cosine, or poly: (1 - progress)^poly_power "
                                         "(the segmentation recipes)", {"choices": ("cosine", "poly")}),
        ("poly_power", "float", 1.0, "exponent of the poly schedule"),
        ("warmup_epochs", "float", 0.0, "linear warm-up length (epochs, counted in steps)"),
        ("warmup_lr", "float", 0.0, "learning rate at step 0 of the warm-up"),
        ("epochs", "int", 90, "training epochs"),
        ("momentum", "float", 0.9, "SGD momentum"),
        ("nesterov", "bool", False, "SGD with Nesterov momentum"),
        ("betas", "float_list", [0.9, 0.999], "AdamW betas"),
        ("eps", "float", 1e-8, "AdamW epsilon"),
        ("weight_decay", "float", 1e-4, "weight decay"),
        ("decay_all_params", "bool", False,
         "true: decay every parameter (the official ResNet script); false: no decay for norms, biases, "
         "position tables and ACmix rates"),
        ("no_decay_keywords", "str_list",
         ["relative_position_bias_table", "pos_embed", "absolute_pos_embed", "cls_token", "rate1", "rate2"],
         "parameter-name parts excluded from weight decay (1-D parameters always are)"),
        ("clip_grad_norm", "float", None, "clip gradients to this global norm (null: off)", {"optional": True}),
        ("ema_decay", "float", None, "exponential moving average of the weights (null: off), e.g. 0.9998",
         {"optional": True}),
        ("eval_ema", "bool", True, "with EMA on, validate and pick the best checkpoint with the EMA weights"),
    )
    + _options(
        "precision",
        ("amp_level", "str", "O0", "mixed precision level", {"choices": ("O0", "O1", "O2", "O3")}),
        ("loss_scale", "str", "none", "loss scaling", {"choices": ("none", "static", "dynamic")}),
        ("loss_scale_value", "float", DEFAULT_LOSS_SCALE, "static scale, or the initial dynamic scale"),
        ("loss_scale_window", "int", 1000, "dynamic scaling: finite steps before the scale grows"),
    )
    + _options(
        "run",
        ("device_target", "str", None, "null: MindSpore's default device", {"optional": True,
                                                                            "choices": DEVICE_TARGETS}),
        ("mode", "str", "graph", "execution mode", {"choices": ("graph", "pynative")}),
        ("seed", "int", 42, "random seed (weights, data order, augmentation)"),
        ("distributed", "bool", None, "data parallel; null: on when launched by msrun with >1 workers",
         {"optional": True}),
        ("output_dir", "str", None, "run folder (null: runs/<model>)", {"optional": True}),
        ("resume", "str", None, "checkpoint to resume from, or 'auto' for <output_dir>/last.ckpt if present",
         {"optional": True}),
        ("save_every_epochs", "int", 1, "write last.ckpt every N epochs (and always at the end)"),
        ("save_every_steps", "int", 0, "also write last.ckpt every N steps (0: off)"),
        ("keep_epoch_checkpoints", "bool", False, "also keep epoch_NNN.ckpt for every saved epoch"),
        ("keep_checkpoint_max", "int", 0, "with keep_epoch_checkpoints: keep only the newest N epoch_NNN.ckpt "
                                          "(0: all)"),
        ("overwrite", "bool", False, "start a new run in an output_dir that holds an earlier run: delete that "
                                     "run's checkpoints, logs and metrics first (without it: refused)"),
        ("save_on_all_ranks", "bool", False, "data parallel: every rank writes its own rank_<r>/ checkpoints"),
        ("stop_at_step", "int", None, "stop (and save) after this global step, e.g. to split a long run",
         {"optional": True}),
        ("val_every_epochs", "int", 1, "validate every N epochs (and after the last)"),
        ("log_interval", "int", 20, "steps between progress lines"),
        ("plot", "bool", True, "write curves.png next to metrics.jsonl (needs matplotlib)"),
        ("data_sink", "bool", True, "Ascend/GPU: feed batches through a device queue and run sink_size steps per "
                                    "call (ms.data_sink); CPU always runs a host loop"),
        ("sink_size", "int", 20, "steps per sunk call (lowered to divide log_interval, the steps per epoch and "
                                 "the checkpoint steps)"),
    )
)

_POSITIVE_INTS = ("batch_size", "epochs", "save_every_epochs", "val_every_epochs", "log_interval",
                  "image_size", "loss_scale_window", "sink_size")


class Config:
    """Attribute access to option values; ``to_dict()``/``to_yaml()`` give them back in schema order."""

    def __init__(self, values, options):
        object.__setattr__(self, "_values", dict(values))
        object.__setattr__(self, "_options", {opt.name: opt for opt in options})

    def __getattr__(self, name):
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"no option {name!r}") from None

    def __setattr__(self, name, value):
        if name not in self._options:
            raise ConfigError(_unknown_message(name, self._options))
        self._values[name] = _coerce(self._options[name], value, "")

    def __getitem__(self, name):
        return self._values[name]

    def to_dict(self):
        return {name: self._values[name] for name in self._options}

    def to_yaml(self):
        return dump_yaml(self.to_dict(), self._options.values())

    def __repr__(self):
        return f"Config({self.to_dict()!r})"


def _unknown_message(name, options):
    close = difflib.get_close_matches(name, list(options), n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return f"unknown option '{name}'.{hint} Run with --help to list the options."


def dump_yaml(values, options):
    """YAML text of ``values`` grouped by section, each option preceded by its help as a comment."""
    lines, section = [], None
    for opt in options:
        if opt.section != section:
            section = opt.section
            lines.append(f"\n# ---- {section} ----")
        allowed = f" [{' | '.join(map(str, opt.choices))}]" if opt.choices else ""
        lines.append(f"# {opt.help}{allowed}")
        text = yaml.safe_dump({opt.name: values[opt.name]}, default_flow_style=True, sort_keys=False).strip()
        if text.startswith("{") and text.endswith("}"):
            text = text[1:-1]
        lines.append(text)
    return "\n".join(lines).lstrip() + "\n"


def read_yaml(path):
    """The flat mapping stored in a YAML config file."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as handle:
        try:
            data = yaml.safe_load(handle)
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option names to values")
    return data


def parse_overrides(argv):
    """``['--lr', '0.1', '--amp_level=O2']`` -> ``{'lr': 0.1, 'amp_level': 'O2'}`` (values read as YAML)."""
    overrides, index = {}, 0
    while index < len(argv):
        token = argv[index]
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"expected an option '--name value', got {token!r}")
        name = token[2:]
        if "=" in name:
            name, text = name.split("=", 1)
            index += 1
        else:
            if index + 1 >= len(argv) or argv[index + 1].startswith("--"):
                raise ConfigError(f"option '{name}' needs a value (e.g. --{name} VALUE)")
            text = argv[index + 1]
            index += 2
        try:
            overrides[name.replace("-", "_")] = yaml.safe_load(text)
        except yaml.YAMLError:
            overrides[name.replace("-", "_")] = text
    return overrides


def yaml_mapping(text):
    """An argparse ``type``: the command-line text read as a YAML mapping (anything else is refused)."""
    value = yaml.safe_load(text)
    if not isinstance(value, dict):
        raise ValueError(text)
    return value


yaml_mapping.__name__ = "YAML mapping"  # argparse names the type in its error message


def parse_assignments(items, what):
    """``['a=1', 'b=[1,2]']`` -> ``{'a': 1, 'b': [1, 2]}`` (values read as YAML)."""
    result = {}
    for item in items:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise ValueError(f"{what}: expected key=value, got {item!r}")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        result[key.strip()] = value
    return result


def build_config(options: tuple = TRAIN_OPTIONS, file_values: Optional[dict] = None,
                 overrides: Optional[dict] = None, file_source: str = "config file") -> "Config":
    """Defaults, then ``file_values``, then ``overrides``; every value checked against ``options``."""
    by_name = {opt.name: opt for opt in options}
    values = {opt.name: opt.default for opt in options}
    for source, mapping in ((file_source, file_values or {}), ("command line", overrides or {})):
        for name, value in mapping.items():
            if name not in by_name:
                raise ConfigError(_unknown_message(name, by_name) + f" (from {source})")
            values[name] = _coerce(by_name[name], value, source)
    config = Config(values, options)
    if options is TRAIN_OPTIONS:
        check_train_config(config)
    return config


def check_train_config(cfg):
    """Cross-option checks that one option's type cannot express."""
    if cfg.task is not None or cfg.task_options:
        from .tasks import DEFAULT_TASK, get_task, task_options
        task_options(cfg, get_task(cfg.task or DEFAULT_TASK) if cfg.task or not cfg.model else None)
    for name in _POSITIVE_INTS:
        if cfg[name] < 1:
            raise ConfigError(f"option '{name}' must be >= 1, got {cfg[name]}")
    for name in ("mean", "std"):
        if len(cfg[name]) != cfg.in_chans and len(cfg[name]) != 1:
            raise ConfigError(f"option '{name}' needs {cfg.in_chans} values (one per channel) or 1, "
                              f"got {len(cfg[name])}")
    for name in ("scale", "ratio", "betas"):
        if len(cfg[name]) != 2:
            raise ConfigError(f"option '{name}' needs exactly 2 values, got {cfg[name]!r}")
    if not 0.0 < cfg.crop_pct <= 1.0:
        raise ConfigError(f"option 'crop_pct' must be in (0, 1], got {cfg.crop_pct}")
    for name in ("hflip", "random_erasing", "mixup_prob"):
        if not 0.0 <= cfg[name] <= 1.0:
            raise ConfigError(f"option '{name}' is a probability in [0, 1], got {cfg[name]}")
    if not 0.0 <= cfg.label_smoothing < 1.0:
        raise ConfigError(f"option 'label_smoothing' must be in [0, 1), got {cfg.label_smoothing}")
    if cfg.ema_decay is not None and not 0.0 < cfg.ema_decay < 1.0:
        raise ConfigError(f"option 'ema_decay' must be in (0, 1), got {cfg.ema_decay}")
    if cfg.loss_scale != "none" and cfg.loss_scale_value < 1.0:
        raise ConfigError(f"option 'loss_scale_value' must be >= 1, got {cfg.loss_scale_value}")
    if cfg.poly_power <= 0:
        raise ConfigError(f"option 'poly_power' must be positive, got {cfg.poly_power}")
    if cfg.warmup_epochs < 0 or cfg.warmup_epochs > cfg.epochs:
        raise ConfigError(f"option 'warmup_epochs' must be in [0, epochs={cfg.epochs}], got {cfg.warmup_epochs}")
    if cfg.lr <= 0:
        raise ConfigError(f"option 'lr' must be > 0, got {cfg.lr}")
    if cfg.clip_grad_norm is not None and cfg.clip_grad_norm <= 0:
        raise ConfigError(f"option 'clip_grad_norm' must be > 0 (or null), got {cfg.clip_grad_norm}")
    if cfg.stop_at_step is not None and cfg.stop_at_step < 1:
        raise ConfigError(f"option 'stop_at_step' must be >= 1 (or null), got {cfg.stop_at_step}")
    for name in ("num_classes", "eval_batch_size", "lr_base_batch", "num_workers"):
        if cfg[name] is not None and cfg[name] < 1:
            raise ConfigError(f"option '{name}' must be >= 1 (or null), got {cfg[name]}")
    for name in ("weight_decay", "min_lr", "warmup_lr", "mixup", "cutmix", "save_every_steps", "keep_checkpoint_max",
                 "randaugment_ops"):
        if cfg[name] < 0:
            raise ConfigError(f"option '{name}' must be >= 0, got {cfg[name]}")
    if not 0 <= cfg.randaugment_magnitude <= 30:
        raise ConfigError(f"option 'randaugment_magnitude' must be in [0, 30], got {cfg.randaugment_magnitude}")
    if not 0.0 <= cfg.momentum < 1.0:
        raise ConfigError(f"option 'momentum' must be in [0, 1), got {cfg.momentum}")
    if not all(0.0 <= beta < 1.0 for beta in cfg.betas):
        raise ConfigError(f"option 'betas' must be two values in [0, 1), got {cfg.betas}")
    if cfg.eps <= 0:
        raise ConfigError(f"option 'eps' must be > 0, got {cfg.eps}")
    if cfg.drop_path_rate is not None and not 0.0 <= cfg.drop_path_rate < 1.0:
        raise ConfigError(f"option 'drop_path_rate' must be in [0, 1) (or null), got {cfg.drop_path_rate}")
    if min(cfg.std) <= 0:
        raise ConfigError(f"option 'std' must hold values > 0, got {cfg.std}")
    for name, upper in (("scale", 1.0), ("ratio", None)):
        low, high = cfg[name]
        if not 0 < low <= high or (upper is not None and high > upper):
            bound = f" and <= {upper}" if upper is not None else ""
            raise ConfigError(f"option '{name}' must be [low, high] with 0 < low <= high{bound}, got {cfg[name]}")


def help_text(options=TRAIN_OPTIONS, program="train.py"):
    lines = [f"usage: python {program} [--config FILE.yaml] [--print_config] [--OPTION VALUE ...]", "",
             "Options (YAML file keys or --name value; values are YAML scalars/lists):"]
    section = None
    for opt in options:
        if opt.section != section:
            section = opt.section
            lines.append(f"\n  {section}:")
        allowed = f" {{{', '.join(map(str, opt.choices))}}}" if opt.choices else ""
        lines.append(f"    --{opt.name} ({opt.kind}{', or null' if opt.optional else ''}{allowed}; "
                     f"default {opt.default!r})\n        {opt.help}")
    return "\n".join(lines)


def load_config(argv: list, options: tuple = TRAIN_OPTIONS, program: str = "train.py") -> tuple["Config", bool]:
    """Parse a command line: ``--config`` file, ``--help``, ``--print_config`` and option overrides.

    Returns ``(config, print_only)``; ``print_only`` is True when ``--print_config`` was given.
    Raises ``SystemExit(0)`` after printing the help for ``-h``/``--help``.
    """
    argv = list(argv)
    if "-h" in argv or "--help" in argv:
        print(help_text(options, program))
        raise SystemExit(0)
    print_only = "--print_config" in argv
    argv = [arg for arg in argv if arg != "--print_config"]
    config_path = None
    if "--config" in argv:
        position = argv.index("--config")
        if position + 1 >= len(argv):
            raise ConfigError("option 'config' needs a file path")
        config_path = argv[position + 1]
        del argv[position:position + 2]
    else:
        for position, arg in enumerate(argv):
            if arg.startswith("--config="):
                config_path = arg.split("=", 1)[1]
                del argv[position]
                break
    file_values = read_yaml(config_path) if config_path else {}
    overrides = parse_overrides(argv)
    return build_config(options, file_values, overrides, file_source=config_path or "config file"), print_only
