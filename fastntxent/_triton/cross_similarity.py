"""Fused Triton kernels of the cross-similarity family (SPEC §2): MoCo InfoNCE, CLIP.

Operators (schema of csrc/ops.cpp `cross_forward` / `cross_backward`, registered with fake
kernels and autograd through `fastntxent._cross_ops.register_cross_ops`):

    fastntxent::cross_forward_triton(q, k, queue, scale, pos_offset, in_batch)
        -> (lse, pos, ps_sum, top1)                          each (M,) float32
    fastntxent::cross_backward_triton(q, k, queue, scale, pos_offset, in_batch,
                                      lse, grad_lse, grad_pos, need_grad_k)
        -> (grad_q, grad_k)                                  in q's / k's dtype

Rows are the queries q (M, D); the columns of row i are every key k_j (N rows) when
`in_batch`, else only the positive key k_{i+pos_offset}; then every queue entry (K rows).
Logits s_ic = scale · (q_i · c); the positive of row i is k_{i+pos_offset}. Exactly the
quantities of the fused CPU kernel (csrc/cpu/cross_similarity.cpp).

Forward: one program per (row block, column split). The column tiles of a row block are the
key tiles (in_batch) followed by the queue tiles; a split takes a contiguous range of them.
Each tile is one `tl.dot` (D looped in chunks when large); per row an online max-subtracted
logsumexp (exp2), Σ P·s rescaled with it, and the top-1 statistic (the first column reaching
the maximum wins, across tiles too: a later tile must be strictly greater). With in-batch
keys the positive logit is read from the tile holding it (the rounding of the lse terms, so
lse ≥ pos and M = 1 gives a loss of exactly 0); without, it is an elementwise fp32 row dot
and, as column 0, the starting state of split 0. Several splits write partial states merged on the host (O(splits·M)).

Backward, for L = Σ_i a_i·lse_i + b_i·pos_i (a = grad_lse, b = grad_pos), G_ic = a_i P_ic
+ b_i [c = positive of i]:
  ∂L/∂q_i = scale · Σ_c G_ic c    kernel 1: (row block of q, split, output D chunk), over the
                                   tiles of k (in_batch) and of the queue; without in-batch
                                   keys the positive term is added per row, and the same
                                   program writes ∂L/∂k_{i+off} = scale·G_i,pos·q_i.
  ∂L/∂k_j = scale · Σ_i G_ij q_i  kernel 2 (in_batch and need_grad_k): (row block of k, split,
                                   output D chunk) over the tiles of q, with the row lse of q.
Each output row is written by one program (several splits write fp32 partials summed in a
fixed order): no atomics, deterministic, no M×N or M×K storage. The queue gets no gradient.

Precision, dtypes and the interpreter follow fastntxent/_triton/self_similarity.py (whose
helpers are used here): fp32 products follow torch.get_float32_matmul_precision() /
`set_fp32_precision`; bf16/fp16 operands with fp32 accumulation; float64 refused.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._cross_ops import register_cross_ops
from .self_similarity import (
    _BWD_CONFIGS,
    _DTYPES,
    _FWD_CONFIGS,
    _INTERPRET,
    _d_blocks,
    _dot_tile,
    _interpreting,
    _load_rows,
    _m_key,
    _online_update,
    _precision,
    _sm_count,
    get_fp32_precision,
    set_fp32_precision,
)

__all__ = ["cross_forward", "cross_backward", "set_fp32_precision", "get_fp32_precision"]

# Number of column splits: None picks from the row/column counts and the SM count (1 under
# the interpreter); an int forces it (tests use this to exercise the split/merge path).
SPLITS: Optional[int] = None


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------
@triton.jit
def _row_dot(A, stride_am, stride_ad, rows, B, stride_bm, stride_bd, brows, ok, D,
             BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr):
    """Σ_d A[rows, d]·B[brows, d] per row, elementwise in fp32 (the positive logit)."""
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c in range(D_CHUNKS):
        d = c * BLOCK_D + offs_d
        m = ok[:, None] & (d < D)[None, :]
        x = tl.load(A + rows[:, None] * stride_am + d[None, :] * stride_ad, mask=m, other=0.0).to(tl.float32)
        y = tl.load(B + brows[:, None] * stride_bm + d[None, :] * stride_bd, mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(x * y, 1)
    return acc


@triton.autotune(configs=_FWD_CONFIGS, key=["M_KEY", "C_KEY", "D"])
@triton.jit
def _cross_fwd_kernel(
    Q, stride_qm, stride_qd, K, stride_km, stride_kd, QU, stride_um, stride_ud,
    SCALE, M, N, NQ, D, OFF, M_KEY, C_KEY,
    LSE, POS, PS_SUM, TOP1,                # final outputs (POS always; the rest with one split)
    W,                                     # (6, splits, M) partial states (several splits)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    D_CHUNKS: tl.constexpr, IN_BATCH: tl.constexpr, HAS_QUEUE: tl.constexpr, SPLIT: tl.constexpr,
    CAST_F32: tl.constexpr, PREC: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < M
    prow = rows + OFF  # the positive key of each row
    scale = tl.load(SCALE).to(tl.float32)
    q = _load_rows(Q, stride_qm, stride_qd, rows, row_ok, D, BLOCK_M, BLOCK_D, D_CHUNKS, CAST_F32)

    if IN_BATCH:
        n_kt = tl.cdiv(N, BLOCK_N)
    else:
        n_kt = 0
    if HAS_QUEUE:
        n_qt = tl.cdiv(NQ, BLOCK_N)
    else:
        n_qt = 0
    n_tiles = n_kt + n_qt
    per_split = tl.cdiv(n_tiles, n_split)
    t_start = pid_s * per_split
    t_stop = tl.minimum(t_start + per_split, n_tiles)

    # The positive logit: with in-batch keys taken from the tile that holds it (the same
    # rounding as the logsumexp terms, so lse ≥ pos); else an fp32 row dot.
    pos = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if not IN_BATCH:
        pos = scale * _row_dot(Q, stride_qm, stride_qd, rows, K, stride_km, stride_kd, prow, row_ok, D,
                               BLOCK_M, BLOCK_D, D_CHUNKS)
    neg_inf = float("-inf")
    m_i = tl.full((BLOCK_M,), neg_inf, dtype=tl.float32)   # running max of s
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)           # Σ exp(s − m)
    ps_i = tl.zeros((BLOCK_M,), dtype=tl.float32)          # Σ exp(s − m)·s
    best = tl.full((BLOCK_M,), neg_inf, dtype=tl.float32)  # largest logit so far
    best_pos = tl.zeros((BLOCK_M,), dtype=tl.float32)      # is that argmax the positive
    if not IN_BATCH:
        # The positive alone is column 0, ahead of the queue: split 0 starts from it.
        first_split = pid_s == 0
        m_i = tl.where(first_split, pos, m_i)
        l_i = tl.where(first_split, 1.0, l_i)
        ps_i = tl.where(first_split, pos, ps_i)
        best = tl.where(first_split, pos, best)
        best_pos = tl.where(first_split, 1.0, best_pos)

    local = tl.arange(0, BLOCK_N)
    local64 = local.to(tl.int64)
    if IN_BATCH:
        for t in range(t_start, tl.minimum(t_stop, n_kt)):
            cols = t * BLOCK_N + local64
            col_ok = cols < N
            dots, _b = _dot_tile(Q, stride_qm, stride_qd, rows, row_ok, K, stride_km, stride_kd, cols, col_ok,
                                 q, D, BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, CAST_F32, PREC)
            is_pos = prow[:, None] == cols[None, :]
            s = dots * scale
            pos += tl.sum(tl.where(is_pos, s, 0.0), 1)
            m_i, l_i, ps_i, best, best_pos = _online_update(m_i, l_i, ps_i, best, best_pos, s,
                                                            col_ok[None, :], is_pos, local, BLOCK_N)
    if HAS_QUEUE:
        for t in range(tl.maximum(t_start, n_kt), t_stop):
            cols = (t - n_kt) * BLOCK_N + local64
            col_ok = cols < NQ
            dots, _b = _dot_tile(Q, stride_qm, stride_qd, rows, row_ok, QU, stride_um, stride_ud, cols, col_ok,
                                 q, D, BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, CAST_F32, PREC)
            no_pos = local[None, :] < 0
            m_i, l_i, ps_i, best, best_pos = _online_update(m_i, l_i, ps_i, best, best_pos, dots * scale,
                                                            col_ok[None, :], no_pos, local, BLOCK_N)

    if SPLIT and IN_BATCH:  # the positive's tile may lie in any split: partial sums
        tl.store(W + 5 * n_split.to(tl.int64) * M + pid_s.to(tl.int64) * M + rows, pos, mask=row_ok)
    else:
        tl.store(POS + rows, pos, mask=row_ok & (pid_s == 0))
    if SPLIT:
        base = W + pid_s.to(tl.int64) * M + rows
        stride_k = n_split.to(tl.int64) * M
        tl.store(base, m_i, mask=row_ok)
        tl.store(base + stride_k, l_i, mask=row_ok)
        tl.store(base + 2 * stride_k, ps_i, mask=row_ok)
        tl.store(base + 3 * stride_k, best, mask=row_ok)
        tl.store(base + 4 * stride_k, best_pos, mask=row_ok)
    else:
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # every row has a column; guards masked rows
        tl.store(LSE + rows, m_i + tl.log(l_safe), mask=row_ok)
        tl.store(PS_SUM + rows, ps_i / l_safe, mask=row_ok)
        tl.store(TOP1 + rows, best_pos, mask=row_ok)


@triton.jit
def _grad_acc(acc, dots, scale, lse_r, a_r, use_r, col_ok, extra, b, H_BF16: tl.constexpr, PREC: tl.constexpr):
    """acc += (a_r·exp(s − lse_r) + extra) · b for one tile; rows with a = 0 add no exp term.
    s ≤ lse for every real entry; the clamp only keeps rounding from overflowing exp2."""
    s = dots * scale
    h = tl.where(col_ok[None, :] & use_r[:, None],
                 a_r[:, None] * tl.exp2(tl.minimum(s - lse_r[:, None], 0.0) * 1.4426950408889634), 0.0)
    h += extra
    if H_BF16:
        acc = tl.dot(h.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    else:
        acc = tl.dot(h.to(b.dtype), b, acc, input_precision=PREC)
    return acc


@triton.autotune(configs=_BWD_CONFIGS, key=["M_KEY", "C_KEY", "D"])
@triton.jit
def _cross_bwd_q_kernel(
    Q, stride_qm, stride_qd, K, stride_km, stride_kd, QU, stride_um, stride_ud,
    SCALE, LSE, GA, GB, M, N, NQ, D, OFF, M_KEY, C_KEY,
    G, stride_gs, stride_gm,               # ∂q: G[split, row, d] (stride_gs = 0: one split)
    GK, stride_gkm,                        # ∂k when not in_batch (WRITE_GK): rows i + OFF
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
    D_CHUNKS: tl.constexpr, IN_BATCH: tl.constexpr, HAS_QUEUE: tl.constexpr, WRITE_GK: tl.constexpr,
    CAST_F32: tl.constexpr, PREC: tl.constexpr, H_BF16: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1)
    pid_d = tl.program_id(2)
    n_split = tl.num_programs(1)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < M
    prow = rows + OFF
    scale = tl.load(SCALE).to(tl.float32)
    a_r = tl.load(GA + rows, mask=row_ok, other=0.0)
    b_r = tl.load(GB + rows, mask=row_ok, other=0.0)
    lse_r = tl.load(LSE + rows, mask=row_ok, other=0.0)
    use_r = a_r != 0.0
    # A row whose weight is 0 contributes no exp term: +inf makes its exp2 exactly 0.
    lse_r = tl.where(use_r, lse_r, float("inf"))

    d_out = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    dout_ok = d_out < D
    q = _load_rows(Q, stride_qm, stride_qd, rows, row_ok, D, BLOCK_M, BLOCK_D, D_CHUNKS, CAST_F32)

    if IN_BATCH:
        n_kt = tl.cdiv(N, BLOCK_N)
    else:
        n_kt = 0
    if HAS_QUEUE:
        n_qt = tl.cdiv(NQ, BLOCK_N)
    else:
        n_qt = 0
    n_tiles = n_kt + n_qt
    per_split = tl.cdiv(n_tiles, n_split)
    t_start = pid_s * per_split
    t_stop = tl.minimum(t_start + per_split, n_tiles)

    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
    local = tl.arange(0, BLOCK_N).to(tl.int64)
    if IN_BATCH:
        for t in range(t_start, tl.minimum(t_stop, n_kt)):
            cols = t * BLOCK_N + local
            col_ok = cols < N
            dots, b = _dot_tile(Q, stride_qm, stride_qd, rows, row_ok, K, stride_km, stride_kd, cols, col_ok,
                                q, D, BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, CAST_F32, PREC)
            if D_CHUNKS != 1:
                b = tl.load(K + cols[:, None] * stride_km + d_out[None, :] * stride_kd,
                            mask=col_ok[:, None] & dout_ok[None, :], other=0.0)
                if CAST_F32:
                    b = b.to(tl.float32)
            extra = tl.where(prow[:, None] == cols[None, :], b_r[:, None], 0.0)
            acc = _grad_acc(acc, dots, scale, lse_r, a_r, use_r, col_ok, extra, b, H_BF16, PREC)
    if HAS_QUEUE:
        for t in range(tl.maximum(t_start, n_kt), t_stop):
            cols = (t - n_kt) * BLOCK_N + local
            col_ok = cols < NQ
            dots, b = _dot_tile(Q, stride_qm, stride_qd, rows, row_ok, QU, stride_um, stride_ud, cols, col_ok,
                                q, D, BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, CAST_F32, PREC)
            if D_CHUNKS != 1:
                b = tl.load(QU + cols[:, None] * stride_um + d_out[None, :] * stride_ud,
                            mask=col_ok[:, None] & dout_ok[None, :], other=0.0)
                if CAST_F32:
                    b = b.to(tl.float32)
            acc = _grad_acc(acc, dots, scale, lse_r, a_r, use_r, col_ok, 0.0, b, H_BF16, PREC)

    if not IN_BATCH:
        # The positive column, row by row (split 0): G_i,pos = a_i P_i,pos + b_i on k_{i+off};
        # the same coefficient gives ∂k_{i+off} = scale·G_i,pos·q_i (each key row once).
        first_split = pid_s == 0
        s_pos = scale * _row_dot(Q, stride_qm, stride_qd, rows, K, stride_km, stride_kd, prow, row_ok, D,
                                 BLOCK_M, BLOCK_D, D_CHUNKS)
        coef = tl.where(use_r, a_r * tl.exp2(tl.minimum(s_pos - lse_r, 0.0) * 1.4426950408889634), 0.0) + b_r
        coef = tl.where(first_split & row_ok, coef, 0.0)
        out_ok = row_ok[:, None] & dout_ok[None, :]
        kp = tl.load(K + prow[:, None] * stride_km + d_out[None, :] * stride_kd, mask=out_ok, other=0.0)
        acc += coef[:, None] * kp.to(tl.float32)
        if WRITE_GK:
            qd = tl.load(Q + rows[:, None] * stride_qm + d_out[None, :] * stride_qd, mask=out_ok, other=0.0)
            gk = (scale * coef)[:, None] * qd.to(tl.float32)
            tl.store(GK + prow[:, None] * stride_gkm + d_out[None, :], gk.to(GK.dtype.element_ty),
                     mask=out_ok & first_split)

    acc = acc * scale
    out = G + pid_s.to(tl.int64) * stride_gs + rows[:, None] * stride_gm + d_out[None, :]
    tl.store(out, acc.to(G.dtype.element_ty), mask=row_ok[:, None] & dout_ok[None, :])


@triton.autotune(configs=_BWD_CONFIGS, key=["M_KEY", "C_KEY", "D"])
@triton.jit
def _cross_bwd_k_kernel(
    K, stride_km, stride_kd, Q, stride_qm, stride_qd,
    SCALE, LSE, GA, GB, N, M, D, OFF, M_KEY, C_KEY,
    G, stride_gs, stride_gm,               # ∂k: G[split, key row, d]
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
    D_CHUNKS: tl.constexpr, CAST_F32: tl.constexpr, PREC: tl.constexpr, H_BF16: tl.constexpr,
):
    """In-batch keys: rows are keys j, columns the queries i (the transposed tiles)."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1)
    pid_d = tl.program_id(2)
    n_split = tl.num_programs(1)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < N
    scale = tl.load(SCALE).to(tl.float32)
    d_out = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    dout_ok = d_out < D
    kr = _load_rows(K, stride_km, stride_kd, rows, row_ok, D, BLOCK_M, BLOCK_D, D_CHUNKS, CAST_F32)

    n_tiles = tl.cdiv(M, BLOCK_N)
    per_split = tl.cdiv(n_tiles, n_split)
    t_start = pid_s * per_split
    t_stop = tl.minimum(t_start + per_split, n_tiles)

    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
    local = tl.arange(0, BLOCK_N).to(tl.int64)
    for t in range(t_start, t_stop):
        cols = t * BLOCK_N + local
        col_ok = cols < M
        dots, b = _dot_tile(K, stride_km, stride_kd, rows, row_ok, Q, stride_qm, stride_qd, cols, col_ok,
                            kr, D, BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, CAST_F32, PREC)
        if D_CHUNKS != 1:
            b = tl.load(Q + cols[:, None] * stride_qm + d_out[None, :] * stride_qd,
                        mask=col_ok[:, None] & dout_ok[None, :], other=0.0)
            if CAST_F32:
                b = b.to(tl.float32)
        a_c = tl.load(GA + cols, mask=col_ok, other=0.0)
        b_c = tl.load(GB + cols, mask=col_ok, other=0.0)
        lse_c = tl.load(LSE + cols, mask=col_ok, other=0.0)
        use_c = a_c != 0.0
        lse_c = tl.where(use_c, lse_c, float("inf"))
        s = dots * scale
        h = tl.where(col_ok[None, :] & use_c[None, :],
                     a_c[None, :] * tl.exp2(tl.minimum(s - lse_c[None, :], 0.0) * 1.4426950408889634), 0.0)
        h += tl.where(col_ok[None, :] & (cols[None, :] + OFF == rows[:, None]), b_c[None, :], 0.0)
        if H_BF16:
            acc = tl.dot(h.to(tl.bfloat16), b.to(tl.bfloat16), acc)
        else:
            acc = tl.dot(h.to(b.dtype), b, acc, input_precision=PREC)

    acc = acc * scale
    out = G + pid_s.to(tl.int64) * stride_gs + rows[:, None] * stride_gm + d_out[None, :]
    tl.store(out, acc.to(G.dtype.element_ty), mask=row_ok[:, None] & dout_ok[None, :])


