"""The self-similarity family: NT-Xent (SimCLR), multi-view NT-Xent, SupCon (docs/maths.md §1).

One operator pair, implemented by every fused backend (fastntxent.backends):

    forward(u, temperature, labels, rows_per_view, decoupled) -> (lse, pos_sum, pos_count, expected_logit, top1)
        u (M, D) rows (normalised when asked), temperature 0-dim, labels (M,) int64 or None
        (then label(i) = i mod rows_per_view). Each output (M,) in the accumulation dtype:
        lse_i = log Σ_{j≠i} e^{s_ij} (decoupled: also j ∉ P(i)), pos_sum_i = Σ_{p∈P(i)} s_ip,
        pos_count_i = |P(i)|, expected_logit_i = Σ_j P_ij s_ij (for ∂/∂τ), top1_i = [the most
        similar other row is a positive].
    backward(u, temperature, labels, rows_per_view, lse, grad_lse, grad_pos, decoupled) -> grad_u (M, D)
        ∂L/∂u for L = Σ_i grad_lse_i·lse_i + grad_pos_i·pos_sum_i.

`register_operators` gives a backend's pair its fake (meta) kernels and autograd: one formula
for every backend, with ∂L/∂τ = −Σ_i (grad_lse_i·expected_logit_i + grad_pos_i·pos_sum_i)/τ.
The loss functions below validate, resolve the backend once, normalise, call the forward
operator and reduce.
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence, Union

import torch

from . import _extension, backends
from .health import CollapseWarning, health_stats
from .row_math import accumulation_dtype, any_nonfinite, normalize_rows, poison, poison_gradient, reduce_rows, row_loss
from ._validation import (Scalar, as_temperature, bad_scalar, check_embeddings, check_flag, check_labels,
                          check_pair, check_reduction, check_same_device, refuse_double_backward, refuse_unsupported_autograd)

__all__ = ["nt_xent", "multiview_nt_xent", "supcon", "self_similarity_loss", "register_operators",
           "register_rows_operators"]


# ---------------------------------------------------------------------------------------
# Operators: fake kernels and autograd, shared by every backend
# ---------------------------------------------------------------------------------------
def register_operators(forward_op, backward_op) -> None:
    """Fake kernels and autograd for a backend's self-family operator pair (op handles:
    a `torch.library.custom_op` or a C++ `OpOverload`)."""

    @torch.library.register_fake(forward_op)
    def _forward_fake(u, temperature, labels, rows_per_view, *outputs):
        rows = u.new_empty((u.shape[0],), dtype=accumulation_dtype(u.dtype))
        return tuple(torch.empty_like(rows) for _ in range(5))

    @torch.library.register_fake(backward_op)
    def _backward_fake(u, temperature, labels, rows_per_view, lse, grad_lse, grad_pos, decoupled=False):
        return torch.empty_like(u, memory_format=torch.contiguous_format)

    _register_autograd(forward_op, backward_op, 1)


def _register_autograd(forward_op, backward_op, n_ints: int) -> None:
    """The one autograd formula of the self family's operator pairs, whose inputs are
    (u, temperature, labels, *ints, decoupled[, outputs]) — n_ints ints: rows_per_view (and
    row_start, row_stop), the DCL flag, then the Triton forward's optional `outputs` mask; the
    backward takes (u, temperature, labels, *ints, lse, grad_lse, grad_pos, decoupled)."""

    def setup_context(ctx, inputs, output):
        u, temperature, labels = inputs[:3]
        ints = inputs[3:3 + n_ints]
        lse, pos_sum, _, expected_logit, _ = output
        ctx.save_for_backward(u, temperature, labels, lse, pos_sum, expected_logit)
        ctx.ints = ints
        ctx.decoupled = bool(inputs[3 + n_ints]) if len(inputs) > 3 + n_ints else False
        ctx.n_extra = len(inputs) - 3 - n_ints  # the flag and `outputs` mask (Triton): not differentiable

    def backward(ctx, grad_lse, grad_pos, _grad_count, _grad_expected, _grad_top1):
        refuse_double_backward()
        u, temperature, labels, lse, pos_sum, expected_logit = ctx.saved_tensors
        grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse
        grad_pos = torch.zeros_like(lse) if grad_pos is None else grad_pos
        grad_u = grad_t = None
        if ctx.needs_input_grad[0]:
            grad_u = backward_op(u, temperature, labels, *ctx.ints, lse, grad_lse, grad_pos, ctx.decoupled)
        if ctx.needs_input_grad[1]:
            grad_t = _temperature_grad(grad_lse, grad_pos, expected_logit, pos_sum, temperature)
        return (grad_u, grad_t, None, *(None for _ in ctx.ints)) + (None,) * ctx.n_extra

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)


def _temperature_grad(grad_lse, grad_pos, expected_logit, pos_sum, temperature):
    """∂L/∂τ = −Σ_i (grad_lse_i·expected_logit_i + grad_pos_i·pos_sum_i)/τ over the operator's rows."""
    return -((grad_lse * expected_logit + grad_pos * pos_sum).sum() / temperature).to(temperature.dtype)


