"""The paper model's arithmetic (benchmarks/gpu_model.py) on hand-computable cases: FLOP counts,
per-unit lower bounds, the binding unit, SASS loop counting with nested trip counts, and the
datasheet peaks it is built on. No compile, no GPU: synthetic SASS listings."""
from __future__ import annotations

import importlib.util
import math
import sys
from collections import Counter
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_model.py"
_spec = importlib.util.spec_from_file_location("gpu_model", _PATH)
gm = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("gpu_model", gm)  # dataclasses look their module up
_spec.loader.exec_module(gm)

A100, H100 = gm.DEVICES["A100"], gm.DEVICES["H100"]


def test_datasheet_peaks():
    """Per-SM per-clock rates × SMs × clock give the whitepapers' TFLOP/s."""
    assert A100.matmul_peak("bf16") == pytest.approx(312e12, rel=2e-3)
    assert A100.matmul_peak("tf32") == pytest.approx(156e12, rel=2e-3)
    assert A100.matmul_peak("fp32") == pytest.approx(19.5e12, rel=2e-3)
    assert H100.matmul_peak("bf16") == pytest.approx(989.4e12, rel=2e-3)
    assert H100.matmul_peak("tf32") == pytest.approx(494.7e12, rel=2e-3)


def test_useful_flop():
    p = gm.Problem(M=3, D=5, elem_bytes=2)
    assert gm.useful_flop(p, "fwd") == 2 * 9 * 5 == 90
    assert gm.useful_flop(p, "bwd") == 4 * 9 * 5
    assert gm.useful_flop(p, "fwd+bwd") == 6 * 9 * 5


def _case(per_tile, bm=64, bn=64, warps=4, M=1024, pass_="fwd", dtype="bf16", l2=0.0):
    c = gm.Case(kernel="k", pass_=pass_, dtype=dtype, target=80, config="c", block_m=bm, block_n=bn, warps=warps,
                tiles_per_row_block=math.ceil(M / bn), regs=None, spill_bytes=None, per_tile=Counter(per_tile),
                l2_bytes_per_tile=l2)
    return c


def test_tensor_bound_of_a_pure_matmul_is_the_peak():
    """A tile whose only work is its MMA FLOP (2·BM·BN·D over the warps) binds on the tensor
    cores at exactly useful FLOP / peak: fraction 1."""
    M, D = 1024, 128
    per_warp = 2 * 64 * 64 * D / 4
    case = _case({"mma_flop": per_warp, "mma": per_warp / 4096, "issued": per_warp / 4096})
    p = gm.Problem(M, D, 2)
    b = gm.bounds(case, p, A100)
    assert b["tensor"] == pytest.approx(2 * M * M * D / A100.matmul_peak("bf16"), rel=1e-12)
    unit, t = gm.binding(b)
    assert unit == "tensor"
    assert gm.useful_flop(p, "fwd") / A100.matmul_peak("bf16") / t == pytest.approx(1.0)


