"""Paper Table 1: MACs and parameters per stage of convolution, self-attention and ACmix.

Prints (and with ``--out`` writes as markdown):
1. the per-layer figures of ``acmix_ms.cost.stage_costs`` for the given C, k_c, k_a, N, H, W;
2. their sums over the 16 3x3 layers of ResNet-50 (C = 64/128/256/512 at 56/28/14/7, blocks [3, 4, 6, 3])
   beside the paper's ResNet-50 column;
3. optionally (``--structural``) the same sums counted by ``models.profile`` on real Cells (a 3x3
   nn.Conv2d, ACmixLocal with rate_mode='attention', ACmixLocal), as a cross-check of the formulas.

Strided layers (first block of stages 2-4, ResNet v1.5: stride 2 in the 3x3 layer): convolution is
counted at the output resolution; the 1x1 projections of self-attention / ACmix (Stage I) at the input
resolution, where they run; Stage II at the output resolution.

    python tools/table1.py --out docs/table1.md
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from acmix_ms.cost import format_table, stage_costs  # noqa: E402

MODULES = ("convolution", "self_attention", "acmix")
STAGES = ("stage1", "stage2")
STAGE_NAMES = {"stage1": "I", "stage2": "II"}
# ResNet-50 3x3 layers: (width C, output resolution, number of blocks); the first block of stages 2-4 has stride 2.
RESNET50_STAGES = ((64, 56, 3), (128, 28, 4), (256, 14, 6), (512, 7, 3))
# The paper's Table 1, ResNet-50 column (Pan et al., CVPR 2022): (GMACs, share %, params M, share %).
PAPER_RESNET50 = {
    ("convolution", "stage1"): (1.9, 99, 11.3, 100), ("convolution", "stage2"): (0.1, 1, 0.0, 0),
    ("self_attention", "stage1"): (1.0, 83, 3.8, 100), ("self_attention", "stage2"): (0.2, 17, 0.0, 0),
    ("acmix", "stage1"): (1.0, 73, 3.8, 92), ("acmix", "stage2"): (0.4, 27, 0.3, 8),
}


def resnet50_layers():
    """(C, input size, stride) of each 3x3 layer of ResNet-50, in order."""
    layers = []
    for index, (channels, out_size, blocks) in enumerate(RESNET50_STAGES):
        for block in range(blocks):
            stride = 2 if index > 0 and block == 0 else 1
            layers.append((channels, out_size * stride, stride))
    return layers


def resnet50_sums(kernel_conv=3, kernel_att=7, num_heads=4):
    """{(module, stage): [macs, params]} summed over ResNet-50's 3x3 layers (see the module docstring)."""
    sums = {(m, s): [0, 0] for m in MODULES for s in STAGES}
    for channels, size, stride in resnet50_layers():
        out = size // stride
        at_in = stage_costs(channels, kernel_conv, kernel_att, num_heads, size, size)
        at_out = stage_costs(channels, kernel_conv, kernel_att, num_heads, out, out)
        for module in MODULES:
            stage1 = at_out if module == "convolution" else at_in
            for stage, source in (("stage1", stage1), ("stage2", at_out)):
                macs, params = source[module][stage]
                sums[(module, stage)][0] += macs
                sums[(module, stage)][1] += params
    return sums


