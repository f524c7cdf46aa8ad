"""Fashion-MNIST files: reading the IDX (or ``.npy``) arrays, and writing a per-class subset as an ImageFolder
tree of PNG files (``prepare``) or as IDX files (``prepare_idx``); ``tools/prepare_fashion_mnist.py`` is the
command line, the scenes generator and the demo use the functions.

The source files are those of Debian's ``dataset-fashion-mnist`` package (``DEFAULT_SOURCE``). Both writers are
idempotent: a manifest records the options; a second call with the same options does nothing, with other
options it rewrites what it made. Folders it did not make are never touched.
"""
import argparse
import json
import os
import shutil

import numpy as np

from .idx_data import FASHION_MNIST_CLASSES, IdxError, read_idx, write_idx

DEFAULT_SOURCE = "/usr/share/datasets/fashion-mnist"
FILES = {"train_images": "train-images-idx3-ubyte.gz", "train_labels": "train-labels-idx1-ubyte.gz",
         "val_images": "t10k-images-idx3-ubyte.gz", "val_labels": "t10k-labels-idx1-ubyte.gz"}
# label index -> folder name (the dataset's class names, made file-system safe)
CLASS_NAMES = FASHION_MNIST_CLASSES
MANIFEST = ".fashion_mnist.json"
FORMAT_VERSION = 1


class PrepareError(RuntimeError):
    pass


def read_array(path):
    """uint8 array from an IDX file (optionally gzipped) or a ``.npy`` file."""
    if not os.path.isfile(path):
        raise PrepareError(f"file not found: {path}")
    if path.endswith(".npy"):
        return np.load(path)
    try:
        return read_idx(path)
    except IdxError as err:
        raise PrepareError(str(err)) from None


def load_split(images_path, labels_path):
    images, labels = read_array(images_path), read_array(labels_path).reshape(-1)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise PrepareError(f"{images_path}: expected uint8 images (N, H, W), got {images.dtype} {images.shape}")
    if len(images) != len(labels):
        raise PrepareError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    if labels.min() < 0 or labels.max() >= len(CLASS_NAMES):
        raise PrepareError(f"{labels_path}: labels must be in 0..{len(CLASS_NAMES) - 1}")
    return images, labels.astype(np.int64)


def select_per_class(labels, per_class):
    """Indices of the first ``per_class`` samples of each class (all when None), in file order."""
    if per_class is None:
        return np.arange(len(labels))
    chosen = [np.flatnonzero(labels == label)[:per_class] for label in range(len(CLASS_NAMES))]
    return np.sort(np.concatenate(chosen))


