"""The main job: Fashion-MNIST -> train ResNet-ACmix (tiny) and its ResNet baseline -> evaluate both ->
export the ACmix model to MINDIR and verify it -> side-by-side table and curves.

    python tools/demo.py            # full: all 60,000 training images, the official 10,000 test images,
                                    # configs/demo_fashion_mnist_full.yaml (target: >= 90 % top-1 each,
                                    # <= 15 min of training for both on 2 CPU cores)
    python tools/demo.py --quick    # the small run (60 / 20 images per class, configs/demo_fashion_mnist.yaml)
    python tools/demo.py --train-per-class 500 --val-per-class 100 --epochs 1    # a subset with the full recipe

Data: Debian's ``dataset-fashion-mnist`` IDX files (``apt-get install dataset-fashion-mnist``; ``--source``),
read into memory by the engine (engine/idx_data.py); a subset is written as IDX files into ``--data``.
Results go to ``<out>/<model>/`` (checkpoints, metrics, logs, curves.png), ``<out>/results.json`` and, with
matplotlib, ``<out>/curves.png`` (both models).
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

FULL_CONFIG = os.path.join(ROOT, "configs", "demo_fashion_mnist_full.yaml")
QUICK_CONFIG = os.path.join(ROOT, "configs", "demo_fashion_mnist.yaml")
QUICK_SUBSET = dict(train_per_class=60, val_per_class=20)
TARGET_TOP1, TARGET_TRAIN_MINUTES = 90.0, 15.0  # the full run's goal (issue 14)


def parse_args(argv):
    from engine.fashion_mnist import DEFAULT_SOURCE
    parser = argparse.ArgumentParser(description="Train, evaluate and export ACmix vs its baseline on Fashion-MNIST.")
    parser.add_argument("--quick", action="store_true",
                        help=f"the small run: {QUICK_SUBSET['train_per_class']} / {QUICK_SUBSET['val_per_class']} "
                             f"images per class, {os.path.relpath(QUICK_CONFIG, ROOT)}")
    parser.add_argument("--config", default=None,
                        help=f"default: {os.path.relpath(FULL_CONFIG, ROOT)} ({os.path.relpath(QUICK_CONFIG, ROOT)} "
                             f"with --quick)")
    parser.add_argument("--models", default="resnet_tiny_acmix,resnet_tiny",
                        help="comma-separated models; the first one is exported")
    parser.add_argument("--source", default=DEFAULT_SOURCE, help="folder of the Fashion-MNIST IDX files")
    parser.add_argument("--data", default=os.path.join(ROOT, "data", "fashion_mnist_subset"),
                        help="where a subset (--quick, --train-per-class) is written as IDX files")
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "demo"), help="run folders and results.json")
    parser.add_argument("--train-per-class", type=int, default=None, help="first N training images per class "
                        "(default: all; 60 with --quick)")
    parser.add_argument("--val-per-class", type=int, default=None, help="first N test images per class "
                        "(default: all; 20 with --quick)")
    parser.add_argument("--epochs", type=int, default=None, help="default: the config's epochs")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's batch_size")
    parser.add_argument("--set", nargs="*", default=[], metavar="OPTION=VALUE",
                        help="more train.py options for both models, e.g. --set lr=0.05 image_size=32")
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK_SUBSET.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    args.config = args.config or (QUICK_CONFIG if args.quick else FULL_CONFIG)
    return args


def data_folder(args):
    """The IDX folder to train on: the source itself, or a subset written into ``--data``."""
    from engine.fashion_mnist import prepare_idx, resolve_paths
    if args.train_per_class is None and args.val_per_class is None:
        resolve_paths(argparse.Namespace(source=args.source, train_images=None, train_labels=None,
                                         val_images=None, val_labels=None))  # clear message when missing
        return args.source
    prepare_idx(args.data, source=args.source, train_per_class=args.train_per_class,
                val_per_class=args.val_per_class)
    return args.data


def plot_comparison(rows, path, target=None):
    """Training loss (vs images seen) and validation top-1 (per epoch) of every model in one PNG (a dashed
    line at ``target`` % top-1 when given), or None without matplotlib."""
    from engine.logger import load_pyplot, read_metrics, save_figure
    plt = load_pyplot()
    if plt is None:
        return None
    figure, (loss_axis, acc_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for row in rows:
        records = read_metrics(row["metrics"])
        steps = sorted((r["global_step"], r["loss"]) for r in records if r.get("type") == "train")
        epochs = sorted((r["epoch"], r["val_top1"]) for r in records
                        if r.get("type") == "epoch" and r.get("val_top1") is not None)
        loss_axis.plot([s * row["batch_size"] for s, _ in steps], [loss for _, loss in steps], label=row["model"])
        acc_axis.plot([e for e, _ in epochs], [top1 for _, top1 in epochs], marker="o", label=row["model"])
    loss_axis.set_xlabel("training images seen")
    loss_axis.set_ylabel("training loss (label smoothing included)")
    if target is not None:
        acc_axis.axhline(target, linestyle="--", color="grey", label=f"goal {target:.0f} %")
    acc_axis.xaxis.get_major_locator().set_params(integer=True)
    acc_axis.set_xlabel("epoch")
    acc_axis.set_ylabel("validation top-1 (%)")
    for axis in (loss_axis, acc_axis):
        axis.legend()
        axis.grid(alpha=0.3)
    figure.tight_layout()
    return save_figure(figure, path, dpi=80)


def print_table(rows, exported, header_line):
    print(f"\n=== {header_line}")
    header = (f"{'model':<20} {'params (M)':>10} {'top-1 %':>8} {'top-5 %':>8} {'val loss':>9} {'train s':>8} "
              f"{'img/s':>7}")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['model']:<20} {row['params_m']:>10.3f} {row['top1']:>8.2f} {row['top5']:>8.2f} "
              f"{row['val_loss']:>9.4f} {row['train_s']:>8.0f} {row['train_img_s']:>7.1f}")
    print(f"MINDIR {exported['file']}: max |diff| vs network {exported['max_abs_diff']:.2e}, "
          f"top-1 {exported['top1']:.2f}% (checkpoint: {rows[0]['top1']:.2f}%)")


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import yaml
    from engine.fashion_mnist import PrepareError
    from engine.config import build_config, read_yaml
    from engine.trainer import train
    import eval as eval_script
    import export as export_script

    model_names = [name.strip() for name in args.models.split(",") if name.strip()]
    if not model_names:
        print("error: --models names no model", file=sys.stderr)
        return 2
    extra = {}
    for item in args.set:
        if "=" not in item:
            print(f"error: --set expects OPTION=VALUE, got {item!r}", file=sys.stderr)
            return 2
        key, value = item.split("=", 1)
        extra[key] = yaml.safe_load(value)
    try:
        data_dir = data_folder(args)
    except PrepareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    base = read_yaml(args.config)
    load_at_start = [round(value, 2) for value in os.getloadavg()]
    rows = []
    for name in model_names:
        output_dir = os.path.join(args.out, name)
        # the demo's run folders are its own: a rerun replaces them
        values = dict(base, model=name, data_dir=data_dir, output_dir=output_dir, overwrite=True, **extra)
        if args.epochs:
            values["epochs"] = args.epochs
        if args.batch_size:
            values["batch_size"] = args.batch_size
        values["warmup_epochs"] = min(values.get("warmup_epochs", 0), values.get("epochs", 1))
        cfg = build_config(file_values=values, file_source=args.config)
        print(f"\n=== {name}: python train.py --config {os.path.relpath(args.config, ROOT)} --model {name} "
              f"--data_dir {data_dir} --output_dir {output_dir} --overwrite true --epochs {cfg.epochs} "
              f"--batch_size {cfg.batch_size}", flush=True)
        trainer, summary = train(cfg)
        checkpoint = summary["best_checkpoint"] or summary["last_checkpoint"]
        start = time.time()
        result = eval_script.run(eval_script.parse_args(["--checkpoint", checkpoint]))
        rows.append({"model": name, "params_m": trainer.param_count / 1e6, "top1": result["top1"],
                     "top5": result["top5"], "val_loss": result["loss"], "train_s": summary["time_s"],
                     "train_img_s": summary["images_per_s"], "eval_s": time.time() - start,
                     "checkpoint": checkpoint, "training_val_top1": summary["best_top1"],
                     "train_images": len(trainer.train_index), "val_images": len(trainer.val_index),
                     "epochs": cfg.epochs, "batch_size": cfg.batch_size,
                     "metrics": os.path.join(output_dir, "metrics.jsonl")})
    first = rows[0]
    mindir = os.path.join(args.out, first["model"], f"{first['model']}.mindir")
    batch = str(cfg.eval_batch_size or cfg.batch_size)  # the MINDIR is then evaluated in batches of this size
    print(f"\n=== export: python export.py --checkpoint {first['checkpoint']} --batch_size {batch} --output {mindir}")
    path, max_diff = export_script.export(export_script.parse_args(
        ["--checkpoint", first["checkpoint"], "--batch_size", batch, "--output", mindir]))
    mindir_result = eval_script.run(eval_script.parse_args(["--mindir", path, "--data_dir", data_dir]))
    exported = {"file": path, "max_abs_diff": max_diff, "top1": mindir_result["top1"]}

    train_minutes = sum(row["train_s"] for row in rows) / 60
    full = first["train_images"] == 60000 and first["val_images"] == 10000
    print_table(rows, exported, f"Fashion-MNIST demo: {first['train_images']} train / {first['val_images']} "
                                f"test images, {cfg.epochs} epoch(s), batch {cfg.batch_size}, "
                                f"{cfg.image_size} px ({os.path.relpath(args.config, ROOT)})")
    met = None
    if full:
        met = all(row["top1"] >= TARGET_TOP1 for row in rows) and train_minutes <= TARGET_TRAIN_MINUTES
        print(f"target (every model >= {TARGET_TOP1:.0f} % top-1, <= {TARGET_TRAIN_MINUTES:.0f} min of training "
              f"for all): {'met' if met else 'NOT met'} (training {train_minutes:.1f} min, load average at the "
              f"start {load_at_start})")
    os.makedirs(args.out, exist_ok=True)
    curves = plot_comparison(rows, os.path.join(args.out, "curves.png"), TARGET_TOP1 if full else None)
    print(f"curves: {curves}" if curves else "curves: matplotlib is not installed (pip install -e .[plot])")
    summary = {"models": rows, "mindir": exported, "data_dir": data_dir, "config": args.config,
               "train_per_class": args.train_per_class, "val_per_class": args.val_per_class, "epochs": cfg.epochs,
               "train_minutes": train_minutes, "target_met": met, "curves": curves,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_average_at_start": load_at_start,
               "cpu_count": os.cpu_count()}
    temp = os.path.join(args.out, "results.json.tmp")
    with open(temp, "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=1)
    os.replace(temp, os.path.join(args.out, "results.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
