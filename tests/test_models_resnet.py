"""models/resnet.py: ResNet-26/38/50, ResNet-ACmix-26/38/50 and the 32-px demo variants.

Full-size models are only built (parameter counts, layout, init); graphs run on narrow variants
(layers [1, 1, 1, 1], base width 16, 28-64 px, batch 2) in graph mode. The 26/38/50 variants share
one narrow graph once their depths are overridden, so only one of each kind trains in the default run;
the others train under ``-m slow``. Logits, features and stage maps are checked against the NumPy network
reference (tests/network_reference.py).
"""
import os

import numpy as np
import pytest

import mindspore as ms
from mindspore import nn

import acmix_ms
import models
from models.profile import count_params
from models.resnet import ResNet

import network_reference as net_ref
from model_helpers import Features, check_train_step, random_images

BASELINES = ("resnet26", "resnet38", "resnet50")
ACMIX = ("resnet26_acmix", "resnet38_acmix", "resnet50_acmix")
TINY = ("resnet_tiny", "resnet_tiny_acmix")
# docs/reference Fig. 4 table: parameters measured on the official PyTorch code (millions).
REFERENCE_PARAMS_M = {"resnet26": 13.70, "resnet38": 19.63, "resnet50": 25.56,
                      "resnet26_acmix": 10.49, "resnet38_acmix": 14.41, "resnet50_acmix": 18.33}
NARROW = dict(layers=(1, 1, 1, 1), base_width=16)
OFFICIAL_KEYS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "reference",
                             "keys_resnet_acmix_50.txt")


@pytest.fixture(scope="module", autouse=True)
def graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE)


def conv2_cells(net):
    return [cell for name, cell in net.cells_and_names() if name.endswith(".conv2")]


# ------------------------------------------------------------------------------ registry and sizes
@pytest.fixture(scope="module")
def full_models():
    return {name: models.create_model(name) for name in BASELINES + ACMIX + TINY}


def test_every_model_is_registered():
    assert set(BASELINES + ACMIX + TINY) <= set(models.list_models("resnet*"))
    for name in BASELINES + ACMIX:
        assert models.paper_info(name)["params_m"] > 0


@pytest.mark.parametrize("name", BASELINES + ACMIX)
def test_full_size_parameter_count_matches_official(full_models, name):
    params_m = count_params(full_models[name]) / 1e6
    assert params_m == pytest.approx(REFERENCE_PARAMS_M[name], rel=5e-3)


@pytest.mark.parametrize("name", BASELINES + ACMIX + TINY)
def test_layout_of_full_models(full_models, name):
    net = full_models[name]
    info = net.feature_info
    tiny = name in TINY
    width = 16 if tiny else 64
    assert [f["channels"] for f in info] == [4 * width * 2 ** i for i in range(4)]
    assert [f["reduction"] for f in info] == ([1, 2, 4, 8] if tiny else [4, 8, 16, 32])
    assert net.num_features == info[-1]["channels"]
    assert net.fc.weight.shape == (1000, info[-1]["channels"])
    assert net.conv1.kernel_size == ((3, 3) if tiny else (7, 7))
    blocks = [len(getattr(net, f"layer{i + 1}")) for i in range(4)]
    assert blocks == list(net.layers)
    convs = conv2_cells(net)
    assert len(convs) == sum(blocks)
    if name.endswith("_acmix"):
        assert all(isinstance(c, acmix_ms.ACmixLocal) for c in convs)
        assert {(c.kernel_att, c.num_heads, c.kernel_conv) for c in convs} == {(5 if tiny else 7, 4, 3)}
        assert all(not c.fc.has_bias and c.rate_mode == "learnable" for c in convs)
    else:
        assert all(type(c) is nn.Conv2d and c.kernel_size == (3, 3) for c in convs)
    # V1.5: the stride sits in conv2 and the downsample of the first block of layers 2-4
    for stage in range(4):
        first = getattr(net, f"layer{stage + 1}")[0]
        stride = 1 if stage == 0 else 2
        assert first.conv2.stride in (stride, (stride, stride))  # ACmixLocal: int, nn.Conv2d: pair
        assert first.downsample[0].stride == (stride, stride)


