"""acmix_ms.replace_convs / init_from_conv (drop-in ACmix) and ACmixLocal on maps smaller than its window.

The networks are written here (a small foreign backbone), not taken from ``models``. References:
``numpy_reference`` (conv path, dense-equivalent kernel, projections) and NumPy's ``np.pad(mode='reflect')``
for the padding of maps smaller than the attention window.
"""
import json
import zlib

import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, ops

import acmix_ms
import numpy_reference as ref
from acmix_ms.spatial import reflect_pad


def rng_for(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def tensor(array):
    return ms.Tensor(np.asarray(array, np.float32))


class Backbone(nn.Cell):
    """A small ResNet/YOLO-style backbone with every kind of convolution the replacement must judge.

    Input (B, 3, H, W); output: the feature maps of every stage (a tuple), so each output shape is checked.
    """

    def __init__(self):
        super().__init__()
        self.stem = nn.SequentialCell(nn.Conv2d(3, 8, 3, pad_mode="pad", padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.down = nn.SequentialCell(nn.Conv2d(8, 16, 3, stride=2, pad_mode="same"), nn.BatchNorm2d(16),
                                      nn.ReLU())
        self.blocks = nn.CellList([nn.Conv2d(16, 16, 3, pad_mode="pad", padding=1, has_bias=True),
                                   nn.Conv2d(16, 16, 1)])
        self.depthwise = nn.Conv2d(16, 16, 3, group=16)
        self.dilated = nn.Conv2d(16, 16, 3, dilation=2)
        self.valid = nn.Conv2d(16, 16, 3, pad_mode="valid")
        self.odd_width = nn.Conv2d(16, 10, 3)
        self.wide = nn.Conv2d(16, 16, 5)
        self.stride3 = nn.Conv2d(16, 16, 3, stride=3)

    def construct(self, x):
        stem = self.stem(x)
        down = self.down(stem)
        block = self.blocks[1](ops.relu(self.blocks[0](down)))
        block = block + self.depthwise(block) + self.dilated(block) + self.wide(block)
        return stem, down, block, self.valid(block), self.odd_width(block), self.stride3(block)


EXPECTED_REPLACED = ["stem.0", "down.0", "blocks.0"]
EXPECTED_SKIPPED = {"blocks.1": "kernel 1x1 not in kernel_sizes", "depthwise": "grouped convolution (group=16)",
                    "dilated": "dilation 2", "valid": "pad_mode 'valid'", "odd_width": "not divisible by num_heads 4",
                    "wide": "kernel 5x5 not in kernel_sizes", "stride3": "stride 3 not in strides"}


def output_shapes(net, size):
    return [out.shape for out in net(tensor(np.zeros((2, 3, size, size))))]


def test_dry_run_reports_every_convolution_and_changes_nothing():
    net = Backbone()
    names_before = [p.name for p in net.get_parameters()]
    report = acmix_ms.replace_convs(net, dry_run=True)
    assert report.dry_run
    assert report.replaced_names == EXPECTED_REPLACED
    assert sorted(report.skipped_names) == sorted(EXPECTED_SKIPPED)
    for item in report.skipped:
        assert EXPECTED_SKIPPED[item.name] in item.reason, (item.name, item.reason)
    assert [p.name for p in net.get_parameters()] == names_before
    assert isinstance(net.stem[0], nn.Conv2d)
    assert "would replace 3 convolution(s), skipped 7" in str(report)
    assert [(r.in_channels, r.out_channels, r.stride) for r in report.replaced] == [(3, 8, 1), (8, 16, 2),
                                                                                    (16, 16, 1)]


def test_select_and_options_choose_the_layers():
    net = Backbone()
    report = acmix_ms.replace_convs(net, kernel_sizes=(3, 5), strides=(1, 2, 3), num_heads=2,
                                    select=lambda name, conv: name != "blocks.0", dry_run=True)
    assert report.replaced_names == ["stem.0", "down.0", "odd_width", "wide", "stride3"]
    reasons = {item.name: item.reason for item in report.skipped}
    assert reasons["blocks.0"] == "not selected (select returned False)"
    assert "wide" not in reasons and "valid" in reasons


@pytest.mark.parametrize("kwargs,argument", [
    (dict(kernel_sizes=(2,)), "kernel_sizes"), (dict(strides=(0,)), "strides"), (dict(num_heads=0), "num_heads"),
    (dict(shift_impl="rolled"), "shift_impl"), (dict(rate_mode="sum"), "rate_mode"), (dict(init="kaiming"), "init"),
    (dict(attention_impl="cuda"), "attention_impl"), (dict(select="stem"), "select")])
def test_bad_arguments_raise_value_error(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        acmix_ms.replace_convs(Backbone(), **kwargs)


def test_replaced_network_keeps_shapes_trains_and_exports(tmp_path):
    """Graph mode: output shapes (odd and even sizes) kept; one optimizer step; MINDIR reload == network."""
    net = Backbone()
    shapes = {size: output_shapes(net, size) for size in (9, 12)}
    report = acmix_ms.replace_convs(net, kernel_att=3, attention_impl="unfold")
    assert report.replaced_names == EXPECTED_REPLACED
    assert all(isinstance(cell, acmix_ms.ACmixLocal) for cell in (net.stem[0], net.down[0], net.blocks[0]))
    names = [p.name for p in net.get_parameters()]
    assert len(names) == len(set(names)) and "blocks.0.qkv.weight" in names and "down.0.dep_conv.weight" in names
    for size, before in shapes.items():
        assert output_shapes(net, size) == before

    class Loss(nn.Cell):
        def __init__(self, network):
            super().__init__()
            self.network = network

        def construct(self, x):
            return sum(out.mean() for out in self.network(x)) + (self.network(x)[2] ** 2).mean()

    x = tensor(rng_for("train").standard_normal((2, 3, 12, 12)))
    before = [(p.name, p, p.asnumpy().copy()) for p in net.trainable_params()]
    step = nn.TrainOneStepCell(Loss(net), nn.Momentum(net.trainable_params(), 0.01, 0.9))
    loss = step(x).asnumpy()
    assert np.isfinite(loss)
    moved = [name for name, p, value in before if not np.array_equal(p.asnumpy(), value)]
    for prefix in ("stem.0.", "down.0.", "blocks.0."):
        for part in ("qkv.weight", "fc.weight", "dep_conv.weight", "rate1", "rate2", "conv_p.weight"):
            assert prefix + part in moved

    net.set_train(False)
    expected = [out.asnumpy() for out in net(x)]
    ms.export(net, x, file_name=str(tmp_path / "backbone"), file_format="MINDIR")
    reloaded = nn.GraphCell(ms.load(str(tmp_path / "backbone.mindir")))(x)
    assert len(reloaded) == len(expected)
    for got, want in zip(reloaded, expected):
        np.testing.assert_allclose(got.asnumpy(), want, rtol=1e-5, atol=1e-5)


def test_a_network_run_before_the_replacement_runs_the_new_layers():
    """Graph mode caches a Cell's compiled graph; the replacement must not be hidden behind the old one."""
    net = nn.SequentialCell(nn.Conv2d(4, 8, 3), nn.ReLU())
    x = tensor(rng_for("stale").standard_normal((2, 4, 6, 6)))
    before = net(x).asnumpy()
    acmix_ms.replace_convs(net, kernel_att=3, attention_impl="unfold")
    after = net(x).asnumpy()
    np.testing.assert_allclose(after, np.maximum(net[0](x).asnumpy(), 0), rtol=1e-6, atol=1e-6)
    assert np.abs(after - before).max() > 1e-2


def test_shared_convolution_is_replaced_once_at_every_place():
    shared = nn.Conv2d(8, 8, 3)
    net = nn.SequentialCell(shared, nn.ReLU(), shared)
    report = acmix_ms.replace_convs(net, attention_impl="unfold")
    assert report.replaced_names == ["0"] and report.replaced[0].also_at == ("2",)
    assert net[0] is net[2] and isinstance(net[0], acmix_ms.ACmixLocal)


# ------------------------------------------------------------------------------------------- float16 (AMP O2)
def amp_o2_loss_and_grads(attention_impl):
    net = nn.SequentialCell(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                            nn.Conv2d(8, 16, 3, stride=2, pad_mode="pad", padding=1), nn.BatchNorm2d(16))
    acmix_ms.replace_convs(net, kernel_att=3, attention_impl=attention_impl)
    if attention_impl == "auto" and acmix_ms.attention_backends(net) != {"CPU": 2}:
        pytest.skip(f"no CPU attention kernel here ({acmix_ms.attention_backends(net)}): nothing to check")
    wrapped = ms.amp.auto_mixed_precision(net, "O2")

    def loss_fn(x):
        return wrapped(x).astype(ms.float32).mean()

    x = tensor(rng_for("amp").standard_normal((2, 3, 12, 12)))
    loss, grads = ms.value_and_grad(loss_fn, None, wrapped.trainable_params())(x)
    return net, loss.asnumpy(), [g.asnumpy() for g in grads]


def test_amp_o2_forward_and_backward_run_in_float16():
    net, loss, grads = amp_o2_loss_and_grads("unfold")
    assert net[0].qkv.mixed_precision_type.name == "FP16"  # O2 runs the ACmix layers in float16
    assert np.isfinite(loss) and all(np.isfinite(g).all() for g in grads)
    assert any(np.abs(g).max() > 0 for g in grads)


def test_amp_o2_with_the_cpu_attention_kernel():
    # issue 11.7: the kernel took no float16 ("... LocalAttentionForward) is 2"); it now casts at its boundary
    _, loss, grads = amp_o2_loss_and_grads("auto")
    assert np.isfinite(loss) and all(np.isfinite(g).all() for g in grads)
    assert any(np.abs(g).max() > 0 for g in grads)


# --------------------------------------------------------------------------------------------- small maps
@pytest.mark.parametrize("size,pad", [((1, 1), 3), ((2, 5), 3), ((3, 2), 4), ((2, 2), 7), ((5, 6), 2), ((4, 1), 1)])
def test_reflect_pad_matches_numpy_for_any_size(size, pad):
    x = rng_for("pad", size, pad).standard_normal((2, 3) + size)
    expected = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="reflect")
    np.testing.assert_array_equal(reflect_pad(tensor(x), pad).asnumpy(), expected.astype(np.float32))


def local_attention_np_pad(q, k, v, pe, num_heads, kernel_att, stride):
    """Official-form sliding-window attention over the np.pad(mode='reflect') extension of k, v and pe.

    q, k, v (B, C, H, W), pe (d, H, W); logits (q * d^-0.5) . (k_nb + pe_centre - pe_nb), softmax over the
    window. Loops over output pixels; for tiny maps.
    """
    batch, channels, height, width = q.shape
    head_dim, pad = channels // num_heads, kernel_att // 2
    widths = ((0, 0), (0, 0), (pad, pad), (pad, pad))
    k_pad, v_pad = np.pad(k, widths, mode="reflect"), np.pad(v, widths, mode="reflect")
    pe_pad = np.pad(pe[None], widths, mode="reflect")[0]
    out = np.zeros((batch, channels, ref.out_size(height, stride), ref.out_size(width, stride)))
    for i in range(out.shape[2]):
        for j in range(out.shape[3]):
            ci, cj = i * stride, j * stride
            for n in range(num_heads):
                heads = slice(n * head_dim, (n + 1) * head_dim)
                query = q[:, heads, ci, cj] * head_dim ** -0.5  # (B, d)
                keys = k_pad[:, heads, ci:ci + kernel_att, cj:cj + kernel_att] \
                    + (pe[:, ci, cj, None, None] - pe_pad[:, ci:ci + kernel_att, cj:cj + kernel_att])[None]
                logits = np.einsum("bd,bduv->buv", query, keys).reshape(batch, -1)
                weights = ref.softmax(logits, axis=1)
                values = v_pad[:, heads, ci:ci + kernel_att, cj:cj + kernel_att].reshape(batch, head_dim, -1)
                out[:, heads, i, j] = np.einsum("bp,bdp->bd", weights, values)
    return out


def acmix_local_reference(x, params, num_heads, kernel_att, stride):
    projected = ref.conv1x1(x, params["qkv.weight"], params["qkv.bias"])
    channels = projected.shape[1] // 3
    pe = ref.conv1x1(ref.position_grid(*x.shape[2:])[None], params["conv_p.weight"], params["conv_p.bias"])[0]
    attention = local_attention_np_pad(projected[:, :channels], projected[:, channels:2 * channels],
                                       projected[:, 2 * channels:], pe, num_heads, kernel_att, stride)
    convolution = ref.conv_path(projected, 3 * num_heads, params, 3, channels, "learnable", stride)
    return ref.mix_rates(attention, convolution, "learnable", params=params)


@pytest.mark.parametrize("size,stride,impl", [((1, 1), 2, "unfold"), ((1, 4), 1, "unfold"), ((3, 2), 1, "lean"),
                                              ((2, 3), 2, "auto")])
def test_acmix_local_on_maps_smaller_than_the_window(size, stride, impl):
    """k_att = 7 (pad 3) on maps of 1-3 px: repeated reflection, as np.pad(mode='reflect'), every implementation."""
    rng = rng_for("small", size, stride, impl)
    layer = acmix_ms.ACmixLocal(6, 8, kernel_att=7, num_heads=2, stride=stride, attention_impl=impl)
    params = {name: p.asnumpy().astype(np.float64) for name, p in layer.parameters_and_names()}
    params["dep_conv.weight"] = rng.standard_normal(params["dep_conv.weight"].shape)  # not just the shift init
    layer.dep_conv.weight.set_data(tensor(params["dep_conv.weight"]))
    x = rng.standard_normal((2, 6) + size)
    expected = acmix_local_reference(x, params, 2, 7, stride)
    np.testing.assert_allclose(layer(tensor(x)).asnumpy(), expected, rtol=1e-4, atol=1e-5)


def test_a_one_pixel_map_attends_to_itself():
    """On a 1 x 1 map every neighbour is the pixel itself: the attention path returns its value."""
    layer = acmix_ms.ACmixLocal(4, 8, kernel_att=7, num_heads=2, rate_mode="attention", attention_impl="unfold")
    x = tensor(rng_for("one").standard_normal((3, 4, 1, 1)))
    value = layer.qkv(x)[:, 16:]
    np.testing.assert_allclose(layer(x).asnumpy(), value.asnumpy(), rtol=1e-6, atol=1e-6)


def test_network_shrinking_to_one_pixel_trains():
    """Stride-2 replacements (k_att 5, pad 2) take 3 x 3 to 2, 1 and, at stride 2 on 1 x 1, 1 px:
    forward and backward in one graph."""
    net = nn.SequentialCell([nn.Conv2d(4 if i == 0 else 8, 8, 3, stride=2, pad_mode="pad", padding=1)
                             for i in range(3)])
    acmix_ms.replace_convs(net, kernel_att=5, attention_impl="unfold")
    x = tensor(rng_for("shrink").standard_normal((2, 4, 3, 3)))

    def loss_fn(inputs):
        out = net(inputs)
        return (out ** 2).mean(), out

    (loss, out), grads = ms.value_and_grad(loss_fn, None, net.trainable_params(), has_aux=True)(x)
    assert out.shape == (2, 8, 1, 1) and np.isfinite(out.asnumpy()).all()
    assert np.isfinite(loss.asnumpy()) and all(np.isfinite(g.asnumpy()).all() for g in grads)
    assert all(np.abs(g.asnumpy()).max() > 0 for g in grads[:len(grads) // 3])  # the first layer learns


# ------------------------------------------------------------------------------------------ conv initialisation
class NarrowNet(nn.Cell):
    """Convolutions whose input width fits the conv path's rank (Cin <= 2N = 8): exactly reproducible."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, pad_mode="pad", padding=1, has_bias=True)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, pad_mode="pad", padding=1)
        self.conv3 = nn.Conv2d(8, 16, 3, stride=2, pad_mode="same", has_bias=True)
        self.conv4 = nn.Conv2d(16, 16, 3, pad_mode="same")  # Cin 16 > 8: only approximated

    def construct(self, x):
        y = ops.relu(self.conv3(ops.relu(self.conv2(ops.relu(self.conv1(x))))))
        return y, self.conv4(y)


def test_conv_init_reproduces_narrow_convolutions_exactly():
    """Documented bound (docs/dropin.md): exact layers match the convolution to float32 rounding (< 1e-5)."""
    net = NarrowNet()
    x = tensor(rng_for("narrow").standard_normal((2, 3, 9, 9)))  # conv3 sees 5 px: odd, so "same" is centred
    before_exact, before_approx = (out.asnumpy() for out in net(x))
    report = acmix_ms.replace_convs(net, init="conv", kernel_att=3, attention_impl="unfold")
    inits = {item.name: item.conv_init for item in report.replaced}
    assert [inits[name].exact for name in ("conv1", "conv2", "conv3")] == [True] * 3
    assert [inits[name].bias for name in ("conv1", "conv2", "conv3")] == ["exact", "none", "exact"]
    assert inits["conv3"].alignment and not inits["conv2"].alignment
    assert not inits["conv4"].applied and "init_tolerance" in inits["conv4"].reason  # 0.1 default
    after_exact, _ = (out.asnumpy() for out in net(x))
    relative = np.abs(after_exact - before_exact).max() / np.abs(before_exact).max()
    assert relative < 1e-5, relative
    assert "init conv (rank 8/8" in str(report)


def svd_tail_error(weight, num_heads, rank):
    """Independent Eckart-Young error: per output group j (outputs j*N .. j*N+N-1), the singular values of
    the (N*k*k, Cin) matrix beyond ``rank``."""
    out_channels, in_channels = weight.shape[:2]
    tail = 0.0
    for j in range(out_channels // num_heads):
        group = weight[j * num_heads:(j + 1) * num_heads].transpose(0, 2, 3, 1).reshape(-1, in_channels)
        tail += (np.linalg.svd(group, compute_uv=False)[rank:] ** 2).sum()
    return np.sqrt(tail / (weight ** 2).sum())


@pytest.mark.parametrize("rates,rank,bias", [((0.5, 0.5), 8, "exact"), ((0.0, 1.0), 9, "dropped")])
def test_conv_init_approximation_error_is_measured_and_bounded(rates, rank, bias):
    """Cin 32 > r: the weight error is the SVD tail, <= sqrt(1 - r/R); the output error is the convolution
    with the residual kernel, and on white noise its relative size is about the weight error."""
    rng = rng_for("approx", rates)
    conv = nn.Conv2d(32, 16, 3, pad_mode="pad", padding=1, has_bias=True)
    x = rng.standard_normal((4, 32, 12, 12))
    weight, conv_bias = conv.weight.asnumpy().astype(np.float64), conv.bias.asnumpy().astype(np.float64)
    layer = acmix_ms.ACmixLocal(32, 16, kernel_att=3, num_heads=4, rates=rates, attention_impl="unfold")
    result = acmix_ms.init_from_conv(layer, conv, tolerance=1.0)
    assert result.applied and (result.rank, result.max_rank, result.bias) == (rank, 32, bias)
    assert result.error_bound == pytest.approx(np.sqrt(1 - rank / 32))
    assert result.weight_error == pytest.approx(svd_tail_error(weight, 4, rank), rel=1e-6)
    assert 0.3 < result.weight_error <= result.error_bound

    params = {name: p.asnumpy().astype(np.float64) for name, p in layer.parameters_and_names()}
    rate1, rate2 = rates
    acmix_kernel = rate2 * ref.dense_conv_weight(params["qkv.weight"], params["fc.weight"],
                                                 params["dep_conv.weight"], 4)
    got = layer(tensor(x)).asnumpy()
    conv_out = ref.conv2d_direct(x, weight, conv_bias, padding=1)
    expected_error = ref.conv2d_direct(x, acmix_kernel - weight, padding=1) - (0 if rate1 else conv_bias[:, None, None])
    np.testing.assert_allclose(got - conv_out, expected_error, atol=2e-4)
    without_bias = conv_out - conv_bias[:, None, None]
    output_error = np.sqrt(((got - conv_out + (0 if rate1 else conv_bias[:, None, None])) ** 2).sum()
                           / (without_bias ** 2).sum())
    assert output_error == pytest.approx(result.weight_error, rel=0.15)


def test_conv_init_falls_back_to_the_paper_init_with_a_reason():
    conv = nn.Conv2d(8, 8, 3, pad_mode="pad", padding=1)
    shift = acmix_ms.shift_kernels(8, 3)
    for kwargs, reason in [(dict(shift_impl="fixed"), "one-hot shift kernels"),
                           (dict(rate_mode="attention"), "no convolution path"),
                           (dict(rates=(1.0, 0.0), rate_mode="fixed"), "rate2 is 0")]:
        layer = acmix_ms.ACmixLocal(8, 8, attention_impl="unfold", **kwargs)
        result = acmix_ms.init_from_conv(layer, conv)
        assert not result.applied and reason in result.reason
    layer = acmix_ms.ACmixLocal(32, 8, attention_impl="unfold")
    result = acmix_ms.init_from_conv(layer, nn.Conv2d(32, 8, 3, pad_mode="pad", padding=1), tolerance=0.05)
    assert not result.applied and "init_tolerance 0.05" in result.reason
    np.testing.assert_array_equal(layer.dep_conv.weight.asnumpy(), shift)  # untouched


def test_conv_init_with_a_larger_acmix_kernel_and_the_conv_rate_mode():
    """kernel_conv 5 holds a 3x3 kernel (centred); rate_mode 'conv' uses all 3N groups (r = min(12, 25, Cin))."""
    conv = nn.Conv2d(12, 8, 3, pad_mode="pad", padding=1)
    layer = acmix_ms.ACmixLocal(12, 8, num_heads=4, kernel_conv=5, rate_mode="conv", attention_impl="unfold")
    result = acmix_ms.init_from_conv(layer, conv)
    assert result.exact and result.rank == 12
    x = tensor(rng_for("k5").standard_normal((1, 12, 7, 7)))
    np.testing.assert_allclose(layer(x).asnumpy(), conv(x).asnumpy(), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------- the worked example script
def run_example(argv):
    from examples.dropin_backbone import main
    return main(argv)


@pytest.mark.parametrize("argv,message", [(["--steps", "0"], "--steps must be >= 1"),
                                          (["--kernel_att", "4"], "--kernel_att must be odd"),
                                          (["--width", "6"], "divisible by --num_heads 4")])
def test_example_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        run_example(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_example_refuses_a_used_output_dir(tmp_path, capsys):
    (tmp_path / "earlier.txt").write_text("an earlier run")
    with pytest.raises(SystemExit) as info:
        run_example(["--output_dir", str(tmp_path)])
    assert info.value.code == 2 and "not empty" in capsys.readouterr().err


@pytest.mark.slow
def test_example_trains_and_exports(tmp_path):
    """The documented command (docs/dropin.md) with generated data: replaces, trains, exports a verified MINDIR."""
    out = tmp_path / "run"
    assert run_example(["--steps", "2", "--batch_size", "4", "--width", "4", "--kernel_att", "7", "--val_size", "8",
                        "--data", "generated", "--init", "conv", "--output_dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["report"]["replaced"]) == 8 and len(summary["report"]["skipped"]) == 4
    assert summary["mindir_max_abs_diff"] < 1e-4 and (out / "backbone_acmix.mindir").is_file()
    assert (out / "train_log.jsonl").read_text().count("\n") == 1
