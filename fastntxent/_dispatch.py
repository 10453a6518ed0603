"""Backend selection: which implementation computes the per-row statistics of SPEC §1."""
from __future__ import annotations

import os
from typing import Callable, NamedTuple

import torch

from . import _extension
from ._validation import check_backend


class SelfOps(NamedTuple):
    forward: Callable  # (u, temperature, labels, period) -> 5 row tensors
    backward: Callable


def _triton_available() -> tuple[bool, str]:
    try:
        from ._triton import self_similarity  # noqa: F401
    except ImportError as exc:
        return False, f"triton is not importable ({exc}); pip install triton"
    return True, ""


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# Backends whose kernels compute in fp32 at most (fp64 would silently lose precision).
_FP32_ONLY = ("triton", "cuda")


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """Concrete backend name for `backend` on `device` and input `dtype`; raises ValueError
    saying why when the requested backend cannot run."""
    check_backend(backend)
    if backend in _FP32_ONLY and dtype == torch.float64:
        raise ValueError(
            f'backend="{backend}" computes in fp32 and does not take float64 inputs; use '
            'backend="cpu" (CPU tensors) or "reference", or cast the embeddings to float32'
        )
    if backend == "auto":
        if device.type == "cuda" and dtype == torch.float64:
            return "reference"
        if device.type == "cuda":
            if _triton_available()[0]:
                return "triton"
            return "cuda" if _extension.has_cuda_kernels() else "reference"
        if device.type == "cpu" and _extension.has_cpu_kernels():
            return "cpu"
        return "reference"
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f'backend="cpu" needs CPU tensors, got tensors on {device}')
        if not _extension.has_cpu_kernels():
            raise ValueError(
                'backend="cpu" needs the compiled extension fastntxent._C, which failed to load '
                f"({_extension.LOAD_ERROR}); build it with `pip install --no-build-isolation -e .`"
            )
    elif backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f'backend="cuda" needs CUDA tensors, got tensors on {device}')
        if not _extension.has_cuda_kernels():
            raise ValueError(
                'backend="cuda" needs fastntxent._C built with CUDA kernels (a CUDA toolkit and '
                "a CUDA build of torch at install time; see README)"
            )
    elif backend == "triton":
        ok, why = _triton_available()
        if not ok:
            raise ValueError(f'backend="triton" cannot run: {why}')
        if device.type == "cpu" and not _interpreting():
            raise ValueError(
                'backend="triton" on CPU tensors runs only under the Triton interpreter: '
                "set TRITON_INTERPRET=1 before importing triton, or use CUDA tensors"
            )
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f'backend="triton" needs CUDA tensors, got tensors on {device}')
    return backend


def self_ops(backend: str) -> SelfOps:
    """Operators of a concrete fused backend ("cpu", "cuda" or "triton")."""
    if backend in ("cpu", "cuda"):
        return SelfOps(torch.ops.fastntxent.self_forward, torch.ops.fastntxent.self_backward)
    if backend == "triton":
        from ._triton import self_similarity

        return SelfOps(self_similarity.self_forward, self_similarity.self_backward)
    raise ValueError(f"no fused operators for backend {backend!r}")
