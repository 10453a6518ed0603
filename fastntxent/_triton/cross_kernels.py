"""Triton kernels of the cross-similarity family (MoCo InfoNCE, CLIP; docs/maths.md).

Pure Triton (see tiles.py): compiled ahead of time by .ci/compile_triton.py; launched by
cross_similarity.py, which documents the operators.

Rows are the queries q (M, D); the columns of row i are every key k_j (N rows) when
`IN_BATCH`, else only the positive key k_{i+OFF}; then every queue entry (NQ rows).
Logits s_ic = scale · (q_i · c).

Forward (`cross_fwd_kernel`): one program per (row block, column split) over the key tiles
(in-batch) then the queue tiles: online logsumexp, Σ P·s, top-1. With in-batch keys the
positive logit is read from the tile holding it (the rounding of the lse terms, so lse ≥ pos);
without, it is an elementwise fp32 row dot and, as column 0, the starting state of split 0.

Backward, for L = Σ_i a_i·lse_i + b_i·pos_i, G_ic = a_i P_ic + b_i [c = positive of i]:
  `cross_bwd_q_kernel`  ∂L/∂q_i = scale · Σ_c G_ic c over the key and queue tiles; without
                        in-batch keys it also writes ∂L/∂k_{i+OFF} = scale·G_i,pos·q_i;
  `cross_bwd_k_kernel`  ∂L/∂k_j = scale · Σ_i G_ij q_i (in-batch), over the tiles of q.
Every output element is written by one program: no atomics, deterministic.
"""
import triton
import triton.language as tl

from .tiles import (BWD_CONFIGS, FWD_CONFIGS, prune_configs, accumulate_hb, cross_tile_counts, decoupled_tile, dot_tile,
                    load_out_tile, load_rows,
                    online_tile, out_columns, row_block, row_dot, row_weights, softmax_weight, split_range, store_grad,
                    col_tile_dot, sign_fold, tiles_cross)


@triton.autotune(configs=FWD_CONFIGS, key=["M_KEY", "C_KEY", "D", "PREC", "IN_BATCH", "HAS_QUEUE", "SPLIT",
                                           "NEED_TOP1", "NEED_PS", "DECOUPLED"],
                 prune_configs_by={"early_config_prune": prune_configs})
