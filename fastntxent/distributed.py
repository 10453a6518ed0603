"""Exact multi-process losses: `gather=True` over torch.distributed (docs/distributed.md).

Convention (the one DDP needs). Every rank calls the loss on its local rows with
`gather=True`; ranks may hold different row counts, including 0. The global batch is the
concatenation of every rank's rows in rank order and the returned value is its loss (for
reduction="none": the local rows' ℓ). Gradients are scaled so that after DDP averages them over
the W ranks every parameter gradient equals the single-process gradient of the global loss: a
rank receives W × ∂(global loss)/∂(its inputs) ("sum" / "mean"; "none": the gradient of
whatever the ranks' reductions of their rows add up to), and a shared scalar (temperature,
logit_scale) receives a part whose average over the ranks is its global gradient.

How, for every loss: each rank computes only its local rows against the gathered columns —
M_local·M_global·D work, 1/W of the global loss — and its objective is W·Σ_local ℓ (divided by
the global anchor count for "mean"); the value reported is the all-reduced global one.
- `gather_rows`: the one autograd all-gather, of variable sizes (padded to the largest rank,
  one all-gather; the backward pads, reduce-scatters the sum to the owners and unpads), built on
  torch's functional collectives (traceable by torch.compile). Before it, one small all-gather
  of every rank's (rows, D, dtype, …): a mismatch raises the same ValueError on every rank.
- Self family (nt_xent, multiview_nt_xent, supcon): the normalised rows are gathered; labels
  too (supcon) or the global sample index of each row (the views); the backend's local-rows
  operators (family "self_rows": CPU, Triton, reference) give the local rows' statistics and,
  backward, the gradient of every global row from the local rows, which the gather's backward
  sums onto its owner. Backends without them (the CUDA C++ kernels) compute the full global
  batch on every rank and keep the local rows' statistics: exact, W× the work.
- Cross family (info_nce, clip_loss): keys (CLIP: both towers) are gathered; the local rows
  are the queries (`pos_offset` places each positive).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["is_initialized", "world_size", "rank", "Layout", "exchange_layout", "gather_rows",
           "gather_with_grad", "gather_no_grad", "all_reduce_sum"]


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


# ---------------------------------------------------------------------------------------
# Collectives: torch's functional collectives (torch.compile traces them), one name per
# torch version (the *_single names are current in 2.14, the *_tensor ones in older torch)
# ---------------------------------------------------------------------------------------
def _funcol():
    import torch.distributed._functional_collectives as funcol

    return funcol


def _all_gather(x: torch.Tensor) -> torch.Tensor:
    """(W·n, ...) from every rank's (n, ...), equal n (no autograd)."""
    fc = _funcol()
    gather = getattr(fc, "all_gather_single", None) or fc.all_gather_tensor
    return fc.wait_tensor(gather(x.contiguous(), 0, dist.group.WORLD))


def _reduce_scatter_sum(x: torch.Tensor) -> torch.Tensor:
    """This rank's (n, ...) block of the sum over ranks of every rank's (W·n, ...) (no autograd)."""
    fc = _funcol()
    scatter = getattr(fc, "reduce_scatter_single", None) or fc.reduce_scatter_tensor
    return fc.wait_tensor(scatter(x.contiguous(), "sum", 0, dist.group.WORLD))


@torch.no_grad()
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Σ over ranks of x (no autograd)."""
    fc = _funcol()
    return fc.wait_tensor(fc.all_reduce(x.detach().contiguous(), "sum", dist.group.WORLD))


# ---------------------------------------------------------------------------------------
# Layout of the global batch, checked on every rank
# ---------------------------------------------------------------------------------------
_DTYPE_CODES = (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64)


class Layout(NamedTuple):
    """Rows of every rank (rank order) and this rank's index: the global batch is their concatenation."""
    sizes: tuple
    rank: int

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def start(self) -> int:
        return sum(self.sizes[: self.rank])

    @property
    def stop(self) -> int:
        return self.start + self.sizes[self.rank]


