"""Functional API of the cross-similarity family (SPEC §2, §5): MoCo InfoNCE and CLIP.

Both are built on one operator (csrc/ops.cpp `cross_forward` / `cross_backward`): rows q
against keys k (and a queue of extra negatives), per-row logsumexp and positive logit; the
loss reduction happens here. CLIP's column logsumexps are the same operator with the towers
swapped. With `gather=True` the keys are gathered over torch.distributed (see
fastntxent.distributed for the gradient convention).
"""
from __future__ import annotations

import torch

from . import _extension, reference
from . import distributed as _dist
from ._dispatch import resolve_backend
from ._ops import accumulation_dtype
from ._validation import (Scalar, as_temperature, check_backend, check_embeddings, check_pair, check_reduction,
                          check_same_device)

__all__ = ["info_nce", "clip_loss", "cross_rows"]

# Fused backends of the cross family. The Triton (and CUDA) engineer adds the name here and
# returns its forward operator from `_cross_forward_op` (registered with
# fastntxent._cross_ops.register_cross_ops for autograd / fake kernels).
_FUSED_CROSS = ("cpu", "triton")


def _cross_forward_op(name: str):
    if name == "cpu":
        return torch.ops.fastntxent.cross_forward
    if name == "triton":
        from ._triton import cross_similarity

        return cross_similarity.cross_forward
    raise ValueError(f"no fused cross-family operators for backend {name!r}")


def resolve_cross_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """Concrete backend of the cross family: "cpu" (fused C++), "reference", or (later) a GPU
    backend listed in _FUSED_CROSS. "auto" on a device without a fused cross kernel uses the
    reference; an explicit backend that cannot run raises ValueError saying why."""
    check_backend(backend)
    if backend in ("triton", "cuda") and backend not in _FUSED_CROSS:
        raise ValueError(
            f'backend="{backend}" is not yet available for the cross-similarity family '
            '(info_nce, clip_loss); use backend="auto", "cpu" (CPU tensors) or "reference"'
        )
    if backend == "cpu" and _extension.has_cpu_kernels() and not _extension.has_cross_kernels():
        raise ValueError('backend="cpu": the built fastntxent._C predates the cross family; rebuild it '
                         "with `pip install --no-build-isolation -e .`")
    name = resolve_backend(backend, device, dtype)
    if name not in _FUSED_CROSS and name != "reference":  # "auto" picked a self-family-only backend
        name = "reference"
    if name == "cpu" and not _extension.has_cross_kernels():
        name = "reference"
    return name


def cross_rows(name: str, q, k, queue, scale, pos_offset: int, in_batch: bool):
    """(lse, pos, ps_sum, top1) of the rows q against the keys k (+ queue) with `backend` name."""
    if name == "reference":
        return reference.cross_similarity_rows(q, k, queue, scale, pos_offset, in_batch)
    return _cross_forward_op(name)(q, k, queue, scale, pos_offset, in_batch)


def _prepare(x, name: str, u_dtype, normalize: bool):
    return reference.normalize_rows(x, u_dtype) if normalize else x.to(u_dtype)


def _u_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    # The CPU kernel and the reference compute in fp32 / fp64: hand them rows in that dtype.
    return accumulation_dtype(dtype) if name in ("cpu", "reference") else dtype


@torch.no_grad()
def _sum_stats(gather: bool, **sums: torch.Tensor) -> dict:
    if gather:
        return {key: _dist.all_reduce_sum(v) for key, v in sums.items()}
    return sums


