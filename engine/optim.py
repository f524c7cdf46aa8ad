"""Optimizers, weight-decay parameter groups and the per-step warm-up + cosine schedule.

* ``split_decay_groups``: weight decay for weights only; none for 1-D parameters (norm scales/shifts,
  biases, the ACmix ``rate1``/``rate2``) nor for names containing a no-decay keyword (position tables).
* ``WarmupCosineLR``: linear warm-up from ``warmup_lr`` to ``base_lr`` over ``warmup_steps``, then a cosine
  from ``base_lr`` to ``min_lr`` at ``total_steps``; evaluated on the optimizer's ``global_step``, so a
  restored step counter continues the schedule. ``WarmupPolyLR``: the same warm-up, then
  ``min_lr + (base_lr - min_lr) * (1 - progress) ** power`` (mmseg's poly schedule); ``lr_schedule`` picks.
* ``AdamW``: decoupled weight decay with bias correction (as torch.optim.AdamW, which the Swin/PVT recipes
  use; ``nn.AdamWeightDecay`` has no bias correction).
* ``create_optimizer``: SGD with momentum (``nn.Momentum``) or ``AdamW`` from a run config.
"""
import math

import mindspore as ms
from mindspore import nn, ops, Parameter, Tensor
from mindspore.nn.learning_rate_schedule import LearningRateSchedule

OPTIMIZERS = ("sgd", "adamw")


def split_decay_groups(named_params, weight_decay, no_decay_keywords=(), decay_all=False):
    """Split trainable parameters into a decayed and an undecayed group.

    Args:
        named_params: iterable of (structural name, Parameter), e.g. ``model.parameters_and_names()``.
        no_decay_keywords: a parameter whose name contains one of these is not decayed.
        decay_all: decay every trainable parameter (the official ResNet-ACmix script does).
    Returns:
        (groups, decay_names, no_decay_names): ``groups`` is the list of dicts MindSpore optimizers take.
    """
    decay, no_decay, decay_names, no_decay_names = [], [], [], []
    for name, param in named_params:
        if not param.requires_grad:
            continue
        skip = not decay_all and (param.ndim <= 1 or any(key in name for key in no_decay_keywords))
        (no_decay if skip else decay).append(param)
        (no_decay_names if skip else decay_names).append(name)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": float(weight_decay)})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return groups, decay_names, no_decay_names


class WarmupCosineLR(LearningRateSchedule):
    """Learning rate of step ``global_step`` (int32 tensor, shape (1,) or ()): same shape, float32."""

    def __init__(self, base_lr, total_steps, warmup_steps=0, warmup_lr=0.0, min_lr=0.0):
        super().__init__()
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
        self.base_lr = float(base_lr)
        self.min_lr = float(min_lr)
        self.warmup_lr = float(warmup_lr)
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.decay_steps = float(max(total_steps - warmup_steps, 1))

    def construct(self, global_step):
        step = ops.cast(global_step, ms.float32)
        progress = ops.clip_by_value((step - self.warmup_steps) / self.decay_steps, 0.0, 1.0)
        decayed = self.decay(progress)
        if self.warmup_steps > 0:
            warm = self.warmup_lr + (self.base_lr - self.warmup_lr) * step / self.warmup_steps
            return ops.select(step < self.warmup_steps, warm, decayed)
        return decayed

    def decay(self, progress):
        """Learning rate at ``progress`` in [0, 1] of the decay phase."""
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1.0 + ops.cos(math.pi * progress))


class WarmupPolyLR(WarmupCosineLR):
    """Warm-up as ``WarmupCosineLR``, then ``min_lr + (base_lr - min_lr) * (1 - progress) ** power``."""

    def __init__(self, base_lr, total_steps, warmup_steps=0, warmup_lr=0.0, min_lr=0.0, power=1.0):
        super().__init__(base_lr, total_steps, warmup_steps, warmup_lr, min_lr)
        if power <= 0:
            raise ValueError(f"poly power must be positive, got {power}")
        self.power = float(power)

    def decay(self, progress):
        return self.min_lr + (self.base_lr - self.min_lr) * ops.pow(1.0 - progress, self.power)


def _adamw_update(beta1, beta2, eps, lr, correction1, correction2, weight_decay, param, exp_avg, exp_avg_sq,
                  grad):
    grad = ops.cast(grad, ms.float32)
    new_avg = beta1 * exp_avg + (1.0 - beta1) * grad
    new_avg_sq = beta2 * exp_avg_sq + (1.0 - beta2) * grad * grad
    step = (new_avg / correction1) / (ops.sqrt(new_avg_sq / correction2) + eps)
    new_param = param * (1.0 - lr * weight_decay) - lr * step
    ops.assign(exp_avg, new_avg)
    ops.assign(exp_avg_sq, new_avg_sq)
    return ops.assign(param, new_param)


