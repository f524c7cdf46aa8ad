"""RetinaNet pieces against the NumPy references of tests/detection_reference.py, COCO reading, mAP, and a
detector trained, evaluated and exported through train.py / eval.py / export.py on Fashion-MNIST scenes."""
import json
import os

import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, ops

import models
from models import boxes as box_ops
from models.retinanet import RetinaNet, RetinaNetDetect, RetinaNetLoss, assign_anchors, sigmoid_focal_loss
from engine import coco, scenes
from engine.data import DataError
from engine.detection_metrics import coco_map, have_pycocotools, iou_matrix, pycocotools_map
import detection_reference as ref

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def random_boxes(rng, count, size=64.0, min_side=2.0):
    xy = rng.uniform(0, size - min_side, (count, 2))
    wh = rng.uniform(min_side, size / 2, (count, 2))
    return np.concatenate([xy, np.minimum(xy + wh, size)], axis=1)


def test_anchors_match_reference():
    anchors, counts = box_ops.generate_anchors(64)
    expected = ref.anchors(64)
    np.testing.assert_allclose(anchors, expected, rtol=1e-6, atol=1e-4)
    assert counts == [8 * 8 * 9, 4 * 4 * 9, 2 * 2 * 9, 9, 9] and sum(counts) == len(expected)
    anchors96, _ = box_ops.generate_anchors(96, ratios=(1.0,), scales_per_octave=2)
    np.testing.assert_allclose(anchors96, ref.anchors(96, ratios=(1.0,), scales_per_octave=2), rtol=1e-6, atol=1e-4)


def test_iou_and_box_coding_match_reference():
    rng = np.random.default_rng(0)
    a, b = random_boxes(rng, 7), random_boxes(rng, 5)
    b[0] = a[0]  # identical pair: IoU 1
    b[1] = [100, 100, 110, 110]  # disjoint: IoU 0
    got = box_ops.box_iou(ms.Tensor(a, ms.float32), ms.Tensor(b, ms.float32)).asnumpy()
    np.testing.assert_allclose(got, ref.iou(a, b), atol=1e-6)
    np.testing.assert_allclose(iou_matrix(a, b), ref.iou(a, b), atol=1e-12)
    anchors = random_boxes(rng, 7)
    deltas = box_ops.encode_boxes(ms.Tensor(a, ms.float32), ms.Tensor(anchors, ms.float32)).asnumpy()
    np.testing.assert_allclose(deltas, np.stack([ref.encode(x, y) for x, y in zip(a, anchors)]), rtol=1e-5,
                               atol=1e-5)
    back = box_ops.decode_boxes(ms.Tensor(deltas), ms.Tensor(anchors, ms.float32)).asnumpy()
    np.testing.assert_allclose(back, a, atol=1e-3)  # round trip
    wild = rng.normal(0, 3, (7, 4))  # large dw/dh are clamped like the reference
    got = box_ops.decode_boxes(ms.Tensor(wild, ms.float32), ms.Tensor(anchors, ms.float32)).asnumpy()
    np.testing.assert_allclose(got, np.stack([ref.decode(d, x) for d, x in zip(wild, anchors)]), rtol=1e-4, atol=1e-3)


def test_assignment_matches_reference():
    rng = np.random.default_rng(1)
    anchors, _ = box_ops.generate_anchors(64)
    gt = np.zeros((2, 4, 4), np.float32)
    valid = np.zeros((2, 4), bool)
    gt[0, :3] = random_boxes(rng, 3)
    valid[0, :3] = True
    gt[1, :1] = [[2, 3, 9, 8]]  # a small box: only its best anchor(s) by the low-quality rule
    valid[1, :1] = True
    matched, positive, negative = (t.asnumpy() for t in assign_anchors(
        ms.Tensor(anchors), ms.Tensor(gt), ms.Tensor(valid)))
    for b in range(2):
        boxes64 = gt[b][valid[b]].astype(np.float64)
        want_match, state = ref.assign(anchors.astype(np.float64), boxes64)
        _, strict = ref.assign(anchors.astype(np.float64), boxes64, tie=0.0)
        exact = state == strict  # anchors not in a near-tie for some box's best IoU
        np.testing.assert_array_equal(positive[b][exact], state[exact] == 1)
        np.testing.assert_array_equal(negative[b][exact], state[exact] == 0)
        assert (state[positive[b]] == 1).all()  # near-ties: positive only where the reference allows it
        np.testing.assert_array_equal(matched[b][state == 1], want_match[state == 1])
        for g in range(len(boxes64)):  # every box has at least one positive anchor among its best
            assert (positive[b] & (matched[b] == g)).any()
    assert positive[1].sum() >= 1 and ref.iou(anchors, gt[1, :1]).max() < 0.5


