"""Triton kernels of the self-similarity family (NT-Xent, multi-view, SupCon; docs/maths.md).

Pure Triton (see tiles.py): compiled ahead of time by .ci/compile_triton.py; launched by
self_similarity.py, which documents the operators.

Forward (`self_fwd_kernel`): one program per (row block, column split) of the rows
[ROW0, ROW0 + ROWS) — every row (ROW0 = 0, ROWS = M), or with LOCAL_ROWS a rank's local rows of the global
batch (self_local_similarity.py: the diagonal of local row r is column ROW0 + r, labels global);
it streams over its column tiles, s = (u_R · u_Cᵀ)/τ, and keeps per row an online
max-subtracted logsumexp (exp2), Σ P·s rescaled with it, the positive sum and count, and the
top-1 statistic (strictly-greater max, first index wins). With one split it writes the final
row statistics (index r − ROW0); with several each writes its partial state to
W (7, splits, ROWS), merged on the host.

Backward (`self_bwd_kernel`): one program per (row block, column split, output D chunk); it
recomputes each tile of s, builds H_kj = a_k e^{s−lse_k} + a_j e^{s−lse_j} + (b_k + b_j)[y_j = y_k]
(j ≠ k; a term whose weight a is 0 is skipped, so lse = −inf never makes a NaN; DECOUPLED: no
softmax terms at positives, whose logsumexp left them out) and
accumulates grad_R += H · u_C in fp32 registers, times 1/τ, stored once: every output
element is written by exactly one program (no atomics, deterministic).
"""
import triton
import triton.language as tl

from .tiles import (BWD_CONFIGS, FWD_CONFIGS, prune_configs, accumulate_hb, decoupled_tile, dot_tile, labels_of, load_out_tile,
                    load_rows, online_tile,
                    out_columns, row_block, row_weights, softmax_weight, split_range, store_grad,
                    col_tile_dot, next_phase, periodic_phase, sign_fold, tiles_cross)


@triton.jit
def sim_tile(U, stride_um, stride_ud, rows, row_ok, cols, col_ok, q, D,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              D_CHUNKS: tl.constexpr, CAST_F32: tl.constexpr, PREC: tl.constexpr):
    """u_rows · u_colsᵀ: `_dot_tile` of U with itself."""
    return dot_tile(U, stride_um, stride_ud, rows, row_ok, U, stride_um, stride_ud, cols, col_ok, q, D,
                     BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, CAST_F32, PREC)


@triton.autotune(configs=FWD_CONFIGS, key=["M_KEY", "D", "PREC", "HAS_LABELS", "SPLIT", "NEED_TOP1", "NEED_PS",
                                           "DECOUPLED", "LOCAL_ROWS"],
                 prune_configs_by={"early_config_prune": prune_configs})
