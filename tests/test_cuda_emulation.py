"""The hand-written CUDA kernels (csrc/cuda/self_similarity_kernels.cu, unchanged) run on the CPU
under the host emulation of CUDA (csrc/emulation/cuda_host_emulation.h), against the float64
reference; then under ThreadSanitizer and AddressSanitizer+UBSan; the emulator's own rules; and
planted defects (a dropped __syncthreads, a read past the end of shared memory) that the
sanitizers must catch. docs/cuda_emulation.md says what this proves and what it cannot.

The emulated op below mirrors csrc/cuda/self_similarity_cuda.cpp (contiguous rows, fp32
temperature, NaN-poisoned outputs, grad_u in u's dtype); the kernels are reached through the
C interface of csrc/emulation/self_similarity_emulated.cpp (tests/cuda_emulation.py).
"""
from __future__ import annotations

import re
from typing import Optional

import numpy as np
import pytest
import torch
from torch import Tensor

import cuda_emulation as emu
from fastntxent import reference

pytestmark = pytest.mark.skipif(emu.toolchain_problem() is not None,
                                reason=f"CUDA host emulation: {emu.toolchain_problem()}")

TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
STAT_NAMES = ("lse", "pos_sum", "pos_count", "ps_sum", "top1")


@pytest.fixture(scope="module", autouse=True)
def _prebuild():
    """Starts every build this module needs (two compilers at a time); tests wait for theirs."""
    emu.build_kernels("plain", wait=False)
    emu.build_rules("plain", wait=False)
    for variant, defines in (("tsan", ()), ("asan", ()), ("tsan", ("FASTNTXENT_EMULATION_DROP_BARRIER",)),
                             ("asan", ("FASTNTXENT_EMULATION_READ_PAST_END",))):
        if emu.sanitizer_problem(variant) is None:
            emu.build_kernels(variant, defines, wait=False)
    if emu.sanitizer_problem("tsan") is None:
        emu.build_rules("tsan", wait=False)


@pytest.fixture(scope="module")
def kernels():
    return emu.Kernels(emu.build_kernels("plain"))


# ---------------------------------------------------------------------------------------
# The emulated op: the same entry points as fastntxent::self_forward / self_backward on CUDA
# ---------------------------------------------------------------------------------------
def _rows_numpy(u: torch.Tensor) -> np.ndarray:
    if u.dtype == torch.bfloat16:
        return u.view(torch.int16).numpy().view(np.uint16)
    return u.numpy()


def _type_code(dtype: torch.dtype) -> int:
    if dtype not in DTYPE_NAMES:
        raise TypeError(f"the CUDA kernels take float32, float16 or bfloat16 rows, got {dtype}")
    return emu.TYPE_CODES[DTYPE_NAMES[dtype]]


def op_forward(k: emu.Kernels, u: torch.Tensor, temperature: torch.Tensor, labels: Optional[torch.Tensor],
               period: int, decoupled: bool = False):
    """(u, temperature, labels or None, period) -> (lse, pos_sum, pos_count, ps_sum, top1)."""
    u = u.detach().contiguous()
    tau = float(temperature.detach().to(torch.float32))
    lab = None if labels is None else labels.contiguous().numpy()
    return tuple(torch.from_numpy(a) for a in k.forward(_rows_numpy(u), _type_code(u.dtype), tau, lab, period,
                                                        decoupled))


def op_backward(k: emu.Kernels, u: torch.Tensor, temperature: torch.Tensor, labels: Optional[torch.Tensor],
                period: int, lse: torch.Tensor, grad_lse: torch.Tensor, grad_pos: torch.Tensor,
                decoupled: bool = False) -> torch.Tensor:
    """(u, temperature, labels, period, lse, grad_lse, grad_pos) -> grad_u in u's dtype."""
    u = u.detach().contiguous()
    tau = float(temperature.detach().to(torch.float32))
    lab = None if labels is None else labels.contiguous().numpy()
    rows = [t.detach().to(torch.float32).contiguous().numpy() for t in (lse, grad_lse, grad_pos)]
    grad = k.backward(_rows_numpy(u), _type_code(u.dtype), tau, lab, period, *rows, decoupled=decoupled)
    return torch.from_numpy(grad).to(u.dtype)


