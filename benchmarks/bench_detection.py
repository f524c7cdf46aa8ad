"""The paper's Table 5 on this machine: RetinaNet inference speed of PVT vs ACmix backbones, in-process and as
MINDIR, plus parameters and MACs of every registered RetinaNet beside the paper's Tables 3/4.

Speed: each detector pair (baseline, ACmix) is built with 80 classes for ``--image_size`` (576: the paper's
3x576x576), batch ``--batch``, wrapped with its box decoding and class-wise NMS (``RetinaNetDetect``: what
export.py exports). After warm-up (compilation), the two are timed in interleaved rounds (A, B, A, B, ...),
so load changes on a shared machine hit both alike; the median call gives latency and images/s. Then both
are exported to MINDIR (``ms.export``), reloaded (``ms.load`` + ``nn.GraphCell``), checked against the
in-process outputs on the benchmark batch, and timed the same way. The ACmix/baseline throughput ratios are
printed beside the paper's (1.3x for PVT-S, 1.8x for PVT-L on one Ascend 910).

Size: parameters and MACs (multiply-accumulates of the convolutions, dense layers and attention products,
``models.profile``; what mmcv's flop counter reports as "FLOPs") of each detector built with 80 classes for a
``--flops_size`` input (the paper counts at 1280x800), beside the paper's detection FLOPs.

    python benchmarks/bench_detection.py --out docs/bench_detection.md
    python benchmarks/bench_detection.py --flops_only --flops_models 'retinanet_pvt_tiny*'   # sizes only
    python benchmarks/bench_detection.py --no_flops --pairs pvt_small --rounds 2 --device_target GPU
"""
import argparse
import fnmatch
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.common import environment, environment_markdown  # noqa: E402
from engine.config import DEVICE_TARGETS  # noqa: E402
from engine.runtime import setup_context  # noqa: E402

PAPER_SPEEDUP = {"pvt_small": 1.3, "pvt_large": 1.8}  # Table 5: ACmix fps / PVT fps on one Ascend 910
PAPER_FPS = {"pvt_small": (50.3, 67.7), "pvt_large": (24.3, 43.9)}


def detector_names(*patterns):
    """Registered detectors matching any of the shell-style patterns (all RetinaNets by default)."""
    import models
    patterns = patterns or ("retinanet_*",)
    return [name for name in models.list_models() if models.model_task(name) == "detection"
            and any(fnmatch.fnmatch(name, pattern) for pattern in patterns)]


def build_detector(name, image_size, num_classes=80):
    import models
    from models.retinanet import RetinaNetDetect
    from engine.export import make_exportable
    model = models.create_model(name, num_classes=num_classes, img_size=image_size)
    model.set_train(False)
    make_exportable(model)  # device-kernel attention layers -> standard operators (same results)
    detect = RetinaNetDetect(model)
    detect.set_train(False)
    return model, detect


def _outputs(result):
    return [item.asnumpy() for item in result]


def interleaved(callables, rounds, repeats):
    """{name: [seconds per call]} timing the callables round-robin (one warm call each first)."""
    times = {name: [] for name in callables}
    for name, (fn, args) in callables.items():
        _outputs(fn(*args))
    for _ in range(rounds):
        for name, (fn, args) in callables.items():
            for _ in range(repeats):
                start = time.perf_counter()
                _outputs(fn(*args))
                times[name].append(time.perf_counter() - start)
    return times


def _summary(seconds, batch):
    median = statistics.median(seconds)
    return {"latency_ms": 1e3 * median, "images_per_s": batch / median, "calls": len(seconds),
            "latency_min_ms": 1e3 * min(seconds), "latency_max_ms": 1e3 * max(seconds)}


