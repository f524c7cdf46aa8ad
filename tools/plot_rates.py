"""Path bias of ACmix models (paper Fig. 5): rate1 (attention), rate2 (convolution) and ln(rate1 / rate2)
of every ACmix layer, in layer order, printed as a table and drawn as three curves.

Sources: one or more checkpoints (MindSpore ``.ckpt``: a training state written by train.py, converted
official weights, or any ``ms.save_checkpoint`` of a model) -- several checkpoints give several lines per
panel, like the paper's parallel runs -- or a live model built from the registry (its current values:
the initial rates, or constants for ``rate_mode='fixed'``; one-path modes have no rates).

    python tools/plot_rates.py --checkpoint runs/ablation/learnable/best.ckpt --png docs/path_bias.png
    python tools/plot_rates.py --checkpoint seed0.ckpt seed1.ckpt --weights ema --png rates.png --out rates.md
    python tools/plot_rates.py --model swin_tiny_acmix --override rates=[1,1] rate_mode=fixed

Layers are the name prefixes of ``<prefix>.rate1`` / ``<prefix>.rate2`` pairs (checkpoints) or the
ACmix Cells (live models), ordered by name with numbers compared as numbers (layer order for every
family: ``layer1.0.conv2`` ... ``layer4.2.conv2``, ``layers.0.blocks.0.attn`` ...).
"""
import argparse
import math
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RATE_NAMES = ("rate1", "rate2")
WEIGHTS = ("raw", "ema")


