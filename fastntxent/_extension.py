"""Loads the compiled extension `fastntxent._C` and says what the build holds.

Importing `_C` registers the `torch.ops.fastntxent.*` C++ operators (fused CPU kernels of both
families; CUDA kernels of the self family when built with CUDA). A missing build is not an
error here: `backend="auto"` then uses the reference and explicit backends say why
(fastntxent.backends). Everything is looked up once, at import (constants for torch.compile).
"""
from __future__ import annotations

from typing import Optional

import torch

try:
    from . import _C

    LOAD_ERROR: Exception | None = None
except ImportError as exc:  # not built (e.g. a source checkout without build_ext)
    _C = None
    LOAD_ERROR = exc


def _has_kernel(qualname: str, dispatch_key: str) -> bool:
    try:
        return LOAD_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(qualname, dispatch_key)
    except RuntimeError:  # the operator does not exist (an older build)
        return False


_HAS_CPU = LOAD_ERROR is None
_HAS_CROSS = _has_kernel("fastntxent::cross_forward", "CPU")
_HAS_CUDA = _has_kernel("fastntxent::self_forward", "CUDA")
_HAS_LOCAL_ROWS = _has_kernel("fastntxent::self_forward_rows", "CPU")
_HAS_SIGLIP = _has_kernel("fastntxent::siglip_forward", "CPU")
_HAS_SIGLIP_LOSS_AND_GRAD = _has_kernel("fastntxent::siglip_loss_and_grad", "CPU")


def _archs(text: str) -> tuple:
    return tuple(int(a) for a in text.split("_") if a)


# Compute capabilities (as 80, 90, ...) the CUDA kernels carry machine code and PTX for.
CUDA_SASS = _archs(getattr(_C, "cuda_sass", "")) if _C is not None else ()
CUDA_PTX = _archs(getattr(_C, "cuda_ptx", "")) if _C is not None else ()
CXX_COMPILER = getattr(_C, "cxx_compiler", "unknown") if _C is not None else "not built"


def has_cpu_kernels() -> bool:
    return _HAS_CPU


def has_cross_kernels() -> bool:
    """The fused CPU kernels of the cross family (info_nce, clip_loss) are in the build."""
    return _HAS_CROSS


def has_local_rows_kernels() -> bool:
    """The CPU kernels of the self family's local-rows form (distributed gather=True) are in the build."""
    return _HAS_LOCAL_ROWS


def has_siglip_kernels() -> bool:
    """The fused CPU kernels of SigLIP's sigmoid loss are in the build."""
    return _HAS_SIGLIP


def has_siglip_loss_and_grad() -> bool:
    """The CPU build has SigLIP's summed loss with its gradient from the forward sweep."""
    return _HAS_SIGLIP_LOSS_AND_GRAD


def has_cuda_kernels() -> bool:
    return _HAS_CUDA


def cuda_code_missing(capability: tuple, sass: tuple = None, ptx: tuple = None) -> Optional[str]:
    """Why the CUDA kernels cannot run on a GPU of `capability` (major, minor), or None.

    Machine code for sm_XY runs on GPUs of the same major version and minor ≥ Y (sm_80 code
    runs on sm_86/sm_89); PTX for compute_XY is JIT-compiled by the driver for any GPU ≥ XY."""
    sass = CUDA_SASS if sass is None else sass
    ptx = CUDA_PTX if ptx is None else ptx
    cc = capability[0] * 10 + capability[1]
    if any(a // 10 == capability[0] and a <= cc for a in sass) or any(a <= cc for a in ptx):
        return None
    built = ", ".join([f"sm_{a}" for a in sass] + [f"compute_{a} (PTX)" for a in ptx]) or "nothing"
    return (f'backend="cuda": the CUDA kernels were built for {built}, which cannot run on a GPU of '
            f"compute capability {capability[0]}.{capability[1]}; rebuild with "
            f'FASTNTXENT_CUDA_ARCHS="{cc}" or use backend="triton"')
