"""models/segmentation.py and engine/segmentation.py: Semantic FPN, UperNet, the per-pixel loss, mIoU.

References: NumPy (metrics by per-class masks, the loss by explicit log-softmax), and torch re-implementations
of mmseg's FPN + FPNHead and UPerHead (+ PPM) written here from their published definitions, fed the same
weights. Graphs run on narrow backbones (16-64 channels, one block per stage) at 64 px or odd sizes.
"""
import numpy as np
import pytest
import mindspore as ms
from mindspore import nn

import models
from engine import segmentation as seg
from models import segmentation as segm

torch = pytest.importorskip("torch")
F = torch.nn.functional

NARROW_PVT = dict(embed_dims=(16, 32, 48, 64), num_heads=(1, 1, 2, 2), depths=(1, 1, 1, 1),
                  mlp_ratios=(2, 2, 2, 2))
NARROW_SWIN = dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2), window_size=4)


def narrow(name, num_classes=5, **extra):
    """A registered segmentor with a narrow backbone and narrow heads (64 px windows/position grids)."""
    if name.startswith("semfpn"):
        kw = dict(backbone_kwargs=dict(NARROW_PVT, drop_path_rate=0.0), fpn_channels=16, head_channels=8)
    else:
        kw = dict(backbone_kwargs=dict(NARROW_SWIN, drop_path_rate=0.0), channels=16, aux_channels=8)
    kw.update(extra)
    return models.create_model(name, num_classes=num_classes, img_size=64, **kw)


# ---- metrics -------------------------------------------------------------------------------------------
def reference_metrics(preds, labels, num_classes, ignore):
    """IoU per class from boolean masks (NaN when neither present nor predicted), pixel accuracy."""
    keep = labels != ignore
    p, t = preds[keep], labels[keep]
    ious = []
    for c in range(num_classes):
        inter = np.sum((p == c) & (t == c))
        union = np.sum((p == c) | (t == c))
        ious.append(inter / union if union else np.nan)
    ious = np.array(ious)
    return ious, np.nanmean(ious), np.mean(p == t)


def test_confusion_metrics_match_a_mask_reference():
    rng = np.random.default_rng(0)
    num_classes, ignore = 6, 255
    meter = seg.SegmentationMeter(num_classes, ignore)
    all_preds, all_labels = [], []
    for batch in range(3):
        labels = rng.integers(0, 4, (2, 9, 7))  # classes 4 and 5 never in the ground truth
        labels[rng.random(labels.shape) < 0.2] = ignore
        logits = rng.standard_normal((2, num_classes, 9, 7))
        logits[:, 5] -= 100.0  # class 5 never predicted either: no IoU, left out of the mean
        if batch == 0:
            logits[0, 4, 0, 0] = 100.0  # class 4 predicted once, never true: IoU 0, counted
        meter.update(logits, labels)
        all_preds.append(logits.argmax(1))
        all_labels.append(labels)
    preds, labels = np.concatenate(all_preds), np.concatenate(all_labels)
    ious, miou, pixel_acc = reference_metrics(preds, labels, num_classes, ignore)
    result = meter.result()
    assert result["iou"][5] is None and result["iou"][4] == 0.0
    np.testing.assert_allclose([v if v is not None else np.nan for v in result["iou"]], 100 * ious)
    np.testing.assert_allclose(result["miou"], 100 * miou)
    np.testing.assert_allclose(result["pixel_acc"], 100 * pixel_acc)
    assert result["pixels"] == int(np.sum(labels != ignore))
    # class indices instead of logits give the same matrix
    again = seg.SegmentationMeter(num_classes, ignore)
    again.update(preds, labels)
    np.testing.assert_array_equal(again.matrix, meter.matrix)


def test_metrics_reject_bad_labels_and_empty_input():
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        seg.confusion_matrix(np.zeros((2, 2)), np.array([[0, 7], [1, 255]]), 3)
    with pytest.raises(ValueError, match="differ in size"):
        seg.confusion_matrix(np.zeros((2, 2)), np.zeros((2, 3)), 3)
    meter = seg.SegmentationMeter(3)
    meter.update(np.zeros((1, 2, 2), np.int64), np.full((1, 2, 2), 255))
    with pytest.raises(ValueError, match="no labelled pixels"):
        meter.result()


def test_all_reduce_recombines_large_counts(monkeypatch):
    """The int64 -> 24-bit int32 digits -> int64 round trip, with a fake 3-rank collective (x -> 3x)."""
    class Triple:
        def __call__(self, x):
            return x * 3
    monkeypatch.setattr(seg, "_AllReduceSum", Triple)
    matrix = np.array([[0, 1, 2 ** 24 - 1], [2 ** 24, 5 * 2 ** 40 + 123, 2 ** 31 + 7], [3, 0, 9]], np.int64)
    np.testing.assert_array_equal(seg.all_reduce_confusion(matrix), 3 * matrix)