def _official_style_names(net):
    """Our parameter names/shapes renamed to PyTorch's (BN, fused qkv split into conv1/conv2/conv3)."""
    renames = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}
    out = {}
    for name, param in net.parameters_and_names():
        prefix, leaf = name.rsplit(".", 1)
        shape = tuple(param.shape)
        if prefix.endswith(".qkv"):
            for index in (1, 2, 3):
                out[f"{prefix[:-3]}conv{index}.{leaf}"] = (shape[0] // 3,) + shape[1:]
        else:
            out[f"{prefix}.{renames.get(leaf, leaf)}"] = shape
    return out


def test_parameter_names_map_onto_official_checkpoint(full_models):
    names = _official_style_names(full_models["resnet50_acmix"])
    # Reference listing of the strided block layer2.0 (docs/reference section 5).
    expected_layer2 = {
        "conv1.weight": (128, 256, 1, 1), "conv2.rate1": (1,), "conv2.rate2": (1,),
        "conv2.conv1.weight": (128, 128, 1, 1), "conv2.conv1.bias": (128,), "conv2.conv3.bias": (128,),
        "conv2.conv_p.weight": (32, 2, 1, 1), "conv2.conv_p.bias": (32,), "conv2.fc.weight": (9, 12, 1, 1),
        "conv2.dep_conv.weight": (128, 9, 3, 3), "bn2.running_var": (128,), "conv3.weight": (512, 128, 1, 1),
        "downsample.0.weight": (512, 256, 1, 1), "downsample.1.weight": (512,)}
    for key, shape in expected_layer2.items():
        assert names[f"layer2.0.{key}"] == shape, key
    assert "layer2.0.conv2.fc.bias" not in names and "layer2.0.conv2.dep_conv.bias" not in names
    if not os.path.exists(OFFICIAL_KEYS):
        pytest.skip("official key list not available")
    official = {}
    with open(OFFICIAL_KEYS) as handle:
        for line in handle:
            key, shape = line.rstrip("\n").split("\t")
            if not key.endswith("num_batches_tracked"):
                official[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    assert names == official


# --------------------------------------------------------------------------------- initialisation
def test_initialisation_keeps_shift_kernels_and_official_init_reproduces_reinit():
    default = models.create_model("resnet26_acmix", layers=(1, 1, 1, 1))
    official = models.create_model("resnet26_acmix", layers=(1, 1, 1, 1), official_init=True)
    for net in (default, official):
        conv = net.conv1.weight.asnumpy()  # (64, 3, 7, 7): Kaiming normal, fan_out = 64 * 49
        assert conv.std() == pytest.approx(np.sqrt(2.0 / (64 * 49)), rel=0.05)
        qkv = net.layer3[0].conv2.qkv.weight.asnumpy()  # (768, 512, 1, 1): fan_out 768
        assert qkv.std() == pytest.approx(np.sqrt(2.0 / 768), rel=0.05)
        gammas = [c.gamma.asnumpy() for _, c in net.cells_and_names() if isinstance(c, nn.BatchNorm2d)]
        betas = [c.beta.asnumpy() for _, c in net.cells_and_names() if isinstance(c, nn.BatchNorm2d)]
        assert all(np.all(g == 1) for g in gammas) and all(np.all(b == 0) for b in betas)
    for width, cell in zip((64, 128, 256, 512), conv2_cells(default)):
        np.testing.assert_array_equal(cell.dep_conv.weight.asnumpy(), acmix_ms.shift_kernels(width, 3))
    for width, cell in zip((64, 128, 256, 512), conv2_cells(official)):
        weight = cell.dep_conv.weight.asnumpy()  # (C, 9, 3, 3), Kaiming normal with fan_out = 9 C
        assert not np.array_equal(weight, acmix_ms.shift_kernels(width, 3))
        assert weight.std() == pytest.approx(np.sqrt(2.0 / (9 * width)), rel=0.1)


# ------------------------------------------------------------------------ overrides and arguments
def test_acmix_overrides_reach_every_block():
    fixed = models.create_model("resnet26_acmix", layers=(1, 1, 1, 1), shift_impl="fixed", kernel_att=5,
                                num_heads=8, rates=(0.3, 0.7))
    for cell in conv2_cells(fixed):
        assert not cell.dep_conv.weight.requires_grad
        assert (cell.kernel_att, cell.num_heads) == (5, 8)
        assert cell.rate_values() == pytest.approx((0.3, 0.7))
    attention = models.create_model("resnet26_acmix", layers=(1, 1, 1, 1), rate_mode="attention")
    names = [name for name, _ in attention.parameters_and_names()]
    assert not [n for n in names if ".fc." in n or "dep_conv" in n or "rate" in n]
    assert len(conv2_cells(attention)) == 4
    no_bias = models.create_model("resnet26_acmix", layers=(1, 1, 1, 1), qkv_bias=False)
    assert all(cell.qkv.bias is None for cell in conv2_cells(no_bias))


def test_drop_path_rate_rises_linearly_over_blocks():
    net = models.create_model("resnet26", layers=(1, 2, 1, 1), drop_path_rate=0.4)
    blocks = [block for i in range(4) for block in getattr(net, f"layer{i + 1}")]
    probs = [getattr(block.drop_path, "drop_prob", 0.0) for block in blocks]
    assert probs == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    assert isinstance(models.create_model("resnet26", layers=(1, 1, 1, 1)).layer4[0].drop_path, nn.Identity)


@pytest.mark.parametrize("name, kwargs, error, words", [
    ("resnet26_acmix", {"not_an_option": 1}, TypeError, ["not_an_option", "kernel_att"]),
    ("resnet26", {"shift_impl": "fixed"}, TypeError, ["shift_impl"]),
    ("resnet26", {"official_init": True}, TypeError, ["official_init"]),
    ("resnet26", {"stem": "deep"}, ValueError, ["stem", "imagenet"]),
    ("resnet26", {"layers": (1, 1, 1)}, ValueError, ["layers"]),
    ("resnet26", {"out_indices": (4,)}, ValueError, ["out_indices"]),
    ("resnet26", {"drop_path_rate": 1.0}, ValueError, ["drop_path_rate"]),
    ("resnet26_acmix", {"shift_impl": "fixed", "official_init": True}, ValueError, ["official_init", "fixed"]),
    ("resnet26_acmix", {"shift_impl": "shifty"}, ValueError, ["shift_impl"]),
    ("resnet26_acmix", {"base_width": 18}, ValueError, ["out_channels", "num_heads"]),
])
def test_bad_arguments_raise_clear_errors(name, kwargs, error, words):
    with pytest.raises(error) as excinfo:
        models.create_model(name, **kwargs)
    for word in words:
        assert word in str(excinfo.value)


# --------------------------------------------------------------------------- graphs (narrow, small)
TRAIN_CASES = {
    # name: (overrides, input channels, image size); default-run representatives first
    "resnet26": (NARROW, 3, 64),
    "resnet26_acmix": (dict(NARROW, kernel_att=3), 3, 64),
    "resnet_tiny": ({}, 1, 28),
    "resnet_tiny_acmix": ({}, 1, 28),  # the Fashion-MNIST demo input: odd maps (7 px) before the last stride
}
SLOW_TRAIN_CASES = {"resnet38": (NARROW, 3, 64), "resnet50": (NARROW, 3, 64),
                    "resnet38_acmix": (dict(NARROW, kernel_att=3), 3, 64),
                    "resnet50_acmix": (dict(NARROW, kernel_att=3), 3, 64)}


def _train_case(name, overrides, channels, size):
    net = models.create_model(name, num_classes=5, in_chans=channels, **overrides)
    check_train_step(net, random_images(2, channels, size), 5)


@pytest.mark.parametrize("name", list(TRAIN_CASES))
def test_narrow_model_trains_one_step(name):
    _train_case(name, *TRAIN_CASES[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW_TRAIN_CASES))
def test_narrow_model_trains_one_step_other_depths(name):
    _train_case(name, *SLOW_TRAIN_CASES[name])


@pytest.mark.parametrize("name, size, reductions", [("resnet_tiny", 28, (1, 2, 4, 8)),
                                                    ("resnet26", 64, (4, 8, 16, 32))])
def test_logits_and_features_match_the_numpy_reference(name, size, reductions):
    """construct and forward_features against the NumPy network (tests/network_reference.py), with
    parameters under which every layer matters (a wrong layer or wiring shows far above the tolerance)."""
    overrides = {} if name == "resnet_tiny" else NARROW
    net = models.create_model(name, num_classes=7, in_chans=1, **overrides)
    net.set_train(False)
    stem = "cifar" if name == "resnet_tiny" else "imagenet"

    def forward(x, params, calibrate=False):
        return net_ref.resnet_forward(x, params, (1, 1, 1, 1), stem=stem, calibrate=calibrate)

    params = net_ref.sensitive_network_(net, forward, (4, 1, size, size))
    x = np.random.default_rng(1).standard_normal((2, 1, size, size))
    logits, features = Features(net)(ms.Tensor(x.astype(np.float32)))
    expected_features, expected_logits, _ = forward(x, params)
    last = -(-size // reductions[-1])
    assert features.shape == (2, net.num_features, last, last) and logits.shape == (2, 7)
    assert net_ref.relative_error(features.asnumpy(), expected_features) < 1e-4
    assert net_ref.relative_error(logits.asnumpy(), expected_logits) < 1e-4


def test_forward_head_pools_then_classifies():
    net = models.create_model("resnet_tiny", num_classes=7)
    params = net_ref.sensitive_parameters_(net)
    features = np.random.default_rng(4).standard_normal((2, net.num_features, 3, 5)).astype(np.float32)
    expected = features.mean(axis=(2, 3)) @ params["fc.weight"].T + params["fc.bias"]
    np.testing.assert_allclose(net.forward_head(ms.Tensor(features)).asnumpy(), expected, rtol=1e-5, atol=1e-5)


def test_out_indices_return_documented_strides_and_channels():
    net = models.create_model("resnet26_acmix", num_classes=0, out_indices=(0, 1, 2, 3), **NARROW, kernel_att=3)
    net.set_train(False)

    def forward(x, params, calibrate=False):
        return net_ref.resnet_forward(x, params, (1, 1, 1, 1), calibrate=calibrate,
                                      acmix=dict(num_heads=4, kernel_att=3, kernel_conv=3))

    params = net_ref.sensitive_network_(net, forward, (4, 3, 64, 64))
    x = np.random.default_rng(2).standard_normal((2, 3, 64, 64))
    stages, last = Features(net)(ms.Tensor(x.astype(np.float32)))
    expected_last, _, expected_stages = forward(x, params)
    assert len(stages) == 4
    for stage, info, expected in zip(stages, net.feature_info, expected_stages):
        assert stage.shape == (2, info["channels"], 64 // info["reduction"], 64 // info["reduction"])
        assert net_ref.relative_error(stage.asnumpy(), expected) < 1e-4
    assert net_ref.relative_error(last.asnumpy(), expected_last) < 1e-4
    assert [info["reduction"] for info in net.feature_info] == [4, 8, 16, 32]
    assert [info["channels"] for info in net.feature_info] == [64, 128, 256, 512]


def test_num_classes_zero_gives_pooled_features():
    net = models.create_model("resnet_tiny", num_classes=0)
    net.set_train(False)
    features = net(random_images(2, 3, 16, seed=3))
    assert features.shape == (2, net.num_features)


def test_too_small_input_raises_with_the_minimum_size():
    net = models.create_model("resnet_tiny_acmix", num_classes=3, kernel_att=3)
    net.set_train(False)
    size = net.min_input_size  # the last stage must keep 2 px for a reflection pad of 1
    assert net(random_images(1, 3, size)).shape == (1, 3)
    with pytest.raises(ValueError, match=f"at least {size} px"):
        net(random_images(1, 3, size - 1))


def test_min_input_size_follows_the_attention_pad():
    # ceil(H / 16) px reach the single layer4 block of ResNet-26; ceil(H / 32) the later blocks of ResNet-50
    for name, kernel, divisor in [("resnet26_acmix", 7, 16), ("resnet50_acmix", 7, 32), ("resnet50_acmix", 3, 32)]:
        size = models.create_model(name, layers=(1, 1, 1, 1) if name == "resnet26_acmix" else (3, 4, 6, 3),
                                   base_width=16, kernel_att=kernel).min_input_size
        pad = kernel // 2
        assert -(-size // divisor) == pad + 1 and -(-(size - 1) // divisor) == pad
    assert ResNet((1, 1, 1, 1), base_width=16).min_input_size == 1  # plain convs: no limit


@pytest.mark.slow
def test_full_size_resnet26_acmix_forward_224():
    net = models.create_model("resnet26_acmix")
    net.set_train(False)
    logits = net(random_images(1, 3, 224)).asnumpy()
    assert logits.shape == (1, 1000) and np.all(np.isfinite(logits))


def test_attention_impl_override_reaches_every_block():
    net = models.create_model("resnet_tiny_acmix", num_classes=10, attention_impl="lean")
    impls = {type(cell.aggregate).__name__ for cell in conv2_cells(net)}
    assert impls == {"LeanLocalAttention"}