# ---------------------------------------------------------------------------------------
# Comparison against the float64 reference
# ---------------------------------------------------------------------------------------
def rel_err(actual: torch.Tensor, expected: torch.Tensor, floor: float = 1e-6) -> float:
    """‖actual − expected‖ / max(‖expected‖, floor) in float64; inf if actual has NaN/inf."""
    actual, expected = actual.detach().double(), expected.detach().double()
    if not torch.isfinite(actual).all():
        return float("inf")
    return float((actual - expected).norm() / expected.norm().clamp_min(floor))


def explicit_labels(M: int, labels: Optional[torch.Tensor], period: int) -> torch.Tensor:
    return labels if labels is not None else torch.arange(M) % period


def reference_case(u: torch.Tensor, tau: float, labels: torch.Tensor, grad_lse: torch.Tensor,
                   grad_pos: torch.Tensor, decoupled: bool = False):
    """Row statistics, ∂L/∂u and ∂L/∂τ of L = Σ a·lse + b·pos_sum, in float64 on the rounded rows."""
    u64 = u.detach().double().requires_grad_(True)
    tau64 = torch.tensor(tau, dtype=torch.float64, requires_grad=True)
    stats = reference.self_similarity_rows(u64, tau64, labels, decoupled=decoupled)
    L = (grad_lse.double() * stats[0]).sum() + (grad_pos.double() * stats[1]).sum()
    g_u, g_tau = torch.autograd.grad(L, (u64, tau64))
    return [s.detach() for s in stats], g_u, g_tau


def check_case(k: emu.Kernels, u: torch.Tensor, tau: float, labels: Optional[torch.Tensor], period: int,
               stats=None, grad=None, seed: int = 0, decoupled: bool = False) -> None:
    """Runs (or takes) the emulated forward and backward and compares them with the reference."""
    M = u.shape[0]
    tol = TOL[u.dtype]
    gen = torch.Generator().manual_seed(seed)
    grad_lse = torch.randn(M, generator=gen, dtype=torch.float64).float()
    grad_pos = torch.randn(M, generator=gen, dtype=torch.float64).float()
    grad_lse[::3] = 0  # rows without weight (anchors without positives): a = 0 is skipped in the kernel
    temperature = torch.tensor(tau)
    if stats is None:
        stats = op_forward(k, u, temperature, labels, period, decoupled)
    if grad is None:
        grad = op_backward(k, u, temperature, labels, period, stats[0], grad_lse, grad_pos, decoupled)
    lab = explicit_labels(M, labels, period)
    ref, ref_gu, ref_gtau = reference_case(u, tau, lab, grad_lse, grad_pos, decoupled)
    what = (f"{u.dtype} M={M} D={u.shape[1]} tau={tau} {'labels' if labels is not None else f'period={period}'}"
            f"{' decoupled' if decoupled else ''}")
    for name, s in zip(STAT_NAMES, stats):
        assert s.dtype == torch.float32 and s.shape == (M,), (what, name)
        assert not torch.isnan(s).any(), f"{what}: {name} has NaN (unwritten or poisoned)"
    lse, pos_sum, pos_count, ps_sum, top1 = stats
    assert torch.equal(pos_count.double(), ref[2]), f"{what}: pos_count"
    if M == 1:  # no other column: lse = -inf, everything else 0, zero gradient
        assert lse.item() == float("-inf") and pos_sum.item() == 0 and ps_sum.item() == 0 and top1.item() == 0
        assert torch.equal(grad.float(), torch.zeros_like(grad.float())), what
        return
    for name, a, r in (("lse", lse, ref[0]), ("pos_sum", pos_sum, ref[1]), ("ps_sum", ps_sum, ref[3])):
        err = rel_err(a, r)
        assert err <= tol, f"{what}: {name} relative error {err:.2e} > {tol:.0e}"
    # top-1: exact, except where the best and second-best other rows are a float64 near-tie.
    s = (u.double() @ u.double().T) / tau
    s.fill_diagonal_(float("-inf"))
    top2 = s.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-3 * tol / tau
    if u.shape[1] == 1:  # rows ±1: exact ties in every dtype, the first index must win as in the reference
        clear[:] = True
    assert torch.equal(top1.double()[clear], ref[4][clear]), f"{what}: top1"
    err = rel_err(grad.double(), ref_gu)
    assert err <= tol, f"{what}: grad_u relative error {err:.2e} > {tol:.0e}"
    # ∂L/∂τ from the kernel's row outputs, by the package's formula −Σ(a·ps_sum + b·pos_sum)/τ.
    g_tau = -(grad_lse.double() * ps_sum.double() + grad_pos.double() * pos_sum.double()).sum() / tau
    err = rel_err(g_tau, ref_gtau)
    assert err <= tol, f"{what}: dL/dtau relative error {err:.2e} > {tol:.0e}"