def register_rows_operators(forward_op, backward_op) -> None:
    """Fake kernels and autograd for a backend's local-rows operator pair (docs/distributed.md):

    forward(u, temperature, labels, rows_per_view, row_start, row_stop, decoupled) -> the five
        statistics of rows [row_start, row_stop) of u (M, D) against all M columns, each (row_stop − row_start,);
    backward(u, temperature, labels, rows_per_view, row_start, row_stop, lse, grad_lse, grad_pos, decoupled)
        -> ∂L/∂u (M, D): the gradient of every row of u produced by the local rows' statistics.
    """

    @torch.library.register_fake(forward_op)
    def _forward_fake(u, temperature, labels, rows_per_view, row_start, row_stop, decoupled=False, *outputs):
        rows = u.new_empty((row_stop - row_start,), dtype=accumulation_dtype(u.dtype))
        return tuple(torch.empty_like(rows) for _ in range(5))

    @torch.library.register_fake(backward_op)
    def _backward_fake(u, temperature, labels, rows_per_view, row_start, row_stop, lse, grad_lse, grad_pos,
                       decoupled=False):
        return torch.empty_like(u, memory_format=torch.contiguous_format)

    _register_autograd(forward_op, backward_op, 3)


if _extension.has_cpu_kernels():
    register_operators(torch.ops.fastntxent.self_forward.default, torch.ops.fastntxent.self_backward.default)
if _extension.has_local_rows_kernels():
    register_rows_operators(torch.ops.fastntxent.self_forward_rows.default,
                            torch.ops.fastntxent.self_backward_rows.default)


# ---------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------
def _stats(u, tau, pos_sum, pos_count, top1, has_pos, loss, normalized: bool, rows: slice = slice(None),
           total=lambda x: x) -> dict:
    """Top-1 accuracy, mean positive / negative cosine and the health statistics
    (fastntxent.health), from the kernels' row outputs: O(M·D), tensors, no host sync.
    u: all M rows; the row outputs are those of u[rows] (the local rows of a distributed loss,
    whose sums `total` adds over the ranks)."""
    with torch.no_grad():
        acc = pos_sum.dtype
        u = u.to(acc)
        mine = u[rows]
        pos_cos = pos_sum * tau.detach()
        M = u.shape[0]
        others = max(M - 1, 1)
        row_cos = mine @ u.sum(0) - (mine * mine).sum(1)  # Σ_{j≠i} u_i·u_j, O(M·D)
        sums = total(torch.stack([has_pos.sum().to(acc), (top1 * has_pos).sum(), pos_cos.sum(), pos_count.sum(),
                                  row_cos.sum(), ((pos_count / others) * has_pos).sum()]))
        n_anchors, top1_sum, pos_cos_sum, pos_pairs, row_cos_sum, chance_sum = sums.unbind()
        anchors = n_anchors.clamp_min(1)
        neg_pairs = (M * (M - 1) - pos_pairs).clamp_min(1)
        positive_cosine = pos_cos_sum / pos_pairs.clamp_min(1)
        # Uniform similarities: lse_i = s + ln(M−1) and the positives' mean is s, so every
        # anchor's loss is ln(M−1); a random ranking's top-1 is |P(i)|/(M−1).
        chance = torch.full((), math.log(others), dtype=acc, device=u.device)
        return {
            "top1_accuracy": top1_sum / anchors,
            "positive_cosine": positive_cosine,
            "negative_cosine": (row_cos_sum - pos_cos_sum) / neg_pairs,
            "anchors": n_anchors.to(torch.int64),
            **health_stats(loss, chance, chance_sum / anchors, positive_cosine, u, normalized),
        }


