"""Axis permutations of activations: ``permute(x, dims)``, one place that decides how a graph transposes.

On CPU (MindSpore 2.8, graph mode) the memory of a ``Transpose`` result is not reused by the ops after it:
a stack of 6 stage-1-sized layers (batch 8, (3136, 288) tokens, transpose there and back) rises by 826 MiB
in inference and 1658 MiB forward+backward, against 163 / 268 MiB with ``mint.permute`` (a
``TransposeView``), with the same values and gradients; Swin-ACmix-T's batch-8 inference peak falls from
2.2 GB to 1.0 GB (docs/benchmarks.md, "Transposes that were never freed"). So ``permute`` is a view on CPU.

Elsewhere (GPU, Ascend: not measured) and inside ``portable_permutes()`` it is the plain ``Transpose``
primitive: exported graphs (MINDIR for MindSpore Lite / Ascend inference) keep the operator every
converter knows. The choice is read when a graph is compiled, so it applies to graphs compiled after it
changes.
"""
import contextlib
from typing import Optional, Sequence

import mindspore as ms
from mindspore import mint, ops
from mindspore.ops import constexpr

# None: views on CPU only (the device target when the graph is compiled); True / False: always / never
_STATE = {"views": None}


@constexpr
def _use_views() -> bool:
    choice = _STATE["views"]
    return ms.get_context("device_target") == "CPU" if choice is None else bool(choice)


def permute(x, dims: Sequence[int]):
    """``x`` with its axes in the order ``dims`` (like ``numpy.transpose``); same values either way."""
    if _use_views():
        return mint.permute(x, tuple(dims))
    return ops.transpose(x, tuple(dims))


def set_permute_views(enabled: Optional[bool]) -> Optional[bool]:
    """Views everywhere (True), nowhere (False) or on CPU only (None, the default); returns the previous
    setting. Graphs already compiled keep the choice they were compiled with."""
    if enabled not in (None, True, False):
        raise ValueError(f"enabled must be None, True or False, got {enabled!r}")
    previous = _STATE["views"]
    _STATE["views"] = enabled
    return previous


@contextlib.contextmanager
def portable_permutes():
    """Within the block, graphs compile ``permute`` as the plain ``Transpose`` (for export)."""
    previous = set_permute_views(False)
    try:
        yield
    finally:
        set_permute_views(previous)
