"""Paper Tables 6 and 7 and Fig. 5 at small scale, with error bars: train small ACmix networks per rate mode
and per shift implementation, and their convolutional baseline, on all of Fashion-MNIST (60,000 training
images, the official 10,000 test images) with the same budget and several seeds, and report mean ± std of
top-1, throughput and the learned rates.

Every variant is trained by the project's engine (``engine.trainer.Trainer``, the code behind train.py)
from the main job's recipe (``configs/demo_fashion_mnist_full.yaml``: IDX data in memory, 20 px grey, no augmentation, batch
128, AdamW, warm-up + cosine, label smoothing) with the family's recipe changes below, the same data,
epochs and batch size, seeds 0, 1, 2 by default; only the model options differ. Variants:

  rate modes (Table 6):  learnable (rates learned, init 0.5/0.5; the paper's ACmix), fixed_1_1 (F_att + F_conv),
                         attention (attention path only = the Swin / SASA baseline), conv (ACmix conv path only),
                         conv_baseline (the family's plain convolutional network: Conv-Swin's 3x3 conv mixer /
                         resnet_tiny);
  shift implementations (Table 7, learnable rates): shift_tensor, shift_fixed, shift_random
                         (``learnable`` above is the group conv with shift initialisation, "Full").

Reported per variant and seed: trainable parameters, final and best validation top-1, final validation
loss, the engine's training throughput (img/s, first step of each epoch excluded), inference throughput of
the trained network (graph mode, ``--eval_batch_size`` images, median of timed calls) and the learned rates
(rate1, rate2 of every ACmix layer: Fig. 5). The summary tables give mean ± std (sample standard deviation,
n - 1) over the seeds. Each variant writes ``<output_dir>/<variant>_seed<s>/ablation.json`` beside the
engine's checkpoints and logs; the tables are rebuilt from every result of the same budget found there, so
variants and seeds can be trained in several runs. Training a variant and seed again keeps the earlier
folder as ``<variant>_seed<s>.replaced-<time>`` (left out of the tables), so no result is ever deleted.

    python tools/ablation.py --family resnet --out docs/ablation_resnet.md   # all variants, 3 seeds, full data
    python tools/ablation.py --family swin --out docs/ablation_swin.md
    python tools/ablation.py --family resnet --variants learnable conv_baseline --seeds 0 1 2 3 4
    python tools/ablation.py --table_only --family resnet --out docs/ablation_resnet.md   # tables of what was trained
    python tools/ablation.py --quick                                   # tiny budget (smoke test)
    python tools/ablation.py --family swin --time_only                 # throughput only, no training
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEMO_CONFIG = ROOT / "configs" / "demo_fashion_mnist_full.yaml"
RESULT_FILE = "ablation.json"
# a variant trained again moves its earlier folder to <variant>_seed<s>.replaced-<time>
REPLACED_MARK = ".replaced-"

# A small Swin for 32 px inputs (the 28 px images resized): patch 2 -> 16x16 tokens, windows of 4 (shifted by
# 2), stages 16/8/4 px.
SWIN_DEMO = dict(img_size=32, patch_size=2, embed_dim=32, depths=[2, 2, 2], num_heads=[2, 4, 8], window_size=4)
FAMILIES = {
    "swin": {"acmix": "swin_tiny_acmix", "conv_baseline": "swin_tiny_conv", "overrides": SWIN_DEMO,
             # AdamW as Swin's recipe; lr 1e-3 per 64 images scaled linearly to batch 128 (not tuned)
             "recipe": {"opt": "adamw", "lr": 2e-3, "weight_decay": 0.05, "clip_grad_norm": 5.0,
                        "drop_path_rate": 0.1, "image_size": 32}},
    "resnet": {"acmix": "resnet_tiny_acmix", "conv_baseline": "resnet_tiny", "overrides": {}, "recipe": {}},
}
# variant -> (group, description, model key in the family, ACmix overrides)
VARIANTS = {
    "learnable": ("rate", "learnable rates (ACmix)", "acmix", {}),
    "fixed_1_1": ("rate", "fixed rates 1, 1 (F_att + F_conv)", "acmix", {"rate_mode": "fixed", "rates": [1.0, 1.0]}),
    "attention": ("rate", "attention path only", "acmix", {"rate_mode": "attention"}),
    "conv": ("rate", "ACmix conv path only", "acmix", {"rate_mode": "conv"}),
    "conv_baseline": ("rate", "plain convolution network", "conv_baseline", {}),
    "shift_tensor": ("shift", "tensor shifts (Fig. 3a)", "acmix", {"shift_impl": "tensor"}),
    "shift_fixed": ("shift", "fixed shift kernels (Fig. 3c.I)", "acmix", {"shift_impl": "fixed"}),
    "shift_random": ("shift", "learnable, random init (w/o init)", "acmix", {"shift_impl": "random"}),
}
# the learnable variant is the shift table's "group conv (full)" row as well
SHIFT_ROWS = ("shift_tensor", "shift_fixed", "shift_random", "learnable")
# train/val_per_class None: all 60,000 / 10,000 images, read from the IDX folder itself
BUDGET = dict(train_per_class=None, val_per_class=None, epochs=1, batch_size=128)
QUICK_BUDGET = dict(train_per_class=20, val_per_class=10, epochs=1, batch_size=32)
SEEDS, QUICK_SEEDS = [0, 1, 2], [0]


def variant_model(family, variant, shape_overrides=None):
    """(model name, constructor overrides) of a variant; ``shape_overrides`` change the family's shape."""
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} is not supported; allowed values: {tuple(FAMILIES)}")
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is not supported; allowed values: {tuple(VARIANTS)}")
    spec = FAMILIES[family]
    _, _, model_key, extra = VARIANTS[variant]
    overrides = dict(spec["overrides"], **(shape_overrides or {}))
    if model_key == "acmix":
        overrides.update(extra)
    return spec[model_key], overrides


