"""``Dense``: ``nn.Dense`` whose bias addition and bias gradient run CPU kernels, for the transformer layers (Swin,
PVT, ACmix's window and global modes).

Why: MindSpore 2.8's CPU BiasAddGrad (the bias gradient of every Dense) summed to ~10 % of a Swin-T training step
(batch 8, 224 px: ~240 ms of 2.3 s, MindSpore profiler) and its BiasAdd to ~7 % of an inference; threaded,
vectorised passes (``acmix_ms.kernels.transformer_cpu.CpuBiasAdd``) do the same sums (docs/benchmarks.md).
"""
from typing import Optional

import mindspore as ms
from mindspore import nn

from .layout import cpu_transformer_kernel


class Dense(nn.Dense):
    """``nn.Dense(in_channels, out_channels, has_bias)``: the same parameters (``weight`` (out, in), ``bias``),
    names and results; on the CPU backend, for float32 inputs and with a bias, the bias is added by
    ``CpuBiasAdd`` (forward and bias gradient by the kernels; MindSpore's MatMul and its gradients as before). Elsewhere, for other
    dtypes, when the kernel cannot be built (warning), or after ``models.layers.set_fused_kernels(net, False)``
    (every export path): ``nn.Dense``.

    Inputs: (..., in_channels). Outputs: (..., out_channels).
    """

    def __init__(self, in_channels: int, out_channels: int, has_bias: bool = True, device_target: Optional[str] = None,
                 **kwargs):
        super().__init__(in_channels, out_channels, has_bias=has_bias, **kwargs)
        usable = has_bias and kwargs.get("activation") is None
        self.kernel = cpu_transformer_kernel("CpuBiasAdd", device_target) if usable else None
        self.use_kernel = self.kernel is not None

    def construct(self, x):
        if not (self.use_kernel and x.dtype == ms.float32):
            return super().construct(x)
        shape = x.shape
        out = self.kernel(self.matmul(x.reshape(-1, shape[-1]), self.weight), self.bias)
        return out.reshape(shape[:-1] + (out.shape[-1],))
