"""Fake kernels and autograd of the self-similarity operators, shared by every backend.

A backend provides two operators with the schema of csrc/ops.cpp:
  <forward>(u, temperature, labels, period) -> (lse, pos_sum, pos_count, ps_sum, top1)
  <backward>(u, temperature, labels, period, lse, grad_lse, grad_pos) -> grad_u
`register_self_ops` gives the pair fake (meta) kernels and a backward formula, so each
backend is usable under autograd and torch.compile. The autograd is general: for any
L = Σ_i a_i·lse_i + b_i·pos_sum_i the backward operator returns ∂L/∂u, and
∂L/∂τ = −Σ_i (a_i·ps_sum_i + b_i·pos_sum_i) / τ (SPEC §1).
"""
from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def register_self_ops(forward_qualname: str, backward_qualname: str) -> None:
    namespace, forward_name = forward_qualname.split("::")
    backward_name = backward_qualname.split("::")[1]
    backward_op = getattr(getattr(torch.ops, namespace), backward_name)

    @torch.library.register_fake(forward_qualname)
    def _forward_fake(u, temperature, labels, period):
        rows = u.new_empty((u.shape[0],), dtype=accumulation_dtype(u.dtype))
        return tuple(torch.empty_like(rows) for _ in range(5))

    @torch.library.register_fake(backward_qualname)
    def _backward_fake(u, temperature, labels, period, lse, grad_lse, grad_pos):
        return torch.empty_like(u, memory_format=torch.contiguous_format)

    def setup_context(ctx, inputs, output):
        u, temperature, labels, period = inputs
        lse, pos_sum, _, ps_sum, _ = output
        ctx.save_for_backward(u, temperature, labels, lse, pos_sum, ps_sum)
        ctx.period = period

    def backward(ctx, grad_lse, grad_pos, _grad_count, _grad_ps, _grad_top1):
        u, temperature, labels, lse, pos_sum, ps_sum = ctx.saved_tensors
        grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse
        grad_pos = torch.zeros_like(lse) if grad_pos is None else grad_pos
        grad_u = grad_t = None
        if ctx.needs_input_grad[0]:
            grad_u = backward_op(u, temperature, labels, ctx.period, lse, grad_lse, grad_pos)
        if ctx.needs_input_grad[1]:
            grad_t = -((grad_lse * ps_sum + grad_pos * pos_sum).sum() / temperature).to(temperature.dtype)
        return grad_u, grad_t, None, None

    torch.library.register_autograd(forward_qualname, backward, setup_context=setup_context)
