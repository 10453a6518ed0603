"""Speed and peak memory of NT-Xent implementations, side by side in one run.

    python benchmarks/run.py                          # CPU: M ∈ {1024, 4096, 8192}, D=128, fp32
    python benchmarks/run.py --device cuda --sizes 8192 32768 131072 --dims 128 256 --dtypes bf16
    python benchmarks/run.py --preset cpu-goals --out benchmarks/results/cpu.csv   # issue 22's goals, ≈ 8 min

--preset cpu-goals measures exactly the points of the CPU kernel's goals (fwd+bwd; fp32, D = 128,
M = 1024 … 16384 and bf16, D = 512, M = 4096; fused, naive, torch.compile(naive)); --rounds N
repeats every point N times, providers interleaved, and keeps the run with the median time.

Every (provider, mode, M, D, dtype) point runs in its own worker process, so that a provider
running out of memory is recorded as "OOM" instead of ending the sweep, and so that peak
memory is measured cleanly:
- CPU, two workers per point. Memory: the worker resets the kernel's peak-RSS mark
  (/proc/self/clear_refs) after warm-up and reports VmHWM − RSS before the measured call, with
  glibc told to return freed memory to the OS at once (MALLOC_MMAP_THRESHOLD_), i.e. the extra
  memory the loss needs on top of its inputs. Time: a second worker with the default allocator
  (the memory settings make every large allocation an mmap and would distort time),
  torch.utils.benchmark's blocked_autorange, median and 20/80 % quantiles.
- CUDA: triton.testing.do_bench (median, 20/80 %) over rotating inputs after a warm-up that
  covers JIT and autotuning; memory = torch.cuda.max_memory_allocated − the inputs.
TFLOP/s counts 6·M²·D for forward+backward (2·M²·D for forward) and is compared with the
matmul rate measured in the same run. Rows are appended to benchmarks/results/<device>.csv.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

FIELDS = ["provider", "mode", "M", "D", "dtype", "device", "device_name", "version", "date",
          "median_ms", "p20_ms", "p80_ms", "tflops", "matmul_tflops", "frac_of_matmul",
          "peak_mem_mb", "status"]
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def flops(mode: str, M: int, D: int) -> float:
    return (6 if mode == "fwd+bwd" else 2) * M * M * D


def device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


# ----------------------------------------------------------------------------- worker side
def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _make_inputs(M, D, dtype, device, count):
    import torch

    n = M // 2
    return [tuple(torch.randn(n, D, device=device, dtype=getattr(torch, dtype), requires_grad=True)
                  for _ in range(2)) for _ in range(count)]


def _step(fn, z1, z2, mode):
    loss = fn(z1, z2)
    if mode == "fwd+bwd":
        loss.backward()
    return loss


def worker(cfg: dict) -> dict:
    import torch

    from providers import available

    provider, mode, M, D, dtype, device = (cfg[k] for k in ("provider", "mode", "M", "D", "dtype", "device"))
    fn = available(device)[provider]()
    grad_ctx = torch.enable_grad() if mode == "fwd+bwd" else torch.no_grad()
    with grad_ctx:
        if device == "cuda":
            return _worker_cuda(fn, mode, M, D, dtype)
        return _worker_cpu(fn, mode, M, D, dtype, cfg["measure"])


def _worker_cpu(fn, mode, M, D, dtype, measure):
    import torch
    import torch.utils.benchmark as tb

    (z1, z2), = _make_inputs(M, D, dtype, "cpu", 1)
    loss = _step(fn, z1, z2, mode)  # warm-up (and compilation)
    if not torch.isfinite(loss):
        return {"status": "nonfinite"}
    z1.grad = z2.grad = None
    del loss
    if measure == "memory":
        before = _rss("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS mark
        _step(fn, z1, z2, mode)
        return {"peak_mem_mb": (_rss("VmHWM") - before) / 2**20, "status": "ok"}
    # Timer defaults to one thread: measure with all the threads the loss would use.
    timer = tb.Timer("step(fn, z1, z2, mode); z1.grad = z2.grad = None",
                     globals={"step": _step, "fn": fn, "z1": z1, "z2": z2, "mode": mode},
                     num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=2.0)
    times = sorted(m.times)
    q = lambda p: times[min(len(times) - 1, int(p * len(times)))] * 1e3
    return {"median_ms": m.median * 1e3, "p20_ms": q(0.2), "p80_ms": q(0.8), "status": "ok"}


def _worker_cuda(fn, mode, M, D, dtype):
    import torch
    from triton.testing import do_bench

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    sets = _make_inputs(M, D, dtype, "cuda", 3)
    inputs_bytes = torch.cuda.memory_allocated()
    try:
        for z1, z2 in sets:  # warm-up: JIT, autotuning, compilation
            loss = _step(fn, z1, z2, mode)
        torch.cuda.synchronize()
        if not torch.isfinite(loss):
            return {"status": "nonfinite"}
        del loss
        for z1, z2 in sets:
            z1.grad = z2.grad = None
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        z1, z2 = sets[0]
        _step(fn, z1, z2, mode)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        state = {"i": 0}

        def call():
            a, b = sets[state["i"] % len(sets)]
            state["i"] += 1
            a.grad = b.grad = None
            _step(fn, a, b, mode)

        med, p20, p80 = do_bench(call, warmup=25, rep=200, quantiles=[0.5, 0.2, 0.8])
    except torch.cuda.OutOfMemoryError:
        return {"status": "OOM"}
    return {"median_ms": med, "p20_ms": p20, "p80_ms": p80, "peak_mem_mb": peak / 2**20,
            "inputs_mb": inputs_bytes / 2**20, "status": "ok"}


def matmul_tflops(device: str, dtype: str) -> float:
    """Measured matmul rate for the dtype: the ceiling the fused kernels are compared with."""
    import torch

    n = 8192 if device == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    b = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    if device == "cuda":
        from triton.testing import do_bench

        ms = do_bench(lambda: a @ b, warmup=25, rep=200)
    else:
        import torch.utils.benchmark as tb

        timer = tb.Timer("a @ b", globals={"a": a, "b": b}, num_threads=torch.get_num_threads())
        ms = timer.blocked_autorange(min_run_time=1.0).median * 1e3
    return 2 * n**3 / (ms * 1e-3) / 1e12


# ----------------------------------------------------------------------------- driver side
def _is_oom(message: str) -> bool:
    """CUDA's OutOfMemoryError or the CPU allocator's failure."""
    m = message.lower()
    return "out of memory" in m or "outofmemory" in m or "can't allocate memory" in m


def run_point(cfg: dict, timeout: float) -> dict:
    """One (provider, mode, M, D, dtype) point; on CPU memory and time in separate workers."""
    if cfg["device"] != "cpu":
        return _run_worker(cfg, dict(os.environ), timeout)
    memory = _run_worker({**cfg, "measure": "memory"},
                         dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0"), timeout)
    if memory["status"] != "ok":
        return memory
    return {**memory, **_run_worker({**cfg, "measure": "time"}, dict(os.environ), timeout)}


def _run_worker(cfg: dict, env: dict, timeout: float) -> dict:
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    err = proc.stderr.strip().splitlines()
    if any(_is_oom(e) for e in err) or proc.returncode in (-9, 137):
        return {"status": "OOM"}
    return {"status": "error: " + (err[-1][:120] if err else f"exit {proc.returncode}")}


# Groups (dtype, D, sizes, providers) of a preset; every point fwd+bwd.
PRESETS = {
    "cpu-goals": [("fp32", 128, [1024, 2048, 4096, 8192, 16384], ["fastntxent-cpu", "naive", "naive-compile"]),
                  ("bf16", 512, [4096], ["fastntxent-cpu", "naive", "naive-compile"])],
}


def _median_run(results: list) -> dict:
    """The run with the median time among repeats of one point (a failure wins: it is the news)."""
    bad = [r for r in results if r["status"] != "ok"]
    if bad:
        return bad[0]
    return sorted(results, key=lambda r: r["median_ms"])[len(results) // 2]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="M = 2N rows")
    p.add_argument("--dims", type=int, nargs="+", default=[128])
    p.add_argument("--dtypes", nargs="+", default=None, choices=list(DTYPES))
    p.add_argument("--modes", nargs="+", default=["fwd+bwd"], choices=["fwd", "fwd+bwd"])
    p.add_argument("--providers", nargs="+", default=None)
    p.add_argument("--out", default=None, help="CSV path (default benchmarks/results/<device>.csv)")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="a fixed set of points (overrides --sizes/--dims/--dtypes/--modes/--providers)")
    p.add_argument("--rounds", type=int, default=1, help="repeats of every point, providers interleaved")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return

    import torch

    import fastntxent
    from providers import available

    sizes = args.sizes or ([1024, 4096, 8192] if args.device == "cpu" else [8192, 32768, 131072])
    dtypes = args.dtypes or (["fp32"] if args.device == "cpu" else ["bf16"])
    providers = args.providers or list(available(args.device))
    if args.preset:
        groups = [(dt_key, [mode], [D], Ms, provs) for dt_key, D, Ms, provs in PRESETS[args.preset]
                  for mode in ["fwd+bwd"]]
    else:
        groups = [(dt_key, args.modes, args.dims, sizes, providers) for dt_key in dtypes]
    name = device_name(args.device)
    out = Path(args.out or HERE / "results" / f"{args.device}.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    date = dt.date.today().isoformat()
    print(f"device: {name}; torch {torch.__version__}; fastntxent {fastntxent.__version__}")
    rows = []
    for dtype_key, modes, dims, group_sizes, group_providers in groups:
        dtype = DTYPES[dtype_key]
        peak_rate = matmul_tflops(args.device, dtype)
        print(f"matmul rate ({dtype_key}): {peak_rate:.2f} TFLOP/s; providers: {group_providers}")
        for mode in modes:
            for D in dims:
                failed = set()  # a provider that ran out of memory skips larger M
                for M in sorted(group_sizes):
                    repeats = {prov: [] for prov in group_providers}
                    for _ in range(max(1, args.rounds)):
                        for prov in group_providers:
                            if prov in failed:
                                repeats[prov].append({"status": "OOM"})
                                continue
                            repeats[prov].append(run_point({"provider": prov, "mode": mode, "M": M, "D": D,
                                                            "dtype": dtype, "device": args.device}, args.timeout))
                    for prov in group_providers:
                        row = {"provider": prov, "mode": mode, "M": M, "D": D, "dtype": dtype_key,
                               "device": args.device, "device_name": name,
                               "version": fastntxent.__version__, "date": date,
                               "matmul_tflops": round(peak_rate, 3)}
                        res = _median_run(repeats[prov])
                        if res["status"] == "OOM":
                            failed.add(prov)
                        row.update({k: res.get(k, "") for k in ("median_ms", "p20_ms", "p80_ms", "peak_mem_mb")})
                        row["status"] = res["status"]
                        if res["status"] == "ok":
                            tf = flops(mode, M, D) / (res["median_ms"] * 1e-3) / 1e12
                            row["tflops"] = round(tf, 4)
                            row["frac_of_matmul"] = round(tf / peak_rate, 4)
                            for k in ("median_ms", "p20_ms", "p80_ms", "peak_mem_mb"):
                                row[k] = round(row[k], 3)
                        rows.append(row)
                        print(_format(row), flush=True)
    new = not out.exists()
    with open(out, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(rows)
    print(f"appended {len(rows)} rows to {out}")
    from summarize import summarize

    summarize(out)


def _format(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['provider']:>26} {r['mode']:>7} M={r['M']:>7} D={r['D']:>4} {r['dtype']}: {r['status']}"
    return (f"{r['provider']:>26} {r['mode']:>7} M={r['M']:>7} D={r['D']:>4} {r['dtype']}: "
            f"{r['median_ms']:10.2f} ms  {r['tflops']:8.3f} TFLOP/s ({100 * r['frac_of_matmul']:5.1f}% of matmul)"
            f"  peak {r['peak_mem_mb']:10.1f} MiB")


if __name__ == "__main__":
    main()
