"""Loss implementations the benchmark compares, all as `fn(z1, z2) -> scalar loss` (NT-Xent).

- fastntxent-<backend>: the fused backends present on this machine;
- naive: NT-Xent as users write it (cat, normalise, matmul, mask the diagonal, cross-entropy);
- naive-compile: torch.compile of that naive loss;
- reference: fastntxent's float-capable reference (materialises the matrix several times);
- lightly / pytorch-metric-learning: peers' NTXentLoss, where installed.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn.functional as F

import fastntxent as fx

TEMPERATURE = 0.1


def naive_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits.float(), target)


def _fused(backend: str) -> Callable:
    return lambda z1, z2: fx.nt_xent(z1, z2, TEMPERATURE, backend=backend)


def _lightly():
    from lightly.loss import NTXentLoss  # type: ignore

    loss = NTXentLoss(temperature=TEMPERATURE)
    return lambda z1, z2: loss(z1, z2)


def _pml():
    from pytorch_metric_learning.losses import NTXentLoss  # type: ignore

    loss = NTXentLoss(temperature=TEMPERATURE)

    def fn(z1, z2):
        n = z1.shape[0]
        labels = torch.arange(n, device=z1.device).repeat(2)
        return loss(torch.cat([z1, z2]), labels)

    return fn


def available(device: str) -> Dict[str, Callable[[], Callable]]:
    """Provider name -> factory, for the providers that can run on `device` here."""
    from fastntxent import _extension

    out: Dict[str, Callable[[], Callable]] = {}
    if device == "cpu" and _extension.has_cpu_kernels():
        out["fastntxent-cpu"] = lambda: _fused("cpu")
    if device == "cuda":
        try:
            import triton  # noqa: F401

            out["fastntxent-triton"] = lambda: _fused("triton")
        except ImportError:
            pass
        if _extension.has_cuda_kernels():
            out["fastntxent-cuda"] = lambda: _fused("cuda")
    out["naive"] = lambda: naive_nt_xent
    out["naive-compile"] = lambda: torch.compile(naive_nt_xent, dynamic=False)
    out["reference"] = lambda: _fused("reference")
    for name, factory in (("lightly", _lightly), ("pytorch-metric-learning", _pml)):
        try:
            factory()
        except Exception:
            continue
        out[name] = factory
    return out
