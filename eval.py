"""Top-1/top-5 accuracy and loss of a checkpoint or an exported MINDIR on an ImageFolder split.

    python eval.py --checkpoint runs/resnet_tiny/best.ckpt [--data_dir data/fashion_mnist] [--per_class]
    python eval.py --mindir runs/resnet_tiny/model.mindir --data_dir data/fashion_mnist

    python eval.py --checkpoint plain.ckpt --model resnet26_acmix --num_classes 10 --image_size 64 --data_dir ...

A checkpoint written by train.py or tools/convert_official.py carries its run configuration: the model,
class names and the evaluation preprocessing (resize to image_size / crop_pct, center crop, normalisation)
are taken from it, so the numbers match the validation of training. For a checkpoint without one (any
MindSpore .ckpt of a registered model) give ``--model`` and the other options, or ``--config`` with them;
options a checkpoint records may not be contradicted (``--model``, ``--num_classes``, ...), preprocessing
options given on the command line replace the recorded ones. A MINDIR reads the same from the
``<file>.json`` that export.py writes beside it (or from ``--config``).
Exit codes: 0 done, 1 the model produced NaN or inf logits, 2 bad input.
"""
import argparse
import json
import os
import sys

import numpy as np


class NonFiniteLogits(ValueError):
    """The evaluated model produced NaN or inf logits (a diverged or overflowing network)."""


def parse_args(argv):
    from engine.config import DEVICE_TARGETS
    from engine.runtime import add_run_option_arguments
    parser = argparse.ArgumentParser(description="Evaluate a checkpoint or MINDIR on an ImageFolder split.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint (.ckpt) of train.py or tools/convert_official.py (others "
                                             "need --model and the run options)")
    source.add_argument("--mindir", help="MINDIR written by export.py")
    parser.add_argument("--data_dir", help="ImageFolder root (default: the training run's data_dir)")
    parser.add_argument("--split", default=None, help="sub-folder to evaluate (default: the run's val_split)")
    parser.add_argument("--config", help="YAML run config giving the model and preprocessing (a MINDIR without its "
                                         ".json, a checkpoint without a run configuration)")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="evaluation batch size; for a MINDIR without its .json: the exported batch size")
    parser.add_argument("--num_workers", type=int, default=None, help="decoding workers")
    parser.add_argument("--weights", choices=("auto", "raw", "ema"), default="auto",
                        help="checkpoint weights: auto = those training validated (EMA if it was on), raw, ema")
    parser.add_argument("--per_class", "--per-class", dest="per_class", action="store_true",
                        help="print the accuracy of every class")
    parser.add_argument("--json", dest="json_path", help="also write the results to this JSON file")
    parser.add_argument("--device_target", choices=DEVICE_TARGETS, default=None)
    parser.add_argument("--mode", choices=("graph", "pynative"), default="graph")
    add_run_option_arguments(parser, "evaluation crop size (pixels)")
    return parser.parse_args(argv)


def _mindir_config(args, given):
    """(run Config, class names, fixed batch, num_classes) for a MINDIR: its sidecar JSON, else --config; the
    preprocessing options given on the command line replace theirs."""
    from engine.config import ConfigError, TRAIN_OPTIONS, build_config, read_yaml
    fixed = sorted(set(given) & {"model", "num_classes", "model_overrides"})
    if fixed:
        raise ConfigError(f"--{fixed[0]} does not apply to a MINDIR (its network is fixed): give the preprocessing "
                          f"options only")
    sidecar = args.mindir + ".json"
    if os.path.isfile(sidecar):
        with open(sidecar, encoding="utf-8") as handle:
            info = json.load(handle)
        values = {key: info[key] for key in ("image_size", "crop_pct", "interpolation", "mean", "std", "in_chans",
                                             "data_dir", "val_split", "task", "task_options") if key in info}
        cfg = build_config(TRAIN_OPTIONS, dict(values, **given), file_source=sidecar)
        return cfg, info.get("class_names"), info["input_shape"][0], info.get("num_classes")
    if not args.config and "image_size" not in given:
        raise ConfigError(f"{args.mindir} has no {os.path.basename(sidecar)} beside it: pass --config with the "
                          f"preprocessing options (image_size, crop_pct, mean, std, ...) or give them as options")
    if not args.batch_size:
        raise ConfigError("a MINDIR without its .json needs --batch_size: the batch size it was exported with")
    values = read_yaml(args.config) if args.config else {}
    cfg = build_config(TRAIN_OPTIONS, dict(values, **given), file_source=args.config or "command line")
    return cfg, None, args.batch_size, cfg.num_classes


def _checked(predict):
    """``predict`` that raises NonFiniteLogits on NaN/inf output (a diverged network scores chance level
    instead of failing: 10 % top-1 on 10 classes looked like a result)."""
    batch_number = 0

    def run(images):
        nonlocal batch_number
        logits = predict(images)
        batch_number += 1
        if not np.isfinite(logits).all():
            bad = int((~np.isfinite(logits)).any(axis=-1).sum())
            raise NonFiniteLogits(f"the model produced NaN or inf logits for {bad} of {len(logits)} images in "
                                  f"batch {batch_number}: its weights are broken (diverged training) or overflow")
        return logits
    return run


