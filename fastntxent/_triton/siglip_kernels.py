"""Triton kernels of SigLIP's pairwise sigmoid loss (docs/maths.md §7).

Pure Triton (see tiles.py): compiled ahead of time by .ci/compile_triton.py; launched by
siglip.py, which documents the operators.

Rows are images x (M, D), columns texts y (N, D); logits ℓ_ij = t·(x_i·y_j) + b, the positive
of row i at column i + OFF (z = +1 there, −1 elsewhere). No softmax, so no running state: each
tile's terms are summed on their own.

Forward (`siglip_fwd_kernel`): one program per (row block, column split) over its column tiles
of y; per row Σ_j −log σ(z ℓ), Σ_j g and Σ_j g·(x_i·y_j) with g = −z σ(−z ℓ) (`pair_terms`,
stable for any |ℓ|). Plain sums: several splits (SPLIT) write partial sums W (3, splits, M),
added on the host (few image rows against many texts fill the GPU that way).
Backward (`siglip_bwd_kernel`), for L = Σ_i w_i loss_i and G_ij = w_i g_ij, one kernel for both
towers: rows A against the column tiles of B, acc += G·B (∂x = t·G·y) or, TRANSPOSED, the
tiles of Gᵀ (∂y = t·Gᵀ·x, rows are texts and the weights w those of the columns). Every output
element is written by one program: no atomics, deterministic.
"""
import triton
import triton.language as tl

from .tiles import (BWD_CONFIGS, FWD_CONFIGS, accumulate_hb, dot_tile, load_out_tile, load_rows, out_columns,
                    prune_configs, row_block, split_range)


@triton.jit
def pair_terms(logit, positive):
    """(−log σ(z·ℓ), g = −z·σ(−z·ℓ)) elementwise, z = +1 where `positive`, else −1; with
    m = z·ℓ: softplus(−m) = max(−m, 0) + log1p(e^{−|m|}), log1p by Goldberg's exact form
    log(u)·e/(u − 1), u = 1 + e (a plain log(1 + e) loses e < 1e-7 entirely)."""
    m = tl.where(positive, logit, -logit)
    e = tl.exp(-tl.abs(m))
    u = 1.0 + e
    exact = u == 1.0
    log1p_e = tl.where(exact, e, tl.log(u) * (e / tl.where(exact, 1.0, u - 1.0)))
    loss = tl.maximum(-m, 0.0) + log1p_e
    sig = tl.where(m >= 0.0, e, 1.0) / u  # σ(−m)
    return loss, tl.where(positive, -sig, sig)


# 128x32 on 4 warps spilled 4 B on sm_90 (triton 3.6, bf16): not among the SigLIP forward's.
SIGLIP_FWD_CONFIGS = [c for c in FWD_CONFIGS if not (c.kwargs["BLOCK_M"] == 128 and c.kwargs["BLOCK_N"] == 32
                                                     and c.num_warps == 4)] or FWD_CONFIGS


@triton.autotune(configs=SIGLIP_FWD_CONFIGS, key=["M_KEY", "N_KEY", "D", "PREC", "SPLIT"],
                 prune_configs_by={"early_config_prune": prune_configs})
