#!/usr/bin/env python3
"""The paper model of the GPU kernels: lower-bound times per hardware unit, from the SASS.

NOT RUN ON A GPU. Every figure here is a model; `python -m fastntxent.doctor` on a real GPU
measures what this predicts, and its measurement replaces it.

For each kernel (Triton self/cross forward and backward, the CUDA C++ self-family kernels) and
one chosen config, the kernel is compiled ahead of time for sm_80 / sm_90 (Triton through the
compile gate's own `compile_one` of `.ci/compile_triton.py`; CUDA through nvcc -cubin), the
SASS is disassembled with cuobjdump and the main loop (the innermost loop holding the
exponentials) is counted per tile: tensor-core MMAs (→ MMA FLOP), MUFU ops, FP32-pipe and
integer-pipe instructions, all issued instructions, shared-memory wavefronts. Loops nested in
the main loop (the CUDA kernels' D-chunk and staging loops) are weighted by their trip counts.
With the tile count of a problem (M rows, D dims) and the datasheet rates of an A100 / H100,
each unit gets a lower-bound time; the largest binds, and with perfect overlap the kernel
cannot beat it: the best-case fraction of the matmul peak = useful FLOP / peak / bound.

Usage: python benchmarks/gpu_model.py [--json out.json] [--markdown out.md]
(≈ 20 compiles, a few minutes on 2 cores). Configs: for each Triton kernel the largest tile
(BLOCK_M·BLOCK_N, then fewer warps) that compiles without spills at D = 128 in the gate's table
`benchmarks/results/triton_resources.json` (what a well-tuned autotuner could pick), else the
fallback config; it is compiled here again for D = 128 and 512.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GATE = ROOT / ".ci" / "compile_triton.py"
RESOURCES = ROOT / "benchmarks" / "results" / "triton_resources.json"
CUDA_SRC = ROOT / "csrc" / "cuda" / "self_similarity_kernels.cu"
LABEL = "MODEL — not run on a GPU; the doctor's measurement (python -m fastntxent.doctor) replaces it"


# ----------------------------------------------------------------------------- devices
@dataclasses.dataclass(frozen=True)
class Device:
    """Datasheet rates of one GPU. Per-SM rates are per clock; `clock_hz` is the clock at which
    the vendor's tensor-core peak is quoted, so every unit is compared at that one clock."""
    name: str
    sms: int
    clock_hz: float
    tensor_fma_per_clk_sm: dict   # dense FMA / clock / SM on tensor cores, per operand type
    fp32_lanes: int               # FP32 add/mul/FMA results / clock / SM (CUDA cores)
    int_lanes: int                # 32-bit integer add/compare/logic results / clock / SM
    mufu_lanes: int               # MUFU (ex2, lg2, rcp, rsqrt, sin, cos) results / clock / SM
    issue_warps: int              # warp instructions issued / clock / SM (one per scheduler)
    smem_wavefronts: int          # shared-memory wavefronts (128 B: 32 banks × 4 B) / clock / SM
    l2_bytes_per_clk: float       # L2 → SM read bandwidth, whole chip, bytes / clock
    hbm_bytes_per_s: float

    def matmul_peak(self, dtype: str) -> float:
        """FLOP/s of the matmul that `dtype` inputs run on (fp32: exact FFMA, torch's "highest")."""
        if dtype == "fp32":
            return 2.0 * self.fp32_lanes * self.sms * self.clock_hz
        return 2.0 * self.tensor_fma_per_clk_sm[dtype] * self.sms * self.clock_hz


