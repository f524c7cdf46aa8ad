"""Fashion-MNIST scenes: real garment images pasted onto varied canvases, for detection and segmentation.

Each scene is an RGB canvas (``size`` x ``size``) holding 1-``max_items`` Fashion-MNIST items, each resized
to a random side between ``min_frac`` and ``max_frac`` of the canvas (aspect jittered), tinted with a random
colour that keeps the garment's own shading, and pasted at a random position. Items are pasted hard (no
blending): an item's mask is its pixels brighter than ``MASK_THRESHOLD`` after resizing, and later items
cover earlier ones. A placement is retried (up to ``PLACEMENT_TRIES`` times) when it would cover more than
``max_occlusion`` of an earlier item's visible pixels, so every item stays mostly visible.

Backgrounds vary per scene: a random base colour, a linear gradient and smooth low-frequency noise.

Ground truth per scene, all from the final visible masks:
  * instances: COCO ``category_id`` 1..10 (Fashion-MNIST label + 1), tight ``bbox`` [x, y, w, h] in pixels
    (x = first column, w = columns covered), ``area`` (visible pixels), ``segmentation`` as uncompressed
    COCO RLE (``mask_to_rle``);
  * a semantic label map (H, W) uint8: 0 background, 1..10 the category of the topmost item. Pasting is
    hard, so no pixel is ambiguous and ``IGNORE_INDEX`` (255) never appears in generated maps; it is the
    value consumers use for pixels to leave out (e.g. padding).

Determinism: scene ``i`` of a split is drawn from ``np.random.default_rng([seed, split code, i])`` and the
item pool of that split only (train scenes from the 60k training images, val scenes from the 10k test
images), so any scene can be regenerated alone and the result does not depend on how many are made.

On disk (``write_scenes`` / tools/make_scenes.py)::

    <root>/images/<split>/000000.png          RGB scene
    <root>/semantic/<split>/000000.png        uint8 label map (0 background, 1..10 classes)
    <root>/annotations/instances_<split>.json COCO instances (file_name relative to images/<split>)
"""
import json
import os
import shutil

import numpy as np

from .fashion_mnist import CLASS_NAMES, DEFAULT_SOURCE, FILES, PrepareError, load_split

IGNORE_INDEX = 255
BACKGROUND = 0
NUM_CLASSES = len(CLASS_NAMES)
MASK_THRESHOLD = 0.1  # item pixels brighter than this (of 1.0) after resizing belong to its mask
PLACEMENT_TRIES = 30
SPLIT_CODES = {"train": 0, "val": 1}
SOURCE_SPLIT = {"train": "train", "val": "val"}  # scene split -> Fashion-MNIST split (train / test files)
FORMAT_VERSION = 1


class SceneError(ValueError):
    """Bad scene parameters or missing source data."""


def categories():
    """COCO categories: [{'id': 1..10, 'name': class name, 'supercategory': 'garment'}]."""
    return [{"id": index + 1, "name": name, "supercategory": "garment"} for index, name in enumerate(CLASS_NAMES)]


def check_params(size, min_items, max_items, min_frac, max_frac, max_occlusion):
    if size < 16:
        raise SceneError(f"scene size must be >= 16 px, got {size}")
    if not 1 <= min_items <= max_items:
        raise SceneError(f"need 1 <= min_items <= max_items, got {min_items} and {max_items}")
    if not 0.0 < min_frac <= max_frac <= 1.0:
        raise SceneError(f"need 0 < min_frac <= max_frac <= 1, got {min_frac} and {max_frac}")
    if round(min_frac * size) < 4:
        raise SceneError(f"min_frac {min_frac} of a {size} px scene gives items under 4 px")
    if not 0.0 <= max_occlusion < 1.0:
        raise SceneError(f"max_occlusion must be in [0, 1), got {max_occlusion}")


def background(rng, size):
    """(size, size, 3) float32 in [0, 1]: base colour + linear gradient + smooth noise."""
    from PIL import Image
    base = rng.uniform(0.0, 0.7, 3)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    gradient = np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]
    strength = rng.uniform(0.0, 0.3, 3)
    cells = int(rng.integers(2, 9))
    coarse = rng.uniform(-1.0, 1.0, (cells, cells, 3)).astype(np.float32)
    noise = np.stack([np.asarray(Image.fromarray(coarse[..., c], mode="F").resize((size, size), Image.BILINEAR))
                      for c in range(3)], axis=-1)
    canvas = base + gradient[..., None] * strength + noise * rng.uniform(0.0, 0.15)
    return np.clip(canvas, 0.0, 1.0).astype(np.float32)


