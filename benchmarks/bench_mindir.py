"""MINDIR inference benchmark: exported files (``ms.load`` + ``nn.GraphCell``, the deployment path) side by
side with the in-process network.

For every model, batch size and image size, two fresh subprocesses:
  1. ``network``: build the model, time its inference as ``benchmarks/bench_models.py`` does, then export
     it with ``ms.export(..., file_format='MINDIR')`` for that fixed input shape (layers running a device
     kernel switched to standard operators, as export.py does) and save its output on a fixed random batch;
  2. ``mindir``: load the file into an ``nn.GraphCell`` (no Python model code involved), time it on the
     same batch, and compare its output with the network's (max |difference|).

Reported: img/s and latency of both, their ratio, peak RSS of each process, file size, max |diff|, and
the ACmix / baseline ratios when pairs were measured (baselines are added as in bench_models.py).

    python benchmarks/bench_mindir.py --models resnet26_acmix --batch_sizes 1 8 --image_sizes 224 \
        --out docs/benchmarks_mindir.md
    python benchmarks/bench_mindir.py --quick
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.harness import (ModelSpec, add_measurement_arguments, build_spec_model,  # noqa: E402
                                check_measurement_arguments, escape_cell, expand_specs, find_pairs, format_ms,
                                format_value, images_per_second, pair_table, random_batch, run_worker,
                                set_graph_mode, timed, worker_main, write_text)
from engine.config import parse_assignments  # noqa: E402
from benchmarks.common import environment, environment_markdown  # noqa: E402

MODES = ("network", "mindir")


def measure(task):
    """One side of one configuration in this process (``task['mode']`` is 'network' or 'mindir')."""
    import numpy as np
    import mindspore as ms
    device = set_graph_mode(task.get("device_target"))
    images, _ = random_batch(task["batch"], task["image_size"], task["in_chans"])
    timing = (task["warmup"], task["repeats"], task["max_seconds"])
    if task["mode"] == "network":
        from models.profile import count_params
        model = build_spec_model(ModelSpec(task["model"], task["overrides"]), task["image_size"], task["num_classes"],
                            task["in_chans"])
        model.set_train(False)
        result = timed(model, (images,), *timing)
        result["params"] = count_params(model)
        np.save(task["reference"], model(images).asnumpy())
        # export a twin: layers running a device kernel switch to standard operators before a first run
        from engine.export import make_exportable
        exportable = build_spec_model(ModelSpec(task["model"], task["overrides"]), task["image_size"],
                                 task["num_classes"], task["in_chans"])
        ms.load_param_into_net(exportable, model.parameters_dict(), strict_load=True)
        exportable.set_train(False)
        result["kernel_layers_switched"] = make_exportable(exportable)
        base = task["mindir"][:-len(".mindir")]
        ms.export(exportable, images, file_name=base, file_format="MINDIR")
        result["file_mib"] = os.path.getsize(task["mindir"]) / 2 ** 20
    elif task["mode"] == "mindir":
        graph = ms.nn.GraphCell(ms.load(task["mindir"]))
        result = timed(graph, (images,), *timing)
        output = graph(images).asnumpy()
        reference = np.load(task["reference"])
        if output.shape != reference.shape:
            raise ValueError(f"MINDIR output shape {output.shape} differs from the network's {reference.shape}")
        result["max_abs_diff"] = float(np.abs(output.astype(np.float64) - reference).max())
        result["reference_max_abs"] = float(np.abs(reference).max())
    else:
        raise ValueError(f"mode={task['mode']!r} is not supported; allowed values: {MODES}")
    result["device_target"] = device
    return result


def side_by_side_table(specs, configs, results):
    lines = ["| model | overrides | batch | image | network img/s | network latency ms | MINDIR img/s "
             "| MINDIR latency ms | MINDIR / network | max abs diff | peak RSS MiB network / MINDIR | file MiB "
             "| kernel layers exported as unfold |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for spec in specs:
        for batch, size in configs:
            net, graph = results[(spec, batch, size, "network")], results.get((spec, batch, size, "mindir"))
            cells = [spec.name, escape_cell(spec.overrides_text) or "—", str(batch), str(size)]
            problem = net.get("error") or (graph or {}).get("error")
            if problem:
                side = "network" if "error" in net else "MINDIR"
                lines.append("| " + " | ".join(cells + [f"{side} error: {escape_cell(problem)}"] + [""] * 8) + " |")
                continue
            net_speed, graph_speed = images_per_second(net, batch), images_per_second(graph, batch)
            cells += [f"{net_speed:.1f}", format_ms(net["stats"]), f"{graph_speed:.1f}", format_ms(graph["stats"]),
                      f"{graph_speed / net_speed:.2f}x", f"{graph['max_abs_diff']:.1e}",
                      f"{net['peak_rss_mib']:.0f} / {graph['peak_rss_mib']:.0f}", format_value(net["file_mib"], 1),
                      str(net.get("kernel_layers_switched", 0))]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_measurement_arguments(parser)
    parser.add_argument("--export_dir", default=None,
                        help="keep the MINDIR files here (default: a temporary folder, deleted afterwards)")
    args = parser.parse_args(argv)
    if args.worker is not None:
        return args
    check_measurement_arguments(parser, args)
    return args


def _file_stem(index, spec, batch, size):
    """A file name MindSpore accepts (letters, digits, _-.): the overrides are replaced by the spec's index."""
    return f"{index:02d}_{spec.name}_b{batch}_{size}px"