def budget_of(args):
    """What must be equal for results to share a table: data, epochs, batch, model shape."""
    image_size = FAMILIES[args.family]["recipe"].get("image_size", read_demo_config()["image_size"])
    return {"family": args.family, "train_per_class": args.train_per_class, "val_per_class": args.val_per_class,
            "epochs": args.epochs, "batch_size": args.batch_size, "image_size": image_size, "shape": args.shape}


def read_demo_config():
    from engine.config import read_yaml
    return read_yaml(str(DEMO_CONFIG))


def run_config(args, variant, seed, data_dir, output_dir):
    """The engine Config of one variant: demo recipe + family recipe + budget + the variant's model."""
    from engine.config import build_config
    model, overrides = variant_model(args.family, variant, args.shape)
    values = read_demo_config()
    values.update(FAMILIES[args.family]["recipe"])
    values.update(model=model, model_overrides=overrides, data_dir=data_dir, output_dir=output_dir, seed=seed,
                  epochs=args.epochs, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
                  warmup_epochs=min(values.get("warmup_epochs", 0.2), args.epochs), log_interval=args.log_interval,
                  num_workers=args.num_workers, device_target=args.device_target, plot=False)
    return build_config(file_values=values, file_source=str(DEMO_CONFIG))


def inference_speed(network, batch, image_size, in_chans, warmup=1, repeats=5):
    """Median img/s of ``network`` in inference mode on a random (batch, in_chans, S, S) input."""
    import numpy as np
    import mindspore as ms
    from benchmarks.common import summarize, time_calls
    network.set_train(False)
    images = ms.Tensor(np.random.default_rng(0).standard_normal((batch, in_chans, image_size, image_size))
                       .astype(np.float32))
    stats = summarize(time_calls(network, (images,), warmup, repeats))
    return batch / stats["median"], stats


