"""Triton operators of the self-similarity family (NT-Xent, multi-view, SupCon; docs/maths.md).

    fastntxent::self_forward_triton(u, temperature, labels, rows_per_view, decoupled=False, outputs=3)
        -> (lse, pos_sum, pos_count, expected_logit, top1)          each (M,) float32
    fastntxent::self_backward_triton(u, temperature, labels, rows_per_view, lse, grad_lse, grad_pos,
                                     decoupled=False)
        -> grad_u                                            (M, D) in u's dtype

Same schema and meaning as the C++ operators (csrc/ops.cpp), plus the Triton-only `outputs`
(common.OUT_TOP1 | common.OUT_EXPECTED, default both): which optional statistics the caller
needs; one left out is not computed (its loop code is compiled out) and stays NaN. The kernels are in
self_kernels.py. u: (M, D) float32 / bfloat16 / float16 on a CUDA device (or the CPU under
TRITON_INTERPRET=1), any strides; labels (M,) int64 or None (label(i) = i mod rows_per_view).

This file launches: it picks the kernel flags for the device (common.kernel_flags), the
column splits (occupancy), sets the device guard, poisons the outputs with NaN, and merges
split partial states. float64 is refused: an fp32 kernel cannot meet fp64 accuracy.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton

from . import common
from .common import get_fp32_precision, set_fp32_precision
from .self_kernels import self_bwd_kernel, self_fwd_kernel

__all__ = ["self_forward", "self_backward", "set_fp32_precision", "get_fp32_precision"]

# Number of column splits: None picks from M and the SM count (1 under the interpreter);
# an int forces it (tests use this to exercise the split/merge path).
SPLITS: Optional[int] = None
_MAX_SPLITS = 16


def _check(u: torch.Tensor, temperature: torch.Tensor, labels: Optional[torch.Tensor], rows_per_view: int):
    """The kernels' invariants (the public API has already validated the user's input)."""
    if u.dim() != 2 or u.shape[1] < 1:
        raise ValueError(f"fastntxent triton: u must be 2-D (M, D) with D >= 1, got shape {tuple(u.shape)}")
    if u.dtype not in common.KERNEL_DTYPES:
        raise ValueError(
            f"fastntxent triton kernels take float32, bfloat16 or float16 rows, got {u.dtype} "
            '(float64: use backend="cpu" on CPU tensors or backend="reference")'
        )
    common.check_device(u.device)
    if temperature.numel() != 1:
        raise ValueError("fastntxent triton: temperature must hold one value")
    if rows_per_view < 1:
        raise ValueError(f"fastntxent triton: rows_per_view must be >= 1, got {rows_per_view}")
    if labels is not None and (labels.shape != (u.shape[0],) or labels.dtype != torch.int64):
        raise ValueError(f"fastntxent triton: labels must be int64 of shape ({u.shape[0]},)")


def _prepare(u, temperature, labels):
    tau = temperature.detach().reshape(()).to(device=u.device, dtype=torch.float32)
    lab = labels.detach().to(u.device).contiguous() if labels is not None else None
    return u.detach(), tau, lab


def _splits(u: torch.Tensor) -> int:
    M = u.shape[0]
    return common.num_splits(M, M, u.device, _MAX_SPLITS, SPLITS)


def forward_rows(u: torch.Tensor, tau: torch.Tensor, lab: Optional[torch.Tensor], rows_per_view: int,
                 row_start: int, rows: int, splits: int, decoupled: bool, outputs: int):
    """The five row statistics of rows [row_start, row_start + rows) of u (M, D) against all M
    columns (the whole batch: row_start = 0, rows = M; a rank's local rows otherwise), each
    (rows,) float32, poisoned first; `splits` column splits, merged here."""
    M, D = u.shape
    outs = [common.poisoned(rows, u.device) for _ in range(5)]
    if rows == 0:
        return tuple(outs)
    flags = common.kernel_flags(u.dtype, D, common.device_capability(u.device))
    dummy = outs[0]
    work = common.poisoned((7, splits, rows), u.device) if splits > 1 else dummy
    common.check_grid((triton.cdiv(rows, 32), splits))
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), splits)  # noqa: E731
    with common.device_guard(u.device):
        self_fwd_kernel[grid](
            u, u.stride(0), u.stride(1), tau, lab if lab is not None else dummy, M, D, rows_per_view, row_start, rows,
            common.m_key(M), *outs, work,
            BLOCK_D=flags.block_d, D_CHUNKS=flags.d_chunks, HAS_LABELS=lab is not None, SPLIT=splits > 1,
            CAST_F32=flags.cast_f32, PREC=flags.prec, DECOUPLED=decoupled, LOCAL_ROWS=rows != M,
            **common.output_flags(outputs),
        )
    if splits == 1:
        return tuple(outs)
    m, l, ps, pos, cnt, best, best_pos = work.unbind(0)
    lse, pos_sum, pos_count, expected_logit, top1 = outs
    common.merge_splits(m, l, ps, best, best_pos, lse, expected_logit, top1)
    torch.sum(pos, 0, out=pos_sum)
    torch.sum(cnt, 0, out=pos_count)
    return tuple(outs)


@torch.library.custom_op("fastntxent::self_forward_triton", mutates_args=())
def _self_forward_triton(
    u: torch.Tensor, temperature: torch.Tensor, labels: Optional[torch.Tensor], rows_per_view: int,
    decoupled: bool = False, outputs: int = 3,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(u, temperature, labels, rows_per_view)
    u, tau, lab = _prepare(u, temperature, labels)
    M = u.shape[0]
    return forward_rows(u, tau, lab, rows_per_view, 0, M, _splits(u), decoupled, outputs)


@torch.library.custom_op("fastntxent::self_backward_triton", mutates_args=())
def _self_backward_triton(
    u: torch.Tensor, temperature: torch.Tensor, labels: Optional[torch.Tensor], rows_per_view: int,
    lse: torch.Tensor, grad_lse: torch.Tensor, grad_pos: torch.Tensor, decoupled: bool = False,
) -> torch.Tensor:
    _check(u, temperature, labels, rows_per_view)
    u, tau, lab = _prepare(u, temperature, labels)
    M, D = u.shape
    lse, a, b = common.backward_rows(M, u.device, lse, grad_lse, grad_pos)
    if M == 0:
        return torch.zeros((M, D), dtype=u.dtype, device=u.device)
    flags = common.kernel_flags(u.dtype, D, common.device_capability(u.device))
    splits = _splits(u)
    out, stride_s = common.grad_buffer(M, D, splits, u.dtype, u.device)
    common.check_grid((triton.cdiv(M, 32), splits, triton.cdiv(D, flags.block_do)))
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), splits, triton.cdiv(D, flags.block_do))  # noqa: E731
    with common.device_guard(u.device):
        self_bwd_kernel[grid](
            u, u.stride(0), u.stride(1), tau, lab if lab is not None else a, lse, a, b, M, D, rows_per_view,
            common.m_key(M), out, stride_s, D,
            BLOCK_D=flags.block_d, BLOCK_DO=flags.block_do, D_CHUNKS=flags.d_chunks, HAS_LABELS=lab is not None,
            CAST_F32=flags.cast_f32, PREC=flags.prec, H_BF16=flags.h_bf16, DECOUPLED=decoupled,
        )
    return common.finish_grad(out, u.dtype)


self_forward = torch.ops.fastntxent.self_forward_triton
self_backward = torch.ops.fastntxent.self_backward_triton

from ..self_family import register_operators  # noqa: E402

register_operators(_self_forward_triton, _self_backward_triton)
