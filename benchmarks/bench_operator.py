"""Operator benchmark (paper Table 7 and the cost of one ACmix layer), graph mode, one run.

Measures, at ResNet-like shapes (C = 64/128/256/512 at 56/28/14/7 px, N = 4 heads so d = C/4, batch 8):

- shift-and-sum, ``acmix_ms.ShiftConv`` with impl 'tensor' (explicit shifts), 'fixed' (frozen group
  conv) and 'learnable' (trainable group conv): input (B, 9d, H, W) -> (B, C, H, W);
- one layer on (B, C, H, W) -> (B, C, H, W): a plain 3x3 convolution, ``ACmixLocal`` (k_a 7, k_c 3) and its
  attention path alone (``rate_mode='attention'``).

For each: forward and forward+backward (gradients of sum(output) w.r.t. the input and every trainable
parameter) times after warm-up (median and interquartile range over the repeats), images/s, the process's
peak RSS while the case ran, and the ratios between implementations measured in this same run.

    python benchmarks/bench_operator.py --device_target CPU --out docs/benchmarks_operator.md
    python benchmarks/bench_operator.py --quick        # two shapes, fewer repeats
"""
import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from mindspore import nn, ops, ParameterTuple, Tensor  # noqa: E402

from acmix_ms import ACmixLocal, ShiftConv  # noqa: E402
from benchmarks.common import PeakRSS, environment, environment_markdown, summarize, time_calls  # noqa: E402
from engine.runtime import setup_context  # noqa: E402
from models.profile import count_params  # noqa: E402

SHAPES = ((64, 56), (128, 28), (256, 14), (512, 7))
QUICK_SHAPES = ((128, 28), (512, 7))
SHIFT_IMPLS = ("tensor", "fixed", "learnable")
LAYERS = ("conv3x3", "acmix", "attention")
NUM_HEADS = 4
KERNEL_CONV = 3
KERNEL_ATT = 7


