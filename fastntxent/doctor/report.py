"""Printing the doctor's findings and writing them as JSON."""
from __future__ import annotations

import json
import math
from pathlib import Path

from .availability import summarize


def _num(x, fmt: str = ".1e") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return format(x, fmt)


def print_environment(versions: dict, devices: list[dict]) -> None:
    print("== environment")
    width = max(map(len, versions))
    for key, value in versions.items():
        print(f"  {key:<{width}}  {value}")
    print("== devices")
    print("  cpu: " + versions["cpu"])
    if not devices:
        print("  cuda: no CUDA device")
    for d in devices:
        print(f"  cuda:{d['index']}: {d['name']}, compute capability {d['compute_capability']}, "
              f"{d['sm_count']} SMs, {d['memory_gib']} GiB")


def print_availability(table: dict) -> None:
    """table: {backend: {device type: family status}}."""
    print("== backends (asked of the library: a tiny call with backend=<name>)")
    for backend, per_device in table.items():
        for device_type, status in per_device.items():
            print(f"  {backend:<9} on {device_type:<4} tensors: {summarize(status)}")


ROW_FORMAT = "  {:<9} {:<6} {:<17} {:<8} {:<6} {:>5}  {:<19} {}"


def print_row_header(title: str) -> None:
    print(f"== {title}")
    print(ROW_FORMAT.format("backend", "device", "loss", "dtype", "result", "cases",
                            "worst error / bound", "where (quantity, shape) or why"))


def print_row(row) -> None:
    if row.status == "N/A" or row.worst_error is None:
        where, err = row.reason, "-"
    else:
        err = f"{_num(row.worst_error)} / {_num(row.tolerance, '.0e')}"
        where = f"{row.quantity} at {row.shape}"
        if row.status == "FAIL" and row.reason and row.failures and row.failures[0]["message"]:
            where = row.reason
    print(ROW_FORMAT.format(row.backend, row.device, row.loss, row.dtype, row.status, row.cases,
                            err, where), flush=True)


def print_timing(rows) -> None:
    print("== timing: nt_xent forward+backward, medians (measured in this run; TFLOP/s = 6·M²·D / time)")
    print("  {:<9} {:<6} {:<8} {:>6} {:>4} {:>6} {:>10} {:>9} {:>10} {:>8} {:>12} {:>9}".format(
        "backend", "device", "dtype", "M", "D", "result", "fused ms", "TFLOP/s", "naive ms", "speedup",
        "matmul TF/s", "of matmul"))
    for r in rows:
        print("  {:<9} {:<6} {:<8} {:>6} {:>4} {:>6} {:>10} {:>9} {:>10} {:>8} {:>12} {:>9}  {}".format(
            r.backend, r.device, r.dtype, r.M, r.D, r.status, _num(r.ms, ".2f"), _num(r.tflops, ".3f"),
            _num(r.naive_ms, ".2f"), _num(r.speedup, ".1f") + ("x" if r.speedup else ""),
            _num(r.matmul_tflops, ".3f"), _num(r.fraction_of_matmul, ".1%"), r.note), flush=True)


def _plain(x):
    """JSON-safe: inf/NaN become strings."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def write_json(path: str, report: dict) -> None:
    Path(path).write_text(json.dumps(_plain(report), indent=2, allow_nan=False) + "\n")