def test_focal_loss_value_and_gradient_sign():
    logits = np.array([-3.0, -0.5, 0.0, 0.7, 4.0], np.float32)
    for target in (0.0, 1.0):
        targets = np.full_like(logits, target)
        got = sigmoid_focal_loss(ms.Tensor(logits), ms.Tensor(targets)).asnumpy()
        np.testing.assert_allclose(got, [ref.focal(float(x), int(target)) for x in logits], rtol=1e-5)
        target_tensor = ms.Tensor(targets)

        def total(x):
            return sigmoid_focal_loss(x, target_tensor).sum()
        grad = ms.grad(total)(ms.Tensor(logits)).asnumpy()
        assert (grad < 0).all() if target == 1.0 else (grad > 0).all()  # pushes p towards the target
    easy, hard = ref.focal(4.0, 1), ref.focal(-1.0, 1)
    assert easy < 0.01 * hard  # well-classified examples are down-weighted


class FixedOutputs(nn.Cell):
    """Stands in for a RetinaNet: returns given logits (B, N, K) and deltas (B, N, 4) whatever the input."""

    def __init__(self, logits, deltas):
        super().__init__()
        self.logits = ms.Parameter(ms.Tensor(logits, ms.float32), name="logits")
        self.deltas = ms.Parameter(ms.Tensor(deltas, ms.float32), name="deltas")

    def construct(self, images):
        return self.logits + 0.0 * images.sum(), self.deltas


def test_loss_matches_reference():
    rng = np.random.default_rng(2)
    anchors, _ = box_ops.generate_anchors(64)
    num_classes = 3
    logits = rng.normal(-2, 1.5, (2, len(anchors), num_classes))
    deltas = rng.normal(0, 0.3, (2, len(anchors), 4))
    # boxes near anchors inside the image: clear best anchors (no IoU ties, which float32 may split)
    inside = np.flatnonzero((anchors.min(axis=1) >= 0) & (anchors.max(axis=1) <= 64))
    near = anchors[rng.choice(inside, 5, replace=False)] + rng.uniform(-1.5, 1.5, (5, 4))
    targets = np.full((2, 3, 5), -1, np.float32)
    targets[0, :2] = np.concatenate([near[:2], [[0], [2]]], axis=1)
    targets[1, :3] = np.concatenate([near[2:], [[1], [1], [0]]], axis=1)
    loss = RetinaNetLoss(FixedOutputs(logits, deltas), anchors, num_classes)(
        ms.Tensor(np.zeros((2, 3, 64, 64), np.float32)), ms.Tensor(targets)).asnumpy()
    gt_boxes = [t[t[:, 4] >= 0, :4].astype(np.float64) for t in targets]
    gt_labels = [t[t[:, 4] >= 0, 4].astype(int) for t in targets]
    want = ref.retinanet_loss(logits, deltas, anchors.astype(np.float64), gt_boxes, gt_labels)
    np.testing.assert_allclose(loss, want, rtol=1e-4)
    empty = np.full((2, 3, 5), -1, np.float32)  # images without objects: focal loss of the negatives only
    loss = RetinaNetLoss(FixedOutputs(logits, deltas), anchors, num_classes)(
        ms.Tensor(np.zeros((2, 3, 64, 64), np.float32)), ms.Tensor(empty)).asnumpy()
    np.testing.assert_allclose(loss, ref.retinanet_loss(logits, deltas, anchors.astype(np.float64),
                                                        [np.zeros((0, 4))] * 2, [np.zeros(0, int)] * 2), rtol=1e-4)