def _resized_item(item, height, width):
    """uint8 (28, 28) item -> float32 (height, width) in [0, 1] (bilinear)."""
    from PIL import Image
    return np.asarray(Image.fromarray(item, mode="L").resize((width, height), Image.BILINEAR), np.float32) / 255.0


def compose_scene(rng, items, labels, size=256, min_items=1, max_items=6, min_frac=0.12, max_frac=0.4,
                  max_occlusion=0.3):
    """Draw one scene.

    Args:
        rng: numpy Generator (all randomness of the scene comes from it).
        items: uint8 (N, 28, 28) pool of Fashion-MNIST images; labels: (N,) ints 0..9.
    Returns:
        image (size, size, 3) uint8, semantic (size, size) uint8 (0 background, 1..10),
        instances: list of dicts {category_id, bbox [x, y, w, h], area, mask (size, size) bool}, in paste order.
    """
    check_params(size, min_items, max_items, min_frac, max_frac, max_occlusion)
    canvas = background(rng, size)
    owner = np.full((size, size), -1, np.int64)  # index of the topmost item per pixel
    count = int(rng.integers(min_items, max_items + 1))
    placed = []  # (category_id, full mask)
    for _ in range(count):
        pick = int(rng.integers(len(items)))
        side = rng.uniform(min_frac, max_frac) * size
        aspect = np.exp(rng.uniform(np.log(0.8), np.log(1.25)))
        height = int(np.clip(round(side * np.sqrt(aspect)), 4, size))
        width = int(np.clip(round(side / np.sqrt(aspect)), 4, size))
        shade = _resized_item(items[pick], height, width)
        local = shade > MASK_THRESHOLD
        if local.sum() < 4:
            continue
        tint = rng.uniform(0.35, 1.0, 3)
        for _ in range(PLACEMENT_TRIES):
            top = int(rng.integers(0, size - height + 1))
            left = int(rng.integers(0, size - width + 1))
            full = np.zeros((size, size), bool)
            full[top:top + height, left:left + width] = local
            if all((owner[full] == index).sum() <= max_occlusion * max(1, (owner == index).sum())
                   for index in range(len(placed))):
                break
        else:
            continue  # no placement leaves the earlier items visible enough: skip this item
        region = canvas[top:top + height, left:left + width]
        colour = tint[None, None, :] * (0.3 + 0.7 * shade[..., None])
        region[local] = colour[local]
        owner[full] = len(placed)
        placed.append((int(labels[pick]) + 1, full))
    semantic = np.zeros((size, size), np.uint8)
    instances = []
    for index, (category, _) in enumerate(placed):
        visible = owner == index
        if not visible.any():
            continue
        semantic[visible] = category
        rows, cols = np.flatnonzero(visible.any(axis=1)), np.flatnonzero(visible.any(axis=0))
        bbox = [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]
        instances.append({"category_id": category, "bbox": bbox, "area": int(visible.sum()), "mask": visible})
    image = np.clip(np.round(canvas * 255.0), 0, 255).astype(np.uint8)
    return image, semantic, instances


def scene_rng(seed, split, index):
    return np.random.default_rng([int(seed), SPLIT_CODES[split], int(index)])


def mask_to_rle(mask):
    """Uncompressed COCO RLE of a (H, W) bool mask: column-major run lengths starting with a zero run."""
    flat = np.asarray(mask, bool).reshape(-1, order="F")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def rle_to_mask(rle):
    """Inverse of ``mask_to_rle`` (uncompressed RLE only)."""
    height, width = rle["size"]
    values = np.zeros(height * width, bool)
    position, value = 0, False
    for run in rle["counts"]:
        values[position:position + run] = value
        position += run
        value = not value
    if position != height * width:
        raise ValueError(f"RLE counts cover {position} pixels, the mask has {height * width}")
    return values.reshape((height, width), order="F")