def structural_sums(kernel_conv=3, kernel_att=7, num_heads=4):
    """{module: (macs, params)} of real Cells over ResNet-50's 3x3 layers, counted by models.profile."""
    from mindspore import nn
    from acmix_ms import ACmixLocal
    from models.profile import count_macs, count_params

    def build(module, channels, stride):
        if module == "convolution":
            return nn.Conv2d(channels, channels, kernel_conv, stride=stride, pad_mode="pad",
                             padding=kernel_conv // 2)
        rate_mode = "attention" if module == "self_attention" else "learnable"
        return ACmixLocal(channels, channels, kernel_att, num_heads, kernel_conv, stride=stride,
                          rate_mode=rate_mode)

    sums = {m: [0, 0] for m in MODULES}
    cache = {}
    for channels, size, stride in resnet50_layers():
        for module in MODULES:
            key = (module, channels, size, stride)
            if key not in cache:
                cell = build(module, channels, stride)
                cache[key] = (count_macs(cell, (1, channels, size, size)), count_params(cell))
            sums[module][0] += cache[key][0]
            sums[module][1] += cache[key][1]
    return sums


def _share(value, total):
    return 100.0 * value / total if total else 0.0


def markdown(args, layer_costs, sums, structural=None):
    lines = [f"### One layer: C={args.channels}, k_c={args.kernel_conv}, k_a={args.kernel_att}, "
             f"N={args.num_heads}, {args.height}x{args.width}", "", "```", format_table(layer_costs), "```", "",
             f"### Sum over the 16 3x3 layers of ResNet-50 (k_c={args.kernel_conv}, k_a={args.kernel_att}, "
             f"N={args.num_heads})", "",
             "| module | stage | GMACs (ours) | share | GMACs (paper) | share | params M (ours) | share "
             "| params M (paper) | share |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for module in MODULES:
        total_macs = sum(sums[(module, s)][0] for s in STAGES)
        total_params = sum(sums[(module, s)][1] for s in STAGES)
        for stage in STAGES:
            macs, params = sums[(module, stage)]
            p_macs, p_mshare, p_params, p_pshare = PAPER_RESNET50[(module, stage)]
            lines.append(f"| {module} | {STAGE_NAMES[stage]} "
                         f"| {macs / 1e9:.3f} | {_share(macs, total_macs):.0f}% | {p_macs:.1f} | {p_mshare}% "
                         f"| {params / 1e6:.3f} | {_share(params, total_params):.0f}% | {p_params:.1f} "
                         f"| {p_pshare}% |")
    if structural:
        lines += ["", "### Cross-check: the same 16 layers built as Cells and counted by `models/profile.py`", "",
                  "| module | Cell | GMACs (Table 1 formulas, I+II) | GMACs (counted) | params M (formulas) "
                  "| params M (counted) |", "|---|---|---|---|---|---|"]
        cells = {"convolution": "nn.Conv2d 3x3 (no bias)",
                 "self_attention": "ACmixLocal(rate_mode='attention')", "acmix": "ACmixLocal"}
        for module in MODULES:
            f_macs = sum(sums[(module, s)][0] for s in STAGES)
            f_params = sum(sums[(module, s)][1] for s in STAGES)
            lines.append(f"| {module} | {cells[module]} | {f_macs / 1e9:.3f} | {structural[module][0] / 1e9:.3f} "
                         f"| {f_params / 1e6:.3f} | {structural[module][1] / 1e6:.3f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--kernel_conv", type=int, default=3)
    parser.add_argument("--kernel_att", type=int, default=7)
    parser.add_argument("--num_heads", type=int, default=4)
    parser.add_argument("--height", type=int, default=56)
    parser.add_argument("--width", type=int, default=56)
    parser.add_argument("--structural", action="store_true",
                        help="also count real Cells with models.profile (one PyNative forward per layer shape)")
    parser.add_argument("--out", default=None, help="write the tables as markdown to this file")
    args = parser.parse_args(argv)
    layer_costs = stage_costs(args.channels, args.kernel_conv, args.kernel_att, args.num_heads, args.height,
                              args.width)
    sums = resnet50_sums(args.kernel_conv, args.kernel_att, args.num_heads)
    structural = structural_sums(args.kernel_conv, args.kernel_att, args.num_heads) if args.structural else None
    text = markdown(args, layer_costs, sums, structural)
    print(text)
    if args.out:
        write_doc(args.out, text)


def write_doc(path, text):
    from benchmarks.common import environment, environment_markdown
    header = ["# Table 1: cost per stage of convolution, self-attention and ACmix", "",
              "Generated by `tools/table1.py` from `acmix_ms.cost.stage_costs` (MACs = multiply-accumulates, as "
              "the paper counts FLOPs). Paper figures: Table 1 of the paper, ResNet-50 column.", "",
              "Conventions: Table 1's formulas count the convolution's shift-and-sum (k_c^2 C per pixel) as "
              "operations although they are additions; ACmix's Stage II = attention products "
              "(k_c^2 + 2 k_a^2) C + fc 3 k_c^2 C + group conv k_c^4 C. Strided layers: convolution at the output "
              "resolution, Stage I of self-attention/ACmix at the input resolution, Stage II at the output "
              "resolution.", "", environment_markdown(environment()), "", text, ""]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(header))


if __name__ == "__main__":
    main()
