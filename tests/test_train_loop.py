"""The lean training loop (no per-step host synchronisation) against the per-step loop it replaced.

The reference below is the loop ``Trainer.fit`` ran before: one ``TrainStep`` call per batch from the host
iterator, then loss, finite flag, lr and global step copied to the host after every step.
"""
import mindspore as ms
import numpy as np
import pytest

from conftest import tiny_train_config
from engine.data import train_dataset
from engine.logger import read_metrics
from engine.trainer import Trainer

# dynamic loss scaling with O2, EMA and clipping: the device-side flags and sums see real use
FEATURES = dict(opt="adamw", lr=0.01, weight_decay=0.05, ema_decay=0.9, amp_level="O2", loss_scale="dynamic",
                loss_scale_value=2.0 ** 24, clip_grad_norm=1.0, epochs=1, val_split=None, log_interval=6)


ON_CPU = ms.get_context("device_target") == "CPU"


def assert_same(actual, expected, err_msg=""):
    """Bit-identical on CPU; on GPU/Ascend some kernels (atomic adds) are not deterministic run to run."""
    if ON_CPU:
        np.testing.assert_array_equal(actual, expected, err_msg=err_msg)
    else:
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-6, err_msg=err_msg)


def per_step_reference(trainer):
    """[(global step, loss, lr, grads finite)] of one epoch, everything read back after every step."""
    cfg = trainer.cfg
    trainer.network.set_train(True)
    rows = []
    dataset = train_dataset(cfg, trainer.train_index, trainer.num_classes, cfg.seed, 1, 0)
    for images, labels in dataset.create_tuple_iterator(num_epochs=1):
        loss, lr, finite = trainer.train_step(images, labels)
        rows.append((trainer.global_step(), float(loss.asnumpy()), float(lr.asnumpy().reshape(-1)[0]),
                     bool(finite.asnumpy())))
        if len(rows) == trainer.steps_per_epoch:
            break
    return rows


@pytest.fixture(scope="module")
def reference(image_folder, tmp_path_factory):
    trainer = Trainer(tiny_train_config(image_folder[0], str(tmp_path_factory.mktemp("ref")), **FEATURES))
    rows = per_step_reference(trainer)
    weights = {name: param.asnumpy() for name, param in trainer.named_params}
    return rows, weights


def test_lean_loop_gives_the_per_step_losses(reference, image_folder, tmp_path):
    rows, weights = reference
    trainer = Trainer(tiny_train_config(image_folder[0], str(tmp_path), **FEATURES))
    summary = trainer.fit()
    assert [step for step, _ in trainer.history] == [row[0] for row in rows] == list(range(1, 19))
    assert_same([loss for _, loss in trainer.history], [row[1] for row in rows])
    # the initial scale 2^24 overflows at first: those updates were skipped, as in the reference
    overflowed = sum(not row[3] for row in rows)
    assert overflowed > 0 and summary["skipped_steps"] == overflowed
    for name, param in trainer.named_params:
        assert_same(param.asnumpy(), weights[name], err_msg=name)
    # progress lines: the mean loss of their window and the lr of their last step
    lines = [r for r in read_metrics(f"{tmp_path}/metrics.jsonl") if r["type"] == "train"]
    assert [r["step"] for r in lines] == [6, 12, 18]
    for record in lines:
        window = rows[record["step"] - 6:record["step"]]
        assert record["loss"] == pytest.approx(np.mean([row[1] for row in window]), rel=1e-6)
        assert record["lr"] == pytest.approx(window[-1][2], rel=1e-6)


def fake_data_sink(calls):
    """``ms.data_sink`` as it behaves on Ascend/GPU (``sink_size`` steps per call, the last step's output
    returned), fed from the host iterator so that the sunk code path runs on CPU."""
    def data_sink(fn, dataset, sink_size=1, jit_config=None):
        iterator = dataset.create_tuple_iterator(num_epochs=1)

        def run():
            calls.append(sink_size)
            out = None
            for _ in range(sink_size):
                out = fn(*next(iterator))
            return out
        return run
    return data_sink


