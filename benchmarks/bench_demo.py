"""What limits the Fashion-MNIST demo's training speed: the data pipeline (IDX in memory vs ImageFolder PNG
files) and the model's training step at several batch and image sizes, measured in interleaved rounds
(A, B, C, A, B, C, ...) in one process so that a shared machine's load hits every configuration alike.

    python benchmarks/bench_demo.py                                   # defaults below
    python benchmarks/bench_demo.py --models resnet_tiny resnet_tiny_acmix --batch_sizes 16 64 128 \
        --image_sizes 28 32 --rounds 3 --images 512
    python benchmarks/bench_demo.py --no_data                         # model steps only
    python benchmarks/bench_demo.py --no_models --data_images 2000    # data pipelines only

Data: one pass over ``--data_images`` training images (the first of each class of Debian's Fashion-MNIST)
through ``engine.data.train_dataset`` with the demo recipe (configs/demo_fashion_mnist.yaml), once from the
IDX files in memory (engine/idx_data.py) and once from an ImageFolder of PNG files written by
tools/prepare_fashion_mnist.py; batches are pulled as NumPy arrays, nothing else runs. Model: the engine's
compiled training step (``benchmarks.harness.engine_train_step``, AdamW) on a fixed random batch; the
first call of each configuration compiles and is not timed. Reports the median img/s over rounds and the
load average before and after.
"""
import argparse
import gzip
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SOURCE = "/usr/share/datasets/fashion-mnist"


def write_idx_subset(source, out, per_class):
    """An IDX folder with the first ``per_class`` training and test images of each class of ``source``."""
    import numpy as np
    from engine.idx_data import read_idx
    os.makedirs(out, exist_ok=True)
    for prefix in ("train", "t10k"):
        images = read_idx(os.path.join(source, f"{prefix}-images-idx3-ubyte.gz"))
        labels = read_idx(os.path.join(source, f"{prefix}-labels-idx1-ubyte.gz"))
        keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)]))
        for kind, array in (("images-idx3-ubyte", images[keep]), ("labels-idx1-ubyte", labels[keep])):
            header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
            with gzip.open(os.path.join(out, f"{prefix}-{kind}.gz"), "wb") as handle:
                handle.write(header + array.tobytes())
    return out


def data_pass(cfg, index):
    """img/s of one pass through the training pipeline of ``index``."""
    from engine.data import train_dataset
    dataset = train_dataset(cfg, index, 10, seed=0)
    start, count = time.perf_counter(), 0
    for images, _ in dataset.create_tuple_iterator(num_epochs=1, output_numpy=True):
        count += len(images)
    return count / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet_tiny"])
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[16, 64, 128])
    parser.add_argument("--image_sizes", type=int, nargs="+", default=[28, 32])
    parser.add_argument("--in_chans", type=int, default=3, choices=(1, 3),
                        help="image channels of the models' input (the full demo recipe: 1)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=512,
                        help="training images per configuration and round (steps = images / batch, at least 1): "
                             "every configuration takes a similar time, so the rounds interleave finely")
    parser.add_argument("--data_images", type=int, default=2000, help="images per data pass (multiple of 10)")
    parser.add_argument("--data_batch", type=int, default=128)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--no_data", action="store_true")
    parser.add_argument("--no_models", action="store_true")
    args = parser.parse_args(argv)
    import numpy as np
    from benchmarks.harness import ModelSpec, build_spec_model, engine_train_step, random_batch, set_graph_mode
    from engine.config import build_config, read_yaml
    from engine.data import scan_split
    set_graph_mode()
    print(f"load average before: {os.getloadavg()}", flush=True)
    tasks = {}  # label -> callable returning img/s of one round
    scratch = tempfile.mkdtemp(prefix="bench_demo_")
    if not args.no_data:
        from engine.fashion_mnist import prepare
        per_class = args.data_images // 10
        values = dict(read_yaml(str(ROOT / "configs" / "demo_fashion_mnist.yaml")), batch_size=args.data_batch,
                      num_workers=args.num_workers, image_size=28)
        idx_dir = write_idx_subset(SOURCE, os.path.join(scratch, "idx"), per_class)
        png_dir = os.path.join(scratch, "png")
        prepare(png_dir, train_per_class=per_class, val_per_class=1, log=lambda *_: None)
        for name, folder in (("data idx (memory)", idx_dir), ("data imagefolder (png)", png_dir)):
            cfg = build_config(file_values=dict(values, data_dir=folder))
            index = scan_split(folder, "train", verify_images=False)
            tasks[f"{name}, batch {args.data_batch}"] = (lambda c=cfg, i=index: data_pass(c, i))
    if not args.no_models:
        for model_name in args.models:
            for size in args.image_sizes:
                for batch in args.batch_sizes:
                    model = build_spec_model(ModelSpec(model_name), size, num_classes=10, in_chans=args.in_chans)
                    model.set_train(True)
                    step = engine_train_step(model, "adamw")
                    inputs = random_batch(batch, size, args.in_chans, num_classes=10)
                    step(*inputs)  # compile

                    def run(step=step, inputs=inputs, batch=batch):
                        steps = max(1, args.images // batch)
                        start = time.perf_counter()
                        for _ in range(steps):
                            loss = step(*inputs)[0]
                        np.asarray(loss.asnumpy())
                        return steps * batch / (time.perf_counter() - start)
                    tasks[f"train step {model_name} {size}px batch {batch}"] = run
    results = {label: [] for label in tasks}
    for round_index in range(args.rounds):
        for label, task in tasks.items():
            results[label].append(task())
        print(f"round {round_index + 1}: " + "; ".join(f"{k}: {v[-1]:.0f}" for k, v in results.items()),
              flush=True)
    print(f"load average after: {os.getloadavg()}")
    print("| what | img/s (median of rounds) | all rounds |\n|---|---|---|")
    for label, values in results.items():
        print(f"| {label} | {statistics.median(values):.0f} | {', '.join(f'{v:.0f}' for v in values)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
