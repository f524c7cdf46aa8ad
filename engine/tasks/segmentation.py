"""Semantic segmentation: per-pixel cross entropy with an ignore index; mIoU, per-class IoU, pixel accuracy.

Data layout (what tools/make_scenes.py writes; see engine/scenes.py)::

    <data_dir>/images/<split>/<name>.png|.jpg     RGB image
    <data_dir>/semantic/<split>/<name>.png        label map, one channel: class index per pixel, or
                                                  ``ignore_index`` for pixels to leave out
    <data_dir>/annotations/instances_<split>.json optional COCO file: its categories (ids 1..n) name the
                                                  classes 1..n, class 0 is 'background'; without it the
                                                  config must set num_classes

Training pipeline per image (NumPy/PIL, drawn from ``np.random.default_rng([seed, index])`` so a resumed run
sees the same crops): resize to image_size x image_size (image bilinear, labels nearest), rescale by a
random factor in ``scale_range``, pad to at least image_size (image with the mean colour, labels with the
ignore index), random image_size crop, horizontal flip with probability ``hflip``, normalise with
mean/std. Evaluation: resize to image_size (labels nearest), no crop; the metrics come from the confusion
matrix accumulated over the split (``engine.segmentation``); under data parallel each rank scores every
group_size-th image and the matrices are summed over the ranks.

task_options: ``ignore_index`` (255), ``aux_weight`` (0.4: weight of the auxiliary head's loss, UperNet),
``scale_range`` ([0.5, 2.0]).
"""
import json
import os
import sys

import numpy as np

from ..data import DataError
from ..segmentation import IGNORE_INDEX, SegmentationLoss, SegmentationMeter

NAME = "segmentation"
PRIMARY_METRIC = "miou"
OPTIONS = {"ignore_index": IGNORE_INDEX, "aux_weight": 0.4, "scale_range": [0.5, 2.0]}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")


def options(cfg):
    """The checked task options of a config."""
    from ..config import ConfigError
    from . import task_options
    opts = task_options(cfg, sys.modules[__name__])
    ignore = opts["ignore_index"]
    if not isinstance(ignore, int) or isinstance(ignore, bool) or not 0 <= ignore <= 255:
        raise ConfigError(f"task_options.ignore_index must be an integer in [0, 255] (label maps are 8-bit), "
                          f"got {ignore!r}")
    if not isinstance(opts["aux_weight"], (int, float)) or opts["aux_weight"] < 0:
        raise ConfigError(f"task_options.aux_weight must be a number >= 0, got {opts['aux_weight']!r}")
    scale = opts["scale_range"]
    if (not isinstance(scale, (list, tuple)) or len(scale) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in scale)
            or scale[0] > scale[1]):
        raise ConfigError(f"task_options.scale_range must be [low, high] with 0 < low <= high, got {scale!r}")
    return opts


class SegmentationSplit:
    """The (image, label map) file pairs of one split and the class names."""

    def __init__(self, root, split, pairs, classes):
        self.root, self.split, self.pairs, self.classes = root, split, pairs, classes

    def __len__(self):
        return len(self.pairs)


def _class_names(data_dir, split, num_classes):
    path = os.path.join(data_dir, "annotations", f"instances_{split}.json")
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as handle:
                categories = json.load(handle).get("categories", [])
            ids = sorted(int(c["id"]) for c in categories)
            names = {int(c["id"]): str(c["name"]) for c in categories}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise DataError(f"{path}: cannot read its 'categories' ({err})") from None
        if ids != list(range(1, len(ids) + 1)):
            raise DataError(f"{path}: category ids must be 1..n (class 0 is the background), got {ids}")
        return ["background"] + [names[i] for i in ids]
    if not num_classes:
        raise DataError(f"{path} not found: without it the classes are unknown; set num_classes")
    return [f"class_{i}" for i in range(num_classes)]