def speed_pair(backbone, image_size, batch, rounds, repeats, mindir=True, log=print):
    """Speed of retinanet_<backbone> and retinanet_<backbone>_acmix, in-process and as MINDIR."""
    import mindspore as ms
    names = (f"retinanet_{backbone}", f"retinanet_{backbone}_acmix")
    images = ms.Tensor(np.random.default_rng(0).standard_normal((batch, 3, image_size, image_size))
                       .astype(np.float32))
    built = {}
    for name in names:
        start = time.perf_counter()
        built[name] = build_detector(name, image_size)
        log(f"built {name} in {time.perf_counter() - start:.0f} s")
    rows = {name: {} for name in names}
    start = time.perf_counter()
    times = interleaved({name: (built[name][1], (images,)) for name in names}, rounds, repeats)
    log(f"in-process timing took {time.perf_counter() - start:.0f} s")
    for name in names:
        rows[name]["network"] = _summary(times[name], batch)
        log(f"{name} in-process: {rows[name]['network']}")  # kept in the log if a later step fails
    if mindir:
        import gc
        graphs, folder, references = {}, tempfile.mkdtemp(prefix="bench-det-"), {}
        for name in names:
            base = os.path.join(folder, name)
            references[name] = _outputs(built[name][1](images))
            ms.export(built[name][1], images, file_name=base, file_format="MINDIR")
        built.clear()  # free the in-process networks before loading the graphs (memory of large detectors)
        gc.collect()
        for name in names:
            base = os.path.join(folder, name)
            reference = references[name]
            graphs[name] = ms.nn.GraphCell(ms.load(base + ".mindir"))
            exported = _outputs(graphs[name](images))
            rows[name]["mindir_max_abs_diff"] = max(float(np.abs(a.astype(np.float64) - b).max()) if a.size else 0.0
                                                    for a, b in zip(exported, reference))
            rows[name]["mindir_mb"] = os.path.getsize(base + ".mindir") / 2 ** 20
        times = interleaved({name: (graphs[name], (images,)) for name in names}, rounds, repeats)
        for name in names:
            rows[name]["mindir"] = _summary(times[name], batch)
        for name in names:
            os.remove(os.path.join(folder, name + ".mindir"))
        os.rmdir(folder)
    return rows


def sizes(names, flops_size, num_classes=80, with_macs=True, log=print):
    """{name: {params_m, gmacs}} of detectors built for ``flops_size`` (H, W)."""
    import models
    from models.profile import count_macs, count_params
    out = {}
    for name in names:
        start = time.perf_counter()
        model = models.create_model(name, num_classes=num_classes, img_size=tuple(flops_size))
        row = {"params_m": count_params(model) / 1e6, "backbone_params_m": count_params(model.backbone) / 1e6,
               "gmacs": None}
        if with_macs:
            row["gmacs"] = count_macs(model, (1, 3) + tuple(flops_size)) / 1e9
        row["paper"] = models.paper_info(name)
        out[name] = row
        log(f"{name}: {row['params_m']:.2f} M params" + (f", {row['gmacs']:.1f} GMACs" if with_macs else "")
            + f" ({time.perf_counter() - start:.0f} s)")
    return out


