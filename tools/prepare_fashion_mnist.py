"""Convert Fashion-MNIST (IDX or NumPy arrays) into an ImageFolder tree of PNG files.

    python tools/prepare_fashion_mnist.py --out data/fashion_mnist --train-per-class 500 --val-per-class 100

Reads ``train-images-idx3-ubyte.gz`` etc. from ``--source`` (default: where Debian's
``dataset-fashion-mnist`` package installs them, /usr/share/datasets/fashion-mnist), or explicit
``--train-images/--train-labels/--val-images/--val-labels`` paths (IDX, gzipped IDX or ``.npy``). Writes
``<out>/train/<class>/<index>.png`` (from the 60k training set) and ``<out>/val/<class>/<index>.png``
(from the 10k test set) with the dataset's class names, taking the first N images of each class in file order.
``--format idx`` writes the same subset as the four IDX files into ``<out>`` instead (the engine reads an IDX
folder directly into memory, engine/idx_data.py; the full data set needs no preparation: use the source
folder itself as ``--data_dir``).

    python tools/prepare_fashion_mnist.py --out data/fashion_mnist_idx --format idx --train-per-class 60 \
        --val-per-class 20

Idempotent: a manifest records the options; a second run with the same options does nothing, with other
options it rewrites the splits it made. Folders it did not make are never touched.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# the work lives in engine/fashion_mnist.py; its names are also this script's (tests, older callers)
from engine.fashion_mnist import (CLASS_NAMES, DEFAULT_SOURCE, FILES, PrepareError, load_split,  # noqa: E402,F401
                                  prepare, prepare_idx, read_array, resolve_paths)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output root (gets train/ and val/)")
    parser.add_argument("--source", default=DEFAULT_SOURCE, help="folder with the four IDX .gz files")
    parser.add_argument("--train-per-class", type=int, default=None, help="first N training images per class")
    parser.add_argument("--val-per-class", type=int, default=None, help="first N validation images per class")
    for key in FILES:
        parser.add_argument(f"--{key.replace('_', '-')}", dest=key, default=None,
                            help=f"explicit path instead of <source>/{FILES[key]} (IDX, .gz or .npy)")
    parser.add_argument("--format", default="imagefolder", choices=("imagefolder", "idx"),
                        help="imagefolder: <out>/<split>/<class>/<index>.png; idx: the four IDX files in <out> "
                             "(read into memory by the engine)")
    args = parser.parse_args(argv)
    try:
        write = prepare if args.format == "imagefolder" else prepare_idx
        write(args.out, args.source, args.train_per_class, args.val_per_class,
              {key: getattr(args, key) for key in FILES})
    except PrepareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