@triton.jit
def cross_fwd_kernel(
    Q, stride_qm, stride_qd, K, stride_km, stride_kd, QU, stride_um, stride_ud,
    SCALE, M, N, NQ, D, OFF, M_KEY, C_KEY,
    LSE, POS, PS_SUM, TOP1,                # final outputs (POS always; the rest with one split)
    W,                                     # (6, splits, M) partial states (several splits)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    D_CHUNKS: tl.constexpr, IN_BATCH: tl.constexpr, HAS_QUEUE: tl.constexpr, SPLIT: tl.constexpr,
    CAST_F32: tl.constexpr, PREC: tl.constexpr, NEED_TOP1: tl.constexpr, NEED_PS: tl.constexpr,
    DECOUPLED: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)

    rows, row_ok = row_block(pid_m, M, BLOCK_M)
    r0 = pid_m * BLOCK_M  # int32 (row and column counts stay below 2³¹)
    prow = rows + OFF  # the positive key of each row
    scale = tl.load(SCALE).to(tl.float32)
    q = load_rows(Q, stride_qm, stride_qd, rows, row_ok, D, BLOCK_M, BLOCK_D, D_CHUNKS, CAST_F32)
    n_kt, n_qt = cross_tile_counts(N, NQ, BLOCK_N, IN_BATCH, HAS_QUEUE)
    t_start, t_stop = split_range(n_kt + n_qt, pid_s, n_split)
    qs, sc, x_scale = sign_fold(q, scale, D_CHUNKS)  # logits = x·sc, sc ≥ 0

    # The positive logit: with in-batch keys taken from the one tile that holds it (the same
    # rounding as the logsumexp terms, so lse ≥ pos); else an fp32 row dot.
    pos = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if not IN_BATCH:
        pos = scale * row_dot(Q, stride_qm, stride_qd, rows, K, stride_km, stride_kd, prow, row_ok, D,
                               BLOCK_M, BLOCK_D, D_CHUNKS)
    neg_inf = float("-inf")
    m_i = tl.full((BLOCK_M,), neg_inf, dtype=tl.float32)   # running max of s
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)           # Σ exp(s − m)
    ps_i = tl.zeros((BLOCK_M,), dtype=tl.float32)          # Σ exp(s − m)·s (NEED_PS)
    best = tl.full((BLOCK_M,), neg_inf, dtype=tl.float32)  # largest logit so far (NEED_TOP1)
    best_pos = tl.zeros((BLOCK_M,), dtype=tl.float32)      # is that argmax the positive
    if not IN_BATCH:
        # The positive alone is column 0, ahead of the queue: split 0 starts from it.
        # (DECOUPLED: for top-1 only, out of the logsumexp)
        first_split = pid_s == 0
        if not DECOUPLED:
            m_i = tl.where(first_split, pos, m_i)
            l_i = tl.where(first_split, 1.0, l_i)
            ps_i = tl.where(first_split, pos, ps_i)
        best = tl.where(first_split, pos, best)
        best_pos = tl.where(first_split, 1.0, best_pos)

    local = tl.arange(0, BLOCK_N)  # int32 in-tile indices
    rloc = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    if IN_BATCH:
        if D_CHUNKS == 1:
            k_ptrs = K + local.to(tl.int64)[:, None] * stride_km + offs_d[None, :] * stride_kd
        for t in range(t_start, tl.minimum(t_stop, n_kt)):
            c0 = t * BLOCK_N
            if D_CHUNKS == 1:
                x = col_tile_dot(qs, k_ptrs, c0.to(tl.int64) * stride_km, N - c0, local, d_ok, CAST_F32, PREC)
            else:
                cols = c0.to(tl.int64) + local
                dots, _b = dot_tile(Q, stride_qm, stride_qd, rows, row_ok, K, stride_km, stride_kd, cols, cols < N,
                                     q, D, BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, CAST_F32, PREC)
                x = dots * x_scale
            x_max = tl.max(x, 1)  # (before the branch: see online_tile)
            # Masks only in the last key tile and in the tiles holding a positive (c = r + OFF).
            if (c0 + BLOCK_N > N) | tiles_cross(r0 + OFF, c0, BLOCK_M, BLOCK_N):
                valid = local[None, :] < N - c0
                is_pos = (c0 - r0 - OFF) + local[None, :] == rloc[:, None]
                pos += tl.sum(tl.where(is_pos, x, 0.0), 1) * sc
                if DECOUPLED:
                    m_i, l_i, ps_i, best, best_pos = decoupled_tile(m_i, l_i, ps_i, best, best_pos, x * sc, valid,
                                                                    is_pos, local, BLOCK_N, NEED_TOP1, NEED_PS)
                else:
                    m_i, l_i, ps_i, best, best_pos = online_tile(m_i, l_i, ps_i, best, best_pos, x, x_max, sc, valid,
                                                                    is_pos, local, BLOCK_N, True, True, NEED_TOP1, NEED_PS)
            else:
                m_i, l_i, ps_i, best, best_pos = online_tile(m_i, l_i, ps_i, best, best_pos, x, x_max, sc, x == x, x != x,
                                                                local, BLOCK_N, False, False, NEED_TOP1, NEED_PS)
    if HAS_QUEUE:
        if D_CHUNKS == 1:
            u_ptrs = QU + local.to(tl.int64)[:, None] * stride_um + offs_d[None, :] * stride_ud
        for t in range(tl.maximum(t_start, n_kt), t_stop):
            c0 = (t - n_kt) * BLOCK_N
            if D_CHUNKS == 1:
                x = col_tile_dot(qs, u_ptrs, c0.to(tl.int64) * stride_um, NQ - c0, local, d_ok, CAST_F32, PREC)
            else:
                cols = c0.to(tl.int64) + local
                dots, _b = dot_tile(Q, stride_qm, stride_qd, rows, row_ok, QU, stride_um, stride_ud, cols, cols < NQ,
                                     q, D, BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, CAST_F32, PREC)
                x = dots * x_scale
            x_max = tl.max(x, 1)  # (before the branch: see online_tile)
            if c0 + BLOCK_N > NQ:  # the last queue tile: columns ≥ NQ masked
                m_i, l_i, ps_i, best, best_pos = online_tile(m_i, l_i, ps_i, best, best_pos, x, x_max, sc,
                                                                local[None, :] < NQ - c0, x != x, local, BLOCK_N,
                                                                True, False, NEED_TOP1, NEED_PS)
            else:
                m_i, l_i, ps_i, best, best_pos = online_tile(m_i, l_i, ps_i, best, best_pos, x, x_max, sc, x == x, x != x,
                                                                local, BLOCK_N, False, False, NEED_TOP1, NEED_PS)

    if SPLIT and IN_BATCH:  # the positive's tile may lie in any split: partial sums
        tl.store(W + 5 * n_split.to(tl.int64) * M + pid_s.to(tl.int64) * M + rows, pos, mask=row_ok)
    else:
        tl.store(POS + rows, pos, mask=row_ok & (pid_s == 0))
    if SPLIT:
        base = W + pid_s.to(tl.int64) * M + rows
        stride_k = n_split.to(tl.int64) * M
        tl.store(base, m_i, mask=row_ok)
        tl.store(base + stride_k, l_i, mask=row_ok)
        if NEED_PS:
            tl.store(base + 2 * stride_k, ps_i, mask=row_ok)
        if NEED_TOP1:
            tl.store(base + 3 * stride_k, best, mask=row_ok)
            tl.store(base + 4 * stride_k, best_pos, mask=row_ok)
    else:
        any_col = l_i > 0.0  # false for masked rows, and decoupled rows without a negative
        l_safe = tl.where(any_col, l_i, 1.0)
        tl.store(LSE + rows, tl.where(any_col, m_i + tl.log(l_safe), neg_inf), mask=row_ok)
        if NEED_PS:
            tl.store(PS_SUM + rows, ps_i / l_safe, mask=row_ok)
        if NEED_TOP1:
            tl.store(TOP1 + rows, best_pos, mask=row_ok)