def _log(spec, batch, size, mode, result):
    text = result["error"] if "error" in result else (
        f"{images_per_second(result, batch):.1f} img/s, {format_ms(result['stats'])} ms, peak RSS "
        f"{result['peak_rss_mib']:.0f} MiB")
    print(f"{spec.label} batch {batch} {size} px {mode}: {text}", file=sys.stderr, flush=True)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker is not None:
        return worker_main(args.worker, measure)
    common = parse_assignments(args.override, "--override")
    specs = [ModelSpec.parse(text) for text in args.models]
    specs = expand_specs([ModelSpec(s.name, {**common, **s.overrides}) for s in specs],
                         add_baselines=not args.no_baselines)
    configs = [(batch, size) for size in args.image_sizes for batch in args.batch_sizes]
    if args.dry_run:
        for spec in specs:
            for batch, size in configs:
                print(f"{spec.label}\tbatch {batch}\t{size} px\tnetwork + MINDIR")
        return 0
    env = environment(args.device_target)
    folder = args.export_dir or tempfile.mkdtemp(prefix="bench-mindir-")
    os.makedirs(folder, exist_ok=True)
    script = Path(__file__).resolve()
    results = {}
    try:
        for index, spec in enumerate(specs):
            for batch, size in configs:
                stem = os.path.join(os.path.abspath(folder), _file_stem(index, spec, batch, size))
                task = {"model": spec.name, "overrides": spec.overrides, "batch": batch, "image_size": size,
                        "num_classes": args.num_classes, "in_chans": args.in_chans, "warmup": args.warmup,
                        "repeats": args.repeats, "max_seconds": args.max_seconds,
                        "device_target": args.device_target, "mindir": stem + ".mindir",
                        "reference": stem + ".reference.npy"}
                for mode in MODES:
                    result = run_worker(script, dict(task, mode=mode), args.timeout)
                    results[(spec, batch, size, mode)] = result
                    _log(spec, batch, size, mode, result)
                    if "error" in result:
                        break
    finally:
        if args.export_dir is None:
            shutil.rmtree(folder, ignore_errors=True)
    env_after = environment(args.device_target)
    sections = ["## Setup", "",
                f"Generated by `benchmarks/bench_mindir.py`: graph mode, float32; per configuration one subprocess "
                f"times the network (then exports it to MINDIR for that input shape) and a second one times the "
                f"file loaded with `ms.load` + `nn.GraphCell`; {args.warmup} warm-up call(s), then up to "
                f"{args.repeats} timed calls (stopping after {args.max_seconds:g} s of timed calls, at least "
                f"{min(3, args.repeats)}); latency = median [p25–p75] ms; max abs diff = the largest |MINDIR − "
                "network| output difference on the same random batch. Sliding-window ACmix layers that run a "
                "device kernel in the network (`ops.Custom`, not portable) are exported as `attention_impl="
                "'unfold'` from a twin network with the same weights (last column: how many).", "", environment_markdown(env),
                f"- Load average (1/5/15 min) when the run ended: "
                f"{', '.join(f'{v:.2f}' for v in env_after['load_average'])}", "",
                "## Network vs exported MINDIR", "", side_by_side_table(specs, configs, results), ""]
    pairs = find_pairs(specs)
    if pairs:
        sections += ["## ACmix vs baseline (same run)", "", "Ratios of medians (> 1: ACmix faster / larger).", "",
                     pair_table(pairs, results, configs, MODES), ""]
    text = "\n".join(sections)
    print(text)
    if args.out:
        write_text(args.out, "# MINDIR inference benchmark\n\n" + text)
    if args.json:
        rows = [{"model": s.name, "overrides": s.overrides, "batch": b, "image_size": z, "mode": m, **r}
                for (s, b, z, m), r in results.items()]
        write_text(args.json, json.dumps({"environment": env, "results": rows}, indent=1))
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
