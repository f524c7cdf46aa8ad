"""The compiled training step and its pieces (loss wrapper, EMA, loss scalers, rank-sync helpers).

``TrainStep`` is one Cell whose ``construct`` runs in graph mode: forward + loss, gradients of the scaled
loss, unscale, data-parallel mean (``nn.DistributedGradReducer``), finiteness check (a C++ kernel on CPU,
``acmix_ms.kernels.cnn_cpu.CpuAllFinite``), global-norm clipping,
optimizer update (skipped when the gradients overflowed), EMA update. Loss scaling uses
``ms.amp.StaticLossScaler`` / ``DynamicLossScaler`` with ``ms.amp.all_finite``: the loss-scale Cells
(``TrainOneStepWithLossScaleCell``) need NPU float-status ops that CPU lacks.
"""
import contextlib

import numpy as np
import mindspore as ms
from mindspore import nn, ops, Parameter, ParameterTuple, amp

from acmix_ms.layout import cpu_kernel

from .config import DEFAULT_LOSS_SCALE


class NetWithLoss(nn.Cell):
    """images (B, C, H, W), labels (B,) or (B, K) -> scalar float32 loss."""

    def __init__(self, network, loss_fn):
        super().__init__()
        self.network = network
        self.loss_fn = loss_fn

    def construct(self, images, labels):
        return self.loss_fn(self.network(images), labels)


@ms.jit_class
class NoLossScaler:
    """Scale 1 and no adjustment: the same interface as ``ms.amp`` loss scalers, for ``loss_scale='none'``."""

    def scale(self, inputs):
        return inputs

    def unscale(self, inputs):
        return inputs

    def adjust(self, grads_finite):
        return grads_finite


def create_loss_scaler(kind, value=DEFAULT_LOSS_SCALE, window=1000):
    """'none' | 'static' | 'dynamic' -> a loss scaler; the ms.amp ones keep their scale in Parameters."""
    if kind == "none":
        return NoLossScaler()
    if kind == "static":
        return amp.StaticLossScaler(value)
    if kind == "dynamic":
        return amp.DynamicLossScaler(value, 2, window)
    raise ValueError(f"loss_scale={kind!r} is not supported; allowed values: 'none', 'static', 'dynamic'")


def loss_scaler_state(scaler):
    """(name, Parameter) pairs of a loss scaler's state (empty for 'none'/'static')."""
    names = ("scale_value", "counter") if isinstance(scaler, amp.DynamicLossScaler) else ()
    return [(name, getattr(scaler, name)) for name in names]


def _ema_update(decay, ema_param, param):
    return ops.assign(ema_param, ema_param * decay + ops.cast(param, ema_param.dtype) * (1.0 - decay))


class EMA:
    """Exponential moving average of every float model Parameter (weights and norm statistics)."""

    def __init__(self, named_params, decay):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.names = [name for name, param in named_params if param.dtype in (ms.float32, ms.float16)]
        by_name = dict(named_params)
        self.sources = ParameterTuple([by_name[name] for name in self.names])
        self.params = ParameterTuple([
            Parameter(by_name[name].data.copy(), name=f"ema.{name}", requires_grad=False) for name in self.names])

    def named(self):
        return list(zip(self.names, self.params))

    @contextlib.contextmanager
    def swapped_in(self, named_params):
        """Within the block the model's Parameters (``named_params``) hold the EMA weights; the trained
        weights are put back afterwards (also on an exception)."""
        raw = dict(named_params)
        originals = [(raw[name], raw[name].asnumpy()) for name in self.names]
        for name, ema_param in self.named():
            raw[name].set_data(ms.Tensor(ema_param.asnumpy()))
        try:
            yield
        finally:
            for param, value in originals:
                param.set_data(ms.Tensor(value))


ERASE_ATTEMPTS = 10


