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
import sys

from acmix_ms.constants import PORTABLE_IMPLS  # plain Python: --help stays fast
# the work lives in engine/export.py; these names are also this script's public ones (tests, tools/demo.py)
from engine.export import FORMATS, ExportError, export, make_exportable  # noqa: F401


def parse_args(argv):
    from engine.config import DEVICE_TARGETS
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
    parser.add_argument("--device_target", choices=DEVICE_TARGETS, default=None)
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample batch")
    add_run_option_arguments(parser, "input height and width (default: the run's image_size, or 224)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from engine.checkpoint import CheckpointError  # after parsing: --help stays fast (it loads the models)
    from engine.config import ConfigError
    from engine.runtime import ModelBuildError
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
