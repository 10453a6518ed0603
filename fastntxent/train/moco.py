"""MoCo v2 (Chen et al. 2020): query encoder, momentum key encoder (m: base -> final on a
cosine), a MemoryQueue of past keys as the negatives, the fused InfoNCE loss, optionally the
symmetric loss of solo-learn's MoCo v2+."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import fastntxent as fx

from .method import Stats
from .models import projection_head
from .optim import cosine_momentum


class MoCo(nn.Module):
    """A PretrainMethod (see method.py). Each rank's loss is its local mean (DDP's gradient
    average makes it the global one); the queue stays identical on every rank because
    MemoryQueue gathers all ranks' keys when it enqueues."""

    def __init__(self, cfg, backbone: nn.Module):
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

    @torch.no_grad()
    def _keys(self, x: torch.Tensor) -> torch.Tensor:
        """(B, proj_output_dim) float32 unit keys from the momentum encoder."""
        return F.normalize(self.momentum_projector(self.momentum_backbone(x)).float(), dim=1)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, Stats]:
        queue = self.queue.keys.clone()  # negatives: the queue as it was before this batch
        if self.symmetric:
            q1, q2 = self.projector(self.backbone(torch.cat([x1, x2]))).chunk(2)
            k1, k2 = self._keys(torch.cat([x1, x2])).chunk(2)
            l1, s1 = self.loss_fn(q1, k2, queue=queue, return_stats=True)
            l2, s2 = self.loss_fn(q2, k1, queue=queue, return_stats=True)
            loss = (l1 + l2) / 2
            stats = {k: (s1[k] + s2[k]) / 2 for k in s1}
            new_keys = torch.cat([k1, k2])
        else:
            q1 = self.projector(self.backbone(x1))
            new_keys = self._keys(x2)
            loss, stats = self.loss_fn(q1, new_keys, queue=queue, return_stats=True)
        self.queue.enqueue(new_keys)
        return loss, stats

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """EMA of the query encoder into the key encoder, m on a cosine from base to final."""
        m = cosine_momentum(step, total_steps, self.m_base, self.m_final)
        for online, target in ((self.backbone, self.momentum_backbone),
                               (self.projector, self.momentum_projector)):
            for po, pt in zip(online.parameters(), target.parameters()):
                pt.mul_(m).add_(po.detach(), alpha=1 - m)
