"""Worked example of docs/dropin.md: put ACmix into a network this project does not own.

    python examples/dropin_backbone.py --steps 200 --batch_size 32 [--init conv --pretrain_steps 100]

The network is a small ResNet-style backbone written here (BasicBlocks, 4 stages, 28 px grey input down to
2 x 2), standing in for "someone else's model". The script
1. builds it (and with ``--pretrain_steps`` trains the plain-convolution network first, as a stand-in for
   pretrained weights) and records its output on a fixed batch;
2. prints the dry-run report of ``acmix_ms.replace_convs``, then replaces the 3 x 3 convolutions of the
   stages (the stem stays a convolution) and prints what the replacement did, and how far the converted
   network's output moved from the original one (relative max |diff|; about 0 for exact conv init);
3. trains the converted network ``--steps`` steps on Fashion-MNIST (real images when Debian's
   dataset-fashion-mnist is installed, else generated images; say which) and reports validation accuracy;
4. exports it to MINDIR (device-kernel attention layers switched to standard operators first), reloads the
   file and checks it gives the network's output.

Writes to a new ``--output_dir`` (default ``runs/dropin_backbone/<time>``; an existing non-empty folder
is refused): ``backbone_acmix.mindir``, ``train_log.jsonl`` (one line per logged step) and ``summary.json``.
Exit codes: 0 done, 1 the exported file differs from the network, 2 bad arguments.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def parse_args(argv):
    from engine.config import DEVICE_TARGETS
    parser = argparse.ArgumentParser(description="Drop ACmix into a small ResNet-style backbone, train, export.")
    parser.add_argument("--steps", type=int, default=200, help="training steps of the converted network")
    parser.add_argument("--pretrain_steps", type=int, default=0,
                        help="steps of the plain-convolution network before the replacement (pretrained stand-in)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--width", type=int, default=16, help="channels of the first stage (x2 per stage)")
    parser.add_argument("--num_heads", type=int, default=4)
    parser.add_argument("--kernel_att", type=int, default=7, help="attention window (odd)")
    parser.add_argument("--attention_impl", default="auto", choices=("auto", "unfold", "lean", "fused"))
    parser.add_argument("--init", default="paper", choices=("paper", "conv"),
                        help="ACmix initialisation: the paper's, or from the replaced convolution")
    parser.add_argument("--init_tolerance", type=float, default=0.1,
                        help="largest relative weight error accepted for --init conv")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--val_size", type=int, default=500, help="validation images")
    parser.add_argument("--data", default="auto", choices=("auto", "fashion-mnist", "generated"))
    parser.add_argument("--log_interval", type=int, default=20)
    parser.add_argument("--output_dir", default=None)
    parser.add_argument("--device_target", default=None, choices=DEVICE_TARGETS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "width", "num_heads", "kernel_att", "val_size", "log_interval"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.pretrain_steps < 0:
        parser.error(f"--pretrain_steps must be >= 0, got {args.pretrain_steps}")
    if args.kernel_att % 2 == 0:
        parser.error(f"--kernel_att must be odd, got {args.kernel_att}")
    if args.width % args.num_heads:
        parser.error(f"--width {args.width} must be divisible by --num_heads {args.num_heads}")
    if args.data == "fashion-mnist" and not os.path.isfile(os.path.join(FASHION_MNIST, "t10k-images-idx3-ubyte.gz")):
        parser.error(f"--data fashion-mnist: no Fashion-MNIST files in {FASHION_MNIST}")
    args.output_dir = args.output_dir or os.path.join("runs", "dropin_backbone", time.strftime("%Y%m%d-%H%M%S"))
    if os.path.isdir(args.output_dir) and os.listdir(args.output_dir):
        parser.error(f"--output_dir {args.output_dir} exists and is not empty: choose a new folder")
    return args


# ----------------------------------------------------------------------------------- the foreign network
def build_backbone(width, num_classes=10):
    """A ResNet-18-like classifier in miniature, written without anything from this project.

    Input (B, 1, 28, 28). Stem conv3x3/2 -> 14 px; stages of one BasicBlock at 14, 7, 4 and 2 px
    (widths w, 2w, 4w, 8w); global average pool; Dense -> (B, num_classes).
    """
    from mindspore import nn, ops

    def conv_bn(in_channels, out_channels, kernel, stride):
        return nn.SequentialCell(nn.Conv2d(in_channels, out_channels, kernel, stride=stride, pad_mode="pad",
                                           padding=kernel // 2), nn.BatchNorm2d(out_channels))

    class BasicBlock(nn.Cell):
        def __init__(self, in_channels, out_channels, stride):
            super().__init__()
            self.conv1 = conv_bn(in_channels, out_channels, 3, stride)
            self.conv2 = conv_bn(out_channels, out_channels, 3, 1)
            self.shortcut = conv_bn(in_channels, out_channels, 1, stride) \
                if stride != 1 or in_channels != out_channels else nn.Identity()

        def construct(self, x):
            return ops.relu(self.conv2(ops.relu(self.conv1(x))) + self.shortcut(x))

    class Backbone(nn.Cell):
        def __init__(self):
            super().__init__()
            self.stem = nn.SequentialCell(conv_bn(1, width, 3, 2), nn.ReLU())
            self.stages = nn.SequentialCell(BasicBlock(width, width, 1), BasicBlock(width, 2 * width, 2),
                                            BasicBlock(2 * width, 4 * width, 2), BasicBlock(4 * width, 8 * width, 2))
            self.head = nn.Dense(8 * width, num_classes)

        def construct(self, x):
            return self.head(self.stages(self.stem(x)).mean(axis=(2, 3)))

    return Backbone()


# ---------------------------------------------------------------------------------------------- data
def load_data(choice, val_size, seed):
    """(train images, train labels, val images, val labels, source): float32 (N, 1, 28, 28) in [0, 1]-ish."""
    have_files = os.path.isfile(os.path.join(FASHION_MNIST, "t10k-images-idx3-ubyte.gz"))
    if choice == "fashion-mnist" or (choice == "auto" and have_files):
        from engine.fashion_mnist import load_split
        train_x, train_y = load_split(os.path.join(FASHION_MNIST, "train-images-idx3-ubyte.gz"),
                                      os.path.join(FASHION_MNIST, "train-labels-idx1-ubyte.gz"))
        val_x, val_y = load_split(os.path.join(FASHION_MNIST, "t10k-images-idx3-ubyte.gz"),
                                  os.path.join(FASHION_MNIST, "t10k-labels-idx1-ubyte.gz"))
        source = f"Fashion-MNIST ({FASHION_MNIST})"
    else:  # noise with a class-specific bright square: learnable in a few steps
        rng = np.random.default_rng(seed)
        count = 2000 + val_size
        labels = rng.integers(0, 10, count)
        images = rng.integers(0, 80, (count, 28, 28)).astype(np.uint8)
        for index, label in enumerate(labels):
            row, col = (label * 5) % 20, (label * 11) % 20
            images[index, row:row + 8, col:col + 8] = 230
        train_x, train_y, val_x, val_y = images[val_size:], labels[val_size:], images[:val_size], labels[:val_size]
        source = "generated images (no Fashion-MNIST files found)" if choice == "auto" else "generated images"
    normalise = lambda images: ((images.astype(np.float32) / 255.0 - 0.286) / 0.353)[:, None]  # noqa: E731
    return normalise(train_x), train_y.astype(np.int32), normalise(val_x[:val_size]), \
        val_y[:val_size].astype(np.int32), source


# ------------------------------------------------------------------------------------------ training
def train(network, images, labels, steps, batch_size, lr, seed, log_interval, log, tag):
    """``steps`` SGD-momentum steps on random batches; returns the logged losses."""
    import mindspore as ms
    from mindspore import nn
    step_cell = nn.TrainOneStepCell(nn.WithLossCell(network, nn.SoftmaxCrossEntropyWithLogits(sparse=True,
                                                                                               reduction="mean")),
                                    nn.Momentum(network.trainable_params(), lr, 0.9, weight_decay=1e-4))
    step_cell.set_train(True)
    rng = np.random.default_rng(seed)
    losses, start = [], time.time()
    for step in range(1, steps + 1):
        batch = rng.integers(0, len(images), batch_size)
        loss = float(step_cell(ms.Tensor(images[batch]), ms.Tensor(labels[batch])).asnumpy())
        if not np.isfinite(loss):
            raise RuntimeError(f"{tag}: the loss is {loss} at step {step}")
        if step % log_interval == 0 or step == steps:
            elapsed = time.time() - start
            rate = step / elapsed
            line = {"phase": tag, "step": step, "loss": round(loss, 5), "steps_per_s": round(rate, 3),
                    "eta_s": round((steps - step) / rate, 1)}
            losses.append(line)
            log(line)
    network.set_train(False)
    return losses


def accuracy(network, images, labels, batch_size):
    import mindspore as ms
    correct = 0
    for begin in range(0, len(images), batch_size):
        logits = network(ms.Tensor(images[begin:begin + batch_size])).asnumpy()
        correct += int((logits.argmax(1) == labels[begin:begin + batch_size]).sum())
    return correct / len(images)


# -------------------------------------------------------------------------------------------- export
def export_and_check(network, sample, path):
    """Export to MINDIR (temp name, renamed when verified); returns max |exported - network| on ``sample``."""
    import mindspore as ms
    import acmix_ms
    from acmix_ms.layout import set_permute_kernels
    switched = acmix_ms.set_attention_impl(network, "unfold", only_kernels=True)
    if switched:
        print(f"export: {switched} attention layer(s) switched from the device kernel to 'unfold' "
              f"(standard operators, same weights and results)")
    conv = acmix_ms.set_conv_path_kernels(network, False)
    if conv:
        print(f"export: {conv} conv path(s) switched from the device kernel to standard operators")
    set_permute_kernels(network, False)  # axis permutations as the plain Transpose
    expected = network(ms.Tensor(sample)).asnumpy()
    temp_base = path[:-len(".mindir")] + ".tmp"
    ms.export(network, ms.Tensor(sample), file_name=temp_base, file_format="MINDIR")
    exported = ms.nn.GraphCell(ms.load(temp_base + ".mindir"))(ms.Tensor(sample)).asnumpy()
    difference = float(np.abs(exported - expected).max())
    if difference <= 1e-4 + 1e-4 * float(np.abs(expected).max()):
        os.replace(temp_base + ".mindir", path)
    return difference


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import mindspore as ms
    import acmix_ms
    from engine.runtime import setup_context
    setup_context("graph", args.device_target)
    ms.set_seed(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    log_path = os.path.join(args.output_dir, "train_log.jsonl")

    def log(line):
        print(json.dumps(line))
        with open(log_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(line) + "\n")

    train_x, train_y, val_x, val_y, source = load_data(args.data, args.val_size, args.seed)
    print(f"data: {source}; {len(train_x)} training, {len(val_x)} validation images")
    network = build_backbone(args.width)
    if args.pretrain_steps:
        train(network, train_x, train_y, args.pretrain_steps, args.batch_size, args.lr, args.seed + 1,
              args.log_interval, log, "pretrain (convolutions)")
    network.set_train(False)
    probe = val_x[:args.batch_size]
    original_logits = network(ms.Tensor(probe)).asnumpy()
    summary = {"data": source, "args": vars(args), "val_accuracy_before": accuracy(network, val_x, val_y,
                                                                                   args.batch_size)}

    options = dict(num_heads=args.num_heads, kernel_att=args.kernel_att, attention_impl=args.attention_impl,
                   init=args.init, init_tolerance=args.init_tolerance,
                   select=lambda name, conv: not name.startswith("stem"))  # keep the stem a convolution
    planned = acmix_ms.replace_convs(network, dry_run=True, **options)  # look first: nothing changes
    print(f"dry run: would replace {len(planned.replaced)} convolution(s), skip {len(planned.skipped)}")
    report = acmix_ms.replace_convs(network, **options)
    print(report)
    network.set_train(False)
    converted_logits = network(ms.Tensor(probe)).asnumpy()
    moved = float(np.abs(converted_logits - original_logits).max() / np.abs(original_logits).max())
    print(f"converted network vs original on {len(probe)} validation images: relative max |diff| of the "
          f"logits {moved:.3e}")
    summary.update(report=report.to_dict(), logits_relative_change=moved,
                   val_accuracy_converted=accuracy(network, val_x, val_y, args.batch_size))

    summary["losses"] = train(network, train_x, train_y, args.steps, args.batch_size, args.lr, args.seed + 2,
                              args.log_interval, log, "train (ACmix)")
    summary["val_accuracy"] = accuracy(network, val_x, val_y, args.batch_size)
    print(f"validation accuracy: {summary['val_accuracy_before']:.3f} before the replacement, "
          f"{summary['val_accuracy_converted']:.3f} right after it, {summary['val_accuracy']:.3f} after "
          f"{args.steps} steps with ACmix")

    mindir = os.path.join(args.output_dir, "backbone_acmix.mindir")
    difference = export_and_check(network, probe, mindir)
    summary["mindir_max_abs_diff"] = difference
    with open(os.path.join(args.output_dir, "summary.json"), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=1)
    if not os.path.isfile(mindir):
        print(f"error: the exported MINDIR differs from the network by {difference:.3e}; not kept", file=sys.stderr)
        return 1
    print(f"exported {mindir}; reloaded output max |diff| vs the network: {difference:.3e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
