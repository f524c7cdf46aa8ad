"""models/swin.py: Swin-T/S, Swin-ACmix-T/S and Conv-Swin-T.

Full-size models are only built (parameter counts, checkpoint names, windows, init); graphs run on narrow
variants (embed 16, window 4, 64 px, batch 2) in graph mode. Narrow Swin-S variants only differ from the
Swin-T ones by their depths, so they train under ``-m slow``.
"""
import os

import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, Tensor

import models
from models import swin
from models.layers import DropPath
from models.profile import count_params
from model_helpers import Features, check_train_step, random_images

SWIN_MODELS = ("swin_tiny", "swin_small", "swin_tiny_acmix", "swin_small_acmix", "swin_tiny_conv")
# Parameters of the official PyTorch models (docs/reference Fig. 4 table), millions.
REFERENCE_PARAMS_M = {"swin_tiny": 28.29, "swin_small": 49.61, "swin_tiny_acmix": 28.65, "swin_small_acmix": 50.35}
OFFICIAL_KEYS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "reference", "keys_swin_acmix_t.txt")
ACMIX_KEYS = ("attn.fc.weight", "attn.fc.bias", "attn.dep_conv.weight", "attn.rate1", "attn.rate2")
# 64 px: stage maps 16, 8, 4, 2 -> windows 4, 4, 4 (no shift: map == window), 2; shifted blocks in stages 0, 1.
NARROW = dict(embed_dim=16, depths=(2, 2, 1, 1), num_heads=(1, 2, 4, 8), window_size=4, img_size=64,
              drop_path_rate=0.0)


def official_style_names(net):
    """{name: shape} with LayerNorm gamma/beta renamed to torch's weight/bias."""
    out = {}
    for param in net.get_parameters():
        name = param.name
        if name.endswith(".gamma"):
            name = name[:-len("gamma")] + "weight"
        elif name.endswith(".beta"):
            name = name[:-len("beta")] + "bias"
        out[name] = tuple(param.shape)
    return out


def blocks_of(net):
    return [block for stage in net.layers for block in stage.blocks]


def layer_norm_np(x, eps=1e-5):
    """LayerNorm over the last axis with gamma 1, beta 0 (the initial values)."""
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(x.var(-1, keepdims=True) + eps)


# ------------------------------------------------------------------------------ registry and sizes
@pytest.fixture(scope="module")
def full_models():
    return {name: models.create_model(name) for name in SWIN_MODELS}


def test_every_model_is_registered():
    assert set(SWIN_MODELS) <= set(models.list_models("swin*"))
    for name in SWIN_MODELS:
        assert models.paper_info(name)["params_m"] > 0


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS_M))
def test_full_size_parameter_count_matches_official(full_models, name):
    measured = count_params(full_models[name]) / 1e6
    assert measured == pytest.approx(REFERENCE_PARAMS_M[name], rel=0.005)


def test_conv_swin_only_swaps_the_token_mixer(full_models):
    # Per block, attention (qkv 3C^2+3C, proj C^2+C, bias table 169N) becomes a 3x3 conv (9C^2 + C).
    delta = 0
    for dim, heads, depth in zip((96, 192, 384, 768), (3, 6, 12, 24), (2, 2, 6, 2)):
        delta += depth * ((9 * dim * dim + dim) - (4 * dim * dim + 4 * dim + 169 * heads))
    conv, plain = count_params(full_models["swin_tiny_conv"]), count_params(full_models["swin_tiny"])
    assert conv - plain == delta
    assert conv / 1e6 == pytest.approx(39.0, abs=0.5)  # Table 6: 39M
    mixers = [block.attn for block in blocks_of(full_models["swin_tiny_conv"])]
    assert all(isinstance(m, swin.ConvTokenMixer) and m.conv.weight.shape[2:] == (3, 3) for m in mixers)


