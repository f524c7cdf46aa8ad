"""In-memory data from IDX files (MNIST / Fashion-MNIST format): decoded once, augmented by MindSpore C++ ops.

A ``data_dir`` holding ``train-images-idx3-ubyte[.gz]`` + ``train-labels-idx1-ubyte[.gz]`` and
``t10k-images-idx3-ubyte[.gz]`` + ``t10k-labels-idx1-ubyte[.gz]`` (e.g. Debian's dataset-fashion-mnist,
/usr/share/datasets/fashion-mnist) is used directly by the engine: no ImageFolder tree of 70,000 PNG files,
no per-image file reads or PNG decoding. ``engine.data.scan_split`` returns an ``IdxSplit`` for such a folder
(split ``train`` -> ``train-*``; ``val``, ``test`` or ``t10k`` -> ``t10k-*``), and ``engine.data.train_dataset``
/ ``eval_dataset`` hand it to this module.

Class names: one per line in ``<data_dir>/classes.txt`` when present (write one for MNIST digits); else,
with labels 0..9 at most, the 10 Fashion-MNIST names (``FASHION_MNIST_CLASSES``, in label order); else
``"0" .. "K-1"``. Labels are the files' labels (not re-sorted by name as ImageFolder would).

Pipelines (images (N, H, W) uint8 grey in memory):
* train: a seeded permutation (``seed`` = cfg.seed + epoch, as the ImageFolder path), sharded by rank ->
  RandomResizedCrop(image_size, scale, ratio) -> flip (hflip) -> RandAugment (opt.) -> normalise -> CHW
  (1 channel, repeated to 3 when ``in_chans`` is 3) -> batch (drop_remainder) -> MixUp/CutMix (opt.).
* eval: file order -> resize to image_size / crop_pct + center crop (skipped when the images already have
  that size) -> normalise -> CHW -> batch.
Batches: images (B, in_chans, image_size, image_size) float32; labels (B,) int32, or (B, K) float32 with
mixup/cutmix. Random erasing is not available here (a clear error says so).
"""
import gzip
import os
from dataclasses import dataclass, field

import numpy as np

from .data import DataError

