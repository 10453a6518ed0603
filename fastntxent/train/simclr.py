"""SimCLR (Chen et al. 2020): encoder + MLP projector trained with the fused NT-Xent loss."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

import fastntxent as fx
from fastntxent.chunked import chunked_backward
from fastntxent.distributed import world_size

from .method import Stats, ViewTransform
from .models import projection_head


class SimCLR(nn.Module):
    """A PretrainMethod (see method.py). Under torchrun (built after the process group) the
    loss is ``gather=True``: each rank's rows against every rank's (docs/maths.md §4)."""

    def __init__(self, cfg, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.projector = projection_head(backbone.out_dim, cfg.proj_hidden_dim, cfg.proj_output_dim,
                                         batch_norm=True)
        self.loss_fn = fx.NTXentLoss(cfg.temperature, learnable_temperature=cfg.learnable_temperature,
                                     backend=cfg.loss_backend, gather=world_size() > 1, decoupled=cfg.decoupled)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, Stats]:
        z1, z2 = self.projector(self.backbone(torch.cat([x1, x2]))).chunk(2)
        return self._loss(z1, z2)

    def _loss(self, z1: torch.Tensor, z2: torch.Tensor) -> tuple[torch.Tensor, Stats]:
        loss, stats = self.loss_fn(z1, z2, return_stats=True)
        return loss, dict(stats, embeddings=torch.cat([z1, z2]).detach())

    def grad_cache_backward(self, x1: torch.Tensor, x2: torch.Tensor, chunk_size: int,
                            transform: Optional[ViewTransform] = None) -> tuple[torch.Tensor, Stats]:
        """forward + backward with the encoder run on chunk_size images at a time (both views
        of a chunk's images in one call, as forward does for the batch; each view made from
        the chunk by ``transform`` when given, see method.py): fastntxent.chunked."""
        encoder = lambda x: self.projector(self.backbone(x))  # noqa: E731
        return chunked_backward(encoder, [x1, x2], self._loss, chunk_size, concat_views=True,
                                transform=transform)

    def after_step(self, step: int, total_steps: int) -> None:
        pass