DEVICES = {
    # NVIDIA A100 Tensor Core GPU Architecture whitepaper (2020), Table 1/3 (A100 SXM4):
    # 108 SMs, boost 1410 MHz, 1024 dense FP16/BF16 FMA/clk/SM and 512 TF32 (Table 3 "FMA/clk/SM";
    # = 312 / 156 TFLOP/s), 19.5 TFLOP/s FP32 = 64 FP32 lanes/SM; "L2 cache read bandwidth
    # 5120 Bytes/clk". HBM2e 2039 GB/s: NVIDIA A100 80GB SXM datasheet.
    # CUDA C++ Programming Guide, "Arithmetic Instructions" throughput table, cc 8.0: 64 FP32
    # add/mul/FMA, 64 32-bit integer add/compare/logical, 16 MUFU (exp2/log2/rcp/rsqrt/sin/cos)
    # results per clock per SM. Four SM sub-partitions, one warp scheduler each dispatching one
    # warp instruction per clock (whitepaper, "A100 SM architecture"). Shared memory: 32 banks of
    # 4 bytes, each bank one 32-bit word per clock (programming guide, "Shared Memory", cc 8.x/9.0).
    "A100": Device("A100-SXM4-80GB", sms=108, clock_hz=1.41e9,
                   tensor_fma_per_clk_sm={"bf16": 1024, "fp16": 1024, "tf32": 512},
                   fp32_lanes=64, int_lanes=64, mufu_lanes=16, issue_warps=4, smem_wavefronts=1,
                   l2_bytes_per_clk=5120.0, hbm_bytes_per_s=2.039e12),
    # NVIDIA H100 Tensor Core GPU Architecture whitepaper (2022), Table 2/3 (H100 SXM5): 132 SMs,
    # 2048 dense FP16/BF16 FMA/clk/SM and 1024 TF32 ("2x the A100 SM clock-for-clock"),
    # 989.4 / 494.7 TFLOP/s dense → clock 989.4e12 / (2·2048·132) = 1830 MHz (the FP32 figure,
    # 66.9 TFLOP/s = 128 lanes, is quoted at 1980 MHz: unit ratios per clock are what decide the
    # binding unit). HBM3 3.35 TB/s: H100 SXM datasheet. Programming guide throughput table,
    # cc 9.0: 128 FP32, 64 integer, 16 MUFU per clock per SM. L2 bandwidth: no datasheet figure;
    # ASSUMED equal to A100's 5120 B/clk (a guess, flagged in the output).
    "H100": Device("H100-SXM5-80GB", sms=132, clock_hz=1.83e9,
                   tensor_fma_per_clk_sm={"bf16": 2048, "fp16": 2048, "tf32": 1024},
                   fp32_lanes=128, int_lanes=64, mufu_lanes=16, issue_warps=4, smem_wavefronts=1,
                   l2_bytes_per_clk=5120.0, hbm_bytes_per_s=3.35e12),
}
TARGET = {"A100": 80, "H100": 90}
L2_ASSUMED = {"H100"}


# ----------------------------------------------------------------------------- SASS
@dataclasses.dataclass(frozen=True)
class Instr:
    addr: int
    op: str      # full opcode with modifiers, e.g. "HMMA.16816.F32.BF16"
    text: str    # the instruction without the guard predicate


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def parse_sass(text: str) -> dict:
    """{function name: [Instr]} of a cuobjdump -sass listing."""
    out = {}
    for chunk in re.split(r"\n\s*Function : ", text)[1:]:
        name = chunk.split("\n", 1)[0].strip()
        instrs = []
        for a, body in _INSTR.findall(chunk):
            body = re.sub(r"^@!?U?P[T0-9]+\s+", "", body.strip())
            op = body.split()[0] if body else ""
            instrs.append(Instr(int(a, 16), op, body))
        out[name] = instrs
    return out


def loops(instrs) -> list:
    """(start, end) address ranges of the loops: a branch back to an earlier address."""
    found = []
    for ins in instrs:
        if ins.op.startswith("BRA"):
            m = re.search(r"0x([0-9a-f]+)\s*$", ins.text)
            if m and int(m.group(1), 16) <= ins.addr:
                found.append((int(m.group(1), 16), ins.addr))
    return sorted(set(found))


def mma_flop(op: str) -> float:
    """FLOP of one warp's tensor-core instruction (warpgroup MMA: a quarter of the group's)."""
    if op.startswith("HMMA."):
        return 2.0 * _hmma_shape(op)
    m = re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)", op)
    if m:
        return 2.0 * int(m.group(1)) * int(m.group(2)) * int(m.group(3)) / 4
    return 0.0


def _hmma_shape(op: str) -> int:
    """m·n·k of an HMMA: HMMA.16816 = m16 n8 k16, HMMA.1688 = m16 n8 k8, HMMA.884 = m8 n8 k4."""
    shape = op.split(".")[1]
    return {"16816": 16 * 8 * 16, "1688": 16 * 8 * 8, "1684": 16 * 8 * 4, "884": 8 * 8 * 4}[shape]


FP32_OPS = ("FADD", "FMUL", "FFMA", "FMNMX", "FSETP", "FSEL", "FSET", "FCHK", "FRND", "FSWZADD", "HADD2",
            "HMUL2", "HFMA2")
INT_OPS = ("IADD3", "IMAD", "ISETP", "LOP3", "SHF", "SEL", "IMNMX", "LEA", "PRMT", "IABS", "POPC", "FLO",
           "BMSK", "BREV", "IADD", "ISCADD", "VIADD", "VIMNMX", "PLOP3", "P2R", "R2P", "IDP", "IMUL")
MEMORY_OPS = ("LDS", "LDSM", "STS", "LDGSTS", "LDG", "STG", "LD", "ST", "RED", "ATOM", "ATOMS", "LDC",
              "UTMALDG", "UTMASTG", "STSM", "ULDC")
