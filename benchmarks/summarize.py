"""Markdown summary and PNG plots regenerated from a benchmark CSV.

    python benchmarks/summarize.py benchmarks/results/cpu.csv

Writes <csv stem>.md (a table per (mode, D, dtype) with the fused-vs-naive ratios) and
<csv stem>_<mode>_D<D>_<dtype>.png (time and peak memory vs M, log-log, one line per
provider). Only the latest run (date, device name) of the CSV is used.
"""
from __future__ import annotations

import csv
import sys
from collections import defaultdict
from pathlib import Path


def _load(path: Path):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return []
    last = (rows[-1]["date"], rows[-1]["device_name"])
    return [r for r in rows if (r["date"], r["device_name"]) == last]


def _num(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def summarize(path) -> Path:
    path = Path(path)
    rows = _load(path)
    groups = defaultdict(list)
    for r in rows:
        groups[(r["mode"], r["D"], r["dtype"])].append(r)
    lines = [f"# Benchmark: {rows[0]['device_name']} ({rows[0]['date']}, fastntxent {rows[0]['version']})", "",
             f"Source: `{path.name}` (medians; 20/80 % quantiles and the matmul rate measured in the same "
             "run are in the CSV). Cells: median time in ms (peak extra memory in MiB over the inputs: "
             "on CPU the peak RSS of an isolated worker process during one call after warm-up, on CUDA "
             "`max_memory_allocated` minus the inputs). OOM: the provider ran out of memory.", ""]
    for (mode, D, dtype), rs in sorted(groups.items()):
        providers = list(dict.fromkeys(r["provider"] for r in rs))
        sizes = sorted({int(r["M"]) for r in rs})
        by = {(r["provider"], int(r["M"])): r for r in rs}
        fused = [p for p in providers if p.startswith("fastntxent")]
        baselines = [b for b in ("naive", "naive-compile") if b in providers] if fused else []
        extra = [f"{fused[0]} / {b} time" for b in baselines] + ([f"{fused[0]} % of matmul"] if fused else [])
        lines += [f"## {mode}, D = {D}, {dtype}", "",
                  "| M | " + " | ".join([f"{p} ms (MiB)" for p in providers] + extra) + " |",
                  "|---" * (len(providers) + len(extra) + 1) + "|"]
        for M in sizes:
            cells = []
            for p in providers:
                r = by.get((p, M))
                if r is None:
                    cells.append("")
                elif r["status"] != "ok":
                    cells.append(r["status"])
                else:
                    cells.append(f"{float(r['median_ms']):.1f} ({float(r['peak_mem_mb']):.0f})")
            cells += _ratios(by, fused, baselines, M)
            lines.append(f"| {M} | " + " | ".join(cells) + " |")
        if "naive" in providers and fused:
            both = [M for M in sizes if by.get(("naive", M), {}).get("status") == "ok"
                    and by.get((fused[0], M), {}).get("status") == "ok"]
            if both:
                M = both[-1]
                n, f = by[("naive", M)], by[(fused[0], M)]
                lines += ["", f"At the largest M both run (M = {M}): {fused[0]} is "
                          f"{float(n['median_ms']) / float(f['median_ms']):.2f}× naive's speed (time "
                          f"{float(f['median_ms']):.1f} vs {float(n['median_ms']):.1f} ms) and needs "
                          f"{float(f['peak_mem_mb']) / max(float(n['peak_mem_mb']), 1e-9):.3f}× its peak memory "
                          f"({float(f['peak_mem_mb']):.1f} vs {float(n['peak_mem_mb']):.1f} MiB); "
                          f"{100 * float(f['frac_of_matmul']):.1f}% of the matmul rate."]
        lines.append("")
        _plot(path, mode, D, dtype, providers, sizes, by)
    md = path.with_suffix(".md")
    md.write_text("\n".join(lines))
    print(f"wrote {md}")
    return md


def _ratios(by, fused, baselines, M):
    """Cells: the fused kernel's time over each baseline's at M, and its % of the matmul rate."""
    if not fused:
        return []
    f = by.get((fused[0], M))
    ok = f is not None and f["status"] == "ok"
    cells = []
    for b in baselines:
        r = by.get((b, M))
        both = ok and r is not None and r["status"] == "ok"
        cells.append(f"{float(f['median_ms']) / float(r['median_ms']):.2f}×" if both else "")
    cells.append(f"{100 * float(f['frac_of_matmul']):.0f} %" if ok else "")
    return cells


def _plot(path, mode, D, dtype, providers, sizes, by):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for p in providers:
        pts = [(M, _num(by[(p, M)]["median_ms"]), _num(by[(p, M)]["peak_mem_mb"]))
               for M in sizes if (p, M) in by and by[(p, M)]["status"] == "ok"]
        if not pts:
            continue
        Ms, ts, ms = zip(*pts)
        style = "-o" if p.startswith("fastntxent") else "--s"
        axes[0].plot(Ms, ts, style, label=p)
        axes[1].plot(Ms, [max(m, 1e-3) for m in ms], style, label=p)
    for ax, title, unit in ((axes[0], "time", "median ms"), (axes[1], "peak extra memory", "MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("M = 2N rows")
        ax.set_ylabel(unit)
        ax.set_title(f"{title}: {mode}, D={D}, {dtype}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(by[next(iter(by))]["device_name"], fontsize=9)
    fig.tight_layout()
    out = path.with_name(f"{path.stem}_{mode.replace('+', '_')}_D{D}_{dtype}.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    for arg in sys.argv[1:] or [str(Path(__file__).parent / "results" / "cpu.csv")]:
        summarize(arg)