class StubDetector(FixedOutputs):
    def __init__(self, logits, deltas, image_size):
        super().__init__(logits, deltas)
        self.anchors_np, self.level_counts = box_ops.generate_anchors(image_size)
        self.level_counts = tuple(self.level_counts)
        self.num_classes = logits.shape[2]
        self.img_size = image_size


def test_decoding_and_nms_match_reference():
    rng = np.random.default_rng(3)
    anchors, counts = box_ops.generate_anchors(64)
    logits = rng.normal(-2.5, 1.5, (2, len(anchors), 3))
    deltas = rng.normal(0, 0.2, (2, len(anchors), 4))
    model = StubDetector(logits, deltas, 64)
    detect = RetinaNetDetect(model, score_threshold=0.2, nms_iou=0.5, pre_nms_top_k=50, max_detections=20)
    out_boxes, out_scores, out_labels = (t.asnumpy() for t in detect(ms.Tensor(np.zeros((2, 3, 64, 64),
                                                                                        np.float32))))
    assert out_boxes.shape == (2, 20, 4) and out_labels.dtype == np.int32
    for b in range(2):
        want = ref.detect(logits[b], deltas[b], anchors.astype(np.float64), counts, 64, 0.2, 0.5, 50, 20)
        keep = out_labels[b] >= 0
        assert keep.sum() == len(want) and (out_scores[b][~keep] == 0).all()
        np.testing.assert_allclose(out_scores[b][keep], [w[0] for w in want], rtol=1e-5)
        np.testing.assert_array_equal(out_labels[b][keep], [w[1] for w in want])
        np.testing.assert_allclose(out_boxes[b][keep], np.stack([w[2] for w in want]), atol=1e-3)


def test_map_hand_cases_and_pycocotools():
    gt = [np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float)]
    labels = [np.array([0, 0])]
    perfect = coco_map(gt, labels, gt, [np.array([0.9, 0.8])], labels, num_classes=2)
    assert perfect["mAP"] == pytest.approx(1.0) and perfect["per_class_AP"] == [1.0, -1.0]
    # one hit (IoU 1) ranked below a miss: precision 1/2 at recall 1/2, then 2/3 at recall 1 ... hand-computed
    dets = [np.array([[50, 50, 60, 60], [0, 0, 10, 10], [20, 20, 30, 30]], float)]
    result = coco_map(gt, labels, dets, [np.array([0.9, 0.8, 0.7])], [np.array([0, 0, 0])], num_classes=1)
    assert result["mAP50"] == pytest.approx((51 * 0.5 + 50 * (2 / 3)) / 101 + (0.0), rel=1e-6) or \
        result["mAP50"] == pytest.approx((51 * (2 / 3) + 50 * (2 / 3)) / 101, rel=1e-6)
    if not have_pycocotools():
        pytest.skip("pycocotools is not installed")
    rng = np.random.default_rng(4)
    for _ in range(4):
        gt_boxes, gt_labels, det_boxes, det_scores, det_labels = [], [], [], [], []
        for _ in range(5):
            n = int(rng.integers(0, 5))
            truth = random_boxes(rng, n)
            gt_boxes.append(truth)
            gt_labels.append(rng.integers(0, 3, n))
            d = int(rng.integers(0, 7))
            source = rng.integers(0, max(n, 1), d)
            noisy = (truth[source] if n else random_boxes(rng, d)) + rng.normal(0, 2, (d, 4))
            noisy[:, 2:] = np.maximum(noisy[:, 2:], noisy[:, :2] + 1)
            det_boxes.append(noisy)
            det_scores.append(rng.uniform(size=d))
            det_labels.append(gt_labels[-1][source] if n else rng.integers(0, 3, d))
        ours = coco_map(gt_boxes, gt_labels, det_boxes, det_scores, det_labels, 3)
        theirs = pycocotools_map(gt_boxes, gt_labels, det_boxes, det_scores, det_labels, 3)
        for key in ("mAP", "mAP50", "mAP75"):
            assert ours[key] == pytest.approx(theirs[key], abs=1e-9)
        np.testing.assert_allclose(ours["per_class_AP"], theirs["per_class_AP"], atol=1e-9)


