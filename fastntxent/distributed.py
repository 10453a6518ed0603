"""Exact multi-process losses (docs/maths.md §4): `gather=True` with torch.distributed.

Convention (the one DDP needs). Every rank calls the loss on its local rows with
`gather=True`; the returned value is the loss of the *global* batch (all ranks' rows
concatenated in rank order). Gradients are scaled so that after DDP averages them over the
W ranks, every parameter gradient equals the single-process gradient of the global loss:
the gradient a rank receives for its local inputs is W × ∂(global loss)/∂(those inputs),
while a scalar shared by all ranks (temperature, logit_scale) receives on each rank a part
whose average over ranks is its global gradient. Without DDP, divide input gradients by W.

How (exact, and what it costs):
- Cross family (info_nce, clip_loss): keys (and for CLIP both towers) are gathered with
  `torch.distributed.nn.functional.all_gather`, whose backward sums every rank's gradient
  for a rank's rows (reduce-scatter; all-to-all on gloo). Each rank computes only its local
  rows against the global columns (the operator's `pos_offset` places the positive), i.e.
  1/W of the global work; its objective is W·Σ_local ℓ / M_global, and the reported value is
  the all-reduced global loss. Communication: O(M·D) per gathered tensor each way.
- Self family (nt_xent, supcon): the embeddings (and labels) are gathered the same way and
  every rank computes the loss of the whole global batch (the self operators have no
  row-subset form yet): exact and simple, but each rank does the full O(M_global²·D) work
  instead of 1/W of it. A local-rows operator (gathering each row's lse too, as in the
  symmetric identity of docs/maths.md §1) would remove that redundancy.
All ranks must hold the same number of rows (checked; ValueError otherwise).
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

__all__ = ["is_initialized", "world_size", "rank", "gather_with_grad", "gather_no_grad"]


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def require_process_group(what: str = "gather=True") -> None:
    if not is_initialized():
        raise ValueError(
            f"{what} needs an initialised torch.distributed process group "
            "(torch.distributed.init_process_group, e.g. under torchrun); "
            "for single-process training call the loss with gather=False"
        )


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def _check_equal_rows(x: torch.Tensor, name: str) -> None:
    n = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    sizes = [torch.empty_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    if len(set(sizes)) != 1:
        raise ValueError(f"gather=True needs the same number of rows of {name} on every rank, got {sizes}")


def gather_with_grad(x: torch.Tensor, name: str = "input") -> torch.Tensor:
    """All ranks' `x` concatenated along dim 0 (rank order); the backward sums every rank's
    gradient for this rank's rows."""
    from torch.distributed.nn.functional import all_gather

    _check_equal_rows(x, name)
    with warnings.catch_warnings():  # deprecated in newer torch, still the autograd all-gather of 2.11
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(x.contiguous()), dim=0)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor, name: str = "input") -> torch.Tensor:
    _check_equal_rows(x, name)
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    out = x.detach().clone()
    dist.all_reduce(out)
    return out


def reduce_local_rows(per_row: torch.Tensor, reduction: str, global_rows: int) -> torch.Tensor:
    """Loss of the cross family from the local rows' ℓ under the convention above.

    "none" returns the local ℓ unchanged (backpropagating each rank's Σ ℓ_local gives the
    gradient of Σ over all ranks); "sum" / "mean" return the global value with the gradient
    of W·Σ_local ℓ (divided by the global row count for "mean")."""
    if reduction == "none":
        return per_row
    W = world_size()
    local = per_row.sum() * W
    total = all_reduce_sum(per_row.sum())
    if reduction == "mean":
        local = local / global_rows
        total = total / global_rows
    return local + (total - local).detach()


def _local_slices(n_local: int) -> slice:
    r = rank()
    return slice(r * n_local, (r + 1) * n_local)


def gathered_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature, *, reduction: str, **options):
    """nt_xent over the global batch (cat of every rank's z1, resp. z2). "none" returns the
    local anchors' ℓ in the local layout (z1 rows, then z2 rows)."""
    from .functional import nt_xent

    require_process_group()
    n = z1.shape[0]
    g1, g2 = gather_with_grad(z1, "z1"), gather_with_grad(z2, "z2")
    out = nt_xent(g1, g2, temperature, reduction=reduction, **options)
    if reduction != "none":
        return out
    loss, stats = out if isinstance(out, tuple) else (out, None)
    sl, N = _local_slices(n), g1.shape[0]
    loss = torch.cat([loss[sl], loss[N + sl.start:N + sl.stop]])
    return (loss, stats) if stats is not None else loss


def gathered_supcon(z: torch.Tensor, labels: torch.Tensor, temperature, *, reduction: str, **options):
    """supcon over the global batch (cat of every rank's z and labels)."""
    from .functional import supcon

    require_process_group()
    n = z.shape[0]
    gz = gather_with_grad(z, "z")
    glabels = gather_no_grad(labels.to(torch.int64), "labels")
    out = supcon(gz, glabels, temperature, reduction=reduction, **options)
    if reduction != "none":
        return out
    loss, stats = out if isinstance(out, tuple) else (out, None)
    loss = loss[_local_slices(n)]
    return (loss, stats) if stats is not None else loss
