"""Model benchmark: inference and training-step throughput of registered models (paper Tables 5 and 7).

For every model, batch size and image size: inference (``set_train(False)``, graph mode, float32) images/s
and latency, and the throughput of one training step of the project's engine (``engine.step.TrainStep``:
forward, label-smoothed cross entropy, gradients, optimizer update). Each configuration and mode runs in a
fresh Python subprocess, so graph caches and peak memory (VmHWM, see ``benchmarks/common.py``) of one
configuration never mix with another's. Timing: warm-up calls (the first compiles), then up to ``--repeats``
timed calls; median, 25th/75th percentiles, spread = IQR / median.

Rounds (``--rounds N``, for a loaded machine): every configuration is measured N times, the rounds interleaved
(round r measures every model once, each ACmix model right next to its baseline, the order reversed every other
round, so a change of load hits both sides of a pair alike); a configuration's statistics pool the timed calls
of all rounds, and the pair table adds the ratio of every round (median, min–max).

Pairs measured in the same run are reported as ratios:
  * each ACmix model (``*_acmix``) against its baseline (the name without ``_acmix``, built with the same
    overrides minus the ACmix-only ones); baselines are added automatically (``--no_baselines`` to skip);
  * with ``--shift_impls``, every ACmix model is measured once per shift implementation
    (``shift_impl=...`` override; paper Table 7: tensor / fixed / random / learnable) and each is
    reported against the first one listed.

Model specs: ``name`` or ``name:key=value,key=value`` (values read as YAML, e.g.
``swin_tiny_acmix:embed_dim=48,depths=[2,2,2,2]``); ``--override key=value`` applies to every model.
Models whose constructor takes ``img_size`` (Swin, PVT) are built for the measured image size.

    python benchmarks/bench_models.py --models resnet26_acmix swin_tiny_acmix --batch_sizes 1 8 \
        --image_sizes 224 --out docs/benchmarks.md --plot docs/benchmarks.png
    python benchmarks/bench_models.py --models swin_tiny_acmix --shift_impls tensor fixed random learnable
    python benchmarks/bench_models.py --models resnet26_acmix san10_acmix --batch_sizes 8 --rounds 3
    python benchmarks/bench_models.py --quick          # resnet_tiny pair, 32 px, batch 2, 1 timed call
    python benchmarks/bench_models.py --dry_run ...    # list the configurations only
"""
import argparse
import json
import math
import statistics
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (PeakRSS, environment, environment_markdown, summarize,  # noqa: E402
                               time_calls)

MODES = ("inference", "train")
ACMIX_SUFFIX = "_acmix"
# constructor options that only ACmix models take: dropped when building the baseline of a pair
ACMIX_ONLY_OPTIONS = ("shift_impl", "rate_mode", "rates", "kernel_conv", "kernel_att", "fc_bias",
                      "conv_on_shifted_map", "attention_impl", "official_init")
RESULT_PREFIX = "@@bench-result@@ "
QUICK = dict(models=["resnet_tiny_acmix"], batch_sizes=[2], image_sizes=[32], warmup=1, repeats=1)


# ---- model specs ------------------------------------------------------------------------------------
def _split_top_level(text, separator=","):
    """Split on ``separator`` outside brackets/braces (so list values keep their commas)."""
    parts, depth, current = [], 0, ""
    for char in text:
        if char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        if char == separator and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return parts


def parse_assignments(items, what):
    """``['a=1', 'b=[1,2]']`` -> ``{'a': 1, 'b': [1, 2]}`` (values read as YAML)."""
    import yaml
    result = {}
    for item in items:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise ValueError(f"{what}: expected key=value, got {item!r}")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        result[key.strip()] = value
    return result


