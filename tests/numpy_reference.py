"""Independent NumPy references of every ACmix computation, written for the tests.

Written from the paper (Eqs. 1-8, 13, 18-20), the behaviour of the official code (github.com/LeapLabTHU/ACmix)
and ``docs/design.md`` only, never from ``acmix_ms``.
Everything runs in float64 with explicit loops where the indexing is the point; it is meant for tiny shapes.

Conventions shared by all modes (kept from the official code, see design.md):
- Fused projection output P has G groups of width d; group g occupies channels ``[g*d, (g+1)*d)``.
  ResNet/Swin/PVT: P = [q; k; v] with channel ``t*C + n*d + j`` so group ``g = t*N + n``;
  SAN: P = [q (rel); k (rel); v (mid)] with d = rel.
- Conv path: ``fc`` mixes the G groups into k^2 maps per group channel j, laid out at channel ``j*k^2 + p``
  (p = row-major kernel position); the group conv has ``groups=d`` so output ``o = j*(Cout/d) + m`` reads
  inputs ``[j*k^2, (j+1)*k^2)``.
- Parameters are passed as dicts keyed by the MindSpore names of design.md (``qkv.weight``, ``fc.weight``,
  ``dep_conv.weight``, ``rate1`` ...).
"""
import numpy as np

RATE_MODES = ("learnable", "fixed", "attention", "conv")
SHIFT_IMPLS = ("tensor", "fixed", "learnable", "random")


# ----------------------------------------------------------------------------------------------------------
# generic helpers
# ----------------------------------------------------------------------------------------------------------
def as64(array):
    """Any array-like -> float64 ndarray."""
    return np.asarray(array, dtype=np.float64)


def reflect_index(index, size):
    """Index into a reflection-padded axis (edge not repeated, as torch ReflectionPad2d / np.pad 'reflect')."""
    if size == 1:
        return 0
    if not -(size - 1) <= index <= 2 * (size - 1):
        raise ValueError(f"reflection padding needs the pad to be smaller than the size {size}, got index {index}")
    if index < 0:
        return -index
    if index >= size:
        return 2 * (size - 1) - index
    return index


def softmax(logits, axis=-1):
    """Numerically stable softmax."""
    shifted = logits - logits.max(axis=axis, keepdims=True)
    weights = np.exp(shifted)
    return weights / weights.sum(axis=axis, keepdims=True)


def conv1x1(x, weight, bias=None):
    """1x1 convolution. x (B, Cin, H, W), weight (Cout, Cin[, 1, 1]) -> (B, Cout, H, W)."""
    weight = as64(weight).reshape(weight.shape[0], -1)
    out = np.einsum("oc,bchw->bohw", weight, as64(x))
    if bias is not None:
        out = out + as64(bias)[None, :, None, None]
    return out


def dense(x, weight, bias=None):
    """Linear layer on the last axis, weight (out, in) as nn.Dense."""
    out = as64(x) @ as64(weight).T
    if bias is not None:
        out = out + as64(bias)
    return out


def conv2d_direct(x, weight, bias=None, stride=1, padding=0, groups=1):
    """Direct zero-padded cross-correlation (what nn.Conv2d computes), loops over channels and taps.

    x (B, Cin, H, W), weight (Cout, Cin/groups, kh, kw) -> (B, Cout, Ho, Wo), Ho = (H + 2p - kh)//s + 1.
    """
    x, weight = as64(x), as64(weight)
    batch, in_channels, height, width = x.shape
    out_channels, in_per_group, kernel_h, kernel_w = weight.shape
    if in_channels != in_per_group * groups or out_channels % groups:
        raise ValueError("channel counts do not fit the groups")
    out_per_group = out_channels // groups
    padded = np.zeros((batch, in_channels, height + 2 * padding, width + 2 * padding))
    padded[:, :, padding:padding + height, padding:padding + width] = x
    out_h = (height + 2 * padding - kernel_h) // stride + 1
    out_w = (width + 2 * padding - kernel_w) // stride + 1
    out = np.zeros((batch, out_channels, out_h, out_w))
    for o in range(out_channels):
        group = o // out_per_group
        for ci in range(in_per_group):
            channel = group * in_per_group + ci
            for u in range(kernel_h):
                for v in range(kernel_w):
                    window = padded[:, channel, u:u + stride * (out_h - 1) + 1:stride,
                                    v:v + stride * (out_w - 1) + 1:stride]
                    out[:, o] += weight[o, ci, u, v] * window
    if bias is not None:
        out += as64(bias)[None, :, None, None]
    return out


