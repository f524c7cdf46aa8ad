"""models/pvt.py: PVT-T/S (v1) and PVT-ACmix-T/S (proposal P2).

Full-size models are only built (parameter counts, checkpoint names, LayerNorm eps, init); graphs run on
narrow variants (embed 16-64, one block per stage, 32-71 px, batch 2) in graph mode. Narrow PVT-S
variants only differ from the PVT-T ones by their depths, so they train under ``-m slow``.
"""
import numpy as np
import pytest
import mindspore as ms
from mindspore import nn

import models
from models.profile import count_params
import network_reference as net_ref
from model_helpers import Features, random_images
from test_models_swin import check_transformer_train_step

PVT_MODELS = ("pvt_tiny", "pvt_small", "pvt_tiny_acmix", "pvt_small_acmix")
# docs/reference: official PVT v1 (measured) and the documented PVT-ACmix proposal P2, millions.
REFERENCE_PARAMS_M = {"pvt_tiny": 13.23, "pvt_small": 24.49, "pvt_tiny_acmix": 13.40, "pvt_small_acmix": 24.83}
ACMIX_KEYS = ("attn.fc.weight", "attn.fc.bias", "attn.dep_conv.weight", "attn.rate1", "attn.rate2")
# 64 px: stage maps 16, 8, 4, 2; keys/values reduced to 2x2 in every stage.
NARROW = dict(embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4), depths=(1, 1, 1, 1), img_size=64,
              drop_path_rate=0.0)


def official_style_names(net):
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
    return [block for i in range(1, 5) for block in getattr(net, f"block{i}")]


# ------------------------------------------------------------------------------ registry and sizes
@pytest.fixture(scope="module")
def full_models():
    return {name: models.create_model(name) for name in PVT_MODELS}


def test_every_model_is_registered():
    assert set(PVT_MODELS) <= set(models.list_models("pvt*"))
    for name in PVT_MODELS:
        assert models.paper_info(name)["params_m"] > 0


@pytest.mark.parametrize("name", PVT_MODELS)
def test_full_size_parameter_count_matches_reference(full_models, name):
    measured = count_params(full_models[name]) / 1e6
    assert measured == pytest.approx(REFERENCE_PARAMS_M[name], rel=0.005)


def test_parameter_names_follow_official_pvt(full_models):
    acmix = official_style_names(full_models["pvt_tiny_acmix"])
    plain = official_style_names(full_models["pvt_tiny"])
    expected = {"patch_embed1.proj.weight": (64, 3, 4, 4), "patch_embed2.proj.weight": (128, 64, 2, 2),
                "patch_embed4.norm.weight": (512,), "pos_embed1": (1, 3136, 64), "pos_embed3": (1, 196, 320),
                "pos_embed4": (1, 50, 512), "cls_token": (1, 1, 512),
                "block1.0.attn.q.weight": (64, 64), "block1.0.attn.kv.weight": (128, 64),
                "block1.0.attn.sr.weight": (64, 64, 8, 8), "block1.0.attn.norm.weight": (64,),
                "block3.1.attn.sr.weight": (320, 320, 2, 2), "block2.1.mlp.fc1.weight": (1024, 128),
                "block4.1.mlp.fc2.weight": (512, 2048), "norm.weight": (512,), "head.weight": (1000, 512),
                # ACmix (P2): fc over 3N groups of d = 64, group conv 9*64 -> C
                "block3.0.attn.fc.weight": (9, 15, 1, 1), "block3.0.attn.fc.bias": (9,),
                "block3.0.attn.dep_conv.weight": (320, 9, 3, 3), "block3.0.attn.rate1": (1,)}
    for key, shape in expected.items():
        assert acmix[key] == shape, key
    assert not any(k.startswith("block4.") and ".attn.sr." in k for k in acmix)  # sr_ratio 1: no reduction
    assert plain == {k: v for k, v in acmix.items() if not k.endswith(ACMIX_KEYS)}
    # official PVT-T state_dict: pos_embed x4, cls_token, patch embeds 4 x 4, norm 2, head 2, blocks 8 x 14
    # (norm1, q, kv, proj, norm2, fc1, fc2) and sr + attn.norm (4) in the 6 blocks of stages 1-3
    assert len(plain) == 4 + 1 + 16 + 2 + 2 + 8 * 14 + 6 * 4


