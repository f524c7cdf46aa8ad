"""tools/prepare_fashion_mnist.py and engine/data.py: conversion, scanning errors, pipelines, sharding."""
import gzip
import os

import numpy as np
import pytest
from PIL import Image

from conftest import FASHION_MNIST_DIR, fashion_mnist_available, tiny_train_config, write_generated_split
from engine.data import (DataError, check_same_classes, eval_dataset, scan_split, steps_per_epoch,
                         train_dataset)
from tools import prepare_fashion_mnist as prep

needs_package = pytest.mark.skipif(not fashion_mnist_available(),
                                   reason="Debian package dataset-fashion-mnist is not installed "
                                          "(apt-get install dataset-fashion-mnist)")


def write_idx(path, array):
    """Gzipped unsigned-byte IDX file of ``array``."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def fake_source(folder, train_count=40, val_count=20, seed=0):
    """The four IDX files of a small random Fashion-MNIST look-alike; returns (folder, arrays)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in (("train", train_count), ("val", val_count)):
        images = rng.integers(0, 256, (count, 28, 28)).astype(np.uint8)
        labels = np.arange(count) % 10
        arrays[split] = (images, labels)
        write_idx(os.path.join(folder, prep.FILES[f"{split}_images"]), images)
        write_idx(os.path.join(folder, prep.FILES[f"{split}_labels"]), labels)
    return folder, arrays


def quiet(*_):
    pass


# ---- tools/prepare_fashion_mnist.py ------------------------------------------------------------------
def test_prepare_writes_class_folders_with_exact_pixels(tmp_path):
    source, arrays = fake_source(str(tmp_path))
    out = str(tmp_path / "out")
    manifest = prep.prepare(out, source, train_per_class=3, val_per_class=1, log=quiet)
    assert manifest["counts"] == {"train": 30, "val": 10}
    for split, per_class in (("train", 3), ("val", 1)):
        assert sorted(os.listdir(os.path.join(out, split))) == sorted(prep.CLASS_NAMES)
        images, labels = arrays[split]
        for label, name in enumerate(prep.CLASS_NAMES):
            files = sorted(os.listdir(os.path.join(out, split, name)))
            expected = np.flatnonzero(labels == label)[:per_class]  # first N of the class, file order
            assert [int(f[:-4]) for f in files] == list(expected)
            with Image.open(os.path.join(out, split, name, files[0])) as image:
                assert image.mode == "L"
                np.testing.assert_array_equal(np.asarray(image), images[expected[0]])


def test_prepare_from_numpy_arrays(tmp_path):
    rng = np.random.default_rng(1)
    paths = {}
    for split, count in (("train", 20), ("val", 10)):
        np.save(tmp_path / f"{split}_x.npy", rng.integers(0, 256, (count, 28, 28)).astype(np.uint8))
        np.save(tmp_path / f"{split}_y.npy", np.arange(count) % 10)
        paths[f"{split}_images"] = str(tmp_path / f"{split}_x.npy")
        paths[f"{split}_labels"] = str(tmp_path / f"{split}_y.npy")
    manifest = prep.prepare(str(tmp_path / "out"), str(tmp_path / "nowhere"), paths=paths, log=quiet)
    assert manifest["counts"] == {"train": 20, "val": 10}


def test_prepare_is_idempotent_and_redoes_changed_options(tmp_path):
    source, _ = fake_source(str(tmp_path))
    out = str(tmp_path / "out")
    prep.prepare(out, source, train_per_class=2, val_per_class=1, log=quiet)
    marker = os.path.join(out, "train", prep.CLASS_NAMES[0], "marker.txt")
    open(marker, "w").close()  # survives only if the second run leaves the tree alone
    messages = []
    prep.prepare(out, source, train_per_class=2, val_per_class=1, log=messages.append)
    assert os.path.exists(marker) and "already prepared" in messages[0]
    manifest = prep.prepare(out, source, train_per_class=4, val_per_class=1, log=quiet)
    assert not os.path.exists(marker) and manifest["counts"]["train"] == 40
    assert len(os.listdir(os.path.join(out, "train", prep.CLASS_NAMES[0]))) == 4


def test_prepare_refuses_folders_it_did_not_write(tmp_path):
    source, _ = fake_source(str(tmp_path))
    os.makedirs(tmp_path / "out" / "train" / "mine")
    with pytest.raises(prep.PrepareError, match="not written by this tool"):
        prep.prepare(str(tmp_path / "out"), source, log=quiet)
    assert os.path.isdir(tmp_path / "out" / "train" / "mine")


