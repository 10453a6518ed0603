"""SupContrast's `SupConLoss` (HobbitLong/SupContrast, losses.py), computed by `fastntxent.supcon`.

    from losses import SupConLoss                 ->  from fastntxent.compat.supcontrast import SupConLoss

    criterion = SupConLoss(temperature=0.07)
    loss = criterion(features, labels)            # features (bsz, n_views, D), normalised by the model
    loss = criterion(features)                    # SimCLR: the other views are the positives

Maths (Khosla et al. 2020, L_out, with SupContrast's scaling): the anchors are the rows of
cat(features[:, 0], …, features[:, n_views−1]) (contrast_mode='all') or of features[:, 0]
('one'); for anchor i, with P(i) the other rows of its class (the other views of its sample,
and with labels the views of every sample of its label),
    ℓ_i = −(τ/τ_base) · (1/|P(i)|) Σ_{p∈P(i)} log( e^{z_i·z_p/τ} / Σ_{a≠i} e^{z_i·z_a/τ} ),
and the loss is the mean over all anchors (an anchor without a positive, possible only with
n_views=1, contributes 0 as in SupContrast's current code; its first release gave NaN). The
features are used as they arrive (SupContrast's models normalise them; the loss does not:
`normalize=False`). Features with more than 3 dims are flattened to (bsz, n_views, −1).

mask= (bsz, bsz), "mask_ij = 1 if sample j has the same class as sample i": supported when
it is the same-class relation of some labelling (0/1 entries, ones on the diagonal,
symmetric and transitive), computed as those labels; any other mask (asymmetric, weighted,
zero diagonal) raises NotImplementedError (the fused kernels take positives from labels).
contrast_mode='one' computes every row's loss in the kernel and keeps the first view's
(n_views× the work of the anchors kept). Unlike SupContrast the temperature must be > 0.
"""
from __future__ import annotations

import torch
from torch import nn

from ..self_family import supcon
from ._common import dense_labels

__all__ = ["SupConLoss"]


def _labels_of_mask(mask: torch.Tensor, batch_size: int) -> torch.Tensor:
    if mask.shape != (batch_size, batch_size):
        raise ValueError(f"mask must have shape ({batch_size}, {batch_size}), got {tuple(mask.shape)}")
    m = mask.float()
    labels = m.argmax(dim=1)  # the first sample of each row's class
    same = (labels.view(-1, 1) == labels.view(1, -1)).float()
    if not torch.equal(m, same):
        raise NotImplementedError(
            "SupConLoss(mask=...): this mask is not the same-class relation of any labelling (0/1 entries, ones "
            "on the diagonal, symmetric, transitive), which is all the fused kernels can express; pass labels=")
    return labels


class SupConLoss(nn.Module):
    """SupContrast's SupConLoss with the fused kernels (see the module docstring)."""

    def __init__(self, temperature=0.07, contrast_mode='all', base_temperature=0.07):
        super().__init__()
        self.temperature = temperature
        self.contrast_mode = contrast_mode
        self.base_temperature = base_temperature

    def forward(self, features, labels=None, mask=None):
        if len(features.shape) < 3:
            raise ValueError('`features` needs to be [bsz, n_views, ...],'
                             'at least 3 dimensions are required')
        if len(features.shape) > 3:
            features = features.view(features.shape[0], features.shape[1], -1)
        batch_size, n_views = features.shape[0], features.shape[1]
        if labels is not None and mask is not None:
            raise ValueError('Cannot define both `labels` and `mask`')
        elif labels is None and mask is None:
            ids = torch.arange(batch_size, device=features.device)
        elif labels is not None:
            labels = labels.contiguous().view(-1, 1)
            if labels.shape[0] != batch_size:
                raise ValueError('Num of labels does not match num of features')
            ids = dense_labels(labels.to(features.device))
        else:
            ids = _labels_of_mask(mask.to(features.device), batch_size)
        if self.contrast_mode == 'one':
            anchor_count = 1
        elif self.contrast_mode == 'all':
            anchor_count = n_views
        else:
            raise ValueError('Unknown mode: {}'.format(self.contrast_mode))
        contrast = torch.cat(torch.unbind(features, dim=1), dim=0)  # view-major (n_views·bsz, D)
        rows = supcon(contrast, ids.repeat(n_views), self.temperature, normalize=False, reduction="none")
        return (self.temperature / self.base_temperature) * rows[: anchor_count * batch_size].mean()
