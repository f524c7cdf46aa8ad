"""models/san.py: SAN-10/15/19 (patchwise) and SAN-ACmix-10/15/19 (proposal of docs/reference section 3).

Full-size models are only built (parameter counts, layout); graphs run on narrow variants
(layers [1]*5, base width 32, 64 px, batch 2) in graph mode. With the depths overridden the 10/15/19
variants share one graph, so SAN-10 and SAN-ACmix-10 train in the default run and the others under
``-m slow``.
"""
import numpy as np
import pytest

import mindspore as ms

import acmix_ms
import models
from models.profile import count_params
import network_reference as net_ref
from model_helpers import Features, check_train_step, random_images

BASELINES = ("san10", "san15", "san19")
ACMIX = ("san10_acmix", "san15_acmix", "san19_acmix")
DEPTHS = {"10": [2, 1, 2, 4, 1], "15": [3, 2, 3, 5, 2], "19": [3, 3, 4, 6, 3]}
# docs/reference: hszhao/SAN patchwise measured, and the SAN-ACmix proposal (millions).
REFERENCE_PARAMS_M = {"san10": 11.84, "san15": 16.18, "san19": 20.52,
                      "san10_acmix": 12.00, "san15_acmix": 16.41, "san19_acmix": 20.83}
# 64 px puts stages 0..4 at 32..2 px: the last stage needs kernel 3 (reflection pad 1 < 2 px).
NARROW = dict(layers=(1, 1, 1, 1, 1), base_width=32, kernels=(3, 3, 3, 3, 3))


@pytest.fixture(scope="module", autouse=True)
def graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE)


def sams(net):
    return [cell for _, cell in net.cells_and_names() if isinstance(cell, acmix_ms.ACmixPatchwise)]


@pytest.fixture(scope="module")
def full_models():
    return {name: models.create_model(name) for name in BASELINES + ACMIX}


def test_every_model_is_registered():
    assert set(BASELINES + ACMIX) <= set(models.list_models("san*"))
    for name in BASELINES + ACMIX:
        assert models.paper_info(name)["params_m"] > 0


@pytest.mark.parametrize("name", BASELINES + ACMIX)
def test_full_size_parameter_count(full_models, name):
    params_m = count_params(full_models[name]) / 1e6
    assert params_m == pytest.approx(REFERENCE_PARAMS_M[name], rel=5e-3)


@pytest.mark.parametrize("depth", sorted(DEPTHS))
def test_acmix_adds_only_the_conv_path(full_models, depth):
    """Per block: fc (6 -> 9, bias) + dep_conv (mid, 9, 3, 3) + two rates; nothing else changes."""
    base, mixed = full_models[f"san{depth}"], full_models[f"san{depth}_acmix"]
    mids = [cell.mid_channels for cell in sams(mixed)]
    assert count_params(mixed) - count_params(base) == sum(6 * 9 + 9 + 81 * mid + 2 for mid in mids)
    base_names = {name for name, _ in base.parameters_and_names()}
    extra = {name.split(".sam.", 1)[-1] for name, _ in mixed.parameters_and_names() if name not in base_names}
    assert extra == {"fc.weight", "fc.bias", "dep_conv.weight", "rate1", "rate2"}