def scan_split(data_dir, split, num_classes=None, ignore_index=IGNORE_INDEX, verify=True):
    """List and check the pairs of a split; DataError naming the file for a missing label map, a size
    mismatch, a label map with more than one channel, or a label value that is neither a class nor
    ``ignore_index`` (the last three when ``verify``: every file is decoded)."""
    from PIL import Image
    if not data_dir:
        raise DataError("option 'data_dir' is required (a folder with images/<split>/ and semantic/<split>/)")
    images = os.path.join(data_dir, "images", split)
    labels = os.path.join(data_dir, "semantic", split)
    for folder in (images, labels):
        if not os.path.isdir(folder):
            raise DataError(f"segmentation data folder not found: {folder} (expected images/<split>/ and "
                            f"semantic/<split>/ under data_dir; tools/make_scenes.py writes them)")
    names = sorted(n for n in os.listdir(images) if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith("."))
    if not names:
        raise DataError(f"no images in {images}")
    classes = _class_names(data_dir, split, num_classes)
    count = max(len(classes), num_classes or 0)
    pairs = []
    for name in names:
        label = os.path.join(labels, os.path.splitext(name)[0] + ".png")
        if not os.path.isfile(label):
            raise DataError(f"{os.path.join(images, name)} has no label map {label}")
        pairs.append((os.path.join(images, name), label))
    if verify:
        for image_path, label_path in pairs:
            try:
                with Image.open(image_path) as image:
                    size = image.size
                with Image.open(label_path) as label_image:
                    if label_image.mode not in ("L", "P"):
                        raise DataError(f"{label_path}: label maps must have one channel (mode L or P), "
                                        f"got mode {label_image.mode}")
                    values = np.unique(np.asarray(label_image))
                    label_size = label_image.size
            except OSError as err:
                raise DataError(f"cannot decode {image_path} or {label_path}: {err}") from None
            if size != label_size:
                raise DataError(f"{label_path} is {label_size[0]}x{label_size[1]} but its image is "
                                f"{size[0]}x{size[1]}")
            bad = values[(values >= count) & (values != ignore_index)]
            if bad.size:
                raise DataError(f"{label_path} holds label values {bad.tolist()[:10]} outside the {count} classes "
                                f"[0, {count}) and not the ignore index {ignore_index}")
    return SegmentationSplit(data_dir, split, pairs, classes)


def scan(cfg):
    opts = options(cfg)
    train = scan_split(cfg.data_dir, cfg.train_split, cfg.num_classes, opts["ignore_index"], cfg.verify_images)
    val = None
    if cfg.val_split:
        val = scan_split(cfg.data_dir, cfg.val_split, cfg.num_classes, opts["ignore_index"], cfg.verify_images)
        if val.classes != train.classes:
            raise DataError(f"the classes of {cfg.val_split} ({val.classes}) differ from those of "
                            f"{cfg.train_split} ({train.classes})")
    return train, val, train.classes


def _load_pair(image_path, label_path, in_chans):
    from PIL import Image
    with Image.open(image_path) as image:
        image = image.convert("L" if in_chans == 1 else "RGB")
        pixels = np.asarray(image)
    with Image.open(label_path) as label:
        labels = np.asarray(label).astype(np.uint8)
    return pixels, labels


def _resize(array, height, width, nearest):
    from PIL import Image
    if array.shape[:2] == (height, width):
        return array
    method = Image.NEAREST if nearest else Image.BILINEAR
    return np.asarray(Image.fromarray(array).resize((width, height), method))


class _Pipeline:
    """Loads, augments (``train``) and normalises pairs: (C, S, S) float32 image, (S, S) int32 labels."""

    def __init__(self, cfg, data, seed=0, train=False, indices=None):
        opts = options(cfg)
        self.pairs = [data.pairs[i] for i in indices] if indices is not None else list(data.pairs)
        self.size, self.in_chans, self.train, self.seed = cfg.image_size, cfg.in_chans, train, seed
        self.hflip, self.scale_range, self.ignore = cfg.hflip, opts["scale_range"], opts["ignore_index"]
        channels = 1 if cfg.in_chans == 1 else 3
        mean, std = list(cfg.mean), list(cfg.std)
        if len(mean) != channels:
            mean, std = [float(np.mean(mean))] * channels, [float(np.mean(std))] * channels
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        pixels, labels = _load_pair(*self.pairs[index], self.in_chans)
        size = self.size
        pixels, labels = _resize(pixels, size, size, False), _resize(labels, size, size, True)
        image = (pixels.astype(np.float32) / 255.0 - self.mean) / self.std
        if image.ndim == 2:
            image = image[:, :, None]
        labels = labels.astype(np.int32)
        if self.train:
            image, labels = self._augment(np.random.default_rng([self.seed, index]), image, labels)
        return np.ascontiguousarray(image.transpose(2, 0, 1)), np.ascontiguousarray(labels)

    def _augment(self, rng, image, labels):
        size = self.size
        scale = rng.uniform(*self.scale_range)
        side = max(1, int(round(size * scale)))
        if side != size:
            image = np.stack([_resize(image[:, :, c], side, side, False) for c in range(image.shape[2])], axis=2)
            labels = _resize(labels.astype(np.uint8), side, side, True).astype(np.int32)
        if side < size:  # pad with the mean colour (0 after normalisation) and ignored labels
            pad = size - side
            image = np.pad(image, ((0, pad), (0, pad), (0, 0)))
            labels = np.pad(labels, ((0, pad), (0, pad)), constant_values=self.ignore)
        top = int(rng.integers(0, image.shape[0] - size + 1))
        left = int(rng.integers(0, image.shape[1] - size + 1))
        image, labels = image[top:top + size, left:left + size], labels[top:top + size, left:left + size]
        if rng.random() < self.hflip:
            image, labels = image[:, ::-1], labels[:, ::-1]
        return image, labels


