"""Run directory: config.json, log.csv (one row per epoch), summary.json, curves.png."""
from __future__ import annotations

import csv
import json
import os

COLUMNS = ("epoch", "step", "loss", "contrastive_top1", "lr", "knn_accuracy", "epoch_seconds")


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
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, [r["loss"] for r in history], label="loss")
    a.set_xlabel("epoch"), a.set_ylabel("contrastive loss"), a.grid(alpha=0.3)
    knn = [(r["epoch"], r["knn_accuracy"]) for r in history if r.get("knn_accuracy") is not None]
    if knn:
        b.plot(*zip(*knn), label="kNN accuracy (test)")
    b.plot(ep, [r["contrastive_top1"] for r in history], label="contrastive top-1 (train)")
    b.set_xlabel("epoch"), b.set_ylabel("accuracy"), b.set_ylim(0, 1), b.grid(alpha=0.3), b.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
