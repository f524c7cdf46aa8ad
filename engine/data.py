"""ImageFolder data pipelines on ``mindspore.dataset``.

Layout: ``<data_dir>/<split>/<class name>/<image file>``. Labels are the indices of the class folder names
sorted alphabetically, identical for every split (a split whose class folders differ is rejected).

* ``scan_split`` lists a split and (optionally) decodes every image, so a missing or empty folder,
  a class mismatch or an unreadable or truncated file is reported before any graph is compiled.
* ``train_dataset``: decode -> RandomResizedCrop -> flip -> RandAugment (opt.) -> normalise -> CHW ->
  RandomErasing (opt.) -> batch -> MixUp/CutMix (opt., soft labels). Shards by rank for data parallel.
* ``eval_dataset``: decode -> resize to image_size / crop_pct -> center crop -> normalise -> CHW.

Images are decoded to 3 channels (grey files are expanded); ``in_chans=1`` feeds the luminance only.
Batches: images (B, C, image_size, image_size) float32; labels (B,) int32, or (B, num_classes) float32
when mixup/cutmix is on.
"""
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
_INTERPOLATIONS = ("bilinear", "bicubic", "nearest")

logger = logging.getLogger("engine.data")


class DataError(ValueError):
    """The dataset on disk cannot be used as configured."""


@dataclass
class SplitIndex:
    """What ``scan_split`` found in one split folder."""
    root: str
    classes: list
    samples: list  # [(path, label)] of readable images
    bad_files: list = field(default_factory=list)  # [(path, reason)]
    extensions: list = field(default_factory=list)  # file suffixes as spelled on disk

    @property
    def class_indexing(self):
        return {name: index for index, name in enumerate(self.classes)}

    def __len__(self):
        return len(self.samples)