def _write_coco(root, split, coco_dict, image_names=(), size=32):
    from PIL import Image
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    os.makedirs(os.path.join(root, "images", split), exist_ok=True)
    for name in image_names:
        Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(os.path.join(root, "images", split, name))
    with open(coco.annotation_path(root, split), "w") as handle:
        if isinstance(coco_dict, str):
            handle.write(coco_dict)
        else:
            json.dump(coco_dict, handle)


def test_coco_reading_handles_and_names_bad_input(tmp_path):
    root = str(tmp_path)
    images = [{"id": 1, "file_name": "a.png", "width": 32, "height": 32},
              {"id": 2, "file_name": "b.png", "width": 32, "height": 32}]
    cats = [{"id": 5, "name": "x"}, {"id": 7, "name": "y"}]
    anns = [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [20, 20, 30, 30]},  # clipped to 32
            {"id": 2, "image_id": 1, "category_id": 5, "bbox": [40, 1, 5, 5]},  # outside: dropped
            {"id": 3, "image_id": 1, "category_id": 5, "bbox": [3, 3, 0, 4]},  # degenerate: dropped
            {"id": 4, "image_id": 1, "category_id": 5, "bbox": [1, 2, 3, 4], "iscrowd": 1}]
    _write_coco(root, "train", {"images": images, "annotations": anns, "categories": cats}, ["a.png", "b.png"])
    split = coco.scan_coco(root, "train")
    assert split.class_names == ["x", "y"] and split.category_ids == [5, 7]
    np.testing.assert_allclose(split.boxes[0], [[20, 20, 32, 32]])
    assert split.labels[0].tolist() == [1] and len(split.boxes[1]) == 0  # image 2 has no objects: kept
    assert split.counts == {"clipped": 2, "dropped_degenerate": 2, "crowd": 1, "empty_images": 1}
    bad_cases = [
        ("{not json", "not valid JSON"),
        ({"images": images, "annotations": [dict(anns[0], category_id=3)], "categories": cats},
         "annotation id 1 has category_id 3"),
        ({"images": images, "annotations": [dict(anns[0], image_id=9)], "categories": cats},
         "annotation id 1 refers to image id 9"),
        ({"images": images, "annotations": [dict(anns[0], bbox=[1, 2, 3])], "categories": cats},
         r"annotation id 1 has bbox \[1, 2, 3\]"),
        ({"images": images + [{"id": 3, "file_name": "gone.png"}], "annotations": [], "categories": cats},
         "(?s)1 missing image file.*image id 3: .*gone.png"),
        ({"images": images, "annotations": []}, "'categories' must be a list"),
    ]
    for content, message in bad_cases:
        _write_coco(root, "val", content, ["a.png", "b.png"])
        with pytest.raises(DataError, match=message):
            coco.scan_coco(root, "val")
    with pytest.raises(DataError, match="annotation file not found"):
        coco.scan_coco(root, "test")


def test_detector_input_size_and_registry():
    detectors = models.list_models("retinanet_*")
    for name in ("retinanet_pvt_tiny", "retinanet_pvt_small", "retinanet_pvt_large", "retinanet_resnet50",
                 "retinanet_swin_tiny"):
        assert name in detectors and name + "_acmix" in detectors
        assert models.model_task(name) == "detection" and models.model_task(name + "_acmix") == "detection"
    assert {"pvt_medium", "pvt_large", "pvt_medium_acmix", "pvt_large_acmix"} <= set(models.list_models("pvt_*"))
    with pytest.raises(ValueError, match="multiple of 32"):
        RetinaNet("resnet_tiny", num_classes=3, img_size=70)


@pytest.mark.parametrize("backbone, kwargs", [
    ("resnet_tiny_acmix", {"stem": "imagenet"}),
    ("swin_tiny_acmix", {"embed_dim": 8, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1), "window_size": 2}),
])
def test_backbone_families_feed_the_fpn(backbone, kwargs):
    net = RetinaNet(backbone, num_classes=2, img_size=64, backbone_kwargs=kwargs, fpn_channels=8, head_channels=8,
                    head_convs=1)
    logits, deltas = net(ms.Tensor(np.zeros((1, 3, 64, 64), np.float32)))
    assert logits.shape == (1, len(net.anchors_np), 2) and deltas.shape == (1, len(net.anchors_np), 4)
    with pytest.raises(ValueError, match="built for 64x64"):
        net(ms.Tensor(np.zeros((1, 3, 96, 96), np.float32)))


