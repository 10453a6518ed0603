"""Row maths shared by every loss and backend (docs/maths.md): normalisation, per-row loss from
the operators' row statistics, reductions, implicit multi-view labels.

All O(M·D) or O(M); no M×M work here.
"""
from __future__ import annotations

import math

import torch

from .backends import accumulation_dtype

__all__ = ["EPS", "normalize_rows", "row_loss", "reduce_rows", "implicit_labels", "accumulation_dtype"]

EPS = 1e-8


def normalize_rows(z: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """u_i = z_i / max(‖z_i‖, eps): (M, D) → (M, D) in `dtype` (default z's dtype).

    Computed in the accumulation dtype and scale-safe: each row is first multiplied by a power
    of two s_i ≈ 1/max_j |z_ij| (a constant, not differentiated: u is invariant to positive row
    scaling, so the gradient is unchanged), so the squared norm neither overflows (rows of 1e20
    in fp32) nor underflows, and ‖z_i‖ < eps ⟺ ‖s_i·z_i‖ < s_i·eps. Every step is per row and
    O(M·D) with two (M, D) temporaries kept for the backward. A NaN or inf entry makes its whole
    row NaN, never a finite row."""
    acc = accumulation_dtype(z.dtype)
    x = z.to(acc)
    with torch.no_grad():
        peak = x.abs().amax(dim=1, keepdim=True)
        # |exponent| ≤ log2(max) − 2 keeps s and s·eps finite; rows further out still end in
        # [2^-(maxexp-3)·peak, …], far from under- or overflow of the squared norm.
        limit = float(math.floor(math.log2(torch.finfo(acc).max)) - 2)
        exponent = torch.floor(torch.log2(peak)).clamp(-limit, limit)
        scale = torch.where(torch.isfinite(peak), torch.exp2(-exponent), torch.full_like(peak, float("nan")))
    y = x * scale
    denominator = torch.maximum(torch.linalg.vector_norm(y, dim=1, keepdim=True), scale * EPS)
    return (y / denominator).to(dtype or z.dtype)


def row_loss(lse: torch.Tensor, pos_sum: torch.Tensor, pos_count: torch.Tensor):
    """ℓ_i = lse_i − pos_sum_i/|P(i)| for anchors with a positive, 0 otherwise; returns
    (ℓ (M,), has_pos (M,) bool)."""
    has_pos = pos_count > 0
    mean_pos = pos_sum / pos_count.clamp_min(1)
    return torch.where(has_pos, lse - mean_pos, torch.zeros_like(lse)), has_pos


def reduce_rows(per_row: torch.Tensor, has_pos: torch.Tensor, reduction: str) -> torch.Tensor:
    """Combine ℓ (M,) into the requested reduction; the mean is over anchors with a positive
    (0 with zero gradients when there is none)."""
    if reduction == "none":
        return per_row
    total = per_row.sum()
    if reduction == "sum":
        return total
    return total / has_pos.sum().clamp_min(1).to(per_row.dtype)


def implicit_labels(rows: int, rows_per_view: int, device=None) -> torch.Tensor:
    """Labels of view-major multi-view batches: label(i) = i mod rows_per_view, (rows,) int64."""
    return torch.arange(rows, device=device) % rows_per_view


# ---------------------------------------------------------------------------------------
# Non-finite inputs: a NaN or inf anywhere makes every output NaN, in every backend
# ---------------------------------------------------------------------------------------
def any_nonfinite(*tensors) -> torch.Tensor:
    """0-dim bool tensor: some entry of the given tensors (None skipped) is NaN or ±inf.
    O(size) on the device, no host synchronisation."""
    flags = [~torch.isfinite(t).all() for t in tensors if t is not None]
    out = flags[0]
    for f in flags[1:]:
        out = out | f
    return out


def poison_gradient(x: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """x times 1, or times NaN when `bad`: the value is unchanged for finite inputs (exact),
    and the gradient of a non-finite input comes out NaN whatever a kernel did with it
    (kernels take max/exp shortcuts that can drop a NaN). Plain tensor ops, so every
    autograd transform and torch.compile see through it."""
    if not x.requires_grad:
        return x
    return x * torch.where(bad, float("nan"), 1.0).to(x.dtype)


def poison(x: torch.Tensor, bad: torch.Tensor, *scalars: torch.Tensor) -> torch.Tensor:
    """x times 1, or NaN when `bad` — the value and the gradient that flows back through it.
    `scalars` (the temperature / logit scale) get a NaN gradient too when `bad`, through a
    term that is exactly 0 otherwise: their fused gradient is formed from row statistics that
    a kernel may have computed from laundered values. No finite or infinite value can come out
    of a non-finite input (docs/maths.md §5)."""
    out = x * torch.where(bad, float("nan"), 1.0).to(x.dtype)
    for t in scalars:
        if t.requires_grad:
            out = out + ((t - t.detach()) * torch.where(bad, float("nan"), 0.0)).to(out.dtype)
    return out
