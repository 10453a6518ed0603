"""Triton kernels of the self family's local-rows form (docs/distributed.md).

Pure Triton (see tiles.py), launched by self_local_similarity.py. Rows [ROW0, ROW0 + ROWS) of
the global batch U (M, D) against all M columns; the diagonal of local row r is column ROW0 + r;
labels are global (or i mod period of the global index).

Forward: the full batch's `self_fwd_kernel` (self_kernels.py) on the rows [ROW0, ROW0 + ROWS)
(its mask-free interior tiles, top-1 and Σ P·s only when asked for).

Backward: the gradient of every global row produced by the local rows only,
G_ij = a_i e^{s_ij − lse_i} + b_i [y_j = y_i] (i local, j ≠ i), in two kernels that each
recompute their tiles and write every output element from one program (no atomics):
- `self_bwd_row_side_kernel`: grad_R = G · U (local rows; programs per row block, column
  split, output D chunk);
- `self_bwd_col_side_kernel`: grad_C = Gᵀ · U_local (every global row; programs per column
  block and output D chunk, sweeping the local row tiles).
The launcher adds the row side into the local rows of the column side.
"""
import triton
import triton.language as tl

from .tiles import (BWD_CONFIGS, accumulate_hb, dot_tile, labels_of, load_out_tile, load_rows, out_columns,
                    prune_configs, row_block, row_weights, softmax_weight, split_range, store_grad)


@triton.jit
def local_weights(s, valid, same, a, b, lse, use, DECOUPLED: tl.constexpr):
    """G = a·e^{s − lse} + b·[same label] where `valid` (a, b, lse, use broadcast to s's shape;
    `use` = a ≠ 0, so that lse = −inf of a weightless row never makes a NaN; DECOUPLED: no
    softmax term at a positive)."""
    p_ok = valid & use
    if DECOUPLED:
        p_ok = p_ok & (same == 0)
    g = tl.where(p_ok, softmax_weight(a, s, lse), 0.0)
    return g + tl.where(valid & same, b, 0.0)


@triton.autotune(configs=BWD_CONFIGS, key=["M_KEY", "D", "PREC", "HAS_LABELS", "DECOUPLED"],
                 prune_configs_by={"early_config_prune": prune_configs})
@triton.jit
def self_bwd_row_side_kernel(
    U, stride_um, stride_ud, TAU, LAB, LSE, GA, GB, M, D, period, ROW0, ROWS, M_KEY,
    G, stride_gs, stride_gm,               # output: G[split, local row, d] (stride_gs = 0: one split)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr, D_CHUNKS: tl.constexpr, HAS_LABELS: tl.constexpr,
    CAST_F32: tl.constexpr, PREC: tl.constexpr, H_BF16: tl.constexpr, DECOUPLED: tl.constexpr,
):
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)

    local, row_ok = row_block(tl.program_id(0), ROWS, BLOCK_M)
    rows = ROW0 + local
    inv_tau = 1.0 / tl.load(TAU).to(tl.float32)
    lab_r = labels_of(LAB, rows, row_ok, period, -1, HAS_LABELS)
    a_r, b_r, lse_r, use_r = row_weights(GA, GB, LSE, local, row_ok)
    d_out, dout_ok = out_columns(tl.program_id(2), D, BLOCK_DO)
    q = load_rows(U, stride_um, stride_ud, rows, row_ok, D, BLOCK_M, BLOCK_D, D_CHUNKS, CAST_F32)

    t_start, t_stop = split_range(tl.cdiv(M, BLOCK_N), pid_s, n_split)
    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
    for t in range(t_start, t_stop):
        cols = t * BLOCK_N + offs_n
        col_ok = cols < M
        dots, k = dot_tile(U, stride_um, stride_ud, rows, row_ok, U, stride_um, stride_ud, cols, col_ok, q, D,
                           BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, CAST_F32, PREC)
        k = load_out_tile(U, stride_um, stride_ud, cols, col_ok, d_out, dout_ok, k, D_CHUNKS, CAST_F32)
        s = dots * inv_tau
        lab_c = labels_of(LAB, cols, col_ok, period, -2, HAS_LABELS)
        valid = col_ok[None, :] & (rows[:, None] != cols[None, :])
        h = local_weights(s, valid, lab_r[:, None] == lab_c[None, :], a_r[:, None], b_r[:, None], lse_r[:, None],
                          use_r[:, None], DECOUPLED)
        acc = accumulate_hb(acc, h, k, H_BF16, PREC)

    store_grad(G, pid_s, stride_gs, local, stride_gm, d_out, row_ok, dout_ok, acc * inv_tau)


# The column side sweeps BLOCK_N local rows per tile, whose row weights (a, b, lse, labels) it
# loads per tile: with 128 of them (64x128 on 8 warps) sm_90 spilled 4-100 B (triton 3.8, 16-bit).
COL_SIDE_CONFIGS = [c for c in BWD_CONFIGS if c.kwargs["BLOCK_N"] <= 64]


@triton.autotune(configs=COL_SIDE_CONFIGS, key=["M_KEY", "D", "PREC", "HAS_LABELS", "DECOUPLED"],
                 prune_configs_by={"early_config_prune": prune_configs})
@triton.jit
def self_bwd_col_side_kernel(
    U, stride_um, stride_ud, TAU, LAB, LSE, GA, GB, M, D, period, ROW0, ROWS, M_KEY,
    G, stride_gm,                          # output: G[global row, d]
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr, D_CHUNKS: tl.constexpr, HAS_LABELS: tl.constexpr,
    CAST_F32: tl.constexpr, PREC: tl.constexpr, H_BF16: tl.constexpr, DECOUPLED: tl.constexpr,
):
    # This program's BLOCK_M global rows are the columns j of G; it sweeps the local rows i.
    cols, col_ok = row_block(tl.program_id(0), M, BLOCK_M)
    inv_tau = 1.0 / tl.load(TAU).to(tl.float32)
    lab_c = labels_of(LAB, cols, col_ok, period, -1, HAS_LABELS)
    d_out, dout_ok = out_columns(tl.program_id(1), D, BLOCK_DO)
    q = load_rows(U, stride_um, stride_ud, cols, col_ok, D, BLOCK_M, BLOCK_D, D_CHUNKS, CAST_F32)

    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
    for t in range(0, tl.cdiv(ROWS, BLOCK_N)):
        local = t * BLOCK_N + offs_n
        local_ok = local < ROWS
        rows = ROW0 + local
        dots, k = dot_tile(U, stride_um, stride_ud, cols, col_ok, U, stride_um, stride_ud, rows, local_ok, q, D,
                           BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, CAST_F32, PREC)
        k = load_out_tile(U, stride_um, stride_ud, rows, local_ok, d_out, dout_ok, k, D_CHUNKS, CAST_F32)
        s = dots * inv_tau                                   # s[j, i] = s_ij (symmetric)
        lab_r = labels_of(LAB, rows, local_ok, period, -2, HAS_LABELS)
        a_r, b_r, lse_r, use_r = row_weights(GA, GB, LSE, local, local_ok)
        valid = local_ok[None, :] & (cols[:, None] != rows[None, :])
        h = local_weights(s, valid, lab_c[:, None] == lab_r[None, :], a_r[None, :], b_r[None, :], lse_r[None, :],
                          use_r[None, :], DECOUPLED)         # h[j, i] = G_ij
        acc = accumulate_hb(acc, h, k, H_BF16, PREC)

    store_grad(G, tl.program_id(0), 0, cols, stride_gm, d_out, col_ok, dout_ok, acc * inv_tau)  # no split stride
