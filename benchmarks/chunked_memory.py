"""Memory and time of a SimCLR step with and without embedding-gradient caching
(fastntxent.chunked.chunked_backward), per batch size.

    python benchmarks/chunked_memory.py                       # CPU: small CNN, 32x32, batch 256/1024/4096
    python benchmarks/chunked_memory.py --arch resnet18 --steps 1 --max-unchunked 1024 \
        --out benchmarks/results/chunked_memory_resnet18       # issue 18's table (ResNet-18, CIFAR stem)
    python benchmarks/chunked_memory.py --device cuda --arch resnet18 --batches 256 1024 4096

Each (batch, mode) runs in a fresh subprocess, so the peak-RSS high-water mark is its own.
Reported per configuration:
- saved_mib: peak bytes of the tensors autograd holds for the backward (activations; measured
  with torch.autograd.graph.saved_tensors_hooks, parameters excluded) — exact on any device;
- peak_mib: CUDA max_memory_allocated above the memory held before the step (GPU only), or
  on CPU the process's peak RSS above its RSS before the first step (includes the allocator's
  caching and the embeddings, gradients, optimizer-free step: an upper bound);
- seconds: wall time of one step (forward + backward; the best of --steps steps; the last
  step runs under the saved-tensor hooks, one Python call per saved tensor).
The step is model(cat(x1, x2)) -> NT-Xent -> backward (unchunked), or chunked_backward with
concat_views=True and --chunk images per call (the trainer's --chunk-size).
Results are rewritten after every configuration (a long sweep interrupted keeps its rows).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _model(arch: str, device):
    from torch import nn

    from fastntxent.train.models import DigitsCNN, projection_head, resnet

    backbone = DigitsCNN(3, 16) if arch == "small_cnn" else resnet(arch, cifar_stem=True)
    return nn.Sequential(backbone, projection_head(backbone.out_dim, 512, 128)).to(device)


class _SavedBytes:
    """Peak bytes of the storages autograd saves (parameters excluded), inside the block."""

    def __init__(self, params):
        self.params = {p.untyped_storage().data_ptr() for p in params}
        self.live, self.now, self.peak = {}, 0, 0

    def __enter__(self):
        import torch

        outer = self

        class Handle:
            def __init__(self, t):
                self.t, self.key = t, t.untyped_storage().data_ptr()
                self.counted = self.key not in outer.params
                if self.counted:
                    outer.live[self.key] = outer.live.get(self.key, 0) + 1
                    if outer.live[self.key] == 1:
                        outer.now += t.untyped_storage().nbytes()
                        outer.peak = max(outer.peak, outer.now)

            def __del__(self):
                if self.counted:
                    outer.live[self.key] -= 1
                    if outer.live[self.key] == 0:
                        outer.now -= self.t.untyped_storage().nbytes()

        self._ctx = torch.autograd.graph.saved_tensors_hooks(Handle, lambda h: h.t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def child(args) -> dict:
    import torch

    import fastntxent as fx
    from fastntxent.chunked import chunked_backward

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = _model(args.arch, device).train()
    x1, x2 = (torch.randn(args.batch, 3, args.image_size, args.image_size, device=device) for _ in range(2))
    loss_fn = lambda a, b: fx.nt_xent(a, b, 0.2)  # noqa: E731
    use_bf16 = device.type == "cuda"

    def step(x1=x1, x2=x2, chunk=args.chunk):
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            if chunk:
                chunked_backward(model, [x1, x2], loss_fn, chunk, concat_views=True)
            else:
                z1, z2 = model(torch.cat([x1, x2])).chunk(2)
                loss_fn(z1, z2).backward()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    step(x1[:8], x2[:8], min(args.chunk, 4))  # warm-up (first-call costs), before the baseline
    rss0 = _rss_mib()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    sb = _SavedBytes(model.parameters())
    for i in range(args.steps):
        sync()
        t = time.perf_counter()
        with sb if i == args.steps - 1 else contextlib.nullcontext():
            step()
        sync()
        times.append(time.perf_counter() - t)
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0
    return {"batch": args.batch, "chunk": args.chunk, "seconds": min(times), "peak_mib": peak,
            "saved_mib": sb.peak / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--arch", default="small_cnn", choices=("small_cnn", "resnet18", "resnet50"))
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batches", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--max-unchunked", type=int, default=None,
                   help="skip the unchunked step above this batch (it may not fit)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(HERE, "results", "chunked_memory"))
    p.add_argument("--append", action="store_true",
                   help="keep the rows already in <out>.json (a sweep run in pieces)")
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)  # child process
    args = p.parse_args()
    if args.batch is not None:
        print(json.dumps(child(args)))
        return
    rows, lines = [], []
    if args.append and os.path.exists(args.out + ".json"):  # keep the rows of earlier runs
        with open(args.out + ".json") as f:
            rows = json.load(f)["rows"]
    for batch in args.batches:
        for chunk in (0, args.chunk):
            if chunk == 0 and args.max_unchunked is not None and batch > args.max_unchunked:
                continue
            cmd = [sys.executable, __file__, "--device", args.device, "--arch", args.arch,
                   "--image-size", str(args.image_size), "--steps", str(args.steps),
                   "--threads", str(args.threads), "--batch", str(batch), "--chunk", str(chunk)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                print(f"batch {batch} chunk {chunk}: failed\n{r.stderr[-2000:]}", file=sys.stderr)
                continue
            row = json.loads(r.stdout.strip().splitlines()[-1])
            rows = [x for x in rows if (x["batch"], x["chunk"]) != (batch, chunk)] + [row]
            print(f"batch {batch:5d} {'chunk ' + str(chunk) if chunk else 'unchunked':>10}: "
                  f"saved {row['saved_mib']:9.1f} MiB  peak {row['peak_mib']:9.1f} MiB  "
                  f"{row['seconds']:8.2f} s", flush=True)
            lines = _write(args, rows)
    print("\n".join(lines))


def _write(args, rows) -> list:
    """<out>.json (meta + rows) and <out>.md (the table), rewritten atomically."""
    import torch

    meta = {"device": args.device, "arch": args.arch, "image_size": args.image_size, "chunk": args.chunk,
            "threads": args.threads, "steps": args.steps, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"),
            "peak": "cuda max_memory_allocated" if args.device.startswith("cuda") else "peak RSS above start"}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    by = {(r["batch"], r["chunk"]): r for r in rows}
    lines = [f"# chunked_backward: SimCLR step, {args.arch}, {args.image_size}px, {args.device} "
             f"({meta['date']}, torch {meta['torch']}, {args.threads} threads, best of {args.steps} step(s))", "",
             f"saved = peak activations held by autograd; peak = {meta['peak']}; chunk = {args.chunk} images",
             "", "| batch | saved MiB unchunked | saved MiB chunked | peak MiB unchunked | peak MiB chunked "
             "| s unchunked | s chunked | time ratio |", "|---|---|---|---|---|---|---|---|"]
    for b in sorted({r["batch"] for r in rows} | set(args.batches)):
        u, c = by.get((b, 0)), by.get((b, args.chunk))

        def f(r, k, fmt="{:.1f}"):
            return fmt.format(r[k]) if r else "—"
        ratio = f"{c['seconds'] / u['seconds']:.2f}" if u and c else "—"
        lines.append(f"| {b} | {f(u, 'saved_mib')} | {f(c, 'saved_mib')} | {f(u, 'peak_mib')} | "
                     f"{f(c, 'peak_mib')} | {f(u, 'seconds', '{:.2f}')} | {f(c, 'seconds', '{:.2f}')} | {ratio} |")
    for ext, text in ((".json", json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n"),
                      (".md", "\n".join(lines) + "\n")):
        with open(args.out + ext + ".tmp", "w") as fh:
            fh.write(text)
        os.replace(args.out + ext + ".tmp", args.out + ext)
    return lines


if __name__ == "__main__":
    main()
