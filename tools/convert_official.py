"""Convert an official PyTorch checkpoint (Swin-ACmix, ResNet-ACmix, Swin, ResNet, ...) to a MindSpore .ckpt.

    python tools/convert_official.py --model swin_tiny_acmix --src acmix_swin_tiny.pth --dst swin_tiny_acmix.ckpt

The .pth is read without PyTorch and without running anything from the file (``models.pth_reader``).
Strict: every official key must find its place and every model parameter must be filled, or the tool
names the differences and writes nothing. ``--num_classes N`` (N != the checkpoint's) leaves the
classifier out so the model can be fine-tuned on another dataset.

The .ckpt records what ``eval.py`` and ``export.py`` need: the model name and its constructor arguments
(``--model_overrides``), the number of classes, and the evaluation preprocessing of the model's recipe
``configs/<model>.yaml`` (image size, crop_pct, interpolation, mean and std of the official training;
``--image_size`` replaces the size). Exit codes: 0 written, 2 bad input (nothing written).
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CLASSIFIER_PREFIXES = ("head.", "fc.")
PREPROCESSING = ("image_size", "crop_pct", "interpolation", "mean", "std", "in_chans")


def classifier_prefix(model):
    """Name prefix of the model's classifier parameters ("head." for Swin/PVT, "fc." for ResNet/SAN)."""
    from models.convert import ConversionError
    names = [p.name for p in model.get_parameters()]
    for prefix in CLASSIFIER_PREFIXES:
        if any(n.startswith(prefix) for n in names):
            return prefix
    raise ConversionError("cannot tell which parameters form the classifier of this model")


def recipe_preprocessing(model_name):
    """The evaluation preprocessing of ``configs/<model_name>.yaml`` (the official recipe), or {} if none."""
    from engine.config import read_yaml
    path = os.path.join(ROOT, "configs", f"{model_name}.yaml")
    if not os.path.isfile(path):
        return {}
    return {key: value for key, value in read_yaml(path).items() if key in PREPROCESSING}


def run_config(model_name, num_classes, model_kwargs, image_size=None):
    """The run configuration a converted checkpoint records (engine.config schema, YAML text)."""
    from engine.config import TRAIN_OPTIONS, build_config
    values = dict(recipe_preprocessing(model_name), model=model_name, num_classes=num_classes,
                  model_overrides=dict(model_kwargs))
    if image_size is not None:
        values["image_size"] = image_size
    elif "img_size" in model_kwargs and isinstance(model_kwargs["img_size"], int):
        values["image_size"] = model_kwargs["img_size"]
    return build_config(TRAIN_OPTIONS, values, file_source="the conversion")


def convert(model_name, src, dst, num_classes=None, model_kwargs=None, image_size=None):
    """Convert ``src`` (.pth) for ``model_name`` and write ``dst`` (.ckpt) atomically.

    Returns:
        (model with the converted weights, names of the converted tensors, left-out prefixes).
    Raises:
        ConversionError (unreadable file, keys that do not fit), ModelBuildError, ConfigError.
    """
    import mindspore as ms
    from engine.checkpoint import save_checkpoint
    from engine.runtime import build_model
    from models.convert import convert_state_dict, load_torch_state_dict, model_parameter_shapes
    model_kwargs = dict(model_kwargs or {})
    state = load_torch_state_dict(src)
    source_classes = _num_source_classes(state)
    classes = num_classes if num_classes is not None else source_classes
    cfg = run_config(model_name, classes, model_kwargs, image_size)  # checks the options before the build
    model, _ = build_model(model_name, classes, model_kwargs)
    drop = ()
    if classes != source_classes:
        drop = (classifier_prefix(model),)
    converted = convert_state_dict(state, model_parameter_shapes(model), drop_prefixes=drop)
    params = dict(model.parameters_and_names())
    for name, value in converted.items():
        params[name].set_data(ms.Tensor(value))
    save_checkpoint(dst, params.items(), meta={"model": model_name, "num_classes": classes,
                                               "converted_from": os.path.basename(src), "config": cfg.to_yaml(),
                                               "model_kwargs": model_kwargs})
    return model, sorted(converted), drop


def _num_source_classes(state):
    from models.convert import ConversionError
    for key in ("head.weight", "fc.weight"):
        if key in state:
            return int(state[key].shape[0])
    raise ConversionError("the checkpoint has no classifier ('head.weight' or 'fc.weight'); is it a backbone-only "
                          "file? Pass --num_classes to build the model with a fresh head")


def main(argv=None):
    from engine.config import yaml_mapping
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="registered model name, e.g. swin_tiny_acmix")
    parser.add_argument("--src", required=True, help="official PyTorch .pth file")
    parser.add_argument("--dst", required=True, help="MindSpore .ckpt to write")
    parser.add_argument("--num_classes", "--num-classes", dest="num_classes", type=int, default=None,
                        help="classifier width; if it differs from the checkpoint's, the head is left out")
    parser.add_argument("--model_overrides", type=yaml_mapping, default={},
                        help="constructor arguments of the model, e.g. '{img_size: 384, window_size: 12}'")
    parser.add_argument("--image_size", type=int, default=None,
                        help="evaluation image size to record (default: the recipe's, or the model's img_size)")
    args = parser.parse_args(argv)
    from engine.checkpoint import CheckpointError
    from engine.config import ConfigError
    from engine.runtime import ModelBuildError, check_writable_folder
    from models.convert import ConversionError
    try:
        if not os.path.isfile(args.src):
            raise ConfigError(f"--src {args.src} does not exist")
        if args.num_classes is not None and args.num_classes < 1:
            raise ConfigError(f"--num_classes must be >= 1, got {args.num_classes}")
        check_writable_folder(os.path.dirname(os.path.abspath(args.dst)), "--dst")
        _, names, dropped = convert(args.model, args.src, args.dst, args.num_classes, args.model_overrides,
                                    args.image_size)
    except (ConversionError, ConfigError, ModelBuildError, CheckpointError) as err:
        print(f"error: conversion failed: {err}", file=sys.stderr)
        return 2
    note = f" (left out for fine-tuning: {', '.join(dropped)}*)" if dropped else ""
    print(f"wrote {args.dst}: {len(names)} tensors for {args.model}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
