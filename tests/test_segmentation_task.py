"""engine/tasks/segmentation.py through train.py, eval.py and export.py on Fashion-MNIST scenes (64 px).

One narrow Semantic FPN (PVT-ACmix backbone, 16-64 channels) is trained for a few steps on one repeated
batch (the loss must fall), evaluated from its checkpoint (the same mIoU as the trainer's validation),
exported to MINDIR (export.py checks the file's output against the network's own) and the MINDIR evaluated
(the same mIoU again). Data checks run on hand-made broken splits.
"""
import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import synthetic_garments
from engine import scenes
from engine.config import build_config
from engine.data import DataError
from engine.tasks import segmentation as task

NARROW = {"backbone_kwargs": {"embed_dims": [16, 32, 48, 64], "num_heads": [1, 1, 2, 2], "depths": [1, 1, 1, 1],
                              "mlp_ratios": [2, 2, 2, 2]}, "fpn_channels": 16, "head_channels": 8}


@pytest.fixture(scope="module")
def scene_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("scenes"))
    params = dict(size=64, min_items=1, max_items=3, min_frac=0.3, max_frac=0.6, max_occlusion=0.3)
    for split, count in (("train", 8), ("val", 8)):
        try:
            items, labels = scenes.load_source(split=split)
        except scenes.SceneError:
            items, labels = synthetic_garments(40, seed=len(split))
        scenes.write_split(root, split, count, items, labels, seed=0, log=lambda *_: None, **params)
    return root


def seg_config(data_dir, output_dir, **extra):
    values = dict(model="semfpn_pvt_tiny_acmix", model_overrides=NARROW, data_dir=data_dir, output_dir=output_dir,
                  image_size=64, batch_size=8, num_workers=1, epochs=5, val_every_epochs=5, opt="adamw", lr=2e-3,
                  weight_decay=0.0, lr_schedule="poly", mean=[0.5], std=[0.25], hflip=0.0,
                  task_options={"scale_range": [1.0, 1.0]}, log_interval=1, plot=False, verify_images=True)
    values.update(extra)
    return build_config(file_values=values)


def test_task_is_the_models_and_options_are_checked(tmp_path):
    from engine.config import ConfigError
    from engine.tasks import task_name
    assert task_name(build_config(file_values={"model": "upernet_swin_tiny"})) == "segmentation"
    with pytest.raises(ConfigError, match="scale_range"):
        task.options(build_config(file_values={"task": "segmentation", "task_options": {"scale_range": [2, 1]}}))
    with pytest.raises(ConfigError, match="ignore_index"):
        task.options(build_config(file_values={"task": "segmentation", "task_options": {"ignore_index": 300}}))


def test_scan_names_broken_files(scene_root, tmp_path):
    data = task.scan_split(scene_root, "val")
    assert len(data) == 8 and data.classes[0] == "background" and len(data.classes) == 11
    broken = tmp_path / "broken"
    for kind in ("images", "semantic"):
        os.makedirs(broken / kind / "val")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(broken / "images" / "val" / "a.png")
    with pytest.raises(DataError, match="has no label map"):
        task.scan_split(str(broken), "val", num_classes=3)
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(broken / "semantic" / "val" / "a.png")
    with pytest.raises(DataError, match=r"label values \[7\] outside the 3 classes"):
        task.scan_split(str(broken), "val", num_classes=3)
    Image.fromarray(np.full((8, 9), 255, np.uint8)).save(broken / "semantic" / "val" / "a.png")
    with pytest.raises(DataError, match="is 9x8 but its image is 8x8"):
        task.scan_split(str(broken), "val", num_classes=3)
    with pytest.raises(DataError, match="set num_classes"):
        task.scan_split(str(broken), "val")


