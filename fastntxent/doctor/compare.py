"""One case: a backend in one dtype against the float64 reference on the same rounded inputs.

Compared: the loss (the vector of per-row losses for reduction="none"), the gradient of every
input, and the gradient of the temperature / logit_scale (a 0-dim tensor that requires grad),
all under an upstream gradient that is not 1 (1.7 for the mean, random weights in [0.5, 1.5)
per row for reduction="none").

Error = ‖a − b‖ / max(‖b‖, floor) in float64; NaN or inf in a result is an infinite error.
A relative error is ill-conditioned where the quantity is a difference of much larger terms:
the loss (lse − positive logit), the temperature gradient ((1/τ)(s_pos − Σ P s), zero
whenever the logits tie) and, with D = 1, the input gradients (every normalised row is ±1 and
the projection through the normalisation cancels them exactly). Each is therefore measured
against max(‖b‖, S), S bounding the size of its terms from |logit| ≤ 1/τ: the loss 1/τ
(×√rows for reduction="none"), the temperature W/τ², the logit scale W, the input gradients
(W/τ)·‖1/‖z_k‖‖ for D = 1 and else the size of one row's own terms, (w/τ)·‖1/‖z_k‖‖
with w the upstream weight per row — the gradient also cancels exactly when every other
column of a row is a positive (nt_xent with N = 1, supcon with one class), where P equals
the positive weights; W is the total upstream weight (1.7 for the mean).
Rounding noise of a result that cancels to (nearly) zero is then an error relative to the size
of the terms that cancelled; a real error of the size of the quantity is still far above
tolerance × S.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from fastntxent import reference

from .cases import Inputs, LossCase, call_loss

WITH_BASELINE = (torch.float32, torch.bfloat16, torch.float16)  # bounds take the reference's own error
FLOOR = 1e-6
UPSTREAM_MEAN = 1.7  # the upstream gradient of a scalar loss


@dataclass
class Outcome:
    """Results of one run, in float64 on the CPU: loss, input gradients, scalar gradient."""

    loss: torch.Tensor
    grads: dict[str, torch.Tensor]
    scalar_grad: torch.Tensor

    def quantities(self, case: LossCase) -> dict[str, torch.Tensor]:
        return {"loss": self.loss, **{f"d{k}": v for k, v in self.grads.items()},
                f"d{case.scalar_name}": self.scalar_grad}


@dataclass
class Variant:
    """What one case varies besides the shape: temperature, memory layout, reduction."""

    tau: float
    strided: bool
    reduction: str

    def describe(self) -> str:
        return f"tau={self.tau:g} {'strided' if self.strided else 'contiguous'} {self.reduction}"


@dataclass
class CaseResult:
    errors: dict[str, tuple[float, float]] = field(default_factory=dict)  # quantity -> (err, tol)
    message: str = ""

    @property
    def passed(self) -> bool:
        return not self.message and all(err <= tol for err, tol in self.errors.values())

    def worst(self) -> tuple[str, float, float]:
        """(quantity, error, tolerance) with the largest error/tolerance ratio."""
        if not self.errors:
            return ("", math.inf, 0.0)
        name = max(self.errors, key=lambda k: _ratio(*self.errors[k]))
        return (name, *self.errors[name])


def _ratio(err: float, tol: float) -> float:
    return math.inf if not math.isfinite(err) else err / tol if tol > 0 else math.inf


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def rel_err(actual: torch.Tensor, expected: torch.Tensor, floor: float) -> float:
    """‖actual − expected‖ / max(‖expected‖, floor) in float64; inf for NaN/inf or a shape mismatch."""
    a = actual.detach().to(torch.float64).cpu()
    b = expected.detach().to(torch.float64).cpu()
    if a.shape != b.shape or not torch.isfinite(a).all():
        return math.inf
    return float((a - b).norm() / max(float(b.norm()), floor, 1e-300))


def tolerance(dtype: torch.dtype, device_type: str, base_err: float | None = None) -> float:
    """fp64 1e-10; fp32 1e-5 (1e-3 on a GPU allowed to use tf32); bf16/fp16 2e-2; for fp32 and
    below at least twice `base_err`, the error of the reference itself in that dtype on the same
    rounded input (flash-attention's rule: where the maths is ill-conditioned, e.g. τ = 0.01 with
    a saturated softmax, rounding the normalised rows alone costs every implementation more)."""
    if dtype == torch.float64:
        return 1e-10
    if dtype == torch.float32:
        tf32 = device_type == "cuda" and torch.get_float32_matmul_precision() != "highest"
        bound = 1e-3 if tf32 else 1e-5
    else:
        bound = 2e-2
    if base_err is not None and math.isfinite(base_err):
        bound = max(bound, 2 * base_err)
    return bound


def rounded(inputs: Inputs, dtype: torch.dtype) -> Inputs:
    """The inputs rounded to `dtype`, held in float64: what both sides of a comparison see."""
    def rnd(t):
        return t.to(dtype).to(torch.float64) if t.dtype.is_floating_point else t

    return Inputs({k: rnd(v) for k, v in inputs.grad.items()},
                  {k: rnd(v) for k, v in inputs.extra.items()}, inputs.rows)


def upstream_weights(rows: int, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(rows, generator=gen, dtype=torch.float64) + 0.5


def _backward(loss: torch.Tensor, reduction: str, weights: torch.Tensor) -> None:
    w = weights.to(device=loss.device, dtype=loss.dtype) if reduction == "none" else UPSTREAM_MEAN
    (loss * w).sum().backward()


def _layout(x: torch.Tensor, dtype, device, strided: bool, grad: bool, gen: torch.Generator):
    """(leaf, view): the leaf receives the gradient; the view is what the loss gets. Strided:
    the view takes every other column of a buffer twice as wide (fresh random in the gaps)."""
    if x.dtype == torch.int64:  # labels: every other element of an interleaved buffer
        view = torch.stack([x, x], 1).to(device)[:, 0] if strided else x.to(device)
        return view, view
    if strided:
        buf = torch.randn(*x.shape[:-1], 2 * x.shape[-1], generator=gen, dtype=torch.float64)
        buf = buf.to(device=device, dtype=dtype)
        buf[..., ::2] = x.to(device=device, dtype=dtype)
        leaf = buf.requires_grad_(grad)
        return leaf, leaf[..., ::2]
    leaf = x.to(device=device, dtype=dtype).clone().requires_grad_(grad)
    return leaf, leaf


def run_backend(case: LossCase, inputs: Inputs, variant: Variant, weights: torch.Tensor, *,
                backend: str, device, dtype: torch.dtype, gen: torch.Generator) -> Outcome:
    """Loss and gradients of `backend` in `dtype` on `device` (normalize=True, the default)."""
    leaves, views = {}, {}
    for name, x in inputs.grad.items():
        leaves[name], views[name] = _layout(x, dtype, device, variant.strided, True, gen)
    extra = {k: _layout(v, dtype, device, variant.strided, False, gen)[1] for k, v in inputs.extra.items()}
    scalar = torch.tensor(case.scalar_value(variant.tau), dtype=accumulation_dtype(dtype),
                          device=device, requires_grad=True)
    loss = call_loss(case, views, extra, scalar, backend=backend, reduction=variant.reduction)
    if loss.device.type != torch.device(device).type:
        raise RuntimeError(f"loss is on {loss.device}, the inputs on {device}")
    _backward(loss, variant.reduction, weights)
    grads = {}
    for name, leaf in leaves.items():
        if leaf.grad is None:
            raise RuntimeError(f"no gradient for {name}")
        grads[name] = (leaf.grad[..., ::2] if variant.strided else leaf.grad).double().cpu()
    if scalar.grad is None:
        raise RuntimeError(f"no gradient for {case.scalar_name}")
    return Outcome(loss.detach().double().cpu(), grads, scalar.grad.double().cpu())


def run_oracle(case: LossCase, inputs: Inputs, variant: Variant, weights: torch.Tensor,
               device) -> tuple[Outcome, dict[str, float]]:
    """The float64 reference (backend="reference") and the error floor of each quantity (see
    the module docstring)."""
    leaves = {k: v.to(device).clone().requires_grad_(True) for k, v in inputs.grad.items()}
    extra = {k: v.to(device) for k, v in inputs.extra.items()}
    scalar = torch.tensor(case.scalar_value(variant.tau), dtype=torch.float64, device=device,
                          requires_grad=True)
    loss = call_loss(case, leaves, extra, scalar, backend="reference", reduction=variant.reduction)
    _backward(loss, variant.reduction, weights)
    floors = _floors(case, leaves, variant, weights)
    grads = {k: v.grad.double().cpu() for k, v in leaves.items()}
    return Outcome(loss.detach().cpu(), grads, scalar.grad.cpu()), floors


def _floors(case: LossCase, leaves, variant: Variant, weights) -> dict[str, float]:
    """The error floor of each quantity (see the module docstring)."""
    inv_tau = 1.0 / variant.tau  # also clip_loss's logit_scale
    none = variant.reduction == "none"
    total_weight = float(weights.sum()) if none else UPSTREAM_MEAN
    scalar_terms = total_weight * (inv_tau ** 2 if case.scalar_name == "temperature" else 1.0)
    floors = {"loss": inv_tau * (math.sqrt(weights.numel()) if none else 1.0),
              f"d{case.scalar_name}": scalar_terms}
    row_weight = total_weight / max(1, weights.numel() if none else _anchor_rows(leaves))
    for name, leaf in leaves.items():
        norms = torch.linalg.vector_norm(leaf.detach(), dim=-1).clamp_min(reference.EPS)
        inverse_norms = float((1 / norms).norm())
        if leaf.shape[-1] == 1:
            floors[f"d{name}"] = total_weight * inv_tau * inverse_norms
        else:  # one row's own terms (its row side): only a cancelling gradient comes near it
            floors[f"d{name}"] = row_weight * inv_tau * inverse_norms
    return {k: max(v, FLOOR) for k, v in floors.items()}


def _anchor_rows(leaves) -> int:
    """Rows of the batch's first tensor(s): the anchors a mean is taken over (approximately)."""
    return sum(int(leaf.numel() // leaf.shape[-1]) for leaf in leaves.values())


def errors(case: LossCase, got: Outcome, ref: Outcome, floors: dict[str, float]) -> dict[str, float]:
    want = ref.quantities(case)
    return {k: rel_err(v, want[k], floors[k]) for k, v in got.quantities(case).items()}


def judge(case: LossCase, got: Outcome, ref: Outcome, floors: dict[str, float],
          base: Outcome | None, dtype: torch.dtype, device_type: str) -> CaseResult:
    """Errors of `got` against the float64 `ref`, each with its bound (`base`: the reference
    backend in `dtype` on the same input, for the bounds of fp32 and below)."""
    base_errs = errors(case, base, ref, floors) if base is not None else {}
    result = CaseResult()
    for name, err in errors(case, got, ref, floors).items():
        result.errors[name] = (err, tolerance(dtype, device_type, base_errs.get(name)))
    return result


def perturbed(outcome: Outcome, fault: float) -> Outcome:
    """Every result scaled by (1 + fault): a wrong answer the comparison must catch."""
    return Outcome(outcome.loss * (1 + fault), {k: v * (1 + fault) for k, v in outcome.grads.items()},
                   outcome.scalar_grad * (1 + fault))


def check_case(case: LossCase, inputs: Inputs, variant: Variant, *, backend: str, device,
               dtype: torch.dtype, seed: int, fault: float = 0.0) -> CaseResult:
    """`backend` in `dtype` against the float64 reference on the same rounded inputs.

    `fault` (debug, --inject-fault): perturb the backend's results by that relative amount
    before comparing, to show that a wrong answer is caught."""
    gen = torch.Generator().manual_seed(seed)
    inputs = rounded(inputs, dtype)
    weights = upstream_weights(inputs.rows, gen)
    try:
        ref, floors = run_oracle(case, inputs, variant, weights, device)
    except Exception as exc:  # noqa: BLE001 - reported, never hidden
        return CaseResult(message=f"float64 reference failed: {type(exc).__name__}: {exc}")
    try:
        got = run_backend(case, inputs, variant, weights, backend=backend, device=device, dtype=dtype, gen=gen)
    except Exception as exc:  # noqa: BLE001
        return CaseResult(message=f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300])
    base = None
    if dtype in WITH_BASELINE:
        try:
            base = got if backend == "reference" else run_backend(
                case, inputs, variant, weights, backend="reference", device=device, dtype=dtype, gen=gen)
        except Exception as exc:  # noqa: BLE001
            return CaseResult(message=f"reference in {dtype} failed: {type(exc).__name__}: {exc}"[:300])
    if fault:
        got = perturbed(got, fault)
    return judge(case, got, ref, floors, base, dtype, torch.device(device).type)
