"""The ahead-of-time Triton compile gate (.ci/compile_triton.py) keeps working.

One kernel, one config, one target (a few seconds); plus the script's copies of
`common.kernel_flags` and of triton's argument specialisation agree with the originals, so
the gate compiles what the launchers would launch."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".ci" / "compile_triton.py"


def _gate():
    spec = importlib.util.spec_from_file_location("compile_triton_gate", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _ptxas():
    try:
        import triton  # noqa: F401
        return _gate().find_tool("ptxas")
    except Exception:  # noqa: BLE001
        return None


def test_compile_one_kernel(tmp_path):
    if not _ptxas():
        pytest.skip("ptxas (shipped with triton's NVIDIA backend) is not available")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--only", "self_fwd_kernel", "--configs", "fallback", "--variants", "default",
         "--dtypes", "bf16", "--dims", "128", "--targets", "80", "--jobs", "1", "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    header = next(line for line in proc.stdout.splitlines() if line.startswith("kernel"))
    for col in ("regs", "spill B", "smem B", "compile s"):
        assert col in header
    assert "compile gate: passed" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    assert sorted(r["variant"] for r in rows) == ["labels+rows+all", "nolab", "nolab+all", "nolab+rows"]  # every-config variants
    r = next(r for r in rows if r["variant"] == "nolab")
    full = next(r for r in rows if r["variant"] == "nolab+all")
    assert full["epi_per_sim"] > r["epi_per_sim"]  # top-1 and Σ P·s cost instructions in the loop
    assert r["error"] is None and r["status"] == "ok"
    assert r["kernel"] == "self_fwd_kernel" and r["target"] == 80 and r["fallback"]
    assert 0 < r["regs"] <= 255 and r["shared"] > 0 and r["spill_bytes"] == 0
    assert r["mma"] > 0  # bf16 products on tensor cores (mma.sync on sm_80)
    # from the SASS: HMMA in the main loop, and the interior-tile epilogue within its budget
    assert r["sass_hmma"] > 0 and r["loop_mma"] > 0 and r["sass_mufu"] > 0
    assert 0 < r["epi_per_sim"] <= _gate().EPILOGUE_BUDGET
    assert r["epi_per_sim_masked"] > r["epi_per_sim"]  # the masked tiles take the longer branch


def test_compile_new_kernels(tmp_path):
    """The local-rows and SigLIP kernels (NEW_KERNELS) compile with the launchers' arguments:
    tensor cores in the main loop, no spill, and the epilogue budget not applied to them."""
    if not _ptxas():
        pytest.skip("ptxas (shipped with triton's NVIDIA backend) is not available")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--only", "self_bwd_col_side_kernel,siglip_fwd_kernel", "--configs", "fallback",
         "--variants", "default", "--dtypes", "bf16", "--dims", "128", "--targets", "80", "--jobs", "1",
         "--json", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert sorted((r["kernel"], r["variant"]) for r in rows) == [("self_bwd_col_side_kernel", "nolab"),
                                                                 ("siglip_fwd_kernel", "pairs")]
    gate = _gate()
    for r in rows:
        assert r["error"] is None and r["status"] == "ok" and r["fallback"], r
        assert r["spill_bytes"] == 0 and r["sass_hmma"] > 0 and r["loop_mma"] > 0, r
        assert not gate.epilogue_checked(r)
    siglip = next(r for r in rows if r["kernel"] == "siglip_fwd_kernel")
    assert siglip["sass_mufu"] > 0  # the sigmoid terms' exp / log


def test_kernel_flags_match_launchers():
    torch = pytest.importorskip("torch")
    from fastntxent._triton import common, tiles

    gate = _gate()
    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    try:
        for prec in ("tf32", "ieee", "tf32x3"):
            common.set_fp32_precision(prec)
            for dtype, name in names.items():
                for D in (16, 100, 128, 256, 512):
                    for cap in ((7, 5), (8, 0), (9, 0)):
                        want = common.kernel_flags(dtype, D, cap)
                        got = gate.kernel_flags(tiles, name, prec, D, cap[0] * 10 + cap[1])
                        assert (got["CAST_F32"], got["PREC"], got["H_BF16"], got["BLOCK_D"], got["D_CHUNKS"],
                                got["BLOCK_DO"]) == (want.cast_f32, want.prec, want.h_bf16, want.block_d,
                                                     want.d_chunks, want.block_do), (name, prec, D, cap)
                        # exact fp32 products: D chunks of at most 32 (wider ones spill kilobytes)
                        if want.exact and not tiles.INTERPRETING:  # (the interpreter has its own blocks)
                            assert want.block_d <= tiles.EXACT_CHUNK_D and want.prec in ("ieee", "tf32x3")
    finally:
        common.set_fp32_precision(None)


def test_specialisation_matches_triton_runtime():
    jit = pytest.importorskip("triton.runtime.jit")
    if not hasattr(jit, "native_specialize_impl"):
        pytest.skip("this triton has no native_specialize_impl")
    import triton.language as tl
    from triton.backends.nvidia.compiler import CUDABackend

    gate = _gate()
    for v in (0, 1, 2, 16, 100, 128, 4096, 4097, -1, 2**31 - 16, 2**31, 2**40):
        ty, attr = jit.native_specialize_impl(CUDABackend, v, False, True, True)[:2]
        got_ty, div16, const = gate.specialize(v)
        assert got_ty == ty, v
        assert (const == 1) == (ty == "constexpr"), v
        if ty != "constexpr":
            assert div16 == ("D" in (attr or "")), v
    for dt, name in ((tl.bfloat16, "bf16"), (tl.float16, "fp16"), (tl.float32, "fp32"), (tl.int64, "i64")):
        ty, attr = jit.native_specialize_impl(CUDABackend, jit.MockTensor(dt), False, True, True)[:2]
        assert gate.specialize(gate.P(name))[:2] == (ty, "D" in attr)


def _run_outside_interpreter(code: str):
    """Runs `code` in a fresh Python without TRITON_INTERPRET (the kernel modules load as the
    gate loads them); the completed process, asserted to have exited 0."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    return out


