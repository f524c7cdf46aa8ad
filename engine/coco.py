"""COCO-format detection data: checked reading of an annotation file and the training / evaluation pipelines.

Layout (what tools/make_scenes.py writes; any COCO instances file works the same)::

    <data_dir>/annotations/instances_<split>.json
    <data_dir>/images/<split>/<file_name of each image entry>

``scan_coco`` reads and checks a split before anything is compiled:
  * errors (DataError naming the file and the entry): a file that is missing or does not parse, missing
    ``images``/``annotations``/``categories`` lists, duplicate image or category ids, an image file that
    is missing (or does not decode, with ``verify_images``), an annotation of an unknown image or of a
    category id not in ``categories``, a bbox that is not 4 finite numbers;
  * handled and counted in the log: boxes reaching outside the image are clipped to it; boxes empty after
    clipping (width or height < ``MIN_BOX_SIDE`` px) are dropped; ``iscrowd`` annotations are left out of
    training and evaluation; images without objects are kept (they teach the background).

Categories are indexed 0..K-1 in the order of their ids (the network's classes). Boxes are (x1, y1, x2, y2)
pixels of the original image, ``x2 = x + w``. The pipelines resize every image to image_size x image_size
(square; boxes scaled with it), flip horizontally with probability ``hflip`` when training, and normalise
with ``mean``/``std``. Training batches: images (B, 3, S, S) float32, targets (B, M, 5) float32 rows
(x1, y1, x2, y2, class) with class -1 for padding, M = the largest object count of the split (or the task
option ``max_objects``). Evaluation batches: images and the image's position in the split (int32).
"""
import json
import logging
import math
import os
from dataclasses import dataclass, field

import numpy as np

from .data import DataError, _image_problem, worker_count

MIN_BOX_SIDE = 1.0
logger = logging.getLogger("engine.coco")


@dataclass
class CocoSplit:
    """A checked COCO split. ``boxes[i]`` (n_i, 4) float32 xyxy and ``labels[i]`` (n_i,) int64 class indices
    of image ``images[i]`` ({id, path, width, height})."""
    annotation_file: str
    image_dir: str
    images: list
    boxes: list
    labels: list
    category_ids: list  # class index -> COCO category id
    class_names: list
    counts: dict = field(default_factory=dict)  # clipped, dropped_degenerate, crowd, empty_images

    def __len__(self):
        return len(self.images)

    def max_objects(self):
        return max([len(b) for b in self.boxes] + [1])


def annotation_path(data_dir, split):
    return os.path.join(data_dir, "annotations", f"instances_{split}.json")


def _read_json(path):
    if not os.path.isfile(path):
        raise DataError(f"annotation file not found: {path} (expected <data_dir>/annotations/instances_<split>.json; "
                        f"make scenes with: python tools/make_scenes.py --out <data_dir>)")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"annotation file {path} is not valid JSON: {err}") from None


def _image_size(path):
    from PIL import Image
    with Image.open(path) as image:
        return image.size


def scan_coco(data_dir, split, verify_images=True):
    """Read and check ``<data_dir>/annotations/instances_<split>.json``; returns a CocoSplit."""
    if data_dir is None:
        raise DataError("option 'data_dir' is not set: give the scenes root (holding annotations/ and images/)")
    path = annotation_path(data_dir, split)
    coco = _read_json(path)
    if not isinstance(coco, dict):
        raise DataError(f"{path}: expected a JSON object with images, annotations and categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise DataError(f"{path}: '{key}' must be a list (COCO instances format)")
    categories = sorted(coco["categories"], key=lambda c: c.get("id") if isinstance(c, dict) else 0)
    category_ids = []
    for entry in categories:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), int) or "name" not in entry:
            raise DataError(f"{path}: category entry {entry!r} needs an integer 'id' and a 'name'")
        if entry["id"] in category_ids:
            raise DataError(f"{path}: category id {entry['id']} appears twice")
        category_ids.append(entry["id"])
    if not category_ids:
        raise DataError(f"{path}: 'categories' is empty")
    class_of = {cid: index for index, cid in enumerate(category_ids)}
    image_dir = os.path.join(data_dir, "images", split)
    images, position, missing, broken = [], {}, [], []
    for entry in coco["images"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), int) or not isinstance(
                entry.get("file_name"), str):
            raise DataError(f"{path}: image entry {entry!r} needs an integer 'id' and a 'file_name'")
        if entry["id"] in position:
            raise DataError(f"{path}: image id {entry['id']} appears twice")
        file_path = os.path.join(image_dir, entry["file_name"])
        if not os.path.isfile(file_path):
            missing.append(f"image id {entry['id']}: {file_path}")
            continue
        if verify_images:
            problem = _image_problem(file_path)
            if problem:
                broken.append(f"image id {entry['id']}: {file_path}: {problem}")
                continue
        width, height = entry.get("width"), entry.get("height")
        if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
            width, height = _image_size(file_path)
        position[entry["id"]] = len(images)
        images.append({"id": entry["id"], "path": file_path, "width": width, "height": height})
    for problems, what in ((missing, "missing"), (broken, "unreadable")):
        if problems:
            more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
            raise DataError(f"{path}: {len(problems)} {what} image file(s):\n  " + "\n  ".join(problems[:10]) + more)
    if not images:
        raise DataError(f"{path}: 'images' is empty")
    boxes = [[] for _ in images]
    labels = [[] for _ in images]
    counts = {"clipped": 0, "dropped_degenerate": 0, "crowd": 0, "empty_images": 0}
    for entry in coco["annotations"]:
        ident = entry.get("id") if isinstance(entry, dict) else None
        if not isinstance(entry, dict):
            raise DataError(f"{path}: annotation entry {entry!r} is not an object")
        if entry.get("image_id") not in position:
            raise DataError(f"{path}: annotation id {ident} refers to image id {entry.get('image_id')!r}, which is "
                            f"not in 'images'")
        if entry.get("category_id") not in class_of:
            raise DataError(f"{path}: annotation id {ident} has category_id {entry.get('category_id')!r}, not one "
                            f"of the categories {category_ids}")
        bbox = entry.get("bbox")
        if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                           for v in bbox)):
            raise DataError(f"{path}: annotation id {ident} has bbox {bbox!r}; expected [x, y, width, height]")
        if entry.get("iscrowd", 0):
            counts["crowd"] += 1
            continue
        index = position[entry["image_id"]]
        image = images[index]
        x, y, w, h = (float(v) for v in bbox)
        box = np.array([x, y, x + w, y + h])
        clipped = np.clip(box, 0, [image["width"], image["height"], image["width"], image["height"]])
        if (clipped != box).any():
            counts["clipped"] += 1
        if clipped[2] - clipped[0] < MIN_BOX_SIDE or clipped[3] - clipped[1] < MIN_BOX_SIDE:
            counts["dropped_degenerate"] += 1
            continue
        boxes[index].append(clipped)
        labels[index].append(class_of[entry["category_id"]])
    boxes = [np.asarray(b, np.float32).reshape(-1, 4) for b in boxes]
    labels = [np.asarray(l, np.int64) for l in labels]
    counts["empty_images"] = sum(len(l) == 0 for l in labels)
    if counts["clipped"] or counts["dropped_degenerate"] or counts["crowd"]:
        logger.warning("%s: %d box(es) clipped to their image, %d dropped as empty (< %g px), %d crowd "
                       "annotation(s) left out", path, counts["clipped"], counts["dropped_degenerate"], MIN_BOX_SIDE,
                       counts["crowd"])
    names = [str(c["name"]) for c in categories]
    return CocoSplit(path, image_dir, images, boxes, labels, category_ids, names, counts)


