#!/usr/bin/env python3
"""Ahead-of-time compile gate for every Triton kernel of fastntxent (no GPU needed).

Compiles each kernel of fastntxent/_triton/{self,cross,self_local,siglip}_kernels.py with
`triton.compile` for GPUTarget("cuda", 80 / 90 / 75, 32), the way the launchers
(self_similarity.py, cross_similarity.py, self_local_similarity.py, siglip.py,
common.kernel_flags) would launch it, and prints one row per variant:
kernel, config (BLOCK_M x BLOCK_N, num_warps, num_stages), variant (constexpr flags), D,
dtype/precision, target, triton version -> registers, spill bytes, shared memory, compile s.

The kernel modules import only `triton`; they are loaded here as the synthetic package
`fastntxent_kernels` (from fastntxent/_triton/__init__.py, which imports only triton), so
the package `fastntxent` (whose __init__ imports torch) is never imported: the gate runs in a
venv holding only triton (CI's triton 3.6 venv).

Where the numbers come from (no GPU): `compiled.n_regs` / `compiled.n_spills` are filled by
the CUDA driver when the cubin is loaded (`_init_handles`), which needs a GPU, so they cannot
be read here. The same figures come from the cubin instead, with cuobjdump
--dump-resource-usage (shipped with triton): REG is CU_FUNC_ATTRIBUTE_NUM_REGS, and the stack
frame (STACK / LOCAL) is CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES, of which triton's n_spills is 1/4
(JSON `n_spills`). The "spill B" column is ptxas' own "bytes spill stores", captured from the
compile (TRITON_DUMP_PTXAS_LOG); a row spills when either is non-zero. Shared memory is
`compiled.metadata.shared`: the dynamic shared memory the launch requests, which the runtime
compares with the device limit; the cubin's static SHARED (1 KiB on sm_90) is kept in the JSON
(status "smem-tight" if the two together pass the limit).

Signature (documented choice, mirroring triton's runtime specialisation, checked against
triton.runtime.jit.native_specialize_impl by tests/test_compile_gate.py):
- tensors: "*bf16" / "*fp16" / "*fp32" / "*i64", 16-byte aligned (tt.divisibility 16), as a
  fresh torch allocation is;
- Python ints: "i32" when -2**31 <= v < 2**31, else "i64"; tt.divisibility 16 when v % 16 == 0;
  v == 1 becomes the constexpr 1 (so stride_d = 1 of a contiguous (M, D) tensor is a constant,
  exactly as at run time). Representative sizes: M = N = 4096, queue 65536, D = 128 or 512,
  rows_per_view = M / 2, pos_offset = 0; all fit i32 (sizes >= 2**31 would make i64 variants:
  the kernels cast row indices to int64 themselves, so none is compiled). The `odd` variant
  uses M = N = 1000, D = 100 (no divisibility: unvectorised loads).

Configs: the ones the launcher's autotuner keeps after the kernel's own early_config_prune
(`tiles.prune_configs`) for the row's dtype/precision and D (`kept_configs`): exact-fp32 small
tiles, the backward's accumulator rule (`tiles.acc_configs`); "fallback" is the last kept
config. The pruning is called as the autotuner calls it: the kernel's own argument names and
the constexpr keywords its launcher passes (so a kernel whose tensors are not named U / Q / K,
SigLIP's X / Y / A / B, gets no fp32 pruning, exactly as at run time).

From the SASS (cuobjdump -sass of the cubin, `sass_counts`): static HMMA / HGMMA / MUFU counts,
and the main loop (the natural loop holding the most tensor-core instructions) as a control-flow
graph: `epi_per_sim` = non-MMA instructions on its shortest path (a mask-free interior column
tile) per similarity a thread computes, `epi_per_sim_masked` the longest path (a masked tile).

Failure rule (exit 1): any compile error; shared memory over the target's per-block limit
(sm_75 64 KiB, sm_80 163 KiB = 166912 B, sm_90 227 KiB = 232448 B) in the fallback config
-- over-limit autotune configs are discarded by the autotuner at run time (OutOfResources)
and are reported as PRUNED; a 16-bit or tf32 main loop without tensor-core instructions
(FAIL-NO-MMA: HMMA on sm_80, HGMMA on sm_90 where triton emits warpgroup MMA, else HMMA); an
interior-tile epilogue over EPILOGUE_BUDGET instructions per similarity in the common case
(FAIL-EPILOGUE); spills in the fallback config, except the ones listed in BASELINE_SPILLS
(BASELINE-SPILL, fatal with --fail-on-baseline-spills). Spills of the exact-fp32 paths (fp32
"ieee", tf32x3, and sm_75, which computes every dtype in exact fp32) are printed as KNOWN-SPILL,
fatal only with --fail-on-ieee-spills. Spills of the other kept configs are printed
("spills"), not fatal.

Matrices (--matrix): "full" (~650 compiles: every config x bf16/fp16/tf32/ieee x sm_80/sm_90
at D = 128, tf32x3 for every forward config, and on the fallback config D = 512, every
constexpr variant and sm_75), "ci" (the pinned triton in CI) and "subset" (--subset, CI's
triton 3.6); see MATRICES. What a matrix leaves out is printed.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import inspect
import io
import json
import multiprocessing as mp
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNEL_DIR = ROOT / "fastntxent" / "_triton"
PKG = "fastntxent_kernels"

KERNEL_MODULE = {"self_fwd_kernel": "self_kernels", "self_bwd_kernel": "self_kernels",
                 "cross_fwd_kernel": "cross_kernels", "cross_bwd_q_kernel": "cross_kernels",
                 "cross_bwd_k_kernel": "cross_kernels",
                 # the self family's local-rows backward (distributed; launcher self_local_similarity.py;
                 # its forward is self_fwd_kernel on the local rows)
                 "self_bwd_row_side_kernel": "self_local_kernels",
                 "self_bwd_col_side_kernel": "self_local_kernels",
                 # SigLIP (launcher siglip.py)
                 "siglip_fwd_kernel": "siglip_kernels", "siglip_bwd_kernel": "siglip_kernels"}
KERNELS = tuple(KERNEL_MODULE)
KERNEL_FILES = ("tiles",) + tuple(dict.fromkeys(KERNEL_MODULE.values()))
# Kernels added to the gate on 2026-12-03: the reduced matrix of `keep` (see MATRICES).
NEW_KERNELS = ("self_bwd_row_side_kernel", "self_bwd_col_side_kernel",
               "siglip_fwd_kernel", "siglip_bwd_kernel")
# dtype/precision keys: (input dtype, fp32 precision asked for)
DTYPES = {"bf16": ("bf16", None), "fp16": ("fp16", None), "tf32": ("fp32", "tf32"),
          "ieee": ("fp32", "ieee"), "tf32x3": ("fp32", "tf32x3")}
SMEM_LIMIT = {75: 64 * 1024, 80: 166912, 90: 232448}
DIMS = (128, 512)

# Fallback-config spills of the non-exact paths (bf16 / fp16 / fp32-tf32) that the kernels
# had when this gate was added (36 rows, "spill_key" form, bytes of spill stores). Reported as
# BASELINE-SPILL, fatal with --fail-on-baseline-spills; any spill not listed here fails. Emptied
# 2026-12-04 (issue 16): the 8-warp backward fallbacks (tiles.FALLBACK_16BIT / FALLBACK_FP32),
# the fp32-operand register budget, the MoCo backward's positive term before the sweep; the ci
# matrix under 3.8 and the subset under 3.6 compile every listed row without a spill.
BASELINE_SPILLS: set = set()


# ----------------------------------------------------------------------------- loading
def load_kernels():
    """The pure-Triton kernel modules (KERNEL_FILES), without importing the package `fastntxent`."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("compile_triton.py: unset TRITON_INTERPRET (it swaps in the interpreter's configs)")
    if PKG not in sys.modules:
        spec = importlib.util.spec_from_file_location(PKG, KERNEL_DIR / "__init__.py",
                                                      submodule_search_locations=[str(KERNEL_DIR)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[PKG] = mod
        spec.loader.exec_module(mod)
    mods = {name: importlib.import_module(f"{PKG}.{name}") for name in KERNEL_FILES}
    bad = [m for m in ("torch", "fastntxent") if m in sys.modules]
    if bad:
        raise SystemExit(f"compile_triton.py: loading the kernel modules imported {bad}: they must import triton only")
    return mods


def kernel_sha():
    """Short hash of the kernel modules, KERNEL_FILES in order (which source a table belongs to)."""
    import hashlib
    h = hashlib.sha256()
    for name in KERNEL_FILES:
        h.update((KERNEL_DIR / f"{name}.py").read_bytes())
    return h.hexdigest()[:12]


def kernel_flags(tiles, dtype: str, prec32: str, D: int, cap: int):
    """The launchers' flags for this dtype, precision, D and compute capability: the one rule
    in tiles.flags_for (EXACT is not a kernel argument: it selects the configs)."""
    flags = tiles.flags_for(dtype, prec32, D, (cap // 10, cap % 10))
    flags.pop("EXACT")
    return flags


# ----------------------------------------------------------------------------- launches
class Ptr(str):
    """A tensor argument: its triton pointer type."""


def P(dt):
    return Ptr("*" + dt)


def sizes(variant):
    if "odd" in variant:
        return dict(M=1000, N=1000, NQ=1000)
    return dict(M=4096, N=4096, NQ=65536)


def pow2(x):
    return 1 << max(0, (x - 1).bit_length())


# Constexpr variants of each kernel: name -> flags. The first is the default one (compiled for
# every config); the others run on the fallback config. "split" means several column splits
# (fp32 work buffers / outputs), "odd" non-multiple-of-16 sizes.
ALL = dict(NEED_TOP1=True, NEED_PS=True)     # forward: top-1 (return_stats) and Σ P·s (learnable τ)
FAST = dict(NEED_TOP1=False, NEED_PS=False)  # forward, the common case: no statistics, fixed τ
VARIANTS = {
    "self_fwd_kernel": {
        "nolab": dict(HAS_LABELS=False, SPLIT=False, **FAST, DECOUPLED=False, LOCAL_ROWS=False),
        "nolab+all": dict(HAS_LABELS=False, SPLIT=False, **ALL, DECOUPLED=False, LOCAL_ROWS=False),
        "labels": dict(HAS_LABELS=True, SPLIT=False, **ALL, DECOUPLED=False, LOCAL_ROWS=False),
        "nolab+split": dict(HAS_LABELS=False, SPLIT=True, **ALL, DECOUPLED=False, LOCAL_ROWS=False),
        "labels+split": dict(HAS_LABELS=True, SPLIT=True, **ALL, DECOUPLED=False, LOCAL_ROWS=False),
        "nolab+odd": dict(HAS_LABELS=False, SPLIT=False, **ALL, DECOUPLED=False, LOCAL_ROWS=False),
        "labels+dcl": dict(HAS_LABELS=True, SPLIT=False, **ALL, DECOUPLED=True, LOCAL_ROWS=False),  # decoupled (DCL)
        # the local rows of a distributed loss (rank 1 of 2; the former self_fwd_rows_kernel)
        "nolab+rows": dict(HAS_LABELS=False, SPLIT=False, **FAST, DECOUPLED=False, LOCAL_ROWS=True),
        "labels+rows+all": dict(HAS_LABELS=True, SPLIT=False, **ALL, DECOUPLED=False, LOCAL_ROWS=True),
    },
    "self_bwd_kernel": {
        "nolab": dict(HAS_LABELS=False, DECOUPLED=False),
        "labels": dict(HAS_LABELS=True, DECOUPLED=False),
        "nolab+split": dict(HAS_LABELS=False, DECOUPLED=False),
        "labels+split": dict(HAS_LABELS=True, DECOUPLED=False),
        "nolab+odd": dict(HAS_LABELS=False, DECOUPLED=False),
        "labels+dcl": dict(HAS_LABELS=True, DECOUPLED=True),
    },
    "cross_fwd_kernel": {
        "inbatch": dict(IN_BATCH=True, HAS_QUEUE=False, SPLIT=False, **FAST, DECOUPLED=False),          # CLIP
        "inbatch+all": dict(IN_BATCH=True, HAS_QUEUE=False, SPLIT=False, **ALL, DECOUPLED=False),
        "queue": dict(IN_BATCH=False, HAS_QUEUE=True, SPLIT=False, **ALL, DECOUPLED=False),           # MoCo
        "queue+split": dict(IN_BATCH=False, HAS_QUEUE=True, SPLIT=True, **ALL, DECOUPLED=False),
        "inbatch+split": dict(IN_BATCH=True, HAS_QUEUE=False, SPLIT=True, **ALL, DECOUPLED=False),
        "inbatch+queue": dict(IN_BATCH=True, HAS_QUEUE=True, SPLIT=False, **ALL, DECOUPLED=False),
        "inbatch+queue+split": dict(IN_BATCH=True, HAS_QUEUE=True, SPLIT=True, **ALL, DECOUPLED=False),
        "pos-only": dict(IN_BATCH=False, HAS_QUEUE=False, SPLIT=False, **ALL, DECOUPLED=False),
        "inbatch+odd": dict(IN_BATCH=True, HAS_QUEUE=False, SPLIT=False, **ALL, DECOUPLED=False),
        "inbatch+dcl": dict(IN_BATCH=True, HAS_QUEUE=False, SPLIT=False, **ALL, DECOUPLED=True),
        "queue+dcl": dict(IN_BATCH=False, HAS_QUEUE=True, SPLIT=False, **ALL, DECOUPLED=True),
    },
    "cross_bwd_q_kernel": {
        "inbatch": dict(IN_BATCH=True, HAS_QUEUE=False, WRITE_GK=False, DECOUPLED=False),
        "inbatch+queue": dict(IN_BATCH=True, HAS_QUEUE=True, WRITE_GK=False, DECOUPLED=False),
        "queue": dict(IN_BATCH=False, HAS_QUEUE=True, WRITE_GK=False, DECOUPLED=False),
        "queue+gk": dict(IN_BATCH=False, HAS_QUEUE=True, WRITE_GK=True, DECOUPLED=False),
        "queue+gk+split": dict(IN_BATCH=False, HAS_QUEUE=True, WRITE_GK=True, DECOUPLED=False),
        "pos-only+gk": dict(IN_BATCH=False, HAS_QUEUE=False, WRITE_GK=True, DECOUPLED=False),
        "inbatch+split": dict(IN_BATCH=True, HAS_QUEUE=False, WRITE_GK=False, DECOUPLED=False),
        "inbatch+odd": dict(IN_BATCH=True, HAS_QUEUE=False, WRITE_GK=False, DECOUPLED=False),
        "inbatch+dcl": dict(IN_BATCH=True, HAS_QUEUE=False, WRITE_GK=False, DECOUPLED=True),
        "queue+gk+dcl": dict(IN_BATCH=False, HAS_QUEUE=True, WRITE_GK=True, DECOUPLED=True),
    },
    "cross_bwd_k_kernel": {
        "inbatch": dict(DECOUPLED=False),
        "inbatch+split": dict(DECOUPLED=False),
        "inbatch+odd": dict(DECOUPLED=False),
        "inbatch+dcl": dict(DECOUPLED=True),
    },
    # local rows: rank 1 of 2 (ROW0 = ROWS = M / 2)
    "self_bwd_row_side_kernel": {
        "nolab": dict(HAS_LABELS=False, DECOUPLED=False),
        "labels": dict(HAS_LABELS=True, DECOUPLED=False),
        "nolab+split": dict(HAS_LABELS=False, DECOUPLED=False),
        "labels+dcl": dict(HAS_LABELS=True, DECOUPLED=True),
    },
    "self_bwd_col_side_kernel": {
        "nolab": dict(HAS_LABELS=False, DECOUPLED=False),
        "labels": dict(HAS_LABELS=True, DECOUPLED=False),
        "labels+dcl": dict(HAS_LABELS=True, DECOUPLED=True),
    },
    "siglip_fwd_kernel": {"pairs": dict(SPLIT=False), "pairs+split": dict(SPLIT=True)},
    "siglip_bwd_kernel": {                        # ∂x (rows x against y) and ∂y (TRANSPOSED)
        "grad_x": dict(TRANSPOSED=False),
        "grad_y": dict(TRANSPOSED=True),
    },
}


def launch_args(kernel, variant, dt, D):
    """Runtime arguments (not constexpr) as the launcher passes them: Ptr for tensors, ints."""
    s = sizes(variant)
    M, N, NQ = s["M"], s["N"], s["NQ"]
    if "odd" in variant:
        D = 100
    split = "split" in variant
    f32 = P("fp32")
    if kernel == "self_fwd_kernel":
        return dict(U=P(dt), stride_um=D, stride_ud=1, TAU=f32,
                    LAB=P("i64") if "labels" in variant else f32,  # no labels: the dummy outs[0]
                    M=M, D=D, period=M // 2, ROW0=M // 2 if "rows" in variant else 0,
                    ROWS=M // 2 if "rows" in variant else M, M_KEY=pow2(M),
                    LSE=f32, POS_SUM=f32, POS_CNT=f32, PS_SUM=f32, TOP1=f32, W=f32)
    if kernel == "self_bwd_kernel":
        return dict(U=P(dt), stride_um=D, stride_ud=1, TAU=f32, LAB=P("i64") if "labels" in variant else f32,
                    LSE=f32, GA=f32, GB=f32, M=M, D=D, period=M // 2, M_KEY=pow2(M),
                    G=f32 if split else P(dt), stride_gs=M * D if split else 0, stride_gm=D)
    queue = "queue" in variant
    in_batch = "inbatch" in variant
    if kernel == "cross_fwd_kernel":
        n_cols = (N if in_batch else 0) + (NQ if queue else 0)
        return dict(Q=P(dt), stride_qm=D, stride_qd=1, K=P(dt), stride_km=D, stride_kd=1,
                    QU=P(dt), stride_um=D if queue else 0, stride_ud=1 if queue else 0,
                    SCALE=f32, M=M, N=N, NQ=NQ if queue else 0, D=D, OFF=0, M_KEY=pow2(M), C_KEY=pow2(n_cols),
                    LSE=f32, POS=f32, PS_SUM=f32, TOP1=f32, W=f32)
    if kernel == "cross_bwd_q_kernel":
        n_cols = (N if in_batch else 0) + (NQ if queue else 0)
        g = f32 if split else P(dt)
        return dict(Q=P(dt), stride_qm=D, stride_qd=1, K=P(dt), stride_km=D, stride_kd=1,
                    QU=P(dt), stride_um=D if queue else 0, stride_ud=1 if queue else 0,
                    SCALE=f32, LSE=f32, GA=f32, GB=f32, M=M, N=N, NQ=NQ if queue else 0, D=D, OFF=0,
                    M_KEY=pow2(M), C_KEY=pow2(n_cols), G=g, stride_gs=M * D if split else 0, stride_gm=D,
                    GK=P(dt) if "gk" in variant else g, stride_gkm=D)
    if kernel == "cross_bwd_k_kernel":
        return dict(K=P(dt), stride_km=D, stride_kd=1, Q=P(dt), stride_qm=D, stride_qd=1,
                    SCALE=f32, LSE=f32, GA=f32, GB=f32, N=N, M=M, D=D, OFF=0, M_KEY=pow2(N), C_KEY=pow2(M),
                    G=f32 if split else P(dt), stride_gs=N * D if split else 0, stride_gm=D)
    rows = M // 2  # local rows: rank 1 of 2
    if kernel == "self_bwd_row_side_kernel":  # the row side is an fp32 buffer (added into the column side)
        return dict(U=P(dt), stride_um=D, stride_ud=1, TAU=f32, LAB=P("i64") if "labels" in variant else f32,
                    LSE=f32, GA=f32, GB=f32, M=M, D=D, period=M // 2, ROW0=rows, ROWS=rows, M_KEY=pow2(M),
                    G=f32, stride_gs=rows * D if split else 0, stride_gm=D)
    if kernel == "self_bwd_col_side_kernel":  # fp32 (M, D) output
        return dict(U=P(dt), stride_um=D, stride_ud=1, TAU=f32, LAB=P("i64") if "labels" in variant else f32,
                    LSE=f32, GA=f32, GB=f32, M=M, D=D, period=M // 2, ROW0=rows, ROWS=rows, M_KEY=pow2(M),
                    G=f32, stride_gm=D)
    if kernel == "siglip_fwd_kernel":
        return dict(X=P(dt), stride_xm=D, stride_xd=1, Y=P(dt), stride_ym=D, stride_yd=1, SCALE=f32, BIAS=f32,
                    M=M, N=N, D=D, OFF=0, M_KEY=pow2(M), N_KEY=pow2(N), LOSS=f32, DSUM=f32, DCOS=f32, W=f32)
    if kernel == "siglip_bwd_kernel":  # one split: the gradient in the input dtype
        return dict(A=P(dt), stride_am=D, stride_ad=1, B=P(dt), stride_bm=D, stride_bd=1, SCALE=f32, BIAS=f32,
                    WGT=f32, R=M, C=N, D=D, OFF=0, R_KEY=pow2(M), C_KEY=pow2(N), G=P(dt), stride_gm=D)
    raise KeyError(kernel)


def specialize(value, do_not_specialize=False, no_align=False):
    """(type, divisible_by_16, constant) of one runtime argument, as triton's runtime does it."""
    if isinstance(value, Ptr):
        return str(value), not no_align, None
    if isinstance(value, bool):
        return "u1", False, None
    if isinstance(value, int):
        if not do_not_specialize and value == 1:
            return "constexpr", False, 1
        ty = "i32" if -2**31 <= value < 2**31 else ("i64" if -2**63 <= value < 2**63 else "u64")
        return ty, (not do_not_specialize and not no_align and value % 16 == 0), None
    if isinstance(value, float):
        return "fp32", False, None
    raise TypeError(f"unsupported argument {value!r}")


def every_config_variants(kernel):
    """The variants compiled for every autotune config (not only the fallback): the default
    one and, for the forwards, the one with every optional output ("+all"), the heaviest."""
    names = list(VARIANTS[kernel])
    return [names[0]] + [v for v in names[1:] if v.endswith("+all") or v.endswith("+rows")]


# ----------------------------------------------------------------------------- tasks
class _Arg:
    """A tensor argument for tiles.prune_configs (it reads the dtype only)."""

    def __init__(self, dtype):
        self.dtype = dtype


def kept_configs(tiles, kernel, dtk, D, target, variant=None):
    """Indices of the configs the launcher's autotuner keeps (the kernel's own
    early_config_prune, tiles.prune_configs) for this kernel, dtype/precision, D and target:
    the ones it can pick. As at run time, the pruning sees the kernel's own argument names
    (every tensor argument of this dtype) and the constexpr keywords the launcher passes."""
    dtype, prec32 = DTYPES[dtk]
    tuner = getattr(load_kernels()[KERNEL_MODULE[kernel]], kernel)
    fn, cfgs = tuner.fn, tuner.configs
    prune = getattr(tuner, "early_config_prune", None) or tiles.prune_configs
    flags = tiles.flags_for(dtype, prec32 or "tf32", D, (target // 10, target % 10))
    kwargs = dict(PREC=flags["PREC"], CAST_F32=flags["CAST_F32"], BLOCK_D=flags["BLOCK_D"])
    if "bwd" in kernel:
        kwargs["BLOCK_DO"] = flags["BLOCK_DO"]
    if variant is not None:
        kwargs.update({k: v for k, v in VARIANTS[kernel][variant].items() if k.startswith("NEED_") or k == "LOCAL_ROWS"})
    arg = _Arg(dtype)
    named = {p.name: arg for p in fn.params if not p.is_constexpr}
    kept = prune(cfgs, named, **kwargs)
    return [cfgs.index(c) for c in kept]


def full_matrix(mods, targets):
    """Every variant of every kernel (dicts with kernel, config_index, fallback, variant,
    dtype_key, D, target). The configs are the ones the autotuner keeps after pruning
    (kept_configs); "fallback" is the last of them."""
    tiles = mods["tiles"]
    tasks = []
    for kernel in KERNELS:
        variants = list(VARIANTS[kernel])
        default = variants[0]
        every = every_config_variants(kernel)

        def add(ci, fb, variant, dtk, D, target):
            tasks.append(dict(kernel=kernel, config_index=ci, fallback=fb, variant=variant, dtype_key=dtk, D=D,
                              target=target))

        for target in targets:
            dtks = ("bf16", "fp16", "ieee") if target < 80 else ("bf16", "fp16", "tf32", "ieee")
            for dtk in dtks:
                kept = kept_configs(tiles, kernel, dtk, 128, target)
                fb = kept[-1]
                if target < 80:  # sm_75: the flags kernel_flags gives for (7, 5), fallback config only
                    for D in DIMS:
                        add(kept_configs(tiles, kernel, dtk, D, target)[-1], True, default, dtk, D, target)
                    for v in variants[1:]:
                        add(fb, True, v, dtk, 128, target)
                    continue
                for v in every:
                    kept_v = kept_configs(tiles, kernel, dtk, 128, target, v)
                    for ci in kept_v:
                        add(ci, ci == kept_v[-1], v, dtk, 128, target)  # every config it can pick, D = 128
                kept512 = kept_configs(tiles, kernel, dtk, 512, target)
                for ci in (kept512 if "bwd" in kernel else kept512[-1:]):  # chunked D (the backward's wide chunks)
                    add(ci, ci == kept512[-1], default, dtk, 512, target)
                for v in variants[1:]:                                  # constexpr variants
                    if v not in every:
                        add(fb, True, v, dtk, 128, target)
            if target >= 80:
                # tf32x3: every forward config (they show the shared-memory pruning), fallback elsewhere
                kept = kept_configs(tiles, kernel, "tf32x3", 128, target)
                for ci in (kept if "fwd" in kernel else kept[-1:]):
                    add(ci, ci == kept[-1], default, "tf32x3", 128, target)
    return tasks


# What each matrix keeps, as a predicate of (task, is_fallback, is_default_variant). Measured
# on this 2-core machine: the full matrix is ~650 compiles, ~16 min under triton 3.8 alone.
MATRICES = {
    "full": "everything below",
    "ci": ("the pinned triton in CI: every config of the default variant for bf16, fp16, fp32-tf32 on "
           "sm_80/sm_90 (D = 128); the fallback config for fp32-ieee and tf32x3, for D = 512 (all four "
           "dtypes), for every constexpr variant (bf16, fp32-tf32) and on sm_75 (bf16, fp16, fp32, D = 128)"),
    "subset": ("a representative subset (CI's second triton, 3.6): every config of the default variant for "
               "bf16 on sm_80/sm_90; the fallback config for every dtype (D = 128), for D = 512 (bf16, tf32), "
               "every constexpr variant (bf16 on sm_90, fp32-tf32 on sm_80) and sm_75 (bf16, fp32); for the "
               "local-rows and SigLIP kernels (NEW_KERNELS) only the default variant on sm_80/sm_90: every "
               "config for bf16 (D = 128 and the D = 512 fallback), the fallback for fp32-tf32 (D = 128 and 512)"),
}


def keep(matrix, t, fb, dv):
    dk, D, tg = t["dtype_key"], t["D"], t["target"]
    if matrix == "full":
        return True
    if matrix == "ci":
        if tg < 80:
            return fb and dv and D == 128
        if dv and D == 128:
            return dk in ("bf16", "fp16", "tf32") or fb
        if dv:  # D = 512
            return fb
        return fb and dk in ("bf16", "tf32")
    if matrix == "subset":
        if t["kernel"] in NEW_KERNELS:  # reduced: bf16 every config, the fallback for tf32; D = 128 and 512
            return tg >= 80 and dv and (dk == "bf16" or (fb and dk == "tf32"))
        if tg < 80:
            return fb and dv and D == 128 and dk in ("bf16", "ieee")
        if dv and D == 128:
            return dk == "bf16" or fb
        if dv:
            return fb and dk in ("bf16", "tf32")
        return fb and ((dk == "bf16" and tg == 90) or (dk == "tf32" and tg == 80))
    raise ValueError(matrix)


def task_list(mods, args):
    """The variants to compile, and a list of what the chosen matrix / filters leave out."""
    tiles = mods["tiles"]
    n_cfg = {k: len(tiles.FWD_CONFIGS if "fwd" in k else tiles.BWD_CONFIGS) for k in KERNELS}
    targets = [int(t) for t in args.targets.split(",") if t]
    kernels = [k for k in KERNELS if not args.only or k in args.only.split(",")]
    dtypes = args.dtypes.split(",")
    dims = [int(d) for d in args.dims.split(",")]
    tasks, dropped = [], []
    for t in full_matrix(mods, targets):
        if t["kernel"] not in kernels:
            continue
        fb = t["fallback"]
        dv = t["variant"] in every_config_variants(t["kernel"])
        filt = (t["dtype_key"] in dtypes and t["D"] in dims and (fb or args.configs == "all")
                and (dv or args.variants == "all")
                and (not args.variant_names or t["variant"] in args.variant_names.split(",")))
        if not filt:
            continue  # asked for by the command line: not listed as skipped
        (tasks if keep(args.matrix, t, fb, dv) else dropped).append((t, fb, dv))
    groups = {}
    for t, fb, dv in dropped:
        g = groups.setdefault((t["kernel"], t["dtype_key"], t["target"]), {"configs": 0, "variants": 0, "D512": 0,
                                                                           "fallback": 0})
        if not fb:
            g["configs"] += 1
        elif not dv:
            g["variants"] += 1
        elif t["D"] != 128:
            g["D512"] += 1
        else:
            g["fallback"] += 1
    skipped = []
    for (k, dk, tg), g in sorted(groups.items(), key=lambda kv: (KERNELS.index(kv[0][0]), kv[0][1], kv[0][2])):
        parts = [f"{g['configs']} non-fallback configs"] if g["configs"] else []
        parts += [f"{g['variants']} constexpr variants"] if g["variants"] else []
        parts += ["D = 512"] if g["D512"] else []
        parts += ["the fallback config"] if g["fallback"] else []
        skipped.append(f"{k} {dk} sm_{tg}: " + ", ".join(parts))
    return [t for t, _, _ in tasks], skipped


def config_label(cfg):
    kw = cfg.kwargs
    return f"{kw['BLOCK_M']}x{kw['BLOCK_N']} w{cfg.num_warps} s{cfg.num_stages}"


# ----------------------------------------------------------------------------- worker
_MODS = None
_CUOBJDUMP = None


def _init_worker():
    global _MODS, _CUOBJDUMP
    _MODS = load_kernels()
    _CUOBJDUMP = find_tool("cuobjdump")


def find_tool(name):
    import triton
    try:
        from triton import knobs
        p = getattr(knobs.nvidia, name.replace("-", "_")).path
        if p and os.path.exists(p):
            return p
    except Exception:
        pass
    p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(p) if p.exists() else shutil.which(name)


def make_source(fn, signature, constexprs, attrs):
    """ASTSource across triton versions. 3.6 and 3.8 share one API: signature keyed by argument
    name with "constexpr" entries, `constexprs` keyed by name or (index,), attrs keyed by
    (index,). Older triton (<= 3.1) took `constants` keyed by index (not exercised here)."""
    import triton
    params = inspect.signature(triton.compiler.ASTSource.__init__).parameters
    if "constexprs" in params:
        return triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    idx = {n: i for i, n in enumerate(fn.arg_names)}
    return triton.compiler.ASTSource(fn=fn, signature=signature,
                                     constants={idx[k]: v for k, v in constexprs.items()}, attrs=attrs)


def resource_usage(cubin: bytes):
    """REG / LOCAL / SHARED of the (only) kernel in a cubin, via cuobjdump."""
    if not _CUOBJDUMP:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"Function \S+:\s*\n\s*(.*)", out)
    if not m:
        return {}
    return {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", m.group(1))}


def ptx_counts(ptx: str):
    """Static instruction counts in the PTX: tensor-core MMAs, exp2, 64-bit integer div/rem."""
    return dict(
        mma=len(re.findall(r"^\s*mma\.sync", ptx, re.M)),
        wgmma=len(re.findall(r"^\s*wgmma\.mma_async", ptx, re.M)),
        fma_f32=len(re.findall(r"^\s*fma\.rn\.f32", ptx, re.M)),
        ex2=len(re.findall(r"^\s*ex2\.approx", ptx, re.M)),
        divrem64=len(re.findall(r"^\s*(?:div|rem)\.[su]64", ptx, re.M)),
    )


# ----------------------------------------------------------------------------- SASS
SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
MMA_OPS = ("HMMA", "HGMMA", "IMMA", "DMMA", "WGMMA")

def parse_sass(sass):
    """(address, predicated, opcode, operands) of each SASS instruction (cuobjdump -sass)."""
    ins = []
    for m in SASS_LINE.finditer(sass):
        addr = int(m.group(1), 16)
        ins.append((addr, bool(m.group(2)), m.group(3), m.group(4).strip()))
    return ins

def is_mma(op):
    return op.split(".")[0] in MMA_OPS

def loop_counts(sass):
    """The main loop of a kernel, from its SASS: the natural loop (back edge tail -> head) whose
    body holds the most tensor-core instructions; over its control-flow graph (back edges
    removed) the shortest and the longest path head -> tail, counted in non-MMA instructions
    (every instruction but HMMA/HGMMA/IMMA/DMMA and NOP): the mask-free interior tile takes
    the shortest path, a masked (diagonal / positive / last) tile the longest. None if the
    kernel has no loop.""" 
    ins = parse_sass(sass)
    if not ins:
        return None
    idx = {a: i for i, (a, *_r) in enumerate(ins)}
    leaders = {0}
    succ_of = {}
    for i, (a, pred, op, args) in enumerate(ins):
        base = op.split(".")[0]
        if base in ("BRA", "EXIT", "RET", "BRX", "JMP"):
            tgt = None
            mt = re.search(r"0x([0-9a-f]+)", args)
            if base == "BRA" and mt:
                tgt = idx.get(int(mt.group(1), 16))
                if tgt is not None:
                    leaders.add(tgt)
            if i + 1 < len(ins):
                leaders.add(i + 1)
            cond = pred or ("P" in args.split(",")[0] and base == "BRA" and "," in args)
            s = []
            if tgt is not None:
                s.append(tgt)
            if cond or base not in ("BRA", "EXIT", "RET", "BRX", "JMP"):
                if i + 1 < len(ins):
                    s.append(i + 1)
            succ_of[i] = s
    starts = sorted(leaders)
    blocks = []
    for k, st in enumerate(starts):
        en = starts[k + 1] if k + 1 < len(starts) else len(ins)
        blocks.append((st, en))
    bid = {st: b for b, (st, en) in enumerate(blocks)}
    succ = []
    for b, (st, en) in enumerate(blocks):
        last = en - 1
        if last in succ_of:
            succ.append([bid[t] for t in succ_of[last] if t in bid])
        else:
            succ.append([b + 1] if b + 1 < len(blocks) else [])
    pred = [[] for _ in blocks]
    for b, ss in enumerate(succ):
        for t in ss:
            pred[t].append(b)
    backs = [(b, t) for b, ss in enumerate(succ) for t in ss if t <= b]
    best = None
    for tail, head in backs:
        body = {head}
        stack = [tail]
        while stack:
            x = stack.pop()
            if x in body:
                continue
            body.add(x)
            stack.extend(pred[x])
        n_mma = sum(1 for b in body for i in range(*blocks[b]) if is_mma(ins[i][2]))
        if best is None or n_mma > best[0]:
            best = (n_mma, tail, head, body)
    if best is None:
        return None
    n_mma, tail, head, body = best
    def cost(b):
        return sum(1 for i in range(*blocks[b]) if not is_mma(ins[i][2]) and ins[i][2] != "NOP")
    def mcount(b, pre):
        return sum(1 for i in range(*blocks[b]) if ins[i][2].startswith(pre))
    # shortest / longest path head -> tail within body, ignoring back edges
    dist = {head: cost(head)}
    order = sorted(body)
    for b in order:
        if b not in dist:
            continue
        for t in succ[b]:
            if t in body and t > b:
                d = dist[b] + cost(t)
                if t not in dist or d < dist[t]:
                    dist[t] = d
    longest = {head: cost(head)}
    for b in order:
        if b not in longest:
            continue
        for t in succ[b]:
            if t in body and t > b:
                d = longest[b] + cost(t)
                if t not in longest or d > longest[t]:
                    longest[t] = d
    return dict(loop_mma=n_mma, loop_min=dist.get(tail), loop_max=longest.get(tail), loop_blocks=len(body),
                loop_mufu=sum(mcount(b, "MUFU") for b in body))


def sass_of(cubin: bytes) -> str:
    if not _CUOBJDUMP:
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_CUOBJDUMP, "-sass", f.name], capture_output=True, text=True).stdout


def sass_counts(sass: str, similarities_per_thread: int):
    """Static SASS counts of the whole kernel (tensor-core and MUFU instructions) and of its
    main loop: `epi_per_sim` = non-MMA instructions of the loop's shortest path (an interior
    tile) per similarity a thread computes (BLOCK_M·BLOCK_N / threads), `epi_per_sim_masked`
    the same for the longest path (a masked tile)."""
    ins = parse_sass(sass)
    ops = [op for _a, _p, op, _r in ins]
    out = dict(sass_hmma=sum(o.startswith("HMMA") for o in ops), sass_hgmma=sum(o.startswith("HGMMA") for o in ops),
               sass_mufu=sum(o.startswith("MUFU") for o in ops),
               sass_mufu_ex2=sum(o.startswith("MUFU.EX2") for o in ops), sass_instructions=len(ops),
               loop_mma=None, loop_min=None, loop_max=None, loop_mufu=None, epi_per_sim=None, epi_per_sim_masked=None)
    if not ins:
        return out
    lc = loop_counts(sass)
    if lc:
        out.update({k: lc[k] for k in ("loop_mma", "loop_min", "loop_max", "loop_mufu")})
        if lc["loop_min"] is not None:
            out["epi_per_sim"] = round(lc["loop_min"] / similarities_per_thread, 2)
        if lc["loop_max"] is not None:
            out["epi_per_sim_masked"] = round(lc["loop_max"] / similarities_per_thread, 2)
    return out


def compile_one(task):
    import triton
    from triton.backends.compiler import GPUTarget
    mods = _MODS or load_kernels()
    kernel, target = task["kernel"], task["target"]
    tuner = getattr(mods[KERNEL_MODULE[kernel]], kernel)
    fn = tuner.fn
    cfgs = tuner.configs
    cfg = cfgs[task["config_index"]]
    dtype, prec32 = DTYPES[task["dtype_key"]]
    D = task["D"]
    D_eff = 100 if "odd" in task["variant"] else D
    flags = kernel_flags(mods["tiles"], dtype, prec32, D_eff, target)
    row = dict(task, triton=triton.__version__, config=config_label(cfg),
               fallback=task.get("fallback", task["config_index"] == len(cfgs) - 1), dtype=dtype, prec=flags["PREC"],
               cast_f32=flags["CAST_F32"], h_bf16=flags["H_BF16"], D=D_eff,
               block_d=flags["BLOCK_D"], d_chunks=flags["D_CHUNKS"], block_do=flags["BLOCK_DO"])
    t0 = time.perf_counter()
    try:
        values = launch_args(kernel, task["variant"], dtype, D)
        constexpr_values = dict(cfg.kwargs, **VARIANTS[kernel][task["variant"]], **flags)
        signature, constexprs, attrs = {}, {}, {}
        for i, p in enumerate(fn.params):
            name = p.name
            if p.is_constexpr:
                if name not in constexpr_values:
                    raise KeyError(f"constexpr {name} of {kernel} has no value in compile_triton.py")
                signature[name] = "constexpr"
                constexprs[name] = constexpr_values[name]
                continue
            if name not in values:
                raise KeyError(f"argument {name} of {kernel} has no value in compile_triton.py")
            ty, div16, const = specialize(values[name], getattr(p, "do_not_specialize", False),
                                          getattr(p, "do_not_specialize_on_alignment", False))
            signature[name] = ty
            if const is not None:
                constexprs[name] = const
            if div16:
                attrs[(i,)] = [["tt.divisibility", 16]]
        extra = set(values) - {p.name for p in fn.params}
        if extra:
            raise KeyError(f"{kernel} has no argument(s) {sorted(extra)} (the kernel changed?)")
        options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if getattr(cfg, "num_ctas", 1) != 1:
            options["num_ctas"] = cfg.num_ctas
        if getattr(cfg, "maxnreg", None) is not None:
            options["maxnreg"] = cfg.maxnreg
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(make_source(fn, signature, constexprs, attrs),
                                      target=GPUTarget("cuda", target, 32), options=options)
        row["seconds"] = round(time.perf_counter() - t0, 2)
        res = resource_usage(compiled.asm["cubin"])
        ptxas = log.getvalue()
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas)
        r = re.search(r"Used (\d+) registers", ptxas)
        local = max(res.get("LOCAL", 0), res.get("STACK", 0)) if res else None
        row.update(
            regs=res.get("REG", int(r.group(1)) if r else None),
            local_bytes=local,  # per-thread local memory (stack frame): the driver's LOCAL_SIZE_BYTES
            spill_stores=int(m.group(1)) if m else None,
            spill_loads=int(m.group(2)) if m else None,
            shared=compiled.metadata.shared,
            static_shared=res.get("SHARED"),
            **ptx_counts(compiled.asm["ptx"]),
            **sass_counts(sass_of(compiled.asm["cubin"]),
                          cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_N"] // (32 * cfg.num_warps)),
        )
        # spill bytes: ptxas' "bytes spill stores" (the local-memory size when no log was captured)
        row["spill_bytes"] = row["spill_stores"] if row["spill_stores"] is not None else (local or 0)
        row["n_spills"] = (local or 0) // 4  # what compiled.n_spills would be (LOCAL_SIZE_BYTES / 4)
        row["error"] = None
    except Exception as e:  # noqa: BLE001  (every failure is a row, reported at the end)
        row["seconds"] = round(time.perf_counter() - t0, 2)
        msg = f"{type(e).__name__}: {e}"
        row["error"] = msg if len(msg) < 4000 else msg[:4000] + " ..."
    return row


# ----------------------------------------------------------------------------- judging
def spill_key(row):
    return f"{row['kernel']} {row['variant']} D{row['D']} {row['dtype_key']} sm_{row['target']}"


# Epilogue budget: non-MMA SASS instructions of the forward main loop's interior-tile path per
# similarity, for the common case (the FAST variants: no statistics, fixed τ; D in one chunk;
# bf16/fp16 operands). Issue 16's goal is 10, met by the 32-similarities-per-thread configs
# (7.9-9.8, triton 3.8, sm_80/sm_90); the 16-per-thread fallback measures 12-15, so the gate
# holds every config at 16 against regressions. fp32 (tf32) operands add a conversion per
# loaded element and are reported, not judged.
EPILOGUE_GOAL = 10
EPILOGUE_BUDGET = 16


def epilogue_checked(row):
    """Whether the epilogue budget applies to this row (see EPILOGUE_BUDGET)."""
    fast = row["kernel"] in ("self_fwd_kernel", "cross_fwd_kernel") and row["variant"] in ("nolab", "inbatch")
    return fast and row.get("d_chunks") == 1 and not row["cast_f32"] and row["dtype"] in ("bf16", "fp16")


def needs_tensor_cores(row):
    """16-bit or tf32 operands on sm_80+ (not the pos-only variants, which have no product
    loop): the main loop must hold tensor-core instructions (HMMA; HGMMA on sm_90 where
    triton emits warpgroup MMA)."""
    if row["target"] < 80 or row["cast_f32"] or "pos-only" in row["variant"]:
        return False
    return row["dtype"] in ("bf16", "fp16") or row["prec"] in ("tf32", "tf32x3")


def judge(row, fail_on_ieee_spills=False, fail_on_baseline_spills=False, fail_on_config_spills=False):
    """(status, fatal) of one row (fail_on_config_spills: a spill of any kept config and of a
    BASELINE_SPILLS row is FAIL-SPILL; the exact-fp32 paths follow fail_on_ieee_spills)."""
    if row["error"]:
        return "ERROR", True
    if needs_tensor_cores(row) and row.get("loop_mma") == 0:
        return "FAIL-NO-MMA", True  # a 16-bit main loop without HMMA / HGMMA
    if epilogue_checked(row) and row.get("epi_per_sim") is not None and row["epi_per_sim"] > EPILOGUE_BUDGET:
        return "FAIL-EPILOGUE", True
    limit = SMEM_LIMIT.get(row["target"])
    exact = row["prec"] in ("ieee", "tf32x3") and (row["dtype"] == "fp32" or row["cast_f32"])
    if limit is not None and row["shared"] > limit:
        return ("FAIL-SMEM", True) if row["fallback"] else ("PRUNED", False)
    if row["spill_bytes"] > 0 or row["n_spills"] > 0:
        if exact and row["fallback"]:
            return "KNOWN-SPILL", fail_on_ieee_spills
        if fail_on_config_spills:
            return "FAIL-SPILL", True
        if not row["fallback"]:
            return "spills", False
        if spill_key(row) in BASELINE_SPILLS:
            return "BASELINE-SPILL", fail_on_baseline_spills
        return "FAIL-SPILL", True
    if limit is not None and row["shared"] + (row["static_shared"] or 0) > limit:
        return "smem-tight", False  # dynamic fits; dynamic + static 1 KiB does not
    return "ok", False


def dtype_label(row):
    if row["cast_f32"]:
        return f"{row['dtype_key']}->fp32/{row['prec']}"
    if row["dtype"] == "fp32":
        return f"fp32/{row['prec']}"
    return row["dtype"] + ("(H bf16)" if row["h_bf16"] else "")


HEADER = ("kernel", "config", "variant", "D", "dtype/prec", "target", "triton", "regs", "spill B",
          "smem B", "compile s", "status")


def fmt_row(row, status):
    cfg = row["config"] + (" (fallback)" if row["fallback"] else "")
    vals = (row["kernel"], cfg, row["variant"], row["D"], dtype_label(row), f"sm_{row['target']}", row["triton"])
    if row["error"]:
        return vals + ("-", "-", "-", row["seconds"], status)
    return vals + (row["regs"], row["spill_bytes"], row["shared"], row["seconds"], status)


WIDTHS = (18, 24, 20, 4, 18, 6, 6, 5, 7, 7, 9, 11)


def print_line(vals):
    print("  ".join(str(v).ljust(w) for v, w in zip(vals, WIDTHS)).rstrip(), flush=True)


def summarize(rows):
    """Per kernel x dtype/prec x target: regs, spills and smem ranges over the configs, the
    spilling and the pruned configs."""
    groups = {}
    for r in rows:
        if r["error"]:
            continue
        groups.setdefault((r["kernel"], dtype_label(r), r["target"], r["triton"]), []).append(r)
    out = []
    for (k, dl, tg, tv), rs in sorted(groups.items(), key=lambda kv: (KERNELS.index(kv[0][0]), kv[0][1], kv[0][2], kv[0][3])):
        fb = [r for r in rs if r["fallback"] and r["D"] == 128 and r["variant"] == list(VARIANTS[k])[0]]
        fbr = fb[0] if fb else None
        spill = sorted({f"{r['config']}{' D' + str(r['D']) if r['D'] != 128 else ''}"
                        f"{' ' + r['variant'] if r['variant'] != list(VARIANTS[k])[0] else ''}"
                        f" ({r['spill_bytes']} B)" for r in rs if r["spill_bytes"] > 0 or r["n_spills"] > 0})
        pruned = sorted({f"{r['config']} ({r['shared'] // 1024} KiB)" for r in rs if r["status"] == "PRUNED"})
        out.append(dict(
            kernel=k, dtype=dl, target=f"sm_{tg}", triton=tv, n=len(rs),
            regs=f"{min(r['regs'] for r in rs)}-{max(r['regs'] for r in rs)}",
            smem_kib=f"{min(r['shared'] for r in rs) / 1024:.0f}-{max(r['shared'] for r in rs) / 1024:.0f}",
            fallback=(f"{fbr['regs']} regs, {fbr['spill_bytes']} B spill, {fbr['shared']} B smem" if fbr else "-"),
            spilling=", ".join(spill) or "-", pruned=", ".join(pruned) or "-",
            epilogue=_range([r["epi_per_sim"] for r in rs if epilogue_checked(r) and r.get("epi_per_sim") is not None]),
            mufu=_range([r["sass_mufu"] for r in rs if r.get("sass_mufu") is not None]),
            tensor_core=_range([(r.get("sass_hmma") or 0) + (r.get("sass_hgmma") or 0) for r in rs])))
    return out


def _range(xs):
    return f"{min(xs)}-{max(xs)}" if xs else "-"


def print_summary(summary):
    print("\n== Summary per kernel x dtype x target (ranges over every compiled config / variant)")
    w = (18, 18, 6, 6, 4, 8, 9, 40)
    print("  ".join(s.ljust(x) for s, x in zip(("kernel", "dtype/prec", "target", "triton", "n", "regs",
                                                  "smem KiB", "fallback (D=128, default)"), w)))
    for s in summary:
        print("  ".join(str(v).ljust(x) for v, x in zip((s["kernel"], s["dtype"], s["target"], s["triton"], s["n"],
                                                           s["regs"], s["smem_kib"], s["fallback"]), w)))
        if s["spilling"] != "-":
            print(f"{'':20}spills: {s['spilling']}")
        if s["pruned"] != "-":
            print(f"{'':20}pruned (smem > limit): {s['pruned']}")


# ----------------------------------------------------------------------------- markdown
def dump_json(path, obj):
    """JSON with one row per line (small diffs when the table is re-committed)."""
    def enc(x):
        return json.dumps(x, default=str)

    def doc_text(doc):
        rows = ",\n".join("  " + enc(r) for r in doc["rows"])
        return ('{"meta": ' + enc(doc["meta"]) + ',\n "summary": [\n' + ",\n".join("  " + enc(x) for x in doc["summary"])
                + '],\n "rows": [\n' + rows + "]}")
    if "runs" in obj:
        text = '{"runs": [\n' + ",\n".join(doc_text(d) for d in obj["runs"]) + "]}\n"
    else:
        text = doc_text(obj) + "\n"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)


def render_markdown(docs, path):
    lines = ["# Triton kernels: ahead-of-time compile resources (no GPU)", "",
             "Produced by `.ci/compile_triton.py` (run by `.ci/compile_triton.sh` in CI): `triton.compile` for",
             "`GPUTarget(\"cuda\", 75/80/90, 32)`; registers from the cubin (cuobjdump: what the driver reports",
             "as `n_regs`), spill B = ptxas' bytes of spill stores (JSON `n_spills`: stack frame / 4, as the",
             "driver would give `n_spills`), smem B = `metadata.shared` (dynamic shared memory,",
             "`metadata.shared` (dynamic, what the runtime checks against the device limit: sm_75 64 KiB,",
             "sm_80 166912 B, sm_90 232448 B). Compiled figures, measured here; no runtime behaviour.",
             "Status: ok; spills (an autotune config, not fatal); PRUNED (smem over the limit: the",
             "autotuner drops it at run time); KNOWN-SPILL (fallback config of an exact-fp32 path: fp32",
             "ieee, tf32x3, sm_75; open issue); BASELINE-SPILL (fallback config, listed in the script's",
             "BASELINE_SPILLS); FAIL-* / ERROR fail the gate. mma / wgmma / ex2 / div/rem64: static",
             "counts of `mma.sync`, `wgmma.mma_async`, `ex2.approx` and 64-bit integer div/rem in the PTX.",
             "From the SASS (cuobjdump -sass of the cubin): HMMA / HGMMA / MUFU = static counts in the",
             "kernel; loop MMA = tensor-core instructions in the main loop (the loop holding the most);",
             "epi/sim = non-MMA instructions on the main loop's shortest path (an interior, mask-free",
             "column tile) per similarity a thread computes (BLOCK_M·BLOCK_N / threads); masked = the",
             "longest path (a diagonal / positive / last tile). FAIL-NO-MMA: a 16-bit or tf32 main loop",
             f"without tensor-core instructions; FAIL-EPILOGUE: epi/sim over {EPILOGUE_BUDGET} in the common",
             f"case (the nolab / inbatch variants: no statistics, fixed τ; issue 16's goal: {EPILOGUE_GOAL}).",
             "Sizes: M = N = 4096 (queue 65536), D = 128 unless stated; `odd` = M = 1000, D = 100.", ""]
    for doc in docs:
        meta = doc["meta"]
        lines += [f"## triton {meta['triton']} (ptxas {meta['ptxas']})", "",
                  f"{meta['n_compiled']} variants, {meta['wall_seconds']:.0f} s wall with {meta['jobs']} processes "
                  f"on this 2-core machine (shared with other work); matrix: {meta['matrix']}; "
                  f"verdict: {'FAIL' if meta['failed'] else 'pass'}.", ""]
        if meta.get("skipped"):
            lines += [f"Not compiled by the {meta['matrix']} matrix: " + "; ".join(meta["skipped"]), ""]
        nk = meta.get("new_kernels")
        if nk:  # rows of the kernels added later, compiled in a run of their own
            lines += [f"Rows of {', '.join(nk['kernels'])}: a separate run, {nk['n_compiled']} variants, "
                      f"{nk['wall_seconds']:.0f} s wall with {nk['jobs']} process(es), matrix {nk['matrix']}, "
                      f"targets sm_{nk['targets'].replace(',', '/sm_')}, kernel sha {nk['kernel_sha']}; "
                      f"verdict: {'FAIL' if nk['failed'] else 'pass'}.", ""]
        lines += ["### Summary", "",
                  "| kernel | dtype/prec | target | n | regs | smem KiB | tensor-core instr. | MUFU | epi/sim (common case) "
                  "| fallback (D=128, default variant) | spilling | pruned (smem) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for s in doc["summary"]:
            lines.append(f"| {s['kernel']} | {s['dtype']} | {s['target']} | {s['n']} | {s['regs']} | {s['smem_kib']} | "
                         f"{s.get('tensor_core', '-')} | {s.get('mufu', '-')} | {s.get('epilogue', '-')} | "
                         f"{s['fallback']} | {s['spilling']} | {s['pruned']} |")
        extra_cols = ("mma", "wgmma", "ex2", "div/rem64", "HMMA", "HGMMA", "MUFU", "loop MMA", "epi/sim", "masked")
        lines += ["", "### Every variant", "", "| " + " | ".join(HEADER + extra_cols) + " |",
                  "|" + "---|" * (len(HEADER) + len(extra_cols))]
        for r in doc["rows"]:
            vals = fmt_row(r, r["status"])
            sass = tuple("-" if r.get(k) is None else r[k] for k in ("sass_hmma", "sass_hgmma", "sass_mufu", "loop_mma",
                                                                      "epi_per_sim", "epi_per_sim_masked"))
            extra = ("-",) * len(extra_cols) if r["error"] else (r["mma"], r["wgmma"], r["ex2"], r["divrem64"]) + sass
            lines.append("| " + " | ".join(str(v) for v in vals + extra) + " |")
        errs = [r for r in doc["rows"] if r["error"]]
        if errs:
            lines += ["", "### Errors", ""] + [f"- {r['kernel']} {r['config']} {r['variant']} {dtype_label(r)} "
                                               f"sm_{r['target']}: `{r['error'].splitlines()[0][:300]}`" for r in errs]
        lines.append("")
    Path(path).write_text("\n".join(lines))


# ----------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default="80,90,75", help="compute capabilities, e.g. 80,90,75")
    ap.add_argument("--jobs", type=int, default=2, help="compile processes")
    ap.add_argument("--json", help="write every row and the summary to this JSON file")
    ap.add_argument("--markdown", help="write the table as Markdown to this file")
    ap.add_argument("--matrix", choices=tuple(MATRICES), default="ci",
                    help="which variants: " + "; ".join(f"{k}: {v}" for k, v in MATRICES.items()))
    ap.add_argument("--subset", dest="matrix", action="store_const", const="subset",
                    help="same as --matrix subset (" + MATRICES["subset"] + ")")
    ap.add_argument("--fail-on-ieee-spills", action="store_true",
                    help="also fail on spills of the exact-fp32 paths (fp32 ieee / tf32x3, sm_75) in the fallback config")
    ap.add_argument("--fail-on-baseline-spills", action="store_true",
                    help="also fail on the fallback-config spills listed in BASELINE_SPILLS (there when the gate came)")
    ap.add_argument("--fail-on-config-spills", action="store_true",
                    help="fail on a spill of any kept autotune config, not only the fallback (BASELINE_SPILLS "
                         "included; the exact-fp32 fallbacks follow --fail-on-ieee-spills): CI's setting")
    ap.add_argument("--only", default="", help="comma-separated kernel names (default: all)")
    ap.add_argument("--configs", choices=("all", "fallback"), default="all")
    ap.add_argument("--variants", choices=("all", "default"), default="all")
    ap.add_argument("--variant-names", default="", help="comma-separated variant names, e.g. queue+gk,inbatch+odd "
                                                        "(default: every variant --variants allows)")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="subset of " + ",".join(DTYPES))
    ap.add_argument("--dims", default="128,512")
    ap.add_argument("--cache-dir", help="triton cache (default: a fresh temporary one, so times are real compiles)")
    ap.add_argument("--render", nargs="+", metavar="JSON", help="only render these JSON results into --markdown")
    args = ap.parse_args(argv)

    if args.render:  # re-judge stored rows with the current rules, then write --markdown / --json
        docs = []
        for p in args.render:  # one run, or a {"runs": [...]} file (benchmarks/results/triton_resources.json)
            obj = json.loads(Path(p).read_text())
            docs += obj["runs"] if "runs" in obj else [obj]
        for doc in docs:
            for row in doc["rows"]:
                row["status"], row["fatal"] = judge(row, args.fail_on_ieee_spills, args.fail_on_baseline_spills, args.fail_on_config_spills)
            doc["summary"] = summarize(doc["rows"])
            doc["meta"]["failed"] = any(r["fatal"] for r in doc["rows"])
            if doc["meta"].get("new_kernels"):  # a separate run's rows, re-judged with the rest
                nk = doc["meta"]["new_kernels"]
                nk["failed"] = any(r["fatal"] for r in doc["rows"] if r["kernel"] in nk["kernels"])
            doc["meta"]["fail_on_ieee_spills"] = args.fail_on_ieee_spills
            doc["meta"]["fail_on_baseline_spills"] = args.fail_on_baseline_spills
            doc["meta"]["fail_on_config_spills"] = args.fail_on_config_spills
        if args.markdown:
            render_markdown(docs, args.markdown)
        if args.json:
            dump_json(args.json, dict(runs=docs))
        return 0

    for k in args.only.split(",") if args.only else []:
        if k not in KERNELS:
            ap.error(f"unknown kernel {k!r}; one of {', '.join(KERNELS)}")
    for d in args.dtypes.split(","):
        if d not in DTYPES:
            ap.error(f"unknown dtype {d!r}; one of {', '.join(DTYPES)}")
    tmp_cache = None
    if args.cache_dir:
        os.environ["TRITON_CACHE_DIR"] = args.cache_dir
    else:
        tmp_cache = tempfile.mkdtemp(prefix="triton-aot-")
        os.environ["TRITON_CACHE_DIR"] = tmp_cache
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"

    t_start = time.perf_counter()
    mods = load_kernels()
    import triton
    ptxas = find_tool("ptxas")
    if not ptxas:
        print("compile_triton.py: ptxas not found (triton ships it in backends/nvidia/bin)", file=sys.stderr)
        return 2
    ptxas_version = re.findall(r"release ([\d.]+)", subprocess.run([ptxas, "--version"], capture_output=True,
                                                                   text=True).stdout) or ["?"]
    if not find_tool("cuobjdump"):
        print("warning: cuobjdump not found: registers/spills from the ptxas log only", file=sys.stderr)
    tasks, skipped = task_list(mods, args)
    print(f"triton {triton.__version__} (ptxas {ptxas_version[0]}), {len(tasks)} variants, {args.jobs} processes, "
          f"targets sm_{', sm_'.join(args.targets.split(','))}", flush=True)
    print_line(HEADER)
    rows = []
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    try:
        if args.jobs > 1 and len(tasks) > 1:
            with ctx.Pool(args.jobs, initializer=_init_worker) as pool:
                results = pool.imap(compile_one, tasks, chunksize=1)
                for row in results:
                    row["status"], row["fatal"] = judge(row, args.fail_on_ieee_spills, args.fail_on_baseline_spills, args.fail_on_config_spills)
                    rows.append(row)
                    print_line(fmt_row(row, row["status"]))
        else:
            _init_worker()
            for t in tasks:
                row = compile_one(t)
                row["status"], row["fatal"] = judge(row, args.fail_on_ieee_spills, args.fail_on_baseline_spills, args.fail_on_config_spills)
                rows.append(row)
                print_line(fmt_row(row, row["status"]))
    finally:
        if tmp_cache:
            shutil.rmtree(tmp_cache, ignore_errors=True)
    wall = time.perf_counter() - t_start

    summary = summarize(rows)
    print_summary(summary)
    if skipped:
        print(f"\n== Skipped by the {args.matrix} matrix ({MATRICES[args.matrix]}); not compiled:")
        for s in skipped:
            print("  " + s)
    errors = [r for r in rows if r["error"]]
    for r in errors:
        print(f"\nERROR {r['kernel']} {r['config']} {r['variant']} {dtype_label(r)} sm_{r['target']}:\n{r['error']}")
    known = [r for r in rows if r["status"] == "KNOWN-SPILL"]
    if known:
        print(f"\n!! KNOWN: {len(known)} fallback-config variants of the exact-fp32 paths spill "
              f"(fp32 ieee / tf32x3 / sm_75; open issue). Not fatal unless --fail-on-ieee-spills:")
        for r in known:
            print(f"!!   {r['kernel']} {r['variant']} D={r['D']} {dtype_label(r)} sm_{r['target']}: "
                  f"{r['spill_bytes']} B spilled, {r['regs']} regs")
    base = [r for r in rows if r["status"] == "BASELINE-SPILL"]
    if base:
        print(f"\n!! BASELINE: {len(base)} fallback-config variants spill as they did when the gate came "
              f"(BASELINE_SPILLS; fatal with --fail-on-baseline-spills):")
        for r in base:
            print(f"!!   {r['kernel']} {r['variant']} D={r['D']} {dtype_label(r)} sm_{r['target']}: "
                  f"{r['spill_bytes']} B spilled, {r['regs']} regs")
    fatal = [r for r in rows if r["fatal"]]
    counts = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    print(f"\n== triton {triton.__version__}: {len(rows)} variants compiled in {wall:.0f} s wall "
          f"({sum(r['seconds'] for r in rows):.0f} s of compiles, {args.jobs} processes); "
          + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    for r in fatal:
        print(f"FAIL {r['status']}: {r['kernel']} {r['config']} {r['variant']} D={r['D']} {dtype_label(r)} "
              f"sm_{r['target']}" + (f" ({r['spill_bytes']} B spill, {r['shared']} B smem)" if not r["error"] else ""))
    meta = dict(triton=triton.__version__, ptxas=ptxas_version[0], jobs=args.jobs, wall_seconds=round(wall, 1),
                n_compiled=len(rows), matrix=args.matrix, skipped=skipped, kernel_sha=kernel_sha(), failed=bool(fatal),
                fail_on_ieee_spills=args.fail_on_ieee_spills,
                fail_on_baseline_spills=args.fail_on_baseline_spills, fail_on_config_spills=args.fail_on_config_spills,
                targets=args.targets, smem_limits=SMEM_LIMIT)
    if args.json:
        dump_json(args.json, dict(meta=meta, summary=summary, rows=rows))
    if args.markdown:
        render_markdown([dict(meta=meta, summary=summary, rows=rows)], args.markdown)
    print("compile gate: " + ("FAILED" if fatal else "passed"))
    return 1 if fatal else 0


if __name__ == "__main__":
    sys.exit(main())