class SumOfOutput(nn.Cell):
    """sum(net(x)): a scalar whose gradient runs the whole backward pass of ``net``."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def construct(self, x):
        return self.net(x).sum()


class ForwardBackward(nn.Cell):
    """(sum(net(x)), gradients w.r.t. x and every trainable parameter of ``net``).

    The loss is returned too: without it the compiler may drop the forward pass of layers whose
    gradients do not need their output (e.g. a convolution), and 'forward+backward' would time less.
    """

    def __init__(self, net):
        super().__init__()
        self.loss = SumOfOutput(net)
        self.weights = ParameterTuple(net.trainable_params())
        self.has_weights = len(self.weights) > 0
        self.grad_inputs = ops.GradOperation(get_all=True)
        self.grad_all = ops.GradOperation(get_all=True, get_by_list=True)

    def construct(self, x):
        loss = self.loss(x)
        if self.has_weights:
            return loss, self.grad_all(self.loss, self.weights)(x)
        return loss, self.grad_inputs(self.loss)(x)


def build_shift(impl, channels):
    head_dim = channels // NUM_HEADS
    return ShiftConv(head_dim, KERNEL_CONV, channels, impl), head_dim * KERNEL_CONV ** 2


def build_layer(kind, channels, attention_impl="unfold"):
    if kind == "conv3x3":
        return nn.Conv2d(channels, channels, 3, pad_mode="pad", padding=1, has_bias=False), channels
    rate_mode = "attention" if kind == "attention" else "learnable"
    return ACmixLocal(channels, channels, KERNEL_ATT, NUM_HEADS, KERNEL_CONV, rate_mode=rate_mode,
                      attention_impl=attention_impl), channels


# MindSpore 2.8 CPU: the 5th call of the compiled gradient of ShiftConv(impl='tensor') on a 7x7 map never
# returns (seen for d=8, B=2 and d=128, B=8; 14x14 and larger are fine). Such cases make at most 4 calls.
HANGING_BACKWARD_CALLS = 4


def backward_hangs(impl, size):
    return impl == "tensor" and size <= 7


def run_case(net, in_channels, size, batch, warmup, repeats, max_seconds, max_backward_calls=None):
    """Forward and forward+backward statistics of ``net`` on a (batch, in_channels, size, size) input.

    ``max_backward_calls`` caps warm-up + timed forward+backward calls (see ``HANGING_BACKWARD_CALLS``).
    """
    x = Tensor(np.random.default_rng(0).standard_normal((batch, in_channels, size, size)).astype(np.float32))
    net.set_train(False)
    result = {"params": count_params(net)}
    with PeakRSS() as memory:
        result["forward"] = summarize(time_calls(net, (x,), warmup, repeats, max_seconds))
        net.set_train(True)
        backward_repeats = repeats if max_backward_calls is None else max(1, min(repeats, max_backward_calls - warmup))
        result["backward"] = summarize(time_calls(ForwardBackward(net), (x,), warmup, backward_repeats,
                                                  max_seconds))
    result["peak_rss_mib"] = memory.peak_mib
    result["rss_increase_mib"] = memory.increase_mib
    return result


def _ms(stats):
    return f"{1e3 * stats['median']:.1f} [{1e3 * stats['p25']:.1f}–{1e3 * stats['p75']:.1f}] n={stats['n']}"


def _throughput(stats, batch):
    return f"{batch / stats['median']:.0f}"


def _ratio(slow, fast, mode):
    return slow[mode]["median"] / fast[mode]["median"]


def _geomean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _measurement_row(channels, size, name, result, batch):
    """| C | H=W | name | params | forward ms | img/s | fwd+bwd ms | img/s | peak RSS MiB (+rise) |"""
    r = result
    return (f"| {channels} | {size} | {name} | {r['params']} | {_ms(r['forward'])} "
            f"| {_throughput(r['forward'], batch)} | {_ms(r['backward'])} "
            f"| {_throughput(r['backward'], batch)} | {r['peak_rss_mib']:.0f} (+{r['rss_increase_mib']:.0f}) |")


def results_markdown(shift_results, layer_results, shapes, batch, attention_impl="unfold"):
    lines = ["## Shift-and-sum (`ShiftConv`, paper Table 7)", "",
             f"Input (B={batch}, 9d, H, W), d = C/{NUM_HEADS}; output (B, C, H, W). Times in ms: median "
             "[25th–75th percentile] n=timed calls.", "",
             "| C | H=W | impl | params | forward ms | img/s | fwd+bwd ms | img/s | peak RSS MiB (+rise) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for channels, size in shapes:
        for impl in SHIFT_IMPLS:
            lines.append(_measurement_row(channels, size, impl, shift_results[(channels, size)][impl], batch))
    if any(backward_hangs("tensor", size) for _, size in shapes):
        lines += ["", f"'tensor' forward+backward on 7x7 maps: at most {HANGING_BACKWARD_CALLS} calls (warm-up "
                  "included), because the 5th call of that compiled gradient never returns on MindSpore 2.8 CPU."]
    lines += ["", "Speed-up of the group convolution over explicit tensor shifts (time of 'tensor' / time of "
              "the group conv; > 1: group conv faster; paper, GPU: 1.34x):", "",
              "| C | H=W | tensor/fixed fwd | tensor/learnable fwd | tensor/fixed fwd+bwd | tensor/learnable fwd+bwd |",
              "|---|---|---|---|---|---|"]
    columns = [(impl, mode) for mode in ("forward", "backward") for impl in ("fixed", "learnable")]
    ratios = {col: [] for col in columns}
    for channels, size in shapes:
        r = shift_results[(channels, size)]
        cells = []
        for impl, mode in columns:
            value = _ratio(r["tensor"], r[impl], mode)
            ratios[(impl, mode)].append(value)
            cells.append(f"{value:.2f}x")
        lines.append(f"| {channels} | {size} | " + " | ".join(cells) + " |")
    lines.append("| geometric mean | | " + " | ".join(f"{_geomean(ratios[c]):.2f}x" for c in columns) + " |")

    lines += ["", "## One layer: 3x3 convolution vs ACmixLocal vs its attention path alone", "",
              f"Input and output (B={batch}, C, H, W); ACmixLocal with k_a={KERNEL_ATT}, k_c={KERNEL_CONV}, "
              f"N={NUM_HEADS}, learnable group-conv shift and rates, attention_impl='{attention_impl}'; "
              "'attention' = `rate_mode='attention'`.", "",
              "| C | H=W | layer | params | forward ms | img/s | fwd+bwd ms | img/s | peak RSS MiB (+rise) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for channels, size in shapes:
        for kind in LAYERS:
            lines.append(_measurement_row(channels, size, kind, layer_results[(channels, size)][kind], batch))
    pairs = [("acmix", "conv3x3"), ("acmix", "attention"), ("attention", "conv3x3")]
    lines += ["", "Time ratios (slower / faster as named):", "",
              "| C | H=W | " + " | ".join(f"{a}/{b} fwd | {a}/{b} fwd+bwd" for a, b in pairs) + " |",
              "|---|---|" + "---|" * (2 * len(pairs))]
    layer_ratios = {(a, b, m): [] for a, b in pairs for m in ("forward", "backward")}
    for channels, size in shapes:
        r = layer_results[(channels, size)]
        cells = []
        for a, b in pairs:
            for mode in ("forward", "backward"):
                value = _ratio(r[a], r[b], mode)
                layer_ratios[(a, b, mode)].append(value)
                cells.append(f"{value:.2f}x")
        lines.append(f"| {channels} | {size} | " + " | ".join(cells) + " |")
    lines.append("| geometric mean | | " + " | ".join(
        f"{_geomean(layer_ratios[(a, b, m)]):.2f}x" for a, b in pairs for m in ("forward", "backward")) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device_target", default="CPU", help="CPU, GPU or Ascend")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per case (the first compiles)")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per case (at most)")
    parser.add_argument("--max_seconds", type=float, default=15.0,
                        help="stop timing a case after 3 calls once its timed calls took this long")
    parser.add_argument("--attention_impl", default="unfold",
                        help="ACmixLocal attention_impl ('unfold' = the layer's default, 'lean' where available)")
    parser.add_argument("--quick", action="store_true", help=f"shapes {QUICK_SHAPES}, 1 warm-up, 3 timed calls")
    parser.add_argument("--out", default=None, help="write the results as markdown to this file")
    args = parser.parse_args(argv)
    if args.batch < 1:
        raise ValueError(f"--batch must be a positive integer, got {args.batch}")
    setup_context("graph", args.device_target)
    env = environment(args.device_target)  # taken before the run: the load average reflects other users
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.warmup < 1 or args.repeats < 1 or args.max_seconds <= 0:
        raise ValueError("--warmup and --repeats must be >= 1 and --max_seconds > 0")
    warmup, repeats = (1, 3) if args.quick else (args.warmup, args.repeats)

    shift_results, layer_results = {}, {}
    done = []
    for channels, size in shapes:
        timing = (size, args.batch, warmup, repeats, args.max_seconds)
        shift_results[(channels, size)] = {}
        for impl in SHIFT_IMPLS:
            cap = HANGING_BACKWARD_CALLS if backward_hangs(impl, size) else None
            result = run_case(*build_shift(impl, channels), *timing, max_backward_calls=cap)
            shift_results[(channels, size)][impl] = result
            _report(f"shift {impl}", channels, size, result)
        layer_results[(channels, size)] = {}
        for kind in LAYERS:
            result = run_case(*build_layer(kind, channels, args.attention_impl), *timing)
            layer_results[(channels, size)][kind] = result
            _report(kind, channels, size, result)
        done.append((channels, size))
        text = results_markdown(shift_results, layer_results, done, args.batch, args.attention_impl)
        if args.out:  # after every shape, so an interrupted run still leaves its results
            write_report(args.out, text, env, args, warmup, repeats, complete=len(done) == len(shapes))
    print(text)


def write_report(path, text, env, args, warmup, repeats, complete):
    env_now = environment(args.device_target)
    header = ["# Operator benchmark", "",
              f"Generated by `benchmarks/bench_operator.py` (graph mode, float32, {warmup} warm-up call(s) "
              f"(the first compiles) + up to {repeats} timed calls per case, at least 3, stopping once the timed "
              f"calls took {args.max_seconds:g} s; forward+backward = gradients of sum(output) w.r.t. the input "
              "and all trainable parameters).", "", environment_markdown(env),
              f"- Load average (1/5/15 min) when these results were written ({env_now['date']}): "
              f"{', '.join(f'{v:.2f}' for v in env_now['load_average'])}", ""]
    if not complete:
        header += ["**Partial results: the run had not finished all shapes when this was written.**", ""]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(header) + "\n" + text + "\n")


def _report(name, channels, size, result):
    print(f"{name:>10} C={channels:<4} {size:>2}px  fwd {_ms(result['forward'])} ms  "
          f"fwd+bwd {_ms(result['backward'])} ms  peak RSS {result['peak_rss_mib']:.0f} MiB",
          file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
