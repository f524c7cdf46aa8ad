"""Our models beside the PyTorch re-implementations of the official code (issue 13, target 2).

Pairs (ours -> PyTorch, both built with random weights): ``swin_tiny`` -> official Swin-T
(``tests/torch_official.OfficialSwinACmix(acmix=False)``), ``swin_tiny_acmix`` -> official Swin-ACmix-T,
``resnet26`` -> the plain bottleneck ResNet-26 (``OfficialResNetACmix(layers=(1, 2, 4, 1), acmix=False)``),
``resnet26_acmix`` -> official ResNet-ACmix-26. Same batch, image size and input (one NumPy array), same
thread count (``--threads``: ``torch.set_num_threads``, MindSpore's ``runtime_num_threads`` and
``OMP_NUM_THREADS`` / ``ACMIX_MS_KERNEL_THREADS`` for the kernels of both).

Modes: inference (ours: graph mode, ``set_train(False)``; PyTorch: ``eval()`` under ``torch.no_grad()``) and
training (one SGD step with label-smoothed cross entropy: ours the engine's ``TrainStep``, PyTorch
forward / ``backward`` / ``step``). Each (framework, model, mode, round) runs in its own subprocess, so peak RSS
(VmHWM over the warm-up and timed calls, ``benchmarks/common.py``) is that configuration's alone; rounds
alternate ours / PyTorch so machine load hits both alike. Reported: img/s (median of the timed calls), the
ratio ours / PyTorch per round and their median (> 1: ours faster), peak RSS and its ratio (ours / PyTorch).
Needs torch (its CPU build) in the benchmark environment only.

    python benchmarks/bench_vs_torch.py --models swin_tiny swin_tiny_acmix --batch 8 --image_size 224 --rounds 2
    python benchmarks/bench_vs_torch.py --quick        # narrow Swin pair at 32 px, 1 round, 1 timed call
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.harness import run_worker, worker_main  # noqa: E402
from engine.config import DEVICE_TARGETS  # noqa: E402
from benchmarks.common import PeakRSS, environment, environment_markdown, summarize, time_calls  # noqa: E402

MODES = ("inference", "train")
RESNET26_LAYERS = (1, 2, 4, 1)
# ours -> (PyTorch class name in tests/torch_official.py, its kwargs)
PAIRS = {
    "swin_tiny": ("OfficialSwinACmix", dict(acmix=False)),
    "swin_tiny_acmix": ("OfficialSwinACmix", dict(acmix=True)),
    "resnet26": ("OfficialResNetACmix", dict(layers=RESNET26_LAYERS, acmix=False)),
    "resnet26_acmix": ("OfficialResNetACmix", dict(layers=RESNET26_LAYERS, acmix=True)),
}
# --quick: narrow Swin models (ours' overrides, the PyTorch kwargs) at 32 px
QUICK_ARCH = dict(embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4)


def torch_kwargs(model, image_size, num_classes, arch):
    cls_name, kwargs = PAIRS[model]
    kwargs = dict(kwargs, num_classes=num_classes, **arch)
    if cls_name == "OfficialSwinACmix":
        kwargs["img_size"] = image_size
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    return cls_name, kwargs


def _inputs(task):
    import numpy as np
    rng = np.random.default_rng(task["seed"])
    images = rng.standard_normal((task["batch"], 3, task["image_size"], task["image_size"])).astype(np.float32)
    labels = rng.integers(0, task["num_classes"], (task["batch"],))
    return images, labels


def _set_thread_env(threads):
    for name in ("OMP_NUM_THREADS", "ACMIX_MS_KERNEL_THREADS"):
        os.environ[name] = str(threads)


def measure_ours(task):
    import mindspore as ms
    from benchmarks.harness import ModelSpec, build_spec_model, engine_train_step, set_graph_mode, timed
    device = set_graph_mode(task.get("device_target"))
    if device == "CPU":
        ms.set_context(runtime_num_threads=task["threads"])
    images, labels = _inputs(task)
    overrides = dict(task["arch"])
    if task["model"].startswith("swin"):
        overrides["drop_path_rate"] = 0.0  # PyTorch's official re-implementation has no stochastic depth
    model = build_spec_model(ModelSpec(task["model"], overrides), task["image_size"], task["num_classes"])
    x, y = ms.Tensor(images), ms.Tensor(labels.astype("int32"))
    if task["mode"] == "inference":
        model.set_train(False)
        fn, args = model, (x,)
    else:
        model.set_train(True)
        fn, args = engine_train_step(model, "sgd"), (x, y)
    # timed: compiled first as the engine does (the compilation's peak included), then timed
    result = timed(fn, args, task["warmup"], task["repeats"], task["max_seconds"])
    return {"stats": result["stats"], "peak_rss_mib": result["peak_rss_mib"], "device_target": device}


def measure_torch(task):
    import torch
    import torch.nn.functional as F
    from tests import torch_official
    torch.set_num_threads(task["threads"])
    torch.manual_seed(0)
    images, labels = _inputs(task)
    cls_name, kwargs = torch_kwargs(task["model"], task["image_size"], task["num_classes"], task["arch"])
    model = getattr(torch_official, cls_name)(**kwargs)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    if task["mode"] == "inference":
        model.eval()

        def fn(inputs):
            with torch.no_grad():
                return model(inputs)
        args = (x,)
    else:
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def fn(inputs, targets):
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(inputs), targets, label_smoothing=0.1)
            loss.backward()
            optimizer.step()
            return loss
        args = (x, y)
    with PeakRSS() as memory:
        times = time_calls(fn, args, task["warmup"], task["repeats"], task["max_seconds"], min(3, task["repeats"]))
    return {"stats": summarize(times), "peak_rss_mib": memory.peak_mib}


def measure(task):
    _set_thread_env(task["threads"])
    return measure_torch(task) if task["framework"] == "torch" else measure_ours(task)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["swin_tiny", "swin_tiny_acmix"], choices=sorted(PAIRS))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2, help="threads of both frameworks")
    parser.add_argument("--rounds", type=int, default=2, help="ours / PyTorch alternations per configuration")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max_seconds", type=float, default=20.0)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per subprocess")
    parser.add_argument("--device_target", default="CPU", choices=DEVICE_TARGETS,
                        help="our backend (PyTorch runs on its CPU build)")
    parser.add_argument("--quick", action="store_true",
                        help="narrow Swin pair at 32 px, batch 2, 1 round, 1 timed call (smoke test)")
    parser.add_argument("--out", help="write the markdown report here")
    parser.add_argument("--json", help="write the raw results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("batch", "image_size", "num_classes", "threads", "rounds", "warmup", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.quick:
        args.models = [m for m in args.models if m.startswith("swin")] or ["swin_tiny", "swin_tiny_acmix"]
        args.batch, args.image_size, args.num_classes = 2, 32, 10
        args.rounds, args.warmup, args.repeats = 1, 1, 1
    return args


def _ips(result, batch):
    return batch / result["stats"]["median"] if "stats" in result else None


def _fmt(value, spec=".1f", suffix=""):
    return "—" if value is None else f"{value:{spec}}{suffix}"


def report(args, results, env):
    """Markdown: per-configuration table with every round, then the summary of ratios."""
    lines = ["Generated by `benchmarks/bench_vs_torch.py`: ours (MindSpore, graph mode) beside the PyTorch "
             "re-implementation of the official code (`tests/torch_official.py`), float32, random weights and "
             f"input, batch {args.batch}, {args.image_size} px, {args.threads} threads for both; every "
             "(framework, model, mode, round) in its own subprocess, rounds alternating; "
             f"{args.warmup} warm-up then up to {args.repeats} timed calls; img/s from the median; peak RSS = "
             "the subprocess's VmHWM over warm-up and timed calls.", "", environment_markdown(env), "",
             "| model | mode | round | ours img/s | PyTorch img/s | ours / PyTorch | ours peak RSS MiB | "
             "PyTorch peak RSS MiB | RSS ours / PyTorch |", "|---|---|---|---|---|---|---|---|---|"]
    summary = ["", "| model | mode | speed ours / PyTorch (median of rounds) | peak RSS ours / PyTorch |",
               "|---|---|---|---|"]
    for model in args.models:
        for mode in args.modes:
            ratios, rss_ratios = [], []
            for index in range(args.rounds):
                ours = results[(model, mode, index, "ours")]
                theirs = results[(model, mode, index, "torch")]
                a, b = _ips(ours, args.batch), _ips(theirs, args.batch)
                ratio = a / b if a and b else None
                rss = (ours["peak_rss_mib"] / theirs["peak_rss_mib"]
                       if "peak_rss_mib" in ours and "peak_rss_mib" in theirs else None)
                if ratio is not None:
                    ratios.append(ratio)
                if rss is not None:
                    rss_ratios.append(rss)
                error = "; ".join(r["error"] for r in (ours, theirs) if "error" in r)
                lines.append(f"| {model} | {mode} | {index + 1} | {_fmt(a, '.2f')} | {_fmt(b, '.2f')} | {_fmt(ratio, '.2f', 'x')} "
                             f"| {_fmt(ours.get('peak_rss_mib'), '.0f')} | {_fmt(theirs.get('peak_rss_mib'), '.0f')} "
                             f"| {_fmt(rss, '.2f', 'x')} |" + (f" error: {error}" if error else ""))
            speed = statistics.median(ratios) if ratios else None
            memory = statistics.median(rss_ratios) if rss_ratios else None
            spread = f" ({min(ratios):.2f}–{max(ratios):.2f})" if len(ratios) > 1 else ""
            summary.append(f"| {model} | {mode} | {_fmt(speed, '.2f', 'x')}{spread} | {_fmt(memory, '.2f', 'x')} |")
    return "\n".join(lines + summary) + "\n"


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker, measure)
    env = environment(args.device_target)
    arch = QUICK_ARCH if args.quick else {}
    results = {}
    for model in args.models:
        for mode in args.modes:
            for index in range(args.rounds):
                order = ("ours", "torch") if index % 2 == 0 else ("torch", "ours")
                for framework in order:
                    task = dict(framework=framework, model=model, mode=mode, batch=args.batch,
                                image_size=args.image_size, num_classes=args.num_classes, threads=args.threads,
                                warmup=args.warmup, repeats=args.repeats, max_seconds=args.max_seconds,
                                seed=index, arch=arch, device_target=args.device_target)
                    start = time.perf_counter()
                    result = run_worker(Path(__file__).resolve(), task, args.timeout)
                    results[(model, mode, index, framework)] = result
                    speed = _fmt(_ips(result, args.batch), ".2f")
                    print(f"[{framework:5s}] {model} {mode} round {index + 1}: {speed} img/s, peak "
                          f"{_fmt(result.get('peak_rss_mib'), '.0f')} MiB ({time.perf_counter() - start:.0f} s)"
                          + (f" error: {result['error']}" if "error" in result else ""), flush=True)
    env["load_average_end"] = tuple(round(v, 2) for v in os.getloadavg())
    text = report(args, results, env)
    text += f"\nLoad average (1/5/15 min) at the end: {', '.join(f'{v:.2f}' for v in env['load_average_end'])}\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    if args.json:
        rows = [dict(model=m, mode=mo, round=i + 1, framework=f, **r) for (m, mo, i, f), r in results.items()]
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"environment": env, "results": rows}, indent=1))
    failed = any("error" in r for r in results.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
