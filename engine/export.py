"""Export to MINDIR / ONNX / AIR with a check of the exported file (export.py parses arguments and calls
``export``); ``make_exportable`` is shared with the benchmarks.

The file is written under a temporary name, reloaded (MINDIR: ``ms.load`` + ``nn.GraphCell``; ONNX:
onnxruntime when installed) and run on a sample batch; only a file within tolerance is moved to its place.
"""
import argparse
import json
import os
import shutil
import tempfile
from typing import Optional

import numpy as np

OUTPUT_SCALE_CAP = 100.0  # logits of a working classifier stay far below; beyond it rtol stops widening the bound
FORMATS = {"MINDIR": ".mindir", "ONNX": ".onnx", "AIR": ".air"}
# operators whose ONNX export MindSpore 2.8 lacks (seen on CPU): name them when ONNX export fails
ONNX_GAPS = "ops.unfold (Im2Col), reflection padding (MirrorPad), bilinear resize"


class ExportError(RuntimeError):
    pass



def make_exportable(model, attention_impl: str = "unfold") -> int:
    """Switch the layers of ``model`` that run a device kernel (``ops.Custom``) to ``attention_impl``, before
    the model's first run; returns how many layers were switched (printed when any). Axis permutations
    (``acmix_ms.layout.Permute``) are switched to ``ops.transpose`` too, printed but not counted."""
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
    fused = set_fused_kernels(model, False)  # GELU, LayerNorm, Dense, Softmax, MaxPool2d, BatchNorm2d on CPU
    if fused:
        print(f"{fused} layer(s) (GELU, LayerNorm, Dense, Softmax, MaxPool2d, BatchNorm2d) ran a CPU kernel: "
              "exported with standard operators (same results)")
    from acmix_ms.layout import set_permute_kernels
    permutes = set_permute_kernels(model, False)  # axis permutations (acmix_ms.layout.Permute)
    if permutes:
        print(f"{permutes} axis permutation(s) ran a CPU kernel: exported as Transpose (same results)")
    return switched + conv + fused  # layers; the permutations (plumbing) are printed, not counted


def model_and_info(args):
    """(model, sidecar info): the checkpoint's model, or a randomly initialised one."""
    from .config import ConfigError, TRAIN_OPTIONS, build_config, read_yaml
    from .runtime import build_model, check_input_size, given_run_options, model_from_checkpoint, model_kwargs
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
    from .tasks import resolve, task_options
    task = resolve(cfg)
    info.update(task=task.NAME, task_options=task_options(cfg, task))
    model.set_train(False)
    network = task.inference_network(model, cfg)  # e.g. a detector with its box decoding and NMS
    info.update(image_size=cfg.image_size, in_chans=cfg.in_chans, crop_pct=cfg.crop_pct,
                interpolation=cfg.interpolation, mean=cfg.mean, std=cfg.std, data_dir=cfg.data_dir,
                val_split=cfg.val_split)
    return network, info


def as_arrays(output):
    """A network's output (Tensor, array or a tuple of them) as a list of numpy arrays."""
    items = output if isinstance(output, (tuple, list)) else (output,)
    return [item.asnumpy() if hasattr(item, "asnumpy") else np.asarray(item) for item in items]


def run_exported(path, file_format, sample):
    """Output of the exported file on ``sample``; None when it cannot be run here (with the reason printed)."""
    import mindspore as ms
    if file_format == "MINDIR":
        graph = ms.nn.GraphCell(ms.load(path))
        return as_arrays(graph(ms.Tensor(sample)))
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


def export(args: argparse.Namespace) -> tuple[str, Optional[float]]:
    """Export, verify and move into place; returns (output path, max |diff| or None)."""
    import mindspore as ms
    from .config import ConfigError
    from .logger import StageProgress
    from .runtime import check_positive_arguments, check_writable_folder, setup_context
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
    model, info = model_and_info(args)
    model.set_train(False)
    switched = make_exportable(model, args.attention_impl)
    info["kernel_layers_switched"] = switched
    suffix = FORMATS[args.format]
    output = args.output or os.path.join(os.path.dirname(args.checkpoint) if args.checkpoint else ".",
                                         f"{info['model']}{suffix}")
    shape = (args.batch_size, info["in_chans"], info["image_size"], info["image_size"])
    sample = np.random.default_rng(args.seed).standard_normal(shape).astype(np.float32)
    stages.next(f"compiling and running the network on a {shape} sample")
    reference = as_arrays(model(ms.Tensor(sample)))
    if not all(np.isfinite(item).all() for item in reference):
        raise ExportError("the network's own output on the sample holds NaN or inf: its weights are broken "
                          "(diverged training?); nothing was exported")
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
        exported = run_exported(written, args.format, sample)
        max_diff = None
        if exported is not None:
            exported = as_arrays(exported)
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
