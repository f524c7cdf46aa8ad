"""Compile, then give the compiler's freed heap back (``engine.runtime``): the helpers the trainer, the evaluation
loops and the benchmarks use before a graph's first run."""
import ctypes.util

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor, nn

from engine import runtime


@pytest.fixture(scope="module", autouse=True)
def graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")


@pytest.mark.skipif(ctypes.util.find_library("c") is None, reason="no C library to trim")
def test_release_free_heap_runs_on_glibc():
    assert runtime.release_free_heap() is True


def test_releasing_caller_compiles_once_per_signature_and_returns_the_network_output(monkeypatch):
    calls = []
    real = runtime.compile_then_release

    def counting(cell, *inputs):
        calls.append(inputs[0].shape)
        real(cell, *inputs)
    monkeypatch.setattr(runtime, "compile_then_release", counting)
    net = nn.Dense(4, 3)
    net.set_train(False)
    caller = runtime.ReleasingCaller(net)
    rng = np.random.default_rng(0)
    first, smaller = (Tensor(rng.standard_normal(shape).astype(np.float32)) for shape in ((5, 4), (2, 4)))
    for x in (first, first, smaller, first):
        np.testing.assert_array_equal(caller(x).asnumpy(), net(x).asnumpy())
    assert calls == [(5, 4), (2, 4)]  # a new shape compiles once; repeats reuse the graph