def time_variants(args):
    """Throughput of every variant's training step and inference, timed in this process without training
    (``--time_only``): the same models, recipe (optimizer, clipping, drop path) and batch as the training runs, on
    random inputs; ``--time_rounds`` rounds, the variants' order reversed every other round; medians of the
    rounds. For a quiet re-timing of variants whose training runs shared the cores. Returns the markdown table."""
    import numpy as np
    import mindspore as ms
    from benchmarks.common import summarize, time_calls
    from engine.losses import SmoothedCrossEntropy
    from engine.optim import create_optimizer
    from engine.runtime import build_model, compile_then_release, model_kwargs, setup_context
    from engine.step import NetWithLoss, NoLossScaler, TrainStep
    setup_context("graph", args.device_target)
    steps_per_epoch = max(1, 6000 * 10 // args.batch_size)
    timed = {}
    for variant in args.variants:
        cfg = run_config(args, variant, 0, args.data_dir, os.path.join(args.output_dir, "timing"))
        model, _ = build_model(cfg.model, 10, model_kwargs(cfg.model_overrides, cfg.drop_path_rate, cfg.in_chans),
                               cfg.image_size)
        optimizer, _, _ = create_optimizer(cfg, model, list(model.parameters_and_names()), steps_per_epoch,
                                           cfg.batch_size)
        step = TrainStep(NetWithLoss(model, SmoothedCrossEntropy(cfg.label_smoothing)), optimizer, NoLossScaler(),
                         cfg.clip_grad_norm)
        rng = np.random.default_rng(0)
        images = ms.Tensor(rng.standard_normal((cfg.batch_size, cfg.in_chans, cfg.image_size, cfg.image_size))
                           .astype(np.float32))
        labels = ms.Tensor(rng.integers(0, 10, cfg.batch_size).astype(np.int32))
        eval_images = ms.Tensor(rng.standard_normal((cfg.eval_batch_size, cfg.in_chans, cfg.image_size,
                                                     cfg.image_size)).astype(np.float32))
        model.set_train(True)
        compile_then_release(step, images, labels)
        timed[variant] = {"step": step, "model": model, "inputs": (images, labels), "eval": eval_images,
                          "batch": cfg.batch_size, "train": [], "inference": []}
    for round_index in range(args.time_rounds):
        order = args.variants if round_index % 2 == 0 else list(reversed(args.variants))
        for variant in order:
            entry = timed[variant]
            entry["model"].set_train(True)
            times = time_calls(entry["step"], entry["inputs"], 1, args.time_steps)
            entry["train"].append(entry["batch"] / summarize(times)["median"])
            images_per_s, _ = inference_speed(entry["model"], args.eval_batch_size, args.image_size_of_family,
                                              entry["eval"].shape[1], repeats=max(2, args.time_steps // 2))
            entry["inference"].append(images_per_s)
    first = args.variants[0]
    lines = ["| variant | what | train img/s (median of rounds) | inference img/s | train vs " + first
             + " | inference vs " + first + " |", "|---|---|---|---|---|---|"]
    medians = {v: (float(np.median(timed[v]["train"])), float(np.median(timed[v]["inference"])))
               for v in args.variants}
    for variant in args.variants:
        train, inference = medians[variant]
        lines.append(f"| {variant} | {VARIANTS[variant][1]} | {train:.1f} | {inference:.1f} "
                     f"| {train / medians[first][0]:.2f}x | {inference / medians[first][1]:.2f}x |")
    return "\n".join(lines)


def _child_argv(args, variant, seed):
    """Command line of the subprocess that trains one variant with this run's options."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--family", args.family, "--variants", variant,
            "--seeds", str(seed), "--data_dir", args.data_dir, "--output_dir", args.output_dir]
    for name in ("train_per_class", "val_per_class", "epochs", "batch_size", "eval_batch_size", "num_workers",
                 "log_interval"):
        if getattr(args, name) is not None:  # per-class None: all images
            argv += [f"--{name}", str(getattr(args, name))]
    if args.override:
        argv += ["--override", *args.override]
    if args.device_target:
        argv += ["--device_target", args.device_target]
    return argv + ["--child_of", args.command]


def train_in_subprocess(args, variant, seed):
    """Train one variant in a fresh process (memory and graph caches do not pile up); returns its result."""
    folder = os.path.join(args.output_dir, f"{variant}_seed{seed}")
    done = subprocess.run(_child_argv(args, variant, seed), cwd=os.getcwd())
    path = os.path.join(folder, RESULT_FILE)
    if done.returncode != 0 or not os.path.isfile(path):
        raise SystemExit(f"error: training variant {variant} (seed {seed}) failed with exit code {done.returncode}; "
                         f"see {folder}/train.log")
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def train_variant(args, variant, seed, data_dir):
    """Train one variant with the engine in this process; writes and returns its result dict."""
    from engine.trainer import Trainer
    folder = os.path.join(args.output_dir, f"{variant}_seed{seed}")
    if os.path.isdir(folder):
        made_here = os.path.isfile(os.path.join(folder, RESULT_FILE)) or os.path.isfile(
            os.path.join(folder, "train.log"))
        if not made_here:
            raise SystemExit(f"error: {folder} exists and was not written by this tool; choose another --output_dir")
        # a fresh run (the engine appends to metrics.jsonl); the earlier one is kept beside it, never deleted
        aside = f"{folder}{REPLACED_MARK}{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(folder, aside)
        print(f"{folder} held an earlier run: moved to {aside} (not read into the tables)")
    cfg = run_config(args, variant, seed, data_dir, folder)
    load = [round(v, 2) for v in os.getloadavg()]
    start = time.time()
    trainer = Trainer(cfg)
    summary = trainer.fit()
    images_per_s, stats = inference_speed(trainer.network, cfg.eval_batch_size, cfg.image_size, cfg.in_chans)
    last = summary["last_val"] or {}
    from tools.plot_rates import rates_from_model
    rates = [[layer, rate1, rate2] for layer, rate1, rate2 in rates_from_model(trainer.model)]
    result = {"variant": variant, "seed": seed, "model": cfg.model, "model_overrides": cfg.model_overrides,
              "budget": budget_of(args), "params": trainer.param_count, "val_top1": last.get("top1"),
              "val_loss": last.get("loss"), "best_top1": summary["best_top1"],
              "train_images_per_s": summary["images_per_s"], "inference_images_per_s": images_per_s,
              "inference_batch": cfg.eval_batch_size, "inference_latency_ms": 1e3 * stats["median"],
              "train_time_s": summary["time_s"], "wall_s": time.time() - start,
              "global_step": summary["global_step"], "checkpoint": summary["last_checkpoint"], "rates": rates,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_average_at_start": load,
              "command": args.command}
    temp = os.path.join(folder, RESULT_FILE + ".tmp")
    with open(temp, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=1)
    os.replace(temp, os.path.join(folder, RESULT_FILE))
    return result


def collect_results(output_dir, budget):
    """Every ablation.json under ``output_dir`` trained with ``budget``: (results, other-budget count)."""
    found, skipped = [], 0
    for path in sorted(Path(output_dir).glob(f"*/{RESULT_FILE}")):
        if REPLACED_MARK in path.parent.name:  # an earlier run of a variant that was trained again
            continue
        result = json.loads(path.read_text())
        if result.get("budget") == budget:
            found.append(result)
        else:
            skipped += 1
    order = {name: i for i, name in enumerate(VARIANTS)}
    found.sort(key=lambda r: (order.get(r["variant"], len(order)), r["seed"]))
    return found, skipped


def _runs(results):
    """(command, dates, load averages) of the training invocations behind ``results``."""
    runs = {}
    for result in results:
        dates, loads = runs.setdefault(result.get("command", "?"), (set(), []))
        dates.add(result["date"])
        loads.append(f"{result['variant']} " + "/".join(f"{v:.1f}" for v in result.get("load_average_at_start", [])))
    return [(command, dates, loads) for command, (dates, loads) in runs.items()]


def _pct(value):
    return "—" if value is None else f"{value:.2f}"


def _row(result, reference=None):
    ratio = "—"
    if reference is not None:
        ratio = f"{result['inference_images_per_s'] / reference['inference_images_per_s']:.2f}x"
    shape = dict(FAMILIES[result["budget"]["family"]]["overrides"], **result["budget"].get("shape", {}))
    overrides = ", ".join(f"{k}={v}" for k, v in sorted(result["model_overrides"].items()) if k not in shape)
    return (f"| {result['variant']} | {VARIANTS[result['variant']][1]} | {result['model']}"
            f"{' (' + overrides + ')' if overrides else ''} | {result['seed']} | {result['params'] / 1e3:.1f} "
            f"| {_pct(result['val_top1'])} | {_pct(result['best_top1'])} | {result['val_loss']:.3f} "
            f"| {result['train_images_per_s']:.1f} | {result['inference_images_per_s']:.1f} | {ratio} "
            f"| {result['wall_s']:.0f} |")


HEADER = ("| variant | what | model (overrides) | seed | trainable params (K) | val top-1 % (final) | best top-1 % "
          "| val loss | train img/s | inference img/s | inference vs first row | wall s |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")


def tables(results):
    """Markdown tables: rate modes (Table 6) and shift implementations (Table 7)."""
    by_variant = {}
    for result in results:
        by_variant.setdefault(result["variant"], []).append(result)
    sections = []
    rate_rows = [r for name in VARIANTS if VARIANTS[name][0] == "rate" for r in by_variant.get(name, [])]
    if rate_rows:
        sections += ["### Combining the two paths (Table 6)", "", HEADER]
        sections += [_row(r, rate_rows[0]) for r in rate_rows] + [""]
    shift_rows = [r for name in SHIFT_ROWS for r in by_variant.get(name, [])]
    if any(r["variant"] != "learnable" for r in shift_rows):
        sections += ["### Shift implementations (Table 7)", "", HEADER]
        sections += [_row(r, shift_rows[0]) for r in shift_rows] + [""]
    return "\n".join(sections)


def mean_std(values):
    """'mean ± std' (sample std, n - 1; '—' for it with one value) of the non-None ``values``."""
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    mean = sum(values) / len(values)
    if len(values) < 2:
        return f"{mean:.2f} ± —"
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.2f} ± {std:.2f}"


SUMMARY_HEADER = ("| variant | what | model (overrides) | seeds | trainable params (K) | top-1 % (final) "
                  "| best top-1 % | train img/s | inference img/s |\n|---|---|---|---|---|---|---|---|---|")


def _summary_row(group):
    first = group[0]
    shape = dict(FAMILIES[first["budget"]["family"]]["overrides"], **first["budget"].get("shape", {}))
    overrides = ", ".join(f"{k}={v}" for k, v in sorted(first["model_overrides"].items()) if k not in shape)
    return (f"| {first['variant']} | {VARIANTS[first['variant']][1]} | {first['model']}"
            f"{' (' + overrides + ')' if overrides else ''} | {', '.join(str(r['seed']) for r in group)} "
            f"| {first['params'] / 1e3:.1f} | {mean_std([r['val_top1'] for r in group])} "
            f"| {mean_std([r['best_top1'] for r in group])} | {mean_std([r['train_images_per_s'] for r in group])} "
            f"| {mean_std([r['inference_images_per_s'] for r in group])} |")


def rates_summary(results):
    """Fig. 5 as a table: per learnable-rate variant and ACmix layer, mean ± std over seeds of rate1, rate2
    and ln(rate1 / rate2)."""
    import math
    lines = []
    for name in VARIANTS:
        group = [r for r in results if r["variant"] == name and r.get("rates")]
        layers = {}
        for result in group:
            for layer, rate1, rate2 in result["rates"]:
                if rate1 is not None and rate2 is not None:
                    ratio = math.log(rate1 / rate2) if rate2 and rate1 / rate2 > 0 else None
                    layers.setdefault(layer, []).append((rate1, rate2, ratio))
        if not layers or VARIANTS[name][3].get("rate_mode") is not None:
            continue  # only learned rates say something (fixed / single-path modes are set by hand)
        if not lines:
            lines = ["| variant | layer | seeds | rate1 (attention) | rate2 (convolution) | ln(rate1/rate2) |",
                     "|---|---|---|---|---|---|"]
        for layer, values in layers.items():
            lines.append(f"| {name} | {layer} | {len(values)} | {mean_std([v[0] for v in values])} "
                         f"| {mean_std([v[1] for v in values])} | {mean_std([v[2] for v in values])} |")
    return "\n".join(lines)


def summary_tables(results):
    """Markdown: mean ± std over seeds per variant (rate modes, shift implementations) and the learned rates."""
    by_variant = {}
    for result in results:
        by_variant.setdefault(result["variant"], []).append(result)
    sections = ["### Summary over seeds: combining the two paths, Table 6 (mean ± std)", "", SUMMARY_HEADER]
    sections += [_summary_row(by_variant[name]) for name in VARIANTS
                 if VARIANTS[name][0] == "rate" and name in by_variant] + [""]
    shift = [name for name in SHIFT_ROWS if name in by_variant]
    if any(name != "learnable" for name in shift):
        sections += ["### Summary over seeds: shift implementations, Table 7 (mean ± std)", "", SUMMARY_HEADER]
        sections += [_summary_row(by_variant[name]) for name in shift] + [""]
    rates = rates_summary(results)
    if rates:
        sections += ["### Learned rates after training, Fig. 5 (mean ± std over seeds)", "", rates, ""]
    sections += ["### Every run (per seed)", ""]
    return "\n".join(sections)


def describe_budget(budget, data_dir):
    family = FAMILIES[budget["family"]]
    recipe = ", ".join(f"{k} {v}" for k, v in family["recipe"].items()) or "the demo recipe unchanged"
    shape = ", ".join(f"{k}={v}" for k, v in dict(family["overrides"], **budget["shape"]).items()) \
        or "registered defaults"
    train = "all" if budget["train_per_class"] is None else budget["train_per_class"]
    val = "all" if budget["val_per_class"] is None else budget["val_per_class"]
    return (f"Budget: Fashion-MNIST ({data_dir}), {train} training and "
            f"{val} test (validation) images per class (10 classes), {budget['image_size']} px, "
            f"{budget['epochs']} epoch(s) at batch {budget['batch_size']}. Recipe: `{DEMO_CONFIG.relative_to(ROOT)}` "
            f"with {recipe}. Model shape: {family['acmix']} with {shape}.")


def parse_args(argv):
    from engine.config import DEVICE_TARGETS
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="swin", choices=tuple(FAMILIES))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=tuple(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help=f"default: {' '.join(map(str, SEEDS))} ({' '.join(map(str, QUICK_SEEDS))} with --quick)")
    parser.add_argument("--data_dir", default=None,
                        help="data folder (IDX files or ImageFolder); default: the Fashion-MNIST IDX folder itself, "
                             "or with a per-class subset data/fashion_mnist_idx_<train>_<val> (written if missing)")
    parser.add_argument("--fashion_mnist_source", default=None,
                        help="folder of the Fashion-MNIST IDX files (default: tools/prepare_fashion_mnist.py's)")
    parser.add_argument("--train_per_class", type=int, default=None, help="first N training images per class "
                        "(default: all 6,000)")
    parser.add_argument("--val_per_class", type=int, default=None, help="first N test images per class "
                        "(default: all 1,000)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch_size", type=int, default=None)
    parser.add_argument("--eval_batch_size", type=int, default=250)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--log_interval", type=int, default=50)
    parser.add_argument("--device_target", default=None, choices=DEVICE_TARGETS)
    parser.add_argument("--output_dir", default=None, help="default: runs/ablation_<family>")
    parser.add_argument("--quick", action="store_true", help=f"tiny budget {QUICK_BUDGET}")
    parser.add_argument("--table_only", action="store_true", help="only rebuild the table from saved results")
    parser.add_argument("--dry_run", action="store_true", help="print each variant's run config and exit")
    parser.add_argument("--time_only", action="store_true",
                        help="time each variant's training step and inference on random inputs (no training)")
    parser.add_argument("--time_steps", type=int, default=20, help="timed training steps per round (--time_only)")
    parser.add_argument("--time_rounds", type=int, default=2, help="rounds over the variants (--time_only)")
    parser.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                        help="change the family's model shape for every variant, e.g. embed_dim=16 (YAML values)")
    parser.add_argument("--out", default=None, help="write the markdown report here")
    parser.add_argument("--child_of", default=None, help=argparse.SUPPRESS)  # set on the per-variant subprocesses
    args = parser.parse_args(argv)
    from engine.config import parse_assignments
    args.shape = parse_assignments(args.override, "--override")
    given = sys.argv[1:] if argv is None else list(argv)
    args.command = args.child_of or "python tools/ablation.py " + " ".join(shlex.quote(a) for a in given)
    budget = QUICK_BUDGET if args.quick else BUDGET
    for key, value in budget.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
        if getattr(args, key) is not None and getattr(args, key) < 1:
            raise ValueError(f"--{key} must be >= 1, got {getattr(args, key)}")
    if args.seeds is None:
        args.seeds = list(QUICK_SEEDS if args.quick else SEEDS)
    for name in ("time_steps", "time_rounds"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    args.image_size_of_family = FAMILIES[args.family]["recipe"].get("image_size", read_demo_config()["image_size"])
    args.output_dir = args.output_dir or os.path.join("runs", f"ablation_{args.family}" + ("_quick" if args.quick
                                                                                            else ""))
    args.subset = args.train_per_class is not None or args.val_per_class is not None
    if not args.data_dir:
        from engine.fashion_mnist import DEFAULT_SOURCE
        args.data_dir = (os.path.join("data", f"fashion_mnist_idx_{args.train_per_class}_{args.val_per_class}")
                         if args.subset else args.fashion_mnist_source or DEFAULT_SOURCE)
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    budget = budget_of(args)
    if args.dry_run:
        for variant in args.variants:
            for seed in args.seeds:
                cfg = run_config(args, variant, seed, args.data_dir,
                                 os.path.join(args.output_dir, f"{variant}_seed{seed}"))
                print(f"{variant} seed {seed}: model {cfg.model} {cfg.model_overrides} opt {cfg.opt} lr {cfg.lr} "
                      f"epochs {cfg.epochs} batch {cfg.batch_size}")
        return 0
    if args.time_only:
        from benchmarks.common import environment, environment_markdown
        text = "\n".join([f"Throughput of the {args.family} variants (no training; batch {args.batch_size}, "
                          f"{args.image_size_of_family} px, inference batch {args.eval_batch_size}, "
                          f"{args.time_rounds} round(s) of {args.time_steps} steps):", "",
                          environment_markdown(environment(args.device_target)), "", time_variants(args)])
        print(text)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text("# Ablation variants: throughput\n\n" + text + "\n")
        return 0
    if args.child_of is not None:  # a per-variant subprocess: train here, the parent reports
        train_variant(args, args.variants[0], args.seeds[0], args.data_dir)
        return 0
    if not args.table_only:
        if args.subset:
            from engine.fashion_mnist import DEFAULT_SOURCE, prepare_idx
            prepare_idx(args.data_dir, source=args.fashion_mnist_source or DEFAULT_SOURCE,
                        train_per_class=args.train_per_class, val_per_class=args.val_per_class)
        for variant in args.variants:
            for seed in args.seeds:
                result = train_in_subprocess(args, variant, seed)
                print(f"== {variant} seed {seed}: val top-1 {_pct(result['val_top1'])}%, train "
                      f"{result['train_images_per_s']:.1f} img/s, inference {result['inference_images_per_s']:.1f} "
                      f"img/s ({result['wall_s']:.0f} s)", flush=True)
    results, skipped = collect_results(args.output_dir, budget)
    if not results:
        raise SystemExit(f"error: no results with budget {budget} under {args.output_dir}")
    from benchmarks.common import environment, environment_markdown
    text = "\n".join([describe_budget(budget, args.data_dir), "",
                      "Machine and software (date, load and command: of the invocation that wrote this report):", "",
                      environment_markdown(environment(args.device_target)), "",
                      f"Results read from `{args.output_dir}/*/{RESULT_FILE}`"
                      + (f" ({skipped} result(s) of other budgets ignored)" if skipped else "") + ". Training runs:",
                      ""] + [f"- `{command}` ({', '.join(sorted(dates))}; load average at the start of each variant: "
                             f"{'; '.join(loads)})" for command, dates, loads in _runs(results)]
                     + ["", summary_tables(results), "", tables(results)])
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("# Ablation on Fashion-MNIST\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
