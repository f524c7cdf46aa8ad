"""Issue 11: the paths around training, evaluation, export and conversion hold (docs/reliability.md).

1. converted checkpoints record what eval/export need; eval/export take the run options a checkpoint lacks
   and refuse ones that contradict it;
3. a new run never destroys an earlier one (refused without --resume auto / --overwrite); keep-k epoch
   checkpoints; partial files of a killed save are cleaned;
4. a state with NaN/inf is never saved and the stop message names the true last good checkpoint; eval and
   export fail on non-finite outputs; export's tolerance does not grow with a blown-up output;
5. bad inputs exit 2 with one line before any graph is compiled (too-small images for SAN/PVT/ResNet-ACmix,
   unwritable folders, negative or non-finite options, late-truncated JPEGs); image_size reaches the models
   that are sized by it.
"""
import io
import json
import os
import sys

import mindspore as ms
import numpy as np
import pytest

import eval as eval_script
import export as export_script
import train as train_script
from conftest import ROOT, TEST_MODEL, TinyNet, tiny_train_config, write_generated_split
from engine import checkpoint as ckpt
from engine.logger import read_metrics, setup_logging
from engine.trainer import Trainer, TrainingDiverged, train

CLASSES = ["a", "b", "c", "d"]


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    """4 classes x 8 train / 2 val generated 28x28 images: 4 steps per epoch at batch 8."""
    root = str(tmp_path_factory.mktemp("small"))
    write_generated_split(root, "train", CLASSES, 8, seed=0)
    write_generated_split(root, "val", CLASSES, 2, seed=1)
    return root


def small_config(root, out, **overrides):
    values = dict(batch_size=8, epochs=1, warmup_epochs=0, log_interval=2, image_size=16)
    values.update(overrides)
    return tiny_train_config(root, str(out), **values)


def cli_args(root, out, *extra):
    return ["--model", TEST_MODEL, "--data_dir", root, "--output_dir", str(out), "--image_size", "16",
            "--batch_size", "8", "--num_workers", "1", "--epochs", "1", "--plot", "false", *extra]


def run_main(script, argv, capsys, with_stdout=False):
    """(exit code, error line) of a CLI's main() (and its stdout); an error must be one line, no traceback."""
    setup_logging()  # the engine's console log points at this test's stdout (an earlier run's is closed)
    code = script.main(list(argv))
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error")]
    if code != 0:
        assert len(errors) == 1 and "Traceback" not in captured.err, captured.err
    result = (code, "\n".join(errors))
    return result + (captured.out,) if with_stdout else result


# ---- 3. run folders ---------------------------------------------------------------------------------
def test_a_new_run_never_destroys_an_earlier_one(small_folder, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".tmp-abc123.ckpt").write_bytes(b"partial file of a killed save")
    train(small_config(small_folder, out, epochs=3, keep_epoch_checkpoints=True, keep_checkpoint_max=2))
    names = set(os.listdir(out))
    assert {"epoch_002.ckpt", "epoch_003.ckpt", "last.ckpt", "best.ckpt"} <= names
    assert "epoch_001.ckpt" not in names  # keep_checkpoint_max 2
    assert not [name for name in names if name.startswith(".tmp")]
    assert "partial checkpoint file" in (out / "train.log").read_text()
    last_bytes = (out / "last.ckpt").read_bytes()
    metrics_before = (out / "metrics.jsonl").read_text()

    code, err = run_main(train_script, cli_args(small_folder, out), capsys)
    assert code == 2 and "holds an earlier run" in err
    assert "--resume auto" in err and "--overwrite" in err and "--output_dir" in err
    assert (out / "last.ckpt").read_bytes() == last_bytes and (out / "metrics.jsonl").read_text() == metrics_before

    code, err = run_main(train_script, cli_args(small_folder, out, "--overwrite", "true", "--resume", "auto"), capsys)
    assert code == 2 and "exclude each other" in err

    # --overwrite: the earlier run's files are deleted first; nothing of it is mixed into the new run
    _, summary = train(small_config(small_folder, out, overwrite=True))
    assert not (out / "epoch_003.ckpt").exists() and not (out / "epoch_002.ckpt").exists()
    assert [r["epoch"] for r in read_metrics(str(out / "metrics.jsonl")) if r["type"] == "epoch"] == [1]
    assert ckpt.read_meta(str(out / "best.ckpt"))["epochs_done"] == 1
    assert summary["global_step"] == 4


