"""Loads the compiled extension `fastntxent._C` (fused CPU kernels, CUDA kernels when built).

Importing it registers the `torch.ops.fastntxent.*` C++ operators. A missing build is not an
error here: `backend="auto"` then falls back to the reference and explicit backends say why.
"""
from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (registers the operators)

    LOAD_ERROR: Exception | None = None
except ImportError as exc:  # not built (e.g. a source checkout without build_ext)
    LOAD_ERROR = exc


def has_cpu_kernels() -> bool:
    return LOAD_ERROR is None


def has_cuda_kernels() -> bool:
    return LOAD_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "fastntxent::self_forward", "CUDA"
    )


# Looked up once (a constant for torch.compile): an extension built before the cross family
# lacks its operators.
def _has_cpu_kernel(qualname: str) -> bool:
    try:
        return LOAD_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CPU")
    except RuntimeError:  # the operator does not exist
        return False


_HAS_CROSS = _has_cpu_kernel("fastntxent::cross_forward")


def has_cross_kernels() -> bool:
    """The fused CPU kernels of the cross family (info_nce, clip_loss) are in the build."""
    return _HAS_CROSS


if LOAD_ERROR is None:
    from ._ops import register_self_ops

    register_self_ops("fastntxent::self_forward", "fastntxent::self_backward")

    if has_cross_kernels():
        from ._cross_ops import register_cross_ops

        register_cross_ops("fastntxent::cross_forward", "fastntxent::cross_backward")
