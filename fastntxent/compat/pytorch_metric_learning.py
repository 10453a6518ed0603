"""pytorch-metric-learning's `NTXentLoss`, `SupConLoss` and `SelfSupervisedLoss`
(pytorch_metric_learning/losses), computed by the fused kernels.

    from pytorch_metric_learning.losses import NTXentLoss
        ->  from fastntxent.compat.pytorch_metric_learning import NTXentLoss

forward(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None), as PML.
Rows are normalised with `torch.nn.functional.normalize` (PML's default CosineSimilarity),
then fused with `normalize=False`.

NTXentLoss (PML's maths): for every positive pair (a, p) (same label, a ≠ p)
    ℓ_ap = −log( e^{s_ap/τ} / (e^{s_ap/τ} + Σ_{n: label_n ≠ label_a} e^{s_an/τ}) ),
and the loss is the mean over the positive pairs (PML's default MeanReducer). Each pair is
scored against the negatives only: the other positives of the anchor are not in its
denominator. That is not SupCon (fastntxent.supcon puts every other row in the denominator
and averages the positives' log-probabilities per anchor), and the fused kernels cannot
compute it when an anchor has two or more positives (they sum over all other rows):
labels with a class of three or more rows raise NotImplementedError. When every anchor has
at most one positive (SimCLR's batches: labels = arange(N) twice, or
SelfSupervisedLoss), PML's loss is exactly fastntxent's NT-Xent over the rows that have a
positive, which is what is computed. With ref_emb (rows against a second set of rows) the
labels must pair every row with exactly one ref row and the other way round (then it is
fastntxent.info_nce); otherwise NotImplementedError.

SupConLoss (PML's maths, adapted from SupContrast): per anchor,
    ℓ_a = −(1/|P(a)|) Σ_{p∈P(a)} log( e^{s_ap/τ} / Σ_{j≠a} e^{s_aj/τ} ),
the mean over the anchors whose loss is > 0 (PML's default AvgNonZeroReducer), 0 when no
anchor has both a positive and a negative — fastntxent.supcon with reduction="none", then
PML's reducer. ref_emb raises NotImplementedError.

Not supported (NotImplementedError naming the argument): indices_tuple (miners), a custom
`distance`, `reducer` or `embedding_regularizer`. Differences left: PML adds
finfo(dtype).tiny inside the logarithm of NT-Xent (and to |P(a)| in SupCon), which changes
nothing unless a probability is below ~1e-38; PML takes any temperature, the kernels need > 0.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..cross_family import info_nce
from ..self_family import self_similarity_loss, supcon
from ._common import dense_labels

__all__ = ["NTXentLoss", "SupConLoss", "SelfSupervisedLoss"]


class _PMLLoss(nn.Module):
    def __init__(self, temperature, *, distance=None, reducer=None, embedding_regularizer=None,
                 embedding_reg_weight=1, collect_stats=None):
        super().__init__()
        for name, value in (("distance", distance), ("reducer", reducer),
                            ("embedding_regularizer", embedding_regularizer)):
            if value is not None:
                raise NotImplementedError(
                    f"{type(self).__name__}({name}=...): fastntxent.compat computes PML's default "
                    f"{name} only (CosineSimilarity, the loss's default reducer, no regulariser)")
        self.temperature = temperature
        self.embedding_reg_weight = embedding_reg_weight
        self.collect_stats = collect_stats  # PML's statistics recording: nothing is recorded here

    def _check(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        if indices_tuple is not None:
            raise NotImplementedError(f"{type(self).__name__}(indices_tuple=...): miners are not supported by "
                                      "fastntxent.compat (the fused kernels use every pair of the batch)")
        if labels is None:
            raise ValueError("labels and indices_tuple cannot both be None")
        if labels.ndim != 1 or labels.shape[0] != embeddings.shape[0]:
            raise ValueError("labels must be a 1D tensor of shape (batch_size,) matching the embeddings")
        if ref_emb is not None and (ref_labels is None or ref_labels.ndim != 1
                                    or ref_labels.shape[0] != ref_emb.shape[0]):
            raise NotImplementedError(
                "ref_emb without ref_labels (of shape (len(ref_emb),)): PML then leaves ref row i out of "
                "row i's pairs, which the fused kernels cannot express")
        return labels.to(embeddings.device)


class NTXentLoss(_PMLLoss):
    """pytorch_metric_learning.losses.NTXentLoss with the fused kernels (see the module docstring)."""

    def __init__(self, temperature=0.07, **kwargs):
        super().__init__(temperature, **kwargs)

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        labels = self._check(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        u = F.normalize(embeddings, p=2, dim=1)
        if ref_emb is not None:
            return self._against_ref(u, labels, ref_emb, ref_labels.to(ref_emb.device))
        ids = dense_labels(labels)
        counts = torch.bincount(ids)
        if bool((counts > 2).any()):
            raise NotImplementedError(
                f"labels with a class of {int(counts.max())} rows: PML's NTXentLoss scores each positive pair "
                "against the negatives only, which the fused kernels cannot compute when an anchor has more than "
                "one positive (fastntxent.supcon / compat.pytorch_metric_learning.SupConLoss put all positives "
                "in the denominator)")
        # at most one positive per anchor: PML's pair loss is NT-Xent's row loss, mean over the pairs
        return self_similarity_loss(u, ids, 1, self.temperature, normalize=False, reduction="mean")

    def _against_ref(self, u, labels, ref_emb, ref_labels):
        both = dense_labels(torch.cat([labels.reshape(-1), ref_labels.reshape(-1).to(labels.dtype)]))
        ids, ref_ids = both[:labels.shape[0]], both[labels.shape[0]:]
        n_classes = int(both.max()) + 1 if both.numel() else 0
        if (labels.shape[0] != ref_ids.shape[0]
                or not bool((torch.bincount(ids, minlength=n_classes) == 1).all())
                or not bool((torch.bincount(ref_ids, minlength=n_classes) == 1).all())):
            raise NotImplementedError(
                "ref_emb / ref_labels: fastntxent.compat supports the case where every row has exactly one positive "
                "ref row and every ref row is the positive of exactly one row (e.g. SelfSupervisedLoss(symmetric="
                "False)); other pairings need PML's per-pair denominators")
        order = torch.empty_like(ref_ids)
        order[ref_ids] = torch.arange(ref_ids.shape[0], device=ref_ids.device)  # class -> ref row
        k = F.normalize(ref_emb, p=2, dim=1)[order[ids]]
        return info_nce(u, k, None, self.temperature, normalize=False)


class SupConLoss(_PMLLoss):
    """pytorch_metric_learning.losses.SupConLoss with the fused kernels (see the module docstring)."""

    def __init__(self, temperature=0.1, **kwargs):
        super().__init__(temperature, **kwargs)

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        labels = self._check(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        if ref_emb is not None:
            raise NotImplementedError("SupConLoss(ref_emb=...): fastntxent.compat computes SupCon within one batch")
        ids = dense_labels(labels)
        counts = torch.bincount(ids)
        if not (bool((counts > 1).any()) and counts.numel() > 1):  # PML: no positive or no negative pair
            return (embeddings * 0).sum()
        rows = supcon(F.normalize(embeddings, p=2, dim=1), ids, self.temperature, normalize=False,
                      reduction="none")
        keep = rows > 0
        if not bool(keep.any()):
            return (embeddings * 0).sum()
        return rows[keep].mean()


class SelfSupervisedLoss(nn.Module):
    """pytorch_metric_learning.losses.SelfSupervisedLoss(loss, symmetric=True) for the compat losses:
    forward(embeddings, ref_emb), row i of both the same sample."""

    def __init__(self, loss, symmetric=True, **kwargs):
        super().__init__()
        if not isinstance(loss, (NTXentLoss, SupConLoss)):
            raise NotImplementedError(
                f"SelfSupervisedLoss({type(loss).__name__}): fastntxent.compat wraps its own NTXentLoss and "
                "SupConLoss only")
        self.loss = loss
        self.symmetric = symmetric

    def forward(self, embeddings, ref_emb):
        labels = torch.arange(embeddings.shape[0], device=embeddings.device)
        if self.symmetric:
            return self.loss(torch.cat([embeddings, ref_emb], dim=0), torch.cat([labels, labels], dim=0))
        return self.loss(embeddings=embeddings, labels=labels, ref_emb=ref_emb, ref_labels=labels.clone())