def test_resume_auto_into_a_run_folder_is_allowed(small_folder, tmp_path):
    out = tmp_path / "run"
    train(small_config(small_folder, out, epochs=2, stop_at_step=4))
    _, summary = train(small_config(small_folder, out, epochs=2, resume="auto"))
    assert summary["global_step"] == 8
    metrics = read_metrics(str(out / "metrics.jsonl"))
    assert [r["epoch"] for r in metrics if r["type"] == "epoch"] == [1, 2]


# ---- 4. non-finite states -----------------------------------------------------------------------------
def test_save_refuses_a_non_finite_state(tmp_path):
    path = str(tmp_path / "x.ckpt")
    state = [("w", np.ones(3, np.float32)), ("bn.moving_variance", np.array([1.0, np.inf], np.float32))]
    with pytest.raises(ckpt.NonFiniteStateError, match="bn.moving_variance"):
        ckpt.save_checkpoint(path, state)
    assert os.listdir(tmp_path) == []


def test_a_non_finite_state_is_never_saved_and_the_last_good_checkpoint_is_named(small_folder, tmp_path):
    out = tmp_path / "run"
    train(small_config(small_folder, out, epochs=2, stop_at_step=4))
    good = ckpt.read_checkpoint(str(out / "last.ckpt"))[0]
    trainer = Trainer(small_config(small_folder, out, epochs=2, resume="auto"))
    variance = dict(trainer.named_params)["bn2.moving_variance"]
    # what a blown-up run leaves in BatchNorm while its loss stays finite
    variance.set_data(ms.Tensor(variance.asnumpy() * np.inf))
    with pytest.raises(TrainingDiverged) as info:
        trainer.fit()
    message = str(info.value)
    assert "bn2.moving_variance" in message and "NaN or inf" in message
    assert f"last good checkpoint: {out / 'last.ckpt'} (step 4)" in message
    assert "epoch 2, step 4 of the epoch" in message
    kept = ckpt.read_checkpoint(str(out / "last.ckpt"))[0]  # untouched: still the finite step-4 state
    assert all(np.array_equal(kept[name], good[name]) for name in good)
    assert ckpt.read_meta(str(out / "best.ckpt"))["epochs_done"] == 1
    assert not [name for name in os.listdir(out) if name.startswith(".tmp")]


def test_a_checkpoint_with_nan_is_not_loaded(tmp_path, small_folder, capsys):
    params = [(name, np.full(p.shape, np.nan, np.float32) if name == "conv1.weight" else p.asnumpy())
              for name, p in TinyNet(num_classes=4).parameters_and_names()]
    path = str(tmp_path / "nan.ckpt")
    ckpt.save_checkpoint(path, params, require_finite=False)
    code, err = run_main(eval_script, ["--checkpoint", path, "--model", TEST_MODEL, "--data_dir", small_folder,
                                       "--image_size", "16"], capsys)
    assert code == 2 and "holds NaN or inf in 1 tensor(s) (conv1.weight)" in err
    code, err = run_main(export_script, ["--checkpoint", path, "--model", TEST_MODEL, "--image_size", "16",
                                         "--output", str(tmp_path / "x.mindir")], capsys)
    assert code == 2 and "NaN or inf" in err and not os.path.exists(tmp_path / "x.mindir")
    code, err = run_main(train_script, cli_args(small_folder, tmp_path / "run", "--init_checkpoint", path), capsys)
    assert code == 2 and "NaN or inf" in err


def _weights_checkpoint(tmp_path, name="plain", scale=None, fills=None):
    """A weights-only checkpoint of the test network (4 classes): ``name`` scaled by ``scale``; the tensors
    named in ``fills`` ({name: value}) set to that value."""
    params = []
    for key, param in TinyNet(num_classes=4).parameters_and_names():
        value = param.asnumpy()
        if key == name and scale is not None:
            value = value * scale
        if key in (fills or {}):
            value = np.full(value.shape, fills[key], np.float32)
        params.append((key, value))
    path = str(tmp_path / f"{name}.ckpt")
    ckpt.save_checkpoint(path, params)
    return path


def test_eval_and_export_fail_on_non_finite_outputs(tmp_path, small_folder, capsys):
    # finite weights whose logits overflow: features x 3e38, then positive classifier weights of 3e38
    path = _weights_checkpoint(tmp_path, "overflow", fills={"rate1": 3e38, "head.weight": 3e38})
    code, err = run_main(eval_script, ["--checkpoint", path, "--model", TEST_MODEL, "--data_dir", small_folder,
                                       "--image_size", "16", "--batch_size", "4"], capsys)
    assert code == 1 and "NaN or inf logits" in err
    output = str(tmp_path / "overflow.mindir")
    code, err = run_main(export_script, ["--checkpoint", path, "--model", TEST_MODEL, "--image_size", "16",
                                         "--output", output], capsys)
    assert code == 1 and "holds NaN or inf" in err and not os.path.exists(output)