def test_exact_fp32_tiling_outside_the_interpreter():
    """What the GPU launch uses for exact fp32 (the tests' process runs the interpreter, so
    the kernel modules are loaded as the gate loads them, without TRITON_INTERPRET)."""

    code = ("import importlib.util, sys; sys.path.insert(0, '.ci'); import compile_triton as g; m = g.load_kernels(); "
            "t = m['tiles']; print(t.d_blocks(128, True, exact=True), t.d_blocks(20, True, exact=True), "
            "len(t.exact_configs(t.FWD_CONFIGS)), len(t.FWD_CONFIGS))")
    out = _run_outside_interpreter(code)
    assert out.stdout.split() == ["(32,", "4,", "64)", "(32,", "1,", "32)", "3", "6"], out.stdout


def test_exact_fp32_launches_keep_only_small_configs():
    """prune_configs: exact fp32 (ieee) launches never compile the large tiles that spill."""
    torch = pytest.importorskip("torch")
    from fastntxent._triton import tiles

    u32, u16 = torch.empty(2, 2), torch.empty(2, 2, dtype=torch.bfloat16)
    for configs in (tiles.FWD_CONFIGS, tiles.BWD_CONFIGS):
        kept = tiles.prune_configs(configs, {"U": u32}, PREC="ieee", CAST_F32=False)
        if tiles.INTERPRETING:
            assert kept == configs
            continue
        assert kept and all(c.kwargs["BLOCK_M"] <= 64 and c.kwargs["BLOCK_N"] <= 64 for c in kept)
        assert all(c.num_warps <= 4 or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 32 for c in kept)
        assert configs[-1] in kept  # the fallback config stays
        assert tiles.prune_configs(configs, {"U": u32}, PREC="tf32", CAST_F32=False) == [
            c for c in configs if c is not tiles.EXACT_FWD_FALLBACK and c is not tiles.FALLBACK_16BIT]
        assert tiles.prune_configs(configs, {"U": u16}, PREC="tf32", CAST_F32=False) == [
            c for c in configs if c is not tiles.EXACT_FWD_FALLBACK and c is not tiles.FALLBACK_FP32]
        assert tiles.prune_configs(configs, {"U": u16}, PREC="ieee", CAST_F32=True) == kept  # sm_75


# A loop (head 0x0100, back edge at 0x0190) with a branch around a long block, as the forward's
# `if special:` compiles: the shortest path skips 0x0130-0x0160.
_SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_TID.X ;
        /*0100*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0110*/                   FMNMX R2, R4, R5, !PT ;
        /*0120*/              @P0 BRA 0x170 ;
        /*0130*/                   FSEL R3, R4, -INF , P1 ;
        /*0140*/                   FSEL R3, R5, -INF , P2 ;
        /*0150*/                   FSEL R3, R6, -INF , P3 ;
        /*0160*/                   MUFU.EX2 R3, R3 ;
        /*0170*/                   MUFU.EX2 R2, R2 ;
        /*0180*/                   ISETP.GE.AND P4, PT, R0, 0x10, PT ;
        /*0190*/              @!P4 BRA 0x100 ;
        /*01a0*/                   EXIT ;
        /*01b0*/                   BRA 0x1b0;
