"""MoCo v2 (Chen et al. 2020): query encoder, momentum key encoder (m: base -> final on a
cosine), a MemoryQueue of past keys as the negatives, the fused InfoNCE loss, optionally the
symmetric loss of solo-learn's MoCo v2+."""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import fastntxent as fx
from fastntxent.chunked import chunked_backward, chunked_forward

from .method import Stats, ViewTransform
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
                                      backend=cfg.loss_backend, decoupled=cfg.decoupled)
        self.symmetric = cfg.symmetric
        self.m_base, self.m_final = cfg.momentum_base, cfg.momentum_final

    @torch.no_grad()
    def _keys(self, x: torch.Tensor) -> torch.Tensor:
        """(B, proj_output_dim) float32 unit keys from the momentum encoder."""
        return F.normalize(self.momentum_projector(self.momentum_backbone(x)).float(), dim=1)

    def _loss(self, queries: tuple, keys: tuple, queue: torch.Tensor) -> tuple[torch.Tensor, Stats]:
        """queries (q1,) against keys (k2,), or symmetric (q1, q2) against (k1, k2); the stats
        carry the queries as "embeddings" (for the trainer's health monitor)."""
        embeddings = torch.cat(queries).detach()
        if not self.symmetric:
            loss, stats = self.loss_fn(queries[0], keys[0], queue=queue, return_stats=True)
            return loss, dict(stats, embeddings=embeddings)
        (q1, q2), (k1, k2) = queries, keys
        l1, s1 = self.loss_fn(q1, k2, queue=queue, return_stats=True)
        l2, s2 = self.loss_fn(q2, k1, queue=queue, return_stats=True)
        return (l1 + l2) / 2, dict({k: (s1[k] + s2[k]) / 2 for k in s1}, embeddings=embeddings)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, Stats]:
        queue = self.queue.keys.clone()  # negatives: the queue as it was before this batch
        if self.symmetric:
            queries = self.projector(self.backbone(torch.cat([x1, x2]))).chunk(2)
            keys = self._keys(torch.cat([x1, x2])).chunk(2)
        else:
            queries, keys = (self.projector(self.backbone(x1)),), (self._keys(x2),)
        loss, stats = self._loss(queries, keys, queue)
        self.queue.enqueue(torch.cat(keys))
        return loss, stats

    def _loss_and_keys(self, queries: tuple, keys: tuple, queue: torch.Tensor):
        """``_loss`` and the keys to enqueue, (B or 2B, D): the chunked step's loss_fn."""
        return (*self._loss(queries, keys, queue), torch.cat(keys))

    def grad_cache_backward(self, x1: torch.Tensor, x2: torch.Tensor, chunk_size: int,
                            transform: Optional[ViewTransform] = None) -> tuple[torch.Tensor, Stats]:
        """forward + backward, both encoders run on chunk_size images at a time and on the
        views ``forward`` gives them: the query encoder with gradient caching, the key
        encoder without gradient (fastntxent.chunked). Symmetric: both views of a chunk's
        images in one query call, the key encoder on that call's views (``target_encoder``,
        so with ``transform`` it sees the queries' views). Otherwise queries of view 1, keys
        of view 2, the keys computed when the loss needs them, after the queries' first
        pass (so the views are drawn in the unchunked step's order: x1's, then x2's).
        ``transform``: see method.py."""
        queue = self.queue.keys.clone()  # negatives: the queue as it was before this batch
        query_encoder = lambda x: self.projector(self.backbone(x))  # noqa: E731
        if self.symmetric:
            loss, stats, keys = chunked_backward(
                query_encoder, [x1, x2], lambda q1, q2, k1, k2: self._loss_and_keys((q1, q2), (k1, k2), queue),
                chunk_size, concat_views=True, transform=transform, target_encoder=self._keys)
        else:
            def loss_fn(q1):
                k2 = chunked_forward(self._keys, x2, chunk_size, transform=transform)
                return self._loss_and_keys((q1,), (k2,), queue)
            loss, stats, keys = chunked_backward(query_encoder, x1, loss_fn, chunk_size, transform=transform)
        self.queue.enqueue(keys)
        return loss, stats

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """EMA of the query encoder into the key encoder, m on a cosine from base to final."""
        m = cosine_momentum(step, total_steps, self.m_base, self.m_final)
        for online, target in ((self.backbone, self.momentum_backbone),
                               (self.projector, self.momentum_projector)):
            for po, pt in zip(online.parameters(), target.parameters()):
                pt.mul_(m).add_(po.detach(), alpha=1 - m)