def info_nce(
    q: torch.Tensor,
    k: torch.Tensor,
    queue: torch.Tensor | None = None,
    temperature: Scalar = 0.2,
    *,
    normalize: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
    gather: bool = False,
    return_stats: bool = False,
):
    """InfoNCE of queries q (M, D) against keys k (M, D); the positive of q_i is k_i.

    queue None (MoCo v3 / in-batch): logits = q kᵀ / τ, target i.
    queue (K, D) (MoCo v2): logits_i = [q_i·k_i, q_i·queue] / τ, target 0; the negatives are
    the queue only and the queue gets no gradient (it is detached; with normalize=True it is
    normalised too, which leaves MoCo's already-normalised keys unchanged). Its dtype may
    differ from q's.
    Returns the mean over the M queries (reduction "sum" / "none" as in nt_xent).
    gather=True (torch.distributed): without a queue the keys of all ranks are the negatives;
    the value is the loss over all ranks' queries (see fastntxent.distributed).
    """
    check_pair("q", q, "k", k)
    if queue is not None:
        if not isinstance(queue, torch.Tensor):
            raise TypeError(f"queue must be a torch.Tensor or None, got {type(queue).__name__}")
        if queue.dim() != 2 or queue.shape[1] != q.shape[1]:
            raise ValueError(f"queue must have shape (K, D) with D = {q.shape[1]} (from q), got {tuple(queue.shape)}")
        check_embeddings("queue", queue)
        check_same_device(q=q, queue=queue)
    check_reduction(reduction)
    tau = as_temperature(temperature, q)
    name = resolve_cross_backend(backend, q.device, q.dtype)
    if gather:
        _dist.require_process_group()
    u_dtype = _u_dtype(name, q.dtype)
    uq = _prepare(q, "q", u_dtype, normalize)
    uk = _prepare(k, "k", u_dtype, normalize)
    uqueue = None
    if queue is not None:
        with torch.no_grad():
            uqueue = _prepare(queue.detach(), "queue", u_dtype, normalize)
    in_batch = queue is None
    M = q.shape[0]
    keys, offset, global_rows = uk, 0, M
    if gather:
        global_rows = M * _dist.world_size()
        if in_batch:
            keys, offset = _dist.gather_with_grad(uk, "k"), _dist.rank() * M
    scale = 1.0 / tau
    lse, pos, ps_sum, top1 = cross_rows(name, uq, keys, uqueue, scale, offset, in_batch)
    per_row = lse - pos
    if gather:
        loss = _dist.reduce_local_rows(per_row, reduction, global_rows)
    else:
        loss = reference.reduce_rows(per_row, torch.ones_like(per_row, dtype=torch.bool), reduction)
    if not return_stats:
        return loss
    with torch.no_grad():
        acc = per_row.dtype
        pos_cos = pos * tau.detach()
        cols = uqueue if uqueue is not None else keys
        neg = (uq.to(acc).sum(0) @ cols.to(acc).sum(0))  # Σ_i Σ_c q_i·c, O((M + K)·D)
        if in_batch:
            neg = neg - pos_cos.sum()
        neg_pairs = M * (cols.shape[0] - (1 if in_batch else 0))
        sums = _sum_stats(gather, top1=top1.sum(), pos=pos_cos.sum(), neg=neg,
                          neg_pairs=torch.tensor(float(neg_pairs), dtype=acc, device=q.device))
        stats = {
            "top1_accuracy": sums["top1"] / global_rows,
            "positive_cosine": sums["pos"] / global_rows,
            "negative_cosine": sums["neg"] / sums["neg_pairs"].clamp_min(1),
        }
    return loss, stats


def clip_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    logit_scale: Scalar,
    *,
    normalize: bool = True,
    backend: str = "auto",
    gather: bool = False,
    return_stats: bool = False,
):
    """Symmetric CLIP loss ½ (CE(a bᵀ·s, arange) + CE(b aᵀ·s, arange)) of two towers a, b (M, D).

    logit_scale s: a float or 0-dim tensor (may require grad, e.g. `log_scale.exp()`), > 0.
    gather=True (torch.distributed): both towers of all ranks are the negatives; the value is
    the loss over the global batch (see fastntxent.distributed).
    """
    check_pair("a", a, "b", b)
    scale = as_temperature(logit_scale, a, name="logit_scale")
    name = resolve_cross_backend(backend, a.device, a.dtype)
    if gather:
        _dist.require_process_group()
    u_dtype = _u_dtype(name, a.dtype)
    ua = _prepare(a, "a", u_dtype, normalize)
    ub = _prepare(b, "b", u_dtype, normalize)
    M = a.shape[0]
    all_a, all_b, offset, global_rows = ua, ub, 0, M
    if gather:
        all_a, all_b = _dist.gather_with_grad(ua, "a"), _dist.gather_with_grad(ub, "b")
        offset, global_rows = _dist.rank() * M, M * _dist.world_size()
    lse_ab, pos_ab, _, top1_ab = cross_rows(name, ua, all_b, None, scale, offset, True)  # rows: a → b
    lse_ba, pos_ba, _, top1_ba = cross_rows(name, ub, all_a, None, scale, offset, True)  # columns: b → a
    per_row = 0.5 * ((lse_ab - pos_ab) + (lse_ba - pos_ba))
    if gather:
        loss = _dist.reduce_local_rows(per_row, "mean", global_rows)
    else:
        loss = per_row.mean()
    if not return_stats:
        return loss
    with torch.no_grad():
        sums = _sum_stats(gather, ab=top1_ab.sum(), ba=top1_ba.sum(), pos=(pos_ab / scale.detach()).sum())
        stats = {
            "top1_accuracy": (sums["ab"] + sums["ba"]) / (2 * global_rows),
            "top1_a_to_b": sums["ab"] / global_rows,
            "top1_b_to_a": sums["ba"] / global_rows,
            "positive_cosine": sums["pos"] / global_rows,
            "logit_scale": scale.detach(),
        }
    return loss, stats