def test_parameter_names_map_onto_official_checkpoint(full_models):
    acmix = official_style_names(full_models["swin_tiny_acmix"])
    plain = official_style_names(full_models["swin_tiny"])
    # Reference listing of layers.0.blocks.1 and the merging layer (docs/reference section 5).
    expected = {"layers.0.blocks.1.attn.qkv.weight": (288, 96), "layers.0.blocks.1.attn.fc.weight": (9, 9, 1, 1),
                "layers.0.blocks.1.attn.dep_conv.weight": (96, 9, 3, 3), "layers.0.blocks.1.attn.rate1": (1,),
                "layers.0.blocks.1.attn.relative_position_bias_table": (169, 3),
                "layers.1.blocks.0.attn.fc.weight": (9, 18, 1, 1), "layers.0.downsample.reduction.weight": (192, 384),
                "layers.0.downsample.norm.weight": (384,), "patch_embed.proj.weight": (96, 3, 4, 4),
                "norm.weight": (768,), "head.weight": (1000, 768)}
    for key, shape in expected.items():
        assert acmix[key] == shape, key
    assert "layers.0.downsample.reduction.bias" not in acmix and "layers.3.downsample.norm.weight" not in acmix
    assert "layers.0.blocks.0.attn.dep_conv.bias" not in acmix
    # the baseline is Swin-ACmix minus the five conv-path keys of every block
    assert plain == {k: v for k, v in acmix.items() if not k.endswith(ACMIX_KEYS)}
    if not os.path.exists(OFFICIAL_KEYS):
        pytest.skip("official key list not available")
    official = {}
    with open(OFFICIAL_KEYS) as handle:
        for line in handle:
            key, shape = line.rstrip("\n").split("\t")
            if not key.endswith(("attn_mask", "relative_position_index")):  # constant buffers, recomputed
                official[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    assert acmix == official


def test_windows_follow_the_official_rule(full_models):
    # 224 px: stage maps 56, 28, 14, 7 -> window 7 everywhere, shift 3 in odd blocks except stage 4 (7 <= 7)
    net = full_models["swin_tiny_acmix"]
    for index, stage in enumerate(net.layers):
        assert [b.attn.window_size for b in stage.blocks] == [7] * len(stage.blocks)
        expected_shift = 0 if index == 3 else 3
        assert [b.attn.shift_size for b in stage.blocks] == [expected_shift * (j % 2) for j in range(len(stage.blocks))]
    narrow = models.create_model("swin_tiny_acmix", **NARROW)
    assert [stage.window_size for stage in narrow.layers] == [4, 4, 4, 2]
    assert [[b.attn.shift_size for b in stage.blocks] for stage in narrow.layers] == [[0, 2], [0, 2], [0], [0]]
    assert narrow.layers[3].blocks[0].attn.relative_position_bias_table.shape == (9, 8)  # (2*2-1)^2 x N


def test_initialisation(full_models):
    net = full_models["swin_tiny_acmix"]
    attn = net.layers[2].blocks[0].attn
    assert attn.qkv.weight.asnumpy().std() == pytest.approx(0.02, rel=0.05)
    assert np.all(attn.qkv.bias.asnumpy() == 0) and np.all(attn.proj.bias.asnumpy() == 0)
    assert net.head.weight.asnumpy().std() == pytest.approx(0.02, rel=0.1)
    assert np.all(net.layers[2].blocks[0].norm1.gamma.asnumpy() == 1)
    assert attn.relative_position_bias_table.asnumpy().std() == pytest.approx(0.02, rel=0.1)
    # the group conv keeps its shift kernels (Swin's init only touches Dense and LayerNorm)
    kernels = attn.dep_conv.weight.asnumpy()
    np.testing.assert_array_equal(kernels, acmix_shift_kernels(kernels.shape[0]))
    assert attn.rate1.asnumpy()[0] == 0.5 and attn.rate2.asnumpy()[0] == 0.5


def acmix_shift_kernels(out_channels):
    kernels = np.zeros((out_channels, 9, 3, 3), np.float32)
    for p in range(9):
        kernels[:, p, p // 3, p % 3] = 1
    return kernels


def test_drop_path_rate_rises_linearly_over_blocks(full_models):
    for name, rate, total in (("swin_tiny", 0.2, 12), ("swin_small_acmix", 0.3, 24)):
        blocks = blocks_of(full_models[name])
        assert len(blocks) == total
        assert isinstance(blocks[0].drop_path, nn.Identity)  # rate 0 for the first block
        probs = [b.drop_path.drop_prob for b in blocks[1:]]
        np.testing.assert_allclose(probs, np.linspace(0, rate, total)[1:], rtol=1e-6)


# ------------------------------------------------------------------------------------- options
def test_acmix_overrides_reach_every_block():
    net = models.create_model("swin_tiny_acmix", **NARROW, shift_impl="fixed", rate_mode="fixed", rates=(0.3, 0.7),
                              kernel_conv=5, conv_on_shifted_map=False, fc_bias=False)
    for block in blocks_of(net):
        attn = block.attn
        assert (attn.shift_impl, attn.rate_mode, attn.kernel_conv) == ("fixed", "fixed", 5)
        assert (attn.fixed_rate1, attn.fixed_rate2) == (0.3, 0.7) and not attn.conv_on_shifted_map
        assert attn.dep_conv.weight.shape[1:] == (25, 5, 5) and not attn.dep_conv.weight.requires_grad
        assert attn.fc.bias is None and not hasattr(attn, "rate1")
    default = models.create_model("swin_tiny_acmix", **NARROW)
    assert all(b.attn.conv_on_shifted_map and b.attn.rate_mode == "learnable" for b in blocks_of(default))
    plain = models.create_model("swin_tiny", **NARROW)
    assert all(not b.attn.has_conv for b in blocks_of(plain))
    assert not any(".fc." in p.name or "dep_conv" in p.name or "rate" in p.name for p in plain.get_parameters())
    conv = models.create_model("swin_tiny_conv", **NARROW, kernel_conv=5)
    assert all(b.attn.conv.weight.shape == (b.norm1.gamma.shape[0],) * 2 + (5, 5) for b in blocks_of(conv))


@pytest.mark.parametrize("name, kwargs, error, words", [
    ("swin_tiny_acmix", dict(foo=1), TypeError, "'foo'"),
    ("swin_tiny_acmix", dict(token_mixer="mlp"), ValueError, "token_mixer"),
    ("swin_tiny_acmix", dict(rate_mode="both"), ValueError, "rate_mode"),
    ("swin_tiny_acmix", dict(out_indices=(4,)), ValueError, "out_indices"),
    ("swin_tiny_acmix", dict(depths=(2, 2), num_heads=(3, 6, 12, 24)), ValueError, "num_heads"),
    ("swin_tiny_acmix", dict(embed_dim=20), ValueError, "num_heads"),
    ("swin_tiny_acmix", dict(drop_path_rate=1.0), ValueError, "drop_path_rate"),
    ("swin_tiny_conv", dict(kernel_conv=4), ValueError, "kernel_conv"),
])
def test_bad_arguments_raise_clear_errors(name, kwargs, error, words):
    with pytest.raises(error, match=words):
        models.create_model(name, **kwargs)


# ------------------------------------------------------------------------------------ layers
def test_patch_merging_keeps_the_official_neighbour_order_and_pads_odd_maps():
    merge = swin.PatchMerging(3)
    x = np.random.default_rng(0).standard_normal((2, 5, 7, 3)).astype(np.float32)
    out = merge(Tensor(x)).asnumpy()
    padded = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    # official order: (even row, even col), (odd row, even col), (even row, odd col), (odd row, odd col)
    cat = np.concatenate([padded[:, 0::2, 0::2], padded[:, 1::2, 0::2], padded[:, 0::2, 1::2],
                          padded[:, 1::2, 1::2]], -1)
    expected = layer_norm_np(cat) @ merge.reduction.weight.asnumpy().T
    assert out.shape == (2, 3, 4, 6)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_patch_embed_pads_to_a_multiple_of_the_patch():
    embed = swin.PatchEmbed(4, 3, 8)
    x = np.random.default_rng(1).standard_normal((2, 3, 13, 16)).astype(np.float32)
    out = embed(Tensor(x)).asnumpy()
    assert out.shape == (2, 4, 4, 8)
    padded = embed(Tensor(np.pad(x, ((0, 0), (0, 0), (0, 3), (0, 0))))).asnumpy()
    np.testing.assert_allclose(out, padded, rtol=1e-6, atol=1e-6)


class TrainForward(nn.Cell):
    def __init__(self, cell):
        super().__init__()
        self.cell = cell

    def construct(self, x):
        return self.cell(x)


def test_drop_path_is_active_only_in_training():
    x = Tensor(np.ones((4000, 3), np.float32))
    graph = TrainForward(DropPath(0.25))
    graph.set_train(False)
    np.testing.assert_array_equal(graph(x).asnumpy(), x.asnumpy())
    graph.set_train(True)
    out = graph(x).asnumpy()
    assert np.all(out == out[:, :1])  # one decision per sample
    assert set(np.unique(out)) <= {0.0, np.float32(1 / 0.75)}
    assert 0.2 < np.mean(out[:, 0] == 0) < 0.3  # 4000 draws: std of the fraction ~0.007
    assert np.mean(out) == pytest.approx(1.0, abs=0.05)  # expectation preserved
    with pytest.raises(ValueError, match="drop_prob"):
        DropPath(1.0)


# ---------------------------------------------------------------------------- graphs (narrow)
def check_transformer_train_step(net, images, num_classes, dead=()):
    """``check_train_step`` with the ACmix ``attn.fc.bias`` exempt (see its docstring)."""
    check_train_step(net, images, num_classes, exempt_suffixes=("attn.fc.bias",), dead=dead)


TRAIN_CASES = ("swin_tiny", "swin_tiny_acmix", "swin_tiny_conv")
SLOW_TRAIN_CASES = ("swin_small", "swin_small_acmix")


@pytest.mark.parametrize("name", TRAIN_CASES)
def test_narrow_model_trains_one_step(name):
    net = models.create_model(name, num_classes=5, **NARROW)
    check_transformer_train_step(net, random_images(2, 3, 64), 5)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW_TRAIN_CASES)
def test_narrow_small_model_trains_one_step(name):
    net = models.create_model(name, num_classes=5, **dict(NARROW, depths=(2, 2, 4, 2)))
    check_transformer_train_step(net, random_images(2, 3, 64), 5)


@pytest.fixture(scope="module")
def narrow_acmix():
    net = models.create_model("swin_tiny_acmix", num_classes=7, **NARROW)
    net.set_train(False)
    return net


@pytest.mark.parametrize("size", [64, 37])
def test_logits_are_the_pooled_head_of_the_features(narrow_acmix, size):
    # 37 px: not the built size and odd; patch embedding, merging and windows pad. The whole network's
    # features and logits against the official one (converted weights): tests/test_convert_models.py.
    logits, features = Features(narrow_acmix)(random_images(2, 3, size, seed=1))
    last = -(-size // 32)
    assert features.shape == (2, narrow_acmix.num_features, last, last)
    weight, bias = narrow_acmix.head.weight.asnumpy(), narrow_acmix.head.bias.asnumpy()
    expected = features.asnumpy().astype(np.float64).mean(axis=(2, 3)) @ weight.T + bias
    assert logits.shape == (2, 7) and np.abs(expected).max() > 1e-3
    np.testing.assert_allclose(logits.asnumpy(), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_out_indices_return_documented_strides_and_channels(narrow_acmix):
    net = models.create_model("swin_tiny_acmix", num_classes=7, out_indices=(0, 2, 3), **NARROW)
    ms.load_param_into_net(net, {p.name: p for p in narrow_acmix.get_parameters()})
    net.set_train(False)
    assert [info["reduction"] for info in net.feature_info] == [4, 8, 16, 32]
    assert [info["channels"] for info in net.feature_info] == [16, 32, 64, 128]
    size = 45
    stages, last = Features(net)(random_images(2, 3, size, seed=2))
    assert len(stages) == 3
    for stage, index in zip(stages, (0, 2, 3)):
        info = net.feature_info[index]
        side = -(-size // info["reduction"])
        assert stage.shape == (2, info["channels"], side, side)
    # the last stage output, normalised by the final norm, is forward_features
    normed = layer_norm_np(stages[-1].asnumpy().transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(normed, last.asnumpy(), rtol=1e-4, atol=1e-4)


def test_num_classes_zero_gives_pooled_features():
    net = models.create_model("swin_tiny", num_classes=0, **NARROW)
    assert isinstance(net.head, nn.Identity) and not any(p.name.startswith("head") for p in net.get_parameters())
    features = random_images(2, net.num_features, 3, seed=3)
    np.testing.assert_allclose(net.forward_head(features).asnumpy(), features.asnumpy().mean((2, 3)), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_full_size_swin_tiny_acmix_forward_224():
    net = models.create_model("swin_tiny_acmix")
    net.set_train(False)
    logits = net(random_images(1, 3, 224)).asnumpy()
    assert logits.shape == (1, 1000) and np.all(np.isfinite(logits))
