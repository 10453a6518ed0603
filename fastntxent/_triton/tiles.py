"""Device-side building blocks shared by the Triton kernels, and the tile shapes they run with.

Pure Triton: this module imports `triton` only (no torch, no package code), so that the
kernel modules built on it (`self_kernels.py`, `cross_kernels.py`) can be compiled ahead of
time for sm_80/sm_90 under any Triton version (.ci/compile_triton.py), without torch.

- `dot_tile`: A[rows] · B[cols]ᵀ as one `tl.dot` (D in one chunk) or a D-chunked loop;
- `load_rows`: the row block held across the column sweep (one D chunk);
- `online_tile` (`decoupled_tile`: its DCL form, positives out of the logsumexp): one column tile into the running max-subtracted logsumexp (exp2 domain),
  Σ P·s and the top-1 statistic;
- `row_dot`: an elementwise fp32 row dot (the MoCo v2 positive logit);
- the autotune configs, the interpreter's fixed blocks, and `d_blocks`, the D tiling.

Conventions of every kernel: row and column indices are int64 before they multiply a stride
(M·D passes 2³¹ at M = 2²¹, D = 1 024); operands are the input dtype (bf16/fp16 tensor
cores, fp32 as tf32 or exact "ieee" products), accumulators fp32; `CAST_F32` upcasts the
operands to fp32 right after the load, which the interpreter needs for bf16 (it stores bf16
as raw integers) and GPUs without bf16 tensor cores (sm_75) need for bf16 inputs.
"""
import os

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

# Fixed block sizes under the interpreter (small, so that the tests cross block edges).
INTERP_BLOCK_M = 32
INTERP_BLOCK_N = 32
INTERP_BLOCK_D = 64
# On the GPU: D up to this is held in one chunk (the row block stays in registers / shared
# memory across the sweep); larger D is looped over in CHUNK_D steps and the backward's output
# is split into CHUNK_DO-wide column chunks (grid z).
MAX_SINGLE_D = {"16bit": 256, "fp32": 128}
CHUNK_D = 64
# The backward's output chunk at chunked D: every output chunk recomputes the score tiles, so
# wider is less MMA work (D = 512: 1.5x the 4·M²·D minimum at 256, 2.5x at 128) as long as the
# accumulator stays in registers (acc_configs: 8 warps at 256; fp32 operands stay at 128).
CHUNK_DO = {"16bit": 256, "fp32": 128}

if INTERPRETING:
    FWD_CONFIGS = [triton.Config({"BLOCK_M": INTERP_BLOCK_M, "BLOCK_N": INTERP_BLOCK_N}, num_warps=4, num_stages=1)]
    BWD_CONFIGS = list(FWD_CONFIGS)
    FALLBACK_16BIT = FALLBACK_FP32 = EXACT_FWD_FALLBACK = None  # (the GPU's fallbacks, below)
else:
    # At most 32 similarities per thread (BLOCK_M·BLOCK_N / threads): the 64-per-thread tiles
    # (128x128 w8, 128x64 w4, 64x128 w4) reached 255 registers and spilled 32-400 B in the
    # compile gate (sm_80 and sm_90, triton 3.8), so they are gone.
    FWD_CONFIGS = [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2),  # fits any GPU
    ]
    # Exact fp32 only (`exact_fallback`): 64x32 on 8 warps, free to take 255 registers — the
    # 4-warp one spilled 8-24 B with every statistic (ieee, sm_80 / sm_90, triton 3.6 / 3.8).
    EXACT_FWD_FALLBACK = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=8, num_stages=2, maxnreg=255)
    FWD_CONFIGS.append(EXACT_FWD_FALLBACK)
    BWD_CONFIGS = [
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=1),  # fits any GPU
    ]
    # The fallback: fits any GPU, with half the registers per thread of 64x32 on 4 warps, which
    # spilled 4-332 B with the wide accumulators of fp32 (tf32) operands, the chunked-D output
    # columns and the odd-D masks. Twice, one kept per operand type (`operand_fallback`):
    # ptxas held fp32-operand kernels to 128 registers and spilled 20-24 B unless told it may
    # take 255 (`maxnreg`), while that bound made 16-bit ones spill 16-24 B at 255 registers
    # where they fit in 174-179 without it (triton 3.8, sm_80/sm_90, D = 512).
    FALLBACK_16BIT = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=8, num_stages=1)
    FALLBACK_FP32 = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=8, num_stages=1, maxnreg=255)
    BWD_CONFIGS += [FALLBACK_16BIT, FALLBACK_FP32]

