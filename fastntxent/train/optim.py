"""LARS (You et al. 2017, as used by SimCLR / solo-learn) and a per-step linear warm-up +
cosine learning-rate schedule."""
from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LRScheduler


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio eta * ||w|| / (||g|| + wd * ||w||).

    Parameter groups with ``lars_exclude=True`` (biases and norm layers, the SimCLR recipe)
    skip both the trust ratio and weight decay. ``clip_lr`` caps the ratio at 1 relative to
    the group lr (solo-learn's clip_lr).
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.02, clip_lr: bool = True, eps: float = 1e-8):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                        clip_lr=clip_lr, eps=eps, lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd, mom, lr = group["weight_decay"], group["momentum"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if not group["lars_exclude"]:
                    if wd:
                        d = d.add(p, alpha=wd)
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(p.grad)
                    ratio = group["eta"] * w_norm / (g_norm + wd * w_norm + group["eps"])
                    ratio = torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))
                    if group["clip_lr"]:
                        ratio = ratio.clamp(max=1.0)
                    d = d * ratio
                state = self.state[p]
                if mom:
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = d.clone()
                    else:
                        buf.mul_(mom).add_(d)
                    d = buf
                p.add_(d, alpha=-lr)
        return loss


def param_groups(model, weight_decay: float):
    """Two groups: weights (decayed, LARS-adapted) and biases / norm parameters (neither)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay, lars_exclude=False),
            dict(params=no_decay, weight_decay=0.0, lars_exclude=True)]


def build_optimizer(cfg, model, lr: float) -> torch.optim.Optimizer:
    """LARS, SGD or AdamW (cfg.optimizer) over `model.parameters()` that require gradients."""
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "lars":
        return LARS(groups, lr=lr, momentum=cfg.momentum, eta=cfg.lars_eta, clip_lr=cfg.lars_clip)
    for g in groups:
        g.pop("lars_exclude")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=lr)


class WarmupCosine(LRScheduler):
    """Per step: linear warm-up from 0 to the base lr over ``warmup_steps``, then cosine decay to
    ``min_lr`` at ``total_steps``. Call ``step()`` after every optimiser step."""

    def __init__(self, optimizer, warmup_steps: int, total_steps: int, min_lr: float = 0.0,
                 last_epoch: int = -1):
        self.warmup_steps, self.total_steps, self.min_lr = warmup_steps, max(total_steps, 1), min_lr
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int, base: float) -> float:
        if step < self.warmup_steps:
            return base * (step + 1) / (self.warmup_steps + 1)
        t = min(step - self.warmup_steps, self.total_steps - self.warmup_steps)
        span = max(self.total_steps - self.warmup_steps, 1)
        return self.min_lr + (base - self.min_lr) * 0.5 * (1 + math.cos(math.pi * t / span))

    def get_lr(self):
        return [self.factor(self.last_epoch, b) for b in self.base_lrs]


def cosine_momentum(step: int, total_steps: int, base: float, final: float) -> float:
    """MoCo / BYOL momentum schedule: base -> final along a cosine over training."""
    return final - (final - base) * (math.cos(math.pi * step / max(total_steps, 1)) + 1) / 2