CONTROL_OPS = ("BRA", "BAR", "EXIT", "WARPSYNC", "BSSY", "BSYNC", "DEPBAR", "CALL", "RET", "YIELD", "JMP",
               "WARPGROUP", "ARRIVES", "SYNCS", "ELECT", "ENDCOLLECTIVE", "BPT", "MEMBAR", "ERRBAR", "CCTL")


def _width_bytes(op: str) -> int:
    """Bytes per thread of a memory instruction (.128 / .64 / 32-bit and smaller)."""
    for w in (128, 64):
        if f".{w}" in op:
            return w // 8
    return 4


def smem_wavefronts(op: str) -> int:
    """Shared-memory wavefronts (128 B each) of one warp instruction, conflict-free."""
    base = op.split(".")[0]
    if base == "LDSM":  # ldmatrix: .x1/.x2/.x4 8×8 16-bit matrices, one wavefront each
        m = re.search(r"\.M(?:T)?88\.(\d)", op)
        return int(m.group(1)) if m else 1
    if base in ("LDS", "STS", "LDGSTS", "STSM"):
        return max(1, _width_bytes(op) * 32 // 128)
    return 0


def classify(op: str) -> str:
    base = op.split(".")[0]
    if base in ("HMMA", "HGMMA", "IMMA", "DMMA"):
        return "mma"
    if base == "MUFU":
        return "mufu"
    if base in FP32_OPS:
        return "fp32"
    if base in INT_OPS:
        return "int"
    if base in MEMORY_OPS:
        return "memory"
    if base in CONTROL_OPS:
        return "control"
    if base == "NOP":
        return "nop"
    return "other"  # MOV, SHFL, S2R, conversions (F2F, F2FP, I2F), uniform-datapath U* ops ...


def count_range(instrs, lo, hi, exclude=()) -> Counter:
    """Per-warp counts of the instructions with lo <= addr <= hi, outside the `exclude` ranges."""
    c = Counter()
    for ins in instrs:
        if lo <= ins.addr <= hi and not any(a <= ins.addr <= b for a, b in exclude):
            add_instr(c, ins)
    return c


def add_instr(c: Counter, ins: Instr, weight: float = 1.0) -> None:
    cls = classify(ins.op)
    if cls == "nop":
        return
    c["issued"] += weight
    c[cls] += weight
    c["mma_flop"] += weight * mma_flop(ins.op)
    c["smem_wavefronts"] += weight * smem_wavefronts(ins.op)
    base = ins.op.split(".")[0]
    if ins.op.startswith("MUFU.EX2"):
        c["ex2"] += weight
    if base in ("FFMA",):
        c["ffma"] += weight
    if base in ("LDG", "LDGSTS"):
        c["ldg_bytes"] += weight * _width_bytes(ins.op)
    if base == "CALL":  # the callee (e.g. the 64-bit division slow path) is not counted
        c["calls"] += weight


def scaled(c: Counter, k: float) -> Counter:
    return Counter({key: v * k for key, v in c.items()})


def main_loop(instrs):
    """The innermost loop that holds MUFU.EX2 (the per-tile epilogue with its exponentials)."""
    best = None
    for lo, hi in loops(instrs):
        if any(lo <= i.addr <= hi and i.op.startswith("MUFU.EX2") for i in instrs):
            if best is None or hi - lo < best[1] - best[0]:
                best = (lo, hi)
    if best is None:
        raise ValueError("no loop with MUFU.EX2 in the kernel")
    return best


def children(ranges, outer):
    """The loops directly nested in `outer`."""
    inner = [r for r in ranges if outer[0] <= r[0] and r[1] <= outer[1] and r != outer]
    return [r for r in inner if not any(o != r and o[0] <= r[0] and r[1] <= o[1] for o in inner)]


def tile_counts(instrs, trips=None) -> Counter:
    """Per-warp instruction counts of one main-loop iteration (one tile). `trips(body, depth)`
    gives the trip count of a nested loop from its own body's counts (`barrier` included; the
    CUDA kernels' D-chunk and staging loops); a nested loop without a rule is an error."""
    ranges = loops(instrs)

    def flat(rng):
        c = count_range(instrs, rng[0], rng[1], exclude=children(ranges, rng))
        c["barrier"] = sum(1 for i in instrs if rng[0] <= i.addr <= rng[1] and i.op.startswith("BAR"))
        return c

    def walk(rng, depth):
        kids = children(ranges, rng)
        c = count_range(instrs, rng[0], rng[1], exclude=kids)
        for k in kids:
            if trips is None:
                raise ValueError(f"nested loop {k[0]:#x}-{k[1]:#x} in the main loop and no trip-count rule")
            c += scaled(walk(k, depth + 1), trips(flat(k), depth + 1))
        return c
    return walk(main_loop(instrs), 0)


def cuobjdump():
    import triton
    p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(p) if p.exists() else "cuobjdump"


def sass_of(cubin_path: str) -> str:
    return subprocess.run([cuobjdump(), "-sass", cubin_path], capture_output=True, text=True, check=True).stdout


# ----------------------------------------------------------------------------- kernels
@dataclasses.dataclass
class Case:
    """One kernel launch at one problem size, with its per-tile counts."""
    kernel: str            # e.g. "triton self_fwd"
    pass_: str             # "fwd" or "bwd"
    dtype: str             # operand type of the products: "bf16", "fp32"
    target: int
    config: str
    block_m: int
    block_n: int
    warps: int
    tiles_per_row_block: int   # main-loop iterations of one program over the columns, × grid z
    regs: int | None
    spill_bytes: int | None
    per_tile: Counter      # per-warp counts of one main-loop iteration
    l2_bytes_per_tile: float
    notes: str = ""
    tiles_per_row_block_fn: object = None   # M -> main-loop iterations of one row block


@dataclasses.dataclass(frozen=True)
class Problem:
    M: int
    D: int
    elem_bytes: int


def useful_flop(p: Problem, pass_: str) -> float:
    """The minimum matrix-product work: forward S = U·Uᵀ, 2·M²·D; backward (one recompute of S
    and H·U): 4·M²·D; together 6·M²·D."""
    return {"fwd": 2.0, "bwd": 4.0, "fwd+bwd": 6.0}[pass_] * p.M * p.M * p.D


def compulsory_hbm_bytes(p: Problem, pass_: str) -> float:
    """Bytes each pass must move to/from HBM at least: U once, the per-row vectors, the gradient."""
    rows = p.M * p.D * p.elem_bytes
    if pass_ == "fwd":
        return rows + 5 * 4 * p.M
    return rows + 3 * 4 * p.M + p.M * p.D * 4


def bounds(case: Case, p: Problem, dev: Device) -> dict:
    """Lower-bound seconds per unit for the whole launch (every SM busy, perfect overlap)."""
    row_blocks = math.ceil(p.M / case.block_m)
    n_tiles = row_blocks * case.tiles_per_row_block
    warp_tiles = n_tiles * case.warps           # per-warp counts × warps × tiles
    t = case.per_tile
    chip = dev.sms * dev.clock_hz
    out = {}
    if t["mma_flop"]:
        out["tensor"] = t["mma_flop"] * warp_tiles / (2.0 * dev.tensor_fma_per_clk_sm[case.dtype] * chip)
    out["fp32 pipe"] = t["fp32"] * 32 * warp_tiles / (dev.fp32_lanes * chip)
    out["int pipe"] = t["int"] * 32 * warp_tiles / (dev.int_lanes * chip)
    out["MUFU"] = t["mufu"] * 32 * warp_tiles / (dev.mufu_lanes * chip)
    out["issue"] = t["issued"] * warp_tiles / (dev.issue_warps * chip)
    out["smem"] = t["smem_wavefronts"] * warp_tiles / (dev.smem_wavefronts * chip)
    out["L2"] = case.l2_bytes_per_tile * n_tiles / (dev.l2_bytes_per_clk * dev.clock_hz)
    out["HBM"] = compulsory_hbm_bytes(p, case.pass_) / dev.hbm_bytes_per_s
    return out


def binding(b: dict) -> tuple:
    """(unit, seconds) of the largest lower bound."""
    unit = max(b, key=b.get)
    return unit, b[unit]


def per_similarity(case: Case) -> dict:
    """Thread-level counts per similarity (one s_ij of one recompute)."""
    k = 32 * case.warps / (case.block_m * case.block_n)
    t = case.per_tile
    return dict(non_mma=(t["issued"] - t["mma"]) * k, alu=(t["fp32"] + t["int"] + t["mufu"] + t["other"]) * k,
                ex2=t["ex2"] * k, mufu=t["mufu"] * k, product_flop=product_flop(t) * case.warps / (case.block_m * case.block_n))


def product_flop(t: Counter) -> float:
    """Per-warp FLOP of the matrix products in a tile: tensor-core MMAs, or for the FFMA path
    (fp32 CUDA kernels, no MMA) 2 FLOP per lane of every FFMA (the few epilogue FFMAs included)."""
    return t["mma_flop"] if t["mma_flop"] else 64.0 * t["ffma"]


# ----------------------------------------------------------------------------- Triton
def load_gate():
    spec = importlib.util.spec_from_file_location("compile_triton_gate", GATE)
    gate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gate)
    return gate


