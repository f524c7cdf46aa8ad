"""Export a registered model to MINDIR (or ONNX / AIR) and verify the exported file.

    python export.py --checkpoint runs/resnet_tiny/best.ckpt --batch_size 1 [--image_size 32] \
        [--output runs/resnet_tiny/model.mindir] [--format MINDIR|ONNX|AIR] [--weights auto|raw|ema]
    python export.py --model resnet26_acmix --num_classes 1000 --image_size 224      # random weights
    python export.py --checkpoint plain.ckpt --model resnet26_acmix --num_classes 10   # a .ckpt without a config

A checkpoint written by train.py or tools/convert_official.py says which model it holds and how its inputs
are preprocessed; for other checkpoints give ``--model`` and the other options (a checkpoint's own model,
classes and channels cannot be contradicted). The file is written under a temporary name, reloaded (MINDIR:
``ms.load`` + ``nn.GraphCell``; ONNX: onnxruntime when installed) and run on a sample batch; the max
|difference| to the MindSpore network is printed, and only a file within tolerance is moved to ``--output``.
NaN or inf in either output fails the check, and the tolerance ``atol + rtol * min(max |output|, 100)``
stops growing with the output (a blown-up network cannot pass with a blown-up tolerance). Sliding-window
ACmix layers that run a device kernel (``attention_impl`` 'auto'/'fused', an ``ops.Custom`` op whose MINDIR
would point to this machine's compiled library) are first switched to ``--attention_impl`` (standard
operators, same weights and results). A ``<output>.json`` beside it records the input shape, class names
and preprocessing for eval.py. Exit codes: 0 verified, 1 non-finite output, outside tolerance or export
unsupported, 2 bad input (a checkpoint holding NaN or inf included).
"""
import argparse
import json
import os
import shutil
import sys
import tempfile

import numpy as np

OUTPUT_SCALE_CAP = 100.0  # logits of a working classifier stay far below; beyond it rtol stops widening the bound
PORTABLE_IMPLS = ("unfold", "lean")  # = acmix_ms.local_attention.PORTABLE_IMPLS (not imported: fast --help)
FORMATS = {"MINDIR": ".mindir", "ONNX": ".onnx", "AIR": ".air"}
# operators whose ONNX export MindSpore 2.8 lacks (seen on CPU): name them when ONNX export fails
ONNX_GAPS = "ops.unfold (Im2Col), reflection padding (MirrorPad), bilinear resize"


class ExportError(RuntimeError):
    pass


def parse_args(argv):
    from engine.runtime import add_run_option_arguments
    parser = argparse.ArgumentParser(description="Export a model and check the exported file's output.")
    parser.add_argument("--checkpoint", help="checkpoint (train.py and convert_official.py record model, classes "
                                             "and preprocessing in it); without it: random weights")
    parser.add_argument("--config", help="YAML run config with the model and preprocessing options of a "
                                         "checkpoint that does not record them")
    parser.add_argument("--batch_size", type=int, default=1, help="batch size of the exported input")
    parser.add_argument("--format", default="MINDIR", type=str.upper, choices=sorted(FORMATS))
    parser.add_argument("--output", help="exported file (default: next to the checkpoint, model.<ext>)")
    parser.add_argument("--weights", choices=("auto", "raw", "ema"), default="auto",
                        help="checkpoint weights: auto = those training validated (EMA if it was on), raw, ema")
    parser.add_argument("--atol", type=float, default=1e-4, help="allowed max |diff| (plus rtol * max |output|)")
    parser.add_argument("--rtol", type=float, default=1e-4)
    parser.add_argument("--attention_impl", choices=PORTABLE_IMPLS, default="unfold",
                        help="what replaces a device kernel in sliding-window ACmix layers (unfold: fewest "
                             "operators; lean: least memory at large inputs)")
    parser.add_argument("--device_target", choices=("CPU", "GPU", "Ascend"), default=None)
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample batch")
    add_run_option_arguments(parser, "input height and width (default: the run's image_size, or 224)")
    return parser.parse_args(argv)


