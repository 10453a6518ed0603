"""Command line of the doctor: `python -m fastntxent.doctor [--quick] [--json PATH] ...`."""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

import torch

from . import environment, report
from .availability import BACKENDS, backend_status, device_types, family_status
from .cases import LOSSES
from .grid import DTYPES, FULL, INTERPRETED, QUICK, Grid, Row, check_row, dtype_name
from .sampled import info_nce_sampled, nt_xent_sampled
from .timing import Timing, matmul_tflops, naive_ms, time_backend

DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64,
               "fp64": torch.float64, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
               "float16": torch.float16, "fp16": torch.float16}
LARGE_M, LARGE_D, LARGE_TAU, LARGE_SAMPLES = 65_536, 64, 0.1, 256


def _names(parser: argparse.ArgumentParser, text: str | None, allowed, what: str) -> list[str]:
    if text is None:
        return list(allowed)
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in allowed]
    if bad:
        parser.error(f"unknown {what} {', '.join(bad)}; choose from {', '.join(allowed)}")  # exit code 2
    return names


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="fastntxent-doctor",
        description="Check fastntxent on this machine: versions, devices, which backend runs, every "
                    "backend against the float64 reference, fused vs naive timing. Exits 1 on any FAIL.")
    p.add_argument("--quick", action="store_true",
                   help="small grid (M 1/2/63, D 1/17), fewer timing repeats, no large-M case (under a minute on a CPU)")
    p.add_argument("--json", metavar="PATH", help="also write the findings as JSON")
    p.add_argument("--device", default="all",
                   help="cpu, cuda, cuda:N or all (default: the CPU and the current CUDA device if any; "
                        "the full grid takes tens of minutes on a CPU, --device cuda skips it)")
    p.add_argument("--backends", help=f"comma-separated subset of {','.join(BACKENDS)}")
    p.add_argument("--losses", help=f"comma-separated subset of {','.join(LOSSES)}")
    p.add_argument("--dtypes", help="comma-separated subset of float32,float64,bfloat16,float16")
    p.add_argument("--rows", help="override the grid's M values, e.g. 1,2,17")
    p.add_argument("--dims", help="override the grid's D values")
    p.add_argument("--taus", help="override the grid's temperatures")
    p.add_argument("--no-timing", action="store_true", help="skip the timing section")
    p.add_argument("--seed", type=int, help="seed of the random inputs (default: fresh each run, printed)")
    p.add_argument("--inject-fault", type=float, default=0.0, help=argparse.SUPPRESS)  # debug: perturb results
    args = p.parse_args(argv)
    args.backends = _names(p, args.backends, BACKENDS, "backend")
    args.losses = _names(p, args.losses, LOSSES, "loss")
    dtypes = _names(p, args.dtypes, DTYPE_NAMES, "dtype") if args.dtypes else None
    args.dtypes = None if dtypes is None else {DTYPE_NAMES[d] for d in dtypes}
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device here")
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**31)
    return args


def select_devices(spec: str) -> list[str]:
    if spec == "all":
        return ["cpu"] + ([f"cuda:{torch.cuda.current_device()}"] if torch.cuda.is_available() else [])
    return [spec if spec != "cuda" else f"cuda:{torch.cuda.current_device()}"]


def interpreting(device: str) -> bool:
    return torch.device(device).type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def grid_for(args, backend: str, device: str) -> Grid:
    base = QUICK if args.quick else FULL
    if backend == "triton" and interpreting(device):
        base = INTERPRETED
    def parse(text, kind, default):
        return tuple(kind(x) for x in text.split(",")) if text else default
    return Grid(parse(args.rows, int, base.rows), parse(args.dims, int, base.dims),
                parse(args.taus, float, base.taus))


def availability_table(backends) -> dict:
    return {b: {dtype: family_status(b, dev) for dtype, dev in device_types()} for b in backends}


def dtypes_for(args, backend: str):
    return [d for d in DTYPES[backend] if args.dtypes is None or d in args.dtypes]


def _unavailable_everywhere(backend: str, device: str) -> str:
    """Why `backend` runs no loss on `device` (the self family's reason), or "" if it runs some."""
    status = family_status(backend, device)
    return "" if status["self"][0] or status["cross"][0] else status["self"][1]


def run_accuracy(args, devices) -> list[Row]:
    rows = []
    report.print_row_header("accuracy against the float64 reference (loss, input gradients, "
                            "temperature/logit_scale gradient; upstream gradient != 1)")
    for device in devices:
        for backend in args.backends:
            grid = grid_for(args, backend, device)
            unavailable = _unavailable_everywhere(backend, device)
            if unavailable:
                row = Row(backend, device, "(all)", "(all)", status="N/A", reason=unavailable)
                report.print_row(row)
                rows.append(row)
                continue
            for loss in args.losses:
                for dtype in dtypes_for(args, backend):
                    row = check_row(backend, device, LOSSES[loss], dtype, grid, seed=args.seed,
                                    fault=args.inject_fault)
                    report.print_row(row)
                    rows.append(row)
    return rows


