"""engine/checkpoint.py: atomic saves, meta values, strict loading and its key report."""
import os

import numpy as np
import pytest
import mindspore as ms

from conftest import TEST_MODEL, TinyNet
from engine import checkpoint as ckpt
from models.registry import create_model


def params_of(model):
    return {name: p.asnumpy().copy() for name, p in model.parameters_and_names()}


def test_round_trip_with_meta(tmp_path):
    model = TinyNet()
    path = str(tmp_path / "a.ckpt")
    meta = {"epoch": 3, "best": 71.5, "name": "x", "classes": ["a", "b"], "none": None, "flag": True}
    ckpt.save_checkpoint(path, model.parameters_and_names(), meta)
    tensors, read = ckpt.read_checkpoint(path)
    assert read == meta
    for name, value in params_of(model).items():
        np.testing.assert_array_equal(tensors[name], value)


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    path = str(tmp_path / "last.ckpt")
    ckpt.save_checkpoint(path, [("w", np.ones(3, np.float32))], {"step": 1})

    def broken_save(entries, file_name, append_dict=None):
        with open(file_name, "wb") as handle:
            handle.write(b"half a checkpoint")
        raise RuntimeError("disk full")

    monkeypatch.setattr(ms, "save_checkpoint", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        ckpt.save_checkpoint(path, [("w", np.zeros(3, np.float32))], {"step": 2})
    tensors, meta = ckpt.read_checkpoint(path)  # the previous file is intact
    assert meta["step"] == 1 and tensors["w"].tolist() == [1.0, 1.0, 1.0]
    assert os.listdir(tmp_path) == ["last.ckpt"]  # no temporary file left behind


def test_load_into_same_model(tmp_path):
    source, target = TinyNet(), TinyNet()
    path = str(tmp_path / "a.ckpt")
    ckpt.save_checkpoint(path, source.parameters_and_names())
    assert ckpt.load_checkpoint_into(target, path) == ([], [], [])
    for name, value in params_of(source).items():
        np.testing.assert_array_equal(params_of(target)[name], value)


def test_create_model_loads_a_checkpoint(tmp_path):
    source = create_model(TEST_MODEL, num_classes=4)
    path = str(tmp_path / "a.ckpt")
    ckpt.save_checkpoint(path, source.parameters_and_names(), {"model": TEST_MODEL})
    loaded = create_model(TEST_MODEL, num_classes=4, checkpoint=path)
    np.testing.assert_array_equal(params_of(loaded)["head.weight"], params_of(source)["head.weight"])


def test_shape_mismatch_is_reported_with_both_shapes(tmp_path):
    path = str(tmp_path / "a.ckpt")
    ckpt.save_checkpoint(path, TinyNet(num_classes=10).parameters_and_names(), {"model": TEST_MODEL})
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.load_checkpoint_into(TinyNet(num_classes=5), path)
    message = str(info.value)
    assert "2 shape mismatch(es)" in message
    assert "head.weight: checkpoint (10, 16) vs model (5, 16)" in message
    assert f"trained as '{TEST_MODEL}'" in message


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    other = [(name.replace("conv1", "stem"), p) for name, p in TinyNet().parameters_and_names()]
    path = str(tmp_path / "other.ckpt")
    ckpt.save_checkpoint(path, other)
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.load_checkpoint_into(TinyNet(), path)
    message = str(info.value)
    assert "1 missing key(s)" in message and "conv1.weight" in message
    assert "1 unexpected key(s)" in message and "stem.weight" in message


def test_non_strict_loads_what_fits(tmp_path):
    source, target = TinyNet(num_classes=10), TinyNet(num_classes=5)
    path = str(tmp_path / "a.ckpt")
    ckpt.save_checkpoint(path, source.parameters_and_names())
    before = params_of(target)
    missing, unexpected, mismatched = ckpt.load_checkpoint_into(target, path, strict=False)
    assert (missing, unexpected) == ([], [])
    assert sorted(name for name, _, _ in mismatched) == ["head.bias", "head.weight"]
    after = params_of(target)
    np.testing.assert_array_equal(after["conv1.weight"], params_of(source)["conv1.weight"])
    np.testing.assert_array_equal(after["head.weight"], before["head.weight"])


def test_training_state_entries_are_not_model_keys(tmp_path):
    model = TinyNet()
    path = str(tmp_path / "state.ckpt")
    named = list(model.parameters_and_names())
    ema = [(f"ema.{name}", np.full(p.shape, 2.0, np.float32)) for name, p in named]
    optimizer = [("optimizer.global_step", np.array([5], np.int32))]
    ckpt.save_checkpoint(path, named + ema + optimizer, {"epoch": 1})
    target = TinyNet()
    assert ckpt.load_checkpoint_into(target, path) == ([], [], [])
    ckpt.load_checkpoint_into(target, path, use_ema=True)
    assert np.all(params_of(target)["head.weight"] == 2.0)


def test_use_ema_without_ema_weights(tmp_path):
    path = str(tmp_path / "a.ckpt")
    ckpt.save_checkpoint(path, TinyNet().parameters_and_names())
    with pytest.raises(ckpt.CheckpointError, match="no EMA weights"):
        ckpt.load_checkpoint_into(TinyNet(), path, use_ema=True)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="not found"):
        ckpt.read_checkpoint(str(tmp_path / "none.ckpt"))
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x00\x01 definitely not protobuf" * 10)
    with pytest.raises(ckpt.CheckpointError, match="cannot read checkpoint"):
        ckpt.read_checkpoint(str(garbage))
