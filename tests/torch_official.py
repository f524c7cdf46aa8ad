"""PyTorch re-implementation of the OFFICIAL ACmix networks' behaviour, for parity tests of the converter.

Written for the tests from the documented behaviour of the official code (github.com/LeapLabTHU/ACmix;
its layouts are summarised in docs/design.md and docs/converting_official_weights.md), not copied from
it. Module and parameter names follow the official state_dict keys, so ``state_dict()`` of these modules
is an official-layout checkpoint. Requires torch (the `torch-tests` extra).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


# ----------------------------------------------------------------------------------------------
# ResNet-ACmix (official ResNet/test_bottleneck.py behaviour)
# ----------------------------------------------------------------------------------------------
class OfficialACmixLocal(nn.Module):
    """ACmix of the official ResNet variant: three 1x1 convs, unfold attention with the
    learned positional term, fc (no bias) + dep_conv (no bias), rates init 0.5."""

    def __init__(self, in_planes, out_planes, kernel_att=7, head=4, kernel_conv=3, stride=1):
        super().__init__()
        self.head, self.kernel_att, self.kernel_conv, self.stride = head, kernel_att, kernel_conv, stride
        self.head_dim = out_planes // head
        self.out_planes = out_planes
        self.conv1 = nn.Conv2d(in_planes, out_planes, 1)
        self.conv2 = nn.Conv2d(in_planes, out_planes, 1)
        self.conv3 = nn.Conv2d(in_planes, out_planes, 1)
        self.conv_p = nn.Conv2d(2, self.head_dim, 1)
        self.fc = nn.Conv2d(3 * head, kernel_conv * kernel_conv, 1, bias=False)
        self.dep_conv = nn.Conv2d(kernel_conv * kernel_conv * self.head_dim, out_planes, kernel_conv, stride=stride,
                                  padding=kernel_conv // 2, groups=self.head_dim, bias=False)
        self.rate1 = nn.Parameter(torch.tensor([0.5]))
        self.rate2 = nn.Parameter(torch.tensor([0.5]))

    def forward(self, x):
        q, k, v = self.conv1(x), self.conv2(x), self.conv3(x)
        b, _, h, w = q.shape
        s, d, n, ka = self.stride, self.head_dim, self.head, self.kernel_att
        loc_x = torch.linspace(-1, 1, w).view(1, w).expand(h, w)
        loc_y = torch.linspace(-1, 1, h).view(h, 1).expand(h, w)
        pe = self.conv_p(torch.stack([loc_x, loc_y]).unsqueeze(0).to(x.dtype))  # (1, d, H, W)
        q_att = q.reshape(b * n, d, h, w) * d ** -0.5
        k_att = k.reshape(b * n, d, h, w)
        v_att = v.reshape(b * n, d, h, w)
        if s > 1:
            q_att = q_att[:, :, ::s, ::s]
            q_pe = pe[:, :, ::s, ::s]
        else:
            q_pe = pe
        h_out, w_out = q_att.shape[-2:]
        pad = nn.ReflectionPad2d(ka // 2)
        unfold = nn.Unfold(ka, stride=s)
        unfold_k = unfold(pad(k_att)).view(b * n, d, ka * ka, h_out, w_out)
        unfold_rpe = unfold(pad(pe)).view(1, d, ka * ka, h_out, w_out)
        att = (q_att.unsqueeze(2) * (unfold_k + q_pe.unsqueeze(2) - unfold_rpe)).sum(1)
        att = att.softmax(1)
        unfold_v = unfold(pad(v_att)).view(b * n, d, ka * ka, h_out, w_out)
        out_att = (att.unsqueeze(1) * unfold_v).sum(2).view(b, self.out_planes, h_out, w_out)

        groups = torch.cat([t.view(b, n, d, h * w) for t in (q, k, v)], 1)  # channel t*N + n
        maps = self.fc(groups).permute(0, 2, 1, 3).reshape(b, d * self.kernel_conv ** 2, h, w)
        out_conv = self.dep_conv(maps)
        return self.rate1 * out_att + self.rate2 * out_conv


class OfficialBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, k_att=7, head=4, k_conv=3, acmix=True):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        # acmix=False: the torchvision-style baseline bottleneck (plain 3x3 convolution; for benchmarks)
        self.conv2 = (OfficialACmixLocal(planes, planes, k_att, head, k_conv, stride) if acmix
                      else nn.Conv2d(planes, planes, 3, stride, 1, bias=False))
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class OfficialResNetACmix(nn.Module):
    def __init__(self, layers, num_classes=1000, k_att=7, head=4, k_conv=3, widths=(64, 128, 256, 512), acmix=True):
        super().__init__()
        self.acmix = acmix
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        for i, (width, blocks) in enumerate(zip(widths, layers)):
            setattr(self, f"layer{i + 1}", self._make_layer(width, blocks, 1 if i == 0 else 2, k_att, head, k_conv))
        self.fc = nn.Linear(widths[-1] * 4, num_classes)

    def _make_layer(self, planes, blocks, stride, k_att, head, k_conv):
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * 4))
        layers = [OfficialBottleneck(self.inplanes, planes, stride, downsample, k_att, head, k_conv, self.acmix)]
        self.inplanes = planes * 4
        layers += [OfficialBottleneck(self.inplanes, planes, 1, None, k_att, head, k_conv, self.acmix)
                   for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x):
        """(B, 3, H, W) -> layer4 output (B, 4 * widths[-1], H/32, W/32)."""
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return x

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.forward_features(x), 1), 1))


# ----------------------------------------------------------------------------------------------
# Swin-ACmix (official Swin-Transformer/models/swin_transformer_acmix.py behaviour)
# ----------------------------------------------------------------------------------------------
def _windows(x, ws):
    b, h, w, c = x.shape
    return x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)


def _unwindows(x, ws, b, h, w):
    c = x.shape[-1]
    return x.view(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


class OfficialWindowACmix(nn.Module):
    """Official WindowAttention_acmix: input is the full (B, H, W, C) map after norm1 and the roll.

    acmix=False: the official Swin WindowAttention (no conv path, no rates; for benchmarks)."""

    def __init__(self, dim, window_size, num_heads, acmix=True):
        super().__init__()
        self.dim, self.ws, self.num_heads = dim, window_size, num_heads
        self.head_dim = dim // num_heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij"))
        coords = coords.flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window_size - 1)
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * window_size - 1) + rel[..., 1])
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.acmix = acmix
        if not acmix:
            return
        self.fc = nn.Conv2d(3 * num_heads, 9, 1)
        self.dep_conv = nn.Conv2d(9 * self.head_dim, dim, 3, padding=1, groups=self.head_dim, bias=False)
        self.rate1 = nn.Parameter(torch.tensor([0.5]))
        self.rate2 = nn.Parameter(torch.tensor([0.5]))

    def forward(self, x, mask):
        b, h, w, c = x.shape
        qkv = self.qkv(x)

        win = _windows(qkv, self.ws)
        n_tok = self.ws * self.ws
        q, k, v = win.reshape(-1, n_tok, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        attn = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(n_tok, n_tok, -1).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(-1, nw, self.num_heads, n_tok, n_tok) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, n_tok, n_tok)
        out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(-1, n_tok, c)
        out_att = _unwindows(self.proj(out), self.ws, b, h, w)
        if not self.acmix:
            return out_att
        groups = qkv.reshape(b, h * w, 3 * self.num_heads, self.head_dim).permute(0, 2, 1, 3)  # (B, 3N, HW, d)
        maps = self.fc(groups).permute(0, 3, 1, 2).reshape(b, 9 * self.head_dim, h, w)
        out_conv = self.dep_conv(maps).permute(0, 2, 3, 1)
        return self.rate1 * out_att + self.rate2 * out_conv


class OfficialMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class OfficialSwinBlock(nn.Module):
    def __init__(self, dim, resolution, num_heads, window_size, shift_size, mlp_ratio=4.0, acmix=True):
        super().__init__()
        self.resolution = resolution
        if min(resolution) <= window_size:
            window_size, shift_size = min(resolution), 0
        self.ws, self.shift = window_size, shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = OfficialWindowACmix(dim, window_size, num_heads, acmix)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = OfficialMlp(dim, int(dim * mlp_ratio))
        if shift_size > 0:
            h, w = resolution
            region = torch.zeros(1, h, w, 1)
            cuts = (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None))
            count = 0
            for hs in cuts:
                for wsl in cuts:
                    region[:, hs, wsl, :] = count
                    count += 1
            ids = _windows(region, window_size).squeeze(-1)
            mask = (ids.unsqueeze(1) - ids.unsqueeze(2)) != 0
            self.register_buffer("attn_mask", mask.float() * -100.0)
        else:
            self.attn_mask = None

    def forward(self, x):
        h, w = self.resolution
        b, _, c = x.shape
        y = self.norm1(x).view(b, h, w, c)
        if self.shift > 0:
            y = torch.roll(y, (-self.shift, -self.shift), (1, 2))
        y = self.attn(y, self.attn_mask)
        if self.shift > 0:
            y = torch.roll(y, (self.shift, self.shift), (1, 2))
        x = x + y.reshape(b, h * w, c)
        return x + self.mlp(self.norm2(x))


class OfficialPatchMerging(nn.Module):
    def __init__(self, resolution, dim):
        super().__init__()
        self.resolution = resolution
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x):
        h, w = self.resolution
        b, _, c = x.shape
        x = x.view(b, h, w, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class OfficialSwinStage(nn.Module):
    def __init__(self, dim, resolution, depth, num_heads, window_size, downsample, acmix=True):
        super().__init__()
        self.blocks = nn.ModuleList([
            OfficialSwinBlock(dim, resolution, num_heads, window_size, 0 if i % 2 == 0 else window_size // 2,
                              acmix=acmix)
            for i in range(depth)])
        self.downsample = OfficialPatchMerging(resolution, dim) if downsample else None

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class OfficialPatchEmbed(nn.Module):
    def __init__(self, patch_size, in_chans, embed_dim):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x):
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class OfficialSwinACmix(nn.Module):
    def __init__(self, img_size=224, patch_size=4, in_chans=3, num_classes=1000, embed_dim=96,
                 depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7, acmix=True):
        super().__init__()
        self.patch_embed = OfficialPatchEmbed(patch_size, in_chans, embed_dim)
        res = img_size // patch_size
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            r = res // 2 ** i
            self.layers.append(OfficialSwinStage(embed_dim * 2 ** i, (r, r), depth, num_heads[i], window_size,
                                                 downsample=i < len(depths) - 1, acmix=acmix))
        self.num_features = embed_dim * 2 ** (len(depths) - 1)
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x):
        """(B, 3, H, W) -> normed last-stage tokens as a map (B, C, h, w)."""
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        b, length, c = x.shape
        side = int(round(length ** 0.5))
        return self.norm(x).transpose(1, 2).reshape(b, c, side, side)

    def forward(self, x):
        return self.head(self.forward_features(x).mean((2, 3)))


def randomize_(module, seed=0):
    """Give every parameter and BN statistic a random, well-scaled value (so a mapping slip shows)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(module.state_dict().items()):
            if not tensor.is_floating_point():
                continue
            if name.endswith("attn_mask") or name.endswith("relative_position_index"):
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) * 0.5 + 0.75)
            elif name.endswith("rate1") or name.endswith("rate2"):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) * 0.5 + 0.25)
            elif name.endswith(("norm1.weight", "norm2.weight", "norm.weight")) or ".bn" in name and name.endswith(
                    "weight"):
                tensor.copy_(1.0 + 0.2 * torch.randn(tensor.shape, generator=gen))
            else:
                fan_in = max(1, tensor[0].numel()) if tensor.ndim > 1 else 1
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * (0.5 / math.sqrt(fan_in)
                                                                         if tensor.ndim > 1 else 0.1))
    return module


