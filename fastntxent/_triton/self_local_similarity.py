"""Triton operators of the self family's local-rows form (docs/distributed.md).

    fastntxent::self_forward_rows_triton(u, temperature, labels, rows_per_view, row_start, row_stop,
                                         decoupled=False, outputs=3)
        -> (lse, pos_sum, pos_count, expected_logit, top1)      each (row_stop − row_start,) float32
    fastntxent::self_backward_rows_triton(u, temperature, labels, rows_per_view, row_start, row_stop,
                                          lse, grad_lse, grad_pos, decoupled=False) -> grad_u   (M, D) in u's dtype

Same schema and meaning as the C++ operators (csrc/ops.cpp, csrc/cpu/self_similarity.cpp), plus
the Triton-only `outputs` of the forward (as self_similarity.py's: an optional statistic left out
is not computed and stays NaN). The forward is the full batch's kernel (self_kernels.py
`self_fwd_kernel`) on the rows [row_start, row_stop); the backward kernels are in
self_local_kernels.py. This file checks, poisons the outputs, picks the kernel
flags and column splits, launches, merges split states and adds the row side of the gradient
into the column side.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton

from . import common
from .self_local_kernels import self_bwd_col_side_kernel, self_bwd_row_side_kernel
from .self_similarity import _check, _prepare, forward_rows

__all__ = ["self_forward_rows", "self_backward_rows"]

SPLITS: Optional[int] = None  # column splits of the local rows; None: from the sizes (1 under the interpreter)
_MAX_SPLITS = 16


def _check_rows(u: torch.Tensor, row_start: int, row_stop: int) -> None:
    if not 0 <= row_start <= row_stop <= u.shape[0]:
        raise ValueError(f"fastntxent triton: local rows [{row_start}, {row_stop}) must lie in [0, M = {u.shape[0]}]")


@torch.library.custom_op("fastntxent::self_forward_rows_triton", mutates_args=())
def _self_forward_rows_triton(
    u: torch.Tensor, temperature: torch.Tensor, labels: Optional[torch.Tensor], rows_per_view: int,
    row_start: int, row_stop: int, decoupled: bool = False, outputs: int = 3,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(u, temperature, labels, rows_per_view)
    _check_rows(u, row_start, row_stop)
    u, tau, lab = _prepare(u, temperature, labels)
    rows = row_stop - row_start
    splits = common.num_splits(rows, u.shape[0], u.device, _MAX_SPLITS, SPLITS) if rows else 1
    return forward_rows(u, tau, lab, rows_per_view, row_start, rows, splits, decoupled, outputs)


@torch.library.custom_op("fastntxent::self_backward_rows_triton", mutates_args=())
def _self_backward_rows_triton(
    u: torch.Tensor, temperature: torch.Tensor, labels: Optional[torch.Tensor], rows_per_view: int,
    row_start: int, row_stop: int, lse: torch.Tensor, grad_lse: torch.Tensor, grad_pos: torch.Tensor,
    decoupled: bool = False,
) -> torch.Tensor:
    _check(u, temperature, labels, rows_per_view)
    _check_rows(u, row_start, row_stop)
    u, tau, lab = _prepare(u, temperature, labels)
    M, D = u.shape
    rows = row_stop - row_start
    lse, a, b = common.backward_rows(rows, u.device, lse, grad_lse, grad_pos)
    if rows == 0 or M == 0:
        return torch.zeros((M, D), dtype=u.dtype, device=u.device)
    flags = common.kernel_flags(u.dtype, D, common.device_capability(u.device))
    d_grid = triton.cdiv(D, flags.block_do)
    splits = common.num_splits(rows, M, u.device, _MAX_SPLITS, SPLITS)
    row_side, stride_s = common.grad_buffer(rows, D, splits, torch.float32, u.device)
    col_side = common.poisoned((M, D), u.device)  # fp32: the row side is added into it
    lab_arg = lab if lab is not None else a
    common.check_grid((triton.cdiv(rows, 32), splits, d_grid))
    common.check_grid((triton.cdiv(M, 32), d_grid))
    row_grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), splits, d_grid)  # noqa: E731
    col_grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), d_grid)  # noqa: E731
    meta = dict(BLOCK_D=flags.block_d, BLOCK_DO=flags.block_do, D_CHUNKS=flags.d_chunks, HAS_LABELS=lab is not None,
                CAST_F32=flags.cast_f32, PREC=flags.prec, H_BF16=flags.h_bf16, DECOUPLED=decoupled)
    with common.device_guard(u.device):
        self_bwd_row_side_kernel[row_grid](
            u, u.stride(0), u.stride(1), tau, lab_arg, lse, a, b, M, D, rows_per_view, row_start, rows,
            common.m_key(M), row_side, stride_s, D, **meta)
        self_bwd_col_side_kernel[col_grid](
            u, u.stride(0), u.stride(1), tau, lab_arg, lse, a, b, M, D, rows_per_view, row_start, rows,
            common.m_key(M), col_side, D, **meta)
    col_side[row_start:row_stop] += common.finish_grad(row_side, torch.float32)
    return col_side.to(u.dtype)


self_forward_rows = torch.ops.fastntxent.self_forward_rows_triton
self_backward_rows = torch.ops.fastntxent.self_backward_rows_triton

from ..self_family import register_rows_operators  # noqa: E402

register_rows_operators(_self_forward_rows_triton, _self_backward_rows_triton)