# --------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------
def _check(q, k, queue, scale, pos_offset):
    for name, x in (("q", q), ("k", k)):
        if x.dim() != 2:
            raise ValueError(f"fastntxent triton: {name} must be 2-D, got {x.dim()}-D")
    if q.dtype == torch.float64 or k.dtype == torch.float64:
        raise ValueError(
            "fastntxent triton kernels compute in fp32 and do not take float64 inputs; use "
            'backend="cpu" (CPU tensors) or backend="reference" for float64'
        )
    if q.dtype not in _DTYPES or k.dtype != q.dtype:
        raise ValueError(f"fastntxent triton: q and k must share one of float32, bfloat16, float16; "
                         f"got {q.dtype} and {k.dtype}")
    if q.shape[1] != k.shape[1] or q.shape[1] < 1:
        raise ValueError(f"fastntxent triton: q and k must have the same D >= 1, got {q.shape[1]} and {k.shape[1]}")
    if q.device.type not in ("cpu", "cuda"):
        raise ValueError(f"fastntxent triton: q must be a CUDA tensor, got {q.device}")
    if q.device.type == "cpu" and not _interpreting():
        raise ValueError(
            "fastntxent triton kernels on CPU tensors run only under the Triton interpreter "
            "(TRITON_INTERPRET=1 set before importing triton); use CUDA tensors"
        )
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


