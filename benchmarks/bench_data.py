"""Input pipeline benchmark: images/s of the training and validation pipelines alone (no model), and of the
image check, so one can tell whether data or model limits a run.

Datasets: ImageNet-like JPEGs this script generates (``--jpeg_count`` files of about 500x375 px, smooth
shapes plus noise, quality 90: about the size and entropy of ImageNet photos, trained at ``--image_size``
224), and the Fashion-MNIST ImageFolder (``--fashion_mnist DIR``, made by tools/prepare_fashion_mnist.py;
28 px PNGs, trained at 32 px as the demo does).

Measured for each dataset, in interleaved rounds (A, B, A, B ... so machine load hits all alike):
``train`` (engine.data.train_dataset: fused decode + random-resized-crop, flip, normalise, batch),
``train_unfused`` (the same with separate Decode and RandomResizedCrop ops, as before), ``eval``
(engine.data.eval_dataset) and ``check`` (the full-decode image check, without its cache).

    python benchmarks/bench_data.py --jpeg_count 256 --fashion_mnist data/fashion_mnist --rounds 3
    python benchmarks/bench_data.py --quick
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import environment, environment_markdown  # noqa: E402

CASES = ("train", "train_unfused", "eval", "check")


def write_imagenet_like(root, count, classes=4, seed=0):
    """``count`` JPEGs in the train split and a quarter as many in val, 500x375 or 375x500 px."""
    from PIL import Image, ImageDraw
    rng = np.random.default_rng(seed)
    for split, number in (("train", count), ("val", max(classes, count // 4))):
        for index in range(number):
            folder = os.path.join(root, split, f"class_{index % classes}")
            os.makedirs(folder, exist_ok=True)
            width, height = (500, 375) if index % 3 else (375, 500)
            base = rng.integers(0, 256, 3)
            image = Image.new("RGB", (width, height), tuple(int(v) for v in base))
            draw = ImageDraw.Draw(image)
            for _ in range(12):
                x, y = rng.integers(0, width), rng.integers(0, height)
                size = rng.integers(20, 200)
                draw.ellipse((x, y, x + size, y + size), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
            pixels = np.asarray(image, np.int16) + rng.normal(0, 12, (height, width, 3)).astype(np.int16)
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
                os.path.join(folder, f"{index:05d}.jpg"), quality=90)
    return root


def dataset_config(data_dir, image_size, batch_size, num_workers, mean):
    from engine.config import build_config
    return build_config(file_values=dict(data_dir=data_dir, image_size=image_size, batch_size=batch_size,
                                         num_workers=num_workers, mean=mean, std=[0.25] * len(mean),
                                         model="resnet_tiny"))


def measure(case, cfg, index, val_index, max_batches):
    """(images, seconds) of one pass of ``case``; a pipeline pass is timed from its creation (start-up
    included: a conservative rate) over ``max_batches`` batches (epochs repeated as needed)."""
    from engine.data import eval_dataset, find_bad_images, train_dataset
    if case == "check":
        start = time.perf_counter()
        find_bad_images(index, use_cache=False)
        return len(index), time.perf_counter() - start
    start = time.perf_counter()
    if case == "eval":
        dataset, per_epoch = eval_dataset(cfg, val_index), -(-len(val_index) // cfg.batch_size)
    else:
        dataset = train_dataset(cfg, index, len(index.classes), seed=0, fused=case == "train")
        per_epoch = len(index) // cfg.batch_size
    dataset = dataset.repeat(-(-max_batches // per_epoch))
    images = 0
    for batch_number, (batch, _) in enumerate(dataset.create_tuple_iterator(num_epochs=1, output_numpy=True)):
        images += len(batch)
        if batch_number + 1 >= max_batches:
            break
    return images, time.perf_counter() - start


def run_dataset(name, cfg, rounds, max_batches, cases):
    import logging
    from engine.data import scan_split
    logging.getLogger("engine.data").setLevel(logging.WARNING)  # no image-check progress lines in the timing
    index = scan_split(cfg.data_dir, "train", verify_images=False)
    val_index = scan_split(cfg.data_dir, "val", verify_images=False)
    rates = {case: [] for case in cases}
    for case in cases:  # untimed: the process's first pipeline loads and initialises the dataset engine
        measure(case, cfg, index, val_index, 1)
    for round_number in range(rounds):
        for case in cases:
            images, seconds = measure(case, cfg, index, val_index, max_batches)
            rates[case].append(images / seconds)
            print(f"{name} round {round_number + 1} {case}: {images} images in {seconds:.2f} s = "
                  f"{images / seconds:.0f} img/s", flush=True)
    return {case: values for case, values in rates.items()}


def table(results, settings):
    lines = ["| dataset | pipeline | img/s, median [min-max] over rounds | settings |", "|---|---|---|---|"]
    for name, rates in results.items():
        for case, values in rates.items():
            lines.append(f"| {name} | {case} | {np.median(values):.0f} [{min(values):.0f}-{max(values):.0f}] | "
                         f"{settings[name]} |")
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jpeg_count", type=int, default=256, help="generated ImageNet-like JPEGs (0: none)")
    parser.add_argument("--jpeg_dir", help="keep the generated JPEGs here (default: a temporary folder)")
    parser.add_argument("--image_size", type=int, default=224, help="crop size for the JPEGs")
    parser.add_argument("--fashion_mnist", help="Fashion-MNIST ImageFolder root (tools/prepare_fashion_mnist.py)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_workers", type=int, default=None, help="dataset workers (default: from the machine)")
    parser.add_argument("--batches", type=int, default=30, help="timed batches per pipeline pass")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--quick", action="store_true", help="32 JPEGs, batch 8, 3 batches, 1 round")
    parser.add_argument("--out", help="also write the table and environment to this markdown file")
    args = parser.parse_args(argv)
    if args.quick:
        args.jpeg_count, args.batch_size, args.batches, args.rounds = 32, 8, 3, 1
    for name in ("jpeg_count", "batch_size", "batches", "rounds", "image_size"):
        if getattr(args, name) < (0 if name == "jpeg_count" else 1):
            parser.error(f"--{name} must be >= {0 if name == 'jpeg_count' else 1}")
    if args.fashion_mnist and not os.path.isdir(os.path.join(args.fashion_mnist, "train")):
        parser.error(f"--fashion_mnist {args.fashion_mnist} has no train/ folder (make it with "
                     f"python tools/prepare_fashion_mnist.py --out {args.fashion_mnist})")
    if not args.jpeg_count and not args.fashion_mnist:
        parser.error("nothing to measure: give --jpeg_count > 0 or --fashion_mnist")
    return args


def main(argv=None):
    from engine.data import worker_count
    args = parse_args(sys.argv[1:] if argv is None else argv)
    workers = worker_count(args.num_workers)
    results, settings = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        if args.jpeg_count:
            folder = args.jpeg_dir or os.path.join(scratch, "jpeg")
            if not os.path.isdir(os.path.join(folder, "train")):
                start = time.time()
                write_imagenet_like(folder, args.jpeg_count)
                print(f"generated {args.jpeg_count} JPEGs in {folder} ({time.time() - start:.1f} s)")
            cfg = dataset_config(folder, args.image_size, args.batch_size, args.num_workers, [0.5, 0.5, 0.5])
            name = f"generated JPEG ~500x375 -> {args.image_size}"
            results[name] = run_dataset(name, cfg, args.rounds, args.batches, args.cases)
            settings[name] = f"batch {args.batch_size}, {workers} workers"
        if args.fashion_mnist:
            cfg = dataset_config(args.fashion_mnist, 32, args.batch_size, args.num_workers, [0.286])
            name = "Fashion-MNIST PNG 28 -> 32"
            results[name] = run_dataset(name, cfg, args.rounds, args.batches, args.cases)
            settings[name] = f"batch {args.batch_size}, {workers} workers"
    env = environment()
    text = table(results, settings)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write("# Input pipeline throughput\n\n" + text + "\n\n" + environment_markdown(env) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
