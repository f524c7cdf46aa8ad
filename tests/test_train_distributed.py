"""Scripts run as programs: data-parallel train.py under msrun (2 CPU workers, loopback), CLI entry points."""
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

import eval as eval_script
from conftest import ROOT, TEST_MODEL
from engine import checkpoint as ckpt
from engine.logger import read_metrics

LAUNCHER = """import runpy, sys
sys.path.insert(0, {tests!r})
sys.path.insert(0, {root!r})
import conftest  # registers the test network in this process
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


def write_launcher(folder):
    """A script that registers the test network, then runs ``argv[1]`` as __main__."""
    path = os.path.join(folder, "launch.py")
    with open(path, "w") as handle:
        handle.write(LAUNCHER.format(tests=os.path.join(ROOT, "tests"), root=ROOT))
    return path


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(shutil.which("msrun") is None, reason="msrun (MindSpore's launcher) is not on PATH")
def test_msrun_two_cpu_workers_keep_identical_weights(image_folder, tmp_path):
    root, _ = image_folder
    out = str(tmp_path / "run")
    launcher = write_launcher(str(tmp_path))
    command = ["msrun", "--worker_num=2", "--local_worker_num=2", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", f"--log_dir={tmp_path / 'logs'}", "--join=True",
               "--cluster_time_out=180", launcher, os.path.join(ROOT, "train.py"),
               "--model", TEST_MODEL, "--data_dir", root, "--output_dir", out, "--image_size", "32",
               "--crop_pct", "1.0", "--batch_size", "16", "--num_workers", "1", "--epochs", "2", "--lr", "0.1",
               "--warmup_epochs", "0.5", "--ema_decay", "0.9", "--save_on_all_ranks", "true", "--plot", "false",
               "--log_interval", "3", "--mean", "[0.286]", "--std", "[0.353]"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    logs = ""
    if os.path.isdir(tmp_path / "logs"):
        for name in sorted(os.listdir(tmp_path / "logs")):
            logs += open(tmp_path / "logs" / name, errors="replace").read()[-3000:]
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:] + logs

    rank0, meta0 = ckpt.read_checkpoint(os.path.join(out, "last.ckpt"))
    rank1, meta1 = ckpt.read_checkpoint(os.path.join(out, "rank_1", "last.ckpt"))
    # 300 images over 2 ranks in batches of 16: 9 steps per epoch on each rank
    assert meta0["steps_per_epoch"] == 9 and meta0["global_step"] == 18
    assert set(rank0) == set(rank1)
    for name, value in rank0.items():  # weights, BN statistics, EMA and momentum: identical on both ranks
        np.testing.assert_array_equal(rank1[name], value, err_msg=name)
    # only rank 0 writes logs and metrics
    assert {"train.log", "metrics.jsonl", "config.yaml"} <= set(os.listdir(out))
    assert sorted(os.listdir(os.path.join(out, "rank_1"))) == ["best.ckpt", "last.ckpt"]  # checkpoints only
    log = open(os.path.join(out, "train.log")).read()
    assert "val top-1" in log and "validation (rank 0 of 2, 50 of 100 images)" in log

    # validation was sharded over the ranks (counts summed): exactly what one process measures on all images
    last = [r for r in read_metrics(os.path.join(out, "metrics.jsonl")) if r["type"] == "epoch"][-1]
    single = eval_script.main(["--checkpoint", os.path.join(out, "last.ckpt"), "--json", str(tmp_path / "e.json")])
    assert single == 0
    result = json.load(open(tmp_path / "e.json"))
    assert result["count"] == 100
    assert (last["val_top1"], last["val_top5"]) == (result["top1"], result["top5"])
    assert last["val_loss"] == pytest.approx(result["loss"], rel=1e-6)


def test_scripts_run_as_programs(tmp_path):
    printed = subprocess.run([sys.executable, "train.py", "--print_config", "--model", "resnet_tiny"], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert printed.returncode == 0 and "model: resnet_tiny" in printed.stdout
    bad = subprocess.run([sys.executable, "train.py", "--no_such_option", "1"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "unknown option 'no_such_option'" in bad.stderr
    missing = subprocess.run([sys.executable, "tools/prepare_fashion_mnist.py", "--out", str(tmp_path / "o"),
                              "--source", str(tmp_path / "none")], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode == 2 and "apt-get install dataset-fashion-mnist" in missing.stderr