def test_export_tolerance_stops_growing_with_the_output(tmp_path, capsys):
    path = _weights_checkpoint(tmp_path, "head.weight", scale=1e7)  # finite, blown-up logits
    output = str(tmp_path / "big.mindir")
    code, _, out = run_main(export_script, ["--checkpoint", path, "--model", TEST_MODEL, "--image_size", "16",
                                            "--output", output, "--atol", "1e-4", "--rtol", "1e-4"], capsys,
                            with_stdout=True)
    assert code == 0
    # the bound is atol + rtol * min(max |output|, 100) = 1e-4 + 1e-2, not rtol * max |output|
    assert "(tolerance 1.010e-02)" in out


# ---- 1. checkpoints without a run configuration, converted checkpoints ---------------------------------
def test_eval_and_export_take_the_run_options_a_checkpoint_lacks(tmp_path, small_folder, capsys):
    path = _weights_checkpoint(tmp_path)  # plain weights: no model name, no preprocessing
    args = ["--checkpoint", path, "--data_dir", small_folder, "--image_size", "16", "--batch_size", "4"]
    code, err = run_main(eval_script, args, capsys)
    assert code == 2 and "does not say which model it holds" in err and "--model" in err
    code, _ = run_main(eval_script, args + ["--model", TEST_MODEL, "--mean", "0.3", "--std", "0.35",
                                            "--json", str(tmp_path / "r.json")], capsys)
    result = json.load(open(tmp_path / "r.json"))
    assert code == 0 and result["count"] == 8  # 4 classes inferred from head.weight, 2 val images each
    output = str(tmp_path / "plain.mindir")
    code, _ = run_main(export_script, ["--checkpoint", path, "--model", TEST_MODEL, "--image_size", "16",
                                       "--output", output], capsys)
    assert code == 0 and json.load(open(output + ".json"))["num_classes"] == 4


def test_a_contradicting_model_is_refused(tmp_path, small_folder, capsys):
    path = str(tmp_path / "recorded.ckpt")
    ckpt.save_checkpoint(path, TinyNet(num_classes=4).parameters_and_names(),
                         {"model": TEST_MODEL, "num_classes": 4})
    code, err = run_main(eval_script, ["--checkpoint", path, "--model", "resnet_tiny", "--data_dir", small_folder],
                         capsys)
    assert code == 2 and "--model 'resnet_tiny' contradicts the checkpoint" in err
    code, err = run_main(export_script, ["--checkpoint", path, "--num_classes", "7"], capsys)
    assert code == 2 and "--num_classes 7 contradicts the checkpoint" in err


