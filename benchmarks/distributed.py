"""Per-rank time of the distributed self-family loss (nt_xent, gather=True) at W = 1, 2, 4.

    python benchmarks/distributed.py                         # M_global = 16 384, D = 128, fp32
    python benchmarks/distributed.py --global-rows 4096 --repeats 2   # a quick look

A fixed global batch (M_global rows = 2 views × M_global/2 samples) is split evenly over W gloo
processes on this machine's CPU, one thread each (torch.set_num_threads(1)). Every rank times
forward + backward of `fx.nt_xent(z1, z2, gather=True)` on its rows:
- op_cpu_s: the rank's CPU time (time.thread_time of the calling thread, where the kernels run
  with one thread) minus the CPU time spent inside the collectives — robust when W processes
  share fewer cores (W = 4 on 2 cores) or other jobs load the machine;
- op_wall_s: wall time minus the collectives' wall time (waiting for the other ranks included
  in the collectives, so this is the rank's own compute, disturbed by core sharing);
- coll_wall_s / coll_cpu_s: time inside the collectives (size exchange, all-gather, its
  backward reduce-scatter, the all-reduces of the loss and anchor count), reported apart.
W = 1 is the single-process call `fx.nt_xent(z1, z2)` (no process group): the baseline.
Medians over --repeats steps after one warm-up; ratio = W's per-rank op time / W = 1's, against
the goal 1.3/W. Writes benchmarks/results/distributed.csv (one row per world size and rank) and
distributed.md (the summary), atomically.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import io
import os
import platform
import statistics
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


class CollectiveClock:
    """Accumulates the wall and thread CPU time spent in fastntxent.distributed's collectives."""

    NAMES = ("_all_gather", "_reduce_scatter_sum", "all_reduce_sum")

    def __init__(self):
        self.wall = self.cpu = 0.0

    def install(self) -> None:
        from fastntxent import distributed

        for name in self.NAMES:
            setattr(distributed, name, self._timed(getattr(distributed, name)))

    def _timed(self, fn):
        def wrapper(*args, **kwargs):
            w, c = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.wall += time.perf_counter() - w
                self.cpu += time.thread_time() - c
        return wrapper


def _inputs(global_rows: int, dim: int, world: int, rank: int):
    import torch

    n = global_rows // 2
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(n, dim, generator=g), torch.randn(n, dim, generator=g)
    per = n // world
    rows = slice(rank * per, (rank + 1) * per)
    return z1[rows].clone().requires_grad_(True), z2[rows].clone().requires_grad_(True)


def measure(world: int, rank: int, args, clock: CollectiveClock | None) -> dict:
    import torch

    import fastntxent as fx

    torch.set_num_threads(1)
    z1, z2 = _inputs(args.global_rows, args.dim, world, rank)
    gather = world > 1

    def step():
        z1.grad = z2.grad = None
        loss = fx.nt_xent(z1, z2, 0.5, backend=args.backend, gather=gather)
        loss.backward()
        return loss

    samples = []
    for i in range(args.repeats + 1):
        if clock is not None:
            clock.wall = clock.cpu = 0.0
        w, c = time.perf_counter(), time.thread_time()
        loss = step()
        wall, cpu = time.perf_counter() - w, time.thread_time() - c
        cw, cc = (clock.wall, clock.cpu) if clock is not None else (0.0, 0.0)
        if i > 0:  # the first step warms up
            samples.append((wall - cw, cpu - cc, cw, cc))
    med = [statistics.median(s[k] for s in samples) for k in range(4)]
    if not torch.isfinite(loss):
        raise RuntimeError(f"rank {rank}: the loss is not finite ({float(loss.detach())})")
    return {"world": world, "rank": rank, "local_rows": 2 * z1.shape[0], "global_rows": args.global_rows,
            "dim": args.dim, "dtype": "float32", "backend": args.backend, "repeats": args.repeats,
            "op_wall_s": med[0], "op_cpu_s": med[1], "coll_wall_s": med[2], "coll_cpu_s": med[3],
            "loss": float(loss.detach())}


def _worker(rank: int, world: int, init_file: str, out_dir: str, args) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=1800))
    try:
        clock = CollectiveClock()
        clock.install()
        torch.save(measure(world, rank, args, clock), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_world(world: int, args) -> list:
    import torch
    import torch.multiprocessing as mp

    if world == 1:
        return [measure(1, 0, args, None)]
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(world, os.path.join(d, "init"), d, args), nprocs=world, join=True)
        return [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=True) for r in range(world)]


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--global-rows", type=int, default=16384)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backend", default="cpu")
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args()
    if 1 not in args.worlds:
        raise SystemExit("--worlds must include 1 (the single-process baseline)")
    rows = []
    for world in sorted(args.worlds):
        if (args.global_rows // 2) % world:
            raise SystemExit(f"--global-rows / 2 must be divisible by W = {world}")
        rows += run_world(world, args)
        print(f"W = {world}: done", flush=True)
    base = next(r for r in rows if r["world"] == 1)
    for r in rows:
        r["ratio_cpu"] = r["op_cpu_s"] / base["op_cpu_s"]
        r["ratio_wall"] = r["op_wall_s"] / base["op_wall_s"]
        r["goal_ratio"] = 1.3 / r["world"]
        r["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, shared"
        r["date"] = datetime.date.today().isoformat()
    fields = ["world", "rank", "local_rows", "global_rows", "dim", "dtype", "backend", "repeats", "op_cpu_s",
              "op_wall_s", "coll_cpu_s", "coll_wall_s", "ratio_cpu", "ratio_wall", "goal_ratio", "loss", "machine",
              "date"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in fields})
    os.makedirs(args.out, exist_ok=True)
    _atomic_write(os.path.join(args.out, "distributed.csv"), buf.getvalue())
    lines = [f"# Distributed nt_xent (gather=True), per-rank time, M_global = {args.global_rows}, D = {args.dim}, "
             f"fp32, backend={args.backend}",
             "",
             f"Measured {base['date']} on {base['machine']} (gloo, one thread per process; W = 4 runs 4 processes "
             "on 2 cores, so its wall times include core sharing: the CPU-time ratio is the figure to read). "
             f"Median of {args.repeats} steps; op = forward + backward without the collectives.",
             "",
             "| W | rows/rank | op CPU s (max rank) | ratio CPU | op wall s (max rank) | ratio wall | goal 1.3/W "
             "| collectives wall s | collectives CPU s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for world in sorted(args.worlds):
        rs = [r for r in rows if r["world"] == world]
        worst = max(rs, key=lambda r: r["op_cpu_s"])
        wall = max(rs, key=lambda r: r["op_wall_s"])
        lines.append(f"| {world} | {rs[0]['local_rows']} | {worst['op_cpu_s']:.3f} | {worst['ratio_cpu']:.3f} | "
                     f"{wall['op_wall_s']:.3f} | {wall['ratio_wall']:.3f} | {1.3 / world:.3f} | "
                     f"{max(r['coll_wall_s'] for r in rs):.3f} | {max(r['coll_cpu_s'] for r in rs):.3f} |")
    _atomic_write(os.path.join(args.out, "distributed.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