def batch_norm_eval(x, gamma, beta, mean, var, eps=1e-5):
    """BatchNorm with running statistics, x (B, C, ...)."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return (as64(x) - as64(mean).reshape(shape)) / np.sqrt(as64(var).reshape(shape) + eps) \
        * as64(gamma).reshape(shape) + as64(beta).reshape(shape)


def layer_norm(x, gamma, beta, eps):
    """LayerNorm over the last axis."""
    x = as64(x)
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * as64(gamma) + as64(beta)


def out_size(size, stride):
    """Output length of a 'same'-padded strided op: ceil(size / stride)."""
    return -(-size // stride)


# ----------------------------------------------------------------------------------------------------------
# 7. rate mixing (Eq. 13, Table 6)
# ----------------------------------------------------------------------------------------------------------
def mix_rates(attention, convolution, rate_mode, rates=(0.5, 0.5), params=None):
    """Combine the two paths.

    learnable: params['rate1'] * att + params['rate2'] * conv; fixed: rates[0] * att + rates[1] * conv;
    attention: att only; conv: conv only. A path that is not used may be None.
    """
    if rate_mode == "learnable":
        return as64(params["rate1"]).reshape(()) * attention + as64(params["rate2"]).reshape(()) * convolution
    if rate_mode == "fixed":
        return rates[0] * attention + rates[1] * convolution
    if rate_mode == "attention":
        return attention
    if rate_mode == "conv":
        return convolution
    raise ValueError(f"rate_mode must be one of {RATE_MODES}, got {rate_mode!r}")


# ----------------------------------------------------------------------------------------------------------
# 1. shift kernels and explicit tensor shifts (Fig. 3a, Eqs. 14-17)
# ----------------------------------------------------------------------------------------------------------
def shift_kernels(out_channels, kernel_size):
    """One-hot shift kernels of the group conv, (Cout, k^2, k, k): weight[o, p, p // k, p % k] = 1."""
    weight = np.zeros((out_channels, kernel_size ** 2, kernel_size, kernel_size))
    for p in range(kernel_size ** 2):
        weight[:, p, p // kernel_size, p % kernel_size] = 1.0
    return weight


def shift_zero_padded(plane, dy, dx):
    """Shift(f, dy, dx) of Eq. (4) with zero fill: out[..., i, j] = plane[..., i + dy, j + dx] (0 outside)."""
    plane = as64(plane)
    height, width = plane.shape[-2:]
    out = np.zeros_like(plane)
    for i in range(height):
        for j in range(width):
            if 0 <= i + dy < height and 0 <= j + dx < width:
                out[..., i, j] = plane[..., i + dy, j + dx]
    return out


def tensor_shift_sum(maps, kernel_size, out_channels, stride=1):
    """Explicit shift-and-sum of Eqs. (7)-(8), zero padded, output subsampled by the stride.

    maps (B, d*k^2, H, W) with channel j*k^2 + p; output (B, Cout, ceil(H/s), ceil(W/s)) where every output
    channel o = j*(Cout/d) + m of group j is sum_p Shift(map[j*k^2 + p], p//k - k//2, p%k - k//2).
    """
    maps = as64(maps)
    batch, channels, height, width = maps.shape
    taps = kernel_size ** 2
    if channels % taps:
        raise ValueError("channels must be a multiple of kernel_size**2")
    head_dim = channels // taps
    if out_channels % head_dim:
        raise ValueError("out_channels must be a multiple of head_dim")
    centre = kernel_size // 2
    summed = np.zeros((batch, head_dim, height, width))
    for j in range(head_dim):
        for p in range(taps):
            summed[:, j] += shift_zero_padded(maps[:, j * taps + p], p // kernel_size - centre,
                                              p % kernel_size - centre)
    per_group = out_channels // head_dim
    out = np.repeat(summed, per_group, axis=1)  # o = j*per_group + m
    return out[:, :, ::stride, ::stride]


def shift_conv(maps, kernel_size, out_channels, shift_impl, weight=None, stride=1):
    """The shift stage for every implementation: 'tensor' shifts, or the group conv (groups=d) with `weight`."""
    if shift_impl == "tensor":
        return tensor_shift_sum(maps, kernel_size, out_channels, stride)
    if shift_impl not in SHIFT_IMPLS:
        raise ValueError(f"shift_impl must be one of {SHIFT_IMPLS}, got {shift_impl!r}")
    head_dim = maps.shape[1] // kernel_size ** 2
    return conv2d_direct(maps, weight, stride=stride, padding=kernel_size // 2, groups=head_dim)


# ----------------------------------------------------------------------------------------------------------
# 2. the convolution path and its single dense convolution
# ----------------------------------------------------------------------------------------------------------
def conv_path_maps(projected, num_groups, fc_weight, fc_bias=None):
    """Light fc over the G groups: projected (B, G*d, H, W) -> maps (B, d*k^2, H, W), channel j*k^2 + p.

    maps[b, j*k^2 + p] = sum_g fc[p, g] * projected[b, g*d + j] + fc_bias[p].
    """
    projected = as64(projected)
    batch, channels, height, width = projected.shape
    head_dim = channels // num_groups
    fc_weight = as64(fc_weight).reshape(fc_weight.shape[0], num_groups)
    taps = fc_weight.shape[0]
    maps = np.zeros((batch, head_dim * taps, height, width))
    for j in range(head_dim):
        for p in range(taps):
            for g in range(num_groups):
                maps[:, j * taps + p] += fc_weight[p, g] * projected[:, g * head_dim + j]
            if fc_bias is not None:
                maps[:, j * taps + p] += as64(fc_bias)[p]
    return maps


def conv_path(projected, num_groups, params, kernel_size, out_channels, shift_impl, stride=1):
    """Whole conv path after Stage I: fc then shift-and-sum. projected (B, G*d, H, W) -> (B, Cout, H', W')."""
    maps = conv_path_maps(projected, num_groups, params["fc.weight"], params.get("fc.bias"))
    return shift_conv(maps, kernel_size, out_channels, shift_impl, params.get("dep_conv.weight"), stride)


def dense_conv_weight(projection_weight, fc_weight, dep_weight, head_dim):
    """The ONE k x k convolution equal to projection + fc + group conv (biases zero), Eqs. (1)-(8).

    projection_weight (G*d, Cin[,1,1]), fc_weight (k^2, G[,1,1]), dep_weight (Cout, k^2, k, k)
    -> (Cout, Cin, k, k) with K[o, :, u, v] = sum_p dep[o, p, u, v] sum_g fc[p, g] proj[g*d + j(o), :].
    """
    projection_weight = as64(projection_weight).reshape(projection_weight.shape[0], -1)
    dep_weight = as64(dep_weight)
    out_channels, taps, kernel_h, kernel_w = dep_weight.shape
    num_groups = projection_weight.shape[0] // head_dim
    fc_weight = as64(fc_weight).reshape(taps, num_groups)
    per_group = out_channels // head_dim
    dense_weight = np.zeros((out_channels, projection_weight.shape[1], kernel_h, kernel_w))
    for o in range(out_channels):
        j = o // per_group
        for p in range(taps):
            # Stage I with kernel position p: the input projected to map (j, p)
            row = sum(fc_weight[p, g] * projection_weight[g * head_dim + j] for g in range(num_groups))
            for u in range(kernel_h):
                for v in range(kernel_w):
                    dense_weight[o, :, u, v] += dep_weight[o, p, u, v] * row
    return dense_weight


# ----------------------------------------------------------------------------------------------------------
# 3. local (SASA, official ResNet variant) attention
# ----------------------------------------------------------------------------------------------------------
def position_grid(height, width):
    """(2, H, W): channel 0 = linspace(-1, 1, W) along x, channel 1 = linspace(-1, 1, H) along y."""
    grid = np.zeros((2, height, width))
    grid[0] = np.linspace(-1.0, 1.0, width)[None, :]
    grid[1] = np.linspace(-1.0, 1.0, height)[:, None]
    return grid


def local_attention(q, k, v, pe, num_heads, kernel_att, stride=1, dilation=1):
    """Per-pixel sliding-window attention of the official ResNet ACmix.

    q, k, v (B, C, H, W) un-scaled (channel n*d + j), pe (d, H, W) shared by heads and batch.
    Neighbour (a, b) of output pixel (i, j) is the reflection of (s*i + dil*(a - c), s*j + dil*(b - c)),
    c = k_att // 2. logits = (q*d^-0.5) . (k_nb + pe_centre - pe_nb), softmax over the k_att^2 neighbours.
    Returns (B, C, ceil(H/s), ceil(W/s)).
    """
    q, k, v, pe = as64(q), as64(k), as64(v), as64(pe)
    batch, channels, height, width = q.shape
    head_dim = channels // num_heads
    scale = head_dim ** -0.5
    centre = kernel_att // 2
    out_h, out_w = out_size(height, stride), out_size(width, stride)
    out = np.zeros((batch, channels, out_h, out_w))
    for b in range(batch):
        for n in range(num_heads):
            heads = slice(n * head_dim, (n + 1) * head_dim)
            for i in range(out_h):
                for j in range(out_w):
                    ci, cj = stride * i, stride * j
                    query = q[b, heads, ci, cj] * scale
                    logits, values = [], []
                    for a in range(kernel_att):
                        for bb in range(kernel_att):
                            ni = reflect_index(ci + dilation * (a - centre), height)
                            nj = reflect_index(cj + dilation * (bb - centre), width)
                            key = k[b, heads, ni, nj] + pe[:, ci, cj] - pe[:, ni, nj]
                            logits.append(query @ key)
                            values.append(v[b, heads, ni, nj])
                    weights = softmax(np.array(logits))
                    out[b, heads, i, j] = weights @ np.array(values)
    return out


def acmix_local(x, params, num_heads, kernel_att=7, kernel_conv=3, stride=1, dilation=1,
                shift_impl="learnable", rate_mode="learnable", rates=(0.5, 0.5)):
    """ACmixLocal: x (B, Cin, H, W) -> (B, C, ceil(H/s), ceil(W/s)).

    params: 'qkv.weight' (3C, Cin, 1, 1), 'qkv.bias', 'conv_p.weight' (d, 2, 1, 1), 'conv_p.bias',
    'fc.weight' (k^2, 3N, 1, 1), optional 'fc.bias', 'dep_conv.weight' (C, k^2, k, k), 'rate1', 'rate2'.
    The conv path reads the un-scaled q, k, v.
    """
    x = as64(x)
    projected = conv1x1(x, params["qkv.weight"], params.get("qkv.bias"))
    channels = projected.shape[1] // 3
    attention = convolution = None
    if rate_mode != "conv":
        pe = conv1x1(position_grid(*x.shape[2:])[None], params["conv_p.weight"], params.get("conv_p.bias"))[0]
        attention = local_attention(projected[:, :channels], projected[:, channels:2 * channels],
                                    projected[:, 2 * channels:], pe, num_heads, kernel_att, stride, dilation)
    if rate_mode != "attention":
        convolution = conv_path(projected, 3 * num_heads, params, kernel_conv, channels, shift_impl, stride)
    return mix_rates(attention, convolution, rate_mode, rates, params)


# ----------------------------------------------------------------------------------------------------------
# 4. Swin (shifted) window attention
# ----------------------------------------------------------------------------------------------------------
def relative_position_index(window):
    """(w^2, w^2) index into the ((2w-1)^2, N) bias table for tokens in row-major window order."""
    index = np.zeros((window * window, window * window), dtype=np.int64)
    for t1 in range(window * window):
        for t2 in range(window * window):
            dy = t1 // window - t2 // window + window - 1
            dx = t1 % window - t2 % window + window - 1
            index[t1, t2] = dy * (2 * window - 1) + dx
    return index


def shifted_region_labels(height, width, window, shift):
    """Region label of every position of the ROLLED (padded) map: the standard Swin 3x3 region split."""
    def label(position, size):
        if position < size - window:
            return 0
        if position < size - shift:
            return 1
        return 2
    labels = np.zeros((height, width), dtype=np.int64)
    for i in range(height):
        for j in range(width):
            labels[i, j] = 3 * label(i, height) + label(j, width)
    return labels


def window_attention(qkv_map, num_heads, window, shift, bias_table, proj_weight, proj_bias):
    """W-MSA / SW-MSA on a (padded, already rolled) qkv map, then proj.

    qkv_map (B, Hp, Wp, 3C) with channel t*C + n*d + j. Every token attends to the tokens of its own
    window; logits = q.k * d^-0.5 + table[rel_index, n] (+ -100 between different regions when shift > 0).
    Returns proj(attention) (B, Hp, Wp, C) in the rolled coordinates.
    """
    qkv_map = as64(qkv_map)
    batch, height, width, channels3 = qkv_map.shape
    channels = channels3 // 3
    head_dim = channels // num_heads
    if height % window or width % window:
        raise ValueError("the map must be padded to a multiple of the window")
    rel_index = relative_position_index(window)
    labels = shifted_region_labels(height, width, window, shift) if shift > 0 else np.zeros((height, width), int)
    bias_table = as64(bias_table)
    out = np.zeros((batch, height, width, channels))
    for b in range(batch):
        for i in range(height):
            for j in range(width):
                top, left = (i // window) * window, (j // window) * window
                query_token = (i - top) * window + (j - left)
                for n in range(num_heads):
                    heads = slice(n * head_dim, (n + 1) * head_dim)
                    query = qkv_map[b, i, j, heads] * head_dim ** -0.5
                    logits, values = [], []
                    for wi in range(window):
                        for wj in range(window):
                            key_token = wi * window + wj
                            ki, kj = top + wi, left + wj
                            logit = query @ qkv_map[b, ki, kj, channels:2 * channels][heads]
                            logit += bias_table[rel_index[query_token, key_token], n]
                            if labels[i, j] != labels[ki, kj]:
                                logit += -100.0
                            logits.append(logit)
                            values.append(qkv_map[b, ki, kj, 2 * channels:][heads])
                    out[b, i, j, heads] = softmax(np.array(logits)) @ np.array(values)
    return dense(out, proj_weight, proj_bias)


def roll_map(x, shift):
    """Cyclic roll of a (B, H, W, C) map: out[:, i, j] = x[:, (i + shift) % H, (j + shift) % W]."""
    height, width = x.shape[1:3]
    rows = [(i + shift) % height for i in range(height)]
    cols = [(j + shift) % width for j in range(width)]
    return as64(x)[:, rows][:, :, cols]


def acmix_window(x, params, num_heads, window_size=7, shift_size=0, kernel_conv=3, shift_impl="learnable",
                 rate_mode="learnable", rates=(0.5, 0.5), conv_on_shifted_map=True):
    """ACmixWindow: x (B, H, W, C) after norm1 -> (B, H, W, C), un-rolled and cropped.

    Swin order: zero-pad x bottom/right to multiples of the window, roll by -shift, qkv Linear, window
    attention + proj, reverse roll, crop. The conv path (fc over 3N groups, group conv, no proj) runs on the
    rolled qkv map (official quirk: it wraps around the border) or, with conv_on_shifted_map=False, on the
    un-rolled padded map. params: 'qkv.weight', 'qkv.bias', 'proj.weight', 'proj.bias',
    'relative_position_bias_table', 'fc.weight', 'fc.bias', 'dep_conv.weight', 'rate1', 'rate2'.
    """
    x = as64(x)
    batch, height, width, channels = x.shape
    padded_h, padded_w = out_size(height, window_size) * window_size, out_size(width, window_size) * window_size
    padded = np.zeros((batch, padded_h, padded_w, channels))
    padded[:, :height, :width] = x
    rolled = roll_map(padded, shift_size)
    qkv_rolled = dense(rolled, params["qkv.weight"], params.get("qkv.bias"))
    attention = convolution = None
    if rate_mode != "conv":
        attention = window_attention(qkv_rolled, num_heads, window_size, shift_size,
                                     params["relative_position_bias_table"], params["proj.weight"],
                                     params.get("proj.bias"))
    if rate_mode != "attention":
        qkv_for_conv = qkv_rolled if conv_on_shifted_map else roll_map(qkv_rolled, -shift_size)
        conv = conv_path(qkv_for_conv.transpose(0, 3, 1, 2), 3 * num_heads, params, kernel_conv, channels,
                         shift_impl).transpose(0, 2, 3, 1)
        convolution = roll_map(conv, -shift_size) if conv_on_shifted_map else conv
    if attention is not None:
        attention = roll_map(attention, -shift_size)  # reverse roll (torch.roll by +shift)
    mixed = mix_rates(attention, convolution, rate_mode, rates, params)
    return mixed[:, :height, :width]


# ----------------------------------------------------------------------------------------------------------
# 5. PVT v1 global attention with spatial reduction, and ACmix proposal P2
# ----------------------------------------------------------------------------------------------------------
def global_attention(q, k, v, num_heads):
    """Multi-head softmax attention of every query over all keys. q (B, L, C), k, v (B, Lk, C) -> (B, L, C)."""
    q, k, v = as64(q), as64(k), as64(v)
    batch, length, channels = q.shape
    head_dim = channels // num_heads
    out = np.zeros_like(q)
    for b in range(batch):
        for n in range(num_heads):
            heads = slice(n * head_dim, (n + 1) * head_dim)
            for t in range(length):
                logits = k[b, :, heads] @ q[b, t, heads] * head_dim ** -0.5
                out[b, t, heads] = softmax(logits) @ v[b, :, heads]
    return out


def spatial_reduction(tokens, height, width, params, sr_ratio, eps=1e-6):
    """PVT sr: Conv2d(C, C, R, stride R) on the token map, then LayerNorm. tokens (B, HW, C) -> (B, hw, C)."""
    batch, _, channels = tokens.shape
    token_map = as64(tokens).reshape(batch, height, width, channels).transpose(0, 3, 1, 2)
    reduced = conv2d_direct(token_map, params["sr.weight"], params.get("sr.bias"), stride=sr_ratio)
    reduced = reduced.reshape(batch, channels, -1).transpose(0, 2, 1)
    return layer_norm(reduced, params["norm.gamma"], params["norm.beta"], eps)


def nearest_resize(token_map, height, width):
    """Nearest resize of (B, h, w, C) to (B, H, W, C): source index floor(i * h / H) (= i // R if H = R h)."""
    small_h, small_w = token_map.shape[1:3]
    rows = [(i * small_h) // height for i in range(height)]
    cols = [(j * small_w) // width for j in range(width)]
    return as64(token_map)[:, rows][:, :, cols]


def acmix_global(x, height, width, params, num_heads, sr_ratio=1, num_prefix_tokens=0, kernel_conv=3,
                 shift_impl="learnable", rate_mode="learnable", rates=(0.5, 0.5), norm_eps=1e-6):
    """ACmixGlobal (PVT v1 attention + proposal P2): x (B, L, C), L = prefix + H*W -> (B, L, C).

    Attention: q Linear on all tokens; k, v = kv Linear of LN(sr(patch tokens)) when R > 1, else of all
    tokens; softmax(q k^T d^-0.5) v, proj. Conv path (P2): q of the patch tokens, k and v nearest-upsampled
    by R, fc over 3N groups, group conv; prefix tokens get only the attention term.
    params: 'q.*', 'kv.*', 'proj.*', 'sr.*', 'norm.gamma', 'norm.beta', 'fc.*', 'dep_conv.weight', rates.
    """
    x = as64(x)
    batch, length, channels = x.shape
    q = dense(x, params["q.weight"], params.get("q.bias"))
    if sr_ratio > 1:
        patches = x[:, num_prefix_tokens:]
        kv_source = spatial_reduction(patches, height, width, params, sr_ratio, norm_eps)
    else:
        kv_source = x
    kv = dense(kv_source, params["kv.weight"], params.get("kv.bias"))
    k, v = kv[..., :channels], kv[..., channels:]
    attention = convolution = None
    if rate_mode != "conv":
        attention = dense(global_attention(q, k, v, num_heads), params["proj.weight"], params.get("proj.bias"))
    if rate_mode != "attention":
        if sr_ratio > 1:
            small_h, small_w = height // sr_ratio, width // sr_ratio
            kv_map = nearest_resize(kv.reshape(batch, small_h, small_w, 2 * channels), height, width)
        else:
            kv_map = kv[:, num_prefix_tokens:].reshape(batch, height, width, 2 * channels)
        q_map = q[:, num_prefix_tokens:].reshape(batch, height, width, channels)
        projected = np.concatenate([q_map, kv_map], axis=-1).transpose(0, 3, 1, 2)
        conv = conv_path(projected, 3 * num_heads, params, kernel_conv, channels, shift_impl)
        conv_tokens = conv.transpose(0, 2, 3, 1).reshape(batch, height * width, channels)
        convolution = np.concatenate([np.zeros((batch, num_prefix_tokens, channels)), conv_tokens], axis=1)
    return mix_rates(attention, convolution, rate_mode, rates, params)


# ----------------------------------------------------------------------------------------------------------
# 6. SAN patchwise attention (Eq. 18, sa_type=1) and its conv path
# ----------------------------------------------------------------------------------------------------------
def patchwise_weights(q, k, params, kernel_att, bn_eps=1e-5):
    """conv_w([q ; unfold_k(reflect_pad(k))]) -> w (B, mid/share, k^2, H, W); BatchNorms with running stats.

    The concatenated input has channel c for q and rel + c*k^2 + p for the key of channel c at neighbour p.
    conv_w = BN, ReLU, 1x1 (no bias), BN, ReLU, 1x1 (bias); params 'conv_w.{0,2,3,5}.*'.
    """
    q, k = as64(q), as64(k)
    batch, rel, height, width = q.shape
    taps = kernel_att ** 2
    centre = kernel_att // 2
    stacked = np.zeros((batch, rel * (taps + 1), height, width))
    stacked[:, :rel] = q
    for c in range(rel):
        for p in range(taps):
            for i in range(height):
                for j in range(width):
                    ni = reflect_index(i + p // kernel_att - centre, height)
                    nj = reflect_index(j + p % kernel_att - centre, width)
                    stacked[:, rel + c * taps + p, i, j] = k[:, c, ni, nj]

    def bn(tensor, prefix):
        return batch_norm_eval(tensor, params[prefix + ".gamma"], params[prefix + ".beta"],
                               params[prefix + ".moving_mean"], params[prefix + ".moving_variance"], bn_eps)

    hidden = np.maximum(bn(stacked, "conv_w.0"), 0.0)
    hidden = conv1x1(hidden, params["conv_w.2.weight"], params.get("conv_w.2.bias"))
    hidden = np.maximum(bn(hidden, "conv_w.3"), 0.0)
    weights = conv1x1(hidden, params["conv_w.5.weight"], params.get("conv_w.5.bias"))
    return weights.reshape(batch, -1, taps, height, width)


def patchwise_aggregation(v, weights, kernel_att):
    """SAN Aggregation (pad_mode 1): out[b, c, i, j] = sum_p w[b, c mod Cw, p, i, j] v[b, c, reflect(nb_p)].

    No softmax. v (B, mid, H, W), weights (B, Cw, k^2, H, W) -> (B, mid, H, W).
    """
    v, weights = as64(v), as64(weights)
    batch, channels, height, width = v.shape
    weight_channels = weights.shape[1]
    centre = kernel_att // 2
    out = np.zeros_like(v)
    for c in range(channels):
        for i in range(height):
            for j in range(width):
                for p in range(kernel_att ** 2):
                    ni = reflect_index(i + p // kernel_att - centre, height)
                    nj = reflect_index(j + p % kernel_att - centre, width)
                    out[:, c, i, j] += weights[:, c % weight_channels, p, i, j] * v[:, c, ni, nj]
    return out


def acmix_patchwise(x, params, rel_channels, mid_channels, kernel_att=7, kernel_conv=3, shift_impl="learnable",
                    rate_mode="learnable", rates=(0.5, 0.5), bn_eps=1e-5):
    """ACmixPatchwise: x (B, Cin, H, W) -> (B, mid, H, W).

    Stage I: qkv 1x1 conv -> [q (rel); k (rel); v (mid)]. Attention: Eq. (18) patchwise weights + aggregation.
    Conv path: groups of width d = rel (q: 1, k: 1, v: mid/rel), fc (k_c^2 x G, bias), group conv to mid.
    """
    projected = conv1x1(x, params["qkv.weight"], params.get("qkv.bias"))
    rel = rel_channels
    q, k, v = projected[:, :rel], projected[:, rel:2 * rel], projected[:, 2 * rel:]
    attention = convolution = None
    if rate_mode != "conv":
        attention = patchwise_aggregation(v, patchwise_weights(q, k, params, kernel_att, bn_eps), kernel_att)
    if rate_mode != "attention":
        num_groups = 2 + mid_channels // rel
        convolution = conv_path(projected, num_groups, params, kernel_conv, mid_channels, shift_impl)
    return mix_rates(attention, convolution, rate_mode, rates, params)
