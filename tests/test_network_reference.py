"""Whole networks against their NumPy references (tests/network_reference.py), with mutation companions.

PVT-ACmix and SAN-ACmix have no official code to convert, and the ResNet-ACmix torch parity needs torch:
here narrow networks get ``sensitive_parameters_`` (every layer shapes the logits; BatchNorm statistics
calibrated through the reference) and their logits and ``forward_features`` must match the float64
NumPy reference. Each case also (a) shows the comparison sees the input (another input moves the logits by
far more than the tolerance) and (b) perturbs one early parameter of the model (swapped ACmix rates, one
projection weight, one conv-path tap, ...) and requires the comparison to fail by at least 10x its tolerance.
"""
import numpy as np
import pytest

import models
import network_reference as net_ref
from model_helpers import Features

TOLERANCE = 1e-4  # largest |difference| / largest |reference| (float32 model against float64 reference)
ACMIX_SAM = dict(kernel_conv=3, shift_impl="learnable", rate_mode="learnable")

CASES = {
    "pvt_tiny_acmix": dict(
        kwargs=dict(embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4), depths=(1, 1, 1, 1), img_size=64,
                    drop_path_rate=0.0),
        size=64,
        mutations=[("swap", "block1.0.attn.rate1", "block1.0.attn.rate2"),
                   ("add", "block1.0.attn.q.weight", 0.25),
                   ("add", "block1.0.attn.sr.weight", 0.25),
                   ("add", "block1.0.attn.dep_conv.weight", 0.25),
                   ("add", "patch_embed1.proj.weight", 0.25),
                   ("add", "block1.0.mlp.fc1.weight", 0.25)]),
    "san10_acmix": dict(
        kwargs=dict(layers=(1, 1, 1, 1, 1), base_width=32, kernels=(3, 3, 3, 3, 3)),
        size=64,
        mutations=[("swap", "layer0.0.sam.rate1", "layer0.0.sam.rate2"),
                   ("add", "layer0.0.sam.qkv.weight", 0.25),
                   ("add", "layer0.0.sam.conv_w.2.weight", 0.25),
                   ("add", "layer0.0.sam.dep_conv.weight", 0.25)]),
    "resnet_tiny_acmix": dict(
        kwargs={},
        size=32,
        mutations=[("swap", "layer1.0.conv2.rate1", "layer1.0.conv2.rate2"),
                   ("add", "layer1.0.conv2.qkv.weight", 0.25),
                   ("add", "layer1.0.conv2.dep_conv.weight", 0.25),
                   ("add", "layer1.0.conv2.conv_p.weight", 1.0)]),
}


def reference(name, net, params, x, calibrate=False):
    """(features, logits, stage maps) of the NumPy reference of model ``name`` with ``params``."""
    kwargs = CASES[name]["kwargs"]
    if name.startswith("pvt"):
        return net_ref.pvt_forward(x, params, kwargs["img_size"], 4, kwargs["num_heads"], (8, 8, 4, 4),
                                   (8, 4, 2, 1), kwargs["depths"], dict(ACMIX_SAM, kernel_conv=3))
    if name.startswith("san"):
        return net_ref.san_forward(x, params, kwargs["layers"], kwargs["kernels"], ACMIX_SAM, calibrate)
    return net_ref.resnet_forward(x, params, (1, 1, 1, 1), stem="cifar", calibrate=calibrate,
                                  acmix=dict(num_heads=4, kernel_att=5, **ACMIX_SAM))


class Built:
    """A narrow model with sensitive random parameters, its inputs and the reference outputs."""

    def __init__(self, name):
        case = CASES[name]
        self.net = models.create_model(name, num_classes=7, **case["kwargs"])
        self.net.set_train(False)
        size = case["size"]
        calibrated = None if name.startswith("pvt") else (  # BatchNorm networks
            lambda x, params, calibrate=False: reference(name, self.net, params, x, calibrate))
        self.params = net_ref.sensitive_network_(self.net, calibrated, (4, 3, size, size))
        rng = np.random.default_rng(5)
        self.inputs = [rng.standard_normal((2, 3, size, size)) for _ in range(2)]
        self.expected = [reference(name, self.net, self.params, x) for x in self.inputs]
        self.graph = Features(self.net)

    def outputs(self):
        """(logits, forward_features(x)) of the first input, as NumPy."""
        import mindspore as ms
        return [out.asnumpy() for out in self.graph(ms.Tensor(self.inputs[0].astype(np.float32)))]

    def error(self):
        return net_ref.relative_error(self.outputs()[0], self.expected[0][1])


@pytest.fixture(scope="module", params=sorted(CASES))
def built(request):
    return request.param, Built(request.param)


def test_network_matches_reference(built):
    name, case = built
    logits, features = case.outputs()
    expected_features, expected_logits, _ = case.expected[0]
    assert logits.shape == (2, 7) and features.shape == expected_features.shape
    assert net_ref.relative_error(features, expected_features) < TOLERANCE
    assert net_ref.relative_error(logits, expected_logits) < TOLERANCE
    # the comparison sees the input: the second input's logits differ by far more than the tolerance
    assert net_ref.relative_error(case.expected[1][1], expected_logits) > 0.1


def test_reference_comparison_catches_one_wrong_parameter(built):
    name, case = built
    errors = net_ref.mutation_errors(case.net, case.error, CASES[name]["mutations"])
    blind = {key: value for key, value in errors.items() if not value > 10 * TOLERANCE}
    assert not blind, f"the comparison does not see these changes: {blind}"
    assert case.error() < TOLERANCE  # restored
