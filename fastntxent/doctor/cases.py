"""The losses the doctor checks, each as: how to make its inputs for M rows of width D, and
how to call it through the public API.

M counts anchor rows: supcon, info_nce and clip_loss take (M, D) tensors; nt_xent takes two
views of ⌈M/2⌉ rows, multiview_nt_xent three views of ⌈M/3⌉ rows; the MoCo queue has M + 7
rows; siglip_loss takes (M, D) image and text rows; the decoupled (DCL) cases take at least 2
rows per tower or view (so that every anchor has a negative: without one its loss is −inf,
the truth, which no relative error measures). Inputs are fresh standard-normal float64 tensors on the CPU (never zeros); the caller
rounds them to the dtype under test and moves them to the device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

import fastntxent as fx

SELF, CROSS, SIGLIP = "self", "cross", "siglip"
SIGLIP_BIAS = -5.0  # a fixed logit bias for siglip_loss (its scale is the checked scalar)


@dataclass
class Inputs:
    """Tensors of one case: `grad` (names and float64 values) receive gradients; `extra`
    (labels, queue) do not. `rows` is the length of reduction="none"'s output."""

    grad: dict[str, torch.Tensor]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    rows: int = 0

    def shape(self) -> str:
        parts = [f"{name}{tuple(t.shape)}" for name, t in {**self.grad, **self.extra}.items()
                 if t.dtype.is_floating_point]
        return " ".join(parts)


@dataclass(frozen=True)
class LossCase:
    """One loss of the public API. `call(tensors, extra, scalar, **kw)` returns the loss;
    `scalar_name` is what the 0-dim scalar is ("temperature" or "logit_scale")."""

    name: str
    family: str
    make: Callable[[int, int, torch.Generator], Inputs]
    call: Callable[..., torch.Tensor]
    reductions: tuple[str, ...] = ("mean", "none")
    scalar_name: str = "temperature"

    def scalar_value(self, tau: float) -> float:
        return 1.0 / tau if self.scalar_name == "logit_scale" else tau


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _nt_xent_inputs(M: int, D: int, gen, min_rows: int = 1) -> Inputs:
    N = max(math.ceil(M / 2), min_rows)
    return Inputs({"z1": _randn(gen, N, D), "z2": _randn(gen, N, D)}, rows=2 * N)


def _multiview_inputs(M: int, D: int, gen) -> Inputs:
    V, N = 3, math.ceil(M / 3)
    return Inputs({"views": _randn(gen, V, N, D)}, rows=V * N)


def _supcon_inputs(M: int, D: int, gen) -> Inputs:
    labels = torch.randint(0, max(1, M // 4), (M,), generator=gen)  # some anchors lack a positive
    return Inputs({"z": _randn(gen, M, D)}, {"labels": labels}, rows=M)


def _pair_inputs(first: str, second: str, min_rows: int = 1):
    def make(M: int, D: int, gen) -> Inputs:
        M = max(M, min_rows)
        return Inputs({first: _randn(gen, M, D), second: _randn(gen, M, D)}, rows=M)

    return make


def _queue_inputs(M: int, D: int, gen) -> Inputs:
    inputs = _pair_inputs("q", "k")(M, D, gen)
    inputs.extra["queue"] = _randn(gen, M + 7, D)
    return inputs


LOSSES: dict[str, LossCase] = {
    case.name: case
    for case in (
        LossCase("nt_xent", SELF, _nt_xent_inputs,
                 lambda t, e, s, **kw: fx.nt_xent(t["z1"], t["z2"], s, **kw)),
        LossCase("multiview_nt_xent", SELF, _multiview_inputs,
                 lambda t, e, s, **kw: fx.multiview_nt_xent(t["views"], s, **kw)),
        LossCase("supcon", SELF, _supcon_inputs,
                 lambda t, e, s, **kw: fx.supcon(t["z"], e["labels"], s, **kw)),
        LossCase("info_nce", CROSS, _pair_inputs("q", "k"),
                 lambda t, e, s, **kw: fx.info_nce(t["q"], t["k"], None, s, **kw)),
        LossCase("info_nce_queue", CROSS, _queue_inputs,
                 lambda t, e, s, **kw: fx.info_nce(t["q"], t["k"], e["queue"], s, **kw)),
        LossCase("clip_loss", CROSS, _pair_inputs("a", "b"),
                 lambda t, e, s, **kw: fx.clip_loss(t["a"], t["b"], s, **kw),
                 reductions=("mean",), scalar_name="logit_scale"),
        LossCase("nt_xent_decoupled", SELF, lambda M, D, gen: _nt_xent_inputs(M, D, gen, min_rows=2),
                 lambda t, e, s, **kw: fx.nt_xent(t["z1"], t["z2"], s, decoupled=True, **kw)),
        LossCase("clip_loss_decoupled", CROSS, _pair_inputs("a", "b", min_rows=2),
                 lambda t, e, s, **kw: fx.clip_loss(t["a"], t["b"], s, decoupled=True, **kw),
                 reductions=("mean",), scalar_name="logit_scale"),
        LossCase("siglip_loss", SIGLIP, _pair_inputs("img", "txt"),
                 lambda t, e, s, **kw: fx.siglip_loss(t["img"], t["txt"], s, SIGLIP_BIAS, **kw),
                 scalar_name="logit_scale"),
    )
}


def call_loss(case: LossCase, tensors, extra, scalar, *, backend: str, reduction: str,
              normalize: bool = True) -> torch.Tensor:
    """The loss of `case`; clip_loss has no `reduction` argument (it is always the mean)."""
    kw = {"backend": backend, "normalize": normalize}
    if len(case.reductions) > 1:
        kw["reduction"] = reduction
    return case.call(tensors, extra, scalar, **kw)


def tiny_inputs(case: LossCase, device, dtype) -> tuple[dict, dict]:
    """Inputs of two rows of width 4 for probing whether a backend runs."""
    gen = torch.Generator().manual_seed(0)
    inputs = case.make(2, 4, gen)
    conv = {k: v.to(device=device, dtype=dtype) for k, v in inputs.grad.items()}
    extra = {k: v.to(device=device, dtype=dtype if v.dtype.is_floating_point else v.dtype)
             for k, v in inputs.extra.items()}
    return conv, extra