def test_augmentation_keeps_labels_on_their_pixels(scene_root):
    """Image and labels go through the same scale, crop and flip: label 0 sits where the (normalised)
    background is, padded pixels are ignored."""
    data = task.scan_split(scene_root, "train")
    flip = task._Pipeline(seg_config(scene_root, None, hflip=1.0), data, seed=3, train=True)
    plain = task._Pipeline(seg_config(scene_root, None), data)
    for index in range(3):
        image, labels = flip[index]
        ref_image, ref_labels = plain[index]
        np.testing.assert_array_equal(labels, ref_labels[:, ::-1])
        np.testing.assert_allclose(image, ref_image[:, :, ::-1])
    half = task._Pipeline(seg_config(scene_root, None, task_options={"scale_range": [0.5, 0.5]}), data, seed=1,
                          train=True)
    image, labels = half[0]
    assert image.shape == (3, 64, 64) and labels.shape == (64, 64) and labels.dtype == np.int32
    assert (labels == 255).sum() == 64 * 64 - 32 * 32  # a 32 px scene padded to 64
    assert np.all(image[:, labels == 255] == 0.0)


def test_train_eval_export_round_trip(scene_root, tmp_path):
    import eval as eval_script
    import export as export_script
    from engine.trainer import train
    out = str(tmp_path / "run")
    trainer, summary = train(seg_config(scene_root, out))
    losses = [loss for _, loss in trainer.history]
    # one batch of the same 8 scenes every step: the loss must fall
    assert len(losses) == 5 and losses[-1] < losses[0], losses
    val = summary["last_val"]
    assert 0.0 <= val["miou"] <= 100.0 and val["pixels"] == 8 * 64 * 64 and len(val["iou"]) == 11
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert records[-1]["val_miou"] == pytest.approx(val["miou"])

    ckpt = os.path.join(out, "last.ckpt")
    result = eval_script.run(eval_script.parse_args(["--checkpoint", ckpt]))
    assert result["task"] == "segmentation" and result["miou"] == pytest.approx(val["miou"], abs=1e-6)
    np.testing.assert_array_equal(result["pixel_acc"], val["pixel_acc"])

    mindir = str(tmp_path / "seg.mindir")
    path, max_diff = export_script.export(export_script.parse_args(["--checkpoint", ckpt, "--output", mindir,
                                                                      "--batch_size", "4"]))
    assert path == mindir and max_diff is not None and max_diff < 1e-4
    exported = eval_script.run(eval_script.parse_args(["--mindir", mindir]))
    assert exported["miou"] == pytest.approx(val["miou"], abs=1e-3)
    assert "per-class IoU" in task.summary(exported)


RANK_SCRIPT = """import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from mindspore.communication import init, get_rank, get_group_size
init()
from engine.segmentation import SegmentationMeter
rank, size = get_rank(), get_group_size()
rng = np.random.default_rng(0)
labels = rng.integers(0, 4, (6, 5, 7))
labels[:, 0] = 255
logits = rng.standard_normal((6, 4, 5, 7))
meter = SegmentationMeter(4)
for i in range(rank, 6, size):  # each rank scores its own images
    meter.update(logits[i:i + 1], labels[i:i + 1], loss=float(i))
result = meter.all_reduce(size).result()
with open(sys.argv[2] + str(rank), "w") as handle:
    json.dump({"matrix": meter.matrix.tolist(), "result": result}, handle)
"""


@pytest.mark.skipif(__import__("shutil").which("msrun") is None, reason="msrun (MindSpore's launcher) is not on PATH")
def test_confusion_matrices_are_summed_over_msrun_ranks(tmp_path):
    """Two CPU workers each score half of the images; after all_reduce both hold the one-process result."""
    import subprocess
    from conftest import ROOT
    from engine.segmentation import SegmentationMeter
    from test_train_distributed import free_port
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    out = str(tmp_path / "rank")
    command = ["msrun", "--worker_num=2", "--local_worker_num=2", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", f"--log_dir={tmp_path / 'logs'}", "--join=True",
               "--cluster_time_out=180", str(script), ROOT, out]
    done = subprocess.run(command, cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, (6, 5, 7))
    labels[:, 0] = 255
    logits = rng.standard_normal((6, 4, 5, 7))
    whole = SegmentationMeter(4)
    for i in range(6):
        whole.update(logits[i:i + 1], labels[i:i + 1], loss=float(i))
    for rank in (0, 1):
        got = json.load(open(out + str(rank)))
        np.testing.assert_array_equal(got["matrix"], whole.matrix)
        assert got["result"]["miou"] == pytest.approx(whole.result()["miou"])
        assert got["result"]["loss"] == pytest.approx(2.5)