def self_similarity_loss(
    z: torch.Tensor,
    labels: torch.Tensor | None,
    rows_per_view: int,
    temperature: Scalar,
    *,
    normalize: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
    return_stats: bool = False,
    decoupled: bool = False,
):
    """Core of the family. z: (M, D); labels: (M,) int64, or None for label(i) = i mod
    rows_per_view. Returns the loss (fp32; fp64 for fp64 inputs) or (loss, stats)."""
    check_reduction(reduction)
    check_flag("normalize", normalize)
    check_flag("return_stats", return_stats)
    check_flag("decoupled", decoupled)
    tau = as_temperature(temperature, z)
    chosen = backends.resolve("self", backend, z.device, z.dtype)
    refuse_unsupported_autograd(chosen.name, z, tau)
    # Every row is a column of every other: one non-finite entry reaches every output (and
    # under torch.compile a temperature <= 0 poisons the result, as the eager check refuses it).
    bad = any_nonfinite(z) | bad_scalar(tau)
    z = poison_gradient(z, bad)
    u_dtype = chosen.operand_dtype("self", z.dtype)
    u = normalize_rows(z, u_dtype) if normalize else z.to(u_dtype)
    ops = chosen.operators("self")
    lse, pos_sum, pos_count, _, top1 = ops.forward(u, tau, labels, rows_per_view, decoupled,
                                                   *ops.forward_extra(tau, return_stats))
    per_row, has_pos = row_loss(lse, pos_sum, pos_count)
    loss = poison(reduce_rows(per_row, has_pos, reduction), bad, tau)
    if return_stats:
        stats = _stats(u, tau, pos_sum, pos_count, top1, has_pos, loss, normalize)
        return loss, {key: poison(v.to(loss.dtype), bad) if v.is_floating_point() else v for key, v in stats.items()}
    return loss


def _warn_if_same_views(z1: torch.Tensor, z2: torch.Tensor) -> None:
    """The two views are one tensor (no augmentation between them): the task is trivial."""
    if torch.compiler.is_compiling() or z1.numel() == 0:
        return
    if z1 is not z2 and any(torch._C._functorch.is_functorch_wrapped_tensor(t) or t.device.type == "meta"
                            for t in (z1, z2)):
        return  # no storage to compare (torch.func transforms, meta tensors)
    if z1 is z2 or (z1.data_ptr() == z2.data_ptr() and z1.stride() == z2.stride() and z1.shape == z2.shape):
        warnings.warn("nt_xent: z1 and z2 are the same tensor, so every positive pair is an embedding "
                      "with itself and the task is trivial (the loss falls to ~0 and nothing is learned). "
                      "Pass the embeddings of two different augmentations of each sample.",
                      CollapseWarning, stacklevel=3)


