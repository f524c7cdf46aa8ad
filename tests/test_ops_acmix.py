"""acmix_ms Cells against the independent NumPy references (tests/numpy_reference.py), in graph mode.

Every Cell is built once per configuration (module-scoped fixtures: one graph compilation each), its
parameters are randomised (except the frozen shift kernels) and read back by name with
``parameters_and_names()``, and its output is compared with the float64 reference.
"""
import numpy as np
import pytest

import mindspore as ms

import acmix_ms
import numpy_reference as ref

RTOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE)


def rng_for(name):
    return np.random.default_rng(sum(ord(ch) * (i + 1) for i, ch in enumerate(name)))


# ------------------------------------------------------------------------------------------------ the cases
# Each case: the Cell class and its kwargs, the input spatial size, and how the reference is called.
LOCAL = dict(in_channels=4, out_channels=8, num_heads=2)
WINDOW = dict(dim=8, num_heads=2)
GLOBAL = dict(dim=8, num_heads=2)
PATCH = dict(in_channels=8, rel_channels=2, mid_channels=4, share_planes=2)

CASES = {
    # ACmixLocal (ResNet / SASA)
    "local-s1-odd": ("local", dict(LOCAL, kernel_att=5), (7, 6)),
    "local-s2-odd-fixedshift-fixedrates": ("local", dict(LOCAL, kernel_att=3, stride=2, shift_impl="fixed",
                                                         rate_mode="fixed", rates=(0.8, 0.3)), (7, 7)),
    "local-s2-tensor": ("local", dict(LOCAL, kernel_att=3, stride=2, shift_impl="tensor"), (6, 5)),
    "local-attention-k7": ("local", dict(LOCAL, kernel_att=7, rate_mode="attention"), (5, 6)),
    "local-conv-k5-random": ("local", dict(LOCAL, kernel_att=3, kernel_conv=5, stride=2, rate_mode="conv",
                                           shift_impl="random"), (7, 8)),
    "local-dilation2": ("local", dict(LOCAL, kernel_att=3, dilation=2), (8, 7)),
    "local-lean-s1-odd": ("local", dict(LOCAL, kernel_att=5, attention_impl="lean"), (7, 6)),
    "local-lean-s2-dilation2": ("local", dict(LOCAL, kernel_att=3, stride=2, dilation=2, attention_impl="lean"),
                                (9, 8)),
    # ACmixWindow (Swin)
    "window-shift0": ("window", dict(WINDOW, window_size=4, shift_size=0), (8, 8)),
    "window-shift2": ("window", dict(WINDOW, window_size=4, shift_size=2), (8, 8)),
    "window-shift2-unrolledconv-fixed": ("window", dict(WINDOW, window_size=4, shift_size=2,
                                                        conv_on_shifted_map=False, shift_impl="fixed",
                                                        rate_mode="fixed", rates=(0.8, 0.3)), (8, 8)),
    "window-pad-tensor": ("window", dict(WINDOW, window_size=3, shift_size=1, shift_impl="tensor"), (7, 5)),
    "window-attention": ("window", dict(WINDOW, window_size=3, shift_size=1, rate_mode="attention"), (6, 6)),
    "window-conv-random": ("window", dict(WINDOW, window_size=4, shift_size=2, rate_mode="conv",
                                          shift_impl="random"), (6, 7)),
    # ACmixGlobal (PVT v1)
    "global-r1": ("global", dict(GLOBAL, sr_ratio=1), (4, 5)),
    "global-r2": ("global", dict(GLOBAL, sr_ratio=2), (6, 4)),
    "global-r1-prefix-tensor-fixedrates": ("global", dict(GLOBAL, sr_ratio=1, num_prefix_tokens=1,
                                                          shift_impl="tensor", rate_mode="fixed",
                                                          rates=(0.8, 0.3)), (3, 4)),
    # odd sizes: sr gives floor(H/R) rows, nearest upsampling maps row i to floor(i * (H//R) / H)
    "global-r2-attention-odd": ("global", dict(GLOBAL, sr_ratio=2, rate_mode="attention"), (5, 4)),
    "global-r2-conv-fixed-odd": ("global", dict(GLOBAL, sr_ratio=2, rate_mode="conv", shift_impl="fixed"), (5, 6)),
    # ACmixPatchwise (SAN)
    "patch-k3": ("patch", dict(PATCH, kernel_att=3), (6, 5)),
    "patch-k5-fixedshift-fixedrates": ("patch", dict(PATCH, kernel_att=5, shift_impl="fixed", rate_mode="fixed",
                                                     rates=(0.8, 0.3)), (7, 6)),
    "patch-attention": ("patch", dict(PATCH, kernel_att=3, rate_mode="attention"), (5, 5)),
    "patch-conv-tensor-k5": ("patch", dict(PATCH, kernel_att=3, kernel_conv=5, rate_mode="conv",
                                           shift_impl="tensor"), (5, 6)),
}
CELL_CLASSES = {"local": acmix_ms.ACmixLocal, "window": acmix_ms.ACmixWindow, "global": acmix_ms.ACmixGlobal,
                "patch": acmix_ms.ACmixPatchwise}