# ---- loss ----------------------------------------------------------------------------------------------
def reference_loss(logits, labels, ignore):
    shifted = logits - logits.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    total, count = 0.0, 0
    for b, i, j in np.ndindex(labels.shape):
        if labels[b, i, j] != ignore:
            total -= logp[b, labels[b, i, j], i, j]
            count += 1
    return total / max(count, 1)


def test_loss_matches_numpy_with_ignore_and_aux():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((2, 4, 5, 3)).astype(np.float32) * 3
    aux = rng.standard_normal((2, 4, 5, 3)).astype(np.float32)
    labels = rng.integers(0, 4, (2, 5, 3)).astype(np.int32)
    labels[0, :2] = 255
    loss_fn = seg.SegmentationLoss(ignore_index=255, aux_weight=0.4)
    got = loss_fn(ms.Tensor(logits), ms.Tensor(labels)).asnumpy()
    np.testing.assert_allclose(got, reference_loss(logits, labels, 255), rtol=1e-5)
    both = loss_fn((ms.Tensor(logits), ms.Tensor(aux)), ms.Tensor(labels)).asnumpy()
    np.testing.assert_allclose(both, reference_loss(logits, labels, 255) + 0.4 * reference_loss(aux, labels, 255),
                               rtol=1e-5)
    ignored = loss_fn(ms.Tensor(logits), ms.Tensor(np.full_like(labels, 255))).asnumpy()
    assert ignored == 0.0


# ---- heads against torch re-implementations of mmseg ------------------------------------------------
class TConvModule(torch.nn.Module):
    def __init__(self, cin, cout, k, norm):
        super().__init__()
        self.conv = torch.nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
        self.norm = torch.nn.BatchNorm2d(cout) if norm == "bn" else torch.nn.GroupNorm(min(32, cout), cout)

    def forward(self, x):
        return F.relu(self.norm(self.conv(x)))


def tresize(x, size, mode="bilinear"):
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class TFPNAndHead(torch.nn.Module):
    """mmseg FPN (num_outs = inputs) + FPNHead."""

    def __init__(self, in_channels, strides, num_classes, fpn_ch, ch, norm):
        super().__init__()
        self.neck = torch.nn.Module()
        self.neck.lateral_convs = torch.nn.ModuleList([torch.nn.Conv2d(c, fpn_ch, 1) for c in in_channels])
        self.neck.fpn_convs = torch.nn.ModuleList([torch.nn.Conv2d(fpn_ch, fpn_ch, 3, padding=1)
                                                   for _ in in_channels])
        self.decode_head = torch.nn.Module()
        heads = []
        for i, s in enumerate(strides):
            layers = []
            for k in range(max(1, int(np.log2(s) - np.log2(strides[0])))):
                layers.append(TConvModule(fpn_ch if k == 0 else ch, ch, 3, norm))
                if s != strides[0]:
                    layers.append(torch.nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            heads.append(torch.nn.Sequential(*layers))
        self.decode_head.scale_heads = torch.nn.ModuleList(heads)
        self.decode_head.cls = torch.nn.Module()
        self.decode_head.cls.conv_seg = torch.nn.Conv2d(ch, num_classes, 1)

    def forward(self, xs):
        lat = [conv(x) for conv, x in zip(self.neck.lateral_convs, xs)]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + tresize(lat[i], lat[i - 1].shape[2:], "nearest")
        outs = [conv(x) for conv, x in zip(self.neck.fpn_convs, lat)]
        out = self.decode_head.scale_heads[0](outs[0])
        for i in range(1, len(outs)):
            out = out + tresize(self.decode_head.scale_heads[i](outs[i]), out.shape[2:])
        return self.decode_head.cls.conv_seg(out)


class TUPerHead(torch.nn.Module):
    def __init__(self, in_channels, num_classes, ch, scales, norm):
        super().__init__()
        self.psp_modules = torch.nn.Module()
        self.psp_modules.branches = torch.nn.ModuleList([
            torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(s), TConvModule(in_channels[-1], ch, 1, norm))
            for s in scales])
        self.bottleneck = TConvModule(in_channels[-1] + len(scales) * ch, ch, 3, norm)
        self.lateral_convs = torch.nn.ModuleList([TConvModule(c, ch, 1, norm) for c in in_channels[:-1]])
        self.fpn_convs = torch.nn.ModuleList([TConvModule(ch, ch, 3, norm) for _ in in_channels[:-1]])
        self.fpn_bottleneck = TConvModule(len(in_channels) * ch, ch, 3, norm)
        self.cls = torch.nn.Module()
        self.cls.conv_seg = torch.nn.Conv2d(ch, num_classes, 1)

    def forward(self, xs):
        top = xs[-1]
        psp = [top] + [tresize(b(top), top.shape[2:]) for b in self.psp_modules.branches]
        lat = [conv(x) for conv, x in zip(self.lateral_convs, xs[:-1])] + [self.bottleneck(torch.cat(psp, 1))]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + tresize(lat[i], lat[i - 1].shape[2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, lat[:-1])] + [lat[-1]]
        outs = [outs[0]] + [tresize(o, outs[0].shape[2:]) for o in outs[1:]]
        return self.cls.conv_seg(self.fpn_bottleneck(torch.cat(outs, 1)))