def test_prepare_missing_package_names_the_apt_package(tmp_path, capsys):
    code = prep.main(["--out", str(tmp_path / "out"), "--source", str(tmp_path / "empty")])
    assert code == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


def test_prepare_rejects_corrupt_idx(tmp_path):
    source, _ = fake_source(str(tmp_path))
    with gzip.open(os.path.join(source, prep.FILES["train_images"]), "wb") as handle:
        handle.write(b"\x00\x00\x08\x03" + (5).to_bytes(4, "big") * 3 + b"short")
    with pytest.raises(prep.PrepareError, match="header says shape"):
        prep.prepare(str(tmp_path / "out"), source, log=quiet)


@needs_package
def test_prepare_real_package_subset(tmp_path):
    manifest = prep.prepare(str(tmp_path / "fm"), FASHION_MNIST_DIR, train_per_class=2, val_per_class=2, log=quiet)
    assert manifest["counts"] == {"train": 20, "val": 20}
    assert manifest["classes"] == list(prep.CLASS_NAMES)
    images = prep.read_array(os.path.join(FASHION_MNIST_DIR, prep.FILES["train_images"]))
    assert images.shape == (60000, 28, 28)


# ---- scanning ------------------------------------------------------------------------------------------
def test_scan_finds_classes_and_samples(image_folder):
    root, _ = image_folder
    index = scan_split(root, "train")
    assert len(index.classes) == 10 and len(index) == 300
    assert sorted({label for _, label in index.samples}) == list(range(10))


@pytest.mark.parametrize("layout, message", [
    ("missing", "dataset folder not found"),
    ("no_classes", "no class sub-folders"),
    ("empty_class", "class folders without images"),
])
def test_scan_rejects_unusable_folders(tmp_path, layout, message):
    if layout != "missing":
        os.makedirs(tmp_path / "train")
    if layout == "empty_class":
        write_generated_split(str(tmp_path), "train", ["a"], 2)
        os.makedirs(tmp_path / "train" / "b")
    with pytest.raises(DataError, match=message):
        scan_split(str(tmp_path), "train")


def test_scan_without_data_dir():
    with pytest.raises(DataError, match="'data_dir'"):
        scan_split(None, "train")


def test_class_mismatch_between_splits(tmp_path):
    write_generated_split(str(tmp_path), "train", ["cat", "dog"], 2)
    write_generated_split(str(tmp_path), "val", ["cat", "cow"], 2)
    with pytest.raises(DataError, match=r"only in train: \['dog'\]; only in val: \['cow'\]"):
        check_same_classes(scan_split(str(tmp_path), "train"), scan_split(str(tmp_path), "val"))


def broken_folder(tmp_path):
    write_generated_split(str(tmp_path), "train", ["a", "b"], 4)
    (tmp_path / "train" / "a" / "broken.png").write_bytes(b"not an image at all")
    return str(tmp_path)


def test_unreadable_image_fails_by_default(tmp_path):
    with pytest.raises(DataError, match=r"(?s)1 unreadable image.*broken.png"):
        scan_split(broken_folder(tmp_path), "train")