def _model_and_info(args):
    """(model, sidecar info): the checkpoint's model, or a randomly initialised one."""
    from engine.config import ConfigError, TRAIN_OPTIONS, build_config, read_yaml
    from engine.runtime import build_model, check_input_size, given_run_options, model_from_checkpoint, model_kwargs
    given = given_run_options(args)
    if args.checkpoint:
        model, cfg, meta, use_ema = model_from_checkpoint(args.checkpoint, args.weights, given, args.config)
        info = {"model": cfg.model, "num_classes": meta["num_classes"], "class_names": meta.get("class_names"),
                "checkpoint": os.path.abspath(args.checkpoint), "weights": "ema" if use_ema else "raw"}
    else:
        if args.weights != "auto":
            raise ConfigError("--weights needs --checkpoint")
        values = dict(read_yaml(args.config) if args.config else {}, **given)
        if not values.get("model"):
            raise ConfigError("give --checkpoint (trained or converted weights) or --model (random weights)")
        cfg = build_config(TRAIN_OPTIONS, values, file_source=args.config or "command line")
        num_classes = cfg.num_classes or 1000
        model, _ = build_model(cfg.model, num_classes, model_kwargs(cfg.model_overrides, cfg.drop_path_rate,
                                                                    cfg.in_chans), cfg.image_size)
        check_input_size(model, cfg.model, cfg.image_size)
        info = {"model": cfg.model, "num_classes": num_classes, "class_names": None}
    from engine.tasks import resolve, task_options
    task = resolve(cfg)
    info.update(task=task.NAME, task_options=task_options(cfg, task))
    model.set_train(False)
    network = task.inference_network(model, cfg)  # e.g. a detector with its box decoding and NMS
    info.update(image_size=cfg.image_size, in_chans=cfg.in_chans, crop_pct=cfg.crop_pct,
                interpolation=cfg.interpolation, mean=cfg.mean, std=cfg.std, data_dir=cfg.data_dir,
                val_split=cfg.val_split)
    return network, info


def make_exportable(model, attention_impl="unfold"):
    """Switch the layers of ``model`` that run a device kernel (``ops.Custom``) to ``attention_impl``, before
    the model's first run; returns how many were switched (printed when any)."""
    from acmix_ms import attention_backends, set_attention_impl
    backends = attention_backends(model)
    switched = set_attention_impl(model, attention_impl, only_kernels=True)
    if switched:
        print(f"{switched} sliding-window attention layer(s) ran a device kernel ({backends}): exported with "
              f"attention_impl='{attention_impl}' (standard operators, same weights and results)")
    from acmix_ms import set_conv_path_kernels
    conv = set_conv_path_kernels(model, False)  # the conv path's group convolution
    if conv:
        print(f"{conv} ACmix conv path(s) ran a device kernel: exported with standard operators (same results)")
    from models.layers import set_fused_kernels
    fused = set_fused_kernels(model, False)  # transformer layers (GELU) with a CPU kernel
    if fused:
        print(f"{fused} transformer layer(s) ran a fused CPU kernel: exported with standard operators "
              "(same results)")
    return switched + conv + fused


def _as_arrays(output):
    """A network's output (Tensor, array or a tuple of them) as a list of numpy arrays."""
    items = output if isinstance(output, (tuple, list)) else (output,)
    return [item.asnumpy() if hasattr(item, "asnumpy") else np.asarray(item) for item in items]


def _run_exported(path, file_format, sample):
    """Output of the exported file on ``sample``; None when it cannot be run here (with the reason printed)."""
    import mindspore as ms
    if file_format == "MINDIR":
        graph = ms.nn.GraphCell(ms.load(path))
        return _as_arrays(graph(ms.Tensor(sample)))
    if file_format == "ONNX":
        try:
            import onnxruntime
        except ImportError:
            print("onnxruntime is not installed: the ONNX file was written but not run (pip install onnxruntime)")
            return None
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: sample})
    print("AIR files run on Ascend through ACL only: not verified here")
    return None


