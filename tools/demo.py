"""The embedded demo: Fashion-MNIST -> train ResNet-ACmix (tiny) and its ResNet baseline -> evaluate both ->
export the ACmix model to MINDIR and verify it -> print a side-by-side table.

    python tools/demo.py                      # defaults: configs/demo_fashion_mnist.yaml, small subset
    python tools/demo.py --train-per-class 500 --val-per-class 100 --epochs 6     # a longer run

Data come from Debian's ``dataset-fashion-mnist`` package (``apt-get install dataset-fashion-mnist``).
Results go to ``<out>/<model>/`` (checkpoints, metrics, logs) and ``<out>/results.json``.
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Train, evaluate and export ACmix vs its baseline on Fashion-MNIST.")
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "demo_fashion_mnist.yaml"))
    parser.add_argument("--models", default="resnet_tiny_acmix,resnet_tiny",
                        help="comma-separated models; the first one is exported")
    parser.add_argument("--data", default=os.path.join(ROOT, "data", "fashion_mnist"), help="ImageFolder root")
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "demo"), help="run folders and results.json")
    parser.add_argument("--train-per-class", type=int, default=60)
    parser.add_argument("--val-per-class", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=None, help="default: the config's epochs")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's batch_size")
    parser.add_argument("--set", nargs="*", default=[], metavar="OPTION=VALUE",
                        help="more train.py options for both models, e.g. --set lr=0.05 image_size=28")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import yaml
    from tools.prepare_fashion_mnist import PrepareError, prepare
    from engine.config import build_config, read_yaml
    from engine.trainer import train
    import eval as eval_script
    import export as export_script

    model_names = [name.strip() for name in args.models.split(",") if name.strip()]
    if not model_names:
        print("error: --models names no model", file=sys.stderr)
        return 2
    try:
        prepare(args.data, train_per_class=args.train_per_class, val_per_class=args.val_per_class)
    except PrepareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    base = read_yaml(args.config)
    extra = {}
    for item in args.set:
        if "=" not in item:
            print(f"error: --set expects OPTION=VALUE, got {item!r}", file=sys.stderr)
            return 2
        key, value = item.split("=", 1)
        extra[key] = yaml.safe_load(value)
    rows = []
    for name in model_names:
        output_dir = os.path.join(args.out, name)
        # the demo's run folders are its own: a rerun replaces them
        values = dict(base, model=name, data_dir=args.data, output_dir=output_dir, overwrite=True, **extra)
        if args.epochs:
            values["epochs"] = args.epochs
        if args.batch_size:
            values["batch_size"] = args.batch_size
        values["warmup_epochs"] = min(values.get("warmup_epochs", 0), values.get("epochs", 1))
        cfg = build_config(file_values=values, file_source=args.config)
        print(f"\n=== {name}: python train.py --config {os.path.relpath(args.config, ROOT)} --model {name} "
              f"--data_dir {args.data} --output_dir {output_dir} --overwrite true --epochs {cfg.epochs} "
              f"--batch_size {cfg.batch_size}")
        trainer, summary = train(cfg)
        checkpoint = summary["best_checkpoint"] or summary["last_checkpoint"]
        start = time.time()
        result = eval_script.run(eval_script.parse_args(["--checkpoint", checkpoint]))
        rows.append({"model": name, "params_m": trainer.param_count / 1e6, "top1": result["top1"],
                     "top5": result["top5"], "val_loss": result["loss"], "train_s": summary["time_s"],
                     "train_img_s": summary["images_per_s"], "eval_s": time.time() - start,
                     "checkpoint": checkpoint, "training_val_top1": summary["best_top1"]})
    first = rows[0]
    mindir = os.path.join(args.out, first["model"], f"{first['model']}.mindir")
    batch = str(cfg.eval_batch_size or cfg.batch_size)  # the MINDIR is then evaluated in batches of this size
    print(f"\n=== export: python export.py --checkpoint {first['checkpoint']} --batch_size {batch} --output {mindir}")
    path, max_diff = export_script.export(export_script.parse_args(
        ["--checkpoint", first["checkpoint"], "--batch_size", batch, "--output", mindir]))
    mindir_result = eval_script.run(eval_script.parse_args(["--mindir", path, "--data_dir", args.data]))
    exported = {"file": path, "max_abs_diff": max_diff, "top1": mindir_result["top1"]}

    print("\n=== Fashion-MNIST demo: "
          f"{args.train_per_class * 10} train / {args.val_per_class * 10} val images, {cfg.epochs} epochs")
    header = (f"{'model':<20} {'params (M)':>10} {'top-1 %':>8} {'top-5 %':>8} {'val loss':>9} {'train s':>8} "
              f"{'img/s':>7}")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['model']:<20} {row['params_m']:>10.3f} {row['top1']:>8.2f} {row['top5']:>8.2f} "
              f"{row['val_loss']:>9.4f} {row['train_s']:>8.0f} {row['train_img_s']:>7.1f}")
    print(f"MINDIR {exported['file']}: max |diff| vs network {exported['max_abs_diff']:.2e}, "
          f"top-1 {exported['top1']:.2f}% (checkpoint: {rows[0]['top1']:.2f}%)")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as handle:
        json.dump({"models": rows, "mindir": exported, "train_per_class": args.train_per_class,
                   "val_per_class": args.val_per_class, "epochs": cfg.epochs}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
