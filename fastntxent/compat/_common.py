"""Helpers shared by the compat classes."""
from __future__ import annotations

import torch

from .. import distributed as _dist


def dense_labels(labels: torch.Tensor) -> torch.Tensor:
    """Any labels (M,) of any dtype (what the peers compare with ==) as int64 class ids."""
    return torch.unique(labels.reshape(-1), return_inverse=True)[1].reshape(-1)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """x, whose gradient is multiplied by `factor` on the way back."""
    return _ScaleGrad.apply(x, factor) if x.requires_grad else x


class _MeanGradOverRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad)
        return grad / _dist.world_size()


def mean_grad_over_ranks(x):
    """x, whose gradient on every rank is the mean over ranks of the ranks' gradients."""
    if isinstance(x, torch.Tensor) and x.requires_grad:
        return _MeanGradOverRanks.apply(x)
    return x