def _image_problem(path):
    """None if the whole image decodes, else the reason.

    ``verify()`` checks headers (and PNG checksums) only: a JPEG cut short late in the file passes it, then
    stops the training pipeline mid-epoch. So every file is also decoded to its end; JPEGs in PIL's draft
    mode (1/8 scale: the whole entropy-coded stream is read, the costly full-size inverse DCT skipped).
    """
    from PIL import Image
    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            if image.format == "JPEG":
                image.draft(image.mode, (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
        return None
    except Exception as err:  # PIL raises many types for broken files; all mean "unreadable"
        return f"{type(err).__name__}: {err}"


def scan_split(data_dir, split, verify_images=True, bad_images="fail", num_threads=8):
    """List ``data_dir/split`` and check it can be trained on.

    Args:
        verify_images: check and decode every image (PIL) to find unreadable or truncated files.
        bad_images: 'fail' raises DataError listing the unreadable files; 'skip' drops them with a
            counted warning.
    Returns:
        SplitIndex.
    """
    if bad_images not in ("fail", "skip"):
        raise ValueError(f"bad_images={bad_images!r} is not supported; allowed values: 'fail', 'skip'")
    if data_dir is None:
        raise DataError("option 'data_dir' is not set: give the ImageFolder root (holding train/ and val/)")
    from . import idx_data
    if idx_data.holds_idx(data_dir):  # IDX files (MNIST format): decoded into memory, see engine/idx_data.py
        split_data = idx_data.load_split(data_dir, split)
        if split_data is None:
            raise DataError(f"no IDX files for split {split!r} in {data_dir} (expected "
                            f"{idx_data.SPLIT_PREFIXES.get(split, '<train|t10k>')}-images-idx3-ubyte[.gz] and labels)")
        return split_data
    root = os.path.join(data_dir, split)
    if not os.path.isdir(root):
        raise DataError(f"dataset folder not found: {root} (expected {data_dir}/{split}/<class>/<image>; "
                        f"for the demo data run: python tools/prepare_fashion_mnist.py --out {data_dir})")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise DataError(f"dataset folder {root} has no class sub-folders (expected {root}/<class>/<image>)")
    samples, empty, suffixes = [], [], set()
    for label, name in enumerate(classes):
        folder = os.path.join(root, name)
        files = sorted(entry.path for entry in os.scandir(folder)
                       if entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS)
        if not files:
            empty.append(name)
        suffixes.update(os.path.splitext(path)[1] for path in files)
        samples.extend((path, label) for path in files)
    if not samples:
        raise DataError(f"dataset folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    if empty:
        raise DataError(f"class folders without images in {root}: {', '.join(empty)}")
    bad = []
    if verify_images:
        start = time.time()
        with ThreadPoolExecutor(max_workers=num_threads) as pool:
            problems = list(pool.map(_image_problem, [path for path, _ in samples]))
        bad = [(path, reason) for (path, _), reason in zip(samples, problems) if reason is not None]
        logger.info("checked %d images in %s in %.1f s", len(samples), root, time.time() - start)
    if bad:
        listing = "\n".join(f"  {path}: {reason}" for path, reason in bad[:20])
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        if bad_images == "fail":
            raise DataError(f"{len(bad)} unreadable image(s) in {root} (use --bad_images skip to train "
                            f"without them):\n{listing}{more}")
        logger.warning("skipping %d unreadable image(s) of %d in %s:\n%s%s", len(bad), len(samples), root,
                       listing, more)
        bad_paths = {path for path, _ in bad}
        samples = [sample for sample in samples if sample[0] not in bad_paths]
    return SplitIndex(root, classes, samples, bad, sorted(suffixes))


def check_same_classes(train_index, val_index):
    """Raise DataError when train and val class folders differ (labels would not line up)."""
    if train_index.classes != val_index.classes:
        only_train = sorted(set(train_index.classes) - set(val_index.classes))
        only_val = sorted(set(val_index.classes) - set(train_index.classes))
        raise DataError(f"class folders differ between {train_index.root} and {val_index.root}: "
                        f"only in train: {only_train or 'none'}; only in val: {only_val or 'none'}")


class _FileListSource:
    """Random-access source of (encoded bytes, label) over an explicit file list (used when skipping files)."""

    def __init__(self, samples):
        self.samples = list(samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        return np.fromfile(path, dtype=np.uint8), np.array(label, dtype=np.int32)

    def __len__(self):
        return len(self.samples)


def _source(index, shuffle, num_shards, shard_id, num_workers):
    """ImageFolderDataset over the split (the normal case), or a file list when bad files were skipped."""
    import mindspore.dataset as ds
    shard = {"num_shards": num_shards, "shard_id": shard_id} if num_shards and num_shards > 1 else {}
    if index.bad_files:
        return ds.GeneratorDataset(_FileListSource(index.samples), column_names=["image", "label"],
                                   shuffle=shuffle, num_parallel_workers=1, **shard)
    return ds.ImageFolderDataset(index.root, shuffle=shuffle, extensions=index.extensions,
                                 class_indexing=index.class_indexing,
                                 num_parallel_workers=worker_count(num_workers),
                                 decode=False, **shard)


def worker_count(requested):
    """``requested`` parallel workers, capped at the CPU count (MindSpore rejects more)."""
    return max(1, min(int(requested), os.cpu_count() or 1))


def _interpolation(name):
    from mindspore.dataset import vision
    if name not in _INTERPOLATIONS:
        raise ValueError(f"interpolation={name!r} is not supported; allowed values: {_INTERPOLATIONS}")
    return {"bilinear": vision.Inter.BILINEAR, "bicubic": vision.Inter.BICUBIC,
            "nearest": vision.Inter.NEAREST}[name]


def _channel_ops(cfg):
    """Normalisation and layout ops shared by train and eval: (H, W, 3) uint8 -> (C, H, W) float32."""
    from mindspore.dataset import vision, transforms
    mean = [255.0 * value for value in cfg.mean]
    std = [255.0 * value for value in cfg.std]
    ops = []
    if cfg.in_chans == 1:
        # luminance, kept as 3 equal channels through normalisation; sliced to 1 channel at the end
        ops += [vision.ConvertColor(vision.ConvertMode.COLOR_RGB2GRAY),
                vision.ConvertColor(vision.ConvertMode.COLOR_GRAY2RGB)]
    if len(mean) == 1:
        mean, std = mean * 3, std * 3
    ops += [vision.Normalize(mean=mean, std=std), vision.HWC2CHW()]
    if cfg.in_chans == 1:
        ops.append(transforms.Slice(slice(0, 1)))
    return ops


def train_transforms(cfg):
    """Per-image training ops up to normalisation and CHW layout (random erasing and mixing come after)."""
    from mindspore.dataset import vision
    ops = [vision.Decode(),
           vision.RandomResizedCrop(cfg.image_size, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio),
                                    interpolation=_interpolation(cfg.interpolation))]
    if cfg.hflip > 0:
        ops.append(vision.RandomHorizontalFlip(cfg.hflip))
    if cfg.randaugment_ops > 0:
        ops.append(vision.RandAugment(num_ops=cfg.randaugment_ops, magnitude=cfg.randaugment_magnitude))
    return ops + _channel_ops(cfg)


def eval_transforms(cfg):
    """Per-image evaluation ops: resize the shorter side to image_size / crop_pct, then center crop."""
    from mindspore.dataset import vision
    resize = int(round(cfg.image_size / cfg.crop_pct))
    return [vision.Decode(), vision.Resize(resize, interpolation=_interpolation(cfg.interpolation)),
            vision.CenterCrop(cfg.image_size)] + _channel_ops(cfg)


def _batch_mixing(cfg):
    """The batch op mixing images and one-hot labels, or None."""
    from mindspore.dataset import vision, transforms
    choices = []
    if cfg.mixup > 0:
        choices.append(vision.MixUpBatch(alpha=cfg.mixup))
    if cfg.cutmix > 0:
        choices.append(vision.CutMixBatch(vision.ImageBatchFormat.NCHW, alpha=cfg.cutmix))
    if not choices:
        return None
    mixing = choices[0] if len(choices) == 1 else transforms.RandomChoice(choices)
    if cfg.mixup_prob < 1.0:
        mixing = transforms.RandomApply([mixing], prob=cfg.mixup_prob)
    return mixing


def uses_soft_labels(cfg):
    return cfg.mixup > 0 or cfg.cutmix > 0


def train_dataset(cfg, index, num_classes, seed, num_shards=1, shard_id=0):
    """Shuffled, augmented, batched training data for one epoch (drop_remainder=True).

    ``seed`` fixes the order and the augmentation draws, so a resumed run sees the same batches as an
    uninterrupted one (callers pass ``cfg.seed + epoch``).
    """
    if getattr(index, "in_memory", False):
        from .idx_data import train_dataset as idx_train_dataset
        return idx_train_dataset(cfg, index, num_classes, seed, num_shards, shard_id)
    import mindspore.dataset as ds
    from mindspore.dataset import transforms, vision
    ds.config.set_seed(seed)
    dataset = _source(index, True, num_shards, shard_id, cfg.num_workers)
    workers = worker_count(cfg.num_workers)
    dataset = dataset.map(train_transforms(cfg), input_columns="image", num_parallel_workers=workers)
    if cfg.random_erasing > 0:
        # a Python op drawing from a shared RNG: one worker keeps the draws reproducible (exact resume)
        dataset = dataset.map(vision.RandomErasing(prob=cfg.random_erasing), input_columns="image",
                              num_parallel_workers=1)
    mixing = _batch_mixing(cfg)
    if mixing is not None:
        dataset = dataset.map([transforms.OneHot(num_classes), transforms.TypeCast(np.float32)],
                              input_columns="label")
    else:
        dataset = dataset.map(transforms.TypeCast(np.int32), input_columns="label")
    dataset = dataset.batch(cfg.batch_size, drop_remainder=True)
    if mixing is not None:
        dataset = dataset.map(mixing, input_columns=["image", "label"])
    return dataset


def eval_dataset(cfg, index, batch_size=None):
    """Validation data in file order, all images (the last batch may be smaller)."""
    if getattr(index, "in_memory", False):
        from .idx_data import eval_dataset as idx_eval_dataset
        return idx_eval_dataset(cfg, index, batch_size)
    from mindspore.dataset import transforms
    dataset = _source(index, False, 1, 0, cfg.num_workers)
    dataset = dataset.map(eval_transforms(cfg), input_columns="image",
                          num_parallel_workers=worker_count(cfg.num_workers))
    dataset = dataset.map(transforms.TypeCast(np.int32), input_columns="label")
    return dataset.batch(batch_size or cfg.eval_batch_size or cfg.batch_size, drop_remainder=False)


def steps_per_epoch(num_samples, batch_size, num_shards=1):
    """Training batches per epoch and device: a shard holds ceil(N / shards) samples, remainder dropped."""
    per_shard = -(-num_samples // num_shards)
    steps = per_shard // batch_size
    if steps < 1:
        raise DataError(f"{per_shard} training images per device are fewer than batch_size={batch_size}: "
                        f"lower --batch_size or add images")
    return steps
