"""engine/optim.py: weight-decay groups, the warm-up + cosine schedule, SGD decay, AdamW vs a numpy reference."""
import math

import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, Parameter, Tensor

from conftest import TinyNet
from engine.config import build_config
from engine.optim import AdamW, WarmupCosineLR, create_optimizer, effective_lr, split_decay_groups


class WindowLike(nn.Cell):
    """A conv, a LayerNorm and a Swin-style relative position table (2-D, must not be decayed)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 4, 1, has_bias=True)
        self.norm = nn.LayerNorm((4,))
        self.relative_position_bias_table = Parameter(Tensor(np.zeros((9, 2), np.float32)),
                                                      name="relative_position_bias_table")

    def construct(self, x):
        return self.proj(x)


def test_decay_groups_exclude_norms_biases_rates_and_tables():
    named = list(TinyNet().parameters_and_names()) + [
        (f"win.{n}", p) for n, p in WindowLike().parameters_and_names()]
    _, decay, no_decay = split_decay_groups(named, 0.05, ("relative_position_bias_table", "rate1", "rate2"))
    assert sorted(decay) == ["conv1.weight", "conv2.weight", "head.weight", "win.proj.weight"]
    assert sorted(no_decay) == sorted([
        "bn1.gamma", "bn1.beta", "bn2.gamma", "bn2.beta", "rate1", "head.bias", "win.proj.bias",
        "win.norm.gamma", "win.norm.beta", "win.relative_position_bias_table"])
    # BN moving statistics are not trainable: in no group
    assert not any("moving" in name for name in decay + no_decay)


def test_decay_all_params_matches_the_official_resnet_script():
    groups, decay, no_decay = split_decay_groups(TinyNet().parameters_and_names(), 1e-4, decay_all=True)
    assert no_decay == [] and len(groups) == 1 and "rate1" in decay


def lr_curve(schedule, steps):
    return np.array([float(schedule(Tensor([step], ms.int32)).asnumpy()[0]) for step in steps])


def test_warmup_cosine_shape():
    base, low, start, warmup, total = 0.4, 0.01, 0.05, 4, 20
    lrs = lr_curve(WarmupCosineLR(base, total, warmup, start, low), range(total + 1))
    assert lrs[0] == pytest.approx(start)
    np.testing.assert_allclose(np.diff(lrs[:warmup + 1]), (base - start) / warmup, rtol=1e-5)  # linear
    assert lrs[warmup] == pytest.approx(base)
    assert np.all(np.diff(lrs[warmup:]) <= 1e-7)  # then never increases
    assert lrs[warmup + (total - warmup) // 2] == pytest.approx((base + low) / 2, rel=1e-5)  # cosine midpoint
    assert lrs[total] == pytest.approx(low)


def test_schedule_rejects_bad_lengths():
    with pytest.raises(ValueError, match="total_steps"):
        WarmupCosineLR(0.1, 0)
    with pytest.raises(ValueError, match="warmup_steps"):
        WarmupCosineLR(0.1, 10, 11)


def test_lr_scaling_by_batch():
    cfg = build_config(file_values={"lr": 0.1, "lr_base_batch": 256})
    assert effective_lr(cfg, 512) == pytest.approx(0.2)
    assert effective_lr(build_config(file_values={"lr": 0.1}), 512) == pytest.approx(0.1)


def zero_grads(params):
    return tuple(Tensor(np.zeros(p.shape, np.float32)) for p in params)


def test_sgd_applies_weight_decay_only_to_the_decay_group():
    model = TinyNet()
    cfg = build_config(file_values={"opt": "sgd", "lr": 0.1, "weight_decay": 0.5, "epochs": 1})
    named = list(model.parameters_and_names())
    optimizer, _, info = create_optimizer(cfg, model, named, steps_per_epoch=10, global_batch=8)
    assert info["decayed"] == 3 and info["not_decayed"] == 6
    before = {name: p.asnumpy().copy() for name, p in named}
    optimizer(zero_grads(optimizer.parameters))  # zero gradients: only weight decay moves parameters
    lr0 = 0.1  # step 0 of a schedule without warm-up
    for name, param in named:
        if name in ("conv1.weight", "conv2.weight", "head.weight"):
            np.testing.assert_allclose(param.asnumpy(), before[name] * (1 - lr0 * 0.5), rtol=1e-5)
        else:
            np.testing.assert_array_equal(param.asnumpy(), before[name])


def numpy_adamw(param, grads, lr, beta1, beta2, eps, weight_decay):
    """torch.optim.AdamW's update rule, step by step."""
    m = np.zeros_like(param)
    v = np.zeros_like(param)
    for step, grad in enumerate(grads, start=1):
        param = param * (1 - lr * weight_decay)
        m = beta1 * m + (1 - beta1) * grad
        v = beta2 * v + (1 - beta2) * grad * grad
        m_hat = m / (1 - beta1 ** step)
        v_hat = v / (1 - beta2 ** step)
        param = param - lr * m_hat / (np.sqrt(v_hat) + eps)
    return param


def test_adamw_matches_the_torch_update_rule():
    rng = np.random.default_rng(0)
    start_w = rng.standard_normal((3, 4)).astype(np.float32)
    start_b = rng.standard_normal((4,)).astype(np.float32)
    weight = Parameter(Tensor(start_w), name="w")
    bias = Parameter(Tensor(start_b), name="b")
    optimizer = AdamW([{"params": [weight], "weight_decay": 0.1}, {"params": [bias], "weight_decay": 0.0}],
                      learning_rate=0.01, beta1=0.9, beta2=0.99, eps=1e-8)
    grads_w = [rng.standard_normal((3, 4)).astype(np.float32) for _ in range(3)]
    grads_b = [rng.standard_normal((4,)).astype(np.float32) for _ in range(3)]
    for grad_w, grad_b in zip(grads_w, grads_b):
        optimizer((Tensor(grad_w), Tensor(grad_b)))
    np.testing.assert_allclose(weight.asnumpy(), numpy_adamw(start_w, grads_w, 0.01, 0.9, 0.99, 1e-8, 0.1),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bias.asnumpy(), numpy_adamw(start_b, grads_b, 0.01, 0.9, 0.99, 1e-8, 0.0),
                               rtol=1e-5, atol=1e-6)
    assert int(optimizer.global_step.asnumpy()[0]) == 3
    assert math.isclose(float(optimizer.beta1_power.asnumpy()[0]), 0.9 ** 3, rel_tol=1e-6)