@pytest.fixture(scope="module")
def scene_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("scenes"))
    params = dict(size=64, min_items=1, max_items=3, min_frac=0.2, max_frac=0.5, max_occlusion=0.3)
    if os.path.isdir(FASHION_MNIST_DIR):
        scenes.make_scenes(root, train=32, val=8, seed=1, source=FASHION_MNIST_DIR, log=lambda *_: None, **params)
    else:  # synthetic ellipse "garments" (same format)
        from test_scenes import _pool
        items, labels = _pool(40)
        for split, count in (("train", 32), ("val", 8)):
            scenes.write_split(root, split, count, items, labels, seed=1, log=lambda *_: None, **params)
    return root


TINY_DETECTOR = ("{backbone_kwargs: {embed_dims: [8, 16, 16, 16], num_heads: [1, 1, 1, 1], depths: [1, 1, 1, 1]}, "
                 "fpn_channels: 16, head_channels: 16, head_convs: 1}")


def test_detector_trains_evaluates_and_exports(scene_root, tmp_path, capsys):
    """train.py: the loss falls; eval.py of the checkpoint and of the exported MINDIR give the same mAP."""
    import yaml
    import eval as eval_cli
    import export as export_cli
    from engine.config import build_config
    from engine.trainer import train
    out = str(tmp_path / "run")
    cfg = build_config(file_values=dict(
        model="retinanet_pvt_tiny_acmix", model_overrides=yaml.safe_load(TINY_DETECTOR), data_dir=scene_root,
        image_size=64, batch_size=8, epochs=2, opt="adamw", lr=2e-3, weight_decay=1e-4, num_workers=1, plot=False,
        log_interval=2, mean=[0.5], std=[0.25], output_dir=out, task_options={"score_threshold": 0.02}))
    trainer, summary = train(cfg)
    losses = [loss for _, loss in trainer.history]
    assert len(losses) == 8 and np.mean(losses[-2:]) < np.mean(losses[:2])
    assert summary["best_top1"] is not None  # best mAP
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert any("val_mAP" in r for r in records)
    json_path = str(tmp_path / "eval.json")
    assert eval_cli.main(["--checkpoint", os.path.join(out, "last.ckpt"), "--json", json_path]) == 0
    from_checkpoint = json.load(open(json_path))
    assert "mAP" in capsys.readouterr().out and from_checkpoint["task"] == "detection"
    mindir = str(tmp_path / "det.mindir")
    assert export_cli.main(["--checkpoint", os.path.join(out, "last.ckpt"), "--output", mindir]) == 0
    assert json.load(open(mindir + ".json"))["task"] == "detection"
    assert eval_cli.main(["--mindir", mindir, "--data_dir", scene_root, "--json", json_path]) == 0
    from_mindir = json.load(open(json_path))
    for key in ("mAP", "mAP50", "mAP75", "detections"):
        assert from_mindir[key] == pytest.approx(from_checkpoint[key], abs=1e-6)


def test_bench_detection_size_table(tmp_path, capsys):
    from benchmarks.bench_detection import main
    out = str(tmp_path / "bench.md")
    assert main(["--flops_only", "--params_only", "--flops_models", "retinanet_pvt_tiny", "--flops_size", "64", "64",
                 "--out", out]) == 0
    text = open(out).read()
    row = json.load(open(out + ".json"))["sizes"]["retinanet_pvt_tiny"]
    # PVT-T RetinaNet, 80 classes: ~22.6 M at 64 px (position embeddings scale with the input; PVT's paper: 23.0 M)
    assert 22.0 < row["params_m"] < 23.2 and row["gmacs"] is None
    assert f"| retinanet_pvt_tiny | {row['params_m']:.2f} |" in text and "| 230 |" in text  # paper: 230 GFLOPs
