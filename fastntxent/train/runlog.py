"""Run directory: config.json, log.csv (one row per epoch), summary.json, curves.png (loss,
accuracy, health)."""
from __future__ import annotations

import csv
import json
import os

COLUMNS = ("epoch", "step", "loss", "contrastive_top1", "lr", "knn_accuracy", "epoch_seconds",
           "loss_to_chance", "embedding_std_sqrt_d", "alignment", "top1_chance", "effective_rank",
           "health_warnings")  # the health columns: see fastntxent/train/health.py


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    os.replace(tmp, path)


def write_csv(path: str, history: list) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for row in history:
            w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in COLUMNS})
    os.replace(tmp, path)


def plot(path: str, history: list, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in history]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4))
    a.plot(ep, [r["loss"] for r in history], label="loss")
    a.set_xlabel("epoch"), a.set_ylabel("contrastive loss"), a.grid(alpha=0.3)
    knn = [(r["epoch"], r["knn_accuracy"]) for r in history if r.get("knn_accuracy") is not None]
    if knn:
        b.plot(*zip(*knn), label="kNN accuracy (test)")
    b.plot(ep, [r["contrastive_top1"] for r in history], label="contrastive top-1 (train)")
    chance = [(r["epoch"], r["top1_chance"]) for r in history if r.get("top1_chance") is not None]
    if chance:
        b.plot(*zip(*chance), ":", label="top-1 of a random ranking")
    b.set_xlabel("epoch"), b.set_ylabel("accuracy"), b.set_ylim(0, 1), b.grid(alpha=0.3), b.legend()
    # health: 1 = chance (loss) and a healthy spread (std); collapse drives std*sqrt(D) to 0
    for key, label in (("loss_to_chance", "loss / chance loss"),
                       ("embedding_std_sqrt_d", "embedding std x sqrt(D)")):
        pts = [(r["epoch"], r[key]) for r in history if r.get(key) is not None]
        if pts:
            c.plot(*zip(*pts), label=label)
    for r in history:
        if r.get("health_warnings"):
            c.axvline(r["epoch"], color="red", alpha=0.4)
            c.annotate(r["health_warnings"], (r["epoch"], 0.02), color="red", rotation=90, fontsize=8)
    c.axhline(1.0, color="grey", lw=0.8, ls="--")
    c.set_xlabel("epoch"), c.set_ylabel("health (1 = chance / healthy spread)"), c.set_ylim(bottom=0)
    c.grid(alpha=0.3), c.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