def _num_splits(rows: int, cols: int, device: torch.device) -> int:
    """Column splits so that the programs of the row blocks fill the SMs (flash-decoding): MoCo's
    few queries against a long queue need them. With rb 128-row blocks and S splits the run
    takes about ceil(rb·S / SMs) waves: pick S ≤ 64 minimising waves/S with a small charge per
    split for the merge; each split keeps at least 4 column tiles of 64."""
    if SPLITS is not None:
        return max(1, int(SPLITS))
    if device.type != "cuda":
        return 1
    n_sm = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    rb = triton.cdiv(rows, 128)
    if rb >= n_sm:
        return 1
    cap = max(1, min(64, cols // 256))
    return min(range(1, cap + 1), key=lambda S: triton.cdiv(rb * S, n_sm) / S * (1 + 0.03 * (S - 1)))


def _strides(x: Optional[torch.Tensor], dummy: torch.Tensor):
    return (x, x.stride(0), x.stride(1)) if x is not None else (dummy, 0, 0)


@torch.library.custom_op("fastntxent::cross_forward_triton", mutates_args=())
def _cross_forward_triton(
    q: torch.Tensor, k: torch.Tensor, queue: Optional[torch.Tensor], scale: torch.Tensor,
    pos_offset: int, in_batch: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(q, k, queue, scale, pos_offset)
    q, k, queue, sc = _prepare(q, k, queue, scale)
    M, D = q.shape
    N = k.shape[0]
    NQ = queue.shape[0] if queue is not None else 0
    f32 = dict(dtype=torch.float32, device=q.device)
    outs = [torch.empty(M, **f32) for _ in range(4)]
    if M == 0:
        return tuple(outs)
    n_cols = (N if in_batch else 0) + NQ
    block_d, d_chunks, _ = _d_blocks(D, q.dtype)
    splits = _num_splits(M, n_cols, q.device) if n_cols > 0 else 1
    dummy = outs[0]
    work = torch.empty((6, splits, M), **f32) if splits > 1 else dummy
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), splits)  # noqa: E731
    _cross_fwd_kernel[grid](
        q, q.stride(0), q.stride(1), k, k.stride(0), k.stride(1), *_strides(queue, q),
        sc, M, N, NQ, D, pos_offset, _m_key(M), _m_key(max(n_cols, 1)),
        *outs, work,
        BLOCK_D=block_d, D_CHUNKS=d_chunks, IN_BATCH=bool(in_batch), HAS_QUEUE=queue is not None,
        SPLIT=splits > 1, CAST_F32=_INTERPRET, PREC=_precision(q.dtype),
    )
    if splits == 1:
        return tuple(outs)
    # Merge the partial states of the splits (flash-decoding): O(splits·M).
    m, l, ps, best, best_pos, pos_part = work.unbind(0)
    m_max = m.max(0).values
    m_use = torch.where(torch.isinf(m_max), torch.zeros_like(m_max), m_max)
    w = torch.exp(m - m_use)  # exp(−inf) = 0 for splits without any column
    l_tot = (l * w).sum(0)
    ps_tot = (ps * w).sum(0)
    lse, pos, ps_sum, top1 = outs
    if in_batch:
        torch.sum(pos_part, 0, out=pos)
    torch.add(m_use, torch.log(l_tot), out=lse)
    torch.div(ps_tot, l_tot, out=ps_sum)
    first = best.argmax(0, keepdim=True)  # first split reaching the max: first column wins
    top1.copy_(best_pos.gather(0, first).squeeze(0))
    return tuple(outs)


@torch.library.custom_op("fastntxent::cross_backward_triton", mutates_args=())
def _cross_backward_triton(
    q: torch.Tensor, k: torch.Tensor, queue: Optional[torch.Tensor], scale: torch.Tensor,
    pos_offset: int, in_batch: bool, lse: torch.Tensor, grad_lse: torch.Tensor, grad_pos: torch.Tensor,
    need_grad_k: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check(q, k, queue, scale, pos_offset)
    q, k, queue, sc = _prepare(q, k, queue, scale)
    M, D = q.shape
    N = k.shape[0]
    NQ = queue.shape[0] if queue is not None else 0
    for name, t in (("lse", lse), ("grad_lse", grad_lse), ("grad_pos", grad_pos)):
        if t.dim() != 1 or t.shape[0] != M:
            raise ValueError(f"fastntxent triton: {name} must have shape (M,) = ({M},)")
    if M == 0:
        return (torch.zeros((M, D), dtype=q.dtype, device=q.device),
                torch.zeros((N, D), dtype=k.dtype, device=k.device))
    f32 = dict(dtype=torch.float32, device=q.device)
    lse = lse.detach().to(**f32).contiguous()
    a = grad_lse.detach().to(**f32).contiguous()
    b = grad_pos.detach().to(**f32).contiguous()
    block_d, d_chunks, block_do = _d_blocks(D, q.dtype)
    prec = _precision(q.dtype)
    h_bf16 = q.dtype == torch.float16 and not _INTERPRET
    # Under the interpreter every output is an fp32 buffer (its bf16/fp16 stores are not trusted).
    out_dtype = torch.float32 if _INTERPRET else None

    def buffer(rows, splits, dtype):
        if splits > 1 or _INTERPRET:
            g = torch.empty((splits, rows, D), **f32)
            return g, g.stride(0)
        return torch.empty((rows, D), dtype=dtype, device=q.device), 0

    def finish(g, dtype):
        return g.sum(0).to(dtype) if g.dim() == 3 else g  # fixed-order sum: deterministic

    # ∂q (and ∂k of the positives without in-batch keys).
    n_cols = (N if in_batch else 0) + NQ
    splits = _num_splits(M, n_cols, q.device) if n_cols > 0 else 1
    gq, stride_s = buffer(M, splits, q.dtype)
    write_gk = need_grad_k and not in_batch
    gk = torch.zeros((N, D), dtype=out_dtype or k.dtype, device=q.device) if write_gk else None
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), splits, triton.cdiv(D, block_do))  # noqa: E731
    _cross_bwd_q_kernel[grid](
        q, q.stride(0), q.stride(1), k, k.stride(0), k.stride(1), *_strides(queue, q),
        sc, lse, a, b, M, N, NQ, D, pos_offset, _m_key(M), _m_key(max(n_cols, 1)),
        gq, stride_s, D, gk if gk is not None else gq, D,
        BLOCK_D=block_d, BLOCK_DO=block_do, D_CHUNKS=d_chunks, IN_BATCH=bool(in_batch),
        HAS_QUEUE=queue is not None, WRITE_GK=write_gk, CAST_F32=_INTERPRET, PREC=prec, H_BF16=h_bf16,
    )
    grad_q = finish(gq, q.dtype)
    if not need_grad_k:
        return grad_q, torch.zeros((N, D), dtype=k.dtype, device=k.device)
    if not in_batch:
        return grad_q, gk.to(k.dtype)

    # ∂k: key row blocks over the query tiles, with the row lse of q.
    splits = _num_splits(N, M, q.device)
    gk, stride_s = buffer(N, splits, k.dtype)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), splits, triton.cdiv(D, block_do))  # noqa: E731
    _cross_bwd_k_kernel[grid](
        k, k.stride(0), k.stride(1), q, q.stride(0), q.stride(1),
        sc, lse, a, b, N, M, D, pos_offset, _m_key(N), _m_key(M),
        gk, stride_s, D,
        BLOCK_D=block_d, BLOCK_DO=block_do, D_CHUNKS=d_chunks, CAST_F32=_INTERPRET, PREC=prec, H_BF16=h_bf16,
    )
    return grad_q, finish(gk, k.dtype)


register_cross_ops("fastntxent::cross_forward_triton", "fastntxent::cross_backward_triton")

cross_forward = torch.ops.fastntxent.cross_forward_triton
cross_backward = torch.ops.fastntxent.cross_backward_triton
