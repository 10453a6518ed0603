"""Plain-PyTorch reference of SPEC §1 (self family): materialises the M×M matrix.

It is the oracle of every test (call it with float64 inputs) and the "naive" baseline of
the benchmarks. Memory grows as M²; it is never the fast path.
"""
from __future__ import annotations

import torch

EPS = 1e-8


def normalize_rows(z: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """u_i = z_i / max(‖z_i‖, eps); (M, D) -> (M, D) in `dtype` (default z's), computed in ≥ fp32."""
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    norm = torch.linalg.vector_norm(z.to(acc), dim=1, keepdim=True).clamp_min(EPS)
    return (z.to(acc) / norm).to(dtype or z.dtype)


def reduce_rows(row_loss: torch.Tensor, has_pos: torch.Tensor, reduction: str) -> torch.Tensor:
    """Combine ℓ (M,) into the requested reduction; the mean is over anchors with a positive."""
    if reduction == "none":
        return row_loss
    total = row_loss.sum()
    if reduction == "sum":
        return total
    return total / has_pos.sum().clamp_min(1).to(row_loss.dtype)


def row_loss(lse, pos_sum, pos_count):
    """ℓ_i = lse_i − pos_sum_i/|P(i)| for anchors with a positive, 0 otherwise (no NaN)."""
    has_pos = pos_count > 0
    mean_pos = pos_sum / pos_count.clamp_min(1)
    return torch.where(has_pos, lse - mean_pos, torch.zeros_like(lse)), has_pos


def implicit_labels(rows: int, period: int, device=None) -> torch.Tensor:
    """Labels of view-major multi-view batches: label(i) = i mod period, (rows,) int64."""
    return torch.arange(rows, device=device) % period


def self_similarity_rows(u: torch.Tensor, temperature: torch.Tensor, labels: torch.Tensor):
    """Per-row statistics of SPEC §1 from the materialised matrix.

    u: (M, D) rows, temperature: 0-dim, labels: (M,) int. Returns (lse, pos_sum, pos_count,
    ps_sum, top1), each (M,) in u's dtype — the same quantities the fused kernels produce.
    """
    M = u.shape[0]
    s = (u @ u.T) / temperature
    self_mask = torch.eye(M, dtype=torch.bool, device=u.device)
    # A large finite fill (not -inf) keeps gradients finite when a row has no other column.
    s_others = s.masked_fill(self_mask, torch.finfo(s.dtype).min)
    lse = torch.logsumexp(s_others, dim=1)
    pos = (labels[:, None] == labels[None, :]) & ~self_mask
    pos_sum = (s * pos).sum(1)
    pos_count = pos.sum(1).to(u.dtype)
    p = torch.softmax(s_others, dim=1).masked_fill(self_mask, 0)
    ps_sum = (p * s).sum(1)
    top1 = pos.gather(1, s_others.argmax(1, keepdim=True)).squeeze(1).to(u.dtype)
    return lse, pos_sum, pos_count, ps_sum, top1


def self_similarity_loss(
    z: torch.Tensor,
    labels: torch.Tensor,
    temperature,
    normalize: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    """Literal SPEC §1: loss of z (M, D) with integer labels (M,), computed in z's dtype."""
    u = normalize_rows(z) if normalize else z
    temperature = torch.as_tensor(temperature, dtype=u.dtype, device=u.device)
    lse, pos_sum, pos_count, _, _ = self_similarity_rows(u, temperature, labels)
    loss, has_pos = row_loss(lse, pos_sum, pos_count)
    return reduce_rows(loss, has_pos, reduction)


# ---------------------------------------------------------------------------------------
# Cross-similarity family (SPEC §2): MoCo InfoNCE and CLIP, materialising the logits.


def cross_similarity_rows(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor | None,
                          scale: torch.Tensor, pos_offset: int = 0, in_batch: bool = True):
    """Per-row statistics of the cross operator (csrc/ops.cpp `cross_forward`) from the
    materialised logits. q: (M, D) rows, k: (N, D) keys (positive of row i: k[i + pos_offset]),
    queue: (K, D) or None, scale: 0-dim multiplier. Columns: all keys when `in_batch`, else
    the positive key only; then the queue. Returns (lse, pos, ps_sum, top1), each (M,)."""
    M = q.shape[0]
    idx = torch.arange(M, device=q.device) + pos_offset
    if in_batch:
        keys = (q @ k.T) * scale
        # The positive is the matrix's own entry: lse >= pos, and one column gives exactly 0.
        pos = keys.gather(1, idx[:, None]).squeeze(1)
        parts, target = [keys], idx
    else:
        pos = (q * k[idx]).sum(1) * scale
        parts, target = [pos[:, None]], torch.zeros_like(idx)
    if queue is not None:
        parts.append((q @ queue.T.to(q.dtype)) * scale)
    logits = torch.cat(parts, dim=1)
    lse = torch.logsumexp(logits, dim=1)
    ps_sum = (torch.softmax(logits, dim=1) * logits).sum(1)
    top1 = (logits.argmax(1) == target).to(q.dtype)
    return lse, pos, ps_sum, top1


def info_nce_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor | None = None,
                  temperature=0.2, normalize: bool = True, reduction: str = "mean") -> torch.Tensor:
    """Literal SPEC §2 InfoNCE with cross-entropy, computed in q's dtype.

    With a queue (MoCo v2): logits_i = [q_i·k_i, q_i·queue_1..K] / τ, target 0; the queue is
    detached. Without (MoCo v3 / in-batch): logits = q kᵀ / τ, target i."""
    if normalize:
        q, k = normalize_rows(q), normalize_rows(k)
    temperature = torch.as_tensor(temperature, dtype=q.dtype, device=q.device)
    if queue is not None:
        queue = queue.detach().to(q.dtype)
        if normalize:
            queue = normalize_rows(queue)
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], dim=1) / temperature
        target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    else:
        logits = (q @ k.T) / temperature
        target = torch.arange(q.shape[0], device=q.device)
    return torch.nn.functional.cross_entropy(logits, target, reduction=reduction)


def clip_loss(a: torch.Tensor, b: torch.Tensor, logit_scale, normalize: bool = True) -> torch.Tensor:
    """Literal SPEC §2 CLIP loss: ½ (CE(a bᵀ·s, arange) + CE(b aᵀ·s, arange)), in a's dtype."""
    if normalize:
        a, b = normalize_rows(a), normalize_rows(b)
    scale = torch.as_tensor(logit_scale, dtype=a.dtype, device=a.device)
    logits = (a @ b.T) * scale
    target = torch.arange(a.shape[0], device=a.device)
    ce = torch.nn.functional.cross_entropy
    return 0.5 * (ce(logits, target) + ce(logits.T, target))
