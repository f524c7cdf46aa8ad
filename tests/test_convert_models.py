"""Whole-network parity of converted official checkpoints (issue 5).

Official-layout PyTorch networks (tests/torch_official.py, written from the documented behaviour) get
random weights, are saved as an official training checkpoint (.pth with a 'model' entry), converted with
tools/convert_official.py, loaded with create_model(..., checkpoint=...), and must give the same logits.
Narrow networks run by default; the full-size 224x224 ResNet-ACmix-26 and Swin-ACmix-T are `slow`.
"""
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs torch: the `torch-tests` extra (its CPU build)")

import mindspore as ms  # noqa: E402

import models  # noqa: E402
from models.convert import ConversionError  # noqa: E402
from tests.torch_official import OfficialResNetACmix, OfficialSwinACmix, randomize_  # noqa: E402

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


def _official(case):
    cls = OfficialResNetACmix if case["name"].startswith("resnet") else OfficialSwinACmix
    return randomize_(cls(**case["official"]), seed=7).eval()


def _save_official_checkpoint(module, path):
    # the official training script's layout: the weights under 'model' beside optimizer state and more
    torch.save({"model": module.state_dict(), "epoch": 299, "max_accuracy": 81.9}, path)


def _check_parity(case, tmp_path):
    official = _official(case)
    src, dst = str(tmp_path / "official.pth"), str(tmp_path / "converted.ckpt")
    _save_official_checkpoint(official, src)
    _, names, dropped = convert_official.convert(case["name"], src, dst, model_kwargs=case["ours"])
    assert not dropped
    classes = case["official"].get("num_classes", 1000)
    net = models.create_model(case["name"], num_classes=classes, checkpoint=dst, **case["ours"])
    net.set_train(False)
    x = np.random.RandomState(0).randn(2, 3, case["size"], case["size"]).astype(np.float32)
    with torch.no_grad():
        expected = official(torch.from_numpy(x)).numpy()
    got = net(ms.Tensor(x)).asnumpy()
    scale = np.abs(expected).max()
    assert scale > 1e-3
    assert np.abs(got - expected).max() / scale < 1e-4
    # every tensor of the model came from the checkpoint
    assert set(names) == {name for name, _ in net.parameters_and_names()}


@pytest.mark.parametrize("case", [SMALL_RESNET, SMALL_SWIN], ids=["resnet_acmix", "swin_acmix"])
def test_small_network_parity(case, tmp_path):
    _check_parity(case, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("case", [FULL_RESNET, FULL_SWIN], ids=["resnet26_acmix_224", "swin_tiny_acmix_224"])
def test_full_size_parity(case, tmp_path):
    _check_parity(case, tmp_path)


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
