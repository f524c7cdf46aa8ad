"""Shared code of the model benchmarks (bench_models.py, bench_mindir.py, bench_vs_torch.py, bench_demo.py):
model specs with overrides, building and timing a model, the engine's training step, worker subprocesses,
pair tables and the shared command-line options. The benchmark scripts parse arguments and call these.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from engine.config import DEVICE_TARGETS, parse_assignments
from benchmarks.common import PeakRSS, format_value, summarize, time_calls

ROOT = Path(__file__).resolve().parents[1]
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


def build_spec_model(spec, image_size, num_classes=1000, in_chans=3):
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


def set_graph_mode(device_target=None):
    """Graph mode on ``device_target`` (None: MindSpore's default device); returns the device in use."""
    import mindspore as ms
    from engine.runtime import setup_context
    setup_context("graph", device_target)
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
    """Statistics and peak memory of ``time_calls(fn, args, ...)``. A graph-mode Cell is first compiled as the
    engine does (``engine.runtime.compile_then_release``: compile, then free the compiler's heap)."""
    import mindspore as ms
    with PeakRSS() as memory:  # the compilation's peak counts too
        # (a loaded MINDIR, GraphCell, is compiled by its first call: Cell.compile does not apply to it)
        if isinstance(fn, ms.nn.Cell) and not isinstance(fn, ms.nn.GraphCell) and \
                ms.get_context("mode") == ms.GRAPH_MODE:
            from engine.runtime import compile_then_release
            compile_then_release(fn, *args)
        times = time_calls(fn, args, warmup, repeats, max_seconds, min_repeats=min(3, repeats))
    stats = summarize(times)
    return {"stats": stats, "times": times, "peak_rss_mib": memory.peak_mib, "rss_rise_mib": memory.increase_mib,
            "peak_reset": memory.reset_ok}


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


def format_ms(stats):
    return (f"{1e3 * stats['median']:.1f} [{1e3 * stats['p25']:.1f}–{1e3 * stats['p75']:.1f}]")


def format_ratio(value):
    return "—" if value is None else f"{value:.2f}x"


def escape_cell(text):
    return text.replace("|", "\\|")


def speed_ratio(results, numerator, denominator, batch, size, mode):
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
                cells += [format_ratio(speed_ratio(results, acmix, base, batch, size, mode)),
                          format_ratio(_memory_ratio(results, acmix, base, batch, size, mode))]
            if per_round:
                cells += [_round_text(round_ratios(results, acmix, base, batch, size, mode)) for mode in modes]
            lines.append("| " + " | ".join(escape_cell(c) for c in cells) + " |")
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
    parser.add_argument("--device_target", default=None, choices=DEVICE_TARGETS,
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


def write_text(path, text):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    temp = str(path) + ".tmp"
    Path(temp).write_text(text)
    os.replace(temp, path)
