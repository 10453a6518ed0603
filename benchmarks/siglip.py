"""Speed and peak memory of SigLIP's sigmoid loss on CPU, next to NT-Xent, side by side in one run.

    python benchmarks/siglip.py                                   # B ∈ {1024, 4096}, D ∈ {128, 512}, fp32 + bf16
    python benchmarks/siglip.py --sizes 1024 4096 8192 16384 --dims 128 --dtypes fp32

Providers (each `fn(img, txt) -> scalar`, forward + backward of img, txt, t and b):
- fastntxent-cpu: `fx.siglip_loss` on the fused C++ CPU kernel;
- naive: SigLIP as open_clip writes it (normalise, t·I Tᵀ + b, labels 2·I − 1, −logsigmoid sum / B);
- naive-compile: torch.compile of that naive loss;
- nt_xent-fastntxent-cpu, nt_xent-naive: NT-Xent of the same two (B, D) towers (M = 2B rows),
  the family the rest of the benchmarks measure (benchmarks/run.py), for scale.
Every point runs in its own worker processes, as in benchmarks/run.py: one for peak memory
(VmHWM − RSS before the measured call, after a warm-up, with glibc returning freed memory at
once), one for time: CPU time of the process per call (median, 20/80 %) and wall median — on
a shared machine CPU time is the number that means something (run with OMP_NUM_THREADS=1 for
single-thread costs without spin-waiting).
Rows go to benchmarks/results/siglip_cpu.csv, the table to benchmarks/results/siglip_cpu.md.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIELDS = ["provider", "B", "D", "dtype", "threads", "date", "cpu_median_ms", "cpu_p20_ms", "cpu_p80_ms", "wall_median_ms",
          "peak_mem_mb", "status"]
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
PROVIDERS = ["fastntxent-cpu", "naive", "naive-compile", "nt_xent-fastntxent-cpu", "nt_xent-naive"]
SCALE, BIAS = 10.0, -10.0


def naive_siglip(img, txt, logit_scale, logit_bias):
    import torch
    import torch.nn.functional as F

    img, txt = F.normalize(img, dim=1), F.normalize(txt, dim=1)
    logits = logit_scale * img @ txt.T + logit_bias
    labels = 2 * torch.eye(img.shape[0], dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / img.shape[0]


def provider(name: str):
    import torch

    import fastntxent as fx

    sys.path.insert(0, str(HERE))
    from providers import naive_nt_xent

    if name == "fastntxent-cpu":
        return lambda x, y, t, b: fx.siglip_loss(x, y, t, b, backend="cpu")
    if name == "naive":
        return naive_siglip
    if name == "naive-compile":
        return torch.compile(naive_siglip)
    if name == "nt_xent-fastntxent-cpu":
        return lambda x, y, t, b: fx.nt_xent(x, y, 0.1, backend="cpu")
    if name == "nt_xent-naive":
        return lambda x, y, t, b: naive_nt_xent(x, y, 0.1)
    raise ValueError(name)


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def worker(cfg: dict) -> dict:
    import time

    import torch

    fn = provider(cfg["provider"])
    dtype = getattr(torch, DTYPES[cfg["dtype"]])
    x, y = (torch.randn(cfg["B"], cfg["D"], dtype=dtype, requires_grad=True) for _ in range(2))
    log_t = torch.tensor(float(torch.tensor(SCALE).log()), requires_grad=True)
    b = torch.tensor(BIAS, requires_grad=True)

    def step():
        fn(x, y, log_t.exp(), b).backward()
        x.grad = y.grad = log_t.grad = b.grad = None

    step()  # warm-up (and compilation)
    if cfg["measure"] == "memory":
        before = _rss("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS mark
        step()
        return {"peak_mem_mb": (_rss("VmHWM") - before) / 2**20, "status": "ok"}
    # CPU time of the process (all its threads) per call: what the loss costs, much less disturbed
    # by other jobs on a shared machine than wall time (which is reported too).
    cpu, wall = [], []
    while len(cpu) < 3 or (sum(cpu) < cfg["min_run_time"] and len(cpu) < 50):
        c0, w0 = time.process_time(), time.perf_counter()
        step()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    cpu.sort()
    q = lambda p: cpu[min(len(cpu) - 1, int(p * len(cpu)))] * 1e3  # noqa: E731
    return {"cpu_median_ms": q(0.5), "cpu_p20_ms": q(0.2), "cpu_p80_ms": q(0.8),
            "wall_median_ms": sorted(wall)[len(wall) // 2] * 1e3, "status": "ok"}


def _run_worker(cfg: dict, env: dict, timeout: float) -> dict:
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], env=env, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    err = proc.stderr.strip().splitlines()
    if proc.returncode in (-9, 137) or any("can't allocate memory" in e.lower() for e in err):
        return {"status": "OOM"}
    return {"status": "error: " + (err[-1][:120] if err else f"exit {proc.returncode}")}


def run_point(cfg: dict, timeout: float) -> dict:
    memory = _run_worker({**cfg, "measure": "memory"},
                         dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0"), timeout)
    if memory["status"] != "ok":
        return memory
    return {**memory, **_run_worker({**cfg, "measure": "time"}, dict(os.environ), timeout)}


def write_table(rows: list, path: Path) -> None:
    """Markdown: per (threads, D, dtype) one table of ms (MiB) by B and provider, and the
    fused/naive ratios; each table names the dates of its rows."""
    lines = ["# SigLIP on CPU: fused vs naive vs torch.compile(naive), next to NT-Xent", "",
             "Forward + backward (img, txt, t, b): median CPU time per call in ms (peak extra memory in MiB). "
             "Measured on a shared 2-core machine: CPU time of the process is reported because wall time "
             "depends on the other jobs (wall medians and 20/80 % quantiles are in the CSV); peak memory is not "
             "affected. bf16: the fused kernel computes in fp32, naive in bf16. Conditions of each run: notes below.",
             ""]
    keys = sorted({(r["threads"], r["D"], r["dtype"]) for r in rows}, key=lambda k: (-int(k[0]), int(k[1]), k[2]))
    for threads, D, dtype in keys:
        sub = [r for r in rows if (r["threads"], r["D"], r["dtype"]) == (threads, D, dtype)]
        names = [p for p in PROVIDERS if any(r["provider"] == p for r in sub)]
        dates = ", ".join(sorted({r["date"] for r in sub}))
        lines += [f"## D = {D}, {dtype}, {threads} thread(s) ({dates})", "",
                  "| B | " + " | ".join(names) + " | fused/naive time | fused/naive memory |",
                  "|---" * (len(names) + 3) + "|"]
        for B in sorted({int(r["B"]) for r in sub}):
            cell, by = [], {r["provider"]: r for r in sub if int(r["B"]) == B}
            for p in names:
                r = by.get(p)
                cell.append("—" if r is None else (f"{float(r['cpu_median_ms']):.1f} ({float(r['peak_mem_mb']):.1f})"
                                                   if r["status"] == "ok" else r["status"]))
            f, n = by.get("fastntxent-cpu"), by.get("naive")
            if f and n and f["status"] == n["status"] == "ok" and f["date"] == n["date"]:  # one run's rows only
                ratio_t = f"{float(f['cpu_median_ms']) / float(n['cpu_median_ms']):.2f}×"
                ratio_m = f"{float(f['peak_mem_mb']) / max(float(n['peak_mem_mb']), 1e-9):.3f}×"
            else:
                ratio_t = ratio_m = "—"
            lines.append(f"| {B} | " + " | ".join(cell) + f" | {ratio_t} | {ratio_m} |")
        lines.append("")
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--dims", type=int, nargs="+", default=[128, 512])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--providers", nargs="+", default=PROVIDERS, choices=PROVIDERS)
    p.add_argument("--min-run-time", type=float, default=1.0)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--out", type=Path, default=HERE / "results" / "siglip_cpu.csv")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    import torch

    new = not args.out.exists()
    with open(args.out, "a", newline="") as f:
        out = csv.DictWriter(f, FIELDS)
        if new:
            out.writeheader()
        for dtype in args.dtypes:
            for D in args.dims:
                for B in args.sizes:
                    for name in args.providers:
                        cfg = {"provider": name, "B": B, "D": D, "dtype": dtype, "min_run_time": args.min_run_time}
                        res = run_point(cfg, args.timeout)
                        row = {"provider": name, "B": B, "D": D, "dtype": dtype, "threads": torch.get_num_threads(),
                               "date": dt.date.today().isoformat(), "status": res["status"],
                               **{k: round(res[k], 3) for k in ("cpu_median_ms", "cpu_p20_ms", "cpu_p80_ms", "wall_median_ms", "peak_mem_mb")
                                  if k in res}}
                        out.writerow(row)
                        f.flush()
                        print({k: row.get(k) for k in ("provider", "B", "D", "dtype", "cpu_median_ms", "peak_mem_mb",
                                                       "status")}, flush=True)
    with open(args.out) as f:
        rows = list(csv.DictReader(f))
    latest = {}
    for r in rows:  # the last measurement of each point
        latest[(r["provider"], r["B"], r["D"], r["dtype"], r["threads"])] = r
    write_table(list(latest.values()), args.out.with_suffix(".md"))


if __name__ == "__main__":
    main()