class BatchRandomErasing(nn.Cell):
    """Random erasing of a batch on the device, from uniform draws made by the data pipeline.

    The distribution of ``mindspore.dataset.vision.RandomErasing`` (value 0, bounded): with probability
    ``prob`` an image gets one rectangle set to 0; up to ``attempts`` candidate rectangles of area
    ``uniform(scale) * H * W`` and aspect ratio ``uniform(ratio)`` (w = round(sqrt(area * ratio)),
    h = round(w / ratio)), the first with h < H and w < W is used, at a uniform position inside the image;
    none fitting: the image is kept.

    Inputs: images (B, C, H, W); draws (B, 1 + 4 * attempts) uniform in [0, 1): [apply, then per attempt:
    area, ratio, top, left] (``engine.data`` makes them, so the erasing follows the data order and seed).
    Output: images (B, C, H, W).
    """

    def __init__(self, prob, scale=(0.02, 0.33), ratio=(0.3, 3.3), attempts=ERASE_ATTEMPTS):
        super().__init__()
        self.prob = float(prob)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.attempts = int(attempts)

    def construct(self, images, draws):
        batch, _, height, width = images.shape
        draws = ops.cast(draws, ms.float32)
        tries = ops.reshape(draws[:, 1:], (batch, self.attempts, 4))
        area = (self.scale[0] + (self.scale[1] - self.scale[0]) * tries[:, :, 0]) * float(height * width)
        aspect = self.ratio[0] + (self.ratio[1] - self.ratio[0]) * tries[:, :, 1]
        erase_w = ops.round(ops.sqrt(area * aspect))
        erase_h = ops.round(erase_w / aspect)
        fits = ops.logical_and(erase_h < float(height), erase_w < float(width))
        # the first fitting attempt: weight each attempt by 2^(attempts - index) and take the largest
        order = ops.cast(fits, ms.float32) * ops.pow(2.0, ms.numpy.arange(self.attempts, 0, -1).astype(ms.float32))
        first = ops.one_hot(ops.argmax(order, 1), self.attempts, ms.Tensor(1.0, ms.float32),
                            ms.Tensor(0.0, ms.float32))
        h = (erase_h * first).sum(1)
        w = (erase_w * first).sum(1)
        top = ops.floor((tries[:, :, 2] * first).sum(1) * (float(height) - h + 1.0))
        left = ops.floor((tries[:, :, 3] * first).sum(1) * (float(width) - w + 1.0))
        chosen = ops.logical_and(draws[:, 0] < self.prob, fits.any(1))
        rows = ms.numpy.arange(height).astype(ms.float32).reshape(1, height, 1)
        cols = ms.numpy.arange(width).astype(ms.float32).reshape(1, 1, width)
        inside_rows = ops.logical_and(rows >= top.reshape(-1, 1, 1), rows < (top + h).reshape(-1, 1, 1))
        inside_cols = ops.logical_and(cols >= left.reshape(-1, 1, 1), cols < (left + w).reshape(-1, 1, 1))
        erase = ops.logical_and(ops.logical_and(inside_rows, inside_cols), chosen.reshape(-1, 1, 1))
        keep = 1.0 - ops.cast(erase, images.dtype).expand_dims(1)
        return images * keep