def rows(M: int, D: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Unit rows (normalised in float64), rounded to dtype: the inputs the op receives."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(M, D, generator=gen, dtype=torch.float64)
    return torch.nn.functional.normalize(z, dim=1).to(dtype)


def nt_xent_period(M: int) -> int:
    return max(1, M // 2) if M % 2 == 0 else max(1, (M + 1) // 2)  # odd M: the last row has no positive


# ---------------------------------------------------------------------------------------
# The emulation's own arithmetic
# ---------------------------------------------------------------------------------------
def test_16bit_conversions_round_to_nearest_even_like_torch(kernels):
    every = np.arange(1 << 16, dtype=np.uint16)
    for name, torch_dtype in (("half", torch.float16), ("bfloat16", torch.bfloat16)):
        as_torch = torch.from_numpy(every.view(np.int16)).view(torch_dtype).float().numpy()
        as_emu = kernels.convert(f"{name}_to_float", every)
        same = (as_emu.view(np.uint32) == as_torch.view(np.uint32)) | (np.isnan(as_emu) & np.isnan(as_torch))
        assert same.all(), f"{name} -> float differs at {every[~same][:5]}"
        # Every 16-bit value, every midpoint between neighbours (ties) and one fp32 ulp around
        # it, random floats over the whole range, and the specials.
        finite = np.sort(as_torch[np.isfinite(as_torch)].astype(np.float64))
        mids = ((finite[1:] + finite[:-1]) / 2).astype(np.float32)
        rng = np.random.default_rng(0)
        with np.errstate(over="ignore"):
            wide = (rng.standard_normal(100_000) * np.exp2(rng.uniform(-140, 128, 100_000))).astype(np.float32)
        specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 65504, 65519.996, 65520, 1e-8, 2.0 ** -25,
                             2.0 ** -24, 3e38, -3.4028235e38, 1.1754944e-38, 1e-45], dtype=np.float32)
        x = np.concatenate([finite.astype(np.float32), mids, np.nextafter(mids, np.float32(np.inf)),
                            np.nextafter(mids, np.float32(-np.inf)), wide, specials])
        expected = torch.from_numpy(x).to(torch_dtype).view(torch.int16).numpy().view(np.uint16)
        got = kernels.convert(f"float_to_{name}", x)
        nan = np.isnan(x)
        assert np.array_equal(got[~nan], expected[~nan]), \
            f"float -> {name}: {x[~nan][got[~nan] != expected[~nan]][:5]}"
        back = kernels.convert(f"{name}_to_float", got[nan])
        assert np.isnan(back).all(), f"float -> {name}: NaN not kept"


# ---------------------------------------------------------------------------------------
# The kernels against the float64 reference (plain build)
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_NAMES[d])
@pytest.mark.parametrize("M", [1, 2, 63, 64, 65, 130, 257])
@pytest.mark.parametrize("D", [1, 8, 17, 64, 129])
def test_rows_and_gradients_nt_xent(kernels, dtype, M, D):
    tau = 0.5 if (M + D) % 2 else 0.01
    check_case(kernels, rows(M, D, dtype, seed=M * 1000 + D), tau, None, nt_xent_period(M), seed=M + D)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_NAMES[d])