@triton.jit
def grad_acc(acc, dots, scale, lse_r, a_r, use_r, p_ok, extra, b, H_BF16: tl.constexpr, PREC: tl.constexpr):
    """acc += (a_r·exp(s − lse_r) + extra) · b for one tile, the exp term where `p_ok` (the valid
    columns; decoupled, not the positive); rows with a = 0 add none. s ≤ lse for every real
    entry; the clamp only keeps rounding from overflowing exp2."""
    h = tl.where(p_ok & use_r[:, None], softmax_weight(a_r[:, None], dots * scale, lse_r[:, None]), 0.0)
    return accumulate_hb(acc, h + extra, b, H_BF16, PREC)


@triton.autotune(configs=BWD_CONFIGS, key=["M_KEY", "C_KEY", "D", "PREC", "IN_BATCH", "HAS_QUEUE", "DECOUPLED"],
                 prune_configs_by={"early_config_prune": prune_configs})
@triton.jit
def cross_bwd_q_kernel(
    Q, stride_qm, stride_qd, K, stride_km, stride_kd, QU, stride_um, stride_ud,
    SCALE, LSE, GA, GB, M, N, NQ, D, OFF, M_KEY, C_KEY,
    G, stride_gs, stride_gm,               # ∂q: G[split, row, d] (stride_gs = 0: one split)
    GK, stride_gkm,                        # ∂k when not in_batch (WRITE_GK): rows i + OFF
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
    D_CHUNKS: tl.constexpr, IN_BATCH: tl.constexpr, HAS_QUEUE: tl.constexpr, WRITE_GK: tl.constexpr,
    CAST_F32: tl.constexpr, PREC: tl.constexpr, H_BF16: tl.constexpr, DECOUPLED: tl.constexpr,
):
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)

    rows, row_ok = row_block(tl.program_id(0), M, BLOCK_M)
    prow = rows + OFF
    scale = tl.load(SCALE).to(tl.float32)
    a_r, b_r, lse_r, use_r = row_weights(GA, GB, LSE, rows, row_ok)
    d_out, dout_ok = out_columns(tl.program_id(2), D, BLOCK_DO)
    if IN_BATCH:
        acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
    else:
        # The positive column, row by row (split 0): G_i,pos = a_i P_i,pos + b_i on k_{i+off};
        # the same coefficient gives ∂k_{i+off} = scale·G_i,pos·q_i (each key row once). Taken
        # before the sweep and before the row block loads: its key and query tiles are not live
        # beside the accumulator and the row block (after the sweep they spilled 76-332 B, tf32).
        first_split = pid_s == 0
        s_pos = scale * row_dot(Q, stride_qm, stride_qd, rows, K, stride_km, stride_kd, prow, row_ok, D,
                                 BLOCK_M, BLOCK_D, D_CHUNKS)
        if DECOUPLED:  # the positive is not in the softmax
            coef = b_r
        else:
            coef = tl.where(use_r, softmax_weight(a_r, s_pos, lse_r), 0.0) + b_r
        coef = tl.where(first_split & row_ok, coef, 0.0)
        out_ok = row_ok[:, None] & dout_ok[None, :]
        kp = tl.load(K + prow[:, None] * stride_km + d_out[None, :] * stride_kd, mask=out_ok, other=0.0)
        acc = coef[:, None] * kp.to(tl.float32)
        if WRITE_GK:
            qd = tl.load(Q + rows[:, None] * stride_qm + d_out[None, :] * stride_qd, mask=out_ok, other=0.0)
            gk = (scale * coef)[:, None] * qd.to(tl.float32)
            tl.store(GK + prow[:, None] * stride_gkm + d_out[None, :], gk.to(GK.dtype.element_ty),
                     mask=out_ok & first_split)

    q = load_rows(Q, stride_qm, stride_qd, rows, row_ok, D, BLOCK_M, BLOCK_D, D_CHUNKS, CAST_F32)
    n_kt, n_qt = cross_tile_counts(N, NQ, BLOCK_N, IN_BATCH, HAS_QUEUE)
    t_start, t_stop = split_range(n_kt + n_qt, pid_s, n_split)

    local = tl.arange(0, BLOCK_N).to(tl.int64)
    if IN_BATCH:
        for t in range(t_start, tl.minimum(t_stop, n_kt)):
            cols = t * BLOCK_N + local
            col_ok = cols < N
            dots, b = dot_tile(Q, stride_qm, stride_qd, rows, row_ok, K, stride_km, stride_kd, cols, col_ok,
                                q, D, BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, CAST_F32, PREC)
            b = load_out_tile(K, stride_km, stride_kd, cols, col_ok, d_out, dout_ok, b, D_CHUNKS, CAST_F32)
            is_pos = prow[:, None] == cols[None, :]
            extra = tl.where(is_pos, b_r[:, None], 0.0)
            p_ok = col_ok[None, :]
            if DECOUPLED:
                p_ok = p_ok & (is_pos == 0)
            acc = grad_acc(acc, dots, scale, lse_r, a_r, use_r, p_ok, extra, b, H_BF16, PREC)
    if HAS_QUEUE:
        for t in range(tl.maximum(t_start, n_kt), t_stop):
            cols = (t - n_kt) * BLOCK_N + local
            col_ok = cols < NQ
            dots, b = dot_tile(Q, stride_qm, stride_qd, rows, row_ok, QU, stride_um, stride_ud, cols, col_ok,
                                q, D, BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, CAST_F32, PREC)
            b = load_out_tile(QU, stride_um, stride_ud, cols, col_ok, d_out, dout_ok, b, D_CHUNKS, CAST_F32)
            acc = grad_acc(acc, dots, scale, lse_r, a_r, use_r, col_ok[None, :], 0.0, b, H_BF16, PREC)

    store_grad(G, pid_s, stride_gs, rows, stride_gm, d_out, row_ok, dout_ok, acc * scale)


