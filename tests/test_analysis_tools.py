"""Analysis tools of issue 6: tools/plot_rates.py, benchmarks/bench_models.py, benchmarks/bench_mindir.py,
tools/ablation.py.

The benchmark tests run the real scripts (worker subprocesses included) on a tiny Swin at 8 px with one
timed call: they check that the tables are well formed and that every derived number (img/s, ratios)
agrees with the raw timings the workers returned, not the speeds themselves.
"""
import json
import math
import os
import re

import numpy as np
import pytest
import mindspore as ms
from mindspore import nn

import models
from benchmarks import bench_mindir, bench_models
from benchmarks.bench_models import ModelSpec
from engine.checkpoint import CheckpointError, save_checkpoint
from tools import ablation, plot_rates

TINY_SWIN = dict(embed_dim=8, depths=[1, 2], num_heads=[1, 2], window_size=2, patch_size=2)
TINY_SWIN_SPEC = "swin_tiny_acmix:embed_dim=8,depths=[1,2],num_heads=[1,2],window_size=2,patch_size=2"


@pytest.fixture(autouse=True)
def graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE)
    yield


# ---- tools/plot_rates.py -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rated_model():
    """A tiny Swin-ACmix (3 ACmix layers) whose rates are set to distinct values: (model, {layer: (r1, r2)})."""
    model = models.create_model("swin_tiny_acmix", num_classes=4, img_size=8, **TINY_SWIN)
    rng = np.random.default_rng(3)
    expected = {}
    for name, param in model.parameters_and_names():
        if name.endswith(".rate1") or name.endswith(".rate2"):
            value = float(rng.uniform(0.1, 2.0))
            param.set_data(ms.Tensor([value], ms.float32))
            layer, leaf = name.rsplit(".", 1)
            expected.setdefault(layer, {})[leaf] = np.float32(value)
    return model, {layer: (float(v["rate1"]), float(v["rate2"])) for layer, v in expected.items()}


def _layer_order(model):
    return [name.rsplit(".", 1)[0] for name, _ in model.parameters_and_names() if name.endswith(".rate1")]


def test_rates_from_live_model_equal_parameters_in_layer_order(rated_model):
    model, expected = rated_model
    rows = plot_rates.rates_from_model(model)
    assert [layer for layer, _, _ in rows] == _layer_order(model)
    assert len(rows) == 3
    for layer, rate1, rate2 in rows:
        assert (rate1, rate2) == pytest.approx(expected[layer], abs=0)


def test_rates_read_back_from_checkpoint(rated_model, tmp_path):
    model, expected = rated_model
    path = str(tmp_path / "state.ckpt")
    named = list(model.parameters_and_names())
    # a training state: model weights, EMA copies with other rate values, optimizer moments of the rates
    ema = [(f"ema.{name}", param.asnumpy() + 10.0) for name, param in named if name.endswith((".rate1", ".rate2"))]
    moments = [(f"optimizer.moments.{name}", np.zeros(1, np.float32)) for name, _ in named if name.endswith(".rate1")]
    save_checkpoint(path, named + ema + moments, meta={"model": "swin_tiny_acmix"})
    rows, meta = plot_rates.rates_from_checkpoint(path)
    assert meta["model"] == "swin_tiny_acmix"
    assert [layer for layer, _, _ in rows] == _layer_order(model)
    for layer, rate1, rate2 in rows:
        assert (rate1, rate2) == pytest.approx(expected[layer], abs=0)
    ema_rows, _ = plot_rates.rates_from_checkpoint(path, weights="ema")
    for (layer, rate1, rate2), (_, raw1, raw2) in zip(ema_rows, rows):
        assert (rate1, rate2) == pytest.approx((raw1 + 10.0, raw2 + 10.0), rel=1e-6)