class ModelSpec:
    """A registered model name and its constructor overrides (hashable, printable)."""

    def __init__(self, name, overrides=None):
        self.name = name
        self.overrides = dict(overrides or {})

    @classmethod
    def parse(cls, text):
        """``'name'`` or ``'name:key=value,key=value'``."""
        name, _, rest = text.partition(":")
        if not name:
            raise ValueError(f"model spec {text!r} has no model name (format: name or name:key=value,...)")
        items = [item for item in _split_top_level(rest) if item.strip()] if rest else []
        return cls(name.strip(), parse_assignments(items, f"model spec {text!r}"))

    def with_overrides(self, **extra):
        return ModelSpec(self.name, {**self.overrides, **extra})

    @property
    def overrides_text(self):
        return ", ".join(f"{key}={json.dumps(value)}" for key, value in sorted(self.overrides.items()))

    @property
    def label(self):
        return f"{self.name}({self.overrides_text})" if self.overrides else self.name

    def key(self):
        return (self.name, json.dumps(self.overrides, sort_keys=True))

    def __eq__(self, other):
        return isinstance(other, ModelSpec) and self.key() == other.key()

    def __hash__(self):
        return hash(self.key())

    def __repr__(self):
        return f"ModelSpec({self.label})"


def is_acmix(spec):
    return spec.name.endswith(ACMIX_SUFFIX)


def baseline_of(spec):
    """The baseline spec of an ACmix spec (name without ``_acmix``, ACmix-only overrides dropped), or None."""
    import models
    if not is_acmix(spec):
        return None
    name = spec.name[:-len(ACMIX_SUFFIX)]
    if not models.is_model(name):
        return None
    return ModelSpec(name, {k: v for k, v in spec.overrides.items() if k not in ACMIX_ONLY_OPTIONS})


def expand_specs(specs, shift_impls=None, add_baselines=True):
    """Specs to measure, in order: each ACmix spec once per shift implementation, then missing baselines."""
    import models
    out = []

    def add(spec):
        if spec not in out:
            out.append(spec)

    for spec in specs:
        models.paper_info(spec.name)  # raises ValueError listing the registered names if unknown
        if shift_impls and is_acmix(spec):
            for impl in shift_impls:
                add(spec.with_overrides(shift_impl=impl))
        else:
            add(spec)
    if add_baselines:
        for spec in list(out):
            baseline = baseline_of(spec)
            if baseline is not None:
                add(baseline)
    return out


def build_model(spec, image_size, num_classes=1000, in_chans=3):
    """``models.create_model`` for ``spec``; models taking ``img_size`` are built for ``image_size``."""
    import models
    overrides = dict(spec.overrides)
    if in_chans != 3:
        overrides["in_chans"] = in_chans
    if "img_size" not in overrides:
        try:
            return models.create_model(spec.name, num_classes=num_classes, img_size=image_size, **overrides)
        except TypeError as err:  # the constructor names the keyword it does not take
            if "img_size" not in str(err):
                raise
    return models.create_model(spec.name, num_classes=num_classes, **overrides)


# ---- measurements (run inside the worker subprocess) ------------------------------------------------
def set_graph_mode(device_target=None):
    """Graph mode on ``device_target`` (None: MindSpore's default device)."""
    import mindspore as ms
    if device_target is not None:
        from benchmarks.common import set_device
        set_device(device_target)
    ms.set_context(mode=ms.GRAPH_MODE)
    return ms.get_context("device_target")


def random_batch(batch, image_size, in_chans=3, num_classes=1000, seed=0):
    """(images (B, C, S, S) float32, labels (B,) int32) as MindSpore Tensors, reproducible from ``seed``."""
    import numpy as np
    import mindspore as ms
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((batch, in_chans, image_size, image_size)).astype(np.float32)
    labels = rng.integers(0, num_classes, (batch,)).astype(np.int32)
    return ms.Tensor(images), ms.Tensor(labels)