# Exact fp32 ("ieee") products run on FMA units: a D chunk of at most EXACT_CHUNK_D and small
# tiles keep their operands in registers (wider chunks spill kilobytes per thread), and the
# backward's output chunk is EXACT_CHUNK_DO wide.
EXACT_CHUNK_D = 32
EXACT_CHUNK_DO = 64


def d_blocks(D: int, fp32: bool, exact: bool = False) -> tuple:
    """(BLOCK_D, D_CHUNKS, BLOCK_DO) for embedding dimension D: the D tile of the similarity
    products, how many of them cover D, and the output column chunk of the backward (equal to
    BLOCK_D when D is one chunk: the backward reuses the column tile). `exact`: fp32 products
    on FMA units. `tl.dot` needs every dimension ≥ 16: D < 16 is zero-padded to 16 by the
    masked loads."""
    if INTERPRETING:
        bd = min(INTERP_BLOCK_D, max(16, triton.next_power_of_2(D)))
        return bd, triton.cdiv(D, bd), bd
    if exact:
        if D <= EXACT_CHUNK_D:
            bd = max(16, triton.next_power_of_2(D))
            return bd, 1, bd
        return EXACT_CHUNK_D, triton.cdiv(D, EXACT_CHUNK_D), EXACT_CHUNK_DO
    if D <= MAX_SINGLE_D["fp32" if fp32 else "16bit"]:
        bd = max(16, triton.next_power_of_2(D))
        return bd, 1, bd
    return CHUNK_D, triton.cdiv(D, CHUNK_D), CHUNK_DO["fp32" if fp32 else "16bit"]


TENSOR_CORE_BF16 = (8, 0)  # bf16 MMA and tf32 from sm_80


def flags_for(dtype: str, fp32_precision: str, D: int, capability) -> dict:
    """The constexpr flags a launch of inputs of `dtype` ("fp32", "bf16", "fp16") and width D
    compiles with, on a GPU of `capability` (major, minor) or, for None, the interpreter:
    CAST_F32 (operands upcast after the load), PREC (`tl.dot` precision of fp32 operands),
    H_BF16 (the backward's H·U in bf16, for fp16 inputs whose H fp16 would underflow), EXACT
    (fp32 products on FMA units: the small tiles of `prune_configs`) and the D tiling.

    sm_75 has fp16 tensor cores only and no tf32: bf16 and fp16 operands are upcast there and
    every product is exact fp32. The interpreter needs fp32 operands (it stores bf16 as raw
    integers) and does not emulate tf32."""
    if capability is None:
        cast, prec, h_bf16 = True, fp32_precision if dtype == "fp32" else "ieee", False
    elif tuple(capability) < TENSOR_CORE_BF16:
        cast, prec, h_bf16 = dtype != "fp32", "ieee", False
    else:
        cast = False
        prec = fp32_precision if dtype == "fp32" else "tf32"
        h_bf16 = dtype == "fp16"
    fp32_operands = cast or dtype == "fp32"
    # tf32x3 (three tf32 MMAs per product, fp32-accurate) holds the same operand splits in
    # registers as exact fp32: it spilled 68-1700 B in the large tiles, so it takes the small ones.
    exact = fp32_operands and prec in ("ieee", "tf32x3") and capability is not None
    block_d, d_chunks, block_do = d_blocks(D, fp32=fp32_operands, exact=exact)
    return dict(CAST_F32=cast, PREC=prec, H_BF16=h_bf16, EXACT=exact, BLOCK_D=block_d, D_CHUNKS=d_chunks,
                BLOCK_DO=block_do)