@triton.jit
def self_fwd_kernel(
    U, stride_um, stride_ud, TAU, LAB, M, D, period, ROW0, ROWS, M_KEY,
    LSE, POS_SUM, POS_CNT, PS_SUM, TOP1,   # final outputs (ROWS,) (one split)
    W,                                     # (7, splits, ROWS) partial states (several splits)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    D_CHUNKS: tl.constexpr, HAS_LABELS: tl.constexpr, SPLIT: tl.constexpr,
    CAST_F32: tl.constexpr, PREC: tl.constexpr, NEED_TOP1: tl.constexpr, NEED_PS: tl.constexpr,
    DECOUPLED: tl.constexpr, LOCAL_ROWS: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)

    out_rows, row_ok = row_block(pid_m, ROWS, BLOCK_M)  # output index r − ROW0
    # int32 r0: row and column counts stay below 2³¹ (the launcher's grid check). The full batch
    # (LOCAL_ROWS false) compiles without the offset: one int64 row vector fewer, which under
    # triton 3.6 made 128x64 w8 spill 24 B (sm_80).
    if LOCAL_ROWS:
        rows = ROW0 + out_rows                            # global row indices (int64)
        r0 = ROW0 + pid_m * BLOCK_M
    else:
        rows = out_rows
        r0 = pid_m * BLOCK_M
    scale = 1.0 / tl.load(TAU).to(tl.float32)
    lab_r = labels_of(LAB, rows, row_ok, period, -1, HAS_LABELS)

    q = load_rows(U, stride_um, stride_ud, rows, row_ok, D, BLOCK_M, BLOCK_D, D_CHUNKS, CAST_F32)
    q, sc, x_scale = sign_fold(q, scale, D_CHUNKS)  # logits = x·sc, sc ≥ 0

    t_start, t_stop = split_range(tl.cdiv(M, BLOCK_N), pid_s, n_split)

    neg_inf = float("-inf")
    m_i = tl.full((BLOCK_M,), neg_inf, dtype=tl.float32)   # running max of s
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)           # Σ exp(s − m)
    ps_i = tl.zeros((BLOCK_M,), dtype=tl.float32)          # Σ exp(s − m)·s (NEED_PS)
    pos_i = tl.zeros((BLOCK_M,), dtype=tl.float32)         # Σ_{positives} s
    cnt_i = tl.zeros((BLOCK_M,), dtype=tl.float32)         # |P(i)|
    best = tl.full((BLOCK_M,), neg_inf, dtype=tl.float32)  # max_{j≠i} s_ij so far (NEED_TOP1)
    best_pos = tl.zeros((BLOCK_M,), dtype=tl.float32)      # is that argmax a positive
    local = tl.arange(0, BLOCK_N)                          # int32 in-tile indices
    rloc = tl.arange(0, BLOCK_M)
    # Without labels the tiles holding a positive (c ≡ r mod period, the diagonal included)
    # are tracked by a phase, one division per program (periodic_phase).
    span = BLOCK_M + BLOCK_N - 2
    phase = periodic_phase(r0, t_start * BLOCK_N, period, BLOCK_M)
    every_tile = period <= span + 1
    if D_CHUNKS == 1:
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        b_ptrs = U + local.to(tl.int64)[:, None] * stride_um + offs_d[None, :] * stride_ud

    for t in range(t_start, t_stop):
        c0 = t * BLOCK_N
        cols = c0.to(tl.int64) + local
        col_ok = cols < M
        if D_CHUNKS == 1:
            x = col_tile_dot(q, b_ptrs, c0.to(tl.int64) * stride_um, M - c0, local, d_ok, CAST_F32, PREC)
        else:
            dots, _k = sim_tile(U, stride_um, stride_ud, rows, row_ok, cols, col_ok, q, D,
                                 BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, CAST_F32, PREC)
            x = dots * x_scale
        x_max = tl.max(x, 1)  # (before the branch: see online_tile)
        # Masks only where they can change something: the last column tile (columns ≥ M),
        # the tiles crossing the diagonal and, without labels, the tiles holding a positive
        # (c ≡ r mod period). Interior tiles take the mask-free branch.
        if HAS_LABELS:
            special = (c0 + BLOCK_N > M) | tiles_cross(r0, c0, BLOCK_M, BLOCK_N)
        else:
            special = (c0 + BLOCK_N > M) | every_tile | (phase <= span)
            phase = next_phase(phase, period, BLOCK_N)
        if DECOUPLED:  # (DCL) every tile masked: the positives leave the logsumexp
            valid = (local[None, :] < M - c0) & ((c0 - r0) + local[None, :] != rloc[:, None])
            lab_c = labels_of(LAB, cols, col_ok, period, -2, HAS_LABELS)
            pos = valid & (lab_r[:, None] == lab_c[None, :])
            m_i, l_i, ps_i, best, best_pos = decoupled_tile(m_i, l_i, ps_i, best, best_pos, x * sc, valid, pos, local,
                                                            BLOCK_N, NEED_TOP1, NEED_PS)
            pos_i += tl.sum(tl.where(pos, x, 0.0), 1) * sc
            cnt_i += tl.sum(pos.to(tl.float32), 1)
        elif special:
            valid = (local[None, :] < M - c0) & ((c0 - r0) + local[None, :] != rloc[:, None])  # c < M, c ≠ r
            lab_c = labels_of(LAB, cols, col_ok, period, -2, HAS_LABELS)  # (implicit: c mod period, per column)
            pos = valid & (lab_r[:, None] == lab_c[None, :])
            m_i, l_i, ps_i, best, best_pos = online_tile(m_i, l_i, ps_i, best, best_pos, x, x_max, sc, valid, pos, local,
                                                            BLOCK_N, True, True, NEED_TOP1, NEED_PS)
            pos_i += tl.sum(tl.where(pos, x, 0.0), 1) * sc
            cnt_i += tl.sum(pos.to(tl.float32), 1)
        else:
            if HAS_LABELS:
                lab_c = labels_of(LAB, cols, col_ok, period, -2, HAS_LABELS)
                pos = lab_r[:, None] == lab_c[None, :]
                pos_i += tl.sum(tl.where(pos, x, 0.0), 1) * sc
                cnt_i += tl.sum(pos.to(tl.float32), 1)
            else:
                pos = x != x  # no positive in this tile (not read)
            m_i, l_i, ps_i, best, best_pos = online_tile(m_i, l_i, ps_i, best, best_pos, x, x_max, sc, x == x, pos, local,
                                                            BLOCK_N, False, HAS_LABELS, NEED_TOP1, NEED_PS)

    if SPLIT:
        base = W + pid_s.to(tl.int64) * ROWS + out_rows
        stride_k = n_split.to(tl.int64) * ROWS
        tl.store(base, m_i, mask=row_ok)
        tl.store(base + stride_k, l_i, mask=row_ok)
        if NEED_PS:
            tl.store(base + 2 * stride_k, ps_i, mask=row_ok)
        tl.store(base + 3 * stride_k, pos_i, mask=row_ok)
        tl.store(base + 4 * stride_k, cnt_i, mask=row_ok)
        if NEED_TOP1:
            tl.store(base + 5 * stride_k, best, mask=row_ok)
            tl.store(base + 6 * stride_k, best_pos, mask=row_ok)
    else:
        any_col = l_i > 0.0  # false only when M == 1
        l_safe = tl.where(any_col, l_i, 1.0)
        lse = tl.where(any_col, m_i + tl.log(l_safe), neg_inf)
        tl.store(LSE + out_rows, lse, mask=row_ok)
        if NEED_PS:
            tl.store(PS_SUM + out_rows, tl.where(any_col, ps_i / l_safe, 0.0), mask=row_ok)
        tl.store(POS_SUM + out_rows, pos_i, mask=row_ok)
        tl.store(POS_CNT + out_rows, cnt_i, mask=row_ok)
        if NEED_TOP1:
            tl.store(TOP1 + out_rows, best_pos, mask=row_ok)


