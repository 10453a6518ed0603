"""MoCo v2 (Chen et al. 2020): query encoder, momentum key encoder (m: base -> final on a
cosine), a MemoryQueue of past keys as the negatives, the fused InfoNCE loss (tau = 0.2),
optionally the symmetric loss of solo-learn's MoCo v2+.

Needs ``fastntxent.InfoNCELoss`` and ``fastntxent.MemoryQueue``; ``available()`` says whether
this build has them.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import fastntxent as fx

from .models import projection_head
from .optim import cosine_momentum


def available() -> bool:
    return hasattr(fx, "InfoNCELoss") and hasattr(fx, "MemoryQueue")


def require() -> None:
    if not available():
        raise RuntimeError("MoCo needs fastntxent.InfoNCELoss and fastntxent.MemoryQueue, which "
                           "this build of fastntxent does not have (update fastntxent).")


class MoCo(nn.Module):
    def __init__(self, cfg, backbone: nn.Module):
        require()
        super().__init__()
        self.backbone = backbone
        self.projector = projection_head(backbone.out_dim, cfg.proj_hidden_dim, cfg.proj_output_dim,
                                         batch_norm=False)
        self.momentum_backbone = copy.deepcopy(self.backbone)
        self.momentum_projector = copy.deepcopy(self.projector)
        for p in list(self.momentum_backbone.parameters()) + list(self.momentum_projector.parameters()):
            p.requires_grad_(False)
        self.queue = fx.MemoryQueue(cfg.proj_output_dim, cfg.queue_size)
        self.loss_fn = fx.InfoNCELoss(temperature=cfg.temperature,
                                      learnable_temperature=cfg.learnable_temperature,
                                      backend=cfg.loss_backend)
        self.symmetric = cfg.symmetric
        self.m_base, self.m_final = cfg.momentum_base, cfg.momentum_final

    def _loss(self, q, k, queue):
        # negatives = the queue only (MoCo v2); each rank's loss is its local mean and DDP's
        # gradient average makes it the global one, while the queue itself is kept identical
        # on every rank by MemoryQueue's gathered enqueue.
        return self.loss_fn(q, k, queue=queue, return_stats=True)

    @torch.no_grad()
    def _keys(self, x):
        return F.normalize(self.momentum_projector(self.momentum_backbone(x)).float(), dim=1)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor):
        queue = self.queue.keys.clone().detach()  # negatives: the queue as it was before this batch
        if self.symmetric:
            q1, q2 = self.projector(self.backbone(torch.cat([x1, x2]))).chunk(2)
            k1, k2 = self._keys(torch.cat([x1, x2])).chunk(2)
            l1, s1 = self._loss(q1, k2, queue)
            l2, s2 = self._loss(q2, k1, queue)
            loss = (l1 + l2) / 2
            stats = {k: (s1[k] + s2[k]) / 2 for k in s1 if k in s2}
            new_keys = torch.cat([k1, k2])
        else:
            q1 = self.projector(self.backbone(x1))
            k2 = self._keys(x2)
            loss, stats = self._loss(q1, k2, queue)
            new_keys = k2
        self.queue.enqueue(new_keys.detach())
        return loss, stats

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> dict:
        """EMA of the query encoder into the key encoder, m on a cosine from base to final."""
        m = cosine_momentum(step, total_steps, self.m_base, self.m_final)
        for online, target in ((self.backbone, self.momentum_backbone),
                               (self.projector, self.momentum_projector)):
            for po, pt in zip(online.parameters(), target.parameters()):
                pt.mul_(m).add_(po.detach(), alpha=1 - m)
        return {"momentum": m}