def write_split(root, split, images, labels, indices):
    """Write one split into a temporary folder, then move it into place."""
    from PIL import Image
    final = os.path.join(root, split)
    temp = os.path.join(root, f".tmp-{split}")
    shutil.rmtree(temp, ignore_errors=True)
    for name in CLASS_NAMES:
        os.makedirs(os.path.join(temp, name))
    for index in indices:
        Image.fromarray(images[index], mode="L").save(
            os.path.join(temp, CLASS_NAMES[labels[index]], f"{index:05d}.png"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(temp, final)


def resolve_paths(args):
    paths = {}
    for key, filename in FILES.items():
        given = getattr(args, key)
        paths[key] = given if given else os.path.join(args.source, filename)
    missing = [path for path in paths.values() if not os.path.isfile(path)]
    if missing:
        raise PrepareError(
            "Fashion-MNIST files not found: " + ", ".join(missing)
            + f"\nInstall Debian's package (it puts them in {DEFAULT_SOURCE}):  apt-get install dataset-fashion-mnist"
            "\nor pass --source DIR, or --train-images/--train-labels/--val-images/--val-labels (IDX or .npy).")
    return paths


def _request(source, train_per_class, val_per_class, paths):
    """(resolved source paths, the manifest this request asks for); bad subset sizes raise PrepareError."""
    args = argparse.Namespace(source=source, **{key: (paths or {}).get(key) for key in FILES})
    paths = resolve_paths(args)
    for name, value in (("train_per_class", train_per_class), ("val_per_class", val_per_class)):
        if value is not None and value < 1:
            raise PrepareError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    wanted = {"version": FORMAT_VERSION, "train_per_class": train_per_class, "val_per_class": val_per_class,
              "sources": {key: os.path.abspath(path) for key, path in paths.items()}}
    return paths, wanted


def _subsets(paths, train_per_class, val_per_class):
    """(split, images, labels, indices of the first N per class) of the train and val source files."""
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        images, labels = load_split(paths[f"{split}_images"], paths[f"{split}_labels"])
        yield split, images, labels, select_per_class(labels, per_class)


def _write_manifest(manifest_path, wanted, counts):
    """Record what was written (atomically: a crash leaves no manifest, so the next call rewrites)."""
    manifest = dict(wanted, counts=counts, classes=list(CLASS_NAMES))
    temp = manifest_path + ".tmp"
    with open(temp, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=1)
    os.replace(temp, manifest_path)
    return manifest


def prepare(out, source=DEFAULT_SOURCE, train_per_class=None, val_per_class=None, paths=None, log=print):
    """Create (or keep) ``out/train`` and ``out/val``; returns the manifest dict."""
    paths, wanted = _request(source, train_per_class, val_per_class, paths)
    manifest_path = os.path.join(out, MANIFEST)
    old = None
    if os.path.isfile(manifest_path):
        with open(manifest_path, encoding="utf-8") as handle:
            old = json.load(handle)
    if old is None:
        foreign = [split for split in ("train", "val") if os.path.exists(os.path.join(out, split))]
        if foreign:
            raise PrepareError(f"{out} already has {', '.join(foreign)}/ not written by this tool; "
                               f"choose another --out or remove them")
    elif {key: old.get(key) for key in wanted} == wanted and all(
            os.path.isdir(os.path.join(out, split)) for split in ("train", "val")):
        log(f"{out} is already prepared ({old['counts']['train']} train / {old['counts']['val']} val images)")
        return old
    os.makedirs(out, exist_ok=True)
    counts = {}
    for split, images, labels, indices in _subsets(paths, train_per_class, val_per_class):
        write_split(out, split, images, labels, indices)
        counts[split] = int(len(indices))
        log(f"wrote {len(indices)} images to {os.path.join(out, split)}")
    return _write_manifest(manifest_path, wanted, counts)


IDX_MANIFEST = ".fashion_mnist_idx.json"
IDX_NAMES = FILES  # a prepared IDX folder keeps the source's file names


def prepare_idx(out, source=DEFAULT_SOURCE, train_per_class=None, val_per_class=None, paths=None, log=print):
    """Write the first N images of each class (file order) as IDX files in ``out`` (the engine reads such a
    folder directly, engine/idx_data.py). Idempotent like ``prepare``; refuses a folder holding IDX files it
    did not write. Returns the manifest dict."""
    paths, wanted = _request(source, train_per_class, val_per_class, paths)
    manifest_path = os.path.join(out, IDX_MANIFEST)
    targets = {key: os.path.join(out, name) for key, name in IDX_NAMES.items()}
    if os.path.isfile(manifest_path):
        with open(manifest_path, encoding="utf-8") as handle:
            old = json.load(handle)
        if {key: old.get(key) for key in wanted} == wanted and all(map(os.path.isfile, targets.values())):
            log(f"{out} is already prepared ({old['counts']['train']} train / {old['counts']['val']} val images)")
            return old
    elif any(map(os.path.exists, targets.values())):
        raise PrepareError(f"{out} already holds IDX files not written by this tool; choose another --out "
                           f"(or use that folder directly as --data_dir)")
    os.makedirs(out, exist_ok=True)
    counts = {}
    for split, images, labels, indices in _subsets(paths, train_per_class, val_per_class):
        write_idx(targets[f"{split}_images"], images[indices])
        write_idx(targets[f"{split}_labels"], labels[indices].astype(np.uint8))
        counts[split] = int(len(indices))
        log(f"wrote {len(indices)} {split} images to {targets[f'{split}_images']}")
    return _write_manifest(manifest_path, wanted, counts)
