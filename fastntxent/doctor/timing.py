"""Fused vs naive forward+backward of nt_xent, and the device's matmul rate in the same run.

FLOP of the self family forward+backward: 6·M²·D (M = 2N rows). The matmul rate is that of
an M×D @ D×M product (2·M²·D FLOP) in the same dtype, measured here. Times are medians after
a warm-up that covers JIT and autotuning: triton.testing.do_bench on a GPU (CUDA events when
triton is missing), time.perf_counter on the CPU. Each backend is first verified at the timed
size against the chunked float64 reference (fastntxent.doctor.sampled).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

import fastntxent as fx

from .sampled import nt_xent_sampled


CPU_SAMPLE_SECONDS = 0.05


@dataclass
class Timing:
    backend: str
    device: str
    dtype: str
    M: int
    D: int
    status: str = "PASS"  # PASS (verified and timed), FAIL (wrong answer or error), SKIP
    ms: float | None = None
    tflops: float | None = None
    naive_ms: float | None = None
    speedup: float | None = None
    matmul_tflops: float | None = None
    fraction_of_matmul: float | None = None
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def median_seconds(fn, device, repeats: int) -> float:
    """Median time of fn() in seconds after a warm-up."""
    if torch.device(device).type == "cuda":
        return _cuda_median(fn, repeats)
    start = time.perf_counter()
    fn()
    fn()  # warm-up
    calls = max(1, int(CPU_SAMPLE_SECONDS / max((time.perf_counter() - start) / 2, 1e-9)))
    times = []
    for _ in range(repeats):  # each sample runs long enough for perf_counter and the thread pool
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def _cuda_median(fn, repeats: int) -> float:
    try:
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=max(20, 10 * repeats), return_mode="median") / 1e3
    except Exception:  # noqa: BLE001 - no triton (or no driver for it): CUDA events
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)


def _fwd_bwd(backend: str, z: torch.Tensor):
    N = z.shape[0] // 2

    def run():
        z.grad = None
        fx.nt_xent(z[:N], z[N:], 0.5, backend=backend).backward()

    return run


def _random_rows(M: int, D: int, dtype, device, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(M, D, generator=gen).to(device=device, dtype=dtype)


def matmul_tflops(M: int, D: int, dtype, device, repeats: int, seed: int = 0) -> float:
    a = _random_rows(M, D, dtype, device, seed)
    b = _random_rows(D, M, dtype, device, seed + 1)
    return 2 * M * M * D / median_seconds(lambda: a @ b, device, repeats) / 1e12


def naive_ms(M: int, D: int, dtype, device, repeats: int, seed: int = 0) -> float | str:
    """Median ms of the reference backend (the naive O(M²) loss) or "OOM"."""
    z = _random_rows(M, D, dtype, device, seed).requires_grad_(True)
    try:
        return median_seconds(_fwd_bwd("reference", z), device, repeats) * 1e3
    except (torch.cuda.OutOfMemoryError, MemoryError):
        return "OOM"
    finally:
        del z
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()


def time_backend(backend: str, device, dtype, M: int, D: int, *, repeats: int, matmul: float,
                 naive: float | str, seed: int = 0) -> Timing:
    """Verify `backend` at this size, then time its forward+backward."""
    row = Timing(backend, str(device), str(dtype).replace("torch.", ""), M, D, matmul_tflops=matmul)
    check = nt_xent_sampled(backend, device, dtype, M // 2, D, 0.5, samples=64, seed=seed)
    if not check.passed:
        quantity, err, tol = check.worst()
        row.status = "FAIL"
        row.note = check.message or f"wrong answer before timing: {quantity} error {err:.2e} > {tol:.0e}"
        return row
    z = _random_rows(M, D, dtype, device, seed).requires_grad_(True)
    try:
        seconds = median_seconds(_fwd_bwd(backend, z), device, repeats)
    except Exception as exc:  # noqa: BLE001
        row.status, row.note = "FAIL", f"{type(exc).__name__}: {exc}"[:200]
        return row
    row.ms = seconds * 1e3
    row.tflops = 6 * M * M * D / seconds / 1e12
    row.fraction_of_matmul = row.tflops / matmul if matmul else None
    if isinstance(naive, float):
        row.naive_ms, row.speedup = naive, naive / row.ms
    else:
        row.note = f"naive: {naive}"
    return row
