"""Whole-network parity of converted official checkpoints (issue 5).

Official-layout PyTorch networks (tests/torch_official.py, written from the documented behaviour) get
random weights under which every layer shapes the logits (``sensitive_init_``: He-normal weights, BatchNorm
statistics calibrated on a batch, affine parameters and ACmix rates away from their init), are saved as an
official training checkpoint (.pth with a 'model' entry), converted with tools/convert_official.py, loaded with
create_model(..., checkpoint=...), and must give the same logits. Each parity test has a companion that
changes one early parameter of the converted checkpoint (swapped rates, one projection weight, one conv tap,
the positional term) and requires the comparison to fail: it proves the parity test can see such an error.
Narrow networks run by default; the full-size 224x224 ResNet-ACmix-26 and Swin-ACmix-T are `slow`.
"""
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs torch: the `torch-tests` extra (its CPU build)")

import mindspore as ms  # noqa: E402

import models  # noqa: E402
from model_helpers import Features  # noqa: E402
from models.convert import ConversionError  # noqa: E402
from tests.torch_official import OfficialResNetACmix, OfficialSwinACmix, sensitive_init_  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import convert_official  # noqa: E402

SMALL_RESNET = dict(official=dict(layers=(1, 1, 1, 1), widths=(16, 32, 64, 128), k_att=3, num_classes=10),
                    ours=dict(layers=(1, 1, 1, 1), base_width=16, kernel_att=3), name="resnet26_acmix", size=64)
SMALL_SWIN = dict(official=dict(img_size=32, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4,
                                num_classes=10),
                  ours=dict(img_size=32, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4,
                            drop_path_rate=0.0), name="swin_tiny_acmix", size=32)
FULL_RESNET = dict(official=dict(layers=(1, 2, 4, 1)), ours={}, name="resnet26_acmix", size=224)
FULL_SWIN = dict(official={}, ours=dict(drop_path_rate=0.0), name="swin_tiny_acmix", size=224)


TOLERANCE = 1e-4  # largest |logit difference| / largest |logit| accepted as parity
# One early parameter of the converted checkpoint changed at a time: the parity comparison must then fail
# by far (at least 10x its tolerance). Names are the MindSpore ones; "swap" exchanges the two ACmix rates.
MUTATIONS = {
    "resnet26_acmix": [("swap", "layer1.0.conv2.rate1", "layer1.0.conv2.rate2"),
                       ("add", "layer1.0.conv2.qkv.weight", 0.25),      # one weight of the q projection
                       ("add", "layer1.0.conv2.dep_conv.weight", 0.25),  # one tap of the conv path
                       ("add", "layer1.0.conv2.conv_p.weight", 1.0)],    # the positional encoding
    "swin_tiny_acmix": [("swap", "layers.0.blocks.0.attn.rate1", "layers.0.blocks.0.attn.rate2"),
                        ("add", "layers.0.blocks.0.attn.qkv.weight", 0.25),
                        ("add", "layers.0.blocks.0.attn.dep_conv.weight", 0.25),
                        ("add", "layers.0.blocks.1.attn.relative_position_bias_table", 0.5)],
}


def _official(case):
    cls = OfficialResNetACmix if case["name"].startswith("resnet") else OfficialSwinACmix
    size = case["size"]
    calibration = torch.from_numpy(np.random.RandomState(11).randn(8, 3, size, size).astype(np.float32))
    return sensitive_init_(cls(**case["official"]), calibration, seed=7)


def _save_official_checkpoint(module, path):
    # the official training script's layout: the weights under 'model' beside optimizer state and more
    torch.save({"model": module.state_dict(), "epoch": 299, "max_accuracy": 81.9}, path)


def _relative_error(got, expected):
    return np.abs(got - expected).max() / np.abs(expected).max()


class Converted:
    """An official network with sensitive random weights, its converted checkpoint, the MindSpore model
    loaded from it and the official logits of two inputs."""

    def __init__(self, case, tmp_path):
        self.official = _official(case)
        src, self.ckpt = str(tmp_path / "official.pth"), str(tmp_path / "converted.ckpt")
        _save_official_checkpoint(self.official, src)
        _, self.names, dropped = convert_official.convert(case["name"], src, self.ckpt, model_kwargs=case["ours"])
        assert not dropped
        classes = case["official"].get("num_classes", 1000)
        self.net = models.create_model(case["name"], num_classes=classes, checkpoint=self.ckpt, **case["ours"])
        self.net.set_train(False)
        rng = np.random.RandomState(0)
        self.inputs = [rng.randn(2, 3, case["size"], case["size"]).astype(np.float32) for _ in range(2)]
        with torch.no_grad():
            self.expected = [self.official(torch.from_numpy(x)).numpy() for x in self.inputs]
            self.expected_features = self.official.forward_features(torch.from_numpy(self.inputs[0])).numpy()
        self.graph = Features(self.net)

    def outputs(self):
        """(logits, forward_features) of the first input."""
        return [out.asnumpy() for out in self.graph(ms.Tensor(self.inputs[0]))]

    def error(self):
        """Relative error of the MindSpore logits of the first input against the official ones."""
        return _relative_error(self.outputs()[0], self.expected[0])