TRITON_KERNELS = {  # kernel -> (pass, default variant of the common case, label)
    "self_fwd_kernel": ("fwd", "nolab", "triton self fwd"),
    "self_bwd_kernel": ("bwd", "nolab", "triton self bwd"),
    "cross_fwd_kernel": ("fwd", "inbatch", "triton cross fwd"),
    "cross_bwd_q_kernel": ("bwd", "inbatch", "triton cross bwd q"),
    "cross_bwd_k_kernel": ("bwd", "inbatch", "triton cross bwd k"),
}


def choose_config(rows, kernel, dtype_key, target, n_configs):
    """Index of the largest spill-free config at D = 128 in the gate's table (default variant);
    among equal areas the one with fewer warps, then the taller."""
    ok = [r for r in rows if r["kernel"] == kernel and r["dtype_key"] == dtype_key and r["target"] == target
          and r["D"] == 128 and r["variant"] == TRITON_KERNELS[kernel][1] and not r.get("error")
          and (r.get("spill_bytes") or 0) == 0 and r.get("status") not in ("PRUNED",)]
    if not ok:
        return n_configs - 1
    # ties: the taller tile (fewer programs per column, as the autotuner's first configs)
    best = max(ok, key=lambda r: (_area(r["config"]), -_warps(r["config"]), int(r["config"].split("x")[0])))
    return best["config_index"]


