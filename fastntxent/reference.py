"""The literal plain-PyTorch reference of both loss families (docs/maths.md): it materialises
the M×M (M×(N+K)) logits.

It is the oracle of every test (call it with float64 inputs), the `backend="reference"` rows
and the "naive" baseline of the benchmarks. Memory grows as M²; it is never the fast path.
"""
from __future__ import annotations

import torch

from .row_math import EPS, implicit_labels, reduce_rows, row_loss  # noqa: F401  (shared row maths)


def normalize_rows(z: torch.Tensor) -> torch.Tensor:
    """u_i = z_i / max(‖z_i‖, eps), literally, in z's dtype (call it with float64)."""
    return z / torch.linalg.vector_norm(z, dim=1, keepdim=True).clamp_min(EPS)


def self_similarity_rows(u: torch.Tensor, temperature: torch.Tensor, labels: torch.Tensor | None,
                         rows_per_view: int = 1, decoupled: bool = False):
    """Per-row statistics of the self family (docs/maths.md §1) from the materialised matrix.

    u: (M, D) rows, temperature: 0-dim, labels: (M,) int or None (label(i) = i mod
    rows_per_view). Returns (lse, pos_sum, pos_count, expected_logit, top1), each (M,) in u's
    dtype — the quantities the fused operators produce (same signature). `decoupled`: the
    positives are left out of the logsumexp (DCL; −inf for a row without a negative)."""
    return self_similarity_local_rows(u, temperature, labels, rows_per_view, 0, u.shape[0], decoupled)


def self_similarity_local_rows(u: torch.Tensor, temperature: torch.Tensor, labels: torch.Tensor | None,
                               rows_per_view: int, row_start: int, row_stop: int, decoupled: bool = False):
    """The local-rows form (docs/distributed.md): rows [row_start, row_stop) of u (M, D) against
    all M columns, the diagonal excluded at the row offset (column row_start + r of local row r),
    positives from the global labels (M,) or label(i) = i mod rows_per_view of the global index.
    Returns the five statistics of those rows, each (row_stop − row_start,). Autograd through it
    gives the gradient of every global row (row and column side) produced by these rows only."""
    M = u.shape[0]
    if labels is None:
        labels = implicit_labels(M, rows_per_view, u.device)
    rows = torch.arange(row_start, row_stop, device=u.device)
    s = (u[row_start:row_stop] @ u.T) / temperature
    self_mask = rows[:, None] == torch.arange(M, device=u.device)[None, :]
    pos = (labels[row_start:row_stop, None] == labels[None, :]) & ~self_mask
    # A large finite fill (not -inf) keeps gradients finite when a row has no other column.
    s_others = s.masked_fill(self_mask, torch.finfo(s.dtype).min)
    left_out = self_mask | pos if decoupled else self_mask  # out of the logsumexp
    s_lse = s.masked_fill(left_out, torch.finfo(s.dtype).min)
    lse = torch.logsumexp(s_lse, dim=1)
    if decoupled:  # a row without a negative: log 0
        lse = torch.where(left_out.all(1), torch.full_like(lse, float("-inf")), lse)
    pos_sum = (s * pos).sum(1)
    pos_count = pos.sum(1).to(u.dtype)
    p = torch.softmax(s_lse, dim=1).masked_fill(left_out, 0)
    expected_logit = (p * s).sum(1)
    top1 = pos.gather(1, s_others.argmax(1, keepdim=True)).squeeze(1).to(u.dtype)
    return lse, pos_sum, pos_count, expected_logit, top1