"""


def test_sass_loop_counter_on_a_known_graph():
    gate = _gate()
    lc = gate.loop_counts(_SASS)
    # shortest: HMMA (not counted), FMNMX, BRA, MUFU, ISETP, BRA = 5; longest adds the 4 skipped
    assert lc["loop_mma"] == 1 and lc["loop_min"] == 5 and lc["loop_max"] == 9 and lc["loop_mufu"] == 2
    c = gate.sass_counts(_SASS, similarities_per_thread=2)
    assert c["sass_hmma"] == 1 and c["sass_mufu"] == 2 and c["epi_per_sim"] == 2.5 and c["epi_per_sim_masked"] == 4.5
    assert gate.loop_counts("/*0000*/ EXIT ;") is None


def _row(**kw):
    row = dict(kernel="self_fwd_kernel", variant="nolab", error=None, target=80, prec="tf32", dtype="bf16",
               cast_f32=False, d_chunks=1, shared=1000, static_shared=0, spill_bytes=0, n_spills=0, fallback=True,
               loop_mma=8, epi_per_sim=8.0, D=128, dtype_key="bf16")
    row.update(kw)
    return row


def test_gate_rules():
    gate = _gate()
    assert gate.judge(_row()) == ("ok", False)
    assert gate.judge(_row(loop_mma=0)) == ("FAIL-NO-MMA", True)              # 16-bit loop on FMA units
    assert gate.judge(_row(loop_mma=0, cast_f32=True, prec="ieee")) == ("ok", False)  # sm_75 / exact: FMA expected
    assert gate.judge(_row(epi_per_sim=gate.EPILOGUE_BUDGET + 1)) == ("FAIL-EPILOGUE", True)
    assert gate.judge(_row(epi_per_sim=99, variant="nolab+all")) == ("ok", False)   # budget: the common case only
    assert gate.judge(_row(spill_bytes=4)) == ("FAIL-SPILL", True)
    assert gate.judge(_row(spill_bytes=4, fallback=False)) == ("spills", False)  # reported (see the gate's docstring)
    assert gate.judge(_row(spill_bytes=4, prec="ieee", dtype="fp32")) == ("KNOWN-SPILL", False)  # exact fp32: open
    assert gate.judge(_row(spill_bytes=4, prec="ieee", dtype="fp32"), fail_on_ieee_spills=True)[1]


def test_backward_pruning_keeps_the_accumulator_in_registers():
    """tiles.acc_configs (what the gate compiles): wide output chunks keep only 8-warp configs,
    and the gate's config list is the pruned one, with the fallback of the operand type."""
    code = ("import sys; sys.path.insert(0, '.ci'); import compile_triton as g; m = g.load_kernels(); t = m['tiles']; "
            "print(sorted({c.num_warps for c in t.acc_configs(t.BWD_CONFIGS, 256)}), "
            "len(t.acc_configs(t.BWD_CONFIGS, 128)) < len(t.BWD_CONFIGS), "
            "g.kept_configs(t, 'self_bwd_kernel', 'bf16', 512, 80) == "
            "[t.BWD_CONFIGS.index(c) for c in t.operand_fallback(t.acc_configs(t.BWD_CONFIGS, 256), False)], "
            "t.d_blocks(512, False), t.d_blocks(512, True))")
    out = _run_outside_interpreter(code)
    assert out.stdout.split() == ["[8]", "True", "True", "(64,", "8,", "256)", "(64,", "8,", "128)"], out.stdout


def test_backward_fallback_follows_the_operand_type():
    """One 8-warp fallback per operand type: `maxnreg` only where the operands are fp32
    (tiles.FALLBACK_FP32); 16-bit kernels keep FALLBACK_16BIT; among the forward's configs only
    the exact-fp32 fallback has it."""
    code = ("import sys; sys.path.insert(0, '.ci'); import compile_triton as g; m = g.load_kernels(); t = m['tiles']; "
            "fb = lambda k, dt, D: t.BWD_CONFIGS[g.kept_configs(t, k, dt, D, 80)[-1]]; "
            "print(*[fb(k, dt, D).maxnreg for k in ('self_bwd_kernel', 'cross_bwd_k_kernel') "
            "for dt in ('bf16', 'fp16', 'tf32', 'ieee') for D in (128, 512)], "
            "all((c.maxnreg is None) == (c is not t.EXACT_FWD_FALLBACK) for c in t.FWD_CONFIGS))")
    out = _run_outside_interpreter(code)
    assert out.stdout.split() == (["None"] * 4 + ["255"] * 4) * 2 + ["True"], out.stdout


def test_gate_fails_on_config_spills_when_asked():
    """--fail-on-config-spills (CI): a spill of a non-fallback config is fatal too; the
    exact-fp32 fallbacks stay KNOWN-SPILL (their own flag)."""
    gate = _gate()
    row = _row(spill_bytes=4, fallback=False)
    assert not gate.judge(row)[1]
    assert gate.judge(row, fail_on_config_spills=True) == ("FAIL-SPILL", True)
    assert gate.judge(_row(spill_bytes=4, prec="ieee", dtype="fp32"), fail_on_config_spills=True) == ("KNOWN-SPILL", False)
    assert gate.judge(_row(spill_bytes=4, prec="ieee", dtype="fp32", fallback=False),
                      fail_on_config_spills=True) == ("FAIL-SPILL", True)
    assert gate.judge(_row(), fail_on_config_spills=True) == ("ok", False)