def test_sunk_calls_end_where_the_host_acts(reference, image_folder, tmp_path, monkeypatch):
    import mindspore as ms
    rows, weights = reference
    calls = []
    monkeypatch.setattr(ms, "data_sink", fake_data_sink(calls))
    trainer = Trainer(tiny_train_config(image_folder[0], str(tmp_path), sink_size=4, save_every_steps=9,
                                        **FEATURES))
    trainer.sinking = True
    trainer.fit()
    # sink_size 4 is lowered to gcd(4, 18 steps per epoch, log_interval 6, save_every_steps 9) = 1
    assert set(calls) == {1} and len(calls) == 18
    assert_same([loss for _, loss in trainer.history], [row[1] for row in rows])

    calls.clear()
    trainer = Trainer(tiny_train_config(image_folder[0], str(tmp_path / "b"), sink_size=3, **FEATURES))
    trainer.sinking = True
    trainer.fit()
    assert calls == [3] * 6
    assert [step for step, _ in trainer.history] == [3, 6, 9, 12, 15, 18]
    expected = {row[0]: row[1] for row in rows}
    assert_same([loss for _, loss in trainer.history], [expected[s] for s, _ in trainer.history])
    for name, param in trainer.named_params:
        assert_same(param.asnumpy(), weights[name], err_msg=name)
    lines = [r for r in read_metrics(f"{tmp_path}/b/metrics.jsonl") if r["type"] == "train"]
    assert [r["loss"] for r in lines] == pytest.approx(
        [np.mean([row[1] for row in rows[end - 6:end]]) for end in (6, 12, 18)], rel=1e-6)


@pytest.mark.skipif(not ON_CPU, reason="checks the CPU fallback")
def test_cpu_runs_the_host_loop(image_folder, tmp_path):
    # measured fact behind the host loop: MindSpore's data sinking refuses the CPU backend
    from mindspore import dataset as ds
    with pytest.raises(ValueError, match="Data sinking supports ascend or gpu"):
        ms.data_sink(lambda x: x, ds.NumpySlicesDataset({"x": np.ones((2, 1), np.float32)}), sink_size=1)
    trainer = Trainer(tiny_train_config(image_folder[0], str(tmp_path), data_sink=True, **FEATURES))
    assert not trainer.sinking


@pytest.mark.skipif(ON_CPU, reason="ms.data_sink refuses the CPU backend (benchmarks/device_check.sh runs this)")
def test_real_data_sink_gives_the_per_step_losses(reference, image_folder, tmp_path):
    rows, weights = reference
    trainer = Trainer(tiny_train_config(image_folder[0], str(tmp_path), data_sink=True, sink_size=3, **FEATURES))
    assert trainer.sinking
    trainer.fit()
    assert [step for step, _ in trainer.history] == [3, 6, 9, 12, 15, 18]
    expected = {row[0]: row[1] for row in rows}
    assert_same([loss for _, loss in trainer.history], [expected[s] for s, _ in trainer.history])
    for name, param in trainer.named_params:
        assert_same(param.asnumpy(), weights[name], err_msg=name)


def test_meter_counts_of_shards_add_up_to_the_whole():
    from engine.metrics import ClassificationMeter
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(37, 6)), rng.integers(0, 6, 37)
    whole, parts = ClassificationMeter(6), [ClassificationMeter(6), ClassificationMeter(6)]
    whole.update(logits, labels)
    for rank, part in enumerate(parts):  # the validation shards: every 2nd image
        part.update(logits[rank::2], labels[rank::2])
    merged = ClassificationMeter(6)
    merged.add_counts(parts[0].counts() + parts[1].counts())
    assert merged.result() == pytest.approx(whole.result(), rel=1e-12)
    np.testing.assert_array_equal(merged.confusion, whole.confusion)
    # the confusion matrix against an explicit loop
    expected = np.zeros((6, 6), np.int64)
    for row, label in zip(logits, labels):
        expected[label, int(np.argmax(row))] += 1
    np.testing.assert_array_equal(whole.confusion, expected)
    assert [acc for _, acc, _ in whole.per_class()] == pytest.approx(
        [100.0 * expected[k, k] / expected[k].sum() if expected[k].sum() else None for k in range(6)])


