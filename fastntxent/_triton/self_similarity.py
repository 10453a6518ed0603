"""Fused Triton kernels of the self-similarity family (SPEC §1): NT-Xent, multi-view, SupCon.

Operators (same schema as csrc/ops.cpp, registered with fake kernels and autograd through
`fastntxent._ops.register_self_ops`):

    fastntxent::self_forward_triton(u, temperature, labels, period)
        -> (lse, pos_sum, pos_count, ps_sum, top1)          each (M,) float32
    fastntxent::self_backward_triton(u, temperature, labels, period, lse, grad_lse, grad_pos)
        -> grad_u                                            (M, D) in u's dtype

Forward: one program per (row block, column split); it streams over its column tiles,
s = (u_R · u_Cᵀ)/τ by `tl.dot` (bf16/fp16 operands or fp32 as tf32/ieee, fp32 accumulation,
D looped in chunks when D > BLOCK_D), and keeps per row an online max-subtracted logsumexp
(exp2), Σ P·s rescaled with it, the positive sum and count, and the top-1 statistic
(strictly-greater max, first index wins). With one split the program writes the final
row statistics; with several (occupancy when M is small against the SM count) each writes
its partial state and a small O(splits·M) merge on the host combines them
(flash-decoding style).

Backward: one program per (row block, column split, output D chunk); it recomputes each tile
of s once, builds H_kj = G_kj + G_jk = a_k e^{s−lse_k} + a_j e^{s−lse_j} + (b_k + b_j)[y_j = y_k]
(j ≠ k; a term whose weight a is 0 is skipped, so lse = −inf never makes a NaN) and
accumulates grad_R += H · u_C in registers, times 1/τ, stored once — no atomics,
deterministic. Several splits write fp32 partials summed in a fixed order.

Precision of fp32 inputs: by default the products follow torch's own matmul setting
(`torch.set_float32_matmul_precision`: "highest", PyTorch's default, gives exact fp32 ("ieee");
"high"/"medium" give tf32 tensor cores, as `torch.matmul` would). `set_fp32_precision("tf32" |
"tf32x3" | "ieee")` or FASTNTXENT_TRITON_FP32_PRECISION fixes it; `set_fp32_precision(None)`
returns to following torch.
float64 inputs are refused with a ValueError: an fp32 kernel cannot meet fp64 accuracy; use
backend="cpu" or "reference".
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .._ops import register_self_ops

__all__ = ["self_forward", "self_backward", "set_fp32_precision", "get_fp32_precision"]

_PRECISIONS = ("tf32", "tf32x3", "ieee")
_fp32_precision: Optional[str] = os.environ.get("FASTNTXENT_TRITON_FP32_PRECISION", "").lower() or None
if _fp32_precision not in _PRECISIONS:
    _fp32_precision = None  # follow torch.get_float32_matmul_precision()

# Number of column splits: None picks from M and the SM count (1 under the interpreter);
# an int forces it (tests use this to exercise the split/merge path).
SPLITS: Optional[int] = None


def set_fp32_precision(precision: Optional[str]) -> None:
    """How fp32 inputs use the tensor cores: "tf32", "tf32x3", "ieee" (exact fp32), or None to
    follow torch.get_float32_matmul_precision() (the default)."""
    global _fp32_precision
    if precision is None:
        _fp32_precision = None
        return
    p = precision.lower()
    if p not in _PRECISIONS:
        raise ValueError(f"precision must be one of {_PRECISIONS} or None, got {precision!r}")
    _fp32_precision = p


def get_fp32_precision() -> str:
    """The precision fp32 products use now."""
    if _fp32_precision is not None:
        return _fp32_precision
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


_INTERPRET = _interpreting()

# Fixed block sizes under the interpreter (small, so that the tests cross block edges).
_INTERP_BLOCK_M = 32
_INTERP_BLOCK_N = 32
_INTERP_BLOCK_D = 64
# On the GPU: D up to this is held in one chunk (row block kept in registers / shared memory).
_MAX_SINGLE_D = {torch.bfloat16: 256, torch.float16: 256, torch.float32: 128}
_CHUNK_D = 64      # D chunk of the similarity products when D > _MAX_SINGLE_D
_CHUNK_DO = 128    # output D chunk of the backward when D > _MAX_SINGLE_D

if _INTERPRET:
    _FWD_CONFIGS = [triton.Config({"BLOCK_M": _INTERP_BLOCK_M, "BLOCK_N": _INTERP_BLOCK_N}, num_warps=4, num_stages=1)]
    _BWD_CONFIGS = list(_FWD_CONFIGS)
else:
    _FWD_CONFIGS = [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2),  # fits any GPU
    ]
    _BWD_CONFIGS = [
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=1),  # fits any GPU
    ]



# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------
@triton.jit
def _dot_tile(A, stride_am, stride_ad, rows, row_ok, B, stride_bm, stride_bd, cols, col_ok, a, D,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              D_CHUNKS: tl.constexpr, CAST_F32: tl.constexpr, PREC: tl.constexpr):
    """A[rows] · B[cols]ᵀ (BLOCK_M, BLOCK_N) in fp32. With one D chunk `a` holds A[rows] and
    the B tile is returned for reuse; otherwise D is looped over in chunks (`a` is only a
    dtype placeholder; returns the last B chunk, unused)."""
    offs_d = tl.arange(0, BLOCK_D)
    if D_CHUNKS == 1:
        b = tl.load(B + cols[:, None] * stride_bm + offs_d[None, :] * stride_bd,
                    mask=col_ok[:, None] & (offs_d < D)[None, :], other=0.0)
        if CAST_F32:
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), input_precision=PREC)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        b = tl.zeros((BLOCK_N, BLOCK_D), dtype=a.dtype)
        for c in range(D_CHUNKS):
            d = c * BLOCK_D + offs_d
            d_ok = d < D
            ac = tl.load(A + rows[:, None] * stride_am + d[None, :] * stride_ad,
                         mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            b = tl.load(B + cols[:, None] * stride_bm + d[None, :] * stride_bd,
                        mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            if CAST_F32:
                ac = ac.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(ac, tl.trans(b), acc, input_precision=PREC)
    return acc, b


@triton.jit
def _online_update(m_i, l_i, ps_i, best, best_pos, s, valid, is_pos, local, BLOCK_N: tl.constexpr):
    """One column tile of logits s (BLOCK_M, BLOCK_N) — entries where `valid` — into the running
    row state: max-subtracted logsumexp (exp2 domain), Σ P·s and top-1 (whether the first
    column reaching the row max is a positive; a later tile must beat it strictly)."""
    neg_inf = float("-inf")
    s_m = tl.where(valid, s, neg_inf)
    t_max = tl.max(s_m, 1)
    first = tl.min(tl.where(s_m == t_max[:, None], local[None, :], BLOCK_N), 1)
    t_pos = tl.max(tl.where(is_pos & (local[None, :] == first[:, None]), 1.0, 0.0), 1)
    better = t_max > best
    best_pos = tl.where(better, t_pos, best_pos)
    best = tl.where(better, t_max, best)
    m_new = tl.maximum(m_i, t_max)
    m_use = tl.where(m_new == neg_inf, 0.0, m_new)
    alpha = tl.exp2((m_i - m_use) * 1.4426950408889634)
    p = tl.exp2((s_m - m_use[:, None]) * 1.4426950408889634)  # masked entries: exp2(−inf) = 0
    l_i = l_i * alpha + tl.sum(p, 1)
    ps_i = ps_i * alpha + tl.sum(p * tl.where(valid, s, 0.0), 1)
    return m_new, l_i, ps_i, best, best_pos


@triton.jit
def _load_rows(A, stride_am, stride_ad, rows, row_ok, D,
               BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr, CAST_F32: tl.constexpr):
    """A[rows] (one D chunk) or a zero placeholder of the operand dtype (several chunks)."""
    offs_d = tl.arange(0, BLOCK_D)
    if D_CHUNKS == 1:
        a = tl.load(A + rows[:, None] * stride_am + offs_d[None, :] * stride_ad,
                    mask=row_ok[:, None] & (offs_d < D)[None, :], other=0.0)
        if CAST_F32:
            a = a.to(tl.float32)
    else:
        if CAST_F32:
            a = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        else:
            a = tl.zeros((BLOCK_M, BLOCK_D), dtype=A.dtype.element_ty)
    return a


@triton.jit
def _sim_tile(U, stride_um, stride_ud, rows, row_ok, cols, col_ok, q, D,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              D_CHUNKS: tl.constexpr, CAST_F32: tl.constexpr, PREC: tl.constexpr):
    """u_rows · u_colsᵀ: `_dot_tile` of U with itself."""
    return _dot_tile(U, stride_um, stride_ud, rows, row_ok, U, stride_um, stride_ud, cols, col_ok, q, D,
                     BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, CAST_F32, PREC)


@triton.autotune(configs=_FWD_CONFIGS, key=["M_KEY", "D"])
@triton.jit
def _self_fwd_kernel(
    U, stride_um, stride_ud, TAU, LAB, M, D, period, M_KEY,
    LSE, POS_SUM, POS_CNT, PS_SUM, TOP1,   # final outputs (one split)
    W,                                     # (7, splits, M) partial states (several splits)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    D_CHUNKS: tl.constexpr, HAS_LABELS: tl.constexpr, SPLIT: tl.constexpr,
    CAST_F32: tl.constexpr, PREC: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < M
    inv_tau = 1.0 / tl.load(TAU).to(tl.float32)
    if HAS_LABELS:
        lab_r = tl.load(LAB + rows, mask=row_ok, other=-1)
    else:
        lab_r = rows % period

    q = _load_rows(U, stride_um, stride_ud, rows, row_ok, D, BLOCK_M, BLOCK_D, D_CHUNKS, CAST_F32)

    n_tiles = tl.cdiv(M, BLOCK_N)
    per_split = tl.cdiv(n_tiles, n_split)
    t_start = pid_s * per_split
    t_stop = tl.minimum(t_start + per_split, n_tiles)

    neg_inf = float("-inf")
    m_i = tl.full((BLOCK_M,), neg_inf, dtype=tl.float32)   # running max of s
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)           # Σ exp(s − m)
    ps_i = tl.zeros((BLOCK_M,), dtype=tl.float32)          # Σ exp(s − m)·s
    pos_i = tl.zeros((BLOCK_M,), dtype=tl.float32)         # Σ_{positives} s
    cnt_i = tl.zeros((BLOCK_M,), dtype=tl.float32)         # |P(i)|
    best = tl.full((BLOCK_M,), neg_inf, dtype=tl.float32)  # max_{j≠i} s_ij so far
    best_pos = tl.zeros((BLOCK_M,), dtype=tl.float32)      # is that argmax a positive
    local = tl.arange(0, BLOCK_N)
    local64 = local.to(tl.int64)

    for t in range(t_start, t_stop):
        cols = t * BLOCK_N + local64
        col_ok = cols < M
        dots, _k = _sim_tile(U, stride_um, stride_ud, rows, row_ok, cols, col_ok, q, D,
                             BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, CAST_F32, PREC)
        s = dots * inv_tau
        valid = col_ok[None, :] & (rows[:, None] != cols[None, :])
        if HAS_LABELS:
            lab_c = tl.load(LAB + cols, mask=col_ok, other=-2)
        else:
            lab_c = cols % period
        pos = valid & (lab_r[:, None] == lab_c[None, :])

        m_i, l_i, ps_i, best, best_pos = _online_update(m_i, l_i, ps_i, best, best_pos, s, valid, pos,
                                                        local, BLOCK_N)
        pos_i += tl.sum(tl.where(pos, s, 0.0), 1)
        cnt_i += tl.sum(pos.to(tl.float32), 1)

    if SPLIT:
        base = W + pid_s.to(tl.int64) * M + rows
        stride_k = n_split.to(tl.int64) * M
        tl.store(base, m_i, mask=row_ok)
        tl.store(base + stride_k, l_i, mask=row_ok)
        tl.store(base + 2 * stride_k, ps_i, mask=row_ok)
        tl.store(base + 3 * stride_k, pos_i, mask=row_ok)
        tl.store(base + 4 * stride_k, cnt_i, mask=row_ok)
        tl.store(base + 5 * stride_k, best, mask=row_ok)
        tl.store(base + 6 * stride_k, best_pos, mask=row_ok)
    else:
        any_col = l_i > 0.0  # false only when M == 1
        l_safe = tl.where(any_col, l_i, 1.0)
        lse = tl.where(any_col, m_i + tl.log(l_safe), neg_inf)
        tl.store(LSE + rows, lse, mask=row_ok)
        tl.store(PS_SUM + rows, tl.where(any_col, ps_i / l_safe, 0.0), mask=row_ok)
        tl.store(POS_SUM + rows, pos_i, mask=row_ok)
        tl.store(POS_CNT + rows, cnt_i, mask=row_ok)
        tl.store(TOP1 + rows, best_pos, mask=row_ok)


@triton.autotune(configs=_BWD_CONFIGS, key=["M_KEY", "D"])
@triton.jit
def _self_bwd_kernel(
    U, stride_um, stride_ud, TAU, LAB, LSE, GA, GB, M, D, period, M_KEY,
    G, stride_gs, stride_gm,               # output: G[split, row, d] (stride_gs = 0: one split)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr, D_CHUNKS: tl.constexpr, HAS_LABELS: tl.constexpr,
    CAST_F32: tl.constexpr, PREC: tl.constexpr, H_BF16: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1)
    pid_d = tl.program_id(2)
    n_split = tl.num_programs(1)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < M
    inv_tau = 1.0 / tl.load(TAU).to(tl.float32)
    if HAS_LABELS:
        lab_r = tl.load(LAB + rows, mask=row_ok, other=-1)
    else:
        lab_r = rows % period
    a_r = tl.load(GA + rows, mask=row_ok, other=0.0)
    b_r = tl.load(GB + rows, mask=row_ok, other=0.0)
    lse_r = tl.load(LSE + rows, mask=row_ok, other=0.0)
    use_r = a_r != 0.0
    # A row whose weight is 0 contributes no term: +inf makes its exp2 exactly 0 (no 0·inf).
    lse_r = tl.where(use_r, lse_r, float("inf"))

    d_out = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    dout_ok = d_out < D
    q = _load_rows(U, stride_um, stride_ud, rows, row_ok, D, BLOCK_M, BLOCK_D, D_CHUNKS, CAST_F32)

    n_tiles = tl.cdiv(M, BLOCK_N)
    per_split = tl.cdiv(n_tiles, n_split)
    t_start = pid_s * per_split
    t_stop = tl.minimum(t_start + per_split, n_tiles)

    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
    local = tl.arange(0, BLOCK_N).to(tl.int64)
    for t in range(t_start, t_stop):
        cols = t * BLOCK_N + local
        col_ok = cols < M
        dots, k = _sim_tile(U, stride_um, stride_ud, rows, row_ok, cols, col_ok, q, D,
                            BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, CAST_F32, PREC)
        if D_CHUNKS != 1:
            k = tl.load(U + cols[:, None] * stride_um + d_out[None, :] * stride_ud,
                        mask=col_ok[:, None] & dout_ok[None, :], other=0.0)
            if CAST_F32:
                k = k.to(tl.float32)
        s = dots * inv_tau
        if HAS_LABELS:
            lab_c = tl.load(LAB + cols, mask=col_ok, other=-2)
        else:
            lab_c = cols % period
        a_c = tl.load(GA + cols, mask=col_ok, other=0.0)
        b_c = tl.load(GB + cols, mask=col_ok, other=0.0)
        lse_c = tl.load(LSE + cols, mask=col_ok, other=0.0)
        use_c = a_c != 0.0
        lse_c = tl.where(use_c, lse_c, float("inf"))
        valid = col_ok[None, :] & (rows[:, None] != cols[None, :])

        # H_kj = a_k P_kj + a_j P_jk + (b_k + b_j)[same label], j ≠ k. s ≤ lse for every
        # valid entry; the clamp only keeps the masked diagonal from overflowing exp2.
        h = tl.where(valid & use_r[:, None],
                     a_r[:, None] * tl.exp2(tl.minimum(s - lse_r[:, None], 0.0) * 1.4426950408889634), 0.0)
        h += tl.where(valid & use_c[None, :],
                      a_c[None, :] * tl.exp2(tl.minimum(s - lse_c[None, :], 0.0) * 1.4426950408889634), 0.0)
        h += tl.where(valid & (lab_r[:, None] == lab_c[None, :]), b_r[:, None] + b_c[None, :], 0.0)
        if H_BF16:
            acc = tl.dot(h.to(tl.bfloat16), k.to(tl.bfloat16), acc)
        else:
            acc = tl.dot(h.to(k.dtype), k, acc, input_precision=PREC)

    acc = acc * inv_tau
    out = G + pid_s.to(tl.int64) * stride_gs + rows[:, None] * stride_gm + d_out[None, :]
    tl.store(out, acc.to(G.dtype.element_ty), mask=row_ok[:, None] & dout_ok[None, :])


# --------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check(u: torch.Tensor, temperature: torch.Tensor, labels: Optional[torch.Tensor], period: int):
    if u.dim() != 2:
        raise ValueError(f"fastntxent triton: u must be 2-D (M, D), got {u.dim()}-D")
    if u.dtype == torch.float64:
        raise ValueError(
            "fastntxent triton kernels compute in fp32 and do not take float64 inputs; use "
            'backend="cpu" (CPU tensors) or backend="reference" for float64'
        )
    if u.dtype not in _DTYPES:
        raise ValueError(f"fastntxent triton: u must be float32, bfloat16 or float16, got {u.dtype}")
    if u.device.type == "cpu" and not _interpreting():
        raise ValueError(
            "fastntxent triton kernels on CPU tensors run only under the Triton interpreter "
            "(TRITON_INTERPRET=1 set before importing triton); use CUDA tensors"
        )
    if u.shape[1] < 1:
        raise ValueError("fastntxent triton: the embedding dimension D must be >= 1")
    if u.device.type not in ("cpu", "cuda"):
        raise ValueError(f"fastntxent triton: u must be a CUDA tensor, got {u.device}")
    if temperature.numel() != 1:
        raise ValueError("fastntxent triton: temperature must hold one value")
    if period < 1:
        raise ValueError(f"fastntxent triton: period must be >= 1, got {period}")
    if labels is not None:
        if labels.dim() != 1 or labels.shape[0] != u.shape[0]:
            raise ValueError(f"fastntxent triton: labels must have shape (M,) = ({u.shape[0]},)")
        if labels.dtype != torch.int64:
            raise ValueError("fastntxent triton: labels must be int64")


def _prepare(u, temperature, labels):
    tau = temperature.detach().reshape(()).to(device=u.device, dtype=torch.float32)
    lab = labels.detach().to(u.device).contiguous() if labels is not None else None
    return u.detach(), tau, lab


def _d_blocks(D: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_D, D_CHUNKS, BLOCK_DO) for the similarity products and the backward output."""
    if _INTERPRET:
        bd = min(_INTERP_BLOCK_D, max(16, triton.next_power_of_2(D)))
        chunks = triton.cdiv(D, bd)
        return bd, chunks, bd
    if D <= _MAX_SINGLE_D[dtype]:
        bd = max(16, triton.next_power_of_2(D))
        return bd, 1, bd
    return _CHUNK_D, triton.cdiv(D, _CHUNK_D), _CHUNK_DO


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_splits(u: torch.Tensor) -> int:
    """Column splits so that the programs of the row blocks fill the GPU's SMs (flash-decoding).

    With rb 128-row blocks and S splits each program does 1/S of a row block's work and the
    run takes about ceil(rb·S / SMs) waves: pick the S ≤ 16 minimising waves/S, with a small
    charge per split for the merge; each split keeps at least 4 column tiles of 64."""
    if SPLITS is not None:
        return max(1, int(SPLITS))
    if u.device.type != "cuda":
        return 1
    M = u.shape[0]
    n_sm = _sm_count(u.device.index if u.device.index is not None else torch.cuda.current_device())
    rb = triton.cdiv(M, 128)
    if rb >= n_sm:
        return 1
    cap = max(1, min(16, M // 256))
    return min(range(1, cap + 1), key=lambda S: triton.cdiv(rb * S, n_sm) / S * (1 + 0.03 * (S - 1)))


def _m_key(M: int) -> int:
    return triton.next_power_of_2(M)


def _precision(dtype: torch.dtype) -> str:
    return get_fp32_precision() if dtype == torch.float32 else "tf32"


@torch.library.custom_op("fastntxent::self_forward_triton", mutates_args=())
def _self_forward_triton(
    u: torch.Tensor, temperature: torch.Tensor, labels: Optional[torch.Tensor], period: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(u, temperature, labels, period)
    u, tau, lab = _prepare(u, temperature, labels)
    M, D = u.shape
    f32 = dict(dtype=torch.float32, device=u.device)
    outs = [torch.empty(M, **f32) for _ in range(5)]
    if M == 0:
        return tuple(outs)
    block_d, d_chunks, _ = _d_blocks(D, u.dtype)
    splits = _num_splits(u)
    dummy = outs[0]
    work = torch.empty((7, splits, M), **f32) if splits > 1 else dummy
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), splits)  # noqa: E731
    _self_fwd_kernel[grid](
        u, u.stride(0), u.stride(1), tau, lab if lab is not None else dummy, M, D, period, _m_key(M),
        *outs, work,
        BLOCK_D=block_d, D_CHUNKS=d_chunks, HAS_LABELS=lab is not None, SPLIT=splits > 1,
        CAST_F32=_INTERPRET, PREC=_precision(u.dtype),
    )
    if splits == 1:
        return tuple(outs)
    # Merge the partial states of the splits (flash-decoding): O(splits·M).
    m, l, ps, pos, cnt, best, best_pos = work.unbind(0)
    m_max = m.max(0).values
    m_use = torch.where(torch.isinf(m_max), torch.zeros_like(m_max), m_max)
    w = torch.exp(m - m_use)  # exp(−inf) = 0 for splits without any column
    l_tot = (l * w).sum(0)
    ps_tot = (ps * w).sum(0)
    has = l_tot > 0
    l_safe = torch.where(has, l_tot, torch.ones_like(l_tot))
    lse, pos_sum, pos_count, ps_sum, top1 = outs
    torch.where(has, m_use + torch.log(l_safe), torch.full_like(l_tot, float("-inf")), out=lse)
    torch.where(has, ps_tot / l_safe, torch.zeros_like(l_tot), out=ps_sum)
    torch.sum(pos, 0, out=pos_sum)
    torch.sum(cnt, 0, out=pos_count)
    first = best.argmax(0, keepdim=True)  # first split reaching the max: first column wins
    top1.copy_(best_pos.gather(0, first).squeeze(0))
    return tuple(outs)


@torch.library.custom_op("fastntxent::self_backward_triton", mutates_args=())
def _self_backward_triton(
    u: torch.Tensor, temperature: torch.Tensor, labels: Optional[torch.Tensor], period: int,
    lse: torch.Tensor, grad_lse: torch.Tensor, grad_pos: torch.Tensor,
) -> torch.Tensor:
    _check(u, temperature, labels, period)
    u, tau, lab = _prepare(u, temperature, labels)
    M, D = u.shape
    for name, t in (("lse", lse), ("grad_lse", grad_lse), ("grad_pos", grad_pos)):
        if t.dim() != 1 or t.shape[0] != M:
            raise ValueError(f"fastntxent triton: {name} must have shape (M,) = ({M},)")
    if M == 0:
        return torch.zeros((M, D), dtype=u.dtype, device=u.device)
    f32 = dict(dtype=torch.float32, device=u.device)
    lse = lse.detach().to(**f32).contiguous()
    a = grad_lse.detach().to(**f32).contiguous()
    b = grad_pos.detach().to(**f32).contiguous()
    block_d, d_chunks, block_do = _d_blocks(D, u.dtype)
    splits = _num_splits(u)
    # fp32 buffer with several splits (summed below) and under the interpreter (its bf16/fp16
    # stores are not trusted); otherwise the kernel writes u's dtype directly.
    if splits > 1 or _INTERPRET:
        out = torch.empty((splits, M, D), **f32)
        stride_s = out.stride(0)
    else:
        out = torch.empty((M, D), dtype=u.dtype, device=u.device)
        stride_s = 0
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), splits, triton.cdiv(D, block_do))  # noqa: E731
    _self_bwd_kernel[grid](
        u, u.stride(0), u.stride(1), tau, lab if lab is not None else a, lse, a, b, M, D, period,
        _m_key(M), out, stride_s, D,
        BLOCK_D=block_d, BLOCK_DO=block_do, D_CHUNKS=d_chunks, HAS_LABELS=lab is not None,
        CAST_F32=_INTERPRET, PREC=_precision(u.dtype),
        H_BF16=(u.dtype == torch.float16 and not _INTERPRET),
    )
    if out.dim() == 2:
        return out
    return out.sum(0).to(u.dtype)  # fixed-order sum over the splits: deterministic


register_self_ops("fastntxent::self_forward_triton", "fastntxent::self_backward_triton")

self_forward = torch.ops.fastntxent.self_forward_triton
self_backward = torch.ops.fastntxent.self_backward_triton
