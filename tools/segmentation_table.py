"""Parameters and MACs of the segmentation models beside the paper's Table 2 (ADE20K, 150 classes).

Each registered segmentation model is built with the paper's class count and counted by ``models.profile``
(Parameters; one PyNative forward pass at the paper's input size, batch 1): 512x2048 for Semantic FPN and
UperNet (the size the paper's FLOPs match; ``--input_size 512 512`` gives PVT's own Semantic FPN figures). Swin backbones are built for that input (window shifts in every stage, as at that
size in the official code); PVT backbones keep their 224 px position tables (interpolated at run time, as
PVT's segmentation code does). UperNet's parameters include the auxiliary FCN head; its MACs do not (the
head only runs in training, and mmseg's FLOPs count runs the inference path).

    python tools/segmentation_table.py                                 # all segmentation models
    python tools/segmentation_table.py --models 'semfpn*' --out docs/segmentation_table.md
    python tools/segmentation_table.py --no_macs                       # parameters only (fast)
    python tools/segmentation_table.py --models 'semfpn*' --input_size 512 2048   # another input size
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from models.profile import count_macs, count_params  # noqa: E402
from benchmarks.common import format_value, relative_delta  # noqa: E402


def segmentation_models(patterns=None):
    """Registered segmentation model names matching the patterns (all segmentation models when None)."""
    import fnmatch
    names = [name for name in models.list_models() if models.model_task(name) == "segmentation"
             and (not patterns or any(fnmatch.fnmatch(name, pattern) for pattern in patterns))]
    if not names:
        raise ValueError(f"no registered segmentation model matches {patterns}")
    return names


def measure(name, input_size=None, num_classes=None, with_macs=True, **overrides):
    """{"params_m", "backbone_params_m", "gmacs" (None without MACs), "input", "seconds"} of model ``name``.

    ``input_size`` (H, W) and ``num_classes`` default to the paper's (``models.paper_info``); Swin backbones
    are built for the input size (``overrides`` go to the constructor).
    """
    paper = models.paper_info(name)
    height, width = input_size or paper.get("input_size", (512, 512))
    num_classes = num_classes or paper.get("num_classes", 150)
    start = time.perf_counter()
    if "swin" in name and "img_size" not in overrides:
        overrides = dict(overrides, img_size=(height, width))
    net = models.create_model(name, num_classes=num_classes, **overrides)
    row = {"params_m": count_params(net) / 1e6, "backbone_params_m": count_params(net.backbone) / 1e6,
           "gmacs": None, "input": (height, width)}
    if with_macs:
        row["gmacs"] = count_macs(net, (1, 3, height, width)) / 1e9
    row["seconds"] = time.perf_counter() - start
    return row


def table(rows):
    lines = ["| model | input | params M (ours) | of which backbone | params M (paper) | Δ | GMACs (ours) "
             "| GMACs (paper) | Δ | mIoU (paper) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in rows:
        if "error" in row:
            lines.append(f"| {name} | error: {row['error']} | | | | | | | | |")
            continue
        paper = models.paper_info(name)
        height, width = row["input"]
        lines.append(f"| {name} | {height}x{width} | {row['params_m']:.2f} | {row['backbone_params_m']:.2f} "
                     f"| {format_value(paper.get('params_m'), 0)} | {relative_delta(row['params_m'], paper.get('params_m'))} "
                     f"| {format_value(row['gmacs'], 1)} | {format_value(paper.get('gmacs'), 0)} "
                     f"| {relative_delta(row['gmacs'], paper.get('gmacs'))} | {format_value(paper.get('miou'), 1)} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=None, help="shell-style name patterns (default: all)")
    parser.add_argument("--input_size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="count every model at this input instead of the paper's (Table 2) size")
    parser.add_argument("--no_macs", action="store_true", help="count parameters only (skips the forward pass)")
    parser.add_argument("--out", default=None, help="write the table as markdown to this file")
    args = parser.parse_args(argv)
    if args.input_size and min(args.input_size) < 1:
        parser.error(f"--input_size must be positive, got {args.input_size}")
    from benchmarks.common import environment, environment_markdown
    env = environment()
    rows = []
    for name in segmentation_models(args.models):
        try:
            row = measure(name, args.input_size, with_macs=not args.no_macs)
        except Exception as exc:  # a tool: report the model that fails and go on with the others
            row = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        rows.append((name, row))
        print(f"{name}: " + (row["error"] if "error" in row else
                             f"{row['params_m']:.2f} M params, {format_value(row['gmacs'], 1)} GMACs ({row['seconds']:.1f} s)"),
              file=sys.stderr, flush=True)
    text = table(rows)
    print(text)
    if args.out:
        header = ["# Segmentation models: parameters and MACs beside the paper's Table 2", "",
                  "Generated by `tools/segmentation_table.py` (see its docstring for what is counted). "
                  "Paper: Table 2 (ADE20K, 150 classes; its FLOPs are MACs).", "",
                  environment_markdown(env), "", text, ""]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(header))


if __name__ == "__main__":
    main()
