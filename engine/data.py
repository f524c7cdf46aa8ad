"""ImageFolder data pipelines on ``mindspore.dataset``.

Layout: ``<data_dir>/<split>/<class name>/<image file>``. Labels are the indices of the class folder names
sorted alphabetically, identical for every split (a split whose class folders differ is rejected).

* ``scan_split`` lists a split and (optionally) fully decodes every image once (the result is cached), so a
  missing or empty folder, a class mismatch or an unreadable or truncated file is reported before any graph
  is compiled.
* ``train_dataset``: fused decode + RandomResizedCrop (RandomCropDecodeResize) -> flip -> RandAugment (opt.)
  -> normalise -> CHW -> batch -> MixUp/CutMix (opt., soft labels). Shards by rank. With random erasing a
  third column "erase" (B, 41) carries uniform draws for ``engine.step.BatchRandomErasing`` (on the device).
* ``eval_dataset``: decode -> resize to image_size / crop_pct -> center crop -> normalise -> CHW.

Images are decoded to 3 channels (grey files are expanded); ``in_chans=1`` feeds the luminance only.
Batches: images (B, C, image_size, image_size) float32; labels (B,) int32, or (B, num_classes) float32
when mixup/cutmix is on.
"""
import contextlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
ERASE_ATTEMPTS = 10  # = engine.step.ERASE_ATTEMPTS (not imported: no MindSpore graph code in the data module)
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
    stops the training pipeline mid-epoch. So every file is also fully decoded.
    """
    from PIL import Image
    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            image.load()
        return None
    except Exception as err:  # PIL raises many types for broken files; all mean "unreadable"
        return f"{type(err).__name__}: {err}"


CACHE_ENV = "ACMIX_CACHE_DIR"


def image_check_cache_dir():
    """Where image-check results are kept: ``$ACMIX_CACHE_DIR/image_check`` (default ~/.cache/acmix_ms)."""
    base = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "acmix_ms")
    return os.path.join(base, "image_check")


def _fingerprint(index):
    """Hash of the split's files (absolute path, size, modification time): a changed file changes it."""
    import hashlib
    digest = hashlib.sha256()
    for path, _ in index.samples:
        stat = os.stat(path)
        digest.update(f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def find_bad_images(index, num_threads=None, use_cache=True):
    """[(path, reason)] of the files of ``index`` that do not fully decode.

    The result is cached per file list (``image_check_cache_dir``, keyed by paths, sizes and modification
    times), so each dataset is decoded once, not on every start. Progress (img/s, ETA) is logged every 10 s.
    """
    if getattr(index, "in_memory", False):  # decoded arrays (engine/idx_data.py): there is no file to check
        return []
    from .logger import RateProgress
    cache = os.path.join(image_check_cache_dir(), _fingerprint(index) + ".json") if use_cache else None
    if cache and os.path.isfile(cache):
        import json
        try:
            with open(cache, encoding="utf-8") as handle:
                bad = [tuple(item) for item in json.load(handle)["bad"]]
            logger.info("image check of %s: %d images, %d unreadable (cached result in %s)", index.root,
                        len(index), len(bad), cache)
            return bad
        except (OSError, ValueError, KeyError, TypeError):
            pass  # an unreadable cache file: check again
    paths = [path for path, _ in index.samples]
    progress = RateProgress(logger.info, len(paths), f"image check of {index.root}")
    problems = []
    with ThreadPoolExecutor(max_workers=num_threads or available_cores()) as pool:
        for reason in pool.map(_image_problem, paths, chunksize=16):
            problems.append(reason)
            progress.update(1)
    progress.finish()
    bad = [(path, reason) for path, reason in zip(paths, problems) if reason is not None]
    if cache:
        import json
        try:
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            temp = f"{cache}.{os.getpid()}.tmp"
            with open(temp, "w", encoding="utf-8") as handle:
                json.dump({"root": os.path.abspath(index.root), "images": len(paths), "bad": bad}, handle)
            os.replace(temp, cache)
        except OSError as err:
            logger.warning("could not cache the image check in %s (%s): it runs again next time", cache, err)
    return bad


_IMAGE_CHECKERS = []


@contextlib.contextmanager
def image_checker(check):
    """Within the block, ``scan_split``'s image check is ``check(index) -> [(path, reason)]`` instead of
    ``find_bad_images`` (the trainer's under data parallel: rank 0 checks, the other ranks learn the result)."""
    _IMAGE_CHECKERS.append(check)
    try:
        yield
    finally:
        _IMAGE_CHECKERS.pop()


def drop_bad_images(index, bad, bad_images="fail"):
    """Apply an image check's result: 'fail' raises DataError listing the files, 'skip' returns the index
    without them (with a counted warning)."""
    if not bad:
        return index
    root = index.root
    listing = "\n".join(f"  {path}: {reason}" for path, reason in bad[:20])
    more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
    if bad_images == "fail":
        raise DataError(f"{len(bad)} unreadable image(s) in {root} (use --bad_images skip to train "
                        f"without them):\n{listing}{more}")
    logger.warning("skipping %d unreadable image(s) of %d in %s:\n%s%s", len(bad), len(index), root,
                   listing, more)
    bad_paths = {path for path, _ in bad}
    return SplitIndex(root, index.classes, [sample for sample in index.samples if sample[0] not in bad_paths],
                      list(bad), index.extensions)


def scan_split(data_dir, split, verify_images=True, bad_images="fail", num_threads=None):
    """List ``data_dir/split`` and check it can be trained on.

    Args:
        verify_images: fully decode every image (PIL; cached, see ``find_bad_images``) to find unreadable or
            truncated files.
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
    index = SplitIndex(root, classes, samples, [], sorted(suffixes))
    if verify_images:
        bad = _IMAGE_CHECKERS[-1](index) if _IMAGE_CHECKERS else find_bad_images(index, num_threads)
        index = drop_bad_images(index, bad, bad_images)
    return index


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


def _source(index, shuffle, num_shards, shard_id, num_workers, subset=None):
    """ImageFolderDataset over the split (the normal case), or a file list when bad files were skipped.

    ``subset``: sample positions to read, in this order (instead of shuffling/sharding).
    """
    import mindspore.dataset as ds
    if subset is not None:
        selection = {"sampler": ds.SubsetSampler(list(subset))}
    else:
        selection = {"shuffle": shuffle}
        if num_shards and num_shards > 1:
            selection.update(num_shards=num_shards, shard_id=shard_id)
    if index.bad_files:
        return ds.GeneratorDataset(_FileListSource(index.samples), column_names=["image", "label"],
                                   num_parallel_workers=1, **selection)
    return ds.ImageFolderDataset(index.root, extensions=index.extensions, class_indexing=index.class_indexing,
                                 num_parallel_workers=worker_count(num_workers), decode=False, **selection)


MAX_AUTO_WORKERS = 8


def available_cores():
    """CPU cores this process may run on (its affinity mask; the machine's count where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def worker_count(requested=None):
    """Parallel dataset workers per process.

    ``requested`` None: from the machine: the available cores shared by the processes msrun started
    (``MS_WORKER_NUM``, assumed to run on this machine), at most ``MAX_AUTO_WORKERS``. A number is capped at
    the available cores (MindSpore rejects more).
    """
    cores = available_cores()
    if requested is None:
        processes = max(1, int(os.environ.get("MS_WORKER_NUM", "1") or 1))
        return max(1, min(MAX_AUTO_WORKERS, cores // processes))
    return max(1, min(int(requested), cores))


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


def train_transforms(cfg, fused=True):
    """Per-image training ops up to normalisation and CHW layout (random erasing and mixing come after).

    ``fused``: decode and random-resized-crop in one C++ op (for JPEG only the crop window is decoded); the
    same draws as Decode + RandomResizedCrop (``fused=False``, kept for benchmarks/bench_data.py), the same
    pixels for PNG and nearly so for JPEG (tests/test_engine_data.py).
    """
    from mindspore.dataset import vision
    crop = dict(scale=tuple(cfg.scale), ratio=tuple(cfg.ratio), interpolation=_interpolation(cfg.interpolation))
    if fused:
        ops = [vision.RandomCropDecodeResize(cfg.image_size, **crop)]
    else:
        ops = [vision.Decode(), vision.RandomResizedCrop(cfg.image_size, **crop)]
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


def train_dataset(cfg, index, num_classes, seed, num_shards=1, shard_id=0, fused=True):
    """Shuffled, augmented, batched training data for one epoch (drop_remainder=True).

    ``seed`` fixes the order and the augmentation draws, so a resumed run sees the same batches as an
    uninterrupted one (callers pass ``cfg.seed + epoch``). ``fused``: see ``train_transforms``.
    """
    if getattr(index, "in_memory", False):
        from .idx_data import train_dataset as idx_train_dataset
        return idx_train_dataset(cfg, index, num_classes, seed, num_shards, shard_id)
    import mindspore.dataset as ds
    from mindspore.dataset import transforms
    ds.config.set_seed(seed)
    dataset = _source(index, True, num_shards, shard_id, cfg.num_workers)
    workers = worker_count(cfg.num_workers)
    dataset = dataset.map(train_transforms(cfg, fused), input_columns="image", num_parallel_workers=workers)
    if cfg.random_erasing > 0:
        # erasing itself runs on the device (engine.step.BatchRandomErasing); its uniform draws ride along as
        # an "erase" column, drawn from (seed, shard): reproducible, and skipped with the batches on resume
        rng = np.random.default_rng([seed, shard_id])
        draws = rng.random((len(index), 1 + 4 * ERASE_ATTEMPTS), dtype=np.float32)
        dataset = ds.zip((dataset, ds.NumpySlicesDataset({"erase": draws}, shuffle=False)))
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


def eval_dataset(cfg, index, batch_size=None, num_shards=1, shard_id=0):
    """Validation data in file order, all images (the last batch may be smaller).

    With ``num_shards`` > 1: every ``num_shards``-th image from ``shard_id`` on, so the shards of all ranks
    hold each image exactly once (no padding repeats, unlike the training shards).
    """
    if getattr(index, "in_memory", False):
        from .idx_data import eval_dataset as idx_eval_dataset
        return idx_eval_dataset(cfg, index, batch_size, num_shards, shard_id)
    from mindspore.dataset import transforms
    subset = range(shard_id, len(index), num_shards) if num_shards > 1 else None
    if subset is not None and not len(subset):
        raise DataError(f"validation split {index.root} has {len(index)} image(s), fewer than the "
                        f"{num_shards} ranks sharing it")
    dataset = _source(index, False, 1, 0, cfg.num_workers, subset)
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
