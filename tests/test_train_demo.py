"""tools/demo.py end to end (data preparation, training, evaluation, MINDIR export, table) on the test network."""
import json
import os

import pytest

from conftest import FASHION_MNIST_DIR, TEST_MODEL, fashion_mnist_available
from tools import demo


@pytest.mark.skipif(not fashion_mnist_available(),
                    reason="the demo reads Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)")
def test_demo_trains_evaluates_and_exports(tmp_path, capsys):
    out = str(tmp_path / "runs")
    code = demo.main(["--quick", "--models", TEST_MODEL, "--data", str(tmp_path / "data"), "--out", out,
                      "--train-per-class", "10", "--val-per-class", "5", "--epochs", "1",
                      "--set", "num_workers=1", "eval_batch_size=25"])
    assert code == 0
    text = capsys.readouterr().out
    results = json.load(open(os.path.join(out, "results.json")))
    row = results["models"][0]
    assert row["model"] == TEST_MODEL and row["top1"] == pytest.approx(row["training_val_top1"])
    assert results["mindir"]["top1"] == pytest.approx(row["top1"])
    assert os.path.isfile(results["mindir"]["file"])
    assert f"{TEST_MODEL:<20}" in text and "max |diff|" in text
    assert row["train_images"] == 100 and row["val_images"] == 50 and results["target_met"] is None
    assert sorted(os.listdir(tmp_path / "data"))[-1] == "train-labels-idx1-ubyte.gz"  # the subset, as IDX files


def test_demo_defaults_full_and_quick():
    """Without options: all of Fashion-MNIST straight from the IDX folder with the full recipe; --quick: the
    small subset with the small recipe."""
    full = demo.parse_args([])
    assert full.config == demo.FULL_CONFIG and full.train_per_class is None and full.val_per_class is None
    quick = demo.parse_args(["--quick"])
    assert quick.config == demo.QUICK_CONFIG and (quick.train_per_class, quick.val_per_class) == (60, 20)
    from engine.config import build_config, read_yaml
    cfg = build_config(file_values=read_yaml(demo.FULL_CONFIG))
    assert cfg.data_dir == FASHION_MNIST_DIR and cfg.epochs * 60000 // cfg.batch_size >= 900


def test_demo_rejects_bad_set_option(tmp_path, capsys):
    if not fashion_mnist_available():
        pytest.skip("needs dataset-fashion-mnist for the data step")
    code = demo.main(["--quick", "--models", TEST_MODEL, "--data", str(tmp_path / "data"), "--out", str(tmp_path / "o"),
                      "--train-per-class", "2", "--val-per-class", "1", "--set", "lr"])
    assert code == 2 and "OPTION=VALUE" in capsys.readouterr().err


def test_demo_comparison_plot(tmp_path):
    """runs/demo/curves.png: both models' loss against images seen and their per-epoch top-1 (with matplotlib)."""
    pytest.importorskip("matplotlib")
    rows = []
    for name, batch in (("a", 16), ("b", 32)):
        path = tmp_path / f"{name}.jsonl"
        records = [{"type": "train", "global_step": step, "loss": 2.0 / step} for step in (1, 2, 3)]
        records += [{"type": "epoch", "epoch": 1, "val_top1": 50.0}, {"type": "epoch", "epoch": 2, "val_top1": 60.0}]
        path.write_text("\n".join(json.dumps(record) for record in records) + "\n")
        rows.append({"model": name, "metrics": str(path), "batch_size": batch})
    png = demo.plot_comparison(rows, str(tmp_path / "curves.png"), target=90.0)
    assert png and open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