class AdamW(nn.Optimizer):
    """torch-style AdamW: m, v moments with bias correction, decay ``p *= 1 - lr * wd`` (per group).

    State Parameters: ``exp_avg.<name>``, ``exp_avg_sq.<name>`` (like the params), ``beta1_power``,
    ``beta2_power`` (shape (1,)) and the base class's ``global_step``.
    """

    def __init__(self, params, learning_rate=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
        super().__init__(learning_rate, params, weight_decay)
        if not 0.0 <= beta1 < 1.0 or not 0.0 <= beta2 < 1.0:
            raise ValueError(f"betas must be in [0, 1), got ({beta1}, {beta2})")
        self.beta1 = float(beta1)
        self.beta2 = float(beta2)
        self.eps = float(eps)
        self.exp_avg = self._parameters.clone(prefix="exp_avg", init="zeros")
        self.exp_avg_sq = self._parameters.clone(prefix="exp_avg_sq", init="zeros")
        self.beta1_power = Parameter(Tensor([1.0], ms.float32), name="beta1_power")
        self.beta2_power = Parameter(Tensor([1.0], ms.float32), name="beta2_power")
        self.hyper_map = ops.HyperMap()

    def construct(self, gradients):
        gradients = self.flatten_gradients(gradients)
        lr = self.get_lr()
        weight_decay = self.get_weight_decay()
        self.assignadd(self.global_step, self.global_step_increase_tensor)
        beta1_power = self.beta1_power * self.beta1
        beta2_power = self.beta2_power * self.beta2
        ops.assign(self.beta1_power, beta1_power)
        ops.assign(self.beta2_power, beta2_power)
        correction1 = 1.0 - beta1_power
        correction2 = 1.0 - beta2_power
        update = ops.partial(_adamw_update, self.beta1, self.beta2, self.eps, lr, correction1, correction2)
        if self.is_group:
            return self.hyper_map(update, weight_decay, self._parameters, self.exp_avg, self.exp_avg_sq,
                                  gradients)
        return self.hyper_map(ops.partial(update, weight_decay), self._parameters, self.exp_avg,
                              self.exp_avg_sq, gradients)


def effective_lr(cfg, global_batch):
    """The peak lr: ``cfg.lr``, scaled by global_batch / lr_base_batch when lr_base_batch is set."""
    if cfg.lr_base_batch:
        return cfg.lr * global_batch / cfg.lr_base_batch
    return cfg.lr


def no_decay_keywords_of(model, keywords):
    """Configured keywords plus any the model declares (``no_weight_decay()``/``no_weight_decay_keywords()``)."""
    found = list(keywords)
    for hook in ("no_weight_decay", "no_weight_decay_keywords"):
        if hasattr(model, hook):
            found.extend(sorted(getattr(model, hook)()))
    return tuple(found)


def create_optimizer(cfg, model, named_params, steps_per_epoch, global_batch):
    """Optimizer and schedule for a run config.

    Args:
        named_params: (structural name, Parameter) pairs of the model (taken before mixed-precision wrapping).
    Returns:
        (optimizer, schedule, info) where ``info`` records the lr and the decay split for the log.
    """
    if cfg.opt not in OPTIMIZERS:
        raise ValueError(f"opt={cfg.opt!r} is not supported; allowed values: {OPTIMIZERS}")
    groups, decay_names, no_decay_names = split_decay_groups(
        named_params, cfg.weight_decay, no_decay_keywords_of(model, cfg.no_decay_keywords), cfg.decay_all_params)
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))
    peak_lr = effective_lr(cfg, global_batch)
    if getattr(cfg, "lr_schedule", "cosine") == "poly":
        schedule = WarmupPolyLR(peak_lr, total_steps, warmup_steps, cfg.warmup_lr, cfg.min_lr, cfg.poly_power)
    else:
        schedule = WarmupCosineLR(peak_lr, total_steps, warmup_steps, cfg.warmup_lr, cfg.min_lr)
    if cfg.opt == "sgd":
        optimizer = nn.Momentum(groups, learning_rate=schedule, momentum=cfg.momentum, use_nesterov=cfg.nesterov)
    else:
        optimizer = AdamW(groups, learning_rate=schedule, beta1=cfg.betas[0], beta2=cfg.betas[1], eps=cfg.eps)
    info = {"peak_lr": peak_lr, "total_steps": total_steps, "warmup_steps": warmup_steps,
            "decayed": len(decay_names), "not_decayed": len(no_decay_names)}
    return optimizer, schedule, info


def optimizer_state(optimizer, model_param_ids):
    """(structural name, Parameter) of the optimizer's own state (moments, step counter, powers)."""
    return [(name, param) for name, param in optimizer.parameters_and_names()
            if id(param) not in model_param_ids]

