"""Triton kernels of the self-similarity family (NT-Xent, multi-view, SupCon; docs/maths.md).

Pure Triton (see tiles.py): compiled ahead of time by .ci/compile_triton.py; launched by
self_similarity.py, which documents the operators.

Forward (`self_fwd_kernel`): one program per (row block, column split); it streams over its
column tiles, s = (u_R · u_Cᵀ)/τ, and keeps per row an online max-subtracted logsumexp
(exp2), Σ P·s rescaled with it, the positive sum and count, and the top-1 statistic
(strictly-greater max, first index wins). With one split it writes the final row statistics;
with several each writes its partial state to W (7, splits, M), merged on the host.

Backward (`self_bwd_kernel`): one program per (row block, column split, output D chunk); it
recomputes each tile of s, builds H_kj = a_k e^{s−lse_k} + a_j e^{s−lse_j} + (b_k + b_j)[y_j = y_k]
(j ≠ k; a term whose weight a is 0 is skipped, so lse = −inf never makes a NaN) and
accumulates grad_R += H · u_C in fp32 registers, times 1/τ, stored once: every output
element is written by exactly one program (no atomics, deterministic).
"""
import triton
import triton.language as tl

from .tiles import BWD_CONFIGS, FWD_CONFIGS, dot_tile, load_rows, online_update, split_range


@triton.jit
def sim_tile(U, stride_um, stride_ud, rows, row_ok, cols, col_ok, q, D,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              D_CHUNKS: tl.constexpr, CAST_F32: tl.constexpr, PREC: tl.constexpr):
    """u_rows · u_colsᵀ: `_dot_tile` of U with itself."""
    return dot_tile(U, stride_um, stride_ud, rows, row_ok, U, stride_um, stride_ud, cols, col_ok, q, D,
                     BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, CAST_F32, PREC)


@triton.autotune(configs=FWD_CONFIGS, key=["M_KEY", "D", "PREC", "HAS_LABELS", "SPLIT"])
@triton.jit
def self_fwd_kernel(
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

    q = load_rows(U, stride_um, stride_ud, rows, row_ok, D, BLOCK_M, BLOCK_D, D_CHUNKS, CAST_F32)

    t_start, t_stop = split_range(tl.cdiv(M, BLOCK_N), pid_s, n_split)

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
        dots, _k = sim_tile(U, stride_um, stride_ud, rows, row_ok, cols, col_ok, q, D,
                             BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, CAST_F32, PREC)
        s = dots * inv_tau
        valid = col_ok[None, :] & (rows[:, None] != cols[None, :])
        if HAS_LABELS:
            lab_c = tl.load(LAB + cols, mask=col_ok, other=-2)
        else:
            lab_c = cols % period
        pos = valid & (lab_r[:, None] == lab_c[None, :])

        m_i, l_i, ps_i, best, best_pos = online_update(m_i, l_i, ps_i, best, best_pos, s, valid, pos,
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


@triton.autotune(configs=BWD_CONFIGS, key=["M_KEY", "D", "PREC", "HAS_LABELS"])
@triton.jit
def self_bwd_kernel(
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
    q = load_rows(U, stride_um, stride_ud, rows, row_ok, D, BLOCK_M, BLOCK_D, D_CHUNKS, CAST_F32)

    t_start, t_stop = split_range(tl.cdiv(M, BLOCK_N), pid_s, n_split)

    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
    local = tl.arange(0, BLOCK_N).to(tl.int64)
    for t in range(t_start, t_stop):
        cols = t * BLOCK_N + local
        col_ok = cols < M
        dots, k = sim_tile(U, stride_um, stride_ud, rows, row_ok, cols, col_ok, q, D,
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
