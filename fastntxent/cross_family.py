"""The cross-similarity family: MoCo InfoNCE (with a queue or in-batch) and CLIP (docs/maths.md §2).

One operator pair, implemented by the fused backends (fastntxent.backends):

    forward(q, k, queue, scale, pos_offset, keys_are_negatives, decoupled) -> (lse, pos, expected_logit, top1)
        rows q (M, D) against keys k (N, D) and an optional queue (K, D) of extra negatives;
        logits s_ic = scale · (q_i · c); the positive of row i is k_{i+pos_offset}. The columns
        of row i are every key and the queue when `keys_are_negatives`, else its positive key
        and the queue (MoCo v2). Each output (M,) in the accumulation dtype: lse_i = log Σ_c e^{s_ic},
        pos_i = s_i,pos, expected_logit_i = Σ_c P_ic s_ic, top1_i = [the largest logit is the positive].
        CLIP's column logsumexps are the same operator with the towers swapped. `decoupled` (DCL):
        the positive left out of the logsumexp and of P (−inf for a row without a negative).
    backward(q, k, queue, scale, pos_offset, keys_are_negatives, lse, grad_lse, grad_pos, need_grad_k, decoupled)
        -> (∂L/∂q, ∂L/∂k) for L = Σ_i grad_lse_i·lse_i + grad_pos_i·pos_i (grad_k zeros when not
        needed); the queue gets no gradient.

`register_operators` gives a backend's pair its fake kernels and autograd; since every logit is
scale·cosine, ∂L/∂scale = Σ_i (grad_lse_i·expected_logit_i + grad_pos_i·pos_i) / scale.
With `gather=True` the keys are gathered over torch.distributed (fastntxent.distributed).
"""
from __future__ import annotations

import math

import torch

from . import _extension, backends
from .health import health_stats
from . import distributed as _dist
from .row_math import accumulation_dtype, any_nonfinite, normalize_rows, poison, poison_gradient, reduce_rows
from ._validation import (Scalar, as_temperature, bad_scalar, check_embeddings, check_flag, check_pair, check_reduction,
                          check_same_device, refuse_double_backward, refuse_unsupported_autograd)

__all__ = ["info_nce", "clip_loss", "register_operators"]


# ---------------------------------------------------------------------------------------
# Operators: fake kernels and autograd, shared by every backend
# ---------------------------------------------------------------------------------------
def register_operators(forward_op, backward_op) -> None:
    """Fake kernels and autograd for a backend's cross-family operator pair (op handles:
    a `torch.library.custom_op` or a C++ `OpOverload`)."""

    @torch.library.register_fake(forward_op)
    def _forward_fake(q, k, queue, scale, pos_offset, keys_are_negatives, *outputs):
        rows = q.new_empty((q.shape[0],), dtype=accumulation_dtype(q.dtype))
        return tuple(torch.empty_like(rows) for _ in range(4))

    @torch.library.register_fake(backward_op)
    def _backward_fake(q, k, queue, scale, pos_offset, keys_are_negatives, lse, grad_lse, grad_pos, need_grad_k,
                       decoupled=False):
        return (torch.empty_like(q, memory_format=torch.contiguous_format),
                torch.empty_like(k, memory_format=torch.contiguous_format))

    def setup_context(ctx, inputs, output):
        # (the DCL flag, then a trailing `outputs` mask of the Triton operator: not differentiable)
        q, k, queue, scale, pos_offset, keys_are_negatives = inputs[:6]
        ctx.decoupled = bool(inputs[6]) if len(inputs) > 6 else False
        ctx.n_extra = len(inputs) - 6
        lse, pos, expected_logit, _ = output
        ctx.save_for_backward(q, k, queue, scale, lse, pos, expected_logit)
        ctx.pos_offset = pos_offset
        ctx.keys_are_negatives = keys_are_negatives

    def backward(ctx, grad_lse, grad_pos, _grad_expected, _grad_top1):
        refuse_double_backward()
        q, k, queue, scale, lse, pos, expected_logit = ctx.saved_tensors
        grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse
        grad_pos = torch.zeros_like(lse) if grad_pos is None else grad_pos
        grad_q = grad_k = grad_s = None
        need_q, need_k = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if need_q or need_k:
            gq, gk = backward_op(q, k, queue, scale, ctx.pos_offset, ctx.keys_are_negatives, lse, grad_lse, grad_pos,
                                 need_k, ctx.decoupled)
            grad_q = gq if need_q else None
            grad_k = gk if need_k else None
        if ctx.needs_input_grad[3]:
            grad_s = ((grad_lse * expected_logit + grad_pos * pos).sum() / scale).to(scale.dtype)
        return (grad_q, grad_k, None, grad_s, None, None) + (None,) * ctx.n_extra

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)


