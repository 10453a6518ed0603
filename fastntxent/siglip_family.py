"""SigLIP's pairwise sigmoid loss (Zhai et al. 2023; docs/maths.md §7): operator docs, fake
kernels and autograd (register_operators, register_loss_and_grad), and the loss function.

One operator pair, implemented by the fused backends (fastntxent.backends):

    forward(x, y, scale, bias, pos_offset) -> (loss, dlogit_sum, dlogit_cos)
        images x (M, D) against texts y (N, D); logits ℓ_ij = scale·(x_i·y_j) + bias, the positive
        of row i at column i + pos_offset, z_ij = +1 there and −1 elsewhere; with
        g_ij = −z_ij σ(−z_ij ℓ_ij), each output (M,) in the accumulation dtype:
        loss_i = Σ_j −log σ(z_ij ℓ_ij), dlogit_sum_i = Σ_j g_ij, dlogit_cos_i = Σ_j g_ij x_i·y_j.
    backward(x, y, scale, bias, pos_offset, grad_loss, need_grad_y) -> (∂L/∂x, ∂L/∂y)
        for L = Σ_i grad_loss_i·loss_i (grad_y zeros when not needed).

`register_operators` gives a backend's pair its fake kernels and autograd; the scalars'
gradients come from the forward's row sums: ∂L/∂scale = Σ_i grad_loss_i·dlogit_cos_i,
∂L/∂bias = Σ_i grad_loss_i·dlogit_sum_i.

And, on the CPU backend, one operator for "mean" / "sum" when a gradient will be needed:

    loss_and_grad(x, y, scale, bias, pos_offset, need_grad_x, need_grad_y)
        -> (L, ∂L/∂x, ∂L/∂y, ∂L/∂scale, ∂L/∂bias)
        L = Σ_i loss_i (0-dim) and its gradients ((M, D), (N, D), 0-dim, 0-dim; all in the
        accumulation dtype; a tower's zeros when not needed), from the forward's one sweep over
        the tiles (3 matrix products per tile instead of the pair's 1 + 3). Every row has the
        same weight in "mean" / "sum", so the backward (`register_loss_and_grad`) only multiplies
        the saved gradients by the incoming scalar gradient. "none" (per-row weights known only
        in the backward) and inference (no gradient wanted) use the pair.

With `gather=True` the texts are gathered over torch.distributed (fastntxent.distributed) and
each rank computes its local image rows.
"""
from __future__ import annotations

import math

import torch

from . import _extension, backends
from . import distributed as _dist
from .row_math import accumulation_dtype, any_nonfinite, normalize_rows, poison, poison_gradient
from ._validation import (Scalar, _compiling, as_temperature, bad_scalar, check_flag, check_pair, check_reduction,
                          refuse_double_backward, refuse_unsupported_autograd)

__all__ = ["siglip_loss", "register_operators", "register_loss_and_grad"]


def register_operators(forward_op, backward_op) -> None:
    """Fake kernels and autograd for a backend's SigLIP operator pair (op handles: a
    `torch.library.custom_op` or a C++ `OpOverload`)."""

    @torch.library.register_fake(forward_op)
    def _forward_fake(x, y, scale, bias, pos_offset):
        rows = x.new_empty((x.shape[0],), dtype=accumulation_dtype(x.dtype))
        return tuple(torch.empty_like(rows) for _ in range(3))

    @torch.library.register_fake(backward_op)
    def _backward_fake(x, y, scale, bias, pos_offset, grad_loss, need_grad_y):
        return (torch.empty_like(x, memory_format=torch.contiguous_format),
                torch.empty_like(y, memory_format=torch.contiguous_format))

    def setup_context(ctx, inputs, output):
        x, y, scale, bias, pos_offset = inputs
        _, dlogit_sum, dlogit_cos = output
        ctx.save_for_backward(x, y, scale, bias, dlogit_sum, dlogit_cos)
        ctx.pos_offset = pos_offset

    def backward(ctx, grad_loss, _grad_sum, _grad_cos):
        refuse_double_backward()
        x, y, scale, bias, dlogit_sum, dlogit_cos = ctx.saved_tensors
        grad_loss = torch.zeros_like(dlogit_sum) if grad_loss is None else grad_loss
        grad_x = grad_y = grad_t = grad_b = None
        need_x, need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if need_x or need_y:
            gx, gy = backward_op(x, y, scale, bias, ctx.pos_offset, grad_loss, need_y)
            grad_x = gx if need_x else None
            grad_y = gy if need_y else None
        if ctx.needs_input_grad[2]:
            grad_t = (grad_loss * dlogit_cos).sum().to(scale.dtype)
        if ctx.needs_input_grad[3]:
            grad_b = (grad_loss * dlogit_sum).sum().to(bias.dtype)
        return grad_x, grad_y, grad_t, grad_b, None

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)


