"""Functional API of the self-similarity family (SPEC §1, §5): NT-Xent, multi-view, SupCon.

Every function takes embeddings in fp32 / fp64 / bf16 / fp16 and returns an fp32 loss
(fp64 for fp64 inputs); memory is O(M·D) on the fused backends.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

from . import reference
from ._dispatch import resolve_backend, self_ops
from ._ops import accumulation_dtype
from ._validation import (
    Scalar,
    as_temperature,
    check_embeddings,
    check_labels,
    check_pair,
    check_reduction,
    check_same_device,
)

__all__ = ["nt_xent", "multiview_nt_xent", "supcon", "self_similarity_loss"]


def _stats(u, tau, pos_sum, pos_count, top1, has_pos) -> dict:
    """Top-1 accuracy and mean positive / negative cosine, from the kernels' row outputs."""
    with torch.no_grad():
        acc = pos_sum.dtype
        anchors = has_pos.sum().clamp_min(1).to(acc)
        u = u.to(acc)
        row_cos = u @ u.sum(0) - (u * u).sum(1)  # Σ_{j≠i} u_i·u_j, O(M·D)
        pos_cos = pos_sum * tau.detach()
        M = u.shape[0]
        pos_pairs = pos_count.sum()
        neg_pairs = (M * (M - 1) - pos_pairs).clamp_min(1)
        return {
            "top1_accuracy": (top1 * has_pos).sum() / anchors,
            "positive_cosine": pos_cos.sum() / pos_pairs.clamp_min(1),
            "negative_cosine": (row_cos.sum() - pos_cos.sum()) / neg_pairs,
            "anchors": has_pos.sum(),
        }


def self_similarity_loss(
    z: torch.Tensor,
    labels: torch.Tensor | None,
    period: int,
    temperature: Scalar,
    *,
    normalize: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
    return_stats: bool = False,
):
    """Core of the family. z: (M, D); labels: (M,) int64 or None for label(i) = i mod period."""
    check_reduction(reduction)
    tau = as_temperature(temperature, z)
    name = resolve_backend(backend, z.device, z.dtype)
    # The CPU kernel computes in fp32 whatever the input: hand it fp32 rows rather than rows
    # rounded back to bf16/fp16 (GPU kernels take the input dtype for the tensor cores).
    u_dtype = accumulation_dtype(z.dtype) if name == "cpu" else z.dtype
    u = reference.normalize_rows(z, u_dtype) if normalize else z
    if name == "reference":
        u_ref = u.to(torch.float64 if u.dtype == torch.float64 else torch.float32)
        lab = labels if labels is not None else reference.implicit_labels(u.shape[0], period, u.device)
        rows = reference.self_similarity_rows(u_ref, tau, lab)
    else:
        rows = self_ops(name).forward(u, tau, labels, period)
    lse, pos_sum, pos_count, _, top1 = rows
    per_row, has_pos = reference.row_loss(lse, pos_sum, pos_count)
    loss = reference.reduce_rows(per_row, has_pos, reduction)
    if return_stats:
        return loss, _stats(u, tau, pos_sum, pos_count, top1, has_pos)
    return loss


def nt_xent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: Scalar = 0.5,
    *,
    normalize: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
    return_stats: bool = False,
    gather: bool = False,
):
    """SimCLR's NT-Xent. z1, z2: (N, D) two views; row i of z1 and row i of z2 are positives.

    The loss averages over the 2N anchors of cat(z1, z2); `reduction="none"` returns (2N,).
    `gather=True`: loss of all ranks' rows (torch.distributed), see fastntxent.distributed.
    """
    check_pair("z1", z1, "z2", z2)
    if gather:
        from .distributed import gathered_nt_xent

        return gathered_nt_xent(z1, z2, temperature, normalize=normalize, reduction=reduction,
                                backend=backend, return_stats=return_stats)
    z = torch.cat([z1, z2], dim=0)
    return self_similarity_loss(
        z, None, z1.shape[0], temperature, normalize=normalize, reduction=reduction,
        backend=backend, return_stats=return_stats,
    )


def multiview_nt_xent(
    views: Union[torch.Tensor, Sequence[torch.Tensor]],
    temperature: Scalar = 0.5,
    *,
    normalize: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
    return_stats: bool = False,
):
    """Multi-view NT-Xent. views: (V, N, D) or a list of V tensors (N, D); the positives of a
    row are the other V−1 views of its sample. Loss over V·N anchors (view-major)."""
    if isinstance(views, (list, tuple)):
        if len(views) == 0:
            raise ValueError("views must hold at least one view")
        for i, v in enumerate(views):
            check_embeddings(f"views[{i}]", v)
            if v.shape != views[0].shape:
                raise ValueError(f"views[{i}] has shape {tuple(v.shape)}, views[0] has {tuple(views[0].shape)}")
            if v.dtype != views[0].dtype:
                raise TypeError(f"views[{i}] has dtype {v.dtype}, views[0] has {views[0].dtype}")
        check_same_device(**{f"views[{i}]": v for i, v in enumerate(views)})
        views = torch.stack(list(views))
    else:
        check_embeddings("views", views, ndim=3)
    V, N, D = views.shape
    return self_similarity_loss(
        views.reshape(V * N, D), None, N, temperature, normalize=normalize, reduction=reduction,
        backend=backend, return_stats=return_stats,
    )


def supcon(
    z: torch.Tensor,
    labels: torch.Tensor,
    temperature: Scalar = 0.1,
    *,
    normalize: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
    return_stats: bool = False,
    gather: bool = False,
):
    """Supervised contrastive loss (Khosla et al., L_out). z: (M, D), labels: (M,) integer.

    Anchors without a positive contribute 0 and are left out of the mean.
    `gather=True`: loss of all ranks' rows (torch.distributed), see fastntxent.distributed.
    """
    check_embeddings("z", z)
    labels = check_labels(labels, z.shape[0], z.device)
    if gather:
        from .distributed import gathered_supcon

        return gathered_supcon(z, labels, temperature, normalize=normalize, reduction=reduction,
                               backend=backend, return_stats=return_stats)
    return self_similarity_loss(
        z, labels, 1, temperature, normalize=normalize, reduction=reduction,
        backend=backend, return_stats=return_stats,
    )
