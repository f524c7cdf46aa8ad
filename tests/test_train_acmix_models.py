"""The ACmix families through the engine: train.py, resume, eval.py and export.py on real ACmix models.

The engine's own behaviour (exact resume, EMA, loss scaling, divergence, errors) is tested on the test-only
TinyNet in test_train_engine.py; here narrow versions of every ACmix family run through the same command
lines, so what only the real models have (the CPU attention kernel, the shift implementations, AMP O2 on
attention, patchwise BatchNorms, the PVT cls token) is exercised by the engine:

- default run: each family (ResNet-ACmix with the CPU kernel, Swin-ACmix O2 + tensor shifts, PVT-ACmix O2
  + fixed shift kernels, SAN-ACmix O2) trains 2 steps of batch 8 with train.py; the loss is finite, the run
  files are written and every ACmix rate got a gradient (both paths of every layer are trained);
  ResNet-ACmix then resumes to step 3, is evaluated with eval.py and exported to MINDIR with export.py;
- ``slow``: O3 with a static loss scale, and the other shift implementations.

Images: 32 px (SAN 64 px: its fifth stage needs 2 px for the reflection padding of a 3x3 window).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import eval as eval_script
import export as export_script
from conftest import ROOT
from engine import checkpoint as ckpt
from engine.logger import read_metrics

# (model, model_overrides YAML, extra train.py options)
RESNET = ("resnet_tiny_acmix", "{base_width: 8}", [])
SWIN = ("swin_tiny_acmix", "{embed_dim: 16, depths: [2, 2], num_heads: [1, 2], window_size: 4, img_size: 32, "
                           "shift_impl: tensor}", ["--amp_level", "O2"])
PVT = ("pvt_tiny_acmix", "{embed_dims: [16, 16, 16, 16], num_heads: [1, 1, 1, 1], depths: [1, 1, 1, 1], "
                         "img_size: 32, shift_impl: fixed}", ["--amp_level", "O2"])
SAN = ("san10_acmix", "{layers: [1, 1, 1, 1, 1], base_width: 16, share_planes: 4, kernels: [3, 3, 3, 3, 3]}",
       ["--amp_level", "O2", "--image_size", "64"])
DEFAULT_CASES = {"resnet_acmix_cpu_kernel": RESNET, "swin_acmix_o2_tensor_shift": SWIN,
                 "pvt_acmix_o2_fixed_shift": PVT, "san_acmix_o2": SAN}
SLOW_CASES = {
    "resnet_acmix_o3_tensor_shift": ("resnet_tiny_acmix", "{base_width: 8, shift_impl: tensor}",
                                     ["--amp_level", "O3", "--loss_scale", "static", "--loss_scale_value", "128"]),
    "resnet_acmix_unfold_random_shift": ("resnet_tiny_acmix", "{base_width: 8, shift_impl: random, "
                                                              "attention_impl: unfold}", []),
    "swin_acmix_learnable_shift": (SWIN[0], SWIN[1].replace("tensor", "learnable"), []),
    "pvt_acmix_tensor_shift": (PVT[0], PVT[1].replace("fixed", "tensor"), []),
    "san_acmix_o3_fixed_shift": (SAN[0], SAN[1][:-1] + ", shift_impl: fixed}",
                                 ["--amp_level", "O3", "--loss_scale", "static", "--loss_scale_value", "128",
                                  "--image_size", "64"]),
}


def train_argv(case, data_dir, output_dir, *extra):
    model, overrides, options = case
    return (["--model", model, "--model_overrides", overrides, "--data_dir", data_dir, "--output_dir", output_dir,
             "--image_size", "32", "--crop_pct", "1.0", "--batch_size", "8", "--num_workers", "1", "--epochs", "1",
             "--stop_at_step", "2", "--log_interval", "1", "--lr", "0.01", "--warmup_epochs", "0",
             "--mean", "[0.286]", "--std", "[0.353]", "--val_split", "null", "--plot", "false", "--seed", "3"]
            + list(options) + list(extra))


def rate_moments(path):
    """{rate name: SGD momentum buffer} of the ACmix rates in a training checkpoint: non-zero where a gradient
    reached the rate (a single step may move a rate by less than float32 resolves at 0.5)."""
    import mindspore as ms
    prefix = "optimizer.moments."
    return {name[len(prefix):]: float(value.asnumpy().reshape(-1)[0])
            for name, value in ms.load_checkpoint(path).items()
            if name.startswith(prefix) and name.endswith(("rate1", "rate2"))}


def check_run(case, output_dir, steps):
    """A finished run of ``steps`` steps: finite losses, run files, checkpoint meta, a gradient in every rate."""
    records = [r for r in read_metrics(os.path.join(output_dir, "metrics.jsonl")) if r["type"] == "train"]
    assert [r["global_step"] for r in records][-2:] == [steps - 1, steps]
    assert all(np.isfinite(r["loss"]) for r in records)
    path = os.path.join(output_dir, "last.ckpt")
    meta = ckpt.read_meta(path)
    assert meta["model"] == case[0] and meta["global_step"] == steps
    moments = rate_moments(path)
    # PVT's last block: its conv path only reaches the patch tokens, and the head reads only the cls token
    dead = {"block4.0.attn.rate2"} if case[0].startswith("pvt") else set()
    assert moments and {name for name, value in moments.items() if value == 0.0} == dead, moments
    return path


def train_py(case, data_dir, output_dir, *extra):
    """``python train.py ...`` in its own process, as a user runs it (and as CI does: in one pytest process,
    a second training run recompiles its step graph at step 2, which would double the cost here)."""
    result = subprocess.run([sys.executable, "train.py"] + train_argv(case, data_dir, output_dir, *extra),
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def run_case(case, data_dir, output_dir, *extra, steps=2):
    train_py(case, data_dir, output_dir, *extra)
    return check_run(case, output_dir, steps)


@pytest.fixture(scope="module")
def resnet_run(image_folder, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("resnet_acmix") / "run")
    run_case(RESNET, image_folder[0], out)
    return out


def test_resnet_acmix_trains_with_the_cpu_kernel(resnet_run):
    log = open(os.path.join(resnet_run, "train.log")).read()
    assert "sliding-window attention: 4 layer(s) CPU kernel" in log  # the C++ kernel trained


@pytest.mark.parametrize("case", [SWIN, PVT, SAN], ids=[k for k in DEFAULT_CASES if not k.startswith("resnet")])
def test_acmix_family_trains_through_train_py(case, image_folder, tmp_path):
    out = str(tmp_path / "run")
    run_case(case, image_folder[0], out)
    assert "amp O2" in open(os.path.join(out, "train.log")).read()


def test_resnet_acmix_resumes_evaluates_and_exports(resnet_run, image_folder, tmp_path, capsys):
    # resume: continues from the step-2 checkpoint to step 3
    train_py(RESNET, image_folder[0], resnet_run, "--resume", "auto", "--stop_at_step", "3")
    path = check_run(RESNET, resnet_run, 3)
    assert "resumed" in open(os.path.join(resnet_run, "train.log")).read().lower()
    # eval.py on a split the run did not validate on (its config has val_split null)
    json_path = str(tmp_path / "eval.json")
    assert eval_script.main(["--checkpoint", path, "--split", "val", "--json", json_path]) == 0
    result = json.load(open(json_path))
    assert result["count"] == 100 and 0.0 <= result["top1"] <= 100.0 and np.isfinite(result["loss"])
    # export.py: the kernel is swapped for portable ops, and the MINDIR must reproduce the network
    output = str(tmp_path / "resnet_acmix.mindir")
    assert export_script.main(["--checkpoint", path, "--output", output, "--batch_size", "2"]) == 0
    assert "max |diff|" in capsys.readouterr().out and os.path.getsize(output) > 0
    mindir = eval_script.run(argparse_namespace(mindir=output, split="val"))
    assert mindir["count"] == 100 and mindir["top1"] == pytest.approx(result["top1"])


def argparse_namespace(**values):
    import argparse
    defaults = dict(checkpoint=None, mindir=None, data_dir=None, split=None, config=None, batch_size=None,
                    num_workers=None, weights="auto", per_class=False, json_path=None, device_target=None,
                    mode="graph")
    defaults.update(values)
    return argparse.Namespace(**defaults)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(SLOW_CASES.values()), ids=list(SLOW_CASES))
def test_acmix_variant_trains_through_train_py(case, image_folder, tmp_path):
    run_case(case, image_folder[0], str(tmp_path / "run"))