def test_mufu_and_issue_bounds_by_hand():
    """One exp per similarity: M² MUFU results at 16 per clock per SM. 100 warp instructions
    per warp and tile: issue bound = tiles·warps·100 / (4 per clock per SM)."""
    M = 2048
    per_warp_ex2 = 64 * 64 / (4 * 32)              # one MUFU.EX2 per element of the warp's share
    case = _case({"mufu": per_warp_ex2, "ex2": per_warp_ex2, "issued": 100}, M=M)
    b = gm.bounds(case, gm.Problem(M, 64, 2), H100)
    chip = H100.sms * H100.clock_hz
    assert b["MUFU"] == pytest.approx(M * M / (16 * chip))
    tiles = (M // 64) ** 2
    assert b["issue"] == pytest.approx(tiles * 4 * 100 / (4 * chip))
    assert gm.binding(b)[0] == ("MUFU" if b["MUFU"] > b["issue"] else "issue")
    # M² / 16 vs tiles·100 = M²·100/4096: MUFU (1/16 = 0.0625) beats issue (100/4096 = 0.024)
    assert gm.binding(b)[0] == "MUFU"


def test_per_similarity_counts():
    case = _case({"issued": 300, "mma": 44, "fp32": 100, "int": 60, "other": 20, "mufu": 32, "ex2": 32,
                  "mma_flop": 262144})
    ps = gm.per_similarity(case)
    k = 32 * 4 / (64 * 64)
    assert ps["non_mma"] == pytest.approx(256 * k)       # 8 per similarity
    assert ps["alu"] == pytest.approx(212 * k)
    assert ps["ex2"] == pytest.approx(1.0)
    assert ps["product_flop"] == pytest.approx(2 * 128)   # 2·D for D = 128


def test_instruction_shapes():
    assert gm.mma_flop("HMMA.16816.F32.BF16") == 2 * 16 * 8 * 16
    assert gm.mma_flop("HMMA.1688.F32.TF32") == 2 * 16 * 8 * 8
    assert gm.mma_flop("HGMMA.64x128x16.F32.BF16") == 2 * 64 * 128 * 16 / 4   # one warp's quarter
    assert gm.mma_flop("FFMA") == 0
    assert gm.smem_wavefronts("LDSM.16.M88.4") == 4
    assert gm.smem_wavefronts("LDSM.16.MT88.2") == 2
    assert gm.smem_wavefronts("LDS.128") == 4
    assert gm.smem_wavefronts("LDS.U16") == 1
    assert gm.smem_wavefronts("LDG.E.128") == 0
    assert [gm.classify(o) for o in ("HMMA.16816.F32.BF16", "MUFU.EX2", "FFMA.FTZ", "IMAD.WIDE", "LDS.64",
                                     "BAR.SYNC", "NOP", "SHFL.BFLY")] == \
        ["mma", "mufu", "fp32", "int", "memory", "control", "nop", "other"]


def _sass(lines):
    """A cuobjdump-like listing of one function from (address, instruction) pairs."""
    body = "\n".join(f"        /*{a:04x}*/                   {t} ;   /* 0x0 */" for a, t in lines)
    return f"\tcode for sm_80\n\t\tFunction : kern\n{body}\n"


def test_main_loop_counts_with_a_nested_loop():
    """Main loop 0x20-0x90 (holds MUFU.EX2) with a nested loop 0x30-0x50 of trip count 3: one
    tile = the main body once + the nested body 3 times; code outside the loop is not counted."""
    sass = _sass([
        (0x00, "S2R R0, SR_TID.X"),
        (0x10, "IMAD R1, R0, 0x4, RZ"),
        (0x20, "LDS.128 R4, [R1]"),                      # main loop start
        (0x30, "HMMA.16816.F32.BF16 R8, R4, R6, R8"),     # nested loop start
        (0x40, "IADD3 R2, R2, 0x1, RZ"),
        (0x50, "@P0 BRA 0x30"),                           # nested loop end
        (0x60, "MUFU.EX2 R3, R3"),
        (0x70, "CALL.REL.NOINC 0xb0"),
        (0x80, "NOP"),
        (0x90, "@P1 BRA 0x20"),                           # main loop end
        (0xa0, "EXIT"),
        (0xb0, "FADD R5, R5, R3"),                        # a subroutine: not counted
        (0xc0, "RET.REL.NODEC R2 0x0"),
    ])
    (instrs,) = gm.parse_sass(sass).values()
    assert gm.loops(instrs) == [(0x20, 0x90), (0x30, 0x50)]
    assert gm.main_loop(instrs) == (0x20, 0x90)
    with pytest.raises(ValueError, match="no trip-count rule"):
        gm.tile_counts(instrs)
    seen = []

    def trips(body, depth):
        seen.append((dict(body), depth))
        return 3
    c = gm.tile_counts(instrs, trips)
    assert seen[0][1] == 1 and seen[0][0]["mma"] == 1 and seen[0][0]["barrier"] == 0
    assert c["mma"] == 3 and c["mma_flop"] == 3 * 4096
    assert c["int"] == 3
    assert c["mufu"] == c["ex2"] == 1 and c["calls"] == 1 and c["control"] == 3 + 2 and c["fp32"] == 0
    assert c["smem_wavefronts"] == 4
    assert c["issued"] == 1 + 3 * 3 + 3   # LDS, 3 × (HMMA, IADD3, BRA), MUFU, CALL, BRA; NOP not issued


def test_choose_config_takes_the_largest_spill_free_tile():
    rows = [dict(kernel="self_fwd_kernel", dtype_key="bf16", target=80, D=128, variant="nolab", error=None,
                 spill_bytes=s, status="ok", config=cfg, config_index=i)
            for i, (cfg, s) in enumerate([("128x128 w8 s2", 984), ("128x64 w8 s3", 0), ("128x64 w4 s3", 0),
                                          ("64x32 w4 s2", 0)])]
    assert gm.choose_config(rows, "self_fwd_kernel", "bf16", 80, 4) == 2   # 128x64, fewer warps wins the tie
    assert gm.choose_config(rows, "self_fwd_kernel", "bf16", 90, 4) == 3   # nothing for sm_90: the fallback


def test_ptxas_resources():
    log = ("ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_80'\n"
           "    0 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads\n"
           "ptxas info    : Used 168 registers, used 1 barriers, 37120 bytes smem\n")
    assert gm.ptxas_resources(log) == {"_Z3fooPf": (168, 8)}
