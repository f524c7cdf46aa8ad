"""Shared test setup: graph mode, a tiny registered test network, tiny image datasets.

The datasets are real Fashion-MNIST images converted with tools/prepare_fashion_mnist.py when Debian's
``dataset-fashion-mnist`` package is installed, otherwise generated PNGs with a learnable class signal
(each class has its own bright rectangle); the run's header and a warning say which. Fixtures are
session-scoped so data are written once.
"""
import os
import sys
import warnings

import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from models.registry import is_model, register_model  # noqa: E402

ms.set_context(mode=ms.GRAPH_MODE)


@pytest.fixture(autouse=True)
def _fixed_seed():
    """Same parameter initialisation in every test whatever runs before it: some one-step checks look for
    parameters that did not move, and a rare initialisation gives a live parameter a gradient too small
    to change its float32 value."""
    ms.set_seed(0)
    yield

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
TEST_MODEL = "_test_tinynet"


class TinyNet(nn.Cell):
    """conv3x3/2 (in_chans->8) BN ReLU, conv3x3/2 (8->16) BN ReLU, global mean, Dense(16 -> num_classes).

    Input (B, in_chans, H, W) -> logits (B, num_classes). A scalar ``rate1`` scales the features so the
    weight-decay grouping of ACmix-like 1-D parameters is exercised by the engine tests.
    """

    def __init__(self, num_classes=10, in_chans=3, width=8):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, width, 3, stride=2, pad_mode="same", has_bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, pad_mode="same", has_bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.rate1 = ms.Parameter(ms.Tensor([1.0], ms.float32), name="rate1")
        self.head = nn.Dense(2 * width, num_classes)

    def construct(self, x):
        x = ops.relu(self.bn1(self.conv1(x)))
        x = ops.relu(self.bn2(self.conv2(x))) * self.rate1
        return self.head(x.mean(axis=(2, 3)))


def _test_tinynet(num_classes=10, **kwargs):
    return TinyNet(num_classes=num_classes, **kwargs)


if not is_model(TEST_MODEL):
    register_model(_test_tinynet)


FALLBACK_NOTE = (f"Fashion-MNIST is not installed ({FASHION_MNIST_DIR}): the engine tests use generated images "
                 f"instead (apt-get install dataset-fashion-mnist; tools/run_tests.sh does it as root)")


def pytest_report_header(config):
    """Say at the top of every run which data the engine tests use (the switch is never silent)."""
    if fashion_mnist_available():
        return f"test images: Fashion-MNIST subsets from {FASHION_MNIST_DIR}"
    return "test images: GENERATED. " + FALLBACK_NOTE


def fashion_mnist_available():
    return os.path.isfile(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz"))


def write_generated_split(root, split, classes, per_class, size=28, seed=0):
    """Grey PNGs: noise plus a class-specific bright rectangle (learnable in a few steps)."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        folder = os.path.join(root, split, name)
        os.makedirs(folder, exist_ok=True)
        for index in range(per_class):
            image = rng.integers(0, 60, (size, size)).astype(np.uint8)
            row = (label * 5) % (size - 8)
            col = (label * 11) % (size - 8)
            image[row:row + 8, col:col + 8] = 220
            Image.fromarray(image, mode="L").save(os.path.join(folder, f"{index:04d}.png"))


def synthetic_garments(count=20, seed=0):
    """(items (count, 28, 28) uint8, labels (count,)): bright ellipses of random size standing in for
    Fashion-MNIST garments (scene tests without the Debian dataset)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:28, :28]
    items = []
    for _ in range(count):
        ry, rx = rng.uniform(5, 13, 2)
        inside = ((yy - 13.5) / ry) ** 2 + ((xx - 13.5) / rx) ** 2 <= 1
        items.append((inside * rng.uniform(120, 255)).astype(np.uint8))
    return np.stack(items), rng.integers(0, 10, count)


def make_image_folder(root, train_per_class, val_per_class):
    """Real Fashion-MNIST subset when installed, generated images otherwise. Returns (root, source)."""
    if fashion_mnist_available():
        from tools.prepare_fashion_mnist import prepare
        prepare(root, train_per_class=train_per_class, val_per_class=val_per_class, log=lambda *_: None)
        return root, "fashion-mnist"
    warnings.warn(FALLBACK_NOTE, UserWarning)
    classes = [f"class_{i}" for i in range(10)]
    write_generated_split(root, "train", classes, train_per_class, seed=0)
    write_generated_split(root, "val", classes, val_per_class, seed=1)
    return root, "generated"


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """~300 train / 100 val 28x28 grey images in 10 classes: (root, source name)."""
    return make_image_folder(str(tmp_path_factory.mktemp("fmnist")), 30, 10)


def tiny_train_config(data_dir, output_dir, **overrides):
    """A run config sized for tests: the test network, 32 px, batch 16, few steps, no image checks."""
    from engine.config import build_config
    values = dict(model=TEST_MODEL, data_dir=data_dir, output_dir=output_dir, image_size=32, crop_pct=1.0,
                  batch_size=16, num_workers=1, epochs=2, lr=0.1, warmup_epochs=0.5, weight_decay=1e-4,
                  label_smoothing=0.0, scale=[0.6, 1.0], mean=[0.286], std=[0.353], log_interval=5, plot=False,
                  seed=7)
    values.update(overrides)
    return build_config(file_values=values)