def test_converted_checkpoint_records_model_and_official_preprocessing(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import convert_official
    import official_checkpoint
    overrides = {"img_size": 32, "embed_dim": 16, "depths": [2, 2], "num_heads": [2, 4], "window_size": 4}
    src, dst = str(tmp_path / "official.pth"), str(tmp_path / "converted.ckpt")
    assert official_checkpoint.main(["--model", "swin_tiny_acmix", "--num_classes", "10", "--out", src,
                                     "--model_overrides", json.dumps(overrides)]) == 0
    convert_official.convert("swin_tiny_acmix", src, dst, model_kwargs=overrides)
    import yaml
    meta = ckpt.read_meta(dst)
    config = yaml.safe_load(meta["config"])
    assert (meta["model"], meta["num_classes"], meta["model_kwargs"]) == ("swin_tiny_acmix", 10, overrides)
    recipe = yaml.safe_load(open(os.path.join(ROOT, "configs", "swin_tiny_acmix.yaml")))
    assert config["interpolation"] == recipe["interpolation"] == "bicubic"
    assert config["crop_pct"] == recipe["crop_pct"] and config["mean"] == [0.485, 0.456, 0.406]
    assert config["image_size"] == 32 and config["model_overrides"] == overrides


# ---- 5. bad input: exit 2, one line, before any graph is compiled --------------------------------------
@pytest.mark.parametrize("option, value, expected", [
    ("weight_decay", "-1", "'weight_decay' must be >= 0"),
    ("min_lr", "-0.001", "'min_lr' must be >= 0"),
    ("mixup", "-1", "'mixup' must be >= 0"),
    ("lr_base_batch", "0", "'lr_base_batch' must be >= 1"),
    ("save_every_steps", "-1", "'save_every_steps' must be >= 0"),
    ("keep_checkpoint_max", "-1", "'keep_checkpoint_max' must be >= 0"),
    ("lr", "nan", "'lr' (from command line) must be a finite number"),
    ("lr", "inf", "'lr' (from command line) must be a finite number"),
    ("momentum", "1.5", "'momentum' must be in [0, 1)"),
])
def test_train_rejects_bad_values(small_folder, tmp_path, capsys, option, value, expected):
    code, err = run_main(train_script, cli_args(small_folder, tmp_path / "run", f"--{option}", value), capsys)
    assert code == 2 and expected in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("model, size, smallest", [("san10", 32, 128), ("pvt_tiny", 16, 32),
                                                   ("resnet26_acmix", 4, 49)])
def test_too_small_inputs_stop_before_compiling(small_folder, tmp_path, capsys, monkeypatch, model, size, smallest):
    monkeypatch.chdir(tmp_path)  # a graph compile failure would dump rank_0/ here
    argv = ["--model", model, "--data_dir", small_folder, "--output_dir", str(tmp_path / "run"), "--image_size",
            str(size), "--batch_size", "8", "--num_workers", "1"]
    # PVT is built for image_size (img_size) and its constructor refuses it; the others report min_input_size
    expected = "img_size=16 is too small" if model == "pvt_tiny" else \
        f"image_size {size} is too small for {model}: it needs at least {smallest} px"
    code, err = run_main(train_script, argv, capsys)
    assert code == 2 and expected in err
    code, err = run_main(export_script, ["--model", model, "--image_size", str(size), "--num_classes", "4",
                                         "--output", str(tmp_path / "m.mindir")], capsys)
    assert code == 2 and expected in err
    assert not (tmp_path / "rank_0").exists() and not (tmp_path / "m.mindir").exists()


def test_unwritable_output_folders(small_folder, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code, err = run_main(train_script, cli_args(small_folder, blocker / "run"), capsys)
    assert code == 2 and "option 'output_dir': cannot write to" in err
    code, err = run_main(export_script, ["--model", TEST_MODEL, "--num_classes", "4", "--image_size", "16",
                                         "--output", str(blocker / "m.mindir")], capsys)
    assert code == 2 and "--output: cannot write to" in err
    code, err = run_main(eval_script, ["--checkpoint", str(tmp_path / "none.ckpt"), "--batch_size", "-1"], capsys)
    assert code == 2 and "--batch_size must be >= 1, got -1" in err
    if os.geteuid() != 0:  # root writes into read-only folders anyway
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        code, err = run_main(train_script, cli_args(small_folder, locked / "run"), capsys)
        assert code == 2 and "cannot write" in err


def _late_truncated_jpeg(path):
    from PIL import Image
    pixels = np.random.default_rng(3).integers(0, 255, (28, 28, 3)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95)
    data = buffer.getvalue()
    with open(path, "wb") as handle:
        handle.write(data[:int(len(data) * 0.7)])  # header intact: PIL's verify() accepts it


def test_late_truncated_jpeg_is_caught_or_skipped(tmp_path, capsys):
    from PIL import Image
    root = str(tmp_path / "data")
    write_generated_split(root, "train", CLASSES, 8, seed=0)
    write_generated_split(root, "val", CLASSES, 2, seed=1)
    broken = os.path.join(root, "train", "a", "broken.jpg")
    _late_truncated_jpeg(broken)
    with Image.open(broken) as image:
        image.verify()  # the old check passed this file
    code, err = run_main(train_script, cli_args(root, tmp_path / "run"), capsys)
    assert code == 2 and "1 unreadable image(s)" in err and "--bad_images skip" in err
    _, summary = train(small_config(root, tmp_path / "run2", bad_images="skip"))
    assert summary["epochs_done"] == 1  # the whole epoch ran without the file


def test_image_size_reaches_models_sized_by_it():
    from engine.runtime import build_model
    narrow = {"embed_dims": [8, 16, 24, 32], "num_heads": [1, 1, 1, 1]}
    model, kwargs = build_model("pvt_tiny", 4, narrow, image_size=64)
    assert kwargs["img_size"] == 64
    assert tuple(model.pos_embed1.shape) == (1, (64 // 4) ** 2, 8)  # learned for 64 px, not 224
    model, kwargs = build_model(TEST_MODEL, 4, {}, image_size=64)  # takes no img_size: built without it
    assert "img_size" not in kwargs


def test_training_records_how_the_model_was_built(small_folder, tmp_path):
    _, summary = train(small_config(small_folder, tmp_path / "run", stop_at_step=1, val_split=None))
    assert ckpt.read_meta(summary["last_checkpoint"])["model_kwargs"] == {}
