"""open_clip's `ClipLoss` and `SigLipLoss` (open_clip/loss.py), computed by `fastntxent.clip_loss` /
`fastntxent.siglip_loss`.

    from open_clip.loss import ClipLoss          ->  from fastntxent.compat.open_clip import ClipLoss

    loss = ClipLoss()(image_features, text_features, logit_scale)        # model.logit_scale.exp()
    losses = ClipLoss()(**model_out, output_dict=True)                   # {"contrastive_loss": loss}

Maths, as open_clip: ½ (CE(s·I Tᵀ, arange) + CE(s·T Iᵀ, arange)), mean over the rows. The
features are used as they arrive (open_clip's models normalise them; the loss does not:
`normalize=False`), and `logit_scale` s is the already-exponentiated scale (float or 0-dim
tensor, its gradient computed in the kernel). `logit_bias`, a scalar added to every logit,
leaves both cross-entropies unchanged: it is accepted (the loss is NaN when it is not
finite, and its gradient is 0, as in open_clip); a non-scalar bias raises NotImplementedError.

Distributed (world_size > 1, an initialised torch.distributed process group whose rank and
size must be `rank` / `world_size`): loss values and the gradients each rank receives for its
features and for logit_scale are open_clip's for
- local_loss=False (every rank's loss is the global batch's), with gather_with_grad True or False;
- local_loss=True, gather_with_grad=True (each rank: its rows against all ranks' columns).
local_loss=True with gather_with_grad=False (each rank's gradient stops at the other ranks'
features) and use_horovod=True raise NotImplementedError: fastntxent gathers with
torch.distributed and its gathers always carry the gradient back.
`cache_labels` changes nothing in the maths (fastntxent needs no label tensor).

SigLipLoss(cache_labels=False, rank=0, world_size=1, dist_impl=None)(image_features,
text_features, logit_scale, logit_bias, output_dict=False): −Σ log σ(labels·(t·I Tᵀ + b)) / B,
features used as given. With world_size > 1 each rank's value and gradients are open_clip's
(its local images against every rank's texts, divided by the local batch size) for every
`dist_impl` ("bidir", "shift", "reduce", "gather": the same maths; fastntxent all-gathers).
"""
from __future__ import annotations

import torch
from torch import nn

from .. import distributed as _dist
from ..cross_family import clip_loss, info_nce
from ..siglip_family import siglip_loss
from ._common import mean_grad_over_ranks, scale_grad

__all__ = ["ClipLoss", "SigLipLoss"]


def _scalar(value, name):
    if isinstance(value, torch.Tensor) and value.dim() != 0:
        if value.numel() != 1:
            raise NotImplementedError(
                f"{name} of shape {tuple(value.shape)}: fastntxent.compat.open_clip.ClipLoss takes a scalar {name} "
                "(a float or a tensor with one element)")
        value = value.reshape(())
    return value


class ClipLoss(nn.Module):
    """open_clip.loss.ClipLoss with the fused kernels (see the module docstring)."""

    def __init__(self, local_loss=False, gather_with_grad=False, cache_labels=False, rank=0, world_size=1,
                 use_horovod=False):
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod
        # open_clip's label cache, kept for code that reads it (fastntxent needs no labels).
        self.prev_num_logits = 0
        self.labels = {}

    def _check_distributed(self) -> None:
        if self.use_horovod:
            raise NotImplementedError(
                "use_horovod=True with world_size > 1: fastntxent gathers with torch.distributed only")
        if self.local_loss and not self.gather_with_grad:
            raise NotImplementedError(
                "local_loss=True with gather_with_grad=False and world_size > 1: open_clip's gradient then stops "
                "at the other ranks' features, which fastntxent's gathers cannot express; use gather_with_grad=True "
                "(the exact gradient of the global loss)")
        if not _dist.is_initialized():
            raise ValueError(f"world_size={self.world_size} needs an initialised torch.distributed process group")
        if _dist.world_size() != self.world_size or _dist.rank() != self.rank:
            raise ValueError(f"ClipLoss(rank={self.rank}, world_size={self.world_size}) but the process group has "
                             f"rank {_dist.rank()} of {_dist.world_size()}")

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        logit_scale = _scalar(logit_scale, "logit_scale")
        if self.world_size > 1:
            self._check_distributed()
            if self.local_loss:  # gather_with_grad=True: local rows against every rank's columns
                tau = 1.0 / logit_scale
                rows_i = info_nce(image_features, text_features, None, tau, normalize=False, reduction="none",
                                  gather=True)
                rows_t = info_nce(text_features, image_features, None, tau, normalize=False, reduction="none",
                                  gather=True)
                loss = 0.5 * (rows_i.mean() + rows_t.mean())
            else:
                img, txt = image_features, text_features
                if not self.gather_with_grad:  # the gradient of a rank's own slot only: 1/W of the gathered one
                    img, txt = scale_grad(img, 1.0 / self.world_size), scale_grad(txt, 1.0 / self.world_size)
                # every rank's loss is the global one, so is its logit_scale gradient
                loss = clip_loss(img, txt, mean_grad_over_ranks(logit_scale), normalize=False, gather=True)
        else:
            loss = clip_loss(image_features, text_features, logit_scale, normalize=False)
        if logit_bias is not None:
            logit_bias = _scalar(logit_bias, "logit_bias")
            loss = loss + logit_bias * 0  # softmax is shift-invariant: NaN if the bias is, zero gradient
        return {"contrastive_loss": loss} if output_dict else loss


class SigLipLoss(nn.Module):
    """open_clip.loss.SigLipLoss with the fused kernels (see the module docstring)."""

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1, dist_impl=None):
        super().__init__()
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl or "bidir"
        if self.dist_impl not in ("bidir", "shift", "reduce", "gather"):
            raise ValueError(f"dist_impl must be one of 'bidir', 'shift', 'reduce', 'gather' or None, got {dist_impl!r}")
        self.prev_num_logits = 0
        self.labels = {}

    def forward(self, image_features, text_features, logit_scale, logit_bias, output_dict=False):
        logit_scale = _scalar(logit_scale, "logit_scale")
        logit_bias = _scalar(logit_bias, "logit_bias")
        gather = self.world_size > 1
        if gather:
            if not _dist.is_initialized():
                raise ValueError(f"world_size={self.world_size} needs an initialised torch.distributed process group")
            if _dist.world_size() != self.world_size or _dist.rank() != self.rank:
                raise ValueError(f"SigLipLoss(rank={self.rank}, world_size={self.world_size}) but the process group "
                                 f"has rank {_dist.rank()} of {_dist.world_size()}")
        # The local rows' sum over the local batch: open_clip's value and, through the gather,
        # its gradients on every rank.
        rows = siglip_loss(image_features, text_features, logit_scale, logit_bias, normalize=False,
                           reduction="none", gather=gather)
        loss = rows.sum() / image_features.shape[0]
        return {"contrastive_loss": loss} if output_dict else loss
