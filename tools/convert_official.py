"""Convert an official PyTorch checkpoint (Swin-ACmix, ResNet-ACmix, Swin, ResNet, ...) to a MindSpore .ckpt.

    python tools/convert_official.py --model swin_tiny_acmix --src acmix_swin_tiny.pth --dst swin_tiny_acmix.ckpt

The result loads with ``models.create_model(name, checkpoint=...)``, ``eval.py`` and ``export.py``.
Strict: every official key must find its place and every model parameter must be filled, or the tool
lists all differences and writes nothing. ``--num-classes N`` (N != the checkpoint's) leaves the
classifier out so the model can be fine-tuned on another dataset. Needs the ``convert`` extra (torch).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mindspore as ms  # noqa: E402

import models  # noqa: E402
from engine.checkpoint import save_checkpoint  # noqa: E402
from models.convert import (ConversionError, convert_state_dict, load_torch_state_dict,  # noqa: E402
                            model_parameter_shapes)

CLASSIFIER_PREFIXES = ("head.", "fc.")


def classifier_prefix(model):
    """Name prefix of the model's classifier parameters ("head." for Swin/PVT, "fc." for ResNet/SAN)."""
    names = [p.name for p in model.get_parameters()]
    for prefix in CLASSIFIER_PREFIXES:
        if any(n.startswith(prefix) for n in names):
            return prefix
    raise ConversionError("cannot tell which parameters form the classifier of this model")


def convert(model_name, src, dst, num_classes=None, model_kwargs=None):
    """Convert ``src`` (.pth) for ``model_name`` and write ``dst`` (.ckpt) atomically; returns the model."""
    state = load_torch_state_dict(src)
    source_classes = _num_source_classes(state)
    classes = num_classes if num_classes is not None else source_classes
    model = models.create_model(model_name, num_classes=classes, **(model_kwargs or {}))
    drop = ()
    if classes != source_classes:
        drop = (classifier_prefix(model),)
    converted = convert_state_dict(state, model_parameter_shapes(model), drop_prefixes=drop)
    params = dict(model.parameters_and_names())
    for name, value in converted.items():
        params[name].set_data(ms.Tensor(value))
    save_checkpoint(dst, params.items(), meta={"model": model_name, "num_classes": classes,
                                               "converted_from": os.path.basename(src)})
    return model, sorted(converted), drop


def _num_source_classes(state):
    for key in ("head.weight", "fc.weight"):
        if key in state:
            return int(state[key].shape[0])
    raise ConversionError("the checkpoint has no classifier ('head.weight' or 'fc.weight'); is it a backbone-only "
                          "file? Pass --num-classes to build the model with a fresh head")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="registered model name, e.g. swin_tiny_acmix")
    parser.add_argument("--src", required=True, help="official PyTorch .pth file")
    parser.add_argument("--dst", required=True, help="MindSpore .ckpt to write")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="classifier width; if it differs from the checkpoint's, the head is left out")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.src):
        parser.error(f"--src {args.src} does not exist")
    try:
        _, names, dropped = convert(args.model, args.src, args.dst, args.num_classes)
    except ConversionError as err:
        print(f"conversion failed: {err}", file=sys.stderr)
        return 1
    note = f" (left out for fine-tuning: {', '.join(dropped)}*)" if dropped else ""
    print(f"wrote {args.dst}: {len(names)} tensors for {args.model}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
