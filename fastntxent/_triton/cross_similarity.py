"""Triton operators of the cross-similarity family (MoCo InfoNCE, CLIP; docs/maths.md).

    fastntxent::cross_forward_triton(q, k, queue, scale, pos_offset, keys_are_negatives, decoupled=False,
                                     outputs=3)
        -> (lse, pos, expected_logit, top1)                          each (M,) float32
    fastntxent::cross_backward_triton(q, k, queue, scale, pos_offset, keys_are_negatives,
                                      lse, grad_lse, grad_pos, need_grad_k, decoupled=False)
        -> (grad_q, grad_k)                                  in q's / k's dtype

Same schema and meaning as the C++ operators (csrc/ops.cpp), plus the Triton-only `outputs`
(common.OUT_TOP1 | common.OUT_EXPECTED, default both): which optional statistics the caller
needs; one left out is not computed and stays NaN. The kernels are in
cross_kernels.py. Rows are the queries q (M, D); the columns of row i are every key k_j
(N rows) when `keys_are_negatives`, else only its positive key k_{i+pos_offset}; then every
queue entry (K rows). The queue gets no gradient.

This file launches: kernel flags for the device, column splits (MoCo's few queries against a
long queue need them), the device guard, NaN-poisoned outputs, the merge of split states.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton

from . import common
from .common import get_fp32_precision, set_fp32_precision
from .cross_kernels import cross_bwd_k_kernel, cross_bwd_q_kernel, cross_fwd_kernel

__all__ = ["cross_forward", "cross_backward", "set_fp32_precision", "get_fp32_precision"]

# Number of column splits: None picks from the row/column counts and the SM count (1 under
# the interpreter); an int forces it (tests use this to exercise the split/merge path).
SPLITS: Optional[int] = None
_MAX_SPLITS = 64


def _check(q, k, queue, scale, pos_offset):
    """The kernels' invariants (the public API has already validated the user's input)."""
    for name, x in (("q", q), ("k", k)):
        if x.dim() != 2 or x.shape[1] < 1:
            raise ValueError(f"fastntxent triton: {name} must be 2-D with D >= 1, got shape {tuple(x.shape)}")
    if q.dtype not in common.KERNEL_DTYPES or k.dtype != q.dtype:
        raise ValueError(
            "fastntxent triton kernels take q and k of one dtype among float32, bfloat16, float16; "
            f'got {q.dtype} and {k.dtype} (float64: use backend="cpu" or backend="reference")'
        )
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"fastntxent triton: q and k must have the same D, got {q.shape[1]} and {k.shape[1]}")
    common.check_device(q.device)
    if k.device != q.device:
        raise ValueError(f"fastntxent triton: k is on {k.device} but q is on {q.device}")
    if queue is not None:
        if queue.dim() != 2 or queue.shape[1] != q.shape[1]:
            raise ValueError(f"fastntxent triton: queue must have shape (K, {q.shape[1]}), got {tuple(queue.shape)}")
        if queue.device != q.device:
            raise ValueError(f"fastntxent triton: queue is on {queue.device} but q is on {q.device}")
        if not queue.dtype.is_floating_point:
            raise ValueError("fastntxent triton: queue must be floating point")
    if scale.numel() != 1:
        raise ValueError("fastntxent triton: scale must hold one value")
    if pos_offset < 0 or pos_offset + q.shape[0] > k.shape[0]:
        raise ValueError(f"fastntxent triton: pos_offset + M must be <= N, got {pos_offset} + {q.shape[0]} > "
                         f"{k.shape[0]}")


def _prepare(q, k, queue, scale):
    q, k = q.detach(), k.detach()
    if queue is not None:
        # Same operand dtype as q for tl.dot (the API already hands it over in q's dtype).
        queue = queue.detach().to(q.dtype) if queue.shape[0] > 0 else None
    sc = scale.detach().reshape(()).to(device=q.device, dtype=torch.float32)
    return q, k, queue, sc


def _strides(x: Optional[torch.Tensor], dummy: torch.Tensor):
    return (x, x.stride(0), x.stride(1)) if x is not None else (dummy, 0, 0)


@torch.library.custom_op("fastntxent::cross_forward_triton", mutates_args=())
def _cross_forward_triton(
    q: torch.Tensor, k: torch.Tensor, queue: Optional[torch.Tensor], scale: torch.Tensor,
    pos_offset: int, keys_are_negatives: bool, decoupled: bool = False, outputs: int = 3,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(q, k, queue, scale, pos_offset)
    q, k, queue, sc = _prepare(q, k, queue, scale)
    M, D = q.shape
    N = k.shape[0]
    NQ = queue.shape[0] if queue is not None else 0
    outs = [common.poisoned(M, q.device) for _ in range(4)]
    if M == 0:
        return tuple(outs)
    n_cols = (N if keys_are_negatives else 0) + NQ
    flags = common.kernel_flags(q.dtype, D, common.device_capability(q.device))
    splits = common.num_splits(M, n_cols, q.device, _MAX_SPLITS, SPLITS) if n_cols > 0 else 1
    dummy = outs[0]
    work = common.poisoned((6, splits, M), q.device) if splits > 1 else dummy
    common.check_grid((triton.cdiv(M, 32), splits))
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), splits)  # noqa: E731
    with common.device_guard(q.device):
        cross_fwd_kernel[grid](
            q, q.stride(0), q.stride(1), k, k.stride(0), k.stride(1), *_strides(queue, q),
            sc, M, N, NQ, D, pos_offset, common.m_key(M), common.m_key(n_cols),
            *outs, work,
            BLOCK_D=flags.block_d, D_CHUNKS=flags.d_chunks, IN_BATCH=bool(keys_are_negatives),
            HAS_QUEUE=queue is not None, SPLIT=splits > 1, CAST_F32=flags.cast_f32, PREC=flags.prec,
            DECOUPLED=decoupled, **common.output_flags(outputs),
        )
    if splits == 1:
        return tuple(outs)
    m, l, ps, best, best_pos, pos_part = work.unbind(0)
    lse, pos, expected_logit, top1 = outs
    common.merge_splits(m, l, ps, best, best_pos, lse, expected_logit, top1)
    if keys_are_negatives:
        torch.sum(pos_part, 0, out=pos)
    return tuple(outs)


@torch.library.custom_op("fastntxent::cross_backward_triton", mutates_args=())
def _cross_backward_triton(
    q: torch.Tensor, k: torch.Tensor, queue: Optional[torch.Tensor], scale: torch.Tensor,
    pos_offset: int, keys_are_negatives: bool, lse: torch.Tensor, grad_lse: torch.Tensor,
    grad_pos: torch.Tensor, need_grad_k: bool, decoupled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check(q, k, queue, scale, pos_offset)
    q, k, queue, sc = _prepare(q, k, queue, scale)
    M, D = q.shape
    N = k.shape[0]
    NQ = queue.shape[0] if queue is not None else 0
    lse, a, b = common.backward_rows(M, q.device, lse, grad_lse, grad_pos)
    if M == 0:
        return (torch.zeros((M, D), dtype=q.dtype, device=q.device),
                torch.zeros((N, D), dtype=k.dtype, device=k.device))
    flags = common.kernel_flags(q.dtype, D, common.device_capability(q.device))
    on_cpu = q.device.type == "cpu"  # the interpreter: fp32 buffers (its bf16/fp16 stores are not trusted)

    kernel_flags = dict(BLOCK_D=flags.block_d, BLOCK_DO=flags.block_do, D_CHUNKS=flags.d_chunks,
                        CAST_F32=flags.cast_f32, PREC=flags.prec, H_BF16=flags.h_bf16, DECOUPLED=decoupled)
    d_grid = triton.cdiv(D, flags.block_do)
    # ∂q (and ∂k of the positives without in-batch keys).
    n_cols = (N if keys_are_negatives else 0) + NQ
    splits = common.num_splits(M, n_cols, q.device, _MAX_SPLITS, SPLITS) if n_cols > 0 else 1
    gq, stride_s = common.grad_buffer(M, D, splits, q.dtype, q.device)
    write_gk = need_grad_k and not keys_are_negatives
    # Key rows that are nobody's positive have a zero gradient: zeros, not poison.
    gk = torch.zeros((N, D), dtype=torch.float32 if on_cpu else k.dtype, device=q.device) if write_gk else None
    common.check_grid((triton.cdiv(M, 32), splits, d_grid))
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), splits, d_grid)  # noqa: E731
    with common.device_guard(q.device):
        cross_bwd_q_kernel[grid](
            q, q.stride(0), q.stride(1), k, k.stride(0), k.stride(1), *_strides(queue, q),
            sc, lse, a, b, M, N, NQ, D, pos_offset, common.m_key(M), common.m_key(n_cols),
            gq, stride_s, D, gk if gk is not None else gq, D,
            IN_BATCH=bool(keys_are_negatives), HAS_QUEUE=queue is not None, WRITE_GK=write_gk, **kernel_flags,
        )
    grad_q = common.finish_grad(gq, q.dtype)
    if not need_grad_k:
        return grad_q, torch.zeros((N, D), dtype=k.dtype, device=k.device)
    if not keys_are_negatives:
        return grad_q, gk.to(k.dtype)

    # ∂k: key row blocks over the query tiles, with the row lse of q.
    splits = common.num_splits(N, M, q.device, _MAX_SPLITS, SPLITS)
    gk, stride_s = common.grad_buffer(N, D, splits, k.dtype, q.device)
    common.check_grid((triton.cdiv(N, 32), splits, d_grid))
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), splits, d_grid)  # noqa: E731
    with common.device_guard(q.device):
        cross_bwd_k_kernel[grid](
            k, k.stride(0), k.stride(1), q, q.stride(0), q.stride(1),
            sc, lse, a, b, N, M, D, pos_offset, common.m_key(N), common.m_key(M),
            gk, stride_s, D, **kernel_flags,
        )
    return grad_q, common.finish_grad(gk, k.dtype)


cross_forward = torch.ops.fastntxent.cross_forward_triton
cross_backward = torch.ops.fastntxent.cross_backward_triton

from ..cross_family import register_operators  # noqa: E402

register_operators(_cross_forward_triton, _cross_backward_triton)
