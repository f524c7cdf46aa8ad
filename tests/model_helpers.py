"""Helpers shared by the model-family tests: random inputs, one graph-mode SGD step, and small wrapper
Cells that compile several entry points of a network into one graph."""
import numpy as np
import mindspore as ms
from mindspore import nn, Tensor


def random_images(batch, channels, size, seed=0):
    return Tensor(np.random.default_rng(seed).standard_normal((batch, channels, size, size)).astype(np.float32))


def train_step(net, images, labels):
    """One SGD step in graph mode. Returns (loss, logits) as NumPy arrays."""
    loss_fn = nn.CrossEntropyLoss()
    optimizer = nn.SGD(net.trainable_params(), learning_rate=0.1)

    def loss_and_logits(x, y):
        logits = net(x)
        return loss_fn(logits, y), logits

    grad_fn = ms.value_and_grad(loss_and_logits, None, optimizer.parameters, has_aux=True)

    @ms.jit
    def step(x, y):
        (loss, logits), grads = grad_fn(x, y)
        optimizer(grads)
        return loss, logits

    net.set_train(True)
    loss, logits = step(images, labels)
    net.set_train(False)
    return loss.asnumpy(), logits.asnumpy()


def check_train_step(net, images, num_classes, exempt_suffixes=("conv_p.bias",), dead=()):
    """One SGD step: logits shape, finite loss, and every trainable parameter changed by it.

    ``exempt_suffixes``: parameters whose gradient is legitimately zero (or not) at initialisation and may
    stay unchanged either way: ACmixLocal's ``conv_p.bias`` adds the same constant to every neighbour's
    positional term, which softmax cancels; the ACmix ``fc.bias`` adds one constant per kernel position to
    every channel, which the shift kernels sum identically into all channels, so LayerNorm-read residual
    streams give it zero gradient at init. ``dead``: parameters that must stay unchanged.
    """
    before = {p.name: p.asnumpy().copy() for p in net.trainable_params()}
    labels = Tensor(np.arange(images.shape[0], dtype=np.int32) % num_classes)
    loss, logits = train_step(net, images, labels)
    assert logits.shape == (images.shape[0], num_classes)
    assert np.isfinite(loss) and np.all(np.isfinite(logits))
    unchanged = {name for name, value in before.items() if not name.endswith(tuple(exempt_suffixes))
                 and np.array_equal(value, net.parameters_dict()[name].asnumpy())}
    assert unchanged == set(dead), f"parameters without gradient: {sorted(unchanged - set(dead))[:10]}"


class Features(nn.Cell):
    """Graph of (construct(x), forward_features(x)) for a network built with out_indices."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def construct(self, x):
        return self.net(x), self.net.forward_features(x)