def sensitive_init_(module, calibration, seed=0):
    """Random weights under which every layer of a whole network visibly shapes its output (network parity).

    ``randomize_`` shrinks each layer's output (weights 0.5 / sqrt(fan_in), BN statistics near 0 / 1): in a
    ResNet the input's effect on the logits fades to ~1e-6 and a wrong layer goes unseen. Here instead:
    weights are variance preserving (He normal, N(0, 2 / fan_in)); norm scales U(0.6, 1.4), biases and
    shifts N(0, 0.2^2); ACmix rates distinct and away from their 0.5 init (rate1 U(0.15, 0.35), rate2
    U(0.65, 0.85), so swapping them shows); then every BatchNorm gets as running statistics the batch
    statistics of ``calibration`` (a (B, C, H, W) tensor) flowing through the network, so each BN in
    eval mode renormalises its input to about (beta, gamma^2) instead of amplifying or erasing it.
    Returns the module in eval mode.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "rate1":
                tensor.copy_(0.15 + 0.2 * torch.rand(tensor.shape, generator=gen))
            elif leaf == "rate2":
                tensor.copy_(0.65 + 0.2 * torch.rand(tensor.shape, generator=gen))
            elif tensor.ndim > 1 and "relative_position_bias_table" not in name:
                fan_in = tensor[0].numel()
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * math.sqrt(2.0 / fan_in))
            elif leaf == "weight":  # BatchNorm / LayerNorm scale
                tensor.copy_(0.6 + 0.8 * torch.rand(tensor.shape, generator=gen))
            else:  # biases, norm shifts, position tables
                tensor.copy_(0.2 * torch.randn(tensor.shape, generator=gen))
        norms = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # cumulative average: one batch sets exactly its statistics
        module.train()
        module(calibration)
        for norm in norms:
            norm.momentum = 0.1
    return module.eval()