def _numpy(output):
    """A network's output as numpy: an array, or a tuple of arrays for multi-output networks."""
    if isinstance(output, (tuple, list)):
        return tuple(item.asnumpy() for item in output)
    return output.asnumpy()


def _check_classes(found, trained, where):
    from engine.data import DataError
    if trained is not None and list(found) != list(trained):
        raise DataError(f"the classes of {where} ({len(found)}) differ from the classes the model was trained on "
                        f"({len(trained)}): only here: {sorted(set(found) - set(trained)) or 'none'}; "
                        f"only in training: {sorted(set(trained) - set(found)) or 'none'}")


def run(args):
    """Evaluate; returns the results dict."""
    import mindspore as ms
    from engine.data import DataError, eval_dataset, scan_split
    from engine.logger import RateProgress
    from engine.metrics import evaluate
    from engine.tasks import resolve
    from engine.runtime import (ReleasingCaller, check_positive_arguments, check_writable_folder, given_run_options,
                                model_from_checkpoint, setup_context)
    check_positive_arguments(args, "batch_size", "num_workers", "image_size", "num_classes")
    if args.json_path:
        check_writable_folder(os.path.dirname(os.path.abspath(args.json_path)), "--json")
    given = given_run_options(args)
    setup_context(args.mode, args.device_target)
    from engine.logger import setup_logging
    setup_logging()  # the engine's loggers (the image check's progress lines) print to this run's stdout
    if args.checkpoint:
        model, cfg, meta, _ = model_from_checkpoint(args.checkpoint, args.weights, given, args.config)
        class_names, num_classes, fixed_batch = meta.get("class_names"), meta["num_classes"], None
        model.set_train(False)

        network = ReleasingCaller(resolve(cfg).inference_network(model, cfg))

        def predict(images):
            return _numpy(network(ms.Tensor(images)))
    else:
        if not os.path.isfile(args.mindir):
            raise DataError(f"MINDIR not found: {args.mindir}")
        cfg, class_names, fixed_batch, num_classes = _mindir_config(args, given)
        graph = ms.nn.GraphCell(ms.load(args.mindir))

        def predict(images):
            return _numpy(graph(ms.Tensor(images)))
    data_dir = args.data_dir or cfg.data_dir
    split = args.split or cfg.val_split or "val"
    if args.num_workers:
        cfg.num_workers = args.num_workers
    task = resolve(cfg)
    if task.NAME != "classification":  # the task reads its data and scores it (engine/tasks/<task>.py)
        data, names = task.eval_data(cfg, data_dir, split)
        _check_classes(names, class_names, data_dir)
        batch = fixed_batch or args.batch_size or cfg.eval_batch_size or cfg.batch_size
        result = task.evaluate(predict, cfg, data, num_classes or len(names), batch, fixed_batch)
        return dict(result, task=task.NAME, source=args.checkpoint or args.mindir, data=data_dir)
    index = scan_split(data_dir, split, verify_images=True, bad_images="fail")
    if class_names is not None and index.classes != list(class_names):
        raise DataError(f"the class folders of {index.root} ({len(index.classes)}) differ from the classes the "
                        f"model was trained on ({len(class_names)}): "
                        f"only here: {sorted(set(index.classes) - set(class_names)) or 'none'}; "
                        f"only in training: {sorted(set(class_names) - set(index.classes)) or 'none'}")
    if num_classes is None:  # a MINDIR with --config and no num_classes: one output per class folder
        num_classes = len(index.classes)
    batch = fixed_batch or args.batch_size or cfg.eval_batch_size or cfg.batch_size
    progress = RateProgress(print, len(index), f"evaluating {len(index)} images of {index.root}")
    meter = evaluate(_checked(predict), eval_dataset(cfg, index, batch), num_classes, fixed_batch=fixed_batch,
                     progress=progress)
    result = dict(meter.result(), source=args.checkpoint or args.mindir, data=index.root)
    names = class_names or index.classes
    result["per_class"] = {names[i] if i < len(names) else str(i): {"top1": acc, "count": count}
                           for i, acc, count in meter.per_class()}
    return result


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from engine.checkpoint import CheckpointError  # after parsing: --help stays fast (it loads the models)
    from engine.config import ConfigError
    from engine.data import DataError
    from engine.runtime import ModelBuildError
    try:
        result = run(args)
    except (ConfigError, DataError, CheckpointError, ModelBuildError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLogits as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if result.get("task", "classification") != "classification":
        from engine.tasks import get_task
        print(get_task(result["task"]).summary(result))
        if args.json_path:
            with open(args.json_path, "w", encoding="utf-8") as handle:
                json.dump(result, handle, indent=1)
        return 0
    print(f"{result['source']} on {result['data']}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
          f"loss {result['loss']:.4f}  ({result['count']} images)")
    if args.per_class:
        width = max(len(name) for name in result["per_class"])
        for name, row in result["per_class"].items():
            accuracy = f"{row['top1']:6.2f}%" if row["top1"] is not None else "    n/a"
            print(f"  {name:<{width}}  {accuracy}  ({row['count']} images)")
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