@triton.jit
def siglip_fwd_kernel(
    X, stride_xm, stride_xd, Y, stride_ym, stride_yd,
    SCALE, BIAS, M, N, D, OFF, M_KEY, N_KEY,
    LOSS, DSUM, DCOS,                      # (M,) fp32 outputs (one split)
    W,                                     # (3, splits, M) partial sums (several splits)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr,
    CAST_F32: tl.constexpr, PREC: tl.constexpr, SPLIT: tl.constexpr,
):
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)
    rows, row_ok = row_block(tl.program_id(0), M, BLOCK_M)
    prow = rows + OFF  # the positive text of each row
    sc = tl.load(SCALE).to(tl.float32)
    bias = tl.load(BIAS).to(tl.float32)
    x = load_rows(X, stride_xm, stride_xd, rows, row_ok, D, BLOCK_M, BLOCK_D, D_CHUNKS, CAST_F32)
    loss = tl.zeros((BLOCK_M,), dtype=tl.float32)
    gsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    gcos = tl.zeros((BLOCK_M,), dtype=tl.float32)
    local = tl.arange(0, BLOCK_N).to(tl.int64)
    t_start, t_stop = split_range(tl.cdiv(N, BLOCK_N), pid_s, n_split)
    for t in range(t_start, t_stop):
        cols = t * BLOCK_N + local
        col_ok = cols < N
        dots, _b = dot_tile(X, stride_xm, stride_xd, rows, row_ok, Y, stride_ym, stride_yd, cols, col_ok,
                            x, D, BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, CAST_F32, PREC)
        lo, g = pair_terms(sc * dots + bias, prow[:, None] == cols[None, :])
        valid = col_ok[None, :]
        g = tl.where(valid, g, 0.0)
        loss += tl.sum(tl.where(valid, lo, 0.0), 1)
        gsum += tl.sum(g, 1)
        gcos += tl.sum(g * dots, 1)
    if SPLIT:
        base = W + pid_s.to(tl.int64) * M + rows
        stride_k = n_split.to(tl.int64) * M
        tl.store(base, loss, mask=row_ok)
        tl.store(base + stride_k, gsum, mask=row_ok)
        tl.store(base + 2 * stride_k, gcos, mask=row_ok)
    else:
        tl.store(LOSS + rows, loss, mask=row_ok)
        tl.store(DSUM + rows, gsum, mask=row_ok)
        tl.store(DCOS + rows, gcos, mask=row_ok)


@triton.autotune(configs=BWD_CONFIGS, key=["R_KEY", "C_KEY", "D", "PREC", "TRANSPOSED"], prune_configs_by={"early_config_prune": prune_configs})
@triton.jit
def siglip_bwd_kernel(
    A, stride_am, stride_ad, B, stride_bm, stride_bd,
    SCALE, BIAS, WGT, R, C, D, OFF, R_KEY, C_KEY,
    G, stride_gm,                          # ∂A: G[row, d]
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
    D_CHUNKS: tl.constexpr, TRANSPOSED: tl.constexpr, CAST_F32: tl.constexpr, PREC: tl.constexpr,
    H_BF16: tl.constexpr,
):
    """TRANSPOSED = False: A = x (R = M image rows), B = y, positive at column row + OFF, weight
    of the row; True: A = y (R = N text rows), B = x, positive where row = column + OFF, weight
    of the column (the image)."""
    rows, row_ok = row_block(tl.program_id(0), R, BLOCK_M)
    sc = tl.load(SCALE).to(tl.float32)
    bias = tl.load(BIAS).to(tl.float32)
    d_out, dout_ok = out_columns(tl.program_id(1), D, BLOCK_DO)
    a = load_rows(A, stride_am, stride_ad, rows, row_ok, D, BLOCK_M, BLOCK_D, D_CHUNKS, CAST_F32)
    w_rows = tl.load(WGT + rows, mask=row_ok & (not TRANSPOSED), other=0.0)

    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
    local = tl.arange(0, BLOCK_N).to(tl.int64)
    for t in range(0, tl.cdiv(C, BLOCK_N)):
        cols = t * BLOCK_N + local
        col_ok = cols < C
        dots, b = dot_tile(A, stride_am, stride_ad, rows, row_ok, B, stride_bm, stride_bd, cols, col_ok,
                           a, D, BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, CAST_F32, PREC)
        b = load_out_tile(B, stride_bm, stride_bd, cols, col_ok, d_out, dout_ok, b, D_CHUNKS, CAST_F32)
        if TRANSPOSED:
            positive = rows[:, None] == cols[None, :] + OFF
            w = tl.load(WGT + cols, mask=col_ok, other=0.0)[None, :]
        else:
            positive = cols[None, :] == rows[:, None] + OFF
            w = w_rows[:, None]
        _lo, g = pair_terms(sc * dots + bias, positive)
        h = tl.where(col_ok[None, :] & row_ok[:, None], w * g, 0.0)
        acc = accumulate_hb(acc, h, b, H_BF16, PREC)

    out = G + rows[:, None] * stride_gm + d_out[None, :]
    tl.store(out, (acc * sc).to(G.dtype.element_ty), mask=row_ok[:, None] & dout_ok[None, :])
