"""SimCLR (Chen et al. 2020): encoder + MLP projector trained with the fused NT-Xent loss."""
from __future__ import annotations

import inspect

import torch
from torch import nn

import fastntxent as fx

from . import distributed as D
from .models import projection_head


def _supports_gather(fn) -> bool:
    try:
        return "gather" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class SimCLR(nn.Module):
    def __init__(self, cfg, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.projector = projection_head(backbone.out_dim, cfg.proj_hidden_dim, cfg.proj_output_dim,
                                         batch_norm=True)
        self.loss_fn = fx.NTXentLoss(cfg.temperature, learnable_temperature=cfg.learnable_temperature,
                                     backend=cfg.loss_backend)

    def loss(self, z1: torch.Tensor, z2: torch.Tensor):
        if D.world_size() > 1:
            if _supports_gather(fx.nt_xent):
                # fused cross-rank loss: local rows against all ranks' columns (docs/maths.md §4)
                return fx.nt_xent(z1, z2, self.loss_fn.temperature, backend=self.loss_fn.backend,
                                  return_stats=True, gather=True)
            # fallback: gather rows with gradients; every rank computes the global loss, the
            # all_gather backward sums the ranks' gradients and DDP's average undoes the copies.
            z1, z2 = D.gather_with_grad(z1), D.gather_with_grad(z2)
        return self.loss_fn(z1, z2, return_stats=True)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor):
        z = self.projector(self.backbone(torch.cat([x1, x2])))
        z1, z2 = z.chunk(2)
        return self.loss(z1, z2)

    def after_step(self, step: int, total_steps: int) -> dict:
        return {}
