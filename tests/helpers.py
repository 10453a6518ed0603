"""Shared test helpers: tolerances by dtype, relative errors that never let NaN pass,
and the list of backends every parametrized test runs over."""
from __future__ import annotations

import os

import pytest
import torch

import fastntxent as fx
import fastntxent._extension as ext

# Relative-error bounds per input dtype (docs/maths.md §3 / developers' brief).
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.bfloat16: 2e-2,
    torch.float16: 2e-2,
}


def rel_err(actual: torch.Tensor, expected: torch.Tensor, floor: float = 1e-6) -> float:
    """‖actual − expected‖ / max(‖expected‖, floor) in float64; inf when actual has NaN/inf.

    The floor keeps quantities that are exactly zero in theory (D = 1 gradients through the
    normalisation, say) from turning rounding noise into a huge relative error."""
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if not torch.isfinite(actual).all():
        return float("inf")
    scale = expected.norm().clamp_min(floor)
    return float((actual - expected).norm() / scale)


def assert_rel_close(actual, expected, tol, what=""):
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def _cuda_ok():
    return torch.cuda.is_available()


def _triton_ok():
    from fastntxent.backends import _triton_import_error

    return _triton_import_error() is None


# (backend, device) pairs; a backend joins the shared suite by adding a line here.
BACKEND_CASES = [
    pytest.param("cpu", "cpu", id="cpu",
                 marks=pytest.mark.skipif(not ext.has_cpu_kernels(), reason="fastntxent._C not built")),
    pytest.param("triton", "cpu", id="triton-interpret",
                 marks=pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or not _triton_ok(),
                                          reason="needs TRITON_INTERPRET=1 and fastntxent._triton")),
    pytest.param("triton", "cuda", id="triton-cuda",
                 marks=pytest.mark.skipif(not (_cuda_ok() and _triton_ok()), reason="needs a CUDA GPU")),
    pytest.param("cuda", "cuda", id="cuda",
                 marks=pytest.mark.skipif(not (_cuda_ok() and ext.has_cuda_kernels()),
                                          reason="needs a CUDA GPU and the CUDA build")),
]


def self_family_inputs(mode, M, D, device):
    """float64 embeddings (M', D) on the CPU and `loss(z, τ, **kw)` for the mode:
    "supcon" (random labels), "nt_xent" (two views) or "multiview" (three views)."""
    if mode == "supcon":
        z = torch.randn(M, D, dtype=torch.float64)
        labels = torch.randint(0, max(1, M // 4), (M,)).to(device)
        return z, lambda zz, t, **kw: fx.supcon(zz, labels, t, **kw)
    if mode == "nt_xent":
        N = max(1, M // 2)
        z = torch.randn(2 * N, D, dtype=torch.float64)
        return z, lambda zz, t, **kw: fx.nt_xent(zz[:N], zz[N:], t, **kw)
    V = 3
    N = max(1, M // V)
    z = torch.randn(V * N, D, dtype=torch.float64)
    return z, lambda zz, t, **kw: fx.multiview_nt_xent(zz.view(V, N, D), t, **kw)


def loss_and_grads(call, z, tau, dtype, device, backend, reduction, upstream):
    """Loss, ∂z and ∂τ (temperature as a tensor that requires grad) for one backend; the
    upstream gradient is `upstream` (M',) for reduction="none", else 1.7."""
    zz = z.to(device=device, dtype=dtype).detach().clone().requires_grad_(True)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    t = torch.tensor(tau, dtype=acc, device=device, requires_grad=True)
    loss = call(zz, t, backend=backend, reduction=reduction)
    weight = upstream.to(device=device, dtype=loss.dtype) if reduction == "none" else 1.7
    (loss * weight).sum().backward()
    return loss.detach(), zz.grad, t.grad


def check_against_reference(call, z, tau, dtype, device, reduction, backend, tol=None, what="", split=None,
                            upstream_rows=None):
    """Loss, ∂z, ∂τ of `backend` in `dtype` against the float64 reference on the same rounded
    inputs. Bound: `tol`, or TOLERANCE[dtype] — for bf16/fp16 at least twice the error of the
    reference itself on the same low-precision input (flash-attention's rule: at τ = 0.01 the
    rounding of the unit rows alone is amplified 100×).

    `split` = rows of the first input when z stacks two (the cross family's q and k): ∂z is
    then checked as ∂q and ∂k separately. `upstream_rows`: length of the per-row loss for
    reduction="none" (default: all rows of z)."""
    z = z.to(dtype).to(torch.float64)
    upstream = torch.rand(upstream_rows or z.shape[0], dtype=torch.float64) + 0.5
    ref = loss_and_grads(call, z, tau, torch.float64, device, "reference", reduction, upstream)
    got = loss_and_grads(call, z, tau, dtype, device, backend, reduction, upstream)
    low = dtype in (torch.bfloat16, torch.float16)
    base = loss_and_grads(call, z, tau, dtype, device, "reference", reduction, upstream) if low else ref

    def parts(res):
        loss, dz, dt = res
        return (loss, dz, dt) if split is None else (loss, dz[:split], dz[split:], dt)

    names = ("loss", "dz", "dtau") if split is None else ("loss", "dq", "dk", "dtau")
    for name, g, r, b in zip(names, parts(got), parts(ref), parts(base)):
        assert g.device.type == torch.device(device).type
        assert torch.isfinite(g).all(), f"{what} {name} has NaN/inf"
        bound = tol if tol is not None else max(TOLERANCE[dtype], 2 * rel_err(b, r))
        assert_rel_close(g, r, bound, f"{what} {name}")


def cross_family_inputs(mode, M, D, K, device):
    """float64 q and k stacked (2M, D) on the CPU and `loss(z, τ, **kw)` for the mode:
    "info_nce" (in-batch keys), "info_nce_queue" (a (K, D) queue) or "clip" (τ is 1/scale)."""
    z = torch.randn(2 * M, D, dtype=torch.float64)
    if mode == "info_nce":
        return z, lambda zz, t, **kw: fx.info_nce(zz[:M], zz[M:], None, t, **kw)
    if mode == "info_nce_queue":
        queue = torch.randn(K, D, dtype=torch.float64)
        return z, lambda zz, t, **kw: fx.info_nce(zz[:M], zz[M:], queue.to(zz.device, zz.dtype), t, **kw)

    def clip(zz, t, *, reduction, **kw):
        assert reduction == "mean", "clip_loss has no reduction option"
        return fx.clip_loss(zz[:M], zz[M:], 1 / t, **kw)
    return z, clip


# Backends of the cross family (the CUDA C++ kernels cover the self family only).
CROSS_BACKEND_CASES = [c for c in BACKEND_CASES if c.values[0] != "cuda"]