def write_jpegs(folder, count, size=64, seed=0):
    """``count`` noisy colour JPEGs of ``size`` px in ``folder``; returns their paths."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for index in range(count):
        path = os.path.join(folder, f"{index:03d}.jpg")
        Image.fromarray(rng.integers(0, 256, (size, size, 3)).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def test_late_truncated_jpeg_is_found(tmp_path, monkeypatch):
    monkeypatch.setenv("ACMIX_CACHE_DIR", str(tmp_path / "cache"))
    paths = write_jpegs(str(tmp_path / "train" / "a"), 3)
    data = open(paths[1], "rb").read()
    open(paths[1], "wb").write(data[:int(len(data) * 0.9)])  # header and 90 % of the scan data intact
    with Image.open(paths[1]) as image:
        image.verify()  # the header check alone does not notice
    with pytest.raises(DataError, match=r"(?s)1 unreadable image.*001.jpg.*truncated"):
        scan_split(str(tmp_path), "train")


@pytest.fixture
def engine_logs_propagate(monkeypatch):
    """caplog sees engine.data records even after a Trainer in this process stopped "engine" propagating."""
    import logging
    monkeypatch.setattr(logging.getLogger("engine"), "propagate", True)
    monkeypatch.setattr(logging.getLogger("engine.data"), "propagate", True)


def test_image_check_runs_once_per_dataset(tmp_path, monkeypatch, caplog, engine_logs_propagate):
    import engine.data as data
    monkeypatch.setenv("ACMIX_CACHE_DIR", str(tmp_path / "cache"))
    root = broken_folder(tmp_path)
    with caplog.at_level("INFO", logger="engine.data"):
        first = scan_split(root, "train", bad_images="skip")
    assert "image check of" in caplog.text and "img/s" in caplog.text  # progress with the rate
    decoded = []
    monkeypatch.setattr(data, "_image_problem", lambda path: decoded.append(path))
    again = scan_split(root, "train", bad_images="skip")  # from the cache: nothing decoded
    assert decoded == [] and again.samples == first.samples and len(again.bad_files) == 1
    with pytest.raises(DataError, match="broken.png"):
        scan_split(root, "train")
    (tmp_path / "train" / "a" / "broken.png").write_bytes(b"also not an image, but longer")  # changed file
    scan_split(root, "train", bad_images="skip")
    assert len(decoded) == 9  # a changed split is checked again


def test_fused_decode_crop_equals_decode_then_crop(tmp_path):
    """RandomCropDecodeResize (the training pipeline's op) against Decode + RandomResizedCrop, same seed."""
    import mindspore.dataset as ds
    from mindspore.dataset import vision
    from engine.data import train_transforms
    write_jpegs(str(tmp_path / "train" / "a"), 4, size=80)
    write_generated_split(str(tmp_path), "train", ["b"], 4, size=40)
    cfg = tiny_train_config(str(tmp_path), None, scale=[0.2, 1.0], hflip=0.0)
    reference = [vision.Decode(), vision.RandomResizedCrop(32, scale=(0.2, 1.0), ratio=tuple(cfg.ratio))]
    fused = train_transforms(cfg)[:1]
    assert isinstance(fused[0], vision.RandomCropDecodeResize)
    outputs = []
    for ops in (reference, fused):
        ds.config.set_seed(11)
        dataset = ds.ImageFolderDataset(str(tmp_path / "train"), shuffle=False, decode=False)
        dataset = dataset.map(ops, input_columns="image", num_parallel_workers=1)
        outputs.append(np.stack([row["image"] for row in dataset.create_dict_iterator(output_numpy=True)]))
    assert outputs[0].shape == (8, 32, 32, 3)
    jpeg, png = slice(0, 4), slice(4, 8)  # class 'a' holds the JPEGs
    np.testing.assert_array_equal(outputs[1][png], outputs[0][png])
    # JPEG: the fused op decodes only the crop window, which changes a few values slightly (decoder rounding)
    difference = np.abs(outputs[1][jpeg].astype(np.int32) - outputs[0][jpeg])
    print("JPEG: share of differing values", (difference > 0).mean(), "mean |diff|", difference.mean())
    assert (difference > 0).mean() < 0.05 and difference.mean() < 0.2


def test_worker_count_from_the_machine(monkeypatch):
    from engine.data import MAX_AUTO_WORKERS, available_cores, worker_count
    cores = available_cores()
    monkeypatch.delenv("MS_WORKER_NUM", raising=False)
    assert worker_count() == max(1, min(MAX_AUTO_WORKERS, cores))
    monkeypatch.setenv("MS_WORKER_NUM", str(cores * 2))  # more processes than cores: one worker each
    assert worker_count() == 1
    assert worker_count(10 ** 6) == cores and worker_count(1) == 1


def test_unreadable_image_skipped_with_count(tmp_path, caplog, engine_logs_propagate):
    root = broken_folder(tmp_path)
    with caplog.at_level("WARNING", logger="engine.data"):
        index = scan_split(root, "train", bad_images="skip")
    assert len(index) == 8 and len(index.bad_files) == 1
    assert "skipping 1 unreadable image(s) of 9" in caplog.text
    cfg = tiny_train_config(root, None, batch_size=2, image_size=16)
    dataset = train_dataset(cfg, index, 2, seed=0)  # the pipeline reads only the good files
    assert sum(1 for _ in dataset.create_tuple_iterator(num_epochs=1)) == 4


# ---- pipelines -----------------------------------------------------------------------------------------
def first_batch(dataset):
    return next(dataset.create_tuple_iterator(num_epochs=1, output_numpy=True))


def test_train_batches_shapes_and_types(image_folder):
    root, _ = image_folder
    cfg = tiny_train_config(root, None)
    images, labels = first_batch(train_dataset(cfg, scan_split(root, "train"), 10, seed=0))
    assert images.shape == (16, 3, 32, 32) and images.dtype == np.float32
    assert labels.shape == (16,) and labels.dtype == np.int32


def test_grey_single_channel_input(image_folder):
    root, _ = image_folder
    cfg = tiny_train_config(root, None, in_chans=1)
    images, _ = first_batch(eval_dataset(cfg, scan_split(root, "val")))
    assert images.shape == (16, 1, 32, 32)
    three, _ = first_batch(eval_dataset(tiny_train_config(root, None), scan_split(root, "val")))
    np.testing.assert_allclose(images[:, 0], three[:, 0], atol=1e-5)  # grey files: luminance = any channel


def test_mixup_cutmix_give_soft_labels(image_folder):
    root, _ = image_folder
    cfg = tiny_train_config(root, None, mixup=0.8, cutmix=1.0, randaugment_ops=2, random_erasing=0.5)
    images, labels, erase_draws = first_batch(train_dataset(cfg, scan_split(root, "train"), 10, seed=0))
    assert labels.shape == (16, 10) and labels.dtype == np.float32
    assert erase_draws.shape == (16, 41) and ((erase_draws >= 0) & (erase_draws < 1)).all()  # random erasing
    np.testing.assert_allclose(labels.sum(axis=1), 1.0, atol=1e-5)
    assert ((labels > 0) & (labels < 1)).any()  # some rows really mix two classes


def test_eval_pipeline_is_deterministic_and_normalised(tmp_path):
    folder = tmp_path / "val" / "flat"
    os.makedirs(folder)
    Image.fromarray(np.full((20, 20), 100, np.uint8), mode="L").save(folder / "a.png")
    cfg = tiny_train_config(str(tmp_path), None, mean=[0.2], std=[0.5], image_size=16, crop_pct=0.8)
    index = scan_split(str(tmp_path), "val")
    images, labels = first_batch(eval_dataset(cfg, index))
    assert images.shape == (1, 3, 16, 16)
    np.testing.assert_allclose(images, (100 / 255 - 0.2) / 0.5, atol=1e-4)
    again, _ = first_batch(eval_dataset(cfg, index))
    np.testing.assert_array_equal(images, again)


def test_training_order_follows_the_seed(image_folder):
    root, _ = image_folder
    cfg = tiny_train_config(root, None)
    index = scan_split(root, "train")
    a, _ = first_batch(train_dataset(cfg, index, 10, seed=3))
    b, _ = first_batch(train_dataset(cfg, index, 10, seed=3))
    c, _ = first_batch(train_dataset(cfg, index, 10, seed=4))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_shards_are_disjoint_and_cover_the_split(image_folder):
    root, _ = image_folder
    cfg = tiny_train_config(root, None, batch_size=1, scale=[1.0, 1.0], ratio=[1.0, 1.0], hflip=0.0)
    index = scan_split(root, "train")
    seen = []
    for shard in (0, 1):
        dataset = train_dataset(cfg, index, 10, seed=0, num_shards=2, shard_id=shard)
        seen.append({images.tobytes() for images, _ in dataset.create_tuple_iterator(num_epochs=1,
                                                                                        output_numpy=True)})
    assert len(seen[0]) == len(seen[1]) == 150
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == 300


def test_validation_shards_hold_every_image_once(image_folder):
    root, _ = image_folder
    cfg = tiny_train_config(root, None, batch_size=7)
    index = scan_split(root, "val")
    whole = [images for images, _ in eval_dataset(cfg, index).create_tuple_iterator(num_epochs=1,
                                                                                    output_numpy=True)]
    whole = np.concatenate(whole)
    shards = [np.concatenate([images for images, _ in eval_dataset(cfg, index, num_shards=3, shard_id=rank)
                              .create_tuple_iterator(num_epochs=1, output_numpy=True)]) for rank in range(3)]
    assert [len(shard) for shard in shards] == [34, 33, 33]
    for rank, shard in enumerate(shards):  # every 3rd image from position `rank` on, in file order
        np.testing.assert_array_equal(shard, whole[rank::3])


def test_steps_per_epoch_and_too_small_dataset():
    assert steps_per_epoch(300, 16) == 18
    assert steps_per_epoch(301, 16, num_shards=2) == 9  # 151 per shard
    with pytest.raises(DataError, match="batch_size=64"):
        steps_per_epoch(100, 64, num_shards=2)