SPLIT_PREFIXES = {"train": "train", "val": "t10k", "test": "t10k", "t10k": "t10k"}
FASHION_MNIST_CLASSES = ("t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                         "bag", "ankle_boot")
CLASSES_FILE = "classes.txt"


class IdxError(DataError):
    """An IDX file cannot be read (missing, bad magic number, size not matching its header)."""


def read_idx(path):
    """The uint8 array stored in an IDX file (``.gz`` read through gzip): shape from its header."""
    if not os.path.isfile(path):
        raise IdxError(f"file not found: {path}")
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as err:
        raise IdxError(f"cannot read {path}: {err}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise IdxError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IdxError(f"{path}: file ends inside its header")
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if len(data) - header != int(np.prod(shape)):
        raise IdxError(f"{path}: header says shape {shape} but the file holds {len(data) - header} values")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def write_idx(path, array):
    """Write a uint8 array as an IDX file (gzipped when ``path`` ends with .gz) via a temporary file + rename."""
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8 or not 1 <= array.ndim <= 255:
        raise IdxError(f"IDX files here hold uint8 arrays, got {array.dtype} with {array.ndim} dimensions")
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    temp = f"{path}.{os.getpid()}.tmp"
    opener = gzip.open if path.endswith(".gz") else open
    with opener(temp, "wb") as handle:
        handle.write(header + array.tobytes())
    os.replace(temp, path)
    return path


def idx_files(data_dir, split):
    """(images path, labels path) of ``split`` in ``data_dir``, or None when the folder holds no such IDX pair."""
    prefix = SPLIT_PREFIXES.get(split)
    if prefix is None or data_dir is None or not os.path.isdir(data_dir):
        return None
    found = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        names = [f"{prefix}-{kind}{suffix}" for suffix in (".gz", "")]
        paths = [os.path.join(data_dir, name) for name in names if os.path.isfile(os.path.join(data_dir, name))]
        if not paths:
            return None
        found.append(paths[0])
    return tuple(found)


def holds_idx(data_dir):
    """True when ``data_dir`` is an IDX folder (has the training pair and no ImageFolder ``train/``)."""
    return (data_dir is not None and idx_files(data_dir, "train") is not None
            and not os.path.isdir(os.path.join(data_dir, "train")))


@dataclass
class IdxSplit:
    """One split decoded into memory; duck-types ``engine.data.SplitIndex`` (root, classes, len)."""
    root: str
    classes: list
    images: np.ndarray  # (N, H, W) uint8
    labels: np.ndarray  # (N,) int32
    samples: list = field(default_factory=list)  # no files: nothing for an image check to read
    bad_files: list = field(default_factory=list)
    extensions: list = field(default_factory=list)
    in_memory = True

    def __len__(self):
        return len(self.labels)


def class_names(data_dir, num_classes):
    path = os.path.join(data_dir, CLASSES_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            names = [line.strip() for line in handle if line.strip()]
        if len(names) < num_classes:
            raise IdxError(f"{path} names {len(names)} classes but the labels go up to {num_classes - 1}")
        return names
    if num_classes <= len(FASHION_MNIST_CLASSES):
        return list(FASHION_MNIST_CLASSES)
    return [str(label) for label in range(num_classes)]


def load_split(data_dir, split):
    """The ``split`` of the IDX folder ``data_dir`` as an IdxSplit, or None when it holds no such files."""
    paths = idx_files(data_dir, split)
    if paths is None:
        return None
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3:
        raise IdxError(f"{paths[0]}: expected images (N, H, W), got shape {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise IdxError(f"{paths[0]} holds {len(images)} images but {paths[1]} holds labels of shape {labels.shape}")
    if not len(labels):
        raise IdxError(f"{paths[0]} holds no images")
    classes = class_names(data_dir, int(labels.max()) + 1)
    return IdxSplit(root=os.path.join(data_dir, os.path.basename(paths[0])), classes=classes, images=images,
                    labels=labels.astype(np.int32))


def _check_cfg(cfg):
    if cfg.in_chans not in (1, 3):
        raise IdxError(f"grey IDX images feed in_chans 1 or 3, got in_chans={cfg.in_chans}")
    if len(set(cfg.mean)) != 1 or len(set(cfg.std)) != 1:
        raise IdxError(f"grey IDX images need one mean and std for all channels, got mean {cfg.mean} std {cfg.std}")


def _expand_ops(cfg):
    """(H, W, 1) -> (H, W, 3) when the network takes 3 channels (a grey PNG decoded as RGB gives the same)."""
    from mindspore.dataset import vision
    return [vision.ConvertColor(vision.ConvertMode.COLOR_GRAY2RGB)] if cfg.in_chans == 3 else []


def _normalise_ops(cfg):
    """(H, W, C) uint8 -> (C, H, W) float32, (x / 255 - mean) / std in one op."""
    from mindspore.dataset import vision
    return [vision.Rescale(1.0 / (255.0 * cfg.std[0]), -cfg.mean[0] / cfg.std[0]), vision.HWC2CHW()]


def train_transforms(cfg):
    """Per-image training ops on (H, W, 1) uint8 up to normalisation and CHW layout."""
    from mindspore.dataset import vision
    from .data import _interpolation
    ops = _expand_ops(cfg) + [vision.RandomResizedCrop(cfg.image_size, scale=tuple(cfg.scale),
                                                       ratio=tuple(cfg.ratio),
                                                       interpolation=_interpolation(cfg.interpolation))]
    if cfg.hflip > 0:
        ops.append(vision.RandomHorizontalFlip(cfg.hflip))
    if cfg.randaugment_ops > 0:
        ops.append(vision.RandAugment(num_ops=cfg.randaugment_ops, magnitude=cfg.randaugment_magnitude))
    return ops + _normalise_ops(cfg)


def eval_transforms(cfg, height, width):
    """Per-image evaluation ops: resize to image_size / crop_pct and center crop, unless already that size."""
    from mindspore.dataset import vision
    from .data import _interpolation
    ops = _expand_ops(cfg)
    resize = int(round(cfg.image_size / cfg.crop_pct))
    if not (height == width == cfg.image_size and resize == cfg.image_size):
        ops += [vision.Resize(resize, interpolation=_interpolation(cfg.interpolation)),
                vision.CenterCrop(cfg.image_size)]
    return ops + _normalise_ops(cfg)


def shard_order(num_samples, seed, num_shards=1, shard_id=0):
    """This shard's sample positions for one epoch: a permutation drawn from ``seed`` (the same on every
    rank), padded by wrapping to a multiple of ``num_shards``, every ``num_shards``-th from ``shard_id``."""
    order = np.random.default_rng(seed).permutation(num_samples)
    per_shard = -(-num_samples // num_shards)
    order = np.concatenate([order, order[:per_shard * num_shards - num_samples]])
    return order[shard_id::num_shards]


class _ArraySource:
    """Random-access (image (H, W, 1) uint8, label int32) rows of ``index`` at ``positions`` (no copy of the
    split is made per epoch)."""

    def __init__(self, index, positions):
        self.images, self.labels, self.positions = index.images, index.labels, positions

    def __getitem__(self, item):
        position = self.positions[item]
        return self.images[position][..., None], self.labels[position]

    def __len__(self):
        return len(self.positions)


def _source(index, positions):
    import mindspore.dataset as ds
    return ds.GeneratorDataset(_ArraySource(index, positions), column_names=["image", "label"], shuffle=False)


def train_dataset(cfg, index, num_classes, seed, num_shards=1, shard_id=0):
    """Shuffled, augmented, batched training data of an IdxSplit for one epoch (see the module docstring)."""
    import mindspore.dataset as ds
    from mindspore.dataset import transforms
    from .data import _batch_mixing, worker_count
    _check_cfg(cfg)
    if cfg.random_erasing > 0:
        raise IdxError("option 'random_erasing' is not available with IDX data (data_dir holds IDX files); "
                       "set it to 0 or convert the data to an ImageFolder (tools/prepare_fashion_mnist.py)")
    ds.config.set_seed(seed)
    dataset = _source(index, shard_order(len(index), seed, num_shards, shard_id))
    dataset = dataset.map(train_transforms(cfg), input_columns="image",
                          num_parallel_workers=worker_count(cfg.num_workers))
    mixing = _batch_mixing(cfg)
    if mixing is not None:
        dataset = dataset.map([transforms.OneHot(num_classes), transforms.TypeCast(np.float32)],
                              input_columns="label")
    dataset = dataset.batch(cfg.batch_size, drop_remainder=True)
    if mixing is not None:
        dataset = dataset.map(mixing, input_columns=["image", "label"])
    return dataset


def eval_dataset(cfg, index, batch_size=None, num_shards=1, shard_id=0):
    """Evaluation data of an IdxSplit in file order (every ``num_shards``-th image from ``shard_id``)."""
    from .data import DataError, worker_count
    _check_cfg(cfg)
    positions = np.arange(shard_id, len(index), num_shards)
    if not len(positions):
        raise DataError(f"validation split {index.root} has {len(index)} image(s), fewer than the "
                        f"{num_shards} ranks sharing it")
    dataset = _source(index, positions)
    dataset = dataset.map(eval_transforms(cfg, *index.images.shape[1:]), input_columns="image",
                          num_parallel_workers=worker_count(cfg.num_workers))
    return dataset.batch(batch_size or cfg.eval_batch_size or cfg.batch_size, drop_remainder=False)