TORCH_NAMES = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}


def copy_weights_to_torch(ms_cell, torch_module, prefix_map=None):
    """Give every MindSpore parameter (randomised norm statistics included) to the same-named torch tensor."""
    state = torch_module.state_dict()
    rng = np.random.default_rng(3)
    copied = set()
    for param in ms_cell.get_parameters():
        name = param.name
        for old, new in (prefix_map or {}).items():
            if name.startswith(old):
                name = new + name[len(old):]
        head, _, leaf = name.rpartition(".")
        name = f"{head}.{TORCH_NAMES.get(leaf, leaf)}"
        value = param.asnumpy()
        if leaf in ("moving_mean", "gamma", "beta"):
            value = rng.standard_normal(value.shape).astype(np.float32) * 0.5 + (1.0 if leaf == "gamma" else 0.0)
        elif leaf == "moving_variance":
            value = rng.uniform(0.5, 2.0, value.shape).astype(np.float32)
        param.set_data(ms.Tensor(value))
        assert name in state, f"{param.name} -> {name} not in the torch module"
        state[name] = torch.tensor(value)
        copied.add(name)
    missing = {k for k in state if not k.endswith("num_batches_tracked")} - copied
    assert not missing, missing
    torch_module.load_state_dict(state)
    torch_module.eval()


@pytest.mark.parametrize("family,norm", [("semfpn", "gn"), ("upernet", "bn")])
def test_heads_match_torch_mmseg_definitions(family, norm):
    """Decode path on backbone-like maps of odd sizes (bilinear/nearest resizes of non-integer ratios)."""
    channels, strides, k = [6, 10, 12, 16], [4, 8, 16, 32], 5
    sizes = [(13, 9), (7, 5), (4, 3), (2, 2)]
    if family == "semfpn":
        neck = segm.FPN(channels, 16)
        head = segm.SemanticFPNHead([16] * 4, strides, k, 8, dropout=0.1, norm=norm)
        ref = TFPNAndHead(channels, strides, k, 16, 8, norm)

        class Decode(nn.Cell):
            def __init__(self):
                super().__init__()
                self.neck, self.decode_head = neck, head

            def construct(self, a, b, c, d):
                return self.decode_head(self.neck((a, b, c, d)))
    else:
        head = segm.UPerHead(channels, k, 16, (1, 2, 3, 6), dropout=0.1, norm=norm)
        ref = TUPerHead(channels, k, 16, (1, 2, 3, 6), norm)

        class Decode(nn.Cell):
            def __init__(self):
                super().__init__()
                self.decode_head = head

            def construct(self, a, b, c, d):
                return self.decode_head((a, b, c, d))
    net = Decode()
    net.set_train(False)
    copy_weights_to_torch(net, ref, {} if family == "semfpn" else {"decode_head.": ""})
    rng = np.random.default_rng(2)
    maps = [rng.standard_normal((2, c, h, w)).astype(np.float32) for c, (h, w) in zip(channels, sizes)]
    got = net(*[ms.Tensor(m) for m in maps]).asnumpy()
    with torch.no_grad():
        want = ref([torch.tensor(m) for m in maps]).numpy()
    assert got.shape == (2, k, 13, 9)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# ---- whole models ----------------------------------------------------------------------------------------
def test_registered_models_and_paper_figures():
    names = ("semfpn_pvt_tiny", "semfpn_pvt_tiny_acmix", "semfpn_pvt_small", "semfpn_pvt_small_acmix",
             "upernet_swin_tiny", "upernet_swin_tiny_acmix", "upernet_swin_small", "upernet_swin_small_acmix")
    assert set(names) <= set(models.list_models())
    assert models.paper_info("upernet_swin_tiny")["input_size"] == (512, 2048)
    with pytest.raises(ValueError, match="backbone_kwargs must not set 'out_indices'"):
        narrow("semfpn_pvt_tiny", backbone_kwargs={"out_indices": (0,)})
    with pytest.raises(ValueError, match="strides"):
        narrow("semfpn_pvt_tiny", out_indices=(0, 2))