if _extension.has_cross_kernels():
    register_operators(torch.ops.fastntxent.cross_forward.default, torch.ops.fastntxent.cross_backward.default)


# ---------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------
def _rows(x: torch.Tensor, dtype: torch.dtype, normalize: bool) -> torch.Tensor:
    return normalize_rows(x, dtype) if normalize else x.to(dtype)


@torch.no_grad()
def _sum_stats(gather: bool, **sums: torch.Tensor) -> dict:
    if gather:
        return {key: _dist.all_reduce_sum(v) for key, v in sums.items()}
    return sums


def info_nce(
    q: torch.Tensor,
    k: torch.Tensor,
    queue: torch.Tensor | None = None,
    temperature: Scalar = 0.2,
    *,
    normalize: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
    gather: bool = False,
    return_stats: bool = False,
    decoupled: bool = False,
):
    """InfoNCE of queries q (M, D) against keys k (M, D); the positive of q_i is k_i.

    queue None (MoCo v3 / in-batch): logits = q kᵀ / τ, target i.
    queue (K, D) (MoCo v2): logits_i = [q_i·k_i, q_i·queue] / τ, target 0; the negatives are
    the queue only and the queue gets no gradient (it is detached; with normalize=True it is
    normalised too, which leaves MoCo's already-normalised keys unchanged). Its dtype may
    differ from q's.
    Returns the mean over the M queries (reduction "sum" / "none" as in nt_xent).
    gather=True (torch.distributed): without a queue the keys of all ranks are the negatives;
    the value is the loss over all ranks' queries (see fastntxent.distributed).
    decoupled=True (DCL): the positive left out of each denominator (−inf for a query without
    a negative: one key and no queue).
    """
    check_pair("q", q, "k", k, allow_no_rows=check_flag("gather", gather))
    if queue is not None:
        if not isinstance(queue, torch.Tensor):
            raise TypeError(f"queue must be a torch.Tensor or None, got {type(queue).__name__}")
        if queue.dim() != 2 or queue.shape[1] != q.shape[1]:
            raise ValueError(f"queue must have shape (K, D) with D = {q.shape[1]} (from q), got {tuple(queue.shape)}")
        check_embeddings("queue", queue)
        check_same_device(q=q, queue=queue)
    check_reduction(reduction)
    for name, flag in (("normalize", normalize), ("gather", gather), ("return_stats", return_stats),
                       ("decoupled", decoupled)):
        check_flag(name, flag)
    tau = as_temperature(temperature, q)
    chosen = backends.resolve("cross", backend, q.device, q.dtype)
    ops = chosen.operators("cross")
    layout = None
    if gather:  # every rank's layout, checked before any other collective (a mismatch: ValueError everywhere)
        layout = _dist.exchange_layout(q, "q, k", queue=queue is not None, grad_k=k.requires_grad,
                                       reduction=("mean", "sum", "none").index(reduction), stats=return_stats)
    # Poisoned as a whole: a non-finite key or queue row is a column of every query.
    refuse_unsupported_autograd(chosen.name, q, k, queue, tau)
    bad = any_nonfinite(q, k, queue) | bad_scalar(tau)
    q, k = poison_gradient(q, bad), poison_gradient(k, bad)
    u_dtype = chosen.operand_dtype("cross", q.dtype)
    uq = _rows(q, u_dtype, normalize)
    uk = _rows(k, u_dtype, normalize)
    uqueue = None
    if queue is not None:
        with torch.no_grad():
            uqueue = _rows(queue.detach(), u_dtype, normalize)
            if not normalize:
                # The operator saves it for backward: a copy (normalising makes one anyway),
                # so that enqueueing into the caller's buffer before backward (MoCo's order)
                # changes nothing here. O(K·D), against the loss's O(M·K·D).
                uqueue = uqueue.clone()
    keys_are_negatives = queue is None
    M = q.shape[0]
    keys, offset, global_rows = uk, 0, M
    if gather:
        global_rows = layout.total
        if keys_are_negatives:
            keys, offset = _dist.gather_rows(uk, layout), layout.start
        bad = _dist.all_reduce_sum(bad.to(torch.int32)) > 0  # a bad query or key on any rank poisons all
    scale = 1.0 / tau
    lse, pos, _, top1 = ops.forward(uq, keys, uqueue, scale, offset, keys_are_negatives, decoupled,
                                    *ops.forward_extra(scale, return_stats))
    per_row = lse - pos
    if gather:
        loss = _dist.reduce_local_rows(per_row, reduction, global_rows)
    else:
        loss = reduce_rows(per_row, torch.ones_like(per_row, dtype=torch.bool), reduction)
    loss = poison(loss, bad, tau)
    if not return_stats:
        return loss
    with torch.no_grad():
        acc = per_row.dtype
        pos_cos = pos * tau.detach()
        cols = uqueue if uqueue is not None else keys
        neg = (uq.to(acc).sum(0) @ cols.to(acc).sum(0))  # Σ_i Σ_c q_i·c, O((M + K)·D)
        if keys_are_negatives:
            neg = neg - pos_cos.sum()
        neg_pairs = M * (cols.shape[0] - (1 if keys_are_negatives else 0))
        sums = _sum_stats(gather, top1=top1.sum(), pos=pos_cos.sum(), neg=neg,
                          neg_pairs=torch.full((), float(neg_pairs), dtype=acc, device=q.device))
        n_cols = (keys.shape[0] if keys_are_negatives else 1) + (0 if uqueue is None else uqueue.shape[0])
        positive_cosine = sums["pos"] / global_rows
        stats = {
            "top1_accuracy": sums["top1"] / global_rows,
            "positive_cosine": positive_cosine,
            "negative_cosine": sums["neg"] / sums["neg_pairs"].clamp_min(1),
            # Uniform logits: every query's loss is ln(columns), a random ranking's top-1 1/columns.
            **health_stats(loss, torch.full((), math.log(n_cols), dtype=acc, device=q.device),
                           torch.full((), 1.0 / n_cols, dtype=acc, device=q.device), positive_cosine,
                           uq, normalize),
        }
    return loss, {key: poison(v, bad) for key, v in stats.items()}


