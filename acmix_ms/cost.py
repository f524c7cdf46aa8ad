"""Per-stage cost of convolution, self-attention and ACmix (paper Table 1).

All FLOPs are multiply-accumulates (MACs), as the paper counts them, for one layer with C input and
output channels on an H x W map (stride 1). Stage I is the 1x1 projection(s); Stage II the
aggregation (shift-and-sum, attention products) and, for ACmix, the light fc and the group conv.
"""
from .validation import check_divisible, check_odd, check_positive_int


def stage_costs(channels: int, kernel_conv: int = 3, kernel_att: int = 7, num_heads: int = 4, height: int = 56,
                width: int = 56) -> dict:
    """Table 1 for one layer.

    Returns:
        dict ``{module: {"stage1": (macs, params), "stage2": (macs, params)}}`` for
        ``"convolution"``, ``"self_attention"`` and ``"acmix"``.
    """
    check_positive_int("channels", channels)
    check_odd("kernel_conv", kernel_conv)
    check_odd("kernel_att", kernel_att)
    check_divisible("channels", channels, "num_heads", num_heads)
    c, kc2, ka2, n, hw = channels, kernel_conv ** 2, kernel_att ** 2, num_heads, height * width
    return {
        # k_c^2 1x1 convs (Eq. 6), then shift-and-sum (Eq. 7-8): additions only, counted as k_c^2 C per pixel.
        "convolution": {"stage1": (kc2 * c * c * hw, kc2 * c * c), "stage2": (kc2 * c * hw, 0)},
        # q, k, v projections (Eq. 11); q.k and A.v over k_a^2 neighbours (Eq. 12).
        "self_attention": {"stage1": (3 * c * c * hw, 3 * c * c), "stage2": (2 * ka2 * c * hw, 0)},
        # shared projections; attention + shift-sum, plus fc (3N -> k_c^2 per channel of a head: 3 k_c^2 C)
        # and the k_c x k_c group conv with k_c^2 inputs per output (k_c^4 C).
        "acmix": {"stage1": (3 * c * c * hw, 3 * c * c),
                  "stage2": ((kc2 + 2 * ka2) * c * hw + (3 * kc2 + kc2 * kc2) * c * hw,
                             3 * kc2 * n + kc2 * kc2 * c)},
    }


def format_table(costs, unit=1e6):
    """Table 1 as text: MACs and params per stage with each stage's share of the module."""
    lines = [f"{'module':<15}{'stage':<7}{'MACs(M)':>12}{'share':>8}{'params(K)':>12}{'share':>8}"]
    for module, stages in costs.items():
        total_macs = sum(v[0] for v in stages.values()) or 1
        total_params = sum(v[1] for v in stages.values()) or 1
        for stage, (macs, params) in stages.items():
            lines.append(f"{module:<15}{stage:<7}{macs / unit:>12.2f}{100 * macs / total_macs:>7.0f}%"
                         f"{params / 1e3:>12.1f}{100 * params / total_params:>7.0f}%")
    return "\n".join(lines)
