"""Host-side pieces shared by the Triton launchers of both loss families.

- fp32 precision state (`set_fp32_precision` / `get_fp32_precision`);
- `kernel_flags`: what a device and dtype compile to (operand upcast, `tl.dot` precision,
  the backward's H·U operand type, the D tiling), including GPUs older than sm_80;
- `device_guard`: launch on the inputs' GPU (Triton launches on the *current* device);
- `num_splits`: column splits that fill the SMs (flash-decoding), `merge_splits` to combine
  their partial states;
- `poisoned`: NaN-filled outputs, so that an element a kernel fails to write shows up.
"""
from __future__ import annotations

import functools
import os
import threading
from typing import NamedTuple, Optional

import torch
import triton

from .tiles import flags_for

__all__ = ["set_fp32_precision", "get_fp32_precision"]

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PRECISIONS = ("tf32", "tf32x3", "ieee")
# Oldest GPU the Triton kernels run on; sm_75 (Turing) has fp16 tensor cores only, so bf16
# inputs are upcast to fp32 there and fp32 products are exact ("ieee": no tf32 before sm_80).
MIN_CAPABILITY = (7, 5)

_fp32_precision: Optional[str] = os.environ.get("FASTNTXENT_TRITON_FP32_PRECISION", "").lower() or None
if _fp32_precision not in PRECISIONS:
    _fp32_precision = None  # follow torch.get_float32_matmul_precision()


def set_fp32_precision(precision: Optional[str]) -> None:
    """How fp32 inputs use the tensor cores: "tf32", "tf32x3", "ieee" (exact fp32), or None to
    follow torch.get_float32_matmul_precision() (the default: "highest" → "ieee", "high" /
    "medium" → "tf32", as torch.matmul does)."""
    global _fp32_precision
    if precision is None:
        _fp32_precision = None
        return
    p = precision.lower()
    if p not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} or None, got {precision!r}")
    _fp32_precision = p


def get_fp32_precision() -> str:
    """The precision fp32 products use now."""
    if _fp32_precision is not None:
        return _fp32_precision
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def device_capability(device: torch.device) -> Optional[tuple[int, int]]:
    """(major, minor) of a CUDA device; None for CPU tensors (the interpreter)."""
    if device.type != "cuda":
        return None
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


class KernelFlags(NamedTuple):
    cast_f32: bool   # upcast operands to fp32 after the load
    prec: str        # tl.dot input_precision for fp32 operands
    h_bf16: bool     # backward: H and the column rows in bf16 (fp16 inputs: H underflows fp16)
    exact: bool      # fp32 products on FMA units (small tiles, narrow D chunks)
    block_d: int
    d_chunks: int
    block_do: int


_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def kernel_flags(dtype: torch.dtype, D: int, capability: Optional[tuple[int, int]]) -> KernelFlags:
    """Compile-time flags for inputs of `dtype` and width D on a GPU of `capability` (None:
    the interpreter): tiles.flags_for, the one rule (also used by .ci/compile_triton.py)."""
    f = flags_for(_DTYPE_NAMES[dtype], get_fp32_precision(), D, capability)
    return KernelFlags(f["CAST_F32"], f["PREC"], f["H_BF16"], f["EXACT"], f["BLOCK_D"], f["D_CHUNKS"], f["BLOCK_DO"])


def check_device(device: torch.device) -> None:
    """The Triton kernels' own invariant on the device: CUDA at sm_75+, or the interpreter —
    the registry's rule (backends.triton_device_refusal), for direct calls of the operators."""
    from ..backends import triton_device_refusal

    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"fastntxent triton: inputs must be CUDA tensors, got {device}")
    why = triton_device_refusal(device)
    if why is not None:
        raise ValueError(why)


# The Triton interpreter patches module-global state of triton.language during a launch: two
# threads launching at once corrupt each other ("Did you forget to add @triton.jit ?").
_INTERPRETER_LOCK = threading.Lock()


