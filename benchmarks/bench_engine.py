"""Engine overhead: training throughput through train.py against a bare ``nn.TrainOneStepCell`` loop.

``bare``: the model, ``nn.WithLossCell`` (cross entropy) and ``nn.TrainOneStepCell`` (SGD momentum) called
on one device-resident batch over and over: no data pipeline, no engine; the upper bound.
``engine``: ``python train.py`` on an ImageFolder (decode, random-resized crop, flip, normalise, batch in the
dataset workers; the engine's step with lr schedule, finiteness check, label smoothing; progress lines),
its img/s read from the metrics.jsonl written by the run (steps after the first of each epoch).
``--compare_repo`` also runs the train.py of another checkout (e.g. the code before a change) the same way.

Each measurement runs in a fresh subprocess; rounds interleave (bare, engine, bare, engine, ...) so machine
load hits both alike. Report: img/s of each (median over rounds) and the ratio to bare within each round.

    python benchmarks/bench_engine.py --data_dir data/fashion_mnist --model resnet_tiny --image_size 32 \
        --batch_size 16 --steps 200 --rounds 3
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def bare_worker(model, image_size, batch_size, steps, num_classes, in_chans, device_target):
    """img/s of ``steps`` TrainOneStepCell calls on one fixed batch (after 5 untimed ones)."""
    import mindspore as ms
    from mindspore import nn
    from engine.runtime import build_model, setup_context
    setup_context("graph", device_target, seed=0)
    net, _ = build_model(model, num_classes, {"in_chans": in_chans} if in_chans != 3 else {}, image_size)
    loss = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")
    step = nn.TrainOneStepCell(nn.WithLossCell(net, loss), nn.Momentum(net.trainable_params(), 0.01, 0.9))
    step.set_train(True)
    rng = np.random.default_rng(0)
    images = ms.Tensor(rng.standard_normal((batch_size, in_chans, image_size, image_size)).astype(np.float32))
    labels = ms.Tensor(rng.integers(0, num_classes, batch_size).astype(np.int32))
    for _ in range(5):
        step(images, labels).asnumpy()
    start = time.perf_counter()
    for _ in range(steps):
        out = step(images, labels)
    out.asnumpy()
    return batch_size * steps / (time.perf_counter() - start)


def engine_run(args, output_dir, repo=ROOT):
    """img/s of a train.py run of the checkout ``repo`` (the last progress record: all timed steps of the run)."""
    command = [sys.executable, str(Path(repo) / "train.py"), "--model", args.model, "--data_dir", args.data_dir,
               "--output_dir", output_dir, "--image_size", str(args.image_size), "--crop_pct", "1.0",
               "--batch_size", str(args.batch_size), "--epochs", "1", "--stop_at_step", str(args.steps + 1),
               "--val_split", "null", "--plot", "false", "--log_interval", str(args.log_interval),
               "--overwrite", "true", "--in_chans", str(args.in_chans), "--mean", json.dumps(args.mean),
               "--std", json.dumps(args.std)]
    if args.num_workers:
        command += ["--num_workers", str(args.num_workers)]
    if args.device_target:
        command += ["--device_target", args.device_target]
    result = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=args.timeout)
    if result.returncode != 0:
        raise RuntimeError(f"train.py failed ({result.returncode}):\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    records = [json.loads(line) for line in open(os.path.join(output_dir, "metrics.jsonl")) if line.strip()]
    return [record for record in records if record["type"] == "train"][-1]["images_per_s"]


def parse_args(argv):
    from engine.config import DEVICE_TARGETS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", required=True, help="ImageFolder root with a train/ split")
    parser.add_argument("--model", default="resnet_tiny")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--in_chans", type=int, default=3)
    parser.add_argument("--mean", type=float, nargs="+", default=[0.286])
    parser.add_argument("--std", type=float, nargs="+", default=[0.353])
    parser.add_argument("--num_classes", type=int, default=10)
    parser.add_argument("--num_workers", type=int, default=None, help="train.py dataset workers (default: auto)")
    parser.add_argument("--steps", type=int, default=200, help="timed steps per measurement")
    parser.add_argument("--log_interval", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device_target", choices=DEVICE_TARGETS, default=None)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per measurement")
    parser.add_argument("--compare_repo", help="also measure train.py of this checkout (e.g. the code before a change)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        print(json.dumps(bare_worker(args.model, args.image_size, args.batch_size, args.steps, args.num_classes,
                                     args.in_chans, args.device_target)))
        return 0
    if not os.path.isdir(os.path.join(args.data_dir, "train")):
        print(f"error: {args.data_dir} has no train/ folder", file=sys.stderr)
        return 2
    rates = {"bare": [], "engine": []}
    if args.compare_repo:
        rates["compared"] = []
    with tempfile.TemporaryDirectory() as scratch:
        for round_number in range(args.rounds):
            bare = subprocess.run([sys.executable, __file__, "--worker"] + (argv if argv is not None else sys.argv[1:]),
                                  capture_output=True, text=True, timeout=args.timeout)
            if bare.returncode != 0:
                print(bare.stdout[-2000:] + bare.stderr[-2000:], file=sys.stderr)
                return 1
            rates["bare"].append(float(bare.stdout.strip().splitlines()[-1]))
            rates["engine"].append(engine_run(args, os.path.join(scratch, f"run{round_number}")))
            if args.compare_repo:
                rates["compared"].append(engine_run(args, os.path.join(scratch, f"old{round_number}"),
                                                    args.compare_repo))
            print(f"round {round_number + 1}: " + ", ".join(f"{name} {values[-1]:.1f} img/s"
                                                            for name, values in rates.items())
                  + f" (load {os.getloadavg()[0]:.2f})", flush=True)
    bare = np.array(rates["bare"])
    for name, label in (("engine", "train.py"), ("compared", f"train.py of {args.compare_repo}")):
        if name in rates:  # ratios within a round (same load), then their median
            ratios = np.array(rates[name]) / bare
            print(f"{args.model} {args.image_size} px batch {args.batch_size}: {label} {np.median(rates[name]):.1f} "
                  f"img/s, bare {np.median(bare):.1f} img/s; {label} / bare per round "
                  f"{', '.join(f'{r:.2f}' for r in ratios)}: median {np.median(ratios):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