def register_loss_and_grad(op) -> None:
    """Fake kernel and autograd of a backend's loss_and_grad operator: the backward scales the
    gradients the forward saved by the incoming gradient of L (a 0-dim tensor; NaN gives NaN)."""

    @torch.library.register_fake(op)
    def _fake(x, y, scale, bias, pos_offset, need_grad_x, need_grad_y):
        acc = accumulation_dtype(x.dtype)
        loss = x.new_empty((), dtype=acc)
        return (loss, x.new_empty(x.shape, dtype=acc), y.new_empty(y.shape, dtype=acc), torch.empty_like(loss),
                torch.empty_like(loss))

    def setup_context(ctx, inputs, output):
        x, y, scale, bias, _, need_grad_x, need_grad_y = inputs
        _, *grads = output
        ctx.mark_non_differentiable(*grads)
        ctx.set_materialize_grads(False)  # no (M, D) zeros for the gradient outputs' incoming gradients
        ctx.save_for_backward(*grads)
        ctx.dtypes = (x.dtype, y.dtype, scale.dtype, bias.dtype)
        ctx.computed = (need_grad_x, need_grad_y, True, True)

    def backward(ctx, grad_loss, *_):
        refuse_double_backward()
        if grad_loss is None:
            return (None,) * 7
        out = []
        for needed, computed, saved, dtype in zip(ctx.needs_input_grad, ctx.computed, ctx.saved_tensors, ctx.dtypes):
            if needed and not computed:
                raise RuntimeError("fastntxent: siglip_loss_and_grad was called with need_grad_x / need_grad_y "
                                   "False for an input that requires grad")
            out.append((grad_loss * saved).to(dtype) if needed else None)
        return (*out, None, None, None)

    torch.library.register_autograd(op, backward, setup_context=setup_context)


if _extension.has_siglip_kernels():
    register_operators(torch.ops.fastntxent.siglip_forward.default, torch.ops.fastntxent.siglip_backward.default)
if _extension.has_siglip_loss_and_grad():
    register_loss_and_grad(torch.ops.fastntxent.siglip_loss_and_grad.default)


def as_bias(bias: Scalar, like: torch.Tensor) -> torch.Tensor:
    """The logit bias as a 0-dim tensor in the accumulation dtype of `like`, keeping autograd:
    a finite float (ValueError otherwise) or a one-element floating tensor (a non-finite value
    makes the loss NaN)."""
    acc = accumulation_dtype(like.dtype)
    if isinstance(bias, bool) or not isinstance(bias, (float, int, torch.Tensor)):
        raise TypeError(f"logit_bias must be a float or a 0-dim tensor, got {type(bias).__name__}")
    if isinstance(bias, torch.Tensor):
        if bias.numel() != 1 or bias.dim() > 1:
            raise ValueError(f"logit_bias must be a scalar (0-dim) tensor, got shape {tuple(bias.shape)}")
        if not bias.dtype.is_floating_point:
            raise TypeError(f"logit_bias must be a floating tensor, got dtype {bias.dtype}")
        if bias.device != like.device and bias.device.type != "cpu":
            raise ValueError(f"logit_bias is on {bias.device} but the embeddings are on {like.device}")
        return bias.reshape(()).to(device=like.device, dtype=acc)
    if _compiling():
        return torch.ones((), dtype=acc, device=like.device) * bias
    value = float(bias)
    if not math.isfinite(value) or abs(value) > torch.finfo(acc).max:
        raise ValueError(f"logit_bias must be finite, got {value}")
    return torch.full((), value, dtype=acc, device=like.device)