# parameters that belong to the attention aggregation only (absent with rate_mode='conv')
ATTENTION_ONLY = {"local": ("conv_p",), "window": ("relative_position_bias_table", "proj"),
                  "global": ("proj",), "patch": ("conv_w",)}
BATCH = 2


def make_input(case_name, dtype=np.float32):
    family, kwargs, (height, width) = CASES[case_name]
    rng = rng_for("input" + case_name)
    if family in ("local", "patch"):
        return rng.standard_normal((BATCH, kwargs["in_channels"], height, width)).astype(dtype)
    if family == "window":
        return rng.standard_normal((BATCH, height, width, kwargs["dim"])).astype(dtype)
    prefix = kwargs.get("num_prefix_tokens", 0)
    return rng.standard_normal((BATCH, prefix + height * width, kwargs["dim"])).astype(dtype)


def call_cell(cell, case_name, x):
    family, _, (height, width) = CASES[case_name]
    if family == "global":
        return cell(x, height, width)
    return cell(x)


def reference_output(case_name, params, x):
    family, kwargs, (height, width) = CASES[case_name]
    common = {key: kwargs[key] for key in ("kernel_conv", "shift_impl", "rate_mode", "rates") if key in kwargs}
    if family == "local":
        return ref.acmix_local(x, params, kwargs["num_heads"], kwargs.get("kernel_att", 7), stride=kwargs.get(
            "stride", 1), dilation=kwargs.get("dilation", 1), **common)
    if family == "window":
        return ref.acmix_window(x, params, kwargs["num_heads"], kwargs["window_size"], kwargs["shift_size"],
                                conv_on_shifted_map=kwargs.get("conv_on_shifted_map", True), **common)
    if family == "global":
        return ref.acmix_global(x, height, width, params, kwargs["num_heads"], kwargs["sr_ratio"],
                                kwargs.get("num_prefix_tokens", 0), **common)
    return ref.acmix_patchwise(x, params, kwargs["rel_channels"], kwargs["mid_channels"], kwargs["kernel_att"],
                               **common)


def randomise_parameters(cell, seed_name, zero_biases=False):
    """Random values for every parameter (BN variances positive); frozen shift kernels are left alone."""
    rng = rng_for(seed_name)
    for name, param in cell.parameters_and_names():
        shape = tuple(param.shape)
        if name.endswith("dep_conv.weight") and not param.requires_grad:
            continue
        if name.endswith("moving_variance"):
            value = rng.uniform(0.5, 2.0, shape)
        elif name.endswith("gamma"):
            value = rng.uniform(0.5, 1.5, shape)
        elif name in ("rate1", "rate2"):
            value = rng.uniform(-1.0, 1.0, shape)
        elif zero_biases and name.endswith("bias"):
            value = np.zeros(shape)
        else:
            value = rng.standard_normal(shape) * 0.5
        param.set_data(ms.Tensor(value.astype(np.float32)))


def parameters_of(cell):
    return {name: param.asnumpy() for name, param in cell.parameters_and_names()}