def _area(label):
    bm, bn = re.match(r"(\d+)x(\d+)", label).groups()
    return int(bm) * int(bn)


def _warps(label):
    return int(re.search(r"w(\d+)", label).group(1))


def triton_case(gate, kernel, config_index, dtype_key, D, target, cache_root):
    """Compile one Triton kernel with the gate's compile_one into a fresh cache; count its SASS."""
    cache = tempfile.mkdtemp(prefix="gpu-model-", dir=cache_root)
    os.environ["TRITON_CACHE_DIR"] = cache
    gate._init_worker()
    pass_, variant, label = TRITON_KERNELS[kernel]
    row = gate.compile_one(dict(kernel=kernel, config_index=config_index, variant=variant,
                                dtype_key=dtype_key, D=D, target=target))
    if row.get("error"):
        raise RuntimeError(f"{kernel} {row['config']}: {row['error']}")
    cubins = glob.glob(os.path.join(cache, "**", f"{kernel}.cubin"), recursive=True)
    if len(cubins) != 1:
        raise RuntimeError(f"expected one cubin of {kernel} in {cache}, found {cubins}")
    (instrs,) = parse_sass(sass_of(cubins[0])).values()
    per_tile = tile_counts(instrs)
    bm, bn = (int(x) for x in re.match(r"(\d+)x(\d+)", row["config"]).groups())
    warps = _warps(row["config"])
    eb = 2 if dtype_key in ("bf16", "fp16") else 4
    grid_z = math.ceil(D / row["block_do"]) if pass_ == "bwd" else 1
    # L2 → SM bytes of one tile: the column rows over all of D, and in the backward (D in
    # several chunks) the tile's output columns once more; per-column vectors (lse, a, b).
    l2 = bn * D * eb + (bn * row["block_do"] * eb if pass_ == "bwd" and row["d_chunks"] > 1 else 0)
    l2 += bn * (3 * 4 if pass_ == "bwd" else 0)
    return Case(kernel=label, pass_=pass_, dtype=dtype_key, target=target, config=row["config"], block_m=bm,
                block_n=bn, warps=warps, tiles_per_row_block=None, regs=row.get("regs"),
                spill_bytes=row.get("spill_bytes"), per_tile=per_tile, l2_bytes_per_tile=l2,
                notes=f"grid z {grid_z}" if grid_z > 1 else ""), grid_z


# ----------------------------------------------------------------------------- CUDA C++
CUDA_ROWS = CUDA_COLS = 64
CUDA_THREADS = 128


def cuda_traits():
    """(kChunk, kV) per element type, read from the kernel source (Traits<T>: tensor-core
    types first, then fp32)."""
    src = CUDA_SRC.read_text()
    chunk = [int(x) for x in re.findall(r"kChunk = (\d+)", src)]
    kv = [int(x) for x in re.findall(r"kV = (\d+)", src)]
    return {"bf16": (chunk[0], kv[0]), "fp32": (chunk[1], kv[1])}


def compile_cuda(target: int, out_dir: str) -> dict:
    """nvcc -cubin of the CUDA kernels: {function name: [Instr]} and the ptxas resource log."""
    nvcc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    cubin = os.path.join(out_dir, f"cuda_sm{target}.cubin")
    log = subprocess.run([nvcc, "-std=c++17", "-O3", "--use_fast_math", "-cubin",
                          f"-gencode=arch=compute_{target},code=sm_{target}", str(CUDA_SRC), "-o", cubin,
                          "-Xptxas", "-v"], capture_output=True, text=True, check=True).stderr
    return parse_sass(sass_of(cubin)), log


