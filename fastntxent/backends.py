"""The backend registry: which implementation computes a loss family's per-row statistics.

One table, `BACKENDS`: for each backend the devices it runs on, the dtypes it takes, the loss
families it implements and how to get their operators. One function, `resolve(family,
backend, device, dtype)`, decides once per call: it returns the backend to use (for "auto":
CUDA tensors → Triton, else the CUDA C++ kernels, else the reference; CPU tensors → the fused
C++ kernels, else the reference) or raises a ValueError saying why the requested backend
cannot run.

A family ("self": NT-Xent, multi-view, SupCon; "cross": InfoNCE, CLIP; "siglip": SigLIP) has one operator
pair with one schema (csrc/ops.cpp, docs/maths.md); every backend provides that pair:
  self:  forward(u, temperature, labels, rows_per_view, decoupled) -> (lse, pos_sum, pos_count, expected_logit, top1)
         backward(u, temperature, labels, rows_per_view, lse, grad_lse, grad_pos, decoupled) -> grad_u
  self_rows: forward(u, temperature, labels, rows_per_view, row_start, row_stop, decoupled) -> the same five, (r1 − r0,)
         backward(u, temperature, labels, rows_per_view, row_start, row_stop, lse, grad_lse, grad_pos, decoupled)
         -> grad_u (M, D)
  cross: forward(q, k, queue, scale, pos_offset, keys_are_negatives, decoupled) -> (lse, pos, expected_logit, top1)
         backward(q, k, queue, scale, pos_offset, keys_are_negatives, lse, grad_lse, grad_pos,
                  need_grad_k, decoupled) -> (grad_q, grad_k)
  siglip: forward(x, y, scale, bias, pos_offset) -> (loss, dlogit_sum, dlogit_cos)
          backward(x, y, scale, bias, pos_offset, grad_loss, need_grad_y) -> (grad_x, grad_y)
          and, where a backend has it (cpu), loss_and_grad(x, y, scale, bias, pos_offset,
          need_grad_x, need_grad_y) -> (Σ_i loss_i, grad_x, grad_y, grad_scale, grad_bias):
          the summed loss with its gradients from the forward's sweep ("mean" / "sum")
A new backend is one row here plus its kernel file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch

from . import _extension

# "self_rows": the self family's local-rows form (rows [r0, r1) against all columns; the
# distributed losses, docs/distributed.md) — a family of its own, so that a backend without it
# (the CUDA C++ kernels) is refused by name and gather=True falls back to the full-batch path.
FAMILIES = ("self", "cross", "self_rows", "siglip")
NAMES = ("auto", "cpu", "triton", "cuda", "reference")
_ALL_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_FP32_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Operators(NamedTuple):
    forward: Callable
    backward: Optional[Callable]  # None: the reference, differentiated by autograd itself
    selective: bool = False       # forward takes a trailing `outputs` mask (Triton: see below)
    loss_and_grad: Optional[Callable] = None  # siglip: summed loss and its gradient in one sweep

    def forward_extra(self, scalar: torch.Tensor, return_stats: bool) -> tuple:
        """Trailing forward arguments: for a selective forward (Triton) the mask of the optional
        outputs to compute — top1 only for the statistics, expected_logit only when the
        temperature / logit scale may need a gradient (conservatively: it requires grad or is
        wrapped by a torch.func transform); the others stay NaN and cost nothing in the loop."""
        if not self.selective:
            return ()
        needs_grad = scalar.requires_grad
        if not torch.compiler.is_compiling():  # (dynamo cannot trace the functorch query)
            needs_grad = needs_grad or torch._C._functorch.is_functorch_wrapped_tensor(scalar)
        return ((1 if return_stats else 0) | (2 if needs_grad else 0),)


@dataclass(frozen=True)
class Backend:
    name: str
    devices: tuple            # device types it runs on
    dtypes: tuple             # input dtypes it takes
    families: tuple           # loss families it implements
    computes_in_fp32: bool    # the kernels accumulate in fp32 (so they refuse float64)
    unavailable: Callable[[str, torch.device], Optional[str]]  # (family, device) -> why not, or None
    operators: Callable[[str], Operators]                      # family -> its operator pair

    def operand_dtype(self, family: str, dtype: torch.dtype) -> torch.dtype:
        """dtype the normalised rows are handed over in. GPU kernels take the input dtype
        (tensor cores), and so does the reference, which then computes in the accumulation
        dtype: it sees the rows rounded as the GPU kernels do, so that "the reference's own
        error in that dtype" is a fair bound for them. The CPU kernels compute in the
        accumulation dtype (fp64 stays fp64, else fp32) and take rows in it rather than rows
        rounded back to bf16/fp16."""
        return accumulation_dtype(dtype) if self.name == "cpu" else dtype


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The one accumulation rule of every backend: fp64 stays fp64, everything else is fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------
# Availability of each backend (one line saying why not, or None)
# ---------------------------------------------------------------------------------------
_REBUILD = "build it with `pip install --no-build-isolation -e .`"


def _cpu_unavailable(family: str, device: torch.device) -> Optional[str]:
    if not _extension.has_cpu_kernels():
        return (f'backend="cpu" needs the compiled extension fastntxent._C, which failed to load '
                f"({_extension.LOAD_ERROR}); {_REBUILD}")
    if family == "cross" and not _extension.has_cross_kernels():
        return f'backend="cpu": the built fastntxent._C predates the cross family; re{_REBUILD[1:]}'
    if family == "self_rows" and not _extension.has_local_rows_kernels():
        return f'backend="cpu": the built fastntxent._C predates the local-rows operators; re{_REBUILD[1:]}'
    if family == "siglip" and not _extension.has_siglip_kernels():
        return f'backend="cpu": the built fastntxent._C predates the SigLIP kernels; re{_REBUILD[1:]}'
    return None


_TRITON_IMPORT: list = []  # [error or None], filled on first use (a plain cache: torch.compile traces it)


def _triton_import_error() -> Optional[str]:
    if not _TRITON_IMPORT:
        try:
            from ._triton import cross_similarity, self_similarity, siglip  # noqa: F401

            _TRITON_IMPORT.append(None)
        except ImportError as exc:
            _TRITON_IMPORT.append(f"triton is not importable ({exc}); pip install triton")
    return _TRITON_IMPORT[0]


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_unavailable(family: str, device: torch.device) -> Optional[str]:
    why = _triton_import_error()
    if why is not None:
        return f'backend="triton" cannot run: {why}'
    return triton_device_refusal(device)


def triton_device_refusal(device: torch.device) -> Optional[str]:
    """Why the Triton kernels cannot run on `device` (triton importable), or None: CPU tensors
    need the interpreter, GPUs compute capability 7.5."""
    if device.type == "cpu" and not interpreting():
        return ('backend="triton" on CPU tensors runs only under the Triton interpreter: '
                "set TRITON_INTERPRET=1 before importing triton, or use CUDA tensors")
    if device.type == "cuda":
        from ._triton import common

        cap = common.device_capability(device)
        if cap < common.MIN_CAPABILITY:
            return (f'backend="triton" needs a GPU of compute capability >= 7.5, {device} has '
                    f"{cap[0]}.{cap[1]}")
    return None


def _cuda_unavailable(family: str, device: torch.device) -> Optional[str]:
    if family != "self":
        return ('backend="cuda" (the CUDA C++ kernels) covers the self-similarity family only '
                '(nt_xent, multiview_nt_xent, supcon); use backend="triton" or "auto"')
    if not _extension.has_cuda_kernels():
        return ('backend="cuda" needs fastntxent._C built with CUDA kernels (a CUDA toolkit and '
                "a CUDA build of torch at install time; see README)")
    cap = torch.cuda.get_device_capability(device)
    return _extension.cuda_code_missing(cap)


def _reference_unavailable(family: str, device: torch.device) -> Optional[str]:
    return None


# ---------------------------------------------------------------------------------------
# Operators of each backend
# ---------------------------------------------------------------------------------------
def _compiled_operators(family: str) -> Operators:
    ops = torch.ops.fastntxent
    if family == "self":
        return Operators(ops.self_forward, ops.self_backward)
    if family == "self_rows":
        return Operators(ops.self_forward_rows, ops.self_backward_rows)
    if family == "siglip":
        fused = ops.siglip_loss_and_grad if _extension.has_siglip_loss_and_grad() else None
        return Operators(ops.siglip_forward, ops.siglip_backward, loss_and_grad=fused)
    return Operators(ops.cross_forward, ops.cross_backward)


def _triton_operators(family: str) -> Operators:
    if family == "self":
        from ._triton import self_similarity as launcher

        return Operators(launcher.self_forward, launcher.self_backward, selective=True)
    if family == "self_rows":
        from ._triton import self_local_similarity as launcher

        return Operators(launcher.self_forward_rows, launcher.self_backward_rows, selective=True)
    if family == "siglip":
        from ._triton import siglip as launcher

        return Operators(launcher.siglip_forward, launcher.siglip_backward)
    from ._triton import cross_similarity as launcher

    return Operators(launcher.cross_forward, launcher.cross_backward, selective=True)


def _reference_self_rows(u, temperature, labels, rows_per_view, decoupled=False):
    from . import reference

    return reference.self_similarity_rows(u.to(accumulation_dtype(u.dtype)), temperature, labels, rows_per_view,
                                          decoupled)


def _reference_self_local_rows(u, temperature, labels, rows_per_view, row_start, row_stop, decoupled=False):
    from . import reference

    return reference.self_similarity_local_rows(u.to(accumulation_dtype(u.dtype)), temperature, labels, rows_per_view,
                                                row_start, row_stop, decoupled)


def _reference_cross_rows(q, k, queue, scale, pos_offset, keys_are_negatives, decoupled=False):
    from . import reference

    acc = accumulation_dtype(q.dtype)
    return reference.cross_similarity_rows(q.to(acc), k.to(acc), None if queue is None else queue.to(acc), scale,
                                           pos_offset, keys_are_negatives, decoupled)


def _reference_siglip_rows(x, y, scale, bias, pos_offset):
    from . import reference

    acc = accumulation_dtype(x.dtype)
    return reference.siglip_rows(x.to(acc), y.to(acc), scale, bias, pos_offset)


def _reference_operators(family: str) -> Operators:
    if family == "self":
        return Operators(_reference_self_rows, None)
    if family == "self_rows":
        return Operators(_reference_self_local_rows, None)
    if family == "siglip":
        return Operators(_reference_siglip_rows, None)
    return Operators(_reference_cross_rows, None)


BACKENDS = {
    "cpu": Backend("cpu", ("cpu",), _ALL_FLOATS, FAMILIES, False, _cpu_unavailable, _compiled_operators),
    "triton": Backend("triton", ("cuda", "cpu"), _FP32_KERNEL_DTYPES, FAMILIES, True, _triton_unavailable,
                      _triton_operators),
    "cuda": Backend("cuda", ("cuda",), _FP32_KERNEL_DTYPES, ("self",), True, _cuda_unavailable,  # no self_rows
                    _compiled_operators),
    "reference": Backend("reference", ("cpu", "cuda", "meta"), _ALL_FLOATS, FAMILIES, False,
                         _reference_unavailable, _reference_operators),
}
# What "auto" tries, in order, per device type.
AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}


def check_name(backend) -> str:
    if backend not in NAMES:
        raise ValueError(f"backend must be one of {NAMES}, got {backend!r}")
    return backend


def refusal(backend: str, family: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why `backend` cannot compute `family` on `device` for `dtype` inputs, or None."""
    spec = BACKENDS[backend]
    if family not in spec.families:
        return spec.unavailable(family, device) or f'backend="{backend}" does not implement the {family} family'
    if spec.computes_in_fp32 and dtype == torch.float64:
        return (f'backend="{backend}" computes in fp32 and does not take float64 inputs; use '
                'backend="cpu" (CPU tensors) or "reference", or cast the embeddings to float32')
    if device.type not in spec.devices:
        wanted = "CUDA" if spec.devices[0] == "cuda" else spec.devices[0].upper()
        return f'backend="{backend}" needs {wanted} tensors, got tensors on {device}'
    if dtype not in spec.dtypes:
        return f'backend="{backend}" does not take {dtype} inputs'
    return spec.unavailable(family, device)


def resolve(family: str, backend: str, device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend that computes `family` for inputs on `device` of `dtype`: the requested one
    (ValueError saying why if it cannot run) or, for "auto", the first of AUTO_ORDER that can."""
    check_name(backend)
    if backend == "auto":
        for name in AUTO_ORDER.get(device.type, ("reference",)):
            if refusal(name, family, device, dtype) is None:
                return BACKENDS[name]
        return BACKENDS["reference"]
    why = refusal(backend, family, device, dtype)
    if why is not None:
        raise ValueError(why)
    return BACKENDS[backend]