@triton.autotune(configs=BWD_CONFIGS, key=["M_KEY", "C_KEY", "D", "PREC", "DECOUPLED"],
                 prune_configs_by={"early_config_prune": prune_configs})
@triton.jit
def cross_bwd_k_kernel(
    K, stride_km, stride_kd, Q, stride_qm, stride_qd,
    SCALE, LSE, GA, GB, N, M, D, OFF, M_KEY, C_KEY,
    G, stride_gs, stride_gm,               # ∂k: G[split, key row, d]
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
    D_CHUNKS: tl.constexpr, CAST_F32: tl.constexpr, PREC: tl.constexpr, H_BF16: tl.constexpr,
    DECOUPLED: tl.constexpr,
):
    """In-batch keys: rows are keys j, columns the queries i (the transposed tiles)."""
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)

    rows, row_ok = row_block(tl.program_id(0), N, BLOCK_M)
    scale = tl.load(SCALE).to(tl.float32)
    d_out, dout_ok = out_columns(tl.program_id(2), D, BLOCK_DO)
    kr = load_rows(K, stride_km, stride_kd, rows, row_ok, D, BLOCK_M, BLOCK_D, D_CHUNKS, CAST_F32)

    t_start, t_stop = split_range(tl.cdiv(M, BLOCK_N), pid_s, n_split)

    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
    local = tl.arange(0, BLOCK_N).to(tl.int64)
    for t in range(t_start, t_stop):
        cols = t * BLOCK_N + local
        col_ok = cols < M
        dots, b = dot_tile(K, stride_km, stride_kd, rows, row_ok, Q, stride_qm, stride_qd, cols, col_ok,
                            kr, D, BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, CAST_F32, PREC)
        b = load_out_tile(Q, stride_qm, stride_qd, cols, col_ok, d_out, dout_ok, b, D_CHUNKS, CAST_F32)
        a_c, b_c, lse_c, use_c = row_weights(GA, GB, LSE, cols, col_ok)
        is_pos = cols[None, :] + OFF == rows[:, None]
        p_ok = col_ok[None, :] & use_c[None, :]
        if DECOUPLED:
            p_ok = p_ok & (is_pos == 0)
        h = tl.where(p_ok, softmax_weight(a_c[None, :], dots * scale, lse_c[None, :]), 0.0)
        h += tl.where(col_ok[None, :] & is_pos, b_c[None, :], 0.0)
        acc = accumulate_hb(acc, h, b, H_BF16, PREC)

    store_grad(G, pid_s, stride_gs, rows, stride_gm, d_out, row_ok, dout_ok, acc * scale)