def exchange_layout(x: torch.Tensor, name: str, **agree: int) -> Layout:
    """One small all-gather of every rank's (rows of x, its other extents, its dtype, `agree`);
    a mismatch of anything but the row count raises the same ValueError on every rank (all of
    them see every rank's values), so no rank is left waiting in a later collective."""
    require_process_group()
    shape = tuple(x.shape[1:])
    meta = [x.shape[0], len(shape), *shape, _DTYPE_CODES.index(x.dtype) if x.dtype in _DTYPE_CODES else -1,
            *(int(v) for v in agree.values())]
    width = 8 + len(agree)  # fixed width on every rank, whatever its x: the collective itself always matches
    if len(meta) > width:
        raise ValueError(f"gather=True: {name} has too many dimensions ({x.dim()})")
    meta = meta + [-2] * (width - len(meta))
    with torch.no_grad():
        table = _all_gather(torch.tensor(meta, dtype=torch.int64, device=x.device)).view(-1, width).tolist()
    me = rank()
    for r, row in enumerate(table):
        if row[1:] != table[0][1:]:
            raise ValueError(f"gather=True: {name} differs across ranks: {_describe(table[0], agree)} on rank 0, "
                             f"{_describe(row, agree)} on rank {r} (rank {me} raises too; only the row count "
                             "may differ)")
    return Layout(tuple(row[0] for row in table), me)


def _describe(row: list, agree: dict) -> str:
    ndim = row[1]
    code = row[2 + ndim]
    dtype = _DTYPE_CODES[code] if 0 <= code < len(_DTYPE_CODES) else "another dtype"
    extra = "".join(f", {k}={v}" for k, v in zip(agree, row[3 + ndim:]))
    return f"rows of shape {tuple(row[2:2 + ndim])} and dtype {dtype}{extra}"


# ---------------------------------------------------------------------------------------
# The autograd all-gather of variable sizes
# ---------------------------------------------------------------------------------------
def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    if x.shape[0] == rows:
        return x
    return torch.cat([x, x.new_zeros((rows - x.shape[0], *x.shape[1:]))])


