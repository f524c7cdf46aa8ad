"""benchmarks/bench_models.py --rounds (issue 13): interleaved order, pooling of rounds, per-round pair ratios."""
import pytest

from benchmarks import bench_models
from benchmarks.bench_models import ModelSpec


def _result(times, rss):
    return {"params": 10, "device_target": "CPU", "stats": bench_models.summarize(times), "times": times,
            "peak_rss_mib": rss, "rss_rise_mib": rss / 2, "peak_reset": True, "wall_s": 1.0}


def test_interleaved_order_puts_each_baseline_after_its_acmix_model():
    specs = [ModelSpec("resnet26_acmix"), ModelSpec("san10_acmix"), ModelSpec("resnet26"), ModelSpec("san10")]
    assert [s.name for s in bench_models.interleaved_order(specs)] == ["resnet26_acmix", "resnet26",
                                                                       "san10_acmix", "san10"]


def test_rounds_pool_times_and_give_per_round_ratios():
    acmix, base = ModelSpec("resnet_tiny_acmix"), ModelSpec("resnet_tiny")
    results = {}
    for index, (a_times, b_times) in enumerate([([0.2, 0.4], [0.1, 0.1]), ([0.1, 0.1], [0.1, 0.1])]):
        for spec, times in ((acmix, a_times), (base, b_times)):
            key = (spec, 2, 32, "train")
            results[key] = bench_models.merge_round(results.get(key), _result(times, 100 + index), index)
    merged = results[(acmix, 2, 32, "train")]
    assert merged["stats"]["n"] == 4 and merged["round_medians"] == pytest.approx([0.3, 0.1])
    assert merged["peak_rss_mib"] == 101
    assert bench_models.round_ratios(results, acmix, base, 2, 32, "train") == pytest.approx([1 / 3, 1.0])
    table = bench_models.pair_table([(acmix, base)], results, [(2, 32)], ["train"], per_round=True)
    assert "0.67x (0.33–1.00, 2 rounds)" in table
    failed = bench_models.merge_round(merged, {"error": "boom"}, 2)
    assert failed["error"] == "round 3: boom"
    assert bench_models.round_ratios({**results, (acmix, 2, 32, "train"): failed}, acmix, base, 2, 32, "train") == []


def test_rounds_must_be_positive():
    with pytest.raises(ValueError, match="--rounds"):
        bench_models.parse_args(["--models", "resnet_tiny", "--rounds", "0"])


def test_bench_demo_trains_one_channel_models(capsys):
    """benchmarks/bench_demo.py --in_chans 1 (the full demo recipe's grey input): one round of the compiled step."""
    from benchmarks import bench_demo
    assert bench_demo.main(["--no_data", "--models", "resnet_tiny", "--batch_sizes", "2", "--image_sizes", "20",
                            "--rounds", "1", "--images", "2", "--in_chans", "1"]) == 0
    out = capsys.readouterr().out
    assert "| train step resnet_tiny 20px batch 2 |" in out
