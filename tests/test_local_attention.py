"""The lean (offset-by-offset, hand-written backward) and fused (C++ kernel on CPU) local attention equal the
unfold reference, forward and gradients, for strides, dilations and odd sizes (issue 7); the per-device
kernel registry, the 'auto' default and its fallbacks behave as documented; a network running the kernel
exports a portable MINDIR with the same outputs."""
import warnings

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn, ops

import models
from acmix_ms import ACmixLocal, attention_backends, set_attention_impl
from acmix_ms import local_attention
from acmix_ms.kernels import build as kernel_build
from acmix_ms.local_attention import (LOCAL_ATTENTION_IMPLS, FusedLocalAttention,
                                      UnfoldLocalAttention, register_device_aggregation)

ON_CPU = ms.get_context("device_target") == "CPU"


class _Objective(nn.Cell):
    """A non-trivial scalar of the attention output, so every gradient entry is exercised."""

    def __init__(self, attention, pad, probe):
        super().__init__()
        self.attention, self.pad, self.probe = attention, pad, probe

    def construct(self, query, key, value):
        pad = (self.pad,) * 4
        out = self.attention(query, ops.pad(key, pad, mode="reflect"), ops.pad(value, pad, mode="reflect"))
        return (out * self.probe).sum()


def _loss_and_grads(attention, kernel, stride, dilation, size, seed, batch_heads=3, dim=4, width=None):
    rng = np.random.RandomState(seed)
    width = width or size
    out_h, out_w = (size + stride - 1) // stride, (width + stride - 1) // stride
    query = Tensor(rng.randn(batch_heads, dim, out_h, out_w).astype(np.float32))
    key, value = (Tensor(rng.randn(batch_heads, dim, size, width).astype(np.float32)) for _ in range(2))
    probe = Tensor(rng.randn(batch_heads, dim, out_h, out_w).astype(np.float32))
    objective = _Objective(attention, dilation * (kernel - 1) // 2, probe)
    loss, grads = ms.value_and_grad(objective, grad_position=(0, 1, 2))(query, key, value)
    return [loss.asnumpy()] + [g.asnumpy() for g in grads]


# (kernel, stride, dilation, height, width): stride 2 with odd and even sizes, dilation 2, non-square, k=7
GEOMETRIES = [(3, 1, 1, 7, 7), (5, 2, 1, 11, 11), (3, 2, 2, 10, 10), (7, 1, 1, 9, 12), (3, 3, 1, 8, 7)]


@pytest.mark.parametrize("impl", ["lean", "fused"])
@pytest.mark.parametrize("kernel,stride,dilation,height,width", GEOMETRIES)
def test_matches_unfold_forward_and_gradients(impl, kernel, stride, dilation, height, width):
    seed = kernel * 10 + stride
    reference = _loss_and_grads(UnfoldLocalAttention(kernel, stride, dilation), kernel, stride, dilation, height,
                                seed, width=width)
    result = _loss_and_grads(LOCAL_ATTENTION_IMPLS[impl](kernel, stride, dilation), kernel, stride, dilation,
                             height, seed, width=width)
    for ours, expected in zip(result, reference):
        np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5)
    assert np.abs(reference[2]).max() > 0  # the key gradient is not trivially zero


@pytest.mark.skipif(not ON_CPU, reason="the C++ kernel is the CPU backend's")
def test_fused_runs_the_cpu_kernel_on_cpu():
    attention = FusedLocalAttention(3)
    assert attention.backend == "CPU"
    assert type(attention.aggregate).__name__ == "CpuLocalAggregation"


def test_fused_falls_back_to_lean_without_a_device_kernel():
    attention = FusedLocalAttention(3, device_target="GPU")  # no GPU kernel registered
    assert attention.backend == "lean"
    assert isinstance(attention.aggregate, local_attention.LeanLocalAttention)