def ptxas_resources(log: str) -> dict:
    """{mangled name: (registers, spill store bytes)} from an -Xptxas -v log."""
    out, name, spill = {}, None, 0
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            name = m.group(1)
        m = re.search(r"(\d+) bytes spill stores", line)
        if m:
            spill = int(m.group(1))
        m = re.search(r"Used (\d+) registers", line)
        if m and name:
            out[name] = (int(m.group(1)), spill)
    return out


def cuda_trips(dtype: str, D: int, eb: int):
    """Trip-count rule of the loops nested in a CUDA kernel's main (column-tile) loop, from the
    source's structure: the D-chunk loop (it holds a barrier) runs ceil(D / kChunk) times; a
    copy loop (global loads, no products) runs bytes-to-copy-per-thread / bytes its body loads
    (stage_chunk copies (64+64)·kChunk elements, the backward's U staging 64·kV, over 128
    threads); an FFMA loop runs FMAs-per-thread / FFMAs in its body (the fp32 score product:
    kChunk·32, the fp32 H·U: 64·32)."""
    chunk, kv = cuda_traits()[dtype]

    def trips(c: Counter, depth: int) -> float:
        if depth == 1 and c["barrier"]:
            return math.ceil(D / chunk)
        if c["ldg_bytes"] and not c["mma"] and not c["ffma"]:
            per_thread = (CUDA_ROWS + CUDA_COLS) * chunk * eb / CUDA_THREADS if depth == 2 else \
                CUDA_COLS * kv * eb / CUDA_THREADS
            return per_thread / c["ldg_bytes"]
        if c["ffma"] and not c["mma"]:
            return (chunk * 32 if depth == 2 else CUDA_COLS * 32) / c["ffma"]
        raise ValueError(f"no trip-count rule for a nested loop at depth {depth}: {dict(c)}")
    return trips


def cuda_cases(funcs: dict, resources: dict, target: int, D: int):
    out = []
    for name, instrs in funcs.items():
        pass_ = "fwd" if "forward_kernel" in name else "bwd"
        # <T, kVecRows, kDecoupled>: T mangled as f (float), 13__nv_bfloat16, 6__half
        flags = re.search(r"kernelI(f|13__nv_bfloat16|6__half)Lb([01])ELb([01])E", name)
        if flags is None or flags.group(1) == "6__half":
            continue  # fp16 compiles to the same code as bf16 (modulo the conversion ops)
        dtype = "fp32" if flags.group(1) == "f" else "bf16"
        if flags.group(2) == "0" or flags.group(3) == "1":
            continue  # element-wise staging (misaligned rows) and DCL: the common case is <T, true, false>
        vec = True  # 16-byte staging loads
        eb = 2 if dtype == "bf16" else 4
        chunk, kv = cuda_traits()[dtype]
        per_tile = tile_counts(instrs, cuda_trips(dtype, D, eb))
        regs, spill = resources.get(name, (None, None))
        reloads = math.ceil(D / kv) if pass_ == "bwd" else 1
        # L2 → SM bytes per tile: A and B staged again for every tile (64 + 64 rows over D); the
        # backward also stages the tile's U columns [v0, v0 + kV) and 4 per-column vectors.
        l2 = (CUDA_ROWS + CUDA_COLS) * D * eb + (CUDA_COLS * kv * eb + CUDA_COLS * 20 if pass_ == "bwd" else 0)
        out.append(Case(kernel=f"cuda self {pass_}", pass_=pass_, dtype=dtype, target=target,
                        config="64x64 w4" + (" vec16" if vec else ""), block_m=CUDA_ROWS, block_n=CUDA_COLS, warps=CUDA_THREADS // 32,
                        tiles_per_row_block=reloads, regs=regs, spill_bytes=spill, per_tile=per_tile,
                        l2_bytes_per_tile=l2, notes=(f"{reloads} passes over D" if reloads > 1 else "")))
    return out