def large_m_row(backend: str, device: str, loss: str, dtype, seed: int) -> Row:
    """One large-M check (past 2³¹ similarities) on a GPU; N/A where the library says so."""
    row = Row(backend, device, loss, dtype_name(dtype))
    ok, why = backend_status(backend, device, dtype, loss)
    if not ok:
        row.status, row.reason = "N/A", why
        return row
    start = time.perf_counter()
    check = nt_xent_sampled if loss == "nt_xent" else info_nce_sampled
    size = LARGE_M // 2 if loss == "nt_xent" else LARGE_M
    result = check(backend, device, dtype, size, LARGE_D, LARGE_TAU, samples=LARGE_SAMPLES, seed=seed)
    row.cases, row.seconds = 1, time.perf_counter() - start
    row.quantity, row.worst_error, row.tolerance = result.worst()
    row.shape = f"M={LARGE_M} D={LARGE_D} tau={LARGE_TAU:g}, all row losses + {LARGE_SAMPLES} sampled gradient rows"
    if not result.passed:
        row.status, row.reason = "FAIL", result.message or f"{row.quantity} at {row.shape}"
    return row


def run_large(args, devices) -> list[Row]:
    gpus = [d for d in devices if torch.device(d).type == "cuda"]
    if args.quick or not gpus:
        print(f"== large M ({LARGE_M} rows, 2^32 similarities): skipped "
              f"({'--quick' if args.quick else 'GPU only, and there is no CUDA device'})")
        return []
    report.print_row_header("large M past the 2^31 index line, against a chunked float64 reference")
    rows = []
    for device in gpus:
        for backend in [b for b in args.backends if b in ("triton", "cuda")]:
            for loss in [l for l in ("nt_xent", "info_nce") if l in args.losses]:
                for dtype in [d for d in (torch.float32, torch.bfloat16) if args.dtypes is None or d in args.dtypes]:
                    row = large_m_row(backend, device, loss, dtype, args.seed)
                    report.print_row(row)
                    rows.append(row)
    return rows


def timing_plan(args, device: str):
    """(backends, dtypes, sizes, D, repeats) to time on `device`."""
    if torch.device(device).type == "cuda":
        backends = [b for b in args.backends if b in ("triton", "cuda")]
        return backends, [torch.bfloat16, torch.float32], (4096, 16384), 128, 10 if args.quick else 50
    backends = [b for b in args.backends if b in ("cpu", "triton")]
    return backends, [torch.float32], (512, 1024) if args.quick else (2048, 4096), 128, 3 if args.quick else 7


def run_timing(args, devices) -> list[Timing]:
    rows = []
    for device in devices:
        backends, dtypes, sizes, D, repeats = timing_plan(args, device)
        dtypes = [d for d in dtypes if args.dtypes is None or d in args.dtypes]
        for dtype in dtypes:
            for M in sizes:
                matmul = naive = None
                for backend in backends:
                    row = Timing(backend, device, dtype_name(dtype), M, D)
                    if backend == "triton" and interpreting(device):
                        row.status, row.note = "SKIP", "Triton interpreter: a time would mean nothing"
                    elif not backend_status(backend, device, dtype, "nt_xent")[0]:
                        continue  # not available here: the backends section says why
                    else:
                        if matmul is None:
                            matmul = matmul_tflops(M, D, dtype, device, repeats, args.seed)
                            naive = naive_ms(M, D, dtype, device, repeats, args.seed)
                        row = time_backend(backend, device, dtype, M, D, repeats=repeats, matmul=matmul,
                                           naive=naive, seed=args.seed)
                    rows.append(row)
    report.print_timing(rows)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    devices = select_devices(args.device)
    versions, gpus = environment.versions(), environment.cuda_devices()
    print(f"fastntxent doctor{' --quick' if args.quick else ''}: seed {args.seed} (reproduce with --seed {args.seed})")
    report.print_environment(versions, gpus)
    table = availability_table(args.backends)
    report.print_availability(table)
    accuracy = run_accuracy(args, devices)
    large = run_large(args, devices)
    timing = [] if args.no_timing else run_timing(args, devices)
    failed = [r for r in accuracy + large if r.status == "FAIL"] + [t for t in timing if t.status == "FAIL"]
    counts = {s: sum(r.status == s for r in accuracy + large) for s in ("PASS", "FAIL", "N/A")}
    seconds = time.perf_counter() - start
    code = 1 if failed else 0
    print(f"== summary: {counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['N/A']} not applicable; "
          f"timing {sum(t.status == 'FAIL' for t in timing)} FAIL; {seconds:.0f} s; exit code {code}")
    if args.json:
        report.write_json(args.json, {
            "doctor": {"argv": sys.argv[1:] if argv is None else list(argv), "quick": args.quick,
                       "seed": args.seed, "devices": devices, "seconds": seconds, "exit_code": code},
            "environment": versions, "cuda_devices": gpus,
            "backends": {b: {dev: {fam: {"ok": ok, "reason": why} for fam, (ok, why) in fams.items()}
                             for dev, fams in per.items()} for b, per in table.items()},
            "accuracy": [r.as_dict() for r in accuracy], "large_m": [r.as_dict() for r in large],
            "timing": [t.as_dict() for t in timing], "summary": counts,
        })
    return code
