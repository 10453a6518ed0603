"""Which backend runs where, and why not: asked of the library itself.

The public loss is called on a tiny input with `backend=<name>`; a backend that cannot run
raises ValueError saying why (SPEC §3). Only the public API is used, so this stays right
however the library's dispatch is organised inside.
"""
from __future__ import annotations

import torch

from .cases import LOSSES, call_loss, tiny_inputs

BACKENDS = ("cpu", "triton", "cuda", "reference")


def backend_status(backend: str, device, dtype: torch.dtype = torch.float32,
                   loss: str = "nt_xent") -> tuple[bool, str]:
    """(True, "") if `loss` runs with `backend` on `device` in `dtype`, else (False, why).

    Only ValueError means "cannot run here"; any other exception is a defect and propagates."""
    case = LOSSES[loss]
    tensors, extra = tiny_inputs(case, device, dtype)
    try:
        call_loss(case, tensors, extra, case.scalar_value(0.5), backend=backend, reduction="mean")
    except ValueError as exc:
        return False, " ".join(str(exc).split())
    return True, ""


def device_types() -> list[tuple[str, str | None]]:
    """(device type, the device to probe or None when there is none)."""
    cuda = "cuda" if torch.cuda.is_available() else None
    return [("cpu", "cpu"), ("cuda", cuda)]


def family_status(backend: str, device: str | None) -> dict:
    """Availability of `backend` on one device type, per family (self: nt_xent; cross:
    info_nce), as {"self": (ok, why), "cross": (ok, why)}; an unexpected exception is
    reported as not available with "error: ..."."""
    out = {}
    for family, loss in (("self", "nt_xent"), ("cross", "info_nce")):
        if device is None:
            out[family] = (False, "no CUDA device")
            continue
        try:
            out[family] = backend_status(backend, device, torch.float32, loss)
        except Exception as exc:  # noqa: BLE001 - a defect, shown as such
            out[family] = (False, f"error: {type(exc).__name__}: {exc}")
    return out


def summarize(status: dict) -> str:
    """One line for a cell of the availability table."""
    (s_ok, s_why), (c_ok, c_why) = status["self"], status["cross"]
    if s_ok and c_ok:
        return "yes"
    if s_ok:
        return f"self family only (cross: {c_why})"
    if c_ok:
        return f"cross family only (self: {s_why})"
    return f"no: {s_why}" if s_why == c_why else f"no: {s_why} / cross: {c_why}"