@pytest.mark.parametrize("name", BASELINES + ACMIX)
def test_layout_of_full_models(full_models, name):
    net = full_models[name]
    depth = DEPTHS[name[3:5]]
    assert [len(getattr(net, f"layer{i}")) for i in range(5)] == depth
    assert [f["channels"] for f in net.feature_info] == [64, 256, 512, 1024, 2048]
    assert [f["reduction"] for f in net.feature_info] == [2, 4, 8, 16, 32]
    assert net.conv_in.weight.shape == (64, 3, 1, 1) and net.conv_in.bias is None
    assert [getattr(net, f"conv{i}").weight.shape[:2] for i in range(5)] == [
        (64, 64), (256, 64), (512, 256), (1024, 512), (2048, 1024)]
    assert net.fc.weight.shape == (1000, 2048)
    cells = sams(net)
    assert len(cells) == sum(depth)
    expected_kernels = [k for k, blocks in zip((3, 7, 7, 7, 7), depth) for _ in range(blocks)]
    assert [c.kernel_att for c in cells] == expected_kernels
    assert all(c.share_planes == 8 and c.rel_channels * 4 == c.mid_channels for c in cells)
    block = net.layer2[0]
    assert block.sam.qkv.weight.shape == (512 // 16 * 2 + 512 // 4, 512, 1, 1)
    assert block.conv.weight.shape == (512, 128, 1, 1) and block.conv.bias is not None
    if name.endswith("_acmix"):
        assert all(c.rate_mode == "learnable" and c.fc.has_bias for c in cells)
        np.testing.assert_array_equal(block.sam.dep_conv.weight.asnumpy(), acmix_ms.shift_kernels(128, 3))
    else:
        assert all(c.rate_mode == "attention" and not c.has_conv for c in cells)


def test_acmix_overrides_reach_every_block():
    fixed = models.create_model("san10_acmix", shift_impl="fixed", rates=(0.2, 0.9), kernel_conv=5, fc_bias=False)
    for cell in sams(fixed):
        assert not cell.dep_conv.weight.requires_grad and cell.dep_conv.kernel_size == 5
        assert cell.rate_values() == pytest.approx((0.2, 0.9))
        assert cell.fc.bias is None
    as_san = models.create_model("san10_acmix", rate_mode="attention")
    assert count_params(as_san) == count_params(models.create_model("san10"))
    conv_only = models.create_model("san10_acmix", rate_mode="conv")
    assert all(not cell.has_attention for cell in sams(conv_only))
    wide_share = models.create_model("san10", share_planes=4, kernels=(3, 5, 5, 5, 5))
    assert {(c.share_planes, c.weight_channels * 4 == c.mid_channels) for c in sams(wide_share)} == {(4, True)}
    assert {c.kernel_att for c in sams(wide_share)} == {3, 5}


def test_drop_path_rate_rises_linearly_over_blocks():
    net = models.create_model("san10", drop_path_rate=0.9)  # 10 blocks
    probs = [getattr(block.drop_path, "drop_prob", 0.0) for i in range(5) for block in getattr(net, f"layer{i}")]
    assert probs == pytest.approx(np.linspace(0.0, 0.9, 10).tolist())


@pytest.mark.parametrize("name, kwargs, error, words", [
    ("san10_acmix", {"unknown_knob": 3}, TypeError, ["unknown_knob", "shift_impl"]),
    ("san10", {"rate_mode": "learnable"}, TypeError, ["rate_mode"]),
    ("san10", {"kernels": (3, 7, 7)}, ValueError, ["kernels"]),
    ("san10", {"layers": (1, 1, 1, 1)}, ValueError, ["layers"]),
    ("san10", {"base_width": 24}, ValueError, ["base_width", "share_planes"]),
    ("san10", {"kernels": (3, 6, 7, 7, 7)}, ValueError, ["kernel_att", "odd"]),
    ("san10", {"out_indices": (5,)}, ValueError, ["out_indices"]),
    ("san10_acmix", {"rate_mode": "both"}, ValueError, ["rate_mode"]),
])
def test_bad_arguments_raise_clear_errors(name, kwargs, error, words):
    with pytest.raises(error) as excinfo:
        models.create_model(name, **kwargs)
    for word in words:
        assert word in str(excinfo.value)


def test_min_input_size_follows_the_kernels():
    # stage i runs at floor(H / 2**(i+1)) px and needs more than kernel // 2 px
    assert models.create_model("san10").min_input_size == 4 * 32  # kernel 7 at stage 4
    assert models.create_model("san10", **NARROW).min_input_size == 2 * 32
    assert models.create_model("san10", kernels=(7, 3, 3, 3, 3)).min_input_size == max(4 * 2, 2 * 32)
    assert models.create_model("san10_acmix", rate_mode="conv").min_input_size == 32  # no attention padding


# --------------------------------------------------------------------------- graphs (narrow, small)
TRAIN_CASES = ("san10", "san10_acmix")
SLOW_TRAIN_CASES = ("san15", "san19", "san15_acmix", "san19_acmix")


@pytest.mark.parametrize("name", TRAIN_CASES)
def test_narrow_model_trains_one_step(name):
    net = models.create_model(name, num_classes=5, **NARROW)
    check_train_step(net, random_images(2, 3, 64), 5)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW_TRAIN_CASES)
def test_narrow_model_trains_one_step_other_depths(name):
    net = models.create_model(name, num_classes=5, **NARROW)
    check_train_step(net, random_images(2, 3, 64), 5)


def test_forward_head_pools_then_classifies():
    # logits and features of a whole SAN-ACmix against the NumPy network: tests/test_network_reference.py
    net = models.create_model("san10_acmix", num_classes=7, **NARROW)
    params = net_ref.sensitive_parameters_(net)
    features = np.random.default_rng(4).standard_normal((2, net.num_features, 2, 3)).astype(np.float32)
    expected = features.mean(axis=(2, 3)) @ params["fc.weight"].T + params["fc.bias"]
    np.testing.assert_allclose(net.forward_head(ms.Tensor(features)).asnumpy(), expected, rtol=1e-5, atol=1e-5)


def test_out_indices_return_documented_strides_and_channels():
    net = models.create_model("san10", num_classes=0, out_indices=(0, 2, 4), in_chans=1, **NARROW)
    net.set_train(False)

    def forward(x, params, calibrate=False):
        return net_ref.san_forward(x, params, NARROW["layers"], NARROW["kernels"], {"rate_mode": "attention"},
                                   calibrate)

    params = net_ref.sensitive_network_(net, forward, (4, 1, 64, 64))
    x = np.random.default_rng(2).standard_normal((2, 1, 64, 64))
    stages, last = Features(net)(ms.Tensor(x.astype(np.float32)))
    expected_last, pooled, expected_stages = forward(x, params)
    assert len(stages) == 3
    for stage, index in zip(stages, (0, 2, 4)):
        info = net.feature_info[index]
        assert stage.shape == (2, info["channels"], 64 // info["reduction"], 64 // info["reduction"])
        assert net_ref.relative_error(stage.asnumpy(), expected_stages[index]) < 1e-4
    assert net_ref.relative_error(last.asnumpy(), expected_last) < 1e-4
    assert [info["channels"] for info in net.feature_info] == [32, 128, 256, 512, 1024]
    assert pooled.shape == (2, 1024)  # num_classes 0: the reference's "logits" are the pooled features


def test_too_small_input_raises_with_the_minimum_size():
    net = models.create_model("san10_acmix", num_classes=3, **dict(NARROW, kernels=(3, 7, 7, 7, 7)))
    net.set_train(False)
    with pytest.raises(ValueError, match="at least 128 px"):
        net(random_images(1, 3, 64))


@pytest.mark.slow
def test_full_size_san10_acmix_forward_224():
    net = models.create_model("san10_acmix")
    net.set_train(False)
    logits = net(random_images(1, 3, 224)).asnumpy()
    assert logits.shape == (1, 1000) and np.all(np.isfinite(logits))