def _check_parity(converted):
    logits, features = converted.outputs()
    assert _relative_error(logits, converted.expected[0]) < TOLERANCE
    assert features.shape == converted.expected_features.shape
    assert _relative_error(features, converted.expected_features) < TOLERANCE
    # every tensor of the model came from the checkpoint
    assert set(converted.names) == {name for name, _ in converted.net.parameters_and_names()}
    # the comparison sees the input: another input moves the logits by far more than the tolerance
    assert _relative_error(converted.expected[1], converted.expected[0]) > 0.1


def _check_mutations(converted, mutations):
    """Each mutation of the converted checkpoint must break the parity; the original values then restore it."""
    original = {name: value.asnumpy() for name, value in ms.load_checkpoint(converted.ckpt).items()
                if isinstance(value, ms.Parameter)}  # the file also holds metadata strings
    params = dict(converted.net.parameters_and_names())
    for kind, name, arg in mutations:
        if kind == "swap":
            mutated = {name: original[arg], arg: original[name]}
        else:
            values = original[name].copy()
            values.reshape(-1)[values.size // 3] += arg  # one element
            mutated = {name: values}
        for key, values in mutated.items():
            params[key].set_data(ms.Tensor(values))
        error = converted.error()
        for key in mutated:
            params[key].set_data(ms.Tensor(original[key]))
        assert error > 10 * TOLERANCE, f"{kind} {name}: parity still holds ({error:.2e}), the test is blind to it"
    assert converted.error() < TOLERANCE


@pytest.fixture(scope="module", params=[SMALL_RESNET, SMALL_SWIN], ids=["resnet_acmix", "swin_acmix"])
def small_converted(request, tmp_path_factory):
    return request.param["name"], Converted(request.param, tmp_path_factory.mktemp("parity"))


def test_small_network_parity(small_converted):
    _check_parity(small_converted[1])


def test_small_network_parity_catches_one_wrong_parameter(small_converted):
    name, converted = small_converted
    _check_mutations(converted, MUTATIONS[name])


@pytest.mark.slow
@pytest.mark.parametrize("case", [FULL_RESNET, FULL_SWIN], ids=["resnet26_acmix_224", "swin_tiny_acmix_224"])
def test_full_size_parity(case, tmp_path):
    converted = Converted(case, tmp_path)
    _check_parity(converted)
    _check_mutations(converted, MUTATIONS[case["name"]][:2])


def test_fine_tuning_drops_the_head(tmp_path):
    official = _official(SMALL_SWIN)
    src, dst = str(tmp_path / "official.pth"), str(tmp_path / "converted.ckpt")
    torch.save(official.state_dict(), src)  # a bare state_dict is accepted too
    net, names, dropped = convert_official.convert("swin_tiny_acmix", src, dst, num_classes=3,
                                                   model_kwargs=SMALL_SWIN["ours"])
    assert dropped == ("head.",)
    assert not any(n.startswith("head.") for n in names)
    assert net.head.weight.shape == (3, 32)  # 2 stages: embed 16 -> 32 features


def test_wrong_model_lists_the_differences(tmp_path):
    official = _official(SMALL_SWIN)
    src = str(tmp_path / "official.pth")
    _save_official_checkpoint(official, src)
    with pytest.raises(ConversionError, match="official keys with no place in the model"):
        convert_official.convert("swin_tiny", src, str(tmp_path / "x.ckpt"), model_kwargs=SMALL_SWIN["ours"])
    assert not os.path.exists(tmp_path / "x.ckpt")


def test_cli_reports_failure_and_success(tmp_path, capsys):
    official = _official(SMALL_SWIN)
    src = str(tmp_path / "official.pth")
    _save_official_checkpoint(official, src)
    assert convert_official.main(["--model", "swin_tiny", "--src", src, "--dst", str(tmp_path / "a.ckpt")]) == 2
    assert "conversion failed" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "a.ckpt")
    # success, with the model options as YAML and a new classifier width (the head is left out)
    overrides = "{img_size: 32, embed_dim: 16, depths: [2, 2], num_heads: [2, 4], window_size: 4}"
    dst = str(tmp_path / "b.ckpt")
    assert convert_official.main(["--model", "swin_tiny_acmix", "--src", src, "--dst", dst, "--model_overrides",
                                  overrides, "--num_classes", "3", "--image_size", "32"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {dst}: " in printed and "(left out for fine-tuning: head.*)" in printed
    stored = {name: value for name, value in ms.load_checkpoint(dst).items() if isinstance(value, ms.Parameter)}
    state = official.state_dict()
    np.testing.assert_array_equal(stored["layers.0.blocks.0.attn.rate1"].asnumpy(),
                                  state["layers.0.blocks.0.attn.rate1"].numpy())
    np.testing.assert_array_equal(stored["patch_embed.proj.weight"].asnumpy(), state["patch_embed.proj.weight"].numpy())
    assert stored["head.weight"].shape == (3, 32)  # a fresh head of the requested width
    # bad option values fail early with exit code 2
    assert convert_official.main(["--model", "swin_tiny_acmix", "--src", src, "--dst", str(tmp_path / "c.ckpt"),
                                  "--num_classes", "0"]) == 2
    assert "--num_classes must be >= 1" in capsys.readouterr().err
