"""Object detection on COCO-format data (``engine.coco``): RetinaNet loss, COCO box mAP.

``task_options`` (defaults in ``OPTIONS``): ``score_threshold``, ``nms_iou``, ``pre_nms_top_k``,
``max_detections`` (decoding, ``models.retinanet.RetinaNetDetect``); ``pos_iou``, ``neg_iou``,
``focal_alpha``, ``focal_gamma``, ``box_weight`` (the loss); ``max_objects`` (padding of the training targets;
null: the largest object count of the training split); ``evaluator``: 'auto' (pycocotools when installed,
else the built-in NumPy COCOeval of ``engine.detection_metrics``), 'pycocotools' or 'builtin'.

Metrics (percent): mAP (IoU 0.50:0.95), mAP50, mAP75, per-class AP; best.ckpt follows mAP. Detections are
mapped back to each image's original pixels before scoring.
"""
import numpy as np

NAME = "detection"
PRIMARY_METRIC = "mAP"
OPTIONS = {"score_threshold": 0.05, "nms_iou": 0.5, "pre_nms_top_k": 1000, "max_detections": 100,
           "pos_iou": 0.5, "neg_iou": 0.4, "focal_alpha": 0.25, "focal_gamma": 2.0, "box_weight": 1.0,
           "max_objects": None, "evaluator": "auto"}
EVALUATORS = ("auto", "pycocotools", "builtin")


def _options(cfg):
    import sys
    from ..config import ConfigError
    from . import task_options
    options = task_options(cfg, sys.modules[__name__])
    if options["evaluator"] not in EVALUATORS:
        raise ConfigError(f"task_options.evaluator must be one of {EVALUATORS}, got {options['evaluator']!r}")
    if not 0.0 <= options["neg_iou"] <= options["pos_iou"] <= 1.0:
        raise ConfigError(f"task_options need 0 <= neg_iou <= pos_iou <= 1, got {options['neg_iou']} and "
                          f"{options['pos_iou']}")
    for key in ("pre_nms_top_k", "max_detections"):
        if not isinstance(options[key], int) or options[key] < 1:
            raise ConfigError(f"task_options.{key} must be an integer >= 1, got {options[key]!r}")
    if options["max_objects"] is not None and (not isinstance(options["max_objects"], int)
                                               or options["max_objects"] < 1):
        raise ConfigError(f"task_options.max_objects must be an integer >= 1 or null, got {options['max_objects']!r}")
    if cfg.in_chans != 3:
        raise ConfigError("the detection task reads RGB images: in_chans must be 3")
    return options


def scan(cfg):
    from ..coco import scan_coco
    from ..data import DataError
    _options(cfg)
    train = scan_coco(cfg.data_dir, cfg.train_split, cfg.verify_images)
    val = scan_coco(cfg.data_dir, cfg.val_split, cfg.verify_images) if cfg.val_split else None
    if val is not None and val.class_names != train.class_names:
        raise DataError(f"the categories of {val.annotation_file} differ from those of {train.annotation_file}: "
                        f"{val.class_names} vs {train.class_names}")
    return train, val, train.class_names


def train_dataset(cfg, data, num_classes, seed, num_shards=1, shard_id=0):
    from ..coco import train_dataset as coco_train_dataset
    max_objects = _options(cfg)["max_objects"] or data.max_objects()
    return coco_train_dataset(cfg, data, seed, max_objects, num_shards, shard_id)


def _detector(network):
    """The RetinaNet inside ``network`` (the model itself or its mixed-precision wrapper)."""
    from models.retinanet import RetinaNet
    if isinstance(network, RetinaNet):
        return network
    for _, cell in network.cells_and_names():
        if isinstance(cell, RetinaNet):
            return cell
    raise TypeError(f"the detection task needs a RetinaNet model, got {type(network).__name__}")


def loss_network(network, cfg, num_classes):
    from models.retinanet import RetinaNetLoss
    options = _options(cfg)
    model = _detector(network)
    return RetinaNetLoss(network, model.anchors_np, model.num_classes, options["pos_iou"], options["neg_iou"],
                         options["focal_alpha"], options["focal_gamma"], options["box_weight"])


_INFERENCE = {}  # (id(network), decoding options) -> RetinaNetDetect: validation compiles it once per run


