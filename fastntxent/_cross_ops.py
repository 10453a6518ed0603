"""Fake kernels and autograd of the cross-similarity operators (SPEC §2), shared by backends.

A backend provides two operators with the schema of csrc/ops.cpp:
  <forward>(q, k, queue, scale, pos_offset, in_batch) -> (lse, pos, ps_sum, top1)
  <backward>(q, k, queue, scale, pos_offset, in_batch, lse, grad_lse, grad_pos, need_grad_k)
      -> (grad_q, grad_k)
`register_cross_ops` gives the pair fake (meta) kernels and a backward formula. For any
L = Σ_i a_i·lse_i + b_i·pos_i the backward operator returns ∂L/∂q and ∂L/∂k (the queue gets
no gradient), and since every logit is scale·(cosine), ∂L/∂scale = Σ_i (a_i·ps_sum_i +
b_i·pos_i) / scale.

A Triton (or CUDA) backend of the cross family registers its own pair the same way and adds
its name to `fastntxent.cross._FUSED_CROSS` / `cross_ops`.
"""
from __future__ import annotations

import torch

from ._ops import accumulation_dtype


def register_cross_ops(forward_qualname: str, backward_qualname: str) -> None:
    namespace, _ = forward_qualname.split("::")
    backward_name = backward_qualname.split("::")[1]
    backward_op = getattr(getattr(torch.ops, namespace), backward_name)

    @torch.library.register_fake(forward_qualname)
    def _forward_fake(q, k, queue, scale, pos_offset, in_batch):
        rows = q.new_empty((q.shape[0],), dtype=accumulation_dtype(q.dtype))
        return tuple(torch.empty_like(rows) for _ in range(4))

    @torch.library.register_fake(backward_qualname)
    def _backward_fake(q, k, queue, scale, pos_offset, in_batch, lse, grad_lse, grad_pos, need_grad_k):
        return (torch.empty_like(q, memory_format=torch.contiguous_format),
                torch.empty_like(k, memory_format=torch.contiguous_format))

    def setup_context(ctx, inputs, output):
        q, k, queue, scale, pos_offset, in_batch = inputs
        lse, pos, ps_sum, _ = output
        ctx.save_for_backward(q, k, queue, scale, lse, pos, ps_sum)
        ctx.pos_offset = pos_offset
        ctx.in_batch = in_batch

    def backward(ctx, grad_lse, grad_pos, _grad_ps, _grad_top1):
        q, k, queue, scale, lse, pos, ps_sum = ctx.saved_tensors
        grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse
        grad_pos = torch.zeros_like(lse) if grad_pos is None else grad_pos
        grad_q = grad_k = grad_s = None
        need_q, need_k = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if need_q or need_k:
            gq, gk = backward_op(q, k, queue, scale, ctx.pos_offset, ctx.in_batch, lse, grad_lse, grad_pos, need_k)
            grad_q = gq if need_q else None
            grad_k = gk if need_k else None
        if ctx.needs_input_grad[3]:
            grad_s = ((grad_lse * ps_sum + grad_pos * pos).sum() / scale).to(scale.dtype)
        return grad_q, grad_k, None, grad_s, None, None

    torch.library.register_autograd(forward_qualname, backward, setup_context=setup_context)