def test_plot_rates_cli_table_and_png(rated_model, tmp_path):
    model, expected = rated_model
    path = str(tmp_path / "weights.ckpt")
    save_checkpoint(path, model.parameters_and_names())
    out, png = tmp_path / "rates.md", tmp_path / "rates.png"
    assert plot_rates.main(["--checkpoint", path, "--out", str(out), "--png", str(png)]) == 0
    table_rows = [line for line in out.read_text().splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(table_rows) == len(expected)
    for line, layer in zip(table_rows, _layer_order(model)):
        cells = [c.strip() for c in line.strip("|").split("|")]
        rate1, rate2 = expected[layer]
        assert cells[1] == layer
        assert float(cells[2]) == pytest.approx(rate1, abs=5e-5)
        assert float(cells[3]) == pytest.approx(rate2, abs=5e-5)
        assert float(cells[4]) == pytest.approx(math.log(rate1 / rate2), abs=5e-5)
    # the PNG: test_plot_rates_cli_writes_the_png (with matplotlib), test_plot_rates_without_matplotlib_... (without)


def test_plot_rates_cli_writes_the_png(rated_model, tmp_path):
    pytest.importorskip("matplotlib", reason="the PNG needs matplotlib (the 'plot' extra); without it the CLI "
                                             "writes the table only, as the next test checks")
    path = str(tmp_path / "weights.ckpt")
    save_checkpoint(path, rated_model[0].parameters_and_names())
    png = tmp_path / "rates.png"
    assert plot_rates.main(["--checkpoint", path, "--out", str(tmp_path / "rates.md"), "--png", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_rates_without_matplotlib_skips_the_png(rated_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # import matplotlib -> ImportError
    rows = plot_rates.rates_from_model(rated_model[0])
    assert plot_rates.plot_rates([("run", rows)], str(tmp_path / "x.png")) is None
    assert not (tmp_path / "x.png").exists()
    assert "matplotlib is not installed" in capsys.readouterr().err


def test_plot_rates_rejects_a_checkpoint_without_rates(tmp_path):
    path = str(tmp_path / "baseline.ckpt")
    save_checkpoint(path, [("head.weight", np.zeros((2, 2), np.float32))])
    with pytest.raises(CheckpointError, match="rate1/rate2"):
        plot_rates.rates_from_checkpoint(path)


def test_log_ratio_and_one_path_layers():
    assert plot_rates.log_ratio(2.0, 0.5) == pytest.approx(math.log(4.0))
    assert math.isnan(plot_rates.log_ratio(1.0, None))  # attention-only layer: no conv rate
    assert math.isnan(plot_rates.log_ratio(-1.0, 1.0))  # a negative rate has no log ratio
    model = models.create_model("swin_tiny_acmix", num_classes=4, img_size=8, rate_mode="attention", **TINY_SWIN)
    assert {(r1, r2) for _, r1, r2 in plot_rates.rates_from_model(model)} == {(1.0, None)}


# ---- benchmarks/bench_models.py: planning --------------------------------------------------------------
def test_model_spec_parsing():
    spec = ModelSpec.parse("swin_tiny_acmix:depths=[1,2],rates=[1, 1],shift_impl=tensor")
    assert spec.name == "swin_tiny_acmix"
    assert spec.overrides == {"depths": [1, 2], "rates": [1, 1], "shift_impl": "tensor"}
    assert ModelSpec.parse("resnet26").overrides == {}
    with pytest.raises(ValueError, match="key=value"):
        ModelSpec.parse("resnet26:layers")


def test_plan_adds_baselines_and_shift_variants():
    args = bench_models.parse_args(["--models", "resnet26_acmix:kernel_att=5", "swin_tiny_conv",
                                    "--shift_impls", "tensor", "learnable", "--batch_sizes", "1", "4",
                                    "--image_sizes", "64"])
    specs, configs = bench_models.plan(args)
    assert configs == [(1, 64), (4, 64)]
    assert specs == [ModelSpec("resnet26_acmix", {"kernel_att": 5, "shift_impl": "tensor"}),
                     ModelSpec("resnet26_acmix", {"kernel_att": 5, "shift_impl": "learnable"}),
                     ModelSpec("swin_tiny_conv"), ModelSpec("resnet26")]  # the baseline drops ACmix-only options
    pairs = bench_models.find_pairs(specs)
    assert pairs == [(specs[0], specs[3]), (specs[1], specs[3])]
    assert bench_models.shift_groups(specs, ["tensor", "learnable"]) == [specs[:2]]
    with pytest.raises(ValueError, match="unknown model"):
        bench_models.plan(bench_models.parse_args(["--models", "resnet_26"]))
    with pytest.raises(ValueError, match="shift_impls"):
        bench_models.parse_args(["--models", "resnet26", "--shift_impls", "roll"])


def test_models_taking_img_size_are_built_for_the_image_size():
    spec = ModelSpec("swin_tiny", dict(TINY_SWIN, window_size=4))
    swin = bench_models.build_spec_model(spec, image_size=12, num_classes=3)
    # stage maps of a 12 px input: 6 px (window 4) and 3 px (window shrunk to the map: built for 12 px;
    # with the default img_size=224 the second stage would be 56 px with window 4)
    assert [stage.window_size for stage in swin.layers] == [4, 3]
    resnet = bench_models.build_spec_model(ModelSpec("resnet_tiny"), image_size=12, num_classes=3)  # takes no img_size
    assert [c for _, c in resnet.cells_and_names() if isinstance(c, nn.Dense)][-1].out_channels == 3


# ---- benchmarks: real runs ------------------------------------------------------------------------------
def _table(text, heading):
    """Rows (lists of cell strings) of the first markdown table after ``heading``; checks the column count."""
    lines = text.split(heading, 1)[1].strip().splitlines()
    lines = lines[lines.index(next(line for line in lines if line.startswith("|"))):]
    table = []
    for line in lines:
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    assert len(table) >= 3, f"no rows under {heading}"
    assert set(table[1]) == {"---"}
    assert all(len(row) == len(table[0]) for row in table), "rows with a different number of cells"
    return table[0], table[2:]


def _speed(raw, model, overrides, mode):
    row = next(r for r in raw if r["model"] == model and r["overrides"] == overrides and r["mode"] == mode)
    assert "error" not in row, row.get("error")
    return row["batch"] / row["stats"]["median"], row


def test_bench_models_run_pairs_and_shift_ratios(tmp_path):
    out, raw_path = tmp_path / "bench.md", tmp_path / "bench.json"
    code = bench_models.main(["--models", TINY_SWIN_SPEC, "--shift_impls", "tensor", "learnable",
                              "--modes", "inference", "--batch_sizes", "2", "--image_sizes", "8", "--warmup", "1",
                              "--repeats", "1", "--out", str(out), "--json", str(raw_path)])
    assert code == 0
    text, raw = out.read_text(), json.loads(raw_path.read_text())["results"]
    assert f"MindSpore {ms.__version__}" in text
    header, rows = _table(text, "## Inference")
    assert len(rows) == 3  # two shift implementations + the baseline
    tensor, tensor_row = _speed(raw, "swin_tiny_acmix", dict(TINY_SWIN, shift_impl="tensor"), "inference")
    learnable, _ = _speed(raw, "swin_tiny_acmix", dict(TINY_SWIN, shift_impl="learnable"), "inference")
    baseline, _ = _speed(raw, "swin_tiny", TINY_SWIN, "inference")
    assert tensor_row["stats"]["n"] == 1 and tensor_row["peak_rss_mib"] > 0
    speeds = {float(row[header.index("img/s")]) for row in rows}
    assert speeds == {round(v, 1) for v in (tensor, learnable, baseline)}
    _, pair_rows = _table(text, "## ACmix vs baseline")
    assert [float(row[4].rstrip("x")) for row in pair_rows] == [round(tensor / baseline, 2),
                                                                round(learnable / baseline, 2)]
    _, shift_rows = _table(text, "## Shift implementations")
    assert [row[1] for row in shift_rows] == ["tensor", "learnable"]
    assert [float(row[5].rstrip("x")) for row in shift_rows] == [1.0, round(learnable / tensor, 2)]


def test_bench_models_train_step_is_the_engine_step():
    model = models.create_model("swin_tiny_acmix", num_classes=10, img_size=8, **TINY_SWIN)
    before = {name: p.asnumpy().copy() for name, p in model.parameters_and_names()}
    model.set_train(True)
    step = bench_models.engine_train_step(model)
    result = bench_models.timed(step, bench_models.random_batch(2, 8, num_classes=10), warmup=1, repeats=2,
                                max_seconds=60)
    assert result["stats"]["n"] == 2 and result["stats"]["median"] > 0 and result["peak_rss_mib"] > 0
    # the timed call is a whole optimisation step: the weights of the model (the rates included) moved
    changed = [name for name, p in model.parameters_and_names() if not np.array_equal(p.asnumpy(), before[name])]
    assert any(name.endswith("rate1") for name in changed)
    assert any(name.endswith("qkv.weight") for name in changed)


def test_bench_mindir_matches_network(tmp_path):
    out, raw_path = tmp_path / "mindir.md", tmp_path / "mindir.json"
    code = bench_mindir.main(["--models", TINY_SWIN_SPEC, "--no_baselines", "--batch_sizes", "2", "--image_sizes",
                              "8", "--warmup", "1", "--repeats", "1", "--out", str(out), "--json", str(raw_path),
                              "--export_dir", str(tmp_path / "files")])
    assert code == 0
    raw = json.loads(raw_path.read_text())["results"]
    network, _ = _speed(raw, "swin_tiny_acmix", TINY_SWIN, "network")
    graph, graph_row = _speed(raw, "swin_tiny_acmix", TINY_SWIN, "mindir")
    assert graph_row["max_abs_diff"] <= 1e-5 * max(1.0, graph_row["reference_max_abs"])
    assert list((tmp_path / "files").glob("*.mindir"))
    header, rows = _table(out.read_text(), "## Network vs exported MINDIR")
    assert len(rows) == 1
    assert float(rows[0][header.index("network img/s")]) == round(network, 1)
    assert float(rows[0][header.index("MINDIR img/s")]) == round(graph, 1)
    assert float(rows[0][header.index("MINDIR / network")].rstrip("x")) == round(graph / network, 2)


@pytest.mark.slow
def test_bench_models_quick_with_train_and_plot(tmp_path):
    out, png = tmp_path / "quick.md", tmp_path / "quick.png"
    assert bench_models.main(["--quick", "--out", str(out), "--plot", str(png)]) == 0
    text = out.read_text()
    _table(text, "## Training step")
    _table(text, "## ACmix vs baseline")


# ---- tools/ablation.py -----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(ablation.FAMILIES))
def test_ablation_variants_build_with_their_options(family):
    args = ablation.parse_args(["--family", family, "--quick"])
    for variant in ablation.VARIANTS:
        cfg = ablation.run_config(args, variant, 0, "data/x", "runs/x")
        assert cfg.epochs == ablation.QUICK_BUDGET["epochs"]
        net = models.create_model(cfg.model, num_classes=10, **cfg.model_overrides)
        cells = [c for _, c in net.cells_and_names() if hasattr(c, "rate_mode")]
        _, _, kind, options = ablation.VARIANTS[variant]
        if kind == "conv_baseline":
            assert not cells
            continue
        assert cells
        assert {c.rate_mode for c in cells} == {options.get("rate_mode", "learnable")}
        assert {c.shift_impl for c in cells} == {options.get("shift_impl", "learnable")}


def _fake_result(variant, budget, top1):
    return {"variant": variant, "seed": 0, "model": "swin_tiny_acmix", "model_overrides": {}, "budget": budget,
            "params": 1000, "val_top1": top1, "val_loss": 1.0, "best_top1": top1, "train_images_per_s": 10.0,
            "inference_images_per_s": 20.0 if variant == "learnable" else 40.0, "wall_s": 1.0, "date": "d",
            "command": "c", "load_average_at_start": [1.0, 1.0, 1.0]}


def test_ablation_tables_group_rate_and_shift_variants(tmp_path):
    budget = ablation.budget_of(ablation.parse_args(["--quick"]))
    other = dict(budget, epochs=99)
    for variant, use in (("learnable", budget), ("attention", budget), ("shift_tensor", budget), ("conv", other)):
        folder = tmp_path / variant
        folder.mkdir()
        (folder / ablation.RESULT_FILE).write_text(json.dumps(_fake_result(variant, use, 50.0)))
    kept = tmp_path / f"learnable{ablation.REPLACED_MARK}20261203-120000"  # an earlier run, trained again since
    kept.mkdir()
    (kept / ablation.RESULT_FILE).write_text(json.dumps(_fake_result("learnable", budget, 10.0)))
    results, skipped = ablation.collect_results(str(tmp_path), budget)
    assert skipped == 1  # the other budget is never mixed in
    assert [r["variant"] for r in results].count("learnable") == 1  # the replaced run is left out
    text = ablation.tables(results)
    _, rate_rows = _table(text, "(Table 6)")
    assert [row[0] for row in rate_rows] == ["learnable", "attention"]
    assert [row[10] for row in rate_rows] == ["1.00x", "2.00x"]
    _, shift_rows = _table(text, "(Table 7)")
    assert [row[0] for row in shift_rows] == ["shift_tensor", "learnable"]


def test_ablation_summary_mean_std_over_seeds_and_rates():
    budget = ablation.budget_of(ablation.parse_args(["--quick"]))
    top1 = {"learnable": [80.0, 82.5, 86.0], "conv_baseline": [84.0, 85.0, 89.0], "shift_tensor": [70.0, 71.0, 75.0]}
    results = []
    for variant, values in top1.items():
        for seed, value in enumerate(values):
            result = dict(_fake_result(variant, budget, value), seed=seed)
            if variant == "learnable":
                result["rates"] = [["layer1.0", 0.4 + 0.1 * seed, 0.6], ["layer2.0", 0.9, None]]
            results.append(result)
    text = ablation.summary_tables(results)
    _, rows = _table(text, "Table 6 (mean ± std)")
    assert [row[0] for row in rows] == ["learnable", "conv_baseline"]
    for row, values in zip(rows, (top1["learnable"], top1["conv_baseline"])):
        assert row[3] == "0, 1, 2"
        assert row[5] == f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"
    _, rows = _table(text, "Table 7 (mean ± std)")
    assert [row[0] for row in rows] == ["shift_tensor", "learnable"]
    _, rows = _table(text, "Fig. 5")
    assert rows == [["learnable", "layer1.0", "3", "0.50 ± 0.10", "0.60 ± 0.00",
                     f"{np.mean(np.log([0.4 / 0.6, 0.5 / 0.6, 0.6 / 0.6])):.2f} ± "
                     f"{np.std(np.log([0.4 / 0.6, 0.5 / 0.6, 0.6 / 0.6]), ddof=1):.2f}"]]
    assert ablation.mean_std([3.0]) == "3.00 ± —" and ablation.mean_std([None]) == "—"


def test_ablation_defaults_full_data_three_seeds():
    args = ablation.parse_args(["--family", "resnet"])
    assert args.seeds == [0, 1, 2] and args.train_per_class is None and not args.subset
    from tools.prepare_fashion_mnist import DEFAULT_SOURCE
    assert args.data_dir == DEFAULT_SOURCE
    cfg = ablation.run_config(args, "learnable", 1, args.data_dir, "runs/x")
    # the main job's recipe (configs/demo_fashion_mnist_full.yaml): 20 px grey, batch 128
    assert (cfg.batch_size, cfg.image_size, cfg.in_chans, cfg.seed) == (128, 20, 1, 1)
    assert (cfg.scale, cfg.ratio, cfg.hflip) == ([1.0, 1.0], [1.0, 1.0], 0.0)
    assert "--train_per_class" not in ablation._child_argv(args, "learnable", 1)


@pytest.mark.slow
def test_ablation_quick_trains_with_the_engine(tmp_path):
    out = tmp_path / "ablation.md"
    args = ["--quick", "--variants", "learnable", "shift_tensor", "--output_dir", str(tmp_path / "runs"),
            "--data_dir", str(tmp_path / "data"), "--out", str(out), "--override", "embed_dim=8", "depths=[1,1]",
            "num_heads=[1,2]"]
    from tools.prepare_fashion_mnist import DEFAULT_SOURCE
    if not os.path.isdir(DEFAULT_SOURCE):
        pytest.skip("Fashion-MNIST is not installed")
    assert ablation.main(args) == 0
    _, rows = _table(out.read_text(), "(Table 7)")
    assert [row[0] for row in rows] == ["shift_tensor", "learnable"]
    result = json.loads((tmp_path / "runs" / "learnable_seed0" / ablation.RESULT_FILE).read_text())
    rows, _ = plot_rates.rates_from_checkpoint(result["checkpoint"])
    assert rows and all(r1 is not None and r2 is not None for _, r1, r2 in rows)
    # training a variant again keeps the earlier run aside (never deleted) and out of the tables
    first = (tmp_path / "runs" / "learnable_seed0" / ablation.RESULT_FILE).read_text()
    assert ablation.main(args[:2] + ["learnable"] + args[4:]) == 0
    kept = sorted((tmp_path / "runs").glob("learnable_seed0.replaced-*"))
    assert len(kept) == 1 and (kept[0] / ablation.RESULT_FILE).read_text() == first
    _, rows = _table(out.read_text(), "(Table 7)")
    assert [row[0] for row in rows] == ["shift_tensor", "learnable"]


def test_tensor_shift_training_does_not_hang(tmp_path):
    """The ablation's shift_tensor variant: ``ops.pad``'s gradient hung on the ~10th call on CPU (MindSpore
    2.8), so ShiftConv('tensor') pads with the ``ops.Pad`` primitive. Run in a subprocess with a timeout."""
    import subprocess
    import sys
    script = tmp_path / "shift_grad.py"
    script.write_text(
        "import numpy as np, mindspore as ms\n"
        "from mindspore import nn\n"
        "from acmix_ms import ShiftConv\n"
        "ms.set_context(mode=ms.GRAPH_MODE)\n"
        "class Loss(nn.Cell):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.shift = ShiftConv(4, 3, 8, 'tensor')\n"
        "    def construct(self, x):\n"
        "        return (self.shift(x) ** 2).sum()\n"
        "grad = ms.grad(Loss())\n"
        "x = ms.Tensor(np.random.default_rng(0).standard_normal((8, 36, 8, 8)).astype(np.float32))\n"
        "for _ in range(15):\n"
        "    grad(x).asnumpy()\n"
        "print('done')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(bench_models.ROOT),
                                                                      os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env,
                          cwd=str(tmp_path))
    assert done.returncode == 0 and "done" in done.stdout, done.stderr[-2000:]


def test_ablation_time_only_times_each_variant_without_training(tmp_path):
    out = tmp_path / "timing.md"
    args = ["--family", "swin", "--time_only", "--variants", "learnable", "conv_baseline", "--time_steps", "2",
            "--time_rounds", "2", "--batch_size", "4", "--eval_batch_size", "4", "--override", "embed_dim=8",
            "depths=[1,1]", "num_heads=[1,2]", "--output_dir", str(tmp_path / "runs"), "--out", str(out)]
    assert ablation.main(args) == 0
    header, rows = _table(out.read_text(), "Throughput of the swin variants")
    assert header[:4] == ["variant", "what", "train img/s (median of rounds)", "inference img/s"]
    assert [row[0] for row in rows] == ["learnable", "conv_baseline"]
    assert all(float(row[2]) > 0 and float(row[3]) > 0 for row in rows)
    assert rows[0][4] == "1.00x" and rows[0][5] == "1.00x"
    assert not (tmp_path / "runs").exists()  # nothing trained, nothing written there
    with pytest.raises(ValueError, match="--time_steps must be >= 1"):
        ablation.parse_args(["--time_only", "--time_steps", "0"])
