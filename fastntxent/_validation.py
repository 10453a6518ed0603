"""Input checks shared by every entry point: clear ValueError/TypeError naming the argument."""
from __future__ import annotations

import math
from typing import Union

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
REDUCTIONS = ("mean", "sum", "none")

Scalar = Union[float, int, torch.Tensor]


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def check_embeddings(name: str, x, ndim: int = 2, allow_no_rows: bool = False) -> torch.Tensor:
    """`x` must be a floating tensor of rank `ndim` with non-zero extents (but the row count
    when `allow_no_rows`: a rank of a distributed loss may hold no rows)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} has dtype {x.dtype}; supported: float32, float64, bfloat16, float16"
        )
    if x.numel() == 0 and not (allow_no_rows and x.shape[-2] == 0 and all(n > 0 for i, n in enumerate(x.shape) if i != x.dim() - 2)):
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    return x


def check_same_device(**tensors: torch.Tensor) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; "
                "put all inputs on one device"
            )


def check_pair(name_a: str, a, name_b: str, b, allow_no_rows: bool = False) -> None:
    """Two embedding tensors that must match: same shape, device and dtype."""
    check_embeddings(name_a, a, allow_no_rows=allow_no_rows)
    check_embeddings(name_b, b, allow_no_rows=allow_no_rows)
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    check_same_device(**{name_a: a, name_b: b})
    if a.dtype != b.dtype:
        raise TypeError(f"{name_a} and {name_b} must have the same dtype, got {a.dtype} and {b.dtype}")


def check_labels(labels, rows: int, device: torch.device) -> torch.Tensor:
    """Integer labels of shape (rows,) on `device`; returned as int64."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if labels.shape != (rows,):
        raise ValueError(f"labels must have shape ({rows},) to match z, got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels is on {labels.device} but z is on {device}")
    return labels.to(torch.int64)


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def check_backend(backend: str) -> str:
    from .backends import check_name

    return check_name(backend)


def as_temperature(temperature: Scalar, like: torch.Tensor, name: str = "temperature") -> torch.Tensor:
    """A 0-dim tensor in the accumulation dtype of `like`, on its device, keeping autograd.

    Floats and 0-dim tensors are accepted; a float must be finite and > 0 (ValueError).
    No host synchronisation: a float becomes a device tensor by a fill, not a copy.
    """
    acc = torch.float64 if like.dtype == torch.float64 else torch.float32
    if isinstance(temperature, bool) or not isinstance(temperature, (float, int, torch.Tensor)):
        raise TypeError(f"{name} must be a float or a 0-dim tensor, got {type(temperature).__name__}")
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1 or temperature.dim() > 1:
            raise ValueError(f"{name} must be a scalar (0-dim) tensor, got shape {tuple(temperature.shape)}")
        if not temperature.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating tensor, got dtype {temperature.dtype}")
        if temperature.device != like.device and temperature.device.type != "cpu":
            raise ValueError(f"{name} is on {temperature.device} but the embeddings are on {like.device}")
        # Its value is never read on the host (that would synchronise with the GPU every
        # call): a value <= 0 or non-finite makes the loss NaN (bad_scalar), and the C++ CPU
        # kernel refuses it.
        return temperature.reshape(()).to(device=like.device, dtype=acc)
    if _compiling():
        # A float that torch.compile traces symbolically (a temperature schedule): no Python
        # check is possible; the losses poison their output for a value <= 0 or non-finite.
        return torch.ones((), dtype=acc, device=like.device) * temperature  # stays symbolic: no recompile per value
    try:
        value = float(temperature)
    except OverflowError:  # an int beyond float's range
        raise ValueError(f"{name} must be finite and > 0, got an int beyond float's range") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    info = torch.finfo(acc)
    if not (info.tiny <= value <= info.max):  # would round to 0 / inf (or a subnormal) in `acc`
        raise ValueError(f"{name} = {value!r} is outside the normal range of {acc} ({info.tiny:.3g} to "
                         f"{info.max:.3g}), the dtype the loss is computed in")
    return torch.full((), value, dtype=acc, device=like.device)  # a fill on the device: no host copy


def bad_scalar(scalar: torch.Tensor) -> torch.Tensor:
    """0-dim bool: the temperature / scale tensor is not finite and > 0 (the check that also
    runs under torch.compile, where the eager ValueError cannot)."""
    return ~(torch.isfinite(scalar) & (scalar > 0))


def refuse_unsupported_autograd(backend: str, *tensors) -> None:
    """The fused operators have a first-order reverse-mode autograd formula only: refuse
    torch.func transforms and forward-mode dual tensors with a clear error (the reference
    backend supports them all). Double backward is refused in the operators' backward."""
    if backend == "reference" or _compiling():
        return
    from torch.autograd import forward_ad

    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        if torch._C._functorch.is_functorch_wrapped_tensor(t):
            raise NotImplementedError(
                f'fastntxent: torch.func transforms (grad, vmap, jvp, jacrev, hessian, ...) are not supported '
                f'by backend="{backend}"; use backend="reference" under them'
            )
        if forward_ad._current_level >= 0 and forward_ad.unpack_dual(t).tangent is not None:
            raise NotImplementedError(
                f'fastntxent: forward-mode AD (dual tensors, torch.func.jvp) is not supported by '
                f'backend="{backend}"; use backend="reference"'
            )


def refuse_double_backward() -> None:
    """Called in the operators' backward: grad mode is on there only under create_graph=True
    (double backward, Hessian-vector products), which the first-order formula cannot serve."""
    if torch.is_grad_enabled() and not _compiling():
        raise NotImplementedError(
            "fastntxent: double backward (create_graph=True: Hessian-vector products, gradient "
            'penalties through the loss) is not supported by the fused backends; use backend="reference"'
        )


def check_positive_number(name: str, value) -> float:
    """A module's constructor number (temperature, logit scale): a finite real > 0, not a bool."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float > 0, got {type(value).__name__} {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return float(value)


def check_flag(name: str, value) -> bool:
    """A True/False option (not a truthy string or number that would silently mean True)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value