def export(args):
    """Export, verify and move into place; returns (output path, max |diff| or None)."""
    import mindspore as ms
    from engine.config import ConfigError
    from engine.logger import StageProgress
    from engine.runtime import check_positive_arguments, check_writable_folder, setup_context
    check_positive_arguments(args, "batch_size", "image_size", "num_classes")
    if not (np.isfinite(args.atol) and np.isfinite(args.rtol)):
        raise ConfigError(f"--atol and --rtol must be finite, got {args.atol} and {args.rtol}")
    if args.output and not args.output.endswith(FORMATS[args.format]):
        raise ConfigError(f"--output for {args.format} must end with {FORMATS[args.format]}, got {args.output}")
    check_writable_folder(os.path.dirname(os.path.abspath(args.output)) if args.output else
                          os.path.dirname(os.path.abspath(args.checkpoint)) if args.checkpoint else os.getcwd(),
                          "--output")
    setup_context("graph", args.device_target)
    stages = StageProgress(print, 4, "export")
    if args.format == "AIR" and ms.get_context("device_target") != "Ascend":
        raise ExportError(f"AIR export needs an Ascend device (device_target is "
                          f"{ms.get_context('device_target')}); use --format MINDIR")
    stages.next("building the model" + (f" from {args.checkpoint}" if args.checkpoint else " (random weights)"))
    model, info = _model_and_info(args)
    model.set_train(False)
    switched = make_exportable(model, args.attention_impl)
    info["kernel_layers_switched"] = switched
    suffix = FORMATS[args.format]
    output = args.output or os.path.join(os.path.dirname(args.checkpoint) if args.checkpoint else ".",
                                         f"{info['model']}{suffix}")
    shape = (args.batch_size, info["in_chans"], info["image_size"], info["image_size"])
    sample = np.random.default_rng(args.seed).standard_normal(shape).astype(np.float32)
    stages.next(f"compiling and running the network on a {shape} sample")
    reference = _as_arrays(model(ms.Tensor(sample)))
    if not all(np.isfinite(item).all() for item in reference):
        raise ExportError(f"the network's own output on the sample holds NaN or inf: its weights are broken "
                          f"(diverged training?); nothing was exported")
    folder = os.path.dirname(os.path.abspath(output))
    os.makedirs(folder, exist_ok=True)
    temp_dir = tempfile.mkdtemp(prefix=".export-", dir=folder)
    temp_base = os.path.join(temp_dir, "model")
    try:
        stages.next(f"writing {args.format}")
        try:
            ms.export(model, ms.Tensor(sample), file_name=temp_base, file_format=args.format)
        except Exception as err:  # MindSpore raises RuntimeError/TypeError for unsupported operators
            hint = f" MindSpore cannot export some operators to ONNX ({ONNX_GAPS}); MINDIR supports all." \
                if args.format == "ONNX" else ""
            raise ExportError(f"{args.format} export of {info['model']} failed: {str(err).splitlines()[0]}.{hint}") \
                from None
        written = temp_base + suffix
        if not os.path.isfile(written):
            raise ExportError(f"MindSpore wrote no {suffix} file for {info['model']}")
        stages.next(f"reloading the {args.format} file and running it on the sample")
        exported = _run_exported(written, args.format, sample)
        max_diff = None
        if exported is not None:
            exported = _as_arrays(exported)
            shapes = [item.shape for item in exported]
            if shapes != [item.shape for item in reference]:
                raise ExportError(f"exported output shape(s) {shapes} differ from the network's "
                                  f"{[item.shape for item in reference]}")
            if not all(np.isfinite(item).all() for item in exported):
                raise ExportError(f"the exported {args.format} file outputs NaN or inf on the sample (the network "
                                  f"does not); the file was not written")
            max_diff = max(float(np.abs(got.astype(np.float64) - want).max()) if want.size else 0.0
                           for got, want in zip(exported, reference))
            scale = max(float(np.abs(item).max()) if item.size else 0.0 for item in reference)
            bound = args.atol + args.rtol * min(scale, OUTPUT_SCALE_CAP)
            print(f"max |diff| exported vs network on a {shape} sample: {max_diff:.3e} (tolerance {bound:.3e})")
            if not max_diff <= bound:
                raise ExportError(f"exported {args.format} output differs from the network by {max_diff:.3e} "
                                  f"> {bound:.3e}; the file was not written")
        os.replace(written, output)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    sidecar = dict(info, format=args.format, input_shape=list(shape), max_abs_diff=max_diff)
    with open(output + ".json.tmp", "w", encoding="utf-8") as handle:
        json.dump(sidecar, handle, indent=1)
    os.replace(output + ".json.tmp", output + ".json")
    stages.finish(f"exported {info['model']} ({args.format}, input {shape}) to {output}")
    return output, max_diff


def main(argv=None):
    from engine.checkpoint import CheckpointError
    from engine.config import ConfigError
    from engine.runtime import ModelBuildError
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        export(args)
    except (ConfigError, CheckpointError, ModelBuildError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
