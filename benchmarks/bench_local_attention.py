"""Benchmark of the sliding-window attention implementations of ``ACmixLocal`` (issue 7), graph mode, one run.

Compares ``attention_impl`` 'unfold' (reference), 'lean' (offset by offset, pure ops) and 'fused' (the
device's fused kernel: C++ on CPU) on

- ``aggregation``: Stage II alone, from a (B, 3C, H, W) q/k/v map (split, scale, reflect pad, aggregate);
- ``layer``: one ``ACmixLocal(C, C, k_att=7, N=4, k_conv=3)`` at the ResNet-ACmix-50 stage shapes
  (C = 64/128/256/512 at 56/28/14/7 px), batch 8 and 32;
- ``model``: one ResNet-ACmix-26 training step (SGD momentum, cross-entropy) at 224x224, batch 16.

Every (case, impl, shape, batch, pass) runs in a fresh subprocess so peak memories do not mix; the peak is
the child's peak RSS (VmHWM) over the timed block, and "rise" is that peak minus the RSS before the first
call (the framework's baseline and the inputs excluded). A watchdog kills a child whose RSS passes
``--max_rss_gib`` (the machine is shared: never let one case push it into swap or the OOM killer) and the
table says so. Forward and forward+backward (gradients of sum(output) w.r.t. the input and all trainable
parameters) are timed after one warm-up call (which compiles).

    python benchmarks/bench_local_attention.py --out docs/local_attention.md            # full
    python benchmarks/bench_local_attention.py --quick                                  # subset
    python benchmarks/bench_local_attention.py --cases aggregation --impls lean fused --shapes 64x56
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, environment_markdown  # noqa: E402

IMPLS = ("unfold", "lean", "fused")
CASES = ("aggregation", "layer", "model")
STAGE_SHAPES = ((64, 56), (128, 28), (256, 14), (512, 7))
BATCHES = (8, 32)
QUICK_SHAPES = ((64, 56), (256, 14))
QUICK_BATCHES = (8,)
MODEL_NAME, MODEL_SIZE, MODEL_BATCH = "resnet26_acmix", 224, 16
NUM_HEADS, KERNEL_ATT, KERNEL_CONV = 4, 7, 3


# ----------------------------------------------------------------------------------------------- child side
def _child(spec):
    """Run one configuration in this process and return its measurements (a JSON-able dict)."""
    import numpy as np
    from mindspore import Tensor, nn

    from benchmarks.bench_operator import ForwardBackward
    from benchmarks.common import PeakRSS, current_rss_mib, summarize, time_calls
    from engine.runtime import setup_context

    setup_context("graph", spec["device_target"])
    rng = np.random.default_rng(0)
    note = ""
    if spec["case"] == "model":
        net, note = _build_model(spec["impl"])
        x = Tensor(rng.standard_normal((spec["batch"], 3, MODEL_SIZE, MODEL_SIZE)).astype(np.float32))
        labels = Tensor(rng.integers(0, 1000, spec["batch"]).astype(np.int32))
        loss = nn.WithLossCell(net, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"))
        step = nn.TrainOneStepCell(loss, nn.Momentum(net.trainable_params(), 0.01, 0.9))
        step.set_train(True)
        fn, args = step, (x, labels)
    else:
        net = _build_layer(spec["case"], spec["impl"], spec["channels"])
        in_channels = 3 * spec["channels"] if spec["case"] == "aggregation" else spec["channels"]
        x = Tensor(rng.standard_normal((spec["batch"], in_channels, spec["size"], spec["size"])).astype(np.float32))
        if spec["pass"] == "forward":
            net.set_train(False)
            fn = net
        else:
            net.set_train(True)
            fn = ForwardBackward(net)
        args = (x,)
    start_mib = current_rss_mib()
    with PeakRSS() as memory:
        times = time_calls(fn, args, warmup=1, repeats=spec["repeats"], max_seconds=spec["max_seconds"])
    backend = getattr(getattr(net, "aggregate", None), "backend", "")
    return {"time": summarize(times), "peak_mib": memory.peak_mib, "start_mib": start_mib,
            "rise_mib": memory.peak_mib - start_mib, "reset_ok": memory.reset_ok, "note": note,
            "backend": backend}


def _build_layer(case, impl, channels):
    from acmix_ms import ACmixLocal
    if case == "layer":
        return ACmixLocal(channels, channels, KERNEL_ATT, NUM_HEADS, KERNEL_CONV, attention_impl=impl)
    return _aggregation_only(impl, channels)


def _aggregation_only(impl, channels):
    """Stage II of ACmixLocal alone: (B, 3C, H, W) q/k/v -> (B, C, H, W)."""
    from mindspore import nn, ops
    from acmix_ms.local_attention import LOCAL_ATTENTION_IMPLS

    class AggregationOnly(nn.Cell):
        def __init__(self):
            super().__init__()
            self.aggregate = LOCAL_ATTENTION_IMPLS[impl](KERNEL_ATT, 1, 1)
            self.channels, self.head_dim = channels, channels // NUM_HEADS
            self.pad = (KERNEL_ATT - 1) // 2

        def construct(self, qkv):
            batch, _, height, width = qkv.shape
            c, bn, d = self.channels, batch * NUM_HEADS, self.head_dim
            query = qkv[:, :c].reshape(bn, d, height, width) * (d ** -0.5)
            key = qkv[:, c:2 * c].reshape(bn, d, height, width)
            value = qkv[:, 2 * c:].reshape(bn, d, height, width)
            pad = (self.pad,) * 4
            out = self.aggregate(query, ops.pad(key, pad, mode="reflect"), ops.pad(value, pad, mode="reflect"))
            return out.reshape(batch, c, height, width)

    return AggregationOnly()


def _build_model(impl):
    """ResNet-ACmix-26 with ``attention_impl=impl`` and a note of what runs in its layers."""
    import models
    from acmix_ms import attention_backends
    net = models.create_model(MODEL_NAME, attention_impl=impl)
    return net, f"{impl} ran {attention_backends(net)} (layers per backend)"


# ---------------------------------------------------------------------------------------------- parent side
def _rss_mib(pid):
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_in_subprocess(spec, max_rss_mib, timeout):
    """Run ``spec`` in a fresh Python process; kill it (by its pid) if its RSS passes ``max_rss_mib``."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    highest, started, killed = 0.0, time.time(), None
    while child.poll() is None:
        highest = max(highest, _rss_mib(child.pid))
        if highest > max_rss_mib:
            killed = f"killed: RSS passed {max_rss_mib / 1024:.1f} GiB"
        elif time.time() - started > timeout:
            killed = f"killed: took more than {timeout:.0f} s"
        if killed:
            child.kill()
            break
        time.sleep(0.05)
    stdout, stderr = child.communicate()
    if killed:
        return {"error": killed, "watch_peak_mib": highest}
    for line in reversed(stdout.splitlines()):
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            result["watch_peak_mib"] = highest
            return result
    tail = [line for line in stderr.splitlines() if line.strip() and "WARNING" not in line][-3:]
    return {"error": "failed: " + " / ".join(tail)[-300:], "watch_peak_mib": highest}


