"""What the trainer adds to fastntxent.distributed (is_initialized, world_size, rank, the
gathers): process-group setup under torchrun, cleanup, barrier, a cross-rank flag and the
gradient average of --chunk-size steps."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..distributed import is_initialized


def setup(device_str: str) -> torch.device:
    """Initialise the process group under torchrun (WORLD_SIZE > 1) and pick the device."""
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    if device_str == "auto":
        device_str = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_str)
    if ws > 1 and not is_initialized():
        if device.type == "cuda":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    elif device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def cleanup() -> None:
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def any_flag(flag: bool, device: torch.device) -> bool:
    """True on every rank when any rank raised the flag (signal handling without hangs)."""
    if not is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


@torch.no_grad()
def average_gradients(params) -> None:
    """Every parameter's .grad replaced by its mean over the ranks (what DDP's backward does),
    one all-reduce per (device, dtype) of all gradients flattened together."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    world = dist.get_world_size()
    groups: dict = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    for _, grads in sorted(groups.items(), key=lambda kv: str(kv[0])):
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat.div_(world)
        for g, avg in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(avg)