def nt_xent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: Scalar = 0.5,
    *,
    normalize: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
    return_stats: bool = False,
    gather: bool = False,
    decoupled: bool = False,
):
    """SimCLR's NT-Xent. z1, z2: (N, D) two views; row i of z1 and row i of z2 are positives.

    The loss averages over the 2N anchors of cat(z1, z2); `reduction="none"` returns (2N,).
    `gather=True`: loss of all ranks' rows (torch.distributed; any row counts, 0 included): the
    global z1 / z2 are the concatenations in rank order; "none" returns the local (2N,). See
    fastntxent.distributed and docs/distributed.md. `decoupled=True`: DCL (Yeh et al. 2022), the
    positive left out of each anchor's denominator (lightly's DCLLoss).
    """
    check_pair("z1", z1, "z2", z2, allow_no_rows=check_flag("gather", gather))
    _warn_if_same_views(z1, z2)
    z = torch.cat([z1, z2], dim=0)
    if gather:
        from .distributed import gathered_self_loss

        return gathered_self_loss(z, None, 2, temperature, name="z1, z2", normalize=normalize, reduction=reduction,
                                  backend=backend, return_stats=return_stats, decoupled=decoupled)
    return self_similarity_loss(
        z, None, z1.shape[0], temperature, normalize=normalize, reduction=reduction,
        backend=backend, return_stats=return_stats, decoupled=decoupled,
    )


def multiview_nt_xent(
    views: Union[torch.Tensor, Sequence[torch.Tensor]],
    temperature: Scalar = 0.5,
    *,
    normalize: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
    return_stats: bool = False,
    gather: bool = False,
    decoupled: bool = False,
):
    """Multi-view NT-Xent. views: (V, N, D) or a list of V tensors (N, D); the positives of a
    row are the other V−1 views of its sample. Loss over V·N anchors (view-major).
    `gather=True`: loss of all ranks' samples (torch.distributed; any N, 0 included), see
    fastntxent.distributed; "none" returns the local (V·N,). `decoupled=True`: the V−1
    positives left out of each denominator (DCL)."""
    check_flag("gather", gather)
    if isinstance(views, (list, tuple)):
        if len(views) == 0:
            raise ValueError("views must hold at least one view")
        for i, v in enumerate(views):
            check_embeddings(f"views[{i}]", v, allow_no_rows=gather)
            if v.shape != views[0].shape:
                raise ValueError(f"views[{i}] has shape {tuple(v.shape)}, views[0] has {tuple(views[0].shape)}")
            if v.dtype != views[0].dtype:
                raise TypeError(f"views[{i}] has dtype {v.dtype}, views[0] has {views[0].dtype}")
        check_same_device(**{f"views[{i}]": v for i, v in enumerate(views)})
        views = torch.stack(list(views))
    else:
        check_embeddings("views", views, ndim=3, allow_no_rows=gather)
    n_views, rows_per_view, dim = views.shape
    if gather:
        from .distributed import gathered_self_loss

        return gathered_self_loss(views.reshape(n_views * rows_per_view, dim), None, n_views, temperature,
                                  name="views", normalize=normalize, reduction=reduction, backend=backend,
                                  return_stats=return_stats, decoupled=decoupled)
    return self_similarity_loss(
        views.reshape(n_views * rows_per_view, dim), None, rows_per_view, temperature, normalize=normalize,
        reduction=reduction, backend=backend, return_stats=return_stats, decoupled=decoupled,
    )


def supcon(
    z: torch.Tensor,
    labels: torch.Tensor,
    temperature: Scalar = 0.1,
    *,
    normalize: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
    return_stats: bool = False,
    gather: bool = False,
    decoupled: bool = False,
):
    """Supervised contrastive loss (Khosla et al., L_out). z: (M, D), labels: (M,) integer.

    Anchors without a positive contribute 0 and are left out of the mean.
    `gather=True`: loss of all ranks' rows and labels (torch.distributed; any row counts, 0
    included), see fastntxent.distributed; "none" returns the local (M,). `decoupled=True`: the
    positives left out of each denominator (DCL; an anchor whose every other row is a positive
    has no negative and a loss of −inf).
    """
    check_embeddings("z", z, allow_no_rows=check_flag("gather", gather))
    labels = check_labels(labels, z.shape[0], z.device)
    if gather:
        from .distributed import gathered_self_loss

        return gathered_self_loss(z, labels, 1, temperature, name="z", normalize=normalize, reduction=reduction,
                                  backend=backend, return_stats=return_stats, decoupled=decoupled)
    return self_similarity_loss(
        z, labels, 1, temperature, normalize=normalize, reduction=reduction,
        backend=backend, return_stats=return_stats, decoupled=decoupled,
    )
