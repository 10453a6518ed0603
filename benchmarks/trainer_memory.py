"""Peak memory of the whole trainer process against the batch size, with gradient caching.

    python benchmarks/trainer_memory.py                        # digits_cnn, batch 512 and 4096, chunk 256
    python benchmarks/trainer_memory.py --arch resnet18 --batches 256 4096 --chunk 128

Each batch size runs `fastntxent-pretrain --dataset synthetic --arch A --batch-size B
--chunk-size C --epochs 2 --stop-after-epochs 1 --no-progress --no-plot --knn-every 0` (one
epoch of the 8192 synthetic CIFAR-shaped images, no evaluation) in a fresh subprocess, whose
peak RSS (ru_maxrss: torch, the dataset, the model, the optimiser, the data pipeline, the step)
is read back with getrusage(RUSAGE_CHILDREN) after it exits. Results: --out .json and .md
(rewritten after every run). Wall times are the machine's, contention included.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def run_one(arch: str, batch: int, chunk: int, out_dir: str) -> dict:
    """One trainer run in a child process: {batch, chunk, peak_rss_mib, wall_s, exit, args}."""
    args = ["--dataset", "synthetic", "--arch", arch, "--batch-size", str(batch), "--chunk-size", str(chunk),
            "--epochs", "2", "--stop-after-epochs", "1", "--no-progress", "--no-plot", "--knn-every", "0",
            "--run-dir", os.path.join(out_dir, f"{arch}-{batch}")]
    # ru_maxrss of RUSAGE_CHILDREN is the largest child so far: one helper process per run
    helper = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
              "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", helper, sys.executable, "-m", "fastntxent.train", *args],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    lines = proc.stdout.strip().splitlines()
    peak_kib = int(lines[-1]) if lines and lines[-1].isdigit() else -1
    return {"batch": batch, "chunk": chunk, "peak_rss_mib": round(peak_kib / 1024, 1), "wall_s": round(wall, 1),
            "exit": proc.returncode, "args": args, "stderr_tail": proc.stderr.strip().splitlines()[-3:]}


def write(rows: list, meta: dict, out: str) -> None:
    with open(out + ".json.tmp", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    os.replace(out + ".json.tmp", out + ".json")
    lines = [f"# Trainer peak RSS against the batch ({meta['date']}, {meta['device']}, {meta['arch']})", "",
             f"`{meta['command']}`", "", "| batch | chunk | peak RSS MiB | vs first | wall s | exit |", "|---|---|---|---|---|---|"]
    base = rows[0]["peak_rss_mib"] if rows else 1
    for r in rows:
        lines.append(f"| {r['batch']} | {r['chunk']} | {r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] / base:.3f} | "
                     f"{r['wall_s']:.0f} | {r['exit']} |")
    with open(out + ".md.tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(out + ".md.tmp", out + ".md")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="digits_cnn")
    p.add_argument("--batches", type=int, nargs="+", default=[512, 4096])
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--out", default=os.path.join(HERE, "results", "trainer_memory"))
    p.add_argument("--run-dir", default=os.path.join("build", "trainer_memory"))
    a = p.parse_args()
    import torch

    meta = {"what": "peak RSS (ru_maxrss) of a whole fastntxent-pretrain process, one epoch of --dataset synthetic",
            "arch": a.arch, "device": "cpu", "torch": torch.__version__, "date": datetime.date.today().isoformat(),
            "command": "python benchmarks/trainer_memory.py " + " ".join(sys.argv[1:])}
    rows = []
    for batch in a.batches:
        rows.append(run_one(a.arch, batch, a.chunk, a.run_dir))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "args"}), flush=True)
        write(rows, meta, a.out)


if __name__ == "__main__":
    main()