def train_dataset(cfg, data, num_classes, seed, num_shards=1, shard_id=0):
    import mindspore.dataset as ds
    from ..data import worker_count
    ds.config.set_seed(seed)
    shard = {"num_shards": num_shards, "shard_id": shard_id} if num_shards > 1 else {}
    dataset = ds.GeneratorDataset(_Pipeline(cfg, data, seed, train=True), column_names=["image", "label"],
                                  shuffle=True, num_parallel_workers=worker_count(cfg.num_workers),
                                  python_multiprocessing=False, **shard)
    return dataset.batch(cfg.batch_size, drop_remainder=True)


def loss_network(network, cfg, num_classes):
    from ..step import NetWithLoss
    opts = options(cfg)
    return NetWithLoss(network, SegmentationLoss(opts["ignore_index"], opts["aux_weight"]))


def inference_network(model, cfg):
    """The segmentor itself: images (B, C, H, W) -> logits (B, K, H, W) (the auxiliary head is off in eval)."""
    return model


def _cross_entropy(logits, labels, ignore):
    """Mean per-pixel cross entropy over the non-ignored pixels (NumPy, float64) and their count."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    valid = labels != ignore
    if not valid.any():
        return 0.0
    picked = np.take_along_axis(logp, np.where(valid, labels, 0)[:, None].astype(np.int64), axis=1)[:, 0]
    return float(-picked[valid].mean())


def _batches(pipeline, batch_size):
    for start in range(0, len(pipeline), batch_size):
        items = [pipeline[i] for i in range(start, min(start + batch_size, len(pipeline)))]
        yield np.stack([item[0] for item in items]), np.stack([item[1] for item in items])


def evaluate(predict, cfg, data, num_classes, batch_size=None, fixed_batch=None, rank=0, group_size=1):
    """Score ``predict`` (images numpy -> logits (B, K, H, W) numpy) on a split; the images rank::group_size
    of this rank, with the confusion matrices summed over the ranks when group_size > 1."""
    opts = options(cfg)
    ignore = opts["ignore_index"]
    batch_size = batch_size or cfg.eval_batch_size or cfg.batch_size
    if fixed_batch is not None:
        batch_size = fixed_batch
    pipeline = _Pipeline(cfg, data, indices=range(rank, len(data), group_size))
    meter = SegmentationMeter(num_classes, ignore)
    for images, labels in _batches(pipeline, batch_size):
        size = images.shape[0]
        if fixed_batch is not None and size < fixed_batch:
            images = np.concatenate([images, np.zeros((fixed_batch - size,) + images.shape[1:], images.dtype)])
        logits = np.asarray(predict(images))[:size]
        if logits.ndim != 4 or logits.shape[1] != num_classes or logits.shape[2:] != labels.shape[1:]:
            raise DataError(f"the network returned logits of shape {logits.shape} for images {images.shape}; "
                            f"expected ({size}, {num_classes}, {labels.shape[1]}, {labels.shape[2]})")
        if not np.isfinite(logits).all():
            raise DataError("the network returned NaN or inf logits")
        meter.update(logits, labels, _cross_entropy(logits, labels, ignore))
    meter.all_reduce(group_size)
    names = list(data.classes)[:num_classes]
    names += [f"class_{i}" for i in range(len(names), num_classes)]
    return dict(meter.result(), images=len(data), class_names=names)


def _data_parallel():
    """(rank, group size) when collective communication runs data parallel, else (0, 1)."""
    import mindspore as ms
    if ms.get_auto_parallel_context("parallel_mode") != ms.ParallelMode.DATA_PARALLEL:
        return 0, 1
    from mindspore.communication import get_group_size, get_rank
    return get_rank(), get_group_size()


def validate(network, cfg, data, num_classes):
    import mindspore as ms

    def predict(images):
        return network(ms.Tensor(images)).asnumpy()
    rank, group_size = _data_parallel()
    return evaluate(predict, cfg, data, num_classes, rank=rank, group_size=group_size)


def record(result):
    return {"val_miou": result["miou"], "val_pixel_acc": result["pixel_acc"], "val_loss": result.get("loss")}


def describe(result):
    return (f"val mIoU {result['miou']:.2f}% pixel acc {result['pixel_acc']:.2f}% mean acc "
            f"{result['mean_acc']:.2f}% loss {result.get('loss', float('nan')):.4f}")


def eval_data(cfg, data_dir, split):
    data = scan_split(data_dir, split, cfg.num_classes, options(cfg)["ignore_index"], verify=True)
    return data, data.classes


def summary(result):
    lines = [f"{result['source']} on {result['data']}: mIoU {result['miou']:.2f}%  pixel acc "
             f"{result['pixel_acc']:.2f}%  mean acc {result['mean_acc']:.2f}%  loss "
             f"{result.get('loss', float('nan')):.4f}  ({result['images']} images, {result['pixels']} pixels)",
             "per-class IoU:"]
    for name, iou in zip(result["class_names"], result["iou"]):
        lines.append(f"  {name:<14} {'absent' if iou is None else f'{iou:6.2f}%'}")
    return "\n".join(lines)