def load_image(path, size, mean, std):
    """(3, size, size) float32 normalised image and the (sx, sy) factors from original to resized pixels."""
    from PIL import Image
    with Image.open(path) as image:
        image = image.convert("RGB")
        width, height = image.size
        image = image.resize((size, size), Image.BILINEAR)
    array = np.asarray(image, np.float32) / 255.0
    array = (array - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1)), (size / width, size / height)


class _TrainSource:
    """Random-access (image, targets) samples; the flip of sample i in an epoch comes from rng([seed, i])."""

    def __init__(self, split, size, mean, std, hflip, max_objects, seed):
        self.split, self.size, self.hflip, self.max_objects, self.seed = split, size, hflip, max_objects, seed
        self.mean = list(mean) * (3 if len(mean) == 1 else 1)
        self.std = list(std) * (3 if len(std) == 1 else 1)

    def __len__(self):
        return len(self.split)

    def __getitem__(self, index):
        image, (sx, sy) = load_image(self.split.images[index]["path"], self.size, self.mean, self.std)
        boxes = self.split.boxes[index] * np.array([sx, sy, sx, sy], np.float32)
        if self.hflip > 0 and np.random.default_rng([self.seed, index]).uniform() < self.hflip:
            image = np.ascontiguousarray(image[:, :, ::-1])
            boxes = np.stack([self.size - boxes[:, 2], boxes[:, 1], self.size - boxes[:, 0], boxes[:, 3]], axis=1)
        targets = np.full((self.max_objects, 5), -1.0, np.float32)
        count = min(len(boxes), self.max_objects)
        targets[:count, :4] = boxes[:count]
        targets[:count, 4] = self.split.labels[index][:count]
        return image, targets


class _EvalSource:
    def __init__(self, split, size, mean, std):
        self.split, self.size = split, size
        self.mean = list(mean) * (3 if len(mean) == 1 else 1)
        self.std = list(std) * (3 if len(std) == 1 else 1)

    def __len__(self):
        return len(self.split)

    def __getitem__(self, index):
        image, _ = load_image(self.split.images[index]["path"], self.size, self.mean, self.std)
        return image, np.array(index, np.int32)


def train_dataset(cfg, split, seed, max_objects, num_shards=1, shard_id=0):
    """Shuffled (by ``seed``), flipped, batched (drop_remainder) training data of a CocoSplit."""
    import mindspore.dataset as ds
    if max_objects < split.max_objects():
        logger.warning("max_objects %d is below the largest object count %d of %s: extra objects are left out",
                       max_objects, split.max_objects(), split.annotation_file)
    ds.config.set_seed(seed)
    shard = {"num_shards": num_shards, "shard_id": shard_id} if num_shards > 1 else {}
    source = _TrainSource(split, cfg.image_size, cfg.mean, cfg.std, cfg.hflip, max_objects, seed)
    dataset = ds.GeneratorDataset(source, column_names=["image", "targets"], shuffle=True,
                                  num_parallel_workers=worker_count(cfg.num_workers), python_multiprocessing=False,
                                  **shard)
    return dataset.batch(cfg.batch_size, drop_remainder=True)


def eval_dataset(cfg, split, batch_size):
    """(images, positions) batches of a CocoSplit in file order (the last batch may be smaller)."""
    import mindspore.dataset as ds
    source = _EvalSource(split, cfg.image_size, cfg.mean, cfg.std)
    dataset = ds.GeneratorDataset(source, column_names=["image", "index"], shuffle=False,
                                  num_parallel_workers=worker_count(cfg.num_workers), python_multiprocessing=False)
    return dataset.batch(batch_size, drop_remainder=False)
