"""The trainer's side of the health check (issue 21): fastntxent.HealthMonitor fed every step,
its warnings collected for the progress bar's log, per-epoch health columns for log.csv, the
one-line summary the run ends with.

Per epoch (log.csv, summary.json, curves.png): the means over the epoch's steps of
``loss_to_chance`` (loss / the loss of equal similarities: 1 = learning nothing),
``embedding_std_sqrt_d`` (per-dimension std of the unit embeddings × √D: ≈ 1 healthy,
→ 0 collapse), ``alignment`` (mean positive cosine), ``top1_chance`` (the top-1 of a random
ranking), ``effective_rank`` (RankMe of the step's embeddings, the epoch's last step) and
``health_warnings`` (the kinds of warning first raised in that epoch, ``;``-separated).
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch

from ..health import CollapseWarning, HealthMonitor, effective_rank

COLUMNS = ("loss_to_chance", "embedding_std_sqrt_d", "alignment", "top1_chance", "effective_rank",
           "health_warnings")
_MEANS = ("loss_to_chance", "embedding_std_sqrt_d", "alignment", "top1_chance")


def new_sums() -> dict:
    """The health part of the trainer's per-epoch running sums (checkpointed with them)."""
    return {f"health_{k}": 0.0 for k in _MEANS} | {"health_n": 0, "health_rank": None,
                                                  "health_kinds": []}


def _float(v) -> Optional[float]:
    if v is None:
        return None
    return float(v.detach()) if isinstance(v, torch.Tensor) else float(v)


class TrainingHealth:
    """One HealthMonitor for the run and the bookkeeping around it.

    ``update(stats, embeddings, accum)`` runs the monitor on one step (one host
    synchronisation: the trainer reads the loss every step anyway), adds the step's health
    values to ``accum`` and returns the warnings first raised this step as
    ``(kind, message)`` pairs (each kind once per run, as the monitor warns)."""

    def __init__(self, **monitor_kwargs):
        self.monitor = HealthMonitor(**monitor_kwargs)

    def update(self, stats: dict, embeddings: Optional[torch.Tensor], accum: dict) -> list:
        before = set(self.monitor.raised)
        with warnings.catch_warnings(record=True) as caught:  # reported by the trainer instead
            warnings.simplefilter("always", CollapseWarning)
            self.monitor.update(stats, embeddings=embeddings)
        new = [(k, self.monitor.raised[k]) for k in self.monitor.raised if k not in before]
        for w in caught:  # anything else (not ours) is passed on unchanged
            if not issubclass(w.category, CollapseWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        values = {"loss_to_chance": _float(stats.get("loss_to_chance")),
                  "alignment": _float(stats.get("alignment")),
                  "top1_chance": _float(stats.get("top1_chance"))}
        std = _float(stats.get("embedding_std"))
        if std is not None and embeddings is not None:
            values["embedding_std_sqrt_d"] = std * math.sqrt(embeddings.shape[1])
        if all(v is not None for v in values.values()) and len(values) == len(_MEANS):
            for k, v in values.items():
                accum[f"health_{k}"] = accum.get(f"health_{k}", 0.0) + v
            accum["health_n"] = accum.get("health_n", 0) + 1
        if embeddings is not None:
            rank = self.monitor.last_rank
            accum["health_rank"] = rank if rank is not None else float(effective_rank(embeddings))
        accum.setdefault("health_kinds", []).extend(k for k, _ in new)
        return new


def epoch_columns(accum: dict) -> dict:
    """The epoch's health columns of log.csv from the running sums."""
    n = accum.get("health_n", 0)
    row = {k: (accum[f"health_{k}"] / n if n else None) for k in _MEANS}
    row["effective_rank"] = accum.get("health_rank")
    row["health_warnings"] = ";".join(accum.get("health_kinds", []))
    return row


def summary(history: list, dim: Optional[int]) -> dict:
    """summary.json's "health": every warning kind raised (with its epoch) and the last
    epoch's values."""
    raised = [{"epoch": r["epoch"], "kind": k} for r in history
              for k in (r.get("health_warnings") or "").split(";") if k]
    last = history[-1] if history else {}
    return {"warnings": raised, "dim": dim, **{k: last.get(k) for k in COLUMNS if k != "health_warnings"}}


def summary_line(health: dict) -> str:
    """The run's one-line health verdict (printed at the end of the main job)."""
    def fmt(k, spec=".3f"):
        v = health.get(k)
        return "n/a" if v is None else format(v, spec)
    dim = health.get("dim")
    rank = f"{fmt('effective_rank', '.1f')}/{dim}" if dim else fmt("effective_rank", ".1f")
    values = (f"loss/chance {fmt('loss_to_chance')}, embedding_std*sqrt(D) {fmt('embedding_std_sqrt_d')}, "
              f"effective rank {rank}, alignment {fmt('alignment')}")
    kinds = sorted({w["kind"] for w in health.get("warnings", [])})
    if not kinds:
        return f"health: no warnings (last epoch: {values})"
    return f"health: {len(kinds)} warning(s): {', '.join(kinds)} (last epoch: {values}); see the log above"
