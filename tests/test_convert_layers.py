"""Layer-level parity: official-layout PyTorch ACmix layers (tests/torch_official.py) converted with
models.convert give the same outputs in our acmix_ms Cells (issue 5, "one ACmix layer of each kind")."""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs torch: the `torch-tests` extra (its CPU build)")

import mindspore as ms  # noqa: E402
from mindspore import Tensor  # noqa: E402

from acmix_ms import ACmixLocal, ACmixWindow  # noqa: E402
from models.convert import ConversionError, convert_state_dict, model_parameter_shapes  # noqa: E402
from tests.torch_official import OfficialACmixLocal, OfficialSwinBlock, randomize_  # noqa: E402


def load_into(cell, official_module, **kwargs):
    state = {k: v.numpy() for k, v in official_module.state_dict().items()}
    converted = convert_state_dict(state, model_parameter_shapes(cell), **kwargs)
    ms.load_param_into_net(cell, {k: ms.Parameter(Tensor(v), name=k) for k, v in converted.items()}, strict_load=True)
    return converted


def relative_error(ours, reference):
    return float(np.abs(ours - reference).max() / (np.abs(reference).max() + 1e-12))


@pytest.mark.parametrize("stride,size,impl", [(1, 9, "unfold"), (2, 12, "unfold"), (2, 12, "lean")])
def test_local_layer_matches_official(stride, size, impl):
    torch.manual_seed(0)
    official = randomize_(OfficialACmixLocal(8, 16, kernel_att=5, head=4, kernel_conv=3, stride=stride), seed=1)
    ours = ACmixLocal(8, 16, kernel_att=5, num_heads=4, kernel_conv=3, stride=stride, fc_bias=False,
                      attention_impl=impl)
    converted = load_into(ours, official)
    assert set(converted) == set(model_parameter_shapes(ours))
    x = np.random.RandomState(2).randn(2, 8, size, size).astype(np.float32)
    with torch.no_grad():
        expected = official(torch.from_numpy(x)).numpy()
    got = ours(Tensor(x)).asnumpy()
    assert got.shape == expected.shape
    assert relative_error(got, expected) < 1e-4


@pytest.mark.parametrize("shift", [0, 2])
def test_window_layer_matches_official(shift):
    dim, heads, window, size = 16, 2, 4, 8
    block = randomize_(OfficialSwinBlock(dim, (size, size), heads, window, shift), seed=3)
    official = block.attn
    ours = ACmixWindow(dim, heads, window_size=window, shift_size=shift, conv_on_shifted_map=True)
    load_into(ours, official)
    x = np.random.RandomState(4).randn(2, size, size, dim).astype(np.float32)
    with torch.no_grad():
        y = torch.from_numpy(x)
        if shift:
            y = torch.roll(y, (-shift, -shift), (1, 2))
        y = official(y, block.attn_mask)
        if shift:
            y = torch.roll(y, (shift, shift), (1, 2))
    got = ours(Tensor(x)).asnumpy()
    assert relative_error(got, y.numpy()) < 1e-4


def test_conversion_lists_every_problem():
    official = OfficialACmixLocal(8, 16, kernel_att=5, head=4)
    state = {k: v.numpy() for k, v in official.state_dict().items()}
    state["extra.weight"] = np.zeros(3, np.float32)
    state["fc.weight"] = np.zeros((9, 5, 1, 1), np.float32)
    del state["rate2"]
    ours = ACmixLocal(8, 16, kernel_att=5, num_heads=4, fc_bias=False)
    with pytest.raises(ConversionError) as info:
        convert_state_dict(state, model_parameter_shapes(ours))
    message = str(info.value)
    assert "extra.weight" in message and "rate2" in message and "fc.weight (9, 5, 1, 1)" in message
