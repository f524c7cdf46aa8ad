"""The fast paths of the convolution-path / sliding-window ACmix layers equal the paths they replace (issue 13):

- the conv path as ONE group convolution with a weight composed from fc and dep_conv (``ACmixBase.fused_conv``)
  equals the explicit fc -> transpose -> shift conv, forward and gradients (with and without fc bias, strides);
- ``ACmixLocal`` with the CPU qkv attention kernel (``_kernel_forward``: in-kernel reflection padding,
  positional subtraction, channel-major projection, rate2 folded into the conv weight) equals the same layer
  running the unfold reference, forward and the gradients of the input and of every parameter, for strides,
  dilation, maps smaller than the window, every rate mode and shift implementation;
- the kernel runs under AMP O2 (float16) in ACmixLocal and in the models (issue 11, item 7);
- the conv path on channels-last tokens in one CPU kernel (``CpuTokenConv``: Swin's and PVT's ACmix layers)
  equals a NumPy reference (forward; gradients of tokens, fc, fc bias and dep by central differences, exact for
  these linear maps), and ``ACmixWindow`` / ``ACmixGlobal`` give the same outputs and gradients of the input and
  of every parameter with it as through the channel-major ``conv_path``.
"""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn, ops

import models
from acmix_ms import ACmixBase, ACmixGlobal, ACmixLocal, ACmixWindow, attention_backends, set_attention_impl
from acmix_ms.base import GroupConv


def _randomise(cells, seed):
    """Give the same random values to the parameters of every Cell in ``cells`` (same classes/options)."""
    rng = np.random.default_rng(seed)
    for params in zip(*(cell.get_parameters() for cell in cells)):
        shape = params[0].shape
        value = rng.standard_normal(shape).astype(np.float32) * 0.5
        if "rate" in params[0].name:
            value = np.abs(value) + 0.2
        for param in params:
            param.set_data(Tensor(value))


class _Objective(nn.Cell):
    def __init__(self, layer, probe):
        super().__init__()
        self.layer, self.probe = layer, probe

    def construct(self, x):
        return (self.layer(x) * self.probe).sum()


def _loss_and_grads(layer, x, probe):
    params = layer.trainable_params()
    objective = _Objective(layer, probe)
    loss, (grad_x, grads) = ms.value_and_grad(objective, 0, params)(x)
    return {"loss": loss.asnumpy(), "x": grad_x.asnumpy(),
            **{f"param {i} ({param.name.split('.', 1)[-1]})": grad.asnumpy()
               for i, (param, grad) in enumerate(zip(params, grads))}}


def _assert_same(result, reference, rtol=1e-4, atol=2e-5):
    assert result.keys() == reference.keys()
    for key in reference:
        scale = max(1.0, float(np.abs(reference[key]).max()))
        np.testing.assert_allclose(result[key], reference[key], rtol=rtol, atol=atol * scale, err_msg=key)