def prune_configs(configs, named_args, **kwargs):
    """Autotune pruning before anything compiles:
    - exact fp32 products (EXACT, on FMA units) keep only the configs with tiles of at most
      64×64 (`exact_configs`; the forward's own 8-warp fallback EXACT_FWD_FALLBACK is theirs
      only), which hold their operands in registers (the larger ones spill
      kilobytes per thread and take minutes to compile);
    - a forward with fp32 (tf32) operands keeps the configs whose row block takes ≤ 64
      registers per thread, and with the top-1 statistic only the 4-warp ones;
    - a forward with the top-1 statistic drops 64×64 on 4 warps, one on local rows
      (LOCAL_ROWS) keeps tiles of ≤ 32 columns;
    - a backward (BLOCK_DO given) keeps the configs whose fp32 gradient accumulator
      and score tile fit in registers (`acc_configs`, MAX_BWD_REGS): the wide output chunks
      of the chunked-D backward need 8 warps; and the fallback of its operand type.
    `EXACT` is not a kernel argument: the launchers pass it through `PREC`/`CAST_F32`."""
    exact = (kwargs.get("PREC", named_args.get("PREC")) in ("ieee", "tf32x3")
             and not INTERPRETING and _fp32_operands(named_args, kwargs))
    if not INTERPRETING and not exact:
        configs = [c for c in configs if c is not EXACT_FWD_FALLBACK] or configs
    kept = exact_configs(configs) if exact else configs
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    if (not exact and not INTERPRETING and "BLOCK_DO" not in kwargs and block_d is not None
            and _fp32_operands(named_args, kwargs)):
        # Forward, fp32 (tf32) operands: the row block held across the sweep takes
        # BLOCK_M·BLOCK_D / threads registers; at 128 (128x32 on 4 warps, D = 128) sm_90
        # spilled 76-124 B; with the top-1 statistic 128x64 on 8 warps spilled 20 B (sm_80).
        # A forward without a NEED_TOP1 argument counts as with.
        kept = [c for c in kept if c.kwargs["BLOCK_M"] * int(block_d) <= 64 * 32 * c.num_warps
                and not (kwargs.get("NEED_TOP1", named_args.get("NEED_TOP1", True)) and c.num_warps > 4)] or kept[-1:]
    if "BLOCK_DO" not in kwargs and not INTERPRETING and kwargs.get("LOCAL_ROWS", False):
        # The self forward on a rank's local rows (the row offset, global labels): tiles of at
        # most 32 columns (the 64-column ones spilled 8-164 B, triton 3.6 / 3.8, sm_80).
        kept = [c for c in kept if c.kwargs["BLOCK_N"] <= 32] or kept[-1:]
    if "BLOCK_DO" not in kwargs and not INTERPRETING and kwargs.get("NEED_TOP1", False):
        # Forward with the top-1 statistic: no 64x64 tile on 4 warps (32 similarities per thread
        # beside a 64-row block: 255 registers and 4-76 B of spill on sm_80).
        kept = [c for c in kept if not (c.kwargs["BLOCK_M"] == 64 and c.kwargs["BLOCK_N"] == 64
                                        and c.num_warps == 4)] or kept[-1:]
    block_do = kwargs.get("BLOCK_DO", named_args.get("BLOCK_DO"))
    if block_do is not None and not INTERPRETING and not exact:
        kept = acc_configs(kept, int(block_do), _fp32_operands(named_args, kwargs))
    if not INTERPRETING:
        kept = operand_fallback(kept, _fp32_operands(named_args, kwargs))
    return kept


def operand_fallback(configs, fp32_operands: bool):
    """`configs` without the backward fallback of the other operand type (FALLBACK_16BIT /
    FALLBACK_FP32; see BWD_CONFIGS)."""
    other = FALLBACK_16BIT if fp32_operands else FALLBACK_FP32
    return [c for c in configs if c is not other] or configs