def test_progress_lines_report_rate_and_eta(monkeypatch):
    from engine import logger
    lines = []
    clock = iter([100.0, 101.0, 102.0, 130.0, 130.0, 130.0])
    monkeypatch.setattr(logger.time, "time", lambda: next(clock))
    progress = logger.RateProgress(lines.append, 400, "validation", interval_s=10)  # starts at t=100
    progress.update(100)  # t=101: under the interval, silent
    progress.update(100)  # t=102: silent
    progress.update(100)  # t=130: 300 images in 30 s -> 10 img/s, 100 left -> eta 10 s
    assert lines == ["validation: 300/400 img 10.0 img/s eta 0:00:10"]
    progress.update(100)
    assert progress.finish() == "validation: 400 img in 30.0 s (13.3 img/s)" == lines[-1]


def erasing_reference(images, draws, prob, scale=(0.02, 0.33), ratio=(0.3, 3.3), attempts=10):
    """MindSpore's vision.RandomErasing (value 0, bounded) per image, an explicit loop, with given draws."""
    out = images.copy()
    _, _, height, width = images.shape
    for b in range(len(images)):
        if not draws[b, 0] < prob:
            continue
        for attempt in range(attempts):
            u = draws[b, 1 + 4 * attempt:5 + 4 * attempt]
            area = np.float32(scale[0] + (scale[1] - scale[0]) * u[0]) * np.float32(height * width)
            aspect = np.float32(ratio[0] + (ratio[1] - ratio[0]) * u[1])
            w = int(np.round(np.sqrt(area * aspect)))
            h = int(np.round(np.float32(w) / aspect))
            if h < height and w < width:
                top, left = int(u[2] * (height - h + 1)), int(u[3] * (width - w + 1))
                out[b, :, top:top + h, left:left + w] = 0
                break
    return out


@pytest.mark.parametrize("size, prob", [((12, 12), 0.5), ((16, 40), 1.0), ((3, 3), 1.0)])
def test_batch_random_erasing_against_a_loop(size, prob):
    from engine.step import BatchRandomErasing
    rng = np.random.default_rng(sum(size))
    images = rng.normal(size=(64, 2) + size).astype(np.float32) + 5.0  # no zero pixels before erasing
    draws = rng.random((64, 41), dtype=np.float32)
    erased = BatchRandomErasing(prob)(ms.Tensor(images), ms.Tensor(draws)).asnumpy()
    expected = erasing_reference(images, draws, prob)
    np.testing.assert_array_equal(erased, expected)
    touched = (erased == 0).any(axis=(1, 2, 3))
    if size == (3, 3):  # tiny images: most rectangles do not fit, some do
        assert 0 < touched.sum() < 64
    else:
        assert touched.sum() == pytest.approx(64 * prob, abs=12)


def test_image_check_runs_on_rank_0_only(tmp_path, monkeypatch):
    """Trainer._check_images with a stand-in for the all-reduce: what ranks 0 and 1 of two do."""
    import types
    import engine.data as data
    from engine.data import DataError, image_checker, scan_split
    from engine.trainer import Trainer as TrainerClass
    from conftest import write_generated_split
    monkeypatch.setenv("ACMIX_CACHE_DIR", str(tmp_path / "cache"))
    write_generated_split(str(tmp_path), "train", ["a", "b"], 3)
    (tmp_path / "train" / "a" / "broken.png").write_bytes(b"not an image")
    decoded = []
    real = data._image_problem
    monkeypatch.setattr(data, "_image_problem", lambda path: decoded.append(path) or real(path))

    class AllReduceSum:  # this rank's value plus what the other rank contributes
        def __init__(self, others):
            self.others = others

        def sum(self, values):
            return np.array([float(values[0]) + self.others])

    def rank(number, bad_images):
        others = 1.0 if number == 1 else 0.0  # rank 0 finds the broken file, rank 1 contributes 0
        fake = types.SimpleNamespace(sync=AllReduceSum(others), rank=number,
                                     cfg=types.SimpleNamespace(bad_images=bad_images))
        with image_checker(lambda index: TrainerClass._check_images(fake, index)):
            return scan_split(str(tmp_path), "train", bad_images=bad_images)

    with pytest.raises(DataError, match="rank 0 found 1 unreadable image"):
        rank(1, "fail")
    assert decoded == []  # rank 1 decoded nothing
    with pytest.raises(DataError, match="broken.png"):
        rank(0, "fail")
    assert len(decoded) == 7
    index = rank(1, "skip")  # to skip the same files, rank 1 needs the list: from rank 0's cache here
    assert len(index) == 6 and len(decoded) == 7