def _cell_time(result):
    if "error" in result:
        return "—"
    t = result["time"]
    return f"{1e3 * t['median']:.0f} [{1e3 * t['p25']:.0f}–{1e3 * t['p75']:.0f}]"


def _cell_memory(result):
    if "error" in result:
        return f"> {result['watch_peak_mib']:.0f} ({result['error']})"
    return f"{result['peak_mib']:.0f} (+{result['rise_mib']:.0f})"


def _ratio(result, reference, key):
    if "error" in result:
        return "—"
    if "error" in reference:  # killed at watch_peak_mib: only a bound on the memory ratio (peak over peak)
        return f"< {result['peak_mib'] / reference['watch_peak_mib']:.2f} (peaks)" if key == "memory" else "—"
    if key == "time":
        return f"{result['time']['median'] / reference['time']['median']:.2f}"
    return f"{result['rise_mib'] / max(reference['rise_mib'], 1.0):.2f}"


def results_markdown(results, impls):
    """One table per case; the ratio columns compare with the first implementation (the reference)."""
    reference_impl = impls[0]
    lines = []
    for case in CASES:
        rows = [key for key in results if key[0] == case]
        if not rows:
            continue
        passes = ("train",) if case == "model" else ("forward", "train")
        title = {"aggregation": "Stage II alone (split, scale, reflect pad, aggregate; no parameters)",
                 "layer": f"One ACmixLocal layer (k_att={KERNEL_ATT}, N={NUM_HEADS}, k_conv={KERNEL_CONV})",
                 "model": f"{MODEL_NAME} training step ({MODEL_SIZE}x{MODEL_SIZE}, SGD momentum)"}[case]
        lines += [f"## {title}", "", "Times in ms: median [25th–75th percentile]; memory in MiB: peak RSS "
                  f"(+rise over the RSS before the first call); ratios are impl / {reference_impl} "
                  "(time: median, memory: rise).", ""]
        header = "| C | H=W | B | impl |"
        rule = "|---|---|---|---|"
        for name in passes:
            label = "fwd" if name == "forward" else ("step" if case == "model" else "fwd+bwd")
            header += f" {label} ms | {label} peak MiB (+rise) | {label} time ratio | {label} memory ratio |"
            rule += "---|---|---|---|"
        lines += [header, rule]
        for shape in sorted({key[1:4] for key in rows}, key=lambda s: (s[2], -s[1])):
            for impl in impls:
                line = f"| {shape[0] if case != 'model' else '—'} | {shape[1]} | {shape[2]} | {impl} |"
                for name in passes:
                    result = results.get((case, *shape, impl, name))
                    reference = results.get((case, *shape, reference_impl, name))
                    if result is None:
                        line += " | | | |"
                        continue
                    line += (f" {_cell_time(result)} | {_cell_memory(result)} | {_ratio(result, reference, 'time')} "
                             f"| {_ratio(result, reference, 'memory')} |")
                lines.append(line)
        notes = sorted({r.get("note", "") for k, r in results.items() if k[0] == case and r.get("note")})
        lines += [""] + [f"Note: {note}." for note in notes] + ([""] if notes else [])
    return "\n".join(lines)