def test_layer_norm_eps_and_initialisation(full_models):
    net = full_models["pvt_small_acmix"]
    block = net.block2[0]
    # eps 1e-6 where the official code passes its norm_layer, torch's default 1e-5 elsewhere
    assert block.norm1.epsilon == 1e-6 and block.norm2.epsilon == 1e-6 and net.norm.epsilon == 1e-6
    assert net.patch_embed2.norm.epsilon == 1e-5 and block.attn.norm.epsilon == 1e-5
    assert block.attn.q.weight.asnumpy().std() == pytest.approx(0.02, rel=0.05)
    assert np.all(block.attn.kv.bias.asnumpy() == 0)
    for param in (net.pos_embed1, net.pos_embed3, net.cls_token):
        values = param.asnumpy()
        assert values.std() == pytest.approx(0.02, rel=0.2 if values.size < 1000 else 0.05)
    np.testing.assert_array_equal(block.attn.rate1.asnumpy(), [0.5])


def test_drop_path_rate_rises_linearly_over_blocks(full_models):
    blocks = blocks_of(full_models["pvt_small"])
    assert len(blocks) == 16 and isinstance(blocks[0].drop_path, nn.Identity)
    np.testing.assert_allclose([b.drop_path.drop_prob for b in blocks[1:]], np.linspace(0, 0.1, 16)[1:], rtol=1e-6)


# ------------------------------------------------------------------------------------- options
def test_acmix_overrides_reach_every_block():
    net = models.create_model("pvt_tiny_acmix", **NARROW, shift_impl="tensor", rate_mode="fixed", rates=(0.2, 0.8),
                              kernel_conv=5, fc_bias=False)
    blocks = blocks_of(net)
    for block in blocks:
        attn = block.attn
        assert (attn.shift_impl, attn.rate_mode, attn.kernel_conv) == ("tensor", "fixed", 5)
        assert (attn.fixed_rate1, attn.fixed_rate2) == (0.2, 0.8) and attn.fc.bias is None
    assert [b.attn.num_prefix_tokens for b in blocks] == [0, 0, 0, 1]  # the cls token lives in stage 4
    assert [b.attn.sr_ratio for b in blocks] == [8, 4, 2, 1]
    plain = models.create_model("pvt_tiny", **NARROW)
    assert not any(".fc." in p.name or "dep_conv" in p.name or "rate" in p.name for p in plain.get_parameters())


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(bar=2), TypeError, "'bar'"),
    (dict(shift_impl="roll"), ValueError, "shift_impl"),
    (dict(depths=(2, 2, 2)), ValueError, "depths"),
    (dict(sr_ratios=(8, 4, 2, 2)), ValueError, "sr_ratios"),
    (dict(out_indices=(2, 1)), ValueError, "out_indices"),
    (dict(img_size=16), ValueError, "img_size"),
])
def test_bad_arguments_raise_clear_errors(kwargs, error, words):
    with pytest.raises(error, match=words):
        models.create_model("pvt_tiny_acmix", **kwargs)


def test_position_embeddings_are_resized_bilinearly():
    net = models.create_model("pvt_tiny", **NARROW)
    assert net.pos_grids == ((16, 16), (8, 8), (4, 4), (2, 2))
    table = net.pos_embed2  # (1, 64, 32) for an 8 x 8 map
    same = net._resized_pos_embed(table, 1, 8, 8)
    np.testing.assert_array_equal(same.asnumpy(), table.asnumpy())
    resized = net._resized_pos_embed(table, 1, 5, 11).asnumpy()
    grid = table.asnumpy()[0].T.reshape(32, 8, 8)
    expected = net_ref.bilinear_half_pixel(grid, 5, 11).reshape(32, 55).T[None]
    assert resized.shape == (1, 55, 32)
    np.testing.assert_allclose(resized, expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- graphs (narrow)
TRAIN_CASES = ("pvt_tiny", "pvt_tiny_acmix")
SLOW_TRAIN_CASES = ("pvt_small", "pvt_small_acmix")


def check_pvt_train_step(net, images, num_classes):
    """``check_transformer_train_step``, knowing that the conv path of the very last block is dead: the
    head reads only the cls token, and the cls token receives only the attention path (proposal P2)."""
    last = f"block4.{len(net.block4) - 1}.attn."
    dead = {last + leaf for leaf in ("rate2", "fc.weight", "dep_conv.weight")}
    check_transformer_train_step(net, images, num_classes, dead & {p.name for p in net.trainable_params()})


@pytest.mark.parametrize("name", TRAIN_CASES)
def test_narrow_model_trains_one_step(name):
    # 64 px: 2 x 2 reduced keys in every stage (with a single key, softmax would leave q without gradient)
    net = models.create_model(name, num_classes=5, **NARROW)
    check_pvt_train_step(net, random_images(2, 3, 64), 5)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW_TRAIN_CASES)
