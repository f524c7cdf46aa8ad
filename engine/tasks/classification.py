"""Image classification on an ImageFolder tree (the default task): cross entropy, top-1/top-5 accuracy.

See ``engine/tasks/__init__.py`` for the interface; the pieces live in engine.data, engine.losses and
engine.metrics.
"""
NAME = "classification"
PRIMARY_METRIC = "top1"
OPTIONS = {}


def scan(cfg):
    from ..data import check_same_classes, scan_split
    train = scan_split(cfg.data_dir, cfg.train_split, cfg.verify_images, cfg.bad_images)
    val = None
    if cfg.val_split:
        val = scan_split(cfg.data_dir, cfg.val_split, cfg.verify_images, cfg.bad_images)
        check_same_classes(train, val)
    return train, val, train.classes


def train_dataset(cfg, data, num_classes, seed, num_shards=1, shard_id=0):
    from ..data import train_dataset as classification_train_dataset
    return classification_train_dataset(cfg, data, num_classes, seed, num_shards, shard_id)


def loss_network(network, cfg, num_classes):
    from ..losses import SmoothedCrossEntropy
    from ..step import NetWithLoss
    return NetWithLoss(network, SmoothedCrossEntropy(cfg.label_smoothing))


def inference_network(model, cfg):
    return model


def evaluate(predict, cfg, data, num_classes, batch_size=None, fixed_batch=None):
    from ..data import eval_dataset
    from ..metrics import evaluate as classification_evaluate
    return classification_evaluate(predict, eval_dataset(cfg, data, batch_size), num_classes, fixed_batch)


SHARDED_VALIDATION = True  # validate() takes the data-parallel shard (engine.trainer.Trainer.validate)


def validate(network, cfg, data, num_classes, num_shards=1, shard_id=0, sum_counts=None, report=None):
    """Metrics of ``network`` on ``data``. Data parallel: this rank evaluates every ``num_shards``-th image from
    ``shard_id`` on and ``sum_counts`` (a ``ClassificationMeter.counts()`` vector -> its sum over the ranks)
    combines the shards exactly. ``report``: where progress lines go (img/s, ETA), or None."""
    import mindspore as ms
    from ..data import eval_dataset
    from ..logger import RateProgress
    from ..runtime import ReleasingCaller
    from ..metrics import ClassificationMeter, evaluate as classification_evaluate

    run = ReleasingCaller(network)

    def predict(images):
        return run(ms.Tensor(images)).asnumpy()
    shard = len(range(shard_id, len(data), num_shards))
    progress = RateProgress(report, shard, "validation" + (
        f" (rank {shard_id} of {num_shards}, {shard} of {len(data)} images)" if num_shards > 1 else ""))
    if shard:
        meter = classification_evaluate(predict, eval_dataset(cfg, data, None, num_shards, shard_id), num_classes,
                                        progress=progress)
    else:
        meter = ClassificationMeter(num_classes)
    if sum_counts is not None:
        total = ClassificationMeter(num_classes)
        total.add_counts(sum_counts(meter.counts()))
        meter = total
    return meter.result()


def record(result):
    return {"val_top1": result["top1"], "val_top5": result["top5"], "val_loss": result["loss"]}


def describe(result):
    return f"val top-1 {result['top1']:.2f}% top-5 {result['top5']:.2f}% loss {result['loss']:.4f}"


def eval_data(cfg, data_dir, split):
    """(data, class names) of one split for eval.py."""
    from ..data import scan_split
    index = scan_split(data_dir, split, verify_images=True, bad_images="fail")
    return index, index.classes


def summary(result):
    return (f"{result['source']} on {result['data']}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
            f"loss {result['loss']:.4f}  ({result['count']} images)")
