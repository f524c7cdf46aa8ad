"""models/pth_reader.py: .pth files read into NumPy without PyTorch, and without running code from them.

Files written by PyTorch itself (both formats: every dtype, views, parameters, pickled configs) must read
back exactly; files written by tools/official_checkpoint.py (no PyTorch) too; a pickle whose payload
would create a file must not run it; garbage, truncated, inconsistent, non-tensor and wrong-model files
make the converter CLI exit 2 with one line and write nothing.
"""
import argparse
import collections
import io
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from conftest import ROOT
from models.convert import ConversionError, load_torch_state_dict
from models.pth_reader import OpaqueObject, PthError, read_pth

sys.path.insert(0, os.path.join(ROOT, "tools"))
import convert_official  # noqa: E402
import official_checkpoint  # noqa: E402

CONVERTER = os.path.join(ROOT, "tools", "convert_official.py")


class ConfigNode(dict):
    """A dict subclass pickled by reference (as yacs' CfgNode in the official checkpoints)."""


class Payload:
    """Unpickling this object runs ``os.system`` (what a crafted checkpoint would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _torch():
    return pytest.importorskip("torch", reason="writing reference files needs torch (tools/run_tests.sh installs "
                                               "the torch-tests extra; ACMIX_TEST_TORCH=0 skips it)")


def _reference_state(torch):
    generator = torch.Generator().manual_seed(0)
    state = collections.OrderedDict()
    state["conv.weight"] = torch.randn(4, 3, 3, 3, generator=generator)
    state["transposed"] = torch.randn(3, 5, generator=generator).t()  # a non-contiguous view
    state["strided"] = torch.arange(20.0)[3:15:3]  # offset and stride into a shared storage
    state["half"] = torch.randn(2, 3, generator=generator).half()
    state["bfloat16"] = torch.randn(6, generator=generator).bfloat16()
    state["double"] = torch.randn(2, generator=generator).double()
    state["int64"] = torch.arange(5)
    state["int32"] = torch.arange(3, dtype=torch.int32)
    state["uint8"] = torch.arange(4, dtype=torch.uint8)
    state["bool"] = torch.tensor([True, False])
    state["scalar"] = torch.tensor(7)
    state["empty"] = torch.zeros(0, 3)
    return state


def _as_numpy(torch, tensor):
    return tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_reads_what_torch_writes(tmp_path, zip_format):
    torch = _torch()
    state = _reference_state(torch)
    path = str(tmp_path / "ref.pth")
    torch.save({"model": state, "epoch": 299, "max_accuracy": 81.9, "config": ConfigNode(MODEL={"TYPE": "x"}),
                "args": argparse.Namespace(lr=0.1), "param": torch.nn.Parameter(torch.ones(2))}, path,
               _use_new_zipfile_serialization=zip_format)
    blob = read_pth(path)
    assert list(blob["model"]) == list(state)
    for key, tensor in state.items():
        expected = _as_numpy(torch, tensor)
        got = blob["model"][key]
        assert got.shape == expected.shape and got.dtype == expected.dtype, key
        np.testing.assert_array_equal(got, expected, err_msg=key)
        assert got.flags.c_contiguous and got.flags.writeable
    assert blob["epoch"] == 299 and blob["max_accuracy"] == 81.9
    np.testing.assert_array_equal(blob["param"], np.ones(2, np.float32))
    # pickled classes are never imported: inert placeholders that keep what the file said
    assert isinstance(blob["config"], OpaqueObject) and blob["config"].pickled_name.endswith("ConfigNode")
    assert blob["config"]["MODEL"] == {"TYPE": "x"}
    assert blob["args"].pickled_name == "argparse.Namespace" and blob["args"].state == {"lr": 0.1}


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_our_writer_round_trip_and_torch_reads_it(tmp_path, legacy):
    state = collections.OrderedDict(
        [("a.weight", np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)),
         ("a.num_batches_tracked", np.array(5, np.int64)), ("b", np.arange(6, dtype=np.float16).reshape(2, 3))])
    path = str(tmp_path / "ours.pth")
    official_checkpoint.write_pth(path, official_checkpoint.official_training_checkpoint(state, "m"),
                                  legacy=legacy)
    blob = read_pth(path)
    for key, value in state.items():
        assert blob["model"][key].dtype == value.dtype and blob["model"][key].shape == value.shape
        np.testing.assert_array_equal(blob["model"][key], value)
    assert blob["config"].pickled_name == "yacs.config.CfgNode"
    torch = pytest.importorskip("torch", reason="the cross-check with torch.load needs torch")
    bare = str(tmp_path / "bare.pth")
    official_checkpoint.write_pth(bare, {"model": state}, legacy=legacy)
    loaded = torch.load(bare, weights_only=True)["model"]
    for key, value in state.items():
        np.testing.assert_array_equal(loaded[key].numpy(), value)


def _malicious_zip(path, marker):
    """A zip-format .pth whose data.pkl calls os.system when unpickled by pickle.load."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps({"model": Payload(marker)}, protocol=2))
        archive.writestr("evil/version", "3\n")