def natural_key(name):
    """Sort key comparing digit runs as numbers: 'layers.2' < 'layers.10'."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def log_ratio(rate1, rate2):
    """ln(rate1 / rate2); NaN when a rate is missing or the ratio is not positive."""
    if rate1 is None or rate2 is None or rate2 == 0 or rate1 / rate2 <= 0:
        return float("nan")
    return math.log(rate1 / rate2)


def rates_from_tensors(tensors, weights="raw"):
    """[(layer, rate1, rate2)] from {name: array} in layer order (a missing partner is None).

    Args:
        tensors: checkpoint entries, e.g. ``engine.checkpoint.read_checkpoint(path)[0]``.
        weights: 'raw' (the model's own entries; training-state entries ``ema.``/``optimizer.``/... are
            ignored) or 'ema' (the ``ema.`` copies of a training state).
    """
    from models.weights import STATE_PREFIXES
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r} is not supported; allowed values: {WEIGHTS}")
    layers = {}
    for name, value in tensors.items():
        if weights == "ema":
            if not name.startswith("ema."):
                continue
            name = name[len("ema."):]
        elif name.startswith(STATE_PREFIXES):
            continue
        prefix, _, leaf = name.rpartition(".")
        if leaf in RATE_NAMES:
            layers.setdefault(prefix, {})[leaf] = float(value.reshape(-1)[0])
    return [(layer, found.get("rate1"), found.get("rate2"))
            for layer, found in sorted(layers.items(), key=lambda item: natural_key(item[0]))]


def rates_from_checkpoint(path, weights="raw"):
    """(rows, meta) of a checkpoint file; rows as in ``rates_from_tensors``."""
    from models.weights import CheckpointError, read_checkpoint
    tensors, meta = read_checkpoint(path)
    rows = rates_from_tensors(tensors, weights)
    if not rows:
        kind = "EMA " if weights == "ema" else ""
        raise CheckpointError(f"{path} holds no {kind}rate1/rate2 entries (not an ACmix model with "
                              f"rate_mode='learnable'{', or trained without EMA' if weights == 'ema' else ''})")
    return rows, meta


def rates_from_model(model):
    """[(layer, rate1, rate2)] of every ACmix Cell of a live model, in layer order (None: path absent)."""
    from acmix_ms import ACmixBase
    rows = [(name, *cell.rate_values()) for name, cell in model.cells_and_names() if isinstance(cell, ACmixBase)]
    return sorted(rows, key=lambda row: natural_key(row[0]))


def _fmt(value):
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def rates_table(rows):
    """Markdown table: index, layer, rate1, rate2, ln(rate1/rate2)."""
    lines = ["| # | layer | rate1 (attention) | rate2 (convolution) | ln(rate1/rate2) |", "|---|---|---|---|---|"]
    for index, (layer, rate1, rate2) in enumerate(rows):
        lines.append(f"| {index} | {layer} | {_fmt(rate1)} | {_fmt(rate2)} | {_fmt(log_ratio(rate1, rate2))} |")
    return "\n".join(lines)


def plot_rates(sources, path, title=None):
    """Three panels (rate1, rate2, ln(rate1/rate2) against layer index), one line per source.

    Args:
        sources: [(label, rows)].
    Returns the PNG path, or None (with a message) when matplotlib is not installed.
    """
    from engine.logger import load_pyplot, save_figure
    plt = load_pyplot()
    if plt is None:
        print("matplotlib is not installed: no PNG written (pip install matplotlib)", file=sys.stderr)
        return None
    panels = (("rate1 (attention path)", lambda r1, r2: r1), ("rate2 (convolution path)", lambda r1, r2: r2),
              ("ln(rate1 / rate2)", log_ratio))
    figure, axes = plt.subplots(1, 3, figsize=(14, 4))
    for axis, (ylabel, value_of) in zip(axes, panels):
        for label, rows in sources:
            values = [value_of(r1, r2) for _, r1, r2 in rows]
            values = [float("nan") if v is None else v for v in values]
            axis.plot(range(len(rows)), values, marker="o", markersize=3, label=label)
        if ylabel.startswith("ln"):
            axis.axhline(0.0, color="grey", linewidth=0.8, linestyle="--")
        axis.set_xlabel("layer (index in the table)")
        axis.set_ylabel(ylabel)
    if len(sources) > 1:
        axes[0].legend(fontsize=7)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return save_figure(figure, path, dpi=90)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", nargs="+", help="one or more .ckpt files (one line per file)")
    source.add_argument("--model", help="registered model name: read the rates of a freshly built model")
    parser.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                        help="constructor overrides of --model (YAML values)")
    parser.add_argument("--weights", default="raw", choices=WEIGHTS,
                        help="checkpoint weights: raw, or the ema. copies of a training state")
    parser.add_argument("--labels", nargs="*", default=None, help="legend labels, one per checkpoint")
    parser.add_argument("--png", default=None, help="write the three-panel plot here (needs matplotlib)")
    parser.add_argument("--out", default=None, help="also write the table(s) as markdown here")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    sources, title = [], None
    if args.model:
        import models
        from engine.config import parse_assignments
        model = models.create_model(args.model, **parse_assignments(args.override, "--override"))
        rows = rates_from_model(model)
        if not rows:
            raise SystemExit(f"error: {args.model} has no ACmix layers")
        sources.append((args.model, rows))
        title = f"{args.model} (freshly built)"
    else:
        from engine.checkpoint import CheckpointError
        if args.labels is not None and len(args.labels) != len(args.checkpoint):
            raise SystemExit(f"error: --labels needs {len(args.checkpoint)} values (one per checkpoint)")
        names = set()
        for index, path in enumerate(args.checkpoint):
            try:
                rows, meta = rates_from_checkpoint(path, args.weights)
            except CheckpointError as err:
                raise SystemExit(f"error: {err}") from None
            if "model" in meta:
                names.add(meta["model"])
            sources.append((args.labels[index] if args.labels else path, rows))
        title = ", ".join(sorted(names)) or None
    text = []
    for label, rows in sources:
        text += [f"### {label}", "", rates_table(rows), ""]
    text = "\n".join(text)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    if args.png:
        written = plot_rates(sources, args.png, title)
        if written:
            print(f"wrote {written}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