@pytest.mark.parametrize("name", ["semfpn_pvt_tiny_acmix", "upernet_swin_tiny"])
def test_output_shapes_at_odd_sizes_and_padding(name):
    """Any size works (padded to 32, logits cropped back); the padded pixels do not reach the crop's logits
    differently from an input that is padded by hand."""
    net = narrow(name, num_classes=4)
    net.set_train(False)
    x = np.random.default_rng(0).standard_normal((1, 3, 45, 70)).astype(np.float32)
    out = net(ms.Tensor(x)).asnumpy()
    assert out.shape == (1, 4, 45, 70) and np.isfinite(out).all()
    by_hand = np.zeros((1, 3, 64, 96), np.float32)
    by_hand[:, :, :45, :70] = x
    full = net(ms.Tensor(by_hand)).asnumpy()
    np.testing.assert_allclose(out, full[:, :, :45, :70], rtol=1e-4, atol=1e-5)


def test_unpadded_model_rejects_sizes_off_the_stride():
    net = narrow("semfpn_pvt_tiny", num_classes=3, pad_input=False)
    net.set_train(False)
    with pytest.raises(ValueError, match="not a multiple of 32"):
        net(ms.Tensor(np.zeros((1, 3, 40, 64), np.float32)))


# ---- poly schedule ---------------------------------------------------------------------------------------
def test_warmup_poly_schedule_matches_the_formula():
    from engine.optim import WarmupPolyLR
    base, low, start, warmup, total, power = 0.02, 1e-4, 1e-3, 3, 23, 0.9
    schedule = WarmupPolyLR(base, total, warmup, start, low, power)
    got = np.array([float(schedule(ms.Tensor([s], ms.int32)).asnumpy()[0]) for s in range(total + 1)])
    steps = np.arange(total + 1)
    progress = np.clip((steps - warmup) / (total - warmup), 0, 1)
    want = np.where(steps < warmup, start + (base - start) * steps / warmup,
                    low + (base - low) * (1 - progress) ** power)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)


# ---- params/MACs table tool ------------------------------------------------------------------------------
def test_table_counts_the_head_by_its_conv_shapes():
    """tools/segmentation_table.measure: segmentor MACs = backbone MACs + the UperNet head's convolutions
    counted by hand (PPM at 1/2/3/6, bottleneck, laterals, FPN convs, fusion, classifier)."""
    from models.profile import count_macs
    from tools import segmentation_table
    k, ch = 5, 16
    kw = dict(backbone_kwargs=dict(NARROW_SWIN, drop_path_rate=0.0), channels=ch, aux_channels=8)
    row = segmentation_table.measure("upernet_swin_tiny", input_size=(64, 64), num_classes=k, **kw)
    net = models.create_model("upernet_swin_tiny", num_classes=k, img_size=(64, 64), **kw)
    backbone = count_macs(net.backbone, (1, 3, 64, 64))
    chans, sides = [16, 32, 64, 128], [16, 8, 4, 2]
    head = sum(s * s * chans[3] * ch for s in (1, 2, 3, 6))  # PPM 1x1 convs
    head += sides[3] ** 2 * 9 * (chans[3] + 4 * ch) * ch  # bottleneck
    head += sum(sides[i] ** 2 * (chans[i] * ch + 9 * ch * ch) for i in range(3))  # laterals + FPN convs
    head += sides[0] ** 2 * (9 * 4 * ch * ch + ch * k)  # fusion conv + classifier
    assert round(row["gmacs"] * 1e9) == backbone + head
    assert row["input"] == (64, 64) and row["params_m"] > row["backbone_params_m"]
    assert segmentation_table.segmentation_models(["upernet*"]) == [
        "upernet_swin_small", "upernet_swin_small_acmix", "upernet_swin_tiny", "upernet_swin_tiny_acmix"]


@pytest.mark.slow
def test_any_registered_backbone_feeds_the_heads():
    """A ResNet (strides 1-8 in the demo network) under UperNet: channels and strides from feature_info,
    padding to its own largest stride."""
    net = segm.UperNet(backbone="resnet_tiny", num_classes=3, channels=8, aux_channels=8)
    assert net.size_divisor == max(net.strides) and len(net.channels) == 4
    net.set_train(False)
    out = net(ms.Tensor(np.zeros((2, 3, 21, 30), np.float32)))
    assert out.shape == (2, 3, 21, 30)
