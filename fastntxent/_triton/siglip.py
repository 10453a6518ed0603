"""Triton operators of SigLIP's pairwise sigmoid loss (docs/maths.md §7).

    fastntxent::siglip_forward_triton(x, y, scale, bias, pos_offset)
        -> (loss, dlogit_sum, dlogit_cos)                            each (M,) float32
    fastntxent::siglip_backward_triton(x, y, scale, bias, pos_offset, grad_loss, need_grad_y)
        -> (grad_x, grad_y)                                  in x's / y's dtype

Same schema and meaning as the C++ operators (csrc/ops.cpp, fastntxent/siglip_family.py); the
kernels are in siglip_kernels.py. This file launches: kernel flags for the device, column splits
of the forward (occupancy), the device guard, NaN-poisoned outputs.
"""
from __future__ import annotations

import torch
import triton

from . import common
from .siglip_kernels import siglip_bwd_kernel, siglip_fwd_kernel

__all__ = ["siglip_forward", "siglip_backward"]

# Column splits of the forward: None picks from M and the SM count (1 under the interpreter);
# an int forces it (tests exercise the split path with it).
SPLITS = None
_MAX_SPLITS = 16


def _check(x, y, scale, bias, pos_offset):
    """The kernels' invariants (the public API has already validated the user's input)."""
    for name, t in (("x", x), ("y", y)):
        if t.dim() != 2 or t.shape[1] < 1:
            raise ValueError(f"fastntxent triton: {name} must be 2-D with D >= 1, got shape {tuple(t.shape)}")
    if x.dtype not in common.KERNEL_DTYPES or y.dtype != x.dtype:
        raise ValueError(
            "fastntxent triton kernels take x and y of one dtype among float32, bfloat16, float16; "
            f'got {x.dtype} and {y.dtype} (float64: use backend="cpu" or backend="reference")')
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"fastntxent triton: x and y must have the same D, got {x.shape[1]} and {y.shape[1]}")
    common.check_device(x.device)
    if y.device != x.device:
        raise ValueError(f"fastntxent triton: y is on {y.device} but x is on {x.device}")
    if scale.numel() != 1 or bias.numel() != 1:
        raise ValueError("fastntxent triton: scale and bias must hold one value each")
    if pos_offset < 0 or pos_offset + x.shape[0] > y.shape[0]:
        raise ValueError(f"fastntxent triton: pos_offset + M must be <= N, got {pos_offset} + {x.shape[0]} > "
                         f"{y.shape[0]}")


def _scalar(s: torch.Tensor, device) -> torch.Tensor:
    return s.detach().reshape(()).to(device=device, dtype=torch.float32)


@torch.library.custom_op("fastntxent::siglip_forward_triton", mutates_args=())
def _siglip_forward_triton(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                           pos_offset: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(x, y, scale, bias, pos_offset)
    x, y = x.detach(), y.detach()
    M, D = x.shape
    N = y.shape[0]
    outs = [common.poisoned(M, x.device) for _ in range(3)]
    if M == 0:
        return tuple(outs)
    flags = common.kernel_flags(x.dtype, D, common.device_capability(x.device))
    splits = common.num_splits(M, N, x.device, _MAX_SPLITS, SPLITS)
    work = common.poisoned((3, splits, M), x.device) if splits > 1 else outs[0]
    common.check_grid((triton.cdiv(M, 32), splits))
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), splits)  # noqa: E731
    with common.device_guard(x.device):
        siglip_fwd_kernel[grid](
            x, x.stride(0), x.stride(1), y, y.stride(0), y.stride(1),
            _scalar(scale, x.device), _scalar(bias, x.device), M, N, D, pos_offset, common.m_key(M), common.m_key(N),
            *outs, work, BLOCK_D=flags.block_d, D_CHUNKS=flags.d_chunks, CAST_F32=flags.cast_f32, PREC=flags.prec,
            SPLIT=splits > 1,
        )
    if splits > 1:
        for out, part in zip(outs, work.unbind(0)):
            torch.sum(part, 0, out=out)
    return tuple(outs)


def _grad(a, b, sc, bi, w, offset, transposed, flags):
    """t·G·b (or t·Gᵀ·b, `transposed`) for the rows of a: (rows, D) in a's dtype."""
    R, D = a.shape
    g, _ = common.grad_buffer(R, D, 1, a.dtype, a.device)
    d_grid = triton.cdiv(D, flags.block_do)
    common.check_grid((triton.cdiv(R, 32), d_grid))
    grid = lambda meta: (triton.cdiv(R, meta["BLOCK_M"]), d_grid)  # noqa: E731
    with common.device_guard(a.device):
        siglip_bwd_kernel[grid](
            a, a.stride(0), a.stride(1), b, b.stride(0), b.stride(1),
            sc, bi, w, R, b.shape[0], D, offset, common.m_key(R), common.m_key(b.shape[0]), g, D,
            BLOCK_D=flags.block_d, BLOCK_DO=flags.block_do, D_CHUNKS=flags.d_chunks, TRANSPOSED=transposed,
            CAST_F32=flags.cast_f32, PREC=flags.prec, H_BF16=flags.h_bf16,
        )
    return common.finish_grad(g, a.dtype)


@torch.library.custom_op("fastntxent::siglip_backward_triton", mutates_args=())
def _siglip_backward_triton(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                            pos_offset: int, grad_loss: torch.Tensor,
                            need_grad_y: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _check(x, y, scale, bias, pos_offset)
    x, y = x.detach(), y.detach()
    M, D = x.shape
    if grad_loss.dim() != 1 or grad_loss.shape[0] != M:
        raise ValueError(f"fastntxent triton: grad_loss must have shape (M,) = ({M},)")
    if M == 0:
        return torch.zeros_like(x), torch.zeros_like(y)
    w = grad_loss.detach().to(dtype=torch.float32, device=x.device).contiguous()
    sc, bi = _scalar(scale, x.device), _scalar(bias, x.device)
    flags = common.kernel_flags(x.dtype, D, common.device_capability(x.device))
    grad_x = _grad(x, y, sc, bi, w, pos_offset, False, flags)
    grad_y = _grad(y, x, sc, bi, w, pos_offset, True, flags) if need_grad_y else torch.zeros_like(y)
    return grad_x, grad_y


siglip_forward = torch.ops.fastntxent.siglip_forward_triton
siglip_backward = torch.ops.fastntxent.siglip_backward_triton

from ..siglip_family import register_operators  # noqa: E402

register_operators(_siglip_forward_triton, _siglip_backward_triton)