def plan(args):
    """(case, C, H, B, impl, pass) keys in running order: small batches first."""
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes] if args.shapes else \
        (QUICK_SHAPES if args.quick else STAGE_SHAPES)
    batches = args.batches or (QUICK_BATCHES if args.quick else BATCHES)
    keys = []
    for case in args.cases:
        if case == "model":
            keys += [("model", 0, MODEL_SIZE, args.model_batch, impl, "train") for impl in args.impls]
            continue
        for batch in batches:
            for channels, size in shapes:
                for impl in args.impls:
                    keys += [(case, channels, size, batch, impl, name) for name in ("forward", "train")]
    return keys


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device_target", default="CPU", help="CPU, GPU or Ascend")
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS,
                        help="the first one is the reference of the ratio columns")
    parser.add_argument("--cases", nargs="+", default=["layer", "model"], choices=CASES)
    parser.add_argument("--shapes", nargs="+", default=None, help="CxH pairs, e.g. 64x56 512x7")
    parser.add_argument("--batches", nargs="+", type=int, default=None)
    parser.add_argument("--model_batch", type=int, default=MODEL_BATCH)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per configuration (at most)")
    parser.add_argument("--model_repeats", type=int, default=2, help="timed training steps of the model case")
    parser.add_argument("--max_seconds", type=float, default=20.0, help="stop timing after this long (>= 3 calls)")
    parser.add_argument("--max_rss_gib", type=float, default=10.0,
                        help="kill a configuration whose RSS passes this (also capped at 70%% of MemAvailable)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per configuration")
    parser.add_argument("--quick", action="store_true",
                        help=f"shapes {QUICK_SHAPES}, batch {QUICK_BATCHES}, 3 timed calls")
    parser.add_argument("--out", default=None, help="write the markdown report here")
    parser.add_argument("--json", default=None, help="also write the raw measurements here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print("RESULT " + json.dumps(_child(json.loads(args.child))), flush=True)
        return
    if args.repeats < 1 or args.model_repeats < 1 or args.max_seconds <= 0 or args.max_rss_gib <= 0:
        raise ValueError("--repeats and --model_repeats must be >= 1, --max_seconds and --max_rss_gib > 0")
    for value in args.shapes or ():
        parts = value.split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"--shapes entries must look like 64x56 (C x H), got {value!r}")
    repeats = 3 if args.quick else args.repeats
    available_mib = _meminfo_mib("MemAvailable")
    max_rss_mib = min(1024 * args.max_rss_gib, 0.7 * available_mib)
    env = environment(args.device_target)
    results = {}
    for key in plan(args):
        case, channels, size, batch, impl, name = key
        spec = {"case": case, "channels": channels, "size": size, "batch": batch, "impl": impl, "pass": name,
                "device_target": args.device_target, "repeats": args.model_repeats if case == "model" else repeats,
                "max_seconds": args.max_seconds}
        result = run_in_subprocess(spec, max_rss_mib, args.timeout)
        results[key] = result
        print(f"{case:>11} C={channels:<4} {size:>3}px B={batch:<3} {impl:>6} {name:>7}: {_cell_time(result)} ms, "
              f"{_cell_memory(result)} MiB {result.get('backend', '')}", file=sys.stderr, flush=True)
    env_after = environment(args.device_target)
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "results": [[*k, v] for k, v in results.items()]},
                                              indent=1))
    text = results_markdown(results, args.impls)
    print(text)
    if args.out:
        header = ["# Sliding-window attention implementations: benchmark", "",
                  "Generated by `benchmarks/bench_local_attention.py` (graph mode, float32; each configuration in a "
                  f"fresh process; 1 warm-up call, then up to {repeats} timed calls, at least 3, stopping after "
                  f"{args.max_seconds:g} s ({args.model_repeats} timed steps for the model); RSS watchdog at "
                  f"{max_rss_mib / 1024:.1f} GiB).", "",
                  environment_markdown(env),
                  f"- Load average (1/5/15 min) when the run ended: "
                  f"{', '.join(f'{v:.2f}' for v in env_after['load_average'])}", ""]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(header) + "\n" + text + "\n")


def _meminfo_mib(field):
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("inf")


if __name__ == "__main__":
    os.environ.setdefault("GLOG_v", "3")  # keep MindSpore's warnings out of the children's stderr tail
    main()