def _gather_padded(x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    peak = max(sizes)
    if peak == 0:
        return x.new_empty((0, *x.shape[1:]))
    g = _all_gather(_pad_rows(x, peak))
    if all(n == peak for n in sizes):
        return g
    return torch.cat([g[r * peak: r * peak + n] for r, n in enumerate(sizes)])


class _GatherRows(torch.autograd.Function):
    """Forward: every rank's rows concatenated in rank order. Backward: every rank's gradient
    of the gathered rows summed onto their owner (a reduce-scatter of the padded gradient)."""

    @staticmethod
    def forward(ctx, x, sizes, me):
        ctx.sizes, ctx.me = sizes, me
        return _gather_padded(x, sizes)

    @staticmethod
    def backward(ctx, grad):
        sizes, peak = ctx.sizes, max(ctx.sizes)
        if peak == 0:
            return grad.new_zeros((0, *grad.shape[1:])), None, None
        if any(n != peak for n in sizes):
            parts, start = [], 0
            for n in sizes:
                parts.append(_pad_rows(grad[start:start + n], peak))
                start += n
            grad = torch.cat(parts)
        return _reduce_scatter_sum(grad)[: sizes[ctx.me]], None, None


def gather_rows(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """All ranks' x (rows as in `layout`) concatenated along dim 0 in rank order; differentiable
    (the backward sums every rank's gradient for this rank's rows), or a plain gather when x
    does not require grad."""
    if x.shape[0] != layout.sizes[layout.rank]:
        raise ValueError(f"gather_rows: x has {x.shape[0]} rows, the layout says {layout.sizes[layout.rank]}")
    if x.requires_grad and torch.is_grad_enabled():
        return _GatherRows.apply(x, layout.sizes, layout.rank)
    with torch.no_grad():
        return _gather_padded(x, layout.sizes)


def gather_with_grad(x: torch.Tensor, name: str = "input") -> torch.Tensor:
    """All ranks' `x` concatenated along dim 0 (rank order, any row counts); the backward sums
    every rank's gradient for this rank's rows."""
    return gather_rows(x, exchange_layout(x, name))


@torch.no_grad()
def gather_no_grad(x: torch.Tensor, name: str = "input") -> torch.Tensor:
    """All ranks' `x` concatenated along dim 0 (rank order, any row counts), detached."""
    return gather_rows(x.detach(), exchange_layout(x, name))


# ---------------------------------------------------------------------------------------
# Reductions of the local rows under the convention
# ---------------------------------------------------------------------------------------
def reduce_local_rows(per_row: torch.Tensor, reduction: str, global_count) -> torch.Tensor:
    """The loss from the local rows' ℓ (M,) — or, for "sum" / "mean", their sum (0-dim) —
    under the convention above. "none": the local ℓ unchanged; "sum" / "mean": the global value (all-reduced), with the gradient of W·Σ_local ℓ
    (divided by `global_count`, an int or a 0-dim tensor, for "mean")."""
    if reduction == "none":
        return per_row
    local = per_row.sum() * world_size()
    total = all_reduce_sum(per_row.sum())
    if reduction == "mean":
        count = torch.as_tensor(global_count, device=per_row.device).to(per_row.dtype).clamp_min(1)
        local, total = local / count, total / count
    return local + (total - local).detach()


# ---------------------------------------------------------------------------------------
# Self family
# ---------------------------------------------------------------------------------------
def sample_labels(layout: Layout, views: int, device) -> torch.Tensor:
    """Global sample index of every gathered row when each rank holds `views` view-major blocks
    of its samples: rank r's rows are views × n_r samples numbered from Σ_{q<r} n_q. (M_global,) int64."""
    parts, first = [], 0
    for rows in layout.sizes:
        n = rows // views
        parts.append((first + torch.arange(n, device=device)).repeat(views))
        first += n
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64, device=device)


def gathered_self_loss(z: torch.Tensor, labels: Optional[torch.Tensor], views: int, temperature, *,
                       name: str, normalize: bool, reduction: str, backend: str, return_stats: bool,
                       decoupled: bool = False):
    """The self family over the global batch. z: (views·n, D) local rows, view-major (views = 1
    with labels for supcon); labels: (rows,) int64 or None (the views of a sample are its
    positives). "none" returns the local rows' ℓ in the local layout."""
    from . import backends
    from .row_math import any_nonfinite, normalize_rows, poison, poison_gradient, row_loss
    from .self_family import _stats
    from ._validation import (REDUCTIONS, as_temperature, bad_scalar, check_flag, check_reduction,
                              refuse_unsupported_autograd)

    check_reduction(reduction)
    check_flag("normalize", normalize)
    check_flag("return_stats", return_stats)
    check_flag("decoupled", decoupled)
    require_process_group()
    tau = as_temperature(temperature, z)
    chosen = backends.resolve("self", backend, z.device, z.dtype)
    refuse_unsupported_autograd(chosen.name, z, tau)
    # What decides the collectives that follow must agree too (a mismatch would hang, not fail).
    layout = exchange_layout(z, name, views=views, labels=labels is not None, grad=z.requires_grad,
                             reduction=REDUCTIONS.index(reduction), stats=return_stats)
    u_dtype = chosen.operand_dtype("self", z.dtype)
    u = normalize_rows(z, u_dtype) if normalize else z.to(u_dtype)
    all_u = gather_rows(u, layout)
    if labels is not None:
        all_labels = gather_rows(labels, layout)
    else:
        all_labels = sample_labels(layout, views, z.device)
    # Every row is a column of every other: one non-finite entry on any rank reaches every output.
    bad = any_nonfinite(all_u) | bad_scalar(tau)
    all_u = poison_gradient(all_u, bad)
    start, stop, total = layout.start, layout.stop, layout.total
    if stop - start < total and backends.refusal(chosen.name, "self_rows", z.device, z.dtype) is None:
        ops = chosen.operators("self_rows")
        rows = ops.forward(all_u, tau, all_labels, 1, start, stop, decoupled, *ops.forward_extra(tau, return_stats))
    else:  # one rank (the symmetric single-process backward), or no local-rows operators: full batch
        rows = [x[start:stop] for x in chosen.operators("self").forward(all_u, tau, all_labels, 1, decoupled)]
    lse, pos_sum, pos_count, _, top1 = rows
    per_row, has_pos = row_loss(lse, pos_sum, pos_count)
    anchors = all_reduce_sum(has_pos.sum())
    loss = poison(reduce_local_rows(per_row, reduction, anchors), bad, tau)
    if return_stats:
        stats = _stats(all_u, tau, pos_sum, pos_count, top1, has_pos, loss, normalize, rows=slice(start, stop),
                       total=all_reduce_sum)
        return loss, {key: poison(v.to(loss.dtype), bad) if v.is_floating_point() else v for key, v in stats.items()}
    return loss
