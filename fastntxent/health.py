"""Training health from the statistics the losses already compute: collapse, stuck loss,
trivial tasks, non-finite embeddings — made loud.

- `health_stats(...)`: the per-call health statistics every loss adds to `return_stats=True`
  (tensors on the device, O(M·D), no host synchronisation): `chance_loss` (the loss uniform
  similarities would give), `loss_to_chance`, `top1_chance` (the top-1 a random ranking would
  get), `alignment` (mean positive cosine), `embedding_std` (per-dimension std of the unit rows,
  mean over dimensions; healthy ≈ 1/√D, collapse → 0).
- `effective_rank(z)` (RankMe, Garrido et al. 2023) and `uniformity(z)` (Wang & Isola 2020),
  on demand.
- `HealthMonitor`: fed the stats every step, it warns (`CollapseWarning`) or raises
  (`strict=True`) when training has gone wrong in one of the known silent ways.
"""
from __future__ import annotations

import math
import warnings
from collections import deque
from typing import Optional

import torch

__all__ = ["CollapseWarning", "CollapseError", "HealthMonitor", "health_stats", "effective_rank", "uniformity"]


class CollapseWarning(UserWarning):
    """Training looks broken (collapse, a trivial task, a stuck loss). Filter it with
    `warnings.filterwarnings("ignore", category=fx.CollapseWarning)` or make it an error."""


class CollapseError(RuntimeError):
    """HealthMonitor(strict=True) found what CollapseWarning would have warned about."""


@torch.no_grad()
def health_stats(loss: torch.Tensor, chance_loss: torch.Tensor, top1_chance: torch.Tensor,
                 alignment: torch.Tensor, rows, normalized: bool) -> dict:
    """The health statistics of one call (0-dim tensors). rows: the (M, D) embeddings as the
    kernels saw them, or a sequence of them (CLIP's towers: their embedding_std is averaged);
    already unit rows when `normalized`, else normalised here."""
    towers = [rows] if isinstance(rows, torch.Tensor) else list(rows)
    std = torch.stack([_embedding_std(t, normalized) for t in towers]).mean()
    ratio = loss.detach() / chance_loss.clamp_min(torch.finfo(chance_loss.dtype).tiny)
    return {"chance_loss": chance_loss, "loss_to_chance": ratio, "top1_chance": top1_chance,
            "alignment": alignment, "embedding_std": std.to(chance_loss.dtype)}


def _embedding_std(rows: torch.Tensor, normalized: bool) -> torch.Tensor:
    """Per-dimension std of the unit rows over the batch, mean over dimensions (0 for one row)."""
    u = rows.float() if normalized else torch.nn.functional.normalize(rows.float(), dim=1)
    return u.std(dim=0, unbiased=False).mean() if u.shape[0] > 1 else torch.zeros((), device=u.device)


@torch.no_grad()
def effective_rank(z: torch.Tensor, max_rows: int = 4096) -> torch.Tensor:
    """RankMe: exp of the entropy of the normalised singular values of z (M, D), in [1, min(M, D)].
    Exact for M ≤ max_rows, else on the first max_rows rows (a fixed-size sample)."""
    x = z[:max_rows].float()
    s = torch.linalg.svdvals(x)
    p = s / s.sum().clamp_min(1e-12) + 1e-12
    return torch.exp(-(p * p.log()).sum())


@torch.no_grad()
def uniformity(z: torch.Tensor, t: float = 2.0, max_rows: int = 2048) -> torch.Tensor:
    """Wang & Isola's uniformity log E exp(−t‖u_i − u_j‖²) over pairs i ≠ j of the unit rows
    (lower is more uniform; −4 is the ideal on a high-dimensional sphere with t = 2).
    Exact for M ≤ max_rows, else on the first max_rows rows."""
    u = torch.nn.functional.normalize(z[:max_rows].float(), dim=1)
    sq = torch.pdist(u).pow(2)
    return torch.logsumexp(-t * sq, dim=0) - math.log(max(sq.numel(), 1))


# Defaults of the stuck-at-chance check, chosen from measured trajectories (docs/training.md,
# "When training goes wrong"): the default digits run vs the same run at lr = 1e4.
STUCK_AFTER, STUCK_WINDOW, STUCK_TOL, STUCK_TOP1 = 50, 25, 0.02, 3.0


