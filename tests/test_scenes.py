"""engine/scenes.py and tools/make_scenes.py: Fashion-MNIST scenes with boxes, masks and label maps."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import synthetic_garments
from engine import scenes

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
needs_fashion_mnist = pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR),
                                         reason="dataset-fashion-mnist is not installed")


def test_rle_round_trip_and_layout():
    rng = np.random.default_rng(1)
    for shape in [(5, 7), (1, 1), (6, 3)]:
        for fill in (0.0, 0.5, 1.0):
            mask = rng.uniform(size=shape) < fill
            rle = scenes.mask_to_rle(mask)
            assert sum(rle["counts"]) == mask.size and rle["size"] == list(shape)
            np.testing.assert_array_equal(scenes.rle_to_mask(rle), mask)
    # column-major runs starting with background (the COCO convention), checked by hand
    mask = np.array([[1, 0], [1, 1]], bool)  # column-major: 1 1 0 1
    assert scenes.mask_to_rle(mask)["counts"] == [0, 2, 1, 1]


def test_scene_ground_truth_is_consistent():
    items, labels = synthetic_garments()
    for index in range(8):
        image, semantic, instances = scenes.compose_scene(scenes.scene_rng(0, "train", index), items, labels,
                                                          size=64, max_items=5, max_occlusion=0.3)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8 and semantic.shape == (64, 64)
        assert 1 <= len(instances) <= 5
        covered = np.zeros((64, 64), bool)
        for item in instances:
            mask = item["mask"]
            assert not (covered & mask).any()  # visible masks do not overlap
            covered |= mask
            assert 1 <= item["category_id"] <= 10 and item["area"] == mask.sum()
            assert (semantic[mask] == item["category_id"]).all()
            x, y, w, h = item["bbox"]
            rows, cols = np.nonzero(mask)
            assert (x, y, x + w - 1, y + h - 1) == (cols.min(), rows.min(), cols.max(), rows.max())
        assert (semantic[~covered] == scenes.BACKGROUND).all()
        assert scenes.IGNORE_INDEX not in np.unique(semantic)


def test_occlusion_limit_keeps_items_visible():
    items, labels = synthetic_garments()
    rng = scenes.scene_rng(3, "val", 0)
    for _ in range(5):
        image, semantic, instances = scenes.compose_scene(rng, items, labels, size=48, min_items=6, max_items=6,
                                                          max_occlusion=0.2)
        assert all(item["area"] > 0 for item in instances)


def test_scenes_are_deterministic_per_index():
    items, labels = synthetic_garments()
    first = scenes.compose_scene(scenes.scene_rng(7, "train", 4), items, labels, size=32)
    again = scenes.compose_scene(scenes.scene_rng(7, "train", 4), items, labels, size=32)
    other = scenes.compose_scene(scenes.scene_rng(7, "val", 4), items, labels, size=32)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other[0])


def test_bad_parameters_are_named():
    items, labels = synthetic_garments()
    with pytest.raises(scenes.SceneError, match="max_items"):
        scenes.compose_scene(np.random.default_rng(0), items, labels, min_items=3, max_items=2)
    with pytest.raises(scenes.SceneError, match="min_frac"):
        scenes.compose_scene(np.random.default_rng(0), items, labels, size=32, min_frac=0.05)


@needs_fashion_mnist
def test_make_scenes_writes_coco_and_label_maps(tmp_path):
    from tools.make_scenes import main
    root = str(tmp_path / "scenes")
    assert main(["--out", root, "--train", "4", "--val", "2", "--size", "48", "--seed", "3"]) == 0
    coco = json.load(open(scenes.annotation_path(root, "train")))
    assert [c["id"] for c in coco["categories"]] == list(range(1, 11)) and len(coco["images"]) == 4
    for ann in coco["annotations"]:
        image = next(i for i in coco["images"] if i["id"] == ann["image_id"])
        semantic = np.asarray(Image.open(os.path.join(scenes.semantic_folder(root, "train"), image["file_name"])))
        mask = scenes.rle_to_mask(ann["segmentation"])
        assert (semantic[mask] == ann["category_id"]).all() and mask.sum() == ann["area"]
    picture = np.asarray(Image.open(os.path.join(scenes.image_folder(root, "val"), "000001.png")))
    assert picture.shape == (48, 48, 3)
    # the same options again: nothing rewritten; the images equal a fresh draw of the same scene
    stamp = os.path.getmtime(scenes.annotation_path(root, "val"))
    assert main(["--out", root, "--train", "4", "--val", "2", "--size", "48", "--seed", "3"]) == 0
    assert os.path.getmtime(scenes.annotation_path(root, "val")) == stamp
    items, labels = scenes.load_source(FASHION_MNIST_DIR, "val")
    params = dict(size=48, min_items=1, max_items=6, min_frac=0.12, max_frac=0.4, max_occlusion=0.3)
    image, _, _ = scenes.compose_scene(scenes.scene_rng(3, "val", 1), items, labels, **params)
    np.testing.assert_array_equal(image, picture)
    assert main(["--out", str(tmp_path / "x"), "--source", str(tmp_path / "none")]) == 2