class TrainStep(nn.Cell):
    """One optimisation step; returns (loss, lr, grads_finite) for the batch.

    Non-finite gradients skip the parameter and EMA update (dynamic loss scaling then lowers the scale);
    the optimizer's ``global_step`` advances either way.

    Args:
        net_with_loss: Cell (images, labels) -> loss.
        optimizer: a MindSpore optimizer whose learning rate is a schedule Cell.
        loss_scaler: from ``create_loss_scaler``.
        clip_grad_norm: global-norm bound (None: no clipping).
        ema: an ``EMA`` or None.
        grad_reducer: ``nn.DistributedGradReducer`` for data parallel, or None.
        group_size: number of data-parallel ranks (the returned loss is their mean).
        eraser: a ``BatchRandomErasing`` or None; with it the step takes a third input, its draws.
    """

    def __init__(self, net_with_loss, optimizer, loss_scaler, clip_grad_norm=None, ema=None, grad_reducer=None,
                 group_size=1, eraser=None):
        super().__init__(auto_prefix=False)
        self.erase = eraser is not None
        self.eraser = eraser
        self.net_with_loss = net_with_loss
        self.optimizer = optimizer
        self.weights = optimizer.parameters
        self.loss_scaler = loss_scaler
        self.scaled = not isinstance(loss_scaler, NoLossScaler)
        self.clip = clip_grad_norm is not None
        self.clip_grad_norm = float(clip_grad_norm) if clip_grad_norm is not None else 1.0
        self.use_ema = ema is not None
        if ema is not None:
            self.ema_decay = ema.decay
            self.ema_params = ema.params
            self.ema_sources = ema.sources
        self.reduce = grad_reducer is not None
        self.grad_reducer = grad_reducer
        if self.reduce:  # every rank reports (and checks) the mean loss, so all stop together on NaN
            self.all_reduce = ops.AllReduce()
            self.group_size = float(group_size)
        self.hyper_map = ops.HyperMap()
        self.grad_fn = ops.value_and_grad(self.scaled_loss, None, self.weights, has_aux=True)
        # the finiteness check as one C++ pass over every gradient on CPU (MindSpore's amp.all_finite there is
        # IsFinite + ReduceAll + Cast per tensor: ~45 ms of a ResNet-26 step at batch 8, 224 px); off: amp's
        # (one assignment: a Cell set over an attribute that was None stays hidden behind the None in graph mode)
        all_float32 = all(weight.dtype == ms.float32 for weight in self.weights)
        self.finite_kernel = cpu_kernel("cnn_cpu", "CpuAllFinite", None) if all_float32 else None
        self.use_finite_kernel = self.finite_kernel is not None

    def scaled_loss(self, images, labels):
        loss = self.net_with_loss(images, labels)
        return self.loss_scaler.scale(loss), loss

    def construct(self, images, labels, *extra):
        if self.erase:  # extra[0]: the random-erasing draws of the batch (B, 1 + 4 * attempts)
            images = self.eraser(images, extra[0])
        lr = self.optimizer.learning_rate(self.optimizer.global_step)
        (_, loss), grads = self.grad_fn(images, labels)
        if self.reduce:
            grads = self.grad_reducer(grads)
        grads = self.loss_scaler.unscale(grads)
        if self.use_finite_kernel:
            finite = self.finite_kernel(*grads)[0] > 0.5
        else:
            finite = amp.all_finite(grads)
        if self.scaled:
            loss = ops.depend(loss, self.loss_scaler.adjust(finite))
        if self.clip:
            grads = ops.clip_by_global_norm(grads, self.clip_grad_norm)
        if finite:
            loss = ops.depend(loss, self.optimizer(grads))
            if self.use_ema:
                loss = ops.depend(loss, self.hyper_map(ops.partial(_ema_update, self.ema_decay),
                                                       self.ema_params, self.ema_sources))
        else:  # skipped update: the step counter (and so the lr schedule) still advances
            loss = ops.depend(loss, ops.assign_add(self.optimizer.global_step,
                                                   self.optimizer.global_step_increase_tensor))
        if self.reduce:
            loss = self.all_reduce(loss) / self.group_size
        return loss, lr, finite


class _AllReduceMean(nn.Cell):
    def __init__(self, group_size):
        super().__init__()
        self.all_reduce = ops.AllReduce()
        self.group_size = float(group_size)

    def construct(self, tensors):
        return tuple(self.all_reduce(tensor) / self.group_size for tensor in tensors)


class _AllReduceSum(nn.Cell):
    def __init__(self):
        super().__init__()
        self.all_reduce = ops.AllReduce()

    def construct(self, tensor):
        return self.all_reduce(tensor)


class _Broadcast(nn.Cell):
    def __init__(self):
        super().__init__()
        self.broadcast = ops.Broadcast(0)

    def construct(self, tensors):
        return self.broadcast(tensors)


class RankSync:
    """Data-parallel helpers run outside the step: broadcast rank 0's values, average across ranks."""

    def __init__(self, group_size):
        self.group_size = group_size
        self._mean = _AllReduceMean(group_size)
        self._sum = _AllReduceSum()
        self._broadcast = _Broadcast()

    def sum(self, vector):
        """Sum of a float64 numpy vector over the ranks (float64 numpy).

        Sent as float32 in two parts (the value rounded to float32, then the rounding error), so integer
        counts below 2**24 per rank stay exact and real sums keep about 14 significant digits.
        """
        vector = np.asarray(vector, np.float64).reshape(-1)
        high = vector.astype(np.float32)
        low = (vector - high.astype(np.float64)).astype(np.float32)
        total = self._sum(ms.Tensor(np.concatenate([high, low]))).asnumpy().astype(np.float64)
        return total[:vector.size] + total[vector.size:]

    def broadcast(self, params):
        """Make ``params`` equal to rank 0's (initial weights, restored state)."""
        params = [param for param in params if param.dtype in (ms.float32, ms.float16)]
        if params:
            for param, value in zip(params, self._broadcast(tuple(ms.Tensor(param.asnumpy()) for param in params))):
                param.set_data(value)

    def average(self, params):
        """Mean over ranks in place (norm statistics computed on each rank's own data)."""
        params = [param for param in params if param.dtype in (ms.float32, ms.float16)]
        if params:
            for param, value in zip(params, self._mean(tuple(ms.Tensor(param.asnumpy()) for param in params))):
                param.set_data(value)


