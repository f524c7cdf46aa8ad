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
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import environment, environment_markdown, summarize  # noqa: E402
from benchmarks.harness import (ModelSpec, add_measurement_arguments, baseline_of,  # noqa: E402,F401
                                build_spec_model, check_measurement_arguments, engine_train_step,
                                escape_cell, expand_specs, find_pairs, format_ms, format_ratio, format_value, speed_ratio,
                                images_per_second, pair_table, random_batch, round_ratios,
                                set_graph_mode, shift_groups, timed, worker_main, run_worker, write_text)
from engine.config import parse_assignments  # noqa: E402

MODES = ("inference", "train")


def measure(task):
    """One configuration in this process: ``task`` = dict(spec, overrides, mode, batch, image_size, ...)."""
    from models.profile import count_params
    device = set_graph_mode(task.get("device_target"))
    spec = ModelSpec(task["model"], task["overrides"])
    start = time.perf_counter()
    model = build_spec_model(spec, task["image_size"], task["num_classes"], task["in_chans"])
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


def measurement_table(rows, mode):
    """Markdown table of one mode's results; ``rows`` = [(spec, batch, image_size, result)]."""
    what = "latency ms" if mode == "inference" else "step ms"
    lines = [f"| model | overrides | params (M) | batch | image | img/s | {what}: median [p25–p75] | spread "
             "| n | peak RSS MiB (rise) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for spec, batch, size, result in rows:
        cells = [spec.name, escape_cell(spec.overrides_text) or "—"]
        if "error" in result:
            lines.append("| " + " | ".join(cells + ["—", str(batch), str(size), "error: "
                                                    + escape_cell(result["error"]), "", "", "", ""]) + " |")
            continue
        stats = result["stats"]
        cells += [f"{result['params'] / 1e6:.2f}", str(batch), str(size), f"{images_per_second(result, batch):.1f}",
                  format_ms(stats), f"{100 * stats['spread']:.0f}%", str(stats["n"]),
                  f"{result['peak_rss_mib']:.0f} (+{result['rss_rise_mib']:.0f})"]
        lines.append("| " + " | ".join(cells) + " |")
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
                    cells += [format_value(speed, 1), format_ratio(speed_ratio(results, spec, reference, batch, size, mode))]
                lines.append("| " + " | ".join(escape_cell(c) for c in cells) + " |")
    return "\n".join(lines)


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
        text = (f"{images_per_second(result, batch):.1f} img/s, {format_ms(result['stats'])} ms, peak RSS "
                f"{result['peak_rss_mib']:.0f} MiB ({result['wall_s']:.0f} s)")
    print(f"{spec.label} batch {batch} {size} px {mode}: {text}", file=sys.stderr, flush=True)


def results_json(results):
    return [{"model": spec.name, "overrides": spec.overrides, "batch": batch, "image_size": size, "mode": mode,
             **result} for (spec, batch, size, mode), result in results.items()]


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
