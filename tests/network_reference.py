"""Whole-network NumPy references of ResNet(-ACmix), PVT(-ACmix) and SAN(-ACmix), for the tests.

Each forward composes the layer references of tests/numpy_reference.py (written from the paper and the
reference notes, never from ``acmix_ms``/``models``) into the network the model docstrings describe, in
float64, reading the parameters of a MindSpore model as a dict keyed by its parameter names. They check the
wiring of the models (block order, residuals, norms and their eps, position embeddings, cls token, pooling,
head) that layer tests cannot see.

``sensitive_parameters_`` gives a MindSpore model random values under which every layer visibly shapes the
output (the reason: docs/testing.md), and ``calibrate`` mode of the BatchNorm networks sets each top-level
BatchNorm's running statistics to the batch statistics of a calibration input, as torch's
``momentum=None`` does in tests/torch_official.py.
"""
import math

import numpy as np

import numpy_reference as ref

_erf = np.vectorize(math.erf)


def sub(params, prefix):
    """The entries of ``params`` under ``prefix``, with the prefix removed."""
    return {key[len(prefix):]: value for key, value in params.items() if key.startswith(prefix)}


def gelu(x):
    """Exact GELU, x * Phi(x)."""
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def relu(x):
    return np.maximum(x, 0.0)


def batch_norm(x, params, prefix, calibrate, eps=1e-5):
    """Eval-mode BatchNorm ``prefix`` of (B, C, H, W); with ``calibrate`` its running statistics are first set
    to the batch's (mean, unbiased variance) in ``params``."""
    if calibrate:
        count = x.size // x.shape[1]
        params[prefix + ".moving_mean"] = x.mean(axis=(0, 2, 3))
        params[prefix + ".moving_variance"] = x.var(axis=(0, 2, 3)) * count / (count - 1)
    return ref.batch_norm_eval(x, params[prefix + ".gamma"], params[prefix + ".beta"],
                               params[prefix + ".moving_mean"], params[prefix + ".moving_variance"], eps)


def max_pool(x, kernel, stride, padding=0):
    """Max pooling of (B, C, H, W), padding with -inf; output floor((H + 2p - k) / s) + 1."""
    batch, channels, height, width = x.shape
    padded = np.full((batch, channels, height + 2 * padding, width + 2 * padding), -np.inf)
    padded[:, :, padding:padding + height, padding:padding + width] = x
    out_h = (height + 2 * padding - kernel) // stride + 1
    out_w = (width + 2 * padding - kernel) // stride + 1
    out = np.full((batch, channels, out_h, out_w), -np.inf)
    for u in range(kernel):
        for v in range(kernel):
            out = np.maximum(out, padded[:, :, u:u + stride * (out_h - 1) + 1:stride,
                                         v:v + stride * (out_w - 1) + 1:stride])
    return out


def pooled_head(features, params, name):
    """Global average pool of (B, C, H, W), then the Dense ``name`` if the model has it -> (B, classes)."""
    pooled = ref.as64(features).mean(axis=(2, 3))
    if name + ".weight" not in params:
        return pooled
    return ref.dense(pooled, params[name + ".weight"], params[name + ".bias"])


# ------------------------------------------------------------------------------------------------ ResNet
def resnet_forward(x, params, layers, stem="imagenet", acmix=None, calibrate=False):
    """ResNet V1.5 bottleneck network (models/resnet.py docstring).

    x (B, Cin, H, W) -> (features = last stage map, logits, the four stage maps).

    acmix: None (plain 3x3 conv2) or ``acmix_local`` options (num_heads, kernel_att, kernel_conv, shift_impl,
    rate_mode, rates) for every conv2. ``params`` keyed by MindSpore names (updated when calibrating).
    """
    x = ref.as64(x)
    if stem == "imagenet":
        x = relu(batch_norm(ref.conv2d_direct(x, params["conv1.weight"], stride=2, padding=3), params, "bn1",
                            calibrate))
        x = max_pool(x, 3, 2, 1)
    else:
        x = relu(batch_norm(ref.conv2d_direct(x, params["conv1.weight"], padding=1), params, "bn1", calibrate))
    stages = []
    for stage, blocks in enumerate(layers):
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            name = f"layer{stage + 1}.{block}."
            out = relu(batch_norm(ref.conv1x1(x, params[name + "conv1.weight"]), params, name + "bn1", calibrate))
            if acmix is None:
                out = ref.conv2d_direct(out, params[name + "conv2.weight"], stride=stride, padding=1)
            else:
                out = ref.acmix_local(out, sub(params, name + "conv2."), stride=stride, **acmix)
            out = relu(batch_norm(out, params, name + "bn2", calibrate))
            out = batch_norm(ref.conv1x1(out, params[name + "conv3.weight"]), params, name + "bn3", calibrate)
            if name + "downsample.0.weight" in params:
                shortcut = ref.conv1x1(x[:, :, ::stride, ::stride], params[name + "downsample.0.weight"])
                shortcut = batch_norm(shortcut, params, name + "downsample.1", calibrate)
            else:
                shortcut = x
            x = relu(out + shortcut)
        stages.append(x)
    return x, pooled_head(x, params, "fc"), stages


