"""engine/idx_data.py: IDX files read into memory and fed to the engine, checked against an independent reader
(struct-parsed header, explicit per-image loop) and a NumPy reference of the preprocessing."""
import gzip
import os
import struct

import numpy as np
import pytest

from conftest import FASHION_MNIST_DIR, TEST_MODEL, fashion_mnist_available, tiny_train_config
from engine import idx_data
from engine.data import DataError, eval_dataset, scan_split, train_dataset

MEAN, STD = 0.286, 0.353


def reference_read(path):
    """Independent IDX reader: struct-parsed big-endian header, one image (or label) at a time."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as handle:
        magic = struct.unpack(">I", handle.read(4))[0]
        assert magic >> 8 == 0x08, "unsigned-byte IDX"
        ndim = magic & 0xFF
        shape = struct.unpack(">" + "I" * ndim, handle.read(4 * ndim))
        item = int(np.prod(shape[1:])) if ndim > 1 else 1
        items = [np.array(list(handle.read(item)), dtype=np.uint8).reshape(shape[1:]) for _ in range(shape[0])]
        assert handle.read() == b""
    return np.stack(items) if ndim > 1 else np.array(items, dtype=np.uint8).reshape(-1)


def write_reference_idx(path, array):
    """IDX writer of the tests (struct header), to check read_idx on files it did not write."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with (gzip.open if path.endswith(".gz") else open)(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def make_idx_folder(root, num_train=40, num_val=20, size=28, seed=0):
    """A generated IDX folder (gzipped train, plain t10k); returns (train images, labels, val images, labels)."""
    rng = np.random.default_rng(seed)
    arrays = []
    os.makedirs(root, exist_ok=True)
    for prefix, count, suffix in (("train", num_train, ".gz"), ("t10k", num_val, "")):
        images = rng.integers(0, 256, (count, size, size), dtype=np.uint8)
        labels = (np.arange(count) % 10).astype(np.uint8)
        rng.shuffle(labels)
        write_reference_idx(os.path.join(root, f"{prefix}-images-idx3-ubyte{suffix}"), images)
        write_reference_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte{suffix}"), labels)
        arrays += [images, labels]
    return arrays


def normalised(images, in_chans):
    """NumPy reference of the preprocessing: (N, H, W) uint8 -> (N, in_chans, H, W) float32."""
    x = (images.astype(np.float32) / 255.0 - MEAN) / STD
    return np.repeat(x[:, None], in_chans, axis=1)


def cfg_for(folder, tmp_path, **overrides):
    values = dict(image_size=28, batch_size=8, eval_batch_size=7, hflip=0.0, scale=[1.0, 1.0], ratio=[1.0, 1.0])
    values.update(overrides)
    return tiny_train_config(str(folder), str(tmp_path / "run"), **values)


def test_read_and_write_idx_against_reference(tmp_path):
    array = np.random.default_rng(1).integers(0, 256, (3, 5, 4), dtype=np.uint8)
    for name in ("a-idx3-ubyte", "b-idx3-ubyte.gz"):
        path = str(tmp_path / name)
        write_reference_idx(path, array)
        np.testing.assert_array_equal(idx_data.read_idx(path), array)
        mine = str(tmp_path / ("w" + name))
        idx_data.write_idx(mine, array)
        np.testing.assert_array_equal(reference_read(mine), array)


@pytest.mark.parametrize("payload, message", [(b"\x00\x00\x09\x01\x00\x00\x00\x01\x05", "magic"),
                                              (b"\x00\x00\x08\x02\x00\x00\x00\x02\x00\x00\x00\x02\x01", "header says"),
                                              (b"\x00\x00\x08\x03\x00", "header")])
def test_read_idx_rejects_bad_files(tmp_path, payload, message):
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(payload)
    with pytest.raises(DataError, match=message):
        idx_data.read_idx(str(path))