def load_source(source=DEFAULT_SOURCE, split="train"):
    """(items uint8 (N, 28, 28), labels (N,)) of the Fashion-MNIST files feeding scene ``split``."""
    prefix = SOURCE_SPLIT[split]
    paths = [os.path.join(source, FILES[f"{prefix}_{kind}"]) for kind in ("images", "labels")]
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        raise SceneError(f"Fashion-MNIST files not found: {', '.join(missing)} (apt-get install "
                         f"dataset-fashion-mnist, or pass --source DIR)")
    try:
        return load_split(*paths)
    except PrepareError as err:
        raise SceneError(str(err)) from None


def write_split(root, split, count, items, labels, seed=0, log=print, **params):
    """Write ``count`` scenes of ``split`` (images, semantic maps, COCO JSON) atomically per folder.

    Returns the COCO dict written to ``<root>/annotations/instances_<split>.json``.
    """
    from PIL import Image
    if split not in SPLIT_CODES:
        raise SceneError(f"split must be one of {sorted(SPLIT_CODES)}, got {split!r}")
    folders = {kind: os.path.join(root, kind, split) for kind in ("images", "semantic")}
    temps = {kind: os.path.join(root, kind, f".tmp-{split}") for kind in folders}
    for temp in temps.values():
        shutil.rmtree(temp, ignore_errors=True)
        os.makedirs(temp)
    images, annotations = [], []
    for index in range(count):
        image, semantic, instances = compose_scene(scene_rng(seed, split, index), items, labels, **params)
        name = f"{index:06d}.png"
        Image.fromarray(image, mode="RGB").save(os.path.join(temps["images"], name))
        Image.fromarray(semantic, mode="L").save(os.path.join(temps["semantic"], name))
        images.append({"id": index + 1, "file_name": name, "width": image.shape[1], "height": image.shape[0]})
        for item in instances:
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1,
                                "category_id": item["category_id"], "bbox": item["bbox"], "area": item["area"],
                                "iscrowd": 0, "segmentation": mask_to_rle(item["mask"])})
    coco = {"info": {"description": f"Fashion-MNIST scenes ({split})", "version": FORMAT_VERSION, "seed": seed,
                     "params": params},
            "images": images, "annotations": annotations, "categories": categories()}
    for kind, folder in folders.items():
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(temps[kind], folder)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    path = annotation_path(root, split)
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(coco, handle)
    os.replace(path + ".tmp", path)
    log(f"wrote {count} {split} scenes ({len(annotations)} objects) to {root}")
    return coco


def annotation_path(root, split):
    return os.path.join(root, "annotations", f"instances_{split}.json")


def image_folder(root, split):
    return os.path.join(root, "images", split)


def semantic_folder(root, split):
    return os.path.join(root, "semantic", split)


MANIFEST = ".scenes.json"


def make_scenes(root, train=2000, val=500, seed=0, source=DEFAULT_SOURCE, log=print, **params):
    """Create (or keep, when a manifest with the same settings exists) the train and val scenes of ``root``.

    ``params``: size, min_items, max_items, min_frac, max_frac, max_occlusion (``compose_scene``).
    Returns the manifest dict.
    """
    defaults = {"size": 256, "min_items": 1, "max_items": 6, "min_frac": 0.12, "max_frac": 0.4,
                "max_occlusion": 0.3}
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise SceneError(f"unknown scene parameter(s): {', '.join(unknown)}")
    params = dict(defaults, **params)
    check_params(**params)
    for name, value in (("train", train), ("val", val)):
        if value < 1:
            raise SceneError(f"--{name} must be >= 1 scene, got {value}")
    wanted = {"version": FORMAT_VERSION, "seed": seed, "counts": {"train": train, "val": val}, "params": params,
              "source": os.path.abspath(source)}
    manifest_path = os.path.join(root, MANIFEST)
    if os.path.isfile(manifest_path):
        with open(manifest_path, encoding="utf-8") as handle:
            old = json.load(handle)
        if old == wanted and all(os.path.isfile(annotation_path(root, split)) for split in ("train", "val")):
            log(f"{root} already holds these scenes ({train} train / {val} val)")
            return old
    elif os.path.isdir(os.path.join(root, "annotations")):
        raise SceneError(f"{root} already has annotations/ not written by this tool; choose another --out")
    os.makedirs(root, exist_ok=True)
    for split, count in (("train", train), ("val", val)):
        items, labels = load_source(source, split)
        write_split(root, split, count, items, labels, seed, log, **params)
    with open(manifest_path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(wanted, handle, indent=1)
    os.replace(manifest_path + ".tmp", manifest_path)
    return wanted