# ------------------------------------------------------------------------------------------------ SAN
def san_forward(x, params, layers, kernels, sam, calibrate=False):
    """SAN / SAN-ACmix (models/san.py docstring).

    x (B, Cin, H, W) -> (features = last stage map, logits, the five stage maps).

    sam: ``acmix_patchwise`` options (kernel_conv, shift_impl, rate_mode, rates). The SAM's own BatchNorms
    (inside conv_w) keep their running statistics; the block and stage BatchNorms are calibrated.
    """
    x = relu(batch_norm(ref.conv1x1(x, params["conv_in.weight"]), params, "bn_in", calibrate))
    stages = []
    for stage, (blocks, kernel) in enumerate(zip(layers, kernels)):
        x = ref.conv1x1(max_pool(x, 2, 2), params[f"conv{stage}.weight"])
        channels = x.shape[1]
        for block in range(blocks):
            name = f"layer{stage}.{block}."
            out = relu(batch_norm(x, params, name + "bn1", calibrate))
            out = ref.acmix_patchwise(out, sub(params, name + "sam."), channels // 16, channels // 4, kernel, **sam)
            out = relu(batch_norm(out, params, name + "bn2", calibrate))
            x = x + ref.conv1x1(out, params[name + "conv.weight"], params[name + "conv.bias"])
        x = relu(batch_norm(x, params, f"bn{stage}", calibrate))
        stages.append(x)
    return x, pooled_head(x, params, "fc"), stages


# ------------------------------------------------------------------------------------------------ PVT
def bilinear_half_pixel(grid, out_h, out_w):
    """torch's F.interpolate(mode='bilinear', align_corners=False) of a (C, h, w) array."""
    def axis(out_size, in_size):
        src = np.maximum((np.arange(out_size) + 0.5) * in_size / out_size - 0.5, 0.0)
        low = np.minimum(np.floor(src).astype(int), in_size - 1)
        return low, np.minimum(low + 1, in_size - 1), src - low
    r0, r1, fr = axis(out_h, grid.shape[1])
    c0, c1, fc = axis(out_w, grid.shape[2])
    top = grid[:, r0][:, :, c0] * (1 - fc) + grid[:, r0][:, :, c1] * fc
    bottom = grid[:, r1][:, :, c0] * (1 - fc) + grid[:, r1][:, :, c1] * fc
    return top * (1 - fr)[:, None] + bottom * fr[:, None]


def pvt_forward(x, params, img_size, patch_size, num_heads, mlp_ratios, sr_ratios, depths, acmix, norm_eps=1e-6):
    """PVT v1 / PVT-ACmix (models/pvt.py docstring).

    x (B, Cin, H, W) -> (features = normed stage-4 tokens (B, 1 + h*w, C4) cls first, logits, the four NCHW
    stage maps of the patch tokens before the final norm).

    Stage i: p x p / p patch conv (p = patch_size, then 2) + LayerNorm (eps 1e-5); position embedding
    (learned for ``img_size``, bilinearly resized otherwise; the cls token, prepended in stage 4, keeps its
    entry); blocks x + attn(LN(x)), x + mlp(LN(x)) with ``acmix_global`` attention (sr LayerNorm eps 1e-5).
    acmix: ``acmix_global`` options (kernel_conv, shift_impl, rate_mode, rates).
    """
    x = ref.as64(x)
    grid = img_size
    stages = []
    for stage, depth in enumerate(depths):
        patch = patch_size if stage == 0 else 2
        name = f"patch_embed{stage + 1}."
        x = ref.conv2d_direct(x, params[name + "proj.weight"], params[name + "proj.bias"], stride=patch)
        batch, channels, height, width = x.shape
        tokens = ref.layer_norm(x.transpose(0, 2, 3, 1).reshape(batch, height * width, channels),
                                params[name + "norm.gamma"], params[name + "norm.beta"], 1e-5)
        grid = grid // patch
        pos = ref.as64(params[f"pos_embed{stage + 1}"])[0]
        prefix = 1 if stage == len(depths) - 1 else 0
        patch_pos = pos[prefix:]
        if (height, width) != (grid, grid):
            patch_pos = bilinear_half_pixel(patch_pos.T.reshape(channels, grid, grid), height, width)
            patch_pos = patch_pos.reshape(channels, height * width).T
        if prefix:
            cls = np.broadcast_to(ref.as64(params["cls_token"]), (batch, 1, channels))
            tokens = np.concatenate([cls, tokens], axis=1)
            patch_pos = np.concatenate([pos[:1], patch_pos], axis=0)
        tokens = tokens + patch_pos[None]
        for block in range(depth):
            b = sub(params, f"block{stage + 1}.{block}.")
            normed = ref.layer_norm(tokens, b["norm1.gamma"], b["norm1.beta"], norm_eps)
            tokens = tokens + ref.acmix_global(normed, height, width, sub(b, "attn."), num_heads[stage],
                                               sr_ratios[stage], prefix, norm_eps=1e-5, **acmix)
            normed = ref.layer_norm(tokens, b["norm2.gamma"], b["norm2.beta"], norm_eps)
            hidden = gelu(ref.dense(normed, b["mlp.fc1.weight"], b["mlp.fc1.bias"]))
            tokens = tokens + ref.dense(hidden, b["mlp.fc2.weight"], b["mlp.fc2.bias"])
        x = tokens[:, prefix:].reshape(batch, height, width, channels).transpose(0, 3, 1, 2)
        stages.append(x)
    features = ref.layer_norm(tokens, params["norm.gamma"], params["norm.beta"], norm_eps)
    logits = ref.dense(features[:, 0], params["head.weight"], params["head.bias"]) if "head.weight" in params \
        else features[:, 0]
    return features, logits, stages


# ------------------------------------------------------------------------------------------------ helpers
def sensitive_parameters_(net, seed=0):
    """Random values for every trainable parameter of a MindSpore model so that each layer matters:
    He-normal weights (N(0, 2 / fan_in)), norm scales U(0.6, 1.4), biases and shifts N(0, 0.2^2), position
    embeddings and cls token N(0, 0.5^2), ACmix rates distinct and off their 0.5 init (rate1 U(0.15, 0.35),
    rate2 U(0.65, 0.85)), BatchNorm statistics mean N(0, 0.2^2), variance U(0.5, 1.5) (calibrate the top-level
    ones afterwards with the network's reference). Frozen shift kernels are left alone.

    Returns the parameters as a dict of float64 arrays keyed by name.
    """
    import mindspore as ms
    rng = np.random.default_rng(seed)
    for name, param in net.parameters_and_names():
        shape = tuple(param.shape)
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith("dep_conv.weight") and not param.requires_grad:
            continue
        if leaf == "rate1":
            value = rng.uniform(0.15, 0.35, shape)
        elif leaf == "rate2":
            value = rng.uniform(0.65, 0.85, shape)
        elif leaf == "moving_variance":
            value = rng.uniform(0.5, 1.5, shape)
        elif leaf == "gamma":
            value = rng.uniform(0.6, 1.4, shape)
        elif leaf.startswith("pos_embed") or leaf == "cls_token":
            value = rng.standard_normal(shape) * 0.5
        elif len(shape) > 1:
            value = rng.standard_normal(shape) * math.sqrt(2.0 / int(np.prod(shape[1:])))
        else:  # biases, norm shifts, BN means
            value = rng.standard_normal(shape) * 0.2
        param.set_data(ms.Tensor(value.astype(np.float32)))
    return parameters_of(net)


def sensitive_network_(net, forward=None, calibration_shape=None, seed=3):
    """``sensitive_parameters_``, then (BatchNorm networks) the running statistics of a random calibration
    batch of ``calibration_shape`` through ``forward(x, params, calibrate=True)``, set in ``net`` too.
    Returns the parameters (float64 dict), ready for ``forward(x, params)``."""
    params = sensitive_parameters_(net, seed)
    if forward is not None:
        forward(np.random.default_rng(seed + 100).standard_normal(calibration_shape), params, calibrate=True)
        load_values_(net, {key: value for key, value in params.items()
                           if key.endswith(("moving_mean", "moving_variance"))})
    return params


def parameters_of(net):
    return {name: param.asnumpy().astype(np.float64) for name, param in net.parameters_and_names()}


def load_values_(net, values):
    """Set the named parameters of ``net`` to the given arrays (float32)."""
    import mindspore as ms
    params = dict(net.parameters_and_names())
    for name, value in values.items():
        params[name].set_data(ms.Tensor(np.asarray(value, dtype=np.float32)))


def relative_error(got, expected):
    return float(np.abs(np.asarray(got, np.float64) - expected).max() / np.abs(expected).max())


def mutation_errors(net, error, mutations):
    """For each mutation of ``net``'s parameters, the value of ``error()`` while it is applied.

    mutations: ("swap", name_a, name_b) exchanges two parameters; ("add", name, delta) adds delta to one
    element (at a third of the flattened tensor). The original values are restored after each.
    """
    original = {name: param.asnumpy().copy() for name, param in net.parameters_and_names()}
    results = {}
    for kind, name, arg in mutations:
        if kind == "swap":
            mutated = {name: original[arg], arg: original[name]}
        else:
            values = original[name].copy()
            values.reshape(-1)[values.size // 3] += arg
            mutated = {name: values}
        load_values_(net, mutated)
        try:
            results[(kind, name)] = error()
        finally:
            load_values_(net, {key: original[key] for key in mutated})
    return results