@pytest.mark.parametrize("tau", [0.01, 0.5])
@pytest.mark.parametrize("M,D", [(65, 17), (130, 64), (257, 129)])
def test_rows_and_gradients_supcon(kernels, dtype, tau, M, D):
    labels = torch.randint(0, max(2, M // 8), (M,), generator=torch.Generator().manual_seed(M))
    check_case(kernels, rows(M, D, dtype, seed=D), tau, labels, 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_NAMES[d])
@pytest.mark.parametrize("tau", [0.01, 0.5])
@pytest.mark.parametrize("labelled", [False, True])
@pytest.mark.parametrize("M,D", [(65, 17), (130, 64)])
def test_rows_and_gradients_decoupled(kernels, dtype, tau, labelled, M, D):
    """DCL: the positives out of the logsumexp and of P, the exps shifted by the negatives' own max."""
    labels = torch.randint(0, max(2, M // 8), (M,), generator=torch.Generator().manual_seed(M)) if labelled else None
    check_case(kernels, rows(M, D, dtype, seed=D + 7), tau, labels, 1 if labelled else nt_xent_period(M),
               seed=M, decoupled=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_NAMES[d])
def test_rows_and_gradients_multiview(kernels, dtype):
    V, N, D = 3, 43, 33  # 129 rows, view-major: label(i) = i mod N
    check_case(kernels, rows(V * N, D, dtype), 0.1, None, N)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_NAMES[d])
def test_non_contiguous_rows(kernels, dtype):
    M, D = 70, 40
    u = rows(M, D, dtype)
    transposed = u.T.contiguous().T  # column-major: the op makes it contiguous
    assert not transposed.is_contiguous()
    check_case(kernels, transposed, 0.2, None, M // 2)
    # The kernels' own row stride (ld != D), without the op's copy: identical results.
    wide = torch.full((M, D + 24), float("nan"), dtype=dtype)
    wide[:, :D] = u
    view = _rows_numpy(wide)[:, :D]
    code, tau = _type_code(dtype), 0.2
    strided = kernels.forward(view, code, tau, None, M // 2)
    dense = kernels.forward(_rows_numpy(u), code, tau, None, M // 2)
    for a, b in zip(strided, dense):
        assert np.array_equal(a, b)
    g = np.linspace(-1, 1, M, dtype=np.float32)
    assert np.array_equal(kernels.backward(view, code, tau, None, M // 2, dense[0], g, g[::-1]),
                          kernels.backward(_rows_numpy(u), code, tau, None, M // 2, dense[0], g, g[::-1]))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_NAMES[d])
def test_vector_and_elementwise_staging_agree(kernels, dtype):
    """The kernels stage rows 16 bytes at a time when the base is 16-byte aligned and the row
    stride and D are multiples of 16 bytes' worth of elements (kernel variant kVecRows = true),
    else one element at a time: the same rows through both variants give identical results."""
    M, D = 70, 40
    u = _rows_numpy(rows(M, D, dtype))
    n = u.size
    buf = np.full(n + 16, np.nan if u.dtype == np.float32 else 0xFFFF, dtype=u.dtype)
    start = (-buf.ctypes.data % 16) // u.itemsize            # first 16-byte-aligned element
    aligned = buf[start:start + n].reshape(M, D)
    shifted = buf[start + 1:start + 1 + n].reshape(M, D)    # base misaligned: element-wise staging
    assert aligned.ctypes.data % 16 == 0 and shifted.ctypes.data % 16 != 0
    code, tau, g = _type_code(dtype), 0.2, np.linspace(-1, 1, M, dtype=np.float32)
    aligned[:] = u
    vec_fwd = kernels.forward(aligned, code, tau, None, M // 2)
    vec_bwd = kernels.backward(aligned, code, tau, None, M // 2, vec_fwd[0], g, g[::-1])
    shifted[:] = u
    el_fwd = kernels.forward(shifted, code, tau, None, M // 2)
    el_bwd = kernels.backward(shifted, code, tau, None, M // 2, el_fwd[0], g, g[::-1])
    for a, b in zip(vec_fwd + (vec_bwd,), el_fwd + (el_bwd,)):
        assert np.isfinite(a).all() and np.array_equal(a, b)


def test_shared_array_of_every_kernel_is_found():
    """The emulator finds each kernel's __shared__ array in the symbol table (to poison it
    before every block and bound-check WMMA tiles): one per kernel instantiation (element type
    × 16-byte or element-wise staging × decoupled or not), within the 48 KiB of static shared
    memory."""
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    lib = emu.build_kernels("plain")
    with tempfile.TemporaryDirectory() as tmp:
        cases = [dict(u=_rows_numpy(rows(65, D, dt)), type=_type_code(dt), tau=0.5, labels=None, period=1,
                      grad_lse=np.ones(65, np.float32), grad_pos=np.ones(65, np.float32), decoupled=dcl)
                 for dt in DTYPES for D in (17, 16) for dcl in (False, True)]  # element-wise / 16-byte staging
        emu.write_cases(Path(tmp) / "cases.npz", cases)
        r = subprocess.run([sys.executable, emu.__file__, "run", str(lib), str(Path(tmp) / "cases.npz"),
                            str(Path(tmp) / "out.npz")], capture_output=True, text=True,
                           env={**emu.sanitizer_env("plain"), "FASTNTXENT_EMULATION_VERBOSE": "1"})
    assert r.returncode == 0, r.stderr
    found = re.findall(r"kernel void .*?::(\w+_kernel<[\w:, ]+>)\(.*?: __shared__ .*?::smem, (\d+) bytes", r.stderr)
    assert sorted(name for name, _ in found) == sorted(
        f"{k}_kernel<{t}, {v}, {d}>" for k in ("forward", "backward") for t in ("float", "__half", "__nv_bfloat16")
        for v in ("false", "true") for d in ("false", "true")), r.stderr
    assert all(0 < int(size) <= 48 * 1024 for _, size in found), found


# ---------------------------------------------------------------------------------------
# Every reduction and a learnable temperature, through the package's autograd formula
# ---------------------------------------------------------------------------------------
_OPS: dict = {}


def _emulated_ops(kernels):
    """The emulated forward/backward as torch custom ops, with the package's fake kernels and
    autograd (the same registration every backend's operator pair receives)."""
    if _OPS:
        return _OPS["forward"]

    @torch.library.custom_op("fastntxent_emulation::self_forward", mutates_args=())
    def self_forward(u: Tensor, temperature: Tensor, labels: Optional[Tensor], period: int,
                     decoupled: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        return op_forward(_OPS["kernels"], u, temperature, labels, period, decoupled)

    @torch.library.custom_op("fastntxent_emulation::self_backward", mutates_args=())
    def self_backward(u: Tensor, temperature: Tensor, labels: Optional[Tensor], period: int, lse: Tensor,
                      grad_lse: Tensor, grad_pos: Tensor, decoupled: bool = False) -> Tensor:
        return op_backward(_OPS["kernels"], u, temperature, labels, period, lse, grad_lse, grad_pos, decoupled)

    try:
        from fastntxent.self_family import register_operators
    except ImportError:  # an older layout of the package
        from fastntxent._ops import register_self_ops

        register_self_ops("fastntxent_emulation::self_forward", "fastntxent_emulation::self_backward")
    else:
        register_operators(torch.ops.fastntxent_emulation.self_forward.default,
                           torch.ops.fastntxent_emulation.self_backward.default)
    _OPS.update(kernels=kernels, forward=torch.ops.fastntxent_emulation.self_forward)
    return _OPS["forward"]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", ["nt_xent", "supcon"])
def test_losses_and_learnable_temperature(kernels, reduction, kind):
    forward = _emulated_ops(kernels)
    M, D = 130, 24
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(M, D, generator=gen)
    labels = torch.randint(0, 20, (M,), generator=gen) if kind == "supcon" else None
    period = M // 2
    lab = explicit_labels(M, labels, period)
    log_tau = torch.tensor(float(np.log(0.3)), requires_grad=True)  # learnable, log-parameterised
    zz = z.clone().requires_grad_(True)
    tau = log_tau.exp()
    lse, pos_sum, pos_count, _, _ = forward(reference.normalize_rows(zz), tau, labels, period)
    per_row, has_pos = reference.row_loss(lse, pos_sum, pos_count)
    loss = reference.reduce_rows(per_row, has_pos, reduction)
    weights = torch.randn(M, generator=gen) if reduction == "none" else torch.tensor(1.0)
    gz, gt = torch.autograd.grad((loss * weights).sum(), (zz, log_tau))

    z64 = z.double().requires_grad_(True)
    log_tau64 = torch.tensor(float(np.log(0.3)), dtype=torch.float64, requires_grad=True)
    ref = reference.self_similarity_loss(z64, lab, log_tau64.exp(), reduction=reduction)
    rgz, rgt = torch.autograd.grad((ref * weights.double()).sum(), (z64, log_tau64))
    tol = TOL[torch.float32]
    for name, a, r in (("loss", loss, ref), ("dz", gz, rgz), ("dlog_tau", gt, rgt)):
        err = rel_err(a, r)
        assert err <= tol, f"{kind} {reduction}: {name} relative error {err:.2e}"


# ---------------------------------------------------------------------------------------
# The emulator's rules (small kernels in tests/cuda_emulation_rules.cpp)
# ---------------------------------------------------------------------------------------
def _run_rules(variant: str, scenario: str, env: dict | None = None):
    import subprocess

    exe = emu.build_rules(variant)
    return subprocess.run([str(exe), scenario], capture_output=True, text=True, timeout=120,
                          env=emu.sanitizer_env("plain" if variant == "plain" else variant, env))


def test_emulator_shared_memory_shuffles_and_wmma_products():
    r = _run_rules("plain", "shared_and_shuffle")
    assert r.returncode == 0, r.stderr
    # Per block: a never-written shared element reads NaN (poison, also in the second block:
    # not the first block's value), a value written by another thread, lane 3's value.
    assert r.stdout.split() == ["-nan", "63", "3", "-nan", "163", "3"], r.stdout
    r = _run_rules("plain", "product")
    assert r.returncode == 0, r.stdout + r.stderr
    r = _run_rules("plain", "launch_config")
    assert r.returncode == 0 and r.stdout.split() == ["9", "9", "0"], r.stdout + r.stderr  # invalid configuration


RULE_BREAKERS = {
    "bad_ldm": "ldm 20 is not a multiple of 8 elements",
    "bad_alignment": "is not 32-byte (256-bit) aligned",
    "tile_past_shared": "past its declared size 512",
    "lane_skips_mma": "lanes 0 and 5 disagree on the warp-collective (WMMA) operations executed before __syncwarp()",
    "lane_returns_before_store": "lanes 0 and 7 disagree on the warp-collective (WMMA) operations executed before "
                                 "the end of the kernel",
    "undefined_fragment": "the matrix_b fragment was never loaded or filled",
    "shuffle_after_lane_exit": "lane 31 is named in the mask 0xffffffff of __shfl_xor_sync() (lane 0) but has exited",
    "syncthreads_after_return": "thread 0 returned from the kernel while thread 1 waits at __syncthreads()",
    "divergent_warp": "warp 0 diverges",
    "deadlock": "a deadlock (threads waiting at different barriers)",
}


@pytest.mark.parametrize("scenario", sorted(RULE_BREAKERS))
def test_emulator_aborts_on_broken_rule(scenario):
    r = _run_rules("plain", scenario, {"FASTNTXENT_EMULATION_WATCHDOG": "1"})
    assert r.returncode != 0, f"{scenario} was not caught:\n{r.stdout}{r.stderr}"
    assert "cuda_host_emulation: error:" in r.stderr and RULE_BREAKERS[scenario] in r.stderr, r.stderr


def _sanitizer_available(variant):
    return pytest.mark.skipif(emu.sanitizer_problem(variant) is not None,
                              reason=f"{variant}: {emu.sanitizer_problem(variant)}")


@_sanitizer_available("tsan")
def test_tsan_sees_a_missing_syncwarp_after_store_matrix_sync():
    """WMMA stores are lane-local: reading another lane's element needs a __syncwarp."""
    r = _run_rules("tsan", "store_then_read_sync")
    assert r.returncode == 0 and "ThreadSanitizer" not in r.stderr, r.stderr
    r = _run_rules("tsan", "store_then_read_nosync")
    assert r.returncode != 0 and "WARNING: ThreadSanitizer: data race" in r.stderr, r.stderr[-3000:]
    assert "store_matrix_sync" in r.stderr


# ---------------------------------------------------------------------------------------
# The kernels under the sanitizers (child processes with the runtime preloaded)
# ---------------------------------------------------------------------------------------
def _sanitizer_cases():
    """A reduced set (ThreadSanitizer is slow): several tiles, every dtype, both positive modes,
    D across the 64-wide staging chunk and the 128-wide backward pass, M = 1."""
    cases = []
    specs = [(torch.float32, 1, 8, 0.5, None), (torch.float32, 130, 129, 0.01, None),
             (torch.float16, 65, 17, 0.5, "supcon"), (torch.float16, 130, 129, 0.01, None),
             (torch.bfloat16, 130, 40, 0.5, "supcon"), (torch.bfloat16, 64, 129, 0.01, None)]
    for i, (dtype, M, D, tau, kind) in enumerate(specs):
        u = rows(M, D, dtype, seed=i)
        labels = torch.randint(0, max(2, M // 8), (M,), generator=torch.Generator().manual_seed(i)) \
            if kind == "supcon" else None
        period = 1 if labels is not None else nt_xent_period(M)
        cases.append(dict(u=u, tau=tau, labels=labels, period=period))
    return cases


def _weights(M, seed):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(M, generator=gen, dtype=torch.float64).float()
    b = torch.randn(M, generator=gen, dtype=torch.float64).float()
    a[::3] = 0
    return a, b


def _run_in_child(tmp_path, variant, cases, defines=(), timeout=600):
    lib = emu.build_kernels(variant, defines)
    files = []
    for i, c in enumerate(cases):
        M = c["u"].shape[0]
        a, b = _weights(M, seed=M + c["u"].shape[1])  # the weights check_case(seed=M + D) draws
        files.append(dict(u=_rows_numpy(c["u"]), type=_type_code(c["u"].dtype), tau=c["tau"],
                          labels=None if c["labels"] is None else c["labels"].numpy(), period=c["period"],
                          grad_lse=a.numpy(), grad_pos=b.numpy()))
    emu.write_cases(tmp_path / "cases.npz", files)
    r = emu.run_cases_in_child(lib, variant, tmp_path / "cases.npz", tmp_path / "out.npz", timeout=timeout)
    return r, (np.load(tmp_path / "out.npz") if r.returncode == 0 else None)


@pytest.mark.parametrize("variant", [pytest.param("tsan", marks=_sanitizer_available("tsan")),
                                     pytest.param("asan", marks=_sanitizer_available("asan"))])
def test_kernels_under_sanitizer(tmp_path, kernels, variant):
    cases = _sanitizer_cases()
    r, out = _run_in_child(tmp_path, variant, cases)
    report = r.stderr[-6000:]
    assert r.returncode == 0, f"{variant} run failed (rc {r.returncode}):\n{report}"
    for marker in ("ThreadSanitizer", "AddressSanitizer", "runtime error:", "cuda_host_emulation: error"):
        assert marker not in r.stderr, report
    for i, c in enumerate(cases):
        stats = tuple(torch.from_numpy(out[f"{n}{i}"]) for n in STAT_NAMES)
        grad = torch.from_numpy(out[f"grad{i}"]).to(c["u"].dtype)
        M, D = c["u"].shape
        check_case(kernels, c["u"], c["tau"], c["labels"], c["period"], stats=stats, grad=grad, seed=M + D)


# ---------------------------------------------------------------------------------------
# Planted defects: the checks can fail
# ---------------------------------------------------------------------------------------
@_sanitizer_available("tsan")
def test_tsan_reports_the_dropped_barrier(tmp_path):
    """FASTNTXENT_EMULATION_DROP_BARRIER removes the forward's end-of-tile __syncthreads():
    the next tile's column labels and scores are written while other threads still read."""
    cases = [dict(u=rows(130, 17, torch.float32), tau=0.5, labels=None, period=65)]
    r, _ = _run_in_child(tmp_path, "tsan", cases, defines=("FASTNTXENT_EMULATION_DROP_BARRIER",))
    assert r.returncode != 0, "ThreadSanitizer did not report the dropped barrier"
    assert "WARNING: ThreadSanitizer: data race" in r.stderr, r.stderr[-4000:]
    assert "forward_kernel" in r.stderr, r.stderr[-4000:]


@_sanitizer_available("asan")
def test_asan_reports_the_read_past_the_end_of_shared_memory(tmp_path):
    """FASTNTXENT_EMULATION_READ_PAST_END makes the backward read col_lse[c + 1]: for c = 63 one
    element past the end of the __shared__ array (read when grad_lse of column 127 is not 0)."""
    cases = [dict(u=rows(130, 17, torch.float32), tau=0.5, labels=None, period=65)]
    r, _ = _run_in_child(tmp_path, "asan", cases, defines=("FASTNTXENT_EMULATION_READ_PAST_END",))
    assert r.returncode != 0, "AddressSanitizer did not report the read past the end"
    assert "ERROR: AddressSanitizer: global-buffer-overflow" in r.stderr, r.stderr[-4000:]
    assert "0 bytes to the right of global variable 'smem'" in r.stderr, r.stderr[-4000:]
    assert "in backward_kernel<float, false, false>" in r.stderr, r.stderr[-4000:]  # D = 17: element-wise staging