def device_guard(device: torch.device):
    """Context around a launch: on CUDA it makes `device` the current device (Triton launches
    on the current device and its current stream; without this, inputs on cuda:1 while cuda:0
    is current would run on the wrong GPU); on CPU tensors (the interpreter, not thread-safe)
    it serialises the launches of concurrent threads."""
    if device.type != "cuda":
        return _INTERPRETER_LOCK
    return torch.cuda.device(device)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_splits(rows: int, cols: int, device: torch.device, cap: int, forced: Optional[int]) -> int:
    """Column splits so that the programs of the row blocks fill the GPU's SMs (flash-decoding).

    With rb 128-row blocks and S splits each program does 1/S of a row block's work and the
    run takes about ceil(rb·S / SMs) waves: pick the S ≤ cap minimising waves/S, with a small
    charge per split for the merge; each split keeps at least 4 column tiles of 64. `forced`
    (tests) overrides; CPU tensors (the interpreter) use one split."""
    if forced is not None:
        return max(1, int(forced))
    if device.type != "cuda" or cols <= 0:
        return 1
    n_sm = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    rb = triton.cdiv(rows, 128)
    if rb >= n_sm:
        return 1
    cap = max(1, min(cap, cols // 256))
    return min(range(1, cap + 1), key=lambda S: triton.cdiv(rb * S, n_sm) / S * (1 + 0.03 * (S - 1)))


def m_key(M: int) -> int:
    """Autotune key of a row or column count: its power-of-two class."""
    return triton.next_power_of_2(max(M, 1))


# The Triton forward operators' `outputs` bit mask: the optional row statistics to compute.
OUT_TOP1 = 1       # top1 (return_stats)
OUT_EXPECTED = 2   # expected_logit (the temperature / logit scale needs a gradient)
OUT_ALL = OUT_TOP1 | OUT_EXPECTED


def output_flags(outputs: int) -> dict:
    """The forward kernels' constexpr flags for an `outputs` mask."""
    if not 0 <= outputs <= OUT_ALL:
        raise ValueError(f"fastntxent triton: outputs must be a mask of OUT_TOP1 | OUT_EXPECTED, got {outputs}")
    return dict(NEED_TOP1=bool(outputs & OUT_TOP1), NEED_PS=bool(outputs & OUT_EXPECTED))


def poisoned(shape, device, dtype=torch.float32) -> torch.Tensor:
    """NaN-filled output: an element that no program writes cannot pass as a number."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def merge_splits(m, l, ps, best, best_pos, lse, expected_logit, top1) -> None:
    """Combine the partial row states of the column splits (each (splits, M)) into `lse`,
    `expected_logit`, `top1` (each (M,)), in place: O(splits·M). A row with no column at all gets
    lse = −inf and expected_logit = 0; top1 comes from the first split reaching the maximum (the
    first column wins ties, as within a split)."""
    m_max = m.max(0).values
    m_use = torch.where(torch.isinf(m_max), torch.zeros_like(m_max), m_max)
    w = torch.exp(m - m_use)  # exp(−inf) = 0 for splits without any column
    l_tot = (l * w).sum(0)
    ps_tot = (ps * w).sum(0)
    has = l_tot > 0
    l_safe = torch.where(has, l_tot, torch.ones_like(l_tot))
    torch.where(has, m_use + torch.log(l_safe), torch.full_like(l_tot, float("-inf")), out=lse)
    torch.where(has, ps_tot / l_safe, torch.zeros_like(l_tot), out=expected_logit)
    first = best.argmax(0, keepdim=True)
    top1.copy_(best_pos.gather(0, first).squeeze(0))


def backward_rows(M: int, device: torch.device, lse, grad_lse, grad_pos):
    """The backward operators' row inputs, each checked to be (M,), as contiguous fp32."""
    rows = []
    for name, t in (("lse", lse), ("grad_lse", grad_lse), ("grad_pos", grad_pos)):
        if t.dim() != 1 or t.shape[0] != M:
            raise ValueError(f"fastntxent triton: {name} must have shape (M,) = ({M},)")
        rows.append(t.detach().to(dtype=torch.float32, device=device).contiguous())
    return rows


def grad_buffer(rows: int, D: int, splits: int, dtype: torch.dtype, device: torch.device):
    """(buffer, split stride) a backward kernel writes its gradient into: fp32 partials
    (splits, rows, D) with several splits (summed by `finish_grad`) and under the interpreter
    (its bf16/fp16 stores are not trusted); otherwise (rows, D) in `dtype`, written directly."""
    if splits > 1 or device.type == "cpu":
        g = poisoned((splits, rows, D), device)
        return g, g.stride(0)
    return poisoned((rows, D), device, dtype), 0


def finish_grad(g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The gradient from a `grad_buffer`: fp32 partials summed in a fixed order (deterministic)."""
    return g.sum(0).to(dtype) if g.dim() == 3 else g


def check_grid(grid: tuple) -> None:
    """CUDA grid limits: x < 2³¹, y and z ≤ 65 535 (a clear error, not a launch failure)."""
    x, *yz = grid
    if x >= 2**31 or any(g > 65535 for g in yz):
        raise ValueError(f"fastntxent triton: launch grid {grid} exceeds the CUDA limits")