@triton.autotune(configs=BWD_CONFIGS, key=["M_KEY", "D", "PREC", "HAS_LABELS", "DECOUPLED"],
                 prune_configs_by={"early_config_prune": prune_configs})
@triton.jit
def self_bwd_kernel(
    U, stride_um, stride_ud, TAU, LAB, LSE, GA, GB, M, D, period, M_KEY,
    G, stride_gs, stride_gm,               # output: G[split, row, d] (stride_gs = 0: one split)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr, D_CHUNKS: tl.constexpr, HAS_LABELS: tl.constexpr,
    CAST_F32: tl.constexpr, PREC: tl.constexpr, H_BF16: tl.constexpr, DECOUPLED: tl.constexpr,
):
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)

    rows, row_ok = row_block(tl.program_id(0), M, BLOCK_M)
    inv_tau = 1.0 / tl.load(TAU).to(tl.float32)
    lab_r = labels_of(LAB, rows, row_ok, period, -1, HAS_LABELS)
    a_r, b_r, lse_r, use_r = row_weights(GA, GB, LSE, rows, row_ok)
    d_out, dout_ok = out_columns(tl.program_id(2), D, BLOCK_DO)
    q = load_rows(U, stride_um, stride_ud, rows, row_ok, D, BLOCK_M, BLOCK_D, D_CHUNKS, CAST_F32)

    t_start, t_stop = split_range(tl.cdiv(M, BLOCK_N), pid_s, n_split)

    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
    local = tl.arange(0, BLOCK_N).to(tl.int64)
    for t in range(t_start, t_stop):
        cols = t * BLOCK_N + local
        col_ok = cols < M
        dots, k = sim_tile(U, stride_um, stride_ud, rows, row_ok, cols, col_ok, q, D,
                            BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, CAST_F32, PREC)
        k = load_out_tile(U, stride_um, stride_ud, cols, col_ok, d_out, dout_ok, k, D_CHUNKS, CAST_F32)
        s = dots * inv_tau
        lab_c = labels_of(LAB, cols, col_ok, period, -2, HAS_LABELS)
        a_c, b_c, lse_c, use_c = row_weights(GA, GB, LSE, cols, col_ok)
        valid = col_ok[None, :] & (rows[:, None] != cols[None, :])

        # H_kj = a_k P_kj + a_j P_jk + (b_k + b_j)[same label], j ≠ k (DCL: no P at positives).
        same = valid & (lab_r[:, None] == lab_c[None, :])
        if DECOUPLED:
            p_ok = valid & (same == 0)
        else:
            p_ok = valid
        h = tl.where(p_ok & use_r[:, None], softmax_weight(a_r[:, None], s, lse_r[:, None]), 0.0)
        h += tl.where(p_ok & use_c[None, :], softmax_weight(a_c[None, :], s, lse_c[None, :]), 0.0)
        h += tl.where(same, b_r[:, None] + b_c[None, :], 0.0)
        acc = accumulate_hb(acc, h, k, H_BF16, PREC)

    store_grad(G, pid_s, stride_gs, rows, stride_gm, d_out, row_ok, dout_ok, acc * inv_tau)