# ----------------------------------------------------------------------------- report
def evaluate(cases_by_key, M, dims):
    """Rows of the report: per device, D, kernel → bounds, binding unit, fractions."""
    rows = []
    for dev_key, dev in DEVICES.items():
        target = TARGET[dev_key]
        for D in dims:
            for case in cases_by_key[(target, D)]:
                eb = 2 if case.dtype in ("bf16", "fp16") else 4
                p = Problem(M, D, eb)
                case.tiles_per_row_block = case.tiles_per_row_block_fn(M)
                b = bounds(case, p, dev)
                unit, t = binding(b)
                peak = dev.matmul_peak(case.dtype)
                rows.append(dict(device=dev_key, D=D, M=M, kernel=case.kernel, pass_=case.pass_, dtype=case.dtype,
                                 config=case.config, regs=case.regs, spill_bytes=case.spill_bytes,
                                 bounds_us={k: v * 1e6 for k, v in b.items()}, binding=unit, bound_us=t * 1e6,
                                 mma_flop_ratio=product_flop(case.per_tile) * case.warps * math.ceil(M / case.block_m)
                                 * case.tiles_per_row_block / useful_flop(p, case.pass_),
                                 fraction=useful_flop(p, case.pass_) / peak / t, per_similarity=per_similarity(case),
                                 calls_per_tile=case.per_tile["calls"],
                                 notes=case.notes))
    return rows


def combine(rows):
    """fwd+bwd per device, D and kernel family: sum of the bound times of fwd and bwd kernels."""
    out = []
    fams = {"triton self": ("triton self fwd", "triton self bwd"),
            "triton cross (one direction)": ("triton cross fwd", "triton cross bwd q", "triton cross bwd k"),
            "cuda self": ("cuda self fwd", "cuda self bwd")}
    for key in sorted({(r["device"], r["D"], r["M"], r["dtype"]) for r in rows}):
        dev, D, M, dtype = key
        for fam, kernels in fams.items():
            sel = [r for r in rows if (r["device"], r["D"], r["M"], r["dtype"]) == key and r["kernel"] in kernels]
            if len(sel) != len(kernels):
                continue
            fwd = [r for r in sel if r["pass_"] == "fwd"]
            t_fwd = sum(r["bound_us"] for r in fwd) * 1e-6
            t_all = sum(r["bound_us"] for r in sel) * 1e-6
            p = Problem(M, D, 2 if dtype != "fp32" else 4)
            peak = DEVICES[dev].matmul_peak(dtype)
            out.append(dict(device=dev, D=D, M=M, dtype=dtype, family=fam, fwd_us=t_fwd * 1e6, fwd_bwd_us=t_all * 1e6,
                            fwd_fraction=useful_flop(p, "fwd") / peak / t_fwd,
                            fwd_bwd_fraction=useful_flop(p, "fwd+bwd") / peak / t_all,
                            binding=", ".join(f"{r['kernel'].split()[-1] if 'bwd' not in r['kernel'] else r['kernel'].split(' ', 2)[-1]}: {r['binding']}" for r in sel)))
    return out


UNITS = ("tensor", "fp32 pipe", "int pipe", "MUFU", "issue", "smem", "L2", "HBM")


def render(rows, fams, meta) -> str:
    lines = [f"# GPU kernels: the paper model ({LABEL})", "",
             "Produced by `benchmarks/gpu_model.py` from the SASS of an ahead-of-time compile (no GPU) and datasheet "
             "rates (sources in the script's comments). Each time is a LOWER BOUND for one unit assuming every SM busy "
             "and perfect overlap of all units; the largest binds. Fractions are of the device's datasheet matmul peak "
             "for the dtype (bf16: tensor cores; fp32: exact FFMA). Real kernels are slower: latency, occupancy, bank "
             "conflicts, imperfect overlap, mma.sync on sm_90 below the warpgroup-MMA peak. "
             "H100's L2 bandwidth is an assumption (no datasheet figure). Static counts: a branch not taken at run time "
             "is counted; subroutines are not (calls/tile: CALLs in the main loop, e.g. the 64-bit division's slow "
             "path, taken only for operands of 2³² and more).", "",
             f"Compiled with triton {meta['triton']} (kernels {meta['triton_kernel_sha']}), nvcc {meta['nvcc']} "
             f"(csrc/cuda/self_similarity_kernels.cu {meta['cuda_source_sha']}); M = {meta['M']}. Configs: the largest "
             "spill-free Triton config at D = 128 in benchmarks/results/triton_resources.json, compiled here for each D.", "",
             "## Best-case fraction of the matmul peak (modelled)", "",
             "| device | D | dtype | kernels | fwd µs | fwd+bwd µs | fwd % of peak | fwd+bwd % of peak | binding unit |",
             "|---|---|---|---|---|---|---|---|---|"]
    for f in fams:
        lines.append(f"| {f['device']} | {f['D']} | {f['dtype']} | {f['family']} | {f['fwd_us']:.0f} | "
                     f"{f['fwd_bwd_us']:.0f} | {100 * f['fwd_fraction']:.0f} % | {100 * f['fwd_bwd_fraction']:.0f} % | "
                     f"{f['binding']} |")
    lines += ["", "## Per kernel: lower bound per unit (µs, modelled)", "",
              "MMA×: the product FLOP the compiled code executes (tensor-core MMAs; fp32 CUDA: FFMAs) over the "
              "minimum (2·M²·D fwd, 4·M²·D bwd). Per similarity (thread instructions per s_ij of one pass): "
              "non-MMA = every issued instruction but the MMAs (loads, address arithmetic included); ALU = FP32, "
              "integer, MUFU and other ALU instructions (no memory, no control); ex2 = MUFU.EX2.", "",
              "| device | D | kernel | dtype | config | regs/spill B | " + " | ".join(UNITS)
              + " | binds | % peak | MMA× | non-MMA/sim | ALU/sim | ex2/sim | calls/tile |",
              "|" + "---|" * (len(UNITS) + 13)]
    for r in rows:
        b = r["bounds_us"]
        cells = " | ".join(f"{b[u]:.0f}" if u in b else "-" for u in UNITS)
        ps = r["per_similarity"]
        lines.append(f"| {r['device']} | {r['D']} | {r['kernel']} | {r['dtype']} | {r['config']} | {r['regs']}/"
                     f"{r['spill_bytes']} | {cells} | {r['binding']} | {100 * r['fraction']:.0f} % | "
                     f"{r['mma_flop_ratio']:.2f} | {ps['non_mma']:.1f} | {ps['alu']:.1f} | {ps['ex2']:.2f} | "
                     f"{r['calls_per_tile']:.0f} |")
    lines.append("")
    return "\n".join(lines)