# fp32 registers per thread the backward's gradient accumulator and score tile may take,
# BLOCK_M·(BLOCK_DO + BLOCK_N) over 32·num_warps threads. Measured by the compile gate
# (triton 3.8, sm_80/sm_90): at 96 (64×64 tiles on 4 warps at D = 128; 64×256 outputs on
# 8 warps with 128 columns) ptxas spills 8-240 B, at ≤ 80 nothing; fp32 (tf32) operands take
# twice the registers of 16-bit ones, so their column tiles stay ≤ 64 (64×128 on 8 warps
# spilled 160 B on sm_90).
MAX_BWD_REGS = 80
# fp32 (tf32) operands: their row block and column tiles take twice the registers beside the
# accumulator, so the budget is lower (at 80 — 64x32 w4 with 128 output columns — ptxas spilled
# 36-76 B at D = 512 on sm_80, 128x32 w8 8-44 B at D = 128).
MAX_BWD_REGS_FP32 = 64


def acc_configs(configs, block_do: int, fp32_operands: bool = False):
    """The backward configs that hold their accumulator and score tile in registers (see
    MAX_BWD_REGS), else the one that comes closest."""
    def need(c):
        return c.kwargs["BLOCK_M"] * (block_do + c.kwargs["BLOCK_N"]) / (32 * c.num_warps)

    budget = MAX_BWD_REGS_FP32 if fp32_operands else MAX_BWD_REGS
    fits = [c for c in configs if need(c) <= budget and not (fp32_operands and c.kwargs["BLOCK_N"] > 64)]
    return fits or [min(configs, key=need)]


def exact_configs(configs):
    """The configs an exact-fp32 launch may use (see prune_configs): tiles of at most 64×64 on
    4 warps, and 64×32 on 8 (half the registers per thread: the backward's fallback there)."""
    small = [c for c in configs if c.kwargs["BLOCK_M"] <= 64 and c.kwargs["BLOCK_N"] <= 64
             and (c.num_warps <= 4 or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 32)]
    return small or configs[-1:]


def _fp32_operands(named_args, kwargs) -> bool:
    if kwargs.get("CAST_F32", named_args.get("CAST_F32")):
        return True
    for name in ("U", "Q", "K", "X", "A"):  # the first operand of the self/cross/SigLIP kernels
        ptr = named_args.get(name)
        if ptr is not None and hasattr(ptr, "dtype"):
            return str(ptr.dtype) in ("torch.float32", "fp32", "float32")
    return False