def self_similarity_loss(
    z: torch.Tensor,
    labels: torch.Tensor,
    temperature,
    normalize: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    """Literal docs/maths.md §1: loss of z (M, D) with integer labels (M,), computed in z's dtype."""
    u = normalize_rows(z) if normalize else z
    temperature = torch.as_tensor(temperature, dtype=u.dtype, device=u.device)
    lse, pos_sum, pos_count, _, _ = self_similarity_rows(u, temperature, labels)
    loss, has_pos = row_loss(lse, pos_sum, pos_count)
    return reduce_rows(loss, has_pos, reduction)


# ---------------------------------------------------------------------------------------
# Cross-similarity family (docs/maths.md §2): MoCo InfoNCE and CLIP, materialising the logits.


def cross_similarity_rows(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor | None,
                          scale: torch.Tensor, pos_offset: int = 0, keys_are_negatives: bool = True,
                          decoupled: bool = False):
    """Per-row statistics of the cross family (docs/maths.md §2) from the materialised logits.
    q: (M, D) rows, k: (N, D) keys (positive of row i: k[i + pos_offset]), queue: (K, D) or
    None, scale: 0-dim multiplier. Columns: all keys when `keys_are_negatives`, else the
    positive key only; then the queue. Returns (lse, pos, expected_logit, top1), each (M,).
    `decoupled`: the positive left out of the logsumexp (DCL; −inf without a negative)."""
    M = q.shape[0]
    idx = torch.arange(M, device=q.device) + pos_offset
    if keys_are_negatives:
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
    top1 = (logits.argmax(1) == target).to(q.dtype)
    if not decoupled:
        lse = torch.logsumexp(logits, dim=1)
        expected_logit = (torch.softmax(logits, dim=1) * logits).sum(1)
        return lse, pos, expected_logit, top1
    is_pos = torch.arange(logits.shape[1], device=q.device)[None, :] == target[:, None]
    others = logits.masked_fill(is_pos, torch.finfo(logits.dtype).min)  # finite: finite gradients
    lse = torch.logsumexp(others, dim=1)
    if logits.shape[1] == 1:  # no negative: log 0
        lse = torch.full_like(lse, float("-inf"))
    p = torch.softmax(others, dim=1).masked_fill(is_pos, 0)
    return lse, pos, (p * logits).sum(1), top1


def info_nce_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor | None = None,
                  temperature=0.2, normalize: bool = True, reduction: str = "mean") -> torch.Tensor:
    """Literal docs/maths.md §2 InfoNCE with cross-entropy, computed in q's dtype.

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
    """Literal docs/maths.md §2 CLIP loss: ½ (CE(a bᵀ·s, arange) + CE(b aᵀ·s, arange)), in a's dtype."""
    if normalize:
        a, b = normalize_rows(a), normalize_rows(b)
    scale = torch.as_tensor(logit_scale, dtype=a.dtype, device=a.device)
    logits = (a @ b.T) * scale
    target = torch.arange(a.shape[0], device=a.device)
    ce = torch.nn.functional.cross_entropy
    return 0.5 * (ce(logits, target) + ce(logits.T, target))


# ---------------------------------------------------------------------------------------
# SigLIP's pairwise sigmoid loss (docs/maths.md §7), materialising the B×N logits.


def siglip_rows(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, pos_offset: int = 0):
    """Per-row statistics of SigLIP (docs/maths.md §7) from the materialised logits.

    x: (M, D) image rows, y: (N, D) text rows (positive of row i: y[i + pos_offset]), scale t
    and bias b: 0-dim. With ℓ_ij = t·x_i·y_j + b, z_ij = +1 at the positive, −1 elsewhere and
    g_ij = ∂/∂ℓ_ij [−log σ(z_ij ℓ_ij)] = −z_ij σ(−z_ij ℓ_ij), returns each (M,):
    (loss_i = Σ_j −log σ(z_ij ℓ_ij), dlogit_sum_i = Σ_j g_ij, dlogit_cos_i = Σ_j g_ij x_i·y_j)
    — the quantities the fused operators produce (same signature)."""
    M, N = x.shape[0], y.shape[0]
    cos = x @ y.T
    logits = cos * scale + bias
    z = -torch.ones((M, N), dtype=x.dtype, device=x.device)
    z[torch.arange(M, device=x.device), torch.arange(M, device=x.device) + pos_offset] = 1
    loss = -torch.nn.functional.logsigmoid(z * logits).sum(1)
    g = -z * torch.sigmoid(-z * logits)
    return loss, g.sum(1), (g * cos).sum(1)


def siglip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale, logit_bias, normalize: bool = True,
                reduction: str = "mean") -> torch.Tensor:
    """Literal docs/maths.md §7 SigLIP loss of towers img, txt (B, D), in img's dtype:
    ℓ = t·img txtᵀ + b, labels 2·I − 1, −Σ_j log σ(labels·ℓ) per image row, then the mean over
    the B rows ("mean", as open_clip's SigLipLoss), the sum, or the rows ("none")."""
    if normalize:
        img, txt = normalize_rows(img), normalize_rows(txt)
    scale = torch.as_tensor(logit_scale, dtype=img.dtype, device=img.device)
    bias = torch.as_tensor(logit_bias, dtype=img.dtype, device=img.device)
    logits = (img @ txt.T) * scale + bias
    labels = 2 * torch.eye(img.shape[0], dtype=img.dtype, device=img.device) - 1
    rows = -torch.nn.functional.logsigmoid(labels * logits).sum(1)
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.mean()