# ------------------------------------------------------------------------- conv path as one group convolution
class _ExplicitConvPath(nn.Cell):
    """The conv path as it was: fc on the (B, G, d, HW) groups, transpose, shift group conv."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def construct(self, groups, height, width):
        batch, _, head_dim, _ = groups.shape
        maps = self.layer.fc(groups).transpose(0, 2, 1, 3)
        return self.layer.dep_conv(maps.reshape(batch, -1, height, width))


class _ConvPathObjective(nn.Cell):
    def __init__(self, path, probe, height, width):
        super().__init__()
        self.path, self.probe, self.height, self.width = path, probe, height, width

    def construct(self, groups):
        return (self.path(groups, self.height, self.width) * self.probe).sum()


@pytest.mark.parametrize("fc_bias,stride,shift_impl", [(False, 1, "learnable"), (True, 2, "learnable"),
                                                       (True, 1, "random"), (False, 2, "fixed")])
def test_fused_conv_path_equals_fc_then_shift_conv(fc_bias, stride, shift_impl):
    layer = ACmixBase(6, 4, 16, 3, stride, shift_impl, rate_mode="conv", fc_bias=fc_bias)
    _randomise([layer], seed=stride)
    height, width = 7, 6
    rng = np.random.default_rng(3)
    groups = Tensor(rng.standard_normal((2, 6, 4, height * width)).astype(np.float32))
    h_out, w_out = -(-height // stride), -(-width // stride)
    probe = Tensor(rng.standard_normal((2, 16, h_out, w_out)).astype(np.float32))
    params = layer.trainable_params()
    results = []
    for path in (layer.conv_path, _ExplicitConvPath(layer)):
        objective = _ConvPathObjective(path, probe, height, width)
        loss, (grad_x, grads) = ms.value_and_grad(objective, 0, params)(groups)
        results.append({"loss": loss.asnumpy(), "x": grad_x.asnumpy(),
                        **{f"param {i}": g.asnumpy() for i, g in enumerate(grads)}})
    _assert_same(*results)


class _GroupConvObjective(nn.Cell):
    def __init__(self, conv, probe):
        super().__init__()
        self.conv, self.probe = conv, probe

    def construct(self, x, weight):
        return (self.conv(x, weight) * self.probe).sum()


@pytest.mark.parametrize("groups,per_group,out_per_group,kernel,stride,size", [
    (4, 12, 4, 3, 1, (9, 9)), (2, 6, 8, 3, 2, (7, 10)), (3, 5, 2, 5, 2, (8, 8)), (2, 3, 2, 3, 3, (6, 5)),
    (2, 12, 5, 3, 1, (4, 4)), (1, 12, 4, 3, 2, (1, 3))])
def test_cpu_group_conv_backward_equals_autodiff(groups, per_group, out_per_group, kernel, stride, size):
    if ms.get_context("device_target") != "CPU":
        pytest.skip("CPU kernel")
    from acmix_ms.kernels.conv_path_cpu import CpuGroupConv
    rng = np.random.default_rng(groups * kernel + stride)
    x = Tensor(rng.standard_normal((2, groups * per_group) + size).astype(np.float32))
    weight = Tensor(rng.standard_normal((groups * out_per_group, per_group, kernel, kernel)).astype(np.float32))
    out_size = tuple(-(-s // stride) for s in size)
    probe = Tensor(rng.standard_normal((2, groups * out_per_group) + out_size).astype(np.float32))
    results = []
    for conv in (CpuGroupConv(groups * per_group, groups * out_per_group, kernel, stride, groups),
                 GroupConv(kernel, stride, groups)):
        loss, grads = ms.value_and_grad(_GroupConvObjective(conv, probe), (0, 1))(x, weight)
        results.append({"out": conv(x, weight).asnumpy(), "loss": loss.asnumpy(), "x": grads[0].asnumpy(),
                        "weight": grads[1].asnumpy()})
    _assert_same(*results)


def test_set_conv_path_kernels_switches_the_group_convolution_with_the_same_output():
    if ms.get_context("device_target") != "CPU":
        pytest.skip("CPU kernel")
    from acmix_ms import set_conv_path_kernels
    net = models.create_model("resnet_tiny_acmix", num_classes=10)
    layers = [cell for _, cell in net.cells_and_names() if isinstance(cell, ACmixBase)]
    if not all(layer.conv_kernel for layer in layers):
        pytest.skip("the group-convolution kernel does not build here")
    net.set_train(False)
    x = Tensor(np.random.default_rng(3).standard_normal((2, 3, 32, 32)).astype(np.float32))
    twin = models.create_model("resnet_tiny_acmix", num_classes=10)
    ms.load_param_into_net(twin, net.parameters_dict(), strict_load=True)
    twin.set_train(False)
    assert set_conv_path_kernels(twin, False) == 4
    assert all(isinstance(cell.group_conv, GroupConv) for _, cell in twin.cells_and_names()
               if isinstance(cell, ACmixBase))
    assert set_conv_path_kernels(twin, False) == 0  # nothing left to switch
    np.testing.assert_allclose(twin(x).asnumpy(), net(x).asnumpy(), rtol=1e-4, atol=1e-5)
    conv_only_tensor = models.create_model("resnet_tiny_acmix", num_classes=10, shift_impl="tensor")
    assert set_conv_path_kernels(conv_only_tensor, False) == 0  # explicit shifts: no group convolution


# ------------------------------------------------------------------------------ ACmixLocal with the qkv kernel
def _local_pair(seed, **options):
    fast = ACmixLocal(attention_impl="auto", **options)
    if fast.qkv_attention is None:
        pytest.skip("no CPU qkv attention kernel here (not on CPU, or no C++ compiler)")
    reference = ACmixLocal(attention_impl="unfold", **options)
    assert reference.qkv_attention is None
    _randomise([fast, reference], seed)
    return fast, reference


# (in, out, heads, kernel_att, stride, dilation, height, width, extra options)
LOCAL_CASES = [
    (8, 8, 2, 3, 1, 1, 6, 6, {}),
    (8, 16, 4, 5, 2, 1, 9, 8, {}),  # stride 2, odd/even sizes
    (6, 8, 2, 3, 1, 2, 7, 9, {"qkv_bias": False}),  # dilation 2, non-square
    (8, 8, 2, 7, 1, 1, 3, 4, {"fc_bias": True}),  # window larger than the map: repeated reflections
    (8, 8, 2, 3, 3, 1, 8, 7, {"rate_mode": "fixed", "rates": (0.3, 0.9)}),
    (8, 8, 2, 3, 1, 1, 5, 5, {"rate_mode": "attention"}),
    (8, 8, 2, 5, 2, 1, 6, 6, {"shift_impl": "tensor"}),  # layout 0: the official channel order
    (8, 8, 2, 3, 1, 1, 1, 1, {}),  # 1 x 1 map
]


@pytest.mark.parametrize("cin,cout,heads,kernel_att,stride,dilation,height,width,extra", LOCAL_CASES)
def test_acmix_local_qkv_kernel_equals_unfold_reference(cin, cout, heads, kernel_att, stride, dilation, height,
                                                        width, extra):
    options = dict(in_channels=cin, out_channels=cout, num_heads=heads, kernel_att=kernel_att, stride=stride,
                   dilation=dilation, **extra)
    fast, reference = _local_pair(seed=kernel_att + stride, **options)
    rng = np.random.default_rng(kernel_att)
    x = Tensor(rng.standard_normal((2, cin, height, width)).astype(np.float32))
    probe = Tensor(rng.standard_normal((2, cout, -(-height // stride), -(-width // stride))).astype(np.float32))
    _assert_same(_loss_and_grads(fast, x, probe), _loss_and_grads(reference, x, probe))


def test_kernel_path_follows_set_attention_impl():
    fast, _ = _local_pair(seed=0, in_channels=8, out_channels=8, num_heads=2, kernel_att=3)
    set_attention_impl(fast, "unfold")
    assert fast.qkv_attention is None and fast.attention_backend == "unfold"
    set_attention_impl(fast, "fused")
    assert fast.qkv_attention is not None and fast.attention_backend == "CPU"


# --------------------------------------------------------------------------------------- float16 (AMP O2)
def test_qkv_kernel_under_amp_o2_matches_float32():
    fast, reference = _local_pair(seed=5, in_channels=8, out_channels=8, num_heads=2, kernel_att=3, stride=2)
    rng = np.random.default_rng(7)
    x = Tensor(rng.standard_normal((2, 8, 8, 8)).astype(np.float32))
    expected = reference(x).asnumpy()
    half = ms.amp.auto_mixed_precision(nn.SequentialCell(fast), "O2")
    out = half(x).astype(ms.float32).asnumpy()
    assert fast.qkv.mixed_precision_type.name == "FP16"  # the layer ran in float16 around the kernel
    assert not np.array_equal(out, expected)  # float16 round-off, so it did not run in float32
    np.testing.assert_allclose(out, expected, rtol=2e-2, atol=2e-2 * np.abs(expected).max())


@pytest.mark.parametrize("amp_level", ["O2", "O3"])
def test_resnet_tiny_acmix_trains_a_step_under_amp(amp_level):
    net = models.create_model("resnet_tiny_acmix", num_classes=4, base_width=8)
    if attention_backends(net) != {"CPU": 4}:
        pytest.skip(f"no CPU attention kernel here ({attention_backends(net)})")
    net = ms.amp.auto_mixed_precision(net, amp_level)
    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((2, 3, 16, 16)).astype(np.float32))

    def loss_fn(images):
        return ops.cast(net(images), ms.float32).mean()

    loss, grads = ms.value_and_grad(loss_fn, None, net.trainable_params())(x)
    assert np.isfinite(loss.asnumpy())
    assert all(np.isfinite(g.asnumpy().astype(np.float32)).all() for g in grads)


# ------------------------------------------------------------------- conv path on tokens (Swin, PVT layers)
def _token_conv_reference(tokens, fc, fc_bias, dep, height, width, shift, kernel):
    """float64 NumPy: fc over the G groups (+ bias), zero-padded group conv (groups = d) of the maps on the map
    rolled by (-shift, -shift), rolled back; tokens (B, H*W, G*d) -> (B, H*W, C)."""
    batch, _, _ = tokens.shape
    k2, groups = fc.shape
    dim = tokens.shape[2] // groups
    channels = dep.shape[0]
    per_out, pad = channels // dim, kernel // 2
    grid = np.roll(tokens.reshape(batch, height, width, groups, dim), (-shift, -shift), (1, 2))
    maps = np.einsum("kg,bhwgj->bhwkj", fc, grid) + fc_bias[None, None, None, :, None]
    padded = np.zeros((batch, height + 2 * pad, width + 2 * pad, k2, dim))
    padded[:, pad:pad + height, pad:pad + width] = maps
    out = np.zeros((batch, height, width, channels))
    for o in range(channels):
        for u in range(kernel):
            for v in range(kernel):
                window = padded[:, u:u + height, v:v + width, :, o // per_out]
                out[..., o] += np.einsum("bhwk,k->bhw", window, dep[o, :, u, v])
    return np.roll(out, (shift, shift), (1, 2)).reshape(batch, height * width, channels)


def _token_conv_kernel():
    if ms.get_context("device_target") != "CPU":
        pytest.skip("CPU kernel")
    from acmix_ms.base import token_conv
    kernel = token_conv()
    if kernel is None:
        pytest.skip("the token conv-path kernel does not build here")
    return kernel


class _KernelObjective(nn.Cell):
    def __init__(self, kernel, probe, config):
        super().__init__()
        self.kernel, self.probe, self.config = kernel, probe, config

    def construct(self, tokens, fc, fc_bias, dep):
        return (self.kernel(tokens, fc, fc_bias, dep, self.config) * self.probe).sum()


# (batch, H, W, heads N, width d, shift, kernel): d = 8, 16, 32, 64 take the vectorised steps, other d the
# scalar ones; N = 4 and 5 leave remainders after blocks of 3; k = 5 has 25 maps
@pytest.mark.parametrize("batch,height,width,heads,dim,shift,kernel", [
    (2, 7, 5, 3, 4, 0, 3), (1, 8, 8, 2, 8, 3, 3), (2, 6, 9, 1, 3, 2, 5), (1, 5, 6, 4, 32, 2, 3),
    (1, 4, 4, 5, 16, 1, 5), (1, 4, 4, 2, 64, 0, 3)])
def test_token_conv_kernel_equals_numpy(batch, height, width, heads, dim, shift, kernel):
    net = _token_conv_kernel()
    rng = np.random.default_rng(height * 100 + dim)
    groups, channels, k2 = 3 * heads, heads * dim, kernel * kernel
    arrays = [rng.standard_normal(shape).astype(np.float32) for shape in
              ((batch, height * width, groups * dim), (k2, groups), (k2,), (channels, k2, kernel, kernel))]
    config = Tensor(np.array([height, width, shift, kernel], np.int32))
    out = net(*map(Tensor, arrays), config).asnumpy()
    wide = [a.astype(np.float64) for a in arrays]
    reference = _token_conv_reference(*wide, height, width, shift, kernel)
    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())
    probe = rng.standard_normal(out.shape).astype(np.float32)
    grads = ms.grad(_KernelObjective(net, Tensor(probe), config), (0, 1, 2, 3))(*map(Tensor, arrays))

    def objective(values):
        return float((_token_conv_reference(*values, height, width, shift, kernel) * probe).sum())

    for which, grad in enumerate(grads):
        grad = grad.asnumpy()
        for _ in range(5):  # the output is linear in each argument: central differences are exact
            index = tuple(int(rng.integers(0, n)) for n in arrays[which].shape)
            up, down = list(wide), list(wide)
            up[which], down[which] = wide[which].copy(), wide[which].copy()
            up[which][index] += 0.5
            down[which][index] -= 0.5
            expected = objective(up) - objective(down)
            assert abs(grad[index] - expected) <= 1e-4 * (1 + abs(expected)), (which, index)


def _token_pair(cls, seed, **options):
    """The layer with the token kernel and a copy (same parameters) running the channel-major conv path."""
    _token_conv_kernel()
    fast, reference = cls(**options), cls(**options)
    assert fast.token_conv is not None
    reference.token_conv = None
    _randomise([fast, reference], seed)
    return fast, reference


class _TokensObjective(nn.Cell):
    def __init__(self, layer, probe, height, width):
        super().__init__()
        self.layer, self.probe, self.height, self.width = layer, probe, height, width

    def construct(self, x):
        return (self.layer(x, self.height, self.width) * self.probe).sum()


@pytest.mark.parametrize("options,size", [
    (dict(dim=16, num_heads=2, window_size=4, shift_size=0), 8),
    (dict(dim=16, num_heads=2, window_size=4, shift_size=2), 8),
    (dict(dim=24, num_heads=3, window_size=4, shift_size=1), 6),  # padded to 8 x 8 inside, d = 8
    (dict(dim=16, num_heads=2, window_size=4, shift_size=2, conv_on_shifted_map=False), 8),
    (dict(dim=16, num_heads=2, window_size=4, shift_size=2, fc_bias=False, shift_impl="fixed"), 8),
    (dict(dim=16, num_heads=2, window_size=4, shift_size=2, shift_impl="random", rate_mode="conv"), 8),
    (dict(dim=64, num_heads=2, window_size=4, shift_size=2, kernel_conv=5), 8),
])
def test_acmix_window_token_kernel_equals_channel_major_path(options, size):
    fast, reference = _token_pair(ACmixWindow, 5, **options)
    rng = np.random.default_rng(6)
    x = Tensor(rng.standard_normal((2, size, size, options["dim"])).astype(np.float32))
    probe = Tensor(rng.standard_normal((2, size, size, options["dim"])).astype(np.float32))
    _assert_same(_loss_and_grads(fast, x, probe), _loss_and_grads(reference, x, probe))


@pytest.mark.parametrize("options,height,width", [
    (dict(dim=16, num_heads=2, sr_ratio=1), 5, 6),
    (dict(dim=16, num_heads=2, sr_ratio=2), 8, 6),
    (dict(dim=16, num_heads=1, sr_ratio=3), 7, 8),  # 7 x 8 reduced to 2 x 2: uneven nearest upsampling
    (dict(dim=16, num_heads=2, sr_ratio=1, num_prefix_tokens=1), 4, 4),
    (dict(dim=32, num_heads=4, sr_ratio=2, rate_mode="conv", fc_bias=False), 4, 4),
])
def test_acmix_global_token_kernel_equals_channel_major_path(options, height, width):
    fast, reference = _token_pair(ACmixGlobal, 7, **options)
    rng = np.random.default_rng(8)
    length = options.get("num_prefix_tokens", 0) + height * width
    x = Tensor(rng.standard_normal((2, length, options["dim"])).astype(np.float32))
    probe = Tensor(rng.standard_normal((2, length, options["dim"])).astype(np.float32))
    results = []
    for layer in (fast, reference):
        params = layer.trainable_params()
        loss, (grad_x, grads) = ms.value_and_grad(_TokensObjective(layer, probe, height, width), 0, params)(x)
        results.append({"loss": loss.asnumpy(), "x": grad_x.asnumpy(),
                        **{param.name.split(".", 1)[-1]: grad.asnumpy() for param, grad in zip(params, grads)}})
    _assert_same(*results)


def test_set_conv_path_kernels_switches_the_token_kernel_off_with_the_same_output():
    _token_conv_kernel()
    from acmix_ms import set_conv_path_kernels
    kwargs = dict(num_classes=10, img_size=32, embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4)
    net = models.create_model("swin_tiny_acmix", **kwargs)
    layers = [cell for _, cell in net.cells_and_names() if isinstance(cell, ACmixBase)]
    assert layers and all(layer.token_conv is not None for layer in layers)
    twin = models.create_model("swin_tiny_acmix", **kwargs)
    ms.load_param_into_net(twin, net.parameters_dict(), strict_load=True)
    net.set_train(False)
    twin.set_train(False)
    assert set_conv_path_kernels(twin, False) == len(layers)
    assert all(layer.token_conv is None and not layer.conv_kernel for layer in
               (cell for _, cell in twin.cells_and_names() if isinstance(cell, ACmixBase)))
    x = Tensor(np.random.default_rng(9).standard_normal((2, 3, 32, 32)).astype(np.float32))
    np.testing.assert_allclose(twin(x).asnumpy(), net(x).asnumpy(), rtol=1e-4, atol=1e-5)