def siglip_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    logit_scale: Scalar,
    logit_bias: Scalar,
    *,
    normalize: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
    gather: bool = False,
) -> torch.Tensor:
    """SigLIP's sigmoid loss of image rows img (B, D) against text rows txt (B, D).

    Logits ℓ_ij = t·⟨x_i, y_j⟩ + b (x, y the rows, L2-normalised when `normalize`), labels
    +1 on the diagonal and −1 elsewhere; per image row ℓ_i = Σ_j −log σ(z_ij ℓ_ij), reduced by
    the mean over the B rows (open_clip's SigLipLoss), "sum", or "none" (the (B,) rows).
    logit_scale t: a float or 0-dim tensor > 0 (the scale itself, e.g. `log_t.exp()`);
    logit_bias b: a finite float or 0-dim tensor; both may require grad.
    gather=True (torch.distributed): each rank's image rows against every rank's texts, the
    positive at the rank's offset (ranks may hold different row counts); the value is the loss
    of the global batch and the gradients follow fastntxent.distributed's convention. No B×B tensor is stored by the
    fused backends; float64 inputs are computed in float64, others in float32.
    """
    check_pair("img", img, "txt", txt, allow_no_rows=check_flag("gather", gather))
    check_reduction(reduction)
    check_flag("normalize", normalize)
    scale = as_temperature(logit_scale, img, name="logit_scale")
    bias = as_bias(logit_bias, img)
    chosen = backends.resolve("siglip", backend, img.device, img.dtype)
    ops = chosen.operators("siglip")
    layout = _dist.exchange_layout(img, "img, txt", grad=txt.requires_grad) if gather else None
    refuse_unsupported_autograd(chosen.name, img, txt, scale, bias)
    bad = any_nonfinite(img, txt) | bad_scalar(scale) | ~torch.isfinite(bias)
    img, txt = poison_gradient(img, bad), poison_gradient(txt, bad)
    u_dtype = chosen.operand_dtype("siglip", img.dtype)
    ux = normalize_rows(img, u_dtype) if normalize else img.to(u_dtype)
    uy = normalize_rows(txt, u_dtype) if normalize else txt.to(u_dtype)
    M = img.shape[0]
    cols, offset, global_rows = uy, 0, M
    if gather:
        cols = _dist.gather_rows(uy, layout)
        offset, global_rows = layout.start, layout.total
        bad = bad | any_nonfinite(cols)
    rows = _row_losses_or_sum(ops, ux, cols, scale, bias, offset, reduction)
    if gather:
        loss = _dist.reduce_local_rows(rows, reduction, global_rows)
    elif reduction == "none":
        loss = rows
    else:
        loss = rows.sum() if reduction == "sum" else rows.sum() / M
    return poison(loss, bad, scale, bias)


def _row_losses_or_sum(ops, x, y, scale, bias, offset: int, reduction: str) -> torch.Tensor:
    """The rows' losses (M,), or their sum (0-dim: only the sum is used) from the backend's
    loss_and_grad operator when it has one, the reduction weighs every row alike ("mean" /
    "sum") and a gradient will be needed: the gradient is then formed in the forward's sweep."""
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, y, scale, bias))
    if ops.loss_and_grad is None or reduction == "none" or not wants_grad:
        return ops.forward(x, y, scale, bias, offset)[0]
    return ops.loss_and_grad(x, y, scale, bias, offset, x.requires_grad, y.requires_grad)[0]