@pytest.mark.skipif(not fashion_mnist_available(), reason="needs Debian's dataset-fashion-mnist")
def test_real_fashion_mnist_split_matches_independent_read():
    split = scan_split(FASHION_MNIST_DIR, "val", verify_images=True)
    assert isinstance(split, idx_data.IdxSplit) and len(split) == 10000 and split.images.shape == (10000, 28, 28)
    assert split.classes == list(idx_data.FASHION_MNIST_CLASSES)
    labels = reference_read(os.path.join(FASHION_MNIST_DIR, "t10k-labels-idx1-ubyte.gz"))
    np.testing.assert_array_equal(split.labels, labels)
    images = reference_read(os.path.join(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz"))
    np.testing.assert_array_equal(split.images, images)


def test_scan_split_uses_idx_folder_and_names_missing_split(tmp_path):
    train_images, train_labels, _, _ = make_idx_folder(tmp_path / "d")
    split = scan_split(str(tmp_path / "d"), "train")
    np.testing.assert_array_equal(split.images, train_images)
    np.testing.assert_array_equal(split.labels, train_labels)
    assert split.classes == list(idx_data.FASHION_MNIST_CLASSES) and split.labels.dtype == np.int32
    os.remove(tmp_path / "d" / "t10k-labels-idx1-ubyte")
    with pytest.raises(DataError, match="no IDX files for split 'val'"):
        scan_split(str(tmp_path / "d"), "val")
    (tmp_path / "d" / "classes.txt").write_text("\n".join(f"c{i}" for i in range(10)))
    assert scan_split(str(tmp_path / "d"), "train").classes == [f"c{i}" for i in range(10)]


@pytest.mark.parametrize("in_chans", [1, 3])
def test_eval_pipeline_matches_numpy_reference(tmp_path, in_chans):
    _, _, val_images, val_labels = make_idx_folder(tmp_path / "d")
    cfg = cfg_for(tmp_path / "d", tmp_path, in_chans=in_chans)
    batches = list(eval_dataset(cfg, scan_split(cfg.data_dir, "val")).create_tuple_iterator(output_numpy=True))
    assert [len(images) for images, _ in batches] == [7, 7, 6]
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    np.testing.assert_allclose(images, normalised(val_images, in_chans), atol=1e-5)
    np.testing.assert_array_equal(labels, val_labels)
    assert labels.dtype == np.int32 and images.dtype == np.float32


def test_eval_pipeline_resizes_like_the_image_folder_path(tmp_path):
    """At 32 px the IDX path resizes as the PNG ImageFolder path does (same C++ ops on the same pixels)."""
    from PIL import Image
    _, _, val_images, val_labels = make_idx_folder(tmp_path / "d", num_val=10)
    for label in range(10):
        folder = tmp_path / "png" / "val" / f"{label}"
        folder.mkdir(parents=True)
        (position,) = np.flatnonzero(val_labels == label)
        Image.fromarray(val_images[position], mode="L").save(folder / "0.png")
    cfg = cfg_for(tmp_path / "d", tmp_path, image_size=32, in_chans=3, eval_batch_size=10)
    idx = next(eval_dataset(cfg, scan_split(cfg.data_dir, "val")).create_tuple_iterator(output_numpy=True))
    png = next(eval_dataset(cfg, scan_split(str(tmp_path / "png"), "val")).create_tuple_iterator(output_numpy=True))
    order = np.argsort(idx[1], kind="stable")
    np.testing.assert_array_equal(idx[1][order], png[1])
    np.testing.assert_allclose(idx[0][order], png[0], atol=1e-5)
    assert png[0].shape == (10, 3, 32, 32)


def test_train_pipeline_keeps_images_with_their_labels_in_seeded_order(tmp_path):
    train_images, train_labels, _, _ = make_idx_folder(tmp_path / "d")
    cfg = cfg_for(tmp_path / "d", tmp_path, in_chans=1)
    split = scan_split(cfg.data_dir, "train")

    def epoch(seed, shards=1, shard=0):
        batches = list(train_dataset(cfg, split, 10, seed, shards, shard).create_tuple_iterator(output_numpy=True))
        return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])

    images, labels = epoch(5)
    assert images.shape == (40, 1, 28, 28) and labels.dtype == np.int32
    order = idx_data.shard_order(40, 5)
    assert sorted(order) == list(range(40))
    # identity augmentation (scale = ratio = 1, no flip): the seeded permutation of the normalised images
    np.testing.assert_allclose(images, normalised(train_images[order], 1), atol=1e-5)
    np.testing.assert_array_equal(labels, train_labels[order])
    again, _ = epoch(5)
    np.testing.assert_array_equal(again, images)
    assert not np.array_equal(epoch(6)[1], labels)
    # two shards of 3 batches: disjoint samples, same count; drop_remainder leaves 4 of 40 out
    first, second = idx_data.shard_order(40, 5, 2, 0), idx_data.shard_order(40, 5, 2, 1)
    assert len(first) == len(second) == 20 and not set(first) & set(second)
    shard_images, _ = epoch(5, 2, 1)
    np.testing.assert_allclose(shard_images, normalised(train_images[second[:16]], 1), atol=1e-5)
    assert len(idx_data.shard_order(41, 0, 2, 1)) == 21  # padded by wrapping, like ImageFolder shards


def test_train_pipeline_augments_and_rejects_what_it_cannot_do(tmp_path):
    train_images, _, _, _ = make_idx_folder(tmp_path / "d")
    cfg = cfg_for(tmp_path / "d", tmp_path, image_size=32, hflip=0.5, scale=[0.5, 1.0], mixup=0.2, in_chans=3)
    split = scan_split(cfg.data_dir, "train")
    images, labels = next(train_dataset(cfg, split, 10, 0).create_tuple_iterator(output_numpy=True))
    assert images.shape == (8, 3, 32, 32) and labels.shape == (8, 10)
    np.testing.assert_allclose(labels.sum(axis=1), 1.0, atol=1e-5)
    with pytest.raises(DataError, match="random_erasing"):
        train_dataset(cfg_for(tmp_path / "d", tmp_path, random_erasing=0.25), split, 10, 0)
    with pytest.raises(DataError, match="one mean and std"):
        eval_dataset(cfg_for(tmp_path / "d", tmp_path, mean=[0.1, 0.2, 0.3], std=[0.3, 0.3, 0.3]), split)


def test_trainer_and_eval_on_an_idx_folder(tmp_path):
    """train.py's engine and eval.py run on an IDX folder; eval.py reproduces the trainer's validation."""
    import eval as eval_script
    from engine.trainer import train
    make_idx_folder(tmp_path / "d", num_train=64, num_val=20)
    cfg = tiny_train_config(str(tmp_path / "d"), str(tmp_path / "run"), model=TEST_MODEL, image_size=28,
                            epochs=1, eval_batch_size=10)
    trainer, summary = train(cfg)
    assert summary["global_step"] == 4 and len(trainer.val_index) == 20
    result = eval_script.run(eval_script.parse_args(["--checkpoint", summary["last_checkpoint"]]))
    assert result["top1"] == pytest.approx(summary["last_val"]["top1"])