def test_narrow_small_model_trains_one_step(name):
    net = models.create_model(name, num_classes=5, **dict(NARROW, depths=(2, 2, 2, 2)))
    check_pvt_train_step(net, random_images(2, 3, 64), 5)


@pytest.fixture(scope="module")
def narrow_acmix():
    """Narrow PVT-ACmix-T with random parameters under which every layer matters."""
    net = models.create_model("pvt_tiny_acmix", num_classes=7, **NARROW)
    net_ref.sensitive_parameters_(net, seed=5)
    net.set_train(False)
    return net


def reference(net, x):
    """(features, logits, stage maps) of the NumPy PVT-ACmix with the parameters of ``net``."""
    return net_ref.pvt_forward(x, net_ref.parameters_of(net), NARROW["img_size"], 4, NARROW["num_heads"], (8, 8, 4, 4),
                               (8, 4, 2, 1), NARROW["depths"], dict(kernel_conv=3, shift_impl="learnable",
                                                                    rate_mode="learnable"))


def test_logits_and_features_match_the_numpy_reference_at_another_size(narrow_acmix):
    # 71 px: not the built size (64) and odd; position embeddings are interpolated, remainders dropped.
    # The built size, with mutation checks: tests/test_network_reference.py.
    x = np.random.default_rng(1).standard_normal((2, 3, 71, 71))
    logits, features = Features(narrow_acmix)(ms.Tensor(x.astype(np.float32)))
    expected_features, expected_logits, _ = reference(narrow_acmix, x)
    assert logits.shape == (2, 7) and features.shape == (2, 1 + 2 * 2, 64)  # cls token + stage-4 patch tokens
    assert net_ref.relative_error(features.asnumpy(), expected_features) < 1e-4
    assert net_ref.relative_error(logits.asnumpy(), expected_logits) < 1e-4


def test_forward_head_reads_the_cls_token(narrow_acmix):
    tokens = np.random.default_rng(4).standard_normal((2, 5, 64)).astype(np.float32)
    params = net_ref.parameters_of(narrow_acmix)
    expected = tokens[:, 0] @ params["head.weight"].T + params["head.bias"]
    np.testing.assert_allclose(narrow_acmix.forward_head(ms.Tensor(tokens)).asnumpy(), expected, rtol=1e-5, atol=1e-5)


def test_out_indices_return_documented_strides_and_channels(narrow_acmix):
    net = models.create_model("pvt_tiny_acmix", num_classes=7, out_indices=(0, 1, 3), **NARROW)
    ms.load_param_into_net(net, {p.name: p for p in narrow_acmix.get_parameters()})
    net.set_train(False)
    assert [info["reduction"] for info in net.feature_info] == [4, 8, 16, 32]
    assert [info["channels"] for info in net.feature_info] == [16, 32, 48, 64]
    size = 48
    x = np.random.default_rng(2).standard_normal((2, 3, size, size))
    stages, tokens = Features(net)(ms.Tensor(x.astype(np.float32)))
    expected_tokens, _, expected_stages = reference(net, x)
    assert len(stages) == 3
    for stage, index in zip(stages, (0, 1, 3)):
        info = net.feature_info[index]
        assert stage.shape == (2, info["channels"], size // info["reduction"], size // info["reduction"])
        assert net_ref.relative_error(stage.asnumpy(), expected_stages[index]) < 1e-4
    assert net_ref.relative_error(tokens.asnumpy(), expected_tokens) < 1e-4


def test_too_small_input_raises_with_the_minimum_size(narrow_acmix):
    assert narrow_acmix.min_input_size == 32
    with pytest.raises(ValueError, match="at least 32 px"):
        narrow_acmix(random_images(1, 3, 24))


@pytest.mark.slow
def test_full_size_pvt_tiny_acmix_forward_224_matches_the_numpy_reference():
    net = models.create_model("pvt_tiny_acmix")
    params = net_ref.sensitive_parameters_(net, seed=6)
    net.set_train(False)
    x = np.random.default_rng(3).standard_normal((1, 3, 224, 224))
    logits = net(ms.Tensor(x.astype(np.float32))).asnumpy()
    _, expected, _ = net_ref.pvt_forward(x, params, 224, 4, (1, 2, 5, 8), (8, 8, 4, 4), (8, 4, 2, 1), (2, 2, 2, 2),
                                         dict(kernel_conv=3, shift_impl="learnable", rate_mode="learnable"))
    assert logits.shape == (1, 1000)
    assert net_ref.relative_error(logits, expected) < 1e-4
