"""The contract between the trainer and a pretraining method (SimCLR, MoCo).

A method is an ``nn.Module`` (the trainer moves it, converts its BatchNorms to SyncBatchNorm,
wraps it in DistributedDataParallel and checkpoints its ``state_dict``) that owns everything
trained or updated: the encoder, the heads, the loss module (a learnable temperature is a
parameter) and any state such as MoCo's key encoder and queue (buffers, so checkpoints keep
them). The trainer owns the data, the optimiser over ``parameters()``, the schedule,
autocast, checkpoints and evaluation of ``backbone``.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Optional, Protocol

import torch
from torch import nn

Stats = dict[str, torch.Tensor]
ViewTransform = Callable[[torch.Tensor], torch.Tensor]
"""A chunk of raw images (b, C, H, W) → one augmented view of them, float32 normalised."""


class PretrainMethod(Protocol):
    backbone: nn.Module
    """The encoder being pretrained: (B, C, H, W) images -> (B, backbone.out_dim) features.
    Evaluated (kNN, linear probe) and saved as backbone.pt by the trainer."""

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, Stats]:
        """One training step's loss on two views of the same B images.

        x1, x2: (B, C, H, W) float32 normalised images on the method's device, row i of each
        from the same image; B is the per-process batch. Returns ``(loss, stats)``: loss a
        0-dim float32 tensor with gradient (under torchrun the loss of the global batch, see
        fastntxent.distributed); stats 0-dim tensors without gradient, at least
        ``"top1_accuracy"`` (fraction of anchors whose positive has the largest logit), and
        for the health monitor the loss's health statistics (``return_stats=True`` of a
        fastntxent loss: ``loss_to_chance``, ``embedding_std``, ...) and ``"embeddings"``:
        the (M, D) rows the loss saw, detached (the trainer pops it; optional).
        Called once per step inside the trainer's autocast; may update non-parameter state
        (MoCo enqueues its keys).
        """
        ...

    def __call__(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, Stats]:
        """``nn.Module.__call__``: runs ``forward``."""
        ...

    def grad_cache_backward(self, x1: torch.Tensor, x2: torch.Tensor, chunk_size: int,
                            transform: Optional[ViewTransform] = None) -> tuple[torch.Tensor, Stats]:
        """``--chunk-size``: what ``forward`` computes, plus the backward, with the
        encoder run on ``chunk_size`` images at a time (fastntxent.chunked.chunked_backward).
        ``transform`` None: x1, x2 are the views, as for ``forward``. Else x1 and x2 are the
        raw batch (B, C, H, W) as the data stores it (uint8 or float) and ``transform`` makes
        a view of a chunk, (b, C, H, W) → (b, C, H, W) float32 normalised, drawing from the
        global generator: it is called on each chunk of each view, in every pass that
        needs the view (``chunked_backward(..., transform=transform)``), so the passes
        over one chunk see the same views and no view of the whole batch is made.
        Leaves the gradients in ``.grad`` (local ones: the trainer averages them over ranks)
        and returns ``(loss, stats)`` detached; same side effects as ``forward``. Called
        inside the trainer's autocast, after ``zero_grad``."""
        ...

    def after_step(self, step: int, total_steps: int) -> None:
        """Called after every optimiser step, with the 0-based global step just taken and the
        run's total; e.g. MoCo's momentum update of the key encoder. No gradient."""
        ...

    # nn.Module methods the trainer uses
    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True,
                        assign: bool = False) -> Any: ...

    def train(self, mode: bool = True) -> Any: ...

    def to(self, *args: Any, **kwargs: Any) -> Any: ...