def markdown(env, args, speed, size_rows):
    lines = ["## Environment", "", environment_markdown(env), ""]
    if speed:
        lines += [f"## Table 5: inference speed at {args.batch}x3x{args.image_size}x{args.image_size} (80 classes, "
                  f"decoding and NMS included)", "",
                  f"Interleaved rounds: {args.rounds} x {args.repeats} calls per model; median call.", "",
                  "| detector | in-process img/s | latency ms (min-max) | MINDIR img/s | MINDIR latency ms | "
                  "MINDIR max abs diff | paper FPS (Ascend 910) |", "|---|---|---|---|---|---|---|"]
        for backbone, rows in speed.items():
            for index, (name, row) in enumerate(rows.items()):
                net, mir = row["network"], row.get("mindir")
                paper = PAPER_FPS.get(backbone, (None, None))[index]
                lines.append(
                    f"| {name} | {net['images_per_s']:.2f} | {net['latency_ms']:.0f} ({net['latency_min_ms']:.0f}-"
                    f"{net['latency_max_ms']:.0f}) | " + (f"{mir['images_per_s']:.2f} | {mir['latency_ms']:.0f} | "
                                                         f"{row['mindir_max_abs_diff']:.1e}" if mir else "— | — | —")
                    + f" | {paper if paper is not None else '—'} |")
        lines += ["", "| pair | ACmix / PVT img/s, in-process | ACmix / PVT img/s, MINDIR | paper |", "|---|---|---|---|"]
        for backbone, rows in speed.items():
            base, acmix = rows.values()
            ratio = acmix["network"]["images_per_s"] / base["network"]["images_per_s"]
            mir = (f"{acmix['mindir']['images_per_s'] / base['mindir']['images_per_s']:.2f}x"
                   if "mindir" in base else "—")
            lines.append(f"| {backbone} | {ratio:.2f}x | {mir} | {PAPER_SPEEDUP.get(backbone, '—')}x |")
        lines.append("")
    if size_rows:
        h, w = args.flops_size
        lines += [f"## Parameters and MACs at {h}x{w} (80 classes)", "",
                  "| detector | params M | backbone params M | GMACs | paper 'FLOPs' G (Tables 3/4, 1280x800) |",
                  "|---|---|---|---|---|"]
        for name, row in size_rows.items():
            gmacs = f"{row['gmacs']:.1f}" if row["gmacs"] is not None else "—"
            paper = row["paper"].get("gflops", "—")
            lines.append(f"| {name} | {row['params_m']:.2f} | {row['backbone_params_m']:.2f} | {gmacs} | {paper} |")
        lines.append("")
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", nargs="+", default=["pvt_small", "pvt_large"],
                        help="backbones timed against their _acmix version (retinanet_<name>[_acmix])")
    parser.add_argument("--image_size", type=int, default=576)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per model and round")
    parser.add_argument("--no_mindir", action="store_true", help="skip the MINDIR export and timing")
    parser.add_argument("--flops_only", action="store_true", help="only the parameter/MAC table (no timing)")
    parser.add_argument("--no_flops", action="store_true", help="only the timing (no parameter/MAC table)")
    parser.add_argument("--params_only", action="store_true", help="size table without MACs (no forward pass)")
    parser.add_argument("--flops_models", nargs="+", default=["retinanet_*"],
                        help="shell patterns of the detectors to size")
    parser.add_argument("--flops_size", type=int, nargs=2, default=[800, 1280], metavar=("H", "W"))
    parser.add_argument("--device_target", choices=DEVICE_TARGETS, default="CPU")
    parser.add_argument("--out", help="write the markdown report here (and <out>.json)")
    args = parser.parse_args(argv)
    for name in ("image_size", "batch", "rounds", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.image_size % 32 or min(args.flops_size) < 32 or any(s % 32 for s in args.flops_size):
        parser.error("--image_size and --flops_size must be multiples of 32 (RetinaNet's C3-C5 strides)")
    if args.flops_only and args.no_flops:
        parser.error("--flops_only and --no_flops exclude each other")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import mindspore as ms
    try:
        setup_context("graph", args.device_target)
    except RuntimeError:  # called in a process whose runtime already started (e.g. from a test): keep its device
        if ms.get_context("device_target") != args.device_target:
            raise
        ms.set_context(mode=ms.GRAPH_MODE)
    import models  # noqa: F401
    env = environment(args.device_target)
    print(f"load average at start: {env['load_average']}")
    missing = [f"retinanet_{b}{s}" for b in args.pairs for s in ("", "_acmix")
               if f"retinanet_{b}{s}" not in detector_names()]
    if missing and not args.flops_only:
        print(f"error: not registered: {', '.join(missing)}", file=sys.stderr)
        return 2
    speed = {}
    if not args.flops_only:
        for backbone in args.pairs:
            speed[backbone] = speed_pair(backbone, args.image_size, args.batch, args.rounds, args.repeats,
                                         not args.no_mindir)
    size_rows = {}
    if not args.no_flops:
        names = detector_names(*args.flops_models)
        if not names:
            print(f"error: --flops_models {' '.join(args.flops_models)} matches no registered detector",
                  file=sys.stderr)
            return 2
        size_rows = sizes(names, args.flops_size, with_macs=not args.params_only)
    env["load_average_end"] = tuple(round(v, 2) for v in os.getloadavg())
    text = markdown(env, args, speed, size_rows) + f"\nLoad average at the end: {env['load_average_end']}\n"
    print(text)
    if args.out:
        with open(args.out + ".tmp", "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(args.out + ".tmp", args.out)
        with open(args.out + ".json", "w", encoding="utf-8") as handle:
            json.dump({"environment": env, "speed": speed, "sizes": size_rows, "args": vars(args)}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