class MonitoredStep(nn.Cell):
    """A ``TrainStep`` that keeps its running statistics on the device, so the host never waits per step.

    Device-side state (read by ``read()`` at log intervals and before checkpoints, then reset):
    ``loss_sum`` (float32 sum of the window's losses), ``steps`` (steps in the window), ``overflows``
    (steps whose gradients were not finite: skipped updates), ``max_consecutive`` (longest run of such
    steps, carried across windows through ``consecutive``), ``first_bad_loss`` / ``first_overflow``
    (1-based index in the window of the first non-finite loss / gradients, 0: none), ``lr`` (of the last
    step). ``construct(images, labels, *extra)`` (extra: the random-erasing draws when on) returns the step's
    loss (a device tensor; reading it is optional).
    """

    def __init__(self, train_step):
        super().__init__(auto_prefix=False)
        self.train_step = train_step

        def state(value, dtype, name):
            return Parameter(ms.Tensor(value, dtype), name=f"monitor.{name}", requires_grad=False)
        self.loss_sum = state(0.0, ms.float32, "loss_sum")
        self.lr = state(0.0, ms.float32, "lr")
        self.steps = state(0, ms.int32, "steps")
        self.overflows = state(0, ms.int32, "overflows")
        self.consecutive = state(0, ms.int32, "consecutive")
        self.max_consecutive = state(0, ms.int32, "max_consecutive")
        self.first_bad_loss = state(0, ms.int32, "first_bad_loss")
        self.first_overflow = state(0, ms.int32, "first_overflow")
        self._window = (self.loss_sum, self.steps, self.overflows, self.max_consecutive, self.first_bad_loss,
                        self.first_overflow)

    def construct(self, images, labels, *extra):
        loss, lr, finite = self.train_step(images, labels, *extra)
        loss = ops.reshape(ops.cast(loss, ms.float32), ())
        index = self.steps + 1
        overflow = ops.logical_not(ops.reshape(finite, ()))
        overflow_int = ops.cast(overflow, ms.int32)
        bad_loss = ops.logical_not(ops.isfinite(loss))
        consecutive = (self.consecutive + 1) * overflow_int
        ops.assign(self.first_bad_loss,
                   ops.select(ops.logical_and(bad_loss, self.first_bad_loss == 0), index, self.first_bad_loss))
        ops.assign(self.first_overflow,
                   ops.select(ops.logical_and(overflow, self.first_overflow == 0), index, self.first_overflow))
        ops.assign(self.consecutive, consecutive)
        ops.assign(self.max_consecutive, ops.maximum(self.max_consecutive, consecutive))
        ops.assign_add(self.overflows, overflow_int)
        ops.assign_add(self.loss_sum, loss)
        ops.assign(self.lr, ops.reshape(ops.cast(lr, ms.float32), ()))
        ops.assign(self.steps, index)
        return loss

    def read(self):
        """The window's statistics as Python numbers (one host synchronisation), then a fresh window.

        Returns dict: steps, loss_sum, overflows, max_consecutive, first_bad_loss, first_overflow, lr.
        """
        values = {name: param.asnumpy().item() for name, param in (
            ("loss_sum", self.loss_sum), ("steps", self.steps), ("overflows", self.overflows),
            ("max_consecutive", self.max_consecutive), ("first_bad_loss", self.first_bad_loss),
            ("first_overflow", self.first_overflow), ("lr", self.lr), ("consecutive", self.consecutive))}
        for param in self._window:
            param.set_data(ms.Tensor(0, param.dtype))
        # a run of skipped steps continues into the next window
        self.max_consecutive.set_data(ms.Tensor(values["consecutive"], ms.int32))
        return values