@triton.jit
def dot_tile(A, stride_am, stride_ad, rows, row_ok, B, stride_bm, stride_bd, cols, col_ok, a, D,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
             D_CHUNKS: tl.constexpr, CAST_F32: tl.constexpr, PREC: tl.constexpr):
    """A[rows] · B[cols]ᵀ (BLOCK_M, BLOCK_N) in fp32. With one D chunk `a` holds A[rows] and
    the B tile is returned for reuse; otherwise D is looped over in chunks (`a` is only a
    dtype placeholder; returns the last B chunk, unused). Masked entries load 0, which adds
    nothing to a dot product."""
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
def load_rows(A, stride_am, stride_ad, rows, row_ok, D,
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
def online_tile(m_i, l_i, ps_i, best, best_pos, x, x_max, sc, valid, is_pos, local, BLOCK_N: tl.constexpr,
                  MASKED: tl.constexpr, HAS_POS: tl.constexpr, NEED_TOP1: tl.constexpr, NEED_PS: tl.constexpr):
    """One column tile into the running row state. The tile's logits are s = x·sc with sc ≥ 0
    (x the raw products, sign-corrected by the caller; sc = 1/τ or the logit scale): the
    max-subtracted logsumexp (exp2 domain), Σ P·s (NEED_PS) and top-1 (NEED_TOP1: whether the
    first column reaching the row max is a positive; a later tile must beat it strictly).

    MASKED: only the entries where `valid` count (the diagonal tile, the last column tile);
    invalid entries become −inf (never `other=` values of a load: those would enter the max) and
    a row with no valid entry yet keeps m = −inf and l = 0 (the −inf − −inf case is avoided by
    shifting with 0); the row max's own term is exactly exp2(0) = 1, as the backward's
    exp(s − lse) expects. An interior tile (MASKED false) has every entry valid and pays for
    no mask: the max is taken over x (sc ≥ 0 keeps the order) and log2(e)·sc is folded into
    one FFMA, so each entry costs one max, one FFMA, one exp2 and one add. HAS_POS false: no
    entry is a positive (`is_pos` is not read).
    `x_max` = max(x, 1), computed by the caller before it branches on MASKED: the first use of
    a pipelined warpgroup MMA's result must not sit inside the branch (triton 3.6 fails to
    compile that on sm_90); it is not read when MASKED."""
    neg_inf = float("-inf")
    if MASKED:
        s_m = tl.where(valid, x * sc, neg_inf)
        t_max = tl.max(s_m, 1)
    else:
        t_max_x = x_max
        t_max = t_max_x * sc
    if NEED_TOP1:
        if MASKED:
            best, best_pos = top1_update(best, best_pos, s_m, t_max, t_max, is_pos, local, BLOCK_N, HAS_POS)
        else:
            best, best_pos = top1_update(best, best_pos, x, t_max_x, t_max, is_pos, local, BLOCK_N, HAS_POS)
    m_new = tl.maximum(m_i, t_max)
    log2e = 1.4426950408889634
    if MASKED:
        m_use = tl.where(m_new == neg_inf, 0.0, m_new)
        p = tl.exp2((s_m - m_use[:, None]) * log2e)  # masked entries: exp2(−inf) = 0
    else:
        m_use = m_new  # every entry valid: finite once the tile is in
        p = tl.exp2(x * (sc * log2e) - (m_use * log2e)[:, None])
    alpha = tl.exp2((m_i - m_use) * log2e)
    l_i = l_i * alpha + tl.sum(p, 1)
    if NEED_PS:
        if MASKED:
            ps_i = ps_i * alpha + tl.sum(p * tl.where(valid, x, 0.0), 1) * sc
        else:
            ps_i = ps_i * alpha + tl.sum(p * x, 1) * sc
    return m_new, l_i, ps_i, best, best_pos


@triton.jit
def top1_update(best, best_pos, v, v_max, t_max, is_pos, local, BLOCK_N: tl.constexpr, HAS_POS: tl.constexpr):
    """Top-1 of one tile into the running (best, best_pos): `v` the tile's values in any
    order-preserving form, `v_max` their row max, `t_max` that max as a logit; the first column
    reaching it decides (argmax's first index), and a later tile must beat `best` strictly."""
    if HAS_POS:
        first = tl.min(tl.where(v == v_max[:, None], local[None, :], BLOCK_N), 1)
        t_pos = tl.max(tl.where(is_pos & (local[None, :] == first[:, None]), 1.0, 0.0), 1)
    else:
        t_pos = tl.zeros_like(best_pos)
    better = t_max > best
    best_pos = tl.where(better, t_pos, best_pos)
    best = tl.where(better, t_max, best)
    return best, best_pos


@triton.jit
def decoupled_tile(m_i, l_i, ps_i, best, best_pos, s, valid, is_pos, local, BLOCK_N: tl.constexpr,
                   NEED_TOP1: tl.constexpr, NEED_PS: tl.constexpr):
    """`online_tile` of decoupled rows (DCL) for logits s (natural units): top-1 over every
    `valid` entry, the logsumexp over the valid non-positives only (a row without a negative
    keeps m = −inf, l = 0: lse = −inf)."""
    if NEED_TOP1:
        s_all = tl.where(valid, s, float("-inf"))
        t_max = tl.max(s_all, 1)
        best, best_pos = top1_update(best, best_pos, s_all, t_max, t_max, is_pos, local, BLOCK_N, True)
    return online_tile(m_i, l_i, ps_i, best, best_pos, s, s, 1.0, valid & (is_pos == 0), is_pos, local, BLOCK_N,
                       True, True, False, NEED_PS)


@triton.jit
def col_tile_dot(a, b_ptrs, c_off, n_left, local, d_ok, CAST_F32: tl.constexpr, PREC: tl.constexpr):
    """a · B_tileᵀ for D in one chunk: `b_ptrs` the loop-invariant pointers of column tile 0
    (rows local, columns d), `c_off` this tile's int64 row offset (c0·stride): one 64-bit add
    per pointer instead of an index multiply; rows ≥ `n_left` (int32: columns ≥ the count)
    load 0."""
    b = tl.load(b_ptrs + c_off, mask=(local < n_left)[:, None] & d_ok[None, :], other=0.0)
    if CAST_F32:
        b = b.to(tl.float32)
    return tl.dot(a, tl.trans(b), input_precision=PREC)


@triton.jit
def sign_fold(q, scale, D_CHUNKS: tl.constexpr):
    """(q', sc, x_scale): the forward's operands so that the logits are (q'·c)·x_scale·sc
    with sc ≥ 0. With D in one chunk a negative scale flips the row block
    (once per program) and x_scale = 1 (the scale folds into the exp2's FFMA); with chunked D
    the products are scaled by `scale` directly (x_scale = scale, sc = 1)."""
    if D_CHUNKS == 1:
        flip = scale < 0.0
        q = tl.where(flip, -q, q)
        return q, tl.abs(scale), 1.0
    return q, 1.0, scale


@triton.jit
def tiles_cross(r0, c0, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Whether the column tile [c0, c0+BLOCK_N) holds a column c = r of a row r of
    [r0, r0+BLOCK_M) (int32 scalars): the diagonal tiles, and with r0 shifted by an offset
    the tiles holding a cross-family positive."""
    return (c0 < r0 + BLOCK_M) & (r0 < c0 + BLOCK_N)


@triton.jit
def periodic_phase(r0, c0, period, BLOCK_M: tl.constexpr):
    """y = (r0 + BLOCK_M − 1 − c0) mod period for the first column tile c0 of a sweep: the
    column tile holds some c ≡ r (mod period) of a row r of the block iff y ≤ BLOCK_M + BLOCK_N − 2
    (its differences c − r span [−y', −y' + span], span = BLOCK_M + BLOCK_N − 2). `next_phase`
    moves it one tile on without a division (one division per program, none per tile)."""
    return ((r0 + BLOCK_M - 1 - c0) % period + period) % period


@triton.jit
def next_phase(y, period, BLOCK_N: tl.constexpr):
    """The phase of the next column tile (valid while BLOCK_N < period; with period ≤ span + 1
    every tile holds a match and the phase is not read)."""
    y = y - BLOCK_N
    return tl.where(y < 0, y + period, y)


@triton.jit
def row_dot(A, stride_am, stride_ad, rows, B, stride_bm, stride_bd, brows, ok, D,
            BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr):
    """Σ_d A[rows, d]·B[brows, d] per row, elementwise in fp32 (no tl.dot: any D)."""
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c in range(D_CHUNKS):
        d = c * BLOCK_D + offs_d
        m = ok[:, None] & (d < D)[None, :]
        x = tl.load(A + rows[:, None] * stride_am + d[None, :] * stride_ad, mask=m, other=0.0).to(tl.float32)
        y = tl.load(B + brows[:, None] * stride_bm + d[None, :] * stride_bd, mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(x * y, 1)
    return acc


@triton.jit
def split_range(n_tiles, pid_s, n_split):
    """[start, stop) of the column tiles that split `pid_s` of `n_split` sweeps."""
    per_split = tl.cdiv(n_tiles, n_split)
    t_start = pid_s * per_split
    t_stop = tl.minimum(t_start + per_split, n_tiles)
    return t_start, t_stop


@triton.jit
def row_block(pid_m, M, BLOCK_M: tl.constexpr):
    """int64 indices of row block `pid_m` and their in-range mask."""
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    return rows, rows < M


@triton.jit
def labels_of(LAB, idx, ok, period, other, HAS_LABELS: tl.constexpr):
    """Labels of rows `idx`: loaded (masked entries get `other`, which no real row compares
    equal to once masked) or implicit, i mod period — in int32 (row indices stay below 2³¹;
    an int64 remainder is a call to a slow software routine in every tile)."""
    if HAS_LABELS:
        lab = tl.load(LAB + idx, mask=ok, other=other)
    else:
        lab = idx.to(tl.int32) % period
    return lab


@triton.jit
def row_weights(GA, GB, LSE, idx, ok):
    """(a, b, lse, use) of rows `idx` for the backward: the weights of lse and of the positive
    sum, and the row lse — +inf where a = 0, so that its exp2 term is exactly 0 (no 0·inf)."""
    a = tl.load(GA + idx, mask=ok, other=0.0)
    b = tl.load(GB + idx, mask=ok, other=0.0)
    lse = tl.load(LSE + idx, mask=ok, other=0.0)
    use = a != 0.0
    return a, b, tl.where(use, lse, float("inf")), use


@triton.jit
def softmax_weight(a, s, lse):
    """a · P = a · exp(s − lse) (exp2 domain); s ≤ lse for every real entry, the clamp only
    keeps masked entries from overflowing."""
    return a * tl.exp2(tl.minimum(s - lse, 0.0) * 1.4426950408889634)


@triton.jit
def out_columns(pid_d, D, BLOCK_DO: tl.constexpr):
    """Output columns [pid_d·BLOCK_DO, +BLOCK_DO) of a backward program and their mask."""
    d_out = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    return d_out, d_out < D


@triton.jit
def load_out_tile(B, stride_bm, stride_bd, cols, col_ok, d_out, dout_ok, b, D_CHUNKS: tl.constexpr,
                  CAST_F32: tl.constexpr):
    """The column rows B[cols] at the output columns: the tile `dot_tile` returned when D is one
    chunk, else loaded for this output chunk."""
    if D_CHUNKS != 1:
        b = tl.load(B + cols[:, None] * stride_bm + d_out[None, :] * stride_bd,
                    mask=col_ok[:, None] & dout_ok[None, :], other=0.0)
        if CAST_F32:
            b = b.to(tl.float32)
    return b


@triton.jit
def accumulate_hb(acc, h, b, H_BF16: tl.constexpr, PREC: tl.constexpr):
    """acc += H · B in fp32: bf16 operands for fp16 inputs (H spans a range fp16 underflows),
    else B's dtype."""
    if H_BF16:
        acc = tl.dot(h.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    else:
        acc = tl.dot(h.to(b.dtype), b, acc, input_precision=PREC)
    return acc


@triton.jit
def store_grad(G, pid_s, stride_gs, rows, stride_gm, d_out, row_ok, dout_ok, acc):
    """G[split, rows, d_out] = acc (stride_gs = 0 with one split), in G's dtype."""
    out = G + pid_s.to(tl.int64) * stride_gs + rows[:, None] * stride_gm + d_out[None, :]
    tl.store(out, acc.to(G.dtype.element_ty), mask=row_ok[:, None] & dout_ok[None, :])


@triton.jit
def cross_tile_counts(N, NQ, BLOCK_N: tl.constexpr, IN_BATCH: tl.constexpr, HAS_QUEUE: tl.constexpr):
    """Column tiles of a cross-family row: key tiles (in-batch keys) then queue tiles."""
    if IN_BATCH:
        n_kt = tl.cdiv(N, BLOCK_N)
    else:
        n_kt = 0
    if HAS_QUEUE:
        n_qt = tl.cdiv(NQ, BLOCK_N)
    else:
        n_qt = 0
    return n_kt, n_qt