def _value(stats: dict, key: str) -> Optional[float]:
    v = stats.get(key)
    if v is None:
        return None
    return float(v.detach()) if isinstance(v, torch.Tensor) else float(v)


class HealthMonitor:
    """Watches the stats of a loss (`return_stats=True`) step by step and warns when training
    has gone wrong silently. `update(stats, embeddings=None)` reads the stats on the host (one
    synchronisation per call: call it every step or every few steps) and returns the list of
    messages it raised this step.

    Checks (thresholds are arguments):
    - collapse: the loss within `chance_tol` (relative) of its chance value and flat for
      `patience` steps — all similarities equal;
    - stuck at chance: after `stuck_after` steps, over the last `stuck_window` steps, the mean
      loss/chance at least 1 − `stuck_tol` (at or above chance), flat (the second half's mean not below the first
      half's by more than `stuck_tol` / 2) and the mean top-1 accuracy at most `stuck_top1`
      times a random ranking's (`top1_chance`) — the model learns nothing although its
      similarities are not exactly equal (an absurd learning rate, a frozen or dead encoder);
    - representation collapse: `embedding_std` below `std_fraction`/√D;
    - dimensional collapse: `effective_rank(embeddings)` below `rank_fraction`·D (only when
      embeddings are passed);
    - trivial task: top-1 accuracy 1.0 with positives of cosine ≥ 1 − `identical_tol` in the
      first `early_steps` steps — identical views (no augmentation) or positives leaking;
    - non-finite embeddings (the first bad row named) or a non-finite loss.
    Each message is emitted once per kind (`CollapseWarning`), or raised as `CollapseError`
    when `strict=True`.
    """

    def __init__(self, *, patience: int = 20, chance_tol: float = 1e-3, std_fraction: float = 0.1,
                 rank_fraction: float = 0.05, early_steps: int = 10, identical_tol: float = 1e-4,
                 stuck_after: int = STUCK_AFTER, stuck_window: int = STUCK_WINDOW,
                 stuck_tol: float = STUCK_TOL, stuck_top1: float = STUCK_TOP1, strict: bool = False):
        for name, v in (("patience", patience), ("early_steps", early_steps),
                        ("stuck_window", stuck_window)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if isinstance(stuck_after, bool) or not isinstance(stuck_after, int) or stuck_after < 0:
            raise ValueError(f"stuck_after must be an int >= 0, got {stuck_after!r}")
        for name, v in (("chance_tol", chance_tol), ("std_fraction", std_fraction),
                        ("rank_fraction", rank_fraction), ("identical_tol", identical_tol),
                        ("stuck_tol", stuck_tol), ("stuck_top1", stuck_top1)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        self.patience, self.chance_tol, self.std_fraction = patience, chance_tol, std_fraction
        self.rank_fraction, self.early_steps, self.identical_tol = rank_fraction, early_steps, identical_tol
        self.stuck_after, self.stuck_window, self.stuck_tol, self.stuck_top1 = (
            stuck_after, stuck_window, stuck_tol, stuck_top1)
        self.strict = strict
        self.step = 0
        self._ratios: deque = deque(maxlen=patience)
        self._window: deque = deque(maxlen=stuck_window)  # (loss/chance, top-1, top-1 of chance)
        self.raised: dict = {}  # kind -> the first message of that kind, in the order raised
        self.last_rank: Optional[float] = None  # effective rank of the last embeddings checked

    def _emit(self, kind: str, message: str, out: list) -> None:
        if self.strict:
            raise CollapseError(message)
        if kind not in self.raised:
            self.raised[kind] = message
            warnings.warn(message, CollapseWarning, stacklevel=3)
        out.append(message)

    def update(self, stats: dict, embeddings: Optional[torch.Tensor] = None, loss=None) -> list:
        """Check one step. stats: the dict of `return_stats=True`; embeddings (M, D): optional,
        for the non-finite and rank checks; loss: optional (else stats["loss"] if present)."""
        self.step += 1
        out: list = []
        if embeddings is not None:
            bad = ~torch.isfinite(embeddings).all(dim=1)
            if bool(bad.any()):
                row = int(bad.nonzero()[0, 0])
                self._emit("nonfinite", f"embedding row {row} holds NaN or inf: every loss and gradient is NaN. "
                           "Usual causes: a learning rate too high, fp16 overflow, a division by zero upstream.", out)
                return out
        loss_value = float(loss.detach()) if isinstance(loss, torch.Tensor) else loss
        if loss_value is not None and not math.isfinite(loss_value):
            self._emit("nonfinite", f"the loss is {loss_value}: training has diverged or an input is not "
                       "finite. Usual causes: a learning rate too high, fp16 overflow.", out)
            return out
        ratio, chance = _value(stats, "loss_to_chance"), _value(stats, "chance_loss")
        if ratio is not None and chance is not None and chance > 0:
            self._ratios.append(ratio)
            if (len(self._ratios) == self.patience
                    and all(abs(r - 1.0) <= self.chance_tol for r in self._ratios)):
                self._emit("collapse", f"the loss has stayed at its chance value {chance:.6g} for "
                           f"{self.patience} steps: all similarities are equal, the embeddings have collapsed "
                           "to one point (or the encoder ignores its input). Usual causes: a learning rate "
                           "too high, a dead projection head, a bug that feeds constant inputs.", out)
        top1_now, top1_chance = _value(stats, "top1_accuracy"), _value(stats, "top1_chance")
        if ratio is not None and top1_now is not None and top1_chance is not None:
            self._window.append((ratio, top1_now, top1_chance))
            if self.step > self.stuck_after and len(self._window) == self.stuck_window:
                self._check_stuck(chance, out)
        std = _value(stats, "embedding_std")
        dim = embeddings.shape[1] if embeddings is not None else stats.get("dim")
        if std is not None and dim:
            if std < self.std_fraction / math.sqrt(int(dim)):
                self._emit("std", f"embedding_std {std:.3g} is below {self.std_fraction}/sqrt(D) = "
                           f"{self.std_fraction / math.sqrt(int(dim)):.3g}: representation collapse (the unit "
                           "embeddings barely vary across the batch). Usual causes: a learning rate too high, "
                           "a temperature too high, a dead projection head.", out)
        if embeddings is not None and self.rank_fraction > 0 and embeddings.shape[0] > 1:
            rank = self.last_rank = float(effective_rank(embeddings))
            limit = self.rank_fraction * min(embeddings.shape)
            if rank < max(limit, 1.5):
                self._emit("rank", f"effective rank {rank:.2f} of the {embeddings.shape[1]}-dim embeddings is "
                           f"below {max(limit, 1.5):.2f}: dimensional collapse (the projection uses a few "
                           "directions only). Usual causes: a learning rate too high, a projection too narrow, "
                           "weight decay too strong.", out)
        top1, align = _value(stats, "top1_accuracy"), _value(stats, "alignment")
        if (self.step <= self.early_steps and top1 is not None and top1 >= 1.0
                and align is not None and align >= 1.0 - self.identical_tol):
            self._emit("trivial", f"top-1 accuracy is 1.0 and the positive pairs have cosine {align:.6f} from the "
                       "first steps: the task is trivial — the two views are identical (no augmentation) or "
                       "the positives leak into the inputs. Check your augmentations.", out)
        return out

    def _check_stuck(self, chance: Optional[float], out: list) -> None:
        w = list(self._window)
        ratios = [r for r, _, _ in w]
        mean = sum(ratios) / len(ratios)
        half = len(ratios) // 2
        first, second = sum(ratios[:half]) / max(half, 1), sum(ratios[half:]) / (len(ratios) - half)
        top1 = sum(t for _, t, _ in w) / len(w)
        top1_chance = sum(c for _, _, c in w) / len(w)
        if mean >= 1.0 - self.stuck_tol and first - second <= self.stuck_tol / 2 \
                and top1 <= self.stuck_top1 * top1_chance:
            self._emit("stuck", f"the loss has stayed at its chance value for {len(w)} steps (loss/chance "
                       f"{mean:.3f}, chance {chance:.4g}) and top-1 accuracy {top1:.4f} is that of a random "
                       f"ranking ({top1_chance:.4f}): the model is learning nothing. Usual causes: a learning "
                       "rate far too high (or zero), a frozen or dead encoder, labels or positives that do not "
                       "match the inputs.", out)