def test_malicious_pickle_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = str(tmp_path / "evil.pth")
    _malicious_zip(path, marker)
    with zipfile.ZipFile(path) as archive:  # the payload is real: plain pickle runs it
        pickle.loads(archive.read("evil/data.pkl"))
    assert marker.exists()
    marker.unlink()
    blob = read_pth(path)
    assert not marker.exists()
    assert blob["model"].pickled_name in ("posix.system", "os.system")
    with pytest.raises(ConversionError, match="holds no state_dict|not tensors"):
        load_torch_state_dict(path)
    assert not marker.exists()


def test_malicious_file_written_by_torch_does_not_run(tmp_path):
    torch = _torch()
    marker = tmp_path / "pwned"
    path = str(tmp_path / "evil_torch.pth")
    torch.save({"model": {"w": torch.ones(2)}, "config": Payload(marker)}, path)
    state = load_torch_state_dict(path)  # the weights are usable, the payload stays inert
    assert list(state) == ["w"] and not marker.exists()


def _run_cli(capsys, *args):
    """(exit code, stderr) of tools/convert_official.py run in this process."""
    code = convert_official.main(list(args))
    return code, capsys.readouterr().err


def _one_error_line(stderr):
    meaningful = [line for line in stderr.splitlines() if line.strip() and "WARNING" not in line]
    assert len(meaningful) == 1 and meaningful[0].startswith("error: conversion failed: "), stderr
    assert "Traceback" not in stderr
    return meaningful[0]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    """{name: path} of files the converter must refuse."""
    folder = tmp_path_factory.mktemp("bad_pth")
    files = {}
    files["garbage"] = folder / "garbage.pth"
    files["garbage"].write_bytes(os.urandom(4096))
    files["empty"] = folder / "empty.pth"
    files["empty"].write_bytes(b"")
    state = collections.OrderedDict([("head.weight", np.ones((3, 4), np.float32)),
                                     ("head.bias", np.zeros(3, np.float32))])
    good = folder / "good.pth"
    official_checkpoint.write_pth(str(good), {"model": state})
    data = good.read_bytes()
    files["truncated_zip"] = folder / "truncated.pth"
    files["truncated_zip"].write_bytes(data[:len(data) // 2])
    legacy = folder / "legacy.pth"
    official_checkpoint.write_pth(str(legacy), {"model": state}, legacy=True)
    data = legacy.read_bytes()
    files["truncated_legacy"] = folder / "truncated_legacy.pth"
    files["truncated_legacy"].write_bytes(data[:-7])
    files["non_tensor"] = folder / "non_tensor.pth"
    official_checkpoint.write_pth(str(files["non_tensor"]), {"model": {"head.weight": [1, 2], "epoch": 3}})
    files["no_state_dict"] = folder / "list.pth"
    official_checkpoint.write_pth(str(files["no_state_dict"]), [np.ones(2, np.float32)])
    files["malicious"] = folder / "evil.pth"
    _malicious_zip(str(files["malicious"]), folder / "pwned")
    # a storage shorter than its tensor: inconsistent archive
    files["short_storage"] = folder / "short.pth"
    with zipfile.ZipFile(good) as source, zipfile.ZipFile(files["short_storage"], "w") as target:
        for name in source.namelist():
            content = source.read(name)
            target.writestr(name, content[:4] if name.endswith("/data/0") else content)
    return {name: str(path) for name, path in files.items()}


@pytest.mark.parametrize("name, message", [
    ("garbage", "neither a zip archive nor a legacy torch.save stream"),
    ("empty", "neither a zip archive nor a legacy torch.save stream"),
    ("truncated_zip", "damaged zip archive"),
    ("truncated_legacy", "truncated"),
    ("non_tensor", "entries are not tensors: epoch, head.weight"),
    ("no_state_dict", "holds no state_dict"),
    ("malicious", "holds no state_dict"),
    ("short_storage", "expected (truncated file?)"),
])
def test_bad_files_are_refused_by_the_reader(bad_files, name, message):
    with pytest.raises(ConversionError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        load_torch_state_dict(bad_files[name])
    assert not os.path.exists(os.path.join(os.path.dirname(bad_files[name]), "pwned"))


def test_reader_errors_are_pth_errors(bad_files):
    with pytest.raises(PthError):
        read_pth(bad_files["garbage"])
    with pytest.raises(PthError, match="file not found"):
        read_pth(bad_files["garbage"] + ".missing")
    # a tensor reaching past its storage (crafted layout) is refused, not read out of bounds
    with pytest.raises(PthError, match="reads past the end"):
        from models import pth_reader
        pth_reader._rebuild_tensor(pth_reader._Storage(np.zeros(4, np.float32), False), 2, (3,), (1,))


def test_cli_exits_2_with_one_line_for_each_bad_file(bad_files, tmp_path, capsys):
    for name, path in bad_files.items():
        dst = str(tmp_path / f"{name}.ckpt")
        code, stderr = _run_cli(capsys, "--model", "resnet_tiny", "--src", path, "--dst", dst)
        assert code == 2, (name, stderr)
        _one_error_line(stderr)
        assert not os.path.exists(dst)


def test_cli_wrong_model_and_bad_arguments(tmp_path, capsys):
    src = str(tmp_path / "resnet.pth")
    code = official_checkpoint.main(["--model", "resnet_tiny", "--num_classes", "3", "--out", src])
    assert code == 0
    dst = str(tmp_path / "x.ckpt")
    code, stderr = _run_cli(capsys, "--model", "resnet_tiny_acmix", "--src", src, "--dst", dst)
    assert code == 2 and "does not match the model" in _one_error_line(stderr) and not os.path.exists(dst)
    code, stderr = _run_cli(capsys, "--model", "no_such_model", "--src", src, "--dst", dst)
    assert code == 2 and "unknown model 'no_such_model'" in _one_error_line(stderr)
    code, stderr = _run_cli(capsys, "--model", "resnet_tiny", "--src", str(tmp_path / "missing.pth"), "--dst", dst)
    assert code == 2 and "does not exist" in _one_error_line(stderr)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, stderr = _run_cli(capsys, "--model", "resnet_tiny", "--src", src, "--dst", str(blocker / "x.ckpt"))
    assert code == 2 and "cannot write" in _one_error_line(stderr)
    code, stderr = _run_cli(capsys, "--model", "resnet_tiny", "--src", src, "--dst", dst)
    assert code == 0 and os.path.isfile(dst)


def test_conversion_needs_no_torch(tmp_path):
    """Convert in a process where importing torch fails: the reader and the converter never need it."""
    src = str(tmp_path / "resnet.pth")
    assert official_checkpoint.main(["--model", "resnet_tiny", "--num_classes", "3", "--out", src]) == 0
    code = ("import sys; sys.modules['torch'] = None; sys.argv = ['convert_official.py', '--model', 'resnet_tiny', "
            f"'--src', {src!r}, '--dst', {str(tmp_path / 'r.ckpt')!r}]; sys.path.insert(0, {ROOT!r}); "
            f"import runpy; runpy.run_path({CONVERTER!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and os.path.isfile(tmp_path / "r.ckpt")


@pytest.mark.parametrize("name, overrides", [
    ("resnet_tiny_acmix", {}),
    ("swin_tiny_acmix", {"img_size": 32, "embed_dim": 16, "depths": [2, 2], "num_heads": [2, 4], "window_size": 4}),
])
def test_official_layout_writer_inverts_the_converter(name, overrides):
    """tools/official_checkpoint.py's renaming is the exact inverse of models/convert.py (every tensor back)."""
    import models
    from models.convert import convert_state_dict, model_parameter_shapes
    model = models.create_model(name, num_classes=5, **overrides)
    official = official_checkpoint.official_state_dict(model)
    assert any(key.endswith("num_batches_tracked") or key.endswith("relative_position_index") for key in official)
    assert not any(key.endswith((".gamma", ".beta", ".moving_mean", ".moving_variance")) for key in official)
    converted = convert_state_dict(official, model_parameter_shapes(model))
    params = {key: param.asnumpy() for key, param in model.parameters_and_names()}
    assert set(converted) == set(params)
    for key, value in params.items():
        np.testing.assert_array_equal(converted[key], value, err_msg=key)