def clip_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    logit_scale: Scalar,
    *,
    normalize: bool = True,
    backend: str = "auto",
    gather: bool = False,
    return_stats: bool = False,
    decoupled: bool = False,
):
    """Symmetric CLIP loss ½ (CE(a bᵀ·s, arange) + CE(b aᵀ·s, arange)) of two towers a, b (M, D).

    logit_scale s: a float or 0-dim tensor (may require grad, e.g. `log_scale.exp()`), > 0.
    gather=True (torch.distributed): both towers of all ranks are the negatives; the value is
    the loss over the global batch (see fastntxent.distributed).
    decoupled=True (DCL): the matching pair left out of both softmaxes' denominators.
    """
    check_pair("a", a, "b", b, allow_no_rows=check_flag("gather", gather))
    for name, flag in (("normalize", normalize), ("gather", gather), ("return_stats", return_stats),
                       ("decoupled", decoupled)):
        check_flag(name, flag)
    scale = as_temperature(logit_scale, a, name="logit_scale")
    chosen = backends.resolve("cross", backend, a.device, a.dtype)
    ops = chosen.operators("cross")
    extra = ops.forward_extra(scale, return_stats)
    layout = None
    if gather:
        layout = _dist.exchange_layout(a, "a, b", grad=a.requires_grad + 2 * b.requires_grad, stats=return_stats)
    refuse_unsupported_autograd(chosen.name, a, b, scale)
    bad = any_nonfinite(a, b) | bad_scalar(scale)
    a, b = poison_gradient(a, bad), poison_gradient(b, bad)
    u_dtype = chosen.operand_dtype("cross", a.dtype)
    ua = _rows(a, u_dtype, normalize)
    ub = _rows(b, u_dtype, normalize)
    M = a.shape[0]
    all_a, all_b, offset, global_rows = ua, ub, 0, M
    if gather:
        all_a, all_b = _dist.gather_rows(ua, layout), _dist.gather_rows(ub, layout)
        offset, global_rows = layout.start, layout.total
        bad = bad | any_nonfinite(all_a, all_b)
    lse_ab, pos_ab, _, top1_ab = ops.forward(ua, all_b, None, scale, offset, True, decoupled, *extra)  # rows: a → b
    lse_ba, pos_ba, _, top1_ba = ops.forward(ub, all_a, None, scale, offset, True, decoupled, *extra)  # b → a
    per_row = 0.5 * ((lse_ab - pos_ab) + (lse_ba - pos_ba))
    if gather:
        loss = _dist.reduce_local_rows(per_row, "mean", global_rows)
    else:
        loss = per_row.mean()
    loss = poison(loss, bad, scale)
    if not return_stats:
        return loss
    with torch.no_grad():
        sums = _sum_stats(gather, ab=top1_ab.sum(), ba=top1_ba.sum(), pos=(pos_ab / scale.detach()).sum())
        stats = {
            "top1_accuracy": (sums["ab"] + sums["ba"]) / (2 * global_rows),
            "top1_a_to_b": sums["ab"] / global_rows,
            "top1_b_to_a": sums["ba"] / global_rows,
            "positive_cosine": sums["pos"] / global_rows,
            "logit_scale": scale.detach(),
            **health_stats(loss, torch.full((), math.log(global_rows), dtype=loss.dtype, device=a.device),
                           torch.full((), 1.0 / global_rows, dtype=loss.dtype, device=a.device),
                           sums["pos"] / global_rows, (all_a, all_b), normalize),
        }
    return loss, {key: poison(v, bad) for key, v in stats.items()}