def build_cases(dims, cache_root, log=print):
    gate = load_gate()
    mods = gate.load_kernels()
    import triton
    table = json.loads(RESOURCES.read_text())
    # the gate's table: {"runs": [one per triton version, each with "rows"]} (older files: "rows")
    runs = table.get("runs", [table])
    rows = [r for run in runs if run.get("meta", {}).get("triton", triton.__version__) == triton.__version__
            for r in run["rows"]] or [r for run in runs for r in run["rows"]]
    cases = {}
    with tempfile.TemporaryDirectory(prefix="gpu-model-cuda-") as cuda_dir:
        cuda = {TARGET[k]: compile_cuda(TARGET[k], cuda_dir) for k in DEVICES}  # one snapshot of the source
        for dev_key in DEVICES:
            target = TARGET[dev_key]
            funcs, log_text = cuda[target]
            resources = ptxas_resources(log_text)
            for D in dims:
                lst = cases.setdefault((target, D), [])
                for kernel in TRITON_KERNELS:
                    tuner = getattr(mods[gate.KERNEL_MODULE[kernel]], kernel)
                    ci = choose_config(rows, kernel, "bf16", target, len(tuner.configs))
                    case, grid_z = triton_case(gate, kernel, ci, "bf16", D, target, cache_root)
                    case.tiles_per_row_block_fn = (lambda M, bn=case.block_n, z=grid_z: math.ceil(M / bn) * z)
                    log(f"  compiled {case.kernel} {case.config} D={D} sm_{target}: {case.regs} regs, "
                        f"{case.spill_bytes} B spill")
                    lst.append(case)
                for case in cuda_cases(funcs, resources, target, D):
                    case.tiles_per_row_block_fn = (lambda M, r=case.tiles_per_row_block: math.ceil(M / CUDA_COLS) * r)
                    lst.append(case)
    return cases, triton.__version__


def nvcc_version():
    nvcc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release ([\d.]+)", out)
    return m.group(1) if m else "?"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--M", type=int, default=131072)
    ap.add_argument("--dims", default="128,512")
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("gpu_model.py: unset TRITON_INTERPRET")
    dims = [int(d) for d in args.dims.split(",")]
    print(LABEL, flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu-model-") as cache_root:
        cases, triton_version = build_cases(dims, cache_root)
    rows = evaluate(cases, args.M, dims)
    fams = combine(rows)
    import hashlib
    meta = dict(label=LABEL, triton=triton_version, nvcc=nvcc_version(), M=args.M, dims=dims,
                triton_kernel_sha=load_gate().kernel_sha(),
                cuda_source_sha=hashlib.sha256(CUDA_SRC.read_bytes()).hexdigest()[:12],
                devices={k: dataclasses.asdict(v) for k, v in DEVICES.items()}, l2_assumed=sorted(L2_ASSUMED))
    text = render(rows, fams, meta)
    print(text)
    if args.markdown:
        _atomic_write(args.markdown, text)
    if args.json:
        _atomic_write(args.json, json.dumps(dict(meta=meta, kernels=rows, families=fams), indent=1))
    return 0


def _atomic_write(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