def test_fused_falls_back_with_a_warning_when_the_kernel_cannot_be_built(monkeypatch):
    def broken_factory(kernel_size, stride, dilation):
        raise RuntimeError("no compiler")

    monkeypatch.setitem(local_attention.DEVICE_AGGREGATIONS, "CPU", (broken_factory, (ms.float32,)))
    with pytest.warns(UserWarning, match="no compiler"):
        attention = FusedLocalAttention(3, device_target="CPU")
    assert attention.backend == "lean"


def test_registered_device_kernel_is_used(monkeypatch):
    monkeypatch.setattr(local_attention, "DEVICE_AGGREGATIONS", dict(local_attention.DEVICE_AGGREGATIONS))
    register_device_aggregation("Ascend", local_attention._LeanAggregation, (ms.float16,))
    attention = FusedLocalAttention(5, 2, 1, device_target="Ascend")
    assert attention.backend == "Ascend" and attention.dtypes == (ms.float16,)
    assert attention.aggregate.kernel_size == 5 and attention.aggregate.stride == 2


@pytest.mark.parametrize("kwargs,match", [
    (dict(device_target="TPU", factory=local_attention._LeanAggregation, dtypes=(ms.float32,)), "device_target"),
    (dict(device_target="GPU", factory="lean", dtypes=(ms.float32,)), "factory"),
    (dict(device_target="GPU", factory=local_attention._LeanAggregation, dtypes=()), "dtypes"),
])
def test_register_device_aggregation_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        register_device_aggregation(**kwargs)


@pytest.mark.skipif(not ON_CPU, reason="the float32-only C++ kernel is the CPU backend's")
def test_fused_casts_other_dtypes_for_a_float32_kernel():
    rng = np.random.RandomState(0)
    query = rng.randn(2, 4, 5, 5).astype(np.float16)
    key_pad, value_pad = (rng.randn(2, 4, 7, 7).astype(np.float16) for _ in range(2))
    out = FusedLocalAttention(3)(Tensor(query), Tensor(key_pad), Tensor(value_pad))
    expected = UnfoldLocalAttention(3)(*(Tensor(a.astype(np.float32)) for a in (query, key_pad, value_pad)))
    assert out.dtype == ms.float16
    np.testing.assert_allclose(out.asnumpy().astype(np.float32), expected.asnumpy(), rtol=1e-2, atol=1e-2)


def test_acmix_local_fused_equals_unfold_layer():
    """The whole layer (projections, positional term, reflection pad, mixing) with the same weights."""
    rng = np.random.RandomState(3)
    layers = {impl: ACmixLocal(4, 8, kernel_att=5, num_heads=2, stride=2, attention_impl=impl)
              for impl in ("unfold", "fused")}
    values = {name: rng.randn(*p.shape).astype(np.float32) for name, p in layers["unfold"].parameters_and_names()}
    for layer in layers.values():
        for name, param in layer.parameters_and_names():
            param.set_data(Tensor(values[name]))
    x = Tensor(rng.randn(2, 4, 9, 8).astype(np.float32))
    np.testing.assert_allclose(layers["fused"](x).asnumpy(), layers["unfold"](x).asnumpy(), rtol=1e-4, atol=1e-5)


def test_fused_kernel_works_in_pynative_mode():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        reference = _loss_and_grads(UnfoldLocalAttention(3), 3, 1, 1, 6, seed=5)
        result = _loss_and_grads(FusedLocalAttention(3), 3, 1, 1, 6, seed=5)
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
    for ours, expected in zip(result, reference):
        np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5)