def engine_train_step(model, opt="sgd", label_smoothing=0.1):
    """The engine's compiled training step for ``model`` (optimizer from a default run config)."""
    from engine.config import build_config
    from engine.losses import SmoothedCrossEntropy
    from engine.optim import create_optimizer
    from engine.step import NetWithLoss, TrainStep, create_loss_scaler
    cfg = build_config(file_values={"opt": opt, "lr": 1e-3, "epochs": 1, "label_smoothing": label_smoothing})
    named = list(model.parameters_and_names())
    optimizer, _, _ = create_optimizer(cfg, model, named, steps_per_epoch=1000, global_batch=1)
    return TrainStep(NetWithLoss(model, SmoothedCrossEntropy(label_smoothing)), optimizer,
                     create_loss_scaler("none"))


def timed(fn, args, warmup, repeats, max_seconds):
    """Statistics and peak memory of ``time_calls(fn, args, ...)``."""
    with PeakRSS() as memory:
        times = time_calls(fn, args, warmup, repeats, max_seconds, min_repeats=min(3, repeats))
    stats = summarize(times)
    return {"stats": stats, "times": times, "peak_rss_mib": memory.peak_mib, "rss_rise_mib": memory.increase_mib,
            "peak_reset": memory.reset_ok}


def measure(task):
    """One configuration in this process: ``task`` = dict(spec, overrides, mode, batch, image_size, ...)."""
    from models.profile import count_params
    device = set_graph_mode(task.get("device_target"))
    spec = ModelSpec(task["model"], task["overrides"])
    start = time.perf_counter()
    model = build_model(spec, task["image_size"], task["num_classes"], task["in_chans"])
    images, labels = random_batch(task["batch"], task["image_size"], task["in_chans"], task["num_classes"])
    result = {"params": count_params(model), "device_target": device}
    timing = (task["warmup"], task["repeats"], task["max_seconds"])
    if task["mode"] == "inference":
        model.set_train(False)
        result.update(timed(model, (images,), *timing))
    elif task["mode"] == "train":
        model.set_train(True)
        result.update(timed(engine_train_step(model, task["opt"]), (images, labels), *timing))
    else:
        raise ValueError(f"mode={task['mode']!r} is not supported; allowed values: {MODES}")
    result["wall_s"] = time.perf_counter() - start
    return result


# ---- subprocess plumbing ----------------------------------------------------------------------------
def run_worker(script, task, timeout):
    """Run ``python script --worker JSON`` and return the result dict it prints (or {'error': ...})."""
    command = [sys.executable, str(script), "--worker", json.dumps(task)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(ROOT))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:g} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()
             and "[WARNING]" not in line]
    return {"error": f"worker exited with code {done.returncode}: " + (lines[-1] if lines else "no output")}


