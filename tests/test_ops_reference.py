"""Self-checks of the NumPy references in numpy_reference.py.

Each reference is compared with a second, independently written formulation (vectorised with np.pad /
sliding windows instead of explicit index loops), or with a property that follows from the paper's
definitions (shift direction, Eqs. 1-8 equivalence, softmax over a single neighbour, Swin mask locality).
No MindSpore here: these tests make the references trustworthy before they judge acmix_ms.
"""
import zlib

import numpy as np
import pytest

import numpy_reference as ref


def rng_for(*key):
    """A generator seeded by the test's own key (stable across processes, unlike hash())."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def conv2d_im2col(x, weight, stride=1, padding=0, groups=1, pad_mode="constant"):
    """Second convolution implementation: np.pad + sliding_window_view + einsum (independent of the loops)."""
    x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)), mode=pad_mode)
    kernel_h, kernel_w = weight.shape[2:]
    windows = np.lib.stride_tricks.sliding_window_view(x, (kernel_h, kernel_w), axis=(2, 3))
    windows = windows[:, :, ::stride, ::stride]  # (B, Cin, Ho, Wo, kh, kw)
    out_channels, in_per_group = weight.shape[:2]
    out_per_group = out_channels // groups
    outs = []
    for group in range(groups):
        part = windows[:, group * in_per_group:(group + 1) * in_per_group]
        kernel = weight[group * out_per_group:(group + 1) * out_per_group]
        outs.append(np.einsum("bchwuv,ocuv->bohw", part, kernel))
    return np.concatenate(outs, axis=1)


# ---------------------------------------------------------------------------------------------- convolution
@pytest.mark.parametrize("stride,groups,padding", [(1, 1, 1), (2, 1, 1), (1, 3, 2), (2, 3, 0)])
def test_direct_conv_matches_im2col(stride, groups, padding):
    rng = rng_for("conv", stride, groups, padding)
    x = rng.standard_normal((2, 6, 7, 5))
    weight = rng.standard_normal((9, 6 // groups, 3, 3))
    expected = conv2d_im2col(x, weight, stride, padding, groups)
    np.testing.assert_allclose(ref.conv2d_direct(x, weight, None, stride, padding, groups), expected, atol=1e-12)


def test_shift_kernels_are_one_hot():
    weight = ref.shift_kernels(6, 5)
    assert weight.shape == (6, 25, 5, 5)
    np.testing.assert_array_equal(weight.sum(axis=(2, 3)), np.ones((6, 25)))
    for p in range(25):
        assert weight[0, p, p // 5, p % 5] == 1.0


def test_shift_direction_of_top_left_tap():
    """Kernel tap (0, 0) of a cross-correlation reads f[i-1, j-1]: a delta moves down-right (Eq. 14)."""
    maps = np.zeros((1, 9, 6, 7))
    maps[0, 0, 2, 3] = 1.0  # head channel j=0, tap p=0
    out = ref.tensor_shift_sum(maps, 3, 1)
    expected = np.zeros((1, 1, 6, 7))
    expected[0, 0, 3, 4] = 1.0
    np.testing.assert_array_equal(out, expected)
    # and the delta leaves the map (zero fill) when shifted over the border
    maps[...] = 0.0
    maps[0, 0, 5, 6] = 1.0
    assert not ref.tensor_shift_sum(maps, 3, 1).any()


@pytest.mark.parametrize("kernel_size,stride,size", [(3, 1, (7, 6)), (3, 2, (7, 5)), (5, 1, (6, 6)), (5, 2, (9, 8))])
def test_tensor_shift_equals_fixed_group_conv(kernel_size, stride, size):
    head_dim, out_channels = 3, 6
    rng = rng_for("shift", kernel_size, stride, size)
    maps = rng.standard_normal((2, head_dim * kernel_size ** 2) + size)
    shifted = ref.tensor_shift_sum(maps, kernel_size, out_channels, stride)
    assert shifted.shape == (2, out_channels, -(-size[0] // stride), -(-size[1] // stride))
    weight = ref.shift_kernels(out_channels, kernel_size)
    conv = conv2d_im2col(maps, weight, stride, kernel_size // 2, groups=head_dim)
    np.testing.assert_allclose(shifted, conv, atol=1e-12)
    np.testing.assert_allclose(ref.shift_conv(maps, kernel_size, out_channels, "fixed", weight, stride), conv,
                               atol=1e-12)


@pytest.mark.parametrize("layout", ["resnet", "san"])
@pytest.mark.parametrize("kernel_size,stride", [(3, 1), (3, 2), (5, 1)])
def test_conv_path_equals_one_dense_convolution(layout, kernel_size, stride):
    """Projection + fc + fixed shift == one k x k conv of the input (Eqs. 1-8), zero biases."""
    rng = rng_for("dense", layout, kernel_size, stride)
    in_channels, head_dim = 5, 2
    num_groups = 3 * 3 if layout == "resnet" else 2 + 4  # 3N with N=3, or SAN's q, k, 4 v groups
    out_channels = 3 * head_dim if layout == "resnet" else 4 * head_dim
    x = rng.standard_normal((2, in_channels, 7, 6))
    projection = rng.standard_normal((num_groups * head_dim, in_channels, 1, 1))
    params = {"fc.weight": rng.standard_normal((kernel_size ** 2, num_groups, 1, 1)),
              "dep_conv.weight": ref.shift_kernels(out_channels, kernel_size)}
    projected = ref.conv1x1(x, projection)
    path = ref.conv_path(projected, num_groups, params, kernel_size, out_channels, "fixed", stride)
    dense_weight = ref.dense_conv_weight(projection, params["fc.weight"], params["dep_conv.weight"], head_dim)
    np.testing.assert_allclose(path, conv2d_im2col(x, dense_weight, stride, kernel_size // 2), atol=1e-10)
    # the tensor-shift implementation gives the same path
    np.testing.assert_allclose(ref.conv_path(projected, num_groups, params, kernel_size, out_channels, "tensor",
                                             stride), path, atol=1e-10)
    # the construction also holds for learned (non-shift) group-conv kernels
    params["dep_conv.weight"] = rng.standard_normal(params["dep_conv.weight"].shape)
    path = ref.conv_path(projected, num_groups, params, kernel_size, out_channels, "learnable", stride)
    dense_weight = ref.dense_conv_weight(projection, params["fc.weight"], params["dep_conv.weight"], head_dim)
    np.testing.assert_allclose(path, conv2d_im2col(x, dense_weight, stride, kernel_size // 2), atol=1e-10)


def test_dense_equivalence_needs_zero_biases():
    """With an fc bias the shifted maps are zero-filled but a conv of the input is not: borders differ only."""
    rng = rng_for("bias")
    x = rng.standard_normal((1, 4, 6, 6))
    projection = rng.standard_normal((6 * 2, 4, 1, 1))
    params = {"fc.weight": rng.standard_normal((9, 6, 1, 1)), "fc.bias": rng.standard_normal(9),
              "dep_conv.weight": ref.shift_kernels(4, 3)}
    path = ref.conv_path(ref.conv1x1(x, projection), 6, params, 3, 4, "fixed")
    dense_weight = ref.dense_conv_weight(projection, params["fc.weight"], params["dep_conv.weight"], 2)
    conv = conv2d_im2col(x, dense_weight, 1, 1)
    difference = path - conv
    assert np.abs(difference[..., 1:-1, 1:-1] - difference[..., 2:3, 2:3]).max() < 1e-10  # interior: constant
    assert np.abs(difference[..., 0, :] - difference[..., 2:3, 2]).max() > 1e-3  # border: bias taps missing


# ------------------------------------------------------------------------------------------- local attention
def local_attention_vectorised(q, k, v, pe, num_heads, kernel_att, stride, dilation):
    """Second formulation: reflect-pad with np.pad, gather the k_att^2 shifted views, softmax on an axis."""
    batch, channels, height, width = q.shape
    head_dim = channels // num_heads
    pad = dilation * (kernel_att // 2)
    widths = ((0, 0), (0, 0), (pad, pad), (pad, pad))
    k_pad, v_pad = np.pad(k, widths, mode="reflect"), np.pad(v, widths, mode="reflect")
    pe_pad = np.pad(pe[None], widths, mode="reflect")[0]
    q_s = q[:, :, ::stride, ::stride] * head_dim ** -0.5
    pe_centre = pe[:, ::stride, ::stride]
    out_h, out_w = q_s.shape[2:]
    logits, values = [], []
    for a in range(kernel_att):
        for b in range(kernel_att):
            rows = slice(a * dilation, a * dilation + stride * (out_h - 1) + 1, stride)
            cols = slice(b * dilation, b * dilation + stride * (out_w - 1) + 1, stride)
            key = k_pad[:, :, rows, cols] + np.tile(pe_centre - pe_pad[:, rows, cols], (num_heads, 1, 1))
            logits.append((q_s * key).reshape(batch, num_heads, head_dim, out_h, out_w).sum(2))
            values.append(v_pad[:, :, rows, cols].reshape(batch, num_heads, head_dim, out_h, out_w))
    weights = ref.softmax(np.stack(logits), axis=0)
    out = (weights[:, :, :, None] * np.stack(values)).sum(0)
    return out.reshape(batch, channels, out_h, out_w)


@pytest.mark.parametrize("kernel_att,stride,dilation,size", [(3, 1, 1, (5, 6)), (5, 2, 1, (7, 6)),
                                                             (3, 2, 2, (7, 7)), (7, 1, 1, (4, 5))])
def test_local_attention_loops_match_vectorised(kernel_att, stride, dilation, size):
    rng = rng_for("local", kernel_att, stride, dilation, size)
    q, k, v = (rng.standard_normal((2, 6) + size) for _ in range(3))
    pe = rng.standard_normal((3,) + size)
    out = ref.local_attention(q, k, v, pe, 2, kernel_att, stride, dilation)
    assert out.shape == (2, 6, -(-size[0] // stride), -(-size[1] // stride))
    np.testing.assert_allclose(out, local_attention_vectorised(q, k, v, pe, 2, kernel_att, stride, dilation),
                               atol=1e-12)


def test_local_attention_single_neighbour_returns_values():
    rng = rng_for("k1")
    q, k, v = (rng.standard_normal((1, 4, 5, 5)) for _ in range(3))
    pe = rng.standard_normal((2, 5, 5))
    np.testing.assert_allclose(ref.local_attention(q, k, v, pe, 2, 1, stride=2), v[:, :, ::2, ::2], atol=1e-12)


def test_local_attention_corner_pixel_by_hand():
    """At (0, 0) with k_att=3 the reflected neighbourhood rows/cols are (1, 0, 1)."""
    rng = rng_for("corner")
    q, k, v = (rng.standard_normal((1, 2, 4, 4)) for _ in range(3))
    pe = rng.standard_normal((2, 4, 4))
    scale = 2 ** -0.5
    neighbours = [(r, c) for r in (1, 0, 1) for c in (1, 0, 1)]
    logits = np.array([q[0, :, 0, 0] * scale @ (k[0, :, r, c] + pe[:, 0, 0] - pe[:, r, c]) for r, c in neighbours])
    expected = sum(w * v[0, :, r, c] for w, (r, c) in zip(ref.softmax(logits), neighbours))
    np.testing.assert_allclose(ref.local_attention(q, k, v, pe, 1, 3)[0, :, 0, 0], expected, atol=1e-12)


def test_local_reflection_rejects_too_small_maps():
    x = np.zeros((1, 2, 3, 3))
    with pytest.raises(ValueError, match="reflection padding needs the pad to be smaller than the size 3"):
        ref.local_attention(x, x, x, np.zeros((2, 3, 3)), 1, 7)


def test_position_grid_orientation():
    grid = ref.position_grid(3, 5)
    np.testing.assert_allclose(grid[0, 1], np.linspace(-1, 1, 5))  # x varies along the width
    np.testing.assert_allclose(grid[1, :, 2], np.linspace(-1, 1, 3))  # y varies along the height


def test_acmix_local_conv_p_bias_cancels():
    """pe_centre - pe_neighbour removes the conv_p bias (reflected neighbours carry the same bias)."""
    rng = rng_for("cancel")
    params = {"qkv.weight": rng.standard_normal((12, 3, 1, 1)), "qkv.bias": rng.standard_normal(12),
              "conv_p.weight": rng.standard_normal((2, 2, 1, 1)), "conv_p.bias": rng.standard_normal(2)}
    x = rng.standard_normal((1, 3, 5, 5))
    out = ref.acmix_local(x, params, 2, kernel_att=3, rate_mode="attention")
    params["conv_p.bias"] = params["conv_p.bias"] + 5.0
    np.testing.assert_allclose(ref.acmix_local(x, params, 2, kernel_att=3, rate_mode="attention"), out, atol=1e-12)
    params["conv_p.weight"] = params["conv_p.weight"] * 3.0  # the weight does matter
    assert np.abs(ref.acmix_local(x, params, 2, kernel_att=3, rate_mode="attention") - out).max() > 1e-4


# ------------------------------------------------------------------------------------------ window attention
def window_params(rng, channels, num_heads, window, kernel_conv=3, zero_table=False):
    table = np.zeros(((2 * window - 1) ** 2, num_heads)) if zero_table else \
        rng.standard_normal(((2 * window - 1) ** 2, num_heads))
    return {"qkv.weight": rng.standard_normal((3 * channels, channels)) * 0.5,
            "qkv.bias": rng.standard_normal(3 * channels) * 0.5,
            "proj.weight": rng.standard_normal((channels, channels)), "proj.bias": rng.standard_normal(channels),
            "relative_position_bias_table": table,
            "fc.weight": rng.standard_normal((kernel_conv ** 2, 3 * num_heads, 1, 1)),
            "fc.bias": rng.standard_normal(kernel_conv ** 2),
            "dep_conv.weight": rng.standard_normal((channels, kernel_conv ** 2, kernel_conv, kernel_conv)),
            "rate1": np.array([0.7]), "rate2": np.array([-0.4])}


def test_relative_position_index_is_symmetric_offset():
    index = ref.relative_position_index(3)
    assert index.shape == (9, 9)
    assert index[4, 4] == (3 - 1) * 5 + (3 - 1)  # zero offset is the table's centre
    assert len(np.unique(index)) == 25
    np.testing.assert_array_equal(index + index.T, 2 * index[0, 0] * np.ones((9, 9), int))


def test_whole_map_window_equals_global_acmix():
    """Window = map, shift 0, zero bias table: ACmixWindow == ACmixGlobal with R = 1 (both paths)."""
    rng = rng_for("window-global")
    channels, heads, size = 8, 2, 4
    params = window_params(rng, channels, heads, size, zero_table=True)
    x = rng.standard_normal((2, size, size, channels))
    window_out = ref.acmix_window(x, params, heads, window_size=size)
    global_params = dict(params)
    global_params.update({"q.weight": params["qkv.weight"][:channels], "q.bias": params["qkv.bias"][:channels],
                          "kv.weight": params["qkv.weight"][channels:], "kv.bias": params["qkv.bias"][channels:]})
    global_out = ref.acmix_global(x.reshape(2, size * size, channels), size, size, global_params, heads)
    np.testing.assert_allclose(window_out.reshape(2, -1, channels), global_out, atol=1e-10)


def test_shifted_window_mask_blocks_wrapped_tokens():
    """With shift, token (0, 0) only exchanges information with its own region rows/cols [0, shift)."""
    rng = rng_for("mask")
    channels, heads, size, window, shift = 4, 1, 8, 4, 2
    params = window_params(rng, channels, heads, window)
    params["qkv.weight"] *= 0.3  # keep the softmax away from saturation so every in-window change is visible
    x = rng.standard_normal((1, size, size, channels))
    base = ref.acmix_window(x, params, heads, window, shift, rate_mode="attention")
    x[0, 0, 0] += 3.0
    change = np.abs(ref.acmix_window(x, params, heads, window, shift, rate_mode="attention") - base).max(-1)[0]
    assert change[:shift, :shift].min() > 1e-6
    outside = change.copy()
    outside[:shift, :shift] = 0.0
    assert outside.max() < 1e-20  # masked logits carry exp(-100)
    # without shift the same perturbation reaches the whole first window and nothing else
    base = ref.acmix_window(x, params, heads, window, 0, rate_mode="attention")
    x[0, 0, 0] -= 3.0
    change = np.abs(ref.acmix_window(x, params, heads, window, 0, rate_mode="attention") - base).max(-1)[0]
    assert change[:window, :window].min() > 1e-6 and change[window:].max() == 0 and change[:, window:].max() == 0


def test_conv_on_rolled_map_wraps_around_except_seam():
    """Official quirk: un-rolled, the conv path is a circular conv except at rows/cols shift-1 and shift."""
    rng = rng_for("seam")
    channels, heads, size, window, shift = 4, 2, 8, 4, 2
    params = window_params(rng, channels, heads, window)
    params["fc.bias"] = np.zeros(9)  # a circular conv of the qkv map then equals a wrap-padded conv
    x = rng.standard_normal((1, size, size, channels))
    rolled = ref.acmix_window(x, params, heads, window, shift, rate_mode="conv")
    plain = ref.acmix_window(x, params, heads, window, shift, rate_mode="conv", conv_on_shifted_map=False)
    qkv = ref.dense(x, params["qkv.weight"], params["qkv.bias"]).transpose(0, 3, 1, 2)
    maps = ref.conv_path_maps(qkv, 3 * heads, params["fc.weight"])
    circular = conv2d_im2col(maps, params["dep_conv.weight"], 1, 1, groups=2, pad_mode="wrap").transpose(0, 2, 3, 1)
    zero = conv2d_im2col(maps, params["dep_conv.weight"], 1, 1, groups=2).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(plain, zero, atol=1e-10)
    keep = [i for i in range(size) if i not in (shift - 1, shift)]
    np.testing.assert_allclose(rolled[:, keep][:, :, keep], circular[:, keep][:, :, keep], atol=1e-10)
    assert np.abs(rolled[:, shift] - circular[:, shift]).max() > 1e-3
    assert np.abs(rolled[:, 0] - zero[:, 0]).max() > 1e-3  # wraps: differs from zero padding on the border


def test_window_padding_crops_back():
    """Non-divisible sizes: output has the input size and equals the run on the explicitly padded input."""
    rng = rng_for("pad")
    params = window_params(rng, 4, 2, 3)
    x = rng.standard_normal((1, 5, 4, 4))
    out = ref.acmix_window(x, params, 2, 3, 1)
    assert out.shape == (1, 5, 4, 4)
    padded = np.zeros((1, 6, 6, 4))
    padded[:, :5, :4] = x
    # the padded run differs only in where the wrap-around of the roll lands, so compare shift 0
    np.testing.assert_allclose(ref.acmix_window(x, params, 2, 3, 0),
                               ref.acmix_window(padded, params, 2, 3, 0)[:, :5, :4], atol=1e-12)


# ------------------------------------------------------------------------------------------ global attention
def test_global_attention_is_permutation_equivariant():
    rng = rng_for("perm")
    q, k, v = (rng.standard_normal((2, 7, 6)) for _ in range(3))
    order = rng.permutation(7)
    out = ref.global_attention(q, k, v, 3)
    np.testing.assert_allclose(ref.global_attention(q[:, order], k, v, 3), out[:, order], atol=1e-12)
    np.testing.assert_allclose(ref.global_attention(q, k[:, order], v[:, order], 3), out, atol=1e-12)
    np.testing.assert_allclose(ref.global_attention(q, k, np.ones_like(v), 3), np.ones_like(q), atol=1e-12)


def test_spatial_reduction_is_patch_matmul():
    rng = rng_for("sr")
    channels, ratio, height, width = 4, 2, 6, 4
    params = {"sr.weight": rng.standard_normal((channels, channels, ratio, ratio)),
              "sr.bias": rng.standard_normal(channels), "norm.gamma": np.ones(channels),
              "norm.beta": np.zeros(channels)}
    tokens = rng.standard_normal((2, height * width, channels))
    reduced = ref.spatial_reduction(tokens, height, width, params, ratio)
    patches = tokens.reshape(2, height // ratio, ratio, width // ratio, ratio, channels)
    conv = np.einsum("bhuwvc,ocuv->bhwo", patches, params["sr.weight"]) + params["sr.bias"]
    conv = conv.reshape(2, -1, channels)
    normed = (conv - conv.mean(-1, keepdims=True)) / np.sqrt(conv.var(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(reduced, normed, atol=1e-10)


def test_nearest_resize_repeats_blocks():
    small = np.arange(2 * 2 * 3 * 1, dtype=float).reshape(2, 2, 3, 1)
    expected = np.repeat(np.repeat(small, 2, axis=1), 2, axis=2)
    np.testing.assert_array_equal(ref.nearest_resize(small, 4, 6), expected)


def global_params(rng, channels, heads, ratio):
    params = {"q.weight": rng.standard_normal((channels, channels)), "q.bias": rng.standard_normal(channels),
              "kv.weight": rng.standard_normal((2 * channels, channels)),
              "kv.bias": rng.standard_normal(2 * channels),
              "proj.weight": rng.standard_normal((channels, channels)), "proj.bias": rng.standard_normal(channels),
              "sr.weight": rng.standard_normal((channels, channels, ratio, ratio)),
              "sr.bias": rng.standard_normal(channels), "norm.gamma": rng.standard_normal(channels),
              "norm.beta": rng.standard_normal(channels),
              "fc.weight": rng.standard_normal((9, 3 * heads, 1, 1)), "fc.bias": rng.standard_normal(9),
              "dep_conv.weight": rng.standard_normal((channels, 9, 3, 3)), "rate1": np.array([0.3]),
              "rate2": np.array([1.2])}
    return params


def test_global_prefix_tokens_get_attention_only():
    rng = rng_for("prefix")
    channels, heads = 4, 2
    params = global_params(rng, channels, heads, 1)
    x = rng.standard_normal((2, 1 + 12, channels))
    mixed = ref.acmix_global(x, 3, 4, params, heads, num_prefix_tokens=1)
    attention = ref.acmix_global(x, 3, 4, params, heads, num_prefix_tokens=1, rate_mode="attention")
    conv = ref.acmix_global(x, 3, 4, params, heads, num_prefix_tokens=1, rate_mode="conv")
    np.testing.assert_allclose(mixed[:, 0], 0.3 * attention[:, 0], atol=1e-12)
    assert not conv[:, 0].any() and np.abs(conv[:, 1:]).min() > 0
    np.testing.assert_allclose(mixed[:, 1:], 0.3 * attention[:, 1:] + 1.2 * conv[:, 1:], atol=1e-10)


def test_global_p2_conv_path_sees_blockwise_constant_kv():
    """P2: changing a patch token changes k/v of its whole R x R block only through the reduced tokens."""
    rng = rng_for("p2")
    channels, heads, ratio = 4, 1, 2
    params = global_params(rng, channels, heads, ratio)
    params["fc.weight"][:] = 0.0
    params["fc.bias"][:] = 0.0
    params["fc.weight"][4, 1] = 1.0  # centre tap reads the k group only: conv output = dep centre * k
    params["dep_conv.weight"] = ref.shift_kernels(channels, 3)
    x = rng.standard_normal((1, 16, channels))
    conv = ref.acmix_global(x, 4, 4, params, heads, sr_ratio=ratio, rate_mode="conv").reshape(1, 4, 4, channels)
    # the group conv sums the 9 taps of one map per channel; with one non-zero tap the output is k itself
    np.testing.assert_allclose(conv[:, 0, 0], conv[:, 1, 1], atol=1e-12)
    assert np.abs(conv[:, 0, 0] - conv[:, 2, 2]).max() > 1e-6


# --------------------------------------------------------------------------------------- patchwise attention
def test_aggregation_centre_tap_returns_values_and_shares_channels():
    rng = rng_for("agg")
    v = rng.standard_normal((2, 6, 4, 5))
    weights = np.zeros((2, 3, 9, 4, 5))
    weights[:, :, 4] = 1.0
    np.testing.assert_allclose(ref.patchwise_aggregation(v, weights, 3), v, atol=1e-12)
    weights[:, 1:] = 0.0  # only weight channel 0: value channels 0 and 3 (c mod 3 == 0) survive
    out = ref.patchwise_aggregation(v, weights, 3)
    np.testing.assert_allclose(out[:, [0, 3]], v[:, [0, 3]], atol=1e-12)
    assert not out[:, [1, 2, 4, 5]].any()


def patchwise_params(rng, in_channels, rel, mid, share, kernel_att):
    taps = kernel_att ** 2
    hidden = mid // share
    params = {"qkv.weight": rng.standard_normal((2 * rel + mid, in_channels, 1, 1)),
              "qkv.bias": rng.standard_normal(2 * rel + mid),
              "conv_w.2.weight": rng.standard_normal((hidden, rel * (taps + 1), 1, 1)),
              "conv_w.5.weight": rng.standard_normal((taps * hidden, hidden, 1, 1)),
              "conv_w.5.bias": rng.standard_normal(taps * hidden)}
    for name, width in (("conv_w.0", rel * (taps + 1)), ("conv_w.3", hidden)):
        params.update({name + ".gamma": rng.standard_normal(width), name + ".beta": rng.standard_normal(width),
                       name + ".moving_mean": rng.standard_normal(width),
                       name + ".moving_variance": rng.uniform(0.5, 2.0, width)})
    return params


def test_patchwise_weights_match_vectorised_unfold():
    rng = rng_for("pw")
    rel, mid, share, kernel_att = 2, 4, 2, 3
    params = patchwise_params(rng, 3, rel, mid, share, kernel_att)
    q, k = rng.standard_normal((2, rel, 4, 5)), rng.standard_normal((2, rel, 4, 5))
    weights = ref.patchwise_weights(q, k, params, kernel_att)
    k_pad = np.pad(k, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    unfolded = np.lib.stride_tricks.sliding_window_view(k_pad, (3, 3), axis=(2, 3))  # (B, rel, H, W, 3, 3)
    unfolded = unfolded.transpose(0, 1, 4, 5, 2, 3).reshape(2, rel * 9, 4, 5)  # torch Unfold: c*k^2 + p
    stacked = np.concatenate([q, unfolded], axis=1)

    def bn(t, name):
        mean, var = params[name + ".moving_mean"], params[name + ".moving_variance"]
        return ((t - mean[:, None, None]) / np.sqrt(var[:, None, None] + 1e-5) * params[name + ".gamma"][:, None, None]
                + params[name + ".beta"][:, None, None])
    hidden = np.einsum("oc,bchw->bohw", params["conv_w.2.weight"][:, :, 0, 0], np.maximum(bn(stacked, "conv_w.0"), 0))
    expected = np.einsum("oc,bchw->bohw", params["conv_w.5.weight"][:, :, 0, 0], np.maximum(bn(hidden, "conv_w.3"), 0))
    expected += params["conv_w.5.bias"][:, None, None]
    np.testing.assert_allclose(weights, expected.reshape(2, mid // share, 9, 4, 5), atol=1e-10)


def test_mix_rates_modes():
    att, conv = np.full(3, 2.0), np.full(3, 5.0)
    np.testing.assert_allclose(ref.mix_rates(att, conv, "learnable", params={"rate1": [0.1], "rate2": [1.0]}), 5.2)
    np.testing.assert_allclose(ref.mix_rates(att, conv, "fixed", rates=(1.0, -1.0)), -3.0)
    np.testing.assert_allclose(ref.mix_rates(att, None, "attention"), att)
    np.testing.assert_allclose(ref.mix_rates(None, conv, "conv"), conv)
    with pytest.raises(ValueError, match="rate_mode"):
        ref.mix_rates(att, conv, "sum")