def test_kernel_build_is_cached(tmp_path, monkeypatch):
    from acmix_ms.kernels.build import compiled_library
    monkeypatch.setenv("ACMIX_MS_KERNEL_CACHE", str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = compiled_library("local_attention_cpu.cc")
    assert first.parent == tmp_path and first.is_file()
    mtime = first.stat().st_mtime_ns
    monkeypatch.setattr(kernel_build, "_OUTCOMES", {})  # as a new process would: found on disk, not rebuilt
    assert compiled_library("local_attention_cpu.cc") == first and first.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary file left behind


def test_kernel_build_outcome_is_remembered_in_the_process(tmp_path, monkeypatch):
    calls = []

    def failing_build(source_name):
        calls.append(source_name)
        raise kernel_build.KernelBuildError("compiler exploded")

    monkeypatch.setenv("ACMIX_MS_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(kernel_build, "_build", failing_build)
    for _ in range(3):  # e.g. the layers of one network: one attempt, the same error each time
        with pytest.raises(kernel_build.KernelBuildError, match="compiler exploded"):
            kernel_build.compiled_library("local_attention_cpu.cc")
    assert calls == ["local_attention_cpu.cc"]


def test_kernel_build_reports_a_missing_compiler(monkeypatch):
    from acmix_ms.kernels.build import KernelBuildError, compiled_library
    monkeypatch.setattr(kernel_build, "_OUTCOMES", {})
    monkeypatch.setenv("CXX", "no-such-compiler-acmix")
    with pytest.raises(KernelBuildError, match="no-such-compiler-acmix"):
        compiled_library("local_attention_cpu.cc")


# ---- the 'auto' default ------------------------------------------------------------------------------
@pytest.mark.skipif(not ON_CPU, reason="the C++ kernel is the CPU backend's")
def test_auto_is_the_default_and_runs_the_cpu_kernel():
    layer = ACmixLocal(4, 8, kernel_att=3, num_heads=2)
    assert layer.attention_impl == "auto" and layer.attention_backend == "CPU"
    net = models.create_model("resnet_tiny_acmix", num_classes=10)
    assert attention_backends(net) == {"CPU": 4}


def test_auto_falls_back_to_unfold_without_a_device_kernel():
    attention = LOCAL_ATTENTION_IMPLS["auto"](3, 2, 1, device_target="GPU")  # no GPU kernel registered
    assert attention.backend == "unfold" and not attention.uses_kernel
    assert isinstance(attention.aggregate, UnfoldLocalAttention)


def test_auto_falls_back_to_unfold_with_a_warning_when_the_kernel_cannot_be_built(monkeypatch):
    def broken_factory(kernel_size, stride, dilation):
        raise RuntimeError("no compiler")

    monkeypatch.setitem(local_attention.DEVICE_AGGREGATIONS, "CPU", (broken_factory, (ms.float32,)))
    with pytest.warns(UserWarning, match="no compiler.*unfold"):
        layer = ACmixLocal(4, 8, kernel_att=3, num_heads=2)
    assert layer.attention_backend == "unfold"
    x = Tensor(np.random.RandomState(0).randn(1, 4, 6, 6).astype(np.float32))
    assert layer(x).shape == (1, 8, 6, 6)


@pytest.mark.parametrize("impl", ["auto", "fused"])
def test_auto_and_fused_match_unfold_forward_and_gradients(impl):
    kernel, stride, dilation, height, width = 5, 2, 1, 9, 8
    reference = _loss_and_grads(UnfoldLocalAttention(kernel, stride, dilation), kernel, stride, dilation, height,
                                seed=4, width=width)
    result = _loss_and_grads(LOCAL_ATTENTION_IMPLS[impl](kernel, stride, dilation), kernel, stride, dilation,
                             height, seed=4, width=width)
    for ours, expected in zip(result, reference):
        np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5)


def test_set_attention_impl_switches_layers():
    net = models.create_model("resnet_tiny_acmix", num_classes=10, attention_impl="lean")
    assert set_attention_impl(net, "unfold", only_kernels=True) == 0  # lean is portable: left alone
    assert attention_backends(net) == {"lean": 4}
    assert set_attention_impl(net, "unfold") == 4
    assert attention_backends(net) == {"unfold": 4}
    assert all(layer.attention_impl == "unfold" for _, layer in net.cells_and_names()
               if isinstance(layer, ACmixLocal))
    with pytest.raises(ValueError, match="attention_impl"):
        set_attention_impl(net, "im2col")
    conv_only = models.create_model("resnet_tiny_acmix", num_classes=10, rate_mode="conv")
    assert set_attention_impl(conv_only, "unfold") == 0 and attention_backends(conv_only) == {}


@pytest.mark.skipif(not ON_CPU, reason="the C++ kernel is the CPU backend's")
def test_kernel_network_exports_a_portable_mindir_with_the_same_output(tmp_path, capsys):
    import export as export_script
    net = models.create_model("resnet_tiny_acmix", num_classes=10)
    net.set_train(False)
    x = Tensor(np.random.RandomState(1).randn(2, 3, 32, 32).astype(np.float32))
    expected = net(x).asnumpy()  # computed by the C++ kernel
    twin = models.create_model("resnet_tiny_acmix", num_classes=10)
    ms.load_param_into_net(twin, net.parameters_dict(), strict_load=True)
    twin.set_train(False)
    from models.layers import BatchNorm2d
    norms = sum(isinstance(cell, BatchNorm2d) for _, cell in twin.cells_and_names())
    # 4 attention kernels, 4 conv-path group convolutions, the batch norms (tests/test_cnn_fast.py)
    assert export_script.make_exportable(twin) == 8 + norms
    printed = capsys.readouterr().out
    assert f"{norms} layer(s) (GELU, LayerNorm, Dense, Softmax, MaxPool2d, BatchNorm2d) ran a CPU kernel" in printed
    assert "4 sliding-window attention layer(s) ran a device kernel" in printed
    assert "4 ACmix conv path(s) ran a device kernel" in printed
    assert attention_backends(twin) == {"unfold": 4} and attention_backends(net) == {"CPU": 4}
    library = kernel_build.compiled_library("local_attention_cpu.cc")
    ms.export(net, x, file_name=str(tmp_path / "kernel"), file_format="MINDIR")  # why the switch is needed:
    assert str(library).encode() in (tmp_path / "kernel.mindir").read_bytes()  # it names this machine's .so
    ms.export(twin, x, file_name=str(tmp_path / "net"), file_format="MINDIR")
    content = (tmp_path / "net.mindir").read_bytes()
    assert library.name.encode() not in content and b"LocalAttentionForward" not in content
    assert b"GroupConvForward" not in content
    exported = ms.nn.GraphCell(ms.load(str(tmp_path / "net.mindir")))(x).asnumpy()
    np.testing.assert_allclose(exported, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not ON_CPU, reason="the C++ kernel is the CPU backend's")
def test_export_cli_switches_kernel_layers_to_the_chosen_implementation(tmp_path, capsys):
    import json
    import export as export_script
    output = tmp_path / "lean.mindir"
    code = export_script.main(["--model", "resnet_tiny_acmix", "--num_classes", "3", "--image_size", "32",
                               "--attention_impl", "lean", "--output", str(output)])
    printed = capsys.readouterr().out
    assert code == 0 and output.is_file()
    assert "exported with attention_impl='lean'" in printed and "max |diff|" in printed
    # 4 attention + 4 conv-path kernels and the 17 batch norms (stem, 3 per block, 4 downsamples)
    assert json.loads((tmp_path / "lean.mindir.json").read_text())["kernel_layers_switched"] == 8 + 17
    exported = output.read_bytes()
    assert not any(name in exported for name in (b"LocalAttentionForward", b"GroupConvForward", b"BatchNormTrain",
                                                 b"BatchNormInfer", b"cnn_cpu"))
    assert export_script.PORTABLE_IMPLS == local_attention.PORTABLE_IMPLS  # both acmix_ms.constants'
    with pytest.raises(SystemExit):  # only portable implementations may go into a MINDIR
        export_script.parse_args(["--model", "resnet_tiny_acmix", "--attention_impl", "fused"])