def worker_main(payload, measure_fn):
    """Entry point of a worker subprocess: measure, print the result line, never raise."""
    task = json.loads(payload)
    try:
        result = measure_fn(task)
    except Exception as err:  # reported in the table instead of stopping the whole benchmark
        result = {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0 if "error" not in result else 1


# ---- reporting --------------------------------------------------------------------------------------
def images_per_second(result, batch):
    return batch / result["stats"]["median"] if "stats" in result else float("nan")


def _ms(stats):
    return (f"{1e3 * stats['median']:.1f} [{1e3 * stats['p25']:.1f}–{1e3 * stats['p75']:.1f}]")


def _fmt(value, digits=1):
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _ratio(value):
    return "—" if value is None else f"{value:.2f}x"


def _escape(text):
    return text.replace("|", "\\|")


def measurement_table(rows, mode):
    """Markdown table of one mode's results; ``rows`` = [(spec, batch, image_size, result)]."""
    what = "latency ms" if mode == "inference" else "step ms"
    lines = [f"| model | overrides | params (M) | batch | image | img/s | {what}: median [p25–p75] | spread "
             "| n | peak RSS MiB (rise) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for spec, batch, size, result in rows:
        cells = [spec.name, _escape(spec.overrides_text) or "—"]
        if "error" in result:
            lines.append("| " + " | ".join(cells + ["—", str(batch), str(size), "error: "
                                                    + _escape(result["error"]), "", "", "", ""]) + " |")
            continue
        stats = result["stats"]
        cells += [f"{result['params'] / 1e6:.2f}", str(batch), str(size), f"{images_per_second(result, batch):.1f}",
                  _ms(stats), f"{100 * stats['spread']:.0f}%", str(stats["n"]),
                  f"{result['peak_rss_mib']:.0f} (+{result['rss_rise_mib']:.0f})"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _speed_ratio(results, numerator, denominator, batch, size, mode):
    """img/s of ``numerator`` / img/s of ``denominator`` (same batch, size, mode), or None."""
    a, b = results.get((numerator, batch, size, mode)), results.get((denominator, batch, size, mode))
    if not a or not b or "error" in a or "error" in b:
        return None
    return images_per_second(a, batch) / images_per_second(b, batch)


def _memory_ratio(results, numerator, denominator, batch, size, mode):
    a, b = results.get((numerator, batch, size, mode)), results.get((denominator, batch, size, mode))
    if not a or not b or "error" in a or "error" in b:
        return None
    return a["peak_rss_mib"] / b["peak_rss_mib"]


def round_ratios(results, numerator, denominator, batch, size, mode):
    """Per-round img/s ratios of a pair (rounds where both were measured), or []."""
    a, b = results.get((numerator, batch, size, mode)), results.get((denominator, batch, size, mode))
    if not a or not b or "error" in a or "error" in b:
        return []
    a_rounds, b_rounds = a.get("round_medians", []), b.get("round_medians", [])
    return [b_median / a_median for a_median, b_median in zip(a_rounds, b_rounds)]


def _round_text(ratios):
    if len(ratios) < 2:
        return "—"
    return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}–{max(ratios):.2f}, {len(ratios)} rounds)"


def pair_table(pairs, results, configs, modes, per_round=False):
    """ACmix vs baseline: throughput and peak-memory ratios (> 1: the ACmix model is faster / uses more).

    per_round: add, per mode, the median and range of the per-round ratios (``--rounds``).
    """
    header = ["ACmix model", "baseline", "batch", "image"]
    for mode in modes:
        header += [f"{mode} img/s ACmix / baseline", f"{mode} peak RSS ACmix / baseline"]
    if per_round:
        header += [f"{mode} ratio per round: median (min–max)" for mode in modes]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for acmix, base in pairs:
        for batch, size in configs:
            cells = [acmix.label, base.label, str(batch), str(size)]
            for mode in modes:
                cells += [_ratio(_speed_ratio(results, acmix, base, batch, size, mode)),
                          _ratio(_memory_ratio(results, acmix, base, batch, size, mode))]
            if per_round:
                cells += [_round_text(round_ratios(results, acmix, base, batch, size, mode)) for mode in modes]
            lines.append("| " + " | ".join(_escape(c) for c in cells) + " |")
    return "\n".join(lines)


def shift_table(groups, results, configs, modes):
    """Per ACmix model: each shift implementation's img/s and its ratio to the first implementation."""
    header = ["model", "shift_impl", "batch", "image"]
    for mode in modes:
        header += [f"{mode} img/s", f"{mode} / first"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for specs in groups:
        reference = specs[0]
        for spec in specs:
            for batch, size in configs:
                cells = [ModelSpec(spec.name, {k: v for k, v in spec.overrides.items() if k != "shift_impl"}).label,
                         str(spec.overrides["shift_impl"]), str(batch), str(size)]
                for mode in modes:
                    result = results.get((spec, batch, size, mode))
                    speed = images_per_second(result, batch) if result and "error" not in result else None
                    cells += [_fmt(speed, 1), _ratio(_speed_ratio(results, spec, reference, batch, size, mode))]
                lines.append("| " + " | ".join(_escape(c) for c in cells) + " |")
    return "\n".join(lines)


def find_pairs(specs):
    """(ACmix spec, baseline spec) for every ACmix spec whose baseline was measured."""
    present = set(specs)
    pairs = []
    for spec in specs:
        baseline = baseline_of(spec)
        if baseline is not None and baseline in present:
            pairs.append((spec, baseline))
    return pairs


def shift_groups(specs, shift_impls):
    """Lists of specs that differ only in ``shift_impl``, in the order of ``shift_impls``."""
    if not shift_impls:
        return []
    groups = {}
    for spec in specs:
        if is_acmix(spec) and "shift_impl" in spec.overrides:
            rest = ModelSpec(spec.name, {k: v for k, v in spec.overrides.items() if k != "shift_impl"})
            groups.setdefault(rest, []).append(spec)
    order = {impl: i for i, impl in enumerate(shift_impls)}
    return [sorted(group, key=lambda s: order.get(s.overrides["shift_impl"], len(order)))
            for group in groups.values() if len(group) > 1]


def plot_throughput(results, specs, configs, modes, path):
    """Bar plot of img/s per model, one panel per mode, one bar group per (batch, image size).

    Returns the path, or None (with a message) when matplotlib is not installed.
    """
    from engine.logger import load_pyplot, save_figure
    plt = load_pyplot()
    if plt is None:
        print("matplotlib is not installed: no plot written (pip install matplotlib)", file=sys.stderr)
        return None
    figure, axes = plt.subplots(1, len(modes), figsize=(max(6, 1.2 * len(specs) * len(configs)) * len(modes) / 1.5,
                                                        4.5), squeeze=False)
    width = 0.8 / max(1, len(configs))
    for axis, mode in zip(axes[0], modes):
        for j, (batch, size) in enumerate(configs):
            values = []
            for spec in specs:
                result = results.get((spec, batch, size, mode))
                values.append(images_per_second(result, batch) if result and "error" not in result else 0.0)
            positions = [i + (j - (len(configs) - 1) / 2) * width for i in range(len(specs))]
            axis.bar(positions, values, width, label=f"batch {batch}, {size} px")
        axis.set_xticks(range(len(specs)))
        axis.set_xticklabels([spec.label for spec in specs], rotation=30, ha="right", fontsize=7)
        axis.set_ylabel("images / s (median)")
        axis.set_title(mode)
        axis.legend(fontsize=7)
    figure.tight_layout()
    return save_figure(figure, path, dpi=90)


def report(results, specs, configs, modes, shift_impls, args, env, env_after):
    """The whole markdown report (method, machine, tables)."""
    sections = ["## Setup", "",
                f"Generated by `benchmarks/bench_models.py`: graph mode, float32, {args.warmup} warm-up call(s) "
                f"(the first compiles) then up to {args.repeats} timed calls per configuration (at least "
                f"{min(3, args.repeats)}, stopping once the timed calls took {args.max_seconds:g} s); median and "
                "25th–75th percentile; spread = IQR / median; each configuration and mode in a fresh subprocess; "
                f"{args.rounds} interleaved round(s) (statistics over the timed calls of all rounds); "
                "peak RSS = the process's VmHWM over the warm-up and timed calls, rise = over the RSS before them "
                f"(model built, framework loaded). Train step: the engine's `TrainStep` ({args.opt}, label "
                "smoothing 0.1, random images and labels). Models taking `img_size` are built for the image size.",
                "", environment_markdown(env),
                f"- Load average (1/5/15 min) when the run ended: "
                f"{', '.join(f'{v:.2f}' for v in env_after['load_average'])}", ""]
    for mode in modes:
        rows = [(spec, b, s, results[(spec, b, s, mode)]) for spec in specs for b, s in configs]
        sections += [f"## {'Inference' if mode == 'inference' else 'Training step'}", "",
                     measurement_table(rows, mode), ""]
    pairs = find_pairs(specs)
    if pairs:
        sections += ["## ACmix vs baseline (same run)", "",
                     "Ratios of medians: img/s of the ACmix model / img/s of its baseline (> 1: ACmix faster), "
                     "and of peak RSS.", "", pair_table(pairs, results, configs, modes, per_round=args.rounds > 1), ""]
    groups = shift_groups(specs, shift_impls)
    if groups:
        sections += ["## Shift implementations (paper Table 7)", "",
                     f"img/s of each `shift_impl` and its ratio to `{shift_impls[0]}` (the first listed) in the same "
                     "run. Paper (RTX 2080 Ti, Swin-ACmix-T, 224 px): tensor 313, fixed / random / learnable 419 "
                     "img/s (1.34x).", "", shift_table(groups, results, configs, modes), ""]
    return "\n".join(sections)


def add_measurement_arguments(parser):
    """The options bench_models.py and bench_mindir.py share: models, sizes, timing, output."""
    parser.add_argument("--models", nargs="+", default=None, help="model specs: name or name:key=value,...")
    parser.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                        help="constructor overrides applied to every model (YAML values)")
    parser.add_argument("--no_baselines", action="store_true", help="do not add the baselines of ACmix models")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--image_sizes", type=int, nargs="+", default=[224])
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument("--in_chans", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls (the first compiles the graph)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls (at most)")
    parser.add_argument("--max_seconds", type=float, default=30.0,
                        help="stop timing a configuration once its timed calls took this long (after 3)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds allowed per worker subprocess")
    parser.add_argument("--device_target", default=None, choices=("CPU", "GPU", "Ascend"),
                        help="default: MindSpore's default device")
    parser.add_argument("--quick", action="store_true",
                        help="resnet_tiny_acmix + baseline, batch 2, 32 px, 1 warm-up, 1 timed call (smoke test)")
    parser.add_argument("--dry_run", action="store_true", help="print the configurations and exit")
    parser.add_argument("--out", default=None, help="write the markdown report here")
    parser.add_argument("--json", default=None, help="write the raw results here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)


def check_measurement_arguments(parser, args):
    """Apply --quick and check the shared options (not for a worker's command line)."""
    if args.quick:
        for key, value in QUICK.items():
            if key != "models" or args.models is None:
                setattr(args, key, value)
    if args.models is None:
        parser.error("--models is required (or --quick)")
    for name in ("batch_sizes", "image_sizes"):
        if any(v < 1 for v in getattr(args, name)):
            raise ValueError(f"--{name} must be positive integers, got {getattr(args, name)}")
    if args.warmup < 1 or args.repeats < 1 or args.max_seconds <= 0:
        raise ValueError("--warmup and --repeats must be >= 1 and --max_seconds > 0")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_measurement_arguments(parser)
    parser.add_argument("--shift_impls", nargs="*", default=None,
                        help="measure every ACmix model once per shift implementation (tensor fixed random learnable)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--opt", default="sgd", choices=("sgd", "adamw"), help="optimizer of the train step")
    parser.add_argument("--plot", default=None, help="write a bar plot PNG here (needs matplotlib)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every configuration this many times, interleaved (pairs back to back, the "
                             "order reversed every other round); report per-round pair ratios")
    args = parser.parse_args(argv)
    if args.worker is not None:
        return args
    check_measurement_arguments(parser, args)
    if args.rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {args.rounds}")
    if args.shift_impls is not None:
        from acmix_ms import SHIFT_IMPLS
        bad = [impl for impl in args.shift_impls if impl not in SHIFT_IMPLS]
        if bad or not args.shift_impls:
            raise ValueError(f"--shift_impls must list values from {SHIFT_IMPLS}, got {args.shift_impls}")
    return args


def plan(args):
    """(specs, [(batch, image_size)]) of a run."""
    common = parse_assignments(args.override, "--override")
    specs = [ModelSpec.parse(text) for text in args.models]
    specs = [ModelSpec(spec.name, {**common, **spec.overrides}) for spec in specs]
    specs = expand_specs(specs, args.shift_impls, add_baselines=not args.no_baselines)
    configs = [(batch, size) for size in args.image_sizes for batch in args.batch_sizes]
    return specs, configs


def task_of(spec, batch, size, mode, args):
    return {"model": spec.name, "overrides": spec.overrides, "mode": mode, "batch": batch, "image_size": size,
            "num_classes": args.num_classes, "in_chans": args.in_chans, "opt": args.opt, "warmup": args.warmup,
            "repeats": args.repeats, "max_seconds": args.max_seconds, "device_target": args.device_target}


def interleaved_order(specs):
    """``specs`` with every ACmix spec followed directly by its baseline (when measured)."""
    present, order = set(specs), []
    for spec in specs:
        if spec not in order:
            order.append(spec)
        baseline = baseline_of(spec)
        if baseline is not None and baseline in present and baseline not in order:
            order.append(baseline)
    return order


def merge_round(previous, result, round_index):
    """Pool one round's worker result into the configuration's result so far (None before the first)."""
    if "error" in result:
        return {**result, "error": f"round {round_index + 1}: {result['error']}"}
    if previous is None:
        merged = {key: value for key, value in result.items() if key != "stats"}
        merged["times"], merged["round_medians"] = list(result["times"]), [result["stats"]["median"]]
    elif "error" in previous:
        return previous
    else:
        merged = dict(previous)
        merged["times"] = previous["times"] + list(result["times"])
        merged["round_medians"] = previous["round_medians"] + [result["stats"]["median"]]
        for key in ("peak_rss_mib", "rss_rise_mib", "wall_s"):
            merged[key] = max(previous[key], result[key])
    merged["stats"] = summarize(merged["times"])
    return merged


def run_all(specs, configs, modes, args, script, log=None):
    """{(spec, batch, size, mode): result} measured one subprocess each, ``args.rounds`` interleaved rounds."""
    results = {}
    rounds = getattr(args, "rounds", 1)
    order = interleaved_order(specs)
    for round_index in range(rounds):
        for batch, size in configs:
            for mode in modes:
                for spec in (order if round_index % 2 == 0 else order[::-1]):
                    result = run_worker(script, task_of(spec, batch, size, mode, args), args.timeout)
                    key = (spec, batch, size, mode)
                    results[key] = merge_round(results.get(key), result, round_index)
                    if log:
                        log(spec, batch, size, mode, result)
    return {(spec, batch, size, mode): results[(spec, batch, size, mode)]
            for spec in specs for batch, size in configs for mode in modes}


def _log(spec, batch, size, mode, result):
    if "error" in result:
        text = result["error"]
    else:
        text = (f"{images_per_second(result, batch):.1f} img/s, {_ms(result['stats'])} ms, peak RSS "
                f"{result['peak_rss_mib']:.0f} MiB ({result['wall_s']:.0f} s)")
    print(f"{spec.label} batch {batch} {size} px {mode}: {text}", file=sys.stderr, flush=True)


def results_json(results):
    return [{"model": spec.name, "overrides": spec.overrides, "batch": batch, "image_size": size, "mode": mode,
             **result} for (spec, batch, size, mode), result in results.items()]


def write_text(path, text):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    temp = str(path) + ".tmp"
    Path(temp).write_text(text)
    os.replace(temp, path)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker is not None:
        return worker_main(args.worker, measure)
    specs, configs = plan(args)
    if args.dry_run:
        for spec in specs:
            for batch, size in configs:
                for mode in args.modes:
                    print(f"{spec.label}\tbatch {batch}\t{size} px\t{mode}")
        return 0
    env = environment(args.device_target)  # before the run: the load average shows other users
    results = run_all(specs, configs, args.modes, args, Path(__file__).resolve(), _log)
    env_after = environment(args.device_target)
    text = report(results, specs, configs, args.modes, args.shift_impls, args, env, env_after)
    print(text)
    if args.out:
        write_text(args.out, "# Model benchmark\n\n" + text)
    if args.json:
        write_text(args.json, json.dumps({"environment": env, "results": results_json(results)}, indent=1))
    if args.plot:
        plot_throughput(results, specs, configs, args.modes, args.plot)
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