def inference_network(model, cfg, network=None):
    """``RetinaNetDetect`` on ``model``: images -> (boxes (B, D, 4), scores (B, D), labels (B, D))."""
    from models.retinanet import RetinaNetDetect
    options = _options(cfg)
    keys = ("score_threshold", "nms_iou", "pre_nms_top_k", "max_detections")
    key = (id(network or model),) + tuple(options[k] for k in keys)
    if key not in _INFERENCE:
        _INFERENCE[key] = RetinaNetDetect(_detector(model), *(options[k] for k in keys), network=network)
    return _INFERENCE[key]


def eval_data(cfg, data_dir, split):
    from ..coco import scan_coco
    data = scan_coco(data_dir, split, verify_images=True)
    return data, data.class_names


def evaluate(predict, cfg, data, num_classes, batch_size=None, fixed_batch=None):
    """Run ``predict`` over a CocoSplit and score it; returns the metrics dict (percent)."""
    from ..coco import eval_dataset
    from ..detection_metrics import coco_map, have_pycocotools, pycocotools_map
    from ..config import ConfigError
    options = _options(cfg)
    det_boxes, det_scores, det_labels = [None] * len(data), [None] * len(data), [None] * len(data)
    batch = fixed_batch or batch_size or cfg.eval_batch_size or cfg.batch_size
    for images, positions in eval_dataset(cfg, data, batch).create_tuple_iterator(num_epochs=1, output_numpy=True):
        size = images.shape[0]
        if fixed_batch is not None and size != fixed_batch:
            images = np.concatenate([images, np.zeros((fixed_batch - size,) + images.shape[1:], images.dtype)])
        boxes, scores, labels = (np.asarray(item)[:size] for item in predict(images))
        if not np.isfinite(boxes).all() or not np.isfinite(scores).all():
            raise ValueError(f"the detector produced NaN or inf for images {positions.tolist()}: its weights are broken")
        for row, position in enumerate(positions.tolist()):
            image = data.images[position]
            keep = labels[row] >= 0
            scale = np.array([image["width"], image["height"]] * 2, np.float32) / cfg.image_size
            det_boxes[position] = boxes[row][keep] * scale
            det_scores[position] = scores[row][keep]
            det_labels[position] = labels[row][keep]
    evaluator = options["evaluator"]
    if evaluator == "auto":
        evaluator = "pycocotools" if have_pycocotools() else "builtin"
    if evaluator == "pycocotools" and not have_pycocotools():
        raise ConfigError("task_options.evaluator is 'pycocotools' but it is not installed (pip install pycocotools)")
    score = pycocotools_map if evaluator == "pycocotools" else coco_map
    result = score(data.boxes, data.labels, det_boxes, det_scores, det_labels, num_classes,
                   options["max_detections"])
    result = {key: (100.0 * value if key != "per_class_AP" else [100.0 * v if v >= 0 else None for v in value])
              for key, value in result.items()}
    result.update(evaluator=evaluator, images=len(data), objects=int(sum(len(b) for b in data.boxes)),
                  detections=int(sum(len(s) for s in det_scores)))
    result["per_class"] = {name: ap for name, ap in zip(data.class_names, result.pop("per_class_AP"))}
    return result


def validate(network, cfg, data, num_classes):
    import mindspore as ms
    detect = inference_network(network, cfg, network=network)

    def predict(images):
        return tuple(item.asnumpy() for item in detect(ms.Tensor(images)))
    return evaluate(predict, cfg, data, num_classes)


def record(result):
    return {"val_mAP": result["mAP"], "val_mAP50": result["mAP50"], "val_mAP75": result["mAP75"]}


def describe(result):
    return f"val mAP {result['mAP']:.2f} mAP50 {result['mAP50']:.2f} mAP75 {result['mAP75']:.2f}"


def summary(result):
    lines = [f"{result['source']} on {result['data']}: mAP {result['mAP']:.2f}  mAP50 {result['mAP50']:.2f}  "
             f"mAP75 {result['mAP75']:.2f}  ({result['images']} images, {result['objects']} objects, "
             f"{result['detections']} detections; {result['evaluator']})"]
    width = max(len(name) for name in result["per_class"])
    for name, ap in result["per_class"].items():
        lines.append(f"  {name:<{width}}  " + (f"AP {ap:6.2f}" if ap is not None else "no objects"))
    return "\n".join(lines)