def expected_shape(case_name):
    """Output shape from the API table of design.md: local (B, Cout, ceil(H/s), ceil(W/s)), others keep size."""
    family, kwargs, (height, width) = CASES[case_name]
    stride = kwargs.get("stride", 1)
    if family == "local":
        return (BATCH, kwargs["out_channels"], -(-height // stride), -(-width // stride))
    if family == "patch":
        return (BATCH, kwargs["mid_channels"], height, width)
    return make_input(case_name).shape


def build_cell(case_name):
    family, kwargs, _ = CASES[case_name]
    cell = CELL_CLASSES[family](**kwargs)
    cell.set_train(False)
    return cell


_BUILT = {}  # case name -> built case: tests that narrow the cases (indirect parametrisation) reuse them


@pytest.fixture(scope="module", params=sorted(CASES))
def built(request):
    """(case name, cell, parameters as NumPy, input, float32 output) - one compilation per case."""
    case_name = request.param
    if case_name not in _BUILT:
        cell = build_cell(case_name)
        randomise_parameters(cell, case_name)
        x = make_input(case_name)
        out = call_cell(cell, case_name, ms.Tensor(x)).asnumpy()
        _BUILT[case_name] = case_name, cell, parameters_of(cell), x, out
    return _BUILT[case_name]


def assert_close(actual, expected, rtol=RTOL):
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


# ------------------------------------------------------------------------------------- forward vs reference
def test_cell_matches_reference(built):
    case_name, _, params, x, out = built
    expected = reference_output(case_name, params, x)
    assert out.shape == expected.shape
    assert_close(out, expected)


def test_output_shape_is_ceil_of_stride(built):
    case_name, _, _, _, out = built
    assert out.shape == expected_shape(case_name)


def test_parameters_follow_rate_and_shift_modes(built):
    case_name, cell, params, _, _ = built
    family, kwargs, _ = CASES[case_name]
    rate_mode = kwargs.get("rate_mode", "learnable")
    shift_impl = kwargs.get("shift_impl", "learnable")
    names = set(params)
    assert ({"rate1", "rate2"} <= names) == (rate_mode == "learnable")
    assert not {"rate1", "rate2"} & names or rate_mode == "learnable"
    has_conv = rate_mode != "attention"
    assert any(name.startswith("fc.") for name in names) == has_conv
    assert ("dep_conv.weight" in names) == (has_conv and shift_impl != "tensor")
    for prefix in ATTENTION_ONLY[family]:
        assert any(name.startswith(prefix) for name in names) == (rate_mode != "conv"), prefix
    trainable = {param.name for param in cell.trainable_params()}
    if "dep_conv.weight" in names:
        assert ("dep_conv.weight" in trainable) == (shift_impl != "fixed")
        if shift_impl == "fixed":
            np.testing.assert_array_equal(params["dep_conv.weight"],
                                          ref.shift_kernels(*params["dep_conv.weight"].shape[::2]))


# rates are Parameters only with rate_mode='learnable'
LEARNABLE_CASES = sorted(name for name, (_, kwargs, _) in CASES.items()
                         if kwargs.get("rate_mode", "learnable") == "learnable")


@pytest.mark.parametrize("built", LEARNABLE_CASES, indirect=True)
def test_learnable_rates_are_used(built):
    """Changing rate2 moves the output by exactly delta * conv path (Eq. 13 is linear in the rates)."""
    case_name, cell, params, x, out = built
    rate2 = dict(cell.parameters_and_names())["rate2"]
    old = rate2.asnumpy().copy()
    rate2.set_data(ms.Tensor(old + 1.0))
    try:
        moved = call_cell(cell, case_name, ms.Tensor(x)).asnumpy()
    finally:
        rate2.set_data(ms.Tensor(old))
    conv_only = reference_output(case_name, dict(params, rate1=np.zeros(1), rate2=np.ones(1)), x)
    assert_close(moved - out, conv_only, rtol=1e-3)


# ------------------------------------------------------------------------------------------------ ShiftConv
SHIFT_CASES = [("tensor", 3, 1, (7, 6)), ("fixed", 3, 2, (7, 7)), ("tensor", 5, 2, (6, 7)), ("learnable", 5, 1, (5, 6))]


@pytest.mark.parametrize("impl,kernel_size,stride,size", SHIFT_CASES)
def test_shift_conv_matches_reference(impl, kernel_size, stride, size):
    head_dim, out_channels = 2, 6
    cell = acmix_ms.ShiftConv(head_dim, kernel_size, out_channels, impl, stride=stride)
    rng = rng_for(f"shift{impl}{kernel_size}{stride}")
    if impl == "learnable":
        randomise_parameters(cell, "shift-learnable")
    maps = rng.standard_normal((BATCH, head_dim * kernel_size ** 2) + size).astype(np.float32)
    out = cell(ms.Tensor(maps)).asnumpy()
    weight = parameters_of(cell).get("weight")
    expected = ref.shift_conv(maps, kernel_size, out_channels, impl, weight, stride)
    assert out.shape == (BATCH, out_channels, -(-size[0] // stride), -(-size[1] // stride))
    assert_close(out, expected)
    if impl != "learnable":  # tensor shifts and frozen one-hot kernels are the same operator (Fig. 3a vs 3b)
        assert_close(out, ref.tensor_shift_sum(maps, kernel_size, out_channels, stride))


@pytest.mark.parametrize("impl", ["tensor", "fixed", "learnable", "random"])
def test_shift_conv_weights_by_impl(impl):
    cell = acmix_ms.ShiftConv(3, 3, 6, impl)
    params = dict(cell.parameters_and_names())
    if impl == "tensor":
        assert not params
        return
    weight = params["weight"]
    assert tuple(weight.shape) == (6, 9, 3, 3)
    assert weight.requires_grad == (impl != "fixed")
    is_shift = np.array_equal(weight.asnumpy(), ref.shift_kernels(6, 3))
    assert is_shift == (impl in ("fixed", "learnable"))
    if impl == "random":
        assert np.abs(weight.asnumpy()).max() > 0


@pytest.mark.parametrize("family,kwargs", [("local", dict(LOCAL, kernel_att=3)), ("window", dict(WINDOW)),
                                           ("global", dict(GLOBAL, sr_ratio=2)), ("patch", dict(PATCH))])
def test_default_initialisation(family, kwargs):
    """Rates start at `rates` (default 0.5, 0.5); 'learnable' starts from the shift kernels (Fig. 3c.II)."""
    cell = CELL_CLASSES[family](**kwargs)
    params = parameters_of(cell)
    np.testing.assert_array_equal(params["rate1"], [0.5])
    np.testing.assert_array_equal(params["rate2"], [0.5])
    np.testing.assert_array_equal(params["dep_conv.weight"], ref.shift_kernels(*params["dep_conv.weight"].shape[::2]))
    custom = parameters_of(CELL_CLASSES[family](**kwargs, rates=(0.2, 0.9)))
    np.testing.assert_allclose(np.concatenate([custom["rate1"], custom["rate2"]]), [0.2, 0.9], rtol=1e-6)


# ------------------------------------------------------------------- conv path == one dense k x k convolution
@pytest.mark.parametrize("kernel_conv,stride,size", [(3, 2, (7, 6)), (5, 1, (6, 5))])
def test_conv_path_equals_dense_convolution(kernel_conv, stride, size):
    """Projection + fc + fixed shift (zero biases) is one k x k conv of the input (Eqs. 1-8)."""
    case_name = f"dense-{kernel_conv}-{stride}"
    cell = acmix_ms.ACmixLocal(**LOCAL, kernel_att=3, kernel_conv=kernel_conv, stride=stride, rate_mode="conv",
                               shift_impl="fixed")
    cell.set_train(False)
    randomise_parameters(cell, case_name, zero_biases=True)
    params = parameters_of(cell)
    x = rng_for(case_name).standard_normal((BATCH, LOCAL["in_channels"]) + size).astype(np.float32)
    out = cell(ms.Tensor(x)).asnumpy()
    head_dim = LOCAL["out_channels"] // LOCAL["num_heads"]
    dense_weight = ref.dense_conv_weight(params["qkv.weight"], params["fc.weight"], params["dep_conv.weight"],
                                         head_dim)
    assert dense_weight.shape == (LOCAL["out_channels"], LOCAL["in_channels"], kernel_conv, kernel_conv)
    assert_close(out, ref.conv2d_direct(x, dense_weight, stride=stride, padding=kernel_conv // 2))


# ------------------------------------------------------------------------------------------------- float16
FLOAT16_CASES = ["local-s2-odd-fixedshift-fixedrates", "window-pad-tensor", "global-r2", "patch-k3"]


@pytest.mark.parametrize("case_name", FLOAT16_CASES)
def test_float16_graph_runs_close_to_float32(case_name):
    """All parameters and the input in float16: the graph must stay float16 and match float32 to ~1e-2.

    The float32 side is the reference run on the same (float16-representable) values.
    """
    cell = build_cell(case_name)
    randomise_parameters(cell, case_name)
    values = {name: value.astype(np.float16) for name, value in parameters_of(cell).items()}
    for name, param in cell.parameters_and_names():
        param.set_dtype(ms.float16)
        param.set_data(ms.Tensor(values[name]))
    x = make_input(case_name, np.float16)
    out16 = call_cell(cell, case_name, ms.Tensor(x))
    assert out16.dtype == ms.float16
    out16 = out16.asnumpy().astype(np.float32)
    assert np.isfinite(out16).all()
    expected = reference_output(case_name, {name: value.astype(np.float32) for name, value in values.items()},
                                x.astype(np.float32))
    assert_close(out16, expected, rtol=1e-2)


# ----------------------------------------------------------------------------------------------- gradients
GRAD_CASES = ["local-s1-odd", "local-lean-s2-dilation2", "local-conv-k5-random", "window-shift2", "global-r2", "patch-k3",
              "local-s2-odd-fixedshift-fixedrates"]


def finite_difference(function, values, index, step=1e-4):
    """Central difference of the scalar ``function(values)`` in the element ``index`` of ``values`` (float64)."""
    plus, minus = values.copy(), values.copy()
    plus[index] += step
    minus[index] -= step
    return (function(plus) - function(minus)) / (2 * step)


@pytest.mark.parametrize("case_name", GRAD_CASES)
def test_gradients_match_finite_differences_of_the_reference(case_name):
    """d(sum(out * probe)) with respect to the input and every trainable parameter, at the largest-gradient
    element of each tensor (plus a random input element), equals the central finite difference of the float64
    NumPy reference, which is non-zero there (every parameter is reached) except for conv_p.bias."""
    cell = build_cell(case_name)
    randomise_parameters(cell, case_name)
    named = [(name, param) for name, param in cell.parameters_and_names() if param.requires_grad]
    weights = [param for _, param in named]
    x_np = make_input(case_name)
    probe_np = rng_for("probe" + case_name).standard_normal(expected_shape(case_name))
    probe = ms.Tensor(probe_np.astype(np.float32))
    family, _, (height, width) = CASES[case_name]

    def loss_fn(inputs):
        if family == "global":
            return (cell(inputs, height, width) * probe).sum()
        return (cell(inputs) * probe).sum()

    grad_x, grads = ms.grad(loss_fn, grad_position=0, weights=weights)(ms.Tensor(x_np))
    assert len(grads) == len(weights)
    params = parameters_of(cell)
    x64 = x_np.astype(np.float64)

    def reference_loss(values, name=None):
        if name is None:
            return float((reference_output(case_name, params, values) * probe_np).sum())
        return float((reference_output(case_name, dict(params, **{name: values}), x64) * probe_np).sum())

    checks = [("input", grad_x.asnumpy(), x64, lambda v: reference_loss(v))]
    for (name, param), grad in zip(named, grads):
        grad = grad.asnumpy()
        assert grad.shape == tuple(param.shape), name
        assert np.isfinite(grad).all(), name
        checks.append((name, grad, params[name].astype(np.float64), lambda v, n=name: reference_loss(v, n)))
    scale = max(np.abs(grad).max() for _, grad, _, _ in checks)
    for name, grad, values, function in checks:
        indices = [np.unravel_index(np.abs(grad).argmax(), grad.shape)]
        if name == "input":
            indices.append(tuple(rng_for("index" + case_name).integers(0, n) for n in grad.shape))
        for index in indices:
            expected = finite_difference(function, values, index)
            assert grad[index] == pytest.approx(expected, rel=2e-3, abs=1e-5 * scale), (name, index)
            # conv_p.bias adds one constant to every neighbour's logit, which softmax cancels: zero gradient
            assert (abs(expected) > 1e-4 * scale) != name.endswith("conv_p.bias"), (name, expected)
    frozen = [p.name for p in cell.get_parameters() if p.name.endswith("dep_conv.weight") and not p.requires_grad]
    assert bool(frozen) == (CASES[case_name][1].get("shift_impl") == "fixed")
    assert not set(frozen) & {p.name for p in weights}


# ----------------------------------------------------------------------------------------- invalid arguments
# (Cell, positional args, keyword args, the argument the message must name)
INVALID_ARGUMENTS = [
    ("ACmixLocal", (4, 6), dict(num_heads=4), "num_heads"),
    ("ACmixWindow", (10, 4), {}, "num_heads"),
    ("ACmixGlobal", (10, 4), {}, "num_heads"),
    ("ACmixLocal", (4, 8), dict(num_heads=2, shift_impl="shifted"), "shift_impl"),
    ("ACmixWindow", (8, 2), dict(shift_impl="conv"), "shift_impl"),
    ("ShiftConv", (2, 3, 4, "roll"), {}, "impl"),
    ("ACmixLocal", (4, 8), dict(num_heads=2, rate_mode="sum"), "rate_mode"),
    ("ACmixGlobal", (8, 2), dict(rate_mode="mean"), "rate_mode"),
    ("ACmixPatchwise", (8, 2, 4), dict(share_planes=2, rate_mode="both"), "rate_mode"),
    ("ACmixLocal", (4, 8), dict(num_heads=2, kernel_conv=4), "kernel_conv"),
    ("ACmixWindow", (8, 2), dict(kernel_conv=2), "kernel_conv"),
    ("ACmixPatchwise", (8, 2, 4), dict(share_planes=2, kernel_conv=4), "kernel_conv"),
    ("ShiftConv", (2, 4, 4, "fixed"), {}, "kernel_size"),
    ("ACmixLocal", (4, 8), dict(num_heads=2, kernel_att=6), "kernel_att"),
    ("ACmixPatchwise", (8, 2, 4), dict(share_planes=2, kernel_att=4), "kernel_att"),
    ("ACmixWindow", (8, 2), dict(window_size=4, shift_size=4), "shift_size"),
    ("ACmixPatchwise", (8, 3, 4), dict(share_planes=2), "mid_channels"),
    ("ACmixGlobal", (8, 2), dict(sr_ratio=2, num_prefix_tokens=1), "sr_ratio"),
]


@pytest.mark.parametrize("cell_name,args,kwargs,argument", INVALID_ARGUMENTS,
                         ids=[f"{cell}-{argument}" for cell, _, _, argument in INVALID_ARGUMENTS])
def test_invalid_arguments_raise_value_error(cell_name, args, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        getattr(acmix_ms, cell_name)(*args, **kwargs)


def test_invalid_message_lists_allowed_values():
    with pytest.raises(ValueError) as info:
        acmix_ms.ACmixLocal(4, 8, num_heads=2, shift_impl="shifted")
    assert all(impl in str(info.value) for impl in ref.SHIFT_IMPLS)
    with pytest.raises(ValueError) as info:
        acmix_ms.ACmixWindow(8, 2, rate_mode="sum")
    assert all(mode in str(info.value) for mode in ref.RATE_MODES)


@pytest.mark.parametrize("cell_factory,shape", [
    pytest.param(lambda: acmix_ms.ACmixPatchwise(8, 2, 4, share_planes=2, kernel_att=7), (1, 8, 6, 3),
                 id="ACmixPatchwise"),
])
def test_input_smaller_than_reflection_window_raises(cell_factory, shape):
    """(ACmixLocal pads small maps by repeated reflection instead: tests/test_replace_convs.py)"""
    cell = cell_factory()
    with pytest.raises(ValueError, match="too small for reflection padding 3 of the attention window"):
        cell(ms.Tensor(np.zeros(shape, np.float32)))


@pytest.mark.parametrize("cell_factory,shape", [
    pytest.param(lambda: acmix_ms.ACmixLocal(4, 8, kernel_att=3, num_heads=2), (4, 6, 6), id="ACmixLocal"),
    pytest.param(lambda: acmix_ms.ACmixWindow(8, 2, window_size=3), (1, 36, 8), id="ACmixWindow"),
    pytest.param(lambda: acmix_ms.ACmixPatchwise(8, 2, 4, share_planes=2, kernel_att=3), (1, 8, 6, 6, 1),
                 id="ACmixPatchwise"),
    pytest.param(lambda: acmix_ms.ShiftConv(2, 3, 4, "tensor"), (18, 5, 5), id="ShiftConv"),
])
def test_wrong_input_rank_raises(cell_factory, shape):
    cell = cell_factory()
    with pytest.raises(ValueError, match=f"{type(cell).__name__} expects a 4-D .* input, got {len(shape)}-D"):
        cell(ms.Tensor(np.zeros(shape, np.float32)))


def test_global_wrong_rank_or_token_count_raises():
    cell = acmix_ms.ACmixGlobal(8, 2)
    with pytest.raises(ValueError, match=r"ACmixGlobal expects a 3-D \(B, L, C\) input, got 4-D"):
        cell(ms.Tensor(np.zeros((1, 8, 3, 4), np.float32)), 3, 4)
    with pytest.raises(ValueError, match=r"got 12 tokens, expected num_prefix_tokens \+ H\*W = 0 \+ 3\*5"):
        cell(ms.Tensor(np.zeros((1, 12, 8), np.float32)), 3, 5)
